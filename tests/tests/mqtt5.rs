//! MQTT 5.0 and 3.1 against the real edge and worker, on both stores: rumqttc's 5.0 client for
//! the features, and byte-level packets (`raw5`) for exact checks of what the broker sends.
//! Messages are told apart by payload; properties are compared field by field.

use rumqttc::v5::mqttbytes::v5::{
    Filter, PublishProperties, RetainForwardRule, SubscribeProperties,
};
use rumqttc::v5::mqttbytes::QoS;
use std::time::Duration;
use wharf_edge::Limits;
use wharf_tests::client5::{options, Client5};
use wharf_tests::raw5::{self, Raw5};
use wharf_tests::stack::{Kind, Stack};

fn full_properties(expiry: u32) -> PublishProperties {
    PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(expiry),
        topic_alias: None,
        response_topic: Some("reply/to/me".into()),
        correlation_data: Some(vec![0u8, 1, 2, 255].into()),
        // Order and repeated keys are kept (MQTT-3.3.2-18).
        user_properties: vec![
            ("b".into(), "2".into()),
            ("a".into(), "1".into()),
            ("b".into(), "3".into()),
        ],
        subscription_identifiers: Vec::new(),
        content_type: Some("text/csv".into()),
    }
}

/// The properties a subscriber got are the ones published, the expiry counted down.
fn assert_same_properties(got: &Option<PublishProperties>, sent: &PublishProperties, what: &str) {
    let got = got
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: no properties"));
    assert_eq!(
        got.payload_format_indicator, sent.payload_format_indicator,
        "{what}"
    );
    assert_eq!(got.response_topic, sent.response_topic, "{what}");
    assert_eq!(got.correlation_data, sent.correlation_data, "{what}");
    assert_eq!(got.user_properties, sent.user_properties, "{what}");
    assert_eq!(got.content_type, sent.content_type, "{what}");
    let (left, set) = (
        got.message_expiry_interval.expect("expiry forwarded"),
        sent.message_expiry_interval.expect("expiry set"),
    );
    assert!(
        left <= set && left + 30 >= set,
        "{what}: expiry {left} of {set}"
    );
}

