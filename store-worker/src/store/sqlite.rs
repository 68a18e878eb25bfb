//! The embedded store: one SQLite file in the data directory, WAL journal with
//! `synchronous=FULL`, so a committed transaction survives a power cut. What nobody waits for
//! (QoS 0 messages, delivery records) is committed without an fsync and reaches the disk with
//! the next durable commit. Calls run on the blocking pool; a batch is one transaction (group
//! commit). Expired rows are purged every minute with the same TTLs as the MongoDB indexes.

use super::{
    AuthStore, ClusterStore, Deliveries, DeliveryRecord, MessageStore, Owner, SessionStore, Store,
    StoreError, StoredSubscription, SubscriptionStore, TopicScope, WriteBatch, MESSAGE_TTL_SECS,
    PREFIX_CANDIDATES,
};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use wharf_shared::{
    Cursor, Generation, Message, MessageId, Qos, StoredRule, StoredUser, Subscription,
    SubscriptionOptions,
};

const PRAGMAS: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = FULL;
";

/// The layout `SCHEMA` creates; older files are brought to it by [`migrate`].
const SCHEMA_VERSION: i64 = 10;

/// A delivery notice with at least this many records is stored as record blocks (one row per
/// block); smaller ones (a fan-out's one message per subscriber) as a row per record, which
/// costs one B-tree insert instead of a block's three.
const RECORD_BLOCK_MIN: usize = 8;

/// Most seconds between the first and last message id of a record block (ids begin with their
/// creation second): a lookup of ids from second s reads the client's blocks that begin from
/// s - RECORD_BLOCK_SPAN_SECS on.
const RECORD_BLOCK_SPAN_SECS: u32 = 2;

/// Most ids in a record block.
const RECORD_BLOCK_IDS: usize = 4096;

/// Most milliseconds between the oldest and newest message of a block: a catch-up from time t
/// starts at the blocks whose oldest message is from t - BLOCK_SPAN_MS.
const BLOCK_SPAN_MS: i64 = 10;

/// Most messages in a block: what a catch-up page decodes beyond what it returns.
const BLOCK_MESSAGES: usize = 2048;

/// A `message_topic` row's key is its block's `seq` shifted by this, plus its place among
/// the block's topics (fewer than [`BLOCK_MESSAGES`]).
const TOPIC_ROWS_SHIFT: u32 = 16;

/// Messages are stored in blocks: the messages of one write, in creation order, encoded in one
/// row (at most [`BLOCK_SPAN_MS`] between its oldest and newest, at most [`BLOCK_MESSAGES`]).
/// Each block has a `message_topic` row per topic it holds: the topic, its first message's
/// creation time and where its messages lie in the block (spans of offset and length), keyed
/// by the block's `seq` shifted by [`TOPIC_ROWS_SHIFT`] plus the row's place in the block, so
/// that the rows of a block sort with it and the purge drops them by one key range. A session
/// catch-up on its own topics reads those rows (index on topic, first) and only the bytes of
/// its messages (incremental blob reads); one that must read every topic reads the blocks by
/// their oldest message. The TTL purge drops whole blocks. Only QoS 2
/// messages are looked up by id (see `Store::qos2_messages_by_id`), so only they are indexed
/// by id, which also keeps a re-sent QoS 2 message from being stored twice.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS message_block (
    seq INTEGER PRIMARY KEY, oldest INTEGER NOT NULL, newest INTEGER NOT NULL, data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS message_block_oldest ON message_block (oldest);
