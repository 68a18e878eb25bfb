//! `--publisher-identity`: every message a 5.0 subscriber receives carries its publisher's
//! client id as a User Property, on every path (live, from the store after a reconnect,
//! retained, a will, from another host of the cluster), and a publisher cannot forge it.
//! Checked with paho-mqtt (5.0) against real edge and worker processes, on both backends.

use tempfile::TempDir;
use wharf_tests::mongo::{run_python, Secantus};
use wharf_tests::process::BrokerHost;
use wharf_tests::{init_tracing, PATIENCE};

const SCRIPT: &str = r#"
import socket, sys, time
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

h1, h2 = int(sys.argv[1]), int(sys.argv[2])
got = {}

def client(name, port, clean=True, will=None):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    got[name] = []
    def on_message(c, u, m):
        props = list(m.properties.UserProperty) if hasattr(m.properties, "UserProperty") else []
        got[name].append((m.topic, m.payload.decode(), props))
    c.on_message = on_message
    if will:
        c.will_set(will, b"gone", qos=1)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0 if clean else 3600
    c.connect("127.0.0.1", port, keepalive=30, clean_start=clean, properties=props)
    c.loop_start()
    for _ in range(100):
        if c.is_connected():
            break
        time.sleep(0.05)
    assert c.is_connected(), name
    return c

def wait(name, n):
    for _ in range(100):
        if len(got[name]) >= n:
            return got[name]
        time.sleep(0.1)
    raise AssertionError((name, got[name]))

def publish(c, topic, payload, retain=False, forged=False):
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("app", "x")] + ([("wharf-client-id", "forged")] if forged else [])
    c.publish(topic, payload, qos=1, retain=retain, properties=props).wait_for_publish(10)

def identity(props):
    return [v for k, v in props if k == "wharf-client-id"]

# A persistent subscriber goes away; a message waits for it in the store.
sub = client("sub", h1, clean=False)
sub.subscribe("id/#", qos=1)
time.sleep(0.5)
sub.disconnect(); sub.loop_stop()
dev = client("dev-7", h1)
time.sleep(0.3)
publish(dev, "id/stored", "stored", forged=True)
sub = client("sub", h1, clean=False)
(topic, payload, props), = wait("sub", 1)
assert payload == "stored" and identity(props) == ["dev-7"], props
assert ("app", "x") in props and ("wharf-client-id", "forged") not in props, props

# Live.
publish(dev, "id/live", "live", forged=True)
_, payload, props = wait("sub", 2)[1]
assert payload == "live" and identity(props) == ["dev-7"], props

# Retained, to a subscriber that comes later.
publish(dev, "id/retained", "kept", retain=True)
wait("sub", 3)
late = client("late", h1)
late.subscribe("id/retained", qos=1)
_, payload, props = wait("late", 1)[0]
assert payload == "kept" and identity(props) == ["dev-7"], props

# A will: the will's owner.
w = client("dev-w", h1, will="id/will")
time.sleep(0.5)
w.loop_stop(); w.socket().close()
_, payload, props = [m for m in wait("sub", 4) if m[0] == "id/will"][0]
assert payload == "gone" and identity(props) == ["dev-w"], props

# A shared subscription's member.
member = client("member", h1)
member.subscribe("$share/g/id/shared", qos=1)
time.sleep(0.5)
publish(dev, "id/shared", "shared", forged=True)
_, payload, props = wait("member", 1)[0]
assert payload == "shared" and identity(props) == ["dev-7"], props
wait("sub", 5)

# From another host of the cluster.
if h2:
    other = client("dev-h2", h2)
    time.sleep(0.3)
    publish(other, "id/other", "elsewhere", forged=True)
    _, payload, props = [m for m in wait("sub", 6) if m[0] == "id/other"][0]
    assert payload == "elsewhere" and identity(props) == ["dev-h2"], props
print("ok")
"#;

