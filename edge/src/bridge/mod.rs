//! Bridges to other brokers: store-and-forward in both directions.
//!
//! A bridge is two MQTT client connections and a pump between them. The local one is an
//! ordinary persistent session of this edge (`$bridge/<name>`, MQTT 5.0, over an in-process
//! stream served by [`crate::connection::serve`]), subscribed to the `out` filters; the remote
//! one is a persistent session on the other broker, subscribed to the `in` filters. The pump
//! keeps no message of its own:
//!
//! - out: a local PUBLISH is sent to the remote, and acknowledged locally only when the
//!   remote's PUBACK for it arrives. Until then the message is owed to the local session in
//!   the store, so a restart of either side, an outage of hours or a crash of this process
//!   redelivers it (QoS 1: duplicates only after a reconnect). The local session's Receive
//!   Maximum is the remote's, so the remote's limit holds.
//! - in: a remote PUBLISH is published here at QoS 1, and the remote gets its PUBACK only
//!   after this edge's, which follows the durable write. The remote's session keeps what
//!   Wharf has not taken.
//!
//! Either connection failing ends both (the other side redelivers what was in flight), and
//! the bridge connects again with a backoff.
//!
//! One instance of each bridge runs in a cluster: before connecting, and every second, the
//! bridge renews an ownership lease in the store (as shared groups are owned); a host that
//! cannot renew it for [`OWNERSHIP_HOLDS`] stops, and another host takes the lease over
//! once the store's lease has run out, resuming the same local session.
//!
//! Loops: the local subscription uses No Local, so what the bridge publishes here is not
//! sent back out; towards a 5.0 remote the remote subscription does too. A 3.1.1 remote has
//! no No Local: what the bridge forwarded is remembered (topic and payload, for
//! [`ECHO_WINDOW`]) and one copy of it coming back is taken as its echo and not published.

pub mod config;
mod pump;

pub use config::BridgeConfig;

use crate::broker::Broker;
use crate::link::Policy;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use wharf_shared::{Reply, Request};

/// Client ids under this prefix are the bridges' local sessions; no client may use them.
pub const SESSION_PREFIX: &str = "$bridge/";
/// How often the ownership lease is renewed.
const OWN_EVERY: Duration = Duration::from_secs(1);
/// How long a renewal holds, from when it was asked (less than the store's
/// `GROUP_LEASE_MS`, after which another host may take the bridge).
pub const OWNERSHIP_HOLDS: Duration = Duration::from_secs(3);
/// How long what was forwarded to a 3.1.1 remote is remembered, to recognise its echo.
pub const ECHO_WINDOW: Duration = Duration::from_secs(60);
const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A connection that lasted this long starts the next one's backoff afresh.
const STABLE: Duration = Duration::from_secs(10);

/// What a bridge is doing, for the admin API, the console and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Starting,
    /// Another host of the cluster runs this bridge.
    Standby,
    Connecting,
    Connected,
    /// The last attempt failed; the next one follows after a backoff.
    Failed(String),
}

/// One configured bridge and its live state.
pub struct Bridge {
    pub config: BridgeConfig,
    phase: Mutex<Phase>,
    /// Messages the remote acknowledged (out) / Wharf stored (in), since this process started.
    forwarded: AtomicU64,
    received: AtomicU64,
    /// Messages that cannot cross at all (larger than the other side accepts, or matching no
    /// pattern), acknowledged and counted.
    dropped: AtomicU64,
    /// Echoes of forwarded messages not published (3.1.1 remotes).
    echoes: AtomicU64,
    out_in_flight: AtomicU64,
    in_in_flight: AtomicU64,
    /// Unix ms when the oldest message still unacknowledged by the remote was sent; 0: none.
    oldest_in_flight_ms: AtomicI64,
    connected_since_ms: AtomicI64,
    connects: AtomicU64,
    /// Messages the local session is owed in the store (at most [`BACKLOG_COUNTED`]), read
    /// every [`BACKLOG_EVERY`] by the host that runs the bridge; `u64::MAX` until read.
    backlog: AtomicU64,
    /// Whether `backlog` is all of it (else: at least that many).
    backlog_complete: std::sync::atomic::AtomicBool,
    /// Unix ms when the oldest owed message was created; 0: none owed.
    oldest_owed_ms: AtomicI64,
}

/// How often the bridge's backlog is read from the store.
pub const BACKLOG_EVERY: Duration = Duration::from_secs(5);
/// Owed messages counted at most, each time (a page of the catch-up at a time).
pub const BACKLOG_COUNTED: u32 = 10_000;