CREATE TABLE IF NOT EXISTS qos2_message (id BLOB PRIMARY KEY, block INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS message_topic (
    id INTEGER PRIMARY KEY, topic TEXT NOT NULL, first INTEGER NOT NULL, spans BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS message_topic_topic ON message_topic (topic, first);
CREATE TABLE IF NOT EXISTS subscription (
    client_id TEXT NOT NULL, topic TEXT NOT NULL, qos INTEGER NOT NULL, created INTEGER NOT NULL,
    options INTEGER NOT NULL DEFAULT 0, identifier INTEGER,
    PRIMARY KEY (client_id, topic)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS subscription_topic ON subscription (topic);
CREATE TABLE IF NOT EXISTS published_message (
    message_id BLOB NOT NULL, client_id TEXT NOT NULL, created INTEGER NOT NULL,
    PRIMARY KEY (message_id, client_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS delivery_block (
    seq INTEGER PRIMARY KEY, client_id TEXT NOT NULL, first BLOB NOT NULL, last BLOB NOT NULL,
    ids BLOB NOT NULL, created INTEGER
);
CREATE INDEX IF NOT EXISTS delivery_block_span ON delivery_block (client_id, first, last);
CREATE INDEX IF NOT EXISTS delivery_block_last ON delivery_block (last);
CREATE TABLE IF NOT EXISTS qos2_inflight (
    client_id TEXT NOT NULL, pkid INTEGER NOT NULL, message_id BLOB NOT NULL,
    created INTEGER NOT NULL, PRIMARY KEY (client_id, pkid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS qos2_outbound (
    client_id TEXT NOT NULL, pkid INTEGER NOT NULL, message_id BLOB NOT NULL,
    released INTEGER NOT NULL, created INTEGER NOT NULL, PRIMARY KEY (client_id, pkid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS session (
    client_id TEXT PRIMARY KEY, host TEXT NOT NULL, created INTEGER NOT NULL,
    updated INTEGER NOT NULL, expires INTEGER, epoch INTEGER NOT NULL DEFAULT 0,
    claims INTEGER NOT NULL DEFAULT 0, session_expiry INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS session_expires ON session (expires) WHERE expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS retained (
    topic TEXT PRIMARY KEY, id BLOB NOT NULL, data BLOB NOT NULL, client_id TEXT NOT NULL,
    qos INTEGER NOT NULL, created INTEGER NOT NULL, host TEXT NOT NULL, properties BLOB
) WITHOUT ROWID;
";

/// Columns added since a table was first made: (table, column, declaration). A file from
/// before gets them when it is opened.
const ADDED_COLUMNS: [(&str, &str, &str); 8] = [
    ("subscription", "options", "INTEGER NOT NULL DEFAULT 0"),
    ("subscription", "identifier", "INTEGER"),
    ("session", "expires", "INTEGER"),
    ("session", "epoch", "INTEGER NOT NULL DEFAULT 0"),
    ("session", "claims", "INTEGER NOT NULL DEFAULT 0"),
    ("session", "session_expiry", "INTEGER"),
    ("retained", "properties", "BLOB"),
    ("delivery_block", "created", "INTEGER"),
];

/// Subscription option bits in `subscription.options`.
const NO_LOCAL: i64 = 1;
const RETAIN_AS_PUBLISHED: i64 = 2;

/// Older layouts, by `PRAGMA user_version`: 0 kept a row per message keyed by id with a second
/// B-tree on (created, id), and delivery records keyed (client_id, message_id) with a second
/// B-tree on created; 2 and 3 kept a row per message keyed (created, id), 3 had today's
/// records. Their rows move to the current tables in one transaction. 4 lacked record blocks
/// (its record rows stay where they are); 5 lacked session records (a session with
/// subscriptions is known by them, as it was then); 6 lacked the MQTT 5.0 columns
/// ([`ADDED_COLUMNS`]; its message blocks are read as they are, see
/// `wharf_shared::codec::decode_stored_block`); 7 lacked session generations (its records
/// start at generation (0, 1) at their next claim); 8 indexed record blocks by (client_id,
/// first) only.
fn migrate(c: &mut Connection) -> rusqlite::Result<()> {
    let version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version >= SCHEMA_VERSION {
        return Ok(());
    }
    let tx = c.transaction()?;
    let exists = |name: &str| {
        tx.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [name],
            |r| Ok(r.get::<_, i64>(0)? > 0),
        )
    };
    let old_messages = exists("message")?;
    let old_records = version < 3 && exists("published_message")?;
    if old_messages {
        tx.execute_batch("ALTER TABLE message RENAME TO message_old")?;
    }
    if old_records {
        tx.execute_batch("ALTER TABLE published_message RENAME TO published_message_old")?;
    }
    for (table, column, declaration) in ADDED_COLUMNS {
        let has_table = exists(table)?;
        let has_column = has_table
            && tx
                .prepare(&format!(
                    "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
                ))?
                .exists([column])?;
        if has_table && !has_column {
            tx.execute_batch(&format!(
                "ALTER TABLE {table} ADD COLUMN {column} {declaration}"
            ))?;
        }
    }
    // Version 8's index on (client_id, first) made a catch-up page read every record block of
    // the last two seconds from the table to compare its `last`; `delivery_block_span` holds it.
    tx.execute_batch("DROP INDEX IF EXISTS delivery_block_client")?;
    tx.execute_batch(SCHEMA)?;
    if version < 10 && exists("message_block")? {
        // Version 9 and older had no topic index: every block gets its rows (and the current
        // layout, whose spans they name).
        index_topics(&tx)?;
    }
    if old_messages {
        let mut rows = tx.prepare(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM message_old ORDER BY created, id"
        ))?;
        let mut pending = Vec::new();
        for m in rows.query_map([], message_row)? {
            pending.push(m?);
            if pending.len() == 64 * BLOCK_MESSAGES {
                insert_blocks(&tx, pending.iter().collect())?;
                pending.clear();
            }
        }
        insert_blocks(&tx, pending.iter().collect())?;
        tx.execute_batch("DROP TABLE message_old")?;
    }
    if old_records {
        tx.execute_batch(
            "INSERT OR IGNORE INTO published_message (message_id, client_id, created)
             SELECT message_id, client_id, created FROM published_message_old;
             DROP TABLE published_message_old;",
        )?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()
}

/// An [`Owner`] as statement parameters (`epoch` NULL: any claim by the host).
struct OwnerRow {
    host: String,
    epoch: Option<i64>,
    claims: i64,
}

impl OwnerRow {
    fn of(owner: &Owner<'_>) -> OwnerRow {
        OwnerRow {
            host: owner.host.to_owned(),
            epoch: owner.generation.map(|g| g.epoch_ms as i64),
            claims: owner.generation.map_or(0, |g| g.claims as i64),
        }
    }
}

/// Writes `messages` (creation order not needed) as blocks, and indexes their QoS 2 ones.
fn insert_blocks(
    tx: &rusqlite::Transaction<'_>,
    mut messages: Vec<&Message>,
) -> rusqlite::Result<()> {
    // Stable: messages of one millisecond keep the order they were received in.
    messages.sort_by_key(|m| m.created_ms);
    let mut insert =
        tx.prepare_cached("INSERT INTO message_block (oldest, newest, data) VALUES (?1, ?2, ?3)")?;
    let mut index =
        tx.prepare_cached("INSERT OR IGNORE INTO qos2_message (id, block) VALUES (?1, ?2)")?;
    for block in spans(&messages, BLOCK_MESSAGES, |first, m| {
        m.created_ms - first.created_ms <= BLOCK_SPAN_MS
    }) {
        let (first, newest) = (block[0].created_ms, block[block.len() - 1].created_ms);
        let (data, spans) = wharf_shared::codec::encode_stored_block_indexed(block)
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        insert.execute(params![first, newest, data])?;
        let seq = tx.last_insert_rowid();
        for m in block.iter().filter(|m| m.qos == Qos::ExactlyOnce) {
            index.execute(params![&m.id.0[..], seq])?;
        }
        insert_topic_rows(tx, seq, block, &spans)?;
    }
    Ok(())
}

/// The `message_topic` rows of block `seq`: one per topic, in the order topics first appear.
fn insert_topic_rows(
    tx: &rusqlite::Transaction<'_>,
    seq: i64,
    block: &[&Message],
    spans: &[wharf_shared::codec::BlockSpan],
) -> rusqlite::Result<()> {
    let mut rows: Vec<(&str, i64, Vec<u8>)> = Vec::new();
    let mut place: std::collections::HashMap<&str, usize> = Default::default();
    for (m, span) in block.iter().zip(spans) {
        let i = *place.entry(m.topic.as_str()).or_insert_with(|| {
            rows.push((m.topic.as_str(), m.created_ms, Vec::new()));
            rows.len() - 1
        });
        rows[i].2.extend(span.offset.to_be_bytes());
        rows[i].2.extend(span.len.to_be_bytes());
    }
    let mut insert = tx.prepare_cached(
        "INSERT INTO message_topic (id, topic, first, spans) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for (i, (topic, first, spans)) in rows.iter().enumerate() {
        insert.execute(params![
            (seq << TOPIC_ROWS_SHIFT) + i as i64,
            topic,
            first,
            spans
        ])?;
    }
    Ok(())
}

/// Spans (offset, length) as `insert_topic_rows` packs them.
fn unpack_spans(packed: &[u8]) -> impl Iterator<Item = (usize, usize)> + '_ {
    packed.chunks_exact(8).map(|c| {
        let offset = u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize;
        let len = u32::from_be_bytes([c[4], c[5], c[6], c[7]]) as usize;
        (offset, len)
    })
}

/// A `message_topic` row: (key, first message's creation time, packed spans).
type TopicRow = (i64, i64, Vec<u8>);

/// The messages that `rows` (in order of their first message) point at and `keep` accepts,
/// each once, oldest first, at most `limit`: stops at the first row that begins after the
/// last of `limit` messages kept. Reads only each message's bytes from its block.
fn read_topic_rows(
    c: &Connection,
    rows: impl Iterator<Item = rusqlite::Result<TopicRow>>,
    limit: usize,
    keep: impl Fn(&Message) -> bool,
) -> rusqlite::Result<Vec<Message>> {
    let mut found: Vec<Message> = Vec::new();
    let mut ids = HashSet::new();
    let mut buf = Vec::new();
    let mut open: Option<(i64, rusqlite::blob::Blob<'_>)> = None;
    for row in rows {
        let (key, first, spans) = row?;
        if found.len() >= limit {
            found.sort_by_key(|m| (m.created_ms, m.id));
            found.truncate(limit);
            if first > found[limit - 1].created_ms {
                break;
            }
        }
        let seq = key >> TOPIC_ROWS_SHIFT;
        if open.as_ref().is_none_or(|(s, _)| *s != seq) {
            open = match c.blob_open(rusqlite::MAIN_DB, "message_block", "data", seq, true) {
                Ok(blob) => Some((seq, blob)),
                // The block was purged since its rows were read: no such row.
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::Unknown =>
                {
                    continue
                }
                Err(e) => return Err(e),
            };
        }
        let Some((_, blob)) = open.as_mut() else {
            continue;
        };
        for (offset, len) in unpack_spans(&spans) {
            buf.resize(len, 0);
            blob.read_at_exact(&mut buf, offset)?;
            let m = wharf_shared::codec::decode_stored_message(&buf).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    0,
                    rusqlite::types::Type::Blob,
                    Box::new(e),
                )
            })?;
            if keep(&m) && ids.insert(m.id) {
                found.push(m);
            }
        }
    }
    found.sort_by_key(|m| (m.created_ms, m.id));
    found.truncate(limit);
    Ok(found)
}

/// Re-encodes every block in the current layout and gives it its `message_topic` rows (files
/// from before the topic index, version 9 and older).
fn index_topics(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    let mut last = i64::MIN;
    loop {
        let batch: Vec<(i64, Vec<u8>)> = tx
            .prepare("SELECT seq, data FROM message_block WHERE seq > ?1 ORDER BY seq LIMIT 256")?
            .query_map([last], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let Some(&(end, _)) = batch.last() else {
            return Ok(());
        };
        for (seq, data) in batch {
            let messages = decode_block(&data)?;
            let refs: Vec<&Message> = messages.iter().collect();
            let (data, spans) = wharf_shared::codec::encode_stored_block_indexed(&refs)
                .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
            tx.execute(
                "UPDATE message_block SET data = ?2 WHERE seq = ?1",
                params![seq, data],
            )?;
            insert_topic_rows(tx, seq, &refs, &spans)?;
        }
        last = end;
    }
}

/// Writes one client's delivery records as blocks of ids (sorted, concatenated), each within
/// [`RECORD_BLOCK_SPAN_SECS`] and [`RECORD_BLOCK_IDS`].
fn insert_record_blocks(
    tx: &rusqlite::Transaction<'_>,
    client_id: &str,
    mut ids: Vec<MessageId>,
    created_ms: i64,
) -> rusqlite::Result<()> {
    ids.sort_unstable();
    ids.dedup();
    let mut insert = tx.prepare_cached(
        "INSERT INTO delivery_block (client_id, first, last, ids, created)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for block in spans(&ids, RECORD_BLOCK_IDS, |first, id| {
        id.timestamp_secs() - first.timestamp_secs() <= RECORD_BLOCK_SPAN_SECS
    }) {
        let (first, last) = (&block[0], &block[block.len() - 1]);
        let data: Vec<u8> = block.iter().flat_map(|id| id.0).collect();
        insert.execute(params![
            client_id,
            &first.0[..],
            &last.0[..],
            data,
            created_ms
        ])?;
    }
    Ok(())
}

/// Splits sorted `items` into runs of at most `max`, each holding what is `within` reach of
/// its first item; none is empty.
fn spans<'a, T>(
    items: &'a [T],
    max: usize,
    within: impl Fn(&T, &T) -> bool + 'a,
) -> impl Iterator<Item = &'a [T]> + 'a {
    let mut rest = items;
    std::iter::from_fn(move || {
        let first = rest.first()?;
        let len = rest
            .iter()
            .take(max.max(1))
            .take_while(|item| within(first, item))
            .count();
        let (span, after) = rest.split_at(len);
        rest = after;
        Some(span)
    })
}

/// Writes one notice's delivery records: as blocks of ids when it has [`RECORD_BLOCK_MIN`] or
/// more, else a row each.
fn insert_deliveries(tx: &rusqlite::Transaction<'_>, d: &Deliveries) -> rusqlite::Result<()> {
    if d.records.len() >= RECORD_BLOCK_MIN {
        let ids = d.records.iter().map(|r| r.message_id).collect();
        return insert_record_blocks(tx, &d.client_id, ids, d.created_ms);
    }
    let mut insert = tx.prepare_cached(RECORD_DELIVERY)?;
    for r in &d.records {
        insert.execute(params![&r.message_id.0[..], d.client_id, d.created_ms])?;
    }
    Ok(())
}

/// A subscription from the columns `topic, qos, created, options, identifier` at `at`.
fn subscription_row(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<StoredSubscription> {
    let options: i64 = r.get(at + 3)?;
    Ok(StoredSubscription {
        filter: r.get(at)?,
        qos: qos_of(r.get(at + 1)?),
        created_ms: r.get(at + 2)?,
        options: SubscriptionOptions {
            no_local: options & NO_LOCAL != 0,
            retain_as_published: options & RETAIN_AS_PUBLISHED != 0,
            identifier: r.get::<_, Option<u32>>(at + 4)?,
        },
    })
}

fn decode_block(data: &[u8]) -> rusqlite::Result<Vec<Message>> {
    wharf_shared::codec::decode_stored_block(data).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, Box::new(e))
    })
}

/// Why the embedded store refuses to keep users and rules (a password and a rule file do
/// that on one machine).
const STORE_AUTH_MONGODB: &str =
    "users and rules are kept in the store with the MongoDB backend only (here: a password file and a rule file)";

#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    /// The hosts' last reports: one host uses this store, and its edge reports again within
    /// seconds of a restart, so they are not written to the file.
    statuses: Arc<Mutex<std::collections::HashMap<String, wharf_shared::HostStatus>>>,
}

fn failed(e: rusqlite::Error) -> StoreError {
    StoreError::Failed(e.to_string())
}

fn qos_of(value: i64) -> Qos {
    Qos::from_u8(value as u8).unwrap_or(Qos::AtMostOnce)
}

fn id_of(bytes: &[u8]) -> MessageId {
    let mut id = [0u8; 12];
    if bytes.len() == 12 {
        id.copy_from_slice(bytes);
    }
    MessageId(id)
}

/// `publishedMessage` rows, keyed by message id first: ids begin with their creation time
/// (ObjectId layout), so records are appended in time order and purged by a key range.
/// Topic and host are not kept: the embedded store's records are only read to filter catch-up.
const RECORD_DELIVERY: &str =
    "INSERT OR IGNORE INTO published_message (message_id, client_id, created) VALUES (?1, ?2, ?3)";

/// The first bytes of the ids of messages created at `ms`: every id created earlier sorts
/// below it.
fn id_time_prefix(ms: i64) -> [u8; 4] {
    ((ms.max(0) / 1000) as u32).to_be_bytes()
}

const MESSAGE_COLUMNS: &str = "id, topic, data, qos, retain, client_id, host, created";

fn message_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
    Ok(Message {
        id: id_of(&row.get::<_, Vec<u8>>(0)?),
        topic: row.get(1)?,
        payload: row.get(2)?,
        qos: qos_of(row.get(3)?),
        retain: row.get(4)?,
        client_id: row.get(5)?,
        host: row.get(6)?,
        created_ms: row.get(7)?,
        properties: None,
    })
}

/// A `retained` row: [`message_row`]'s columns, then the properties.
fn retained_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
    let mut message = message_row(row)?;
    if let Some(data) = row.get::<_, Option<Vec<u8>>>(8)? {
        message.properties = Some(Box::new(wharf_shared::codec::decode_body(&data).map_err(
            |e| {
                rusqlite::Error::FromSqlConversionFailure(
                    8,
                    rusqlite::types::Type::Blob,
                    Box::new(e),
                )
            },
        )?));
    }
    Ok(message)
}

