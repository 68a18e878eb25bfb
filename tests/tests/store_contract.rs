//! The store contract: what every backend promises the worker, checked the same way on both
//! (the embedded SQLite store, and MongoDB on SecantusDB) through the `Store` trait alone.
//! Backend-only matters (file migrations, SQLite's blocks, MongoDB's document shapes and
//! indexes) are tested beside each backend and in `store_worker.rs`.

use std::collections::HashSet;
use std::sync::Arc;
use wharf_shared::{Cursor, DeliveredRecord, Message, MessageId, Qos, Subscription};
use wharf_store_worker::store::{self, Deliveries, Owner, Store, TopicScope, WriteBatch};

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use wharf_store_worker::store::{mongo, sqlite};

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let dir = tempfile::TempDir::new().expect("temp dir");
                let store = sqlite::SqliteStore::open(dir.path()).expect("open");
                super::$name(&store).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mongodb() {
                let dir = tempfile::TempDir::new().expect("temp dir");
                let server = wharf_tests::mongo::Secantus::start(dir.path()).await;
                let store = mongo::MongoStore::connect(
                    &server.uri(),
                    "wharf",
                    &mongo::Durability::default(),
                    true,
                )
                .await
                .expect("connect");
                super::$name(&store).await
            }
        }
    )*};
}

on_both_stores!(
    messages_are_read_back_in_creation_order_on_every_topic,
    a_topic_scope_reads_only_its_topics,
    a_session_is_owed_what_it_subscribed_to_and_was_not_delivered,
    claims_are_ordered_and_only_the_current_claim_ends_a_session,
    sessions_expire_once_unless_their_client_comes_back,
    sessions_are_listed_by_prefix_in_pages,
    subscriptions_are_upserted_listed_and_removed,
    inbound_qos2_ids_are_recorded_until_released,
    outbound_qos2_deliveries_are_tracked_until_completed,
    a_resent_message_is_stored_once,
    the_newest_retained_message_wins_and_an_empty_one_clears_it,
    a_message_and_its_delivery_records_are_found_by_id,
);

/// Some time in 2023, so that stored messages are well within their TTL.
const START: i64 = 1_700_000_000_000;

/// Message `n`, made at `created_ms` on `topic` by host `h` (every fifth by `other`).
fn message(n: u32, created_ms: i64, topic: &str, qos: Qos) -> Message {
    let mut id = [0u8; 12];
    id[..4].copy_from_slice(&((created_ms / 1000) as u32).to_be_bytes());
    id[8..].copy_from_slice(&n.to_be_bytes());
    Message {
        id: MessageId(id),
        topic: topic.into(),
        payload: n.to_be_bytes().to_vec(),
        qos,
        retain: false,
        client_id: "publisher".into(),
        host: if n % 5 == 0 { "other" } else { "h" }.into(),
        created_ms,
        properties: None,
    }
}

/// `n` QoS 1 messages one millisecond apart from `START`, over `topics` in turn.
fn round_robin(n: u32, topics: &[&str]) -> Vec<Message> {
    (0..n)
        .map(|i| {
            let topic = topics[i as usize % topics.len()];
            message(i, START + i64::from(i), topic, Qos::AtLeastOnce)
        })
        .collect()
}

async fn write<S: Store>(store: &S, messages: Vec<Message>) {
    let batch = WriteBatch {
        messages,
        ..WriteBatch::default()
    };
    store.write(Arc::new(batch)).await.expect("write");
}

fn delivered(client: &str, ids: &[MessageId], created_ms: i64) -> Deliveries {
    Deliveries {
        client_id: client.into(),
        host: "h".into(),
        created_ms,
        records: ids
            .iter()
            .map(|&message_id| DeliveredRecord {
                message_id,
                topic: "t".into(),
            })
            .collect(),
    }
}

fn subscription(filter: &str, qos: Qos) -> Subscription {
    Subscription {
        filter: filter.into(),
        qos,
        options: Default::default(),
    }
}

fn ids(messages: &[Message]) -> Vec<MessageId> {
    messages.iter().map(|m| m.id).collect()
}

