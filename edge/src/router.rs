//! The local fast path: which connected sessions want a message, and their queues.
//!
//! A trie of filter levels maps each filter to the sessions subscribed with it. Routing takes a
//! read lock, collects the matching sessions (one entry per session, at the highest QoS of
//! its overlapping subscriptions) and offers the message to each session's bounded queue
//! without waiting: a full queue never slows the publisher (see [`Offer`]).

use crate::small_map::SmallMap;
use futures::task::AtomicWaker;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use wharf_shared::{topic, Message, MessageId, Qos, Subscription, SubscriptionOptions};

/// A message on its way to one session, at the QoS that session gets.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message: Arc<Message>,
    pub qos: Qos,
    /// The RETAIN flag to send: retained messages sent because of a new subscription, and
    /// (5.0 Retain As Published) retained messages as they were published.
    pub retain: bool,
    /// 5.0 Subscription Identifiers of the subscriptions it matched (empty: none, and no
    /// allocation).
    pub subscription_ids: Box<[u32]>,
    /// The shared subscription group (`$share/{name}/{filter}`) it was given to this session
    /// for: its delivery is recorded for the group, and goes back to the group if this session
    /// ends before acknowledging it.
    pub group: Option<Arc<str>>,
}

impl Delivery {
    pub fn new(message: Arc<Message>, qos: Qos, retain: bool) -> Self {
        Delivery {
            message,
            qos,
            retain,
            subscription_ids: Box::default(),
            group: None,
        }
    }
}

/// What one subscription grants its session: the QoS and the 5.0 options that act on every
/// message (8 bytes, in every trie entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub qos: Qos,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// The Subscription Identifier; 0 for none (0 is not a valid identifier).
    pub identifier: u32,
}

impl Grant {
    /// A 3.1/3.1.1 subscription: a QoS and nothing else.
    pub fn qos(qos: Qos) -> Grant {
        Grant {
            qos,
            no_local: false,
            retain_as_published: false,
            identifier: 0,
        }
    }

    pub fn with(qos: Qos, options: SubscriptionOptions) -> Grant {
        Grant {
            qos,
            no_local: options.no_local,
            retain_as_published: options.retain_as_published,
            identifier: options.identifier.unwrap_or(0),
        }
    }

    pub fn of(s: &Subscription) -> Grant {
        Grant::with(s.qos, s.options)
    }

    pub fn options(&self) -> SubscriptionOptions {
        SubscriptionOptions {
            no_local: self.no_local,
            retain_as_published: self.retain_as_published,
            identifier: (self.identifier != 0).then_some(self.identifier),
        }
    }

    /// Whether this subscription takes `message` for the session `client`: not its own
    /// messages under No Local.
    pub fn takes(&self, client: &str, message: &Message) -> bool {
        !(self.no_local && message.client_id == client)
    }
}

/// One delivery of `message` for all the subscriptions of one session that match it
/// (MQTT 5.0 3.3.4: at the highest QoS granted, with every Subscription Identifier, and
/// retained if any of them keeps the flag as published). `None` when none matched.
pub fn combine(message: &Arc<Message>, grants: impl Iterator<Item = Grant>) -> Option<Delivery> {
    let mut best: Option<Qos> = None;
    let mut retain = false;
    let mut ids: Vec<u32> = Vec::new();
    for g in grants {
        best = Some(best.map_or(g.qos, |q| q.max(g.qos)));
        retain |= g.retain_as_published && message.retain;
        if g.identifier != 0 {
            ids.push(g.identifier);
        }
    }
    let qos = best?.min(message.qos);
    ids.sort_unstable();
    ids.dedup();
    Some(Delivery {
        message: message.clone(),
        qos,
        retain,
        subscription_ids: ids.into_boxed_slice(),
        group: None,
    })
}

/// A shared subscription group with members on this edge. Each message on its filter goes to
/// one member (round robin, skipping members whose queue is full); a QoS 1/2 message that no
/// member can take now, or that a member gave back unacknowledged, is fetched again from the
/// store, where the group is a session of its own (client id: the group's key), by the edge's
/// group task ([`crate::groups`]).
struct Group {
    filter: String,
    members: Vec<(Arc<str>, Grant)>,
    next: AtomicUsize,
    /// `created_ms` of the oldest QoS 1/2 message the group still owes from the store
    /// ([`NOT_LAGGING`] if none).
    lagging_since: AtomicI64,
    /// New on this edge: what the store holds for it is to be fetched.
    fresh: AtomicBool,
    /// QoS 1/2 messages given to a member and not yet acknowledged and recorded: a fetch
    /// does not give them out again.
    outstanding: Mutex<HashSet<MessageId>>,
    /// Fetches under way.
    fetching: AtomicUsize,
    /// Messages acknowledged while a fetch was under way: its store read may have come before
    /// their records, so it must not give them out again. Forgotten when no fetch is left.
    done_while_fetching: Mutex<HashSet<MessageId>>,
    /// Until when (`crate::ids::monotonic_ms`) this edge delivers the group's messages. Where hosts
    /// share the store one edge at a time does, the one the store says owns the group;
    /// otherwise always ([`u64::MAX`]).
    owned_until: AtomicU64,
    /// Whether the store has been asked who owns the group since it was made here.
    asked: AtomicBool,
    /// Where hosts share the store, a group is fetched whole once more [`SETTLE_MS`] after its
    /// first whole fetch here: a host that published before it had read this host's new route
    /// stored those messages without this host's address, so they came neither live nor in
    /// that fetch. When that is due ([`crate::ids::monotonic_ms`]); [`UNSETTLED`] before the
    /// first whole fetch, [`SETTLED`] after the second.
    settle_at_ms: AtomicU64,
}

/// [`Group::settle_at_ms`] before the group's first whole fetch here.
const UNSETTLED: u64 = 0;
/// [`Group::settle_at_ms`] once the settle fetch has been handed out.
const SETTLED: u64 = u64::MAX;
/// How long after a group's first whole fetch it is fetched whole again.
const SETTLE_MS: u64 = wharf_shared::SETTLE_MS as u64;

impl Group {
    fn owned(&self) -> bool {
        let until = self.owned_until.load(Ordering::Acquire);
        until == u64::MAX || until > crate::ids::monotonic_ms()
    }

    fn outstanding(&self) -> std::sync::MutexGuard<'_, HashSet<MessageId>> {
        self.outstanding.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lag(&self, created_ms: i64) {
        self.lagging_since.fetch_min(created_ms, Ordering::AcqRel);
    }

    fn done(&self) -> std::sync::MutexGuard<'_, HashSet<MessageId>> {
        self.done_while_fetching
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// A queue above this many slots is given back when it empties, so that a burst does not
/// leave an idle connection holding memory.
const SHRINK_ABOVE: usize = 256;

/// One connected session's mailbox: the router pushes deliveries, the edge signals shutdown
/// and the keepalive sweep signals silence; the session's task takes both with
/// [`SessionTx::poll_recv`].
///
/// A deque behind a mutex and a waker rather than a tokio channel: an empty queue holds no
/// buffer (a bounded channel allocates a block of slots up front, about 1 KB per session),
/// and the signals replace a timer and a cancellation future in every connection's task.
pub struct SessionTx {
    pub connection_id: u64,
    /// Who is connected, for the admin API.
    pub client: ClientInfo,
    /// QoS 1/2 messages sent to the client and not yet acknowledged (kept by its task).
    inflight: std::sync::atomic::AtomicU16,
    queue: Mutex<VecDeque<Delivery>>,
    capacity: u32,
    /// The session's task, once it waits (see [`SessionTx::poll_recv`]).
    ready: AtomicWaker,
    /// `created_ms` of the oldest QoS 1/2 message left to the store since the marker was last
    /// taken ([`NOT_LAGGING`] if none). The session fetches such messages from the store once
    /// it has caught up. The oldest, not the first: messages reach the router in the order
    /// their publishers handed them to the link, not in the order they were created (one
    /// publisher's batch can wait for the link while another's is routed), and a catch-up
    /// from the first one left out would skip an older one left out after it.
    lagging_since: AtomicI64,
    /// [`Signals`] raised and not yet taken.
    signals: AtomicU8,
    /// 1.5 x the client's keepalive in milliseconds; 0 for none.
    silence_limit_ms: u32,
    /// When the client was last heard from, on [`crate::ids::monotonic_ms`]'s clock.
    last_heard_ms: AtomicU64,
    /// The task, woken through [`SessionTx::read_waker`] when the socket turns readable.
    read_task: AtomicWaker,
    /// The read epoch ([`next_read_epoch`]) at which the socket last turned readable (or the
    /// session started): what the client sends next reached the edge after it, or was already
    /// there when the socket was last read (a read that finds bytes without a wake keeps an
    /// older epoch: a wider window, never a narrower one).
    read_epoch: AtomicU64,
    /// When a catch-up of other hosts' messages is due ([`crate::ids::monotonic_ms`];
    /// `u64::MAX`: none), read by the keepalive sweep; `settle` holds it with the time since
    /// which messages are asked for.
    settle_at_ms: AtomicU64,
    settle: Mutex<Option<Settle>>,
}

/// A catch-up of other hosts' messages made since `from_ms` (Unix ms), due at `at_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settle {
    pub from_ms: i64,
    pub at_ms: u64,
}

