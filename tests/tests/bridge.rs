//! Bridges to other brokers, on real processes, checked by message identity: Debian's
//! Mosquitto and another Wharf as the remote; the remote stopped under load and restarted,
//! Wharf's edge killed mid-drain, a remote that refuses, loops, and a cluster whose bridge
//! host dies.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use tempfile::TempDir;
use wharf_tests::fleet::{check, complaints, Pace, Publisher, Subscriber};
use wharf_tests::mongo::Secantus;
use wharf_tests::mosquitto::Mosquitto;
use wharf_tests::process::{http, BrokerHost};

const ADMIN_PASSWORD: &str = "bridge-test-admin";

/// How long the remote stays down under load (`WHARF_BRIDGE_OUTAGE_SECS`, 10 by default).
fn outage() -> Duration {
    let secs = std::env::var("WHARF_BRIDGE_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    Duration::from_secs(secs)
}

fn bridges(remote: SocketAddr, protocol: &str, extra: &str, topics: &str) -> String {
    format!(
        r#"[{{"name": "cloud", "address": "{remote}", "protocol": "{protocol}"{extra}, {topics}}}]"#
    )
}

async fn start_host(
    dir: &std::path::Path,
    name: &str,
    mongodb_uri: Option<String>,
    bridges: &str,
) -> BrokerHost {
    BrokerHost::start_with_args(
        dir,
        name,
        mongodb_uri,
        &[],
        &["--bridges", bridges, "--admin-password", ADMIN_PASSWORD],
    )
    .await
}

/// The bridge's status from the host's admin API.
async fn status(host: &BrokerHost) -> serde_json::Value {
    let auth = format!("Authorization: Bearer {ADMIN_PASSWORD}");
    let response = http(host.edge_ops, "GET", "/api/v1/bridges", &[&auth], "").await;
    assert_eq!(response.status, 200, "{}", response.body);
    let body: serde_json::Value = serde_json::from_str(&response.body).expect("JSON");
    body["bridges"][0].clone()
}

/// Waits until the bridge's status satisfies `done` (`what` names it in the failure).
async fn wait_for_status(
    host: &BrokerHost,
    what: &str,
    within: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let s = status(host).await;
        if done(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "bridge on {}: not {what} within {within:?}: {s}",
            host.name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for_state(host: &BrokerHost, state: &str, within: Duration) -> serde_json::Value {
    wait_for_status(host, state, within, |s| s["state"] == state).await
}

async fn wait_for_forwarded(host: &BrokerHost, n: u64) {
    // Counted when the remote's PUBACK arrives, which may follow its delivery.
    wait_for_status(
        host,
        &format!("{n} forwarded"),
        Duration::from_secs(10),
        |s| s["forwarded"].as_u64() >= Some(n),
    )
    .await;
}

/// Whether every acknowledged message of `acked`'s publishers has arrived (others' ignored).
fn complete(acked: &HashMap<String, Vec<u32>>) -> impl Fn(&[(String, u32)]) -> bool + '_ {
    let wanted: std::collections::HashSet<(&str, u32)> = acked
        .iter()
        .flat_map(|(publisher, seqs)| seqs.iter().map(move |&seq| (publisher.as_str(), seq)))
        .collect();
    move |got| {
        let arrived: std::collections::HashSet<(&str, u32)> = got
            .iter()
            .map(|(publisher, seq)| (publisher.as_str(), *seq))
            .filter(|m| wanted.contains(m))
            .collect();
        arrived.len() >= wanted.len()
    }
}

/// Publishes `from..to` as `client` on `topic` and returns what the broker acknowledged.
async fn publish(addr: SocketAddr, client: &str, topic: &str, from: u32, to: u32) -> Vec<u32> {
    Publisher::new(client, topic, 1).run(addr, from, to).await
}

fn assert_every_acknowledged_arrived(
    who: &str,
    sub: &Subscriber,
    acked: &HashMap<String, Vec<u32>>,
) {
    let arrived = sub.snapshot();
    let verdicts = check(&arrived, acked);
    if let Some(c) = complaints(who, &verdicts, |_| true) {
        panic!("{c}");
    }
}

/// Out to Mosquitto: the remote stopped for a while under load and restarted with its
/// persistence, the edge SIGKILLed while the remote is away and again while the backlog
/// drains. Every message Wharf
/// acknowledged reaches the consumer on the remote, in order per publisher.
///
/// Mosquitto's own bridge (a local Mosquitto with persistence, `cleansession false`, QoS 1)
/// goes through the same faults at the same moments, to the same remote: what it lost is
/// printed (`mosquitto bridge lost ...`), not asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_message_reaches_mosquitto_across_its_outage_and_a_kill() {
    wharf_tests::init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let mut remote = Mosquitto::start(&dir.path().join("remote"), true, "").await;
    let config = bridges(
        remote.addr,
        "3.1.1",
        "",
        r#""out": [{"filter": "fleet/#", "remotePrefix": "site-1/"}]"#,
    );
    let mut host = start_host(dir.path(), "h1", None, &config).await;
    let mosquitto_bridge = format!(
        "connection cloud\naddress {}\ntopic fleet/# out 1 \"\" site-2/\n\
         cleansession false\nclientid mosquitto-bridge\nbridge_protocol_version mqttv311\n\
         restart_timeout 1 5\n",
        remote.addr
    );
    let mut peer = Mosquitto::start(&dir.path().join("peer"), true, &mosquitto_bridge).await;
    let mut consumer = Subscriber::start(
        remote.addr,
        "cloud-consumer",
        false,
        "site-1/fleet/#",
        1,
        Pace::FULL_SPEED,
    )
    .await;
    let mut peer_consumer = Subscriber::start(
        remote.addr,
        "peer-consumer",
        false,
        "site-2/fleet/#",
        1,
        Pace::FULL_SPEED,
    )
    .await;
    wait_for_state(&host, "connected", Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Live, then under load while the remote goes away.
    let mut acked = HashMap::new();
    let mut peer_acked = HashMap::new();
    let (w, m) = tokio::join!(
        publish(host.addr, "d1", "fleet/d1", 0, 3_000),
        publish(peer.addr, "d1", "fleet/d1", 0, 3_000)
    );
    acked.insert("d1".to_string(), w);
    peer_acked.insert("d1".to_string(), m);
    let (addr, peer_addr) = (host.addr, peer.addr);
    let loaded = tokio::spawn(async move { publish(addr, "d2", "fleet/d2", 0, 20_000).await });
    let peer_loaded =
        tokio::spawn(async move { publish(peer_addr, "d2", "fleet/d2", 0, 20_000).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    remote.stop().await;
    tokio::time::sleep(outage()).await;
    let during = loaded.await.expect("publisher");
    assert_eq!(
        during.len(),
        20_000,
        "Wharf acknowledges while the remote is away"
    );
    acked.insert("d2".to_string(), during);
    peer_acked.insert("d2".to_string(), peer_loaded.await.expect("publisher"));
    let failed = status(&host).await;
    assert_eq!(failed["state"], "failed", "{failed}");
    // The backlog as the store counts it, and its oldest message's age.
    wait_for_status(&host, "showing a backlog", Duration::from_secs(15), |s| {
        s["backlog"].as_u64() >= Some(10_000) && s["oldestOwedAgeMs"].as_u64() > Some(0)
    })
    .await;
    // The local broker crashes while the remote is away, with the backlog it holds.
    host.kill_edge();
    peer.kill();
    host.start_edge().await;
    peer.restart().await;

    remote.restart().await;
    consumer
        .connect(remote.addr, false, None, Pace::FULL_SPEED)
        .await;
    peer_consumer
        .connect(remote.addr, false, None, Pace::FULL_SPEED)
        .await;
    // Killed again while the backlog drains (each once its consumer has 500 more): what the
    // remote had not acknowledged stays owed.
    for (wharf, sub) in [(true, &consumer), (false, &peer_consumer)] {
        let before = sub.count();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while sub.count() < before + 500 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if wharf {
            host.kill_edge();
            host.start_edge().await;
        } else {
            peer.kill();
            peer.restart().await;
        }
    }
    let (w, m) = tokio::join!(
        publish(host.addr, "d3", "fleet/d3", 0, 2_000),
        publish(peer.addr, "d3", "fleet/d3", 0, 2_000)
    );
    acked.insert("d3".to_string(), w);
    peer_acked.insert("d3".to_string(), m);
    consumer
        .wait_for(Duration::from_secs(30), complete(&acked))
        .await;
    peer_consumer
        .wait_for(Duration::from_secs(10), complete(&peer_acked))
        .await;
    let peer_verdicts = check(&peer_consumer.snapshot(), &peer_acked);
    let lost: usize = peer_verdicts.values().map(|v| v.missing.len()).sum();
    let total: usize = peer_acked.values().map(Vec::len).sum();
    eprintln!(
        "mosquitto bridge lost {lost} of {total} acknowledged messages ({:?})",
        peer_verdicts
            .iter()
            .map(|(p, v)| (p.clone(), v.missing.len(), v.out_of_order, v.duplicates))
            .collect::<Vec<_>>()
    );
    assert_every_acknowledged_arrived("consumer on Mosquitto", &consumer, &acked);
    let s = wait_for_state(&host, "connected", Duration::from_secs(20)).await;
    assert_eq!(s["outInFlight"], 0, "{s}");
    wait_for_status(&host, "without a backlog", Duration::from_secs(15), |s| {
        s["backlog"] == 0 && s["backlogComplete"] == true && s["oldestOwedAgeMs"].is_null()
    })
    .await;
}

/// In from Mosquitto: what the remote's session holds for the bridge is taken into Wharf's
/// store before the remote hears it was, across Wharf's restart; a 3.1.1 remote's echo of
/// what the bridge forwarded is not published again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mosquitto_messages_come_in_and_echoes_of_3_1_1_do_not_loop() {
    wharf_tests::init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let remote = Mosquitto::start(&dir.path().join("remote"), true, "").await;
    let config = bridges(
        remote.addr,
        "3.1.1",
        "",
        r#""out": [{"filter": "both/#"}], "in": [{"filter": "cmd/#"}, {"filter": "both/#"}]"#,
    );
    let mut host = start_host(dir.path(), "h1", None, &config).await;
    wait_for_state(&host, "connected", Duration::from_secs(20)).await;
    let local = Subscriber::start(host.addr, "app", false, "cmd/#", 1, Pace::FULL_SPEED).await;
    let both_local =
        Subscriber::start(host.addr, "both-local", true, "both/#", 1, Pace::FULL_SPEED).await;
    let both_remote = Subscriber::start(
        remote.addr,
        "both-remote",
        true,
        "both/#",
        1,
        Pace::FULL_SPEED,
    )
    .await;

    let mut acked = HashMap::new();
    acked.insert(
        "c1".to_string(),
        publish(remote.addr, "c1", "cmd/a", 0, 2_000).await,
    );
    // Wharf away: Mosquitto keeps them in the bridge's session.
    host.kill_edge();
    acked.insert(
        "c2".to_string(),
        publish(remote.addr, "c2", "cmd/b", 0, 2_000).await,
    );
    host.start_edge().await;
    let mut local = local;
    local
        .connect(host.addr, false, None, Pace::FULL_SPEED)
        .await;
    local
        .wait_for(Duration::from_secs(20), complete(&acked))
        .await;
    assert_every_acknowledged_arrived("app on Wharf", &local, &acked);
    drop(both_local);

    // Both ways on one filter: each message once on each side, no loop.
    let both_local = Subscriber::start(
        host.addr,
        "both-local-2",
        true,
        "both/#",
        1,
        Pace::FULL_SPEED,
    )
    .await;
    wait_for_state(&host, "connected", Duration::from_secs(20)).await;
    let mut sent = HashMap::new();
    sent.insert(
        "w".to_string(),
        publish(host.addr, "w", "both/w", 0, 300).await,
    );
    sent.insert(
        "m".to_string(),
        publish(remote.addr, "m", "both/m", 0, 300).await,
    );
    both_local
        .wait_for(Duration::from_secs(5), complete(&sent))
        .await;
    both_remote
        .wait_for(Duration::from_secs(5), complete(&sent))
        .await;
    // Time for a loop to show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (who, sub) in [("Mosquitto", &both_remote), ("Wharf", &both_local)] {
        let verdicts = check(&sub.snapshot(), &sent);
        if let Some(c) = complaints(who, &verdicts, |_| false) {
            panic!("{c}");
        }
        assert_eq!(sub.count(), 600, "{who}: each message exactly once");
    }
    let s = status(&host).await;
    assert!(s["echoesSkipped"].as_u64() >= Some(300), "{s}");
}

/// Wharf to Wharf over MQTT 5.0, both ways on one filter: No Local on both subscriptions,
/// each message once on each side.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_wharfs_bridge_both_ways_without_a_loop() {
    wharf_tests::init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let remote = BrokerHost::start(dir.path(), "remote", None).await;
    let config = bridges(
        remote.addr,
        "5.0",
        "",
        r#""out": [{"filter": "both/#"}], "in": [{"filter": "both/#"}, {"filter": "down/#", "localPrefix": "from-cloud/"}]"#,
    );
    let host = start_host(dir.path(), "h1", None, &config).await;
    wait_for_state(&host, "connected", Duration::from_secs(20)).await;
    let here = Subscriber::start(host.addr, "here", true, "both/#", 1, Pace::FULL_SPEED).await;
    let there = Subscriber::start(remote.addr, "there", true, "both/#", 1, Pace::FULL_SPEED).await;
    let down = Subscriber::start(
        host.addr,
        "down",
        true,
        "from-cloud/down/#",
        1,
        Pace::FULL_SPEED,
    )
    .await;
    let mut sent = HashMap::new();
    sent.insert(
        "w".to_string(),
        publish(host.addr, "w", "both/w", 0, 500).await,
    );
    sent.insert(
        "r".to_string(),
        publish(remote.addr, "r", "both/r", 0, 500).await,
    );
    let mut downs = HashMap::new();
    downs.insert(
        "x".to_string(),
        publish(remote.addr, "x", "down/x", 0, 200).await,
    );
    here.wait_for(Duration::from_secs(5), complete(&sent)).await;
    there
        .wait_for(Duration::from_secs(5), complete(&sent))
        .await;
    down.wait_for(Duration::from_secs(5), complete(&downs))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (who, sub) in [("local Wharf", &here), ("remote Wharf", &there)] {
        let verdicts = check(&sub.snapshot(), &sent);
        if let Some(c) = complaints(who, &verdicts, |_| false) {
            panic!("{c}");
        }
        assert_eq!(sub.count(), 1_000, "{who}: each message exactly once");
    }
    assert_every_acknowledged_arrived("prefixed on Wharf", &down, &downs);
}

/// A remote that refuses the bridge's password: a clear error in the status, nothing marked
/// forwarded; with the right password everything owed meanwhile goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_remote_that_refuses_gets_nothing_marked_forwarded() {
    wharf_tests::init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let remote_dir = dir.path().join("remote");
    std::fs::create_dir_all(&remote_dir).expect("dir");
    let passwords = remote_dir.join("passwords");
    let made = std::process::Command::new("mosquitto_passwd")
        .args(["-c", "-b"])
        .arg(&passwords)
        .args(["site", "right-password"])
        .status()
        .expect("mosquitto_passwd");
    assert!(made.success());
    let extra = format!(
        "allow_anonymous false\npassword_file {}\n",
        passwords.display()
    );
    let remote = Mosquitto::start(&remote_dir, true, &extra).await;
    let wrong = bridges(
        remote.addr,
        "5.0",
        r#", "username": "site", "password": "wrong""#,
        r#""out": [{"filter": "fleet/#"}]"#,
    );
    let mut host = start_host(dir.path(), "h1", None, &wrong).await;
    let mut acked = HashMap::new();
    acked.insert(
        "d".to_string(),
        publish(host.addr, "d", "fleet/d", 0, 500).await,
    );
    let s = wait_for_state(&host, "failed", Duration::from_secs(20)).await;
    let error = s["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("refused") && (error.contains("password") || error.contains("authorized")),
        "{s}"
    );
    assert_eq!(s["forwarded"], 0, "{s}");

    host.terminate().await;
    let right = bridges(
        remote.addr,
        "5.0",
        r#", "username": "site", "password": "right-password""#,
        r#""out": [{"filter": "fleet/#"}]"#,
    );
    // A consumer on the remote needs the password too: a mosquitto_sub with the right one,
    // counting what arrives. Its session is persistent and subscribed before the bridge
    // starts (`-E`: exit once subscribed), so that nothing the bridge forwards can come
    // before its subscription, however slow the machine.
    let consumer = |extra: &[&str]| {
        let mut c = tokio::process::Command::new("mosquitto_sub");
        c.args(["-h", "127.0.0.1", "-p", &remote.addr.port().to_string()])
            .args(["-u", "site", "-P", "right-password", "-t", "fleet/#"])
            .args(["-q", "1", "-c", "-i", "refusal-consumer"])
            .args(extra)
            .stdout(std::process::Stdio::piped());
        c
    };
    let subscribed = consumer(&["-E"]).status().await.expect("mosquitto_sub -E");
    assert!(subscribed.success(), "the consumer could not subscribe");
    let sub = consumer(&["-C", "500", "-W", "60"])
        .spawn()
        .expect("mosquitto_sub");
    let host = start_host(dir.path(), "h1", None, &right).await;
    let out = sub.wait_with_output().await.expect("mosquitto_sub output");
    let text = String::from_utf8_lossy(&out.stdout);
    let got: std::collections::HashSet<&str> = text.lines().collect();
    for seq in &acked["d"] {
        assert!(got.contains(format!("d:{seq}").as_str()), "d:{seq} missing");
    }
    wait_for_forwarded(&host, 500).await;
}

