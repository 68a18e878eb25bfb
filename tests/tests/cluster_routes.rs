//! Interest routing between hosts: a message is addressed (`hosts`) to the hosts whose sessions
//! want it and followed only there, and the races a cluster has (a subscription made while
//! another host publishes, a session that moves, a worker that restarts, a route whose last
//! session left, a host that dies) lose nothing a session is owed.

use mongodb::bson::{doc, Bson, Document};
use rumqttc::QoS;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;
use wharf_tests::client::{payloads, Client};
use wharf_tests::init_tracing;
use wharf_tests::mongo::Secantus;
use wharf_tests::process::{http_get, BrokerHost};

async fn messages(uri: &str) -> mongodb::Collection<Document> {
    let client = mongodb::Client::with_uri_str(uri)
        .await
        .expect("mongo client");
    client.database("mqtt").collection("message")
}

/// The `hosts` each stored message on `topic` was addressed to, in the order stored.
async fn addressed(messages: &mongodb::Collection<Document>, topic: &str) -> Vec<Vec<String>> {
    use futures::TryStreamExt;
    let docs: Vec<Document> = messages
        .find(doc! { "topic": topic })
        .sort(doc! { "created": 1, "_id": 1 })
        .await
        .expect("find")
        .try_collect()
        .await
        .expect("read");
    docs.iter()
        .map(|d| match d.get("hosts") {
            Some(Bson::Array(hosts)) => hosts
                .iter()
                .filter_map(|h| h.as_str().map(str::to_owned))
                .collect(),
            other => panic!("message on {topic} without hosts: {other:?}"),
        })
        .collect()
}

