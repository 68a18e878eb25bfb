//! Configuration from a real etcd: the seed's keys and the rest, precedence of flags over
//! etcd, live certificate changes through the watch, and bad configuration refused with exit
//! code 64, a message naming the key and the value, and no port bound.

use rumqttc::QoS;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tempfile::TempDir;
use tokio::process::{Child, Command};
use wharf_tests::certs::{client_config, TestCa, Validity};
use wharf_tests::client::{Client, Options};
use wharf_tests::etcd::Etcd;
use wharf_tests::mock_worker::MockWorker;
use wharf_tests::process::{bin, free_port};
use wharf_tests::{init_tracing, PATIENCE};

const PREFIX: &str = "/iot/mqtt";

fn edge(etcd: &Etcd, extra: &[&str], log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("log file");
    Command::new(bin("edge"))
        .args(["--etcd", &etcd.url()])
        .args(extra)
        .env_remove("WHARF_LISTEN")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .expect("start edge")
}

async fn wait_for_port(addr: SocketAddr) {
    let up = tokio::time::timeout(PATIENCE, async {
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(up.is_ok(), "nothing listens on {addr}");
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_runs_on_etcd_keys_and_follows_certificate_changes() {
    init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let etcd = Etcd::start(dir.path()).await;
    let socket = dir.path().join("worker.sock");
    let worker = MockWorker::start(&socket);
    let ca = TestCa::new("CA one");
    let ca_path = ca.write(dir.path(), "ca");
    let server = ca.issue(
        dir.path(),
        "server",
        "localhost",
        &["127.0.0.1"],
        true,
        Validity::Current,
    );
    let (plain, tls) = (free_port(), free_port());
    let plain_s = local(plain).to_string();
    let tls_s = local(tls).to_string();
    let socket_s = socket.display().to_string();
    let (cert_s, key_s) = (
        server.cert.display().to_string(),
        server.key.display().to_string(),
    );
    etcd.put(
        PREFIX,
        &[
            ("listen", &plain_s),
            ("tls", "true"),
            ("tlsListen", &tls_s),
            ("serverCert", &cert_s),
            ("serverKey", &key_s),
            ("host", "from-etcd"),
            ("workerSocket", &socket_s),
            ("maxInflight", "5"),
        ],
    )
    .await;
    let log = dir.path().join("edge.log");
    // A flag beats its etcd key.
    let _edge = edge(&etcd, &["--host", "from-flag"], &log);
    wait_for_port(local(plain)).await;
    wait_for_port(local(tls)).await;

    let publisher = Client::connect(local(plain), "p", true).await;
    publisher.publish("t", QoS::AtMostOnce, false, "x").await;
    let stored_host = tokio::time::timeout(PATIENCE, async {
        loop {
            if let Some(m) = worker.store.lock().expect("lock").messages.first() {
                return m.host.clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("message stored");
    assert_eq!(stored_host, "from-flag");
    let with_ca = |ca: &Path| Options {
        tls: Some(client_config(ca, None)),
        ..Options::default()
    };
    let mut old = Client::try_connect_with(local(tls), "old", with_ca(&ca_path))
        .await
        .expect("TLS from etcd keys");
    old.subscribe("s", QoS::AtLeastOnce).await;

    // New certificate files named in etcd: new connections use them, old ones stay.
    let ca2 = TestCa::new("CA two");
    let ca2_path = ca2.write(dir.path(), "ca2");
    let server2 = ca2.issue(
        dir.path(),
        "server2",
        "localhost",
        &["127.0.0.1"],
        true,
        Validity::Current,
    );
    let (cert2, key2) = (
        server2.cert.display().to_string(),
        server2.key.display().to_string(),
    );
    etcd.put(PREFIX, &[("serverKey", &key2), ("serverCert", &cert2)])
        .await;
    let switched = tokio::time::timeout(PATIENCE, async {
        loop {
            if let Ok(c) = Client::try_connect_with(local(tls), "new", with_ca(&ca2_path)).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the edge took the new certificate from etcd");
    switched
        .publish("s", QoS::AtLeastOnce, false, "still-here")
        .await;
    assert_eq!(
        old.publishes(1).await.len(),
        1,
        "the old TLS connection is still up"
    );

    // A key that needs a restart says so.
    etcd.put(PREFIX, &[("maxQueued", "9")]).await;
    let said = tokio::time::timeout(PATIENCE, async {
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("maxQueued") && text.contains("restart") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(said.is_ok(), "no restart notice in the log");
}

async fn refused(cmd: &mut Command) -> (i32, String) {
    let out = tokio::time::timeout(PATIENCE * 2, cmd.kill_on_drop(true).output())
        .await
        .expect("exits")
        .expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_exits_64_naming_key_and_value_with_no_port_bound() {
    init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let etcd = Etcd::start(dir.path()).await;
    let port = free_port();
    let listen = local(port).to_string();
    etcd.put(PREFIX, &[("listen", &listen), ("maxInflight", "lots")])
        .await;
    let (code, stderr) = refused(Command::new(bin("edge")).args(["--etcd", &etcd.url()])).await;
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("maxInflight") && stderr.contains("lots"),
        "{stderr}"
    );
    std::net::TcpListener::bind(local(port)).expect("the listen port was never bound");

    // TLS on, with a key that is not the certificate's.
    let ca = TestCa::new("CA");
    let a = ca.issue(dir.path(), "a", "localhost", &[], true, Validity::Current);
    let b = ca.issue(dir.path(), "b", "localhost", &[], true, Validity::Current);
    let (cert, key) = (a.cert.display().to_string(), b.key.display().to_string());
    etcd.put(
        PREFIX,
        &[
            ("maxInflight", "5"),
            ("tls", "true"),
            ("serverCert", &cert),
            ("serverKey", &key),
        ],
    )
    .await;
    let (code, stderr) = refused(Command::new(bin("edge")).args(["--etcd", &etcd.url()])).await;
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("serverKey"), "{stderr}");
    std::net::TcpListener::bind(local(port)).expect("the listen port was never bound");

    // A bridge setting from etcd: checked like a flag's, the field named.
    etcd.put(
        PREFIX,
        &[
            ("tls", "false"),
            (
                "bridges",
                r#"[{"name": "x", "address": "h:1", "out": [{"filter": "a", "qos": 7}]}]"#,
            ),
        ],
    )
    .await;
    let (code, stderr) = refused(Command::new(bin("edge")).args(["--etcd", &etcd.url()])).await;
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("bridges[0].out[0].qos"), "{stderr}");
    std::net::TcpListener::bind(local(port)).expect("the listen port was never bound");
    etcd.put(PREFIX, &[("bridges", "")]).await;

    // The worker's byte budget from etcd.
    etcd.put(PREFIX, &[("maxQueuedBytes", "lots")]).await;
    let (code, stderr) =
        refused(Command::new(bin("store-worker")).args(["--etcd", &etcd.url()])).await;
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("maxQueuedBytes"), "{stderr}");
    etcd.put(PREFIX, &[("maxQueuedBytes", "64MiB")]).await;

    // The worker too: a bad socket mode from etcd.
    etcd.put(PREFIX, &[("socketMode", "999")]).await;
    let (code, stderr) =
        refused(Command::new(bin("store-worker")).args(["--etcd", &etcd.url()])).await;
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("socketMode") && stderr.contains("999"),
        "{stderr}"
    );

    // etcd unreachable at start.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let (code, stderr) = refused(Command::new(bin("edge")).args(["--etcd", &nowhere])).await;
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("etcd"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_takes_its_socket_and_store_from_etcd() {
    init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let etcd = Etcd::start(dir.path()).await;
    let socket = dir.path().join("from-etcd.sock");
    let data = dir.path().join("from-etcd-data");
    let (socket_s, data_s) = (socket.display().to_string(), data.display().to_string());
    etcd.put(
        PREFIX,
        &[
            ("workerSocket", &socket_s),
            ("dataDir", &data_s),
            ("socketMode", "660"),
        ],
    )
    .await;
    let _worker = Command::new(bin("store-worker"))
        .args(["--etcd", &etcd.url()])
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start worker");
    let up = tokio::time::timeout(PATIENCE, async {
        while tokio::net::UnixStream::connect(&socket).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(up.is_ok(), "worker socket from etcd");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660);
    assert!(
        data.join("wharf.db").exists(),
        "embedded store in the etcd dataDir"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_script_writes_the_documented_keys() {
    init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let etcd = Etcd::start(dir.path()).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/etcd-seed.sh");
    let status = Command::new("bash")
        .arg(script)
        .env("ETCD_ENDPOINTS", etcd.url())
        .env("WHARF_TLS", "true")
        .env("WHARF_SERVER_CERT", "/etc/wharf/server.pem")
        .stdout(Stdio::null())
        .status()
        .await
        .expect("run etcd-seed.sh");
    assert!(status.success());
    let mut client = etcd_client::Client::connect([etcd.url()], None)
        .await
        .expect("client");
    let get = |key: &'static str| {
        let mut client = client.clone();
        async move {
            let r = client
                .get(format!("{PREFIX}/{key}"), None)
                .await
                .expect("get");
            r.kvs()
                .first()
                .and_then(|kv| kv.value_str().ok().map(str::to_owned))
        }
    };
    assert_eq!(get("tls").await.as_deref(), Some("true"));
    assert_eq!(
        get("serverCert").await.as_deref(),
        Some("/etc/wharf/server.pem")
    );
    assert_eq!(get("maxInflight").await.as_deref(), Some("32"));
    assert_eq!(get("writeConcern").await.as_deref(), Some("majority"));
    assert_eq!(get("cacert").await, None, "empty values are not written");
    let _ = client.status().await;
}

/// The rule file named in etcd is followed: a new `aclFile` value takes effect for new
/// subscriptions without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_follows_its_rule_file_key() {
    init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let etcd = Etcd::start(dir.path()).await;
    let socket = dir.path().join("worker.sock");
    let _worker = MockWorker::start(&socket);
    let rules_a = dir.path().join("rules-a");
    let rules_c = dir.path().join("rules-c");
    std::fs::write(&rules_a, "topic readwrite a/#\n").expect("rules");
    std::fs::write(&rules_c, "topic readwrite c/#\n").expect("rules");
    let plain = free_port();
    let (plain_s, socket_s) = (local(plain).to_string(), socket.display().to_string());
    let rules_a_s = rules_a.display().to_string();
    etcd.put(
        PREFIX,
        &[
            ("listen", &plain_s),
            ("workerSocket", &socket_s),
            ("aclFile", &rules_a_s),
        ],
    )
    .await;
    let _edge = edge(&etcd, &[], &dir.path().join("edge.log"));
    wait_for_port(local(plain)).await;
    let allowed = |filter: &'static str| async move {
        let mut c = Client::connect(local(plain), "r", true).await;
        c.subscribe_granted(filter, QoS::AtLeastOnce).await
    };
    assert!(allowed("a/x").await);
    assert!(!allowed("c/x").await);
    etcd.put(PREFIX, &[("aclFile", &rules_c.display().to_string())])
        .await;
    let followed = tokio::time::timeout(PATIENCE, async {
        while !allowed("c/x").await {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(followed.is_ok(), "the new aclFile was not applied");
    assert!(!allowed("a/x").await);
}
