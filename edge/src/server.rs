//! The accept loop and the edge's life cycle.
//!
//! Shutdown: stop accepting, let every session finish what the store still owes it (bounded
//! by the grace period, with a warning when it runs out), then close the worker link.

use crate::auth::{Auth, AuthSettings};
use crate::broker::Broker;
use crate::config::{ConfigError, EdgeConfig};
use crate::connection;
use crate::keepalive;
use crate::link::{Link, LinkConfig, Pushed};
use crate::router::Signals;
use crate::tls::{PeerIdentity, Tls, TlsSettings};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A running edge, for embedding (tests, the all-in-one binary).
pub struct Edge {
    /// The plain listener's address, or the TLS one's when plain is off.
    pub local_addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    pub shutdown: CancellationToken,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    link: Link,
    tls: Option<Arc<Tls>>,
    auth: Arc<Auth>,
    /// The listeners' addresses as configured, for the exposure check of a reload.
    listeners: Vec<(SocketAddr, bool)>,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| StartError::Bind(addr, e))
}

impl Edge {
    /// Validates the configuration (TLS files included), binds the listeners and starts
    /// serving. Nothing is bound when the configuration is bad.
    pub async fn start(config: EdgeConfig) -> Result<Edge, StartError> {
        config.validate()?;
        let tls = match &config.tls {
            Some(settings) => Some(Arc::new(Tls::new(settings.clone())?)),
            None => None,
        };
        let auth = Arc::new(Auth::load(
            config.auth.clone(),
            config.limits.connect_timeout,
        )?);
        let exposure = config.listeners();
        config.auth.log_exposure(&exposure);
        let plain = match config.listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let secure = match &config.tls {
            Some(settings) => Some(bind(settings.listen).await?),
            None => None,
        };
        let address = |l: &Option<TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
        let tls_addr = address(&secure);
        let local_addr = address(&plain)
            .or(tls_addr)
            .ok_or_else(|| StartError::Config(ConfigError::new("listen", "off", "no listener")))?;
        let shutdown = CancellationToken::new();
        let link = LinkParts::spawn(&config);
        let handle = link.link.clone();
        let listeners = Listeners {
            plain,
            tls: secure.zip(tls.clone()),
        };
        let task = tokio::spawn(run(config, listeners, link, auth.clone(), shutdown.clone()));
        Ok(Edge {
            local_addr,
            tls_addr,
            shutdown,
            task: std::sync::Mutex::new(Some(task)),
            link: handle,
            tls,
            auth,
            listeners: exposure,
        })
    }

    /// Re-reads the TLS certificates (with new settings, if given); existing connections are
    /// untouched. On error the previous certificates stay in force.
    pub fn reload_tls(&self, settings: Option<TlsSettings>) -> Result<(), ConfigError> {
        match &self.tls {
            Some(tls) => tls.reload(settings),
            None => Err(ConfigError::new(
                "tls",
                "false",
                "no TLS listener to reload",
            )),
        }
    }

    /// Re-reads the password and rule files (with new settings, if given). Sessions follow
    /// the new rules from their next check; on error the rules in force stay.
    pub fn reload_auth(&self, settings: Option<AuthSettings>) -> Result<(), ConfigError> {
        if let Some(settings) = &settings {
            settings.check_exposure(&self.listeners)?;
        }
        self.auth.reload(settings)
    }

    /// The TLS listener's current settings.
    pub fn tls_settings(&self) -> Option<TlsSettings> {
        self.tls.as_ref().map(|t| t.settings())
    }

    /// Graceful stop; returns when every session has finished (at once if another caller
    /// already waited for it).
    pub async fn stop(&self) {
        self.shutdown.cancel();
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// The readiness probe for the ops endpoint.
    pub fn ready_check(&self) -> wharf_shared::ops::ReadyCheck {
        let link = self.link.clone();
        std::sync::Arc::new(move || {
            let up = link.is_up();
            Box::pin(async move {
                if up {
                    Ok(())
                } else {
                    Err("store-worker link down".to_owned())
                }
            })
        })
    }
}

struct Listeners {
    plain: Option<TcpListener>,
    tls: Option<(TcpListener, Arc<Tls>)>,
}

async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

/// Routes messages that other hosts received (pushed by the worker) to this edge's sessions,
/// ends sessions claimed elsewhere, and renews the lease, in the order the worker sent them.
async fn route_from_other_hosts(
    broker: Arc<Broker>,
    mut deliveries: tokio::sync::mpsc::Receiver<Pushed>,
) {
    while let Some(pushed) = deliveries.recv().await {
        match pushed {
            Pushed::Messages(messages) => {
                let now = crate::ids::now_ms();
                for message in messages {
                    let age = (now - message.created_ms).max(0) as f64 / 1000.0;
                    metrics::histogram!("wharf_edge_cross_host_delivery_seconds").record(age);
                    broker.route(&Arc::new(message));
                }
            }
            Pushed::Claims(claims) => {
                for claim in claims {
                    if broker
                        .registry
                        .claimed_elsewhere(&claim.client_id, claim.generation)
                    {
                        tracing::info!(client_id = %claim.client_id, "session claimed by a connection elsewhere: ending it here");
                        metrics::counter!("wharf_edge_sessions_claimed_elsewhere_total")
                            .increment(1);
                    }
                }
            }
            Pushed::Lease { as_of_ms } => {
                broker.lease.renew(as_of_ms);
                broker.router.set_shared_store();
            }
        }
    }
}

/// The worker link task and what the server needs of it.
struct LinkParts {
    link: Link,
    task: tokio::task::JoinHandle<()>,
    shutdown: CancellationToken,
    deliveries: tokio::sync::mpsc::Receiver<Pushed>,
}

impl LinkParts {
    fn spawn(config: &EdgeConfig) -> LinkParts {
        let shutdown = CancellationToken::new();
        let (deliveries_tx, deliveries) = tokio::sync::mpsc::channel(1024);
        let (link, task) = Link::spawn(
            LinkConfig {
                socket: config.worker_socket.clone(),
                host: config.host.clone(),
                instance: format!("edge-{}@{}", std::process::id(), config.host),
                max_held: config.limits.max_held_persists,
            },
            deliveries_tx,
            shutdown.clone(),
        );
        LinkParts {
            link,
            task,
            shutdown,
            deliveries,
        }
    }
}

/// New connections per second from each source address, in one-second windows.
struct ConnectionRate {
    limit: u32,
    second: u64,
    counts: std::collections::HashMap<std::net::IpAddr, u32>,
}

impl ConnectionRate {
    fn new(limit: u32) -> ConnectionRate {
        ConnectionRate {
            limit,
            second: 0,
            counts: Default::default(),
        }
    }