/// Publishes probes on `topic` from `publisher` until one is stored addressed to exactly
/// `want` (the publishing host has read the routes): what follows is addressed by them.
async fn until_addressed(
    publisher: &mut Client,
    messages: &mongodb::Collection<Document>,
    topic: &str,
    want: &[&str],
) {
    for i in 0..100 {
        publisher
            .publish_acked(topic, QoS::AtLeastOnce, format!("probe-{i}"))
            .await;
        if addressed(messages, topic).await.last().map(Vec::as_slice)
            == Some(&want.iter().map(|s| s.to_string()).collect::<Vec<_>>()[..])
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("messages on {topic} never addressed to {want:?}");
}

/// The worker's count of messages its follower received from other hosts.
async fn followed(host: &BrokerHost) -> u64 {
    let (_, text) = http_get(host.worker_ops, "/metrics").await;
    text.lines()
        .find(|l| l.starts_with("wharf_worker_followed_messages_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

fn series(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:03}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_host_is_sent_only_what_its_sessions_want() {
    init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let mongo = Secantus::start(dir.path()).await;
    let h1 = BrokerHost::start(dir.path(), "h1", Some(mongo.uri())).await;
    // h2 routes every device's command topic as one filter.
    let h2 = BrokerHost::start_with(
        dir.path(),
        "h2",
        Some(mongo.uri()),
        &["--route-aggregate", "dev/+/cmd"],
    )
    .await;
    let h3 =
        BrokerHost::start_with(dir.path(), "h3", Some(mongo.uri()), &["--follow", "poll"]).await;
    let stored = messages(&mongo.uri()).await;

    let mut device = Client::connect(h2.addr, "dev-7", true).await;
    device.subscribe("dev/7/cmd", QoS::AtLeastOnce).await;
    let mut on_b = Client::connect(h2.addr, "on-b", true).await;
    on_b.subscribe("site/b/#", QoS::AtLeastOnce).await;
    let mut on_c = Client::connect(h3.addr, "on-c", false).await;
    on_c.subscribe("site/c/+", QoS::AtLeastOnce).await;
    // A shared subscription routes by the filter inside it.
    let mut shared = Client::connect(h3.addr, "shared-c", true).await;
    shared
        .subscribe("$share/g/site/s/#", QoS::AtLeastOnce)
        .await;
    let mut publisher = Client::connect(h1.addr, "pub", true).await;
    until_addressed(&mut publisher, &stored, "site/b/probe", &["h2"]).await;
    until_addressed(&mut publisher, &stored, "site/c/probe", &["h3"]).await;
    until_addressed(&mut publisher, &stored, "site/s/probe", &["h3"]).await;
    until_addressed(&mut publisher, &stored, "site/both", &[]).await;
    // An aggregate route: a device's command reaches it; another device's goes to the host too.
    until_addressed(&mut publisher, &stored, "dev/7/cmd", &["h2"]).await;
    assert!(device.publishes(1).await[0].topic == "dev/7/cmd");
    until_addressed(&mut publisher, &stored, "dev/8/cmd", &["h2"]).await;
    let (b_probes, c_probes) = (
        on_b.publishes(addressed(&stored, "site/b/probe").await.len())
            .await,
        on_c.publishes(addressed(&stored, "site/c/probe").await.len())
            .await,
    );
    assert!(!b_probes.is_empty() && !c_probes.is_empty());
    shared
        .publishes(addressed(&stored, "site/s/probe").await.len())
        .await;

    let h3_before = followed(&h3).await;
    publisher
        .publish_many_acked("site/b/x", QoS::AtLeastOnce, series("b", 20))
        .await;
    publisher
        .publish_many_acked("site/none/x", QoS::AtLeastOnce, series("n", 20))
        .await;
    assert_eq!(payloads(&on_b.publishes(20).await), series("b", 20));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        followed(&h3).await,
        h3_before,
        "h3 is sent nothing its sessions do not want"
    );
    publisher
        .publish_many_acked("site/c/x", QoS::AtLeastOnce, series("c", 20))
        .await;
    assert_eq!(payloads(&on_c.publishes(20).await), series("c", 20));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(followed(&h3).await, h3_before + 20);

    for (topic, want) in [
        ("site/b/x", vec!["h2".to_owned()]),
        ("site/c/x", vec!["h3".to_owned()]),
        ("site/none/x", vec![]),
    ] {
        let hosts = addressed(&stored, topic).await;
        assert_eq!(hosts.len(), 20);
        assert!(
            hosts.iter().all(|h| *h == want),
            "{topic} addressed to {want:?}: {hosts:?}"
        );
    }
    on_b.assert_no_publish(Duration::from_millis(300)).await;
    on_c.assert_no_publish(Duration::from_millis(300)).await;

    // Retained messages are read from the store, whoever was addressed when they were sent.
    publisher
        .publish_acked_retain("site/cfg", QoS::AtLeastOnce, true, "v1")
        .await;
    let mut late = Client::connect(h2.addr, "late", true).await;
    late.subscribe("site/cfg", QoS::AtLeastOnce).await;
    let retained = late.publishes(1).await;
    assert!(retained[0].retain);
    assert_eq!(&retained[0].payload[..], b"v1");
}

/// Publishes QoS 1 `seq-NNNNN` on `topic` one after another until `stop`; `next` is the number
/// of the message about to be published.
fn publish_steadily(
    mut publisher: Client,
    topic: &'static str,
    next: Arc<AtomicUsize>,
    stop: Arc<tokio::sync::Notify>,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        loop {
            let i = next.load(Ordering::SeqCst);
            let stopping = stop.notified();
            tokio::pin!(stopping);
            tokio::select! {
                biased;
                _ = &mut stopping => return i,
                _ = publisher.publish_acked(topic, QoS::AtLeastOnce, format!("seq-{i:05}")) => {}
            }
            next.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
    })
}

fn numbers(got: &[rumqttc::Publish]) -> Vec<usize> {
    got.iter()
        .map(|p| {
            String::from_utf8_lossy(&p.payload)
                .trim_start_matches("seq-")
                .parse()
                .expect("seq-N")
        })
        .collect()
}

/// Every message from `from` up to (not including) `to` is in `got`.
fn assert_all(name: &str, got: &[usize], from: usize, to: usize) {
    let have: BTreeSet<usize> = got.iter().copied().collect();
    let missing: Vec<usize> = (from..to).filter(|i| !have.contains(i)).collect();
    assert!(
        missing.is_empty(),
        "{name}: {} of {} messages published after it subscribed are missing: {missing:?}",
        missing.len(),
        to - from
    );
}

/// Reads publishes until `last` has arrived (or panics after the patience runs out).
async fn read_until(client: &mut Client, last: usize) -> Vec<usize> {
    let mut got = Vec::new();
    while !got.contains(&last) {
        match client.next_publish().await {
            Some(p) => got.extend(numbers(&[p])),
            None => panic!("message {last} never came; got {} messages", got.len()),
        }
    }
    // What a settle brings can come after the newest live message: a little longer.
    while let Some(p) = client.publish_within(Duration::from_millis(5_000)).await {
        got.extend(numbers(&[p]));
    }
    got
}

/// Hosts `h1`, `h2`, ... on one MongoDB-wire server; the last follows by polling when
/// `poll_last`.
async fn hosts(n: usize, poll_last: bool) -> (TempDir, Secantus, Vec<BrokerHost>) {
    init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let mongo = Secantus::start(dir.path()).await;
    let mut hosts = Vec::new();
    for i in 1..=n {
        let args: &[&str] = if poll_last && i == n {
            &["--follow", "poll"]
        } else {
            &[]
        };
        let name = format!("h{i}");
        hosts.push(BrokerHost::start_with(dir.path(), &name, Some(mongo.uri()), args).await);
    }
    (dir, mongo, hosts)
}

/// A subscription made on one host while another publishes: the publishing host stores what
/// it publishes before it has read the new route without this host's address, and those
/// messages come from the session's catch-up once the route has reached every host
/// (`SETTLE_MS` after the SUBACK); later ones come live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_made_while_another_host_publishes_misses_nothing() {
    let (_dir, _mongo, hosts) = hosts(3, true).await;
    let [h1, h2, h3] = &hosts[..] else {
        unreachable!()
    };

    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(tokio::sync::Notify::new());
    let publisher = Client::connect(h1.addr, "pub", true).await;
    let publishing = publish_steadily(publisher, "race/t", next.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Persistent and clean sessions, by change stream (h2) and by poll (h3).
    let mut subscribers = Vec::new();
    for (host, id, clean) in [
        (h2, "race-persistent-2", false),
        (h2, "race-clean-2", true),
        (h3, "race-persistent-3", false),
        (h3, "race-clean-3", true),
    ] {
        let mut c = Client::connect(host.addr, id, clean).await;
        c.subscribe("race/#", QoS::AtLeastOnce).await;
        // Published after the SUBACK: owed.
        let from = next.load(Ordering::SeqCst) + 1;
        subscribers.push((id, c, from));
    }
    // At least 4 s and 200 messages published, however slow the machine.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while next.load(Ordering::SeqCst) <= 200 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.notify_one();
    let end = publishing.await.expect("publisher");
    assert!(end > 200, "only {end} published in a minute");

    for (id, mut c, from) in subscribers {
        let got = read_until(&mut c, end - 1).await;
        assert_all(id, &got, from, end);
        let mut counts: HashMap<usize, usize> = HashMap::new();
        for n in &got {
            *counts.entry(*n).or_default() += 1;
        }
        let twice: Vec<usize> = counts
            .iter()
            .filter(|(_, c)| **c > 1)
            .map(|(n, _)| *n)
            .collect();
        assert!(twice.is_empty(), "{id}: delivered twice: {twice:?}");
    }
}

/// A persistent session that moves from one host to another while a third publishes: every
/// message is delivered on one host or the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_moving_between_hosts_misses_nothing() {
    let (_dir, _mongo, hosts) = hosts(3, false).await;
    let [h1, h2, h3] = &hosts[..] else {
        unreachable!()
    };

    let mut mover = Client::connect(h2.addr, "mover", false).await;
    mover.subscribe("move/#", QoS::AtLeastOnce).await;
    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(tokio::sync::Notify::new());
    let from = next.load(Ordering::SeqCst);
    let publisher = Client::connect(h1.addr, "pub", true).await;
    let publishing = publish_steadily(publisher, "move/t", next.clone(), stop.clone());

    let mut got = Vec::new();
    for (i, host) in [h3, h2, h3].into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(700)).await;
        while let Some(p) = mover.publish_within(Duration::from_millis(20)).await {
            got.extend(numbers(&[p]));
        }
        got.extend(numbers(&mover.disconnect_draining().await));
        mover = Client::connect(host.addr, "mover", false).await;
        assert!(mover.session_present, "move {i}: the session came along");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.notify_one();
    let end = publishing.await.expect("publisher");
    got.extend(read_until(&mut mover, end - 1).await);
    assert_all("mover", &got, from, end);
}

