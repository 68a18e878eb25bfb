//! SUBSCRIBE and UNSUBSCRIBE: authorization per filter, the router, the store, the
//! retained messages, and the reason code of each filter in the client's version.

use super::*;
use crate::protocol::outcome::{self, SubscribeRefusal};

impl Connection {
    pub(super) async fn subscribe(
        &mut self,
        pkid: u16,
        filters: Vec<SubscribeFilter>,
        identifier: Option<u32>,
        read_epoch: u64,
    ) -> Result<(), SessionError> {
        let version = self.version;
        let since_ms = crate::ids::now_ms();
        let mut codes = Vec::with_capacity(filters.len());
        let mut accepted = Vec::new();
        let mut retained_for = Vec::new();
        let mut groups = Vec::new();
        for f in filters {
            let shared = topic::shared(&f.filter);
            // `$share/group` with no filter after it is an invalid shared subscription, not a
            // filter of its own (MQTT 5.0 4.8.2).
            let valid = if f.filter.starts_with("$share/") {
                topic::valid_shared(&f.filter)
            } else {
                topic::valid_filter(&f.filter)
            };
            if !valid {
                codes.push(SubscribeRefusal::FilterInvalid.code(version));
                continue;
            }
            // A shared subscription is checked on the filter inside it.
            let real = shared.map_or(f.filter.as_str(), |(_, inner)| inner);
            let out = &mut self.out;
            if !out
                .auth
                .allows_subscribe(&self.broker.auth, &out.state.client_id, real)
            {
                metrics::counter!("wharf_edge_denied_total", "action" => "subscribe").increment(1);
                tracing::debug!(client_id = %out.state.client_id, filter = %f.filter, "subscription not authorized");
                codes.push(SubscribeRefusal::NotAuthorized.code(version));
                continue;
            }
            if let Some((_, inner)) = shared {
                if f.no_local {
                    return Err(SessionError::Refused {
                        reason: reason::PROTOCOL_ERROR,
                        why: "No Local on a shared subscription",
                    });
                }
                groups.push((f.filter.clone(), inner.to_owned()));
            }
            let grant = Grant::with(f.qos, f.options(identifier));
            codes.push(f.qos.as_u8());
            let existed = self
                .out
                .state
                .subscriptions
                .insert(f.filter.clone(), grant)
                .is_some();
            let offer = self.broker.router.subscribe_after(
                &self.out.state.client_id,
                &f.filter,
                grant,
                read_epoch,
            );
            self.broker.count(offer);
            // Retain Handling: 0 always, 1 for a new subscription only, 2 never; a shared
            // subscription gets no retained messages (MQTT 5.0 4.8.2).
            let retained = f.retain_handling == 0 || (f.retain_handling == 1 && !existed);
            if retained && shared.is_none() {
                retained_for.push((f.filter.clone(), grant));
            }
            accepted.push((f.filter, grant));
        }
        for (key, inner) in groups {
            // The group is a session of its own in the store (client id: its key), subscribed
            // to the filter: what it owes its members is stored, recorded and fetched as a
            // session's is. Made once; a later member's request changes nothing.
            let request = Request::Subscribe {
                client_id: key,
                subscriptions: vec![wharf_shared::Subscription {
                    filter: inner,
                    qos: Qos::ExactlyOnce,
                    options: Default::default(),
                }],
            };
            drop(self.broker.link.request(request, Policy::Hold).await?);
        }
        let rx = if accepted.is_empty() {
            Ok(None)
        } else {
            let request = Request::Subscribe {
                client_id: String::from(&*self.out.state.client_id),
                subscriptions: accepted
                    .iter()
                    .map(|(filter, grant)| wharf_shared::Subscription {
                        filter: filter.clone(),
                        qos: grant.qos,
                        options: grant.options(),
                    })
                    .collect(),
            };
            self.broker
                .link
                .request(request, Policy::Hold)
                .await
                .map(Some)
        };
        self.ops.push_back(Box::pin(async move {
            let result = match rx {
                Ok(None) => Ok(Reply::Messages {
                    messages: Vec::new(),
                    next: None,
                }),
                Ok(Some(rx)) => reply_of(Ok(rx)).await,
                Err(e) => Err(e),
            };
            Op::Subscribed {
                pkid,
                codes,
                filters: accepted,
                retained_for,
                since_ms,
                result,
            }
        }));
        Ok(())
    }

    pub(super) async fn unsubscribe(
        &mut self,
        pkid: u16,
        filters: Vec<String>,
    ) -> Result<(), SessionError> {
        let mut codes = Vec::with_capacity(filters.len());
        for filter in &filters {
            let existed = self.out.state.subscriptions.remove(filter).is_some();
            self.broker
                .router
                .unsubscribe(&self.out.state.client_id, filter);
            codes.push(outcome::unsubscribe_code(existed));
        }
        let request = Request::Unsubscribe {
            client_id: String::from(&*self.out.state.client_id),
            filters,
        };
        // Held and re-sent by the link; the UNSUBACK need not wait for it.
        drop(self.broker.link.request(request, Policy::Hold).await?);
        encode::unsuback(&mut self.out.write_buf, self.version, pkid, &codes);
        Ok(())
    }
}
