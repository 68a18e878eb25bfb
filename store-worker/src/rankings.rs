//! The fleet's sessions ranked by what they are owed. Counting every stored session (one
//! catch-up count each) takes seconds to minutes for tens of thousands, so a ranking is a
//! [`Sweep`]: a task of its own (`cmd::behind`) that pages through the sessions in id order
//! and keeps only the [`KEPT`] most owed. A request waits for it at most [`WAIT`]; if it is not done by then the reply is the ranking
//! so far (`counting`), and the next request joins the same sweep instead of starting one. A
//! sweep that outlasted the wait is reused for [`REUSE`] after it ends (a big fleet's ranking
//! is not recounted on every refresh); one that ended within the wait is recounted on the
//! next request, so a small fleet's ranking is always fresh. At most [`SWEEPS`] run at once.

use crate::store::StoreError;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wharf_shared::{now_ms, SessionSummary};

/// Sessions a sweep keeps: the most a request may ask for (the admin API's page).
pub const KEPT: usize = 200;
/// How long a request waits for its sweep before answering with the ranking so far.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long a finished sweep that outlasted [`WAIT`] is reused.
pub const REUSE: Duration = Duration::from_secs(60);
/// Sweeps running at once in a worker.
pub const SWEEPS: usize = 2;
/// What a sweep ranks: the id prefix, the most sessions counted, the most owed counted each.
pub type Key = (String, u32, u32);

/// The sweeps of a worker, by what they rank.
#[derive(Default)]
pub struct Rankings {
    sweeps: Mutex<HashMap<Key, Arc<Sweep>>>,
}

/// One count of a prefix's sessions, in a task of its own.
pub struct Sweep {
    pub started: Instant,
    pub started_ms: i64,
    pub tally: Mutex<Tally>,
    /// `true` once the tally is final.
    pub done: tokio::sync::watch::Sender<bool>,
}

#[derive(Default)]
pub struct Tally {
    /// The most owed so far: at most 2 x [`KEPT`], cut back to [`KEPT`] when full.
    pub ranked: Vec<SessionSummary>,
    pub scanned: u64,
    /// `scan` sessions were counted before the prefix's last.
    pub capped: bool,
    pub finished: Option<Instant>,
    pub failed: Option<String>,
}

impl Rankings {
    /// The sweep a request for this ranking joins: the running one, a slow one that ended
    /// within [`REUSE`], or a new one (`true`: the caller starts counting it).
    pub fn sweep(&self, key: Key) -> Result<(Arc<Sweep>, bool), StoreError> {
        let mut sweeps = self.sweeps.lock().expect("sweeps");
        sweeps.retain(|_, s| s.reusable() || s.running());
        if let Some(s) = sweeps.get(&key).filter(|s| s.running() || s.reusable()) {
            return Ok((s.clone(), false));
        }
        if sweeps.values().filter(|s| s.running()).count() >= SWEEPS {
            return Err(StoreError::Failed(format!(
                "{SWEEPS} rankings are being counted; ask again when they are done"
            )));
        }
        let sweep = Arc::new(Sweep {
            started: Instant::now(),
            started_ms: now_ms(),
            tally: Mutex::default(),
            done: tokio::sync::watch::channel(false).0,
        });
        sweeps.insert(key, sweep.clone());
        Ok((sweep, true))
    }
}

impl Sweep {
    fn running(&self) -> bool {
        self.tally.lock().expect("tally").finished.is_none()
    }

    /// Finished, having outlasted [`WAIT`], less than [`REUSE`] ago.
    fn reusable(&self) -> bool {
        let tally = self.tally.lock().expect("tally");
        tally.failed.is_none()
            && tally
                .finished
                .is_some_and(|at| at.duration_since(self.started) > WAIT && at.elapsed() < REUSE)
    }
}
