//! Which client ids are connected to this edge, and the parked state of persistent sessions
//! whose client is away. A new connection with a taken client id takes the session over; a
//! claim of the session with a newer generation elsewhere (another edge or host) ends it.

use crate::session::SessionState;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use wharf_shared::Generation;

/// Asks a connection to close and hand its session state over (once: it then ends).
pub type TakeoverTx = oneshot::Sender<Handover>;

/// What a connection taken over is handed: where to send its session state, and whether the
/// session goes on (the new connection keeps it), which decides a 3.1/3.1.1 will.
#[derive(Debug)]
pub struct Handover {
    pub reply: oneshot::Sender<Option<SessionState>>,
    pub keeps_session: bool,
}

/// One per client id on this edge (kept small: an idle fleet's edge holds one per device).
enum Entry {
    Connected {
        connection_id: u64,
        takeover: TakeoverTx,
        claim: Claim,
    },
    Parked {
        parked: Box<Parked>,
        /// The connection that parked it.
        connection_id: u64,
        generation: Option<Generation>,
    },
}

/// A connection's claim of the session in the store.
#[derive(Clone, Copy)]
enum Claim {
    /// Not answered yet: the newest claim heard of elsewhere meanwhile.
    Pending { beaten: Option<Generation> },
    /// The store's generation of it.
    Confirmed(Generation),
}

impl Claim {
    fn generation(self) -> Option<Generation> {
        match self {
            Claim::Pending { .. } => None,
            Claim::Confirmed(generation) => Some(generation),
        }
    }
}

/// A persistent session whose client is away.
struct Parked {
    state: SessionState,
    /// When the session expires (its Session Expiry Interval after the disconnect); `None`:
    /// never.
    expires: Option<Instant>,
}

/// What a claim found under the client id.
pub enum Previous {
    None,
    Connected(TakeoverTx),
    Parked(Box<SessionState>),
}

/// What [`Registry::release`] did.
pub enum Released {
    /// The connection's claim, with its generation if known.
    Done(Option<Generation>),
    /// Another connection owns the client id now; the state was not parked.
    TakenOver(Option<SessionState>),
}

#[derive(Default)]
pub struct Registry {
    inner: Mutex<HashMap<Arc<str>, Entry>>,
    /// Delayed wills of connections that ended here, until they are due.
    wills: Mutex<HashMap<Arc<str>, PendingWill>>,
}

/// A will waiting for its Will Delay Interval.
struct PendingWill {
    /// The connection that left it.
    connection_id: u64,
    /// That connection's claim of the session, once known (a clean start's CONNACK does not
    /// wait for it).
    generation: Option<Generation>,
    /// The newest claim of the session heard of since: newer than `generation`, the session
    /// resumed (here or on another host) and the will is not sent.
    heard: Option<Generation>,
}

