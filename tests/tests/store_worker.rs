//! The real store-worker, on both backends (embedded SQLite and a MongoDB-wire server), end to
//! end with the real edge and real MQTT clients; plus MongoDB document shapes and indexes read
//! back with the driver.

use mongodb::bson::{Bson, Document};
use rumqttc::QoS;
use std::time::Duration;
use tempfile::TempDir;
use wharf_edge::admin::AdminSettings;
use wharf_ops::http::HttpRequest;
use wharf_store_worker::{Backend, Worker, WorkerConfig};
use wharf_tests::client::{payloads, Client};
use wharf_tests::stack::{Kind, Stack};
use wharf_tests::{edge_config, init_tracing, start_edge};

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$name(super::Kind::Embedded).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mongodb() {
                super::$name(super::Kind::Mongo).await
            }
        }
    )*};
}

/// MQTT-3.2.2-2: Session Present is 1 whenever the server holds a session for the client id,
/// also one without subscriptions (a persistent publisher), across a restart of edge and
/// worker; a clean session in between ends it (MQTT-3.2.2-1).
async fn session_present_without_subscriptions(kind: Kind) {
    let mut s = Stack::new(kind).await;
    let first = Client::connect(s.addr(), "publisher-9", false).await;
    assert!(!first.session_present, "a new session");
    first.disconnect().await;
    let again = Client::connect(s.addr(), "publisher-9", false).await;
    assert!(again.session_present, "the session it left");
    again.disconnect().await;
    s.stop_edge().await;
    s.restart_worker().await;
    s.start_edge().await;
    let after_restart = Client::connect(s.addr(), "publisher-9", false).await;
    assert!(after_restart.session_present, "kept across a restart");
    after_restart.disconnect().await;
    let clean = Client::connect(s.addr(), "publisher-9", true).await;
    assert!(!clean.session_present, "a clean session never has one");
    clean.disconnect().await;
    let fresh = Client::connect(s.addr(), "publisher-9", false).await;
    assert!(
        !fresh.session_present,
        "the clean session ended the old one"
    );
    fresh.disconnect().await;
}

on_both_backends!(
    session_present_without_subscriptions,
    offline_subscriber_gets_every_message_once,
    restarts_lose_nothing_acknowledged,
    long_absence_is_paged_in_order,
    first_subscription_gets_retained_not_history,
    the_admin_api_lists_and_clears_retained_messages,
);

async fn offline_subscriber_gets_every_message_once(kind: Kind) {
    let s = Stack::new(kind).await;
    let mut sub = Client::connect(s.addr(), "device-7", false).await;
    sub.subscribe("fleet/+/t", QoS::ExactlyOnce).await;
    sub.disconnect().await;

    let mut publisher = Client::connect(s.addr(), "sensor", true).await;
    publisher
        .publish_many_acked(
            "fleet/a/t",
            QoS::AtLeastOnce,
            (0..40).map(|i| format!("q1-{i}")),
        )
        .await;
    publisher
        .publish_many_acked(
            "fleet/b/t",
            QoS::ExactlyOnce,
            (0..5).map(|i| format!("q2-{i}")),
        )
        .await;
    publisher
        .publish_acked("other/x", QoS::AtLeastOnce, "not subscribed")
        .await;

    let mut sub = Client::connect(s.addr(), "device-7", false).await;
    assert!(sub.session_present);
    let got = sub.publishes(45).await;
    let expected: Vec<String> = (0..40)
        .map(|i| format!("q1-{i}"))
        .chain((0..5).map(|i| format!("q2-{i}")))
        .collect();
    assert_eq!(payloads(&got), expected);
    sub.assert_no_publish(Duration::from_millis(300)).await;
    sub.disconnect().await;

    let mut again = Client::connect(s.addr(), "device-7", false).await;
    again.assert_no_publish(Duration::from_millis(500)).await;
}

