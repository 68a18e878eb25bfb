//! What sessions are owed: one session (`Owed`), a page of sessions (`Sessions`), and the
//! sessions most owed across the whole fleet (`MostOwed`).
//!
//! Ranking the fleet is a sweep ([`crate::rankings`]) counted here, in a task of its own.

use crate::pipeline::retry;
use crate::rankings::{Sweep, KEPT, WAIT};
use crate::state::Shared;
use crate::store::{self, Store, StoreError};
use std::sync::Arc;
use std::time::Instant;
use wharf_shared::{Reply, SessionSummary};

/// Sessions read from the store at a time.
const PAGE: usize = 500;

/// `Owed`: what one session is owed, counted up to `limit`.
pub async fn owed_by<S: Store>(
    shared: &Shared<S>,
    client_id: String,
    limit: u32,
) -> Result<Reply, StoreError> {
    let Owed {
        count,
        oldest_ms,
        complete,
    } = owed(shared, &client_id, limit).await?;
    Ok(Reply::Owed {
        count,
        oldest_ms,
        complete,
    })
}

/// `Sessions`: a page of stored sessions (at most 500) in id order, each with its owed count.
pub async fn sessions<S: Store>(
    shared: &Shared<S>,
    after: Option<String>,
    prefix: String,
    page: u32,
    owed_limit: u32,
) -> Result<Reply, StoreError> {
    let mut sessions = retry(shared.retry_limit, "sessions", || {
        shared
            .store
            .sessions_page(after.clone(), prefix.clone(), page.min(500) as usize)
    })
    .await?;
    for s in &mut sessions {
        count_owed(shared, s, owed_limit).await?;
    }
    Ok(Reply::Sessions { sessions })
}

/// `MostOwed`: the `top` most owed of the sessions whose ids start with `prefix` (counting
/// at most `scan` of them), from this prefix's sweep.
pub async fn most_owed<S: Store>(
    shared: &Arc<Shared<S>>,
    prefix: String,
    scan: u32,
    top: u32,
    owed_limit: u32,
) -> Result<Reply, StoreError> {
    let key = (prefix, scan, owed_limit);
    let (sweep, new) = shared.rankings.sweep(key.clone())?;
    if new {
        tokio::spawn(count_all(shared.clone(), sweep.clone(), key));
    }
    let mut done = sweep.done.subscribe();
    let _ = tokio::time::timeout(WAIT, done.wait_for(|d| *d)).await;
    let tally = sweep.tally.lock().expect("tally");
    if let Some(reason) = &tally.failed {
        return Err(StoreError::Failed(format!("ranking failed: {reason}")));
    }
    let mut sessions = tally.ranked.clone();
    sort(&mut sessions);
    sessions.truncate(top as usize);
    Ok(Reply::Ranked {
        sessions,
        scanned: tally.scanned,
        complete: tally.finished.is_some() && !tally.capped,
        counting: tally.finished.is_none(),
        as_of_ms: sweep.started_ms,
    })
}

/// Counts what every session of the prefix is owed, page by page, keeping the most owed.
async fn count_all<S: Store>(
    shared: Arc<Shared<S>>,
    sweep: Arc<Sweep>,
    (prefix, scan, owed_limit): (String, u32, u32),
) {
    let mut after = None;
    let mut scanned = 0u64;
    let outcome: Result<bool, StoreError> = async {
        loop {
            let page = retry(shared.retry_limit, "sessions", || {
                shared
                    .store
                    .sessions_page(after.clone(), prefix.clone(), PAGE)
            })
            .await?;
            let last_page = page.len() < PAGE;
            for mut s in page {
                if scanned == u64::from(scan) {
                    return Ok(true);
                }
                count_owed(&shared, &mut s, owed_limit).await?;
                scanned += 1;
                after = Some(s.client_id.clone());
                let mut tally = sweep.tally.lock().expect("tally");
                tally.scanned = scanned;
                if s.owed > 0 {
                    tally.ranked.push(s);
                    if tally.ranked.len() >= 2 * KEPT {
                        sort(&mut tally.ranked);
                        tally.ranked.truncate(KEPT);
                    }
                }
            }
            if last_page {
                return Ok(false);
            }
        }
    }
    .await;
    {
        let mut tally = sweep.tally.lock().expect("tally");
        match outcome {
            Ok(capped) => tally.capped = capped,
            Err(e) => {
                tracing::warn!(error = %e, %prefix, "ranking sessions by owed failed");
                tally.failed = Some(e.to_string());
            }
        }
        tally.finished = Some(Instant::now());
    }
    tracing::debug!(%prefix, scanned, took = ?sweep.started.elapsed(), "sessions ranked by owed");
    sweep.done.send_replace(true);
}

/// Most owed first; of those owed as many, the one waiting longest.
fn sort(sessions: &mut [SessionSummary]) {
    sessions.sort_by(|a, b| {
        b.owed
            .cmp(&a.owed)
            .then(a.oldest_owed_ms.cmp(&b.oldest_owed_ms))
            .then(a.client_id.cmp(&b.client_id))
    });
}

/// Fills in a listed session's owed count (up to `limit`) and oldest owed message.
async fn count_owed<S: Store>(
    shared: &Shared<S>,
    s: &mut SessionSummary,
    limit: u32,
) -> Result<(), StoreError> {
    let o = owed(shared, &s.client_id, limit).await?;
    (s.owed, s.oldest_owed_ms, s.owed_complete) = (o.count, o.oldest_ms, o.complete);
    Ok(())
}

/// What a session is owed: at most the count asked for (`complete`: all of it).
struct Owed {
    count: u64,
    oldest_ms: Option<i64>,
    complete: bool,
}

/// What the client's session is owed, counted page by page up to `limit`; the first page's
/// first message is the oldest (pages come in creation order).
async fn owed<S: Store>(
    shared: &Shared<S>,
    client_id: &str,
    limit: u32,
) -> Result<Owed, StoreError> {
    let store = &*shared.store;
    let pending = shared.record.pending_for(client_id);
    let (mut after, mut count, mut oldest_ms) = (None, 0u64, None);
    loop {
        let page = retry(shared.retry_limit, "owed", || {
            store::undelivered_before(store, client_id, after, None, None, &pending)
        })
        .await?;
        if oldest_ms.is_none() {
            oldest_ms = page.messages.first().map(|m| m.created_ms);
        }
        count += page.messages.len() as u64;
        match page.next {
            Some(next) if count < u64::from(limit) => after = Some(next),
            next => {
                return Ok(Owed {
                    count,
                    oldest_ms,
                    complete: next.is_none(),
                })
            }
        }
    }
}
