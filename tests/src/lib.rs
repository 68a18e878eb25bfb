//! Integration harness: real edges (in process, on 127.0.0.1:0), the mock or real
//! store-worker on a temp Unix socket, and real MQTT clients over real sockets.
//!
//! # Layout
//! - [`mock_worker`]: the protocol-speaking stand-in for edge tests.
//! - [`certs`]: test CAs and certificates (rcgen), rustls client configurations.
//! - [`client`]: a rumqttc client that reports every packet it receives.
//! - [`raw`]: hand-written bytes, for malformed input and exact packet checks.
//! - [`resilient`]: byte-level clients that survive broker crashes as MQTT requires.
//! - [`fleet`]: many publishers flat out and lagging subscribers, checked by message identity.
//! - [`etcd`]: an etcd server per test (Debian's `etcd-server`).
//! - [`mongo`]: a SecantusDB (MongoDB wire) server per test.
//! - [`stack`]: a worker and an edge in this process, on either backend, restartable.
//! - [`process`]: the real binaries as child processes (broker hosts to kill).
#![forbid(unsafe_code)]

pub mod certs;
pub mod client;
pub mod client5;
pub mod etcd;
pub mod fleet;
pub mod mock_worker;
pub mod mongo;
pub mod mosquitto;
pub mod process;
pub mod raw;
pub mod raw5;
pub mod resilient;
pub mod stack;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Once;
use std::time::Duration;
use wharf_edge::{Edge, EdgeConfig, Limits};

/// How long a test waits for something that should happen promptly. A bound on waiting,
/// not a speed assertion: it only turns a hang into a failure.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
    });
}

pub fn edge_config(worker_socket: &Path, host: &str) -> EdgeConfig {
    EdgeConfig {
        listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        tls: None,
        web: Default::default(),
        proxy: Default::default(),
        worker_socket: worker_socket.to_owned(),
        host: host.to_owned(),
        limits: Limits::default(),
        shutdown_grace: Duration::from_secs(5),
        auth: Default::default(),
        publisher_identity: None,
        bridges: Vec::new(),
    }
}

pub async fn start_edge(config: EdgeConfig) -> Edge {
    Edge::start(config).await.expect("edge starts")
}
