//! Wharf's store-worker: durable persistence for one or more edges.
//!
//! Edges connect over a Unix socket and stream requests (see `wharf_shared::wire`). Every
//! message is written to the store; a persist request is answered `Persisted` only once the
//! write is durable. Without a MongoDB URI the embedded SQLite store is used.
//!
//! # Layout
//! - [`cli`]: flags and environment layered over etcd keys.
//! - [`server`]: the socket, per-edge connections, the lanes that run session requests.
//! - [`cmd`]: one handler per kind of request; [`state`]: what they share; [`rankings`]: the
//!   fleet's sessions ranked by what they are owed.
//! - [`pipeline`]: the batching tasks: group-committed persists, delivery records, retries.
//! - [`fanout`]: the connected edges; messages between hosts (this worker's edges, the
//!   store's feed of other workers' messages).
//! - [`store`]: the `Store` trait, the shared undelivered-message query, and the backends
//!   ([`store::mongo`], [`store::sqlite`]).
#![forbid(unsafe_code)]

pub mod cli;
pub mod cmd;
pub mod fanout;
pub mod pipeline;
pub mod rankings;
pub mod routes;
pub mod server;
pub mod state;
pub mod store;

use state::Shared;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use store::mongo::{Durability, MongoStore};
use store::sqlite::SqliteStore;
use store::{Store, StoreError};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, Clone)]
pub enum Backend {
    /// SQLite in this directory.
    Embedded { data_dir: PathBuf },
    Mongo {
        uri: String,
        database: String,
        durability: Durability,
        /// Follow other workers' messages with a change stream where the server has one
        /// (else, and with `false`, by polling).
        change_streams: bool,
    },
}

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub socket: PathBuf,
    /// Permissions of the socket file (0o600: only this user's edges may connect).
    pub socket_mode: u32,
    /// Group of the socket file, so that edges running as another user of it may connect
    /// (with a mode such as 0o660).
    pub socket_group: Option<u32>,
    pub host: String,
    pub backend: Backend,
    /// Most messages in one group-committed write.
    pub max_batch: usize,
    /// How long an unavailable store is retried before a request fails.
    pub retry_limit: Duration,
    /// How long a durable write waits for company while commits are frequent (0: never).
    pub commit_delay: Duration,
    pub shutdown_grace: Duration,
    /// MongoDB: where the users and authorization rules are kept.
    pub auth_collections: store::mongo::AuthCollections,
    /// Filters that stand for the topic names they match in this host's routes.
    pub route_aggregate: Vec<String>,
    /// Bytes of messages accepted from the edges and not yet written, at most (see
    /// [`pipeline::ByteBudget`]).
    pub max_queued_bytes: usize,
}

/// The default of [`WorkerConfig::max_queued_bytes`].
pub const DEFAULT_MAX_QUEUED_BYTES: usize = 64 << 20;