/// What the admin API shows of a connection.
#[derive(Debug, Clone, Copy)]
pub struct ClientInfo {
    /// The client's address (the PROXY protocol header's, behind a balancer).
    pub peer: std::net::SocketAddr,
    pub version: crate::protocol::Version,
    /// When the session started, in Unix milliseconds.
    pub connected_ms: i64,
}

impl Default for ClientInfo {
    fn default() -> Self {
        ClientInfo {
            peer: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
            version: crate::protocol::Version::V3_1_1,
            connected_ms: 0,
        }
    }
}

/// Why a session is woken other than for a delivery (a bit set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signals(u8);

impl Signals {
    /// The edge is shutting down.
    pub const SHUTDOWN: Signals = Signals(1);
    /// The client has been silent for longer than 1.5 x its keepalive.
    pub const KEEPALIVE: Signals = Signals(2);
    /// An operator asked for the connection to be closed (admin API).
    pub const KICK: Signals = Signals(4);
    /// The users were reloaded: the session checks that its login still holds.
    pub const REAUTH: Signals = Signals(8);
    /// A catch-up of other hosts' messages is due ([`SessionTx::settle`]).
    pub const SETTLE: Signals = Signals(16);

    pub fn contains(self, other: Signals) -> bool {
        self.0 & other.0 == other.0
    }
}

/// What a session's task is woken for.
#[derive(Debug)]
pub enum Event {
    Delivery(Delivery),
    Signals(Signals),
}

impl SessionTx {
    /// `silence_limit`: how long the client may stay silent (1.5 x keepalive), if limited.
    pub fn new(connection_id: u64, capacity: usize, silence_limit: Option<Duration>) -> Self {
        SessionTx {
            connection_id,
            client: ClientInfo::default(),
            inflight: Default::default(),
            queue: Mutex::new(VecDeque::new()),
            capacity: capacity.clamp(1, u32::MAX as usize) as u32,
            ready: AtomicWaker::new(),
            lagging_since: AtomicI64::new(NOT_LAGGING),
            signals: AtomicU8::new(0),
            // At most 1.5 x 65,535 s: within a u32 of milliseconds.
            silence_limit_ms: silence_limit
                .map_or(0, |d| d.as_millis().clamp(1, u32::MAX as u128) as u32),
            last_heard_ms: AtomicU64::new(crate::ids::monotonic_ms()),
            read_task: AtomicWaker::new(),
            read_epoch: AtomicU64::new(next_read_epoch()),
            settle_at_ms: AtomicU64::new(u64::MAX),
            settle: Mutex::new(None),
        }
    }

    /// Asks for a catch-up of other hosts' messages made since `from_ms`, at `at_ms` or
    /// later: one armed already covers both (the earlier start, the later time).
    pub fn settle(&self, from_ms: i64, at_ms: u64) {
        let mut settle = self.settle.lock().unwrap_or_else(|e| e.into_inner());
        let next = match *settle {
            Some(s) => Settle {
                from_ms: s.from_ms.min(from_ms),
                at_ms: s.at_ms.max(at_ms),
            },
            None => Settle { from_ms, at_ms },
        };
        *settle = Some(next);
        self.settle_at_ms.store(next.at_ms, Ordering::Release);
    }

    /// Whether the catch-up armed by [`SessionTx::settle`] is due.
    pub fn settle_due(&self, now_ms: u64) -> bool {
        self.settle_at_ms.load(Ordering::Acquire) <= now_ms
    }

    /// The catch-up armed, if it is due: taken.
    pub fn take_settle(&self, now_ms: u64) -> Option<Settle> {
        if !self.settle_due(now_ms) {
            return None;
        }
        let mut settle = self.settle.lock().unwrap_or_else(|e| e.into_inner());
        let due = settle.take_if(|s| s.at_ms <= now_ms);
        self.settle_at_ms
            .store(settle.map_or(u64::MAX, |s| s.at_ms), Ordering::Release);
        due
    }

    /// The waker to read the client's socket with: it wakes the task `task` and first records
    /// the moment, as a read epoch, in the order the runtime's I/O driver saw the sockets turn
    /// readable (see [`Router::subscribe_after`]).
    pub fn read_waker(self: &Arc<Self>, task: &std::task::Waker) -> std::task::Waker {
        self.read_task.register(task);
        std::task::Waker::from(self.clone())
    }

    /// The socket turned readable: whatever comes now arrived after this epoch.
    fn read_woken(&self) {
        self.read_epoch.store(next_read_epoch(), Ordering::Release);
    }

