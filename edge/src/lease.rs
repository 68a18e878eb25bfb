//! Whether this edge may serve its sessions. Where several hosts share the store, a client's
//! session can be claimed by another host while this one is frozen (SIGSTOP, a stalled VM)
//! or cut off from the store; it must then neither deliver nor acknowledge for it. The
//! worker reads the other hosts' claims every 200 ms and after each read sends a lease:
//! every claim made before the read began has been pushed (and applied, as the same channel
//! carries both). A session reads and writes its socket only while the newest lease began
//! less than [`LEASE`] ago by the host's monotonic clock, which counts on while a process is
//! stopped. A worker whose store no other host shares sends none, and then nothing waits.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a lease holds after the read of claims that produced it began.
pub const LEASE: Duration = Duration::from_millis(1_500);

pub struct Lease {
    base: Instant,
    /// Whether the worker sends leases (its store is shared by hosts).
    enforced: AtomicBool,
    /// Milliseconds after `base` until which the lease holds.
    until_ms: AtomicU64,
    /// When the newest lease's read of claims began, in Unix ms (0: none yet).
    as_of_unix_ms: AtomicI64,
    /// Leases that came after the previous one had run out, and new worker connections: each
    /// is a gap in which this host may have missed other hosts' messages (its worker was gone,
    /// or others took it for dead).
    gaps: AtomicU64,
    /// Since when the last gap may have missed messages (Unix ms).
    gap_from_ms: AtomicI64,
}

impl Default for Lease {
    fn default() -> Self {
        Lease {
            base: Instant::now(),
            enforced: AtomicBool::new(false),
            until_ms: AtomicU64::new(0),
            as_of_unix_ms: AtomicI64::new(0),
            gaps: AtomicU64::new(0),
            gap_from_ms: AtomicI64::new(0),
        }
    }
}

impl Lease {
    pub fn holds(&self) -> bool {
        !self.enforced() || self.elapsed_ms() < self.until_ms.load(Ordering::Relaxed)
    }

    /// Whether the worker sends leases: hosts share its store.
    pub fn enforced(&self) -> bool {
        self.enforced.load(Ordering::Acquire)
    }

    /// A lease that began at `as_of_ms` of the host's monotonic clock.
    pub fn renew(&self, as_of_ms: u64) {
        let age = wharf_shared::monotonic_ms().saturating_sub(as_of_ms);
        // The expired lease a worker sends first, `as_of_ms` 0: a new worker connection,
        // which did not follow anything for this edge before. After an earlier one, a gap
        // (what the last worker had not pushed yet is asked for again).
        let (previous, gap) = if as_of_ms == 0 {
            (self.as_of_unix_ms.load(Ordering::Acquire), true)
        } else {
            let as_of_unix = wharf_shared::now_ms() - age as i64;
            let lapsed = self.elapsed_ms() >= self.until_ms.load(Ordering::Relaxed);
            (
                self.as_of_unix_ms.fetch_max(as_of_unix, Ordering::AcqRel),
                lapsed,
            )
        };
        if gap && previous != 0 {
            self.gap_from_ms.store(previous, Ordering::Release);
            self.gaps.fetch_add(1, Ordering::AcqRel);
        }
        let until = (self.elapsed_ms() + LEASE.as_millis() as u64).saturating_sub(age);
        self.until_ms.fetch_max(until, Ordering::Relaxed);
        if !self.enforced.swap(true, Ordering::AcqRel) {
            tracing::info!(lease = ?LEASE, "the store is shared by hosts: sessions are served only under a current lease");
        }
    }

    /// How many gaps there have been, and since when the last one may have missed messages.
    pub fn gaps(&self) -> (u64, i64) {
        (
            self.gaps.load(Ordering::Acquire),
            self.gap_from_ms.load(Ordering::Acquire),
        )
    }

    fn elapsed_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_until_enforced_and_then_only_for_a_recent_lease() {
        let lease = Lease::default();
        assert!(lease.holds(), "no lease asked for: nothing waits");
        let now = wharf_shared::monotonic_ms();
        lease.renew(now - LEASE.as_millis() as u64 - 10);
        assert!(
            !lease.holds(),
            "a lease that began too long ago does not hold"
        );
        lease.renew(now);
        assert!(lease.holds());
        lease.renew(now - 10_000);
        assert!(lease.holds(), "an older lease does not shorten a newer one");
    }

    #[test]
    fn a_lease_after_one_ran_out_is_a_gap_since_the_last_good_one() {
        let lease = Lease::default();
        lease.renew(0);
        let now = wharf_shared::monotonic_ms();
        lease.renew(now);
        assert_eq!(lease.gaps().0, 0, "the first lease is no gap");
        lease.renew(now);
        assert_eq!(lease.gaps().0, 0, "nor one while the last holds");
        lease.until_ms.store(0, Ordering::Relaxed);
        let before = wharf_shared::now_ms();
        lease.renew(wharf_shared::monotonic_ms());
        let (gaps, from) = lease.gaps();
        assert_eq!(gaps, 1);
        assert!(
            from <= before && from > before - 1_000,
            "since the last lease's read"
        );
        lease.renew(0);
        assert_eq!(lease.gaps().0, 2, "a new worker connection is a gap too");
    }
}
