//! The TLS listener: server authentication, client certificates (optional, required, wrong CA,
//! expired), the certificate-identity policy, reload without a restart, bad files refused
//! before anything is bound. Clients: rumqttc over rustls, and mosquitto_pub/sub over OpenSSL.

use rumqttc::QoS;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::process::Command;
use wharf_edge::tls::{ClientCerts, TlsSettings};
use wharf_edge::Edge;
use wharf_tests::certs::{client_config, Issued, Pki, TestCa, Validity};
use wharf_tests::client::{payloads, Client, Options};
use wharf_tests::mock_worker::MockWorker;
use wharf_tests::raw::{self, Raw};
use wharf_tests::{edge_config, init_tracing, start_edge, PATIENCE};

fn pki() -> Pki {
    Pki::new()
}

fn settings(p: &Pki, client_certs: ClientCerts, cert_identity: bool) -> TlsSettings {
    TlsSettings {
        listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        cert: p.server.cert.clone(),
        key: p.server.key.clone(),
        ca: Some(p.ca_path.clone()),
        client_certs,
        cert_identity,
    }
}

async fn edge_with(p: &Pki, tls: TlsSettings) -> (MockWorker, Edge) {
    init_tracing();
    let socket = p.dir.path().join("worker.sock");
    let worker = MockWorker::start(&socket);
    let mut config = edge_config(&socket, "edge-tls");
    config.tls = Some(tls);
    (worker, start_edge(config).await)
}

fn tls_addr(edge: &Edge) -> SocketAddr {
    edge.tls_addr.expect("TLS listener")
}