/// A bad bridge setting stops the edge with exit code 64, naming the setting.
#[tokio::test]
async fn a_bad_bridge_setting_exits_64_naming_it() {
    let dir = TempDir::new().expect("temp dir");
    let cases = [
        (
            r#"[{"name": "x", "out": [{"filter": "a"}]}]"#,
            "bridges[0].address",
        ),
        (
            r#"[{"name": "x", "address": "h:1", "out": [{"filter": "a", "qos": 2}]}]"#,
            "bridges[0].out[0].qos",
        ),
        (
            r#"[{"name": "x", "address": "h:1", "in": [{"filter": "a"}], "tls": {"ca": "/no/such/ca.pem"}}]"#,
            "bridges[0].tls.ca",
        ),
        ("/no/such/bridges.json", "bridges"),
    ];
    for (value, key) in cases {
        let out = std::process::Command::new(wharf_tests::process::bin("edge"))
            .args(["--listen", "127.0.0.1:0", "--worker-socket"])
            .arg(dir.path().join("none.sock"))
            .args(["--bridges", value])
            .output()
            .expect("run edge");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{value}: {stderr}");
        assert!(stderr.contains(key), "{value}: {stderr}");
    }
}

/// Two hosts on one MongoDB with the same bridge: one runs it, the other stands by and takes
/// over within seconds when the first dies; nothing acknowledged on either is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_host_runs_a_bridge_and_another_takes_over_when_it_dies() {
    wharf_tests::init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let mongo = Secantus::start(dir.path()).await;
    let remote = Mosquitto::start(&dir.path().join("remote"), true, "").await;
    let config = bridges(remote.addr, "5.0", "", r#""out": [{"filter": "fleet/#"}]"#);
    let mut h1 = start_host(dir.path(), "h1", Some(mongo.uri()), &config).await;
    wait_for_state(&h1, "connected", Duration::from_secs(30)).await;
    let h2 = start_host(dir.path(), "h2", Some(mongo.uri()), &config).await;
    wait_for_state(&h2, "standby", Duration::from_secs(30)).await;
    let consumer = Subscriber::start(
        remote.addr,
        "cloud-consumer",
        false,
        "fleet/#",
        1,
        Pace::FULL_SPEED,
    )
    .await;
    let mut acked = HashMap::new();
    acked.insert(
        "a".to_string(),
        publish(h1.addr, "a", "fleet/a", 0, 300).await,
    );
    acked.insert(
        "b".to_string(),
        publish(h2.addr, "b", "fleet/b", 0, 300).await,
    );
    consumer
        .wait_for(Duration::from_secs(20), complete(&acked))
        .await;
    assert_every_acknowledged_arrived("consumer, both hosts up", &consumer, &acked);

    h1.kill();
    let died = tokio::time::Instant::now();
    acked.insert(
        "c".to_string(),
        publish(h2.addr, "c", "fleet/c", 0, 300).await,
    );
    wait_for_state(&h2, "connected", Duration::from_secs(30)).await;
    let took = died.elapsed();
    consumer
        .wait_for(Duration::from_secs(30), complete(&acked))
        .await;
    assert_every_acknowledged_arrived("consumer after the takeover", &consumer, &acked);
    assert!(took < Duration::from_secs(30), "takeover took {took:?}");
    eprintln!("bridge taken over {took:?} after its host died");
}

