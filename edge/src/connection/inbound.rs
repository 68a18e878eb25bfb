//! What the client sends: packets decoded from the read buffer and handled in order;
//! PUBLISH (topic aliases, authorization, rate limits, batches to the worker, acknowledgements
//! in the order the packets came); the store's replies completing them.

use super::*;
use crate::protocol::outcome::{self, PublishRefusal};

impl Connection {
    /// Handles every complete packet in the read buffer; `Ok(false)` after DISCONNECT.
    pub(super) async fn decode_all(&mut self) -> Result<bool, SessionError> {
        let max = self.broker.config.limits.max_packet_size;
        // Consecutive QoS 0 or QoS 1 PUBLISHes of this read: sent to the worker together, then
        // routed (see `send_batch`). A local, not a field: this future is boxed, the
        // connection's task is not.
        let mut batch = Batch {
            read_epoch: self.out.session_tx.read_epoch(),
            ..Batch::default()
        };
        let result = loop {
            let packet = match crate::protocol::decode(&mut self.read_buf, Some(self.version), max)
            {
                Ok(Some(packet)) => packet,
                Ok(None) => break Ok(true),
                Err(e) => break Err(e.into()),
            };
            if !matches!(&packet, Inbound::Publish(p) if batch.takes(p.qos)) {
                // Everything else keeps its order with the messages before it.
                if let Err(e) = self.send_batch(&mut batch).await {
                    break Err(e);
                }
            }
            match self.handle(packet, &mut batch).await {
                Ok(true) => {}
                other => break other,
            }
        };
        let sent = self.send_batch(&mut batch).await;
        if self.read_buf.is_empty() {
            // Nothing left over: give the buffer back (the next read allocates
            // `read_chunk` again), so that a connection waiting for its client holds none.
            self.read_buf = BytesMut::new();
        }
        sent.and(result)
    }

    /// Sends a batch to the worker (QoS 0: one store notice; QoS 1: one persist request, whose
    /// reply acknowledges them all), then routes its messages. In that order: a catch-up that
    /// runs after a message was routed finds it stored (the worker's barrier), and the task
    /// woken last runs next (tokio's LIFO slot), which should be the subscriber's, not the
    /// link's (measured: p50 94 vs 115 us at 20k msg/s). QoS 1 is routed before it is stored
    /// and acknowledged after: a crash before the write costs at most a duplicate (the
    /// publisher re-sends what was not acknowledged); a session that missed the live copy
    /// (lagging, or attaching meanwhile) finds it in the store.
    pub(super) async fn send_batch(&mut self, batch: &mut Batch) -> Result<(), SessionError> {
        if batch.messages.is_empty() {
            return Ok(());
        }
        if batch.pkids.is_empty() {
            self.broker.link.notify_store(&batch.messages).await;
        } else {
            let started = Instant::now();
            let messages = batch.messages.iter().map(|m| (**m).clone()).collect();
            let rx = self
                .broker
                .link
                .request(Request::Persist(messages), Policy::Hold)
                .await?;
            let pkids = std::mem::take(&mut batch.pkids);
            let weight = pkids.len();
            let reply = self.persist_reply(Ok(rx), started);
            self.ops.push_weighted(
                Box::pin(async move {
                    let result = reply.await;
                    Op::PersistedMany { pkids, result }
                }),
                weight,
            );
        }
        for message in batch.messages.drain(..) {
            self.broker.route(&message);
        }
        batch.in_transit = None;
        self.start_catch_up().await;
        Ok(())
    }

