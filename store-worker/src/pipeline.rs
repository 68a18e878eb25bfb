//! The two batching tasks shared by every edge connection of a worker:
//! - the persister groups concurrent persist requests into one write (group commit) and
//!   replies to each once the write is durable;
//! - the recorder groups delivery records; those it holds and has not written are known by
//!   client, so that a catch-up query never returns what was just delivered.
//!
//! Both retry a store that is unavailable with backoff, up to a time limit.

use crate::store::{Deliveries, Store, StoreError, WriteBatch};
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Notify};
use wharf_shared::MessageId;
use wharf_shared::{Message, Reply, WorkerFrame};

/// How long a batching task waits to gather more when nothing in its batch is waited for.
const UNWAITED_LINGER: Duration = Duration::from_millis(5);

/// Where a reply goes: the edge connection's writer and the request id.
pub type ReplyTo = (mpsc::Sender<WorkerFrame>, u64);

/// What goes through the persister, in the order the edges sent it.
pub enum Job {
    /// The messages of one notice (QoS 0) or persist request (QoS 1): one job, one reply.
    StoreMany(Vec<Message>),
    /// A QoS 2 message with its publisher's packet id (exactly once across reconnects).
    Qos2 { message: Message, pkid: u16 },
    /// PUBREL: the packet id may be used for a new message again.
    Release { client_id: String, pkid: u16 },
    /// A clean session starts or ends: its packet ids are forgotten.
    Clear { client_id: String },
    /// Answered once everything queued before it has been written (or has failed), so that a
    /// query after it sees every message its edge sent before asking: the edge routes a QoS 1
    /// message to its live sessions before the store has it.
    Barrier(oneshot::Sender<()>),
}

/// What a queued message costs beyond its topic and payload (ids, client id, host, the
/// `Vec` slot), for the byte budget.
const MESSAGE_OVERHEAD: usize = 160;

impl Job {
    /// The bytes the job holds while queued, for [`ByteBudget`].
    fn bytes(&self) -> usize {
        let message = |m: &Message| {
            MESSAGE_OVERHEAD + m.topic.len() + m.payload.len() + m.client_id.len() + m.host.len()
        };
        match self {
            Job::StoreMany(messages) => messages.iter().map(message).sum(),
            Job::Qos2 { message: m, .. } => message(m),
            Job::Release { client_id, .. } | Job::Clear { client_id } => 64 + client_id.len(),
            Job::Barrier(_) => 0,
        }
    }

    /// The creation time of the job's oldest message.
    fn oldest(&self) -> Option<i64> {
        match self {
            Job::StoreMany(messages) => messages.iter().map(|m| m.created_ms).min(),
            Job::Qos2 { message, .. } => Some(message.created_ms),
            _ => None,
        }
    }
}

/// The queue of a batching task (persister, recorder). What nobody waits for (QoS 0 messages,
/// delivery records) is gathered for up to [`UNWAITED_LINGER`] after the first item, with one
/// wake-up for the lot, so that one transaction carries many; an item that someone waits for
/// (`waited`, one predicate for both ends) ends that wait at once.
pub struct BatchQueue<T> {
    tx: mpsc::Sender<T>,
    urgent: Arc<Notify>,
    waited: fn(&T) -> bool,
}

impl<T> Clone for BatchQueue<T> {
    fn clone(&self) -> Self {
        BatchQueue {
            tx: self.tx.clone(),
            urgent: self.urgent.clone(),
            waited: self.waited,
        }
    }
}

pub struct BatchRx<T> {
    rx: mpsc::Receiver<T>,
    urgent: Arc<Notify>,
    waited: fn(&T) -> bool,
}

impl<T> BatchQueue<T> {
    pub fn new(capacity: usize, waited: fn(&T) -> bool) -> (BatchQueue<T>, BatchRx<T>) {
        let (tx, rx) = mpsc::channel(capacity);
        let urgent = Arc::new(Notify::new());
        (
            BatchQueue {
                tx,
                urgent: urgent.clone(),
                waited,
            },
            BatchRx { rx, urgent, waited },
        )
    }