/// Every page read after the last one's cursor, until a short page.
async fn read_all<S: Store>(store: &S, not_host: Option<&str>, page: usize) -> Vec<Message> {
    let (mut out, mut after) = (Vec::new(), Cursor::since(0));
    loop {
        let read = store
            .messages_after(after, not_host.map(str::to_owned), page)
            .await
            .expect("read");
        out.extend(read.iter().cloned());
        match Cursor::after_full_page(&read, page) {
            Some(next) => after = next,
            None => return out,
        }
    }
}

/// 700 messages over six topics, written in batches out of creation order and with many
/// sharing a millisecond, come back whole, once each, in (created, id) order, paged by the
/// cursor however small the page; `not_host` leaves out that host's.
async fn messages_are_read_back_in_creation_order_on_every_topic<S: Store>(store: &S) {
    let all: Vec<Message> = (0..700u32)
        .map(|n| {
            message(
                n,
                START + i64::from(n / 7),
                &format!("t/{}", n % 6),
                Qos::AtLeastOnce,
            )
        })
        .collect();
    let mut shuffled = all.clone();
    shuffled.reverse();
    for chunk in shuffled.chunks(90) {
        write(store, chunk.to_vec()).await;
    }
    for page in [1_000, 64, 7] {
        assert_eq!(
            ids(&read_all(store, None, page).await),
            ids(&all),
            "page {page}"
        );
    }
    let not_other: Vec<MessageId> = all
        .iter()
        .filter(|m| m.host != "other")
        .map(|m| m.id)
        .collect();
    assert_eq!(ids(&read_all(store, Some("other"), 50).await), not_other);
    let first = &read_all(store, None, 1_000).await[0];
    assert_eq!(first.payload, all[0].payload);
    assert_eq!(first.topic, all[0].topic);
    assert_eq!(first.created_ms, all[0].created_ms);
    assert_eq!(first.qos, Qos::AtLeastOnce);
}

/// The topic index: an exact topic reads only that topic, a prefix the topic and those below
/// it (not `a/10` for `a/1`), both in creation order and after the cursor.
async fn a_topic_scope_reads_only_its_topics<S: Store>(store: &S) {
    let all = round_robin(200, &["a/1", "a/1/x", "a/10", "b/1", "a/1/y/z"]);
    write(store, all.clone()).await;
    let read = |scope: TopicScope, after: Cursor| async move {
        store
            .messages_on(scope, after, None, 1_000)
            .await
            .expect("read")
            .expect("served by the topic index")
    };
    let exact = read(TopicScope::Exact("a/1".into()), Cursor::since(0)).await;
    let want: Vec<MessageId> = all
        .iter()
        .filter(|m| m.topic == "a/1")
        .map(|m| m.id)
        .collect();
    assert_eq!(ids(&exact), want);
    let prefix = read(TopicScope::Prefix("a/1".into()), Cursor::since(0)).await;
    let want: Vec<MessageId> = all
        .iter()
        .filter(|m| m.topic == "a/1" || m.topic.starts_with("a/1/"))
        .map(|m| m.id)
        .collect();
    assert_eq!(ids(&prefix), want);
    let later = read(TopicScope::Prefix("a/1".into()), Cursor::of(&prefix[10])).await;
    assert_eq!(ids(&later), want[11..]);
    let none = read(TopicScope::Exact("c".into()), Cursor::since(0)).await;
    assert!(none.is_empty());
}