/// A worker that restarts under a connected session: its edge holds the session (no lease)
/// and, with the lease back, the session asks for what other hosts stored meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_restart_under_a_session_is_caught_up() {
    init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let mongo = Secantus::start(dir.path()).await;
    let h1 = BrokerHost::start(dir.path(), "h1", Some(mongo.uri())).await;
    let mut h2 = BrokerHost::start(dir.path(), "h2", Some(mongo.uri())).await;
    let stored = messages(&mongo.uri()).await;

    let mut sub = Client::connect(h2.addr, "gap-sub", true).await;
    sub.subscribe("gap/#", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect(h1.addr, "pub", true).await;
    until_addressed(&mut publisher, &stored, "gap/probe", &["h2"]).await;
    let probes = addressed(&stored, "gap/probe").await.len();
    sub.publishes(probes).await;

    h2.kill_worker();
    publisher
        .publish_many_acked("gap/x", QoS::AtLeastOnce, series("g", 20))
        .await;
    h2.start_worker().await;
    publisher
        .publish_many_acked("gap/x", QoS::AtLeastOnce, series("h", 5))
        .await;
    let mut want: Vec<String> = series("g", 20);
    want.extend(series("h", 5));
    let mut got = payloads(&sub.publishes(25).await);
    got.sort();
    assert_eq!(got, want, "every message stored while the worker was away");
}

