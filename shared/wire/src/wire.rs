//! The frames that cross the edge<->worker Unix socket.
//!
//! Every connection starts with a [`Hello`] each way. After that the edge sends
//! [`EdgeFrame::Request`]s (each with an id; the worker answers each with exactly one
//! [`WorkerFrame::Reply`] carrying the same id, in any order) and [`EdgeFrame::Notice`]s,
//! which have no reply. Changing any type here changes the wire: bump [`PROTOCOL_VERSION`].

use bincode::{Decode, Encode};
use std::fmt;

/// Version of the edge<->worker protocol; both sides refuse a peer with another one.
pub const PROTOCOL_VERSION: u32 = 17;

/// Most messages the worker puts in one reply; the edge asks again after its `next` cursor.
pub const MAX_MESSAGES_PER_REPLY: usize = 2000;

/// Most payload and topic bytes in one page of stored messages (at least one message is always
/// sent): a page of large messages stays well inside a frame, and inside the memory a lagging
/// session may hold.
pub const MAX_BYTES_PER_REPLY: usize = 4 << 20;

/// A message's identity: the 12 bytes of the MongoDB ObjectId that is its `_id`.
///
/// The edge assigns it when the PUBLISH arrives, so a persist request that is re-sent after a
/// reconnect is recognised by the worker instead of stored twice.
#[derive(Encode, Decode, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub [u8; 12]);

impl MessageId {
    /// Seconds since the Unix epoch encoded in the id (ObjectId layout).
    pub fn timestamp_secs(&self) -> u32 {
        u32::from_be_bytes([self.0[0], self.0[1], self.0[2], self.0[3]])
    }

    /// The 24-character lowercase hex form MongoDB shows.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The id from its 24-character hex form (either case); `None` for anything else.
    pub fn from_hex(hex: &str) -> Option<MessageId> {
        let bytes = hex.as_bytes();
        if bytes.len() != 24 || !bytes.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        let mut id = [0u8; 12];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let digits = std::str::from_utf8(pair).ok()?;
            id[i] = u8::from_str_radix(digits, 16).ok()?;
        }
        Some(MessageId(id))
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl MessageId {
    /// Below every id a broker makes (ids begin with their creation second).
    pub const MIN: MessageId = MessageId([0; 12]);
}

/// A position in the order in which catch-ups read stored messages: by creation time, then
/// by id. A catch-up returns the messages strictly after it, so paging neither skips a
/// millisecond that holds more than a page nor reads a message twice.
#[derive(Encode, Decode, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Cursor {
    pub created_ms: i64,
    pub id: MessageId,
}

impl Cursor {
    /// Just before every message created at or after `ms`.
    pub fn since(ms: i64) -> Cursor {
        Cursor {
            created_ms: ms,
            id: MessageId::MIN,
        }
    }

    /// The position of `message`: a catch-up from here continues after it.
    pub fn of(message: &Message) -> Cursor {
        Cursor {
            created_ms: message.created_ms,
            id: message.id,
        }
    }

    /// Where the next page starts when `page` was a full one of `limit` messages read in
    /// cursor order: after its last message. `None` when it was not full (nothing more).
    pub fn after_full_page(page: &[Message], limit: usize) -> Option<Cursor> {
        if page.len() < limit {
            return None;
        }
        page.last().map(Cursor::of)
    }

    /// Whether `message` comes after this position.
    pub fn precedes(&self, message: &Message) -> bool {
        (message.created_ms, message.id) > (self.created_ms, self.id)
    }
}

/// MQTT quality of service, independent of the packet version.
#[derive(Encode, Decode, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Qos {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl Qos {
    pub fn from_u8(value: u8) -> Option<Qos> {
        match value {
            0 => Some(Qos::AtMostOnce),
            1 => Some(Qos::AtLeastOnce),
            2 => Some(Qos::ExactlyOnce),
            _ => None,
        }
    }

    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

/// A message as received from a publisher (the seed's `mqtt.message` document).
#[derive(Encode, Decode, Clone, PartialEq, Eq, Debug)]
pub struct Message {
    pub id: MessageId,
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: Qos,
    pub retain: bool,
    /// The publisher's client id.
    pub client_id: String,
    /// The broker host that received it.
    pub host: String,
    /// Milliseconds since the Unix epoch when the edge received it.
    pub created_ms: i64,
    /// MQTT 5.0 properties the publisher gave (`None` for MQTT 3.1/3.1.1 messages and 5.0
    /// ones without any): forwarded to every subscriber as they came.
    pub properties: Option<Box<Properties>>,
}