async fn restarts_lose_nothing_acknowledged(kind: Kind) {
    let mut s = Stack::new(kind).await;
    let mut sub = Client::connect(s.addr(), "device-9", false).await;
    sub.subscribe("r/#", QoS::AtLeastOnce).await;
    sub.disconnect().await;
    let mut publisher = Client::connect(s.addr(), "sensor", true).await;
    publisher
        .publish_many_acked("r/1", QoS::AtLeastOnce, (0..30).map(|i| format!("m{i}")))
        .await;
    publisher
        .publish_acked_retain("r/config", QoS::AtLeastOnce, true, "v1")
        .await;
    publisher.disconnect().await;

    // Restart both processes on the same store.
    s.stop_edge().await;
    s.stop_worker().await;
    s.start_worker().await;
    s.start_edge().await;

    let mut sub = Client::connect(s.addr(), "device-9", false).await;
    assert!(sub.session_present, "subscriptions survive a restart");
    let got = sub.publishes(31).await;
    let mut expected: Vec<String> = (0..30).map(|i| format!("m{i}")).collect();
    expected.push("v1".into());
    assert_eq!(payloads(&got), expected);
    let mut late = Client::connect(s.addr(), "late", true).await;
    late.subscribe("r/config", QoS::AtLeastOnce).await;
    let retained = late.publishes(1).await;
    assert!(retained[0].retain);
    assert_eq!(payloads(&retained), vec!["v1"]);
}

async fn long_absence_is_paged_in_order(kind: Kind) {
    let s = Stack::new(kind).await;
    let mut sub = Client::connect(s.addr(), "sleeper", false).await;
    sub.subscribe("p/#", QoS::AtLeastOnce).await;
    sub.disconnect().await;
    let mut publisher = Client::connect(s.addr(), "sensor", true).await;
    let n = 1_234;
    publisher
        .publish_many_acked("p/1", QoS::AtLeastOnce, (0..n).map(|i| format!("{i:05}")))
        .await;
    let mut sub = Client::connect(s.addr(), "sleeper", false).await;
    let got = sub.publishes(n).await;
    let expected: Vec<String> = (0..n).map(|i| format!("{i:05}")).collect();
    assert_eq!(
        payloads(&got),
        expected,
        "every message once, in publish order"
    );
    sub.assert_no_publish(Duration::from_millis(300)).await;
}

async fn first_subscription_gets_retained_not_history(kind: Kind) {
    let s = Stack::new(kind).await;
    let mut publisher = Client::connect(s.addr(), "sensor", true).await;
    publisher
        .publish_acked("h/t", QoS::AtLeastOnce, "history")
        .await;
    publisher
        .publish_acked_retain("h/t", QoS::AtLeastOnce, true, "retained")
        .await;
    // Times are in milliseconds: make "before the subscription" unambiguous.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut sub = Client::connect(s.addr(), "new", false).await;
    sub.subscribe("h/#", QoS::AtLeastOnce).await;
    assert_eq!(payloads(&sub.publishes(1).await), vec!["retained"]);
    sub.assert_no_publish(Duration::from_millis(300)).await;
}

/// The admin API's retained messages come from the store (either backend) and are cleared
/// there: a new subscriber then gets none, and nothing was published by the clearing.
/// The stack's edge's admin API, its password `console-secret-1`.
fn admin_api(stack: &Stack) -> wharf_ops::http::Api {
    let settings = AdminSettings {
        user: "admin".into(),
        password: "console-secret-1".into(),
        history_step: Duration::from_secs(10),
        session_idle: Duration::from_secs(1800),
    };
    stack.edge.as_ref().expect("edge").admin_api(settings, None)
}

