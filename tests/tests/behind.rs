//! "Who is behind": the admin API lists stored sessions from the store, whatever host they
//! are on, each with the messages it is owed and the oldest one's age, paged; on both
//! backends.

use std::time::Duration;
use tempfile::TempDir;
use wharf_tests::fleet::{Pace, Publisher, Subscriber};
use wharf_tests::mongo::Secantus;
use wharf_tests::process::{http, BrokerHost};

const PASSWORD: &str = "behind-test-admin";

async fn behind(host: &BrokerHost, query: &str) -> serde_json::Value {
    let auth = format!("Authorization: Bearer {PASSWORD}");
    let r = http(
        host.edge_ops,
        "GET",
        &format!("/api/v1/behind?{query}"),
        &[&auth],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    serde_json::from_str(&r.body).expect("JSON")
}

async fn host(dir: &std::path::Path, name: &str, mongo: Option<String>) -> BrokerHost {
    BrokerHost::start_with_args(dir, name, mongo, &[], &["--admin-password", PASSWORD]).await
}

/// Three persistent devices go away owing 5, 20 and 0 messages; the list, read on `reader`,
/// says so, in client id order, a page at a time.
async fn check(writer: &BrokerHost, reader: &BrokerHost) {
    for (id, n) in [("dev-a", 5u32), ("dev-b", 20), ("dev-c", 0)] {
        let filter = format!("{id}/#");
        let mut sub = Subscriber::start(writer.addr, id, false, &filter, 1, Pace::FULL_SPEED).await;
        sub.drop_connection();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let topic = format!("{id}/t");
        let acked = Publisher::new(format!("pub-{id}"), topic, 1)
            .run(writer.addr, 0, n)
            .await;
        assert_eq!(acked.len(), n as usize);
    }
    // The last publish is in the store before it is acknowledged; the ledger may trail.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let list = loop {
        let list = behind(reader, "search=dev-").await;
        let owed: Vec<u64> = list["sessions"]
            .as_array()
            .expect("sessions")
            .iter()
            .map(|s| s["owed"].as_u64().unwrap_or(0))
            .collect();
        if owed == [5, 20, 0] || tokio::time::Instant::now() > deadline {
            break list;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let sessions = list["sessions"].as_array().expect("sessions");
    let ids: Vec<&str> = sessions
        .iter()
        .filter_map(|s| s["clientId"].as_str())
        .collect();
    assert_eq!(ids, ["dev-a", "dev-b", "dev-c"], "{list}");
    let owed: Vec<u64> = sessions.iter().filter_map(|s| s["owed"].as_u64()).collect();
    assert_eq!(owed, [5, 20, 0], "{list}");
    assert!(sessions.iter().all(|s| s["owedComplete"] == true), "{list}");
    assert!(sessions[1]["oldestOwedAgeMs"].as_u64().is_some(), "{list}");
    assert!(sessions[2]["oldestOwedAgeMs"].is_null(), "{list}");
    assert!(
        sessions.iter().all(|s| s["host"] == writer.name.as_str()),
        "{list}"
    );
    // Paged: two, then the rest.
    let first = behind(reader, "search=dev-&limit=2").await;
    assert_eq!(
        first["sessions"].as_array().map(Vec::len),
        Some(2),
        "{first}"
    );
    assert_eq!(first["next"], "dev-b", "{first}");
    let second = behind(reader, "search=dev-&limit=2&after=dev-b").await;
    let rest: Vec<&str> = second["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .filter_map(|s| s["clientId"].as_str())
        .collect();
    assert_eq!(rest, ["dev-c"], "{second}");
    assert!(second["next"].is_null(), "{second}");
    // Ranked by what they are owed, across all of them: most first, the one owed nothing
    // left out.
    let ranked = behind(reader, "search=dev-&sort=owed").await;
    let order: Vec<&str> = ranked["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .filter_map(|s| s["clientId"].as_str())
        .collect();
    assert_eq!(order, ["dev-b", "dev-a"], "{ranked}");
    assert_eq!(ranked["ranked"]["scanned"], 3, "{ranked}");
    assert_eq!(ranked["ranked"]["complete"], true, "{ranked}");
    assert!(ranked["next"].is_null(), "{ranked}");
    let top = behind(reader, "search=dev-&sort=owed&limit=1").await;
    assert_eq!(top["sessions"][0]["clientId"], "dev-b", "{top}");
    assert_eq!(top["sessions"].as_array().map(Vec::len), Some(1), "{top}");
    // A prefix that matches nothing.
    let none = behind(reader, "search=nobody").await;
    assert_eq!(none["sessions"].as_array().map(Vec::len), Some(0), "{none}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_embedded_store_says_who_is_behind() {
    wharf_tests::init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let h1 = host(dir.path(), "h1", None).await;
    check(&h1, &h1).await;
}

/// On MongoDB, read on another host than the sessions': the list comes from the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mongodb_says_who_is_behind_on_every_host() {
    wharf_tests::init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let mongo = Secantus::start(dir.path()).await;
    let h1 = host(dir.path(), "h1", Some(mongo.uri())).await;
    let h2 = host(dir.path(), "h2", Some(mongo.uri())).await;
    check(&h1, &h2).await;
}