    /// Queues an item; waits while the queue is full. `Err` (with the item): the task is gone.
    pub async fn send(&self, item: T) -> Result<(), T> {
        let waited = (self.waited)(&item);
        self.tx.send(item).await.map_err(|e| e.0)?;
        if waited {
            self.urgent.notify_one();
        }
        Ok(())
    }

    /// Queues the barrier `make` builds around a reply channel and waits until the task
    /// answers it, or is gone.
    pub async fn barrier(&self, make: impl FnOnce(oneshot::Sender<()>) -> T) {
        let (tx, rx) = oneshot::channel();
        if self.send(make(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// How long a batch waits for company, and which items are worth it.
type Company<T> = (Duration, fn(&T) -> bool);

impl<T> BatchRx<T> {
    /// Fills `batch` (up to `max`) with the next items; `false` once every sender is gone.
    /// With `company` (a delay, and which items are worth it), a batch holding such an item
    /// gathers what else comes within the delay.
    async fn next_batch(
        &mut self,
        batch: &mut Vec<T>,
        max: usize,
        company: Option<Company<T>>,
    ) -> bool {
        if self.rx.recv_many(batch, max).await == 0 {
            return false;
        }
        let company = company.filter(|(_, worth)| batch.len() < max && batch.iter().any(worth));
        if let Some((delay, _)) = company {
            let until = tokio::time::Instant::now() + delay;
            while batch.len() < max {
                let room = max - batch.len();
                match tokio::time::timeout_at(until, self.rx.recv_many(batch, room)).await {
                    Ok(n) if n > 0 => continue,
                    _ => break,
                }
            }
            return true;
        }
        if !batch.iter().any(self.waited) && batch.len() < max {
            tokio::select! {
                _ = tokio::time::sleep(UNWAITED_LINGER) => {}
                _ = self.urgent.notified() => {}
            }
            while batch.len() < max {
                match self.rx.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(_) => break,
                }
            }
        }
        true
    }
}

/// The creation times of messages the persister has accepted and not yet written (or given
/// up on): every message an edge sent that was created before the oldest of them is in the
/// store. A catch-up that reads only that far needs no barrier.
#[derive(Default)]
pub struct Unwritten(Mutex<BTreeMap<i64, usize>>);

impl Unwritten {
    fn add(&self, created_ms: i64) {
        *self.0.lock().expect("lock").entry(created_ms).or_default() += 1;
    }

    fn remove(&self, created_ms: i64) {
        let mut times = self.0.lock().expect("lock");
        if let std::collections::btree_map::Entry::Occupied(mut e) = times.entry(created_ms) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    fn oldest(&self) -> Option<i64> {
        self.0.lock().expect("lock").keys().next().copied()
    }
}

/// The bytes of messages accepted and not yet written (`--max-queued-bytes`). A job waits
/// while the budget is spent, so the connection reader that queues it stops reading its edge:
/// the edge's link fills and its sessions stop reading their clients (TCP pushes back on the
/// publishers) instead of the worker growing. One job larger than the whole budget still
/// goes, alone.
pub struct ByteBudget {
    limit: usize,
    used: std::sync::atomic::AtomicUsize,
    freed: Notify,
}

impl ByteBudget {
    pub fn new(limit: usize) -> ByteBudget {
        ByteBudget {
            limit: limit.max(1),
            used: Default::default(),
            freed: Notify::new(),
        }
    }

    /// Waits until `n` bytes fit (at once when nothing is queued), and takes them.
    async fn take(&self, n: usize) {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        let mut waited = false;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let used = self.used.load(Acquire);
            if used == 0 || used + n <= self.limit {
                if self
                    .used
                    .compare_exchange(used, used + n, AcqRel, Acquire)
                    .is_ok()
                {
                    metrics::gauge!("wharf_worker_queued_bytes").set((used + n) as f64);
                    return;
                }
                continue;
            }
            if !waited {
                waited = true;
                metrics::counter!("wharf_worker_queued_bytes_waits_total").increment(1);
            }
            freed.await;
        }
    }

    fn give(&self, n: usize) {
        let before = self.used.fetch_sub(n, std::sync::atomic::Ordering::AcqRel);
        metrics::gauge!("wharf_worker_queued_bytes").set(before.saturating_sub(n) as f64);
        self.freed.notify_waiters();
    }
}

/// The persister's queue, which knows how far the store is complete (see [`Unwritten`]).
#[derive(Clone)]
pub struct PersistQueue {
    queue: BatchQueue<PersistJob>,
    unwritten: Arc<Unwritten>,
    budget: Arc<ByteBudget>,
}

pub struct PersistRx {
    rx: BatchRx<PersistJob>,
    unwritten: Arc<Unwritten>,
    budget: Arc<ByteBudget>,
}

/// The persister's queue: a job with a reply is waited for, and so is a barrier. At most
/// `capacity` jobs and `max_bytes` bytes of messages wait in it.
pub fn persist_queue(capacity: usize, max_bytes: usize) -> (PersistQueue, PersistRx) {
    let (queue, rx) = BatchQueue::new(capacity, |job: &PersistJob| {
        job.reply.is_some() || matches!(job.job, Job::Barrier(_))
    });
    let unwritten = Arc::new(Unwritten::default());
    let budget = Arc::new(ByteBudget::new(max_bytes));
    (
        PersistQueue {
            queue,
            unwritten: unwritten.clone(),
            budget: budget.clone(),
        },
        PersistRx {
            rx,
            unwritten,
            budget,
        },
    )
}

impl PersistQueue {
    /// Queues a job; waits while the queue is full or its bytes do not fit the budget.
    /// `Err`: the persister is gone.
    pub async fn send(&self, job: PersistJob) -> Result<(), ()> {
        let bytes = job.job.bytes();
        self.budget.take(bytes).await;
        let oldest = job.job.oldest();
        if let Some(t) = oldest {
            self.unwritten.add(t);
        }
        let sent = self.queue.send(job).await;
        if sent.is_err() {
            self.budget.give(bytes);
        }
        if let (Err(_), Some(t)) = (&sent, oldest) {
            self.unwritten.remove(t);
        }
        sent.map_err(|_| ())
    }

    /// Waits until everything queued before this call is written.
    pub async fn written(&self) {
        self.queue
            .barrier(|tx| PersistJob {
                job: Job::Barrier(tx),
                reply: None,
            })
            .await;
    }

    /// The creation time of the oldest message queued and not yet written; `None` when the
    /// store holds everything queued so far.
    pub fn oldest_unwritten(&self) -> Option<i64> {
        self.unwritten.oldest()
    }

    /// Bytes of messages queued and not yet written (what the byte budget holds).
    pub fn queued_bytes(&self) -> usize {
        self.budget.used.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Delivery records the recorder has accepted and not yet written (or given up on), by
/// client: a catch-up counts them as delivered along with those the store holds, instead of
/// waiting for the recorder to write them.
#[derive(Default)]
pub struct PendingRecords(Mutex<HashMap<String, HashMap<MessageId, u32>>>);

impl PendingRecords {
    fn add(&self, deliveries: &Deliveries) {
        let mut clients = self.0.lock().expect("lock");
        let ids = clients.entry(deliveries.client_id.clone()).or_default();
        for record in &deliveries.records {
            *ids.entry(record.message_id).or_default() += 1;
        }
    }

    fn remove(&self, deliveries: &Deliveries) {
        let mut clients = self.0.lock().expect("lock");
        let Some(ids) = clients.get_mut(&deliveries.client_id) else {
            return;
        };
        for record in &deliveries.records {
            if let std::collections::hash_map::Entry::Occupied(mut e) = ids.entry(record.message_id)
            {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
        if ids.is_empty() {
            clients.remove(&deliveries.client_id);
        }
    }

    fn of(&self, client_id: &str) -> HashSet<MessageId> {
        self.0
            .lock()
            .expect("lock")
            .get(client_id)
            .map(|ids| ids.keys().copied().collect())
            .unwrap_or_default()
    }
}

/// The recorder's queue, which knows the records not yet written (see [`PendingRecords`]).
#[derive(Clone)]
pub struct RecordQueue {
    queue: BatchQueue<Deliveries>,
    pending: Arc<PendingRecords>,
}

pub struct RecordRx {
    rx: BatchRx<Deliveries>,
    pending: Arc<PendingRecords>,
}

/// The recorder's queue: nobody waits for a record.
pub fn record_queue(capacity: usize) -> (RecordQueue, RecordRx) {
    let (queue, rx) = BatchQueue::new(capacity, |_: &Deliveries| false);
    let pending = Arc::new(PendingRecords::default());
    (
        RecordQueue {
            queue,
            pending: pending.clone(),
        },
        RecordRx { rx, pending },
    )
}

impl RecordQueue {
    /// Queues a client's delivery records; waits while the queue is full. `Err`: the recorder
    /// is gone.
    pub async fn send(&self, deliveries: Deliveries) -> Result<(), ()> {
        self.pending.add(&deliveries);
        self.queue.send(deliveries).await.map_err(|deliveries| {
            self.pending.remove(&deliveries);
        })
    }

    /// The messages with a delivery record for the client that is queued and not yet
    /// written. Taken before the store is asked, the two together miss no record sent before:
    /// a record leaves this set only once it is written.
    pub fn pending_for(&self, client_id: &str) -> HashSet<MessageId> {
        self.pending.of(client_id)
    }
}

pub struct PersistJob {
    pub job: Job,
    /// `None` for QoS 0 messages and session clean-ups, which nobody waits for.
    pub reply: Option<ReplyTo>,
}

/// QoS 2 packet ids the store holds: the message id recorded for each, and whether that
/// message is stored. The record is written before its message, so a crash in between leaves
/// a record without a message: the re-sent PUBLISH is then stored under the recorded id.
pub type Recorded = HashMap<(String, u16), (MessageId, bool)>;

/// Turns jobs, in order, into one write and a reply per job.
fn plan(jobs: impl IntoIterator<Item = Job>, mut recorded: Recorded) -> (WriteBatch, Vec<Reply>) {
    let mut batch = WriteBatch::default();
    let mut replies = Vec::new();
    for job in jobs {
        replies.push(match job {
            Job::StoreMany(ms) => {
                batch.messages.extend(ms);
                Reply::Persisted
            }
            Job::Qos2 { mut message, pkid } => {
                let key = (message.client_id.clone(), pkid);
                match recorded.get(&key) {
                    Some((_, true)) => Reply::AlreadyStored,
                    known => {
                        if let Some((id, false)) = known {
                            message.id = *id;
                        }
                        batch
                            .record_qos2
                            .retain(|(c, p, _)| (c, p) != (&key.0, &key.1));
                        batch.record_qos2.push((key.0.clone(), key.1, message.id));
                        recorded.insert(key, (message.id, true));
                        batch.messages.push(message);
                        Reply::Persisted
                    }
                }
            }
            Job::Release { client_id, pkid } => {
                let key = (client_id, pkid);
                recorded.remove(&key);
                batch
                    .record_qos2
                    .retain(|(c, p, _)| (c, p) != (&key.0, &key.1));
                batch.release_qos2.push(key);
                Reply::Done
            }
            Job::Clear { client_id } => {
                recorded.retain(|(c, _), _| *c != client_id);
                batch.record_qos2.retain(|(c, _, _)| *c != client_id);
                batch.clear_qos2.push(client_id);
                Reply::Done
            }
            // Taken out of the batch before planning (see `persister`).
            Job::Barrier(_) => Reply::Done,
        });
    }
    (batch, replies)
}

/// The recorded QoS 2 ids among `keys`, with whether their messages are stored.
async fn recorded<S: Store>(store: &S, keys: Vec<(String, u16)>) -> Result<Recorded, StoreError> {
    let ids = store.qos2_recorded(keys).await?;
    if ids.is_empty() {
        return Ok(Recorded::new());
    }
    let stored: HashSet<MessageId> = store
        .qos2_messages_by_id(ids.values().copied().collect())
        .await?
        .into_iter()
        .map(|m| m.id)
        .collect();
    Ok(ids
        .into_iter()
        .map(|(key, id)| (key, (id, stored.contains(&id))))
        .collect())
}

/// Runs `op` until it succeeds, fails for good, or `limit` has passed.
pub async fn retry<T, F, Fut>(limit: Duration, what: &str, mut op: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let started = Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        match op().await {
            Ok(t) => return Ok(t),
            Err(e) if e.retryable() && started.elapsed() + backoff < limit => {
                metrics::counter!("wharf_worker_store_errors_total", "kind" => "retried")
                    .increment(1);
                tracing::warn!(error = %e, retry_in = ?backoff, "{what}: store unavailable");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Err(e) => {
                metrics::counter!("wharf_worker_store_errors_total", "kind" => "failed")
                    .increment(1);
                return Err(e);
            }
        }
    }
}

/// Whether a job is worth waiting for company: a write someone waits for (not a barrier).
fn wants_company(job: &PersistJob) -> bool {
    job.reply.is_some()
}

/// Writes what the edges hand over in group commits. A write someone waits for goes at once,
/// unless commits are frequent (the last began within 4 x `commit_delay`): then it waits up
/// to `commit_delay` for other jobs to share its commit (PostgreSQL's `commit_delay` with
/// `commit_siblings`), so that at fleet rates one commit and one fsync carry several
/// messages, while a quiet store adds no delay.
pub async fn persister<S: Store>(
    store: Arc<S>,
    edges: Arc<crate::fanout::Edges>,
    jobs: PersistRx,
    max_batch: usize,
    limit: Duration,
    commit_delay: Duration,
) {
    let PersistRx {
        rx: mut jobs,
        unwritten,
        budget,
    } = jobs;
    let mut batch = Vec::with_capacity(max_batch);
    let mut accepted = Vec::with_capacity(max_batch);
    let mut last_commit: Option<Instant> = None;
    loop {
        let busy = last_commit.is_some_and(|at| at.elapsed() < commit_delay * 4);
        let company = (busy && !commit_delay.is_zero())
            .then_some((commit_delay, wants_company as fn(&PersistJob) -> bool));
        if !jobs.next_batch(&mut batch, max_batch, company).await {
            break;
        }
        accepted.extend(batch.iter().filter_map(|j| j.job.oldest()));
        let batch_bytes: usize = batch.iter().map(|j| j.job.bytes()).sum();
        let started = Instant::now();
        let is_barrier = |j: &PersistJob| matches!(j.job, Job::Barrier(_));
        let mut barriers = Vec::new();
        if batch.iter().any(is_barrier) {
            let jobs;
            (barriers, jobs) = batch.drain(..).partition(is_barrier);
            batch.extend(jobs);
        }
        if batch.is_empty() {
            settle(barriers);
            continue;
        }
        let reply_to: Vec<Option<ReplyTo>> = batch.iter_mut().map(|j| j.reply.take()).collect();
        if reply_to.iter().any(Option::is_some) {
            last_commit = Some(started);
        }
        let keys: Vec<(String, u16)> = batch
            .iter()
            .filter_map(|j| match &j.job {
                Job::Qos2 { message, pkid } => Some((message.client_id.clone(), *pkid)),
                _ => None,
            })
            .collect();
        let result = async {
            let recorded = if keys.is_empty() {
                Recorded::new()
            } else {
                retry(limit, "QoS 2 ids", || recorded(&*store, keys.clone())).await?
            };
            let (mut write, replies) = plan(batch.drain(..).map(|j| j.job), recorded);
            write.relaxed = reply_to.iter().all(Option::is_none);
            metrics::histogram!("wharf_worker_persist_batch_size")
                .record(write.messages.len() as f64);
            let write = Arc::new(write);
            retry(limit, "persist", || store.write(write.clone())).await?;
            let messages = match Arc::try_unwrap(write) {
                Ok(write) => write.messages,
                Err(write) => write.messages.clone(),
            };
            Ok::<_, StoreError>((messages, replies))
        }
        .await;
        batch.clear();
        // Written, or given up on: either way nothing more of these is coming.
        for t in accepted.drain(..) {
            unwritten.remove(t);
        }
        budget.give(batch_bytes);
        metrics::histogram!("wharf_worker_persist_seconds").record(started.elapsed().as_secs_f64());
        let (stored, replies) = match result {
            Ok((messages, replies)) => (Some(messages), replies),
            Err(e) => {
                tracing::error!(error = %e, jobs = batch.len(), "persist failed; the edges will not acknowledge");
                let failed = Reply::Failed {
                    reason: e.to_string(),
                    retryable: e.retryable(),
                };
                (None, vec![failed; reply_to.len()])
            }
        };
        for (reply_to, reply) in reply_to.into_iter().zip(replies) {
            if let Some((tx, id)) = reply_to {
                let _ = tx.send(WorkerFrame::Reply { id, reply }).await;
            }
        }
        settle(barriers);
        // Other edges of this worker get what is now stored (after the replies, which the
        // publishers wait for).
        if let Some(messages) = stored.filter(|m| !m.is_empty()) {
            edges.fanout(&messages, false).await;
        }
    }
}

fn settle(barriers: Vec<PersistJob>) {
    for barrier in barriers {
        if let Job::Barrier(tx) = barrier.job {
            let _ = tx.send(());
        }
    }
}

/// Delivery record writes the recorder has under way at once.
const RECORD_WRITES_AT_ONCE: usize = 4;

pub async fn recorder<S: Store>(store: Arc<S>, queue: RecordRx, max_batch: usize, limit: Duration) {
    let RecordRx { mut rx, pending } = queue;
    let mut received = Vec::with_capacity(64);
    while rx.next_batch(&mut received, 1024, None).await {
        // Whole notices per write, about `max_batch` records each, up to
        // `RECORD_WRITES_AT_ONCE` writes at a time: records are independent of each other, and
        // a subscriber reading a backlog makes them as fast as the store can read messages.
        let mut chunks = vec![Vec::new()];
        let mut in_chunk = 0;
        for deliveries in received.drain(..) {
            if in_chunk >= max_batch.max(1) {
                chunks.push(Vec::new());
                in_chunk = 0;
            }
            in_chunk += deliveries.records.len();
            chunks.last_mut().expect("one").push(deliveries);
        }
        let writes = chunks.into_iter().filter(|c| !c.is_empty()).map(|chunk| {
            let (store, pending) = (&store, &pending);
            async move {
                let records: usize = chunk.iter().map(|d| d.records.len()).sum();
                let chunk = Arc::new(chunk);
                if let Err(e) = retry(limit, "record deliveries", || {
                    store.record_delivered(chunk.clone())
                })
                .await
                {
                    // A lost record means a possible duplicate delivery later, never a loss.
                    tracing::error!(error = %e, records, "delivery records not written");
                }
                for deliveries in chunk.iter() {
                    pending.remove(deliveries);
                }
            }
        });
        futures::stream::iter(writes)
            .buffer_unordered(RECORD_WRITES_AT_ONCE)
            .collect::<()>()
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wharf_shared::Qos;

    fn qos2(client: &str, pkid: u16, id: u8) -> PersistJob {
        PersistJob {
            job: Job::Qos2 {
                message: Message {
                    id: MessageId([id; 12]),
                    topic: "t".into(),
                    payload: vec![],
                    qos: Qos::ExactlyOnce,
                    retain: false,
                    client_id: client.into(),
                    host: "h".into(),
                    created_ms: 0,
                    properties: None,
                },
                pkid,
            },
            reply: None,
        }
    }

    /// A batch someone waits for takes what comes within the company delay into the same
    /// write, and only that; without the delay, or with only items not worth it (a
    /// barrier's), it goes at once.
    #[tokio::test]
    async fn a_waited_batch_gathers_company_for_the_delay_only() {
        let (queue, mut rx) = BatchQueue::new(16, |n: &u32| *n % 2 == 1);
        let delay = Some((
            Duration::from_millis(300),
            (|n: &u32| *n == 1) as fn(&u32) -> bool,
        ));
        let sender = {
            let queue = queue.clone();
            tokio::spawn(async move {
                // 1 is waited for; 2 and 4 come within the delay, 6 after it.
                let _ = queue.send(1).await;
                for (n, after_ms) in [(2, 20), (4, 40), (6, 600)] {
                    tokio::time::sleep(Duration::from_millis(after_ms)).await;
                    let _ = queue.send(n).await;
                }
            })
        };
        let mut batch = Vec::new();
        assert!(rx.next_batch(&mut batch, 16, delay).await);
        assert_eq!(batch, [1, 2, 4]);
        sender.await.expect("sender");
        batch.clear();
        let _ = queue.send(3).await;
        assert!(rx.next_batch(&mut batch, 16, None).await);
        assert_eq!(batch, [6, 3], "without company: what is queued, at once");
        batch.clear();
        let _ = queue.send(5).await;
        let late = {
            let queue = queue.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = queue.send(8).await;
            })
        };
        assert!(rx.next_batch(&mut batch, 16, delay).await);
        assert_eq!(batch, [5], "not worth company: at once");
        late.await.expect("sender");
    }

    #[test]
    fn qos2_resends_are_recognised_and_interrupted_writes_resumed() {
        let mut recorded = Recorded::new();
        recorded.insert(("stored".into(), 1), (MessageId([9; 12]), true));
        recorded.insert(("crashed".into(), 1), (MessageId([8; 12]), false));
        let jobs = vec![
            qos2("stored", 1, 1),
            qos2("crashed", 1, 2),
            qos2("new", 1, 3),
            qos2("new", 1, 4),
            PersistJob {
                job: Job::Release {
                    client_id: "new".into(),
                    pkid: 1,
                },
                reply: None,
            },
            qos2("new", 1, 5),
        ];
        let (batch, replies) = plan(jobs.into_iter().map(|j| j.job), recorded);
        assert_eq!(
            replies,
            vec![
                Reply::AlreadyStored,
                Reply::Persisted,
                Reply::Persisted,
                Reply::AlreadyStored,
                Reply::Done,
                Reply::Persisted
            ]
        );
        let ids: Vec<u8> = batch.messages.iter().map(|m| m.id.0[0]).collect();
        // The interrupted one is stored under the id recorded before the crash.
        assert_eq!(ids, vec![8, 3, 5]);
        assert_eq!(batch.release_qos2, vec![("new".to_owned(), 1)]);
        let records: Vec<(String, u8)> = batch
            .record_qos2
            .iter()
            .map(|(c, _, id)| (c.clone(), id.0[0]))
            .collect();
        assert_eq!(
            records,
            vec![("crashed".to_owned(), 8), ("new".to_owned(), 5)]
        );
    }

    #[tokio::test]
    async fn a_spent_budget_holds_the_next_job_until_bytes_are_given_back() {
        let budget = Arc::new(ByteBudget::new(100));
        budget.take(60).await;
        budget.take(40).await;
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.take(10).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "taken past the budget");
        budget.give(60);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("taken once bytes came back")
            .expect("task");
        budget.give(50);
        // One job larger than the whole budget goes, alone.
        tokio::time::timeout(Duration::from_secs(1), budget.take(1_000))
            .await
            .expect("a large job when nothing is queued");
    }
}