async fn tls_client(
    addr: SocketAddr,
    id: &str,
    ca: &Path,
    cert: Option<&Issued>,
) -> Result<Client, String> {
    let options = Options {
        tls: Some(client_config(ca, cert)),
        ..Options::default()
    };
    Client::try_connect_with(addr, id, options).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_authenticated_tls_with_rumqttc_and_mosquitto() {
    let p = pki();
    let (_worker, edge) = edge_with(&p, settings(&p, ClientCerts::Off, false)).await;
    let addr = tls_addr(&edge);
    let port = addr.port().to_string();
    let mut sub = tls_client(addr, "rsub", &p.ca_path, None)
        .await
        .expect("TLS connect");
    sub.subscribe("secure/#", QoS::AtLeastOnce).await;
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "--cafile"])
        .arg(&p.ca_path)
        .args(["-q", "1", "-t", "secure/a", "-m", "over-tls"])
        .status()
        .await
        .expect("run mosquitto_pub");
    assert!(status.success(), "mosquitto_pub over TLS");
    assert_eq!(payloads(&sub.publishes(1).await), vec!["over-tls"]);

    let reader = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "--cafile"])
        .arg(&p.ca_path)
        .args(["-q", "1", "-t", "secure/b", "-C", "1", "-W", "10"])
        .output();
    let reader = tokio::spawn(reader);
    // mosquitto_sub has no readiness signal without -d; publish until it has seen one.
    let mut publisher = tls_client(addr, "rpub", &p.ca_path, None)
        .await
        .expect("TLS connect");
    let out = tokio::time::timeout(PATIENCE, async {
        loop {
            publisher
                .publish_acked("secure/b", QoS::AtLeastOnce, "to-mosquitto")
                .await;
            if reader.is_finished() {
                return reader.await.expect("join").expect("mosquitto_sub");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("mosquitto_sub got a message");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "to-mosquitto");

    // A wrong CA on the client side fails the handshake.
    let other = TestCa::new("Other CA");
    let other_path = other.write(p.dir.path(), "other-ca");
    assert!(tls_client(addr, "x", &other_path, None).await.is_err());
    // Plain MQTT on the TLS port is closed cleanly; the plain port still works.
    let mut plain = Raw::connect(addr).await;
    plain.send(&raw::connect_bytes("plain", true, 60)).await;
    plain.expect_closed().await;
    Raw::session(edge.local_addr, "plain-ok", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_client_certificates_are_verified() {
    let p = pki();
    let (_worker, edge) = edge_with(&p, settings(&p, ClientCerts::Required, false)).await;
    let addr = tls_addr(&edge);
    let dir = p.dir.path();
    let good = p.ca.issue(
        dir,
        "good",
        "device-1",
        &["device-1"],
        false,
        Validity::Current,
    );
    assert!(tls_client(addr, "device-1", &p.ca_path, Some(&good))
        .await
        .is_ok());
    assert!(
        tls_client(addr, "device-1", &p.ca_path, None)
            .await
            .is_err(),
        "no client certificate"
    );
    let expired = p.ca.issue(
        dir,
        "expired",
        "device-1",
        &["device-1"],
        false,
        Validity::Expired,
    );
    assert!(
        tls_client(addr, "device-1", &p.ca_path, Some(&expired))
            .await
            .is_err(),
        "expired"
    );
    let rogue_ca = TestCa::new("Rogue CA");
    let rogue = rogue_ca.issue(
        dir,
        "rogue",
        "device-1",
        &["device-1"],
        false,
        Validity::Current,
    );
    assert!(
        tls_client(addr, "device-1", &p.ca_path, Some(&rogue))
            .await
            .is_err(),
        "wrong CA"
    );

    // mosquitto_pub with --cert/--key.
    let status = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &addr.port().to_string(),
            "--cafile",
        ])
        .arg(&p.ca_path)
        .arg("--cert")
        .arg(&good.cert)
        .arg("--key")
        .arg(&good.key)
        .args(["-i", "device-1", "-q", "1", "-t", "t", "-m", "m"])
        .status()
        .await
        .expect("run mosquitto_pub");
    assert!(status.success(), "mosquitto_pub with a client certificate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_speak_as_another_device() {
    let p = pki();
    let (_worker, edge) = edge_with(&p, settings(&p, ClientCerts::Required, true)).await;
    let addr = tls_addr(&edge);
    let cert = p.ca.issue(
        p.dir.path(),
        "dev1",
        "device-1",
        &[],
        false,
        Validity::Current,
    );
    assert!(
        tls_client(addr, "device-1", &p.ca_path, Some(&cert))
            .await
            .is_ok(),
        "CN = client id"
    );
    let refused = tls_client(addr, "device-2", &p.ca_path, Some(&cert)).await;
    let err = refused.err().expect("another client id is refused");
    assert!(err.contains("NotAuthorized"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_without_dropping_connections() {
    let p = pki();
    let (_worker, edge) = edge_with(&p, settings(&p, ClientCerts::Off, false)).await;
    let addr = tls_addr(&edge);
    let mut old = tls_client(addr, "old", &p.ca_path, None)
        .await
        .expect("connect");
    old.subscribe("r/#", QoS::AtLeastOnce).await;

    // New CA and server certificate, written over the configured files.
    let next_ca = TestCa::new("Next CA");
    let next_ca_path = next_ca.write(p.dir.path(), "next-ca");
    let next = next_ca.issue(
        p.dir.path(),
        "next-server",
        "localhost",
        &["127.0.0.1"],
        true,
        Validity::Current,
    );
    std::fs::copy(&next.cert, &p.server.cert).expect("replace cert");
    std::fs::copy(&next.key, &p.server.key).expect("replace key");
    edge.reload_tls(None).expect("reload");

    assert!(
        tls_client(addr, "x", &p.ca_path, None).await.is_err(),
        "old CA no longer matches"
    );
    let mut publisher = tls_client(addr, "new", &next_ca_path, None)
        .await
        .expect("new certificate");
    publisher
        .publish_acked("r/1", QoS::AtLeastOnce, "after-reload")
        .await;
    assert_eq!(
        payloads(&old.publishes(1).await),
        vec!["after-reload"],
        "old connection still up"
    );

    // A broken file is refused and the working certificate stays.
    std::fs::write(&p.server.key, "not a key").expect("break key");
    let err = edge.reload_tls(None).expect_err("broken key refused");
    assert_eq!(err.key, "serverKey");
    assert!(tls_client(addr, "y", &next_ca_path, None).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_files_are_refused_before_anything_is_bound() {
    let p = pki();
    init_tracing();
    let port = wharf_tests::process::free_port();
    let other = p.ca.issue(
        p.dir.path(),
        "other",
        "localhost",
        &[],
        true,
        Validity::Current,
    );
    let cases = [
        (
            "serverKey",
            TlsSettings {
                key: other.key.clone(),
                ..settings(&p, ClientCerts::Off, false)
            },
        ),
        (
            "serverCert",
            TlsSettings {
                cert: p.dir.path().join("missing.pem"),
                ..settings(&p, ClientCerts::Off, false)
            },
        ),
        (
            "cacert",
            TlsSettings {
                ca: Some(p.dir.path().join("missing-ca.pem")),
                ..settings(&p, ClientCerts::Required, false)
            },
        ),
    ];
    for (key, tls) in cases {
        let mut config = edge_config(&p.dir.path().join("w.sock"), "h");
        config.listen = Some(SocketAddr::from(([127, 0, 0, 1], port)));
        config.tls = Some(tls);
        match Edge::start(config).await {
            Err(wharf_edge::server::StartError::Config(e)) => assert_eq!(e.key, key, "{e}"),
            Err(other) => panic!("{key}: unexpected error {other}"),
            Ok(_) => panic!("{key}: a bad file was accepted"),
        }
        // The plain port was not bound.
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("port still free");
    }
}

/// `--use-identity-as-username`: the certificate's CN is the user name (no password), and
/// rules with `%u` confine the device to its own topics whatever client id it uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_identity_is_the_user_name_in_rules() {
    let p = pki();
    let acl = p.dir.path().join("acl");
    std::fs::write(&acl, "pattern readwrite dev/%u/#\n").expect("rules");
    init_tracing();
    let socket = p.dir.path().join("worker.sock");
    let _worker = MockWorker::start(&socket);
    let mut config = edge_config(&socket, "edge-tls");
    config.tls = Some(settings(&p, ClientCerts::Required, false));
    config.auth.identity_as_username = true;
    config.auth.acl_file = Some(acl);
    let edge = start_edge(config).await;
    let cert = p.ca.issue(
        p.dir.path(),
        "dev1",
        "device-1",
        &[],
        false,
        Validity::Current,
    );
    let mut c = tls_client(tls_addr(&edge), "any-id", &p.ca_path, Some(&cert))
        .await
        .expect("a certificate needs no password");
    for (filter, allowed) in [("dev/device-1/#", true), ("dev/device-2/#", false)] {
        let granted = c.subscribe_granted(filter, QoS::AtLeastOnce).await;
        assert_eq!(granted, allowed, "{filter}");
    }
    edge.stop().await;
}