    pub(super) async fn handle(
        &mut self,
        packet: Inbound,
        batch: &mut Batch,
    ) -> Result<bool, SessionError> {
        match packet {
            Inbound::Publish(p) => {
                let qos = p.qos;
                self.publish(p, batch).await?;
                // QoS 0 and 1: once their batch is sent (`send_batch`).
                if qos == Qos::ExactlyOnce {
                    self.start_catch_up().await;
                }
            }
            Inbound::PubAck(ack) => {
                self.check_ack(ack.pkid, Ack::PubAck)?;
                self.out.puback(ack.pkid)
            }
            Inbound::PubRec(ack) => {
                self.check_ack(ack.pkid, Ack::PubRec)?;
                if outcome::failed(ack.reason) {
                    self.out.pubrec_refused(ack.pkid)
                } else {
                    self.out.pubrec(ack.pkid)
                }
            }
            Inbound::PubComp(ack) => {
                self.check_ack(ack.pkid, Ack::PubComp)?;
                self.out.pubcomp(ack.pkid)
            }
            Inbound::PubRel(ack) => {
                let pkid = ack.pkid;
                let known = self.out.state.release_inbound_qos2(pkid);
                if known {
                    self.qos2_ended();
                }
                let release = Request::ReleaseQos2 {
                    client_id: String::from(&*self.out.state.client_id),
                    pkid,
                };
                // Held and re-sent by the link, in order with the persists.
                drop(self.broker.link.request(release, Policy::Hold).await?);
                // 5.0: a PUBREL for an id this session does not hold is answered so.
                self.ack_in_order(
                    Ack::PubComp,
                    pkid,
                    outcome::pubcomp_code(self.version, known),
                );
            }
            Inbound::Subscribe {
                pkid,
                filters,
                identifier,
            } => {
                self.subscribe(pkid, filters, identifier, batch.read_epoch)
                    .await?
            }
            Inbound::Unsubscribe { pkid, filters } => self.unsubscribe(pkid, filters).await?,
            Inbound::PingReq => {
                encode::pingresp(&mut self.out.write_buf);
                self.start_catch_up().await;
            }
            Inbound::Disconnect {
                reason: code,
                session_expiry,
            } => {
                if let Some(expiry) = session_expiry {
                    // MQTT-3.14.2-2: a session that was to end with the connection stays so.
                    if self.session_expiry == 0 && expiry != 0 {
                        return Err(SessionError::Refused {
                            reason: reason::PROTOCOL_ERROR,
                            why: "Session Expiry Interval set at DISCONNECT after 0 at CONNECT",
                        });
                    }
                    self.session_expiry = expiry.min(self.broker.config.limits.max_session_expiry);
                }
                // 0x04: Disconnect with Will Message.
                if code != reason::DISCONNECT_WITH_WILL {
                    self.will = None;
                }
                return Ok(false);
            }
            Inbound::Auth { .. } => {
                return Err(SessionError::Refused {
                    reason: reason::PROTOCOL_ERROR,
                    why: "AUTH without an authentication method",
                })
            }
            Inbound::Connect(_) => return Err(SessionError::Protocol("second CONNECT")),
        }
        Ok(true)
    }

    /// The topic of a PUBLISH, through its 5.0 Topic Alias if it has one.
    pub(super) fn resolve_topic(&mut self, p: &mut PublishIn) -> Result<(), SessionError> {
        let Some(alias) = p.topic_alias else {
            return Ok(());
        };
        if alias == 0 || alias > self.broker.config.limits.topic_alias_max {
            return Err(SessionError::Refused {
                reason: reason::TOPIC_ALIAS_INVALID,
                why: "topic alias 0 or above the Topic Alias Maximum",
            });
        }
        let aliases = self.topic_aliases.get_or_insert_with(Box::default);
        if p.topic.is_empty() {
            match aliases.get(&alias) {
                Some(topic) => p.topic = topic.clone(),
                None => {
                    return Err(SessionError::Refused {
                        reason: reason::PROTOCOL_ERROR,
                        why: "topic alias used before it was set",
                    })
                }
            }
        } else {
            aliases.insert(alias, p.topic.clone());
        }
        Ok(())
    }

    /// An acknowledgement of the wrong kind for a message in flight closes the connection.
    pub(super) fn check_ack(&self, pkid: u16, ack: Ack) -> Result<(), SessionError> {
        if self.out.state.ack_fits(pkid, ack) {
            return Ok(());
        }
        Err(SessionError::Protocol(match ack {
            Ack::PubAck => "PUBACK for a QoS 2 message",
            Ack::PubRec => "PUBREC for a QoS 1 message",
            Ack::PubComp => "PUBCOMP for a QoS 1 message",
        }))
    }

