//! The edge against the mock store-worker: MQTT 3.1.1 behaviour a client sees.

use rumqttc::{LastWill, Packet, QoS};
use std::time::Duration;
use tempfile::TempDir;
use wharf_tests::client::{payloads, Client, Options};
use wharf_tests::mock_worker::MockWorker;
use wharf_tests::raw::{self, Raw};
use wharf_tests::{edge_config, init_tracing, start_edge, PATIENCE};

struct Setup {
    _dir: TempDir,
    worker: MockWorker,
    edge: wharf_edge::Edge,
}

async fn setup() -> Setup {
    setup_with(|_| {}).await
}

async fn setup_with(tune: impl FnOnce(&mut wharf_edge::EdgeConfig)) -> Setup {
    init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let socket = dir.path().join("worker.sock");
    let worker = MockWorker::start(&socket);
    let mut config = edge_config(&socket, "edge-a");
    tune(&mut config);
    let edge = start_edge(config).await;
    Setup {
        _dir: dir,
        worker,
        edge,
    }
}

const QUIET: Duration = Duration::from_millis(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_subscribe_at_every_qos() {
    let s = setup().await;
    let addr = s.edge.local_addr;
    let mut sub = Client::connect(addr, "sub", true).await;
    sub.subscribe("sensors/+/temp", QoS::ExactlyOnce).await;
    let mut publisher = Client::connect(addr, "pub", true).await;
    publisher
        .publish("sensors/a/temp", QoS::AtMostOnce, false, "q0")
        .await;
    publisher
        .publish_acked("sensors/b/temp", QoS::AtLeastOnce, "q1")
        .await;
    publisher
        .publish_acked("sensors/c/temp", QoS::ExactlyOnce, "q2")
        .await;
    publisher
        .publish_acked("sensors/c/humidity", QoS::AtLeastOnce, "other")
        .await;

    let got = sub.publishes(3).await;
    assert_eq!(payloads(&got), vec!["q0", "q1", "q2"]);
    let qos: Vec<QoS> = got.iter().map(|p| p.qos).collect();
    assert_eq!(
        qos,
        vec![QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
    );
    assert!(
        got.iter().all(|p| !p.retain),
        "live messages carry retain=0"
    );
    sub.assert_no_publish(QUIET).await;

    // Every message was stored, whatever its QoS.
    for topic in [
        "sensors/a/temp",
        "sensors/b/temp",
        "sensors/c/temp",
        "sensors/c/humidity",
    ] {
        assert_eq!(s.worker.stored_payloads(topic).len(), 1, "{topic} stored");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_qos_is_the_lower_of_publish_and_subscription() {
    let s = setup().await;
    let mut sub = Client::connect(s.edge.local_addr, "sub", true).await;
    sub.subscribe("t", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect(s.edge.local_addr, "pub", true).await;
    publisher.publish_acked("t", QoS::ExactlyOnce, "x").await;
    publisher.publish("t", QoS::AtMostOnce, false, "y").await;
    let got = sub.publishes(2).await;
    assert_eq!(got[0].qos, QoS::AtLeastOnce);
    assert_eq!(got[1].qos, QoS::AtMostOnce);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_subscriptions_deliver_once_at_the_highest_qos() {
    let s = setup().await;
    let mut sub = Client::connect(s.edge.local_addr, "sub", true).await;
    sub.subscribe("a/#", QoS::AtMostOnce).await;
    sub.subscribe("a/+", QoS::ExactlyOnce).await;
    sub.subscribe("a/b", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect(s.edge.local_addr, "pub", true).await;
    publisher
        .publish_acked("a/b", QoS::ExactlyOnce, "once")
        .await;
    let got = sub.publishes(1).await;
    assert_eq!(got[0].qos, QoS::ExactlyOnce);
    sub.assert_no_publish(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dollar_topics_are_not_matched_by_leading_wildcards() {
    let s = setup().await;
    let mut all = Client::connect(s.edge.local_addr, "all", true).await;
    all.subscribe("#", QoS::AtMostOnce).await;
    let mut sys = Client::connect(s.edge.local_addr, "sys", true).await;
    sys.subscribe("$SYS/#", QoS::AtMostOnce).await;
    let mut publisher = Client::connect(s.edge.local_addr, "pub", true).await;
    publisher
        .publish_acked("$SYS/load", QoS::AtLeastOnce, "1")
        .await;
    assert_eq!(payloads(&sys.publishes(1).await), vec!["1"]);
    let got = all
        .next_matching_within(QUIET, |p| match p {
            Packet::Publish(p) if p.topic == "$SYS/load" => Some(()),
            _ => None,
        })
        .await;
    assert!(got.is_none(), "'#' matched a $ topic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_set_replaced_and_cleared() {
    let s = setup().await;
    let addr = s.edge.local_addr;
    let mut publisher = Client::connect(addr, "pub", true).await;
    publisher
        .publish_acked_retain("r/1", QoS::AtLeastOnce, true, "first")
        .await;
    publisher
        .publish_acked_retain("r/1", QoS::AtLeastOnce, true, "second")
        .await;
    publisher
        .publish_acked_retain("r/2", QoS::AtLeastOnce, true, "keep")
        .await;

    let mut sub = Client::connect(addr, "sub", true).await;
    sub.subscribe("r/+", QoS::AtLeastOnce).await;
    let mut got = sub.publishes(2).await;
    got.sort_by(|a, b| a.topic.cmp(&b.topic));
    assert_eq!(payloads(&got), vec!["second", "keep"]);
    assert!(
        got.iter().all(|p| p.retain),
        "retained messages carry retain=1 on subscribe"
    );
    // Seen twice in 8 runs beside two CPU hogs (never since): the replaced "first" arrived here,
    // not retained. Should it happen again, the mock's log (times of the messages and of the
    // subscription, every request) says how.
    if let Some(extra) = sub.publish_within(QUIET).await {
        let log = s.worker.store.lock().expect("lock").describe();
        panic!("unexpected message: {extra:?}\n{log}");
    }

    // An empty retained payload clears it; it is still delivered to current subscribers.
    publisher
        .publish_acked_retain("r/1", QoS::AtLeastOnce, true, "")
        .await;
    let live = sub.publishes(1).await;
    assert!(live[0].payload.is_empty() && !live[0].retain);
    let mut late = Client::connect(addr, "late", true).await;
    late.subscribe("r/+", QoS::AtLeastOnce).await;
    assert_eq!(payloads(&late.publishes(1).await), vec!["keep"]);
    late.assert_no_publish(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_subscription_gets_the_retained_message_not_the_history() {
    let s = setup().await;
    let addr = s.edge.local_addr;
    let mut publisher = Client::connect(addr, "pub", true).await;
    publisher
        .publish_acked("h/t", QoS::AtLeastOnce, "old-1")
        .await;
    publisher
        .publish_acked_retain("h/t", QoS::AtLeastOnce, true, "old-retained")
        .await;
    publisher
        .publish_acked("h/t", QoS::AtLeastOnce, "old-2")
        .await;
    // Times are in milliseconds: make "before the subscription" unambiguous.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut sub = Client::connect(addr, "sub", false).await;
    sub.subscribe("h/t", QoS::AtLeastOnce).await;
    assert_eq!(payloads(&sub.publishes(1).await), vec!["old-retained"]);
    sub.assert_no_publish(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_gets_what_was_published_while_it_was_away() {
    let s = setup().await;
    let addr = s.edge.local_addr;
    let mut sub = Client::connect(addr, "device-1", false).await;
    assert!(!sub.session_present);
    sub.subscribe("cmd/#", QoS::AtLeastOnce).await;
    sub.disconnect().await;

    let mut publisher = Client::connect(addr, "pub", true).await;
    for i in 0..20 {
        publisher
            .publish_acked("cmd/x", QoS::AtLeastOnce, format!("m{i}"))
            .await;
    }
    publisher
        .publish("cmd/x", QoS::AtMostOnce, false, "q0")
        .await;

    let mut sub = Client::connect(addr, "device-1", false).await;
    assert!(sub.session_present, "session present after reconnect");
    let got = sub.publishes(21).await;
    let expected: Vec<String> = (0..20)
        .map(|i| format!("m{i}"))
        .chain(["q0".into()])
        .collect();
    assert_eq!(payloads(&got), expected, "all messages, in publish order");
    sub.assert_no_publish(QUIET).await;
    // Live delivery still works on the resumed session.
    publisher
        .publish_acked("cmd/y", QoS::AtLeastOnce, "live")
        .await;
    assert_eq!(payloads(&sub.publishes(1).await), vec!["live"]);
    sub.disconnect().await;

    // Nothing is delivered twice on the next resume.
    let mut sub = Client::connect(addr, "device-1", false).await;
    sub.assert_no_publish(QUIET).await;
    drop(sub);

    // A clean session discards it all.
    let sub = Client::connect(addr, "device-1", true).await;
    assert!(!sub.session_present);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_messages_are_resent_with_dup_on_resume() {
    let s = setup().await;
    let addr = s.edge.local_addr;
    // A raw subscriber that never acknowledges.
    let mut raw = Raw::session(addr, "lazy", false).await;
    raw.send(&raw::subscribe_bytes(1, &[("q/#", 2)])).await;
    assert!(matches!(raw.recv().await, Some(Packet::SubAck(_))));
    let mut publisher = Client::connect(addr, "pub", true).await;
    publisher
        .publish_acked("q/1", QoS::AtLeastOnce, "one")
        .await;
    publisher
        .publish_acked("q/2", QoS::ExactlyOnce, "two")
        .await;
    let mut first = Vec::new();
    for _ in 0..2 {
        match raw.recv().await {
            Some(Packet::Publish(p)) => first.push((p.pkid, p.payload.to_vec(), p.dup)),
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    assert!(first.iter().all(|(_, _, dup)| !dup));
    drop(raw);

    let mut raw = Raw::connect(addr).await;
    raw.send(&raw::connect_bytes("lazy", false, 60)).await;
    match raw.recv().await {
        Some(Packet::ConnAck(a)) => assert!(a.session_present),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    for (pkid, payload, _) in &first {
        match raw.recv().await {
            Some(Packet::Publish(p)) => {
                assert_eq!(
                    (p.pkid, p.payload.to_vec(), p.dup),
                    (*pkid, payload.clone(), true)
                );
            }
            other => panic!("expected re-sent PUBLISH, got {other:?}"),
        }
    }
    assert!(
        raw.recv_within(QUIET).await.is_none(),
        "nothing else is sent"
    );
}

/// A QoS 2 step the store did not record closes the connection; when the session resumes on
/// the same edge, that step is asked of the store again, and its PUBLISH or PUBREL is shown
/// only once recorded. Shown before, a crash would replay the delivery from the store: under a
/// new packet id, or as a PUBLISH after its PUBREL, which the client counts twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_steps_the_store_missed_are_recorded_before_they_are_shown_on_resume() {
    let s = setup().await;
    let addr = s.edge.local_addr;
    let qos2_out = |pkid: u16| {
        let store = s.worker.store.lock().expect("lock");
        store.qos2_out.get(&("exact".to_owned(), pkid)).copied()
    };
    let delivered = || s.worker.store.lock().expect("lock").delivered.len();
    let mut raw = Raw::session(addr, "exact", false).await;
    raw.send(&raw::subscribe_bytes(1, &[("e/#", 2)])).await;
    assert!(matches!(raw.recv().await, Some(Packet::SubAck(_))));
    let mut publisher = Client::connect(addr, "pub", true).await;

    // The PUBLISH step is not recorded: the connection closes with nothing shown.
    s.worker.set_fail_tracks(true);
    publisher
        .publish_acked("e/1", QoS::ExactlyOnce, "one")
        .await;
    assert!(raw.recv().await.is_none(), "closed without a PUBLISH");
    s.worker.set_fail_tracks(false);
    let mut raw = Raw::session(addr, "exact", false).await;
    let pkid = match raw.recv().await {
        Some(Packet::Publish(p)) => {
            assert_eq!(p.payload.to_vec(), b"one".to_vec());
            p.pkid
        }
        other => panic!("expected the PUBLISH, got {other:?}"),
    };
    assert!(
        matches!(qos2_out(pkid), Some((_, false))),
        "the PUBLISH was shown before the store recorded it"
    );

    // The release step is not recorded: closed again, no PUBREL.
    s.worker.set_fail_tracks(true);
    raw.send(&[0x50, 2, (pkid >> 8) as u8, pkid as u8]).await;
    assert!(raw.recv().await.is_none(), "closed without a PUBREL");
    s.worker.set_fail_tracks(false);
    assert_eq!(delivered(), 0);
    let mut raw = Raw::session(addr, "exact", false).await;
    assert!(matches!(raw.recv().await, Some(Packet::PubRel(r)) if r.pkid == pkid));
    assert!(
        matches!(qos2_out(pkid), Some((_, true))) && delivered() == 1,
        "the PUBREL was shown before the store recorded the release"
    );
    raw.send(&[0x70, 2, (pkid >> 8) as u8, pkid as u8]).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while qos2_out(pkid).is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "PUBCOMP not forgotten"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        raw.recv_within(QUIET).await.is_none(),
        "nothing else is sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_publish_resent_with_the_same_packet_id_is_delivered_once() {
    let s = setup().await;
    let addr = s.edge.local_addr;
    let mut sub = Client::connect(addr, "sub", true).await;
    sub.subscribe("x", QoS::ExactlyOnce).await;
    let mut raw = Raw::session(addr, "pub2", true).await;
    raw.send(&raw::publish_bytes("x", 2, 9, false, b"exactly"))
        .await;
    assert!(matches!(raw.recv().await, Some(Packet::PubRec(r)) if r.pkid == 9));
    raw.send(&raw::publish_bytes("x", 2, 9, true, b"exactly"))
        .await;
    assert!(matches!(raw.recv().await, Some(Packet::PubRec(r)) if r.pkid == 9));
    raw.send(&[0x62, 2, 0, 9]).await;
    assert!(matches!(raw.recv().await, Some(Packet::PubComp(c)) if c.pkid == 9));
    assert_eq!(payloads(&sub.publishes(1).await), vec!["exactly"]);
    sub.assert_no_publish(QUIET).await;
    assert_eq!(s.worker.stored_payloads("x").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puback_waits_until_the_worker_says_persisted() {
    let s = setup().await;
    s.worker.set_persist_delay(Duration::from_millis(600));
    let mut raw = Raw::session(s.edge.local_addr, "p", true).await;
    raw.send(&raw::publish_bytes("slow", 1, 5, false, b"x"))
        .await;
    assert!(
        raw.recv_within(Duration::from_millis(300)).await.is_none(),
        "PUBACK before persisted"
    );
    assert!(matches!(raw.recv().await, Some(Packet::PubAck(a)) if a.pkid == 5));
    assert_eq!(s.worker.stored_payloads("slow").len(), 1);
}

/// A QoS 1 message goes to live subscribers at once; its PUBACK still waits for the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_is_routed_at_once_and_acknowledged_once_stored() {
    let s = setup().await;
    let addr = s.edge.local_addr;
    let mut sub = Client::connect(addr, "sub", true).await;
    sub.subscribe("early", QoS::AtLeastOnce).await;
    s.worker.set_persist_delay(Duration::from_millis(800));
    let mut raw = Raw::session(addr, "p", true).await;
    raw.send(&raw::publish_bytes("early", 1, 5, false, b"x"))
        .await;
    assert_eq!(payloads(&sub.publishes(1).await), vec!["x"]);
    assert!(
        raw.recv_within(Duration::from_millis(100)).await.is_none(),
        "PUBACK before stored"
    );
    assert!(s.worker.stored_payloads("early").is_empty());
    assert!(matches!(raw.recv().await, Some(Packet::PubAck(a)) if a.pkid == 5));
    assert_eq!(s.worker.stored_payloads("early").len(), 1);
}

/// Consecutive QoS 0 PUBLISHes of one read go to the store in one notice, consecutive QoS 1
/// ones in one persist request (acknowledged in order once it is answered), and each batch
/// keeps its order with the packets around it, for the subscribers and in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_of_one_read_are_stored_together_in_order() {
    let s = setup().await;
    let addr = s.edge.local_addr;
    let mut sub = Client::connect(addr, "sub", true).await;
    sub.subscribe("b/#", QoS::AtLeastOnce).await;
    let mut raw = Raw::session(addr, "batch", true).await;
    let mut bytes = Vec::new();
    let mut expected = Vec::new();
    for n in 0..50 {
        let payload = format!("before-{n:02}");
        bytes.extend(raw::publish_bytes("b/t", 0, 0, false, payload.as_bytes()));
        expected.push(payload);
    }
    for pkid in 7..12u16 {
        let payload = format!("qos1-{pkid}");
        bytes.extend(raw::publish_bytes(
            "b/t",
            1,
            pkid,
            false,
            payload.as_bytes(),
        ));
        expected.push(payload);
    }
    bytes.extend(raw::publish_bytes("b/t", 0, 0, false, b"after"));
    expected.push("after".to_owned());
    raw.send(&bytes).await;
    for pkid in 7..12u16 {
        assert!(matches!(raw.recv().await, Some(Packet::PubAck(a)) if a.pkid == pkid));
    }
    assert_eq!(payloads(&sub.publishes(56).await), expected);
    sub.assert_no_publish(QUIET).await;
    let stored: Vec<String> = s
        .worker
        .stored_payloads("b/t")
        .into_iter()
        .map(|p| String::from_utf8(p).expect("utf-8"))
        .collect();
    assert_eq!(stored, expected);
    let store = s.worker.store.lock().expect("lock");
    assert_eq!(store.store_notices.iter().sum::<usize>(), 51);
    assert!(
        store.store_notices.len() <= 10,
        "51 messages in a few reads went out as {} notices",
        store.store_notices.len()
    );
    let persists: Vec<usize> = store
        .requests
        .iter()
        .filter_map(|r| match r {
            wharf_shared::Request::Persist(messages) => Some(messages.len()),
            _ => None,
        })
        .collect();
    assert_eq!(persists.iter().sum::<usize>(), 5);
    assert!(persists.len() <= 2, "5 QoS 1 messages in {persists:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_persist_is_never_acknowledged() {
    let s = setup().await;
    s.worker.set_fail_persists(true);
    let mut raw = Raw::session(s.edge.local_addr, "p", true).await;
    raw.send(&raw::publish_bytes("f", 1, 5, false, b"x")).await;
    // The client is disconnected without a PUBACK, so it re-sends on its next connection.
    match raw.recv().await {
        None => {}
        Some(p) => panic!("expected the connection to close, got {p:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_away_and_back_loses_no_acknowledged_message() {
    let mut s = setup().await;
    let addr = s.edge.local_addr;
    let mut sub = Client::connect(addr, "sub", false).await;
    sub.subscribe("w/#", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect(addr, "pub", true).await;
    publisher
        .publish_acked("w/1", QoS::AtLeastOnce, "before")
        .await;

    s.worker.stop();
    for i in 0..5 {
        publisher
            .publish("w/1", QoS::AtLeastOnce, false, format!("during-{i}"))
            .await;
    }
    // Nothing is acknowledged while the worker is away.
    let early = publisher
        .next_matching_within(Duration::from_millis(500), |p| {
            matches!(p, Packet::PubAck(_)).then_some(())
        })
        .await;
    assert!(early.is_none(), "PUBACK while the worker was away");
    // A persistent session cannot be restored without the worker.
    let mut raw = Raw::connect(addr).await;
    raw.send(&raw::connect_bytes("other-device", false, 60))
        .await;
    match raw.recv().await {
        Some(Packet::ConnAck(a)) => {
            assert_eq!(
                a.code,
                rumqttc::mqttbytes::v4::ConnectReturnCode::ServiceUnavailable
            )
        }
        other => panic!("expected CONNACK 3, got {other:?}"),
    }

    s.worker.restart();
    for _ in 0..5 {
        let ack = publisher
            .next_matching(|p| matches!(p, Packet::PubAck(_)).then_some(()))
            .await;
        assert!(
            ack.is_some(),
            "held publishes are acknowledged once the worker is back"
        );
    }
    let got = sub.publishes(6).await;
    let expected: Vec<String> = std::iter::once("before".to_string())
        .chain((0..5).map(|i| format!("during-{i}")))
        .collect();
    assert_eq!(payloads(&got), expected);
    assert_eq!(s.worker.stored_payloads("w/1").len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_published_on_ungraceful_close_only() {
    let s = setup().await;
    let addr = s.edge.local_addr;
    let mut watcher = Client::connect(addr, "watcher", true).await;
    watcher.subscribe("wills/#", QoS::AtLeastOnce).await;
    let will = |id: &str| Options {
        will: Some(LastWill::new(
            format!("wills/{id}"),
            "gone",
            QoS::AtLeastOnce,
            false,
        )),
        ..Options::default()
    };
    let polite = Client::connect_with(addr, "polite", will("polite")).await;
    polite.disconnect().await;
    let rude = Client::connect_with(addr, "rude", will("rude")).await;
    rude.kill();
    let got = watcher.publishes(1).await;
    assert_eq!(got[0].topic, "wills/rude");
    watcher.assert_no_publish(QUIET).await;
}

/// Topics of hundreds of levels are served (MQTT sets no limit below the packet size); past
/// `--max-topic-levels` (512 by default) a filter gets SUBACK 0x80.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_of_hundreds_of_levels_are_served() {
    let s = setup().await;
    let addr = s.edge.local_addr;
    let deep = vec!["l"; 300].join("/");
    let too_deep = vec!["l"; 513].join("/");
    let mut sub = Raw::session(addr, "deep-sub", true).await;
    sub.send(&raw::subscribe_bytes(1, &[(&deep, 1), (&too_deep, 1)]))
        .await;
    match sub.recv().await {
        Some(Packet::SubAck(a)) => assert_eq!(
            a.return_codes,
            vec![
                rumqttc::mqttbytes::v4::SubscribeReasonCode::Success(QoS::AtLeastOnce),
                rumqttc::mqttbytes::v4::SubscribeReasonCode::Failure
            ]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    let mut publisher = Raw::session(addr, "deep-pub", true).await;
    publisher
        .send(&raw::publish_bytes(&deep, 1, 1, false, b"deep"))
        .await;
    assert!(matches!(publisher.recv().await, Some(Packet::PubAck(_))));
    match sub.recv().await {
        Some(Packet::Publish(p)) => assert_eq!(&p.payload[..], b"deep"),
        other => panic!("expected the PUBLISH, got {other:?}"),
    }
}

/// 3.1.1 names no takeover among a will's causes: a will is published on a takeover only when
/// the session ends with it (either connection clean), as Mosquitto does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_3_1_1_takeover_sends_the_will_only_when_the_session_ends() {
    let s = setup().await;
    let addr = s.edge.local_addr;
    let mut watcher = Client::connect(addr, "watcher", true).await;
    watcher.subscribe("wills/#", QoS::AtLeastOnce).await;
    for (id, old_clean, new_clean, sent) in [
        ("kept", false, false, false),
        ("then-clean", false, true, true),
        ("was-clean", true, false, true),
    ] {
        let options = |clean: bool| Options {
            clean,
            will: Some(LastWill::new(
                format!("wills/{id}"),
                "gone",
                QoS::AtLeastOnce,
                false,
            )),
            ..Options::default()
        };
        let _old = Client::connect_with(addr, id, options(old_clean)).await;
        let new = Client::connect_with(addr, id, options(new_clean)).await;
        if sent {
            let got = watcher.publishes(1).await;
            assert_eq!(got[0].topic, format!("wills/{id}"));
        }
        watcher.assert_no_publish(QUIET).await;
        new.disconnect().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_with_the_same_id_takes_over() {
    let s = setup().await;
    let addr = s.edge.local_addr;
    let mut first = Raw::session(addr, "same", true).await;
    let mut second = Client::connect(addr, "same", true).await;
    first.expect_closed().await;
    second.subscribe("t", QoS::AtMostOnce).await;
    let publisher = Client::connect(addr, "pub", true).await;
    publisher
        .publish("t", QoS::AtMostOnce, false, "to-second")
        .await;
    assert_eq!(payloads(&second.publishes(1).await), vec!["to-second"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_rules_and_return_codes() {
    let s = setup().await;
    let addr = s.edge.local_addr;
    let connack = |bytes: Vec<u8>| async move {
        let mut raw = Raw::connect(addr).await;
        raw.send(&bytes).await;
        match raw.recv().await {
            Some(Packet::ConnAck(a)) => Some((a.code, a.session_present)),
            None => None,
            other => panic!("unexpected {other:?}"),
        }
    };
    use rumqttc::mqttbytes::v4::ConnectReturnCode as Code;
    // Empty client id: assigned with a clean session, refused without.
    assert_eq!(
        connack(raw::connect_bytes("", true, 60)).await,
        Some((Code::Success, false))
    );
    assert_eq!(
        connack(raw::connect_bytes("", false, 60)).await,
        Some((Code::BadClientId, false))
    );
    // Protocol level 3 gets return code 1.
    let mut v3 = raw::connect_bytes("old", true, 60);
    v3[8] = 3;
    assert_eq!(
        connack(v3).await,
        Some((Code::RefusedProtocolVersion, false))
    );
    // Wrong protocol name, reserved flag set: closed without CONNACK.
    let mut bad_name = raw::connect_bytes("x", true, 60);
    bad_name[4] = b'X';
    assert_eq!(connack(bad_name).await, None);
    let mut reserved = raw::connect_bytes("x", true, 60);
    reserved[9] |= 1;
    assert_eq!(connack(reserved).await, None);
    // A client id of 64 KB is refused, not a crash.
    let long = "x".repeat(65_000);
    assert_eq!(
        connack(raw::connect_bytes(&long, true, 60)).await,
        Some((Code::BadClientId, false))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_close_only_that_connection() {
    let s = setup().await;
    let addr = s.edge.local_addr;
    let mut bystander = Client::connect(addr, "bystander", true).await;
    bystander.subscribe("ok", QoS::AtMostOnce).await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "wildcard in PUBLISH topic",
            raw::publish_bytes("a/+", 0, 0, false, b"x"),
        ),
        ("QoS 3", vec![0x36, 5, 0, 1, b'a', 0, 1]),
        ("packet id 0 with QoS 1", vec![0x32, 5, 0, 1, b'a', 0, 0]),
        (
            "NUL in topic",
            raw::publish_bytes("a\0b", 0, 0, false, b"x"),
        ),
        ("invalid UTF-8 topic", vec![0x30, 5, 0, 2, 0xc3, 0x28, b'x']),
        ("second CONNECT", raw::connect_bytes("again", true, 60)),
        ("SUBSCRIBE without filters", vec![0x82, 2, 0, 1]),
        (
            "SUBSCRIBE with bad flags",
            vec![0x80, 6, 0, 1, 0, 1, b'a', 0],
        ),
        (
            "malformed remaining length",
            vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01],
        ),
        ("256 MB declared length", vec![0x30, 0xff, 0xff, 0xff, 0x7f]),
        ("reserved packet type", vec![0xf0, 0]),
    ];
    for (name, bytes) in cases {
        let mut raw = Raw::session(addr, "bad", true).await;
        raw.send(&bytes).await;
        match raw.recv().await {
            None => {}
            Some(p) => panic!("{name}: expected a close, got {p:?}"),
        }
    }
    let publisher = Client::connect(addr, "pub", true).await;
    publisher
        .publish("ok", QoS::AtMostOnce, false, "still fine")
        .await;
    assert_eq!(payloads(&bystander.publishes(1).await), vec!["still fine"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_filters_get_suback_0x80_and_good_ones_work() {
    let s = setup().await;
    let mut raw = Raw::session(s.edge.local_addr, "s", true).await;
    raw.send(&raw::subscribe_bytes(
        3,
        &[("good/+", 1), ("bad/#/x", 0), ("worse+", 2)],
    ))
    .await;
    match raw.recv().await {
        Some(Packet::SubAck(a)) => {
            use rumqttc::mqttbytes::v4::SubscribeReasonCode as C;
            assert_eq!(a.pkid, 3);
            assert_eq!(
                a.return_codes,
                vec![C::Success(QoS::AtLeastOnce), C::Failure, C::Failure]
            );
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_stops_delivery() {
    let s = setup().await;
    let mut sub = Client::connect(s.edge.local_addr, "sub", true).await;
    sub.subscribe("u/#", QoS::AtMostOnce).await;
    sub.client.unsubscribe("u/#").await.expect("unsubscribe");
    let acked = sub
        .next_matching(|p| matches!(p, Packet::UnsubAck(_)).then_some(()))
        .await;
    assert!(acked.is_some());
    let mut publisher = Client::connect(s.edge.local_addr, "pub", true).await;
    publisher.publish_acked("u/1", QoS::AtLeastOnce, "x").await;
    sub.assert_no_publish(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_are_closed_by_keepalive_and_connect_timeout() {
    let s = setup_with(|c| c.limits.connect_timeout = Duration::from_millis(500)).await;
    let addr = s.edge.local_addr;
    // Never sends CONNECT.
    let mut silent = Raw::connect(addr).await;
    silent.expect_closed().await;
    // Keepalive of 1 s, then silence: closed after 1.5 s.
    let mut raw = Raw::connect(addr).await;
    raw.send(&raw::connect_bytes("sleepy", true, 1)).await;
    assert!(matches!(raw.recv().await, Some(Packet::ConnAck(_))));
    let started = tokio::time::Instant::now();
    raw.expect_closed().await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "closed before the keepalive ran out"
    );
    // A client that pings stays.
    let mut pinger = Raw::connect(addr).await;
    pinger.send(&raw::connect_bytes("pinger", true, 1)).await;
    assert!(matches!(pinger.recv().await, Some(Packet::ConnAck(_))));
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        pinger.send(&[0xc0, 0]).await;
        assert!(matches!(pinger.recv().await, Some(Packet::PingResp)));
    }
}

/// A publisher the edge stops reading because the store is slow (its persists outstanding)
/// is not closed for keepalive meanwhile, and its PINGREQs are still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_held_back_for_a_slow_store_is_not_timed_out() {
    let s = setup_with(|c| c.limits.max_pending_persists = 2).await;
    s.worker.set_persist_delay(Duration::from_secs(5));
    let mut raw = Raw::connect(s.edge.local_addr).await;
    // Keepalive 1 s: closed after 1.5 s of silence.
    raw.send(&raw::connect_bytes("held", true, 1)).await;
    assert!(matches!(raw.recv().await, Some(Packet::ConnAck(_))));
    for pkid in 1..=2 {
        raw.send(&raw::publish_bytes("slow", 1, pkid, false, b"x"))
            .await;
    }
    // The edge holds the rest back; each PINGREQ is answered all the same.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        raw.send(&[0xc0, 0]).await;
        let answer = raw.recv_within(Duration::from_millis(600)).await;
        assert!(
            matches!(answer, Some(Packet::PingResp)),
            "PINGREQ while held back: {answer:?}"
        );
    }
    // A PUBLISH sent while held back waits for the store, in order, and is taken then.
    raw.send(&raw::publish_bytes("slow", 1, 3, false, b"y"))
        .await;
    let mut acked = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE * 3;
    while acked.len() < 3 && tokio::time::Instant::now() < deadline {
        // Pinging on, as a client waiting for its PUBACKs does.
        raw.send(&[0xc0, 0]).await;
        while let Some(packet) = raw.recv_within(Duration::from_millis(700)).await {
            match packet {
                Packet::PubAck(a) => acked.push(a.pkid),
                Packet::PingResp => {}
                other => panic!("expected PUBACKs, got {other:?} after {acked:?}"),
            }
        }
    }
    assert_eq!(acked, vec![1, 2, 3]);
    // Reading again, the keepalive runs again: silence now closes it.
    raw.expect_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_pending_persists_before_closing() {
    let s = setup().await;
    s.worker.set_persist_delay(Duration::from_millis(400));
    let mut raw = Raw::session(s.edge.local_addr, "p", true).await;
    raw.send(&raw::publish_bytes("bye", 1, 7, false, b"x"))
        .await;
    // Let the edge read it before shutting down.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let edge = s.edge;
    let stop = tokio::spawn(async move { edge.stop().await });
    assert!(matches!(raw.recv().await, Some(Packet::PubAck(a)) if a.pkid == 7));
    raw.expect_closed().await;
    tokio::time::timeout(PATIENCE, stop)
        .await
        .expect("stopped")
        .expect("join");
    assert_eq!(s.worker.stored_payloads("bye").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscriber_loses_only_qos0_and_gets_qos1_from_the_store() {
    let s = setup_with(|c| {
        c.limits.max_queued = 4;
        c.limits.max_inflight = 2;
        c.limits.write_high_water = 256;
    })
    .await;
    let addr = s.edge.local_addr;
    // A raw subscriber that does not read for a while.
    let mut slow = Raw::session(addr, "slow", true).await;
    slow.send(&raw::subscribe_bytes(1, &[("s/#", 1)])).await;
    assert!(matches!(slow.recv().await, Some(Packet::SubAck(_))));
    let mut publisher = Client::connect(addr, "pub", true).await;
    for i in 0..30 {
        publisher
            .publish_acked("s/1", QoS::AtLeastOnce, format!("{i:02}"))
            .await;
    }
    // Now read and acknowledge everything: all 30 QoS 1 messages arrive.
    let mut got = Vec::new();
    while got.len() < 30 {
        match slow.recv().await {
            Some(Packet::Publish(p)) => {
                got.push(String::from_utf8_lossy(&p.payload).into_owned());
                slow.send(&[0x40, 2, (p.pkid >> 8) as u8, p.pkid as u8])
                    .await;
            }
            Some(_) => {}
            None => panic!("only {} of 30 arrived: {got:?}", got.len()),
        }
    }
    got.sort();
    got.dedup();
    assert_eq!(got.len(), 30, "every QoS 1 message arrives, none twice");
}
