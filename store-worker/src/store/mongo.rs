//! MongoDB, with the seed's collections and field names (a contract with other services):
//!
//! - `message`: `{_id: ObjectId, topic, data, clientId, qos, retain, created: Date, host}`;
//!   `data` is a UTF-8 string when the payload is valid UTF-8, BSON binary otherwise.
//! - `subscription`: `{_id: ObjectId, topic, clientId, qos, created: Date}`, one per
//!   (clientId, topic).
//! - `publishedMessage`: `{_id: ObjectId, clientId, topic, messageId: ObjectId, host,
//!   created: Date}`; `messageId` is the message's `_id`.
//! - `retained` (Wharf's own): `{_id: topic, messageId, topic, data, clientId, qos, host,
//!   created}`, the current retained message of each topic.
//!
//! Indexes are made at start-up with fixed names; a TTL that differs is changed with collMod.

use super::{
    AuthStore, ClusterStore, Deliveries, DeliveryRecord, MessageStore, Owner, SessionStore, Store,
    StoreError, StoredSubscription, SubscriptionStore, TopicScope, WriteBatch, MESSAGE_TTL_SECS,
    PREFIX_CANDIDATES, PUBLISHED_TTL_SECS,
};
use crate::routes::{RouteDoc, RouteStore, RouteView, EVERY_HOST};
use futures::{FutureExt, StreamExt, TryStreamExt};
use mongodb::bson::{doc, oid::ObjectId, spec::BinarySubtype, Binary, Bson, DateTime, Document};
use mongodb::options::{Acknowledgment, IndexOptions, WriteConcern};
use mongodb::{Client, Collection, Database, IndexModel};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use wharf_shared::{
    Claim, Cursor, Generation, Message, MessageId, Properties, Qos, StoredRule, StoredUser,
    Subscription, SubscriptionOptions,
};

/// Duplicate key: the document is already there (a re-sent message or record).
const DUPLICATE_KEY: i32 = 11000;
const NAMESPACE_NOT_FOUND: i32 = 26;

/// Where the users and the authorization rules are kept, and under which field names: the
/// defaults are EMQX's MongoDB authenticator's and authorizer's, so their documents work as
/// they are.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthCollections {
    pub users: String,
    /// Which user documents count (`{}`: all), as JSON.
    pub users_filter: Document,
    pub username_field: String,
    pub password_hash_field: String,
    pub salt_field: String,
    pub superuser_field: String,
    pub rules: String,
    /// Which rule documents count, as JSON.
    pub rules_filter: Document,
}

impl Default for AuthCollections {
    fn default() -> Self {
        AuthCollections {
            users: "mqtt_user".into(),
            users_filter: Document::new(),
            username_field: "username".into(),
            password_hash_field: "password_hash".into(),
            salt_field: "salt".into(),
            superuser_field: "is_superuser".into(),
            rules: "mqtt_acl".into(),
            rules_filter: Document::new(),
        }
    }
}

/// A field as a string (what EMQX's documents hold), or `None`.
fn text(doc: &Document, field: &str) -> Option<String> {
    match doc.get(field) {
        Some(Bson::String(s)) => Some(s.clone()),
        _ => None,
    }
}

/// A rule document (EMQX's shape). One that cannot be read whole (a field of the wrong type, a
/// topic that is not a string, no topics) comes out with a permission the edge refuses, so
/// that it never reads as a narrower document: a `username` of 4242 read as "no user name"
/// applied to every client.
fn rule_of(doc: &Document) -> StoredRule {
    let mut unreadable = Vec::new();
    let mut field = |name: &str| match doc.get(name) {
        None | Some(Bson::Null) => None,
        Some(Bson::String(s)) => Some(s.clone()),
        Some(_) => {
            unreadable.push(format!("{name} is not a string"));
            None
        }
    };
    let (username, client_id) = (field("username"), field("clientid"));
    let (permission, action, topic) = (field("permission"), field("action"), field("topic"));
    let topics = match doc.get("topics") {
        Some(Bson::Array(items)) => items
            .iter()
            .map(|t| t.as_str().map(str::to_owned))
            .collect::<Option<Vec<String>>>()
            .unwrap_or_else(|| {
                unreadable.push("a topic is not a string".into());
                Vec::new()
            }),
        Some(Bson::String(t)) => vec![t.clone()],
        None | Some(Bson::Null) => Vec::new(),
        Some(_) => {
            unreadable.push("topics is not a list".into());
            Vec::new()
        }
    };
    // EMQX 4's field name was `topic`.
    let topics = if topics.is_empty() {
        topic.into_iter().collect()
    } else {
        topics
    };
    if topics.is_empty() && unreadable.is_empty() {
        unreadable.push("no topics".into());
    }
    let permission = if unreadable.is_empty() {
        permission.unwrap_or_default()
    } else {
        format!(
            "unreadable document {}: {}",
            doc.get("_id").map_or_else(String::new, |id| id.to_string()),
            unreadable.join(", ")
        )
    };
    StoredRule {
        username,
        client_id,
        permission,
        action: action.unwrap_or_default(),
        topics,
    }
}