/// No client may take a bridge's local session: `$bridge/...` client ids are refused.
#[tokio::test]
async fn a_client_cannot_take_a_bridges_session() {
    let (_dir, host) = BrokerHost::single().await;
    let mut raw = wharf_tests::raw::Raw::connect(host.addr).await;
    raw.send(&wharf_tests::raw::connect_bytes("$bridge/cloud", false, 30))
        .await;
    match raw.recv_within(Duration::from_secs(10)).await {
        Some(rumqttc::mqttbytes::v4::Packet::ConnAck(ack)) => assert_eq!(
            ack.code,
            rumqttc::mqttbytes::v4::ConnectReturnCode::BadClientId
        ),
        other => panic!("expected CONNACK 2, got {other:?}"),
    }
}

/// TLS with a client certificate, as AWS IoT Core requires: a remote Wharf that requires
/// client certificates takes the bridge's; a remote whose certificate does not chain to the
/// bridge's CA is refused with a clear error and nothing is marked forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bridge_over_mutual_tls_forwards_and_a_wrong_ca_is_refused() {
    use wharf_tests::certs::{Pki, TestCa, Validity};
    wharf_tests::init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let pki = Pki::new();
    let client = pki.ca.issue(
        pki.dir.path(),
        "bridge",
        "site-7",
        &["site-7"],
        false,
        Validity::Current,
    );
    let other_ca = TestCa::new("Another CA").write(pki.dir.path(), "other-ca");
    let tls_port = wharf_tests::process::free_port();
    let tls_addr = SocketAddr::from(([127, 0, 0, 1], tls_port));
    let path = |p: &std::path::Path| p.display().to_string();
    let remote = BrokerHost::start_with_args(
        dir.path(),
        "remote",
        None,
        &[],
        &[
            "--tls-listen",
            &tls_addr.to_string(),
            "--server-cert",
            &path(&pki.server.cert),
            "--server-key",
            &path(&pki.server.key),
            "--cacert",
            &path(&pki.ca_path),
            "--client-certs",
            "required",
        ],
    )
    .await;
    let consumer = Subscriber::start(
        remote.addr,
        "consumer",
        true,
        "fleet/#",
        1,
        Pace::FULL_SPEED,
    )
    .await;
    let tls = |ca: &str| {
        format!(
            r#", "tls": {{"ca": "{ca}", "cert": "{}", "key": "{}", "serverName": "localhost"}}"#,
            path(&client.cert),
            path(&client.key)
        )
    };
    let good = bridges(
        tls_addr,
        "5.0",
        &tls(&path(&pki.ca_path)),
        r#""out": [{"filter": "fleet/#"}]"#,
    );
    let host = start_host(dir.path(), "h1", None, &good).await;
    wait_for_state(&host, "connected", Duration::from_secs(20)).await;
    let mut acked = HashMap::new();
    acked.insert(
        "t".to_string(),
        publish(host.addr, "t", "fleet/t", 0, 300).await,
    );
    consumer
        .wait_for(Duration::from_secs(10), complete(&acked))
        .await;
    assert_every_acknowledged_arrived("consumer behind mutual TLS", &consumer, &acked);

    let wrong = bridges(
        tls_addr,
        "5.0",
        &tls(&path(&other_ca)),
        r#""out": [{"filter": "fleet/#"}]"#,
    );
    let refused = start_host(dir.path(), "h2", None, &wrong).await;
    publish(refused.addr, "u", "fleet/u", 0, 50).await;
    let s = wait_for_state(&refused, "failed", Duration::from_secs(20)).await;
    let error = s["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("TLS") && error.contains("certificate"),
        "{s}"
    );
    assert_eq!(s["forwarded"], 0, "{s}");
}

