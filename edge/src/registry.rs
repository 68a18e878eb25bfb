//! Which client ids are connected to this edge, and the parked state of persistent sessions
//! whose client is away. A new connection with a taken client id takes the session over.

use crate::session::SessionState;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Asks a connection to close and hand its session state over (once: it then ends).
pub type TakeoverTx = oneshot::Sender<oneshot::Sender<Option<SessionState>>>;

enum Entry {
    Connected {
        connection_id: u64,
        takeover: TakeoverTx,
    },
    Parked {
        state: Box<SessionState>,
        /// The connection that parked it.
        connection_id: u64,
        /// When the session expires (its Session Expiry Interval after the disconnect);
        /// `None`: never.
        expires: Option<Instant>,
    },
}

/// What a claim found under the client id.
pub enum Previous {
    None,
    Connected(TakeoverTx),
    Parked(Box<SessionState>),
}

/// What [`Registry::release`] did.
pub enum Released {
    Done,
    /// Another connection owns the client id now; the state was not parked.
    TakenOver(Option<SessionState>),
}

#[derive(Default)]
pub struct Registry {
    inner: Mutex<HashMap<Arc<str>, Entry>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Entry>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `connection_id` as the owner of `client_id` and returns what was there.
    pub fn claim(&self, client_id: Arc<str>, connection_id: u64, takeover: TakeoverTx) -> Previous {
        let entry = Entry::Connected {
            connection_id,
            takeover,
        };
        match self.lock().insert(client_id, entry) {
            None => Previous::None,
            Some(Entry::Connected { takeover, .. }) => Previous::Connected(takeover),
            Some(Entry::Parked { expires, .. })
                if expires.is_some_and(|at| at <= Instant::now()) =>
            {
                Previous::None
            }
            Some(Entry::Parked { state, .. }) => Previous::Parked(state),
        }
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

    /// Forgets parked sessions whose expiry has passed; returns how many.
    pub fn expire_parked(&self, now: Instant) -> usize {
        let mut inner = self.lock();
        let before = inner.len();
        inner.retain(
            |_, entry| !matches!(entry, Entry::Parked { expires: Some(at), .. } if *at <= now),
        );
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
        if !matches!(inner.get(client_id),
            Some(Entry::Connected { connection_id: id, .. }) if *id == connection_id)
        {
            return Released::TakenOver(park);
        }
        match park {
            Some(state) => inner.insert(
                client_id.clone(),
                Entry::Parked {
                    state: Box::new(state),
                    connection_id,
                    expires: (session_expiry != u32::MAX)
                        .then(|| Instant::now() + Duration::from_secs(session_expiry.into())),
                },
            ),
            None => inner.remove(client_id),
        };
        Released::Done
    }
}