    pub(super) async fn publish(
        &mut self,
        mut p: PublishIn,
        batch: &mut Batch,
    ) -> Result<(), SessionError> {
        self.resolve_topic(&mut p)?;
        if !topic::valid_topic_name(&p.topic) {
            return Err(SessionError::Refused {
                reason: reason::TOPIC_NAME_INVALID,
                why: "invalid topic name in PUBLISH",
            });
        }
        self.broker.metrics.received(p.qos);
        if p.qos == Qos::ExactlyOnce && self.out.state.has_inbound_qos2(p.pkid) {
            // A re-sent QoS 2 PUBLISH that was already stored and routed.
            encode::pubrec(&mut self.out.write_buf, self.version, p.pkid, 0);
            return Ok(());
        }
        let limit = self.broker.config.limits.max_publish_rate;
        let bridge = self.out.auth.principal().is_some_and(|p| p.bridge);
        if limit > 0 && !bridge && !self.within_publish_rate(limit) {
            return self.publish_over_rate(p.qos, p.pkid, batch).await;
        }
        let out = &mut self.out;
        if !out.auth.allows(
            &self.broker.auth,
            &out.state.client_id,
            Access::Write,
            &p.topic,
        ) {
            return self.publish_denied(p.qos, p.pkid, &p.topic, batch).await;
        }
        // The 5.0 Receive Maximum counts QoS 2 messages until their PUBCOMP, as the paho
        // reference broker does. QoS 1 ones are acknowledged once stored, a few milliseconds
        // later, and clients (the paho suite's among them) send more than the maximum before
        // those PUBACKs come: their flow is bounded by reading no more from a client with
        // `max_pending_persists` unanswered, not by closing it.
        if p.qos == Qos::ExactlyOnce && self.version.is_v5() {
            self.inbound_unacked += 1;
            if self.inbound_unacked > u32::from(self.broker.config.limits.receive_maximum) {
                return Err(SessionError::Refused {
                    reason: reason::RECEIVE_MAXIMUM_EXCEEDED,
                    why: "more QoS 2 messages unreleased than the Receive Maximum",
                });
            }
        }
        let utf8_claimed = p
            .properties
            .as_ref()
            .is_some_and(|props| props.payload_format_indicator == Some(1));
        if utf8_claimed && std::str::from_utf8(&p.payload).is_err() {
            // MQTT 5.0 3.3.2.3.2: refused with "payload format invalid", not stored.
            metrics::counter!("wharf_edge_payload_format_invalid_total").increment(1);
            if p.qos == Qos::ExactlyOnce {
                // A failed PUBREC ends the QoS 2 flow.
                self.qos2_ended();
            }
            let code = reason::PAYLOAD_FORMAT_INVALID;
            return self.answer_untaken(p.qos, p.pkid, code, batch).await;
        }
        let mut message = self.broker.message(
            &self.out.state.client_id,
            p.topic,
            &p.payload,
            p.qos,
            p.retain,
        );
        message.properties = self.broker.stamp_identity(
            p.properties,
            &self.out.state.client_id,
            self.out.auth.principal(),
        );
        let message = Arc::new(message);
        match p.qos {
            Qos::AtMostOnce => {
                batch.messages.push(message);
                return Ok(());
            }
            Qos::AtLeastOnce => {
                if batch.in_transit.is_none() {
                    batch.in_transit = Some(self.broker.in_transit.enter(message.created_ms));
                }
                batch.messages.push(message);
                batch.pkids.push(p.pkid);
                return Ok(());
            }
            Qos::ExactlyOnce => {}
        }
        // QoS 2: routed once stored, since a re-send after a lost write would be a second
        // message. The packet id goes with it, so that a re-sent PUBLISH is recognised even
        // after this edge restarts.
        let started = Instant::now();
        let in_transit = self.broker.in_transit.enter(message.created_ms);
        let request = Request::PersistQos2 {
            message: (*message).clone(),
            pkid: p.pkid,
        };
        let rx = self.broker.link.request(request, Policy::Hold).await;
        let pkid = p.pkid;
        let reply = self.persist_reply(rx, started);
        self.ops.push_back(Box::pin(async move {
            let result = reply.await;
            Op::PersistedQos2 {
                pkid,
                message,
                result,
                in_transit,
            }
        }));
        Ok(())
    }

