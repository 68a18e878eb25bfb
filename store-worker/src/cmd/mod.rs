//! One handler per kind of request, as [`handle`] dispatches them: each takes the request's
//! fields, applies them to the store and returns the reply.
//!
//! - [`session`]: a client's session (connect, disconnect, subscribe, unsubscribe, catch-up)
//!   and what ending one clears.
//! - [`qos2`]: outbound QoS 2 deliveries under way.
//! - [`retained`]: retained messages.
//! - [`behind`]: what sessions are owed (a session, a page of them, the fleet's most owed).
//! - [`admin`]: the admin API's lookups (a message's trace, a topic's messages, the cluster)
//!   and its changes to users and rules; the groups' ownership; the auth snapshot.
//!
//! The persister's requests (`Persist`, `PersistQos2`, `ReleaseQos2`) never come here: the
//! connection hands them to [`crate::pipeline`].

pub mod admin;
pub mod behind;
pub mod qos2;
pub mod retained;
pub mod session;

use crate::state::Shared;
use crate::store::{Store, StoreError};
use std::sync::Arc;
use wharf_shared::{Reply, Request};

/// Runs one request for an edge on `edge_host`.
pub async fn handle<S: Store>(
    shared: &Arc<Shared<S>>,
    request: Request,
    edge_host: &str,
) -> Result<Reply, StoreError> {
    match request {
        Request::Connect {
            client_id,
            clean_start,
            session_expiry,
        } => session::connect(shared, edge_host, client_id, clean_start, session_expiry).await,
        Request::Disconnect {
            client_id,
            session_expiry,
            generation,
        } => session::disconnect(shared, edge_host, client_id, session_expiry, generation).await,
        Request::Subscribe {
            client_id,
            subscriptions,
        } => session::subscribe(shared, client_id, subscriptions).await,
        Request::Unsubscribe { client_id, filters } => {
            session::unsubscribe(shared, client_id, filters).await
        }
        Request::CatchUp {
            client_id,
            after,
            other_hosts_only,
        } => session::catch_up(shared, edge_host, client_id, after, other_hosts_only).await,
        Request::TrackQos2Out {
            client_id,
            pkid,
            message_id,
            topic,
            released,
        } => {
            qos2::track(
                shared, edge_host, client_id, pkid, message_id, topic, released,
            )
            .await
        }
        Request::ForgetQos2Out { client_id, pkid } => qos2::forget(shared, client_id, pkid).await,
        Request::Retained { filter } => retained::written(shared, &[filter]).await,
        Request::ClearRetained { topic } => retained::clear(shared, topic).await,
        Request::Owed { client_id, limit } => behind::owed_by(shared, client_id, limit).await,
        Request::Sessions {
            after,
            prefix,
            limit,
            owed_limit,
        } => behind::sessions(shared, after, prefix, limit, owed_limit).await,
        Request::MostOwed {
            prefix,
            scan,
            top,
            owed_limit,
        } => behind::most_owed(shared, prefix, scan, top, owed_limit).await,
        Request::Trace { id, limit } => admin::trace(shared, id, limit).await,
        Request::Find {
            topic,
            after,
            limit,
        } => admin::find(shared, topic, after, limit).await,
        Request::Cluster => admin::cluster(shared).await,
        Request::PutUser { user, by } => admin::put_user(shared, user, by).await,
        Request::DeleteUser { username, by } => admin::delete_user(shared, username, by).await,
        Request::PutRule { rule, by } => admin::put_rule(shared, rule, by).await,
        Request::DeleteRule { rule, by } => admin::delete_rule(shared, rule, by).await,
        Request::OwnGroups { owner, groups } => admin::own_groups(shared, owner, groups).await,
        Request::LoadAuth { users, rules } => admin::load_auth(shared, users, rules).await,
        Request::Persist(_) | Request::PersistQos2 { .. } | Request::ReleaseQos2 { .. } => {
            Err(StoreError::Failed("persister request on a lane".into()))
        }
    }
}