    fn admit(&mut self, ip: std::net::IpAddr, second: u64) -> bool {
        if self.limit == 0 {
            return true;
        }
        if second != self.second {
            self.counts.clear();
            self.second = second;
        }
        let count = self.counts.entry(ip).or_insert(0);
        *count += 1;
        *count <= self.limit
    }
}

async fn run(
    config: EdgeConfig,
    listeners: Listeners,
    link: LinkParts,
    auth: Arc<Auth>,
    shutdown: CancellationToken,
) {
    let LinkParts {
        link,
        task: link_task,
        shutdown: link_shutdown,
        deliveries,
    } = link;
    let grace = config.shutdown_grace;
    let connections = Arc::new(Semaphore::new(config.limits.max_connections));
    let broker = Arc::new(Broker::new(config, link, auth));
    tokio::spawn(route_from_other_hosts(broker.clone(), deliveries));
    tokio::spawn(crate::groups::fetch_loop(broker.clone(), shutdown.clone()));
    tokio::spawn(crate::auth::follow_store(
        broker.auth.clone(),
        broker.link.clone(),
        shutdown.clone(),
    ));
    let sweeper = tokio::spawn({
        let (broker, shutdown) = (broker.clone(), shutdown.clone());
        async move { keepalive::sweep(&broker.router, &broker.registry, &shutdown).await }
    });
    let tracker = TaskTracker::new();
    let mut rate = ConnectionRate::new(broker.config.limits.max_connection_rate);
    let Listeners { plain, tls } = listeners;
    tracing::info!(
        plain = ?plain.as_ref().and_then(|l| l.local_addr().ok()),
        tls = ?tls.as_ref().and_then(|(l, _)| l.local_addr().ok()),
        host = %broker.config.host,
        "edge listening"
    );
    loop {
        let (accepted, secure) = tokio::select! {
            a = accept(plain.as_ref()) => (a, None),
            a = accept(tls.as_ref().map(|(l, _)| l)) => (a, tls.as_ref().map(|(_, t)| t.clone())),
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        if !rate.admit(peer.ip(), crate::keepalive::now_ms() / 1000) {
            metrics::counter!("wharf_edge_connections_refused_total", "reason" => "rate")
                .increment(1);
            tracing::debug!(%peer, "connection rate from this address exceeded; closing");
            continue;
        }
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            metrics::counter!("wharf_edge_connections_refused_total").increment(1);
            tracing::warn!(%peer, "connection limit reached; closing new connection");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let broker = broker.clone();
        let token = shutdown.clone();
        // Two task types, so that a plain connection's task is not sized for TLS.
        match secure {
            None => tracker.spawn(connection::serve(broker, stream, peer, None, token, permit)),
            Some(tls) => tracker.spawn(serve_tls(broker, tls, stream, peer, token, permit)),
        };
    }
    drop(plain);
    drop(tls);
    // Sessions attached after this see the cancelled token when their run loop starts.
    broker
        .router
        .for_each_session(|session| session.signal(Signals::SHUTDOWN));
    tracker.close();
    tracing::info!(
        sessions = tracker.len(),
        "edge stopping: no new connections"
    );
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            left = tracker.len(),
            ?grace,
            "shutdown grace period ran out; closing the rest"
        );
    }
    let _ = sweeper.await;
    drop(broker);
    link_shutdown.cancel();
    if tokio::time::timeout(grace, link_task).await.is_err() {
        tracing::warn!("store-worker link did not drain within the grace period");
    }
    tracing::info!("edge stopped");
}

/// TLS handshake (within the connect timeout), then the MQTT session with the client
/// certificate's names, if any.
async fn serve_tls(
    broker: Arc<Broker>,
    tls: Arc<Tls>,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
    permit: OwnedSemaphorePermit,
) {
    let timeout = broker.config.limits.connect_timeout;
    let handshake = tokio::time::timeout(timeout, tls.acceptor().accept(stream)).await;
    let stream = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            metrics::counter!("wharf_edge_tls_handshake_failures_total").increment(1);
            tracing::info!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            metrics::counter!("wharf_edge_tls_handshake_failures_total").increment(1);
            tracing::info!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let identity = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| PeerIdentity::from_der(leaf));
    connection::serve(
        broker,
        stream,
        peer,
        Some(Box::new(identity.unwrap_or_default())),
        shutdown,
        permit,
    )
    .await;
}