    /// The read epoch before the bytes read last arrived.
    pub fn read_epoch(&self) -> u64 {
        self.read_epoch.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Delivery>> {
        // Every operation under the lock is a single deque call: a poisoned queue is intact.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `delivery`, or gives it back when the queue is full.
    fn offer(&self, delivery: Delivery) -> Result<(), Delivery> {
        let mut queue = self.lock();
        if queue.len() >= self.capacity as usize {
            return Err(delivery);
        }
        let was_empty = queue.is_empty();
        queue.push_back(delivery);
        drop(queue);
        // The consumer only sleeps on an empty queue.
        if was_empty {
            self.ready.wake();
        }
        Ok(())
    }

    /// The same queue, describing `client`.
    pub fn describing(self, client: ClientInfo) -> Self {
        SessionTx { client, ..self }
    }

    /// Messages queued for the client.
    pub fn queued(&self) -> usize {
        self.lock().len()
    }

    pub fn set_inflight(&self, n: usize) {
        self.inflight
            .store(n.min(u16::MAX as usize) as u16, Ordering::Relaxed);
    }

    pub fn inflight(&self) -> u16 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// `created_ms` of the oldest QoS 1/2 message left to the store and not yet fetched.
    pub fn lagging_since(&self) -> Option<i64> {
        match self.lagging_since.load(Ordering::Acquire) {
            NOT_LAGGING => None,
            since => Some(since),
        }
    }

    /// Raises `signals` and wakes the session.
    pub fn signal(&self, signals: Signals) {
        self.signals.fetch_or(signals.0, Ordering::AcqRel);
        self.ready.wake();
    }

    /// The client was heard from at `now_ms` ([`crate::ids::monotonic_ms`]).
    pub fn heard(&self, now_ms: u64) {
        self.last_heard_ms.store(now_ms, Ordering::Relaxed);
    }

    /// The edge stops reading the client for a while (see [`SessionTx::overdue`]): its
    /// silence does not count until the next [`SessionTx::heard`].
    pub fn hold(&self) {
        self.last_heard_ms.store(u64::MAX, Ordering::Relaxed);
    }

    /// Whether the client has been silent for longer than its keepalive allows (never while
    /// held: the "last heard" moment is then in the future).
    pub fn overdue(&self, now_ms: u64) -> bool {
        self.silence_limit_ms > 0
            && now_ms.saturating_sub(self.last_heard_ms.load(Ordering::Relaxed))
                > u64::from(self.silence_limit_ms)
    }

    /// The next delivery, if one is queued.
    pub fn try_pop(&self) -> Option<Delivery> {
        let mut queue = self.lock();
        let next = queue.pop_front();
        if queue.is_empty() && queue.capacity() > SHRINK_ABOVE {
            *queue = VecDeque::new();
        }
        next
    }

    /// Waits for a signal, or for the next delivery if `deliveries` (one consumer: the
    /// session's task). Cancel-safe: nothing is taken until it is returned.
    pub fn poll_recv(&self, cx: &mut Context<'_>, deliveries: bool) -> Poll<Event> {
        if let Some(event) = self.take_event(deliveries) {
            return Poll::Ready(event);
        }
        // Registered before the second look: a push or signal after it wakes the task, so
        // none is missed. (A waker rather than a `Notify`: its future would be part of every
        // connection's task.)
        self.ready.register(cx.waker());
        match self.take_event(deliveries) {
            Some(event) => Poll::Ready(event),
            None => Poll::Pending,
        }
    }

    /// [`SessionTx::poll_recv`] as a future.
    pub async fn recv(&self, deliveries: bool) -> Event {
        std::future::poll_fn(|cx| self.poll_recv(cx, deliveries)).await
    }

    fn take_event(&self, deliveries: bool) -> Option<Event> {
        let signals = self.signals.swap(0, Ordering::AcqRel);
        if signals != 0 {
            return Some(Event::Signals(Signals(signals)));
        }
        if deliveries {
            return self.try_pop().map(Event::Delivery);
        }
        None
    }

    /// Takes the lag marker, if any.
    pub fn take_lag(&self) -> Option<i64> {
        match self.lagging_since.swap(NOT_LAGGING, Ordering::AcqRel) {
            NOT_LAGGING => None,
            since => Some(since),
        }
    }

    fn lagging(&self) -> bool {
        self.lagging_since.load(Ordering::Acquire) != NOT_LAGGING
    }

    /// Queues `delivery` (a message being routed), or leaves it to the store or drops it.
    fn deliver(&self, delivery: Delivery, offer: &mut Offer) {
        // A lagging session takes QoS 1/2 from the store until it has caught up, so that
        // nothing newer overtakes what is waiting there.
        if delivery.qos != Qos::AtMostOnce && self.lagging() {
            self.defer(&delivery.message);
            offer.deferred += 1;
            return;
        }
        match self.offer(delivery) {
            Ok(()) => offer.queued += 1,
            Err(d) if d.qos == Qos::AtMostOnce => offer.dropped += 1,
            Err(d) => {
                self.defer(&d.message);
                offer.deferred += 1;
            }
        }
    }

    /// Leaves `message` to the store: the session fetches it once it has caught up.
    fn defer(&self, message: &Message) {
        self.lagging_since
            .fetch_min(message.created_ms, Ordering::AcqRel);
    }
}

impl std::task::Wake for SessionTx {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.read_woken();
        self.read_task.wake();
    }
}

/// [`SessionTx::lagging_since`] when nothing was left to the store.
const NOT_LAGGING: i64 = i64::MAX;

/// Counts the moments sockets turned readable, process-wide, in the order the I/O driver
/// reported them; each routed message is stamped with the count.
static READ_EPOCH: AtomicU64 = AtomicU64::new(1);

/// A new read epoch, later than every message routed so far.
fn next_read_epoch() -> u64 {
    READ_EPOCH.fetch_add(1, Ordering::AcqRel) + 1
}

/// The messages routed last, each with the read epoch it was routed in (see
/// [`Router::subscribe_after`]). Striped by thread, so that routing threads do not share a
/// lock; a message larger than [`RECENT_MAX_PAYLOAD`] is not kept.
#[derive(Default)]
struct Recent {
    stripes: [Stripe; RECENT_STRIPES],
}

/// One thread's share of [`Recent`], on a cache line of its own.
#[derive(Default)]
#[repr(align(128))]
struct Stripe(Mutex<VecDeque<(u64, Arc<Message>)>>);

const RECENT_STRIPES: usize = 4;
const RECENT_PER_STRIPE: usize = 8;
const RECENT_MAX_PAYLOAD: usize = 16 * 1024;

impl Stripe {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, Arc<Message>)>> {
        // Single deque calls under the lock: a poisoned one is intact.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Recent {
    fn record(&self, message: &Arc<Message>) {
        if message.payload.len() > RECENT_MAX_PAYLOAD {
            return;
        }
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static STRIPE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % RECENT_STRIPES;
        }
        let stripe = STRIPE.with(|s| *s);
        let epoch = READ_EPOCH.load(Ordering::Acquire);
        let mut recent = self.stripes[stripe].lock();
        if recent.len() == RECENT_PER_STRIPE {
            recent.pop_front();
        }
        recent.push_back((epoch, message.clone()));
    }

    /// The messages on `filter` routed at or after read epoch `since`, oldest first.
    fn since(&self, since: u64, filter: &str) -> Vec<Arc<Message>> {
        let mut found: Vec<(u64, Arc<Message>)> = Vec::new();
        for stripe in &self.stripes {
            found.extend(
                stripe
                    .lock()
                    .iter()
                    .filter(|(epoch, m)| *epoch >= since && topic::matches(&m.topic, filter))
                    .cloned(),
            );
        }
        found.sort_by_key(|(epoch, _)| *epoch);
        found.dedup_by(|a, b| a.1.id == b.1.id);
        found.into_iter().map(|(_, m)| m).collect()
    }
}

/// What happened to a routed message, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    pub queued: usize,
    /// QoS 0 copies dropped because a queue was full.
    pub dropped: usize,
    /// QoS 1/2 copies left to the store because a queue was full.
    pub deferred: usize,
}

#[derive(Default)]
/// Small maps throughout: most nodes have one child or one subscriber (BENCHMARKS.md, "Idle
/// devices subscribed to their own topic").
struct Node {
    children: SmallMap<Box<str>, Node>,
    /// Sessions whose filter ends here, with what it grants.
    here: SmallMap<Arc<str>, Grant>,
    /// Sessions with a `#` at this level: boxed, and only while there are some (few nodes
    /// have any, and every node would carry an empty map's 24 bytes).
    #[allow(clippy::box_collection)]
    multi: Option<Box<SmallMap<Arc<str>, Grant>>>,
}

impl Node {
    /// Calls `f` with each subscription under this node: (client, filter, grant).
    /// `f` gets the client, the filter's levels down to this node, whether the filter ends in
    /// `#` here, and the grant; [`filter_of`] makes the filter of the last two.
    fn walk<'a>(
        &'a self,
        path: &mut Vec<&'a str>,
        f: &mut impl FnMut(&'a Arc<str>, &[&'a str], bool, Grant),
    ) {
        for (client, grant) in &self.here {
            f(client, path, false, *grant);
        }
        for (client, grant) in self.multi.iter().flat_map(|m| m.iter()) {
            f(client, path, true, *grant);
        }
        for (level, child) in &self.children {
            path.push(level);
            child.walk(path, f);
            path.pop();
        }
    }

    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.here.is_empty() && self.multi.is_none()
    }

    /// Adds or changes `client`'s subscription; whether the filter had no subscription
    /// before (a new route of this edge).
    fn insert(&mut self, levels: &[&str], client: Arc<str>, grant: Grant) -> bool {
        match levels {
            [] => {
                let first = self.here.is_empty();
                self.here.insert(client, grant);
                first
            }
            ["#"] => {
                let first = self.multi.is_none();
                self.multi.get_or_insert_default().insert(client, grant);
                first
            }
            [first, rest @ ..] => self
                .children
                .get_or_insert_with(first, || (*first).into(), Node::default)
                .insert(rest, client, grant),
        }
    }

    /// Removes `client`'s subscription: (whether it had one, whether it was the filter's
    /// last).
    fn remove(&mut self, levels: &[&str], client: &str) -> (bool, bool) {
        match levels {
            [] => {
                let removed = self.here.remove(client).is_some();
                (removed, removed && self.here.is_empty())
            }
            ["#"] => {
                let removed = self
                    .multi
                    .as_mut()
                    .is_some_and(|m| m.remove(client).is_some());
                if self.multi.as_ref().is_some_and(|m| m.is_empty()) {
                    self.multi = None;
                }
                (removed, removed && self.multi.is_none())
            }
            [first, rest @ ..] => match self.children.get_mut(first) {
                Some(child) => {
                    let removed = child.remove(rest, client);
                    if child.is_empty() {
                        self.children.remove(first);
                    }
                    removed
                }
                None => (false, false),
            },
        }
    }

    /// Every filter with a subscription under this node.
    fn filters<'a>(&'a self, path: &mut Vec<&'a str>, out: &mut Vec<String>) {
        if !self.here.is_empty() {
            out.push(path.join("/"));
        }
        if self.multi.is_some() {
            path.push("#");
            out.push(path.join("/"));
            path.pop();
        }
        for (level, child) in &self.children {
            path.push(level);
            child.filters(path, out);
            path.pop();
        }
    }

    fn collect<'a>(
        &'a self,
        levels: &[&str],
        first_level: bool,
        out: &mut Vec<(&'a Arc<str>, Grant)>,
    ) {
        // A topic starting with '$' is not matched by a leading wildcard (MQTT 4.7.2).
        let dollar = first_level && levels.first().is_some_and(|l| l.starts_with('$'));
        if !dollar {
            if let Some(multi) = &self.multi {
                out.extend(multi.iter().map(|(c, q)| (c, *q)));
            }
        }
        match levels {
            [] => out.extend(self.here.iter().map(|(c, q)| (c, *q))),
            [first, rest @ ..] => {
                if let Some(child) = self.children.get(first) {
                    child.collect(rest, false, out);
                }
                if !dollar {
                    if let Some(child) = self.children.get("+") {
                        child.collect(rest, false, out);
                    }
                }
            }
        }
    }
}

