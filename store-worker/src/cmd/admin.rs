//! The admin API's lookups (a message's trace, a topic's messages, the cluster's hosts) and
//! changes (users and rules, in the store); the shared groups' ownership; the auth snapshot.

use crate::pipeline::retry;
use crate::state::Shared;
use crate::store::{self, Store, StoreError};
use wharf_shared::now_ms;
use wharf_shared::{Cursor, MessageId, Reply, StoredRule, StoredUser};

/// `Trace`: where message `id` went, once what the edges handed over before is stored.
pub async fn trace<S: Store>(
    shared: &Shared<S>,
    id: MessageId,
    most: u32,
) -> Result<Reply, StoreError> {
    shared.persist.written().await;
    let store = &*shared.store;
    let (message, recipients, complete) = retry(shared.retry_limit, "trace", || {
        store::trace::trace(store, id, most.min(10_000) as usize)
    })
    .await?;
    Ok(Reply::Trace {
        message,
        recipients,
        complete,
    })
}

/// `Find`: a page of the messages stored on `topic` after `after`.
pub async fn find<S: Store>(
    shared: &Shared<S>,
    topic: String,
    after: Cursor,
    most: u32,
) -> Result<Reply, StoreError> {
    shared.persist.written().await;
    let most = most.clamp(1, 1_000) as usize;
    let messages = retry(shared.retry_limit, "find", || {
        shared
            .store
            .messages_on(store::TopicScope::Exact(topic.clone()), after, None, most)
    })
    .await?
    .unwrap_or_default();
    let next = Cursor::after_full_page(&messages, most);
    Ok(Reply::Messages { messages, next })
}

/// `Cluster`: every host's last status report.
pub async fn cluster<S: Store>(shared: &Shared<S>) -> Result<Reply, StoreError> {
    let hosts = retry(shared.retry_limit, "cluster", || {
        shared.store.host_statuses()
    })
    .await?;
    Ok(Reply::Cluster { hosts })
}

/// `PutUser`: the user is added or changed, `by` kept with it.
pub async fn put_user<S: Store>(
    shared: &Shared<S>,
    user: StoredUser,
    by: String,
) -> Result<Reply, StoreError> {
    let name = user.username.clone();
    retry(shared.retry_limit, "put user", || {
        shared.store.put_user(user.clone(), by.clone())
    })
    .await?;
    tracing::info!(user = %name, %by, "user added or changed in the store");
    Ok(Reply::Done)
}

/// `DeleteUser`: an error when there is no such user.
pub async fn delete_user<S: Store>(
    shared: &Shared<S>,
    username: String,
    by: String,
) -> Result<Reply, StoreError> {
    let found = retry(shared.retry_limit, "delete user", || {
        shared.store.delete_user(username.clone(), by.clone())
    })
    .await?;
    if !found {
        return Err(StoreError::Failed(format!(
            "no user {username:?} in the store"
        )));
    }
    tracing::info!(user = %username, %by, "user removed from the store");
    Ok(Reply::Done)
}

/// `PutRule`: the rule (already parsed by the edge as the edges parse the set) is added.
pub async fn put_rule<S: Store>(
    shared: &Shared<S>,
    rule: StoredRule,
    by: String,
) -> Result<Reply, StoreError> {
    retry(shared.retry_limit, "put rule", || {
        shared.store.put_rule(rule.clone(), by.clone())
    })
    .await?;
    tracing::info!(?rule, %by, "rule added to the store");
    Ok(Reply::Done)
}

/// `DeleteRule`: the rules with exactly these fields go; an error when none did.
pub async fn delete_rule<S: Store>(
    shared: &Shared<S>,
    rule: StoredRule,
    by: String,
) -> Result<Reply, StoreError> {
    let removed = retry(shared.retry_limit, "delete rule", || {
        shared.store.delete_rule(rule.clone(), by.clone())
    })
    .await?;
    if removed == 0 {
        return Err(StoreError::Failed(
            "no rule with exactly these fields".into(),
        ));
    }
    tracing::info!(?rule, removed, %by, "rule removed from the store");
    Ok(Reply::Done)
}

/// `OwnGroups`: which of `groups` `owner` now owns (claimed or renewed).
pub async fn own_groups<S: Store>(
    shared: &Shared<S>,
    owner: String,
    groups: Vec<String>,
) -> Result<Reply, StoreError> {
    let owned = retry(shared.retry_limit, "groups", || {
        shared.store.own_groups(&owner, groups.clone(), now_ms())
    })
    .await?;
    Ok(Reply::Groups { owned })
}

/// `LoadAuth`: the users and rules the store keeps, as asked.
pub async fn load_auth<S: Store>(
    shared: &Shared<S>,
    users: bool,
    rules: bool,
) -> Result<Reply, StoreError> {
    let (users, rules) = shared.store.load_auth(users, rules).await?;
    Ok(Reply::Auth { users, rules })
}