    /// The worker's reply to a persist request sent at `started`, timed into
    /// `wharf_edge_persist_seconds`.
    pub(super) fn persist_reply(
        &self,
        rx: Result<crate::link::ReplyRx, LinkError>,
        started: Instant,
    ) -> impl Future<Output = Result<Reply, LinkError>> + Send + 'static {
        let persist_seconds = self.broker.metrics.persist_seconds.clone();
        async move {
            let result = reply_of(rx).await;
            persist_seconds.record(started.elapsed().as_secs_f64());
            result
        }
    }

    pub(super) fn write_ack(&mut self, kind: Ack, pkid: u16, code: u8) {
        let buf = &mut self.out.write_buf;
        match kind {
            Ack::PubAck => encode::puback(buf, self.version, pkid, code),
            Ack::PubRec => encode::pubrec(buf, self.version, pkid, code),
            Ack::PubComp => encode::pubcomp(buf, self.version, pkid, code),
        }
    }

    /// Writes an acknowledgement now, or behind those still waiting for the store (MQTT
    /// wants them in the order of the packets they answer).
    pub(super) fn ack_in_order(&mut self, kind: Ack, pkid: u16, code: u8) {
        if self.ops.is_empty() {
            self.write_ack(kind, pkid, code);
        } else {
            self.ops
                .push_back(Box::pin(async move { Op::Ack(kind, pkid, code) }));
        }
    }

    /// A PUBLISH to a topic the client may not write. 5.0: refused with 0x87. 3.1/3.1.1,
    /// which have no way to say so: acknowledged and dropped, or the connection closed
    /// (`publishDenied`).
    pub(super) async fn publish_denied(
        &mut self,
        qos: Qos,
        pkid: u16,
        topic: &str,
        batch: &mut Batch,
    ) -> Result<(), SessionError> {
        metrics::counter!("wharf_edge_denied_total", "action" => "publish").increment(1);
        tracing::debug!(client_id = %self.out.state.client_id, topic, "publish not authorized");
        let refusal = PublishRefusal::NotAuthorized;
        let code = match refusal.ack_code(self.version) {
            Some(code) => code,
            None if self.out.auth.publish_denied() == PublishDenied::Disconnect => {
                return Err(SessionError::Refused {
                    reason: refusal.reason(),
                    why: "publish not authorized",
                })
            }
            // Acknowledged unstored; 3.1.1's PUBREL that follows a PUBREC is answered as for
            // any id it does not hold.
            None => reason::SUCCESS,
        };
        self.answer_untaken(qos, pkid, code, batch).await
    }

    /// Answers a PUBLISH that is not taken with a PUBACK or PUBREC carrying `code` (nothing
    /// for QoS 0), behind the acknowledgements of the messages before it.
    pub(super) async fn answer_untaken(
        &mut self,
        qos: Qos,
        pkid: u16,
        code: u8,
        batch: &mut Batch,
    ) -> Result<(), SessionError> {
        let kind = match qos {
            Qos::AtMostOnce => return Ok(()),
            Qos::AtLeastOnce => Ack::PubAck,
            Qos::ExactlyOnce => Ack::PubRec,
        };
        self.send_batch(batch).await?;
        self.ack_in_order(kind, pkid, code);
        Ok(())
    }

    /// Counts a PUBLISH against `--max-publish-rate` (one-second windows).
    pub(super) fn within_publish_rate(&mut self, limit: u32) -> bool {
        let second = (crate::ids::monotonic_ms() / 1000) as u32;
        if second != self.publish_second {
            self.publish_second = second;
            self.publishes = 0;
        }
        self.publishes += 1;
        self.publishes <= limit
    }

    /// A PUBLISH past `--max-publish-rate`: QoS 0 is dropped; QoS 1/2 are refused with
    /// "quota exceeded" (5.0), or the connection is closed (3.1/3.1.1 cannot be told).
    pub(super) async fn publish_over_rate(
        &mut self,
        qos: Qos,
        pkid: u16,
        batch: &mut Batch,
    ) -> Result<(), SessionError> {
        metrics::counter!("wharf_edge_publish_rate_exceeded_total").increment(1);
        let refusal = PublishRefusal::QuotaExceeded;
        match refusal.ack_code(self.version) {
            Some(code) => self.answer_untaken(qos, pkid, code, batch).await,
            None if qos == Qos::AtMostOnce => Ok(()),
            None => Err(SessionError::Refused {
                reason: refusal.reason(),
                why: "publish rate exceeded",
            }),
        }
    }

    /// An inbound QoS 2 flow ended (PUBREL answered, or a refusing PUBREC sent).
    pub(super) fn qos2_ended(&mut self) {
        self.inbound_unacked = self.inbound_unacked.saturating_sub(1);
    }

    /// A reply the client was waiting for has arrived.
    pub(super) fn complete(&mut self, op: Op) -> Result<(), SessionError> {
        match op {
            Op::PersistedMany { pkids, result } => match result {
                Ok(Reply::Persisted) => {
                    for pkid in pkids {
                        encode::puback(&mut self.out.write_buf, self.version, pkid, 0);
                    }
                    Ok(())
                }
                // Not acknowledged: the client re-sends them on its next connection.
                Ok(other) => Err(SessionError::Store(format!("persist: {other:?}"))),
                Err(e) => Err(e.into()),
            },
            Op::PersistedQos2 {
                pkid,
                message,
                result,
                in_transit: _in_transit,
            } => match result {
                Ok(reply @ (Reply::Persisted | Reply::AlreadyStored)) => {
                    // Already stored: a re-sent PUBLISH, routed the first time.
                    if reply == Reply::Persisted {
                        self.broker.route(&message);
                    }
                    self.out.state.accept_inbound_qos2(pkid);
                    encode::pubrec(&mut self.out.write_buf, self.version, pkid, 0);
                    Ok(())
                }
                // Not acknowledged: the client re-sends it on its next connection.
                Ok(other) => Err(SessionError::Store(format!("persist: {other:?}"))),
                Err(e) => Err(e.into()),
            },
            Op::Subscribed {
                pkid,
                mut codes,
                filters,
                retained_for,
                since_ms,
                result,
            } => {
                match result {
                    Ok(Reply::Messages { messages, .. }) => {
                        encode::suback(&mut self.out.write_buf, self.version, pkid, &codes);
                        self.out.retained(messages, &retained_for);
                        // The routes are written (the reply waited for them); hosts that had
                        // not read them yet stored messages for these filters unaddressed.
                        if !filters.is_empty() {
                            self.out.settle_from(since_ms);
                        }
                    }
                    Ok(other) => {
                        tracing::warn!(client_id = %self.out.state.client_id, reply = ?other, "subscription not stored");
                        for (filter, _) in &filters {
                            self.out.state.subscriptions.remove(filter);
                            self.broker
                                .router
                                .unsubscribe(&self.out.state.client_id, filter);
                        }
                        codes
                            .iter_mut()
                            .for_each(|c| *c = reason::UNSPECIFIED_ERROR);
                        encode::suback(&mut self.out.write_buf, self.version, pkid, &codes);
                    }
                    Err(e) => return Err(e.into()),
                }
                Ok(())
            }
            Op::Ack(kind, pkid, code) => {
                self.write_ack(kind, pkid, code);
                Ok(())
            }
        }
    }
}