impl SqliteStore {
    /// Opens (or creates) `wharf.db` in `dir`.
    pub fn open(dir: &Path) -> Result<SqliteStore, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Failed(format!("create {}: {e}", dir.display())))?;
        let mut conn = Connection::open(dir.join("wharf.db")).map_err(failed)?;
        conn.execute_batch(PRAGMAS).map_err(failed)?;
        migrate(&mut conn).map_err(failed)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            statuses: Default::default(),
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut conn).map_err(failed)
        })
        .await
        .map_err(|e| StoreError::Failed(format!("store task: {e}")))?
    }

    /// Deletes what is past its TTL; returns (message blocks, records) deleted. A delivery record
    /// goes with its message (30 days after the message was created, read from the time at
    /// the head of its id), not 7 days after the delivery as in MongoDB: it only exists to keep
    /// that message from being delivered again, and the id leads its key, so the purge is a
    /// range delete instead of a second index on every record.
    pub async fn purge_expired(&self, now_ms: i64) -> Result<(usize, usize), StoreError> {
        self.with(move |c| {
            let message_cutoff = now_ms - MESSAGE_TTL_SECS as i64 * 1000;
            // A block goes once its newest message has expired (`oldest <` is implied by it
            // and lets SQLite use the index on oldest instead of scanning every block).
            c.execute(
                "DELETE FROM qos2_message WHERE block IN
                 (SELECT seq FROM message_block WHERE oldest < ?1 AND newest < ?1)",
                [message_cutoff],
            )?;
            let blocks = c.execute(
                "DELETE FROM message_block WHERE oldest < ?1 AND newest < ?1",
                [message_cutoff],
            )?;
            // Topic rows of every block before the oldest one left (keys follow blocks).
            let oldest_left: Option<i64> =
                c.query_row("SELECT min(seq) FROM message_block", [], |r| r.get(0))?;
            match oldest_left {
                Some(seq) => c.execute(
                    "DELETE FROM message_topic WHERE id < ?1",
                    [seq << TOPIC_ROWS_SHIFT],
                )?,
                None => c.execute("DELETE FROM message_topic", [])?,
            };
            let records = c.execute(
                "DELETE FROM published_message WHERE message_id < ?1",
                [&id_time_prefix(message_cutoff)[..]],
            )? + c.execute(
                "DELETE FROM delivery_block WHERE last < ?1",
                [&id_time_prefix(message_cutoff)[..]],
            )?;
            Ok((blocks, records))
        })
        .await
    }
}

impl MessageStore for SqliteStore {
    async fn write(&self, batch: Arc<WriteBatch>) -> Result<(), StoreError> {
        self.with(move |c| {
            if batch.relaxed {
                without_fsync(c, |c| write_batch(c, &batch))
            } else {
                write_batch(c, &batch)
            }
        })
        .await
    }