impl Bridge {
    pub fn new(config: BridgeConfig) -> Bridge {
        Bridge {
            config,
            phase: Mutex::new(Phase::Starting),
            forwarded: AtomicU64::new(0),
            received: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            echoes: AtomicU64::new(0),
            out_in_flight: AtomicU64::new(0),
            in_in_flight: AtomicU64::new(0),
            oldest_in_flight_ms: AtomicI64::new(0),
            connected_since_ms: AtomicI64::new(0),
            connects: AtomicU64::new(0),
            backlog: AtomicU64::new(u64::MAX),
            backlog_complete: std::sync::atomic::AtomicBool::new(false),
            oldest_owed_ms: AtomicI64::new(0),
        }
    }

    /// The local session's client id.
    pub fn session(&self) -> String {
        format!("{SESSION_PREFIX}{}", self.config.name)
    }

    pub fn phase(&self) -> Phase {
        self.phase.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_phase(&self, phase: Phase) {
        let label = |p: &Phase| match p {
            Phase::Connected => 1.0,
            _ => 0.0,
        };
        metrics::gauge!("wharf_bridge_connected", "bridge" => self.config.name.clone())
            .set(label(&phase));
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase;
    }

    /// The status as the admin API serves it.
    pub fn status(&self) -> serde_json::Value {
        let (state, error) = match self.phase() {
            Phase::Starting => ("starting", None),
            Phase::Standby => ("standby", None),
            Phase::Connecting => ("connecting", None),
            Phase::Connected => ("connected", None),
            Phase::Failed(e) => ("failed", Some(e)),
        };
        let oldest = self.oldest_in_flight_ms.load(Ordering::Relaxed);
        let backlog = self.backlog.load(Ordering::Relaxed);
        let oldest_owed = self.oldest_owed_ms.load(Ordering::Relaxed);
        let since = self.connected_since_ms.load(Ordering::Relaxed);
        let c = &self.config;
        serde_json::json!({
            "name": c.name,
            "remote": c.address,
            "protocol": c.version.label(),
            "tls": c.tls.is_some(),
            "clientId": c.client_id,
            "session": self.session(),
            "state": state,
            "error": error,
            "connectedSinceMs": (since > 0 && state == "connected").then_some(since),
            "connects": self.connects.load(Ordering::Relaxed),
            "forwarded": self.forwarded.load(Ordering::Relaxed),
            "received": self.received.load(Ordering::Relaxed),
            "dropped": self.dropped.load(Ordering::Relaxed),
            "echoesSkipped": self.echoes.load(Ordering::Relaxed),
            "outInFlight": self.out_in_flight.load(Ordering::Relaxed),
            "inInFlight": self.in_in_flight.load(Ordering::Relaxed),
            "oldestInFlightAgeMs": (oldest > 0).then(|| (crate::ids::now_ms() - oldest).max(0)),
            "backlog": (backlog != u64::MAX).then_some(backlog),
            "backlogComplete": self.backlog_complete.load(Ordering::Relaxed),
            "oldestOwedAgeMs": (oldest_owed > 0).then(|| (crate::ids::now_ms() - oldest_owed).max(0)),
            "out": c.out.iter().map(|t| serde_json::json!({
                "filter": t.local_filter(), "qos": t.qos.as_u8(), "remotePrefix": t.remote_prefix,
            })).collect::<Vec<_>>(),
            "in": c.inbound.iter().map(|t| serde_json::json!({
                "filter": t.remote_filter(), "qos": t.qos.as_u8(), "localPrefix": t.local_prefix,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Reads the bridge's backlog from the store while this host runs it (not on standby).
async fn watch_backlog(broker: Arc<Broker>, bridge: Arc<Bridge>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(BACKLOG_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if matches!(bridge.phase(), Phase::Standby | Phase::Starting) {
            continue;
        }
        let request = Request::Owed {
            client_id: bridge.session(),
            limit: BACKLOG_COUNTED,
        };
        let Ok(rx) = broker.link.request(request, Policy::FailFast).await else {
            continue;
        };
        if let Ok(Ok(Ok(Reply::Owed {
            count,
            oldest_ms,
            complete,
        }))) = tokio::time::timeout(BACKLOG_EVERY, rx).await
        {
            bridge.backlog.store(count, Ordering::Relaxed);
            bridge.backlog_complete.store(complete, Ordering::Relaxed);
            bridge
                .oldest_owed_ms
                .store(oldest_ms.unwrap_or(0), Ordering::Relaxed);
            let name = bridge.config.name.clone();
            metrics::gauge!("wharf_bridge_backlog_messages", "bridge" => name.clone())
                .set(count as f64);
            let age = oldest_ms.map_or(0.0, |t| (crate::ids::now_ms() - t).max(0) as f64 / 1000.0);
            metrics::gauge!("wharf_bridge_oldest_owed_seconds", "bridge" => name).set(age);
        }
    }
}

/// Runs one bridge until `shutdown`: ownership, connection, pump, backoff, again.
pub async fn run(broker: Arc<Broker>, bridge: Arc<Bridge>, shutdown: CancellationToken) {
    tokio::spawn(watch_backlog(
        broker.clone(),
        bridge.clone(),
        shutdown.clone(),
    ));
    let owner = Owner::new(&broker, &bridge);
    let mut backoff = MIN_BACKOFF;
    // Whether the local session and its subscriptions exist (see `pump::register`).
    let mut registered = false;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        match owner.renew(&broker).await {
            Ok(true) => {}
            Ok(false) => {
                if bridge.phase() != Phase::Standby {
                    tracing::info!(bridge = %bridge.config.name, "bridge runs on another host; standing by");
                }
                bridge.set_phase(Phase::Standby);
                if sleep_or_stop(OWN_EVERY, &shutdown).await {
                    return;
                }
                continue;
            }
            Err(e) => {
                bridge.set_phase(Phase::Failed(format!("ownership not known: {e}")));
                if sleep_or_stop(OWN_EVERY, &shutdown).await {
                    return;
                }
                continue;
            }
        }
        bridge.set_phase(Phase::Connecting);
        if !registered {
            match pump::register(&broker, &bridge, &shutdown).await {
                Ok(()) => registered = true,
                Err(e) => {
                    bridge.set_phase(Phase::Failed(e));
                    if sleep_or_stop(jittered(backoff), &shutdown).await {
                        return;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
        }
        let started = tokio::time::Instant::now();
        let ended = pump::connect_and_pump(&broker, &bridge, &owner, &shutdown).await;
        bridge.out_in_flight.store(0, Ordering::Relaxed);
        bridge.in_in_flight.store(0, Ordering::Relaxed);
        bridge.oldest_in_flight_ms.store(0, Ordering::Relaxed);
        match ended {
            pump::Ended::Shutdown => return,
            pump::Ended::NotOwner => {
                tracing::info!(bridge = %bridge.config.name, "bridge ownership lost; stopped");
                bridge.set_phase(Phase::Standby);
                continue;
            }
            pump::Ended::Failed(error) => {
                if started.elapsed() >= STABLE {
                    backoff = MIN_BACKOFF;
                }
                tracing::warn!(bridge = %bridge.config.name, remote = %bridge.config.address, %error, retry_in = ?backoff, "bridge connection failed");
                metrics::counter!("wharf_bridge_failures_total", "bridge" => bridge.config.name.clone())
                    .increment(1);
                bridge.set_phase(Phase::Failed(error));
                if sleep_or_stop(jittered(backoff), &shutdown).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Sleeps; `true` when `shutdown` came first.
async fn sleep_or_stop(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = shutdown.cancelled() => true,
    }
}

/// 75% to 125% of `d`, so that hosts do not retry in step.
fn jittered(d: Duration) -> Duration {
    let spread = (crate::ids::now_ms().unsigned_abs() % 500) as u32;
    d * (750 + spread) / 1000
}

/// The bridge's ownership lease in the store (a group lease under its own key).
pub(crate) struct Owner {
    owner: String,
    key: String,
    /// [`crate::ids::monotonic_ms`] until which the last renewal holds.
    holds_until: AtomicU64,
}

impl Owner {
    fn new(broker: &Broker, bridge: &Bridge) -> Owner {
        Owner {
            // This process of this host (a restarted edge is a new owner).
            owner: format!(
                "bridge-{}-{}@{}",
                std::process::id(),
                crate::ids::now_ms(),
                broker.config.host
            ),
            key: format!("$bridge-owner/{}", bridge.config.name),
            holds_until: AtomicU64::new(0),
        }
    }

    /// Asks the store; `Ok(true)` while this process owns the bridge.
    pub(crate) async fn renew(&self, broker: &Broker) -> Result<bool, String> {
        let asked = crate::ids::monotonic_ms();
        let request = Request::OwnGroups {
            owner: self.owner.clone(),
            groups: vec![self.key.clone()],
        };
        let rx = broker
            .link
            .request(request, Policy::FailFast)
            .await
            .map_err(|e| e.to_string())?;
        let reply = tokio::time::timeout(OWNERSHIP_HOLDS, rx)
            .await
            .map_err(|_| "the store-worker did not answer".to_string())?
            .map_err(|_| "link closed".to_string())?
            .map_err(|e| e.to_string())?;
        let Reply::Groups { owned } = reply else {
            return Err(format!("unexpected reply {reply:?}"));
        };
        let mine = owned.contains(&self.key);
        let until = if mine {
            asked + OWNERSHIP_HOLDS.as_millis() as u64
        } else {
            0
        };
        self.holds_until.store(until, Ordering::Relaxed);
        Ok(mine)
    }

    /// Whether the last renewal still holds.
    pub(crate) fn holds(&self) -> bool {
        crate::ids::monotonic_ms() < self.holds_until.load(Ordering::Relaxed)
    }
}
