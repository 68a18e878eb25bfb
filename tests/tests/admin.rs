//! The admin HTTP API on the ops address, against real edge and store-worker processes:
//! credentials, the client list and one client's session, disconnecting a client, retained
//! messages listed and cleared, a test message published; and the client's address from a
//! PROXY protocol header.

use rumqttc::QoS;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use tempfile::TempDir;
use tokio::process::Command;
use wharf_tests::client::{payloads, Client};
use wharf_tests::process::{http, BrokerHost, HttpResponse};
use wharf_tests::raw::{connect_bytes, Raw};
use wharf_tests::{init_tracing, PATIENCE};

const PASSWORD: &str = "console-secret-1";
/// `admin:console-secret-1`, base64.
const BASIC: &str = "Authorization: Basic YWRtaW46Y29uc29sZS1zZWNyZXQtMQ==";

async fn host_with(args: &[&str]) -> (TempDir, BrokerHost) {
    init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let mut edge_args = vec!["--admin-password", PASSWORD];
    edge_args.extend_from_slice(args);
    let host = BrokerHost::start_with_args(dir.path(), "h1", None, &[], &edge_args).await;
    (dir, host)
}

async fn call(host: &BrokerHost, method: &str, path: &str, body: &str) -> (u16, Value) {
    let response = http(
        host.edge_ops,
        method,
        path,
        &[BASIC, "Content-Type: application/json"],
        body,
    )
    .await;
    let json = serde_json::from_str(&response.body)
        .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {response:?}"));
    (response.status, json)
}