impl Message {
    /// When the message expires (milliseconds since the Unix epoch), if its publisher set a
    /// Message Expiry Interval.
    pub fn expires_ms(&self) -> Option<i64> {
        let secs = self.properties.as_ref()?.message_expiry_secs?;
        Some(self.created_ms + i64::from(secs) * 1000)
    }

    /// Whether the message has expired at `now_ms`: it is then never delivered.
    pub fn expired(&self, now_ms: i64) -> bool {
        self.expires_ms().is_some_and(|at| now_ms >= at)
    }
}

/// The MQTT 5.0 properties of an application message (MQTT 5.0, 3.3.2.3), kept with it
/// through every path: live, stored, retained, will, other hosts. User properties keep their
/// order (MQTT-3.3.2-18).
#[derive(Encode, Decode, Clone, PartialEq, Eq, Debug, Default)]
pub struct Properties {
    /// 0: unspecified bytes; 1: UTF-8 (checked when the message arrives).
    pub payload_format_indicator: Option<u8>,
    /// The Message Expiry Interval as published; forwarded minus the time the message waited.
    pub message_expiry_secs: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Vec<u8>>,
    pub user_properties: Vec<(String, String)>,
}

impl Properties {
    pub fn is_empty(&self) -> bool {
        *self == Properties::default()
    }
}

/// One subscription of one client (the seed's `mqtt.subscription` document).
#[derive(Encode, Decode, Clone, PartialEq, Eq, Debug)]
pub struct Subscription {
    pub filter: String,
    pub qos: Qos,
    /// MQTT 5.0 subscription options (all off, and no identifier, for 3.1/3.1.1).
    pub options: SubscriptionOptions,
}

/// The MQTT 5.0 subscription options that outlive the SUBSCRIBE (Retain Handling does not).
#[derive(Encode, Decode, Clone, Copy, PartialEq, Eq, Debug, Default, Hash)]
pub struct SubscriptionOptions {
    /// Not sent the subscriber's own messages.
    pub no_local: bool,
    /// Messages keep their RETAIN flag as published.
    pub retain_as_published: bool,
    /// The Subscription Identifier (1..268,435,455), sent with every message it matches.
    pub identifier: Option<u32>,
}

/// A QoS 2 delivery under way to a persistent session.
#[derive(Encode, Decode, Clone, PartialEq, Eq, Debug)]
pub struct OutboundQos2 {
    pub pkid: u16,
    pub message: Message,
    /// PUBREC was received: what is owed is a PUBREL.
    pub released: bool,
}

/// First frame in each direction.
#[derive(Encode, Decode, Clone, PartialEq, Eq, Debug)]
pub struct Hello {
    pub protocol_version: u32,
    /// The broker host name (`host` in the stored documents).
    pub host: String,
    /// Identifies this process instance in logs.
    pub instance: String,
}

/// Frames from the edge to the worker.
#[derive(Encode, Decode, Clone, PartialEq, Debug)]
pub enum EdgeFrame {
    Hello(Hello),
    Request { id: u64, request: Request },
    Notice(Notice),
}

/// Frames from the worker to the edge.
#[derive(Encode, Decode, Clone, PartialEq, Debug)]
pub enum WorkerFrame {
    Hello(Hello),
    Reply {
        id: u64,
        reply: Reply,
    },
    /// Messages stored from other hosts (other edges of this worker, other workers of the
    /// cluster), for the edge to route to its connected sessions.
    Deliver {
        messages: Vec<Message>,
    },
    /// Sessions claimed by a CONNECT (on this worker's edges or, read from the store, on other
    /// hosts): a connection or parked session of the same client with an older generation
    /// has lost it and ends.
    Claims {
        claims: Vec<Claim>,
    },
    /// Every claim made before `as_of_ms` (the host's monotonic clock, `CLOCK_MONOTONIC` in
    /// milliseconds) has been sent. An edge serves its sessions only while this is recent:
    /// a host that was frozen or cut off from the store does not deliver or acknowledge
    /// for a session another host may have claimed meanwhile. Sent only by a worker whose
    /// store other hosts share.
    Lease {
        as_of_ms: u64,
    },
}