    async fn qos2_messages_by_id(&self, ids: Vec<MessageId>) -> Result<Vec<Message>, StoreError> {
        self.with(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT b.data FROM qos2_message q JOIN message_block b ON b.seq = q.block
                 WHERE q.id = ?1",
            )?;
            let mut out = Vec::new();
            for id in ids {
                let data: Option<Vec<u8>> = stmt.query_row([&id.0[..]], |r| r.get(0)).optional()?;
                if let Some(data) = data {
                    out.extend(decode_block(&data)?.into_iter().find(|m| m.id == id));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn qos2_recorded(
        &self,
        keys: Vec<(String, u16)>,
    ) -> Result<std::collections::HashMap<(String, u16), MessageId>, StoreError> {
        self.with(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT message_id FROM qos2_inflight WHERE client_id = ?1 AND pkid = ?2",
            )?;
            let mut out = std::collections::HashMap::new();
            for key in keys {
                let id: Option<Vec<u8>> = stmt
                    .query_row(params![key.0, key.1], |r| r.get(0))
                    .optional()?;
                if let Some(id) = id {
                    out.insert(key, id_of(&id));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn record_delivered(&self, batch: Arc<Vec<Deliveries>>) -> Result<(), StoreError> {
        // A record lost to a power cut means one duplicate delivery later, never a loss: not
        // worth an fsync per batch.
        self.with(move |c| {
            without_fsync(c, |c| {
                let tx = c.transaction()?;
                for d in batch.iter() {
                    insert_deliveries(&tx, d)?;
                }
                tx.commit()
            })
        })
        .await
    }

    async fn clear_retained(&self, topic: &str) -> Result<(), StoreError> {
        let topic = topic.to_owned();
        self.with(move |c| {
            c.prepare_cached("DELETE FROM retained WHERE topic = ?1")?
                .execute([&topic])
                .map(drop)
        })
        .await
    }

    async fn retained(&self, _prefixes: Option<Vec<String>>) -> Result<Vec<Message>, StoreError> {
        self.with(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, topic, data, qos, 1, client_id, host, created, properties FROM retained
                 ORDER BY topic",
            )?;
            let rows = stmt.query_map([], retained_row)?;
            rows.collect()
        })
        .await
    }

    async fn messages_after(
        &self,
        after: Cursor,
        not_host: Option<String>,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.with(move |c| {
            let mut heads = c.prepare_cached(
                "SELECT seq, oldest FROM message_block WHERE oldest >= ?1 ORDER BY oldest, seq",
            )?;
            let mut body = c.prepare_cached("SELECT data FROM message_block WHERE seq = ?1")?;
            // No host is the empty string, so "" excludes nothing.
            let host = not_host.unwrap_or_default();
            let mut found: Vec<Message> = Vec::new();
            // A message written twice (a persist re-sent across a worker restart) once.
            let mut ids = HashSet::new();
            let mut rows = heads.query([after.created_ms.saturating_sub(BLOCK_SPAN_MS)])?;
            while let Some(row) = rows.next()? {
                let (seq, oldest): (i64, i64) = (row.get(0)?, row.get(1)?);
                if found.len() >= limit {
                    found.sort_by_key(|m| (m.created_ms, m.id));
                    found.truncate(limit);
                    // Blocks come by their oldest message: none after this one can place a
                    // message before the last one kept.
                    if oldest > found[limit - 1].created_ms {
                        break;
                    }
                }
                let data: Vec<u8> = body.query_row([seq], |r| r.get(0))?;
                found.extend(
                    decode_block(&data)?
                        .into_iter()
                        .filter(|m| after.precedes(m) && m.host != host && ids.insert(m.id)),
                );
            }
            found.sort_by_key(|m| (m.created_ms, m.id));
            found.truncate(limit);
            Ok(found)
        })
        .await
    }

    async fn messages_on(
        &self,
        scope: TopicScope,
        after: Cursor,
        not_host: Option<String>,
        limit: usize,
    ) -> Result<Option<Vec<Message>>, StoreError> {
        if limit == 0 {
            return Ok(Some(Vec::new()));
        }
        self.with(move |c| {
            let c: &Connection = c;
            let from = after.created_ms.saturating_sub(BLOCK_SPAN_MS);
            let host = not_host.unwrap_or_default();
            let keep =
                |m: &Message| scope.contains(&m.topic) && after.precedes(m) && m.host != host;
            match &scope {
                TopicScope::Exact(topic) => {
                    // In order of their first message, read until the page is complete.
                    let mut stmt = c.prepare_cached(
                        "SELECT id, first, spans FROM message_topic
                         WHERE topic = ?1 AND first >= ?2 ORDER BY first, id",
                    )?;
                    let rows = stmt.query_map(params![topic, from], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })?;
                    read_topic_rows(c, rows, limit, keep).map(Some)
                }
                TopicScope::Prefix(prefix) => {
                    let mut stmt = c.prepare_cached(
                        "SELECT id, first, spans FROM message_topic
                         WHERE (topic = ?1 OR (topic >= ?2 AND topic < ?3)) AND first >= ?4
                         LIMIT ?5",
                    )?;
                    let rows = stmt.query_map(
                        params![
                            prefix,
                            format!("{prefix}/"),
                            format!("{prefix}0"),
                            from,
                            PREFIX_CANDIDATES as i64 + 1
                        ],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )?;
                    let mut rows: Vec<TopicRow> = rows.collect::<rusqlite::Result<_>>()?;
                    if rows.len() > PREFIX_CANDIDATES {
                        return Ok(None);
                    }
                    rows.sort_by_key(|r| (r.1, r.0));
                    read_topic_rows(c, rows.into_iter().map(Ok), limit, keep).map(Some)
                }
            }
        })
        .await
    }

    async fn message_by_id(&self, id: MessageId) -> Result<Option<Message>, StoreError> {
        // Ids carry their second: the message lies in a block whose oldest message is at most
        // a block's span before that second began.
        let from = i64::from(id.timestamp_secs()) * 1000;
        self.with(move |c| {
            let mut heads = c.prepare_cached(
                "SELECT data FROM message_block WHERE oldest >= ?1 AND oldest <= ?2 ORDER BY oldest",
            )?;
            let mut rows = heads.query(params![from - BLOCK_SPAN_MS, from + 999])?;
            while let Some(row) = rows.next()? {
                let data: Vec<u8> = row.get(0)?;
                if let Some(m) = decode_block(&data)?.into_iter().find(|m| m.id == id) {
                    return Ok(Some(m));
                }
            }
            Ok(None)
        })
        .await
    }

    async fn deliveries_of(
        &self,
        id: MessageId,
        clients: Vec<String>,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        self.with(move |c| {
            let tx = c.transaction()?;
            let mut out = Vec::new();
            let mut row = tx.prepare_cached(
                "SELECT created FROM published_message WHERE message_id = ?1 AND client_id = ?2",
            )?;
            let from = id.timestamp_secs().saturating_sub(RECORD_BLOCK_SPAN_SECS);
            let mut block = tx.prepare_cached(
                "SELECT ids, created FROM delivery_block
                 WHERE client_id = ?1 AND first >= ?2 AND first <= ?3 AND last >= ?3",
            )?;
            for client in clients {
                if let Some(at) = row
                    .query_row(params![&id.0[..], client], |r| r.get::<_, i64>(0))
                    .optional()?
                {
                    out.push(DeliveryRecord {
                        client_id: client,
                        at_ms: Some(at),
                        host: None,
                    });
                    continue;
                }
                let mut blocks =
                    block.query(params![client, &from.to_be_bytes()[..], &id.0[..]])?;
                while let Some(b) = blocks.next()? {
                    let ids = b.get_ref(0)?.as_blob()?;
                    if ids.chunks_exact(12).any(|chunk| chunk == id.0) {
                        out.push(DeliveryRecord {
                            client_id: client.clone(),
                            at_ms: b.get::<_, Option<i64>>(1)?,
                            host: None,
                        });
                        break;
                    }
                }
            }
            drop((row, block));
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    async fn delivered_among(
        &self,
        client_id: &str,
        ids: Vec<MessageId>,
    ) -> Result<HashSet<MessageId>, StoreError> {
        let client_id = client_id.to_owned();
        self.with(move |c| {
            let (Some(low), Some(high)) = (ids.iter().min(), ids.iter().max()) else {
                return Ok(HashSet::new());
            };
            // One read transaction for the whole page: outside one, every lookup below would
            // be a transaction of its own, taking and releasing the file's lock (two `fcntl`
            // calls) and the WAL's read lock, which cost more than the lookup itself.
            let tx = c.transaction()?;
            // Blocks that can hold an id in [low, high] begin at most the span before low.
            let from = low.timestamp_secs().saturating_sub(RECORD_BLOCK_SPAN_SECS);
            let mut blocks = tx.prepare_cached(
                "SELECT ids FROM delivery_block
                 WHERE client_id = ?1 AND first >= ?2 AND first <= ?3 AND last >= ?4",
            )?;
            // Ids of the range with a record, from blocks and then from rows.
            let mut recorded = HashSet::new();
            let rows = blocks.query_map(
                params![client_id, &from.to_be_bytes()[..], &high.0[..], &low.0[..]],
                |r| r.get::<_, Vec<u8>>(0),
            )?;
            for data in rows {
                recorded.extend(
                    data?
                        .chunks_exact(12)
                        .map(id_of)
                        .filter(|id| low <= id && id <= high),
                );
            }
            // Row records (small notices) of every client in the page's range, in one pass
            // while there are few of them (a stream read by a few sessions); past a bound (a
            // fan-out's row per subscriber), one lookup per id that no block holds.
            let bound = 4 * ids.len() + 64;
            let mut scan = tx.prepare_cached(
                "SELECT message_id, client_id = ?3 FROM published_message
                 WHERE message_id >= ?1 AND message_id <= ?2 LIMIT ?4",
            )?;
            let mut rows = scan.query(params![&low.0[..], &high.0[..], client_id, bound])?;
            let mut scanned = 0;
            while let Some(row) = rows.next()? {
                scanned += 1;
                if row.get::<_, bool>(1)? {
                    recorded.insert(id_of(row.get_ref(0)?.as_blob()?));
                }
            }
            drop(rows);
            let scanned_all = scanned < bound;
            let mut lookup = tx.prepare_cached(
                "SELECT 1 FROM published_message WHERE message_id = ?2 AND client_id = ?1",
            )?;
            let mut out = HashSet::new();
            for id in ids {
                if recorded.contains(&id)
                    || !scanned_all
                        && lookup
                            .query_row(params![client_id, &id.0[..]], |_| Ok(()))
                            .optional()?
                            .is_some()
                {
                    out.insert(id);
                }
            }
            drop((blocks, scan, lookup));
            tx.commit()?;
            Ok(out)
        })
        .await
    }
}

impl SubscriptionStore for SqliteStore {
    async fn subscriptions(&self, client_id: &str) -> Result<Vec<StoredSubscription>, StoreError> {
        let client_id = client_id.to_owned();
        self.with(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT topic, qos, created, options, identifier FROM subscription
                 WHERE client_id = ?1 ORDER BY topic",
            )?;
            let rows = stmt.query_map([client_id], |r| subscription_row(r, 0))?;
            rows.collect()
        })
        .await
    }

    async fn upsert_subscriptions(
        &self,
        client_id: &str,
        subscriptions: Vec<Subscription>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let client_id = client_id.to_owned();
        self.with(move |c| {
            let tx = c.transaction()?;
            {
                let mut upsert = tx.prepare_cached(
                    "INSERT INTO subscription (client_id, topic, qos, created, options, identifier)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (client_id, topic) DO UPDATE SET qos = excluded.qos,
                     options = excluded.options, identifier = excluded.identifier",
                )?;
                for s in &subscriptions {
                    let o = s.options;
                    let options = if o.no_local { NO_LOCAL } else { 0 }
                        | if o.retain_as_published {
                            RETAIN_AS_PUBLISHED
                        } else {
                            0
                        };
                    upsert.execute(params![
                        client_id,
                        s.filter,
                        s.qos.as_u8(),
                        now_ms,
                        options,
                        o.identifier
                    ])?;
                }
            }
            tx.commit()
        })
        .await
    }

    async fn shared_filters(&self, client_id: &str) -> Result<Vec<String>, StoreError> {
        let client_id = client_id.to_owned();
        self.with(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT topic FROM subscription
                 WHERE client_id = ?1 AND topic >= '$share/' AND topic < '$share0'",
            )?;
            let rows = stmt.query_map([client_id], |r| r.get(0))?;
            rows.collect()
        })
        .await
    }

    async fn has_subscribers(&self, filter: &str) -> Result<bool, StoreError> {
        let filter = filter.to_owned();
        self.with(move |c| {
            c.prepare_cached("SELECT 1 FROM subscription WHERE topic = ?1 LIMIT 1")?
                .exists([filter])
        })
        .await
    }

    async fn remove_subscriptions(
        &self,
        client_id: &str,
        filters: Option<Vec<String>>,
    ) -> Result<(), StoreError> {
        let client_id = client_id.to_owned();
        self.with(move |c| {
            match filters {
                None => {
                    c.execute("DELETE FROM subscription WHERE client_id = ?1", [client_id])?;
                }
                Some(filters) => {
                    let tx = c.transaction()?;
                    for f in filters {
                        tx.execute(
                            "DELETE FROM subscription WHERE client_id = ?1 AND topic = ?2",
                            params![client_id, f],
                        )?;
                    }
                    tx.commit()?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn subscribers(
        &self,
        filters: Vec<String>,
        shared: bool,
        limit: usize,
    ) -> Result<Vec<(String, StoredSubscription)>, StoreError> {
        self.with(move |c| {
            let mut exact = c.prepare_cached(
                "SELECT client_id, topic, qos, created, options, identifier FROM subscription
                 WHERE topic = ?1 ORDER BY client_id LIMIT ?2",
            )?;
            let mut out = Vec::new();
            let row = |r: &rusqlite::Row<'_>| Ok((r.get::<_, String>(0)?, subscription_row(r, 1)?));
            for filter in filters {
                let left = limit.saturating_sub(out.len());
                if left == 0 {
                    return Ok(out);
                }
                for found in exact.query_map(params![filter, left as i64], row)? {
                    out.push(found?);
                }
            }
            if shared {
                let left = limit.saturating_sub(out.len());
                let mut groups = c.prepare_cached(
                    "SELECT client_id, topic, qos, created, options, identifier FROM subscription
                     WHERE topic >= '$share/' AND topic < '$share0' ORDER BY topic LIMIT ?1",
                )?;
                for found in groups.query_map([left as i64], row)? {
                    out.push(found?);
                }
            }
            Ok(out)
        })
        .await
    }
}

impl SessionStore for SqliteStore {
    async fn track_qos2_out(
        &self,
        client_id: &str,
        pkid: u16,
        message_id: MessageId,
        released: Option<Deliveries>,
    ) -> Result<(), StoreError> {
        let client_id = client_id.to_owned();
        self.with(move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT OR REPLACE INTO qos2_outbound (client_id, pkid, message_id, released, created)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![client_id, pkid, &message_id.0[..], released.is_some(), wharf_shared::now_ms()],
            )?;
            if let Some(d) = released {
                insert_deliveries(&tx, &d)?;
            }
            tx.commit()
        })
        .await
    }

    async fn forget_qos2_out(&self, client_id: &str, pkid: Option<u16>) -> Result<(), StoreError> {
        let client_id = client_id.to_owned();
        self.with(move |c| {
            match pkid {
                Some(pkid) => c.execute(
                    "DELETE FROM qos2_outbound WHERE client_id = ?1 AND pkid = ?2",
                    params![client_id, pkid],
                )?,
                None => c.execute(
                    "DELETE FROM qos2_outbound WHERE client_id = ?1",
                    [client_id],
                )?,
            };
            Ok(())
        })
        .await
    }

    async fn qos2_out(&self, client_id: &str) -> Result<Vec<(u16, MessageId, bool)>, StoreError> {
        let client_id = client_id.to_owned();
        self.with(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT pkid, message_id, released FROM qos2_outbound WHERE client_id = ?1 ORDER BY created",
            )?;
            let rows = stmt.query_map([client_id], |r| Ok((r.get(0)?, id_of(&r.get::<_, Vec<u8>>(1)?), r.get(2)?)))?;
            rows.collect()
        })
        .await
    }

    async fn claim_session(
        &self,
        client_id: &str,
        host: &str,
        now_ms: i64,
        session_expiry: u32,
    ) -> Result<(bool, Generation), StoreError> {
        let (client_id, host) = (client_id.to_owned(), host.to_owned());
        // Without an fsync: a claim acknowledges no message, and one lost with the machine's
        // power was made by an edge that went with it (the embedded store serves one host, so
        // no other holds a generation to fence). A storm of returning sessions then costs no
        // disk flush per CONNECT.
        self.with(move |c| {
            without_fsync(c, |c| {
                // A record without `session_expiry` is from before it was kept: persistent.
                let persistent = c
                    .prepare_cached(
                        "SELECT 1 FROM session WHERE client_id = ?1
                     AND (session_expiry IS NULL OR session_expiry <> 0)",
                    )?
                    .exists([&client_id])?;
                let (epoch, claims): (i64, i64) = c
                    .prepare_cached(
                        "INSERT INTO session (client_id, host, created, updated, epoch, claims,
                     session_expiry) VALUES (?1, ?2, ?3, ?3, ?3, 1, ?4)
                     ON CONFLICT (client_id) DO UPDATE SET host = excluded.host,
                     updated = excluded.updated, expires = NULL, claims = claims + 1,
                     session_expiry = excluded.session_expiry
                     RETURNING epoch, claims",
                    )?
                    .query_row(params![client_id, host, now_ms, session_expiry], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })?;
                let generation = Generation {
                    epoch_ms: epoch.max(0) as u64,
                    claims: claims.max(0) as u64,
                };
                Ok((persistent, generation))
            })
        })
        .await
    }

    async fn drop_session(
        &self,
        client_id: &str,
        owner: Option<&Owner<'_>>,
    ) -> Result<bool, StoreError> {
        let client_id = client_id.to_owned();
        let owner = owner.map(OwnerRow::of);
        self.with(move |c| {
            let n = match owner {
                None => c
                    .prepare_cached("DELETE FROM session WHERE client_id = ?1")?
                    .execute([client_id])?,
                Some(o) => c
                    .prepare_cached(
                        "DELETE FROM session WHERE client_id = ?1 AND host = ?2
                         AND (?3 IS NULL OR (epoch = ?3 AND claims = ?4))",
                    )?
                    .execute(params![client_id, o.host, o.epoch, o.claims])?,
            };
            Ok(n == 1)
        })
        .await
    }

    async fn close_session(
        &self,
        client_id: &str,
        expires_ms: Option<i64>,
        owner: &Owner<'_>,
    ) -> Result<(), StoreError> {
        let client_id = client_id.to_owned();
        let o = OwnerRow::of(owner);
        self.with(move |c| {
            c.prepare_cached(
                "UPDATE session SET expires = ?2 WHERE client_id = ?1 AND host = ?3
                 AND (?4 IS NULL OR (epoch = ?4 AND claims = ?5))",
            )?
            .execute(params![client_id, expires_ms, o.host, o.epoch, o.claims])?;
            Ok(())
        })
        .await
    }

    async fn expired_sessions(&self, now_ms: i64) -> Result<Vec<String>, StoreError> {
        self.with(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT client_id FROM session WHERE expires IS NOT NULL AND expires <= ?1
                 LIMIT 1000",
            )?;
            let rows = stmt.query_map([now_ms], |r| r.get(0))?;
            rows.collect()
        })
        .await
    }

    async fn drop_expired_session(&self, client_id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let client_id = client_id.to_owned();
        self.with(move |c| {
            let n = c
                .prepare_cached(
                    "DELETE FROM session WHERE client_id = ?1 AND expires IS NOT NULL
                     AND expires <= ?2",
                )?
                .execute(params![client_id, now_ms])?;
            Ok(n == 1)
        })
        .await
    }

    async fn sessions_page(
        &self,
        after: Option<String>,
        prefix: String,
        limit: usize,
    ) -> Result<Vec<wharf_shared::SessionSummary>, StoreError> {
        self.with(move |c| {
            // Prefix matching by range (`>= prefix`, `< prefix + U+10FFFF`), on the primary key.
            let from = after.unwrap_or_default();
            let upper = format!("{prefix}\u{10FFFF}");
            let mut stmt = c.prepare_cached(
                "SELECT client_id, host, updated, expires FROM session
                 WHERE client_id > ?1 AND client_id >= ?2 AND client_id < ?3
                 ORDER BY client_id LIMIT ?4",
            )?;
            let rows =
                stmt.query_map(rusqlite::params![from, prefix, upper, limit as i64], |r| {
                    Ok(wharf_shared::SessionSummary {
                        client_id: r.get(0)?,
                        host: r.get(1)?,
                        updated_ms: r.get(2)?,
                        expires_ms: r.get(3)?,
                        owed: 0,
                        owed_complete: true,
                        oldest_owed_ms: None,
                    })
                })?;
            rows.collect()
        })
        .await
    }
}

