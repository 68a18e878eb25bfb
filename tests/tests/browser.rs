//! A real browser: headless Chromium (Debian's `chromium`) driven by Playwright
//! (`tests/browser`, from the npm registry). MQTT.js in a page talks to Wharf over
//! WebSocket; the console is opened through its own login form. `scripts/install-deps.sh`
//! installs Chromium and the npm packages.

use std::path::{Path, PathBuf};
use std::time::Duration;
use tempfile::TempDir;
use tokio::process::Command;
use wharf_tests::init_tracing;
use wharf_tests::process::{free_port, BrokerHost};

const PASSWORD: &str = "console-secret-1";

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

async fn host(dir: &Path) -> (BrokerHost, String) {
    host_with(dir, &[]).await
}

async fn host_with(dir: &Path, extra: &[&str]) -> (BrokerHost, String) {
    init_tracing();
    let ws = format!("127.0.0.1:{}", free_port());
    let host = BrokerHost::start_with_args(
        dir,
        "h1",
        None,
        &[],
        &[
            "--ws-listen",
            &ws,
            "--admin-password",
            PASSWORD,
            "--admin-history-step",
            "1",
        ]
        .iter()
        .chain(extra)
        .copied()
        .collect::<Vec<&str>>(),
    )
    .await;
    (host, format!("ws://{ws}/mqtt"))
}

async fn check(args: &[&str]) {
    let script = browser_dir().join("check.mjs");
    assert!(
        browser_dir().join("node_modules/playwright-core").exists(),
        "run scripts/install-deps.sh (npm packages of tests/browser)"
    );
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        Command::new("node")
            .arg(&script)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the browser check finished in time")
    .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.lines().any(|l| l == "ok"),
        "browser check {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_js_in_chromium_receives_what_mosquitto_pub_sends() {
    let dir = TempDir::new().expect("temp dir");
    let (host, ws_url) = host(dir.path()).await;
    let port = host.addr.port().to_string();
    check(&["mqtt", &ws_url, &port]).await;
}

/// The console lists a browser's MQTT.js client, shows its session, and its publish form
/// reaches it. `WHARF_CONSOLE_SCREENSHOT=path` keeps a screenshot (docs/console.png).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_a_connected_client() {
    let dir = TempDir::new().expect("temp dir");
    let (host, ws_url) = host(dir.path()).await;
    let ops = format!("http://{}", host.edge_ops);
    let screenshot = std::env::var("WHARF_CONSOLE_SCREENSHOT").unwrap_or_default();
    let mut args = vec!["console", &ws_url, &ops, PASSWORD];
    let mut traffic = None;
    if !screenshot.is_empty() {
        args.push(&screenshot);
        // Something for the rates and the charts to show.
        let addr = host.addr;
        traffic = Some(tokio::spawn(async move {
            for round in 0u32.. {
                let publisher =
                    wharf_tests::fleet::Publisher::new("screenshot-sensor", "sensors/t", 1);
                publisher.run(addr, round * 200, round * 200 + 200).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }));
    }
    check(&args).await;
    if let Some(traffic) = traffic {
        traffic.abort();
    }
}

/// The console opened from a URL that carries the credentials (`http://admin:PW@host/console`)
/// lists clients and publishes: its requests are built from the page's origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_from_a_url_with_credentials() {
    let dir = TempDir::new().expect("temp dir");
    let (host, ws_url) = host(dir.path()).await;
    let ops = format!("http://{}", host.edge_ops);
    check(&["console-credentials-url", &ws_url, &ops, PASSWORD]).await;
}

