//! A client's session: connect (clean or resumed), disconnect, subscribe, unsubscribe,
//! catch-up; and what ending a session clears (also used by the expiry sweep).

use crate::pipeline::retry;
use crate::state::Shared;
use crate::store::{self, Owner, Store, StoreError};
use wharf_shared::now_ms;
use wharf_shared::{Claim, Cursor, Generation, Message, Reply, WorkerFrame};

/// `Connect`: the session is claimed for this connection. A clean start clears what was
/// stored for the client; otherwise the reply is the stored session (a session that expired
/// while its client was away ends first) with the first page of what it is owed.
pub async fn connect<S: Store>(
    shared: &Shared<S>,
    edge_host: &str,
    client_id: String,
    clean_start: bool,
    session_expiry: u32,
) -> Result<Reply, StoreError> {
    let (store, limit) = (&*shared.store, shared.retry_limit);
    if clean_start {
        // Claimed first, so that from here on no other connection's end can clear what this
        // one stores. (Its inbound QoS 2 packet ids were forgotten, in order with the
        // persists, before the request reached its lane.)
        let (_, generation) = claim(shared, &client_id, edge_host, session_expiry).await?;
        clear_session_state(store, limit, &client_id).await?;
        return Ok(Reply::Claimed { generation });
    }
    // A session that expired while its client was away ends now, whether or not the sweep
    // (`expire_sessions`) got to it: the client starts a new one.
    let now = now_ms();
    let expired = retry(limit, "session", || {
        store.drop_expired_session(&client_id, now)
    })
    .await?;
    if expired {
        clear_session_state(store, limit, &client_id).await?;
        shared.forget_inbound_qos2(client_id.clone()).await;
        metrics::counter!("wharf_worker_sessions_expired_total").increment(1);
    }
    let (held, generation) = claim(shared, &client_id, edge_host, session_expiry).await?;
    let subscriptions = retry(limit, "session", || store.subscriptions(&client_id)).await?;
    // Other hosts address this one for the session's filters before it is told what the
    // store holds: what they store afterwards comes live.
    if let Some(routes) = &shared.routes {
        routes
            .ensure(subscriptions.iter().map(|s| s.filter.as_str()))
            .await?;
    }
    let (undelivered, next) = catch_up_page(shared, &client_id, None, false, edge_host).await?;
    let outbound_qos2 = retry(limit, "session", || store::outbound_qos2(store, &client_id)).await?;
    Ok(Reply::Session(wharf_shared::StoredSession {
        // A session from before session records existed is known by its subscriptions.
        present: held || !subscriptions.is_empty(),
        subscriptions: subscriptions
            .into_iter()
            .map(|s| wharf_shared::Subscription {
                filter: s.filter,
                qos: s.qos,
                options: s.options,
            })
            .collect(),
        undelivered,
        next,
        outbound_qos2,
        generation,
    }))
}

/// `Disconnect`: the session ends (expiry 0) or is kept until it expires, if it is still
/// this connection's (`generation`).
pub async fn disconnect<S: Store>(
    shared: &Shared<S>,
    edge_host: &str,
    client_id: String,
    session_expiry: u32,
    generation: Option<Generation>,
) -> Result<Reply, StoreError> {
    let (store, limit) = (&*shared.store, shared.retry_limit);
    let owner = Owner {
        host: edge_host,
        generation,
    };
    if session_expiry == 0 {
        if end_session(store, limit, &client_id, owner).await? {
            // Its inbound QoS 2 packet ids, after the persists that used them.
            shared.forget_inbound_qos2(client_id).await;
        }
    } else {
        let expires = expiry_time(now_ms(), session_expiry);
        retry(limit, "session", || {
            store.close_session(&client_id, expires, &owner)
        })
        .await?;
    }
    Ok(Reply::Done)
}

/// `Subscribe`: routed here first (hosts sharing the store), then stored; the reply is the
/// retained messages the filters match.
pub async fn subscribe<S: Store>(
    shared: &Shared<S>,
    client_id: String,
    subscriptions: Vec<wharf_shared::Subscription>,
) -> Result<Reply, StoreError> {
    let (store, limit) = (&*shared.store, shared.retry_limit);
    let filters: Vec<String> = subscriptions.iter().map(|s| s.filter.clone()).collect();
    if let Some(routes) = &shared.routes {
        routes.ensure(filters.iter().map(String::as_str)).await?;
    }
    let now = now_ms();
    retry(limit, "subscribe", || {
        store.upsert_subscriptions(&client_id, subscriptions.clone(), now)
    })
    .await?;
    // A retained message this edge received before the SUBSCRIBE is stored first: it may
    // have been routed before this session was subscribed (QoS 0 and 1 are routed before
    // they are stored), and this reply is then its only way in.
    super::retained::written(shared, &filters).await
}

/// `Unsubscribe`: the subscriptions go, and the shared groups left without members.
pub async fn unsubscribe<S: Store>(
    shared: &Shared<S>,
    client_id: String,
    filters: Vec<String>,
) -> Result<Reply, StoreError> {
    let (store, limit) = (&*shared.store, shared.retry_limit);
    retry(limit, "unsubscribe", || {
        store.remove_subscriptions(&client_id, Some(filters.clone()))
    })
    .await?;
    leave_groups(store, limit, &filters).await?;
    Ok(Reply::Done)
}

