//! Authentication and topic authorization (issue 18), with real clients: user names and
//! passwords from a Mosquitto password file (made by `mosquitto_passwd` and by
//! `wharf-passwd`), rules in Mosquitto's ACL syntax, checked on SUBSCRIBE, PUBLISH, the will
//! and every delivery, reloaded without a restart; and the secure default at start.

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{self, ConnectReturnCode, Packet, SubscribeReasonCode};
use rumqttc::mqttbytes::QoS;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use wharf_edge::auth::AuthSettings;
use wharf_edge::Limits;
use wharf_tests::client5::{self, Client5};
use wharf_tests::process::{bin, free_port};
use wharf_tests::raw::{publish_bytes, subscribe_bytes, Raw};
use wharf_tests::stack::{Kind, Stack};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write file");
    path
}

fn connect_bytes(client_id: &str, login: Option<(&str, &str)>, will: Option<&str>) -> Vec<u8> {
    let mut c = v4::Connect::new(client_id);
    c.keep_alive = 30;
    if let Some((user, password)) = login {
        c.set_login(user, password);
    }
    let will = will.map(|topic| v4::LastWill::new(topic, "gone", QoS::AtLeastOnce, false));
    let mut buf = BytesMut::new();
    v4::Connect {
        last_will: will,
        ..c
    }
    .write(&mut buf)
    .expect("encode connect");
    buf.to_vec()
}

/// A 3.1.1 connection and the CONNACK code it got.
async fn connect(
    stack: &Stack,
    client_id: &str,
    login: Option<(&str, &str)>,
) -> (Raw, ConnectReturnCode) {
    connect_with_will(stack, client_id, login, None).await
}

async fn connect_with_will(
    stack: &Stack,
    client_id: &str,
    login: Option<(&str, &str)>,
    will: Option<&str>,
) -> (Raw, ConnectReturnCode) {
    let mut raw = Raw::connect(stack.addr()).await;
    raw.send(&connect_bytes(client_id, login, will)).await;
    match raw.recv().await {
        Some(Packet::ConnAck(ack)) => (raw, ack.code),
        other => panic!("{client_id}: expected CONNACK, got {other:?}"),
    }
}

async fn subscribe(raw: &mut Raw, pkid: u16, filter: &str) -> SubscribeReasonCode {
    raw.send(&subscribe_bytes(pkid, &[(filter, 1)])).await;
    loop {
        match raw.recv().await {
            Some(Packet::SubAck(ack)) => return ack.return_codes[0],
            Some(Packet::Publish(_)) => {}
            other => panic!("expected SUBACK for {filter}, got {other:?}"),
        }
    }
}

/// The topics and payloads that arrive within `quiet` (acknowledging QoS 1).
async fn received(raw: &mut Raw, quiet: Duration) -> Vec<(String, String)> {
    let mut got = Vec::new();
    while let Some(packet) = raw.recv_within(quiet).await {
        if let Packet::Publish(p) = packet {
            if p.pkid > 0 {
                raw.send(&[0x40, 2, (p.pkid >> 8) as u8, p.pkid as u8])
                    .await;
            }
            let payload = String::from_utf8_lossy(&p.payload).into_owned();
            got.push((p.topic, payload));
        }
    }
    got
}

async fn publish_acked(raw: &mut Raw, topic: &str, pkid: u16, payload: &str) {
    raw.send(&publish_bytes(topic, 1, pkid, false, payload.as_bytes()))
        .await;
    loop {
        match raw.recv().await {
            Some(Packet::PubAck(ack)) if ack.pkid == pkid => return,
            Some(_) => {}
            None => panic!("no PUBACK for {topic}"),
        }
    }
}

const ACL: &str = "\
# anonymous clients: nothing but the public topics
topic read public/#

user admin
topic readwrite #

user dev1
topic read fleet/broadcast

pattern write dev/%u/telemetry
pattern read dev/%u/cmd
pattern read dev/%c/inbox
";

