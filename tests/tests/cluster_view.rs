//! The admin API's cluster view: every host as it reports itself through the store (its
//! connections, rates, worker queue, the groups and bridges it owns), read on any host; a
//! host that dies is shown as not reporting.

use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::QoS;
use serde_json::Value;
use std::time::Duration;
use tempfile::TempDir;
use wharf_tests::client::Client;
use wharf_tests::client5::{self, Client5};
use wharf_tests::mongo::Secantus;
use wharf_tests::process::{http, BrokerHost};

const PASSWORD: &str = "cluster-view-admin";

async fn cluster(host: &BrokerHost) -> Value {
    let auth = format!("Authorization: Bearer {PASSWORD}");
    let r = http(host.edge_ops, "GET", "/api/v1/cluster", &[&auth], "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    serde_json::from_str(&r.body).expect("JSON")
}

async fn host(dir: &std::path::Path, name: &str, mongo: Option<String>) -> BrokerHost {
    BrokerHost::start_with_args(dir, name, mongo, &[], &["--admin-password", PASSWORD]).await
}

/// Waits (up to `within`) until `host`'s view satisfies `ok`; returns the last view.
async fn until(host: &BrokerHost, within: Duration, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let view = cluster(host).await;
        if ok(&view) || tokio::time::Instant::now() > deadline {
            return view;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn row<'a>(view: &'a Value, host: &str) -> &'a Value {
    view["hosts"]
        .as_array()
        .and_then(|h| h.iter().find(|r| r["host"] == host))
        .unwrap_or(&Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_host_is_seen_from_any_host_and_a_dead_one_stops_reporting() {
    wharf_tests::init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let mongo = Secantus::start(dir.path()).await;
    let h1 = host(dir.path(), "h1", Some(mongo.uri())).await;
    let mut h2 = host(dir.path(), "h2", Some(mongo.uri())).await;
    // On h2: two devices, one of them in a shared group (which h2 then owns).
    let device = Client::connect(h2.addr, "view-device", false).await;
    let mut member = Client5::connect(client5::options(h2.addr, "view-member", true, None)).await;
    member
        .subscribe_one("$share/workers/jobs/#", QoS5::AtLeastOnce)
        .await;
    // Traffic on h1.
    let mut publisher = Client::connect(h1.addr, "view-publisher", true).await;
    let want = |v: &Value| {
        let (a, b) = (row(v, "h1"), row(v, "h2"));
        a["reporting"] == true
            && b["reporting"] == true
            && b["connections"] == 2
            && b["groups"]
                .as_array()
                .is_some_and(|g| g.iter().any(|g| g == "$share/workers/jobs/#"))
            && a["messagesInPerSec"].as_f64().is_some_and(|r| r > 0.0)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut view = Value::Null;
    while tokio::time::Instant::now() < deadline {
        for i in 0..20 {
            publisher
                .publish_acked(&format!("telemetry/{i}"), QoS::AtLeastOnce, "x")
                .await;
        }
        view = cluster(&h1).await;
        if want(&view) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(want(&view), "{view}");
    assert_eq!(row(&view, "h1")["here"], true, "{view}");
    assert_eq!(row(&view, "h2")["here"], false, "{view}");
    assert_eq!(row(&view, "h1")["connections"], 1, "{view}");
    assert!(
        row(&view, "h2")["listeners"].as_array().is_some_and(|l| l
            .iter()
            .any(|l| l.as_str().is_some_and(|l| l.starts_with("mqtt ")))),
        "{view}"
    );
    // The same seen from h2.
    let other = cluster(&h2).await;
    assert_eq!(row(&other, "h1")["reporting"], true, "{other}");
    assert_eq!(row(&other, "h2")["here"], true, "{other}");

    // h2 dies: within three report periods and a bit it is shown as not reporting.
    h2.kill();
    let view = until(&h1, Duration::from_secs(30), |v| {
        row(v, "h2")["reporting"] == false
    })
    .await;
    assert_eq!(row(&view, "h2")["reporting"], false, "{view}");
    assert_eq!(row(&view, "h1")["reporting"], true, "{view}");
    drop((device, member));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_embedded_store_shows_its_one_host() {
    wharf_tests::init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let h1 = host(dir.path(), "solo", None).await;
    let _device = Client::connect(h1.addr, "solo-device", false).await;
    let view = until(&h1, Duration::from_secs(15), |v| {
        row(v, "solo")["connections"] == 1
    })
    .await;
    let hosts = view["hosts"].as_array().expect("hosts");
    assert_eq!(hosts.len(), 1, "{view}");
    assert_eq!(row(&view, "solo")["here"], true, "{view}");
    assert_eq!(row(&view, "solo")["reporting"], true, "{view}");
}
