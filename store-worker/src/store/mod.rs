//! Storage behind five narrow traits ([`MessageStore`], [`SubscriptionStore`],
//! [`SessionStore`], [`ClusterStore`], [`AuthStore`]; [`Store`] is all of them), with two
//! backends: MongoDB ([`mongo`]) for production and clusters, SQLite ([`sqlite`]) embedded for
//! a single machine. `tests/tests/store_contract.rs` holds both to the same contract. The
//! query logic that both share (which stored messages a client still needs) lives here, on
//! top of those primitive operations, so that both backends behave the same.

pub mod mongo;
pub mod sqlite;
pub mod trace;

use std::collections::HashSet;
use std::future::Future;
use wharf_shared::topic;
use wharf_shared::{
    Claim, Cursor, DeliveredRecord, Generation, Message, MessageId, Qos, StoredRule, StoredUser,
    Subscription, SubscriptionOptions, MAX_BYTES_PER_REPLY, MAX_MESSAGES_PER_REPLY,
};

/// Messages kept for 30 days, delivery records for 7 (the seed's TTLs).
pub const MESSAGE_TTL_SECS: u64 = 30 * 24 * 3600;
pub const PUBLISHED_TTL_SECS: u64 = 7 * 24 * 3600;

/// Pages a single catch-up reads before answering, when everything it reads was delivered.
const MAX_PAGES_PER_QUERY: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or timed out; worth retrying.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The operation itself failed.
    #[error("store error: {0}")]
    Failed(String),
}

impl StoreError {
    pub fn retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// A client's delivery record of one message: when it was written and by which host's
/// worker, either unknown where the store does not keep it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeliveryRecord {
    pub client_id: String,
    pub at_ms: Option<i64>,
    pub host: Option<String>,
}

/// A subscription as stored, with the time it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSubscription {
    pub filter: String,
    pub qos: Qos,
    pub created_ms: i64,
    pub options: SubscriptionOptions,
}

/// One group-committed write, applied in this order: forget the packet ids of clients in
/// `clear_qos2`, forget `release_qos2`, record `record_qos2` (client, packet id, message id),
/// then store `messages` (ignoring ids already stored, applying retain flags in order). A QoS 2
/// id is recorded before its message, so that a crash in between never loses the message: its
/// re-sent PUBLISH is stored under the recorded id.
#[derive(Debug, Clone, Default)]
pub struct WriteBatch {
    /// Nobody waits for this batch (QoS 0 messages, clean-ups): it need not be forced to disk
    /// before the write returns. The embedded store commits it without an fsync (the next
    /// durable commit carries it to disk); MongoDB inserts its messages with `w: 1` and no
    /// journal wait.
    pub relaxed: bool,
    pub clear_qos2: Vec<String>,
    pub release_qos2: Vec<(String, u16)>,
    pub messages: Vec<Message>,
    pub record_qos2: Vec<(String, u16, MessageId)>,
}

/// `publishedMessage` records of one client, as one notice from an edge carried them: one
/// document (or row) per record, with the client, host and time shared.
#[derive(Debug, Clone)]
pub struct Deliveries {
    pub client_id: String,
    pub host: std::sync::Arc<str>,
    pub created_ms: i64,
    pub records: Vec<DeliveredRecord>,
}