/// The filter whose levels are `levels`, followed by `#` if `multi`.
fn filter_of(levels: &[&str], multi: bool) -> String {
    match (levels.is_empty(), multi) {
        (true, true) => "#".to_owned(),
        (false, true) => format!("{}/#", levels.join("/")),
        (_, false) => levels.join("/"),
    }
}

/// Most topic levels split on the stack when routing; deeper topics use a `Vec`.
const STACK_LEVELS: usize = 16;

#[derive(Default)]
struct Inner {
    root: Node,
    /// Since last taken: filters that got their first subscription here (`true`) or lost
    /// their last (a shared group's filter counts once per group): this edge's routes, which
    /// other hosts address their messages by. The trie itself is the count.
    route_log: Vec<(Box<str>, bool)>,
    sessions: HashMap<Arc<str>, Arc<SessionTx>>,
    /// Shared subscription groups, by key (`$share/{name}/{filter}`).
    groups: HashMap<Arc<str>, Group>,
    /// Hosts share the store: a group is delivered here only while this edge owns it.
    shared_store: bool,
}

impl Inner {
    fn route_added(&mut self, filter: &str) {
        self.route_log.push((filter.into(), true));
    }

    fn route_removed(&mut self, filter: &str) {
        self.route_log.push((filter.into(), false));
    }

    fn insert(&mut self, filter: &str, client: Arc<str>, grant: Grant) {
        let levels: Vec<&str> = filter.split('/').collect();
        if self.root.insert(&levels, client, grant) {
            self.route_added(filter);
        }
    }

    fn remove(&mut self, filter: &str, client: &str) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let (removed, last) = self.root.remove(&levels, client);
        if last {
            self.route_removed(filter);
        }
        removed
    }

    /// Whether one of `client`'s subscriptions (not a shared one) takes `message`.
    fn takes(&self, client: &str, message: &Message) -> bool {
        let levels: Vec<&str> = message.topic.split('/').collect();
        let mut matched = Vec::new();
        self.root.collect(&levels, true, &mut matched);
        matched
            .iter()
            .any(|(c, grant)| &***c == client && grant.takes(client, message))
    }

    /// Gives `message` to one member of `group`; false when none could take it.
    fn give(&self, key: &Arc<str>, group: &Group, message: &Arc<Message>) -> bool {
        let n = group.members.len();
        let start = group.next.fetch_add(1, Ordering::Relaxed);
        for k in 0..n {
            let (client, grant) = &group.members[(start + k) % n];
            let Some(session) = self.sessions.get(client) else {
                continue;
            };
            let Some(mut delivery) = combine(message, std::iter::once(*grant)) else {
                continue;
            };
            delivery.group = Some(key.clone());
            let qos = delivery.qos;
            if qos != Qos::AtMostOnce {
                group.outstanding().insert(message.id);
            }
            match session.offer(delivery) {
                Ok(()) => return true,
                Err(_) if qos != Qos::AtMostOnce => {
                    group.outstanding().remove(&message.id);
                }
                Err(_) => {}
            }
        }
        false
    }
}

/// Subscriptions and queues of the sessions connected to this edge.
#[derive(Default)]
pub struct Router {
    inner: RwLock<Inner>,
    recent: Recent,
}

impl Router {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        // A panic while holding the lock leaves the trie consistent (every mutation is a single
        // map operation), so a poisoned lock is still usable.
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Calls `f` with every connected session's queue (under the read lock: keep it short).
    pub fn for_each_session(&self, mut f: impl FnMut(&SessionTx)) {
        for session in self.read().sessions.values() {
            f(session);
        }
    }

    /// The connected sessions' queues (for the admin API: a copy, the lock is let go).
    pub fn sessions(&self) -> Vec<(Arc<str>, Arc<SessionTx>)> {
        let inner = self.read();
        inner
            .sessions
            .iter()
            .map(|(client, tx)| (client.clone(), tx.clone()))
            .collect()
    }

    /// How many sessions are connected.
    pub fn session_count(&self) -> usize {
        self.read().sessions.len()
    }

    /// The connected session of `client`.
    pub fn session(&self, client: &str) -> Option<Arc<SessionTx>> {
        self.read().sessions.get(client).cloned()
    }

    /// Every subscription (shared ones as `$share/{name}/{filter}`), or those of `client`:
    /// (client, filter, grant). Walks the whole trie: for the admin API, not for routing.
    pub fn subscriptions(&self, client: Option<&str>) -> Vec<(Arc<str>, String, Grant)> {
        let inner = self.read();
        let mut found = Vec::new();
        let wanted = |c: &Arc<str>| client.is_none_or(|w| &**c == w);
        inner
            .root
            .walk(&mut Vec::new(), &mut |c, levels, multi, grant| {
                if wanted(c) {
                    found.push((c.clone(), filter_of(levels, multi), grant));
                }
            });
        for (key, group) in &inner.groups {
            for (c, grant) in group.members.iter().filter(|(c, _)| wanted(c)) {
                found.push((c.clone(), key.to_string(), *grant));
            }
        }
        found
    }

    /// How many subscriptions each connected client has (shared ones included), without
    /// making their filters.
    pub fn subscription_counts(&self) -> HashMap<Arc<str>, usize> {
        let inner = self.read();
        let mut counts = HashMap::<Arc<str>, usize>::new();
        inner.root.walk(&mut Vec::new(), &mut |c, _, _, _| {
            *counts.entry(c.clone()).or_default() += 1;
        });
        for group in inner.groups.values() {
            for (c, _) in &group.members {
                *counts.entry(c.clone()).or_default() += 1;
            }
        }
        counts
    }

    /// Connects a session's queue; replaces an older connection of the same client.
    pub fn attach(&self, client: Arc<str>, tx: Arc<SessionTx>) {
        self.write().sessions.insert(client, tx);
    }

    /// Disconnects the session's queue and its subscriptions, unless another connection took
    /// the client id over meanwhile.
    pub fn detach(&self, client: &str, connection_id: u64, filters: &[String]) {
        let mut inner = self.write();
        let current = inner.sessions.get(client).map(|s| s.connection_id);
        if current != Some(connection_id) {
            return;
        }
        inner.sessions.remove(client);
        for filter in filters {
            if topic::shared(filter).is_some() {
                Self::leave(&mut inner, filter, client);
                continue;
            }
            inner.remove(filter, client);
        }
    }

    fn leave(inner: &mut Inner, key: &str, client: &str) -> bool {
        let Some(group) = inner.groups.get_mut(key) else {
            return false;
        };
        let before = group.members.len();
        group.members.retain(|(c, _)| &**c != client);
        let left = group.members.len() < before;
        if group.members.is_empty() {
            if let Some(group) = inner.groups.remove(key) {
                inner.route_removed(&group.filter);
            }
        }
        left
    }