async fn the_admin_api_lists_and_clears_retained_messages(kind: Kind) {
    let s = Stack::new(kind).await;
    let api = admin_api(&s);
    let call = |method: &str, path: &str, query: &[(&str, &str)]| {
        api(HttpRequest {
            method: method.into(),
            path: path.into(),
            query: query
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            authorization: Some("Bearer console-secret-1".into()),
            content_type: Some("application/json".into()),
            ..HttpRequest::default()
        })
    };
    let mut watcher = Client::connect(s.addr(), "watcher", true).await;
    watcher.subscribe("r/#", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect(s.addr(), "sensor", true).await;
    for (topic, payload) in [("r/a", "1"), ("r/b", "2"), ("other", "3")] {
        publisher
            .publish_acked_retain(topic, QoS::AtLeastOnce, true, payload)
            .await;
    }
    assert_eq!(watcher.publishes(2).await.len(), 2);
    let listed = call("GET", "/api/v1/retained", &[("filter", "r/+")]).await;
    assert_eq!(listed.status, 200);
    let listed: serde_json::Value = serde_json::from_slice(&listed.body).expect("json");
    let mut topics: Vec<&str> = listed["retained"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|m| m["topic"].as_str())
        .collect();
    topics.sort();
    assert_eq!(topics, ["r/a", "r/b"]);
    let cleared = call("DELETE", "/api/v1/retained", &[("topic", "r/a")]).await;
    assert_eq!(cleared.status, 200);
    watcher.assert_no_publish(Duration::from_millis(300)).await;
    let mut late = Client::connect(s.addr(), "late", true).await;
    late.subscribe("r/#", QoS::AtLeastOnce).await;
    assert_eq!(payloads(&late.publishes(1).await), vec!["2"]);
    late.assert_no_publish(Duration::from_millis(300)).await;
}

fn field<'a>(d: &'a Document, name: &str) -> &'a Bson {
    d.get(name)
        .unwrap_or_else(|| panic!("field {name} missing in {d}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_documents_have_the_seed_shapes() {
    let s = Stack::new(Kind::Mongo).await;
    let mut sub = Client::connect(s.addr(), "listener:db:local", false).await;
    sub.subscribe("local", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect(s.addr(), "MQTT_FX_Client", true).await;
    publisher
        .publish_acked_retain("local", QoS::AtLeastOnce, true, "66.6666,-88.8888")
        .await;
    publisher
        .publish_acked("local", QoS::AtLeastOnce, vec![0xff, 0x00, 0x01])
        .await;
    assert_eq!(sub.publishes(2).await.len(), 2);
    sub.disconnect().await;
    let db = s.db().await;

    let messages: Vec<Document> = {
        use futures::TryStreamExt;
        let cursor = db
            .collection::<Document>("message")
            .find(Document::new())
            .await
            .expect("find");
        cursor.try_collect().await.expect("collect")
    };
    assert_eq!(messages.len(), 2);
    let text = messages
        .iter()
        .find(|d| matches!(d.get("data"), Some(Bson::String(_))))
        .expect("a text message");
    let mut keys: Vec<&str> = text.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        vec!["_id", "clientId", "created", "data", "host", "hosts", "qos", "retain", "topic"]
    );
    // Wharf's own optional field: the other hosts the message was sent to (none here, or
    // every host in the worker's first moments, before it has read the routes).
    assert!(
        [
            Bson::Array(vec![]),
            Bson::Array(vec![Bson::String("*".into())])
        ]
        .contains(field(text, "hosts")),
        "{:?}",
        field(text, "hosts")
    );
    assert!(matches!(field(text, "_id"), Bson::ObjectId(_)));
    assert_eq!(field(text, "topic"), &Bson::String("local".into()));
    assert_eq!(
        field(text, "data"),
        &Bson::String("66.6666,-88.8888".into())
    );
    assert_eq!(
        field(text, "clientId"),
        &Bson::String("MQTT_FX_Client".into())
    );
    assert_eq!(field(text, "qos"), &Bson::Int32(1));
    assert_eq!(field(text, "retain"), &Bson::Boolean(true));
    assert!(matches!(field(text, "created"), Bson::DateTime(_)));
    assert_eq!(field(text, "host"), &Bson::String("host-a".into()));
    let binary = messages
        .iter()
        .find(|d| matches!(d.get("data"), Some(Bson::Binary(_))))
        .expect("a binary payload is stored as BSON binary");
    assert!(matches!(field(binary, "data"), Bson::Binary(b) if b.bytes == vec![0xff, 0x00, 0x01]));

    let subscription = db
        .collection::<Document>("subscription")
        .find_one(Document::new())
        .await
        .expect("find")
        .expect("a subscription");
    let mut keys: Vec<&str> = subscription.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, vec!["_id", "clientId", "created", "qos", "topic"]);
    assert!(matches!(field(&subscription, "_id"), Bson::ObjectId(_)));
    assert_eq!(
        field(&subscription, "clientId"),
        &Bson::String("listener:db:local".into())
    );
    assert_eq!(field(&subscription, "topic"), &Bson::String("local".into()));
    assert_eq!(field(&subscription, "qos"), &Bson::Int32(1));
    assert!(matches!(field(&subscription, "created"), Bson::DateTime(_)));

    // Delivery records are written in batches after the PUBACKs: wait for them.
    let published = db.collection::<Document>("publishedMessage");
    let mut records = 0;
    for _ in 0..100 {
        records = published
            .count_documents(Document::new())
            .await
            .expect("count");
        if records >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(records, 2);
    let record = published
        .find_one(mongodb::bson::doc! { "messageId": field(text, "_id").clone() })
        .await
        .expect("find")
        .expect("a record for the text message");
    let mut keys: Vec<&str> = record.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        vec!["_id", "clientId", "created", "host", "messageId", "topic"]
    );
    assert!(matches!(field(&record, "_id"), Bson::ObjectId(_)));
    assert_eq!(
        field(&record, "clientId"),
        &Bson::String("listener:db:local".into())
    );
    assert_eq!(field(&record, "topic"), &Bson::String("local".into()));
    assert_eq!(field(&record, "host"), &Bson::String("host-a".into()));
    assert!(matches!(field(&record, "created"), Bson::DateTime(_)));
}

