//! Mosquitto's own command-line clients against the edge, so that a misunderstanding shared by
//! our code and rumqttc cannot pass. Needs `mosquitto-clients` (installed by `.ci/run`).

use rumqttc::QoS;
use std::process::Stdio;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use wharf_tests::client::{payloads, Client};
use wharf_tests::mock_worker::MockWorker;
use wharf_tests::{edge_config, init_tracing, start_edge, PATIENCE};

fn require(tool: &str) {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{tool} not found: install mosquitto-clients (see README)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_publish_and_subscribe_through_wharf() {
    require("mosquitto_sub");
    require("mosquitto_pub");
    init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let socket = dir.path().join("worker.sock");
    let _worker = MockWorker::start(&socket);
    let edge = start_edge(edge_config(&socket, "edge-a")).await;
    let port = edge.local_addr.port().to_string();

    // mosquitto_sub at QoS 2, printing topic and payload, exiting after 4 messages. With -d
    // it reports the SUBACK, which tells us it is subscribed.
    // stdbuf: mosquitto_sub's stdout is a pipe here, which C buffers fully otherwise.
    let mut sub = Command::new("stdbuf")
        .args([
            "-oL",
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-i",
            "msub",
            "-q",
            "2",
            "-t",
            "fleet/#",
            "-v",
            "-C",
            "4",
            "-d",
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start mosquitto_sub");
    let mut lines = BufReader::new(sub.stdout.take().expect("stdout")).lines();
    tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.expect("read") {
            if line.contains("SUBACK") {
                return;
            }
        }
        panic!("mosquitto_sub ended before subscribing");
    })
    .await
    .expect("mosquitto_sub subscribed in time");

    // A rumqttc subscriber sees what mosquitto_pub sends.
    let mut rumq = Client::connect(edge.local_addr, "rsub", true).await;
    rumq.subscribe("fleet/#", QoS::AtLeastOnce).await;

    for (qos, payload) in [("0", "12.5,1"), ("1", "13.0,2"), ("2", "13.5,3")] {
        let status = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-i",
                "mpub",
                "-q",
                qos,
                "-t",
                "fleet/dev7/t",
                "-m",
                payload,
            ])
            .status()
            .await
            .expect("run mosquitto_pub");
        assert!(status.success(), "mosquitto_pub -q {qos} failed");
    }
    let mut publisher = Client::connect(edge.local_addr, "rpub", true).await;
    publisher
        .publish_acked("fleet/dev8/t", QoS::ExactlyOnce, "from-rumqttc")
        .await;

    let got = rumq.publishes(4).await;
    assert_eq!(
        payloads(&got),
        vec!["12.5,1", "13.0,2", "13.5,3", "from-rumqttc"]
    );

    let mut received = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.expect("read") {
            if line.starts_with("fleet/") {
                received.push(line);
            }
        }
    })
    .await
    .expect("mosquitto_sub got its 4 messages and exited");
    assert_eq!(
        received,
        vec![
            "fleet/dev7/t 12.5,1",
            "fleet/dev7/t 13.0,2",
            "fleet/dev7/t 13.5,3",
            "fleet/dev8/t from-rumqttc"
        ]
    );
    let status = sub.wait().await.expect("mosquitto_sub exit");
    assert!(status.success());

    // A retained message set by mosquitto_pub reaches a later mosquitto_sub with the flag.
    let status = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-q",
            "1",
            "-r",
            "-t",
            "fleet/config",
            "-m",
            "v2",
        ])
        .status()
        .await
        .expect("run mosquitto_pub");
    assert!(status.success());
    let out = tokio::time::timeout(
        PATIENCE,
        Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-t",
                "fleet/config",
                "-C",
                "1",
                "-F",
                "%r %t %p",
            ])
            .output(),
    )
    .await
    .expect("retained message in time")
    .expect("run mosquitto_sub");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1 fleet/config v2"
    );
}