/// Which claim of a session is the newest: the record's creation time, then the number of
/// claims since. A record is made again only after its session ended, so a new record's
/// claims are newer than any of the old one's.
#[derive(Encode, Decode, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Default, Hash)]
pub struct Generation {
    pub epoch_ms: u64,
    pub claims: u64,
}

/// A client id claimed by a connection, with the claim's generation.
#[derive(Encode, Decode, Clone, PartialEq, Eq, Hash, Debug)]
pub struct Claim {
    pub client_id: String,
    pub generation: Generation,
}

/// What the edge asks of the worker; each gets exactly one [`Reply`].
#[derive(Encode, Decode, Clone, PartialEq, Debug)]
pub enum Request {
    /// A client connected: the session record is claimed for this host (a new generation,
    /// which every other edge and host hears of as a [`WorkerFrame::Claims`]). A clean start
    /// drops whatever was stored for it (reply [`Reply::Claimed`]); otherwise the stored
    /// session comes back in [`Reply::Session`].
    Connect {
        client_id: String,
        clean_start: bool,
        /// Seconds the session outlives its connection: 0 none, `u32::MAX` for ever.
        session_expiry: u32,
    },
    /// Store messages durably (the QoS 1 messages of one read from one client, in order). One
    /// reply for all: `Persisted` once they are durable, or `Failed`.
    Persist(Vec<Message>),
    /// Store a QoS 2 message together with its publisher's packet id, which stays recorded
    /// until `ReleaseQos2`. If the id is still recorded (a PUBLISH re-sent after a crash or
    /// reconnect), nothing is stored and the reply is `AlreadyStored`; else `Persisted`.
    PersistQos2 { message: Message, pkid: u16 },
    /// PUBREL arrived: forget the packet id. Reply `Done`. Ordered with the persists.
    ReleaseQos2 { client_id: String, pkid: u16 },
    /// A QoS 2 delivery to a persistent session, recorded durably before the PUBLISH is
    /// written (`released: false`) and again once the client's PUBREC arrived
    /// (`released: true`, which also writes the `publishedMessage` record), so that after a
    /// crash any edge re-sends it with the same packet id. Reply `Done`.
    TrackQos2Out {
        client_id: String,
        pkid: u16,
        message_id: MessageId,
        topic: String,
        released: bool,
    },
    /// PUBCOMP arrived: the delivery is complete. Reply `Done`.
    ForgetQos2Out { client_id: String, pkid: u16 },
    /// Store subscriptions (upsert per client and filter). Reply [`Reply::Messages`] with the
    /// retained messages that match the new filters.
    Subscribe {
        client_id: String,
        subscriptions: Vec<Subscription>,
    },
    /// Reply `Done`.
    Unsubscribe {
        client_id: String,
        filters: Vec<String>,
    },
    /// Messages on the client's subscriptions after `after` (and since each subscription
    /// was made), not yet delivered to it, oldest first. `other_hosts_only`: those made on
    /// other hosts, which routing may have missed (see [`SETTLE_MS`]). Reply
    /// [`Reply::Messages`].
    CatchUp {
        client_id: String,
        after: Option<Cursor>,
        other_hosts_only: bool,
    },
    /// A client's connection ended. With a `session_expiry` of 0 the session ends now (its
    /// subscriptions and QoS 2 state are dropped); otherwise it expires that many seconds
    /// from now (`u32::MAX`: never) unless the client comes back. Only if the session's
    /// record still has `generation` (`None`: the newest claim by this host): a connection
    /// that lost its session to another changes nothing. Reply `Done`.
    Disconnect {
        client_id: String,
        session_expiry: u32,
        generation: Option<Generation>,
    },
    /// The users and authorization rules kept in the store (MongoDB only), read whole: reply
    /// `Auth`. The edge asks every few seconds and checks passwords and rules itself.
    LoadAuth { users: bool, rules: bool },
    /// The shared subscription groups with members on the edge `owner` (sent every second
    /// where hosts share the store): the worker claims in the store those no live edge owns,
    /// renews those `owner` owns, and gives up the others `owner` owned. Reply `Groups`.
    OwnGroups { owner: String, groups: Vec<String> },
    /// The retained messages whose topics match `filter` (the admin API): reply
    /// [`Reply::Messages`] without `next`.
    Retained { filter: String },
    /// Clears the retained message of `topic`, without publishing anything (the admin API).
    /// Reply `Done`.
    ClearRetained { topic: String },
    /// How many messages the client's session is owed in the store, counting up to `limit`,
    /// and when the oldest was created: reply [`Reply::Owed`]. (A bridge's backlog.)
    Owed { client_id: String, limit: u32 },
    /// Stored sessions in client id order after `after` whose ids start with `prefix`, at
    /// most `limit`, each with what it is owed (counted up to `owed_limit`): reply
    /// [`Reply::Sessions`]. (The admin API's "who is behind".)
    Sessions {
        after: Option<String>,
        prefix: String,
        limit: u32,
        owed_limit: u32,
    },
    /// Of the stored sessions whose ids start with `prefix` (at most `scan` of them, in id
    /// order; `u32::MAX`: all), the `top` most owed, most first, each counted up to
    /// `owed_limit`; sessions owed nothing are left out: reply [`Reply::Ranked`]. Counted by a
    /// sweep of the worker's own that later requests join. (The admin API's "who is behind"
    /// by owed.)
    MostOwed {
        prefix: String,
        scan: u32,
        top: u32,
        owed_limit: u32,
    },
    /// Where the message `id` went: the message as stored and each stored subscription its
    /// topic matches (at most `limit`), with its delivery record or why it has none: reply
    /// [`Reply::Trace`]. (The admin API's "where a message went".)
    Trace { id: MessageId, limit: u32 },
    /// Every host's last [`HostStatus`] in the store: reply [`Reply::Cluster`].
    Cluster,
    /// Adds or replaces a user in the store's users collection (`by`: who asked, kept on
    /// the document): reply `Done`. (The admin API; MongoDB only.)
    PutUser { user: StoredUser, by: String },
    /// Removes a user: reply `Done`, or `Failed` when there is none of that name.
    DeleteUser { username: String, by: String },
    /// Adds a rule to the store's authorization collection: reply `Done`.
    PutRule { rule: StoredRule, by: String },
    /// Removes the rules with exactly these fields: reply `Done`, or `Failed` when none has.
    DeleteRule { rule: StoredRule, by: String },
    /// Messages stored on exactly `topic` after `after`, oldest first, at most `limit`: reply
    /// [`Reply::Messages`]. (The admin API's message search.)
    Find {
        topic: String,
        after: Cursor,
        limit: u32,
    },
}

