//! Brokers on several hosts sharing one MongoDB-wire server: each delivers the others'
//! messages, and a host that dies loses nothing its clients had acknowledged.

use rumqttc::{Publish, QoS};
use std::collections::HashMap;
use std::time::Duration;
use tempfile::TempDir;
use wharf_tests::client::Client;
use wharf_tests::init_tracing;
use wharf_tests::mongo::Secantus;
use wharf_tests::process::BrokerHost;

/// Payloads per topic, in arrival order.
fn by_topic(got: &[Publish]) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for p in got {
        out.entry(p.topic.clone())
            .or_default()
            .push(String::from_utf8_lossy(&p.payload).into_owned());
    }
    out
}

fn series(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:03}")).collect()
}

/// Three hosts on one MongoDB-wire server: h1 and h2 follow the others by change stream, h3
/// by polling, as it must where the server has no change streams.
async fn three_hosts() -> (TempDir, Secantus, [BrokerHost; 3]) {
    init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let mongo = Secantus::start(dir.path()).await;
    let h1 = BrokerHost::start(dir.path(), "h1", Some(mongo.uri())).await;
    let h2 = BrokerHost::start(dir.path(), "h2", Some(mongo.uri())).await;
    let h3 =
        BrokerHost::start_with(dir.path(), "h3", Some(mongo.uri()), &["--follow", "poll"]).await;
    (dir, mongo, [h1, h2, h3])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_deliver_each_others_messages_once_in_order() {
    let (_dir, _mongo, [h1, h2, h3]) = three_hosts().await;

    let mut all = Client::connect(h1.addr, "all", false).await;
    all.subscribe("fleet/#", QoS::ExactlyOnce).await;
    let mut temps = Client::connect(h2.addr, "temps", true).await;
    temps.subscribe("fleet/+/t", QoS::AtLeastOnce).await;
    let mut only_h1 = Client::connect(h3.addr, "only-h1", true).await;
    only_h1.subscribe("fleet/p1/#", QoS::AtMostOnce).await;

    let n = 25;
    let mut p1 = Client::connect(h1.addr, "p1", true).await;
    let mut p2 = Client::connect(h2.addr, "p2", true).await;
    let mut p3 = Client::connect(h3.addr, "p3", true).await;
    let publishing = async {
        p1.publish_many_acked("fleet/p1/t", QoS::AtLeastOnce, series("p1", n))
            .await;
        p2.publish_many_acked("fleet/p2/t", QoS::ExactlyOnce, series("p2", n))
            .await;
        for payload in series("p3", n) {
            p3.publish("fleet/p3/t", QoS::AtMostOnce, false, payload)
                .await;
        }
    };
    let (got_all, got_temps, got_h1, ()) = tokio::join!(
        all.publishes(3 * n),
        temps.publishes(3 * n),
        only_h1.publishes(n),
        publishing
    );

    for (name, got) in [("all", &got_all), ("temps", &got_temps)] {
        let topics = by_topic(got);
        assert_eq!(topics.len(), 3, "{name}: {topics:?}");
        for (topic, prefix) in [
            ("fleet/p1/t", "p1"),
            ("fleet/p2/t", "p2"),
            ("fleet/p3/t", "p3"),
        ] {
            assert_eq!(
                topics[topic],
                series(prefix, n),
                "{name}: every message of {topic}, once, in order"
            );
        }
    }
    // Delivered QoS is min(publish, subscription).
    let qos_of =
        |got: &[Publish], topic: &str| got.iter().find(|p| p.topic == topic).map(|p| p.qos);
    assert_eq!(qos_of(&got_all, "fleet/p2/t"), Some(QoS::ExactlyOnce));
    assert_eq!(qos_of(&got_all, "fleet/p3/t"), Some(QoS::AtMostOnce));
    assert_eq!(qos_of(&got_temps, "fleet/p2/t"), Some(QoS::AtLeastOnce));
    assert_eq!(by_topic(&got_h1)["fleet/p1/t"], series("p1", n));
    assert_eq!(got_h1.len(), n);
    for c in [&mut all, &mut temps, &mut only_h1] {
        c.assert_no_publish(Duration::from_millis(500)).await;
    }

    // Retained messages are cluster-wide.
    p3.publish_acked_retain("fleet/config", QoS::AtLeastOnce, true, "v7")
        .await;
    let mut late = Client::connect(h2.addr, "late", true).await;
    late.subscribe("fleet/config", QoS::AtLeastOnce).await;
    let retained = late.publishes(1).await;
    assert!(retained[0].retain);
    assert_eq!(&retained[0].payload[..], b"v7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_host_loses_nothing_acknowledged_and_sessions_move() {
    init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let mongo = Secantus::start(dir.path()).await;
    let mut h1 = BrokerHost::start(dir.path(), "h1", Some(mongo.uri())).await;
    let h2 = BrokerHost::start(dir.path(), "h2", Some(mongo.uri())).await;

    // A persistent subscriber and a publisher, both on h1.
    let mut sub = Client::connect(h1.addr, "device-1", false).await;
    sub.subscribe("k/#", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect(h1.addr, "sensor-1", true).await;
    publisher
        .publish_many_acked("k/1", QoS::AtLeastOnce, series("a", 20))
        .await;
    // h1 dies (SIGKILL of both processes) before the subscriber has read everything.
    let mut before = sub.publishes(5).await;
    h1.kill();
    // rumqttc acknowledged whatever it had read before the crash; keep those as received.
    while let Some(p) = sub.next_publish().await {
        before.push(p);
    }

    // The clients move to h2; the publisher goes on there.
    let mut publisher = Client::connect(h2.addr, "sensor-1", true).await;
    publisher
        .publish_many_acked("k/1", QoS::AtLeastOnce, series("b", 20))
        .await;
    let mut sub = Client::connect(h2.addr, "device-1", false).await;
    assert!(
        sub.session_present,
        "the session moved with its subscriptions"
    );
    let expected: Vec<String> = series("a", 20).into_iter().chain(series("b", 20)).collect();
    let text = |p: &Publish| String::from_utf8_lossy(&p.payload).into_owned();
    let received_before = before.len();
    assert_eq!(
        before.iter().map(text).collect::<Vec<_>>(),
        expected[..received_before]
    );
    let mut after = Vec::new();
    while after.last().map(String::as_str) != Some("b-019") {
        match sub.next_publish().await {
            Some(p) => after.push(text(&p)),
            None => panic!("messages missing after the move; got {after:?}"),
        }
    }
    // At least once: h2 re-sends from the first message h1 never saw acknowledged (at most
    // those received before the crash), then everything else once, in order.
    let resent_from = expected
        .iter()
        .position(|m| Some(m) == after.first())
        .expect("the first message after the move is one of ours");
    assert!(
        resent_from <= received_before,
        "a gap before {:?}",
        after.first()
    );
    assert_eq!(
        after,
        expected[resent_from..],
        "every acknowledged message, in order"
    );
    sub.assert_no_publish(Duration::from_millis(500)).await;
}

/// MQTT 5.0 message properties reach subscribers on the other hosts (by change stream and by
/// poll) as they were published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_properties_cross_hosts() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    use rumqttc::v5::mqttbytes::QoS as QoS5;
    use wharf_tests::client5::{options, Client5};
    let (_dir, _mongo, [h1, h2, h3]) = three_hosts().await;
    let mut on_h2 = Client5::connect(options(h2.addr, "props-h2", true, None)).await;
    on_h2.subscribe_one("props/#", QoS5::AtLeastOnce).await;
    let mut on_h3 = Client5::connect(options(h3.addr, "props-h3", true, None)).await;
    on_h3.subscribe_one("props/#", QoS5::AtLeastOnce).await;
    let sent = PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(600),
        topic_alias: None,
        response_topic: Some("props/reply".into()),
        correlation_data: Some(vec![9u8, 8, 7].into()),
        user_properties: vec![("z".into(), "1".into()), ("a".into(), "2".into())],
        subscription_identifiers: Vec::new(),
        content_type: Some("application/json".into()),
    };
    let mut publisher = Client5::connect(options(h1.addr, "props-pub", true, None)).await;
    publisher
        .publish_acked("props/1", QoS5::AtLeastOnce, false, "{}", sent.clone())
        .await;
    for (host, client) in [("h2", &mut on_h2), ("h3", &mut on_h3)] {
        let p = client.next_publish().await;
        let got = p
            .properties
            .unwrap_or_else(|| panic!("{host}: no properties"));
        assert_eq!(got.user_properties, sent.user_properties, "{host}");
        assert_eq!(
            (got.content_type.as_deref(), got.response_topic.as_deref()),
            (Some("application/json"), Some("props/reply")),
            "{host}"
        );
        assert_eq!(got.correlation_data, sent.correlation_data, "{host}");
        assert_eq!(got.payload_format_indicator, Some(1), "{host}");
        let left = got.message_expiry_interval.expect("expiry");
        assert!((590..=600).contains(&left), "{host}: expiry {left}");
    }
}