impl PendingWill {
    fn resumed(&self) -> bool {
        matches!((self.generation, self.heard), (Some(own), Some(heard)) if heard > own)
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Entry>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wills(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, PendingWill>> {
        // Each operation under the lock is a single map call: a poisoned map is intact.
        self.wills.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `connection_id` as the owner of `client_id` and returns what was there.
    pub fn claim(&self, client_id: Arc<str>, connection_id: u64, takeover: TakeoverTx) -> Previous {
        let entry = Entry::Connected {
            connection_id,
            takeover,
            claim: Claim::Pending { beaten: None },
        };
        match self.lock().insert(client_id, entry) {
            None => Previous::None,
            Some(Entry::Connected { takeover, .. }) => Previous::Connected(takeover),
            Some(Entry::Parked { parked, .. })
                if parked.expires.is_some_and(|at| at <= Instant::now()) =>
            {
                Previous::None
            }
            Some(Entry::Parked { parked, .. }) => Previous::Parked(Box::new(parked.state)),
        }
    }

    /// The store answered `connection_id`'s claim with `generation`. If a newer claim was
    /// heard of meanwhile, the connection has lost its session: the entry goes and the
    /// connection is asked to end.
    pub fn confirm(&self, client_id: &str, connection_id: u64, confirmed: Generation) {
        let mut inner = self.lock();
        let lost = match inner.get_mut(client_id) {
            Some(Entry::Connected {
                connection_id: id,
                claim,
                ..
            }) if *id == connection_id => {
                let lost = matches!(claim, Claim::Pending { beaten: Some(b) } if *b > confirmed);
                *claim = Claim::Confirmed(confirmed);
                lost
            }
            _ => false,
        };
        if lost {
            lose(&mut inner, client_id);
        }
        drop(inner);
        // The connection may have ended before its claim came back: its delayed will
        // compares with it.
        let mut wills = self.wills();
        if let Some(will) = wills.get_mut(client_id) {
            if will.connection_id == connection_id {
                will.generation = Some(confirmed);
            }
        }
    }

    /// The client's session was claimed elsewhere with `claimed`: a connection or parked
    /// session here with an older claim has lost it. Returns whether one did.
    pub fn claimed_elsewhere(&self, client_id: &str, claimed: Generation) -> bool {
        let mut inner = self.lock();
        let lost = match inner.get_mut(client_id) {
            Some(Entry::Connected {
                claim: Claim::Confirmed(own),
                ..
            }) => *own < claimed,
            Some(Entry::Connected {
                claim: Claim::Pending { beaten },
                ..
            }) => {
                *beaten = (*beaten).max(Some(claimed));
                false
            }
            Some(Entry::Parked { generation, .. }) => generation.is_none_or(|own| own < claimed),
            None => false,
        };
        if lost {
            lose(&mut inner, client_id);
        }
        drop(inner);
        let mut wills = self.wills();
        if let Some(will) = wills.get_mut(client_id) {
            will.heard = will.heard.max(Some(claimed));
        }
        lost
    }

    /// A delayed will of `connection_id` (whose claim had `generation`) waits: a claim of the
    /// session heard of meanwhile, here or from another host, means it resumed.
    pub fn will_waits(
        &self,
        client_id: Arc<str>,
        connection_id: u64,
        generation: Option<Generation>,
    ) {
        let will = PendingWill {
            connection_id,
            generation,
            heard: None,
        };
        self.wills().insert(client_id, will);
    }

    /// The delay of `connection_id`'s will has passed: whether to send it (the session did not
    /// resume, on this edge or elsewhere).
    pub fn will_due(&self, client_id: &str, connection_id: u64) -> bool {
        let resumed_elsewhere = {
            let mut wills = self.wills();
            match wills.get(client_id) {
                Some(w) if w.connection_id == connection_id => {
                    wills.remove(client_id).is_some_and(|w| w.resumed())
                }
                // A newer connection's will waits now: this session resumed.
                Some(_) => true,
                None => false,
            }
        };
        !resumed_elsewhere && !self.resumed_after(client_id, connection_id)
    }

    /// Whether a connection newer than `connection_id` has taken the client id (the session
    /// resumed: a delayed will is not sent).
    pub fn resumed_after(&self, client_id: &str, connection_id: u64) -> bool {
        match self.lock().get(client_id) {
            Some(Entry::Connected {
                connection_id: id, ..
            })
            | Some(Entry::Parked {
                connection_id: id, ..
            }) => *id > connection_id,
            None => false,
        }
    }

    /// The parked sessions: client id, subscriptions, and when each expires (`None`: never).
    pub fn parked(&self) -> Vec<(Arc<str>, Vec<String>, Option<Instant>)> {
        self.lock()
            .iter()
            .filter_map(|(client, entry)| match entry {
                Entry::Parked { parked, .. } => Some((
                    client.clone(),
                    parked.state.subscriptions.keys().cloned().collect(),
                    parked.expires,
                )),
                Entry::Connected { .. } => None,
            })
            .collect()
    }

    /// How many sessions are parked.
    pub fn parked_count(&self) -> usize {
        self.lock()
            .values()
            .filter(|entry| matches!(entry, Entry::Parked { .. }))
            .count()
    }

    /// Forgets parked sessions whose expiry has passed; returns how many.
    pub fn expire_parked(&self, now: Instant) -> usize {
        let mut inner = self.lock();
        let before = inner.len();
        inner.retain(|_, entry| {
            !matches!(entry, Entry::Parked { parked, .. }
                if parked.expires.is_some_and(|at| at <= now))
        });
        before - inner.len()
    }

    /// The connection ended: park its persistent state, or forget the client. If a newer
    /// connection has claimed the client id meanwhile, nothing changes and the state comes
    /// back as [`Released::TakenOver`], for the caller to hand over.
    pub fn release(
        &self,
        client_id: &Arc<str>,
        connection_id: u64,
        park: Option<SessionState>,
        session_expiry: u32,
    ) -> Released {
        let mut inner = self.lock();
        let generation = match inner.get(client_id) {
            Some(Entry::Connected {
                connection_id: id,
                claim,
                ..
            }) if *id == connection_id => claim.generation(),
            _ => return Released::TakenOver(park),
        };
        match park {
            Some(state) => inner.insert(
                client_id.clone(),
                Entry::Parked {
                    parked: Box::new(Parked {
                        state,
                        expires: (session_expiry != u32::MAX)
                            .then(|| Instant::now() + Duration::from_secs(session_expiry.into())),
                    }),
                    connection_id,
                    generation,
                },
            ),
            None => inner.remove(client_id),
        };
        Released::Done(generation)
    }
}

/// The client's session here lost to a claim elsewhere: forgets it, and asks a connection to
/// end as if taken over, with nobody to take its state.
fn lose(inner: &mut HashMap<Arc<str>, Entry>, client_id: &str) {
    if let Some(Entry::Connected { takeover, .. }) = inner.remove(client_id) {
        let (reply, _) = oneshot::channel();
        // The claim elsewhere carries the session on (how that connection started is not
        // known here).
        let _ = takeover.send(Handover {
            reply,
            keeps_session: true,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(claims: u64) -> Generation {
        Generation {
            epoch_ms: 1,
            claims,
        }
    }

    #[test]
    fn a_delayed_will_is_due_unless_a_newer_claim_was_heard() {
        let registry = Registry::default();
        registry.will_waits("stays".into(), 1, Some(claim(3)));
        registry.claimed_elsewhere("stays", claim(3)); // its own claim, heard late
        assert!(registry.will_due("stays", 1));

        registry.will_waits("moves".into(), 2, Some(claim(3)));
        registry.claimed_elsewhere("moves", claim(4)); // resumed on another host
        assert!(!registry.will_due("moves", 2));

        // Its claim came back after the connection ended, and after a newer one was heard.
        registry.will_waits("late".into(), 3, None);
        registry.claimed_elsewhere("late", claim(8));
        registry.confirm("late", 3, claim(7));
        assert!(!registry.will_due("late", 3));
        // Never confirmed: nothing says the session resumed.
        registry.will_waits("unknown".into(), 4, None);
        registry.claimed_elsewhere("unknown", claim(8));
        assert!(registry.will_due("unknown", 4));
        assert!(
            registry.wills.lock().expect("lock").is_empty(),
            "due wills are forgotten"
        );
    }
}
