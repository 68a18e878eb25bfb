//! Outbound QoS 2 deliveries under way: tracked from PUBLISH (or PUBREC, `released`) until
//! PUBCOMP, so that a returning session resends or releases them.

use crate::pipeline::retry;
use crate::state::Shared;
use crate::store::{Deliveries, Store, StoreError};
use wharf_shared::now_ms;
use wharf_shared::{DeliveredRecord, MessageId, Reply};

/// `TrackQos2Out`: packet `pkid` of the client carries `message_id`; once `released` (PUBREC
/// came) the message's delivery record is written with it.
pub async fn track<S: Store>(
    shared: &Shared<S>,
    edge_host: &str,
    client_id: String,
    pkid: u16,
    message_id: MessageId,
    topic: String,
    released: bool,
) -> Result<Reply, StoreError> {
    let row = released.then(|| Deliveries {
        client_id: client_id.clone(),
        host: edge_host.into(),
        created_ms: now_ms(),
        records: vec![DeliveredRecord { message_id, topic }],
    });
    retry(shared.retry_limit, "track QoS 2", || {
        shared
            .store
            .track_qos2_out(&client_id, pkid, message_id, row.clone())
    })
    .await?;
    Ok(Reply::Done)
}

/// `ForgetQos2Out`: PUBCOMP came for `pkid`.
pub async fn forget<S: Store>(
    shared: &Shared<S>,
    client_id: String,
    pkid: u16,
) -> Result<Reply, StoreError> {
    retry(shared.retry_limit, "forget QoS 2", || {
        shared.store.forget_qos2_out(&client_id, Some(pkid))
    })
    .await?;
    Ok(Reply::Done)
}
