//! "Where a message went": the admin API finds a message by topic and time, and for one
//! message lists every stored subscription its topic matches with what became of it
//! (delivered, when and by which host; owed; subscribed after; the publisher's own under No
//! Local; a shared group's one delivery), from the ledger, on both backends and across hosts.

use rumqttc::v5::mqttbytes::v5::{Filter, PublishProperties};
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::QoS;
use serde_json::Value;
use std::time::Duration;
use tempfile::TempDir;
use wharf_tests::client::Client;
use wharf_tests::client5::{self, Client5};
use wharf_tests::mongo::Secantus;
use wharf_tests::process::{http, BrokerHost};

const PASSWORD: &str = "trace-test-admin";

async fn get(host: &BrokerHost, path: &str) -> (u16, Value) {
    let auth = format!("Authorization: Bearer {PASSWORD}");
    let r = http(host.edge_ops, "GET", path, &[&auth], "").await;
    (
        r.status,
        serde_json::from_str(&r.body).unwrap_or(Value::Null),
    )
}

async fn host(dir: &std::path::Path, name: &str, mongo: Option<String>) -> BrokerHost {
    BrokerHost::start_with_args(dir, name, mongo, &[], &["--admin-password", PASSWORD]).await
}

/// The fates by client id, as a sorted list of (client, fate).
fn fates(trace: &Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = trace["recipients"]
        .as_array()
        .expect("recipients")
        .iter()
        .map(|r| {
            (
                r["clientId"].as_str().unwrap_or("").to_owned(),
                r["fate"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = list
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    out.sort();
    out
}

/// Subscribers on `subscribers`, one message published on `publisher`, traced on `reader`.
async fn check(publisher: &BrokerHost, subscribers: &BrokerHost, reader: &BrokerHost) {
    let at = subscribers.addr;
    // Online, on a wildcard of the topic: gets it.
    let mut online = Client::connect(at, "t-online", false).await;
    online
        .subscribe("fleet/+/telemetry", QoS::AtLeastOnce)
        .await;
    // Away, persistent, on another wildcard: owes it.
    let mut away = Client::connect(at, "t-away", false).await;
    away.subscribe("fleet/#", QoS::AtLeastOnce).await;
    away.disconnect().await;
    // A filter that does not match: not listed.
    let mut other = Client::connect(at, "t-other", false).await;
    other.subscribe("fleet/+/command", QoS::AtLeastOnce).await;
    // A shared group with one member: one record, for the group.
    let mut member = Client5::connect(client5::options(at, "t-member", true, Some(600))).await;
    member
        .subscribe_one("$share/g1/fleet/#", QoS5::AtLeastOnce)
        .await;
    // The publisher itself, subscribed with No Local.
    let mut device = Client5::connect(client5::options(
        publisher.addr,
        "t-device",
        true,
        Some(600),
    ))
    .await;
    device
        .subscribe(
            vec![Filter {
                nolocal: true,
                ..Filter::new("fleet/dev1/telemetry", QoS5::AtLeastOnce)
            }],
            None,
        )
        .await;
    // Routes reach the other hosts before the message is published.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = wharf_shared::now_ms();
    device
        .publish_acked(
            "fleet/dev1/telemetry",
            QoS5::AtLeastOnce,
            false,
            "21.5",
            PublishProperties::default(),
        )
        .await;
    assert_eq!(
        online.next_publish().await.map(|p| p.payload.to_vec()),
        Some(b"21.5".to_vec())
    );
    assert!(member
        .publish_within(Duration::from_secs(10))
        .await
        .is_some());
    // Subscribed after the message: listed, never owed.
    let mut late = Client::connect(at, "t-late", false).await;
    late.subscribe("fleet/dev1/telemetry", QoS::AtLeastOnce)
        .await;

    // Found by topic and time.
    let (status, found) = get(
        reader,
        &format!(
            "/api/v1/messages?topic=fleet/dev1/telemetry&since={}",
            started - 5_000
        ),
    )
    .await;
    assert_eq!(status, 200, "{found}");
    let messages = found["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 1, "{found}");
    assert_eq!(messages[0]["payload"], "21.5", "{found}");
    assert_eq!(messages[0]["clientId"], "t-device", "{found}");
    let id = messages[0]["id"].as_str().expect("id").to_owned();

    // The ledger trails the delivery by a moment.
    let expected = pairs(&[
        ("t-online", "delivered"),
        ("t-away", "owed"),
        ("$share/g1/fleet/#", "delivered"),
        ("t-device", "ownMessage"),
        ("t-late", "subscribedAfter"),
    ]);
    let path = format!("/api/v1/messages/{id}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let trace = loop {
        let (status, trace) = get(reader, &path).await;
        assert_eq!(status, 200, "{trace}");
        if fates(&trace) == expected || tokio::time::Instant::now() > deadline {
            break trace;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(fates(&trace), expected, "{trace}");
    assert_eq!(trace["host"], publisher.name.as_str(), "{trace}");
    assert_eq!(trace["payload"], "21.5", "{trace}");
    assert_eq!(trace["owed"], 1, "{trace}");
    assert_eq!(trace["complete"], true, "{trace}");
    let online_row = trace["recipients"]
        .as_array()
        .expect("recipients")
        .iter()
        .find(|r| r["clientId"] == "t-online")
        .expect("t-online")
        .clone();
    assert_eq!(online_row["filter"], "fleet/+/telemetry", "{trace}");
    let group_row = trace["recipients"]
        .as_array()
        .expect("recipients")
        .iter()
        .find(|r| r["clientId"] == "$share/g1/fleet/#")
        .expect("the group")
        .clone();
    assert_eq!(group_row["group"], true, "{trace}");
    assert_eq!(group_row["filter"], "$share/g1/fleet/#", "{trace}");
    let delivered_at = online_row["deliveredAt"].as_i64().expect("deliveredAt");
    assert!(delivered_at >= started - 1_000, "{trace}");

    // The one that owed it comes back and gets it: now delivered, by its host.
    let mut back = Client::connect(at, "t-away", false).await;
    assert_eq!(
        back.next_publish().await.map(|p| p.payload.to_vec()),
        Some(b"21.5".to_vec())
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let row = loop {
        let (_, trace) = get(reader, &path).await;
        let row = trace["recipients"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["clientId"] == "t-away").cloned())
            .unwrap_or(Value::Null);
        if row["fate"] == "delivered" || tokio::time::Instant::now() > deadline {
            break row;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(row["fate"], "delivered", "{row}");
    if reader.name != subscribers.name || publisher.name != subscribers.name {
        assert_eq!(row["deliveredBy"], subscribers.name.as_str(), "{row}");
    }

    // What is not there, and what is not an id.
    let (status, body) = get(reader, "/api/v1/messages/000000000000000000000000").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = get(reader, "/api/v1/messages/not-an-id").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = get(reader, "/api/v1/messages?topic=fleet/%23").await;
    assert_eq!(status, 400, "{body}");
    for c in [online, other, late, back] {
        c.disconnect().await;
    }
    member.disconnect().await;
    device.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_embedded_store_says_where_a_message_went() {
    wharf_tests::init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let h1 = host(dir.path(), "h1", None).await;
    check(&h1, &h1, &h1).await;
}

/// On MongoDB across three hosts: published on one, delivered on another, read on a third.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mongodb_says_where_a_message_went_across_hosts() {
    wharf_tests::init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let mongo = Secantus::start(dir.path()).await;
    let h1 = host(dir.path(), "h1", Some(mongo.uri())).await;
    let h2 = host(dir.path(), "h2", Some(mongo.uri())).await;
    let h3 = host(dir.path(), "h3", Some(mongo.uri())).await;
    check(&h1, &h2, &h3).await;
}