impl WorkerConfig {
    pub fn new(socket: PathBuf, host: String, backend: Backend) -> Self {
        WorkerConfig {
            socket,
            socket_mode: 0o600,
            socket_group: None,
            host,
            backend,
            max_batch: 1000,
            retry_limit: Duration::from_secs(10),
            commit_delay: Duration::from_millis(1),
            shutdown_grace: Duration::from_secs(10),
            auth_collections: Default::default(),
            route_aggregate: Vec::new(),
            max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bind(#[from] server::BindError),
}

/// A running worker.
pub struct Worker {
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
    ready: wharf_ops::http::ReadyCheck,
}

/// Readiness of a store: it answers a ping.
fn ready_check<S: Store>(store: Arc<S>) -> wharf_ops::http::ReadyCheck {
    Arc::new(move || {
        let store = store.clone();
        Box::pin(async move { store.ping().await.map_err(|e| e.to_string()) })
    })
}

impl Worker {
    /// Opens the store (making indexes), binds the socket, and starts serving.
    pub async fn start(config: WorkerConfig) -> Result<Worker, StartError> {
        let shutdown = CancellationToken::new();
        let ready;
        let task = match &config.backend {
            Backend::Embedded { data_dir } => {
                let store = Arc::new(SqliteStore::open(data_dir)?);
                ready = ready_check(store.clone());
                tokio::spawn(purge_expired(store.clone(), shutdown.clone()));
                tokio::spawn(expire_sessions(store.clone(), shutdown.clone()));
                let listener =
                    server::bind(&config.socket, config.socket_mode, config.socket_group).await?;
                tracing::info!(dir = %data_dir.display(), socket = %config.socket.display(), "worker ready (embedded store)");
                tokio::spawn(run(store, None, config, listener, shutdown.clone()))
            }
            Backend::Mongo {
                uri,
                database,
                durability,
                change_streams,
            } => {
                let store = Arc::new(
                    MongoStore::connect(uri, database, durability, *change_streams)
                        .await?
                        .with_auth(config.auth_collections.clone()),
                );
                ready = ready_check(store.clone());
                tokio::spawn(expire_sessions(store.clone(), shutdown.clone()));
                let book = Arc::new(
                    routes::RouteBook::new(config.host.clone())
                        .aggregating(config.route_aggregate.clone()),
                );
                tokio::spawn(routes::follow(
                    store.clone(),
                    book.clone(),
                    store.route_view(),
                    shutdown.clone(),
                ));
                tokio::spawn(routes::write(store.clone(), book.clone(), shutdown.clone()));
                let listener =
                    server::bind(&config.socket, config.socket_mode, config.socket_group).await?;
                tracing::info!(database = %database, socket = %config.socket.display(), "worker ready (MongoDB)");
                tokio::spawn(run(store, Some(book), config, listener, shutdown.clone()))
            }
        };
        Ok(Worker {
            shutdown,
            task,
            ready,
        })
    }

    /// The readiness probe for the ops endpoint: the store answers.
    pub fn ready_check(&self) -> wharf_ops::http::ReadyCheck {
        self.ready.clone()
    }

    /// Graceful stop: stop reading from edges, finish queued writes, close.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

async fn run<S: Store>(
    store: Arc<S>,
    routes: Option<Arc<routes::RouteBook>>,
    config: WorkerConfig,
    listener: UnixListener,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let (persist, persist_rx) = pipeline::persist_queue(16_384, config.max_queued_bytes);
    let (record, record_rx) = pipeline::record_queue(16_384);
    let edges = Arc::new(fanout::Edges::default());
    tracker.spawn(pipeline::persister(
        store.clone(),
        edges.clone(),
        persist_rx,
        config.max_batch,
        config.retry_limit,
        config.commit_delay,
    ));
    let (feed_tx, mut feed_rx) = tokio::sync::mpsc::channel::<Vec<wharf_shared::Message>>(1024);
    tokio::spawn({
        let store = store.clone();
        let (host, shutdown) = (config.host.clone(), shutdown.clone());
        async move { store.follow_other_hosts(host, feed_tx, shutdown).await }
    });
    tokio::spawn({
        let edges = edges.clone();
        async move {
            while let Some(messages) = feed_rx.recv().await {
                metrics::counter!("wharf_worker_followed_messages_total")
                    .increment(messages.len() as u64);
                edges.fanout(&messages, true).await;
            }
        }
    });
    if store.shared_by_hosts() {
        tokio::spawn(follow_claims(
            store.clone(),
            edges.clone(),
            routes.clone(),
            config.host.clone(),
            shutdown.clone(),
        ));
    }
    tracker.spawn(pipeline::recorder(
        store.clone(),
        record_rx,
        config.max_batch,
        config.retry_limit,
    ));
    let shared = Arc::new(Shared {
        store,
        host: config.host.clone(),
        instance: format!("worker-{}@{}", std::process::id(), config.host),
        persist,
        record,
        edges,
        routes,
        retry_limit: config.retry_limit,
        rankings: Default::default(),
    });
    server::serve(shared, listener, shutdown, tracker.clone()).await;
    let _ = std::fs::remove_file(&config.socket);
    tracker.close();
    tracing::info!("worker stopping: finishing queued writes");
    if tokio::time::timeout(config.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?config.shutdown_grace, "worker shutdown grace ran out with writes pending");
    }
    tracing::info!("worker stopped");
}

/// How often the claims of other hosts are read: a connection on this host whose session
/// another host claimed ends within about this long.
const CLAIMS_EVERY: Duration = Duration::from_millis(200);

/// Sends this worker's edges the sessions other hosts claimed, then a lease: everything
/// claimed before the read started has been sent. An edge that hears nothing for a while
/// (this host frozen, the store out of reach) stops serving its sessions until it does.
async fn follow_claims<S: Store>(
    store: Arc<S>,
    edges: Arc<fanout::Edges>,
    routes: Option<Arc<routes::RouteBook>>,
    host: String,
    shutdown: CancellationToken,
) {
    let mut every = tokio::time::interval(CLAIMS_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Each read starts `LATE_MS` before the previous one: a claim is written with the
    // claiming worker's clock, and may land this much late (clock skew, a slow write).
    let mut since = server::now_ms() - wharf_shared::LATE_MS;
    // Claims sent already, with when they were read (sent again, they would be harmless).
    let mut sent: std::collections::HashMap<wharf_shared::Claim, i64> = Default::default();
    let mut failing = false;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let (started_ms, as_of_ms) = (server::now_ms(), wharf_shared::monotonic_ms());
        match store.claims_since(since, &host).await {
            Ok(claims) => {
                if failing {
                    tracing::info!("reading other hosts' session claims again");
                    failing = false;
                }
                let claims: Vec<wharf_shared::Claim> = claims
                    .into_iter()
                    .filter(|c| sent.insert(c.clone(), started_ms).is_none())
                    .collect();
                if !claims.is_empty() {
                    edges
                        .broadcast(wharf_shared::WorkerFrame::Claims { claims })
                        .await;
                }
                // Without a recent heartbeat other hosts stop addressing this one: its
                // sessions wait rather than miss what is sent meanwhile.
                if routes.as_ref().is_none_or(|r| r.heartbeat_holds()) {
                    edges
                        .broadcast(wharf_shared::WorkerFrame::Lease { as_of_ms })
                        .await;
                }
                since = started_ms - wharf_shared::LATE_MS;
                sent.retain(|_, read| *read >= since - wharf_shared::LATE_MS);
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot read other hosts' session claims: this host's sessions wait");
                    failing = true;
                }
            }
        }
    }
}

/// How often sessions whose expiry has passed are looked for: a session outlives its Session
/// Expiry Interval by at most this much.
const SESSION_SWEEP: Duration = Duration::from_secs(5);

/// Ends sessions whose client stayed away past their Session Expiry Interval: their
/// subscriptions, QoS 2 state and session record go (their messages stay for other readers
/// until the TTL). Every worker of a cluster sweeps; a session is dropped by the one whose
/// conditional delete of its record succeeds, and not at all if its client came back.
async fn expire_sessions<S: Store>(store: Arc<S>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(SESSION_SWEEP);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let now = server::now_ms();
        let clients = match store.expired_sessions(now).await {
            Ok(clients) => clients,
            Err(e) => {
                tracing::warn!(error = %e, "session expiry sweep failed");
                continue;
            }
        };
        for client_id in clients {
            let ended = async {
                if !store.drop_expired_session(&client_id, now).await? {
                    return Ok(false);
                }
                cmd::session::clear_session_state(&*store, Duration::from_secs(10), &client_id)
                    .await?;
                let clear = store::WriteBatch {
                    relaxed: true,
                    clear_qos2: vec![client_id.clone()],
                    ..store::WriteBatch::default()
                };
                store.write(Arc::new(clear)).await?;
                Ok::<bool, store::StoreError>(true)
            };
            match ended.await {
                Ok(true) => {
                    tracing::info!(client_id = %client_id, "session expired");
                    metrics::counter!("wharf_worker_sessions_expired_total").increment(1);
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(client_id = %client_id, error = %e, "session expiry failed")
                }
            }
        }
    }
}

async fn purge_expired(store: Arc<SqliteStore>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        match store.purge_expired(server::now_ms()).await {
            Ok((0, 0)) => {}
            Ok((messages, records)) => tracing::info!(messages, records, "expired rows purged"),
            Err(e) => tracing::warn!(error = %e, "purge failed"),
        }
    }
}
