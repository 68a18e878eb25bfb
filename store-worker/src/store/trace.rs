//! Where a message went, from the store alone: the message, the stored subscriptions its
//! topic matches, and for each the delivery record (`publishedMessage`) or why there is none.
//!
//! The subscriptions are found through the subscription index by filter, not by reading them
//! all: a topic of n levels can only be matched by the filters made of its levels, `+` and
//! `#` (about 3 x 2^n of them), and shared subscriptions are read from the `$share/` range.
//! Its cost therefore follows the topic's depth and its subscribers, not the fleet.

use super::{Store, StoreError, StoredSubscription};
use std::collections::HashMap;
use wharf_shared::{topic, Fate, Message, MessageId, Recipient};

/// Topics deeper than this are not traced (their candidate filters would number in the
/// tens of thousands).
pub const MAX_TRACED_LEVELS: usize = 10;

/// The message `id` with at most `limit` of the subscriptions its topic matches; the bool
/// says whether those were all of them.
pub async fn trace<S: Store>(
    store: &S,
    id: MessageId,
    limit: usize,
) -> Result<(Option<Message>, Vec<Recipient>, bool), StoreError> {
    let Some(message) = store.message_by_id(id).await? else {
        return Ok((None, Vec::new(), true));
    };
    let Some(filters) = filters_matching(&message.topic) else {
        return Err(StoreError::Failed(format!(
            "topics of more than {MAX_TRACED_LEVELS} levels are not traced"
        )));
    };
    // One more than asked for says whether there are more.
    let mut found = store.subscribers(filters, true, limit + 1).await?;
    found.retain(|(_, s)| match topic::shared(&s.filter) {
        Some((_, inner)) => topic::matches(&message.topic, inner),
        None => true,
    });
    let complete = found.len() <= limit;
    found.truncate(limit);
    // A shared group is stored twice: as each member's `$share/...` subscription and as the
    // group's own (the group's key for a client, its inner filter), which is what its catch-up
    // reads. Its record is kept under the key, once for the group: listed once, by the key.
    let mut owners: Vec<(String, StoredSubscription)> = Vec::with_capacity(found.len());
    for (client, mut s) in found {
        let key = if topic::shared(&client).is_some() {
            client
        } else if topic::shared(&s.filter).is_some() {
            s.filter.clone()
        } else {
            owners.push((client, s));
            continue;
        };
        match owners.iter_mut().find(|(o, _)| *o == key) {
            // The group's own subscription says since when it is owed.
            Some((_, known)) => known.created_ms = known.created_ms.min(s.created_ms),
            None => {
                s.filter = key.clone();
                owners.push((key, s));
            }
        }
    }
    let clients: Vec<String> = owners.iter().map(|(c, _)| c.clone()).collect();
    let records: HashMap<String, (Option<i64>, Option<String>)> = store
        .deliveries_of(id, clients)
        .await?
        .into_iter()
        .map(|r| (r.client_id, (r.at_ms, r.host)))
        .collect();
    let now = wharf_shared::now_ms();
    let recipients = owners
        .into_iter()
        .map(|(client_id, s)| {
            let fate = match records.get(&client_id) {
                Some((at_ms, host)) => Fate::Delivered {
                    at_ms: *at_ms,
                    host: host.clone(),
                },
                None if s.created_ms > message.created_ms => Fate::SubscribedAfter,
                None if s.options.no_local && client_id == message.client_id => Fate::OwnMessage,
                None if message.expired(now) => Fate::Expired,
                None => Fate::Owed,
            };
            Recipient {
                client_id,
                filter: s.filter,
                qos: s.qos,
                subscribed_ms: s.created_ms,
                fate,
            }
        })
        .collect();
    Ok((Some(message), recipients, complete))
}

/// Every filter that matches `topic`: each level literal or `+`, whole or cut short by `#`
/// (`a/#` also matches `a`); none starting with a wildcard for a `$` topic (MQTT 4.7.2).
/// `None` beyond [`MAX_TRACED_LEVELS`].
pub fn filters_matching(topic: &str) -> Option<Vec<String>> {
    let levels: Vec<&str> = topic.split('/').collect();
    if levels.len() > MAX_TRACED_LEVELS {
        return None;
    }
    let system = topic.starts_with('$');
    let mut out = Vec::new();
    // Level by level: every prefix so far, each followed by `#` as it is made.
    let mut prefixes: Vec<String> = vec![String::new()];
    for (i, level) in levels.iter().enumerate() {
        let wild_allowed = !(system && i == 0);
        if wild_allowed {
            out.extend(prefixes.iter().map(|p| format!("{p}#")));
        }
        let mut next = Vec::with_capacity(prefixes.len() * 2);
        for p in &prefixes {
            next.push(format!("{p}{level}"));
            if wild_allowed {
                next.push(format!("{p}+"));
            }
        }
        prefixes = next;
        if i + 1 < levels.len() {
            for p in &mut prefixes {
                p.push('/');
            }
        }
    }
    out.extend(prefixes.iter().map(|p| format!("{p}/#")));
    out.extend(prefixes);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_candidate_filters_are_exactly_those_that_match() {
        let levels = ["a", "+", "#", "b", ""];
        for topic in ["a", "a/b", "a/b/c", "x/a/b", "a//b", "$SYS/a", "$SYS"] {
            let candidates = filters_matching(topic).expect("shallow");
            // Every candidate matches, without duplicates.
            let mut unique = candidates.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), candidates.len(), "{topic}: {candidates:?}");
            for f in &candidates {
                assert!(topic::valid_filter(f), "{f}");
                assert!(topic::matches(topic, f), "{topic} !~ {f}");
            }
            // Every filter of up to four levels drawn from these that matches is a candidate.
            let mut filters = vec![String::new()];
            for _ in 0..4 {
                let mut longer = Vec::new();
                for f in &filters {
                    for l in levels.iter().chain(["x", "c", "$SYS"].iter()) {
                        longer.push(if f.is_empty() {
                            l.to_string()
                        } else {
                            format!("{f}/{l}")
                        });
                    }
                }
                for f in &longer {
                    if topic::valid_filter(f) && topic::matches(topic, f) {
                        assert!(candidates.contains(f), "{topic} ~ {f} missing");
                    }
                }
                filters = longer;
            }
        }
        assert!(filters_matching(&"a/".repeat(MAX_TRACED_LEVELS)).is_none());
        assert_eq!(
            filters_matching(&"a/".repeat(MAX_TRACED_LEVELS - 1)).map(|f| f.len() > 2000),
            Some(true)
        );
    }
}