/// A remote restarted without its persistence has forgotten the bridge's session: the bridge
/// subscribes again on every connection, so what comes in keeps coming, and what was owed
/// meanwhile is forwarded (acknowledged by the remote).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_remote_restarted_without_persistence_is_subscribed_again() {
    wharf_tests::init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let mut remote = Mosquitto::start(&dir.path().join("remote"), false, "").await;
    let config = bridges(
        remote.addr,
        "5.0",
        "",
        r#""out": [{"filter": "fleet/#"}], "in": [{"filter": "cmd/#"}]"#,
    );
    let host = start_host(dir.path(), "h1", None, &config).await;
    wait_for_state(&host, "connected", Duration::from_secs(20)).await;
    let app = Subscriber::start(host.addr, "app", false, "cmd/#", 1, Pace::FULL_SPEED).await;
    remote.stop().await;
    let owed = publish(host.addr, "a", "fleet/a", 0, 500).await;
    assert_eq!(owed.len(), 500);
    remote.restart().await;
    let consumer = Subscriber::start(
        remote.addr,
        "consumer",
        true,
        "fleet/#",
        1,
        Pace::FULL_SPEED,
    )
    .await;
    wait_for_state(&host, "connected", Duration::from_secs(30)).await;
    let mut after = HashMap::new();
    after.insert(
        "b".to_string(),
        publish(host.addr, "b", "fleet/b", 0, 300).await,
    );
    consumer
        .wait_for(Duration::from_secs(10), complete(&after))
        .await;
    assert_every_acknowledged_arrived("consumer after the remote's restart", &consumer, &after);
    let mut commands = HashMap::new();
    commands.insert(
        "c".to_string(),
        publish(remote.addr, "c", "cmd/c", 0, 300).await,
    );
    app.wait_for(Duration::from_secs(10), complete(&commands))
        .await;
    assert_every_acknowledged_arrived("app after the remote's restart", &app, &commands);
    wait_for_forwarded(&host, 800).await;
}

