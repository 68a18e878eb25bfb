//! The QoS 1/2 messages this edge has made (a PUBLISH parsed) and not yet routed: a batch
//! waiting for the link, a QoS 2 message waiting for its write. A session that lagged fetches
//! what it missed from the store starting no later than the oldest of them: such a message is
//! routed after the session took its lag marker, so it goes to the session's live queue, while
//! a later message of the same publisher may already be stored and come back from the store
//! first. Starting the store fetch at or before it returns it from the store too, in order.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct InTransit {
    /// Creation time (ms) -> how many of the messages in transit were made then (one entry per
    /// batch: a batch's messages are made in order, so its first is its oldest).
    created: Mutex<BTreeMap<i64, u32>>,
}

impl InTransit {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<i64, u32>> {
        // Every operation under the lock is a single map call: a poisoned map is intact.
        self.created.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a message (or a batch whose oldest message was) made at `created_ms`, until
    /// the returned guard is dropped: after routing, or when the message is given up.
    pub fn enter(self: &Arc<Self>, created_ms: i64) -> InTransitGuard {
        *self.lock().entry(created_ms).or_insert(0) += 1;
        InTransitGuard {
            transit: self.clone(),
            created_ms,
        }
    }

    /// The creation time of the oldest message in transit, if any.
    pub fn oldest(&self) -> Option<i64> {
        self.lock().keys().next().copied()
    }
}

/// A registration in [`InTransit`], released when dropped.
pub struct InTransitGuard {
    transit: Arc<InTransit>,
    created_ms: i64,
}

impl Drop for InTransitGuard {
    fn drop(&mut self) {
        let mut map = self.transit.lock();
        if let Some(n) = map.get_mut(&self.created_ms) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.created_ms);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_registration_is_reported_until_it_is_dropped() {
        let transit = Arc::new(InTransit::default());
        assert_eq!(transit.oldest(), None);
        let a = transit.enter(200);
        let b = transit.enter(100);
        let c = transit.enter(100);
        assert_eq!(transit.oldest(), Some(100));
        drop(b);
        assert_eq!(transit.oldest(), Some(100));
        drop(c);
        assert_eq!(transit.oldest(), Some(200));
        drop(a);
        assert_eq!(transit.oldest(), None);
    }
}
