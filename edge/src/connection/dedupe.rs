//! The dedupe window: around every store fetch a session remembers the ids it sends, so that
//! a message that comes both live and from the store is sent once. Two generations of ids,
//! bounded in time and count; nothing at all while no fetch is under way.

use std::collections::HashSet;
use tokio::time::{Duration, Instant};
use wharf_shared::MessageId;

/// How long after a store fetch ids are remembered for deduplication; while fetches go on, an
/// id is remembered for at least this long after it was seen (two generations of ids, the
/// older one forgotten each period), so a window kept open by a long catch-up does not grow
/// without end.
const DEDUPE_WINDOW: Duration = Duration::from_secs(10);
/// Most ids in one generation; a full one is made the older one early (a session taking more
/// than 26,000 msg/s from the store), so the window holds at most twice this many.
const DEDUPE_CAP: usize = 262_144;

#[derive(Default)]
pub(super) struct Dedupe {
    /// Boxed, and only while open: most sessions never have one, and this is part of every
    /// connection's task.
    window: Option<Box<Window>>,
}

struct Window {
    ids: HashSet<MessageId, IdHasher>,
    /// The generation before `ids`, forgotten when `ids` is `DEDUPE_WINDOW` old.
    older: HashSet<MessageId, IdHasher>,
    /// When `ids` began.
    since: Instant,
    until: Instant,
    /// Calls since the clock was last read: the window's end is checked every
    /// `CLOCK_EVERY` calls, not for every message.
    calls: u32,
}

const CLOCK_EVERY: u32 = 64;

/// Message ids are made by the brokers (time, a random per-process value, a counter), never
/// chosen by clients, so a cheap mix of their bytes is a good enough hash (SipHash was 6% of
/// the edge's time at 200k msg/s).
#[derive(Default, Clone, Copy)]
struct IdHasher;

impl std::hash::BuildHasher for IdHasher {
    type Hasher = IdHash;
    fn build_hasher(&self) -> IdHash {
        IdHash(0)
    }
}

struct IdHash(u64);

impl std::hash::Hasher for IdHash {
    fn finish(&self) -> u64 {
        // The multiply only carries upwards, and an id's counter sits in its last bytes: mix the
        // high bits down (MurmurHash3's finaliser) so the table's low index bits vary.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word))
                .wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }
}

impl Dedupe {
    pub(super) fn open(&mut self, ids: impl Iterator<Item = MessageId>) {
        let until = Instant::now() + DEDUPE_WINDOW;
        let window = self.window.get_or_insert_with(|| {
            Box::new(Window {
                ids: HashSet::default(),
                older: HashSet::default(),
                since: Instant::now(),
                until,
                calls: 0,
            })
        });
        window.until = until;
        for id in ids {
            window.insert(id);
        }
    }

    /// Closes a window whose time is up. `first_time` does so too, but only when messages
    /// come: without this an idle session would keep the window of its first fetch for good.
    pub(super) fn close_if_expired(&mut self) {
        if self
            .window
            .as_ref()
            .is_some_and(|w| Instant::now() >= w.until)
        {
            self.window = None;
        }
    }

    /// Whether `id` was seen while the window is open (without remembering it).
    pub(super) fn seen(&self, id: &MessageId) -> bool {
        self.window.as_ref().is_some_and(|w| w.contains(id))
    }

    /// True when `id` is new (and remembers it while the window is open).
    pub(super) fn first_time(&mut self, id: MessageId) -> bool {
        let Some(window) = self.window.as_mut() else {
            return true;
        };
        window.calls = window.calls.wrapping_add(1);
        if window.calls % CLOCK_EVERY == 0 {
            let now = Instant::now();
            if now >= window.until {
                self.window = None;
                return true;
            }
            if now >= window.since + DEDUPE_WINDOW {
                window.next_generation(now);
            }
        }
        let new = !window.contains(&id);
        window.insert(id);
        new
    }
}

impl Window {
    pub(super) fn contains(&self, id: &MessageId) -> bool {
        self.ids.contains(id) || self.older.contains(id)
    }

    /// Remembers `id`. A full generation becomes the older one (the older one is forgotten),
    /// so the window is bounded and still knows the latest ids: every fetch brings the ids
    /// then in flight again (`open`), and a page is far smaller than a generation.
    pub(super) fn insert(&mut self, id: MessageId) {
        if self.ids.len() >= DEDUPE_CAP {
            self.next_generation(Instant::now());
        }
        self.ids.insert(id);
    }