impl ClusterStore for SqliteStore {
    /// One worker uses an embedded store: no other host's messages to follow.
    async fn follow_other_hosts(
        &self,
        _own_host: String,
        _sink: tokio::sync::mpsc::Sender<Vec<Message>>,
        _shutdown: tokio_util::sync::CancellationToken,
    ) {
    }

    /// One worker: every edge of it owns every group it has members of.
    async fn own_groups(
        &self,
        _owner: &str,
        groups: Vec<String>,
        _now_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        Ok(groups)
    }

    fn shared_by_hosts(&self) -> bool {
        false
    }

    /// One worker: its own claims reach its edges at once; there are no others.
    async fn claims_since(
        &self,
        _since_ms: i64,
        _own_host: &str,
    ) -> Result<Vec<wharf_shared::Claim>, StoreError> {
        Ok(Vec::new())
    }

    async fn put_host_status(&self, status: wharf_shared::HostStatus) -> Result<(), StoreError> {
        let mut statuses = self.statuses.lock().unwrap_or_else(|e| e.into_inner());
        statuses.insert(status.host.clone(), status);
        Ok(())
    }

    async fn host_statuses(&self) -> Result<Vec<wharf_shared::HostStatus>, StoreError> {
        let statuses = self.statuses.lock().unwrap_or_else(|e| e.into_inner());
        Ok(statuses.values().cloned().collect())
    }
}

impl AuthStore for SqliteStore {
    async fn load_auth(
        &self,
        _users: bool,
        _rules: bool,
    ) -> Result<(Vec<StoredUser>, Vec<StoredRule>), StoreError> {
        Err(StoreError::Failed(
            "users and rules in the store need the MongoDB backend (the embedded store keeps them in files: passwordFile, aclFile)".into(),
        ))
    }

    async fn put_user(&self, _: StoredUser, _: String) -> Result<(), StoreError> {
        Err(StoreError::Failed(STORE_AUTH_MONGODB.into()))
    }

    async fn delete_user(&self, _: String, _: String) -> Result<bool, StoreError> {
        Err(StoreError::Failed(STORE_AUTH_MONGODB.into()))
    }

    async fn put_rule(&self, _: StoredRule, _: String) -> Result<(), StoreError> {
        Err(StoreError::Failed(STORE_AUTH_MONGODB.into()))
    }

    async fn delete_rule(&self, _: StoredRule, _: String) -> Result<u64, StoreError> {
        Err(StoreError::Failed(STORE_AUTH_MONGODB.into()))
    }
}

impl Store for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.with(|c| c.query_row("SELECT 1", [], |_| Ok(()))).await
    }
}

/// Runs `f` with synchronous=NORMAL: in WAL mode its commits are not fsynced; they survive a
/// crash of this process and reach the disk with the next durable (FULL) commit or checkpoint.
fn without_fsync<T>(
    c: &mut Connection,
    f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    c.pragma_update(None, "synchronous", "NORMAL")?;
    let result = f(c);
    c.pragma_update(None, "synchronous", "FULL")?;
    result
}

