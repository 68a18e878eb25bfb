//! Message ids in MongoDB's ObjectId layout: 4-byte seconds, 5 bytes unique to this process,
//! a 3-byte counter. Assigned by the edge so that re-sent persist requests are idempotent.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};
use wharf_shared::MessageId;

fn process_unique() -> &'static ([u8; 5], AtomicU32) {
    static UNIQUE: OnceLock<([u8; 5], AtomicU32)> = OnceLock::new();
    UNIQUE.get_or_init(|| {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        hasher.write_u128(now_nanos());
        let bits = hasher.finish().to_be_bytes();
        let unique = [bits[0], bits[1], bits[2], bits[3], bits[4]];
        let counter = u32::from_be_bytes([0, bits[5], bits[6], bits[7]]);
        (unique, AtomicU32::new(counter))
    })
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

pub use wharf_shared::now_ms;

/// A new id, unique across processes and ordered by time within this one.
pub fn next_message_id(now_ms: i64) -> MessageId {
    let (unique, counter) = process_unique();
    let secs = ((now_ms / 1000) as u32).to_be_bytes();
    let count = counter.fetch_add(1, Ordering::Relaxed).to_be_bytes();
    let mut id = [0u8; 12];
    id[..4].copy_from_slice(&secs);
    id[4..9].copy_from_slice(unique);
    id[9..].copy_from_slice(&count[1..]);
    MessageId(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_carry_the_time() {
        let now = now_ms();
        let a = next_message_id(now);
        let b = next_message_id(now);
        assert_ne!(a, b);
        assert_eq!(a.timestamp_secs() as i64, now / 1000);
    }
}