    /// The routes that changed since last asked, netted per filter: (added, removed), a
    /// filter once per route it made or unmade (a plain subscription and a shared group may
    /// make the same one); `None` if none changed.
    pub fn take_route_changes(&self) -> Option<(Vec<String>, Vec<String>)> {
        if self.read().route_log.is_empty() {
            return None;
        }
        let log = std::mem::take(&mut self.write().route_log);
        let mut net: HashMap<Box<str>, i32> = HashMap::new();
        for (filter, added) in log {
            *net.entry(filter).or_default() += if added { 1 } else { -1 };
        }
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        for (filter, n) in net {
            let list = if n > 0 { &mut added } else { &mut removed };
            for _ in 0..n.unsigned_abs() {
                list.push(filter.to_string());
            }
        }
        (!added.is_empty() || !removed.is_empty()).then_some((added, removed))
    }

    /// Every route (once per plain filter and once per shared group), with the changes
    /// taken: for a worker that hears of this edge anew.
    pub fn all_routes(&self) -> Vec<String> {
        let mut inner = self.write();
        inner.route_log.clear();
        let mut out = Vec::new();
        inner.root.filters(&mut Vec::new(), &mut out);
        out.extend(inner.groups.values().map(|g| g.filter.clone()));
        out
    }

    /// Subscribes a session; a `$share/{name}/{filter}` filter makes it a member of that
    /// group (joining a group new on this edge marks its stored backlog to be fetched).
    pub fn subscribe(&self, client: &Arc<str>, filter: &str, grant: Grant) {
        if let Some((_, inner_filter)) = topic::shared(filter) {
            let mut inner = self.write();
            let shared_store = inner.shared_store;
            if !inner.groups.contains_key(filter) {
                inner.route_added(inner_filter);
            }
            let group = inner.groups.entry(filter.into()).or_insert_with(|| Group {
                filter: inner_filter.to_owned(),
                members: Vec::new(),
                next: AtomicUsize::new(0),
                lagging_since: AtomicI64::new(NOT_LAGGING),
                fresh: AtomicBool::new(true),
                outstanding: Mutex::default(),
                fetching: AtomicUsize::new(0),
                done_while_fetching: Mutex::default(),
                owned_until: AtomicU64::new(if shared_store { 0 } else { u64::MAX }),
                asked: AtomicBool::new(false),
                settle_at_ms: AtomicU64::new(UNSETTLED),
            });
            match group.members.iter_mut().find(|(c, _)| c == client) {
                Some(member) => member.1 = grant,
                None => group.members.push((client.clone(), grant)),
            }
            return;
        }
        self.write().insert(filter, client.clone(), grant);
    }

    /// Subscribes as [`Router::subscribe`] does, for a SUBSCRIBE that reached the socket
    /// after read epoch `since` ([`SessionTx::read_epoch`]), and gives the session the
    /// messages on `filter` routed since then that none of its subscriptions took: their
    /// PUBLISH reached another connection's socket after this SUBSCRIBE did, but that task ran
    /// first (two threads; tokio runs the task woken last first). Mosquitto, one thread,
    /// handles sockets in the order they turned readable; this keeps that order for what
    /// [`Recent`] holds. Shared subscriptions are not given such messages.
    pub fn subscribe_after(
        &self,
        client: &Arc<str>,
        filter: &str,
        grant: Grant,
        since: u64,
    ) -> Offer {
        if topic::shared(filter).is_some() {
            self.subscribe(client, filter, grant);
            return Offer::default();
        }
        // Under the write lock: no message is being routed, so each one either is in `recent`
        // or will see the new subscription.
        let mut inner = self.write();
        let missed: Vec<Arc<Message>> = self
            .recent
            .since(since, filter)
            .into_iter()
            .filter(|m| grant.takes(client, m) && !inner.takes(client, m))
            .collect();
        inner.insert(filter, client.clone(), grant);
        let mut offer = Offer::default();
        if let Some(session) = inner.sessions.get(client) {
            for message in &missed {
                if let Some(delivery) = combine(message, std::iter::once(grant)) {
                    session.deliver(delivery, &mut offer);
                }
            }
        }
        offer
    }

    pub fn unsubscribe(&self, client: &str, filter: &str) -> bool {
        if topic::shared(filter).is_some() {
            return Self::leave(&mut self.write(), filter, client);
        }
        self.write().remove(filter, client)
    }

    /// A group delivery a member gave back (its session ended, or its connection did, before
    /// the acknowledgement): the group fetches it again from the store for another member.
    pub fn group_returned(&self, delivery: &Delivery) {
        let Some(key) = &delivery.group else {
            return;
        };
        if delivery.qos == Qos::AtMostOnce {
            return;
        }
        let inner = self.read();
        if let Some(group) = inner.groups.get(key) {
            group.outstanding().remove(&delivery.message.id);
            group.lag(delivery.message.created_ms);
        }
    }

    /// Group deliveries acknowledged, whose records are on their way to the store.
    pub fn group_done(&self, key: &str, ids: impl Iterator<Item = MessageId>) {
        let inner = self.read();
        if let Some(group) = inner.groups.get(key) {
            let mut outstanding = group.outstanding();
            // Also before a fetch marked (a group this edge has just come to own) has begun:
            // its store read may come before these records.
            let fetch_due =
                group.fetching.load(Ordering::Acquire) > 0 || group.fresh.load(Ordering::Acquire);
            let mut done = fetch_due.then(|| group.done());
            for id in ids {
                outstanding.remove(&id);
                if let Some(done) = done.as_mut() {
                    done.insert(id);
                }
            }
        }
    }

