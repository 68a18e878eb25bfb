//! Everything a session sends: the write buffer, the inflight window, messages fetched from
//! the store (backlog), the dedupe window and the catch-up schedule.
//!
//! Live messages come from the router queue; stored ones from the worker (session resume,
//! catch-up, retained). Around every store fetch a dedupe window (`dedupe.rs`) is open so
//! that a message that comes both ways is sent once.

use super::dedupe::Dedupe;
use crate::auth::{acl::Access, SessionAuth};
use crate::broker::Broker;
use crate::ids;
use crate::protocol::encode::{self, PublishOut};
use crate::protocol::Version;
use crate::router::{combine, Delivery, Grant, SessionTx};
use crate::session::{PubRec, Resend, SessionState};
use crate::topic;
use bytes::BytesMut;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use tokio::time::Instant;
use wharf_shared::{Cursor, DeliveredRecord, Message, MessageId, Notice, Qos, Reply, Request};

/// Clock skew allowed between hosts when asking the store for "messages since".
const SKEW_MS: i64 = wharf_shared::LATE_MS;
/// How soon a settle that failed (the link or the store) is tried again.
const RETRY_SETTLE_MS: u64 = 1_000;
/// A catch-up asks for the next page once the messages still to send from the last one are
/// this few.
const PREFETCH_BELOW: usize = wharf_shared::MAX_MESSAGES_PER_REPLY / 2;
/// The PUBLISH that sends `d`: its message's properties, with the expiry left.
fn publish_out<'a>(
    d: &'a Delivery,
    pkid: u16,
    dup: bool,
    topic: &'a str,
    topic_alias: Option<u16>,
) -> PublishOut<'a> {
    let message_expiry = d.message.expires_ms().map(|at| {
        // What is left, rounded up; at least a second for a message already on its way.
        ((at - ids::now_ms()).max(1) as u64)
            .div_ceil(1000)
            .min(u32::MAX as u64) as u32
    });
    PublishOut {
        topic,
        payload: &d.message.payload,
        qos: d.qos,
        pkid,
        retain: d.retain,
        dup,
        properties: d.message.properties.as_deref(),
        message_expiry,
        topic_alias,
        subscription_ids: &d.subscription_ids,
    }
}

/// What the client said it can take (MQTT 5.0 CONNECT; 3.1/3.1.1 clients take anything).
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub version: Version,
    /// Receive Maximum: QoS 1/2 deliveries in flight at once.
    pub receive_maximum: u16,
    /// Maximum Packet Size: a larger PUBLISH is not sent to it.
    pub max_packet_size: Option<u32>,
    /// Topic Alias Maximum: aliases the server may use towards it.
    pub topic_alias_max: u16,
}

impl Peer {
    pub fn v3(version: Version) -> Peer {
        Peer {
            version,
            receive_maximum: u16::MAX,
            max_packet_size: None,
            topic_alias_max: 0,
        }
    }
}

/// Topic aliases this connection has given the client: the first `max` topics sent get one,
/// and go by it from then on (an alias is never reassigned: a fleet's subscriber sees few
/// topics, or many once each, and either way the first ones are as good a guess as any).
struct Aliases {
    max: u16,
    given: HashMap<Arc<str>, u16>,
}

