//! How a connection ends: DISCONNECT to the client where its version has one, the will, the
//! session parked or ended in the store, its unfinished group deliveries given back.

use super::*;
use crate::protocol::rules;

impl Connection {
    /// Gives the shared-subscription deliveries this connection did not complete back to their
    /// groups, to go to another member (fetched again from the store). A takeover keeps those
    /// in flight: the new connection re-sends them.
    pub(super) fn return_group_deliveries(&mut self, taken_over: bool) {
        let mut returned = self.out.take_group_deliveries(!taken_over);
        while let Some(d) = self.out.session_tx.try_pop() {
            if d.group.is_some() {
                returned.push(d);
            }
        }
        for d in &returned {
            self.broker.router.group_returned(d);
        }
    }

    /// The ending: a 5.0 client is told why the server closes, then [`Connection::finish`].
    pub(super) async fn close<W: AsyncWrite + Unpin>(
        self,
        end: End,
        writer: &mut W,
        takeover_rx: &mut TakeoverRx,
    ) {
        if self.version.is_v5() {
            say_why(writer, &end, Some(self.out.max_packet_size)).await;
        }
        self.finish(end, takeover_rx).await;
    }

    /// Ends the session: unregister, hand over or park the state, send the will if owed.
    /// `takeover_rx` outlives the run loop so that a connection claiming the client id while
    /// this one is ending still gets the session state.
    pub(super) async fn finish(mut self, end: End, takeover_rx: &mut TakeoverRx) {
        let peer = self.out.session_tx.client.peer;
        let connection_id = self.out.session_tx.connection_id;
        let client_id = self.out.state.client_id.clone();
        let filters: Vec<String> = self.out.state.subscriptions.keys().cloned().collect();
        self.broker
            .router
            .detach(&client_id, connection_id, &filters);
        self.return_group_deliveries(matches!(end, End::TakenOver(_)));
        if let Some(waiting) = self.flush_delivered() {
            waiting.await;
        }
        let will = self.will.take();
        match &end {
            End::Error(e) => {
                tracing::info!(%peer, client_id = %client_id, reason = %e, "connection closed")
            }
            End::Graceful => tracing::debug!(%peer, client_id = %client_id, "client disconnected"),
            End::Shutdown => tracing::debug!(%peer, client_id = %client_id, "closed for shutdown"),
            End::TakenOver(_) => {
                tracing::info!(%peer, client_id = %client_id, "session taken over by a new connection")
            }
        }
        // A DISCONNECT took the will away unless its reason asked for it (5.0 0x04). Taken
        // over: by a connection here or, through a claim, on another host.
        let ending = match &end {
            End::Shutdown => rules::Ending::Shutdown,
            End::TakenOver(handover) => rules::Ending::TakenOver {
                keeps_session: handover.keeps_session,
            },
            End::Graceful | End::Error(_) => rules::Ending::Lost,
        };
        let (version, expiry) = (self.version, self.session_expiry);
        let will = will.filter(|w| rules::will_owed(version, ending, expiry, w.delay_secs));
        let persistent = self.session_expiry > 0;
        let mut claim = None;
        // Whom the will is checked for again when it is sent (a reload may have revoked it).
        let principal = self.out.auth.principal().cloned();
        let state = self.out.into_state();
        match end {
            End::TakenOver(handover) => {
                let _ = handover.reply.send(persistent.then_some(state));
            }
            _ => {
                let park = persistent.then_some(state);
                match self.broker.registry.release(
                    &client_id,
                    connection_id,
                    park,
                    self.session_expiry,
                ) {
                    Released::Done(generation) => {
                        claim = generation;
                        // With expiry 0 the worker ends the session, and with it the shared
                        // subscription groups it was the last member of; only if the
                        // session is still this connection's claim.
                        let request = Request::Disconnect {
                            client_id: client_id.to_string(),
                            session_expiry: self.session_expiry,
                            generation,
                        };
                        if let Ok(rx) = self.broker.link.request(request, Policy::Hold).await {
                            drop(rx);
                        }
                    }
                    // A new connection claimed the client id while this one ended: its
                    // takeover request is on the way. No Disconnect: a clean one would drop
                    // the new session's subscriptions.
                    Released::TakenOver(state) => {
                        if !takeover_rx.is_terminated() {
                            let handover =
                                tokio::time::timeout(Duration::from_secs(5), takeover_rx);
                            if let Ok(Ok(handover)) = handover.await {
                                let _ = handover.reply.send(state);
                            }
                        }
                    }
                }
            }
        }
        if let Some(will) = will {
            let mut message =
                self.broker
                    .message(&client_id, will.topic, &will.payload, will.qos, will.retain);
            message.properties =
                self.broker
                    .stamp_identity(will.properties, &client_id, principal.as_ref());
            // 5.0 Will Delay Interval: sent when it has passed, or when the session ends if
            // that is sooner, unless the client has come back meanwhile.
            let delay = will.delay_secs.min(self.session_expiry);
            let broker = self.broker.clone();
            if delay > 0 {
                broker
                    .registry
                    .will_waits(client_id.clone(), connection_id, claim);
            }
            tokio::spawn(async move {
                if delay > 0 {
                    tokio::time::sleep(Duration::from_secs(delay.into())).await;
                    if !broker.registry.will_due(&client_id, connection_id) {
                        return;
                    }
                    // Stamped when it is sent, so that its expiry counts from then.
                    (message.created_ms, message.id) = crate::ids::stamp();
                }
                // Checked again: the write right may have been revoked since CONNECT
                // (Mosquitto 2.0 checks at sending too).
                let allowed = broker.auth.policy().allows(
                    &client_id,
                    principal.as_ref(),
                    Access::Write,
                    &message.topic,
                );
                if !allowed {
                    tracing::info!(client_id = %client_id, topic = %message.topic, "will not sent: no longer authorized");
                    metrics::counter!("wharf_edge_denied_total", "action" => "will").increment(1);
                    return;
                }
                broker.publish_detached(message).await;
            });
        }
    }
}
