//! Users and rules in MongoDB changed through the admin API: a user added on one host can
//! connect to another within the refresh period, its hash never shown; a rule added there
//! takes effect, a malformed one is refused before it reaches the store, a removed one stops
//! applying; a removed user is refused and its connection ended; every change names who made
//! it. On the embedded store the API says it keeps none.

use mongodb::bson::{doc, Document};
use rumqttc::QoS;
use serde_json::Value;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use wharf_tests::client::{Client, Options};
use wharf_tests::mongo::Secantus;
use wharf_tests::process::{http, BrokerHost};

const PASSWORD: &str = "admin-auth-console";

async fn call(host: &BrokerHost, method: &str, path: &str, body: &str) -> (u16, Value) {
    let auth = format!("Authorization: Bearer {PASSWORD}");
    let r = http(
        host.edge_ops,
        method,
        path,
        &[&auth, "Content-Type: application/json"],
        body,
    )
    .await;
    (
        r.status,
        serde_json::from_str(&r.body).unwrap_or(Value::Null),
    )
}

async fn host(dir: &std::path::Path, name: &str, mongo: Option<String>, store: bool) -> BrokerHost {
    let mut edge = vec!["--admin-password", PASSWORD];
    if store {
        edge.extend(["--store-users", "true", "--store-acl", "true"]);
    }
    BrokerHost::start_with_args(dir, name, mongo, &[], &edge).await
}

async fn connect(
    host: &BrokerHost,
    id: &str,
    user: &str,
    password: &str,
) -> Result<Client, String> {
    let options = Options {
        credentials: Some((user.into(), password.into())),
        ..Options::default()
    };
    Client::try_connect_with(host.addr, id, options).await
}

/// Retries `f` until it is true or 10 s have passed.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_and_rules_are_changed_through_the_admin_api() {
    wharf_tests::init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let mongo = Secantus::start(dir.path()).await;
    let h1 = host(dir.path(), "h1", Some(mongo.uri()), true).await;
    let h2 = host(dir.path(), "h2", Some(mongo.uri()), true).await;

    // A user, made on h1, connects to h2.
    let (status, body) = call(
        &h1,
        "PUT",
        "/api/v1/users/dev1",
        r#"{"password": "dev1-secret-pw"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(&h1, "PUT", "/api/v1/users/short", r#"{"password": "x"}"#).await;
    assert_eq!(status, 400, "{body}");
    eventually("the new user admitted on h2", || async {
        connect(&h2, "dev1", "dev1", "dev1-secret-pw").await.is_ok()
    })
    .await;
    assert!(connect(&h2, "dev1", "dev1", "wrong-password")
        .await
        .is_err());
    let (status, users) = call(&h2, "GET", "/api/v1/users", "").await;
    assert_eq!(status, 200, "{users}");
    let listed = users["users"].as_array().expect("users");
    assert_eq!(listed.len(), 1, "{users}");
    assert_eq!(listed[0]["username"], "dev1", "{users}");
    assert_eq!(listed[0]["hash"], "argon2", "{users}");
    assert!(
        !users.to_string().contains("$argon2"),
        "no hash shown: {users}"
    );

    // The document says who made it.
    let client = mongodb::Client::with_uri_str(mongo.uri())
        .await
        .expect("mongo");
    let db = client.database("mqtt");
    let user_doc: Document = db
        .collection::<Document>("mqtt_user")
        .find_one(doc! { "username": "dev1" })
        .await
        .expect("read")
        .expect("the user's document");
    let by = user_doc.get_str("updatedBy").expect("updatedBy");
    assert!(by.starts_with("admin (credentials, from 127.0.0.1"), "{by}");

    // No rule lets dev1 subscribe yet (no match denies).
    let mut dev1 = connect(&h2, "dev1", "dev1", "dev1-secret-pw")
        .await
        .expect("dev1");
    assert!(
        !dev1
            .subscribe_granted("dev/dev1/cmd", QoS::AtLeastOnce)
            .await
    );
    // Malformed rules are refused before they reach the store.
    for bad in [
        r#"{"permission": "maybe", "action": "all", "topics": ["x"]}"#,
        r#"{"permission": "allow", "action": "all", "topics": []}"#,
        r#"{"permission": "allow", "action": "all", "topics": ["x"], "extra": 1}"#,
        r#"{"permission": "allow", "action": "all", "topics": [42]}"#,
        r#"{"username": 4242, "permission": "allow", "action": "all", "topics": ["x"]}"#,
        r#"["not", "an", "object"]"#,
        // Well formed as JSON, refused as a rule the edges read (checked before the write).
        r#"{"permission": "allow", "action": "all", "topics": ["a/#/b"]}"#,
        r#"{"permission": "deny", "action": "all", "topics": ["dev/x${username}"]}"#,
    ] {
        let (status, body) = call(&h1, "POST", "/api/v1/rules", bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let rule = r#"{"username": "dev1", "permission": "allow", "action": "subscribe", "topics": ["dev/${username}/cmd"]}"#;
    let (status, body) = call(&h1, "POST", "/api/v1/rules", rule).await;
    assert_eq!(status, 200, "{body}");
    let (_, rules) = call(&h2, "GET", "/api/v1/rules", "").await;
    assert_eq!(rules["rules"].as_array().map(Vec::len), Some(1), "{rules}");
    assert_eq!(
        rules["rules"][0]["topics"][0], "dev/${username}/cmd",
        "{rules}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dev1
        .subscribe_granted("dev/dev1/cmd", QoS::AtLeastOnce)
        .await
    {
        assert!(Instant::now() < deadline, "the rule never applied on h2");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        !dev1
            .subscribe_granted("dev/other/cmd", QoS::AtLeastOnce)
            .await
    );

    // Removed: the rule stops applying; a rule that is not there is a 404-like failure.
    let (status, body) = call(&h2, "DELETE", "/api/v1/rules", rule).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = call(&h2, "DELETE", "/api/v1/rules", rule).await;
    assert_eq!(status, 502, "nothing left to remove");
    let deadline = Instant::now() + Duration::from_secs(10);
    while dev1
        .subscribe_granted("dev/dev1/cmd", QoS::AtLeastOnce)
        .await
    {
        assert!(
            Instant::now() < deadline,
            "the removed rule still applies on h2"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The user removed: refused, and its connection ended.
    let (status, body) = call(&h1, "DELETE", "/api/v1/users/dev1", "{}").await;
    assert_eq!(status, 200, "{body}");
    eventually("the removed user refused", || async {
        connect(&h2, "dev1-again", "dev1", "dev1-secret-pw")
            .await
            .is_err()
    })
    .await;
    eventually("the removed user's connection ended", || async {
        dev1.is_closed()
    })
    .await;
    let (status, _) = call(&h1, "DELETE", "/api/v1/users/dev1", "{}").await;
    assert_eq!(status, 502, "no such user any more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_keeps_no_users_or_rules() {
    wharf_tests::init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let h1 = host(dir.path(), "solo", None, false).await;
    for (method, path, body) in [
        ("GET", "/api/v1/users", ""),
        ("PUT", "/api/v1/users/u", r#"{"password": "long-enough"}"#),
        ("GET", "/api/v1/rules", ""),
    ] {
        let (status, body) = call(&h1, method, path, body).await;
        assert_eq!(status, 409, "{method} {path}: {body}");
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("MongoDB")),
            "{body}"
        );
    }
}
