//! The accept loop and the edge's life cycle.
//!
//! Shutdown: stop accepting, let every session finish what the store still owes it (bounded
//! by the grace period, with a warning when it runs out), then close the worker link.

use crate::auth::{Auth, AuthSettings};
use crate::broker::Broker;
use crate::config::{ConfigError, EdgeConfig, ListenerKind};
use crate::connection;
use crate::keepalive;
use crate::link::{Link, LinkConfig, Pushed};
use crate::proxy;
use crate::router::Signals;
use crate::tls::{PeerIdentity, Tls, TlsSettings};
use crate::websocket::{self, WsStream};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A running edge, for embedding (tests, the all-in-one binary).
pub struct Edge {
    /// The plain listener's address, or else the first of TLS, WebSocket, secure WebSocket.
    pub local_addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    pub ws_addr: Option<SocketAddr>,
    pub wss_addr: Option<SocketAddr>,
    pub shutdown: CancellationToken,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    link: Link,
    tls: Option<Arc<Tls>>,
    auth: Arc<Auth>,
    /// The listeners' addresses as configured, for the exposure check of a reload.
    listeners: Vec<(SocketAddr, bool)>,
    broker: Arc<Broker>,
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
        wharf_shared::topic::set_max_levels(config.limits.max_topic_levels);
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
        let mut listeners = Vec::new();
        for (kind, addr) in config.listener_addresses() {
            listeners.push(Listener {
                tcp: bind(addr).await?,
                kind,
                proxy: config.proxy.requires(kind),
            });
        }
        let address = |kind: ListenerKind| {
            listeners
                .iter()
                .find(|l| l.kind == kind)
                .and_then(|l| l.tcp.local_addr().ok())
        };
        let (tls_addr, ws_addr, wss_addr) = (
            address(ListenerKind::Tls),
            address(ListenerKind::Ws),
            address(ListenerKind::Wss),
        );
        let local_addr = listeners
            .first()
            .and_then(|l| l.tcp.local_addr().ok())
            .ok_or_else(|| StartError::Config(ConfigError::new("listen", "off", "no listener")))?;
        let shutdown = CancellationToken::new();
        let link = LinkParts::spawn(&config);
        let handle = link.link.clone();
        let broker = Arc::new(Broker::new(config, link.link.clone(), auth.clone()));
        let task = tokio::spawn(run(
            broker.clone(),
            Listeners {
                bound: listeners,
                tls: tls.clone(),
            },
            link,
            shutdown.clone(),
        ));
        Ok(Edge {
            local_addr,
            tls_addr,
            ws_addr,
            wss_addr,
            shutdown,
            task: std::sync::Mutex::new(Some(task)),
            link: handle,
            tls,
            auth,
            listeners: exposure,
            broker,
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

    /// The admin API and console for the ops endpoint (see [`crate::admin`]).
    pub fn admin_api(
        &self,
        settings: crate::admin::AdminSettings,
        metrics: Option<wharf_ops::http::PrometheusHandle>,
    ) -> wharf_ops::http::Api {
        crate::admin::api(self.broker.clone(), settings, metrics)
    }

    /// The readiness probe for the ops endpoint.
    pub fn ready_check(&self) -> wharf_ops::http::ReadyCheck {
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

/// One bound listener and how its connections start.
struct Listener {
    tcp: TcpListener,
    kind: ListenerKind,
    /// Every connection must start with a PROXY protocol header.
    proxy: bool,
}

struct Listeners {
    bound: Vec<Listener>,
    /// The certificates of the TLS and secure WebSocket listeners.
    tls: Option<Arc<Tls>>,
}

/// The next connection on any listener, looking at them from `first` on (round robin, so
/// that a flood on one listener does not starve the others); with the listener's index.
fn poll_accept(
    listeners: &[Listener],
    first: usize,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<(std::io::Result<(TcpStream, SocketAddr)>, usize)> {
    let n = listeners.len();
    for k in 0..n {
        let i = (first + k) % n;
        if let std::task::Poll::Ready(accepted) = listeners[i].tcp.poll_accept(cx) {
            return std::task::Poll::Ready((accepted, i));
        }
    }
    std::task::Poll::Pending
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

/// Sends this edge's state to the worker every [`wharf_shared::STATUS_EVERY_MS`], for the
/// cluster view (the store keeps each host's last one).
async fn report_status(broker: Arc<Broker>, shutdown: CancellationToken) {
    use std::sync::atomic::Ordering::Relaxed;
    let step = std::time::Duration::from_millis(wharf_shared::STATUS_EVERY_MS as u64);
    let mut every = tokio::time::interval(step);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started_ms = crate::ids::now_ms();
    let listeners: Vec<String> = broker
        .config
        .listener_addresses()
        .map(|(kind, addr)| format!("{} {addr}", kind.name()))
        .collect();
    let mut last: Option<(std::time::Instant, u64, u64)> = None;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let now = std::time::Instant::now();
        let (received, sent) = (
            broker.metrics.received_total.load(Relaxed),
            broker.metrics.sent_total.load(Relaxed),
        );
        let (rate_in, rate_out) = match last {
            Some((at, r, s)) => {
                let seconds = now.duration_since(at).as_secs_f64().max(0.001);
                ((received - r) as f64 / seconds, (sent - s) as f64 / seconds)
            }
            None => (0.0, 0.0),
        };
        last = Some((now, received, sent));
        if !broker.link.is_up() {
            continue;
        }
        let status = wharf_shared::HostStatus {
            host: broker.config.host.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_ms,
            reported_ms: crate::ids::now_ms(),
            connections: broker.router.session_count() as u64,
            parked_sessions: broker.registry.parked_count() as u64,
            messages_in_per_sec: (rate_in * 10.0).round() / 10.0,
            messages_out_per_sec: (rate_out * 10.0).round() / 10.0,
            listeners: listeners.clone(),
            groups: broker.router.owned_groups(),
            bridges: broker
                .bridges
                .iter()
                .map(|b| (b.config.name.clone(), b.phase().label().to_owned()))
                .collect(),
            ..Default::default()
        };
        broker
            .link
            .notify(wharf_shared::Notice::Status(Box::new(status)))
            .await;
    }
}

/// Tells the worker this edge's routes (the filters its sessions subscribe to) where hosts
/// share the store: the whole set once per link connection, then what changed, every 50 ms.
async fn report_routes(broker: Arc<Broker>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(std::time::Duration::from_millis(50));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported_on = None;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let connection = broker.link.connections();
        if !broker.link.is_up() || !broker.lease.enforced() {
            // Nobody to tell: the changes are dropped (the whole set goes when it matters).
            broker.router.take_route_changes();
            continue;
        }
        let notice = if reported_on != Some(connection) {
            reported_on = Some(connection);
            wharf_shared::Notice::Routes {
                added: broker.router.all_routes(),
                removed: Vec::new(),
                whole: true,
            }
        } else if let Some((added, removed)) = broker.router.take_route_changes() {
            wharf_shared::Notice::Routes {
                added,
                removed,
                whole: false,
            }
        } else {
            continue;
        };
        broker.link.notify(notice).await;
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

/// How long the edge waits at start for its bridges' local sessions before taking clients.
const BRIDGES_SETTLE_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

async fn run(
    broker: Arc<Broker>,
    listeners: Listeners,
    link: LinkParts,
    shutdown: CancellationToken,
) {
    let LinkParts {
        task: link_task,
        shutdown: link_shutdown,
        deliveries,
        ..
    } = link;
    let grace = broker.config.shutdown_grace;
    let connections = Arc::new(Semaphore::new(broker.config.limits.max_connections));
    tokio::spawn(route_from_other_hosts(broker.clone(), deliveries));
    tokio::spawn(crate::groups::fetch_loop(broker.clone(), shutdown.clone()));
    tokio::spawn(report_routes(broker.clone(), shutdown.clone()));
    tokio::spawn(report_status(broker.clone(), shutdown.clone()));
    for bridge in &broker.bridges {
        tokio::spawn(crate::bridge::run(
            broker.clone(),
            bridge.clone(),
            shutdown.clone(),
        ));
    }
    tokio::spawn(crate::auth::follow_store(
        broker.auth.clone(),
        broker.link.clone(),
        shutdown.clone(),
    ));
    let sweeper = tokio::spawn({
        let (broker, shutdown) = (broker.clone(), shutdown.clone());
        async move {
            keepalive::sweep(
                &broker.router,
                &broker.registry,
                &broker.auth,
                &broker.lease,
                &shutdown,
            )
            .await
        }
    });
    // A bridge new in the store owes nothing until its local session has subscribed: clients
    // wait in the listen backlog until each bridge has (or stands by for another host).
    let bridges_settled = async {
        for bridge in &broker.bridges {
            bridge.settled().await;
        }
    };
    tokio::select! {
        settled = tokio::time::timeout(BRIDGES_SETTLE_WITHIN, bridges_settled) => {
            if settled.is_err() {
                tracing::warn!(within = ?BRIDGES_SETTLE_WITHIN, "bridges not subscribed yet (is the store-worker up?): taking clients anyway; what they publish before a new bridge subscribes is not the bridge's");
            }
        }
        _ = shutdown.cancelled() => {}
    }
    let tracker = TaskTracker::new();
    let rate = Arc::new(std::sync::Mutex::new(ConnectionRate::new(
        broker.config.limits.max_connection_rate,
    )));
    let Listeners { bound, tls } = listeners;
    for l in &bound {
        tracing::info!(
            listener = l.kind.name(),
            addr = ?l.tcp.local_addr().ok(),
            proxy_protocol = l.proxy,
            path = (matches!(l.kind, ListenerKind::Ws | ListenerKind::Wss)).then_some(&*broker.config.web.path),
            host = %broker.config.host,
            "edge listening"
        );
    }
    let mut next = 0;
    loop {
        let (accepted, index) = tokio::select! {
            a = std::future::poll_fn(|cx| poll_accept(&bound, next, cx)) => a,
            _ = shutdown.cancelled() => break,
        };
        next = index + 1;
        let Listener { kind, proxy, .. } = bound[index];
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        // Behind a proxy the socket's address is the proxy's: the rate is counted for the
        // header's address instead.
        if !proxy && !admit(&rate, peer) {
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
        // Task types of their own for plain and TLS connections, so that their tasks are not
        // sized for the others.
        match (kind, proxy, &tls) {
            (ListenerKind::Mqtt, false, _) => {
                tracker.spawn(connection::serve(broker, stream, peer, None, token, permit))
            }
            (ListenerKind::Tls, false, Some(tls)) => {
                tracker.spawn(serve_tls(broker, tls.clone(), stream, peer, token, permit))
            }
            _ => tracker.spawn(serve_other(
                broker,
                Start {
                    kind,
                    proxy,
                    tls: tls.clone(),
                    rate: rate.clone(),
                },
                stream,
                peer,
                token,
                permit,
            )),
        };
    }
    drop(bound);
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

/// Counts a new connection from `peer` against the connection rate; false (and counted as
/// refused) past it.
fn admit(rate: &std::sync::Mutex<ConnectionRate>, peer: SocketAddr) -> bool {
    let second = crate::ids::monotonic_ms() / 1000;
    let admitted = rate
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .admit(peer.ip(), second);
    if !admitted {
        metrics::counter!("wharf_edge_connections_refused_total", "reason" => "rate").increment(1);
        tracing::debug!(%peer, "connection rate from this address exceeded; closing");
    }
    admitted
}

/// The deadline for everything before CONNECT (PROXY header, TLS, WebSocket upgrade).
fn connect_deadline(broker: &Broker) -> tokio::time::Instant {
    tokio::time::Instant::now() + broker.config.limits.connect_timeout
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
    let deadline = connect_deadline(&broker);
    if let Some((stream, identity)) = tls_handshake(&tls, stream, peer, deadline).await {
        connection::serve(broker, stream, peer, Some(identity), shutdown, permit).await;
    }
}

type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// The TLS handshake and the client certificate's names (none without a certificate).
async fn tls_handshake(
    tls: &Tls,
    stream: TcpStream,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
) -> Option<(TlsStream, Box<PeerIdentity>)> {
    let handshake = tokio::time::timeout_at(deadline, tls.acceptor().accept(stream)).await;
    let stream = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            metrics::counter!("wharf_edge_tls_handshake_failures_total").increment(1);
            tracing::info!(%peer, error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            metrics::counter!("wharf_edge_tls_handshake_failures_total").increment(1);
            tracing::info!(%peer, "TLS handshake timed out");
            return None;
        }
    };
    let identity = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| PeerIdentity::from_der(leaf));
    Some((stream, Box::new(identity.unwrap_or_default())))
}

/// The WebSocket upgrade, within the connect timeout.
async fn ws_upgrade<S>(
    broker: &Broker,
    stream: S,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
) -> Option<WsStream<S>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (path, max) = (
        &broker.config.web.path,
        broker.config.limits.max_packet_size,
    );
    match tokio::time::timeout_at(deadline, websocket::accept(stream, path, max)).await {
        Ok(Ok(ws)) => Some(ws),
        Ok(Err(e)) => {
            metrics::counter!("wharf_edge_websocket_upgrade_failures_total").increment(1);
            tracing::info!(%peer, error = %e, "WebSocket upgrade refused");
            None
        }
        Err(_) => {
            metrics::counter!("wharf_edge_websocket_upgrade_failures_total").increment(1);
            tracing::info!(%peer, "WebSocket upgrade timed out");
            None
        }
    }
}

/// How a connection of [`serve_other`] starts.
struct Start {
    kind: ListenerKind,
    proxy: bool,
    tls: Option<Arc<Tls>>,
    rate: Arc<std::sync::Mutex<ConnectionRate>>,
}

/// A connection that needs more than a socket (and TLS) before MQTT: a PROXY protocol
/// header, a WebSocket upgrade. Each step within the connect timeout.
async fn serve_other(
    broker: Arc<Broker>,
    start: Start,
    mut stream: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
    permit: OwnedSemaphorePermit,
) {
    let deadline = connect_deadline(&broker);
    let listener = start.kind.name();
    let peer = if start.proxy {
        let header = tokio::time::timeout_at(deadline, proxy::read_header(&mut stream)).await;
        let source = match header {
            Ok(Ok(source)) => source.unwrap_or(peer),
            Ok(Err(e)) => {
                metrics::counter!("wharf_edge_connections_refused_total", "reason" => "proxy")
                    .increment(1);
                tracing::info!(%peer, listener, error = %e, "closing a connection without a valid PROXY protocol header");
                return;
            }
            Err(_) => {
                metrics::counter!("wharf_edge_connections_refused_total", "reason" => "proxy")
                    .increment(1);
                tracing::info!(%peer, listener, "PROXY protocol header timed out");
                return;
            }
        };
        tracing::info!(proxy = %peer, client = %source, listener, "connection through a proxy");
        if !admit(&start.rate, source) {
            return;
        }
        source
    } else {
        peer
    };
    let tls = start.tls.as_deref();
    match (start.kind, tls) {
        (ListenerKind::Mqtt, _) => {
            connection::serve(broker, stream, peer, None, shutdown, permit).await
        }
        (ListenerKind::Tls, Some(tls)) => {
            if let Some((stream, identity)) = tls_handshake(tls, stream, peer, deadline).await {
                connection::serve(broker, stream, peer, Some(identity), shutdown, permit).await;
            }
        }
        (ListenerKind::Ws, _) => {
            if let Some(ws) = ws_upgrade(&broker, stream, peer, deadline).await {
                connection::serve(broker, ws, peer, None, shutdown, permit).await;
            }
        }
        (ListenerKind::Wss, Some(tls)) => {
            let Some((stream, identity)) = tls_handshake(tls, stream, peer, deadline).await else {
                return;
            };
            if let Some(ws) = ws_upgrade(&broker, stream, peer, deadline).await {
                connection::serve(broker, ws, peer, Some(identity), shutdown, permit).await;
            }
        }
        // Validation makes certificates a condition of both TLS listeners.
        (ListenerKind::Tls | ListenerKind::Wss, None) => {
            tracing::error!(listener, "TLS listener without certificates; closing");
        }
    }
}