/// One host's state as its edge reports it every few seconds ([`Notice::Status`]), with what
/// its worker adds: the admin API's cluster view.
#[derive(Encode, Decode, Clone, PartialEq, Debug, Default)]
pub struct HostStatus {
    pub host: String,
    pub version: String,
    /// When the edge started and when it made this report (Unix ms, its clock).
    pub started_ms: i64,
    pub reported_ms: i64,
    pub connections: u64,
    pub parked_sessions: u64,
    /// Over the last report's interval.
    pub messages_in_per_sec: f64,
    pub messages_out_per_sec: f64,
    /// `kind address`, as the edge listens.
    pub listeners: Vec<String>,
    /// The shared subscription groups this edge owns (delivers) now.
    pub groups: Vec<String>,
    /// Each configured bridge's name and state here (`connected`, `standby`, ...).
    pub bridges: Vec<(String, String)>,
    /// Filled by the worker: bytes of messages queued for the store, and the oldest queued
    /// message's creation time.
    pub worker_queued_bytes: u64,
    pub worker_oldest_unwritten_ms: Option<i64>,
    /// When the store received the report (Unix ms, the writing worker's clock).
    pub written_ms: i64,
}

/// A stored subscription a message's topic matches, and what became of the message for it.
#[derive(Encode, Decode, Clone, PartialEq, Eq, Debug)]
pub struct Recipient {
    /// The subscribing client, or for a shared subscription group its `$share/...` filter
    /// (the group is owed a message once, whichever member takes it).
    pub client_id: String,
    pub filter: String,
    pub qos: Qos,
    pub subscribed_ms: i64,
    pub fate: Fate,
}

