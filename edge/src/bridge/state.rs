//! A bridge's live state: what the admin API, the console and the metrics read, and what the
//! bridge's tasks (`super`) update. Knows nothing of the broker, so that the broker can hold
//! its bridges without a cycle.

use super::config::{BridgeConfig, SESSION_PREFIX};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

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

impl Phase {
    /// The state's name, as the admin API and the cluster view show it.
    pub fn label(&self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Standby => "standby",
            Phase::Connecting => "connecting",
            Phase::Connected => "connected",
            Phase::Failed(_) => "failed",
        }
    }
}

/// One configured bridge and its live state.
pub struct Bridge {
    pub config: BridgeConfig,
    pub(super) phase: Mutex<Phase>,
    /// Messages the remote acknowledged (out) / Wharf stored (in), since this process started.
    pub(super) forwarded: AtomicU64,
    pub(super) received: AtomicU64,
    /// Messages that cannot cross at all (larger than the other side accepts, or matching no
    /// pattern), acknowledged and counted.
    pub(super) dropped: AtomicU64,
    /// Echoes of forwarded messages not published (3.1.1 remotes).
    pub(super) echoes: AtomicU64,
    pub(super) out_in_flight: AtomicU64,
    pub(super) in_in_flight: AtomicU64,
    /// Unix ms when the oldest message still unacknowledged by the remote was sent; 0: none.
    pub(super) oldest_in_flight_ms: AtomicI64,
    pub(super) connected_since_ms: AtomicI64,
    pub(super) connects: AtomicU64,
    /// Messages the local session is owed in the store (at most [`BACKLOG_COUNTED`]), read
    /// every [`BACKLOG_EVERY`] by the host that runs the bridge; `u64::MAX` until read.
    pub(super) backlog: AtomicU64,
    /// Whether `backlog` is all of it (else: at least that many).
    pub(super) backlog_complete: std::sync::atomic::AtomicBool,
    /// Unix ms when the oldest owed message was created; 0: none owed.
    pub(super) oldest_owed_ms: AtomicI64,
    /// Cancelled once this host has settled what the bridge is here: its local session
    /// subscribed (it runs here) or another host's (it stands by). The edge takes clients
    /// only after that, so that what they publish is owed to a bridge new in the store.
    pub(super) settled: tokio_util::sync::CancellationToken,
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
            settled: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// Waits until this host has settled what the bridge is here (see `settled`).
    pub async fn settled(&self) {
        self.settled.cancelled().await
    }

    /// The local session's client id.
    pub fn session(&self) -> String {
        format!("{SESSION_PREFIX}{}", self.config.name)
    }

    pub fn phase(&self) -> Phase {
        self.phase.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(super) fn set_phase(&self, phase: Phase) {
        let label = |p: &Phase| match p {
            Phase::Connected => 1.0,
            _ => 0.0,
        };
        metrics::gauge!("wharf_bridge_connected", "bridge" => self.config.name.clone())
            .set(label(&phase));
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase;
    }

    /// The messages its local session is owed in the store, once read (at most
    /// [`BACKLOG_COUNTED`]).
    pub fn backlog(&self) -> Option<u64> {
        let backlog = self.backlog.load(Ordering::Relaxed);
        (backlog != u64::MAX).then_some(backlog)
    }

    /// The status as the admin API serves it.
    pub fn status(&self) -> serde_json::Value {
        let phase = self.phase();
        let state = phase.label();
        let error = match phase {
            Phase::Failed(e) => Some(e),
            _ => None,
        };
        let oldest = self.oldest_in_flight_ms.load(Ordering::Relaxed);
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
            "backlog": self.backlog(),
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