/// What a session is owed: messages on its filters made at or after each subscription, not
/// delivered to it; paged to the end it matches reading everything and filtering by hand.
async fn a_session_is_owed_what_it_subscribed_to_and_was_not_delivered<S: Store>(store: &S) {
    let all = round_robin(
        1_500,
        &["dev/1/cmd", "dev/2/cmd", "fleet/1/t", "fleet/2/t", "other"],
    );
    // Subscribed to `dev/1/cmd` from the start and to `fleet/+/t` from message 500 on.
    store
        .upsert_subscriptions(
            "s",
            vec![subscription("dev/1/cmd", Qos::AtLeastOnce)],
            START,
        )
        .await
        .expect("subscribe");
    store
        .upsert_subscriptions(
            "s",
            vec![subscription("fleet/+/t", Qos::AtLeastOnce)],
            START + 500,
        )
        .await
        .expect("subscribe");
    write(store, all.clone()).await;
    // Every third message it wants was delivered, in one notice and in small ones.
    let wanted: Vec<&Message> = all
        .iter()
        .filter(|m| {
            m.topic == "dev/1/cmd" || (m.topic.starts_with("fleet/") && m.created_ms >= START + 500)
        })
        .collect();
    let done: Vec<MessageId> = wanted.iter().step_by(3).map(|m| m.id).collect();
    let (block, singles) = done.split_at(done.len() / 2);
    let mut notices = vec![delivered("s", block, START + 2_000)];
    notices.extend(
        singles
            .iter()
            .map(|&id| delivered("s", &[id], START + 2_001)),
    );
    store
        .record_delivered(Arc::new(notices))
        .await
        .expect("record");
    let done: HashSet<MessageId> = done.into_iter().collect();
    let owed: Vec<MessageId> = wanted
        .iter()
        .map(|m| m.id)
        .filter(|id| !done.contains(id))
        .collect();
    let (mut got, mut after) = (Vec::new(), None);
    loop {
        let (page, next) = store::undelivered(store, "s", after, None)
            .await
            .expect("catch-up");
        got.extend(ids(&page));
        match next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(got, owed);
    let among = store
        .delivered_among("s", wanted.iter().map(|m| m.id).collect())
        .await
        .expect("delivered among");
    assert_eq!(among, done);
    // Another client was delivered nothing.
    assert!(store
        .delivered_among("t", done.iter().copied().collect())
        .await
        .expect("delivered among")
        .is_empty());
}

/// Claims are ordered by generation; a session record goes or closes only for its current
/// claim, so a connection that lost its session to a newer one changes nothing.
async fn claims_are_ordered_and_only_the_current_claim_ends_a_session<S: Store>(store: &S) {
    let (present, first) = store.claim_session("c", "a", 10, 0).await.expect("claim");
    assert!(!present, "no session before the first claim");
    let (present, second) = store.claim_session("c", "b", 11, 60).await.expect("claim");
    assert!(!present, "a clean session's record is no session to resume");
    assert!(second > first);
    let (present, third) = store.claim_session("c", "b", 12, 60).await.expect("claim");
    assert!(present, "a persistent session is held");
    assert!(third > second);
    let stale = Owner {
        host: "a",
        generation: Some(first),
    };
    store
        .close_session("c", Some(20), &stale)
        .await
        .expect("close");
    assert!(
        store
            .expired_sessions(30)
            .await
            .expect("expired")
            .is_empty(),
        "a stale claim's close set an expiry"
    );
    assert!(!store.drop_session("c", Some(&stale)).await.expect("drop"));
    let older_on_b = Owner {
        host: "b",
        generation: Some(second),
    };
    assert!(!store
        .drop_session("c", Some(&older_on_b))
        .await
        .expect("drop"));
    let newest_on_b = Owner {
        host: "b",
        generation: None,
    };
    assert!(store
        .drop_session("c", Some(&newest_on_b))
        .await
        .expect("drop"));
    let (present, again) = store.claim_session("c", "a", 13, 0).await.expect("claim");
    assert!(!present);
    assert!(again > third, "{again:?} after {third:?}");
}

/// A closed session expires at its time, is dropped once, and not at all if its client came
/// back (a claim clears the expiry).
async fn sessions_expire_once_unless_their_client_comes_back<S: Store>(store: &S) {
    for client in ["gone", "back"] {
        let (_, generation) = store
            .claim_session(client, "h", START, 60)
            .await
            .expect("claim");
        let owner = Owner {
            host: "h",
            generation: Some(generation),
        };
        store
            .close_session(client, Some(START + 60_000), &owner)
            .await
            .expect("close");
    }
    store
        .claim_session("back", "h", START + 1_000, 60)
        .await
        .expect("claim");
    assert!(store
        .expired_sessions(START + 59_999)
        .await
        .expect("expired")
        .is_empty());
    assert_eq!(
        store
            .expired_sessions(START + 60_000)
            .await
            .expect("expired"),
        ["gone"]
    );
    assert!(!store
        .drop_expired_session("back", START + 60_000)
        .await
        .expect("drop"));
    assert!(store
        .drop_expired_session("gone", START + 60_000)
        .await
        .expect("drop"));
    assert!(!store
        .drop_expired_session("gone", START + 60_000)
        .await
        .expect("drop"));
    assert!(store
        .expired_sessions(START + 120_000)
        .await
        .expect("expired")
        .is_empty());
}

/// Stored sessions in id order, by prefix, after the last id of the previous page; groups'
/// ownership records are not client sessions.
async fn sessions_are_listed_by_prefix_in_pages<S: Store>(store: &S) {
    for client in ["dev-3", "dev-1", "dev-2", "dev-4", "dev-5", "other"] {
        store
            .claim_session(client, "h", START, 3_600)
            .await
            .expect("claim");
    }
    store
        .own_groups("h", vec!["$share/g/t".into()], START)
        .await
        .expect("groups");
    let page = |after: Option<&str>, prefix: &str, limit| {
        let (after, prefix) = (after.map(str::to_owned), prefix.to_owned());
        async move {
            store
                .sessions_page(after, prefix, limit)
                .await
                .expect("page")
                .into_iter()
                .map(|s| s.client_id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(page(None, "dev-", 2).await, ["dev-1", "dev-2"]);
    assert_eq!(page(Some("dev-2"), "dev-", 2).await, ["dev-3", "dev-4"]);
    assert_eq!(page(Some("dev-4"), "dev-", 2).await, ["dev-5"]);
    assert_eq!(
        page(None, "", 100).await,
        ["dev-1", "dev-2", "dev-3", "dev-4", "dev-5", "other"]
    );
    assert!(page(None, "nobody", 10).await.is_empty());
    let listed = store
        .sessions_page(None, "dev-1".into(), 1)
        .await
        .expect("page");
    assert_eq!(listed[0].host, "h");
    assert_eq!(listed[0].owed, 0, "owed counts are the caller's");
}

/// One subscription per (client, filter): re-subscribing changes its options and keeps when
/// it was made; shared groups' filters are found apart; removal by filter or whole.
async fn subscriptions_are_upserted_listed_and_removed<S: Store>(store: &S) {
    let first = vec![
        subscription("a/#", Qos::AtLeastOnce),
        subscription("$share/g/b", Qos::AtMostOnce),
    ];
    store
        .upsert_subscriptions("c", first, START)
        .await
        .expect("subscribe");
    store
        .upsert_subscriptions("c", vec![subscription("a/#", Qos::ExactlyOnce)], START + 5)
        .await
        .expect("subscribe");
    let mut stored = store.subscriptions("c").await.expect("subscriptions");
    stored.sort_by(|a, b| a.filter.cmp(&b.filter));
    let seen: Vec<(&str, Qos, i64)> = stored
        .iter()
        .map(|s| (s.filter.as_str(), s.qos, s.created_ms))
        .collect();
    assert_eq!(
        seen,
        [
            ("$share/g/b", Qos::AtMostOnce, START),
            ("a/#", Qos::ExactlyOnce, START)
        ]
    );
    assert_eq!(
        store.shared_filters("c").await.expect("shared"),
        ["$share/g/b"]
    );
    assert!(store.has_subscribers("$share/g/b").await.expect("members"));
    assert!(!store.has_subscribers("a/+").await.expect("members"));
    let found = store
        .subscribers(vec!["a/#".into()], true, 10)
        .await
        .expect("subscribers");
    let mut found: Vec<(&str, &str)> = found
        .iter()
        .map(|(c, s)| (c.as_str(), s.filter.as_str()))
        .collect();
    found.sort();
    assert_eq!(found, [("c", "$share/g/b"), ("c", "a/#")]);
    store
        .remove_subscriptions("c", Some(vec!["$share/g/b".into()]))
        .await
        .expect("unsubscribe");
    assert!(!store.has_subscribers("$share/g/b").await.expect("members"));
    assert_eq!(
        store.subscriptions("c").await.expect("subscriptions").len(),
        1
    );
    store
        .remove_subscriptions("c", None)
        .await
        .expect("unsubscribe");
    assert!(store
        .subscriptions("c")
        .await
        .expect("subscriptions")
        .is_empty());
}

/// An inbound QoS 2 packet id is recorded with its message until released; a clean session
/// forgets all of its client's.
async fn inbound_qos2_ids_are_recorded_until_released<S: Store>(store: &S) {
    let (m1, m2) = (
        message(1, START, "q", Qos::ExactlyOnce),
        message(2, START + 1, "q", Qos::ExactlyOnce),
    );
    let batch = WriteBatch {
        record_qos2: vec![
            ("c".into(), 7, m1.id),
            ("c".into(), 8, m2.id),
            ("d".into(), 7, m2.id),
        ],
        messages: vec![m1.clone(), m2.clone()],
        ..WriteBatch::default()
    };
    store.write(Arc::new(batch)).await.expect("write");
    let keys = vec![
        ("c".into(), 7),
        ("c".into(), 8),
        ("d".into(), 7),
        ("c".into(), 9),
    ];
    let recorded = store.qos2_recorded(keys.clone()).await.expect("recorded");
    assert_eq!(recorded.len(), 3);
    assert_eq!(recorded[&("c".to_string(), 7)], m1.id);
    let batch = WriteBatch {
        release_qos2: vec![("c".into(), 7)],
        clear_qos2: vec!["d".into()],
        ..WriteBatch::default()
    };
    store.write(Arc::new(batch)).await.expect("write");
    let recorded = store.qos2_recorded(keys).await.expect("recorded");
    let left: Vec<&(String, u16)> = recorded.keys().collect();
    assert_eq!(left, [&("c".to_string(), 8)]);
    let found = store
        .qos2_messages_by_id(vec![m1.id, m2.id])
        .await
        .expect("by id");
    assert_eq!(found.len(), 2, "released ids keep their messages");
}

/// An outbound QoS 2 delivery is tracked from PUBLISH, marked released (with its delivery
/// record) at PUBREC, and forgotten at PUBCOMP or with the session.
async fn outbound_qos2_deliveries_are_tracked_until_completed<S: Store>(store: &S) {
    let (m1, m2) = (
        message(1, START, "q", Qos::ExactlyOnce),
        message(2, START + 1, "q", Qos::ExactlyOnce),
    );
    write(store, vec![m1.clone(), m2.clone()]).await;
    store
        .track_qos2_out("c", 1, m1.id, None)
        .await
        .expect("track");
    store
        .track_qos2_out("c", 2, m2.id, None)
        .await
        .expect("track");
    let record = delivered("c", &[m1.id], START + 10);
    store
        .track_qos2_out("c", 1, m1.id, Some(record))
        .await
        .expect("release");
    let mut out = store.qos2_out("c").await.expect("out");
    out.sort();
    assert_eq!(out, [(1, m1.id, true), (2, m2.id, false)]);
    assert_eq!(
        store
            .delivered_among("c", vec![m1.id, m2.id])
            .await
            .expect("delivered"),
        HashSet::from([m1.id]),
        "PUBREC wrote the delivery record"
    );
    store.forget_qos2_out("c", Some(1)).await.expect("forget");
    assert_eq!(store.qos2_out("c").await.expect("out"), [(2, m2.id, false)]);
    store.forget_qos2_out("c", None).await.expect("forget");
    assert!(store.qos2_out("c").await.expect("out").is_empty());
}

/// A message written again under its id (a re-sent PUBLISH, a retried write) is stored once.
async fn a_resent_message_is_stored_once<S: Store>(store: &S) {
    let (q2, q1) = (
        message(1, START, "t", Qos::ExactlyOnce),
        message(2, START + 1, "t", Qos::AtLeastOnce),
    );
    for _ in 0..2 {
        write(store, vec![q2.clone(), q1.clone()]).await;
    }
    assert_eq!(ids(&read_all(store, None, 100).await), [q2.id, q1.id]);
    let found = store.qos2_messages_by_id(vec![q2.id]).await.expect("by id");
    assert_eq!(ids(&found), [q2.id]);
    assert_eq!(found[0].payload, q2.payload);
}

/// Retained messages: the newest by creation wins whatever the order written; an empty one
/// clears the topic; `clear_retained` does too.
async fn the_newest_retained_message_wins_and_an_empty_one_clears_it<S: Store>(store: &S) {
    let retained = |n: u32, created: i64, topic: &str, payload: &[u8]| Message {
        retain: true,
        payload: payload.to_vec(),
        ..message(n, created, topic, Qos::AtLeastOnce)
    };
    for m in [
        retained(1, START + 10, "r/a", b"new"),
        retained(2, START + 5, "r/a", b"old"),
        retained(3, START + 6, "r/a", b""),
        retained(4, START, "r/b", b"b"),
        retained(5, START, "s", b"s"),
    ] {
        write(store, vec![m]).await;
    }
    let topics = |messages: Vec<Message>| {
        let mut t: Vec<(String, Vec<u8>)> =
            messages.into_iter().map(|m| (m.topic, m.payload)).collect();
        t.sort();
        t
    };
    let now = store.retained(None).await.expect("retained");
    assert_eq!(
        topics(now),
        [
            ("r/a".to_string(), b"new".to_vec()),
            ("r/b".to_string(), b"b".to_vec()),
            ("s".to_string(), b"s".to_vec())
        ]
    );
    let under_r = store
        .retained(Some(vec!["r".into()]))
        .await
        .expect("retained");
    // At least the prefix's (the caller matches exactly).
    let under_r: HashSet<String> = under_r.into_iter().map(|m| m.topic).collect();
    assert!(
        under_r.contains("r/a") && under_r.contains("r/b"),
        "{under_r:?}"
    );
    write(store, vec![retained(6, START + 11, "r/a", b"")]).await;
    store.clear_retained("r/b").await.expect("clear");
    assert_eq!(
        topics(store.retained(None).await.expect("retained")),
        [("s".to_string(), b"s".to_vec())]
    );
}

/// The admin API's trace: a message found by id alone among many; its delivery records
/// found for the clients that have one, in one notice with others or alone.
async fn a_message_and_its_delivery_records_are_found_by_id<S: Store>(store: &S) {
    let all: Vec<Message> = (0..3_000u32)
        .map(|n| message(n, START + i64::from(n) * 2, "t", Qos::AtLeastOnce))
        .collect();
    for chunk in all.chunks(100) {
        write(store, chunk.to_vec()).await;
    }
    for m in all.iter().step_by(97).chain(all.last()) {
        let found = store.message_by_id(m.id).await.expect("read");
        assert_eq!(found.as_ref().map(|f| f.id), Some(m.id));
        assert_eq!(found.map(|f| f.payload), Some(m.payload.clone()));
    }
    let mut missing = all[5].id;
    missing.0[11] ^= 0xff;
    missing.0[10] ^= 0xff;
    assert_eq!(store.message_by_id(missing).await.expect("read"), None);
    let id = all[40].id;
    let block: Vec<MessageId> = all[30..50].iter().map(|m| m.id).collect();
    let notices = vec![
        delivered("a", &block, START + 500),
        delivered("b", &[id], START + 600),
    ];
    store
        .record_delivered(Arc::new(notices))
        .await
        .expect("record");
    let mut found = store
        .deliveries_of(id, vec!["a".into(), "b".into(), "c".into()])
        .await
        .expect("deliveries");
    found.sort();
    let clients: Vec<&str> = found.iter().map(|d| d.client_id.as_str()).collect();
    assert_eq!(clients, ["a", "b"]);
    for (record, at) in found.iter().zip([START + 500, START + 600]) {
        assert!(record.at_ms.is_none_or(|t| t == at), "{record:?}");
    }
    assert!(store
        .deliveries_of(all[60].id, vec!["a".into(), "b".into()])
        .await
        .expect("deliveries")
        .is_empty());
}