    /// The current generation becomes the older one (the older one is forgotten) and a new
    /// one begins at `now`: every `DEDUPE_WINDOW`, or sooner when the current one is full.
    pub(super) fn next_generation(&mut self, now: Instant) {
        self.older = std::mem::take(&mut self.ids);
        self.since = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> MessageId {
        let mut bytes = [7u8; 12];
        bytes[8..].copy_from_slice(&n.to_be_bytes());
        MessageId(bytes)
    }

    #[test]
    fn an_expired_window_is_closed_without_messages() {
        let mut dedupe = Dedupe::default();
        dedupe.open([id(1)].into_iter());
        dedupe.close_if_expired();
        assert!(dedupe.window.is_some(), "open for DEDUPE_WINDOW");
        if let Some(w) = dedupe.window.as_mut() {
            w.until = Instant::now();
        }
        dedupe.close_if_expired();
        assert!(dedupe.window.is_none());
    }

    #[test]
    fn the_dedupe_window_recognises_repeats_only_while_open() {
        let mut dedupe = Dedupe::default();
        // Closed: everything is new, nothing is remembered.
        assert!(dedupe.first_time(id(1)));
        assert!(dedupe.first_time(id(1)));
        dedupe.open([id(1)].into_iter());
        assert!(!dedupe.first_time(id(1)));
        for n in 2..10_000 {
            assert!(dedupe.first_time(id(n)), "{n}");
        }
        for n in 2..10_000 {
            assert!(!dedupe.first_time(id(n)), "{n}");
        }
        assert_eq!(dedupe.window.as_ref().map(|w| w.ids.len()), Some(9_999));
    }

    /// A window kept open by one fetch after another remembers each id for at least
    /// `DEDUPE_WINDOW` after it was seen, and forgets it within two.
    #[tokio::test]
    async fn a_window_kept_open_forgets_old_ids_only() {
        let mut dedupe = Dedupe::default();
        dedupe.open(std::iter::empty());
        for n in 0..100 {
            assert!(dedupe.first_time(id(n)));
        }
        // The clock is read every CLOCK_EVERY calls; move the generation's start back
        // instead of waiting.
        let age = |dedupe: &mut Dedupe| {
            let window = dedupe.window.as_mut().expect("open");
            window.since -= DEDUPE_WINDOW;
        };
        let mut n = 100;
        let mut more = |dedupe: &mut Dedupe| {
            dedupe.open(std::iter::empty());
            for _ in 0..CLOCK_EVERY {
                assert!(dedupe.first_time(id(n)));
                n += 1;
            }
        };
        age(&mut dedupe);
        more(&mut dedupe);
        // A period on: the first ids are in the older generation, still known.
        assert!(dedupe.seen(&id(0)) && dedupe.seen(&id(99)));
        assert!(!dedupe.first_time(id(5)));
        age(&mut dedupe);
        more(&mut dedupe);
        // Two periods on: forgotten; those of the last period are still known.
        assert!(!dedupe.seen(&id(0)));
        assert!(dedupe.seen(&id(150)));
    }

    /// A session that takes more than `DEDUPE_CAP` ids from the store within one period
    /// (over 26,000 msg/s) still remembers what it has just seen and what each fetch brings
    /// (its messages in flight): a full generation makes way for a new one instead of
    /// ignoring every id after it. (It stopped growing before, and a page then re-sent a
    /// message that was in flight: 85 of 265,000 twice in a 1 -> 1 QoS 1 run whose
    /// subscriber read from the store at 50,000 msg/s.)
    #[test]
    fn a_full_generation_makes_way_for_new_ids() {
        let mut dedupe = Dedupe::default();
        dedupe.open(std::iter::empty());
        let past = 2 * DEDUPE_CAP as u32 + 10;
        for n in 0..past {
            assert!(dedupe.first_time(id(n)), "{n}");
        }
        // The latest ids are known, however many came before them in this period.
        for n in past - 1_000..past {
            assert!(!dedupe.first_time(id(n)), "{n}");
        }
        // A fetch made now brings the ids in flight into the window.
        let in_flight = [id(u32::MAX), id(u32::MAX - 1)];
        dedupe.open(in_flight.into_iter());
        for i in in_flight {
            assert!(dedupe.seen(&i) && !dedupe.first_time(i));
        }
        // Bounded: two generations of at most DEDUPE_CAP ids each.
        let window = dedupe.window.as_ref().expect("open");
        assert!(window.ids.len() <= DEDUPE_CAP && window.older.len() <= DEDUPE_CAP);
    }
}
