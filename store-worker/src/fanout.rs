//! The edges connected to this worker, and delivery of messages between hosts: what one edge
//! received goes to this worker's other edges right after it is stored, and what other
//! workers stored (the store's feed) goes to all of them. An edge never gets its own host's
//! messages back: it routed those itself.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use wharf_shared::{Message, WorkerFrame};

struct EdgeTx {
    id: u64,
    host: Arc<str>,
    tx: mpsc::Sender<WorkerFrame>,
}

#[derive(Default)]
pub struct Edges {
    inner: Mutex<Vec<EdgeTx>>,
    next_id: AtomicU64,
}

impl Edges {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<EdgeTx>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn add(&self, host: Arc<str>, tx: mpsc::Sender<WorkerFrame>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().push(EdgeTx { id, host, tx });
        id
    }

    pub fn remove(&self, id: u64) {
        self.lock().retain(|e| e.id != id);
    }

    /// Sends every edge `frame`.
    pub async fn broadcast(&self, frame: WorkerFrame) {
        let edges: Vec<mpsc::Sender<WorkerFrame>> =
            self.lock().iter().map(|e| e.tx.clone()).collect();
        for tx in edges {
            // Bounded: a slow edge slows the sender, it does not grow a queue.
            let _ = tx.send(frame.clone()).await;
        }
    }

    /// Sends each edge the messages whose host is not its own. With `from_feed`, messages of
    /// any host served by this worker are skipped too: they were delivered when stored here.
    pub async fn fanout(&self, messages: &[Message], from_feed: bool) {
        let edges: Vec<(Arc<str>, mpsc::Sender<WorkerFrame>)> = self
            .lock()
            .iter()
            .map(|e| (e.host.clone(), e.tx.clone()))
            .collect();
        if edges.is_empty() {
            return;
        }
        let local: Vec<&Arc<str>> = edges.iter().map(|(h, _)| h).collect();
        for (host, tx) in &edges {
            let batch: Vec<Message> = messages
                .iter()
                .filter(|m| *m.host != **host)
                .filter(|m| !from_feed || !local.iter().any(|h| ***h == *m.host))
                .cloned()
                .collect();
            if !batch.is_empty() {
                // Bounded: a slow edge slows the fan-out, it does not grow a queue.
                let _ = tx.send(WorkerFrame::Deliver { messages: batch }).await;
            }
        }
    }
}
