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

async fn run(program: &str, args: &[&str]) -> String {
    let out = tokio::time::timeout(PATIENCE, Command::new(program).args(args).output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish in time"))
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// mosquitto_pub and mosquitto_sub in MQTT 5.0: every message property set by one reaches the
/// other, through a persistent session that was away (so through the store), with the
/// subscription identifier it subscribed with and the expiry counted down. And in MQTT 3.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_in_5_0_and_3_1() {
    require("mosquitto_sub");
    require("mosquitto_pub");
    let stack = wharf_tests::stack::Stack::new(wharf_tests::stack::Kind::Embedded).await;
    let port = stack.addr().port().to_string();
    let p = port.as_str();
    // Subscribe with a session that lasts 10 minutes, and leave (-E: once subscribed).
    let sub_args = [
        "-V",
        "mqttv5",
        "-p",
        p,
        "-i",
        "m5sub",
        "-c",
        "-x",
        "600",
        "-q",
        "1",
        "-t",
        "m5/#",
        "-D",
        "subscribe",
        "subscription-identifier",
        "9",
    ];
    let mut first: Vec<&str> = sub_args.to_vec();
    first.push("-E");
    run("mosquitto_sub", &first).await;
    run(
        "mosquitto_pub",
        &[
            "-V",
            "mqttv5",
            "-p",
            p,
            "-q",
            "1",
            "-t",
            "m5/a",
            "-m",
            "hello",
            "-D",
            "publish",
            "content-type",
            "text/csv",
            "-D",
            "publish",
            "response-topic",
            "m5/reply",
            "-D",
            "publish",
            "correlation-data",
            "c0ffee",
            "-D",
            "publish",
            "user-property",
            "k",
            "v",
            "-D",
            "publish",
            "user-property",
            "k",
            "w",
            "-D",
            "publish",
            "payload-format-indicator",
            "1",
            "-D",
            "publish",
            "message-expiry-interval",
            "300",
        ],
    )
    .await;
    let mut again: Vec<&str> = sub_args[..sub_args.len() - 4].to_vec();
    again.extend(["-C", "1", "-F", "%t|%p|%C|%R|%D|%P|%F|%S|%q|%E"]);
    let line = run("mosquitto_sub", &again).await;
    let fields: Vec<&str> = line.trim().split('|').collect();
    assert_eq!(
        &fields[..9],
        &["m5/a", "hello", "text/csv", "m5/reply", "c0ffee", "k:v k:w", "1", "9", "1"],
        "{line}"
    );
    let expiry: u32 = fields[9].parse().expect("an expiry");
    assert!((290..=300).contains(&expiry), "expiry {expiry}");

    // MQTT 3.1.
    let mut sub31 = Command::new("stdbuf")
        .args([
            "-oL",
            "mosquitto_sub",
            "-V",
            "mqttv31",
            "-p",
            p,
            "-i",
            "m31sub",
            "-t",
            "m31/#",
            "-C",
            "1",
            "-q",
            "1",
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start mosquitto_sub");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    run(
        "mosquitto_pub",
        &[
            "-V", "mqttv31", "-p", p, "-i", "m31pub", "-q", "1", "-t", "m31/x", "-m", "old",
        ],
    )
    .await;
    let mut lines = BufReader::new(sub31.stdout.take().expect("stdout")).lines();
    let line = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("a line in time")
        .expect("read");
    assert_eq!(line.as_deref(), Some("old"));
    stack.stop().await;
}

/// Eclipse paho-mqtt (Python) in MQTT 5.0: user properties in order, a session that expires
/// and one that does not, and the reason codes it reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_in_5_0() {
    let stack = wharf_tests::stack::Stack::new(wharf_tests::stack::Kind::Embedded).await;
    let port = stack.addr().port();
    let script = format!(
        r#"
import sys, time, threading
import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

PORT = {port}
got, acks = [], {{}}

def client(cid, clean, expiry):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = expiry
    done = threading.Event()
    state = {{}}
    def on_connect(c, u, flags, rc, p):
        state["present"] = flags.session_present
        state["rc"] = rc
        done.set()
    def on_message(c, u, m):
        got.append((cid, m.topic, m.payload, getattr(m.properties, "UserProperty", None)))
    def on_subscribe(c, u, mid, codes, p):
        acks[cid] = [int(x.value) for x in codes]
    c.on_connect, c.on_message, c.on_subscribe = on_connect, on_message, on_subscribe
    c.connect("127.0.0.1", PORT, clean_start=clean, properties=props)
    c.loop_start()
    assert done.wait(10), "no CONNACK"
    return c, state

def wait(pred, what):
    for _ in range(100):
        if pred():
            return
        time.sleep(0.1)
    sys.exit("timed out: " + what)

keep, _ = client("paho-keep", True, 600)
short, _ = client("paho-short", True, 1)
for c in (keep, short):
    c.subscribe("paho/#", qos=1)
wait(lambda: len(acks) == 2, "SUBACKs")
assert acks["paho-keep"] == [1], acks
for c in (keep, short):
    c.disconnect(); c.loop_stop()

pub, _ = client("paho-pub", True, 0)
props = Properties(PacketTypes.PUBLISH)
props.UserProperty = [("z", "1"), ("a", "2"), ("z", "3")]
info = pub.publish("paho/t", b"payload", qos=1, properties=props)
info.wait_for_publish(10)
time.sleep(7)

keep, state = client("paho-keep", False, 600)
assert state["present"], "the 600 s session is present"
short, state = client("paho-short", False, 600)
assert not state["present"], "the 1 s session expired"
wait(lambda: any(g[0] == "paho-keep" for g in got), "the stored message")
time.sleep(0.5)
assert [g[0] for g in got] == ["paho-keep"], got
assert got[0][1:3] == ("paho/t", b"payload"), got
assert got[0][3] == [("z", "1"), ("a", "2"), ("z", "3")], got
print("ok")
"#
    );
    wharf_tests::mongo::run_python(&script).await;
    stack.stop().await;
}