/// Polls `path` until `done` holds for its JSON.
async fn until(host: &BrokerHost, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (status, json) = call(host, "GET", path, "").await;
        if status == 200 && done(&json) {
            return json;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: last answer {status} {json}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn client_ids(list: &Value) -> Vec<String> {
    list["clients"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["clientId"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_needs_credentials() {
    let (_dir, host) = host_with(&[]).await;
    for headers in [
        &[][..],
        &["Authorization: Basic YWRtaW46d3Jvbmc="][..], // admin:wrong
        &["Authorization: Bearer wrong-password"][..],
        &["Authorization: Digest something"][..],
    ] {
        let HttpResponse { status, head, .. } =
            http(host.edge_ops, "GET", "/api/v1/clients", headers, "").await;
        assert_eq!(status, 401, "{headers:?}");
        // A challenge a browser does not answer with its own password dialog.
        assert!(head.contains("WWW-Authenticate: Bearer"), "{head}");
        assert!(!head.contains("Basic"), "{head}");
        // The console's page holds no data: it is served, with its login form.
        let console = http(host.edge_ops, "GET", "/console", headers, "").await;
        assert_eq!(console.status, 200, "the console's page");
        assert!(console.body.contains("id=\"login-form\""));
        assert!(
            console.head.contains("Content-Security-Policy"),
            "{}",
            console.head
        );
    }
    // A login: refused with the wrong password, a cookie with the right one, which then
    // opens the API until logout.
    let json = "Content-Type: application/json";
    let wrong = http(
        host.edge_ops,
        "POST",
        "/api/v1/login",
        &[json],
        r#"{"user": "admin", "password": "wrong"}"#,
    )
    .await;
    assert_eq!(wrong.status, 401, "{}", wrong.body);
    assert!(!wrong.head.contains("Set-Cookie"), "{}", wrong.head);
    let body = format!(r#"{{"user": "admin", "password": "{PASSWORD}"}}"#);
    let as_form = http(
        host.edge_ops,
        "POST",
        "/api/v1/login",
        &["Content-Type: application/x-www-form-urlencoded"],
        &body,
    )
    .await;
    assert_eq!(as_form.status, 415, "a cross-site form cannot log in");
    let good = http(host.edge_ops, "POST", "/api/v1/login", &[json], &body).await;
    assert_eq!(good.status, 200, "{}", good.body);
    let set = good
        .head
        .lines()
        .find_map(|l| l.strip_prefix("Set-Cookie: "))
        .expect("a cookie");
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let cookie = format!("Cookie: {}", set.split(';').next().expect("pair"));
    let with_cookie = http(host.edge_ops, "GET", "/api/v1/clients", &[&cookie], "").await;
    assert_eq!(with_cookie.status, 200, "{}", with_cookie.body);
    let forged = http(
        host.edge_ops,
        "GET",
        "/api/v1/clients",
        &["Cookie: wharf_console=00112233"],
        "",
    )
    .await;
    assert_eq!(forged.status, 401);
    let out = http(
        host.edge_ops,
        "POST",
        "/api/v1/logout",
        &[&cookie, json],
        "{}",
    )
    .await;
    assert_eq!(out.status, 200);
    let after = http(host.edge_ops, "GET", "/api/v1/clients", &[&cookie], "").await;
    assert_eq!(after.status, 401, "the login ended");
    // Failed logins are throttled: after ten in a minute, even the right password waits.
    for _ in 0..10 {
        http(
            host.edge_ops,
            "POST",
            "/api/v1/login",
            &[json],
            r#"{"user": "admin", "password": "guess"}"#,
        )
        .await;
    }
    let throttled = http(host.edge_ops, "POST", "/api/v1/login", &[json], &body).await;
    assert_eq!(throttled.status, 429, "{}", throttled.body);
    let bearer = format!("Authorization: Bearer {PASSWORD}");
    let ok = http(host.edge_ops, "GET", "/api/v1/clients", &[&bearer], "").await;
    assert_eq!(ok.status, 200, "{ok:?}");
    let console = http(host.edge_ops, "GET", "/console", &[BASIC], "").await;
    assert_eq!(console.status, 200);
    assert!(console.body.contains("<title>Wharf console</title>"));
    // Metrics and probes stay open, as before.
    assert_eq!(
        http(host.edge_ops, "GET", "/metrics", &[], "").await.status,
        200
    );
    assert_eq!(
        http(host.edge_ops, "GET", "/healthz", &[], "").await.status,
        200
    );
    let (status, _) = call(&host, "GET", "/api/v1/nothing", "").await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_off_without_a_password() {
    init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let host = BrokerHost::start_with_args(dir.path(), "h1", None, &[], &[]).await;
    let response = http(host.edge_ops, "GET", "/api/v1/clients", &[BASIC], "").await;
    assert_eq!(response.status, 404, "{response:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_sessions_retained_and_publish() {
    let (_dir, host) = host_with(&[]).await;
    let mut device = Client::connect(host.addr, "dev-17", false).await;
    device.subscribe("cmd/dev-17", QoS::AtLeastOnce).await;

    let list = until(&host, "/api/v1/clients?search=dev-", "dev-17 listed", |l| {
        client_ids(l) == ["dev-17"]
    })
    .await;
    let entry = &list["clients"][0];
    assert_eq!(entry["protocol"], "3.1.1");
    assert_eq!(entry["subscriptions"], 1);
    assert!(
        entry["address"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{entry}"
    );
    let (status, none) = call(&host, "GET", "/api/v1/clients?search=nobody", "").await;
    assert_eq!((status, none["total"].as_u64()), (200, Some(0)));

    let (status, detail) = call(&host, "GET", "/api/v1/clients/dev-17", "").await;
    assert_eq!(status, 200, "{detail}");
    assert_eq!(detail["subscriptionList"][0]["filter"], "cmd/dev-17");
    assert_eq!(detail["subscriptionList"][0]["qos"], 1);
    for key in ["queued", "inflight", "connectedAt"] {
        assert!(detail[key].is_number(), "{key} in {detail}");
    }
    let (status, _) = call(&host, "GET", "/api/v1/clients/nobody", "").await;
    assert_eq!(status, 404);

    // A test message from the API reaches the device, once.
    let (status, sent) = call(
        &host,
        "POST",
        "/api/v1/publish",
        r#"{"topic":"cmd/dev-17","payload":"reboot","qos":1}"#,
    )
    .await;
    assert_eq!(status, 200, "{sent}");
    assert_eq!(payloads(&device.publishes(1).await), vec!["reboot"]);
    device.assert_no_publish(Duration::from_millis(300)).await;
    let (status, bad) = call(&host, "POST", "/api/v1/publish", r#"{"topic":"a/+"}"#).await;
    assert_eq!(status, 400, "{bad}");
    // What a page on another site could make a browser holding the credentials send: refused,
    // and nothing published. A same-origin request is taken.
    let body = r#"{"topic":"cmd/dev-17","payload":"forged","qos":1}"#;
    let same_origin = format!("Origin: http://{}", host.edge_ops);
    for (headers, status) in [
        (
            vec![
                BASIC,
                "Content-Type: application/json",
                "Origin: http://evil.example",
            ],
            403,
        ),
        (vec![BASIC, "Content-Type: text/plain"], 415),
        (
            vec![BASIC, "Content-Type: application/x-www-form-urlencoded"],
            415,
        ),
        (vec![BASIC], 415),
        (
            vec![BASIC, "Content-Type: application/json", "Origin: null"],
            403,
        ),
    ] {
        let response = http(host.edge_ops, "POST", "/api/v1/publish", &headers, body).await;
        assert_eq!(response.status, status, "{headers:?}: {response:?}");
    }
    let response = http(
        host.edge_ops,
        "DELETE",
        "/api/v1/clients/dev-17",
        &[
            BASIC,
            "Content-Type: application/json",
            "Origin: http://evil.example",
        ],
        "",
    )
    .await;
    assert_eq!(response.status, 403, "a cross-site kick");
    device.assert_no_publish(Duration::from_millis(300)).await;
    let response = http(
        host.edge_ops,
        "POST",
        "/api/v1/publish",
        &[BASIC, "Content-Type: application/json", &same_origin],
        r#"{"topic":"cmd/dev-17","payload":"same-origin","qos":1}"#,
    )
    .await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(payloads(&device.publishes(1).await), vec!["same-origin"]);

    // Retained messages: listed, cleared, and a new subscriber then gets none.
    let port = host.addr.port().to_string();
    for (topic, payload) in [("state/a", "on"), ("state/b", "off")] {
        let status = Command::new("mosquitto_pub")
            .args(["-p", &port, "-q", "1", "-r", "-t", topic, "-m", payload])
            .status()
            .await
            .expect("mosquitto_pub");
        assert!(status.success());
    }
    let retained = until(
        &host,
        "/api/v1/retained?filter=state/%2B",
        "retained listed",
        |r| r["retained"].as_array().is_some_and(|a| a.len() == 2),
    )
    .await;
    let topics: Vec<&str> = retained["retained"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|m| m["topic"].as_str())
        .collect();
    assert!(
        topics.contains(&"state/a") && topics.contains(&"state/b"),
        "{retained}"
    );
    let (status, _) = call(&host, "DELETE", "/api/v1/retained?topic=state/a", "").await;
    assert_eq!(status, 200);
    let (_, after) = call(&host, "GET", "/api/v1/retained?filter=state/%23", "").await;
    assert_eq!(
        after["retained"].as_array().map(Vec::len),
        Some(1),
        "{after}"
    );
    let mut late = Client::connect(host.addr, "late", true).await;
    late.subscribe("state/#", QoS::AtLeastOnce).await;
    assert_eq!(payloads(&late.publishes(1).await), vec!["off"]);
    late.assert_no_publish(Duration::from_millis(500)).await;

    // Sessions: the connected device, and once disconnected by the API, its parked session.
    let (status, kicked) = call(&host, "DELETE", "/api/v1/clients/dev-17", "").await;
    assert_eq!(status, 200, "{kicked}");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !device.is_closed() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "dev-17 still connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    until(
        &host,
        "/api/v1/sessions?search=dev-17",
        "dev-17 parked",
        |s| {
            s["sessions"][0]["connected"] == false
                && s["sessions"][0]["subscriptions"][0] == "cmd/dev-17"
        },
    )
    .await;
}

fn v1_header(source: SocketAddr) -> Vec<u8> {
    format!(
        "PROXY TCP4 {} 127.0.0.1 {} 1883\r\n",
        source.ip(),
        source.port()
    )
    .into_bytes()
}

/// Behind a balancer, the admin API shows the address from the PROXY header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_address_from_a_proxy_header_is_the_clients() {
    let (_dir, host) = host_with(&["--proxy-protocol", "mqtt"]).await;
    let source: SocketAddr = "203.0.113.5:40001".parse().expect("addr");
    let mut raw = Raw::connect(host.addr).await;
    raw.send(&[v1_header(source), connect_bytes("behind-lb", true, 60)].concat())
        .await;
    assert!(raw.recv().await.is_some(), "CONNACK");
    let list = until(&host, "/api/v1/clients", "behind-lb listed", |l| {
        client_ids(l) == ["behind-lb"]
    })
    .await;
    assert_eq!(list["clients"][0]["address"], "203.0.113.5:40001");
}