impl Aliases {
    /// The topic to write and the alias to send with it.
    fn alias<'a>(&mut self, topic: &'a str) -> (&'a str, Option<u16>) {
        if let Some(&alias) = self.given.get(topic) {
            return ("", Some(alias));
        }
        let next = self.given.len() as u16 + 1;
        if next > self.max {
            return (topic, None);
        }
        self.given.insert(topic.into(), next);
        (topic, Some(next))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CatchUpKind {
    /// Everything undelivered since a time (resume gap, lag, more pages).
    Store,
    /// Other hosts' messages since `from_ms` that routing may have missed (a new
    /// subscription, a resumed session, a gap in this host's following: [`SessionTx::settle`]).
    Settle { from_ms: i64 },
}

/// What a session holds only while messages take another way than straight from the router
/// queue to the socket (store pages, a full inflight window, records and store requests not
/// yet sent). Boxed, made on first use and dropped once empty again (see
/// [`Outbound::settle`]): an idle session, which is most of a fleet's, keeps none of it.
#[derive(Default)]
struct Busy {
    backlog: VecDeque<Delivery>,
    stalled: Option<Delivery>,
    delivered: Vec<DeliveredRecord>,
    /// Records of deliveries made for shared subscription groups, by group.
    group_delivered: Vec<(Arc<str>, DeliveredRecord)>,
    /// Undelivered messages wait in the store after this position. While it is set, live
    /// messages wait (in `held`, then in the queue): the store's go first.
    store_after: Option<Cursor>,
    /// Live messages taken off the queue while the store has pages for this session (at most
    /// `max_queued`): each page that brings one of them again removes it here, and what is
    /// left joins the backlog when the store has given everything. Checked against every page
    /// while it waits, a message is never sent twice however long the catch-up lasts (a
    /// dedupe window of recent ids forgot those fetched at its start).
    held: Vec<Delivery>,
    catch_up: Option<(CatchUpKind, Instant)>,
    /// Store requests to send: tracking (the caller waits for the reply, then calls
    /// [`Outbound::tracked`]) or forgetting (nobody waits).
    requests: Vec<Request>,
}

/// What an idle session has of [`Busy`]: nothing.
static IDLE: Busy = Busy {
    backlog: VecDeque::new(),
    stalled: None,
    delivered: Vec::new(),
    group_delivered: Vec::new(),
    store_after: None,
    held: Vec::new(),
    catch_up: None,
    requests: Vec::new(),
};

impl Busy {
    fn is_idle(&self) -> bool {
        self.backlog.is_empty()
            && self.stalled.is_none()
            && self.delivered.is_empty()
            && self.group_delivered.is_empty()
            && self.store_after.is_none()
            && self.held.is_empty()
            && self.catch_up.is_none()
            && self.requests.is_empty()
    }
}

pub struct Outbound {
    broker: Arc<Broker>,
    pub state: SessionState,
    pub session_tx: Arc<SessionTx>,
    pub write_buf: BytesMut,
    /// `None` while the session is idle (see [`Busy`]).
    busy: Option<Box<Busy>>,
    dedupe: Dedupe,
    /// QoS 2 deliveries are recorded in the store at each step (persistent sessions), so
    /// that they survive a crash of this edge.
    durable_qos2: bool,
    /// The server's limit or the client's Receive Maximum, whichever is lower.
    max_inflight: u16,
    version: Version,
    /// The client's Maximum Packet Size (`u32::MAX` without one; MQTT's largest packet is
    /// smaller).
    pub max_packet_size: u32,
    /// Boxed, and only for 5.0 clients that take aliases.
    aliases: Option<Box<Aliases>>,
    /// Who the client is and the rules it last read: asked for every message written to it.
    pub auth: SessionAuth,
}

impl Outbound {
    pub fn new(
        broker: &Arc<Broker>,
        state: SessionState,
        session_tx: Arc<SessionTx>,
        write_buf: BytesMut,
        durable_qos2: bool,
        peer: Peer,
        auth: SessionAuth,
    ) -> Self {
        let limits = &broker.config.limits;
        Outbound {
            broker: broker.clone(),
            state,
            session_tx,
            write_buf,
            busy: None,
            dedupe: Dedupe::default(),
            durable_qos2,
            auth,
            max_inflight: limits.max_inflight.min(peer.receive_maximum),
            version: peer.version,
            max_packet_size: peer.max_packet_size.unwrap_or(u32::MAX),
            aliases: (peer.version.is_v5() && peer.topic_alias_max > 0).then(|| {
                Box::new(Aliases {
                    max: peer.topic_alias_max,
                    given: HashMap::new(),
                })
            }),
        }
    }

    /// The busy part, made if the session had none.
    fn busy(&mut self) -> &mut Busy {
        self.busy.get_or_insert_with(Box::default)
    }

    /// The busy part to read: [`IDLE`] when there is none.
    fn now(&self) -> &Busy {
        self.busy.as_deref().unwrap_or(&IDLE)
    }

    /// Store requests are waiting to be sent.
    pub fn has_requests(&self) -> bool {
        !self.now().requests.is_empty()
    }

    /// The store requests to send: tracking (the caller waits for the reply, then calls
    /// [`Outbound::tracked`]) or forgetting (nobody waits).
    pub fn take_requests(&mut self) -> Vec<Request> {
        self.busy
            .as_mut()
            .map(|b| std::mem::take(&mut b.requests))
            .unwrap_or_default()
    }

    /// After CONNACK: re-send what was inflight, ask the store again for the QoS 2 steps it
    /// had not answered, then queue what the store kept.
    pub fn resume(&mut self, undelivered: Vec<Message>, next: Option<Cursor>, started_ms: i64) {
        let inflight: Vec<MessageId> = self.state.inflight_ids().collect();
        self.dedupe.open(inflight.into_iter());
        for resend in self.state.resend() {
            match resend {
                Resend::Publish { pkid, delivery } => self.encode(&delivery, pkid, true),
                Resend::PubRel(pkid) => encode::pubrel(&mut self.write_buf, self.version, pkid, 0),
            }
        }
        for (pkid, delivery, released) in self.state.untracked() {
            let track = self.track(pkid, &delivery.message, released);
            self.busy().requests.push(track);
        }
        self.stored(undelivered);
        // Another host may have stored messages for this session's filters without this
        // host's address until it read the routes this connection made.
        self.settle_from(started_ms);
        // Page on if the store has more; otherwise ask once more for what arrived while the
        // router registration was under way.
        let after = next.unwrap_or(Cursor::since(started_ms - SKEW_MS));
        let after = after.min(self.in_transit_start());
        self.busy().store_after = Some(after);
    }

    /// Queues messages from the store that this session has not seen in this window.
    fn stored(&mut self, messages: Vec<Message>) {
        for message in messages {
            if !self.dedupe.first_time(message.id) {
                continue;
            }
            if let Some(delivery) = self.state.delivery_of(&Arc::new(message)) {
                tracing::trace!(client_id = %self.state.client_id, id = %delivery.message.id, "queued from the store");
                self.busy().backlog.push_back(delivery);
            }
        }
    }

    /// Retained messages for new subscriptions, flagged as retained. They are sent even if
    /// seen before (a new subscription re-sends them), and remembered so that a catch-up
    /// that also finds them does not send them twice.
    /// `filters`: the new subscriptions that take retained messages (5.0 Retain Handling).
    pub fn retained(&mut self, messages: Vec<Message>, filters: &[(String, Grant)]) {
        if !messages.is_empty() {
            self.dedupe.open(messages.iter().map(|m| m.id));
        }
        for message in messages {
            let message = Arc::new(message);
            let grants = filters
                .iter()
                .filter(|(f, _)| topic::matches(&message.topic, f))
                .map(|(_, g)| *g);
            if let Some(mut delivery) = combine(&message, grants) {
                // Retained because of a new subscription: flagged so, whatever the options.
                delivery.retain = true;
                self.busy().backlog.push_back(delivery);
            }
        }
    }

    /// A store fetch is under way, or the store has more pages for this session: live
    /// messages wait behind them, so that older stored ones go first. (Taking from the queue
    /// between two pages let a publisher's newer live messages overtake its older stored
    /// ones.)
    fn fetching(&self) -> bool {
        let now = self.now();
        now.store_after.is_some() || matches!(now.catch_up, Some((CatchUpKind::Store, _)))
    }

    /// Whether the run loop should take the next message off the router queue.
    pub fn wants_queue(&self) -> bool {
        if self.fetching() {
            return self.now().held.len() < self.broker.config.limits.max_queued;
        }
        self.now().stalled.is_none()
            && self.now().backlog.is_empty()
            && self.write_buf.len() < self.broker.config.limits.write_high_water
    }

    pub fn accept_live(&mut self, delivery: Delivery) {
        if self.fetching() {
            self.hold(delivery);
            return;
        }
        if !self.dedupe.first_time(delivery.message.id) {
            return;
        }
        self.push(delivery);
    }

    /// Keeps a live message while the store has pages (see `held`). It is not remembered as
    /// seen: its stored copy, when a page brings it, is the one sent, in order.
    fn hold(&mut self, delivery: Delivery) {
        if !self.dedupe.seen(&delivery.message.id) {
            self.busy().held.push(delivery);
        }
    }

    /// Takes live messages off the queue into `held` while the store has pages and there is
    /// room, so that each is checked against the pages still to come.
    fn hold_queued(&mut self) {
        let room = self.broker.config.limits.max_queued;
        while self.now().held.len() < room {
            match self.session_tx.try_pop() {
                Some(d) => self.hold(d),
                None => break,
            }
        }
    }

    /// Sends `delivery` now, or parks it until the inflight window has room.
    fn push(&mut self, delivery: Delivery) {
        if !self.sendable(&delivery) {
            return;
        }
        if delivery.qos == Qos::AtMostOnce {
            self.encode(&delivery, 0, false);
            self.record(&delivery);
        } else if self.state.inflight_len() < self.max_inflight as usize {
            // A shared subscription's QoS 2 delivery is not tracked in the store for this
            // session: if the session ends unacknowledged it goes back to its group instead.
            if delivery.qos == Qos::ExactlyOnce && self.durable_qos2 && delivery.group.is_none() {
                let pkid = self.state.start_tracked(delivery.clone());
                let track = self.track(pkid, &delivery.message, false);
                self.busy().requests.push(track);
            } else {
                let pkid = self.state.start(delivery.clone());
                self.encode(&delivery, pkid, false);
            }
        } else {
            self.busy().stalled = Some(delivery);
        }
    }

    /// Moves messages into the write buffer while the window and the buffer allow.
    pub fn fill(&mut self) {
        self.dedupe.close_if_expired();
        let high_water = self.broker.config.limits.write_high_water;
        while self.write_buf.len() < high_water {
            let next = self.busy.as_mut().and_then(|b| match b.stalled.take() {
                Some(d) => Some(d),
                None => b.backlog.pop_front(),
            });
            let next = match next {
                Some(d) => d,
                None if self.fetching() => {
                    self.hold_queued();
                    break;
                }
                None => match self.session_tx.try_pop() {
                    Some(d) if !self.dedupe.first_time(d.message.id) => continue,
                    Some(d) => d,
                    None => {
                        if let Some(since) = self.session_tx.take_lag() {
                            self.lagged(Cursor::since(since).min(self.in_transit_start()));
                        }
                        break;
                    }
                },
            };
            self.push(next);
            if self.now().stalled.is_some() {
                break;
            }
        }
    }

    /// Gives back the busy part and the write buffer once nothing is in them: called before
    /// the session waits (under a stream `fill` has just written to the buffer, which is then
    /// kept).
    pub fn settle(&mut self) {
        if self.busy.as_ref().is_some_and(|b| b.is_idle()) {
            self.busy = None;
        }
        if self.write_buf.is_empty() && self.write_buf.capacity() > 0 {
            self.write_buf = BytesMut::new();
        }
    }

    /// Where a store fetch must start at the latest so that a message still in transit on this
    /// edge (made before, routed after this moment, to the live queue) is fetched from the
    /// store too, before the later messages of its publisher (see [`crate::transit`]).
    fn in_transit_start(&self) -> Cursor {
        self.broker
            .in_transit
            .oldest()
            .map_or(Cursor::since(i64::MAX), Cursor::since)
    }

    /// Messages after `since` were left to the store (or may be there).
    fn lagged(&mut self, since: Cursor) {
        let busy = self.busy();
        busy.store_after = Some(busy.store_after.map_or(since, |s| s.min(since)));
    }

    /// Whether a delivery may still go to this client: not once its message has expired
    /// (5.0 Message Expiry Interval), nor when it is larger than the client's Maximum Packet
    /// Size, which MQTT 5.0 (3.1.2.11.4) treats as if it had been sent: it is recorded as
    /// delivered, so that no catch-up brings it again.
    fn sendable(&mut self, d: &Delivery) -> bool {
        // Whatever way it came (live, stored, retained, a group's), a message the client may
        // not read now is not written: recorded as delivered, so that no catch-up brings it.
        let topic = d.message.topic.as_str();
        if !self.auth.allows(
            &self.broker.auth,
            &self.state.client_id,
            Access::Read,
            topic,
        ) {
            metrics::counter!("wharf_edge_denied_total", "action" => "deliver").increment(1);
            self.record(d);
            return false;
        }
        // The clock is read only for messages that can expire (most have no properties).
        if d.message.expires_ms().is_some_and(|at| ids::now_ms() >= at) {
            metrics::counter!("wharf_edge_expired_messages_total").increment(1);
            return false;
        }
        if self.max_packet_size != u32::MAX
            && encode::publish_len(
                self.version,
                &publish_out(d, 0, false, d.message.topic.as_str(), None),
            ) > self.max_packet_size as usize
        {
            metrics::counter!("wharf_edge_too_large_for_client_total").increment(1);
            self.record(d);
            return false;
        }
        true
    }

    fn encode(&mut self, d: &Delivery, pkid: u16, dup: bool) {
        let (topic, alias) = match self.aliases.as_mut() {
            Some(aliases) => aliases.alias(&d.message.topic),
            None => (d.message.topic.as_str(), None),
        };
        let out = publish_out(d, pkid, dup, topic, alias);
        encode::publish(&mut self.write_buf, self.version, &out);
        self.broker.metrics.sent(d.qos);
    }

    /// The `publishedMessage` record of a delivery: for this client, or for the shared
    /// subscription group it was given to this client for.
    fn record(&mut self, d: &Delivery) {
        let message = &d.message;
        if let Some(group) = &d.group {
            // QoS 0 too: a later fetch for the group must not give it out again.
            self.busy().group_delivered.push((
                group.clone(),
                DeliveredRecord {
                    message_id: message.id,
                    topic: message.topic.clone(),
                },
            ));
            return;
        }
        self.busy().delivered.push(DeliveredRecord {
            message_id: message.id,
            topic: message.topic.clone(),
        });
    }

    pub fn puback(&mut self, pkid: u16) {
        if let Some(d) = self.state.puback(pkid) {
            self.record(&d);
        }
    }

    pub fn pubrec(&mut self, pkid: u16) {
        match self.state.pubrec(pkid, self.durable_qos2) {
            PubRec::Deliver(d) => {
                self.record(&d);
                encode::pubrel(&mut self.write_buf, self.version, pkid, 0);
            }
            // The delivery record goes with the tracking write; PUBREL once it is durable.
            PubRec::Track(d) => {
                let track = self.track(pkid, &d.message, true);
                self.busy().requests.push(track);
            }
            PubRec::PubRel => encode::pubrel(&mut self.write_buf, self.version, pkid, 0),
            PubRec::Wait => {}
        }
    }

    /// A 5.0 PUBREC with a failure reason code.
    pub fn pubrec_refused(&mut self, pkid: u16) {
        if let Some(d) = self.state.pubrec_refused(pkid) {
            self.record(&d);
            self.forget_tracked(pkid);
        }
    }

    pub fn pubcomp(&mut self, pkid: u16) {
        if self.state.pubcomp(pkid) {
            self.forget_tracked(pkid);
        }
    }

    /// A QoS 2 delivery ended: the store forgets its tracking (persistent sessions).
    fn forget_tracked(&mut self, pkid: u16) {
        if self.durable_qos2 {
            let forget = Request::ForgetQos2Out {
                client_id: String::from(&*self.state.client_id),
                pkid,
            };
            self.busy().requests.push(forget);
        }
    }

    fn track(&self, pkid: u16, message: &Message, released: bool) -> Request {
        Request::TrackQos2Out {
            client_id: String::from(&*self.state.client_id),
            pkid,
            message_id: message.id,
            topic: message.topic.clone(),
            released,
        }
    }

    /// The store recorded a tracked step: write the PUBLISH or the PUBREL it was holding.
    pub fn tracked(&mut self, pkid: u16, released: bool) {
        if released {
            if self.state.release_tracked(pkid) {
                encode::pubrel(&mut self.write_buf, self.version, pkid, 0);
            }
        } else if let Some(d) = self.state.tracked(pkid) {
            self.encode(&d, pkid, false);
        }
    }

    /// The `publishedMessage` records gathered since the last call, and for a group's records
    /// the group and the ids, for [`crate::router::Router::group_done`] once the notice is on
    /// the link (before it, a group fetch could overtake the records and give them out again).
    #[allow(clippy::type_complexity)]
    pub fn take_delivered(&mut self) -> Option<(Notice, Option<(Arc<str>, Vec<MessageId>)>)> {
        let busy = self.busy.as_mut()?;
        if let Some((group, _)) = busy.group_delivered.first() {
            // One group's records at a time; the caller asks again.
            let group = group.clone();
            let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut busy.group_delivered)
                .into_iter()
                .partition(|(g, _)| *g == group);
            busy.group_delivered = rest;
            let records: Vec<DeliveredRecord> = mine.into_iter().map(|(_, r)| r).collect();
            let ids = records.iter().map(|r| r.message_id).collect();
            let notice = Notice::Delivered {
                client_id: group.to_string(),
                messages: records,
            };
            return Some((notice, Some((group, ids))));
        }
        if busy.delivered.is_empty() {
            return None;
        }
        let notice = Notice::Delivered {
            client_id: String::from(&*self.state.client_id),
            messages: std::mem::take(&mut busy.delivered),
        };
        Some((notice, None))
    }

    /// Arms a catch-up of other hosts' messages made since `since_ms` (less the allowance for
    /// late writes and clocks), due once a route written now has reached every host
    /// ([`wharf_shared::SETTLE_MS`]). Only where hosts share the store.
    pub fn settle_from(&mut self, since_ms: i64) {
        if self.broker.lease.enforced() {
            self.session_tx.settle(
                since_ms - SKEW_MS,
                ids::monotonic_ms() + wharf_shared::SETTLE_MS as u64,
            );
        }
    }

    /// The next catch-up to ask the store for, if one is due.
    pub fn next_catch_up(&mut self) -> Option<Request> {
        if self.state.subscriptions.is_empty()
            && self
                .busy
                .as_mut()
                .and_then(|b| b.store_after.take())
                .is_some()
        {
            // Nothing to fetch: nothing holds the live messages back either.
            self.merge_queue();
        }
        if self.now().catch_up.is_some() {
            return None;
        }
        if self.state.subscriptions.is_empty() {
            // Nothing to ask for: a settle armed meanwhile is dropped.
            self.session_tx.take_settle(ids::monotonic_ms());
            return None;
        }
        if let Some(after) = self.now().store_after {
            // The next page is asked for while the last half of this one is still being sent,
            // so that the store's answer time is hidden behind the client's (the cursor is
            // exact: the next page comes after this one whenever it is asked for).
            if self.now().backlog.len() <= PREFETCH_BELOW {
                self.open_window();
                self.busy().catch_up = Some((CatchUpKind::Store, Instant::now()));
                return Some(Request::CatchUp {
                    client_id: String::from(&*self.state.client_id),
                    after: Some(after),
                    other_hosts_only: false,
                });
            }
            return None;
        }
        // Other hosts' messages that routing may have missed: one query per new
        // subscription, resume or gap, not a query per session and interval.
        let settle = self.session_tx.take_settle(ids::monotonic_ms())?;
        self.open_window();
        self.busy().catch_up = Some((
            CatchUpKind::Settle {
                from_ms: settle.from_ms,
            },
            Instant::now(),
        ));
        Some(Request::CatchUp {
            client_id: String::from(&*self.state.client_id),
            after: Some(Cursor::since(settle.from_ms)),
            other_hosts_only: true,
        })
    }

    fn open_window(&mut self) {
        let mut ids: Vec<MessageId> = self.state.inflight_ids().collect();
        ids.extend(self.now().stalled.iter().map(|d| d.message.id));
        ids.extend(self.now().backlog.iter().map(|d| d.message.id));
        self.dedupe.open(ids.into_iter());
    }

    /// The catch-up could not be sent; it is tried again on a later trigger (a settle a
    /// second from now).
    pub fn catch_up_failed(&mut self) {
        if let Some((kind, _)) = self.busy.as_mut().and_then(|b| b.catch_up.take()) {
            self.settle_again(kind);
        }
    }

    fn settle_again(&self, kind: CatchUpKind) {
        if let CatchUpKind::Settle { from_ms } = kind {
            self.session_tx
                .settle(from_ms, ids::monotonic_ms() + RETRY_SETTLE_MS);
        }
    }

    pub fn caught_up(&mut self, reply: Result<Reply, crate::link::LinkError>) {
        let Some((kind, started)) = self.busy.as_mut().and_then(|b| b.catch_up.take()) else {
            return;
        };
        metrics::histogram!("wharf_edge_catch_up_seconds").record(started.elapsed().as_secs_f64());
        let (messages, next) = match reply {
            Ok(Reply::Messages { messages, next }) => (messages, next),
            other => {
                tracing::debug!(client_id = %self.state.client_id, reply = ?other, "catch-up failed");
                self.settle_again(kind);
                return;
            }
        };
        if !self.now().held.is_empty() && !messages.is_empty() {
            // A held live message that this page brings again is sent from the page.
            let fetched: HashSet<MessageId> = messages.iter().map(|m| m.id).collect();
            self.busy()
                .held
                .retain(|d| !fetched.contains(&d.message.id));
        }
        let before = self.now().backlog.len();
        self.stored(messages);
        metrics::counter!("wharf_edge_caught_up_messages_total")
            .increment((self.now().backlog.len() - before) as u64);
        match kind {
            // The worker's cursor always moves forward, so paging ends.
            CatchUpKind::Store => {
                self.busy().store_after = next;
                if next.is_none() {
                    self.merge_queue();
                }
            }
            CatchUpKind::Settle { .. } => {
                if let Some(next) = next {
                    self.lagged(next);
                }
            }
        }
    }

    /// The store has given everything it had: what waits in the live queue joins the
    /// messages fetched, in creation order. A message can reach this edge's queue after later
    /// ones of its publisher were fetched from the store (it was still on its way from another
    /// host when the store was asked); each publisher's messages are made in order, so sorting
    /// by creation puts it back before them, whichever way each came.
    fn merge_queue(&mut self) {
        let before = self.now().backlog.len();
        let held = self
            .busy
            .as_mut()
            .map(|b| std::mem::take(&mut b.held))
            .unwrap_or_default();
        for d in held {
            if self.dedupe.first_time(d.message.id) {
                self.busy().backlog.push_back(d);
            }
        }
        while let Some(d) = self.session_tx.try_pop() {
            if self.dedupe.first_time(d.message.id) {
                self.busy().backlog.push_back(d);
            }
        }
        if self.now().backlog.len() > before {
            self.busy()
                .backlog
                .make_contiguous()
                .sort_by_key(|d| (d.message.created_ms, d.message.id));
        }
    }

    /// The shared-subscription deliveries this session has not completed (unsent, or sent and
    /// not acknowledged before PUBREC): the connection ends, they go back to their groups.
    /// `with_inflight`: also those sent and not acknowledged (not when a takeover hands the
    /// session on: the new connection re-sends them).
    pub fn take_group_deliveries(&mut self, with_inflight: bool) -> Vec<Delivery> {
        let mut out = if with_inflight {
            self.state.take_group_unacked()
        } else {
            Vec::new()
        };
        let Some(busy) = self.busy.as_mut() else {
            return out;
        };
        let is_group = |d: &Delivery| d.group.is_some();
        out.extend(busy.stalled.take_if(|d| is_group(d)));
        out.extend(busy.backlog.iter().filter(|d| is_group(d)).cloned());
        busy.backlog.retain(|d| !is_group(d));
        out.extend(busy.held.iter().filter(|d| is_group(d)).cloned());
        busy.held.retain(|d| !is_group(d));
        out
    }

    pub fn into_state(self) -> SessionState {
        self.state
    }
}
