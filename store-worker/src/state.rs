//! What every edge connection of the worker shares: the store, the batching queues, the
//! connected edges, this host's routes, the rankings being counted.

use crate::pipeline::{Job, PersistJob};
use std::sync::Arc;
use std::time::Duration;

/// What every connection shares.
pub struct Shared<S> {
    pub store: Arc<S>,
    pub host: String,
    pub instance: String,
    pub persist: crate::pipeline::PersistQueue,
    pub record: crate::pipeline::RecordQueue,
    pub edges: Arc<crate::fanout::Edges>,
    /// This host's routes, where hosts share the store.
    pub routes: Option<Arc<crate::routes::RouteBook>>,
    pub retry_limit: Duration,
    /// The fleet's sessions ranked by what they are owed, as the admin API asks.
    pub rankings: crate::rankings::Rankings,
}

impl<S> Shared<S> {
    /// Forgets the client's inbound QoS 2 packet ids, through the persister so that it
    /// comes after the persists that used them; false when the persister is gone.
    pub(crate) async fn forget_inbound_qos2(&self, client_id: String) -> bool {
        let clear = PersistJob {
            job: Job::Clear { client_id },
            reply: None,
        };
        self.persist.send(clear).await.is_ok()
    }
}