/// Properties reach a live subscriber, a persistent session that was away (from the store,
/// after a restart of edge and worker) and a new subscriber of the retained message.
async fn properties_survive_every_path(kind: Kind) {
    let mut stack = Stack::new(kind).await;
    let addr = stack.addr();
    let mut live = Client5::connect(options(addr, "live", true, None)).await;
    live.subscribe_one("p/#", QoS::AtLeastOnce).await;
    let mut away = Client5::connect(options(addr, "away", true, Some(3600))).await;
    away.subscribe_one("p/#", QoS::ExactlyOnce).await;
    away.disconnect().await;

    let mut publisher = Client5::connect(options(addr, "pub5", true, None)).await;
    let sent = full_properties(3600);
    publisher
        .publish_acked("p/1", QoS::AtLeastOnce, false, "1.5", sent.clone())
        .await;
    publisher
        .publish_acked("p/2", QoS::ExactlyOnce, true, "2.5", sent.clone())
        .await;
    for payload in ["1.5", "2.5"] {
        let p = live.next_publish().await;
        assert_eq!(&p.payload[..], payload.as_bytes());
        assert_same_properties(&p.properties, &sent, "live");
    }
    live.disconnect().await;
    publisher.disconnect().await;

    stack.restart_worker().await;
    stack.restart_edge().await;
    let addr = stack.addr();
    let mut away = Client5::connect(options(addr, "away", false, Some(3600))).await;
    assert!(away.session_present(), "the session outlived the restart");
    let mut got = Vec::new();
    for _ in 0..2 {
        let p = away.next_publish().await;
        assert_same_properties(&p.properties, &sent, "from the store");
        got.push(String::from_utf8(p.payload.to_vec()).expect("utf-8"));
    }
    got.sort();
    assert_eq!(got, ["1.5", "2.5"]);
    away.assert_no_publish(Duration::from_millis(500)).await;

    let mut late = Client5::connect(options(addr, "late", true, None)).await;
    late.subscribe_one("p/2", QoS::AtLeastOnce).await;
    let p = late.next_publish().await;
    assert!(p.retain, "a retained message is flagged so");
    assert_same_properties(&p.properties, &sent, "retained");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_survive_every_path_embedded() {
    properties_survive_every_path(Kind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_survive_every_path_mongo() {
    properties_survive_every_path(Kind::Mongo).await;
}

/// A session outlives its connection by its Session Expiry Interval, across a restart, and
/// not longer: then its subscriptions and pending messages are gone from the store.
async fn session_expiry_is_enforced(kind: Kind) {
    let mut stack = Stack::new(kind).await;
    let addr = stack.addr();
    for (id, expiry) in [("short", 1), ("long", 3600)] {
        let mut c = Client5::connect(options(addr, id, true, Some(expiry))).await;
        c.subscribe_one("e/#", QoS::AtLeastOnce).await;
        c.disconnect().await;
    }
    let mut publisher = Client5::connect(options(addr, "epub", true, None)).await;
    publisher
        .publish_acked(
            "e/1",
            QoS::AtLeastOnce,
            false,
            "x",
            PublishProperties::default(),
        )
        .await;
    publisher.disconnect().await;
    // The store, not the edge's memory, must end the session.
    stack.restart_edge().await;
    let addr = stack.addr();
    // Past the expiry and the worker's sweep (every 5 s).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut short = Client5::connect(options(addr, "short", false, Some(60))).await;
    assert!(
        !short.session_present(),
        "an expired session is not present"
    );
    short.assert_no_publish(Duration::from_secs(1)).await;
    let mut long = Client5::connect(options(addr, "long", false, Some(3600))).await;
    assert!(long.session_present());
    assert_eq!(&long.next_publish().await.payload[..], b"x");
    if kind == Kind::Mongo {
        use futures::TryStreamExt;
        let db = stack.db().await;
        let subs: Vec<mongodb::bson::Document> = db
            .collection("subscription")
            .find(mongodb::bson::doc! { "clientId": "short" })
            .await
            .expect("find")
            .try_collect()
            .await
            .expect("collect");
        assert!(
            subs.is_empty(),
            "an expired session's subscriptions stay: {subs:?}"
        );
    }
    short.disconnect().await;
    long.disconnect().await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_is_enforced_embedded() {
    session_expiry_is_enforced(Kind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_is_enforced_mongo() {
    session_expiry_is_enforced(Kind::Mongo).await;
}

/// An expired message is never delivered: not from the store, not as a retained message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_not_delivered() {
    let stack = Stack::new(Kind::Embedded).await;
    let addr = stack.addr();
    let mut away = Client5::connect(options(addr, "exp-away", true, Some(600))).await;
    away.subscribe_one("x/#", QoS::AtLeastOnce).await;
    away.disconnect().await;
    let mut publisher = Client5::connect(options(addr, "exp-pub", true, None)).await;
    for (topic, expiry, retain) in [
        ("x/short", 1, false),
        ("x/long", 600, false),
        ("x/r", 1, true),
    ] {
        let props = PublishProperties {
            message_expiry_interval: Some(expiry),
            ..PublishProperties::default()
        };
        publisher
            .publish_acked(topic, QoS::AtLeastOnce, retain, topic, props)
            .await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut away = Client5::connect(options(addr, "exp-away", false, Some(600))).await;
    let p = away.next_publish().await;
    assert_eq!(&p.payload[..], b"x/long");
    let left = p.properties.and_then(|p| p.message_expiry_interval);
    assert!(
        left.is_some_and(|l| l <= 598),
        "expiry counted down: {left:?}"
    );
    away.assert_no_publish(Duration::from_millis(500)).await;
    let mut late = Client5::connect(options(addr, "exp-late", true, None)).await;
    late.subscribe_one("x/r", QoS::AtLeastOnce).await;
    late.assert_no_publish(Duration::from_millis(500)).await;
    stack.stop().await;
}

/// No Local, Retain As Published, Retain Handling and Subscription Identifiers, live and for a
/// persistent session resumed after a restart (the options are stored with the subscription).
async fn subscription_options(kind: Kind) {
    let mut stack = Stack::new(kind).await;
    let addr = stack.addr();
    let mut other = Client5::connect(options(addr, "opt-other", true, None)).await;
    other
        .publish_acked(
            "o/r",
            QoS::AtLeastOnce,
            true,
            "kept",
            PublishProperties::default(),
        )
        .await;

    let mut me = Client5::connect(options(addr, "opt-me", true, Some(3600))).await;
    let mut no_local = Filter::new("o/#", QoS::AtLeastOnce);
    no_local.nolocal = true;
    no_local.preserve_retain = true;
    no_local.retain_forward_rule = RetainForwardRule::Never;
    let codes = me
        .subscribe(
            vec![no_local],
            Some(SubscribeProperties {
                id: Some(5),
                user_properties: Vec::new(),
            }),
        )
        .await;
    assert_eq!(codes.len(), 1);
    let mut second = Filter::new("o/+", QoS::AtMostOnce);
    second.retain_forward_rule = RetainForwardRule::OnNewSubscribe;
    me.subscribe(
        vec![second.clone()],
        Some(SubscribeProperties {
            id: Some(7),
            user_properties: Vec::new(),
        }),
    )
    .await;
    // Retain Handling 1 sent the retained message for the new subscription; 2 did not.
    let p = me.next_publish().await;
    assert!(p.retain && &p.payload[..] == b"kept");
    assert_eq!(
        p.properties.map(|p| p.subscription_identifiers),
        Some(vec![7])
    );
    // Subscribing again with Retain Handling 1: not new, nothing sent.
    me.subscribe(
        vec![second],
        Some(SubscribeProperties {
            id: Some(7),
            user_properties: Vec::new(),
        }),
    )
    .await;
    me.assert_no_publish(Duration::from_millis(300)).await;

    // Its own message is not sent back (No Local on one subscription, but the other takes it).
    me.publish_acked(
        "o/mine",
        QoS::AtLeastOnce,
        false,
        "mine",
        PublishProperties::default(),
    )
    .await;
    let p = me.next_publish().await;
    assert_eq!(&p.payload[..], b"mine");
    assert_eq!(
        p.properties.map(|p| p.subscription_identifiers),
        Some(vec![7]),
        "only the subscription without No Local took it"
    );
    // Another client's retained message: both subscriptions, one PUBLISH with both ids, at the
    // higher QoS, retained as published.
    other
        .publish_acked(
            "o/live",
            QoS::AtLeastOnce,
            true,
            "live",
            PublishProperties::default(),
        )
        .await;
    let p = me.next_publish().await;
    assert_eq!(
        (&p.payload[..], p.qos, p.retain),
        (&b"live"[..], QoS::AtLeastOnce, true)
    );
    assert_eq!(
        p.properties.map(|p| p.subscription_identifiers),
        Some(vec![5, 7])
    );
    me.disconnect().await;

    stack.restart_worker().await;
    stack.restart_edge().await;
    let addr = stack.addr();
    let mut other = Client5::connect(options(addr, "opt-other", true, None)).await;
    let mut me = Client5::connect(options(addr, "opt-me", false, Some(3600))).await;
    assert!(me.session_present());
    me.publish_acked(
        "o/a/b",
        QoS::AtLeastOnce,
        false,
        "own",
        PublishProperties::default(),
    )
    .await;
    other
        .publish_acked(
            "o/a/b",
            QoS::AtLeastOnce,
            false,
            "theirs",
            PublishProperties::default(),
        )
        .await;
    let p = me.next_publish().await;
    assert_eq!(&p.payload[..], b"theirs", "No Local survived the restart");
    assert_eq!(
        p.properties.map(|p| p.subscription_identifiers),
        Some(vec![5]),
        "the identifier survived the restart"
    );
    me.assert_no_publish(Duration::from_millis(300)).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_options_embedded() {
    subscription_options(Kind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_options_mongo() {
    subscription_options(Kind::Mongo).await;
}

fn limits() -> Limits {
    Limits {
        receive_maximum: 2,
        topic_alias_max: 2,
        server_keep_alive: Some(60),
        ..Limits::default()
    }
}

/// CONNACK says what the server allows (the paho suite's settings), and assigns an id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connack_advertises_the_limits_and_assigns_an_id() {
    let stack = Stack::with_limits(Kind::Embedded, limits()).await;
    // Keepalive 120 s: more than the server allows.
    let (_raw, connack) =
        Raw5::session(stack.addr(), &raw5::connect_keep_alive("", true, 120, &[])).await;
    let body = &connack.body;
    assert_eq!(body[0], 0, "no session present");
    let props = &body[3..];
    let find = |id: u8| props.iter().position(|b| *b == id);
    // Receive Maximum 2, Topic Alias Maximum 2, Server Keep Alive 60.
    for (id, value) in [(0x21u8, 2u16), (0x22, 2), (0x13, 60)] {
        let at = find(id).unwrap_or_else(|| panic!("property {id:#x} missing: {props:?}"));
        assert_eq!(u16::from_be_bytes([props[at + 1], props[at + 2]]), value);
    }
    // An Assigned Client Identifier.
    let at = find(0x12).expect("assigned client id");
    let len = u16::from_be_bytes([props[at + 1], props[at + 2]]) as usize;
    assert!(len > 0);
    // Shared subscriptions are served: Shared Subscription Available keeps its default (1).
    assert_eq!(find(0x2a), None);
    stack.stop().await;
}

/// Topic aliases from the client; an alias above the maximum closes with 0x94.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_aliases_from_the_client() {
    let stack = Stack::with_limits(Kind::Embedded, limits()).await;
    let addr = stack.addr();
    let mut sub = Client5::connect(options(addr, "alias-sub", true, None)).await;
    sub.subscribe_one("alias/#", QoS::AtMostOnce).await;
    let (mut raw, _) = Raw5::session(addr, &raw5::connect("alias-pub", true, &[])).await;
    raw.send(&raw5::publish(
        "alias/long/topic",
        0,
        0,
        &[0x23, 0, 1],
        b"one",
    ))
    .await;
    raw.send(&raw5::publish("", 0, 0, &[0x23, 0, 1], b"two"))
        .await;
    for payload in ["one", "two"] {
        let p = sub.next_publish().await;
        assert_eq!(
            (&p.topic[..], &p.payload[..]),
            (&b"alias/long/topic"[..], payload.as_bytes())
        );
    }
    raw.send(&raw5::publish("alias/x", 0, 0, &[0x23, 0, 3], b"three"))
        .await;
    let frames = raw.until_closed().await;
    let last = frames.last().expect("a DISCONNECT before the close");
    assert_eq!((last.kind(), last.reason()), (14, 0x94));
    stack.stop().await;
}

/// The client's Receive Maximum bounds what is in flight to it, its Maximum Packet Size what
/// is sent to it at all; ours closes a client that exceeds it with QoS 2 messages (0x93).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_control_in_both_directions() {
    let stack = Stack::with_limits(Kind::Embedded, limits()).await;
    let addr = stack.addr();
    // Receive Maximum 1, Maximum Packet Size 64.
    let (mut sub, _) = Raw5::session(
        addr,
        &raw5::connect("flow-sub", true, &[0x21, 0, 1, 0x27, 0, 0, 0, 64]),
    )
    .await;
    sub.send(&raw5::subscribe(1, &[], &[("flow/#", 1)])).await;
    assert_eq!(sub.recv().await.map(|f| f.kind()), Some(9));
    let mut publisher = Client5::connect(options(addr, "flow-pub", true, None)).await;
    publisher
        .publish_acked(
            "flow/a",
            QoS::AtLeastOnce,
            false,
            vec![b'x'; 200],
            PublishProperties::default(),
        )
        .await;
    for payload in ["1", "2", "3"] {
        publisher
            .publish_acked(
                "flow/a",
                QoS::AtLeastOnce,
                false,
                payload,
                PublishProperties::default(),
            )
            .await;
    }
    for payload in ["1", "2", "3"] {
        let f = sub.recv().await.expect("a PUBLISH");
        assert_eq!(
            f.topic_and_payload(true).1,
            payload.as_bytes(),
            "the large one is skipped"
        );
        // The next one only after this one is acknowledged.
        assert!(
            sub.recv_within(Duration::from_millis(300)).await.is_none(),
            "more than the Receive Maximum in flight"
        );
        sub.send(&raw5::puback(f.pkid())).await;
    }
    // Three QoS 2 PUBLISHes unreleased against our Receive Maximum of 2.
    let (mut greedy, _) = Raw5::session(addr, &raw5::connect("greedy", true, &[])).await;
    let mut burst = Vec::new();
    for pkid in 1..=3u16 {
        burst.extend(raw5::publish("flow/g", 2, pkid, &[], b"g"));
    }
    greedy.send(&burst).await;
    let frames = greedy.until_closed().await;
    let last = frames.last().expect("a DISCONNECT before the close");
    assert_eq!((last.kind(), last.reason()), (14, 0x93), "{frames:?}");
    stack.stop().await;
}

/// Reason codes where 5.0 packets carry them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reason_codes() {
    let stack = Stack::new(Kind::Embedded).await;
    let addr = stack.addr();
    // An authentication method Wharf does not have: CONNACK 0x8C.
    let mut raw = Raw5::connect(addr).await;
    let mut method = vec![0x15];
    method.extend(raw5::string("SCRAM-SHA-1"));
    raw.send(&raw5::connect("auth", true, &method)).await;
    let connack = raw.recv().await.expect("CONNACK");
    assert_eq!((connack.kind(), connack.reason()), (2, 0x8c));
    assert_eq!(connack.body[3], 0x1f, "a Reason String says why");

    // A refusal whose Reason String would exceed the client's Maximum Packet Size (8 bytes)
    // comes without it (MQTT 5.0 3.1.2.11.4).
    let mut raw = Raw5::connect(addr).await;
    raw.send(&raw5::connect("$share/x", true, &[0x27, 0, 0, 0, 8]))
        .await;
    let connack = raw.recv().await.expect("CONNACK");
    assert_eq!((connack.kind(), connack.reason()), (2, 0x85));
    assert_eq!(&connack.body[..], &[0u8, 0x85, 0], "no properties");

    let (mut a, _) = Raw5::session(addr, &raw5::connect("codes", true, &[])).await;
    // An invalid filter, and invalid shared ones (a share name with a wildcard; a share name
    // and no filter after it): 0x8F.
    a.send(&raw5::subscribe(
        1,
        &[],
        &[
            ("c/#", 1),
            ("c/#/x", 1),
            ("$share/g+/c", 1),
            ("$share/group", 1),
            ("$share/", 1),
        ],
    ))
    .await;
    let suback = a.recv().await.expect("SUBACK");
    assert_eq!(
        (suback.kind(), &suback.body[2..]),
        (9, &[0u8, 1, 0x8f, 0x8f, 0x8f, 0x8f][..])
    );
    // UNSUBSCRIBE of a filter never subscribed: 0x11.
    a.send(&raw5::unsubscribe(2, &["c/#", "nothing"])).await;
    let unsuback = a.recv().await.expect("UNSUBACK");
    assert_eq!(
        (unsuback.kind(), &unsuback.body[2..]),
        (11, &[0u8, 0, 0x11][..])
    );
    // A payload that says it is UTF-8 and is not: PUBACK 0x99, not stored.
    a.send(&raw5::publish("c/bad", 1, 9, &[0x01, 1], &[0xff, 0xfe]))
        .await;
    let puback = a.recv().await.expect("PUBACK");
    assert_eq!((puback.kind(), &puback.body[..]), (4, &[0u8, 9, 0x99][..]));

    // The same client id again: the first connection is told 0x8E.
    let (_b, connack) = Raw5::session(addr, &raw5::connect("codes", true, &[])).await;
    assert_eq!(connack.reason(), 0);
    let frames = a.until_closed().await;
    let last = frames.last().expect("DISCONNECT");
    assert_eq!((last.kind(), last.reason()), (14, 0x8e));
    stack.stop().await;
}

/// A will with a Will Delay Interval is not sent when the session resumes in time, and is
/// sent when it does not; DISCONNECT 0x04 sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_delay_and_disconnect_with_will() {
    let stack = Stack::new(Kind::Embedded).await;
    let addr = stack.addr();
    let mut watcher = Client5::connect(options(addr, "will-watch", true, None)).await;
    watcher.subscribe_one("will/#", QoS::AtLeastOnce).await;
    let will_connect = raw5::connect_with_will;
    // Dropped, and back within the delay: no will.
    let (resumed, _) = Raw5::session(addr, &will_connect("comes-back", 2)).await;
    drop(resumed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_back, _) = Raw5::session(
        addr,
        &raw5::connect("comes-back", false, &[0x11, 0, 0, 0, 60]),
    )
    .await;
    // Dropped for good: the will after its delay, with its properties.
    let (gone, _) = Raw5::session(addr, &will_connect("stays-away", 1)).await;
    drop(gone);
    let p = watcher.next_publish().await;
    assert_eq!(&p.topic[..], b"will/stays-away");
    assert_eq!(
        p.properties.and_then(|p| p.content_type).as_deref(),
        Some("text/plain")
    );
    watcher.assert_no_publish(Duration::from_secs(3)).await;
    // Taken over: a session that outlives the connection resumed, so its delayed will is not
    // sent; one that ends with it (expiry 0) has its will sent at once, delay or not.
    let (_kept, _) = Raw5::session(addr, &will_connect("kept", 2)).await;
    let (_kept_again, _) =
        Raw5::session(addr, &raw5::connect("kept", false, &[0x11, 0, 0, 0, 60])).await;
    let (_ending, _) =
        Raw5::session(addr, &raw5::connect_with_will_expiring("ending", 30, 0)).await;
    let (_ending_again, _) = Raw5::session(addr, &raw5::connect("ending", true, &[])).await;
    let p = watcher.next_publish().await;
    assert_eq!(&p.topic[..], b"will/ending");
    watcher.assert_no_publish(Duration::from_secs(3)).await;
    // DISCONNECT with reason 0x04 sends the will.
    let (mut polite, _) = Raw5::session(addr, &will_connect("with-will", 0)).await;
    polite.send(&[0xe0, 1, 0x04]).await;
    let p = watcher.next_publish().await;
    assert_eq!(&p.topic[..], b"will/with-will");
    stack.stop().await;
}

/// MQTT 3.1 ("MQIsdp", level 3) clients connect, subscribe and publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_clients_are_served() {
    let stack = Stack::new(Kind::Embedded).await;
    let addr = stack.addr();
    let mut sub = Raw5::connect(addr).await;
    sub.send(&raw5::connect_v31("old-sub", true)).await;
    let connack = sub.recv().await.expect("CONNACK");
    assert_eq!((connack.byte1, &connack.body[..]), (0x20, &[0u8, 0][..]));
    // 3.1.1's SUBSCRIBE layout is 3.1's: no properties.
    let mut body = 1u16.to_be_bytes().to_vec();
    body.extend(raw5::string("old/#"));
    body.push(1);
    sub.send(&raw5::packet(0x82, &body)).await;
    let suback = sub.recv().await.expect("SUBACK");
    assert_eq!((suback.kind(), &suback.body[..]), (9, &[0u8, 1, 1][..]));
    let mut publisher = Raw5::connect(addr).await;
    publisher.send(&raw5::connect_v31("old-pub", true)).await;
    publisher.recv().await.expect("CONNACK");
    let mut body = raw5::string("old/t");
    body.extend_from_slice(&[0, 5]);
    body.extend_from_slice(b"v31");
    publisher.send(&raw5::packet(0x32, &body)).await;
    let puback = publisher.recv().await.expect("PUBACK");
    assert_eq!((puback.byte1, &puback.body[..]), (0x40, &[0u8, 5][..]));
    let p = sub.recv().await.expect("PUBLISH");
    assert_eq!(
        p.topic_and_payload(false),
        ("old/t".to_owned(), b"v31".to_vec())
    );
    // 3.1 has no empty client ids.
    let mut nameless = Raw5::connect(addr).await;
    nameless.send(&raw5::connect_v31("", true)).await;
    let connack = nameless.recv().await.expect("CONNACK");
    assert_eq!(&connack.body[..], &[0u8, 2]);
    stack.stop().await;
}

/// A 3.1 client resends an unfinished QoS 2 PUBLISH after a reconnect to its persistent
/// session, DUP set, and then its PUBREL, which 3.1 sends as QoS 1 and marks DUP when it is a
/// resend (0x6A): each gets its answer, and the message is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_3_1_qos2_flow_resent_after_a_reconnect_completes() {
    let stack = Stack::new(Kind::Embedded).await;
    let addr = stack.addr();
    let (mut sub, _) = Raw5::session(addr, &raw5::connect("q2-sub", true, &[])).await;
    sub.send(&raw5::subscribe(1, &[], &[("old/q2", 2)])).await;
    assert_eq!(sub.recv().await.map(|f| f.kind()), Some(9));
    let mut body = raw5::string("old/q2");
    body.extend_from_slice(&[0, 7]);
    body.extend_from_slice(b"once");
    let mut first = Raw5::connect(addr).await;
    first.send(&raw5::connect_v31("old-q2", false)).await;
    first.recv().await.expect("CONNACK");
    first.send(&raw5::packet(0x34, &body)).await;
    let pubrec = first.recv().await.expect("PUBREC");
    assert_eq!((pubrec.byte1, &pubrec.body[..]), (0x50, &[0u8, 7][..]));
    drop(first);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    let mut again = Raw5::connect(addr).await;
    again.send(&raw5::connect_v31("old-q2", false)).await;
    let connack = again.recv().await.expect("CONNACK");
    assert_eq!(connack.body[1], 0, "accepted");
    again.send(&raw5::packet(0x3c, &body)).await; // DUP, QoS 2
    let pubrec = again.recv().await.expect("PUBREC again");
    assert_eq!((pubrec.byte1, &pubrec.body[..]), (0x50, &[0u8, 7][..]));
    again.send(&raw5::packet(0x6a, &[0, 7])).await; // PUBREL, QoS 1, DUP
    let pubcomp = again.recv().await.expect("PUBCOMP");
    assert_eq!((pubcomp.byte1, &pubcomp.body[..]), (0x70, &[0u8, 7][..]));
    let delivered = sub.recv().await.expect("PUBLISH");
    assert_eq!(delivered.topic_and_payload(true).1, b"once".to_vec());
    stack.stop().await;
}

/// Topic aliases to the client: the first topics it is sent get one (up to what it allows),
/// and go by the alias alone afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_aliases_to_the_client() {
    let stack = Stack::new(Kind::Embedded).await;
    let addr = stack.addr();
    // Topic Alias Maximum 2.
    let (mut sub, _) = Raw5::session(addr, &raw5::connect("oa-sub", true, &[0x22, 0, 2])).await;
    sub.send(&raw5::subscribe(1, &[], &[("oa/#", 0)])).await;
    assert_eq!(sub.recv().await.map(|f| f.kind()), Some(9));
    let mut publisher = Client5::connect(options(addr, "oa-pub", true, None)).await;
    for topic in ["oa/1", "oa/2", "oa/3", "oa/1", "oa/2"] {
        publisher
            .publish_acked(
                topic,
                QoS::AtLeastOnce,
                false,
                topic,
                PublishProperties::default(),
            )
            .await;
    }
    // (topic written, alias, payload): the payload names the real topic.
    let mut got = Vec::new();
    for _ in 0..5 {
        let f = sub.recv().await.expect("a PUBLISH");
        let (topic, payload) = f.topic_and_payload(true);
        let len = u16::from_be_bytes([f.body[0], f.body[1]]) as usize;
        let props = &f.body[2 + len + 1..2 + len + 1 + f.body[2 + len] as usize];
        let alias = match props {
            [0x23, hi, lo] => Some(u16::from_be_bytes([*hi, *lo])),
            [] => None,
            other => panic!("unexpected properties {other:?}"),
        };
        got.push((topic, alias, String::from_utf8(payload).expect("utf-8")));
    }
    let expected = [
        ("oa/1", Some(1), "oa/1"),
        ("oa/2", Some(2), "oa/2"),
        ("oa/3", None, "oa/3"),
        ("", Some(1), "oa/1"),
        ("", Some(2), "oa/2"),
    ];
    let got: Vec<(&str, Option<u16>, &str)> = got
        .iter()
        .map(|(t, a, p)| (t.as_str(), *a, p.as_str()))
        .collect();
    assert_eq!(got, expected);
    stack.stop().await;
}

/// Everything the clients receive until `n` distinct payloads came (or 20 s), by client;
/// fails on a payload that two of them (or one twice) got.
async fn gather(
    members: &mut [Client5],
    v311: &mut wharf_tests::client::Client,
    n: usize,
) -> Vec<Vec<String>> {
    let mut by_member = vec![Vec::new(); members.len() + 1];
    let mut seen = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while seen.len() < n && tokio::time::Instant::now() < deadline {
        let mut got = Vec::new();
        for (i, m) in members.iter_mut().enumerate() {
            while let Some(p) = m.publish_within(Duration::from_millis(20)).await {
                got.push((i, p.payload.to_vec()));
            }
        }
        while let Some(p) = v311.publish_within(Duration::from_millis(20)).await {
            got.push((members.len(), p.payload.to_vec()));
        }
        for (i, payload) in got {
            let payload = String::from_utf8(payload).expect("utf-8");
            assert!(
                seen.insert(payload.clone()),
                "{payload} delivered twice in the group"
            );
            by_member[i].push(payload);
        }
    }
    assert_eq!(seen.len(), n, "messages given to the group: {by_member:?}");
    by_member
}

/// `$share/{group}/{filter}`: each message goes to exactly one member (a 3.1.1 member too),
/// while an ordinary subscription to the same filter gets every message.
async fn shared_subscription_gives_each_message_to_one_member(kind: Kind) {
    let stack = Stack::new(kind).await;
    let addr = stack.addr();
    let mut members = Vec::new();
    for i in 0..3 {
        let mut m = Client5::connect(options(addr, &format!("member-{i}"), true, None)).await;
        let codes = m
            .subscribe(vec![Filter::new("$share/g/s/#", QoS::AtLeastOnce)], None)
            .await;
        assert_eq!(format!("{codes:?}"), "[Success(AtLeastOnce)]");
        members.push(m);
    }
    let mut v311 = wharf_tests::client::Client::connect(addr, "member-311", true).await;
    v311.subscribe("$share/g/s/#", rumqttc::QoS::AtLeastOnce)
        .await;
    let mut everything = Client5::connect(options(addr, "everything", true, None)).await;
    everything.subscribe_one("s/#", QoS::AtLeastOnce).await;
    let mut publisher = Client5::connect(options(addr, "share-pub", true, None)).await;
    let n = 300;
    for i in 0..n {
        publisher
            .publish_acked(
                &format!("s/{}", i % 7),
                QoS::AtLeastOnce,
                false,
                format!("m{i}"),
                PublishProperties::default(),
            )
            .await;
    }
    let by_member = gather(&mut members, &mut v311, n).await;
    for (i, got) in by_member.iter().enumerate() {
        assert!(got.len() >= n / 8, "member {i} got {} of {n}", got.len());
    }
    let mut all = std::collections::HashSet::new();
    while all.len() < n {
        let p = everything.next_publish().await;
        all.insert(p.payload.to_vec());
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_gives_each_message_to_one_member_embedded() {
    shared_subscription_gives_each_message_to_one_member(Kind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_gives_each_message_to_one_member_mongo() {
    shared_subscription_gives_each_message_to_one_member(Kind::Mongo).await;
}

/// A member that leaves without acknowledging passes what it held to another member; a group
/// whose members are all away (persistent sessions) keeps its messages in the store, across a
/// restart of edge and worker, for the first member back.
async fn a_shared_group_loses_nothing(kind: Kind) {
    let mut stack = Stack::new(kind).await;
    let addr = stack.addr();
    // A member that never acknowledges (Receive Maximum 50), and one that does.
    let (mut silent, _) = Raw5::session(addr, &raw5::connect("silent", true, &[0x21, 0, 50])).await;
    silent
        .send(&raw5::subscribe(1, &[], &[("$share/q/w/#", 1)]))
        .await;
    assert_eq!(silent.recv().await.map(|f| f.kind()), Some(9));
    let mut worker = Client5::connect(options(addr, "worker", true, Some(600))).await;
    worker.subscribe_one("$share/q/w/#", QoS::AtLeastOnce).await;
    let mut publisher = Client5::connect(options(addr, "q-pub", true, None)).await;
    let n = 40;
    for i in 0..n {
        publisher
            .publish_acked(
                "w/job",
                QoS::AtLeastOnce,
                false,
                format!("job{i}"),
                PublishProperties::default(),
            )
            .await;
    }
    // The silent member got its share, unacknowledged; then it goes.
    let mut held = 0;
    while let Some(f) = silent.recv_within(Duration::from_millis(500)).await {
        if f.kind() == 3 {
            held += 1;
        }
    }
    assert!(held > 0, "the silent member got nothing");
    drop(silent);
    let mut got = std::collections::HashSet::new();
    while got.len() < n {
        let p = worker.next_publish().await;
        got.insert(p.payload.to_vec());
    }
    worker.disconnect().await;

    // Every member away: the group keeps what is published, across a restart.
    for i in 0..10 {
        publisher
            .publish_acked(
                "w/later",
                QoS::AtLeastOnce,
                false,
                format!("later{i}"),
                PublishProperties::default(),
            )
            .await;
    }
    publisher.disconnect().await;
    stack.restart_worker().await;
    stack.restart_edge().await;
    let mut worker = Client5::connect(options(stack.addr(), "worker", false, Some(600))).await;
    assert!(worker.session_present());
    let mut later = std::collections::HashSet::new();
    while later.len() < 10 {
        let p = worker.next_publish().await;
        assert!(p.payload.starts_with(b"later"), "{:?}", p.payload);
        later.insert(p.payload.to_vec());
    }
    worker.assert_no_publish(Duration::from_millis(500)).await;
    worker.disconnect().await;
    if kind == Kind::Mongo {
        // The last member starts clean: the group's own session goes with it.
        use futures::TryStreamExt;
        let group_subscriptions = |db: mongodb::Database| async move {
            let docs: Vec<mongodb::bson::Document> = db
                .collection("subscription")
                .find(mongodb::bson::doc! { "clientId": "$share/q/w/#" })
                .await
                .expect("find")
                .try_collect()
                .await
                .expect("collect");
            docs.len()
        };
        assert_eq!(group_subscriptions(stack.db().await).await, 1);
        let again = Client5::connect(options(stack.addr(), "worker", true, None)).await;
        again.disconnect().await;
        assert_eq!(group_subscriptions(stack.db().await).await, 0);
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_group_loses_nothing_embedded() {
    a_shared_group_loses_nothing(Kind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_group_loses_nothing_mongo() {
    a_shared_group_loses_nothing(Kind::Mongo).await;
}