/// Another Wharf as the remote, over MQTT 5.0: the remote SIGKILLed (edge and worker) under
/// load and started again on its own store, the local edge SIGKILLed mid-drain. Every message
/// the local Wharf acknowledged reaches the remote's persistent consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_message_reaches_a_remote_wharf_across_kills_of_both() {
    wharf_tests::init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let mut remote = BrokerHost::start(dir.path(), "remote", None).await;
    let config = bridges(
        remote.addr,
        "5.0",
        "",
        r#""out": [{"filter": "fleet/#", "remotePrefix": "site-1/"}]"#,
    );
    let mut host = start_host(dir.path(), "h1", None, &config).await;
    let mut consumer = Subscriber::start(
        remote.addr,
        "cloud-consumer",
        false,
        "site-1/fleet/#",
        1,
        Pace::FULL_SPEED,
    )
    .await;
    wait_for_state(&host, "connected", Duration::from_secs(20)).await;
    let mut acked = HashMap::new();
    acked.insert(
        "d1".to_string(),
        publish(host.addr, "d1", "fleet/d1", 0, 2_000).await,
    );
    let addr = host.addr;
    let loaded = tokio::spawn(async move { publish(addr, "d2", "fleet/d2", 0, 10_000).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    remote.kill();
    tokio::time::sleep(outage()).await;
    let during = loaded.await.expect("publisher");
    assert_eq!(
        during.len(),
        10_000,
        "Wharf acknowledges while the remote is away"
    );
    acked.insert("d2".to_string(), during);
    remote.start_worker().await;
    remote.start_edge().await;
    consumer
        .connect(remote.addr, false, None, Pace::FULL_SPEED)
        .await;
    let before = consumer.count();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while consumer.count() < before + 500 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    host.kill_edge();
    host.start_edge().await;
    acked.insert(
        "d3".to_string(),
        publish(host.addr, "d3", "fleet/d3", 0, 1_000).await,
    );
    consumer
        .wait_for(Duration::from_secs(30), complete(&acked))
        .await;
    assert_every_acknowledged_arrived("consumer on the remote Wharf", &consumer, &acked);
}
