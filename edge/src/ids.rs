//! Message ids in MongoDB's ObjectId layout: 4-byte seconds, 5 bytes unique to this process,
//! a 3-byte counter. Assigned by the edge so that re-sent persist requests are idempotent.
//!
//! A message is stamped with its creation time and id together, and the store reads messages
//! in `(created, id)` order, so that order must be the order the stamps were taken: each
//! publisher's messages are stamped one after another, and a subscriber fed from the store
//! gets them in that order. Two things would break it if time and counter were taken apart:
//! the 24-bit counter wrapping within a millisecond (a message stamped after the wrap sorts
//! before those stamped just before it), and the wall clock stepping back (NTP).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};
use wharf_shared::MessageId;

/// Unix time in milliseconds: what messages are stamped with (can go back with the clock).
pub use wharf_shared::now_ms;

/// Milliseconds of the host's monotonic clock: for timeouts, keepalive, leases and rates
/// (never goes back).
pub use wharf_shared::monotonic_ms;

const COUNTER_BITS: u32 = 24;
const COUNTER_MASK: u64 = (1 << COUNTER_BITS) - 1;
/// The stamp keeps milliseconds since 2020-01-01 in the 40 bits above the counter (34 years).
const EPOCH_MS: i64 = 1_577_836_800_000;

/// Hands out `(created_ms, id)` pairs that strictly increase, in `(created, id)` order, in the
/// order they are taken: the counter is never reset, and when it wraps the time moves on by a
/// millisecond; the time never goes back, whatever the wall clock does.
pub struct Stamps {
    unique: [u8; 5],
    /// `(ms since EPOCH_MS) << 24 | counter` of the last stamp.
    last: AtomicU64,
}

impl Stamps {
    fn new(unique: [u8; 5], counter: u32) -> Stamps {
        Stamps {
            unique,
            last: AtomicU64::new(u64::from(counter) & COUNTER_MASK),
        }
    }

    /// A stamp no earlier than `now_ms` and later than every stamp taken before.
    pub fn next(&self, now_ms: i64) -> (i64, MessageId) {
        let now = (now_ms - EPOCH_MS).max(0) as u64;
        let mut stamp = 0;
        let _ = self
            .last
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                let counter = (last + 1) & COUNTER_MASK;
                let mut ms = last >> COUNTER_BITS;
                if counter == 0 {
                    ms += 1;
                }
                stamp = (ms.max(now) << COUNTER_BITS) | counter;
                Some(stamp)
            });
        let created_ms = (stamp >> COUNTER_BITS) as i64 + EPOCH_MS;
        let secs = ((created_ms / 1000) as u32).to_be_bytes();
        let count = (stamp as u32).to_be_bytes();
        let mut id = [0u8; 12];
        id[..4].copy_from_slice(&secs);
        id[4..9].copy_from_slice(&self.unique);
        id[9..].copy_from_slice(&count[1..]);
        (created_ms, MessageId(id))
    }
}

fn stamps() -> &'static Stamps {
    static STAMPS: OnceLock<Stamps> = OnceLock::new();
    STAMPS.get_or_init(|| {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        hasher.write_u128(now_nanos());
        let bits = hasher.finish().to_be_bytes();
        let unique = [bits[0], bits[1], bits[2], bits[3], bits[4]];
        Stamps::new(unique, u32::from_be_bytes([0, bits[5], bits[6], bits[7]]))
    })
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A new message's creation time and id: unique across processes, and in this process later
/// (in `(created, id)` order) than every one before it.
pub fn stamp() -> (i64, MessageId) {
    stamps().next(now_ms())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_carry_the_time() {
        let (created_a, a) = stamp();
        let (_, b) = stamp();
        assert_ne!(a, b);
        assert_eq!(a.timestamp_secs() as i64, created_a / 1000);
        assert!((created_a - now_ms()).abs() < 1000);
    }

    /// The bug behind a lossless-test failure in CI: the counter starts at a random value and
    /// wrapped within a millisecond, so 64 messages of one publisher sorted after later ones.
    #[test]
    fn stamps_increase_across_a_counter_wrap_within_a_millisecond() {
        let stamps = Stamps::new([1; 5], (1 << 24) - 3);
        let now = 1_796_000_000_123;
        let taken: Vec<(i64, MessageId)> = (0..6).map(|_| stamps.next(now)).collect();
        for pair in taken.windows(2) {
            assert!(pair[0] < pair[1], "{pair:?}");
        }
        assert_eq!(taken[0].0, now);
        assert!(taken
            .iter()
            .all(|(created, id)| id.timestamp_secs() as i64 == created / 1000));
    }

    #[test]
    fn stamps_do_not_go_back_with_the_clock() {
        let stamps = Stamps::new([1; 5], 7);
        let first = stamps.next(1_796_000_000_500);
        let after_step_back = stamps.next(1_796_000_000_100);
        assert!(first < after_step_back);
        assert_eq!(after_step_back.0, 1_796_000_000_500);
        assert_eq!(stamps.next(1_796_000_000_900).0, 1_796_000_000_900);
    }
}
