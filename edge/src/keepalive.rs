//! Keepalive without a timer per connection. Each session's queue records when its client was
//! last heard from; one task sweeps every connected session twice a second and signals those
//! whose client has been silent for longer than 1.5 x its keepalive. An idle connection then
//! holds no timer entry (a `tokio::time::Sleep` is 112 bytes in every connection's task).

use crate::registry::Registry;
use crate::router::{Router, Signals};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often sessions are checked: a silent client is closed at most this much later than its
/// keepalive allows, never sooner.
pub const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// Parked sessions (whose clients are away) are checked for expiry every this many sweeps.
const PARKED_EVERY: u32 = 10;

/// Signals overdue sessions every [`SWEEP_EVERY`] until `shutdown`, and forgets parked
/// sessions whose Session Expiry Interval has passed (the store forgets its copy too).
/// A reload that changed the users (`auth`'s generation moved) makes every session check its
/// login ([`Signals::REAUTH`]).
///
/// It also raises [`Signals::SETTLE`] for sessions whose catch-up of other hosts' messages is
/// due, and arms one for every session when the store lease came back after running out (a
/// gap: see `crate::lease`).
pub async fn sweep(
    router: &Router,
    registry: &Registry,
    auth: &crate::auth::Auth,
    lease: &crate::lease::Lease,
    shutdown: &CancellationToken,
) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweeps = 0u32;
    let mut users = auth.users_generation();
    let mut gaps = lease.gaps().0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        sweeps = sweeps.wrapping_add(1);
        if sweeps % PARKED_EVERY == 0 {
            let expired = registry.expire_parked(Instant::now());
            if expired > 0 {
                metrics::counter!("wharf_edge_parked_sessions_expired_total")
                    .increment(expired as u64);
            }
        }
        let now = crate::ids::monotonic_ms();
        let mut expired = 0u64;
        let reauth = auth.users_generation() != users;
        users = auth.users_generation();
        let (now_gaps, gap_from_ms) = lease.gaps();
        let gap = (now_gaps != gaps).then_some(gap_from_ms - wharf_shared::LATE_MS);
        gaps = now_gaps;
        if gap.is_some() {
            tracing::info!("the store lease is back after a gap: every session asks for other hosts' messages it may have missed");
        }
        router.for_each_session(|session| {
            if reauth {
                session.signal(Signals::REAUTH);
            }
            if let Some(from_ms) = gap {
                session.settle(from_ms, now + wharf_shared::SETTLE_MS as u64);
            }
            if session.settle_due(now) {
                session.signal(Signals::SETTLE);
            }
            if session.overdue(now) {
                session.signal(Signals::KEEPALIVE);
                expired += 1;
            }
        });
        if expired > 0 {
            metrics::counter!("wharf_edge_keepalive_expired_total").increment(expired);
        }
    }
}
