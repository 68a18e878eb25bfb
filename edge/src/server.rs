//! The accept loop and the edge's life cycle.
//!
//! Shutdown: stop accepting, let every session finish what the store still owes it (bounded
//! by the grace period, with a warning when it runs out), then close the worker link.

use crate::broker::Broker;
use crate::config::EdgeConfig;
use crate::connection;
use crate::link::{Link, LinkConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A running edge, for embedding (tests, the all-in-one binary).
pub struct Edge {
    pub local_addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
    link: Link,
}

impl Edge {
    /// Validates the configuration, binds the listener and starts serving.
    pub async fn start(config: EdgeConfig) -> Result<Edge, StartError> {
        config.validate()?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| StartError::Bind(config.listen, e))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| StartError::Bind(config.listen, e))?;
        let shutdown = CancellationToken::new();
        let link = LinkParts::spawn(&config);
        let handle = link.link.clone();
        let task = tokio::spawn(run(config, listener, link, shutdown.clone()));
        Ok(Edge {
            local_addr,
            shutdown,
            task,
            link: handle,
        })
    }

    /// Ready for traffic: the store-worker link is up.
    pub fn is_ready(&self) -> bool {
        self.link.is_up()
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

    /// Graceful stop; returns when every session has finished.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

/// Routes messages that other hosts received (pushed by the worker) to this edge's sessions.
async fn route_from_other_hosts(
    broker: Arc<Broker>,
    mut deliveries: tokio::sync::mpsc::Receiver<Vec<wharf_shared::Message>>,
) {
    while let Some(messages) = deliveries.recv().await {
        let now = crate::ids::now_ms();
        for message in messages {
            let age = (now - message.created_ms).max(0) as f64 / 1000.0;
            metrics::histogram!("wharf_edge_cross_host_delivery_seconds").record(age);
            broker.route(&Arc::new(message));
        }
    }
}

/// Serves `listener` until `shutdown` fires.
/// The worker link task and what the server needs of it.
struct LinkParts {
    link: Link,
    task: tokio::task::JoinHandle<()>,
    shutdown: CancellationToken,
    deliveries: tokio::sync::mpsc::Receiver<Vec<wharf_shared::Message>>,
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

async fn run(
    config: EdgeConfig,
    listener: TcpListener,
    link: LinkParts,
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
    let broker = Arc::new(Broker::new(config, link));
    tokio::spawn(route_from_other_hosts(broker.clone(), deliveries));
    let tracker = TaskTracker::new();
    tracing::info!(addr = ?listener.local_addr().ok(), host = %broker.config.host, "edge listening");
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
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
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            metrics::counter!("wharf_edge_connections_refused_total").increment(1);
            tracing::warn!(%peer, "connection limit reached; closing new connection");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let broker = broker.clone();
        let token = shutdown.clone();
        tracker.spawn(async move {
            connection::serve(broker, stream, peer.to_string(), token).await;
            drop(permit);
        });
    }
    drop(listener);
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
    drop(broker);
    link_shutdown.cancel();
    if tokio::time::timeout(grace, link_task).await.is_err() {
        tracing::warn!("store-worker link did not drain within the grace period");
    }
    tracing::info!("edge stopped");
}