/// What became of a message for one subscription.
#[derive(Encode, Decode, Clone, PartialEq, Eq, Debug)]
pub enum Fate {
    /// A delivery record exists: written at `at_ms` by the worker of `host` (either unknown
    /// for records the store keeps in blocks without them).
    Delivered {
        at_ms: Option<i64>,
        host: Option<String>,
    },
    /// No record: the session's next catch-up brings it.
    Owed,
    /// The subscription was made after the message: never owed.
    SubscribedAfter,
    /// The subscriber published it and asked not to get its own messages (No Local).
    OwnMessage,
    /// The message's expiry passed before it was delivered.
    Expired,
}

/// A stored session as the admin API lists it.
#[derive(Encode, Decode, Clone, PartialEq, Eq, Debug)]
pub struct SessionSummary {
    pub client_id: String,
    /// The host that last claimed it.
    pub host: String,
    /// When it was last claimed or released (Unix ms).
    pub updated_ms: i64,
    /// When it expires while its client is away; `None` while connected or never.
    pub expires_ms: Option<i64>,
    /// Messages owed (at most the request's `owed_limit`; `owed_complete` false beyond).
    pub owed: u64,
    pub owed_complete: bool,
    pub oldest_owed_ms: Option<i64>,
}

/// A user document as stored: the edge checks the password against it.
#[derive(Encode, Decode, Clone, PartialEq, Eq, Debug)]
pub struct StoredUser {
    pub username: String,
    pub password_hash: String,
    pub salt: Option<String>,
    pub superuser: bool,
}

/// An authorization document in EMQX's MongoDB shape: `permission` allow/deny, `action`
/// publish/subscribe/all, `topics` (with `${username}`, `${clientid}`, `eq ` for a literal
/// filter), for a `username` and/or `clientid`, or everyone when it names neither.
#[derive(Encode, Decode, Clone, PartialEq, Eq, Debug)]
pub struct StoredRule {
    pub username: Option<String>,
    pub client_id: Option<String>,
    pub permission: String,
    pub action: String,
    pub topics: Vec<String>,
}

/// Fire-and-forget frames: losing one costs a duplicate or a missing QoS 0 record, never an
/// acknowledged message.
#[derive(Encode, Decode, Clone, PartialEq, Debug)]
pub enum Notice {
    /// Store QoS 0 messages (those of one read from one client, in order); nobody waits.
    Store(Vec<Message>),
    /// These messages reached the client (QoS 0 written, QoS 1/2 acknowledged): the seed's
    /// `mqtt.publishedMessage` records.
    Delivered {
        client_id: String,
        messages: Vec<DeliveredRecord>,
    },
    /// The topic filters this edge's connected sessions subscribe to (a shared subscription's
    /// filter inside `$share/{group}/`): what changed since the last such notice, or the
    /// whole set (`whole`, the first after the link connected). The worker keeps their union
    /// over its edges as this host's routes, which tell other hosts what to send here.
    Routes {
        added: Vec<String>,
        removed: Vec<String>,
        whole: bool,
    },
    /// This edge's state, every few seconds, for the cluster view: the worker keeps the last
    /// one of each host in the store.
    Status(Box<HostStatus>),
}

/// How often an edge sends [`Notice::Status`]; a host whose last one is older than three of
/// these is shown as not reporting.
pub const STATUS_EVERY_MS: i64 = 5_000;

/// How long after a worker read the routes it may still address messages by that reading
/// (later it addresses them to every host): with [`LATE_MS`], how long a new route can go
/// unseen by a publishing host.
pub const ROUTE_FRESH_MS: i64 = 1_000;

/// How much later than its `created` time a message may be stored and still be found by a
/// query over a window of time (batching, retries, clocks of hosts within this of each other).
pub const LATE_MS: i64 = 2_000;

/// How long after a session subscribed (or its host regained the store) it asks the store once
/// for other hosts' messages it lacks: a publishing host that had not read the new route yet
/// stored them without this host's address.
pub const SETTLE_MS: i64 = ROUTE_FRESH_MS + LATE_MS + 500;

/// One `publishedMessage` record.
#[derive(Encode, Decode, Clone, PartialEq, Eq, Debug)]
pub struct DeliveredRecord {
    pub message_id: MessageId,
    pub topic: String,
}

