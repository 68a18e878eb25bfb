//! A store-worker and an edge in this process, on either backend, each restartable: the
//! single-host stack of the end-to-end tests.

use crate::mongo::Secantus;
use crate::{edge_config, init_tracing, start_edge};
use std::path::PathBuf;
use std::time::Duration;
use tempfile::TempDir;
use wharf_edge::auth::AuthSettings;
use wharf_edge::{Edge, Limits};
use wharf_store_worker::store::mongo::Durability;
use wharf_store_worker::{Backend, Worker, WorkerConfig};

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Kind {
    Embedded,
    Mongo,
}

pub struct Stack {
    pub dir: TempDir,
    pub socket: PathBuf,
    pub mongo: Option<Secantus>,
    /// The edge's limits, used by every (re)start.
    pub limits: Limits,
    /// The edge's authentication settings, used by every (re)start.
    pub auth: AuthSettings,
    pub worker: Option<Worker>,
    pub edge: Option<Edge>,
}

impl Stack {
    pub async fn new(kind: Kind) -> Stack {
        Self::with_limits(kind, Limits::default()).await
    }

    pub async fn with_limits(kind: Kind, limits: Limits) -> Stack {
        Self::with_auth(kind, limits, AuthSettings::default()).await
    }

    pub async fn with_auth(kind: Kind, limits: Limits, auth: AuthSettings) -> Stack {
        init_tracing();
        let dir = TempDir::new().expect("temp dir");
        let mongo = match kind {
            Kind::Mongo => Some(Secantus::start(dir.path()).await),
            Kind::Embedded => None,
        };
        let mut stack = Stack {
            socket: dir.path().join("worker.sock"),
            dir,
            mongo,
            limits,
            auth,
            worker: None,
            edge: None,
        };
        stack.start_worker().await;
        stack.start_edge().await;
        stack
    }

    pub fn worker_config(&self) -> WorkerConfig {
        let backend = match &self.mongo {
            Some(m) => Backend::Mongo {
                uri: m.uri(),
                database: "mqtt".into(),
                durability: Durability::default(),
                change_streams: true,
            },
            None => Backend::Embedded {
                data_dir: self.dir.path().join("data"),
            },
        };
        let mut config = WorkerConfig::new(self.socket.clone(), "host-a".into(), backend);
        config.retry_limit = Duration::from_secs(30);
        config
    }

    pub async fn start_worker(&mut self) {
        let worker = Worker::start(self.worker_config())
            .await
            .expect("worker starts");
        self.worker = Some(worker);
    }

    pub async fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop().await;
        }
    }

    pub async fn start_edge(&mut self) {
        let mut config = edge_config(&self.socket, "host-a");
        config.limits = self.limits.clone();
        config.auth = self.auth.clone();
        self.edge = Some(start_edge(config).await);
    }

    pub async fn stop_edge(&mut self) {
        if let Some(e) = self.edge.take() {
            e.stop().await;
        }
    }

    pub async fn restart_worker(&mut self) {
        self.stop_worker().await;
        self.start_worker().await;
    }

    pub async fn restart_edge(&mut self) {
        self.stop_edge().await;
        self.start_edge().await;
    }

    /// The edge first (sessions finish, pending writes complete), then the worker.
    pub async fn stop(mut self) {
        self.stop_edge().await;
        self.stop_worker().await;
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.edge.as_ref().expect("edge running").local_addr
    }

    pub async fn db(&self) -> mongodb::Database {
        let m = self.mongo.as_ref().expect("mongo stack");
        mongodb::Client::with_uri_str(m.uri())
            .await
            .expect("client")
            .database("mqtt")
    }
}
