//! Shared subscription groups' stored messages: one task per edge fetches, for each group
//! that has members here, what the group's own session in the store still owes (a group new on
//! this edge: all of it, and all of it again `SETTLE_MS` later where hosts share the store;
//! otherwise from the oldest message that no member could take or that a member gave back)
//! and gives it to the members through the router.
//!
//! Where hosts share the store, one edge at a time delivers a group: every second this task
//! tells the worker which groups have members here, and delivers those the store says this
//! edge owns for [`OWNERSHIP_HOLDS`] from when it asked (less than the store's
//! `GROUP_LEASE_MS`, after which an edge gone quiet loses a group to another).

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
/// How often group ownership is asked for (in ticks of [`EVERY`]).
const OWN_EVERY_TICKS: u32 = 10;
/// How long an answer that this edge owns a group holds, from when it was asked.
const OWNERSHIP_HOLDS: Duration = Duration::from_secs(3);

pub async fn fetch_loop(broker: Arc<Broker>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // This process of this host (a restarted edge is a new owner).
    let owner = format!(
        "edge-{}-{}@{}",
        std::process::id(),
        crate::ids::now_ms(),
        broker.config.host
    );
    let mut ticks = 0u32;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        ticks = ticks.wrapping_add(1);
        // Every second, and at once for a group new here (its first messages wait).
        if broker.lease.enforced()
            && (ticks % OWN_EVERY_TICKS == 0 || broker.router.groups_unasked())
        {
            if let Err(e) = own_groups(&broker, &owner).await {
                tracing::debug!(error = %e, "group ownership not renewed; asking again");
            }
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

/// Asks the store which of this edge's groups it owns, and tells the router.
async fn own_groups(broker: &Broker, owner: &str) -> Result<(), String> {
    let asked = crate::ids::monotonic_ms();
    let groups = broker.router.group_keys();
    let request = Request::OwnGroups {
        owner: owner.to_owned(),
        groups: groups.clone(),
    };
    let reply = ask(broker, request).await?;
    let Reply::Groups { owned } = reply else {
        return Err(format!("{reply:?}"));
    };
    let owned: std::collections::HashSet<String> = owned.into_iter().collect();
    let until = asked + OWNERSHIP_HOLDS.as_millis() as u64;
    broker.router.own_groups(&groups, &owned, until);
    Ok(())
}

async fn ask(broker: &Broker, request: Request) -> Result<Reply, String> {
    let rx = broker
        .link
        .request(request, Policy::FailFast)
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(FETCH_TIMEOUT, rx)
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|_| "link closed".to_string())?
        .map_err(|e| e.to_string())
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
        let reply = ask(broker, request).await?;
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