/// `CatchUp`: the next page of what the session is owed.
pub async fn catch_up<S: Store>(
    shared: &Shared<S>,
    edge_host: &str,
    client_id: String,
    after: Option<Cursor>,
    other_hosts_only: bool,
) -> Result<Reply, StoreError> {
    let started = std::time::Instant::now();
    let (messages, next) =
        catch_up_page(shared, &client_id, after, other_hosts_only, edge_host).await?;
    metrics::histogram!("wharf_worker_catch_up_seconds").record(started.elapsed().as_secs_f64());
    Ok(Reply::Messages { messages, next })
}

/// Ends a client's session if its record is still `owner`'s claim: the record goes, and
/// then what [`clear_session_state`] clears. Returns whether it did.
pub async fn end_session<S: Store>(
    store: &S,
    limit: std::time::Duration,
    client_id: &str,
    owner: Owner<'_>,
) -> Result<bool, StoreError> {
    let dropped = retry(limit, "end session", || {
        store.drop_session(client_id, Some(&owner))
    })
    .await?;
    if dropped {
        clear_session_state(store, limit, client_id).await?;
    }
    Ok(dropped)
}

/// Forgets everything stored for a client's session but its record and its messages'
/// records: subscriptions (and the shared subscription groups that had it as their last
/// member), QoS 2 deliveries under way.
pub async fn clear_session_state<S: Store>(
    store: &S,
    limit: std::time::Duration,
    client_id: &str,
) -> Result<(), StoreError> {
    let shared = retry(limit, "clear session", || store.shared_filters(client_id)).await?;
    retry(limit, "clear session", || {
        store.remove_subscriptions(client_id, None)
    })
    .await?;
    leave_groups(store, limit, &shared).await?;
    retry(limit, "clear session", || {
        store.forget_qos2_out(client_id, None)
    })
    .await
}

/// A shared subscription group's own session (client id: the group's `$share/...` key) ends
/// with its last member: of `filters`, a member's subscriptions just removed, the groups that
/// no client subscribes to any more lose their subscription (their records expire with their
/// TTL).
pub async fn leave_groups<S: Store>(
    store: &S,
    limit: std::time::Duration,
    filters: &[String],
) -> Result<(), StoreError> {
    for key in filters
        .iter()
        .filter(|f| wharf_shared::topic::shared(f).is_some())
    {
        let members = retry(limit, "group members", || store.has_subscribers(key)).await?;
        if !members {
            retry(limit, "group", || store.remove_subscriptions(key, None)).await?;
            // Its ownership record (hosts sharing the store).
            retry(limit, "group", || store.drop_session(key, None)).await?;
        }
    }
    Ok(())
}

/// Claims the client's session for a connection on `edge_host`, and tells every edge of this
/// worker (the others of the cluster read it from the store): a connection or parked session
/// of the client with an older generation ends.
async fn claim<S: Store>(
    shared: &Shared<S>,
    client_id: &str,
    edge_host: &str,
    session_expiry: u32,
) -> Result<(bool, Generation), StoreError> {
    let (held, generation) = retry(shared.retry_limit, "session", || {
        shared
            .store
            .claim_session(client_id, edge_host, now_ms(), session_expiry)
    })
    .await?;
    let claim = Claim {
        client_id: client_id.to_owned(),
        generation,
    };
    shared
        .edges
        .broadcast(WorkerFrame::Claims {
            claims: vec![claim],
        })
        .await;
    Ok((held, generation))
}

/// When a session whose client left now expires (`None`: never).
fn expiry_time(now_ms: i64, session_expiry: u32) -> Option<i64> {
    (session_expiry != u32::MAX).then(|| now_ms + i64::from(session_expiry) * 1000)
}

/// A page of what the client still needs from the store, after `after` (from its oldest
/// subscription with `None`), for a session's `Connect` or a `CatchUp`.
///
/// What this edge routed before asking must be in the store when the query reaches it (the
/// edge routes QoS 0 and 1 messages before they are stored), and what it delivered before
/// asking must not come back. Neither is waited for unless it must be (under load a barrier
/// costs one or two store writes, most of a page's time):
/// - delivery records still queued are taken from the recorder first
///   ([`RecordQueue::pending_for`](crate::pipeline::RecordQueue::pending_for)) and count with
///   those the store holds;
/// - the store holds every message created before the oldest one still queued for writing
///   (the horizon), so a page that ends before it is read at once; only a page that starts at
///   the horizon waits for the persister's writes and is read again.
///
/// Other hosts' messages (`other_hosts_only`) reach this edge only once stored.
async fn catch_up_page<S: Store>(
    shared: &Shared<S>,
    client_id: &str,
    after: Option<Cursor>,
    other_hosts_only: bool,
    edge_host: &str,
) -> Result<(Vec<Message>, Option<Cursor>), StoreError> {
    let (store, limit) = (&*shared.store, shared.retry_limit);
    let pending = shared.record.pending_for(client_id);
    let not_host = other_hosts_only.then_some(edge_host);
    let horizon = if other_hosts_only {
        None
    } else {
        shared.persist.oldest_unwritten()
    };
    let mut page = retry(limit, "catch-up", || {
        store::undelivered_before(store, client_id, after, not_host, horizon, &pending)
    })
    .await?;
    if page.at_horizon && page.messages.is_empty() {
        shared.persist.written().await;
        page = retry(limit, "catch-up", || {
            store::undelivered_before(store, client_id, after, not_host, None, &pending)
        })
        .await?;
    }
    Ok((page.messages, page.next))
}
