//! Zero acknowledged-message loss under crashes. Publishers at QoS 1 and 2 re-send what was
//! not acknowledged, as MQTT requires; persistent subscribers reconnect; meanwhile the test
//! kills (SIGKILL) and restarts the edge, the store-worker, and the database. Afterwards every
//! acknowledged message has reached every subscriber, QoS 2 exactly once.

use std::collections::HashSet;
use std::time::Duration;
use tempfile::TempDir;
use tokio::time::Instant;
use wharf_tests::mongo::Secantus;
use wharf_tests::process::BrokerHost;
use wharf_tests::raw::{self, Raw};
use wharf_tests::resilient::{collect, publish_all};
use wharf_tests::{init_tracing, PATIENCE};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Backend {
    Embedded,
    Mongo,
}

fn series(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:05}")).collect()
}

async fn chaos(backend: Backend) {
    init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let mut mongo = match backend {
        Backend::Mongo => Some(Secantus::start(dir.path()).await),
        Backend::Embedded => None,
    };
    let mut host = BrokerHost::start(dir.path(), "h1", mongo.as_ref().map(|m| m.uri())).await;
    let addrs = [host.addr];
    let deadline = Instant::now() + Duration::from_secs(150);
    // Each QoS 2 message costs several sequential round trips to the store; SecantusDB (a
    // Python server) is slower per round trip than the embedded store.
    let n = match backend {
        Backend::Embedded => 1_500,
        Backend::Mongo => 500,
    };
    let (q1, q2) = (series("q1", n), series("q2", n));
    let expected: HashSet<String> = q1.iter().chain(q2.iter()).cloned().collect();

    // Persistent subscribers exist before anything is published.
    for id in ["sub-a", "sub-b"] {
        let mut raw = Raw::session(host.addr, id, false).await;
        raw.send(&raw::subscribe_bytes(1, &[("chaos/#", 2)])).await;
        assert!(matches!(
            raw.recv().await,
            Some(rumqttc::mqttbytes::v4::Packet::SubAck(_))
        ));
    }
    let publishers = tokio::spawn({
        let (q1, q2) = (q1.clone(), q2.clone());
        async move {
            let a = tokio::spawn(async move {
                publish_all(&addrs, "pub-q1", "chaos/q1", 1, q1, deadline).await
            });
            let b = tokio::spawn(async move {
                publish_all(&addrs, "pub-q2", "chaos/q2", 2, q2, deadline).await
            });
            (a.await.expect("join"), b.await.expect("join"))
        }
    });
    let sub_a = tokio::spawn({
        let expected = expected.clone();
        async move { collect(&addrs, "sub-a", "chaos/#", 2, &expected, deadline).await }
    });

    // The faults, spaced so that traffic flows in between.
    let pause = || tokio::time::sleep(Duration::from_millis(700));
    pause().await;
    host.kill_edge();
    host.start_edge().await;
    pause().await;
    host.kill_worker();
    host.start_worker().await;
    pause().await;
    if let Some(m) = mongo.as_mut() {
        m.kill();
        tokio::time::sleep(Duration::from_millis(300)).await;
        m.restart().await;
        pause().await;
    }
    host.kill_edge();
    host.kill_worker();
    host.start_worker().await;
    host.start_edge().await;

    let (r1, r2) = publishers.await.expect("publishers");
    let (reconnects_1, reconnects_2) = (r1.expect("QoS 1 publisher"), r2.expect("QoS 2 publisher"));
    // sub-b was offline the whole time: everything waits for it in the store.
    let got_b = collect(&addrs, "sub-b", "chaos/#", 2, &expected, deadline).await;
    let got_a = sub_a.await.expect("subscriber");

    for (name, got) in [("sub-a", &got_a), ("sub-b", &got_b)] {
        let distinct: HashSet<&String> = got.iter().collect();
        let lost = expected.iter().filter(|m| !distinct.contains(m)).count();
        let q2_dups = got.iter().filter(|m| m.starts_with("q2-")).count()
            - q2.len()
                .min(distinct.iter().filter(|m| m.starts_with("q2-")).count());
        let q1_dups = got.iter().filter(|m| m.starts_with("q1-")).count()
            - distinct.iter().filter(|m| m.starts_with("q1-")).count();
        println!(
            "{backend:?} {name}: published {} acknowledged, received {} ({} distinct), lost {lost}, QoS 1 duplicates {q1_dups}, QoS 2 duplicates {q2_dups}; publisher reconnects {reconnects_1}/{reconnects_2}",
            2 * n,
            got.len(),
            distinct.len()
        );
        assert_eq!(lost, 0, "{name} lost acknowledged messages");
        assert_eq!(q2_dups, 0, "{name} got a QoS 2 message twice");
        // Per publisher, first arrivals keep the publish order.
        for prefix in ["q1-", "q2-"] {
            let mut firsts = Vec::new();
            let mut seen = HashSet::new();
            for m in got.iter().filter(|m| m.starts_with(prefix)) {
                if seen.insert(m) {
                    firsts.push(m.clone());
                }
            }
            let inversions: Vec<(String, String)> = firsts
                .windows(2)
                .filter(|w| w[0] > w[1])
                .map(|w| (w[0].clone(), w[1].clone()))
                .collect();
            // Order holds in normal operation (cluster and edge tests assert it exactly); across
            // these crashes a message re-sent from the store can, rarely, land next to one
            // delivered live around the crash. Reported, and bounded.
            if !inversions.is_empty() {
                println!("{name}: {prefix} order inversions around crashes: {inversions:?}");
            }
            assert!(
                inversions.len() <= 2,
                "{name}: {prefix} out of order at {inversions:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_lose_nothing_acknowledged_embedded() {
    chaos(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_lose_nothing_acknowledged_mongodb() {
    chaos(Backend::Mongo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_qos2_state_survives_an_edge_restart() {
    use rumqttc::mqttbytes::v4::Packet;
    let (_dir, mut host) = BrokerHost::single().await;
    let mut sub = Raw::session(host.addr, "watcher", false).await;
    sub.send(&raw::subscribe_bytes(1, &[("x/#", 2)])).await;
    assert!(matches!(sub.recv().await, Some(Packet::SubAck(_))));

    let mut publisher = Raw::session(host.addr, "device", false).await;
    publisher
        .send(&raw::publish_bytes("x/1", 2, 7, false, b"once"))
        .await;
    assert!(matches!(publisher.recv().await, Some(Packet::PubRec(r)) if r.pkid == 7));
    // The edge dies before the PUBREL; the publisher did not see... anything more.
    host.kill_edge();
    host.start_edge().await;

    // The publisher re-sends the PUBLISH (as if the PUBREC was lost), then releases it.
    let mut publisher = Raw::session(host.addr, "device", false).await;
    publisher
        .send(&raw::publish_bytes("x/1", 2, 7, true, b"once"))
        .await;
    assert!(matches!(publisher.recv().await, Some(Packet::PubRec(r)) if r.pkid == 7));
    publisher.send(&[0x62, 2, 0, 7]).await;
    assert!(matches!(publisher.recv().await, Some(Packet::PubComp(c)) if c.pkid == 7));
    // The id is free again: a new message with it is a new message.
    publisher
        .send(&raw::publish_bytes("x/1", 2, 7, false, b"twice"))
        .await;
    assert!(matches!(publisher.recv().await, Some(Packet::PubRec(r)) if r.pkid == 7));
    publisher.send(&[0x62, 2, 0, 7]).await;
    assert!(matches!(publisher.recv().await, Some(Packet::PubComp(_))));

    let mut watcher = Raw::session(host.addr, "watcher", false).await;
    let mut got = Vec::new();
    while let Some(p) = watcher.recv_within(Duration::from_millis(1500)).await {
        if let Packet::Publish(p) = p {
            got.push(String::from_utf8_lossy(&p.payload).into_owned());
            watcher
                .send(&[0x50, 2, (p.pkid >> 8) as u8, p.pkid as u8])
                .await;
        }
    }
    drop(sub);
    assert_eq!(got, vec!["once", "twice"], "each message exactly once");
    let _ = PATIENCE;
}

/// QoS 0 messages are committed without an fsync of their own (nobody waits for them); once
/// committed they must still survive a crash (SIGKILL) of the worker process. Read through a
/// second connection to the embedded store, as another process would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwaited_writes_survive_a_worker_crash() {
    use wharf_store_worker::store::{sqlite::SqliteStore, MessageStore};
    let (dir, mut host) = BrokerHost::single().await;
    let mut publisher = Raw::session(host.addr, "device", true).await;
    const N: usize = 200;
    for i in 0..N {
        let payload = format!("m{i}");
        publisher
            .send(&raw::publish_bytes("q0/t", 0, 0, false, payload.as_bytes()))
            .await;
    }
    let data = dir.path().join("h1").join("data");
    let stored = || async {
        let store = SqliteStore::open(&data).expect("open the embedded store");
        store
            .messages_after(wharf_shared::Cursor::since(0), None, 10 * N)
            .await
            .expect("query")
            .into_iter()
            .filter(|m| m.topic == "q0/t")
            .count()
    };
    let deadline = Instant::now() + PATIENCE;
    while stored().await < N {
        assert!(Instant::now() < deadline, "QoS 0 messages not stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    host.kill_worker();
    host.start_worker().await;
    assert_eq!(
        stored().await,
        N,
        "committed QoS 0 messages lost in a crash"
    );
}
