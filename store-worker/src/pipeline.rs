//! The two batching tasks shared by every edge connection of a worker:
//! - the persister groups concurrent persist requests into one write (group commit) and
//!   replies to each once the write is durable;
//! - the recorder groups delivery records, and answers a barrier once everything sent before
//!   it is written, so that a catch-up query never returns what was just delivered.
//!
//! Both retry a store that is unavailable with backoff, up to a time limit.

use crate::store::{DeliveryRow, Store, StoreError};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use wharf_shared::{Message, Reply, WorkerFrame};

/// Where a reply goes: the edge connection's writer and the request id.
pub type ReplyTo = (mpsc::Sender<WorkerFrame>, u64);

pub struct PersistJob {
    pub message: Message,
    /// `None` for QoS 0 messages, which nobody waits for.
    pub reply: Option<ReplyTo>,
}

pub enum RecordCommand {
    Rows(Vec<DeliveryRow>),
    Barrier(oneshot::Sender<()>),
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

pub async fn persister<S: Store>(
    store: Arc<S>,
    edges: Arc<crate::fanout::Edges>,
    mut jobs: mpsc::Receiver<PersistJob>,
    max_batch: usize,
    limit: Duration,
) {
    let mut batch = Vec::with_capacity(max_batch);
    while jobs.recv_many(&mut batch, max_batch).await > 0 {
        let started = Instant::now();
        let messages: Vec<Message> = batch.iter().map(|j| j.message.clone()).collect();
        metrics::histogram!("wharf_worker_persist_batch_size").record(messages.len() as f64);
        let result = retry(limit, "persist", || store.insert_messages(messages.clone())).await;
        metrics::histogram!("wharf_worker_persist_seconds").record(started.elapsed().as_secs_f64());
        let reply = match &result {
            Ok(()) => Reply::Persisted,
            Err(e) => {
                tracing::error!(error = %e, messages = batch.len(), "persist failed; the edges will not acknowledge");
                Reply::Failed {
                    reason: e.to_string(),
                    retryable: e.retryable(),
                }
            }
        };
        // Other edges of this worker get what is now stored (after the replies, which the
        // publishers wait for).
        let stored = result.is_ok().then_some(messages);
        for job in batch.drain(..) {
            if let Some((tx, id)) = job.reply {
                let _ = tx
                    .send(WorkerFrame::Reply {
                        id,
                        reply: reply.clone(),
                    })
                    .await;
            }
        }
        if let Some(messages) = stored {
            edges.fanout(&messages, false).await;
        }
    }
}

pub async fn recorder<S: Store>(
    store: Arc<S>,
    mut commands: mpsc::Receiver<RecordCommand>,
    max_batch: usize,
    limit: Duration,
) {
    let mut received = Vec::with_capacity(64);
    while commands.recv_many(&mut received, 64).await > 0 {
        let mut rows = Vec::new();
        let mut barriers = Vec::new();
        for command in received.drain(..) {
            match command {
                RecordCommand::Rows(r) => rows.extend(r),
                RecordCommand::Barrier(tx) => barriers.push(tx),
            }
        }
        for chunk in rows.chunks(max_batch.max(1)) {
            let chunk = chunk.to_vec();
            if let Err(e) = retry(limit, "record deliveries", || {
                store.record_delivered(chunk.clone())
            })
            .await
            {
                // A lost record means a possible duplicate delivery later, never a loss.
                tracing::error!(error = %e, records = chunk.len(), "delivery records not written");
            }
        }
        for tx in barriers {
            let _ = tx.send(());
        }
    }
}