fn passwords(dir: &Path) -> PathBuf {
    // Made by the tools operators use: Mosquitto's own and Wharf's (argon2id).
    let file = dir.join("passwords");
    for (user, password) in [("admin", "admin-pw"), ("dev1", "dev1-pw")] {
        let mut command = Command::new("mosquitto_passwd");
        command.arg("-b");
        if !file.exists() {
            command.arg("-c");
        }
        let status = command.arg(&file).args([user, password]).status();
        let status = match status {
            Ok(s) => s,
            Err(e) => panic!("mosquitto_passwd: {e}"),
        };
        assert!(status.success(), "mosquitto_passwd for {user}");
    }
    let status = Command::new(bin("wharf-passwd"))
        .args(["-b", "-H", "argon2id"])
        .arg(&file)
        .args(["dev2", "dev2-pw"])
        .status()
        .expect("wharf-passwd");
    assert!(status.success());
    file
}

/// `wharf-passwd` refuses what the broker could not use: a user name the file's readers take
/// for a comment, and a password bcrypt would cut at 72 bytes (its first 72 bytes with any tail
/// would then log in).
#[test]
fn wharf_passwd_refuses_unusable_names_and_passwords() {
    let dir = tempfile::TempDir::new().expect("dir");
    let file = dir.path().join("passwords");
    let run = |args: &[&str]| {
        Command::new(bin("wharf-passwd"))
            .args(args)
            .output()
            .expect("wharf-passwd")
    };
    let path = file.to_str().expect("path");
    assert!(run(&["-c", "-b", path, "ok", "pw"]).status.success());
    for user in ["#dev", " #dev", "dev\nx"] {
        let out = run(&["-b", path, user, "pw"]);
        assert!(!out.status.success(), "user name {user:?} accepted");
    }
    let long = "p".repeat(93);
    let out = run(&["-b", "-H", "bcrypt", path, "dev", &long]);
    assert!(!out.status.success(), "a 93-byte bcrypt password accepted");
    assert!(String::from_utf8_lossy(&out.stderr).contains("72"));
    assert!(run(&["-b", "-H", "bcrypt", path, "dev", &long[..72]])
        .status
        .success());
    let text = std::fs::read_to_string(&file).expect("file");
    assert_eq!(text.lines().count(), 2, "{text}");
}