/// Messages and what is kept about them: writes (with QoS 2 ids and retained values), delivery
/// records, reads by time, by topic and by id.
pub trait MessageStore: Send + Sync + 'static {
    /// Applies a batch durably (see [`WriteBatch`]).
    fn write(
        &self,
        batch: std::sync::Arc<WriteBatch>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Which of these (client, packet id) pairs are recorded as QoS 2 messages not yet
    /// released, with the message id recorded for each.
    fn qos2_recorded(
        &self,
        keys: Vec<(String, u16)>,
    ) -> impl Future<Output = Result<std::collections::HashMap<(String, u16), MessageId>, StoreError>>
           + Send;
    /// Written without waiting for the disk: a lost record costs a duplicate delivery.
    fn record_delivered(
        &self,
        batch: std::sync::Arc<Vec<Deliveries>>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Removes the retained message of `topic`, if any.
    fn clear_retained(&self, topic: &str) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Retained messages whose topics may match (the caller filters exactly).
    fn retained(
        &self,
        prefixes: Option<Vec<String>>,
    ) -> impl Future<Output = Result<Vec<Message>, StoreError>> + Send;
    /// Messages after `after` in (created, id) order, oldest first, at most `limit`, not
    /// from `not_host`, on every topic (the caller matches its subscriptions: both stores read
    /// by time alone). Backed by an index on `created`: its cost follows the new messages, not
    /// the history.
    fn messages_after(
        &self,
        after: Cursor,
        not_host: Option<String>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Message>, StoreError>> + Send;
    /// Messages on the topics of `scope` after `after` in (created, id) order, oldest first,
    /// at most `limit`, not from `not_host`: read through the messages' topic index, so its
    /// cost follows the messages of those topics, not all traffic. `None` where the scope is
    /// a prefix holding more than [`PREFIX_CANDIDATES`] messages after `after`: the caller
    /// reads by time ([`MessageStore::messages_after`]) instead.
    fn messages_on(
        &self,
        scope: TopicScope,
        after: Cursor,
        not_host: Option<String>,
        limit: usize,
    ) -> impl Future<Output = Result<Option<Vec<Message>>, StoreError>> + Send;
    /// Stored QoS 2 messages by id (those still within their TTL). Only QoS 2 messages are
    /// ever looked up by id (their packet-id records name them), so a store need not index
    /// the others by id.
    fn qos2_messages_by_id(
        &self,
        ids: Vec<MessageId>,
    ) -> impl Future<Output = Result<Vec<Message>, StoreError>> + Send;
    /// The stored message with this id, if the store still holds it (the admin API's
    /// "where a message went"; not on any delivery path).
    fn message_by_id(
        &self,
        id: MessageId,
    ) -> impl Future<Output = Result<Option<Message>, StoreError>> + Send;
    /// The delivery records of message `id` for any of `clients`, one per client.
    fn deliveries_of(
        &self,
        id: MessageId,
        clients: Vec<String>,
    ) -> impl Future<Output = Result<Vec<DeliveryRecord>, StoreError>> + Send;
    /// Which of `ids` have a delivery record for the client.
    fn delivered_among(
        &self,
        client_id: &str,
        ids: Vec<MessageId>,
    ) -> impl Future<Output = Result<HashSet<MessageId>, StoreError>> + Send;
}

/// Subscriptions, per client and filter.
pub trait SubscriptionStore: Send + Sync + 'static {
    fn subscriptions(
        &self,
        client_id: &str,
    ) -> impl Future<Output = Result<Vec<StoredSubscription>, StoreError>> + Send;
    /// Upserts per (client, filter); a new one gets `now_ms` as its creation time.
    fn upsert_subscriptions(
        &self,
        client_id: &str,
        subscriptions: Vec<Subscription>,
        now_ms: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Whether any client subscribes to exactly `filter` (a shared subscription group's
    /// `$share/...` filter: whether the group has members left).
    fn has_subscribers(
        &self,
        filter: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// The client's shared subscription filters (`$share/...`).
    fn shared_filters(
        &self,
        client_id: &str,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;
    /// Removes the named filters, or all of the client's with `None`.
    fn remove_subscriptions(
        &self,
        client_id: &str,
        filters: Option<Vec<String>>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// At most `limit` stored subscriptions, with their clients, whose filter is one of
    /// `filters` or, with `shared`, any shared subscription's (`$share/...`); read through the
    /// subscriptions' filter index.
    fn subscribers(
        &self,
        filters: Vec<String>,
        shared: bool,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(String, StoredSubscription)>, StoreError>> + Send;
}

/// Session records (claims, expiry) and outbound QoS 2 deliveries under way.
pub trait SessionStore: Send + Sync + 'static {
    /// Records a QoS 2 delivery under way to a persistent session (`released` carries the
    /// delivery record to write with it once PUBREC arrived).
    fn track_qos2_out(
        &self,
        client_id: &str,
        pkid: u16,
        message_id: MessageId,
        released: Option<Deliveries>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Forgets one QoS 2 delivery (PUBCOMP), or all of a client's (`None`, clean session).
    fn forget_qos2_out(
        &self,
        client_id: &str,
        pkid: Option<u16>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The client's QoS 2 deliveries under way: (packet id, message, released).
    fn qos2_out(
        &self,
        client_id: &str,
    ) -> impl Future<Output = Result<Vec<(u16, MessageId, bool)>, StoreError>> + Send;
    /// Claims the client's session record for a connection on `host` (made if missing, its
    /// expiry cleared, `session_expiry` kept); returns whether a persistent session was
    /// held already (MQTT's Session Present, also for a session without subscriptions) and
    /// the claim's generation, newer than any claim before it.
    fn claim_session(
        &self,
        client_id: &str,
        host: &str,
        now_ms: i64,
        session_expiry: u32,
    ) -> impl Future<Output = Result<(bool, Generation), StoreError>> + Send;
    /// Forgets the client's session record, if it is `owner`'s claim (`None`: whoever's);
    /// returns whether it did.
    fn drop_session(
        &self,
        client_id: &str,
        owner: Option<&Owner<'_>>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// The client disconnected: its session expires at `expires_ms` (`None`: never) unless it
    /// comes back first ([`SessionStore::claim_session`] clears it). Nothing changes if the record
    /// is no longer `owner`'s claim.
    fn close_session(
        &self,
        client_id: &str,
        expires_ms: Option<i64>,
        owner: &Owner<'_>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Clients whose sessions had expired at `now_ms` (at most 1,000 at a time).
    fn expired_sessions(
        &self,
        now_ms: i64,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;
    /// Forgets the client's session record if it has still expired at `now_ms` (the client did
    /// not come back meanwhile); returns whether it did, and the caller then drops the rest.
    fn drop_expired_session(
        &self,
        client_id: &str,
        now_ms: i64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Stored client sessions (not groups' or bridges' ownership records) in client id order
    /// after `after`, whose ids start with `prefix`, at most `limit`; their owed counts are
    /// left at 0 for the caller.
    fn sessions_page(
        &self,
        after: Option<String>,
        prefix: String,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<wharf_shared::SessionSummary>, StoreError>> + Send;
}

/// What hosts sharing the store read from each other: messages, claims, groups' owners, status
/// reports. A store one worker uses says so (`shared_by_hosts` false) and answers for one host:
/// nothing to follow, no other host's claims, every group its edge's.
pub trait ClusterStore: Send + Sync + 'static {
    /// Sends messages that other workers store (host other than `own_host`) to `sink` as
    /// they arrive, until `shutdown`. A store only one worker uses has nothing to follow and
    /// returns at once.
    fn follow_other_hosts(
        &self,
        own_host: String,
        sink: tokio::sync::mpsc::Sender<Vec<Message>>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> impl Future<Output = ()> + Send;
    /// Of `groups` (shared subscription group keys with members on the edge `owner`), those
    /// `owner` owns now: it keeps the ones it owned, and takes those whose owner has not
    /// renewed its claim for [`GROUP_LEASE_MS`]; those it owned and no longer asks for are
    /// given up. A store one worker uses gives every edge all of them.
    fn own_groups(
        &self,
        owner: &str,
        groups: Vec<String>,
        now_ms: i64,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;
    /// Whether workers on other hosts share this store (a cluster can form on it).
    fn shared_by_hosts(&self) -> bool;
    /// Sessions claimed on hosts other than `own_host` whose claim was written at or after
    /// `since_ms` (by the claiming worker's clock).
    fn claims_since(
        &self,
        since_ms: i64,
        own_host: &str,
    ) -> impl Future<Output = Result<Vec<Claim>, StoreError>> + Send;
    /// Keeps `status` as its host's last report (the cluster view), stamped `written_ms`.
    fn put_host_status(
        &self,
        status: wharf_shared::HostStatus,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Every host's last report, as kept by [`ClusterStore::put_host_status`].
    fn host_statuses(
        &self,
    ) -> impl Future<Output = Result<Vec<wharf_shared::HostStatus>, StoreError>> + Send;
}

/// Users and authorization rules kept in the store.
pub trait AuthStore: Send + Sync + 'static {
    /// The users and authorization rules kept in the store (`Failed` where it keeps none).
    fn load_auth(
        &self,
        users: bool,
        rules: bool,
    ) -> impl Future<Output = Result<(Vec<StoredUser>, Vec<StoredRule>), StoreError>> + Send;
    /// Adds or replaces the user of `user.username` (`by`: who asked, kept with it).
    fn put_user(
        &self,
        user: StoredUser,
        by: String,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Removes the user `username`; `Ok(false)` when there was none.
    fn delete_user(
        &self,
        username: String,
        by: String,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Adds an authorization rule (`by`: who asked, kept with it).
    fn put_rule(
        &self,
        rule: StoredRule,
        by: String,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Removes the rules with exactly `rule`'s fields; how many it removed.
    fn delete_rule(
        &self,
        rule: StoredRule,
        by: String,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// Everything a backend provides, as the worker uses it. Every write is durable when it
/// returns `Ok`; no method has a default, so a backend states each answer itself.
pub trait Store:
    MessageStore + SubscriptionStore + SessionStore + ClusterStore + AuthStore
{
    /// Whether the store answers (readiness).
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// How long a group's owner may go without renewing its claim (every second) before another
/// edge with members takes the group over: a host that died or froze.
pub const GROUP_LEASE_MS: i64 = 5_000;

/// Whose claim a session record must still be for a write to go ahead: `host`'s, and with
/// `generation` when it is known (`None`: the host's newest claim).
#[derive(Debug, Clone, Copy)]
pub struct Owner<'a> {
    pub host: &'a str,
    pub generation: Option<Generation>,
}

/// The topics a catch-up query reads through the topic index.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TopicScope {
    /// Exactly this topic (a filter without wildcards).
    Exact(String),
    /// This topic and every topic below it (`p` and `p/...`): the literal prefix of a filter
    /// with a wildcard after its first level.
    Prefix(String),
}

impl TopicScope {
    /// The scope a session's filter reads, or `None` for one that must read by time (it
    /// starts with a wildcard, so every topic may match). Shared subscriptions (`$share/...`)
    /// are served by their group, never by a session's catch-up: `Some(None)`.
    fn of(filter: &str) -> Option<Option<TopicScope>> {
        if filter.starts_with("$share/") {
            return Some(None);
        }
        if !filter.contains(['+', '#']) {
            return Some(Some(TopicScope::Exact(filter.to_owned())));
        }
        literal_prefix(filter).map(|p| Some(TopicScope::Prefix(p)))
    }

    /// The topic, or the prefix, this scope names.
    fn topic(&self) -> &str {
        match self {
            TopicScope::Exact(t) | TopicScope::Prefix(t) => t,
        }
    }

    /// Whether `topic` is in this scope.
    pub fn contains(&self, topic: &str) -> bool {
        match self {
            TopicScope::Exact(t) => topic == t,
            TopicScope::Prefix(p) => topic
                .strip_prefix(p.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
        }
    }
}

/// Most messages a prefix scope may hold after a catch-up's position for the topic index to
/// serve it: past that, reading by time costs less than sorting the prefix's messages.
pub const PREFIX_CANDIDATES: usize = 20_000;

/// The literal part of a filter before its first wildcard, or `None` for a filter that starts
/// with one. `a/#` matches `a` itself, so its prefix is `a`.
pub fn literal_prefix(filter: &str) -> Option<String> {
    let literal: Vec<&str> = filter
        .split('/')
        .take_while(|level| *level != "+" && *level != "#")
        .collect();
    let prefix = literal.join("/");
    (!prefix.is_empty()).then_some(prefix)
}

/// Prefixes for a set of filters; `None` when any filter needs every topic.
pub fn prefixes<'a>(filters: impl Iterator<Item = &'a str>) -> Option<Vec<String>> {
    let mut out = Vec::new();
    for f in filters {
        out.push(literal_prefix(f)?);
    }
    out.sort();
    out.dedup();
    Some(out)
}

/// Messages on the client's subscriptions stored after `after` (and since each
/// subscription was made), without a delivery record for the client, oldest first. Returns at
/// most `MAX_MESSAGES_PER_REPLY` and, if there may be more, the position of the last message
/// read: the next page starts strictly after it, so no message is read twice or skipped,
/// however many share a millisecond.
pub async fn undelivered<S: Store>(
    store: &S,
    client_id: &str,
    after: Option<Cursor>,
    not_host: Option<&str>,
) -> Result<(Vec<Message>, Option<Cursor>), StoreError> {
    let page = undelivered_before(store, client_id, after, not_host, None, &HashSet::new()).await?;
    Ok((page.messages, page.next))
}

/// How many of `page`'s first messages fit in `budget` bytes of payload and topic; at least
/// one, so that paging always moves on.
fn fitting(page: &[Message], budget: usize) -> usize {
    let mut used = 0;
    page.iter()
        .position(|m| {
            used += m.payload.len() + m.topic.len();
            used > budget
        })
        .map_or(page.len(), |over| over.max(1))
}

/// A page of [`undelivered_before`].
#[derive(Debug)]
pub struct Undelivered {
    pub messages: Vec<Message>,
    /// Where the next page starts; `None`: the store has nothing more.
    pub next: Option<Cursor>,
    /// The page stopped at the horizon: what comes after it may not be written yet.
    pub at_horizon: bool,
}

/// [`undelivered`], reading only messages created before `horizon` (when given): the store
/// is known to hold every message created before it, but not yet all of those after. A page
/// that reaches the horizon says so (`at_horizon`) and never claims the store has no more.
/// `pending`: messages delivered to the client whose records are not written yet.
pub async fn undelivered_before<S: Store>(
    store: &S,
    client_id: &str,
    after: Option<Cursor>,
    not_host: Option<&str>,
    horizon: Option<i64>,
    pending: &HashSet<MessageId>,
) -> Result<Undelivered, StoreError> {
    let subscriptions = store.subscriptions(client_id).await?;
    let Some(oldest) = subscriptions.iter().map(|s| s.created_ms).min() else {
        return Ok(Undelivered {
            messages: Vec::new(),
            next: None,
            at_horizon: false,
        });
    };
    let mut position = after.map_or(Cursor::since(oldest), |a| a.max(Cursor::since(oldest)));
    let mut scopes = scopes_of(&subscriptions);
    let mut out = Vec::new();
    for _ in 0..MAX_PAGES_PER_QUERY {
        let read = match &scopes {
            Some(scopes) => indexed_page(store, scopes, position, not_host).await?,
            None => None,
        };
        let (mut page, mut next) = match read {
            Some(read) => read,
            None => {
                // A filter that starts with a wildcard, or a prefix too busy for the index:
                // read every topic by time, as long as this session's catch-up lasts.
                scopes = None;
                let page = store
                    .messages_after(
                        position,
                        not_host.map(str::to_owned),
                        MAX_MESSAGES_PER_REPLY,
                    )
                    .await?;
                let next = Cursor::after_full_page(&page, MAX_MESSAGES_PER_REPLY);
                (page, next)
            }
        };
        // Cut where the byte budget or the horizon ends the page, whichever comes first.
        let fits = fitting(&page, MAX_BYTES_PER_REPLY);
        let complete = horizon.map_or(page.len(), |h| page.partition_point(|m| m.created_ms < h));
        let reaches_horizon = horizon.is_some() && (complete < page.len() || next.is_none());
        let at_horizon = reaches_horizon && complete <= fits;
        let keep = fits.min(complete);
        if keep < page.len() || at_horizon {
            page.truncate(keep);
            next = Some(page.last().map_or(position, Cursor::of));
        }
        let now = wharf_shared::now_ms();
        let wanted: Vec<Message> = page
            .into_iter()
            .filter(|m| {
                !pending.contains(&m.id)
                    && !m.expired(now)
                    && subscriptions.iter().any(|s| {
                        m.created_ms >= s.created_ms && topic::matches(&m.topic, &s.filter)
                    })
            })
            .collect();
        let delivered = if wanted.is_empty() {
            HashSet::new()
        } else {
            store
                .delivered_among(client_id, wanted.iter().map(|m| m.id).collect())
                .await?
        };
        out.extend(wanted.into_iter().filter(|m| !delivered.contains(&m.id)));
        let Some(next) = next else {
            return Ok(Undelivered {
                messages: out,
                next: None,
                at_horizon,
            });
        };
        position = next;
        if !out.is_empty() || at_horizon {
            return Ok(Undelivered {
                messages: out,
                next: Some(position),
                at_horizon,
            });
        }
    }
    Ok(Undelivered {
        messages: out,
        next: Some(position),
        at_horizon: false,
    })
}

/// The scopes a session's subscriptions read through the topic index, each from the oldest
/// creation time of the subscriptions that read it; `None` when one must read by time.
fn scopes_of(subscriptions: &[StoredSubscription]) -> Option<Vec<(TopicScope, i64)>> {
    let mut scopes: std::collections::BTreeMap<TopicScope, i64> = Default::default();
    for s in subscriptions {
        if let Some(scope) = TopicScope::of(&s.filter)? {
            let since = scopes.entry(scope).or_insert(s.created_ms);
            *since = (*since).min(s.created_ms);
        }
    }
    // A prefix covers the exact topics and narrower prefixes inside it.
    let prefixes: Vec<TopicScope> = scopes
        .keys()
        .filter(|s| matches!(s, TopicScope::Prefix(_)))
        .cloned()
        .collect();
    let covered: Vec<(TopicScope, i64)> = scopes
        .iter()
        .filter_map(|(scope, since)| {
            let outer = prefixes
                .iter()
                .find(|p| *p != scope && p.contains(scope.topic()))?;
            Some((outer.clone(), *since))
        })
        .collect();
    for (outer, since) in covered {
        let s = scopes.entry(outer).or_insert(since);
        *s = (*s).min(since);
    }
    let outer: Vec<(TopicScope, i64)> = scopes
        .into_iter()
        .filter(|(scope, _)| {
            !prefixes
                .iter()
                .any(|p| p != scope && p.contains(scope.topic()))
        })
        .collect();
    Some(outer)
}

/// One page through the topic index: each scope read after `position` (and from its oldest
/// subscription), merged in (created, id) order, each message once. The page ends where the
/// first full scope ends (a scope's messages past its last one read are not known yet) or at
/// [`MAX_MESSAGES_PER_REPLY`]; the cursor after it is `None` when no scope has more. `None`
/// when a scope is too busy for the index.
async fn indexed_page<S: Store>(
    store: &S,
    scopes: &[(TopicScope, i64)],
    position: Cursor,
    not_host: Option<&str>,
) -> Result<Option<(Vec<Message>, Option<Cursor>)>, StoreError> {
    let limit = MAX_MESSAGES_PER_REPLY;
    let mut merged = Vec::new();
    let mut cut: Option<Cursor> = None;
    for (scope, since) in scopes {
        let from = position.max(Cursor::since(*since));
        let Some(found) = store
            .messages_on(scope.clone(), from, not_host.map(str::to_owned), limit)
            .await?
        else {
            return Ok(None);
        };
        if found.len() >= limit {
            let last = found.last().map(Cursor::of);
            cut = match (cut, last) {
                (Some(c), Some(l)) => Some(c.min(l)),
                (c, l) => c.or(l),
            };
        }
        merged.extend(found);
    }
    merged.sort_by_key(|m| (m.created_ms, m.id));
    merged.dedup_by_key(|m| m.id);
    if let Some(cut) = cut {
        merged.retain(|m| !cut.precedes(m));
    }
    if merged.len() > limit {
        merged.truncate(limit);
        cut = merged.last().map(Cursor::of);
    }
    Ok(Some((merged, cut)))
}

/// The client's QoS 2 deliveries under way, with their messages (those past the TTL dropped).
pub async fn outbound_qos2<S: Store>(
    store: &S,
    client_id: &str,
) -> Result<Vec<wharf_shared::OutboundQos2>, StoreError> {
    let records = store.qos2_out(client_id).await?;
    if records.is_empty() {
        return Ok(Vec::new());
    }
    let messages = store
        .qos2_messages_by_id(records.iter().map(|r| r.1).collect())
        .await?;
    Ok(records
        .into_iter()
        .filter_map(|(pkid, id, released)| {
            let message = messages.iter().find(|m| m.id == id)?.clone();
            Some(wharf_shared::OutboundQos2 {
                pkid,
                message,
                released,
            })
        })
        .collect())
}

/// Retained messages matching any of `filters`.
pub async fn retained_for<S: Store>(
    store: &S,
    filters: &[String],
) -> Result<Vec<Message>, StoreError> {
    let candidates = store
        .retained(prefixes(filters.iter().map(String::as_str)))
        .await?;
    let now = wharf_shared::now_ms();
    Ok(candidates
        .into_iter()
        .filter(|m| !m.expired(now) && filters.iter().any(|f| topic::matches(&m.topic, f)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_prefixes() {
        assert_eq!(literal_prefix("a/b/c").as_deref(), Some("a/b/c"));
        assert_eq!(literal_prefix("a/b/+").as_deref(), Some("a/b"));
        assert_eq!(literal_prefix("a/+/c").as_deref(), Some("a"));
        assert_eq!(literal_prefix("a/#").as_deref(), Some("a"));
        assert_eq!(literal_prefix("#"), None);
        assert_eq!(literal_prefix("+/x"), None);
        assert_eq!(prefixes(["a/#", "b", "#"].into_iter()), None);
    }
}
