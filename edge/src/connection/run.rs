//! The connection's run loop: one poll function ([`Connection::poll_wake`]) over the
//! takeover, the socket's write, store replies, the session's queue, the lease recheck and the
//! socket's read, in that order; what each wake does; the requests and catch-ups it sends.

use super::*;

impl Connection {
    /// Not an `async fn`, for the reason given at [`serve`].
    #[allow(clippy::manual_async_fn)]
    pub(super) fn run<'a, R, W>(
        &'a mut self,
        reader: &'a mut R,
        writer: &'a mut W,
        takeover_rx: &'a mut TakeoverRx,
        stopping: bool,
    ) -> impl Future<Output = End> + 'a
    where
        R: Reader,
        W: AsyncWrite + Unpin,
    {
        async move {
            // Shutdown and keepalive arrive as signals on the session's queue.
            let mut closing: Option<Closing> = stopping.then_some(Closing::Shutdown);
            // The keepalive counts from the start of the session, whatever the end of the
            // CONNECT phase took.
            self.out.session_tx.heard(crate::ids::monotonic_ms());
            // Whether the session is held back for the store (see `store_held`), and how many
            // bytes at the front of the output are PINGRESPs written without the lease.
            let mut held = false;
            let mut pongs = 0usize;
            // Packets read while held back, to handle once the session may read again.
            let mut undecoded = false;
            loop {
                self.out.fill();
                self.out
                    .session_tx
                    .set_inflight(self.out.state.inflight_len());
                if let Some(waiting) = self.flush_delivered() {
                    waiting.await;
                }
                if self.out.has_requests() {
                    // Rare (QoS 2 delivery steps): boxed, so that it is not part of the task.
                    if let Err(e) = Box::pin(self.send_requests()).await {
                        return End::Error(e);
                    }
                }
                if closing.is_none() {
                    if let Some(sending) = self.catch_up_step() {
                        sending.await;
                    }
                }
                self.out.settle();
                // Without a current lease (a host sharing its store with others, frozen or cut
                // off from it) the session neither reads nor writes: another host may have
                // claimed it meanwhile. See `crate::lease`.
                let leased = self.broker.lease.holds();
                let store_slow =
                    self.ops.weight() >= self.broker.config.limits.max_pending_persists;
                let can_read = leased
                    && closing.is_none()
                    && !store_slow
                    && self.out.write_buf.len() < self.broker.config.limits.write_high_water;
                // Held back for the store's sake (the lease lost, or persists outstanding): the
                // client is not silent, the edge is not reading, so its keepalive does not run
                // meanwhile; and a PINGREQ at the front of what it sent is still answered (it
                // delivers and acknowledges nothing), so that its own keepalive does not fire.
                let store_held = closing.is_none() && (!leased || store_slow);
                if store_held != held {
                    held = store_held;
                    if held {
                        self.out.session_tx.hold();
                    } else {
                        self.out.session_tx.heard(crate::ids::monotonic_ms());
                    }
                }
                // Without the lease only those answers may be written: nothing else is.
                let writable = if leased {
                    self.out.write_buf.len()
                } else {
                    pongs.min(self.out.write_buf.len())
                };
                let ping_read = store_held
                    && self.read_buf.len() < HELD_READ_LIMIT
                    && (leased || pongs == self.out.write_buf.len());
                if closing.is_some()
                    && self.ops.is_empty()
                    && self.tracking.is_empty()
                    && self.out.write_buf.is_empty()
                {
                    break;
                }
                if can_read && undecoded {
                    // What was read while held back, now that the session may read again.
                    undecoded = false;
                    match Box::pin(self.decode_all()).await {
                        Ok(true) => continue,
                        Ok(false) => {
                            closing = Some(Closing::Graceful);
                            continue;
                        }
                        Err(e) => return End::Error(e),
                    }
                }
                let can_write = writable > 0;
                let wants_queue = self.out.wants_queue();
                let read_chunk = self.read_chunk as usize;
                let takeover_open = closing.is_none() && !takeover_rx.is_terminated();
                // Only while the lease is lost: boxed, so that no idle task holds a `Sleep`.
                let mut recheck = (!leased).then(|| Box::pin(tokio::time::sleep(LEASE_RECHECK)));
                // Set by a read; handled after the wait, so that its output (as large as the
                // largest reply) is not held while the packets are handled.
                let mut read_full = None;
                // In a block of its own: what woke the loop is not kept in the task across the
                // awaits below.
                {
                    let wake = {
                        // One poll function over every source, in priority order, as a biased
                        // `select!` would, but holding only these references in the task (a
                        // `select!` keeps a future per branch: 120 bytes in every connection).
                        let this = &mut *self;
                        let (reader, writer, takeover_rx, recheck) =
                            (&mut *reader, &mut *writer, &mut *takeover_rx, &mut recheck);
                        poll_fn(move |cx| {
                            this.poll_wake(
                                cx,
                                Sources {
                                    takeover: takeover_open.then_some(&mut *takeover_rx),
                                    writer: can_write.then_some((&mut *writer, writable)),
                                    reader: (can_read || ping_read)
                                        .then_some((&mut *reader, read_chunk)),
                                    recheck: recheck.as_mut(),
                                    wants_queue,
                                },
                            )
                        })
                        .await
                    };
                    match wake {
                        Wake::Handover(Ok(tx)) => return End::TakenOver(tx),
                        Wake::Handover(Err(_)) => closing = Some(Closing::Shutdown),
                        Wake::Written(written) => match written {
                            Ok(0) => {
                                return End::Error(SessionError::Protocol(
                                    "socket closed for writing",
                                ))
                            }
                            Ok(n) => {
                                self.broker.metrics.bytes_sent.increment(n as u64);
                                // `advance`, not `split_to`: splitting turns the buffer into a shared
                                // one, an allocation that an idle connection would keep.
                                self.out.write_buf.advance(n);
                                pongs = pongs.saturating_sub(n);
                                if self.out.write_buf.is_empty()
                                    && self.out.write_buf.capacity() > 16 * 1024
                                {
                                    self.out.write_buf = BytesMut::new();
                                }
                            }
                            Err(e) => return End::Error(e.into()),
                        },
                        Wake::Tracked((pkid, released, result)) => match result {
                            Ok(Reply::Done) => self.out.tracked(pkid, released),
                            // Not recorded: close; the session resumes from what is stored.
                            Ok(other) => {
                                return End::Error(SessionError::Store(format!("track: {other:?}")))
                            }
                            Err(e) => return End::Error(e.into()),
                        },
                        Wake::Op(op) => {
                            if let Err(e) = self.complete(op) {
                                return End::Error(e);
                            }
                        }
                        Wake::CaughtUp(reply) => {
                            self.catch_up = None;
                            self.out.caught_up(reply.unwrap_or(Err(LinkError::Closed)));
                        }
                        Wake::Event(event) => match event {
                            Event::Delivery(delivery) => self.out.accept_live(delivery),
                            // Once closing, only the pending replies matter.
                            Event::Signals(_) if closing.is_some() => {}
                            Event::Signals(s) if s.contains(Signals::SHUTDOWN) => {
                                closing = Some(Closing::Shutdown)
                            }
                            Event::Signals(s) if s.contains(Signals::KICK) => {
                                return End::Error(SessionError::Refused {
                                    reason: reason::ADMINISTRATIVE_ACTION,
                                    why: "disconnected by an administrator",
                                })
                            }
                            Event::Signals(s)
                                if s.contains(Signals::REAUTH)
                                    && !s.contains(Signals::KEEPALIVE) =>
                            {
                                if !self.broker.auth.still_admits(self.out.auth.principal()) {
                                    return End::Error(SessionError::Refused {
                                        reason: reason::NOT_AUTHORIZED,
                                        why: "the user was removed or its password changed",
                                    });
                                }
                            }
                            Event::Signals(s) if s.contains(Signals::KEEPALIVE) => {
                                return End::Error(SessionError::KeepAliveTimeout)
                            }
                            // SETTLE: the catch-up it asks for is taken at the loop's top.
                            Event::Signals(_) => {}
                        },
                        Wake::Recheck => {}
                        Wake::Read(read) => match read {
                            Ok((0, _)) => {
                                return End::Error(SessionError::Protocol(
                                    "client closed the connection",
                                ))
                            }
                            Ok((n, room)) => {
                                self.broker.metrics.bytes_received.increment(n as u64);
                                if n == room {
                                    self.read_chunk = (self.read_chunk * 2).min(MAX_READ as u32);
                                }
                                if can_read {
                                    self.out.session_tx.heard(crate::ids::monotonic_ms());
                                    read_full = Some(n == room);
                                } else {
                                    pongs += self.answer_pings(leased, pongs);
                                    undecoded = !self.read_buf.is_empty();
                                }
                            }
                            Err(e) => return End::Error(e.into()),
                        },
                    }
                }
                if let Some(full) = read_full {
                    let was_empty = self.out.write_buf.is_empty();
                    // Boxed: handling packets awaits the link, and inline that future would be
                    // part of every idle connection's task.
                    match Box::pin(self.decode_all()).await {
                        Ok(true) => {}
                        Ok(false) => closing = Some(Closing::Graceful),
                        Err(e) => return End::Error(e),
                    }
                    // Read while the lease held and answered after it lapsed: PINGRESPs alone
                    // may still be written (from an empty buffer, a run of `d0 00` is nothing
                    // but PINGRESPs).
                    if was_empty && only_pingresps(&self.out.write_buf) {
                        pongs = self.out.write_buf.len();
                    }
                    if full {
                        // More is waiting on the socket: let the sessions this read fed take
                        // their share first, so that a fast publisher does not overrun their
                        // queues.
                        tokio::task::yield_now().await;
                    }
                }
            }
            closing.map_or(End::Shutdown, End::from)
        }
    }

    /// The first of the run loop's sources that is ready, in priority order: the takeover,
    /// the socket's write, the store's replies (QoS 2 steps, then persists, then a
    /// catch-up), the session queue, the lease recheck, the socket's read. Every source
    /// polled registers the task's waker, so that none is missed.
    pub(super) fn poll_wake<R: Reader, W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        sources: Sources<'_, R, W>,
    ) -> Poll<Wake> {
        if let Some(rx) = sources.takeover {
            if let Poll::Ready(handover) = Pin::new(rx).poll(cx) {
                return Poll::Ready(Wake::Handover(handover));
            }
        }
        if let Some((writer, writable)) = sources.writer {
            let buf = &self.out.write_buf[..writable];
            if let Poll::Ready(written) = Pin::new(writer).poll_write(cx, buf) {
                return Poll::Ready(Wake::Written(written));
            }
        }
        if let Poll::Ready(Some(tracked)) = self.tracking.poll_next(cx) {
            return Poll::Ready(Wake::Tracked(tracked));
        }
        if let Poll::Ready(Some(op)) = self.ops.poll_next(cx) {
            return Poll::Ready(Wake::Op(op));
        }
        if let Some(rx) = self.catch_up.as_mut() {
            if let Poll::Ready(reply) = Pin::new(rx).poll(cx) {
                return Poll::Ready(Wake::CaughtUp(reply));
            }
        }
        if let Poll::Ready(event) = self.out.session_tx.poll_recv(cx, sources.wants_queue) {
            return Poll::Ready(Wake::Event(event));
        }
        if let Some(sleep) = sources.recheck {
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Recheck);
            }
        }
        if let Some((reader, chunk)) = sources.reader {
            // Read with the session's own waker, which notes when the socket turned readable
            // (`SessionTx::read_waker`).
            let session = &self.out.session_tx;
            let waker = session.read_waker(cx.waker());
            let mut read_cx = Context::from_waker(&waker);
            if let Poll::Ready(read) =
                poll_read_some(&mut read_cx, reader, &mut self.read_buf, chunk)
            {
                return Poll::Ready(Wake::Read(read));
            }
        }
        Poll::Pending
    }

    /// Hands the `publishedMessage` records gathered so far to the worker.
    /// `Some` when the link is full: the caller waits on it. (Not an `async fn`: the
    /// notice would be part of every connection's task.)
    pub(super) fn flush_delivered(&mut self) -> Option<BoxFuture<'_, ()>> {
        let (notice, group_done) = self.out.take_delivered()?;
        let broker = self.broker.clone();
        let done = move || {
            if let Some((group, ids)) = group_done {
                broker.router.group_done(&group, ids.into_iter());
            }
        };
        match self.broker.link.notify(notice) {
            Either::Left(_) => {
                done();
                None
            }
            Either::Right(waiting) => Some(Box::pin(async move {
                waiting.await;
                done();
            })),
        }
    }

    /// Sends the store requests the outbound side asked for (QoS 2 delivery steps).
    pub(super) async fn send_requests(&mut self) -> Result<(), SessionError> {
        for request in self.out.take_requests() {
            let step = match &request {
                Request::TrackQos2Out { pkid, released, .. } => Some((*pkid, *released)),
                _ => None,
            };
            let rx = self.broker.link.request(request, Policy::Hold).await?;
            if let Some((pkid, released)) = step {
                self.tracking.push_back(Box::pin(async move {
                    (pkid, released, reply_of(Ok(rx)).await)
                }));
            }
        }
        Ok(())
    }

    /// Sends the catch-up query that is due, if any.
    pub(super) async fn start_catch_up(&mut self) {
        if let Some(request) = self.catch_up_due() {
            self.send_catch_up(request).await;
        }
    }

    pub(super) fn catch_up_due(&mut self) -> Option<Request> {
        if self.catch_up.is_some() {
            return None;
        }
        self.out.next_catch_up()
    }

    /// The catch-up due now, boxed (it is rare), if one is. Not an `async fn`: the request
    /// would be part of every connection's task.
    pub(super) fn catch_up_step(&mut self) -> Option<BoxFuture<'_, ()>> {
        let request = self.catch_up_due()?;
        Some(Box::pin(self.send_catch_up(request)))
    }

    pub(super) async fn send_catch_up(&mut self, request: Request) {
        // Delivery records go first, so the query does not return what was just delivered.
        if let Some(waiting) = self.flush_delivered() {
            waiting.await;
        }
        match self.broker.link.request(request, Policy::FailFast).await {
            Ok(rx) => self.catch_up = Some(rx),
            Err(_) => self.out.catch_up_failed(),
        }
    }

    /// While the session is held back for the store: answers the PINGREQs at the front of
    /// the read buffer (anything else waits there, in order, for the store) and returns the
    /// bytes it added to the output. Without the lease (`leased` false) only while the output
    /// holds nothing but earlier answers (`pongs` bytes): nothing else may be written then.
    pub(super) fn answer_pings(&mut self, leased: bool, pongs: usize) -> usize {
        let mut added = 0;
        while self.read_buf.starts_with(&[0xc0, 0])
            && (leased || self.out.write_buf.len() == pongs + added)
        {
            self.read_buf.advance(2);
            encode::pingresp(&mut self.out.write_buf);
            added += 2;
        }
        added
    }
}