/// The console's bridge table: a bridge to Mosquitto, connected, counting what it forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_a_bridge() {
    init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let remote =
        wharf_tests::mosquitto::Mosquitto::start(&dir.path().join("remote"), false, "").await;
    let ws = format!("127.0.0.1:{}", free_port());
    let bridges = format!(
        r#"[{{"name": "cloud", "address": "{}", "out": [{{"filter": "fleet/#"}}]}}]"#,
        remote.addr
    );
    let host = BrokerHost::start_with_args(
        dir.path(),
        "h1",
        None,
        &[],
        &[
            "--ws-listen",
            &ws,
            "--admin-password",
            PASSWORD,
            "--bridges",
            &bridges,
        ],
    )
    .await;
    let acked = wharf_tests::fleet::Publisher::new("d", "fleet/d", 1)
        .run(host.addr, 0, 10)
        .await;
    assert_eq!(acked.len(), 10);
    let ops = format!("http://{}", host.edge_ops);
    check(&[
        "console-bridge",
        &format!("ws://{ws}/mqtt"),
        &ops,
        PASSWORD,
        "10",
    ])
    .await;
}

/// The console's "who is behind": a persistent device gone away owing 7 messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_who_is_behind() {
    let dir = TempDir::new().expect("temp dir");
    let (host, ws_url) = host(dir.path()).await;
    let mut device = wharf_tests::fleet::Subscriber::start(
        host.addr,
        "late-device",
        false,
        "late/#",
        1,
        wharf_tests::fleet::Pace::FULL_SPEED,
    )
    .await;
    device.drop_connection();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let acked = wharf_tests::fleet::Publisher::new("late-publisher", "late/t", 1)
        .run(host.addr, 0, 7)
        .await;
    assert_eq!(acked.len(), 7);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ops = format!("http://{}", host.edge_ops);
    check(&[
        "console-behind",
        &ws_url,
        &ops,
        PASSWORD,
        "late-device",
        "7",
    ])
    .await;
}

/// The console's "where a message went": a message found by its topic, traced to the
/// persistent device that is away and owes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_traces_a_message() {
    let dir = TempDir::new().expect("temp dir");
    let (host, ws_url) = host(dir.path()).await;
    let mut device = wharf_tests::fleet::Subscriber::start(
        host.addr,
        "away-device",
        false,
        "traced/#",
        1,
        wharf_tests::fleet::Pace::FULL_SPEED,
    )
    .await;
    device.drop_connection();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let acked = wharf_tests::fleet::Publisher::new("traced-publisher", "traced/t", 1)
        .run(host.addr, 0, 1)
        .await;
    assert_eq!(acked.len(), 1);
    let ops = format!("http://{}", host.edge_ops);
    check(&[
        "console-trace",
        &ws_url,
        &ops,
        PASSWORD,
        "traced/t",
        "away-device",
    ])
    .await;
}

/// The console's own login: no browser dialog, a wrong password refused, an HttpOnly
/// SameSite=Strict cookie that survives a reload, logout, a login lapsing unused; and its
/// charts filling a point a step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_has_its_own_login_and_charts() {
    let dir = TempDir::new().expect("temp dir");
    let (host, ws_url) = host_with(dir.path(), &["--admin-session-idle", "3"]).await;
    let ops = format!("http://{}", host.edge_ops);
    check(&["console-login", &ws_url, &ops, PASSWORD, "3"]).await;
}

/// Users and rules in MongoDB from the console, on a two-host cluster (both in its cluster
/// table); a malformed rule refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_edits_users_and_rules_in_mongodb() {
    init_tracing();
    let dir = TempDir::new().expect("temp dir");
    let mongo = wharf_tests::mongo::Secantus::start(dir.path()).await;
    let edge = [
        "--admin-password",
        PASSWORD,
        "--store-users",
        "true",
        "--store-acl",
        "true",
    ];
    let h1 = BrokerHost::start_with_args(dir.path(), "h1", Some(mongo.uri()), &[], &edge).await;
    let _h2 = BrokerHost::start_with_args(dir.path(), "h2", Some(mongo.uri()), &[], &edge).await;
    let ops = format!("http://{}", h1.edge_ops);
    check(&["console-auth", "-", &ops, PASSWORD]).await;
}