async fn secured(kind: Kind, dir: &Path) -> Stack {
    let settings = AuthSettings {
        password_file: Some(passwords(dir)),
        acl_file: Some(write(dir, "acl", ACL)),
        ..Default::default()
    };
    Stack::with_auth(kind, Limits::default(), settings).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_admit_their_users_only() {
    let dir = tempfile::TempDir::new().expect("dir");
    let stack = secured(Kind::Embedded, dir.path()).await;
    for (user, password, expected) in [
        ("admin", "admin-pw", ConnectReturnCode::Success),
        ("dev1", "dev1-pw", ConnectReturnCode::Success),
        ("dev2", "dev2-pw", ConnectReturnCode::Success),
        ("dev1", "dev2-pw", ConnectReturnCode::BadUserNamePassword),
        ("dev1", "", ConnectReturnCode::BadUserNamePassword),
        ("mallory", "dev1-pw", ConnectReturnCode::BadUserNamePassword),
    ] {
        let (_, code) = connect(&stack, "c", Some((user, password))).await;
        assert_eq!(code, expected, "{user} / {password:?}");
    }
    // Again, from the cache of successful checks this time, and still refusing a bad one.
    let (_, code) = connect(&stack, "c", Some(("dev2", "dev2-pw"))).await;
    assert_eq!(code, ConnectReturnCode::Success);
    let (_, code) = connect(&stack, "c", Some(("dev2", "dev2-pW"))).await;
    assert_eq!(code, ConnectReturnCode::BadUserNamePassword);
    // No credentials: anonymous clients are not served once there is a password file.
    let (_, code) = connect(&stack, "c", None).await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);

    // 5.0: 0x86 and 0x87.
    let mut options = client5::options(stack.addr(), "v5", true, None);
    options.set_credentials("dev1", "nope");
    let refused = Client5::try_connect(options).await.err().expect("refused");
    assert!(refused.contains("BadUserNamePassword"), "{refused}");
    let options = client5::options(stack.addr(), "v5", true, None);
    let refused = Client5::try_connect(options).await.err().expect("refused");
    assert!(refused.contains("NotAuthorized"), "{refused}");
    let mut options = client5::options(stack.addr(), "v5", true, None);
    options.set_credentials("dev1", "dev1-pw");
    Client5::connect(options).await.disconnect().await;

    // Independent clients, 3.1.1 and 5.0.
    let port = stack.addr().port().to_string();
    for version in ["mqttv311", "mqttv5"] {
        let run = |user: &str, password: &str| {
            Command::new("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p", &port, "-V", version, "-q", "1"])
                .args([
                    "-u",
                    user,
                    "-P",
                    password,
                    "-t",
                    "dev/dev2/telemetry",
                    "-m",
                    "x",
                ])
                .output()
                .expect("mosquitto_pub")
        };
        assert!(run("dev2", "dev2-pw").status.success(), "{version}");
        let bad = run("dev2", "wrong");
        assert!(
            !bad.status.success(),
            "{version}: a wrong password connected"
        );
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_limit_subscriptions_publishes_wills_and_deliveries() {
    let dir = tempfile::TempDir::new().expect("dir");
    let stack = secured(Kind::Embedded, dir.path()).await;
    let (mut admin, code) = connect(&stack, "admin-1", Some(("admin", "admin-pw"))).await;
    assert_eq!(code, ConnectReturnCode::Success);
    assert_eq!(
        subscribe(&mut admin, 1, "dev/#").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );

    let (mut dev1, _) = connect(&stack, "dev1-client", Some(("dev1", "dev1-pw"))).await;
    let ok = SubscribeReasonCode::Success(QoS::AtLeastOnce);
    assert_eq!(subscribe(&mut dev1, 1, "dev/dev1/cmd").await, ok);
    assert_eq!(subscribe(&mut dev1, 2, "dev/dev1-client/inbox").await, ok);
    assert_eq!(subscribe(&mut dev1, 3, "fleet/broadcast").await, ok);
    for (pkid, filter) in [
        (4, "dev/+/cmd"),
        (5, "dev/dev2/cmd"),
        (6, "#"),
        (7, "dev/dev1/#"),
        (8, "$share/g/dev/+/telemetry"),
        (9, "$SYS/#"),
    ] {
        assert_eq!(
            subscribe(&mut dev1, pkid, filter).await,
            SubscribeReasonCode::Failure,
            "{filter}"
        );
    }
    // Its own telemetry goes through; another device's is acknowledged and dropped (3.1.1).
    publish_acked(&mut dev1, "dev/dev1/telemetry", 10, "mine").await;
    publish_acked(&mut dev1, "dev/dev2/telemetry", 11, "forged").await;
    publish_acked(&mut dev1, "dev/dev1/cmd", 12, "self-command").await;
    publish_acked(&mut dev1, "dev/dev1/telemetry", 13, "mine again").await;
    let got = received(&mut admin, Duration::from_millis(500)).await;
    assert_eq!(
        got,
        vec![
            ("dev/dev1/telemetry".to_owned(), "mine".to_owned()),
            ("dev/dev1/telemetry".to_owned(), "mine again".to_owned()),
        ]
    );

    // 5.0: the refusal is said, PUBACK 0x87 and SUBACK 0x87.
    let mut options = client5::options(stack.addr(), "dev1-v5", true, None);
    options.set_credentials("dev1", "dev1-pw");
    let mut v5 = Client5::connect(options).await;
    use rumqttc::v5::mqttbytes::v5::{Packet as Packet5, PubAckReason};
    v5.client
        .publish(
            "dev/dev2/telemetry",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "x",
        )
        .await
        .expect("queued");
    let reason = v5
        .next_matching(|p| match p {
            Packet5::PubAck(ack) => Some(ack.reason),
            _ => None,
        })
        .await;
    assert_eq!(reason, Some(PubAckReason::NotAuthorized));
    v5.disconnect().await;

    // A will on a topic the client may not write refuses the CONNECT.
    let (_, code) = connect_with_will(
        &stack,
        "dev1-w",
        Some(("dev1", "dev1-pw")),
        Some("dev/dev2/telemetry"),
    )
    .await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
    let (_, code) = connect_with_will(
        &stack,
        "dev1-w",
        Some(("dev1", "dev1-pw")),
        Some("dev/dev1/telemetry"),
    )
    .await;
    assert_eq!(code, ConnectReturnCode::Success);

    // A client id or user name holding wildcards or levels gets nothing wider.
    for client_id in ["+", "#", "dev1/x"] {
        let (mut c, code) = connect(&stack, client_id, Some(("dev1", "dev1-pw"))).await;
        assert_eq!(code, ConnectReturnCode::Success);
        assert_eq!(
            subscribe(&mut c, 1, "dev/+/inbox").await,
            SubscribeReasonCode::Failure,
            "client id {client_id}"
        );
        assert_eq!(
            subscribe(&mut c, 2, "dev/#").await,
            SubscribeReasonCode::Failure,
            "client id {client_id}"
        );
    }
    stack.stop().await;
}

/// A permission taken away (the rule file changed and reloaded, as on SIGHUP) stops what is
/// stored for an offline session, what is retained, and the live stream of a subscription
/// made before.
async fn revoked_permission_stops_deliveries(kind: Kind) {
    let dir = tempfile::TempDir::new().expect("dir");
    let stack = secured(kind, dir.path()).await;
    let login = Some(("dev1", "dev1-pw"));
    let mut raw = Raw::connect(stack.addr()).await;
    let mut persistent = v4::Connect::new("dev1-p");
    persistent.clean_session = false;
    persistent.keep_alive = 30;
    persistent.set_login("dev1", "dev1-pw");
    let mut buf = BytesMut::new();
    persistent.write(&mut buf).expect("encode");
    raw.send(&buf).await;
    assert!(matches!(raw.recv().await, Some(Packet::ConnAck(_))));
    assert_eq!(
        subscribe(&mut raw, 1, "fleet/broadcast").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    drop(raw);

    let (mut admin, _) = connect(&stack, "admin-1", Some(("admin", "admin-pw"))).await;
    publish_acked(&mut admin, "fleet/broadcast", 1, "before").await;
    // Retained, for a new subscription after the revocation.
    admin
        .send(&{
            let mut p = v4::Publish::new("fleet/broadcast", QoS::AtLeastOnce, "retained");
            p.pkid = 2;
            p.retain = true;
            let mut b = BytesMut::new();
            p.write(&mut b).expect("encode");
            b.to_vec()
        })
        .await;
    while !matches!(admin.recv().await, Some(Packet::PubAck(_))) {}

    let revoked = ACL.replace("topic read fleet/broadcast\n", "");
    std::fs::write(dir.path().join("acl"), revoked).expect("rewrite rules");
    stack
        .edge
        .as_ref()
        .expect("edge")
        .reload_auth(None)
        .expect("reload");

    // Back: the stored message is not delivered.
    let mut raw = Raw::connect(stack.addr()).await;
    raw.send(&buf).await;
    assert!(matches!(raw.recv().await, Some(Packet::ConnAck(_))));
    publish_acked(&mut admin, "fleet/broadcast", 3, "after").await;
    let got = received(&mut raw, Duration::from_millis(700)).await;
    assert!(got.is_empty(), "{kind:?}: revoked topic delivered: {got:?}");
    // A new subscriber is refused, and a wider one allowed by a pattern gets no retained copy.
    let (mut fresh, _) = connect(&stack, "dev1-f", login).await;
    assert_eq!(
        subscribe(&mut fresh, 1, "fleet/broadcast").await,
        SubscribeReasonCode::Failure
    );
    stack.stop().await;
}

mod revoked_permission_stops_deliveries {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded() {
        super::revoked_permission_stops_deliveries(super::Kind::Embedded).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mongodb() {
        super::revoked_permission_stops_deliveries(super::Kind::Mongo).await
    }
}

/// An edge process with these extra arguments: its exit code if it ends within 5 s (`None`
/// if still running, then killed) and what it logged.
fn edge_start(args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::TempDir::new().expect("dir");
    let mut child = Command::new(bin("edge"))
        .arg("--worker-socket")
        .arg(dir.path().join("none.sock"))
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("edge");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = child.wait_with_output().expect("output");
    let log = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (code, log)
}

#[test]
fn secure_by_default_and_unusable_files_refused_at_start() {
    let dir = tempfile::TempDir::new().expect("dir");
    let port = free_port().to_string();
    let network = format!("0.0.0.0:{port}");
    let loopback = format!("127.0.0.1:{port}");
    // No security settings: loopback only, said at start.
    let (code, log) = edge_start(&["--listen", &loopback]);
    assert_eq!(code, None, "{log}");
    assert!(log.contains("loopback only"), "{log}");
    // The network without users: refused, unless explicitly allowed (and then logged).
    let (code, log) = edge_start(&["--listen", &network]);
    assert_eq!(code, Some(64), "{log}");
    assert!(log.contains("allowAnonymous"), "{log}");
    let (code, log) = edge_start(&["--listen", &network, "--allow-anonymous", "true"]);
    assert_eq!(code, None, "{log}");
    assert!(
        log.contains("anonymous clients are served on the network"),
        "{log}"
    );
    // Empty or malformed files: exit 64 naming the file.
    let empty = write(dir.path(), "empty", "");
    let malformed = write(dir.path(), "rules", "topic read a\nallow all\n");
    let passwords = write(dir.path(), "pw", "alice:plaintext\n");
    for args in [
        vec!["--password-file", empty.to_str().expect("utf-8")],
        vec!["--password-file", passwords.to_str().expect("utf-8")],
        vec!["--acl-file", empty.to_str().expect("utf-8")],
        vec!["--acl-file", malformed.to_str().expect("utf-8")],
        vec!["--acl-file", "/nonexistent/acl"],
    ] {
        let mut all = vec!["--listen", &loopback];
        all.extend(&args);
        let (code, log) = edge_start(&all);
        assert_eq!(code, Some(64), "{args:?}: {log}");
        assert!(log.contains(args[1]), "{args:?} not named: {log}");
    }
}

/// Users and rules kept in MongoDB in EMQX's document shapes (its documented sha256 example
/// among them), a superuser, and changes followed within seconds: a user removed can no
/// longer connect, a rule removed stops a subscription made before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_and_rules_from_mongodb_in_emqx_shape() {
    use mongodb::bson::doc;
    let settings = AuthSettings {
        store_users: true,
        store_rules: true,
        ..Default::default()
    };
    let stack = Stack::with_auth(Kind::Mongo, Limits::default(), settings).await;
    let db = stack.db().await;
    let users = db.collection::<mongodb::bson::Document>("mqtt_user");
    users
        .insert_many([
            // EMQX's documentation: password "public", salt suffix, sha256, superuser.
            doc! {"username": "emqx_u", "salt": "slat_foo123", "is_superuser": true,
            "password_hash": "44edc2d57cde8d79c98145003e105b90a14f1460b79186ea9cfe83942fc5abb5"},
            doc! {"username": "dev1",
            "password_hash": "$2b$04$EjUOidkaARJSY6pPGFMEoOxG8HGl4Sesyf2lHKLrDXqVqEZt32tJS"},
            doc! {"username": "dev2", "password_hash": "plain-text-is-refused"},
            doc! {"username": "ops", "salt": "slat_foo123", "is_superuser": true,
            "password_hash": "44edc2d57cde8d79c98145003e105b90a14f1460b79186ea9cfe83942fc5abb5"},
        ])
        .await
        .expect("users");
    let rules = db.collection::<mongodb::bson::Document>("mqtt_acl");
    rules
        .insert_many([
            doc! {"username": "dev1", "permission": "allow", "action": "publish",
            "topics": ["dev/${clientid}/telemetry"]},
            doc! {"username": "dev1", "permission": "allow", "action": "subscribe",
            "topics": ["dev/${username}/cmd"]},
        ])
        .await
        .expect("rules");
    // Read within a few seconds of the worker being up.
    let dev1 = Some(("dev1", "opensesame"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, code) = connect(&stack, "d1", dev1).await;
        if code == ConnectReturnCode::Success {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "users never read: {code:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (user, password, expected) in [
        ("dev1", "wrong", ConnectReturnCode::BadUserNamePassword),
        ("emqx_u", "public", ConnectReturnCode::Success),
        ("emqx_u", "secret", ConnectReturnCode::BadUserNamePassword),
        (
            "dev2",
            "plain-text-is-refused",
            ConnectReturnCode::BadUserNamePassword,
        ),
    ] {
        let (_, code) = connect(&stack, "c", Some((user, password))).await;
        assert_eq!(code, expected, "{user} / {password}");
    }
    let (_, code) = connect(&stack, "c", None).await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);

    let ok = SubscribeReasonCode::Success(QoS::AtLeastOnce);
    let (mut admin, _) = connect(&stack, "admin", Some(("emqx_u", "public"))).await;
    assert_eq!(subscribe(&mut admin, 1, "#").await, ok, "a superuser may");
    let (mut d1, _) = connect(&stack, "d1", dev1).await;
    assert_eq!(subscribe(&mut d1, 1, "dev/dev1/cmd").await, ok);
    assert_eq!(
        subscribe(&mut d1, 2, "dev/+/cmd").await,
        SubscribeReasonCode::Failure
    );
    publish_acked(&mut d1, "dev/d1/telemetry", 3, "mine").await;
    publish_acked(&mut d1, "dev/d2/telemetry", 4, "forged").await;
    let got = received(&mut admin, Duration::from_millis(500)).await;
    assert!(
        got.contains(&("dev/d1/telemetry".into(), "mine".into())),
        "{got:?}"
    );
    assert!(!got.iter().any(|(_, p)| p == "forged"), "{got:?}");
    publish_acked(&mut admin, "dev/dev1/cmd", 2, "reboot").await;
    let got = received(&mut d1, Duration::from_millis(500)).await;
    assert_eq!(got, vec![("dev/dev1/cmd".to_owned(), "reboot".to_owned())]);

    // Changes in the collections: followed within a few seconds.
    rules
        .delete_many(doc! {"username": "dev1", "action": "subscribe"})
        .await
        .expect("delete rule");
    users
        .delete_one(doc! {"username": "emqx_u"})
        .await
        .expect("delete user");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, code) = connect(&stack, "c", Some(("emqx_u", "public"))).await;
        if code == ConnectReturnCode::BadUserNamePassword {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "removed user still admitted"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The removed user's connection is ended within the refresh period.
    admin.expect_closed().await;
    let (mut ops, code) = connect(&stack, "ops", Some(("ops", "public"))).await;
    assert_eq!(code, ConnectReturnCode::Success);
    publish_acked(&mut ops, "dev/dev1/cmd", 3, "after").await;
    let got = received(&mut d1, Duration::from_millis(700)).await;
    assert!(got.is_empty(), "revoked rule still delivers: {got:?}");
    stack.stop().await;
}

/// A reload that removes a user from the password file, or changes its password, ends that
/// user's connections; the others stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_removes_or_changes_a_user_ends_its_connections() {
    let dir = tempfile::TempDir::new().expect("dir");
    let stack = secured(Kind::Embedded, dir.path()).await;
    let (mut admin, _) = connect(&stack, "admin", Some(("admin", "admin-pw"))).await;
    let (mut dev1, code) = connect(&stack, "d1", Some(("dev1", "dev1-pw"))).await;
    assert_eq!(code, ConnectReturnCode::Success);
    let (mut dev2, code) = connect(&stack, "d2", Some(("dev2", "dev2-pw"))).await;
    assert_eq!(code, ConnectReturnCode::Success);
    let file = dir.path().join("passwords");
    let passwd = |args: &[&str]| {
        let status = Command::new(bin("wharf-passwd"))
            .args(args)
            .status()
            .expect("wharf-passwd");
        assert!(status.success(), "wharf-passwd {args:?}");
    };
    let path = file.to_str().expect("path");
    passwd(&["-D", path, "dev1"]);
    passwd(&["-b", path, "dev2", "new-pw"]);
    let edge = stack.edge.as_ref().expect("edge");
    edge.reload_auth(None).expect("reload");
    dev1.expect_closed().await;
    dev2.expect_closed().await;
    // The user the reload left as it was keeps its connection.
    admin.send(&[0xc0, 0]).await;
    assert!(matches!(admin.recv().await, Some(Packet::PingResp)));
    let (_, code) = connect(&stack, "d2", Some(("dev2", "new-pw"))).await;
    assert_eq!(code, ConnectReturnCode::Success);
    stack.stop().await;
}

/// A will is checked again when it is sent: a client whose write right to its will topic
/// was revoked by a reload since its CONNECT leaves no will behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_revoked_by_a_reload_is_not_sent() {
    let dir = tempfile::TempDir::new().expect("dir");
    let stack = secured(Kind::Embedded, dir.path()).await;
    let (mut admin, _) = connect(&stack, "admin", Some(("admin", "admin-pw"))).await;
    subscribe(&mut admin, 1, "dev/#").await;
    let (kept, code) = connect_with_will(
        &stack,
        "dev1-kept",
        Some(("dev1", "dev1-pw")),
        Some("dev/dev1/telemetry"),
    )
    .await;
    assert_eq!(code, ConnectReturnCode::Success);
    // Before any reload the will goes out as ever.
    drop(kept);
    let got = received(&mut admin, Duration::from_millis(700)).await;
    assert_eq!(got.len(), 1, "the will before the reload: {got:?}");

    let (revoked, code) = connect_with_will(
        &stack,
        "dev1-revoked",
        Some(("dev1", "dev1-pw")),
        Some("dev/dev1/telemetry"),
    )
    .await;
    assert_eq!(code, ConnectReturnCode::Success);
    let rules = ACL.replace("pattern write dev/%u/telemetry\n", "");
    std::fs::write(dir.path().join("acl"), rules).expect("rewrite rules");
    stack
        .edge
        .as_ref()
        .expect("edge")
        .reload_auth(None)
        .expect("reload");
    drop(revoked);
    let got = received(&mut admin, Duration::from_millis(700)).await;
    assert!(got.is_empty(), "a revoked will was sent: {got:?}");
    stack.stop().await;
}

