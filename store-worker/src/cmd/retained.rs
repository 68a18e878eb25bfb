//! Retained messages, read and cleared after what the edges handed over before the request.

use crate::pipeline::retry;
use crate::state::Shared;
use crate::store::{self, Store, StoreError};
use wharf_shared::Reply;

/// The retained messages matching `filters`, once the persister's pending writes are done.
pub async fn written<S: Store>(
    shared: &Shared<S>,
    filters: &[String],
) -> Result<Reply, StoreError> {
    shared.persist.written().await;
    let store = &*shared.store;
    let messages = retry(shared.retry_limit, "retained", || {
        store::retained_for(store, filters)
    })
    .await?;
    Ok(Reply::Messages {
        messages,
        next: None,
    })
}

/// `ClearRetained`: the topic's retained message goes, after the writes queued before.
pub async fn clear<S: Store>(shared: &Shared<S>, topic: String) -> Result<Reply, StoreError> {
    shared.persist.written().await;
    retry(shared.retry_limit, "clear retained", || {
        shared.store.clear_retained(&topic)
    })
    .await?;
    Ok(Reply::Done)
}