/// A persistent session as the store keeps it, claimed for a connection.
#[derive(Encode, Decode, Clone, PartialEq, Debug)]
pub struct StoredSession {
    /// Whether the store held anything for this client.
    pub present: bool,
    pub subscriptions: Vec<Subscription>,
    pub undelivered: Vec<Message>,
    /// More undelivered messages may wait after this position: ask with `CatchUp`.
    pub next: Option<Cursor>,
    /// QoS 2 deliveries to this client that were under way.
    pub outbound_qos2: Vec<OutboundQos2>,
    /// The connection's claim.
    pub generation: Generation,
}

/// The worker's answer to one [`Request`].
#[derive(Encode, Decode, Clone, PartialEq, Debug)]
pub enum Reply {
    Done,
    Persisted,
    /// The QoS 2 packet id was already recorded: the message was stored (and routed) before.
    AlreadyStored,
    /// Stored state of a persistent session.
    Session(StoredSession),
    /// A clean start's session was claimed with this generation.
    Claimed {
        generation: Generation,
    },
    /// Of the groups asked for, those the edge owns now.
    Groups {
        owned: Vec<String>,
    },
    Sessions {
        sessions: Vec<SessionSummary>,
    },
    /// Messages owed to a session (`complete`: all of them; else at least `count`), and the
    /// oldest one's creation time (Unix ms).
    Owed {
        count: u64,
        oldest_ms: Option<i64>,
        complete: bool,
    },
    Messages {
        messages: Vec<Message>,
        /// More may wait after this position (a page ended); `None` when this was all. It is
        /// the last message read, so paging moves forward and ends.
        next: Option<Cursor>,
    },
    /// Where a message went ([`Request::Trace`]); `message` `None`: the store does not hold
    /// it (never stored, or past its TTL). `complete` false: more subscriptions match than
    /// were asked for.
    Trace {
        message: Option<Message>,
        recipients: Vec<Recipient>,
        complete: bool,
    },
    Cluster {
        hosts: Vec<HostStatus>,
    },
    /// [`Request::MostOwed`]'s answer: `scanned` sessions were counted, `complete` when that
    /// was all of them; `counting` while the sweep goes on (ask again for the rest); the
    /// sweep started at `as_of_ms`.
    Ranked {
        sessions: Vec<SessionSummary>,
        scanned: u64,
        complete: bool,
        counting: bool,
        as_of_ms: i64,
    },
    /// The users and rules the store keeps.
    Auth {
        users: Vec<StoredUser>,
        rules: Vec<StoredRule>,
    },
    /// The request could not be carried out; `retryable` when the store may recover.
    Failed {
        reason: String,
        retryable: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(created_ms: i64, n: u8) -> Message {
        Message {
            id: MessageId([n; 12]),
            topic: "t".into(),
            payload: vec![],
            qos: Qos::AtLeastOnce,
            retain: false,
            client_id: "c".into(),
            host: "h".into(),
            created_ms,
            properties: None,
        }
    }

    #[test]
    fn a_message_id_reads_back_from_its_hex_form() {
        let id = MessageId([
            0x5d, 0x9b, 0x88, 0x93, 0x57, 0x96, 0xf9, 0x16, 0xe5, 0x6c, 0x0c, 0xb4,
        ]);
        assert_eq!(id.to_hex(), "5d9b88935796f916e56c0cb4");
        assert_eq!(MessageId::from_hex("5d9b88935796f916e56c0cb4"), Some(id));
        assert_eq!(MessageId::from_hex("5D9B88935796F916E56C0CB4"), Some(id));
        for bad in [
            "",
            "5d9b",
            "5d9b88935796f916e56c0cb",
            "5d9b88935796f916e56c0cbx",
            "+d9b88935796f916e56c0cb4",
            "é9b88935796f916e56c0cb",
        ] {
            assert_eq!(MessageId::from_hex(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_cursor_orders_by_creation_then_id_and_continues_after_a_full_page() {
        let page = [at(5, 1), at(5, 2), at(6, 0)];
        assert!(Cursor::since(5).precedes(&page[0]));
        assert!(!Cursor::of(&page[1]).precedes(&page[0]));
        assert!(Cursor::of(&page[1]).precedes(&page[2]));
        assert_eq!(
            Cursor::after_full_page(&page, 3),
            Some(Cursor::of(&page[2]))
        );
        assert_eq!(Cursor::after_full_page(&page, 4), None);
        assert_eq!(Cursor::after_full_page(&[], 1), None);
    }
}
