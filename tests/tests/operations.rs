//! What operators rely on: metrics, health and readiness endpoints, and a SIGTERM that stops
//! both processes cleanly without losing anything acknowledged.

use rumqttc::{Packet, QoS};
use std::time::Duration;
use wharf_tests::client::{payloads, Client};
use wharf_tests::process::{http_get, BrokerHost};

/// The value of a metric line `name{labels} value` in Prometheus text.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_readiness() {
    let (_dir, mut host) = BrokerHost::single().await;
    for ops in [host.edge_ops, host.worker_ops] {
        assert_eq!(http_get(ops, "/healthz").await.0, 200);
        assert_eq!(http_get(ops, "/readyz").await.0, 200, "{ops} ready");
        assert_eq!(http_get(ops, "/nope").await.0, 404);
    }

    let mut sub = Client::connect(host.addr, "sub", true).await;
    sub.subscribe("m/#", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect(host.addr, "pub", true).await;
    publisher
        .publish_many_acked("m/1", QoS::AtLeastOnce, (0..7).map(|i| i.to_string()))
        .await;
    assert_eq!(sub.publishes(7).await.len(), 7);

    let (status, edge) = http_get(host.edge_ops, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        metric(&edge, "wharf_edge_messages_received_total{qos=\"1\"}"),
        Some(7.0)
    );
    assert_eq!(
        metric(&edge, "wharf_edge_messages_sent_total{qos=\"1\"}"),
        Some(7.0)
    );
    assert_eq!(metric(&edge, "wharf_edge_sessions"), Some(2.0));
    assert!(
        edge.contains("wharf_edge_persist_seconds_bucket{le="),
        "persist latency histogram"
    );
    let (_, worker) = http_get(host.worker_ops, "/metrics").await;
    let batches = metric(&worker, "wharf_worker_persist_batch_size_count").expect("batch sizes");
    let persisted = metric(&worker, "wharf_worker_persist_batch_size_sum").expect("batch sizes");
    assert!(
        batches >= 1.0 && persisted >= 7.0,
        "{batches} batches, {persisted} messages"
    );

    // The worker gone: the edge is alive but not ready.
    host.kill_worker();
    let mut status = 0;
    for _ in 0..100 {
        status = http_get(host.edge_ops, "/readyz").await.0;
        if status == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 503, "not ready without the worker");
    assert_eq!(http_get(host.edge_ops, "/healthz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_keeps_every_acknowledged_message() {
    let (_dir, mut host) = BrokerHost::single().await;
    let mut sub = Client::connect(host.addr, "keeper", false).await;
    sub.subscribe("t/#", QoS::AtLeastOnce).await;
    sub.disconnect().await;

    let mut publisher = Client::connect(host.addr, "pub", true).await;
    let n = 300;
    for i in 0..n {
        publisher
            .publish("t/1", QoS::AtLeastOnce, false, format!("{i:04}"))
            .await;
    }
    // Stop while publishes are in flight; PUBACKs come in publish order, so the first
    // `acked` publishes are the acknowledged ones.
    let mut acked = 0;
    while acked < 20 {
        if publisher
            .next_matching(|p| matches!(p, Packet::PubAck(_)).then_some(()))
            .await
            .is_some()
        {
            acked += 1;
        }
    }
    assert!(
        host.terminate().await,
        "edge and worker exit with status 0 on SIGTERM"
    );
    while publisher
        .next_matching_within(Duration::from_secs(2), |p| {
            matches!(p, Packet::PubAck(_)).then_some(())
        })
        .await
        .is_some()
    {
        acked += 1;
    }

    host.start_worker().await;
    host.start_edge().await;
    let mut sub = Client::connect(host.addr, "keeper", false).await;
    let mut got = Vec::new();
    while let Some(p) = sub
        .next_matching_within(Duration::from_secs(2), |p| match p {
            Packet::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .await
    {
        got.push(p);
    }
    let got = payloads(&got);
    let expected: Vec<String> = (0..acked).map(|i| format!("{i:04}")).collect();
    assert!(
        got.len() >= acked && got[..acked] == expected[..],
        "{acked} acknowledged, {} delivered after the restart",
        got.len()
    );
    println!(
        "acknowledged before shutdown: {acked} of {n}; delivered after restart: {}",
        got.len()
    );
}