    /// A fetch that [`Router::group_fetches`] handed out has ended.
    pub fn group_fetch_ended(&self, key: &str) {
        if let Some(group) = self.read().groups.get(key) {
            // (Saturating: the group may have been made anew while the fetch ran.)
            let before = group
                .fetching
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    Some(n.saturating_sub(1))
                })
                .unwrap_or(0);
            if before <= 1 {
                group.done().clear();
            }
        }
    }

    /// The groups whose stored messages are to be fetched, and from when (`None`: all it
    /// holds, for a group new on this edge or settling); the markers are taken.
    pub fn group_fetches(&self) -> Vec<(Arc<str>, Option<i64>)> {
        self.group_fetches_at(crate::ids::monotonic_ms())
    }

    /// [`Router::group_fetches`] at `now_ms` ([`crate::ids::monotonic_ms`]).
    fn group_fetches_at(&self, now_ms: u64) -> Vec<(Arc<str>, Option<i64>)> {
        let inner = self.read();
        let mut due = Vec::new();
        for (key, group) in &inner.groups {
            if !group.owned() {
                // Its owner fetches; the markers wait for this edge's turn.
                continue;
            }
            let settle_at = group.settle_at_ms.load(Ordering::Acquire);
            let settling = inner.shared_store
                && !matches!(settle_at, UNSETTLED | SETTLED)
                && settle_at <= now_ms;
            let since = if group.fresh.swap(false, Ordering::AcqRel) | settling {
                if inner.shared_store {
                    if settle_at == UNSETTLED {
                        group
                            .settle_at_ms
                            .store(now_ms + SETTLE_MS, Ordering::Release);
                    } else if settling {
                        group.settle_at_ms.store(SETTLED, Ordering::Release);
                    }
                }
                group.lagging_since.store(NOT_LAGGING, Ordering::Release);
                None
            } else {
                match group.lagging_since.swap(NOT_LAGGING, Ordering::AcqRel) {
                    NOT_LAGGING => continue,
                    since => Some(since),
                }
            };
            group.fetching.fetch_add(1, Ordering::AcqRel);
            due.push((key.clone(), since));
        }
        due
    }

    /// Messages of a group fetched from the store, oldest first: each goes to a member unless
    /// one has it already. Stops at the first that no member can take and returns its creation
    /// time (the group fetches again from there); `None` when all were given out or the group
    /// is gone from this edge.
    pub fn give_fetched(&self, key: &Arc<str>, messages: Vec<Message>) -> Option<i64> {
        let inner = self.read();
        let group = inner.groups.get(key).filter(|g| g.owned())?;
        for message in messages {
            if group.outstanding().contains(&message.id) || group.done().contains(&message.id) {
                continue;
            }
            let created_ms = message.created_ms;
            if !inner.give(key, group, &Arc::new(message)) {
                group.lag(created_ms);
                return Some(created_ms);
            }
        }
        None
    }

    /// Hosts share the store (the worker sends leases): from now on a group is delivered here
    /// only while the store says this edge owns it ([`Router::own_groups`]).
    pub fn set_shared_store(&self) {
        if self.read().shared_store {
            return;
        }
        let mut inner = self.write();
        inner.shared_store = true;
        for group in inner.groups.values() {
            group.owned_until.store(0, Ordering::Release);
        }
    }

    /// The keys of the groups with members on this edge.
    pub fn group_keys(&self) -> Vec<String> {
        self.read().groups.keys().map(|k| k.to_string()).collect()
    }

    /// The keys of the groups this edge delivers now (owns, where hosts share the store).
    pub fn owned_groups(&self) -> Vec<String> {
        self.read()
            .groups
            .iter()
            .filter(|(_, g)| g.owned())
            .map(|(k, _)| k.to_string())
            .collect()
    }

    /// Whether a group new on this edge waits to hear whether it is this edge's.
    pub fn groups_unasked(&self) -> bool {
        let inner = self.read();
        inner.shared_store
            && inner
                .groups
                .values()
                .any(|g| !g.asked.load(Ordering::Acquire))
    }

    /// The store's answer to who owns the groups `asked` about: `owned` are this edge's until
    /// `until_ms` (`crate::ids::monotonic_ms`), the others are not. A group this edge takes over
    /// fetches everything its session is owed: what the previous owner had not had
    /// acknowledged.
    pub fn own_groups(&self, asked: &[String], owned: &HashSet<String>, until_ms: u64) {
        let inner = self.read();
        for key in asked {
            let Some(group) = inner.groups.get(key.as_str()) else {
                continue;
            };
            group.asked.store(true, Ordering::Release);
            if owned.contains(key) {
                if !group.owned() {
                    group.fresh.store(true, Ordering::Release);
                }
                group.owned_until.store(until_ms, Ordering::Release);
            } else {
                group.owned_until.store(0, Ordering::Release);
            }
        }
    }

    /// Marks a group to be fetched again from `since` (a fetch failed).
    pub fn group_lag(&self, key: &str, since: i64) {
        if let Some(group) = self.read().groups.get(key) {
            group.lag(since);
        }
    }

    /// Offers `message` to every connected session subscribed to its topic.
    pub fn route(&self, message: &Arc<Message>) -> Offer {
        let mut on_stack = [""; STACK_LEVELS];
        let on_heap: Vec<&str>;
        let mut split = message.topic.split('/');
        let mut n = 0;
        for (slot, level) in on_stack.iter_mut().zip(split.by_ref()) {
            *slot = level;
            n += 1;
        }
        let levels: &[&str] = if split.next().is_none() {
            &on_stack[..n]
        } else {
            // Deeper than the stack holds (rare): split again into a Vec.
            on_heap = message.topic.split('/').collect();
            &on_heap
        };
        let inner = self.read();
        // Under the read lock (see `subscribe_after`).
        self.recent.record(message);
        let mut matched = Vec::new();
        inner.root.collect(levels, true, &mut matched);
        matched.retain(|(client, grant)| grant.takes(client, message));
        if matched.len() > 1 {
            matched.sort_unstable_by(|a, b| a.0.cmp(b.0));
        }
        let mut offer = Offer::default();
        let mut rest = &matched[..];
        while let Some(((client, _), after)) = rest.split_first() {
            // A session's overlapping subscriptions are adjacent: one delivery for all.
            let same = after.iter().take_while(|(c, _)| c == client).count();
            let grants = &rest[..=same];
            rest = &after[same..];
            let Some(session) = inner.sessions.get(*client) else {
                continue;
            };
            let Some(delivery) = combine(message, grants.iter().map(|(_, g)| *g)) else {
                continue;
            };
            session.deliver(delivery, &mut offer);
        }
        for (key, group) in &inner.groups {
            // A group another edge owns gets the message there, live or from the store.
            if !topic::matches(&message.topic, &group.filter) || !group.owned() {
                continue;
            }
            if inner.give(key, group, message) {
                offer.queued += 1;
            } else if message.qos == Qos::AtMostOnce {
                offer.dropped += 1;
            } else {
                // Fetched from the store once a member has room.
                group.lag(message.created_ms);
                offer.deferred += 1;
            }
        }
        offer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wharf_shared::MessageId;

    fn message(topic: &str, qos: Qos) -> Arc<Message> {
        Arc::new(Message {
            id: MessageId([0; 12]),
            topic: topic.into(),
            payload: vec![],
            qos,
            retain: false,
            client_id: "p".into(),
            host: "h".into(),
            created_ms: 1,
            properties: None,
        })
    }

    #[test]
    fn routes_change_with_a_filters_first_and_last_subscription() {
        let router = Router::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let g = Grant::qos(Qos::AtLeastOnce);
        router.subscribe(&a, "t/#", g);
        router.subscribe(&b, "t/#", g);
        router.subscribe(&a, "t/#", g);
        assert_eq!(
            router.take_route_changes(),
            Some((vec!["t/#".into()], vec![]))
        );
        assert_eq!(router.take_route_changes(), None);
        router.subscribe(&a, "$share/g/t/#", g);
        router.unsubscribe("a", "t/#");
        assert_eq!(
            router.take_route_changes(),
            Some((vec!["t/#".into()], vec![])),
            "a shared group makes the route once more; a's leaving is not the filter's last"
        );
        let mut all = router.all_routes();
        all.sort();
        assert_eq!(all, ["t/#", "t/#"]);
        router.unsubscribe("b", "t/#");
        router.unsubscribe("a", "$share/g/t/#");
        assert_eq!(
            router.take_route_changes(),
            Some((vec![], vec!["t/#".into(), "t/#".into()]))
        );
        router.subscribe(&a, "u", g);
        router.unsubscribe("a", "u");
        assert_eq!(router.take_route_changes(), None, "netted");
    }

    /// The deepest filter and topic `--max-topic-levels` allows are matched, listed and
    /// removed (the tree is recursive) within half of a runtime worker's 2 MiB stack (4,096
    /// levels overflowed 2 MiB in a debug build: hence the ceiling of 1,024).
    #[test]
    fn the_deepest_topics_allowed_fit_a_worker_threads_stack() {
        let deep = std::thread::Builder::new()
            .stack_size(1024 * 1024)
            .spawn(|| {
                let levels = wharf_shared::topic::MAX_LEVELS_CEILING;
                let topic = vec!["l"; levels].join("/");
                let filter = format!("{}/#", vec!["l"; levels - 1].join("/"));
                let router = Router::default();
                let (a, rx) = session(&router, "a", 8);
                router.subscribe(&a, &topic, Grant::qos(Qos::AtLeastOnce));
                router.subscribe(&a, &filter, Grant::qos(Qos::AtLeastOnce));
                assert_eq!(router.route(&message(&topic, Qos::AtLeastOnce)).queued, 1);
                assert!(rx.try_pop().is_some());
                assert_eq!(router.subscriptions(Some("a")).len(), 2);
                router.unsubscribe(&a, &topic);
                drop(router);
            })
            .expect("thread");
        deep.join().expect("no stack overflow");
    }

    #[test]
    fn subscriptions_are_listed_as_they_were_made() {
        let router = Router::default();
        let (a, _rx) = session(&router, "a", 1);
        let (b, _rx) = session(&router, "b", 1);
        for filter in ["#", "x/#", "x/+/y", "/lead", "trail/", "$share/g/x/#"] {
            router.subscribe(&a, filter, Grant::qos(Qos::AtLeastOnce));
        }
        router.subscribe(&b, "x/#", Grant::qos(Qos::AtMostOnce));
        let mut of_a: Vec<String> = router
            .subscriptions(Some("a"))
            .into_iter()
            .map(|(_, f, _)| f)
            .collect();
        of_a.sort();
        assert_eq!(
            of_a,
            ["#", "$share/g/x/#", "/lead", "trail/", "x/#", "x/+/y"]
        );
        assert_eq!(router.subscriptions(None).len(), 7);
        let counts = router.subscription_counts();
        assert_eq!((counts.get("a"), counts.get("b")), (Some(&6), Some(&1)));
    }

    fn session(router: &Router, name: &str, cap: usize) -> (Arc<str>, Arc<SessionTx>) {
        let rx = Arc::new(SessionTx::new(1, cap, None));
        let client: Arc<str> = name.into();
        router.attach(client.clone(), rx.clone());
        (client, rx)
    }

    fn message_from(topic: &str, client: &str, n: u8) -> Arc<Message> {
        let mut m = (*message(topic, Qos::AtMostOnce)).clone();
        m.id = MessageId([n; 12]);
        m.client_id = client.into();
        Arc::new(m)
    }

    #[test]
    fn a_subscription_gets_what_was_routed_since_its_socket_turned_readable() {
        let router = Router::default();
        let (b, rx) = session(&router, "b", 8);
        router.subscribe(&b, "t/1", Grant::qos(Qos::AtMostOnce));
        router.route(&message_from("t/2", "a", 1));
        // B's socket turns readable (its SUBSCRIBE arrives): what is routed from now on, but
        // before B's task reads it, is B's too.
        std::task::Wake::wake_by_ref(&rx);
        let since = rx.read_epoch();
        for (n, topic) in [(2, "t/2"), (3, "t/1"), (4, "u/2"), (5, "t/3")] {
            router.route(&message_from(topic, "a", n));
        }
        // B's own message under No Local, and one after the subscription, are not repeated.
        router.route(&message_from("t/3", "b", 6));
        assert_eq!(rx.try_pop().map(|d| d.message.id.0[0]), Some(3));
        let offer = router.subscribe_after(
            &b,
            "t/+",
            Grant {
                no_local: true,
                ..Grant::qos(Qos::AtMostOnce)
            },
            since,
        );
        assert_eq!(offer.queued, 2);
        router.route(&message_from("t/4", "a", 7));
        let got: Vec<u8> = std::iter::from_fn(|| rx.try_pop())
            .map(|d| d.message.id.0[0])
            .collect();
        // Not 1 (before B's socket turned readable), 3 (taken by t/1), 4 and 6.
        assert_eq!(got, [2, 5, 7]);
        // The socket's next wake starts a new epoch: nothing routed before it is given again.
        std::task::Wake::wake_by_ref(&rx);
        router.unsubscribe("b", "t/+");
        let offer = router.subscribe_after(&b, "t/+", Grant::qos(Qos::AtMostOnce), rx.read_epoch());
        assert_eq!(offer, Offer::default());
    }

    #[test]
    fn overlapping_subscriptions_deliver_once_at_the_highest_qos() {
        let router = Router::default();
        let (a, rx) = session(&router, "a", 8);
        router.subscribe(&a, "s/+", Grant::qos(Qos::AtMostOnce));
        router.subscribe(&a, "s/#", Grant::qos(Qos::ExactlyOnce));
        router.subscribe(&a, "s/t", Grant::qos(Qos::AtLeastOnce));
        assert_eq!(router.route(&message("s/t", Qos::ExactlyOnce)).queued, 1);
        assert_eq!(rx.try_pop().map(|d| d.qos), Some(Qos::ExactlyOnce));
        assert!(rx.try_pop().is_none());
        // Delivered QoS is the lower of publish and subscription.
        assert_eq!(router.route(&message("s/t", Qos::AtLeastOnce)).queued, 1);
        assert_eq!(rx.try_pop().map(|d| d.qos), Some(Qos::AtLeastOnce));
    }

    #[test]
    fn each_session_gets_one_copy_among_many() {
        let router = Router::default();
        let sessions: Vec<_> = (0..40)
            .map(|i| session(&router, &format!("s{i}"), 8))
            .collect();
        for (i, (client, _)) in sessions.iter().enumerate() {
            router.subscribe(client, "a/#", Grant::qos(Qos::AtMostOnce));
            router.subscribe(
                client,
                "a/+/c",
                Grant::qos(if i % 2 == 0 {
                    Qos::AtLeastOnce
                } else {
                    Qos::AtMostOnce
                }),
            );
        }
        assert_eq!(router.route(&message("a/b/c", Qos::ExactlyOnce)).queued, 40);
        for (i, (_, rx)) in sessions.iter().enumerate() {
            let want = if i % 2 == 0 {
                Qos::AtLeastOnce
            } else {
                Qos::AtMostOnce
            };
            assert_eq!(rx.try_pop().map(|d| d.qos), Some(want));
            assert!(rx.try_pop().is_none());
        }
        // Deeper than the levels split on the stack.
        let deep = vec!["x"; 40].join("/");
        router.subscribe(&sessions[0].0, "x/#", Grant::qos(Qos::AtMostOnce));
        router.subscribe(&sessions[0].0, &deep, Grant::qos(Qos::AtMostOnce));
        assert_eq!(router.route(&message(&deep, Qos::AtMostOnce)).queued, 1);
        // At the edge of the levels split on the stack.
        for levels in [STACK_LEVELS, STACK_LEVELS + 1] {
            let topic = vec!["x"; levels].join("/");
            let exact = router.route(&message(&topic, Qos::AtMostOnce));
            assert_eq!(exact.queued, 1, "{levels} levels");
        }
    }

    #[test]
    fn a_shared_group_gives_each_message_to_one_member_with_room() {
        let router = Router::default();
        let (a, rx_a) = session(&router, "a", 1);
        let (b, rx_b) = session(&router, "b", 8);
        router.subscribe(&a, "$share/g/s/#", Grant::qos(Qos::AtLeastOnce));
        router.subscribe(&b, "$share/g/s/#", Grant::qos(Qos::AtLeastOnce));
        assert_eq!(
            router.group_fetches().len(),
            1,
            "a new group fetches its backlog"
        );
        for _ in 0..4 {
            assert_eq!(router.route(&message("s/x", Qos::AtLeastOnce)).queued, 1);
        }
        // "a" took one (its queue holds one); "b" the rest, each once.
        let (from_a, from_b) = (
            std::iter::from_fn(|| rx_a.try_pop()).count(),
            std::iter::from_fn(|| rx_b.try_pop()).collect::<Vec<_>>(),
        );
        assert_eq!((from_a, from_b.len()), (1, 3));
        assert!(from_b
            .iter()
            .all(|d| d.group.as_deref() == Some("$share/g/s/#")));
        // Nobody with room: the group marks where to fetch from.
        router.unsubscribe("b", "$share/g/s/#");
        assert_eq!(router.route(&message("s/x", Qos::AtLeastOnce)).queued, 1);
        assert_eq!(router.route(&message("s/x", Qos::AtLeastOnce)).deferred, 1);
        assert_eq!(
            router.group_fetches(),
            vec![("$share/g/s/#".into(), Some(1))]
        );
        router.unsubscribe("a", "$share/g/s/#");
        assert!(router.read().groups.is_empty());
    }

    /// The duplicate a CI-like run found: a group's fetch reads the store before a member's
    /// acknowledgement is recorded, and its answer comes after the acknowledgement took the
    /// message off the given-out set: it must not be given out again.
    #[test]
    fn a_group_fetch_answered_after_an_acknowledgement_gives_nothing_twice() {
        let router = Router::default();
        let (a, rx) = session(&router, "a", 8);
        router.subscribe(&a, "$share/g/s/#", Grant::qos(Qos::AtLeastOnce));
        let key: Arc<str> = "$share/g/s/#".into();
        let m = message("s/x", Qos::AtLeastOnce);
        // The new group's fetch is under way; meanwhile m is routed live and acknowledged.
        assert_eq!(router.group_fetches(), vec![(key.clone(), None)]);
        assert_eq!(router.route(&m).queued, 1);
        assert!(rx.try_pop().is_some());
        router.group_done(&key, std::iter::once(m.id));
        // The fetch's answer holds m (read before its record).
        assert_eq!(router.give_fetched(&key, vec![(*m).clone()]), None);
        assert!(rx.try_pop().is_none(), "given out twice");
        router.group_fetch_ended(&key);
        // With no fetch under way nothing is remembered.
        assert!(router.read().groups[&key].done().is_empty());
    }

    /// Where hosts share the store, a group is fetched whole again `SETTLE_MS` after its first
    /// whole fetch, once: what that fetch could not have had (stored later, without this
    /// host's address) is given out, and nothing a member already holds.
    #[test]
    fn a_group_settles_with_a_second_whole_fetch_giving_nothing_twice() {
        let router = Router::default();
        router.set_shared_store();
        let (a, rx) = session(&router, "a", 8);
        router.subscribe(&a, "$share/g/s/#", Grant::qos(Qos::AtLeastOnce));
        let key: Arc<str> = "$share/g/s/#".into();
        assert!(router.group_fetches().is_empty(), "not owned yet");
        let owned = HashSet::from([key.to_string()]);
        router.own_groups(&[key.to_string()], &owned, u64::MAX);
        let t = crate::ids::monotonic_ms();
        assert_eq!(router.group_fetches_at(t), vec![(key.clone(), None)]);
        let held = message("s/x", Qos::AtLeastOnce);
        assert_eq!(router.give_fetched(&key, vec![(*held).clone()]), None);
        router.group_fetch_ended(&key);
        assert!(rx.try_pop().is_some());
        assert!(router.group_fetches_at(t + SETTLE_MS - 1).is_empty());
        assert_eq!(
            router.group_fetches_at(t + SETTLE_MS),
            vec![(key.clone(), None)]
        );
        let mut late = (*message("s/y", Qos::AtLeastOnce)).clone();
        late.id = MessageId([1; 12]);
        let fetched = vec![(*held).clone(), late.clone()];
        assert_eq!(router.give_fetched(&key, fetched), None);
        router.group_fetch_ended(&key);
        let given: Vec<_> = std::iter::from_fn(|| rx.try_pop()).collect();
        assert_eq!(given.len(), 1, "the unacknowledged one is not given twice");
        assert_eq!(given[0].message.id, late.id);
        assert!(
            router.group_fetches_at(t + 10 * SETTLE_MS).is_empty(),
            "settled once"
        );
    }

    #[test]
    fn dollar_topics_skip_leading_wildcards() {
        let router = Router::default();
        let (a, _rx) = session(&router, "a", 8);
        router.subscribe(&a, "#", Grant::qos(Qos::AtMostOnce));
        router.subscribe(&a, "+/x", Grant::qos(Qos::AtMostOnce));
        assert_eq!(router.route(&message("$SYS/x", Qos::AtMostOnce)).queued, 0);
        router.subscribe(&a, "$SYS/#", Grant::qos(Qos::AtMostOnce));
        assert_eq!(router.route(&message("$SYS/x", Qos::AtMostOnce)).queued, 1);
    }

    #[test]
    fn full_queue_drops_qos0_and_defers_qos1() {
        let router = Router::default();
        let (a, rx) = session(&router, "a", 1);
        router.subscribe(&a, "t", Grant::qos(Qos::ExactlyOnce));
        assert_eq!(router.route(&message("t", Qos::AtMostOnce)).queued, 1);
        assert_eq!(router.route(&message("t", Qos::AtMostOnce)).dropped, 1);
        assert_eq!(router.route(&message("t", Qos::AtLeastOnce)).deferred, 1);
        // Lagging: later QoS 1 waits in the store too, even with room in the queue.
        assert!(rx.try_pop().is_some());
        assert_eq!(router.route(&message("t", Qos::AtLeastOnce)).deferred, 1);
        let sessions = &router.read().sessions;
        assert_eq!(sessions.get("a").and_then(|s| s.take_lag()), Some(1));
    }

    #[test]
    fn the_lag_marker_is_the_oldest_message_left_out_not_the_first() {
        let router = Router::default();
        let (a, rx) = session(&router, "a", 1);
        router.subscribe(&a, "t", Grant::qos(Qos::AtLeastOnce));
        let at = |created_ms| {
            let mut m = (*message("t", Qos::AtLeastOnce)).clone();
            m.created_ms = created_ms;
            Arc::new(m)
        };
        assert_eq!(router.route(&at(100)).queued, 1);
        // Left out in the order they are routed, created in another order (a publisher's
        // batch waited for the link while another's went ahead).
        assert_eq!(router.route(&at(300)).deferred, 1);
        assert_eq!(router.route(&at(200)).deferred, 1);
        assert_eq!(router.route(&at(400)).deferred, 1);
        assert_eq!(rx.take_lag(), Some(200));
        assert_eq!(rx.take_lag(), None);
    }

    /// A router with session "a" subscribed to "t", and a task waiting on its queue.
    async fn waiting_on_t(
        capacity: usize,
        deliveries: bool,
    ) -> (Router, Arc<SessionTx>, tokio::task::JoinHandle<Event>) {
        let router = Router::default();
        let (a, rx) = session(&router, "a", capacity);
        router.subscribe(&a, "t", Grant::qos(Qos::AtMostOnce));
        let waiting = tokio::spawn({
            let rx = rx.clone();
            async move { rx.recv(deliveries).await }
        });
        tokio::task::yield_now().await;
        (router, rx, waiting)
    }

    #[tokio::test]
    async fn a_signal_wakes_a_session_that_takes_no_deliveries() {
        let (router, rx, waiting) = waiting_on_t(8, false).await;
        assert_eq!(router.route(&message("t", Qos::AtMostOnce)).queued, 1);
        tokio::task::yield_now().await;
        assert!(
            !waiting.is_finished(),
            "woken for a delivery it does not take"
        );
        router.for_each_session(|s| s.signal(Signals::SHUTDOWN));
        let event = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .expect("task");
        assert!(matches!(event, Event::Signals(s) if s.contains(Signals::SHUTDOWN)));
        // The delivery waited for it; the signal was taken once.
        assert!(matches!(rx.recv(true).await, Event::Delivery(_)));
        assert!(rx.try_pop().is_none());
    }

    #[test]
    fn a_session_is_overdue_only_after_its_silence_limit() {
        let limited = SessionTx::new(1, 1, Some(Duration::from_millis(1500)));
        limited.heard(1000);
        assert!(!limited.overdue(900), "a clock read before the last packet");
        assert!(!limited.overdue(2500));
        assert!(limited.overdue(2501));
        limited.heard(2400);
        assert!(!limited.overdue(2501));
        let unlimited = SessionTx::new(2, 1, None);
        unlimited.heard(0);
        assert!(!unlimited.overdue(u64::MAX));
    }

    #[tokio::test]
    async fn a_waiting_session_wakes_for_a_delivery_and_gives_memory_back() {
        let (router, rx, waiting) = waiting_on_t(1000, true).await;
        assert_eq!(router.route(&message("t", Qos::AtMostOnce)).queued, 1);
        let event = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .expect("task");
        assert!(matches!(event, Event::Delivery(d) if d.message.topic == "t"));
        // A burst grows the queue; draining it frees the buffer.
        for _ in 0..600 {
            router.route(&message("t", Qos::AtMostOnce));
        }
        while rx.try_pop().is_some() {}
        assert_eq!(rx.lock().capacity(), 0);
    }

    #[test]
    fn unsubscribe_and_detach_stop_delivery() {
        let router = Router::default();
        let (a, _rx) = session(&router, "a", 8);
        router.subscribe(&a, "x/#", Grant::qos(Qos::AtMostOnce));
        assert!(router.unsubscribe("a", "x/#"));
        assert!(!router.unsubscribe("a", "x/#"));
        assert_eq!(router.route(&message("x/y", Qos::AtMostOnce)).queued, 0);
        router.subscribe(&a, "x/#", Grant::qos(Qos::AtMostOnce));
        router.detach("a", 2, &["x/#".into()]);
        assert_eq!(router.route(&message("x/y", Qos::AtMostOnce)).queued, 1);
        router.detach("a", 1, &["x/#".into()]);
        assert_eq!(router.route(&message("x/y", Qos::AtMostOnce)).queued, 0);
        assert!(router.read().root.is_empty());
    }
}