/// One batch in one transaction.
fn write_batch(c: &mut Connection, batch: &WriteBatch) -> rusqlite::Result<()> {
    let tx = c.transaction()?;
    for client in &batch.clear_qos2 {
        tx.execute("DELETE FROM qos2_inflight WHERE client_id = ?1", [client])?;
    }
    for (client, pkid) in &batch.release_qos2 {
        tx.execute(
            "DELETE FROM qos2_inflight WHERE client_id = ?1 AND pkid = ?2",
            params![client, pkid],
        )?;
    }
    {
        // A QoS 2 message stored before (re-sent under its recorded id) is not stored again.
        let mut stored = tx.prepare_cached("SELECT 1 FROM qos2_message WHERE id = ?1")?;
        let mut fresh = Vec::with_capacity(batch.messages.len());
        let mut qos2_ids = HashSet::new();
        for m in &batch.messages {
            if m.qos == Qos::ExactlyOnce
                && (!qos2_ids.insert(m.id)
                    || stored
                        .query_row([&m.id.0[..]], |_| Ok(()))
                        .optional()?
                        .is_some())
            {
                continue;
            }
            fresh.push(m);
        }
        // A retained value is only replaced or cleared by one at least as new: a message
        // re-sent after a newer one must not set its value again.
        let mut set_retained = tx.prepare_cached(
            "INSERT INTO retained (topic, id, data, client_id, qos, created, host, properties)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (topic) DO UPDATE SET id = excluded.id, data = excluded.data,
                 client_id = excluded.client_id, qos = excluded.qos, created = excluded.created,
                 host = excluded.host, properties = excluded.properties
             WHERE excluded.created >= retained.created",
        )?;
        let mut clear_retained =
            tx.prepare_cached("DELETE FROM retained WHERE topic = ?1 AND created <= ?2")?;
        for m in fresh.iter().filter(|m| m.retain) {
            if m.payload.is_empty() {
                clear_retained.execute(params![m.topic, m.created_ms])?;
            } else {
                let properties = match &m.properties {
                    Some(p) => Some(
                        wharf_shared::codec::encode_body(&**p)
                            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?,
                    ),
                    None => None,
                };
                set_retained.execute(params![
                    m.topic,
                    &m.id.0[..],
                    m.payload,
                    m.client_id,
                    m.qos.as_u8(),
                    m.created_ms,
                    m.host,
                    properties
                ])?;
            }
        }
        insert_blocks(&tx, fresh)?;
        let mut record = tx.prepare_cached(
            "INSERT OR REPLACE INTO qos2_inflight (client_id, pkid, message_id, created)
             VALUES (?1, ?2, ?3, ?4)",
        )?;
        let now = wharf_shared::now_ms();
        for (client, pkid, id) in &batch.record_qos2 {
            record.execute(params![client, pkid, &id.0[..], now])?;
        }
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: u8) -> Message {
        Message {
            id: MessageId([id; 12]),
            topic: "t".into(),
            payload: vec![id],
            qos: Qos::AtMostOnce,
            retain: false,
            client_id: "c".into(),
            host: "h".into(),
            created_ms: 1,
            properties: None,
        }
    }

    /// One number read from the store's connection.
    fn read_i64(store: &SqliteStore, sql: &str) -> i64 {
        let conn = store.conn.lock().expect("lock");
        conn.query_row(sql, [], |r| r.get(0)).expect(sql)
    }

    fn synchronous(store: &SqliteStore) -> i64 {
        read_i64(store, "PRAGMA synchronous")
    }

    #[tokio::test]
    async fn a_relaxed_batch_is_stored_and_later_commits_are_forced_to_disk_again() {
        let dir = tempfile::tempdir().expect("dir");
        let store = SqliteStore::open(dir.path()).expect("open");
        const FULL: i64 = 2;
        assert_eq!(synchronous(&store), FULL);
        let relaxed = WriteBatch {
            relaxed: true,
            messages: vec![message(1), message(2)],
            ..Default::default()
        };
        store.write(Arc::new(relaxed)).await.expect("write");
        assert_eq!(synchronous(&store), FULL);
        let durable = WriteBatch {
            messages: vec![message(3)],
            ..Default::default()
        };
        store.write(Arc::new(durable)).await.expect("write");
        let stored = store
            .messages_after(Cursor::since(0), None, 10)
            .await
            .expect("read");
        assert_eq!(stored.len(), 3);
    }

    /// The version 1 layout, as earlier releases created it.
    const SCHEMA_V1_MESSAGE: &str = "
        CREATE TABLE message (
            id BLOB PRIMARY KEY, topic TEXT NOT NULL, data BLOB NOT NULL, client_id TEXT NOT NULL,
            qos INTEGER NOT NULL, retain INTEGER NOT NULL, created INTEGER NOT NULL, host TEXT NOT NULL
        ) WITHOUT ROWID;
        CREATE INDEX message_created ON message (created, id);
        CREATE TABLE published_message (
            client_id TEXT NOT NULL, message_id BLOB NOT NULL, topic TEXT NOT NULL,
            host TEXT NOT NULL, created INTEGER NOT NULL, PRIMARY KEY (client_id, message_id)
        ) WITHOUT ROWID;
        CREATE INDEX published_message_created ON published_message (created);";

    #[tokio::test]
    async fn a_version_1_file_keeps_its_messages() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let c = Connection::open(dir.path().join("wharf.db")).expect("open v1");
            c.execute_batch(SCHEMA_V1_MESSAGE).expect("v1 schema");
            for (n, qos) in [(1u8, 0u8), (2, 2), (3, 1)] {
                c.execute(
                    "INSERT INTO message (id, topic, data, client_id, qos, retain, created, host)
                     VALUES (?1, 't', ?2, 'c', ?3, 0, ?4, 'h')",
                    params![&[n; 12][..], vec![n], qos, 10 - n as i64],
                )
                .expect("v1 row");
            }
            c.execute(
                "INSERT INTO published_message VALUES ('sub', ?1, 't', 'h', 5)",
                [&[3u8; 12][..]],
            )
            .expect("v1 record");
        }
        for _ in 0..2 {
            // Opening twice: the second open finds the current version and leaves it alone.
            let store = SqliteStore::open(dir.path()).expect("open");
            let stored = store
                .messages_after(Cursor::since(0), None, 10)
                .await
                .expect("read");
            let order: Vec<u8> = stored.iter().map(|m| m.payload[0]).collect();
            assert_eq!(order, vec![3, 2, 1], "oldest first");
            let by_id = store
                .qos2_messages_by_id(vec![MessageId([2; 12]), MessageId([1; 12])])
                .await
                .expect("by id");
            assert_eq!(by_id.len(), 1);
            assert_eq!(by_id[0].qos, Qos::ExactlyOnce);
            let ids = vec![MessageId([3; 12]), MessageId([2; 12])];
            let delivered = store.delivered_among("sub", ids).await.expect("records");
            assert_eq!(delivered, HashSet::from([MessageId([3; 12])]));
            assert_eq!(read_i64(&store, "PRAGMA user_version"), SCHEMA_VERSION);
        }
    }

    /// The tables of a version 6 file that version 7 changed.
    const SCHEMA_V6_CHANGED: &str = "
        CREATE TABLE subscription (
            client_id TEXT NOT NULL, topic TEXT NOT NULL, qos INTEGER NOT NULL,
            created INTEGER NOT NULL, PRIMARY KEY (client_id, topic)
        ) WITHOUT ROWID;
        CREATE TABLE session (
            client_id TEXT PRIMARY KEY, host TEXT NOT NULL, created INTEGER NOT NULL,
            updated INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE TABLE retained (
            topic TEXT PRIMARY KEY, id BLOB NOT NULL, data BLOB NOT NULL, client_id TEXT NOT NULL,
            qos INTEGER NOT NULL, created INTEGER NOT NULL, host TEXT NOT NULL
        ) WITHOUT ROWID;
        CREATE TABLE message_block (
            seq INTEGER PRIMARY KEY, oldest INTEGER NOT NULL, newest INTEGER NOT NULL,
            data BLOB NOT NULL
        );
        PRAGMA user_version = 6;";

    /// A version 6 file (before MQTT 5.0) keeps its subscriptions, sessions, retained values
    /// and message blocks, and takes 5.0 ones from then on.
    #[tokio::test]
    async fn a_version_6_file_gains_the_5_0_columns_and_keeps_its_rows() {
        let dir = tempfile::tempdir().expect("dir");
        let old = message(1);
        {
            let c = Connection::open(dir.path().join("wharf.db")).expect("open v6");
            c.execute_batch(SCHEMA_V6_CHANGED).expect("v6 schema");
            c.execute_batch(
                "INSERT INTO subscription VALUES ('c', 'a/#', 1, 5);
                 INSERT INTO session VALUES ('c', 'h', 5, 5);
                 INSERT INTO retained VALUES ('r', x'000000000000000000000001', x'01', 'p', 1, 5, 'h');",
            )
            .expect("v6 rows");
            // A block as version 6 wrote it: bincode of messages without properties.
            let block = wharf_shared::codec::encode_body(&vec![(
                old.id,
                old.topic.clone(),
                old.payload.clone(),
                old.qos,
                old.retain,
                old.client_id.clone(),
                old.host.clone(),
                old.created_ms,
            )])
            .expect("encode");
            c.execute(
                "INSERT INTO message_block (oldest, newest, data) VALUES (?1, ?1, ?2)",
                params![old.created_ms, block],
            )
            .expect("v6 block");
        }
        let store = SqliteStore::open(dir.path()).expect("open");
        assert_eq!(read_i64(&store, "PRAGMA user_version"), SCHEMA_VERSION);
        let subs = store.subscriptions("c").await.expect("subscriptions");
        assert_eq!(
            (subs[0].filter.as_str(), subs[0].options),
            ("a/#", SubscriptionOptions::default())
        );
        let (present, generation) = store
            .claim_session("c", "h", 6, u32::MAX)
            .await
            .expect("session");
        assert!(present, "a session from before generations is held");
        assert_eq!(
            generation,
            Generation {
                epoch_ms: 0,
                claims: 1
            }
        );
        assert_eq!(
            store.retained(None).await.expect("retained")[0].properties,
            None
        );
        let mut new = message(2);
        new.properties = Some(Box::new(wharf_shared::Properties {
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        }));
        new.retain = true;
        let batch = WriteBatch {
            messages: vec![new.clone()],
            ..WriteBatch::default()
        };
        store.write(Arc::new(batch)).await.expect("write");
        let stored = store
            .messages_after(Cursor::since(0), None, 10)
            .await
            .expect("read");
        assert_eq!(stored, vec![old, new.clone()]);
        let retained = store.retained(None).await.expect("retained");
        assert!(retained.contains(&new), "{retained:?}");
        let options = SubscriptionOptions {
            no_local: true,
            retain_as_published: false,
            identifier: Some(7),
        };
        store
            .upsert_subscriptions(
                "c",
                vec![Subscription {
                    filter: "a/#".into(),
                    qos: Qos::ExactlyOnce,
                    options,
                }],
                7,
            )
            .await
            .expect("upsert");
        assert_eq!(
            store.subscriptions("c").await.expect("subs")[0].options,
            options
        );
        let owner = Owner {
            host: "h",
            generation: Some(generation),
        };
        store
            .close_session("c", Some(8), &owner)
            .await
            .expect("close");
        assert_eq!(
            store.expired_sessions(7).await.expect("expired"),
            Vec::<String>::new()
        );
        assert_eq!(
            store.expired_sessions(8).await.expect("expired"),
            vec!["c".to_owned()]
        );
        assert!(store.drop_expired_session("c", 8).await.expect("drop"));
        assert!(!store.drop_expired_session("c", 8).await.expect("drop"));
    }

    fn delivery(client_id: &str, id: MessageId, created_ms: i64) -> Deliveries {
        Deliveries {
            client_id: client_id.into(),
            host: "h".into(),
            created_ms,
            records: vec![wharf_shared::DeliveredRecord {
                message_id: id,
                topic: "t".into(),
            }],
        }
    }

    #[tokio::test]
    async fn delivery_records_are_purged_with_their_messages() {
        let dir = tempfile::tempdir().expect("dir");
        let store = SqliteStore::open(dir.path()).expect("open");
        let now = 40 * 24 * 3600 * 1000;
        let ttl = MESSAGE_TTL_SECS as i64 * 1000;
        // Delivered just now, but of a message created past the TTL: goes.
        let expired = at(1, now - ttl - 1000, Qos::AtMostOnce).id;
        // A message created just inside the TTL, delivered long ago: stays.
        let kept = at(2, now - ttl + 1000, Qos::AtMostOnce).id;
        store
            .record_delivered(Arc::new(vec![
                delivery("a", expired, now),
                delivery("a", kept, 0),
            ]))
            .await
            .expect("record");
        assert_eq!(store.purge_expired(now).await.expect("purge"), (0, 1));
        let left = store
            .delivered_among("a", vec![expired, kept])
            .await
            .expect("read");
        assert_eq!(left, HashSet::from([kept]));
    }

    /// A notice's records go to blocks or rows by their number; lookups find both, whatever the
    /// spread of the ids, and the purge drops a block with its newest message.
    #[tokio::test]
    async fn delivery_records_in_blocks_and_rows_are_found_and_purged() {
        let dir = tempfile::tempdir().expect("dir");
        let store = SqliteStore::open(dir.path()).expect("open");
        let now = 40 * 24 * 3600 * 1000;
        let id = |n: u32, ms: i64| at(n, ms, Qos::AtMostOnce).id;
        let notice = |client: &str, ids: &[MessageId]| notice(client, ids, now);
        // A catch-up's worth for "a": ids one second apart over 40 s (several blocks), in no
        // particular order, one twice; a small notice (rows); another client's big notice.
        let spread: Vec<MessageId> = (0..40u32)
            .rev()
            .map(|n| id(n, now - 60_000 + n as i64 * 1000))
            .chain([id(7, now - 60_000 + 7_000)])
            .collect();
        let few = [id(100, now - 5_000), id(101, now - 4_000)];
        let other: Vec<MessageId> = (200..220u32).map(|n| id(n, now - 3_000)).collect();
        store
            .record_delivered(Arc::new(vec![
                notice("a", &spread),
                notice("a", &few),
                notice("b", &other),
            ]))
            .await
            .expect("record");
        let blocks = read_i64(&store, "SELECT count(*) FROM delivery_block");
        assert!(blocks > 2, "spread over blocks, got {blocks}");
        assert_eq!(
            read_i64(&store, "SELECT count(*) FROM published_message"),
            2
        );

        let mut asked: Vec<MessageId> = (0..45u32)
            .map(|n| id(n, now - 60_000 + n as i64 * 1000))
            .collect();
        asked.extend(few);
        asked.extend(&other[..3]);
        asked.push(id(102, now - 4_000));
        let mut expected: HashSet<MessageId> = spread.iter().copied().collect();
        expected.extend(few);
        let found = store
            .delivered_among("a", asked.clone())
            .await
            .expect("read");
        assert_eq!(found, expected);
        // One id at a time, too: a lookup whose range starts inside a block.
        for &one in &asked {
            let found = store.delivered_among("a", vec![one]).await.expect("read");
            assert_eq!(found.contains(&one), expected.contains(&one), "{one}");
        }
        // A fan-out's rows: more of other clients' in the range than a page's lookups would
        // read, so each id is looked up.
        let fanned = [id(300, now - 2_000), id(301, now - 2_000)];
        let mut notices: Vec<Deliveries> = (0..200)
            .map(|n| notice(&format!("f{n}"), &fanned))
            .collect();
        notices.push(notice("a", &fanned[..1]));
        store
            .record_delivered(Arc::new(notices))
            .await
            .expect("record");
        let found = store
            .delivered_among("a", fanned.to_vec())
            .await
            .expect("read");
        assert_eq!(found, HashSet::from([fanned[0]]));
        // Purged once their newest message is past the TTL.
        let ttl = MESSAGE_TTL_SECS as i64 * 1000;
        store
            .purge_expired(now - 60_000 + 20_500 + ttl)
            .await
            .expect("purge");
        let found = store.delivered_among("a", asked).await.expect("read");
        assert!(found.contains(&spread[0]), "the newest stays");
        assert!(!found.contains(&id(0, now - 60_000)), "the oldest went");
        assert!(found.contains(&few[0]));
    }

    /// A version 8 file indexed record blocks by (client_id, first) only: it gets the index
    /// that holds `last` too, and its records are still found.
    #[tokio::test]
    async fn a_version_8_file_gets_the_record_block_span_index() {
        let dir = tempfile::tempdir().expect("dir");
        let first = at(1, 1_000_000, Qos::AtLeastOnce).id;
        let ids: Vec<MessageId> = (1..=8u32)
            .map(|n| at(n, 1_000_000, Qos::AtLeastOnce).id)
            .collect();
        {
            let store = SqliteStore::open(dir.path()).expect("open");
            store
                .record_delivered(Arc::new(vec![notice("a", &ids, 1_000_000)]))
                .await
                .expect("record");
            store
                .with(|c| {
                    c.execute_batch(
                        "DROP INDEX delivery_block_span;
                         CREATE INDEX delivery_block_client ON delivery_block (client_id, first);
                         PRAGMA user_version = 8;",
                    )
                })
                .await
                .expect("as version 8");
        }
        let store = SqliteStore::open(dir.path()).expect("reopen");
        assert_eq!(read_i64(&store, "PRAGMA user_version"), SCHEMA_VERSION);
        let index = |name: &str| {
            read_i64(
                &store,
                &format!(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = '{name}'"
                ),
            )
        };
        assert_eq!(
            (index("delivery_block_client"), index("delivery_block_span")),
            (0, 1)
        );
        let found = store.delivered_among("a", vec![first]).await.expect("read");
        assert_eq!(found, HashSet::from([first]));
    }

    /// A client's delivery records of `ids`, made at `created_ms`.
    fn notice(client: &str, ids: &[MessageId], created_ms: i64) -> Deliveries {
        Deliveries {
            client_id: client.into(),
            host: "h".into(),
            created_ms,
            records: ids
                .iter()
                .map(|&message_id| wharf_shared::DeliveredRecord {
                    message_id,
                    topic: "t".into(),
                })
                .collect(),
        }
    }

    fn at(n: u32, created_ms: i64, qos: Qos) -> Message {
        let mut id = [0u8; 12];
        id[..4].copy_from_slice(&id_time_prefix(created_ms));
        id[8..].copy_from_slice(&n.to_be_bytes());
        Message {
            id: MessageId(id),
            topic: format!("t/{}", n % 3),
            payload: n.to_be_bytes().to_vec(),
            qos,
            retain: false,
            client_id: "c".into(),
            host: if n % 5 == 0 { "other" } else { "h" }.into(),
            created_ms,
            properties: None,
        }
    }

    /// A session's catch-up through the topic index returns exactly what reading every
    /// message by time and matching its filters returns: random topics, filters (exact,
    /// `+`, `#`, leading wildcards that must read by time), subscription times, hosts and
    /// writes, several messages of a topic in one block, paged to the end.
    #[tokio::test]
    async fn topic_index_catch_up_matches_a_scan_of_everything() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        // Half of the messages on one topic, so that its scope fills pages before others.
        let topics = |i: u64| match i % 14 {
            7.. => "x/y".to_owned(),
            0 => format!("dev/{}/cmd", i % 13),
            1 => format!("dev/{}/t", i % 11),
            2 => format!("dev/{}", i % 5),
            3 => "x/y".to_owned(),
            4 => format!("dev-{}/cmd", i % 3),
            5 => format!("fleet/{}/a/b", i % 17),
            _ => format!("dev/{}/cmd/sub", i % 13),
        };
        let all_filters = [
            "dev/3/cmd",
            "dev/+/cmd",
            "dev/3/#",
            "dev/#",
            "fleet/+/a/b",
            "x/y",
            "dev/4",
            "+/3/cmd",
            "#",
            "fleet/1/a/b",
            "dev-1/cmd",
            "dev/3/cmd/#",
        ];
        for round in 0..12 {
            let dir = tempfile::tempdir().expect("dir");
            let store = SqliteStore::open(dir.path()).expect("open");
            let base = 5_000_000 + round * 100_000;
            let mut chosen: Vec<(String, i64)> = Vec::new();
            for f in all_filters {
                if next(3) == 0 {
                    chosen.push((f.to_owned(), base + next(400) as i64));
                }
            }
            if chosen.is_empty() {
                chosen.push(("dev/3/cmd".into(), base));
            }
            for (filter, since) in &chosen {
                let sub = wharf_shared::Subscription {
                    filter: filter.clone(),
                    qos: Qos::AtLeastOnce,
                    options: Default::default(),
                };
                store
                    .upsert_subscriptions("s", vec![sub], *since)
                    .await
                    .expect("subscribe");
            }
            let mut written = Vec::new();
            let mut n = 0u32;
            for _ in 0..40 {
                let mut messages = Vec::new();
                let ms = base + next(800) as i64;
                for _ in 0..1 + next(600) {
                    n += 1;
                    let mut m = at(n, ms + next(8) as i64, Qos::AtLeastOnce);
                    m.topic = topics(next(1000));
                    messages.push(m);
                }
                written.extend(messages.iter().cloned());
                let write = WriteBatch {
                    messages,
                    ..Default::default()
                };
                store.write(Arc::new(write)).await.expect("write");
            }
            for not_host in [None, Some("other")] {
                let mut want: Vec<&Message> = written
                    .iter()
                    .filter(|m| not_host.is_none_or(|h| m.host != h))
                    .filter(|m| {
                        chosen.iter().any(|(f, since)| {
                            m.created_ms >= *since && wharf_shared::topic::matches(&m.topic, f)
                        })
                    })
                    .collect();
                want.sort_by_key(|m| (m.created_ms, m.id));
                let mut got = Vec::new();
                let mut after = None;
                for _ in 0..1_000 {
                    let (page, more) = super::super::undelivered(&store, "s", after, not_host)
                        .await
                        .expect("page");
                    got.extend(page.iter().map(|m| m.id));
                    match more {
                        Some(c) => after = Some(c),
                        None => break,
                    }
                }
                let want: Vec<MessageId> = want.iter().map(|m| m.id).collect();
                assert_eq!(
                    got, want,
                    "round {round}, filters {chosen:?}, not_host {not_host:?}"
                );
            }
        }
    }

    /// An exact topic whose busy millisecond spans several blocks and more than a page: read
    /// through the topic index, every message once, in order.
    #[tokio::test]
    async fn an_exact_topic_pages_a_busy_millisecond_whole() {
        let dir = tempfile::tempdir().expect("dir");
        let store = SqliteStore::open(dir.path()).expect("open");
        let sub = wharf_shared::Subscription {
            filter: "t/1".into(),
            qos: Qos::AtLeastOnce,
            options: Default::default(),
        };
        store
            .upsert_subscriptions("s", vec![sub], 0)
            .await
            .expect("subscribe");
        let busy = 3_000_000;
        let mut want = Vec::new();
        for batch in 0..8u32 {
            let messages: Vec<Message> = (0..1500)
                .map(|i| {
                    let mut m = at(
                        100_000 - batch * 10_000 + i,
                        busy + (batch as i64 / 6),
                        Qos::AtLeastOnce,
                    );
                    m.host = "h".into();
                    m
                })
                .collect();
            want.extend(messages.iter().filter(|m| m.topic == "t/1").cloned());
            let write = WriteBatch {
                messages,
                ..Default::default()
            };
            store.write(Arc::new(write)).await.expect("write");
        }
        want.sort_by_key(|m| (m.created_ms, m.id));
        let (mut got, mut after) = (Vec::new(), None);
        for _ in 0..100 {
            let (page, next) = super::super::undelivered(&store, "s", after, None)
                .await
                .expect("page");
            got.extend(page.into_iter().map(|m| m.id));
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert_eq!(got, want.iter().map(|m| m.id).collect::<Vec<_>>());
    }

    /// A file of schema version 9 (no topic index) gets its blocks' topic rows when opened,
    /// and a catch-up on an exact topic then finds what was stored before.
    #[tokio::test]
    async fn a_version_9_file_gets_its_topic_index() {
        let dir = tempfile::tempdir().expect("dir");
        let mut m = at(1, 7_000_000, Qos::AtLeastOnce);
        m.topic = "dev/1/cmd".into();
        {
            let store = SqliteStore::open(dir.path()).expect("open");
            let sub = wharf_shared::Subscription {
                filter: "dev/1/cmd".into(),
                qos: Qos::AtLeastOnce,
                options: Default::default(),
            };
            store
                .upsert_subscriptions("s", vec![sub], 1)
                .await
                .expect("subscribe");
            let write = WriteBatch {
                messages: vec![m.clone()],
                ..Default::default()
            };
            store.write(Arc::new(write)).await.expect("write");
            store
                .with(|c| c.execute_batch("DELETE FROM message_topic; PRAGMA user_version = 9;"))
                .await
                .expect("as version 9");
        }
        let store = SqliteStore::open(dir.path()).expect("reopen");
        assert_eq!(read_i64(&store, "SELECT count(*) FROM message_topic"), 1);
        let (page, _) = super::super::undelivered(&store, "s", None, None)
            .await
            .expect("page");
        assert_eq!(page, vec![m]);
    }

    /// A new store in which client `s` subscribed to `t/#` at `since_ms`.
    async fn subscribed_to_t(since_ms: i64) -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().expect("dir");
        let store = SqliteStore::open(dir.path()).expect("open");
        let sub = wharf_shared::Subscription {
            filter: "t/#".into(),
            qos: Qos::AtLeastOnce,
            options: Default::default(),
        };
        store
            .upsert_subscriptions("s", vec![sub], since_ms)
            .await
            .expect("subscribe");
        (dir, store)
    }

    /// More messages in one millisecond than a page holds, some written after later ones
    /// (publishers whose writes overtook each other): paging with the cursor returns every
    /// one, once, in (created, id) order. A cursor of milliseconds skipped the rest of such a
    /// millisecond.
    #[tokio::test]
    async fn a_millisecond_with_more_than_a_page_is_paged_whole() {
        let busy = 2_000_000;
        let (_dir, store) = subscribed_to_t(busy - 1_000).await;
        let mut expected = Vec::new();
        for batch in 0..6u32 {
            // Odd batches carry a later millisecond first, then more of the busy one.
            let per_batch = wharf_shared::MAX_MESSAGES_PER_REPLY as u32 / 2 + 10;
            let mut messages: Vec<Message> = (0..per_batch)
                .map(|i| at(batch * 10_000 + i, busy, Qos::AtLeastOnce))
                .collect();
            if batch % 2 == 1 {
                messages.push(at(
                    batch * 10_000 + 9_999,
                    busy + 1 + batch as i64,
                    Qos::AtLeastOnce,
                ));
            }
            expected.extend(messages.iter().cloned());
            let write = WriteBatch {
                messages,
                ..Default::default()
            };
            store.write(Arc::new(write)).await.expect("write");
        }
        expected.sort_by_key(|m| (m.created_ms, m.id));
        let mut got: Vec<MessageId> = Vec::new();
        let mut after = None;
        let mut pages = 0;
        loop {
            let (page, next) = super::super::undelivered(&store, "s", after, None)
                .await
                .expect("page");
            got.extend(page.iter().map(|m| m.id));
            pages += 1;
            assert!(pages < 100, "paging does not end");
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        let want: Vec<MessageId> = expected.iter().map(|m| m.id).collect();
        assert_eq!(got.len(), want.len(), "every message once");
        assert_eq!(got, want, "in (created, id) order");
    }

    /// Paging that may not read past a horizon (messages from it on may not be written yet)
    /// stops there and says so, never claiming the store has no more; pages of large messages
    /// are cut by bytes. Together the pages still hold every message once, in order.
    #[tokio::test]
    async fn pages_stop_at_the_horizon_and_at_the_byte_budget() {
        use super::super::undelivered_before;
        use wharf_shared::{MAX_BYTES_PER_REPLY, MAX_MESSAGES_PER_REPLY};
        let start = 3_000_000;
        let (_dir, store) = subscribed_to_t(start - 1).await;
        // A page and 700 small messages, one per millisecond, then 12 of 1 MiB.
        let small = MAX_MESSAGES_PER_REPLY as u32 + 700;
        let mut messages: Vec<Message> = (0..small)
            .map(|n| at(n, start + n as i64, Qos::AtLeastOnce))
            .collect();
        for n in small..small + 12 {
            let mut m = at(n, start + n as i64, Qos::AtLeastOnce);
            m.payload = vec![n as u8; 1 << 20];
            messages.push(m);
        }
        let write = WriteBatch {
            messages: messages.clone(),
            ..Default::default()
        };
        store.write(Arc::new(write)).await.expect("write");

        let below = MAX_MESSAGES_PER_REPLY + 100;
        let horizon = start + below as i64;
        let (mut got, mut after, mut pages) = (Vec::new(), None, 0);
        loop {
            let page = undelivered_before(&store, "s", after, None, Some(horizon), &HashSet::new())
                .await
                .expect("page");
            assert!(
                page.next.is_some(),
                "a page below the horizon never ends paging"
            );
            assert!(page.messages.iter().all(|m| m.created_ms < horizon));
            got.extend(page.messages.iter().map(|m| m.id));
            after = page.next;
            pages += 1;
            if page.at_horizon {
                assert_eq!(pages, 2, "a full page, then the rest up to the horizon");
                break;
            }
            assert!(pages < 10, "paging does not reach the horizon");
        }
        assert_eq!(got.len(), below, "every message before the horizon");
        let again = undelivered_before(&store, "s", after, None, Some(horizon), &HashSet::new())
            .await
            .expect("page");
        assert!(again.at_horizon && again.messages.is_empty());

        // Past the horizon (the writes done): the rest, with the large ones in pages of at
        // most the byte budget.
        loop {
            let page = undelivered_before(&store, "s", after, None, None, &HashSet::new())
                .await
                .expect("page");
            assert!(!page.at_horizon);
            let bytes: usize = page.messages.iter().map(|m| m.payload.len()).sum();
            assert!(bytes <= MAX_BYTES_PER_REPLY, "a page of {bytes} bytes");
            got.extend(page.messages.iter().map(|m| m.id));
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        let want: Vec<MessageId> = messages.iter().map(|m| m.id).collect();
        assert_eq!(got, want, "every message once, in order");
    }

    #[tokio::test]
    async fn catch_up_pages_come_in_creation_order_across_blocks() {
        let dir = tempfile::tempdir().expect("dir");
        let store = SqliteStore::open(dir.path()).expect("open");
        // Batches as the persister makes them: mostly rising times, some spanning more than a
        // block, one re-sent from long ago, one message written twice.
        let mut all: Vec<Message> = Vec::new();
        let mut seed = 7u64;
        let mut n = 0;
        for batch in 0..40 {
            let mut messages = Vec::new();
            for _ in 0..(batch % 7) * 9 + 1 {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let created = 1_000_000 + batch * 20 + (seed >> 59) as i64 * 3;
                n += 1;
                messages.push(at(n, created, Qos::AtLeastOnce));
            }
            if batch == 30 {
                messages.push(at(9999, 1_000_001, Qos::AtLeastOnce));
                messages.push(all[3].clone());
            }
            all.extend(messages.iter().cloned());
            let write = WriteBatch {
                messages,
                ..Default::default()
            };
            store.write(Arc::new(write)).await.expect("write");
        }
        let mut expected: Vec<Message> = Vec::new();
        for m in &all {
            if !expected.iter().any(|e| e.id == m.id) {
                expected.push(m.clone());
            }
        }
        expected.sort_by_key(|m| (m.created_ms, m.id));
        for since in [0, 1_000_001, 1_000_050, 1_000_333, 1_000_790, 2_000_000] {
            for not_host in [None, Some("other".to_string())] {
                for limit in [1, 7, 50, 1000] {
                    let want: Vec<MessageId> = expected
                        .iter()
                        .filter(|m| m.created_ms >= since)
                        .filter(|m| not_host.as_deref() != Some(m.host.as_str()))
                        .take(limit)
                        .map(|m| m.id)
                        .collect();
                    let got: Vec<MessageId> = store
                        .messages_after(Cursor::since(since), not_host.clone(), limit)
                        .await
                        .expect("page")
                        .iter()
                        .map(|m| m.id)
                        .collect();
                    assert_eq!(
                        got, want,
                        "since {since} not_host {not_host:?} limit {limit}"
                    );
                }
            }
        }
    }

    #[tokio::test]
    async fn a_resent_qos2_message_is_stored_once_and_found_by_id() {
        let dir = tempfile::tempdir().expect("dir");
        let store = SqliteStore::open(dir.path()).expect("open");
        let m = at(1, 5_000, Qos::ExactlyOnce);
        for _ in 0..2 {
            let write = WriteBatch {
                messages: vec![m.clone(), at(2, 5_001, Qos::AtLeastOnce)],
                ..Default::default()
            };
            store.write(Arc::new(write)).await.expect("write");
        }
        let found = store
            .qos2_messages_by_id(vec![m.id, at(2, 5_001, Qos::AtLeastOnce).id])
            .await
            .expect("by id");
        assert_eq!(found.len(), 1, "only QoS 2 messages are looked up by id");
        assert_eq!(found[0].payload, m.payload);
        let all = store
            .messages_after(Cursor::since(0), None, 10)
            .await
            .expect("read");
        assert_eq!(all.iter().filter(|x| x.id == m.id).count(), 1);
        let blocks = read_i64(&store, "SELECT count(*) FROM message_block");
        assert_eq!(blocks, 2, "the second write stored only the QoS 1 message");
        // Purged with its block once the block's newest message is past the TTL.
        let ttl = MESSAGE_TTL_SECS as i64 * 1000;
        assert_eq!(store.purge_expired(5_001 + ttl).await.expect("purge").0, 0);
        assert_eq!(store.purge_expired(5_002 + ttl).await.expect("purge").0, 2);
        assert!(store
            .qos2_messages_by_id(vec![m.id])
            .await
            .expect("by id")
            .is_empty());
    }
}
