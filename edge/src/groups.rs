//! Shared subscription groups' stored messages: one task per edge fetches, for each group
//! that has members here, what the group's own session in the store still owes (a group new on
//! this edge: all of it; otherwise from the oldest message that no member could take or that a
//! member gave back) and gives it to the members through the router.

use crate::broker::Broker;
use crate::link::Policy;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use wharf_shared::{Cursor, Reply, Request};

/// How often groups are checked for messages to fetch.
const EVERY: Duration = Duration::from_millis(100);
/// How long a fetch waits for the worker.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn fetch_loop(broker: Arc<Broker>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        for (key, since) in broker.router.group_fetches() {
            let fetched = fetch(&broker, &key, since).await;
            broker.router.group_fetch_ended(&key);
            if let Err(e) = fetched {
                tracing::debug!(group = %key, error = %e, "group fetch failed; trying again");
                broker.router.group_lag(&key, since.unwrap_or(0));
            }
        }
    }
}

/// Fetches the group's messages from `since` (all, with `None`), page by page, until the store
/// has no more or no member can take the next one.
async fn fetch(broker: &Broker, key: &Arc<str>, since: Option<i64>) -> Result<(), String> {
    let mut after = since.map(Cursor::since);
    loop {
        let request = Request::CatchUp {
            client_id: key.to_string(),
            after,
            other_hosts_only: false,
        };
        let rx = broker
            .link
            .request(request, Policy::FailFast)
            .await
            .map_err(|e| e.to_string())?;
        let reply = tokio::time::timeout(FETCH_TIMEOUT, rx)
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|_| "link closed".to_string())?
            .map_err(|e| e.to_string())?;
        let Reply::Messages { messages, next } = reply else {
            return Err(format!("{reply:?}"));
        };
        metrics::counter!("wharf_edge_group_fetched_messages_total")
            .increment(messages.len() as u64);
        if broker.router.give_fetched(key, messages).is_some() {
            // The rest waits for room; the router marked where to start again.
            return Ok(());
        }
        match next {
            Some(next) => after = Some(next),
            None => return Ok(()),
        }
    }
}