/// A route stays for a grace period after its last session left, then goes; a dead host's
/// routes stop counting once its heartbeat is old, and its persistent sessions resume
/// elsewhere with what they are owed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_outlive_their_last_session_briefly_and_a_dead_host_not_at_all() {
    let (_dir, mongo, mut hosts) = hosts(3, false).await;
    let [h1, h2, h3] = &mut hosts[..] else {
        unreachable!()
    };
    let stored = messages(&mongo.uri()).await;
    let mut publisher = Client::connect(h1.addr, "pub", true).await;

    let mut leaving = Client::connect(h2.addr, "leaving", true).await;
    leaving.subscribe("left/#", QoS::AtLeastOnce).await;
    let mut doomed = Client::connect(h3.addr, "doomed", false).await;
    doomed.subscribe("dead/#", QoS::AtLeastOnce).await;
    until_addressed(&mut publisher, &stored, "left/probe", &["h2"]).await;
    until_addressed(&mut publisher, &stored, "dead/probe", &["h3"]).await;

    leaving.disconnect().await;
    h3.kill();
    publisher
        .publish_acked("left/1", QoS::AtLeastOnce, "in the grace period")
        .await;
    assert_eq!(
        addressed(&stored, "left/1").await,
        [vec!["h2".to_owned()]],
        "the route stays for its grace period"
    );
    // Grace (10 s) and a dead host's heartbeat age (10 s) both run out.
    tokio::time::sleep(Duration::from_secs(12)).await;
    publisher
        .publish_acked("left/2", QoS::AtLeastOnce, "after it")
        .await;
    publisher
        .publish_acked("dead/1", QoS::AtLeastOnce, "owed to doomed")
        .await;
    assert_eq!(addressed(&stored, "left/2").await, [Vec::<String>::new()]);
    assert_eq!(
        addressed(&stored, "dead/1").await,
        [Vec::<String>::new()],
        "a dead host is addressed no more"
    );
    let mut doomed = Client::connect(h2.addr, "doomed", false).await;
    assert!(doomed.session_present);
    let mut owed = Vec::new();
    while let Some(p) = doomed.publish_within(Duration::from_secs(3)).await {
        owed.push(String::from_utf8_lossy(&p.payload).into_owned());
    }
    assert!(
        owed.iter().any(|p| p == "owed to doomed"),
        "the session resumed elsewhere has what the dead host's routes no longer drew: {owed:?}"
    );
}