async fn run(hosts: &[&BrokerHost]) {
    let h1 = hosts[0].addr.port().to_string();
    let h2 = hosts
        .get(1)
        .map_or("0".to_owned(), |h| h.addr.port().to_string());
    let script = SCRIPT.replace("int(sys.argv[1]), int(sys.argv[2])", &format!("{h1}, {h2}"));
    tokio::time::timeout(PATIENCE * 6, run_python(&script))
        .await
        .expect("the paho script finishes");
}

/// A host (edge and worker processes) with `--publisher-identity true`.
async fn start_with_identity(
    dir: &std::path::Path,
    mongodb_uri: Option<String>,
    name: &str,
) -> BrokerHost {
    let args = ["--publisher-identity", "true"];
    BrokerHost::start_with_args(dir, name, mongodb_uri, &[], &args).await
}

/// One such host on the embedded store, in a directory of its own.
async fn host_with_identity() -> (TempDir, BrokerHost) {
    init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let host = start_with_identity(dir.path(), None, "h1").await;
    (dir, host)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_learn_the_publisher_on_every_path_embedded() {
    let (_dir, host) = host_with_identity().await;
    run(&[&host]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_learn_the_publisher_on_every_path_two_hosts_mongodb() {
    init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let mongo = Secantus::start(dir.path()).await;
    let h1 = start_with_identity(dir.path(), Some(mongo.uri()), "h1").await;
    let h2 = start_with_identity(dir.path(), Some(mongo.uri()), "h2").await;
    run(&[&h1, &h2]).await;
}

/// With the setting off (the default), a 5.0 delivery is byte for byte what was published: no
/// identity property, the publisher's own properties (identity keys included) untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_setting_deliveries_are_unchanged() {
    use wharf_tests::raw5::{self, Raw5};
    use wharf_tests::stack::{Kind, Stack};
    let stack = Stack::new(Kind::Embedded).await;
    let addr = stack.addr();
    let (mut sub, _) = Raw5::session(addr, &raw5::connect("plain-sub", true, &[])).await;
    sub.send(&raw5::subscribe(1, &[], &[("plain/#", 0)])).await;
    assert_eq!(sub.recv().await.map(|f| f.kind()), Some(9));
    let (mut publisher, _) = Raw5::session(addr, &raw5::connect("plain-pub", true, &[])).await;
    let mut props = vec![0x26];
    props.extend(raw5::string("wharf-client-id"));
    props.extend(raw5::string("mine"));
    let sent = raw5::publish("plain/t", 0, 0, &props, b"payload");
    publisher.send(&sent).await;
    let got = sub.recv().await.expect("PUBLISH");
    assert_eq!(got.byte1, sent[0]);
    assert_eq!(
        got.body,
        sent[2..].to_vec(),
        "the delivery is what was published"
    );
    stack.stop().await;
}

/// `mosquitto_sub -V mqttv5` (an independent 5.0 client) sees the identity among the User
/// Properties, and not the one `mosquitto_pub` tried to forge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_sees_the_publisher() {
    let (_dir, host) = host_with_identity().await;
    let port = host.addr.port().to_string();
    let sub = tokio::process::Command::new("mosquitto_sub")
        .args([
            "-V", "mqttv5", "-p", &port, "-t", "ms/#", "-C", "1", "-F", "%t %p %P",
        ])
        .args(["-W", "20"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub");
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    let status = tokio::process::Command::new("mosquitto_pub")
        .args([
            "-V", "mqttv5", "-p", &port, "-i", "ms-pub", "-q", "1", "-t", "ms/t",
        ])
        .args([
            "-m",
            "hello",
            "-D",
            "publish",
            "user-property",
            "wharf-client-id",
            "forged",
        ])
        .status()
        .await
        .expect("mosquitto_pub");
    assert!(status.success());
    let out = sub.wait_with_output().await.expect("mosquitto_sub output");
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(line.starts_with("ms/t hello"), "{line:?}");
    assert!(line.contains("wharf-client-id:ms-pub"), "{line:?}");
    assert!(!line.contains("forged"), "{line:?}");
}
