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
pub mod state;

pub use state::{Bridge, Phase, BACKLOG_COUNTED, BACKLOG_EVERY};

use crate::broker::Broker;
use crate::link::Policy;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use wharf_shared::{Reply, Request};

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
                bridge.settled.cancel();
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
            let made = pump::register(&broker, &bridge, &shutdown).await;
            // (Also when it failed: clients are not kept waiting for a local fault.)
            bridge.settled.cancel();
            match made {
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