async fn ttl_of(db: &mongodb::Database, collection: &str) -> Option<u64> {
    use futures::TryStreamExt;
    let indexes: Vec<mongodb::IndexModel> = db
        .collection::<Document>(collection)
        .list_indexes()
        .await
        .expect("list")
        .try_collect()
        .await
        .expect("collect");
    indexes
        .iter()
        .filter(|i| i.keys == mongodb::bson::doc! { "created": 1 })
        .find_map(|i| i.options.as_ref()?.expire_after.map(|d| d.as_secs()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_ttl_indexes_are_made_and_corrected() {
    let mut s = Stack::new(Kind::Mongo).await;
    let db = s.db().await;
    assert_eq!(ttl_of(&db, "message").await, Some(2_592_000));
    assert_eq!(ttl_of(&db, "publishedMessage").await, Some(604_800));

    // An operator changed a TTL by hand: the next start puts it back with collMod.
    db.run_command(mongodb::bson::doc! {
        "collMod": "message",
        "index": { "name": "created_ttl", "expireAfterSeconds": 60 },
    })
    .await
    .expect("collMod");
    assert_eq!(ttl_of(&db, "message").await, Some(60));
    s.stop_edge().await;
    s.stop_worker().await;
    s.start_worker().await;
    assert_eq!(ttl_of(&db, "message").await, Some(2_592_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_outage_delays_acknowledgement_and_loses_nothing() {
    let mut s = Stack::new(Kind::Mongo).await;
    let mut sub = Client::connect(s.addr(), "watcher", false).await;
    sub.subscribe("o/#", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect(s.addr(), "sensor", true).await;
    publisher
        .publish_acked("o/1", QoS::AtLeastOnce, "before")
        .await;

    s.mongo.as_mut().expect("mongo").kill();
    publisher
        .publish("o/1", QoS::AtLeastOnce, false, "during")
        .await;
    let early = publisher
        .next_matching_within(Duration::from_millis(700), |p| {
            matches!(p, rumqttc::Packet::PubAck(_)).then_some(())
        })
        .await;
    assert!(early.is_none(), "acknowledged while the database was down");
    s.mongo.as_mut().expect("mongo").restart().await;
    let ack = publisher
        .next_matching(|p| matches!(p, rumqttc::Packet::PubAck(_)).then_some(()))
        .await;
    assert!(ack.is_some(), "acknowledged once the database is back");
    assert_eq!(payloads(&sub.publishes(2).await), vec!["before", "during"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_socket_is_private_and_a_stale_one_is_replaced() {
    use std::os::unix::fs::PermissionsExt;
    init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let socket = dir.path().join("w.sock");
    // A stale socket file from a crashed worker.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
    assert!(socket.exists());
    let config = WorkerConfig::new(
        socket.clone(),
        "h".into(),
        Backend::Embedded {
            data_dir: dir.path().join("data"),
        },
    );
    let worker = Worker::start(config.clone())
        .await
        .expect("starts over a stale socket");
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    // A second worker on a live socket is refused.
    let second = Worker::start(config).await;
    assert!(matches!(
        second,
        Err(wharf_store_worker::StartError::Bind(_))
    ));
    worker.stop().await;
}

type RawLink = tokio_util::codec::Framed<
    tokio::net::UnixStream,
    wharf_shared::FrameCodec<wharf_shared::WorkerFrame, wharf_shared::EdgeFrame>,
>;

/// Speaks the worker protocol directly, as an edge of host-a would.
async fn raw_link(stack: &Stack) -> RawLink {
    use futures::{SinkExt, StreamExt};
    use wharf_shared::{EdgeFrame, FrameCodec, Hello, WorkerFrame, PROTOCOL_VERSION};
    let stream = tokio::net::UnixStream::connect(&stack.socket)
        .await
        .expect("worker socket");
    let mut link = tokio_util::codec::Framed::new(stream, FrameCodec::new());
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        host: "host-a".into(),
        instance: "test-edge".into(),
    };
    link.send(EdgeFrame::Hello(hello)).await.expect("hello");
    assert!(matches!(link.next().await, Some(Ok(WorkerFrame::Hello(_)))));
    link
}

/// The next reply to request `id`; replies to others (persists) must be `Persisted`.
async fn reply_to(link: &mut RawLink, id: u64) -> wharf_shared::Reply {
    use wharf_shared::Reply;
    loop {
        match next_reply(link).await {
            (i, reply) if i == id => return reply,
            (_, reply) => assert_eq!(reply, Reply::Persisted),
        }
    }
}

/// The next reply from the worker: (request id, reply). Claims and leases, which a worker on
/// a store shared by hosts pushes unasked, are skipped.
async fn next_reply(link: &mut RawLink) -> (u64, wharf_shared::Reply) {
    use futures::StreamExt;
    use wharf_shared::WorkerFrame;
    loop {
        let frame = tokio::time::timeout(wharf_tests::PATIENCE, link.next())
            .await
            .expect("worker answers")
            .expect("frame")
            .expect("decodes");
        match frame {
            WorkerFrame::Reply { id, reply } => return (id, reply),
            WorkerFrame::Claims { .. } | WorkerFrame::Lease { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Queues `n` QoS 1 persists on `topic` without waiting, one per millisecond from `start_ms`
/// (request ids from 1,000); the last one retained if `retain_last`. Enough of them that the
/// persister is still writing when the next request arrives.
async fn persist_many(link: &mut RawLink, topic: &str, n: u32, start_ms: i64, retain_last: bool) {
    use futures::SinkExt;
    use wharf_shared::{EdgeFrame, Message, MessageId, Qos, Request};
    for i in 0..n {
        let created_ms = start_ms + i as i64;
        let mut id = [0u8; 12];
        id[..4].copy_from_slice(&((created_ms / 1000) as u32).to_be_bytes());
        id[4..8].copy_from_slice(&0x7e57_0000u32.to_be_bytes());
        id[8..].copy_from_slice(&i.to_be_bytes());
        let message = Message {
            id: MessageId(id),
            topic: topic.into(),
            payload: i.to_be_bytes().to_vec(),
            qos: Qos::AtLeastOnce,
            retain: retain_last && i + 1 == n,
            client_id: "pub".into(),
            host: "host-a".into(),
            created_ms,
            properties: None,
        };
        link.feed(EdgeFrame::Request {
            id: 1_000 + i as u64,
            request: Request::Persist(vec![message]),
        })
        .await
        .expect("persist");
    }
}

fn persists_for(kind: Kind) -> u32 {
    match kind {
        Kind::Embedded => 3_000,
        Kind::Mongo => 600,
    }
}

/// Sends `request` as request `id` and returns the payloads of its `Messages` reply.
async fn payloads_of(link: &mut RawLink, id: u64, request: wharf_shared::Request) -> Vec<Vec<u8>> {
    use futures::SinkExt;
    use wharf_shared::{EdgeFrame, Reply};
    link.send(EdgeFrame::Request { id, request })
        .await
        .expect("send");
    match reply_to(link, id).await {
        Reply::Messages { messages, .. } => messages.into_iter().map(|m| m.payload).collect(),
        other => panic!("request {id}: {other:?}"),
    }
}

fn subscribe_request(client_id: &str, filter: &str) -> wharf_shared::Request {
    wharf_shared::Request::Subscribe {
        client_id: client_id.into(),
        subscriptions: vec![wharf_shared::Subscription {
            filter: filter.into(),
            qos: wharf_shared::Qos::AtLeastOnce,
            options: Default::default(),
        }],
    }
}

/// The edge routes QoS 0 and 1 messages to its live sessions before the worker has stored
/// them, so a catch-up (a session that lagged, or attached meanwhile) must see every persist
/// its edge sent before asking.
async fn catch_up_sees_every_persist_sent_before_it(kind: Kind) {
    let stack = Stack::new(kind).await;
    let mut link = raw_link(&stack).await;
    payloads_of(&mut link, 1, subscribe_request("late", "b/#")).await;
    // After the subscription was made (a catch-up returns only what came after it).
    let start = wharf_shared::now_ms() + 1;
    let n = persists_for(kind);
    persist_many(&mut link, "b/1", n, start, false).await;
    // From the last message's time: the first page is the one that must wait for the writes.
    let catch_up = wharf_shared::Request::CatchUp {
        client_id: "late".into(),
        after: Some(wharf_shared::Cursor::since(start + n as i64 - 1)),
        other_hosts_only: false,
    };
    assert_eq!(
        payloads_of(&mut link, 2, catch_up).await,
        vec![(n - 1).to_be_bytes().to_vec()],
        "the catch-up missed the last message persisted before it"
    );
}

/// Likewise a new subscription's retained message: one this edge received just before the
/// SUBSCRIBE may have been routed before the session subscribed, and the reply is then its only
/// way to the session.
async fn subscribe_sees_a_retained_message_persisted_before_it(kind: Kind) {
    let stack = Stack::new(kind).await;
    let mut link = raw_link(&stack).await;
    let n = persists_for(kind);
    persist_many(&mut link, "r/1", n, wharf_shared::now_ms(), true).await;
    assert_eq!(
        payloads_of(&mut link, 1, subscribe_request("new", "r/#")).await,
        vec![(n - 1).to_be_bytes().to_vec()],
        "the retained message persisted before the SUBSCRIBE is missing"
    );
}

/// End to end with the real worker: QoS 1 messages are routed before they are stored, and a
/// subscriber whose queue overflows fetches the rest from the store, while later ones are
/// still being written. A raw subscriber with a tiny queue and window reads while 300 messages
/// are published without waiting: every message arrives, in publish order.
async fn a_lagging_subscriber_gets_every_qos1_message_in_order(kind: Kind) {
    let mut stack = Stack::new(kind).await;
    stack.stop_edge().await;
    let mut config = edge_config(&stack.socket, "host-a");
    config.limits.max_queued = 4;
    config.limits.max_inflight = 2;
    config.limits.write_high_water = 256;
    stack.edge = Some(start_edge(config).await);
    let addr = stack.addr();
    let mut slow = wharf_tests::raw::Raw::session(addr, "slow", true).await;
    slow.send(&wharf_tests::raw::subscribe_bytes(1, &[("lag/#", 1)]))
        .await;
    assert!(matches!(
        slow.recv().await,
        Some(rumqttc::mqttbytes::v4::Packet::SubAck(_))
    ));
    let mut publisher = Client::connect(addr, "pub", true).await;
    let sent: Vec<String> = (0..300).map(|i| format!("{i:03}")).collect();
    let publishing = tokio::spawn({
        let sent = sent.clone();
        async move {
            publisher
                .publish_many_acked("lag/1", QoS::AtLeastOnce, sent)
                .await
        }
    });
    let mut firsts = Vec::new();
    let mut seen = std::collections::HashSet::new();
    while firsts.len() < sent.len() {
        match slow.recv().await {
            Some(rumqttc::mqttbytes::v4::Packet::Publish(p)) => {
                let text = String::from_utf8_lossy(&p.payload).into_owned();
                if seen.insert(text.clone()) {
                    firsts.push(text);
                }
                slow.send(&[0x40, 2, (p.pkid >> 8) as u8, p.pkid as u8])
                    .await;
            }
            Some(_) => {}
            None => panic!("{kind:?}: only {} of 300 arrived", firsts.len()),
        }
    }
    publishing.await.expect("publisher");
    assert_eq!(firsts, sent, "{kind:?}: out of order");
}

on_both_backends!(
    a_lagging_subscriber_gets_every_qos1_message_in_order,
    catch_up_sees_every_persist_sent_before_it,
    subscribe_sees_a_retained_message_persisted_before_it,
    the_most_owed_are_ranked_across_the_whole_fleet,
);

/// Sends every request without waiting, then collects a reply to each (in any order).
async fn pipelined(link: &mut RawLink, requests: Vec<wharf_shared::Request>) {
    use futures::SinkExt;
    use wharf_shared::{EdgeFrame, Reply};
    let n = requests.len();
    for (id, request) in requests.into_iter().enumerate() {
        let id = 100_000 + id as u64;
        link.feed(EdgeFrame::Request { id, request })
            .await
            .expect("request");
    }
    link.flush().await.expect("flush");
    for _ in 0..n {
        let (_, reply) = next_reply(link).await;
        assert!(!matches!(reply, Reply::Failed { .. }), "{reply:?}");
    }
}

/// "Who is behind", sorted by owed, ranks the whole fleet, not its first sessions by id: of
/// 12,000 stored sessions, the two owed anything are the last and one of the first, and the
/// ranking says it counted all 12,000 (asked again while the worker's sweep is counting).
async fn the_most_owed_are_ranked_across_the_whole_fleet(kind: Kind) {
    use futures::SinkExt;
    use wharf_shared::{Reply, Request};
    let stack = Stack::new(kind).await;
    let mut link = raw_link(&stack).await;
    let fleet: u32 = match kind {
        Kind::Embedded => 12_000,
        Kind::Mongo => 2_000,
    };
    let ids: Vec<String> = (0..fleet).map(|i| format!("fleet-{i:05}")).collect();
    let connects = ids
        .iter()
        .map(|id| Request::Connect {
            client_id: id.clone(),
            clean_start: false,
            session_expiry: 86_400,
        })
        .collect();
    pipelined(&mut link, connects).await;
    let subscribes = ids
        .iter()
        .map(|id| subscribe_request(id, &format!("cmd/{id}")))
        .collect();
    pipelined(&mut link, subscribes).await;
    // After the subscriptions: 3 messages for the last device, 1 for the sixth.
    let (last, sixth) = (&ids[ids.len() - 1], &ids[5]);
    persist_many(
        &mut link,
        &format!("cmd/{last}"),
        3,
        wharf_shared::now_ms() + 1,
        false,
    )
    .await;
    link.flush().await.expect("flush");
    for i in 0..3 {
        assert_eq!(reply_to(&mut link, 1_000 + i).await, Reply::Persisted);
    }
    // (Another second, so that its message id is not the first one's.)
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    persist_many(
        &mut link,
        &format!("cmd/{sixth}"),
        1,
        wharf_shared::now_ms(),
        false,
    )
    .await;
    link.flush().await.expect("flush");
    assert_eq!(reply_to(&mut link, 1_000).await, Reply::Persisted);

    // Through the admin API, as the console asks.
    let api = admin_api(&stack);
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let mut asked = 0;
    let page = loop {
        asked += 1;
        let response = api(HttpRequest {
            method: "GET".into(),
            path: "/api/v1/behind".into(),
            query: [("search", "fleet-"), ("sort", "owed"), ("limit", "10")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            authorization: Some("Bearer console-secret-1".into()),
            ..HttpRequest::default()
        })
        .await;
        assert_eq!(response.status, 200);
        let page: serde_json::Value = serde_json::from_slice(&response.body).expect("json");
        if page["ranked"]["counting"] == false {
            break page;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the sweep never ended: {page}"
        );
    };
    let ranked: Vec<(&str, u64)> = page["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .map(|s| {
            (
                s["clientId"].as_str().unwrap_or(""),
                s["owed"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(ranked, [(last.as_str(), 3), (sixth.as_str(), 1)], "{page}");
    assert_eq!(page["ranked"]["scanned"], fleet, "{page}");
    assert_eq!(page["ranked"]["complete"], true, "{page}");
    tracing::info!(asked, "ranked the fleet");
}