/// A filter document's plain equalities (fields not starting with `$` whose values are not
/// operator documents): what a document must hold for the filter to select it.
fn plain_fields(filter: &Document) -> Document {
    filter
        .iter()
        .filter(|(k, v)| {
            !k.starts_with('$')
                && !matches!(v, Bson::Document(d) if d.keys().any(|k| k.starts_with('$')))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn truthy(doc: &Document, field: &str) -> bool {
    match doc.get(field) {
        Some(Bson::Boolean(b)) => *b,
        Some(Bson::Int32(n)) => *n != 0,
        Some(Bson::Int64(n)) => *n != 0,
        Some(Bson::String(s)) => s == "true" || s == "1",
        _ => false,
    }
}

#[derive(Clone)]
pub struct MongoStore {
    db: Database,
    auth: Arc<AuthCollections>,
    messages: Collection<Document>,
    subscriptions: Collection<Document>,
    published: Collection<Document>,
    retained: Collection<Document>,
    qos2: Collection<Document>,
    qos2_out: Collection<Document>,
    /// `{_id: clientId, clientId, host, created, updated, expiresAt?}`: one per persistent
    /// session; `expiresAt` is set while its client is away and the session can expire.
    sessions: Collection<Document>,
    change_streams: bool,
    /// `{_id: {host, filter}, host, filter, updated, removed?}`: each host's routes (Wharf's
    /// own; see `crate::routes`).
    routes: Collection<Document>,
    /// `{_id: host, alive}`: each host's heartbeat.
    hosts: Collection<Document>,
    /// Every host's routes, which address each message written (`hosts`).
    view: Arc<RouteView>,
    /// For what nobody waits for (QoS 0 batches, delivery records): acknowledged by the
    /// primary, without waiting for the journal or the other members. A later durable write
    /// carries them with it (the oplog is ordered); a failover may roll back the last of them,
    /// which costs a QoS 0 message or a duplicate delivery, never an acknowledged message.
    relaxed: WriteConcern,
    /// Messages stored per millisecond where the last catch-up page was read (an `f64`'s
    /// bits): the first window of the next page is sized from it.
    density: Arc<std::sync::atomic::AtomicU64>,
}

/// How writes are acknowledged: `w` ("majority" or a number) and the journal flag.
#[derive(Debug, Clone)]
pub struct Durability {
    pub w: String,
    pub journal: bool,
}

impl Default for Durability {
    fn default() -> Self {
        Durability {
            w: "majority".into(),
            journal: true,
        }
    }
}

/// Server codes for a primary that is stepping down or shutting down, or a timeout.
const TRANSIENT_CODES: [i32; 10] = [6, 7, 89, 91, 189, 10107, 11600, 11602, 13435, 13436];

/// Every document a query finds.
async fn all(find: mongodb::action::Find<'_, Document>) -> Result<Vec<Document>, StoreError> {
    find.await
        .map_err(classify)?
        .try_collect()
        .await
        .map_err(classify)
}

fn classify(e: mongodb::error::Error) -> StoreError {
    use mongodb::error::ErrorKind;
    let text = match &*e.kind {
        // The server's own words, without the raw reply the driver appends.
        ErrorKind::Command(c) => format!("{} ({}): {}", c.code, c.code_name, c.message),
        _ => redact(&e.to_string()),
    };
    match *e.kind {
        ErrorKind::ServerSelection { .. }
        | ErrorKind::Io(_)
        | ErrorKind::ConnectionPoolCleared { .. } => StoreError::Unavailable(text),
        ErrorKind::Command(ref c) if TRANSIENT_CODES.contains(&c.code) => {
            StoreError::Unavailable(text)
        }
        _ if e.contains_label("RetryableWriteError") => StoreError::Unavailable(text),
        _ => StoreError::Failed(text),
    }
}

/// Removes a password from a `mongodb://user:pass@host` URI in a message.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("://") {
        out.push_str(&rest[..start + 3]);
        rest = &rest[start + 3..];
        let end = rest.find(['/', ' ', '"', '?']).unwrap_or(rest.len());
        match rest[..end].rfind('@') {
            Some(at) => {
                let user = rest[..at].split(':').next().unwrap_or("");
                out.push_str(user);
                out.push_str(":***");
                out.push_str(&rest[at..end]);
            }
            None => out.push_str(&rest[..end]),
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

fn oid(id: &MessageId) -> ObjectId {
    ObjectId::from_bytes(id.0)
}

fn data_of(payload: &[u8]) -> Bson {
    match std::str::from_utf8(payload) {
        Ok(text) => Bson::String(text.to_owned()),
        Err(_) => Bson::Binary(Binary {
            subtype: BinarySubtype::Generic,
            bytes: payload.to_vec(),
        }),
    }
}

fn payload_of(data: Option<&Bson>) -> Vec<u8> {
    match data {
        Some(Bson::String(s)) => s.as_bytes().to_vec(),
        Some(Bson::Binary(b)) => b.bytes.clone(),
        _ => Vec::new(),
    }
}

fn message_doc(m: &Message) -> Document {
    let mut d = doc! {
        "_id": oid(&m.id),
        "topic": &m.topic,
        "data": data_of(&m.payload),
        "clientId": &m.client_id,
        "qos": m.qos.as_u8() as i32,
        "retain": m.retain,
        "created": DateTime::from_millis(m.created_ms),
        "host": &m.host,
    };
    // MQTT 5.0 messages only: the seed's shape stays as it was for the others.
    if let Some(p) = &m.properties {
        d.insert("properties", properties_doc(p));
    }
    if let Some(at) = m.expires_ms() {
        d.insert("expiresAt", DateTime::from_millis(at));
    }
    d
}

/// A message's MQTT 5.0 properties, as the optional `properties` field (docs/storage.md, "Stored
/// data"): only the properties the publisher set.
fn properties_doc(p: &Properties) -> Document {
    let mut d = Document::new();
    if let Some(v) = p.payload_format_indicator {
        d.insert("payloadFormatIndicator", i32::from(v));
    }
    if let Some(v) = p.message_expiry_secs {
        d.insert("messageExpiryInterval", i64::from(v));
    }
    if let Some(v) = &p.content_type {
        d.insert("contentType", v);
    }
    if let Some(v) = &p.response_topic {
        d.insert("responseTopic", v);
    }
    if let Some(v) = &p.correlation_data {
        d.insert(
            "correlationData",
            Binary {
                subtype: BinarySubtype::Generic,
                bytes: v.clone(),
            },
        );
    }
    if !p.user_properties.is_empty() {
        let list: Vec<Bson> = p
            .user_properties
            .iter()
            .map(|(k, v)| Bson::Document(doc! { "key": k, "value": v }))
            .collect();
        d.insert("userProperties", list);
    }
    d
}

fn properties_of(d: &Document) -> Option<Box<Properties>> {
    let p = d.get_document("properties").ok()?;
    let number = |key: &str| match p.get(key) {
        Some(Bson::Int32(v)) => Some(i64::from(*v)),
        Some(Bson::Int64(v)) => Some(*v),
        Some(Bson::Double(v)) => Some(*v as i64),
        _ => None,
    };
    let text = |key: &str| p.get_str(key).ok().map(str::to_owned);
    let props = Properties {
        payload_format_indicator: number("payloadFormatIndicator").map(|v| v as u8),
        message_expiry_secs: number("messageExpiryInterval").map(|v| v as u32),
        content_type: text("contentType"),
        response_topic: text("responseTopic"),
        correlation_data: match p.get("correlationData") {
            Some(Bson::Binary(b)) => Some(b.bytes.clone()),
            Some(Bson::String(s)) => Some(s.as_bytes().to_vec()),
            _ => None,
        },
        user_properties: p
            .get_array("userProperties")
            .map(|list| {
                list.iter()
                    .filter_map(|item| {
                        let item = item.as_document()?;
                        Some((
                            item.get_str("key").ok()?.to_owned(),
                            item.get_str("value").ok()?.to_owned(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default(),
    };
    (!props.is_empty()).then(|| Box::new(props))
}

/// A `subscription` document as a subscription (`None`: not in the shape Wharf writes).
fn subscription_of(d: &Document) -> Option<StoredSubscription> {
    Some(StoredSubscription {
        filter: d.get_str("topic").ok()?.to_owned(),
        qos: Qos::from_u8(d.get_i32("qos").ok()? as u8)?,
        created_ms: d.get_datetime("created").ok()?.timestamp_millis(),
        options: SubscriptionOptions {
            no_local: d.get_bool("noLocal").unwrap_or(false),
            retain_as_published: d.get_bool("retainAsPublished").unwrap_or(false),
            identifier: d
                .get_i64("subscriptionId")
                .ok()
                .or_else(|| d.get_i32("subscriptionId").ok().map(i64::from))
                .map(|v| v as u32),
        },
    })
}

fn message_of(d: &Document, id_field: &str) -> Option<Message> {
    Some(Message {
        id: MessageId(d.get_object_id(id_field).ok()?.bytes()),
        topic: d.get_str("topic").ok()?.to_owned(),
        payload: payload_of(d.get("data")),
        qos: Qos::from_u8(d.get_i32("qos").unwrap_or(0) as u8).unwrap_or(Qos::AtMostOnce),
        retain: d.get_bool("retain").unwrap_or(true),
        client_id: d.get_str("clientId").unwrap_or_default().to_owned(),
        host: d.get_str("host").unwrap_or_default().to_owned(),
        created_ms: d
            .get_datetime("created")
            .map(|t| t.timestamp_millis())
            .unwrap_or(0),
        properties: properties_of(d),
    })
}

/// Whether an error is only "already there" for every failed write.
fn only_duplicates(e: &mongodb::error::Error) -> bool {
    use mongodb::error::ErrorKind;
    match &*e.kind {
        ErrorKind::InsertMany(m) => {
            m.write_concern_error.is_none()
                && m.write_errors
                    .as_ref()
                    .is_some_and(|w| w.iter().all(|w| w.code == DUPLICATE_KEY))
        }
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        _ => false,
    }
}

/// One range of `field` (a topic) holding every topic that a set of literal prefixes can
/// match: a prefix `p` (whole topic levels) matches `p` and `p/...`, all of which sort from
/// `p` up to, not including, `p0` (`0` follows `/`). Several prefixes share one range from the
/// lowest to the highest: a superset (the caller matches exactly), but one plain range, which
/// any server applies cheaply and an index serves, where a regex or an `$or` per prefix costs
/// some servers a slow per-document evaluation.
fn topic_condition(field: &str, prefixes: &Option<Vec<String>>) -> Option<Document> {
    let prefixes = prefixes.as_ref()?;
    let low = prefixes.iter().min()?;
    let high = prefixes.iter().map(|p| format!("{p}0")).max()?;
    Some(doc! { field: { "$gte": low, "$lt": high } })
}

/// The first time window a catch-up page reads past its cursor's millisecond. Later windows
/// are sized from the density of the one before (two to sixteen times as long) until the page
/// is full: some servers read every document of a range before applying the limit, so an
/// open range over a long history would cost the whole history for one page.
const FIRST_WINDOW_MS: i64 = 16;
/// Past this far ahead of the clock the last window is left open (hosts' clocks differ).
const OPEN_AFTER_MS: i64 = 60_000;

impl MongoStore {
    /// Messages addressed to `address` (a host, or `"*"`) not made on `own` after `after`, in
    /// cursor order, at most `limit`: equality on `hosts` and a range on `created`, one scan of
    /// `hosts_created` (an `$in` of both addresses was planned as a collection scan by the
    /// Python MongoDB-wire server).
    async fn addressed_after(
        &self,
        address: &str,
        own: &str,
        after: Cursor,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let filter = doc! { "hosts": address, "host": { "$ne": own } };
        let docs = self.after_cursor(filter, after, limit).await?;
        Ok(docs.iter().filter_map(|d| message_of(d, "_id")).collect())
    }

    /// Messages matching `filter` after `after`, in cursor order, at most `limit`: the rest of
    /// the cursor's millisecond, then what comes after it.
    async fn after_cursor(
        &self,
        filter: Document,
        after: Cursor,
        limit: usize,
    ) -> Result<Vec<Document>, StoreError> {
        let mut docs = self.rest_of_millisecond(&filter, after, limit).await?;
        if docs.len() < limit {
            let mut later = filter;
            later.insert(
                "created",
                doc! { "$gt": DateTime::from_millis(after.created_ms) },
            );
            docs.extend(
                all(self
                    .messages
                    .find(later)
                    .sort(doc! { "created": 1, "_id": 1 })
                    .limit((limit - docs.len()) as i64))
                .await?,
            );
        }
        Ok(docs)
    }

    /// Messages matching `filter` in the cursor's own millisecond after its id, in (created,
    /// _id) order, at most `limit`: the first range scan of a catch-up page.
    async fn rest_of_millisecond(
        &self,
        filter: &Document,
        after: Cursor,
        limit: usize,
    ) -> Result<Vec<Document>, StoreError> {
        let mut same_ms = filter.clone();
        same_ms.insert("created", DateTime::from_millis(after.created_ms));
        same_ms.insert("_id", doc! { "$gt": oid(&after.id) });
        all(self
            .messages
            .find(same_ms)
            .sort(doc! { "created": 1, "_id": 1 })
            .limit(limit as i64))
        .await
    }

    /// `publishedMessage` records; `relaxed`: with the write concern for what nobody waits
    /// for (see the field), else the collection's durable one.
    async fn insert_records(&self, batch: &[Deliveries], relaxed: bool) -> Result<(), StoreError> {
        let docs: Vec<Document> = batch
            .iter()
            .flat_map(|d| {
                d.records.iter().map(move |r| {
                    doc! {
                        "_id": ObjectId::new(),
                        "clientId": &d.client_id,
                        "topic": &r.topic,
                        "messageId": oid(&r.message_id),
                        "host": &*d.host,
                        "created": DateTime::from_millis(d.created_ms),
                    }
                })
            })
            .collect();
        if docs.is_empty() {
            return Ok(());
        }
        let mut insert = self.published.insert_many(docs).ordered(false);
        if relaxed {
            insert = insert.write_concern(self.relaxed.clone());
        }
        match insert.await {
            Ok(_) => Ok(()),
            Err(e) if only_duplicates(&e) => Ok(()),
            Err(e) => Err(classify(e)),
        }
    }

    /// Records QoS 2 packet ids with their message ids (before the messages are stored).
    async fn record_qos2(&self, records: &[(String, u16, MessageId)]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let now = DateTime::now();
        let docs: Vec<Document> = records
            .iter()
            .map(|(c, p, id)| doc! { "_id": ObjectId::new(), "clientId": c, "pkid": *p as i32, "messageId": oid(id), "created": now })
            .collect();
        match self.qos2.insert_many(docs).ordered(false).await {
            Ok(_) => Ok(()),
            Err(e) if only_duplicates(&e) => Ok(()),
            Err(e) => Err(classify(e)),
        }
    }

    /// Connects, checks the server answers, and makes the indexes.
    pub async fn connect(
        uri: &str,
        database: &str,
        durability: &Durability,
        change_streams: bool,
    ) -> Result<MongoStore, StoreError> {
        let client = Client::with_uri_str(uri).await.map_err(classify)?;
        let db = client.database(database);
        db.run_command(doc! { "ping": 1 }).await.map_err(classify)?;
        let w = match durability.w.parse::<u32>() {
            Ok(n) => Acknowledgment::Nodes(n),
            Err(_) if durability.w == "majority" => Acknowledgment::Majority,
            Err(_) => Acknowledgment::Custom(durability.w.clone()),
        };
        let concern = WriteConcern::builder()
            .w(w)
            .journal(durability.journal)
            .build();
        let collection = |name: &str| {
            db.collection_with_options::<Document>(
                name,
                mongodb::options::CollectionOptions::builder()
                    .write_concern(concern.clone())
                    .build(),
            )
        };
        let store = MongoStore {
            messages: collection("message"),
            subscriptions: collection("subscription"),
            published: collection("publishedMessage"),
            retained: collection("retained"),
            qos2: collection("qos2Inflight"),
            qos2_out: collection("qos2Outbound"),
            sessions: collection("session"),
            routes: collection("route"),
            hosts: collection("host"),
            view: Arc::default(),
            change_streams,
            relaxed: WriteConcern::builder()
                .w(Acknowledgment::Nodes(1))
                .journal(false)
                .build(),
            density: Arc::new(std::sync::atomic::AtomicU64::new(0f64.to_bits())),
            auth: Arc::default(),
            db,
        };
        store.ensure_indexes().await?;
        Ok(store)
    }

    /// The view of every host's routes that addresses the messages this store writes.
    pub fn route_view(&self) -> Arc<RouteView> {
        self.view.clone()
    }

    /// Reads users and rules from these collections and fields.
    pub fn with_auth(mut self, auth: AuthCollections) -> MongoStore {
        self.auth = Arc::new(auth);
        self
    }

    async fn ensure_indexes(&self) -> Result<(), StoreError> {
        self.ensure_ttl("message", &self.messages, MESSAGE_TTL_SECS)
            .await?;
        self.ensure_ttl("publishedMessage", &self.published, PUBLISHED_TTL_SECS)
            .await?;
        self.ensure_ttl("qos2Inflight", &self.qos2, PUBLISHED_TTL_SECS)
            .await?;
        self.ensure_ttl("qos2Outbound", &self.qos2_out, PUBLISHED_TTL_SECS)
            .await?;
        let indexes = [
            // Session catch-ups on their own topics (`messages_on`).
            (
                &self.messages,
                doc! { "topic": 1, "created": 1, "_id": 1 },
                "topic_created_id",
                false,
            ),
            (
                &self.messages,
                doc! { "created": 1, "_id": 1 },
                "created_id",
                false,
            ),
            (
                &self.subscriptions,
                doc! { "clientId": 1, "topic": 1 },
                "clientId_topic",
                true,
            ),
            (
                &self.published,
                doc! { "clientId": 1, "messageId": 1 },
                "clientId_messageId",
                true,
            ),
            (
                &self.qos2,
                doc! { "clientId": 1, "pkid": 1 },
                "clientId_pkid",
                true,
            ),
            (
                &self.qos2_out,
                doc! { "clientId": 1, "pkid": 1 },
                "clientId_pkid",
                true,
            ),
            // The session expiry sweep.
            (&self.sessions, doc! { "expiresAt": 1 }, "expiresAt", false),
            // Claims made on other hosts (`claims_since`).
            (&self.sessions, doc! { "updated": 1 }, "updated", false),
            // Groups an edge gives up (`own_groups`).
            (
                &self.sessions,
                doc! { "groupOwner": 1 },
                "groupOwner",
                false,
            ),
            // Whether a shared subscription group has members left.
            (&self.subscriptions, doc! { "topic": 1 }, "topic", false),
            // The follower's poll and sweep: what is addressed to a host.
            (
                &self.messages,
                doc! { "hosts": 1, "created": 1 },
                "hosts_created",
                false,
            ),
            // Route changes since a reader's last read.
            (&self.routes, doc! { "updated": 1 }, "updated", false),
            (
                &self.routes,
                doc! { "host": 1, "filter": 1 },
                "host_filter",
                false,
            ),
        ];
        // `topic_created_id` serves every query the older `topic_created` did.
        if let Err(e) = self.messages.drop_index("topic_created").await {
            tracing::debug!(error = %e, "no index topic_created to drop");
        }
        for (collection, keys, name, unique) in indexes {
            let options = IndexOptions::builder()
                .name(name.to_owned())
                .unique(unique)
                .build();
            collection
                .create_index(IndexModel::builder().keys(keys).options(options).build())
                .await
                .map_err(classify)?;
        }
        Ok(())
    }

    /// The TTL index `created_ttl` on `created`, made or changed to `seconds`.
    async fn ensure_ttl(
        &self,
        name: &str,
        collection: &Collection<Document>,
        seconds: u64,
    ) -> Result<(), StoreError> {
        let existing: Vec<IndexModel> = match collection.list_indexes().await {
            Ok(cursor) => cursor.try_collect().await.map_err(classify)?,
            // A collection that does not exist yet has no indexes.
            Err(e) if matches!(*e.kind, mongodb::error::ErrorKind::Command(ref c) if c.code == NAMESPACE_NOT_FOUND) => {
                Vec::new()
            }
            Err(e) => return Err(classify(e)),
        };
        let current = existing
            .iter()
            .find(|i| i.options.as_ref().and_then(|o| o.name.as_deref()) == Some("created_ttl"))
            .and_then(|i| i.options.as_ref().and_then(|o| o.expire_after));
        match current {
            Some(ttl) if ttl.as_secs() == seconds => Ok(()),
            Some(ttl) => {
                tracing::info!(
                    collection = name,
                    from = ttl.as_secs(),
                    to = seconds,
                    "changing TTL index with collMod"
                );
                self.db
                    .run_command(doc! {
                        "collMod": name,
                        "index": { "name": "created_ttl", "expireAfterSeconds": seconds as i64 },
                    })
                    .await
                    .map_err(classify)?;
                Ok(())
            }
            None => {
                let options = IndexOptions::builder()
                    .name("created_ttl".to_owned())
                    .expire_after(Duration::from_secs(seconds))
                    .build();
                collection
                    .create_index(
                        IndexModel::builder()
                            .keys(doc! { "created": 1 })
                            .options(options)
                            .build(),
                    )
                    .await
                    .map_err(classify)?;
                Ok(())
            }
        }
    }
}

impl RouteStore for MongoStore {
    async fn add_routes(&self, host: &str, filters: &[String]) -> Result<(), StoreError> {
        let now = DateTime::now();
        let docs: Vec<Document> = filters
            .iter()
            .map(|f| doc! { "_id": { "host": host, "filter": f }, "host": host, "filter": f, "updated": now })
            .collect();
        match self.routes.insert_many(docs).ordered(false).await {
            Ok(_) => Ok(()),
            // Written before (a tombstone, or a route from before a restart): revived.
            Err(e) if only_duplicates(&e) => {
                self.routes
                    .update_many(
                        doc! { "host": host, "filter": { "$in": filters }, "removed": true },
                        doc! { "$set": { "updated": now }, "$unset": { "removed": "" } },
                    )
                    .await
                    .map_err(classify)?;
                Ok(())
            }
            Err(e) => Err(classify(e)),
        }
    }

    async fn remove_routes(&self, host: &str, filters: &[String]) -> Result<(), StoreError> {
        self.routes
            .update_many(
                doc! { "host": host, "filter": { "$in": filters } },
                doc! { "$set": { "removed": true, "updated": DateTime::now() } },
            )
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn routes_since(&self, since_ms: Option<i64>) -> Result<Vec<RouteDoc>, StoreError> {
        let filter = match since_ms {
            Some(ms) => doc! { "updated": { "$gte": DateTime::from_millis(ms) } },
            None => doc! { "removed": { "$ne": true } },
        };
        let docs = all(self
            .routes
            .find(filter)
            .projection(doc! { "_id": 0, "host": 1, "filter": 1, "removed": 1 }))
        .await?;
        Ok(docs
            .iter()
            .filter_map(|d| {
                Some(RouteDoc {
                    host: d.get_str("host").ok()?.to_owned(),
                    filter: d.get_str("filter").ok()?.to_owned(),
                    removed: d.get_bool("removed").unwrap_or(false),
                })
            })
            .collect())
    }

    async fn heartbeat(&self, host: &str, now_ms: i64) -> Result<(), StoreError> {
        self.hosts
            .update_one(
                doc! { "_id": host },
                doc! { "$set": { "alive": DateTime::from_millis(now_ms) } },
            )
            .upsert(true)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn heartbeats(&self) -> Result<HashMap<String, i64>, StoreError> {
        let docs = all(self.hosts.find(doc! {}).projection(doc! { "alive": 1 })).await?;
        Ok(docs
            .iter()
            .filter_map(|d| {
                Some((
                    d.get_str("_id").ok()?.to_owned(),
                    d.get_datetime("alive").ok()?.timestamp_millis(),
                ))
            })
            .collect())
    }

    async fn purge_routes(
        &self,
        host: &str,
        before_ms: i64,
        dead: &[String],
    ) -> Result<(), StoreError> {
        self.routes
            .delete_many(doc! {
                "host": host,
                "removed": true,
                "updated": { "$lt": DateTime::from_millis(before_ms) },
            })
            .await
            .map_err(classify)?;
        if !dead.is_empty() {
            self.routes
                .delete_many(doc! { "host": { "$in": dead } })
                .await
                .map_err(classify)?;
            self.hosts
                .delete_many(doc! { "_id": { "$in": dead } })
                .await
                .map_err(classify)?;
            tracing::info!(hosts = ?dead, "forgot the routes of hosts dead for an hour");
        }
        Ok(())
    }
}

impl MessageStore for MongoStore {
    async fn write(&self, write: std::sync::Arc<WriteBatch>) -> Result<(), StoreError> {
        for client in &write.clear_qos2 {
            self.qos2
                .delete_many(doc! { "clientId": client })
                .await
                .map_err(classify)?;
        }
        for (client, pkid) in &write.release_qos2 {
            self.qos2
                .delete_one(doc! { "clientId": client, "pkid": *pkid as i32 })
                .await
                .map_err(classify)?;
        }
        // QoS 2 ids before their messages (see WriteBatch).
        self.record_qos2(&write.record_qos2).await?;
        let batch = &write.messages;
        if batch.is_empty() {
            return Ok(());
        }
        // Addressed as late as possible: a view read just before the write.
        let docs: Vec<Document> = batch
            .iter()
            .map(|m| {
                let mut d = message_doc(m);
                d.insert("hosts", self.view.address(&m.topic, &m.host));
                d
            })
            .collect();
        let mut insert = self.messages.insert_many(docs).ordered(false);
        if write.relaxed {
            insert = insert.write_concern(self.relaxed.clone());
        }
        let fresh: HashSet<usize> = match insert.await {
            Ok(_) => (0..batch.len()).collect(),
            Err(e) if only_duplicates(&e) => {
                let dup: HashSet<usize> = match &*e.kind {
                    mongodb::error::ErrorKind::InsertMany(m) => {
                        m.write_errors.iter().flatten().map(|w| w.index).collect()
                    }
                    _ => HashSet::new(),
                };
                (0..batch.len()).filter(|i| !dup.contains(i)).collect()
            }
            Err(e) => return Err(classify(e)),
        };
        // Retained values, in batch order; a re-sent (duplicate) message changes nothing, and
        // neither does one older than the topic's current retained message (hosts' writes
        // reach the store in any order): only a document created no later is replaced.
        for (i, m) in batch.iter().enumerate() {
            if !m.retain || !fresh.contains(&i) {
                continue;
            }
            let older = doc! { "_id": &m.topic, "created": { "$lte": DateTime::from_millis(m.created_ms) } };
            if m.payload.is_empty() {
                self.retained.delete_one(older).await.map_err(classify)?;
            } else {
                let mut d = message_doc(m);
                d.insert("messageId", oid(&m.id));
                d.insert("_id", &m.topic);
                match self.retained.replace_one(older, d).upsert(true).await {
                    Ok(_) => {}
                    // The upsert's insert met the topic's newer retained message.
                    Err(e) if only_duplicates(&e) => {}
                    Err(e) => return Err(classify(e)),
                }
            }
        }
        Ok(())
    }

    async fn qos2_messages_by_id(&self, ids: Vec<MessageId>) -> Result<Vec<Message>, StoreError> {
        let oids: Vec<ObjectId> = ids.iter().map(oid).collect();
        let docs = all(self.messages.find(doc! { "_id": { "$in": oids } })).await?;
        Ok(docs.iter().filter_map(|d| message_of(d, "_id")).collect())
    }

    async fn qos2_recorded(
        &self,
        keys: Vec<(String, u16)>,
    ) -> Result<HashMap<(String, u16), MessageId>, StoreError> {
        let alternatives: Vec<Document> = keys
            .iter()
            .map(|(c, p)| doc! { "clientId": c, "pkid": *p as i32 })
            .collect();
        let docs = all(self
            .qos2
            .find(doc! { "$or": alternatives })
            .projection(doc! { "clientId": 1, "pkid": 1, "messageId": 1, "_id": 0 }))
        .await?;
        Ok(docs
            .iter()
            .filter_map(|d| {
                Some((
                    (
                        d.get_str("clientId").ok()?.to_owned(),
                        d.get_i32("pkid").ok()? as u16,
                    ),
                    MessageId(d.get_object_id("messageId").ok()?.bytes()),
                ))
            })
            .collect())
    }

    async fn record_delivered(
        &self,
        batch: std::sync::Arc<Vec<Deliveries>>,
    ) -> Result<(), StoreError> {
        self.insert_records(&batch, true).await
    }

    async fn clear_retained(&self, topic: &str) -> Result<(), StoreError> {
        self.retained
            .delete_one(doc! { "_id": topic })
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn retained(&self, prefixes: Option<Vec<String>>) -> Result<Vec<Message>, StoreError> {
        let filter = topic_condition("_id", &prefixes).unwrap_or_default();
        let docs = all(self.retained.find(filter)).await?;
        Ok(docs
            .iter()
            .filter_map(|d| message_of(d, "messageId"))
            .collect())
    }

    async fn messages_after(
        &self,
        after: Cursor,
        not_host: Option<String>,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        // No condition on the topic: the page is read by time alone, as the embedded store
        // reads its blocks, and the caller matches topics. A topic range (or regex) made the
        // MongoDB-wire test server pick the topic index and read every stored message of the
        // topic for each page (0.9 s for a 16 ms window, against 2.4 ms without it:
        // BENCHMARKS.md, tenth round).
        let mut filter = doc! {};
        if let Some(host) = not_host {
            filter.insert("host", doc! { "$ne": host });
        }
        // Plain range scans of the `created_id` index rather than one `$or`, so that any
        // server walks the index in order: the rest of the cursor's millisecond, then time
        // windows after it.
        let sort = doc! { "created": 1, "_id": 1 };
        let mut docs = self.rest_of_millisecond(&filter, after, limit).await?;
        let open_after = wharf_shared::now_ms() + OPEN_AFTER_MS;
        use std::sync::atomic::Ordering::Relaxed;
        let density = f64::from_bits(self.density.load(Relaxed));
        let mut window = if density > 0.0 {
            ((limit - docs.len()) as f64 * 1.25 / density).clamp(1.0, 60_000.0) as i64
        } else {
            FIRST_WINDOW_MS
        };
        let mut low = after.created_ms;
        while docs.len() < limit {
            let wanted = limit - docs.len();
            let mut created = doc! { "$gt": DateTime::from_millis(low) };
            let high = low.saturating_add(window);
            let last = high >= open_after;
            if !last {
                created.insert("$lte", DateTime::from_millis(high));
            }
            let mut windowed = filter.clone();
            windowed.insert("created", created);
            let found = all(self
                .messages
                .find(windowed)
                .sort(sort.clone())
                .limit(wanted as i64))
            .await?;
            let found_here = found.len() as i64;
            let full = found.len() == wanted;
            // Messages per millisecond in this window (up to its last message when the page
            // filled): the next window, and the next page's first, are sized from it.
            let span = match found.last() {
                Some(newest) if full => newest
                    .get_datetime("created")
                    .map_or(window, |t| (t.timestamp_millis() - low).max(1)),
                _ => window,
            };
            if !last && found_here > 0 {
                let seen = found_here as f64 / span as f64;
                self.density.store(seen.to_bits(), Relaxed);
            }
            docs.extend(found);
            if full || last {
                break;
            }
            low = high;
            // A quarter more than should hold the rest of the page, at least twice this
            // window, at most sixteen times (after an empty one: four times).
            let rest = (limit - docs.len()) as i64;
            let estimate = (rest * span * 5 / 4).checked_div(found_here);
            window = estimate.map_or(window.saturating_mul(4), |e| {
                e.clamp(window.saturating_mul(2), window.saturating_mul(16))
            });
        }
        Ok(docs.iter().filter_map(|d| message_of(d, "_id")).collect())
    }

    async fn messages_on(
        &self,
        scope: TopicScope,
        after: Cursor,
        not_host: Option<String>,
        limit: usize,
    ) -> Result<Option<Vec<Message>>, StoreError> {
        // Served by `topic_created_id`: equality (or a range) on the topic, then the cursor
        // on (created, _id), so a page reads the scope's own messages and no others. A prefix
        // is two queries, its own topic and the range of topics under it, each on that index:
        // as one `$or` the MongoDB-wire test server planned a scan of `created` instead
        // (340,000 keys for a prefix holding 20 messages; BENCHMARKS.md).
        let filters = match &scope {
            TopicScope::Exact(topic) => vec![doc! { "topic": topic }],
            TopicScope::Prefix(p) => vec![
                doc! { "topic": p },
                doc! { "topic": { "$gte": format!("{p}/"), "$lt": format!("{p}0") } },
            ],
        };
        let filters: Vec<Document> = filters
            .into_iter()
            .map(|mut f| {
                if let Some(host) = &not_host {
                    f.insert("host", doc! { "$ne": host });
                }
                f
            })
            .collect();
        if let TopicScope::Prefix(_) = scope {
            let mut candidates = 0;
            for filter in &filters {
                let mut counted = filter.clone();
                counted.insert(
                    "created",
                    doc! { "$gte": DateTime::from_millis(after.created_ms) },
                );
                candidates += self
                    .messages
                    .count_documents(counted)
                    .limit(PREFIX_CANDIDATES as u64 + 1)
                    .await
                    .map_err(classify)?;
            }
            if candidates > PREFIX_CANDIDATES as u64 {
                return Ok(None);
            }
        }
        let mut messages = Vec::new();
        for filter in filters {
            let docs = self.after_cursor(filter, after, limit).await?;
            messages.extend(docs.iter().filter_map(|d| message_of(d, "_id")));
        }
        // Two sorted lists (a prefix): merged, the first `limit` kept (each list holds its
        // first `limit`, so none of the merged first `limit` is missing).
        messages.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        messages.truncate(limit);
        Ok(Some(messages))
    }

    async fn message_by_id(&self, id: MessageId) -> Result<Option<Message>, StoreError> {
        let found = self
            .messages
            .find_one(doc! { "_id": oid(&id) })
            .await
            .map_err(classify)?;
        Ok(found.as_ref().and_then(|d| message_of(d, "_id")))
    }

    async fn deliveries_of(
        &self,
        id: MessageId,
        clients: Vec<String>,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        if clients.is_empty() {
            return Ok(Vec::new());
        }
        let docs = all(self
            .published
            .find(doc! { "clientId": { "$in": clients }, "messageId": oid(&id) })
            .projection(doc! { "clientId": 1, "created": 1, "host": 1, "_id": 0 }))
        .await?;
        let mut out: Vec<DeliveryRecord> = Vec::new();
        for d in &docs {
            let Ok(client) = d.get_str("clientId") else {
                continue;
            };
            // A record written twice (a notice re-sent) is shown once, the first.
            if out.iter().any(|r| r.client_id == client) {
                continue;
            }
            out.push(DeliveryRecord {
                client_id: client.to_owned(),
                at_ms: d.get_datetime("created").ok().map(|t| t.timestamp_millis()),
                host: d.get_str("host").ok().map(str::to_owned),
            });
        }
        Ok(out)
    }

    async fn delivered_among(
        &self,
        client_id: &str,
        ids: Vec<MessageId>,
    ) -> Result<HashSet<MessageId>, StoreError> {
        let (Some(first), Some(last)) = (ids.iter().min(), ids.iter().max()) else {
            return Ok(HashSet::new());
        };
        // Ids begin with their second: ids made within a minute are asked for as one range
        // of the index (a superset, matched below), which costs a server far less than a long
        // `$in` (measured 1.5 vs 7 ms for 2,000 ids); the client's records in that minute
        // are few more than the ids asked for.
        let messages = if last.timestamp_secs() - first.timestamp_secs() <= 60 {
            doc! { "$gte": oid(first), "$lte": oid(last) }
        } else {
            doc! { "$in": ids.iter().map(oid).collect::<Vec<ObjectId>>() }
        };
        let docs = all(self
            .published
            .find(doc! { "clientId": client_id, "messageId": messages })
            .projection(doc! { "messageId": 1, "_id": 0 }))
        .await?;
        let asked: HashSet<MessageId> = ids.into_iter().collect();
        Ok(docs
            .iter()
            .filter_map(|d| d.get_object_id("messageId").ok())
            .map(|o| MessageId(o.bytes()))
            .filter(|id| asked.contains(id))
            .collect())
    }
}

impl SubscriptionStore for MongoStore {
    async fn subscriptions(&self, client_id: &str) -> Result<Vec<StoredSubscription>, StoreError> {
        let docs = all(self
            .subscriptions
            .find(doc! { "clientId": client_id })
            .sort(doc! { "topic": 1 }))
        .await?;
        Ok(docs.iter().filter_map(subscription_of).collect())
    }

    async fn upsert_subscriptions(
        &self,
        client_id: &str,
        subscriptions: Vec<Subscription>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        for s in subscriptions {
            // The MQTT 5.0 options are set only when on, so that 3.1.1 subscriptions keep the
            // seed's shape (docs/storage.md).
            let mut set = doc! { "qos": s.qos.as_u8() as i32 };
            let mut unset = Document::new();
            let o = s.options;
            for (field, on) in [
                ("noLocal", o.no_local),
                ("retainAsPublished", o.retain_as_published),
            ] {
                if on {
                    set.insert(field, true);
                } else {
                    unset.insert(field, "");
                }
            }
            match o.identifier {
                Some(id) => {
                    set.insert("subscriptionId", i64::from(id));
                }
                None => {
                    unset.insert("subscriptionId", "");
                }
            }
            let mut update = doc! {
                "$set": set,
                "$setOnInsert": { "_id": ObjectId::new(), "created": DateTime::from_millis(now_ms) },
            };
            update.insert("$unset", unset);
            self.subscriptions
                .update_one(doc! { "clientId": client_id, "topic": &s.filter }, update)
                .upsert(true)
                .await
                .map_err(classify)?;
        }
        Ok(())
    }

    async fn shared_filters(&self, client_id: &str) -> Result<Vec<String>, StoreError> {
        // A range of the `clientId_topic` index: usually empty, one index probe.
        let docs = all(self
            .subscriptions
            .find(doc! {
                "clientId": client_id,
                "topic": { "$gte": "$share/", "$lt": "$share0" },
            })
            .projection(doc! { "topic": 1 }))
        .await?;
        Ok(docs
            .iter()
            .filter_map(|d| d.get_str("topic").ok().map(str::to_owned))
            .collect())
    }

    async fn has_subscribers(&self, filter: &str) -> Result<bool, StoreError> {
        let found = self
            .subscriptions
            .find_one(doc! { "topic": filter })
            .projection(doc! { "_id": 1 })
            .await
            .map_err(classify)?;
        Ok(found.is_some())
    }

    async fn remove_subscriptions(
        &self,
        client_id: &str,
        filters: Option<Vec<String>>,
    ) -> Result<(), StoreError> {
        let filter = match filters {
            None => doc! { "clientId": client_id },
            Some(filters) => doc! { "clientId": client_id, "topic": { "$in": filters } },
        };
        self.subscriptions
            .delete_many(filter)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn subscribers(
        &self,
        filters: Vec<String>,
        shared: bool,
        limit: usize,
    ) -> Result<Vec<(String, StoredSubscription)>, StoreError> {
        let mut alternatives = vec![doc! { "topic": { "$in": filters } }];
        if shared {
            alternatives.push(doc! { "topic": { "$gte": "$share/", "$lt": "$share0" } });
        }
        let docs = all(self
            .subscriptions
            .find(doc! { "$or": alternatives })
            .limit(limit as i64))
        .await?;
        Ok(docs
            .iter()
            .filter_map(|d| Some((d.get_str("clientId").ok()?.to_owned(), subscription_of(d)?)))
            .collect())
    }
}

impl SessionStore for MongoStore {
    async fn track_qos2_out(
        &self,
        client_id: &str,
        pkid: u16,
        message_id: MessageId,
        released: Option<Deliveries>,
    ) -> Result<(), StoreError> {
        // The delivery record first: a crash in between leaves a PUBREL owed and the message
        // delivered, never a message lost.
        // Written durably, unlike `record_delivered`'s: the PUBREL waits for it, and the
        // ordering above only holds if the record outlives a crash of the database.
        let is_released = released.is_some();
        if let Some(row) = released {
            self.insert_records(&[row], false).await?;
        }
        self.qos2_out
            .update_one(
                doc! { "clientId": client_id, "pkid": pkid as i32 },
                doc! {
                    "$set": { "messageId": oid(&message_id), "released": is_released, "created": DateTime::now() },
                    "$setOnInsert": { "_id": ObjectId::new() },
                },
            )
            .upsert(true)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn forget_qos2_out(&self, client_id: &str, pkid: Option<u16>) -> Result<(), StoreError> {
        let filter = match pkid {
            Some(p) => doc! { "clientId": client_id, "pkid": p as i32 },
            None => doc! { "clientId": client_id },
        };
        self.qos2_out.delete_many(filter).await.map_err(classify)?;
        Ok(())
    }

    async fn qos2_out(&self, client_id: &str) -> Result<Vec<(u16, MessageId, bool)>, StoreError> {
        let docs = all(self
            .qos2_out
            .find(doc! { "clientId": client_id })
            .sort(doc! { "created": 1 }))
        .await?;
        Ok(docs
            .iter()
            .filter_map(|d| {
                Some((
                    d.get_i32("pkid").ok()? as u16,
                    MessageId(d.get_object_id("messageId").ok()?.bytes()),
                    d.get_bool("released").unwrap_or(false),
                ))
            })
            .collect())
    }

    async fn claim_session(
        &self,
        client_id: &str,
        host: &str,
        now_ms: i64,
        session_expiry: u32,
    ) -> Result<(bool, Generation), StoreError> {
        let now = DateTime::from_millis(now_ms);
        // By `_id` (the client id): the one index every collection has.
        let before = self
            .sessions
            .find_one_and_update(
                doc! { "_id": client_id },
                doc! {
                    "$set": {
                        "host": host,
                        "updated": now,
                        "sessionExpiry": i64::from(session_expiry),
                    },
                    "$inc": { "claims": 1_i64 },
                    "$setOnInsert": { "clientId": client_id, "created": now, "epoch": now_ms },
                    "$unset": { "expiresAt": "" },
                },
            )
            .upsert(true)
            .return_document(mongodb::options::ReturnDocument::Before)
            .await
            .map_err(classify)?;
        Ok(match before {
            None => (
                false,
                Generation {
                    epoch_ms: now_ms.max(0) as u64,
                    claims: 1,
                },
            ),
            Some(before) => {
                let (generation, persistent) = claim_of(&before);
                let generation = Generation {
                    claims: generation.claims + 1,
                    ..generation
                };
                (persistent, generation)
            }
        })
    }

    async fn drop_session(
        &self,
        client_id: &str,
        owner: Option<&Owner<'_>>,
    ) -> Result<bool, StoreError> {
        let mut filter = doc! { "_id": client_id };
        if let Some(owner) = owner {
            filter.extend(owned_by(owner));
        }
        let deleted = self.sessions.delete_one(filter).await.map_err(classify)?;
        Ok(deleted.deleted_count == 1)
    }

    async fn close_session(
        &self,
        client_id: &str,
        expires_ms: Option<i64>,
        owner: &Owner<'_>,
    ) -> Result<(), StoreError> {
        let update = match expires_ms {
            Some(at) => doc! { "$set": { "expiresAt": DateTime::from_millis(at) } },
            None => doc! { "$unset": { "expiresAt": "" } },
        };
        let mut filter = doc! { "_id": client_id };
        filter.extend(owned_by(owner));
        self.sessions
            .update_one(filter, update)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn expired_sessions(&self, now_ms: i64) -> Result<Vec<String>, StoreError> {
        let docs = all(self
            .sessions
            .find(doc! { "expiresAt": { "$lte": DateTime::from_millis(now_ms) } })
            .projection(doc! { "_id": 1 })
            .limit(1000))
        .await?;
        Ok(docs
            .iter()
            .filter_map(|d| d.get_str("_id").ok().map(str::to_owned))
            .collect())
    }

    async fn drop_expired_session(&self, client_id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let deleted = self
            .sessions
            .delete_one(doc! {
                "_id": client_id,
                "expiresAt": { "$lte": DateTime::from_millis(now_ms) },
            })
            .await
            .map_err(classify)?;
        Ok(deleted.deleted_count == 1)
    }

    async fn sessions_page(
        &self,
        after: Option<String>,
        prefix: String,
        limit: usize,
    ) -> Result<Vec<wharf_shared::SessionSummary>, StoreError> {
        // A range on `_id` (an index scan), not a regex: `prefix` .. `prefix` + U+10FFFF.
        let mut id = doc! { "$gte": &prefix, "$lt": format!("{prefix}\u{10FFFF}") };
        if let Some(after) = after {
            id.insert("$gt", after);
        }
        // Client sessions have a host; groups' and bridges' ownership records do not.
        let docs = all(self
            .sessions
            .find(doc! { "_id": id, "host": { "$exists": true } })
            .projection(doc! { "_id": 1, "host": 1, "updated": 1, "expiresAt": 1 })
            .sort(doc! { "_id": 1 })
            .limit(limit as i64))
        .await?;
        Ok(docs
            .iter()
            .filter_map(|d| {
                Some(wharf_shared::SessionSummary {
                    client_id: d.get_str("_id").ok()?.to_owned(),
                    host: d.get_str("host").unwrap_or_default().to_owned(),
                    updated_ms: d
                        .get_datetime("updated")
                        .map_or(0, |t| t.timestamp_millis()),
                    expires_ms: d
                        .get_datetime("expiresAt")
                        .ok()
                        .map(|t| t.timestamp_millis()),
                    owed: 0,
                    owed_complete: true,
                    oldest_owed_ms: None,
                })
            })
            .collect())
    }
}

impl ClusterStore for MongoStore {
    fn shared_by_hosts(&self) -> bool {
        true
    }

    async fn own_groups(
        &self,
        owner: &str,
        groups: Vec<String>,
        now_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        let now = DateTime::from_millis(now_ms);
        let stale = DateTime::from_millis(now_ms - super::GROUP_LEASE_MS);
        let mut owned = Vec::new();
        for key in &groups {
            // Kept, or taken from an owner gone quiet (by `_id`: one document each).
            let taken = self
                .sessions
                .update_one(
                    doc! {
                        "_id": key,
                        "$or": [
                            { "groupOwner": owner },
                            { "groupLease": { "$lt": stale } },
                            { "groupOwner": { "$exists": false } },
                        ],
                    },
                    doc! { "$set": { "groupOwner": owner, "groupLease": now } },
                )
                .await
                .map_err(classify)?;
            let mine = taken.matched_count == 1
                || match self
                    .sessions
                    .insert_one(doc! { "_id": key, "groupOwner": owner, "groupLease": now })
                    .await
                {
                    Ok(_) => true,
                    // Made meanwhile, or owned by a live edge.
                    Err(e) if only_duplicates(&e) => false,
                    Err(e) => return Err(classify(e)),
                };
            if mine {
                owned.push(key.clone());
            }
        }
        // Given up: groups this edge owned and has no members of any more.
        self.sessions
            .update_many(
                doc! { "groupOwner": owner, "_id": { "$nin": &groups } },
                doc! { "$unset": { "groupOwner": "", "groupLease": "" } },
            )
            .await
            .map_err(classify)?;
        Ok(owned)
    }

    async fn claims_since(&self, since_ms: i64, own_host: &str) -> Result<Vec<Claim>, StoreError> {
        let docs = all(self
            .sessions
            .find(doc! {
                "updated": { "$gte": DateTime::from_millis(since_ms) },
                "host": { "$ne": own_host },
            })
            .projection(doc! { "_id": 1, "epoch": 1, "claims": 1 }))
        .await?;
        Ok(docs
            .iter()
            .filter_map(|d| {
                Some(Claim {
                    client_id: d.get_str("_id").ok()?.to_owned(),
                    generation: claim_of(d).0,
                })
            })
            .collect())
    }

    async fn follow_other_hosts(
        &self,
        own_host: String,
        sink: mpsc::Sender<Vec<Message>>,
        shutdown: CancellationToken,
    ) {
        let mut follower = Follower {
            store: self,
            own_host,
            sink,
            seen: HashMap::new(),
            watermark_ms: wharf_shared::now_ms(),
        };
        if !self.change_streams {
            tracing::info!("following messages addressed to this host by polling every 100 ms");
            while follower
                .poll(&shutdown, Duration::from_secs(3600))
                .await
                .is_ok()
            {}
            return;
        }
        loop {
            match follower.stream(&shutdown).await {
                Ok(()) => return,
                Err(e) => tracing::info!(error = %e, "no change stream; polling every 100 ms"),
            }
            // Poll for a while, then try the change stream again (the server may have become a
            // replica set member).
            if follower
                .poll(&shutdown, Duration::from_secs(60))
                .await
                .is_err()
            {
                return;
            }
        }
    }

    async fn put_host_status(&self, status: wharf_shared::HostStatus) -> Result<(), StoreError> {
        let s = &status;
        let bridges: Vec<Document> = s
            .bridges
            .iter()
            .map(|(name, state)| doc! { "name": name, "state": state })
            .collect();
        let report = doc! {
            "version": &s.version,
            "started": DateTime::from_millis(s.started_ms),
            "reported": DateTime::from_millis(s.reported_ms),
            "connections": s.connections as i64,
            "parkedSessions": s.parked_sessions as i64,
            "messagesInPerSec": s.messages_in_per_sec,
            "messagesOutPerSec": s.messages_out_per_sec,
            "listeners": &s.listeners,
            "groups": &s.groups,
            "bridges": bridges,
            "workerQueuedBytes": s.worker_queued_bytes as i64,
            "workerOldestUnwritten": s.worker_oldest_unwritten_ms.map(DateTime::from_millis),
        };
        self.hosts
            .update_one(
                doc! { "_id": &s.host },
                doc! { "$set": { "status": report, "statusWritten": DateTime::now() } },
            )
            .upsert(true)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn host_statuses(&self) -> Result<Vec<wharf_shared::HostStatus>, StoreError> {
        let docs = all(self.hosts.find(doc! { "status": { "$exists": true } })).await?;
        let ms = |d: &Document, k: &str| d.get_datetime(k).ok().map(|t| t.timestamp_millis());
        let count = |d: &Document, k: &str| {
            d.get_i64(k)
                .ok()
                .or_else(|| d.get_i32(k).ok().map(i64::from))
                .unwrap_or(0)
                .max(0) as u64
        };
        let strings = |d: &Document, k: &str| -> Vec<String> {
            d.get_array(k)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        Ok(docs
            .iter()
            .filter_map(|d| {
                let r = d.get_document("status").ok()?;
                Some(wharf_shared::HostStatus {
                    host: d.get_str("_id").ok()?.to_owned(),
                    version: r.get_str("version").unwrap_or("").to_owned(),
                    started_ms: ms(r, "started").unwrap_or(0),
                    reported_ms: ms(r, "reported").unwrap_or(0),
                    connections: count(r, "connections"),
                    parked_sessions: count(r, "parkedSessions"),
                    messages_in_per_sec: r.get_f64("messagesInPerSec").unwrap_or(0.0),
                    messages_out_per_sec: r.get_f64("messagesOutPerSec").unwrap_or(0.0),
                    listeners: strings(r, "listeners"),
                    groups: strings(r, "groups"),
                    bridges: r
                        .get_array("bridges")
                        .map(|a| {
                            a.iter()
                                .filter_map(|b| {
                                    let b = b.as_document()?;
                                    Some((
                                        b.get_str("name").ok()?.to_owned(),
                                        b.get_str("state").ok()?.to_owned(),
                                    ))
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    worker_queued_bytes: count(r, "workerQueuedBytes"),
                    worker_oldest_unwritten_ms: ms(r, "workerOldestUnwritten"),
                    written_ms: ms(d, "statusWritten").unwrap_or(0),
                })
            })
            .collect())
    }
}

impl AuthStore for MongoStore {
    async fn load_auth(
        &self,
        users: bool,
        rules: bool,
    ) -> Result<(Vec<StoredUser>, Vec<StoredRule>), StoreError> {
        let a = &*self.auth;
        let mut out_users = Vec::new();
        if users {
            let mut cursor = self
                .db
                .collection::<Document>(&a.users)
                .find(a.users_filter.clone())
                .await
                .map_err(classify)?;
            while let Some(doc) = cursor.try_next().await.map_err(classify)? {
                let (Some(username), Some(password_hash)) = (
                    text(&doc, &a.username_field),
                    text(&doc, &a.password_hash_field),
                ) else {
                    tracing::warn!(collection = %a.users, id = ?doc.get("_id"), "user document without a user name or password hash: skipped");
                    continue;
                };
                out_users.push(StoredUser {
                    username,
                    password_hash,
                    salt: text(&doc, &a.salt_field).filter(|s| !s.is_empty()),
                    superuser: truthy(&doc, &a.superuser_field),
                });
            }
        }
        let mut out_rules = Vec::new();
        if rules {
            let mut cursor = self
                .db
                .collection::<Document>(&a.rules)
                .find(a.rules_filter.clone())
                .await
                .map_err(classify)?;
            while let Some(doc) = cursor.try_next().await.map_err(classify)? {
                out_rules.push(rule_of(&doc));
            }
        }
        Ok((out_users, out_rules))
    }

    async fn put_user(&self, user: StoredUser, by: String) -> Result<(), StoreError> {
        let a = &*self.auth;
        // The collection's filter's plain fields go on the document too, so that a user added
        // here is one the filter selects (an upsert copies the query's equalities).
        let mut query = plain_fields(&a.users_filter);
        query.insert(&a.username_field, &user.username);
        let mut set = Document::new();
        set.insert(&a.password_hash_field, &user.password_hash);
        set.insert(&a.superuser_field, user.superuser);
        set.insert("updatedBy", &by);
        set.insert("updated", DateTime::now());
        let mut unset = Document::new();
        match &user.salt {
            Some(salt) => {
                set.insert(&a.salt_field, salt);
            }
            None => {
                unset.insert(&a.salt_field, "");
            }
        }
        let mut update = doc! { "$set": set };
        if !unset.is_empty() {
            update.insert("$unset", unset);
        }
        self.db
            .collection::<Document>(&a.users)
            .update_one(query, update)
            .upsert(true)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn delete_user(&self, username: String, _by: String) -> Result<bool, StoreError> {
        let a = &*self.auth;
        let mut query = a.users_filter.clone();
        query.insert(&a.username_field, &username);
        let deleted = self
            .db
            .collection::<Document>(&a.users)
            .delete_many(query)
            .await
            .map_err(classify)?;
        Ok(deleted.deleted_count > 0)
    }

    async fn put_rule(&self, rule: StoredRule, by: String) -> Result<(), StoreError> {
        let a = &*self.auth;
        let mut document = plain_fields(&a.rules_filter);
        if let Some(username) = &rule.username {
            document.insert("username", username);
        }
        if let Some(client_id) = &rule.client_id {
            document.insert("clientid", client_id);
        }
        document.insert("permission", &rule.permission);
        document.insert("action", &rule.action);
        document.insert("topics", &rule.topics);
        document.insert("createdBy", &by);
        document.insert("created", DateTime::now());
        self.db
            .collection::<Document>(&a.rules)
            .insert_one(document)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn delete_rule(&self, rule: StoredRule, _by: String) -> Result<u64, StoreError> {
        let a = &*self.auth;
        let mut query = a.rules_filter.clone();
        // `null` also matches a missing field; EMQX 4 documents name one topic as `topic`.
        query.insert(
            "username",
            rule.username.as_deref().map_or(Bson::Null, Bson::from),
        );
        query.insert(
            "clientid",
            rule.client_id.as_deref().map_or(Bson::Null, Bson::from),
        );
        query.insert("permission", &rule.permission);
        query.insert("action", &rule.action);
        let mut topics = vec![doc! { "topics": &rule.topics }];
        if let [one] = rule.topics.as_slice() {
            topics.push(doc! { "topics": { "$exists": false }, "topic": one });
            topics.push(doc! { "topics": one });
        }
        query.insert("$or", topics);
        let deleted = self
            .db
            .collection::<Document>(&a.rules)
            .delete_many(query)
            .await
            .map_err(classify)?;
        Ok(deleted.deleted_count)
    }
}

impl Store for MongoStore {
    async fn ping(&self) -> Result<(), StoreError> {
        let ping = self.db.run_command(doc! { "ping": 1 });
        match tokio::time::timeout(Duration::from_secs(2), ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(classify(e)),
            Err(_) => Err(StoreError::Unavailable("ping timed out".into())),
        }
    }
}

/// A session record's generation, and whether it is a persistent session's (records from
/// before `sessionExpiry` was kept are).
fn claim_of(record: &Document) -> (Generation, bool) {
    let number = |field: &str| match record.get(field) {
        Some(Bson::Int64(n)) => (*n).max(0) as u64,
        Some(Bson::Int32(n)) => (*n).max(0) as u64,
        _ => 0,
    };
    let persistent = !matches!(
        record.get("sessionExpiry"),
        Some(Bson::Int64(0) | Bson::Int32(0))
    );
    (
        Generation {
            epoch_ms: number("epoch"),
            claims: number("claims"),
        },
        persistent,
    )
}

/// The condition that a session record is still `owner`'s claim.
fn owned_by(owner: &Owner<'_>) -> Document {
    let mut filter = doc! { "host": owner.host };
    if let Some(g) = owner.generation {
        // Records from before generations were kept have neither field.
        let epoch = if g.epoch_ms == 0 {
            Bson::Document(doc! { "$exists": false })
        } else {
            Bson::Int64(g.epoch_ms as i64)
        };
        filter.insert("epoch", epoch);
        filter.insert("claims", g.claims as i64);
    }
    filter
}

use wharf_shared::LATE_MS;
const POLL_EVERY: Duration = Duration::from_millis(100);

/// Follows other workers' inserts: a change stream where the server has one, else a poll of
/// the `created` index. Remembers recent ids so that overlapping reads send nothing twice.
struct Follower<'a> {
    store: &'a MongoStore,
    own_host: String,
    sink: mpsc::Sender<Vec<Message>>,
    seen: HashMap<MessageId, i64>,
    watermark_ms: i64,
}

/// Why following stopped: the sink or the process is going away.
struct Stopped;

impl Follower<'_> {
    /// Sends the messages not sent before; `Err` when nobody listens any more.
    async fn send(&mut self, messages: Vec<Message>) -> Result<(), Stopped> {
        let fresh: Vec<Message> = messages
            .into_iter()
            .filter(|m| self.seen.insert(m.id, m.created_ms).is_none())
            .collect();
        if let Some(newest) = fresh.iter().map(|m| m.created_ms).max() {
            self.watermark_ms = self.watermark_ms.max(newest);
        }
        let horizon = self.watermark_ms - 2 * LATE_MS;
        if self.seen.len() > 10_000 {
            self.seen.retain(|_, created| *created >= horizon);
        }
        if fresh.is_empty() {
            return Ok(());
        }
        self.sink.send(fresh).await.map_err(|_| Stopped)
    }

    /// Everything addressed to this host (or to every host) since the watermark, less the
    /// lateness allowance, page by page: a busy window holds more than one page.
    async fn sweep(&mut self) -> Result<(), Stopped> {
        self.sweep_back(LATE_MS).await
    }

    /// [`Follower::sweep`] over the last `back_ms` before the watermark only.
    async fn sweep_back(&mut self, back_ms: i64) -> Result<(), Stopped> {
        const PAGE: usize = 10_000;
        let since = Cursor::since(self.watermark_ms - back_ms);
        let mut found = Vec::new();
        for address in [self.own_host.clone(), EVERY_HOST.to_owned()] {
            let mut after = since;
            loop {
                let page = match self
                    .store
                    .addressed_after(&address, &self.own_host, after, PAGE)
                    .await
                {
                    Ok(page) => page,
                    Err(e) => {
                        tracing::warn!(error = %e, "polling for messages addressed here failed");
                        return Ok(());
                    }
                };
                let next = Cursor::after_full_page(&page, PAGE);
                found.extend(page);
                match next {
                    Some(next) => after = next,
                    None => break,
                }
            }
        }
        // The two addresses' messages in one order (a publishing host addresses to every host
        // only while its routes are stale).
        found.sort_by_key(|m| (m.created_ms, m.id));
        for page in found.chunks(PAGE) {
            self.send(page.to_vec()).await?;
        }
        Ok(())
    }

    async fn poll(
        &mut self,
        shutdown: &CancellationToken,
        for_how_long: Duration,
    ) -> Result<(), Stopped> {
        // Most messages are stored within moments of being made: each poll reads back
        // `RECENT_MS`, every tenth the whole lateness allowance (a message stored later than
        // `RECENT_MS` comes up to a second late, not never). Reading the whole allowance each
        // time read every addressed message twenty times.
        const RECENT_MS: i64 = 300;
        let until = tokio::time::Instant::now() + for_how_long;
        let mut polls = 0u32;
        while tokio::time::Instant::now() < until {
            let back = if polls % 10 == 0 { LATE_MS } else { RECENT_MS };
            polls = polls.wrapping_add(1);
            self.sweep_back(back).await?;
            tokio::select! {
                _ = tokio::time::sleep(POLL_EVERY) => {}
                _ = shutdown.cancelled() => return Err(Stopped),
            }
        }
        Ok(())
    }

    /// Follows a change stream; `Ok` on shutdown, `Err` when the stream is not available or
    /// breaks (the caller polls meanwhile; resuming after a sweep closes the gap).
    async fn stream(&mut self, shutdown: &CancellationToken) -> Result<(), String> {
        // Only what is addressed here: a host is sent what its sessions want, not the cluster's
        // traffic.
        let pipeline = vec![doc! { "$match": {
            "operationType": "insert",
            "fullDocument.hosts": { "$in": [&self.own_host, EVERY_HOST] },
            "fullDocument.host": { "$ne": &self.own_host },
        } }];
        let mut stream = self
            .store
            .messages
            .watch()
            .pipeline(pipeline)
            .await
            .map_err(|e| classify(e).to_string())?;
        tracing::info!("following messages addressed to this host through a change stream");
        // What was stored before the stream opened.
        if self.sweep().await.is_err() {
            return Ok(());
        }
        loop {
            let event = tokio::select! {
                e = stream.next() => e,
                _ = shutdown.cancelled() => return Ok(()),
            };
            let mut batch = Vec::new();
            let mut next = event;
            loop {
                match next {
                    Some(Ok(event)) => {
                        if let Some(m) = event
                            .full_document
                            .as_ref()
                            .and_then(|d| message_of(d, "_id"))
                        {
                            batch.push(m);
                        }
                    }
                    Some(Err(e)) => return Err(classify(e).to_string()),
                    None => return Err("change stream ended".into()),
                }
                if batch.len() >= 1_000 {
                    break;
                }
                // Take whatever else is already there, without waiting.
                match stream.next().now_or_never() {
                    Some(more) => next = more,
                    None => break,
                }
            }
            if self.send(batch).await.is_err() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("failed mongodb://wharf:s3cret@db1:27017,db2/?x=1 now"),
            "failed mongodb://wharf:***@db1:27017,db2/?x=1 now"
        );
        assert_eq!(redact("mongodb://db1:27017/"), "mongodb://db1:27017/");
    }

    #[test]
    fn payloads_are_strings_when_utf8() {
        assert_eq!(data_of(b"1.5,2"), Bson::String("1.5,2".into()));
        assert!(matches!(data_of(&[0xff, 0]), Bson::Binary(_)));
        assert_eq!(payload_of(Some(&data_of(&[0xff, 0]))), vec![0xff, 0]);
    }
}
