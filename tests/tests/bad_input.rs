//! Bad input and hostile peers: each case, the behaviour expected, and where it is tested.
//! In every case the process does not panic and other clients are not affected.
//!
//! | case | expected behaviour | test |
//! |---|---|---|
//! | malformed remaining length (5 bytes) | connection closed | `edge_mock::malformed_packets_close_only_that_connection` |
//! | declared length of 256 MB | closed as soon as the length is read, nothing allocated | same, and `protocol::v4` unit tests |
//! | invalid UTF-8 in a topic | closed | same |
//! | NUL in a topic | closed | same |
//! | wildcard in a PUBLISH topic | closed | same |
//! | QoS 3 | closed | same |
//! | packet id 0 with QoS > 0 | closed | same |
//! | a second CONNECT | closed | same |
//! | SUBSCRIBE with no filters | closed | same |
//! | SUBSCRIBE with wrong fixed-header flags | closed | same |
//! | reserved packet type 15 | closed | same |
//! | `#` not last, `+` inside a level | SUBACK 0x80 for that filter, the others granted | `edge_mock::bad_filters_get_suback_0x80_and_good_ones_work` |
//! | CONNECT with protocol level 3 | CONNACK 1, closed | `edge_mock::connect_rules_and_return_codes` |
//! | CONNECT reserved flag set, wrong protocol name | closed without CONNACK | same |
//! | a 64 KB client id | CONNACK 2 (identifier rejected) | same |
//! | empty client id without clean session | CONNACK 2 | same |
//! | a TCP connection that never sends CONNECT | closed after the connect timeout | `edge_mock::silent_clients_are_closed_by_keepalive_and_connect_timeout` |
//! | silence past 1.5 × keepalive | closed, will published | same, and `edge_mock::will_is_published_on_ungraceful_close_only` |
//! | a client that never reads | its queue and write buffer stay bounded (QoS 0 dropped and counted); others unaffected | `a_client_that_never_reads_costs_bounded_memory` below |
//! | 10,000 connects and disconnects | no leak: resident memory returns to its level | `connect_disconnect_loops_do_not_leak` below |
//! | plain MQTT on the TLS port, wrong CA, expired certificate | handshake fails, connection closed | `tls` tests |
//! | bytes that are no edge<->worker frame | worker closes that edge's socket; the edge reconnects | `shared::codec` unit tests, fuzz corpus |
//! | arbitrary bytes into either decoder | no panic | `fuzz/` targets, replayed by `fuzz_corpus` |

use rumqttc::mqttbytes::v4::Packet;
use std::time::Duration;
use wharf_tests::client::{payloads, Client};
use wharf_tests::process::BrokerHost;
use wharf_tests::raw::{self, Raw};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_costs_bounded_memory() {
    let (_dir, host) = BrokerHost::single().await;
    let mut sleeper = Raw::session(host.addr, "never-reads", true).await;
    sleeper
        .send(&raw::subscribe_bytes(1, &[("flood/#", 0)]))
        .await;
    assert!(matches!(sleeper.recv().await, Some(Packet::SubAck(_))));
    let mut bystander = Client::connect(host.addr, "bystander", true).await;
    bystander
        .subscribe("flood/last", rumqttc::QoS::AtLeastOnce)
        .await;
    let before = host.edge_rss_kib();

    // 40 MB of QoS 0 towards a client that reads nothing.
    let mut publisher = Client::connect(host.addr, "flooder", true).await;
    let payload = vec![b'x'; 4096];
    for _ in 0..10_000 {
        publisher
            .publish("flood/a", rumqttc::QoS::AtMostOnce, false, payload.clone())
            .await;
    }
    publisher
        .publish_acked("flood/last", rumqttc::QoS::AtLeastOnce, "done")
        .await;
    assert_eq!(
        payloads(&bystander.publishes(1).await),
        vec!["done"],
        "others unaffected"
    );
    let grown_mib = host.edge_rss_kib().saturating_sub(before) / 1024;
    println!("edge RSS grew by {grown_mib} MiB while 40 MiB went to a client that never reads");
    // Queue (1000 messages) + write buffer (64 KiB) + socket buffers: a few MiB, not 40.
    assert!(grown_mib < 20, "edge grew by {grown_mib} MiB");
    drop(sleeper);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_disconnect_loops_do_not_leak() {
    let (_dir, host) = BrokerHost::single().await;
    let cycle = |i: usize| {
        let addr = host.addr;
        async move {
            let mut raw = Raw::session(addr, &format!("c{}", i % 100), true).await;
            raw.send(&[0xe0, 0]).await;
            raw.expect_closed().await;
        }
    };
    for i in 0..1_000 {
        cycle(i).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let warm = host.edge_rss_kib();
    for i in 0..10_000 {
        cycle(i).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = host.edge_rss_kib();
    println!("edge RSS after 1,000 cycles {warm} KiB, after 10,000 more {after} KiB");
    assert!(
        after < warm + 4 * 1024,
        "edge RSS grew from {warm} KiB to {after} KiB over 10,000 connects"
    );
}