/// Rule documents the edge cannot read never widen rights: the store's rules are refused
/// whole (at start nothing is allowed), the last whole set stays in force, and an `eq` filter
/// delivers what it grants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_rule_documents_never_widen_rights() {
    use mongodb::bson::doc;
    let settings = AuthSettings {
        store_users: true,
        store_rules: true,
        ..Default::default()
    };
    let stack = Stack::with_auth(Kind::Mongo, Limits::default(), settings).await;
    let db = stack.db().await;
    db.collection::<mongodb::bson::Document>("mqtt_user")
        .insert_many([
            doc! {"username": "emqx_u", "salt": "slat_foo123", "is_superuser": true,
            "password_hash": "44edc2d57cde8d79c98145003e105b90a14f1460b79186ea9cfe83942fc5abb5"},
            doc! {"username": "dev1",
            "password_hash": "$2b$04$EjUOidkaARJSY6pPGFMEoOxG8HGl4Sesyf2lHKLrDXqVqEZt32tJS"},
        ])
        .await
        .expect("users");
    let rules = db.collection::<mongodb::bson::Document>("mqtt_acl");
    rules
        .insert_many([
            doc! {"username": "dev1", "permission": "allow", "action": "all",
            "topics": ["dev/dev1/#", "eq fleet/#"]},
            // A deny rule with a misspelt action: skipped, the allow beside it would pass it.
            doc! {"_id": "bad", "username": "dev1", "permission": "deny", "action": "Publish",
            "topics": ["dev/dev1/secret"]},
        ])
        .await
        .expect("rules");
    let dev1 = Some(("dev1", "opensesame"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (mut d1, mut admin) = loop {
        let (d1, code) = connect(&stack, "d1", dev1).await;
        let (admin, admin_code) = connect(&stack, "admin", Some(("emqx_u", "public"))).await;
        if code == ConnectReturnCode::Success && admin_code == ConnectReturnCode::Success {
            break (d1, admin);
        }
        assert!(std::time::Instant::now() < deadline, "users never read");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let ok = SubscribeReasonCode::Success(QoS::AtLeastOnce);
    assert_eq!(subscribe(&mut admin, 1, "dev/#").await, ok);
    // The rules were refused: nothing is allowed (not the allow rule without its deny).
    assert_eq!(
        subscribe(&mut d1, 1, "fleet/#").await,
        SubscribeReasonCode::Failure
    );
    publish_acked(&mut d1, "dev/dev1/secret", 2, "leaked").await;
    assert!(received(&mut admin, Duration::from_millis(500))
        .await
        .is_empty());

    // Mended: the set is read whole.
    rules
        .update_one(doc! {"_id": "bad"}, doc! {"$set": {"action": "publish"}})
        .await
        .expect("mend");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if subscribe(&mut d1, 3, "fleet/#").await == ok {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "mended rules never read"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    publish_acked(&mut admin, "fleet/a", 4, "to-all").await;
    let got = received(&mut d1, Duration::from_millis(700)).await;
    assert_eq!(
        got,
        vec![("fleet/a".to_owned(), "to-all".to_owned())],
        "eq delivers"
    );
    publish_acked(&mut d1, "dev/dev1/secret", 5, "denied").await;
    publish_acked(&mut d1, "dev/dev1/ok", 6, "allowed").await;
    let got = received(&mut admin, Duration::from_millis(700)).await;
    assert_eq!(got, vec![("dev/dev1/ok".to_owned(), "allowed".to_owned())]);

    // A user name that is not a string must not read as "every client".
    rules
        .insert_one(
            doc! {"username": 4242, "permission": "allow", "action": "all", "topics": ["#"]},
        )
        .await
        .expect("insert");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        subscribe(&mut d1, 7, "#").await,
        SubscribeReasonCode::Failure
    );
    // The last whole set stays in force meanwhile.
    publish_acked(&mut admin, "fleet/b", 8, "still").await;
    let got = received(&mut d1, Duration::from_millis(700)).await;
    assert_eq!(got, vec![("fleet/b".to_owned(), "still".to_owned())]);
    stack.stop().await;
}

/// Abuse limits: new connections per second from one address, PUBLISHes per second from one
/// client (5.0: refused with 0x97; 3.1.1: closed). Windows are whole seconds, so a burst can
/// straddle two: the checks allow for that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_and_publish_rates_are_bounded() {
    let limits = Limits {
        max_connection_rate: 5,
        max_publish_rate: 20,
        ..Default::default()
    };
    let stack = Stack::with_auth(Kind::Embedded, limits, AuthSettings::default()).await;
    let mut accepted = 0;
    for i in 0..12 {
        let mut raw = Raw::connect(stack.addr()).await;
        raw.send(&connect_bytes(&format!("r{i}"), None, None)).await;
        if matches!(raw.recv().await, Some(Packet::ConnAck(_))) {
            accepted += 1;
        }
    }
    assert!((5..=10).contains(&accepted), "{accepted} of 12 accepted");
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // 5.0: past the rate, PUBACK 0x97 (quota exceeded).
    let mut v5 = Client5::connect(client5::options(stack.addr(), "flood5", true, None)).await;
    use rumqttc::v5::mqttbytes::v5::{Packet as Packet5, PubAckReason};
    for i in 0..50 {
        v5.client
            .publish(
                "flood/5",
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                format!("{i}"),
            )
            .await
            .expect("queued");
    }
    let mut refused = 0;
    for _ in 0..50 {
        match v5
            .next_matching(|p| match p {
                Packet5::PubAck(ack) => Some(ack.reason),
                _ => None,
            })
            .await
        {
            Some(PubAckReason::QuotaExceeded) => refused += 1,
            Some(_) => {}
            None => panic!("not every PUBLISH was answered"),
        }
    }
    assert!(refused >= 10, "{refused} of 50 refused");
    v5.disconnect().await;

    // 3.1.1: closed.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (mut raw, code) = connect(&stack, "flood3", None).await;
    assert_eq!(code, ConnectReturnCode::Success);
    let mut burst = Vec::new();
    for i in 0..60u16 {
        burst.extend(publish_bytes("flood/3", 1, i + 1, false, b"x"));
    }
    raw.send(&burst).await;
    let mut acks = 0;
    while let Some(packet) = raw.recv().await {
        if matches!(packet, Packet::PubAck(_)) {
            acks += 1;
        }
    }
    assert!(
        acks < 60,
        "a 3.1.1 flood past the rate was not closed ({acks} acknowledged)"
    );
    stack.stop().await;
}

/// The running edge process re-reads its rule file on SIGHUP; a file that became unusable is
/// refused and the rules in force stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_the_rules() {
    use wharf_tests::process::BrokerHost;
    let dir = tempfile::TempDir::new().expect("dir");
    let rules = write(dir.path(), "acl", "topic readwrite a/#\n");
    let rules_arg = rules.to_str().expect("utf-8").to_owned();
    let host =
        BrokerHost::start_with_args(dir.path(), "h1", None, &[], &["--acl-file", &rules_arg]).await;
    let pid = host.edge_pid().expect("edge").to_string();
    let hup = || {
        let status = Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .expect("kill");
        assert!(status.success());
    };
    let subscribe_at = |filter: &'static str| {
        let addr = host.addr;
        async move {
            let mut raw = Raw::connect(addr).await;
            raw.send(&connect_bytes("hup", None, None)).await;
            assert!(matches!(raw.recv().await, Some(Packet::ConnAck(_))));
            subscribe(&mut raw, 1, filter).await
        }
    };
    let ok = SubscribeReasonCode::Success(QoS::AtLeastOnce);
    assert_eq!(subscribe_at("a/x").await, ok);
    assert_eq!(subscribe_at("c/x").await, SubscribeReasonCode::Failure);
    std::fs::write(&rules, "topic readwrite c/#\n").expect("rewrite");
    hup();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while subscribe_at("c/x").await != ok {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reload"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(subscribe_at("a/x").await, SubscribeReasonCode::Failure);
    // Unusable now: refused, the rules in force stay.
    std::fs::write(&rules, "allow everything\n").expect("rewrite");
    hup();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(subscribe_at("c/x").await, ok);
    assert_eq!(subscribe_at("a/x").await, SubscribeReasonCode::Failure);
    drop(host);
}
