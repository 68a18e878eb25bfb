//! The edge's side of the store-worker socket.
//!
//! One task owns the Unix socket. Sessions hand it requests through a bounded channel and get
//! the reply on a oneshot. Requests are of two kinds ([`Policy`]):
//! - `Hold`: kept until the worker answers, re-sent in order after a reconnect (persist,
//!   subscribe, unsubscribe, disconnect). They take a permit from a bounded pool first, so a
//!   worker that is away or slow makes publishers wait instead of memory grow.
//! - `FailFast`: answered with [`LinkError::Unavailable`] while the worker is away (connect,
//!   catch-up), so that a client is told "server unavailable" instead of waiting.
//!
//! Notices have no reply and are dropped (and counted) while the worker is away.

use bytes::Bytes;
use futures::future::{ready, BoxFuture, Either, Ready};
use futures::{SinkExt, StreamExt};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use wharf_shared::codec::{decode_body, encode_body, encode_request, encode_store_notice};
use wharf_shared::{
    EdgeFrame, Hello, Message, Notice, Reply, Request, WorkerFrame, MAX_FRAME_LENGTH,
    PROTOCOL_VERSION,
};

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LinkError {
    #[error("store-worker unavailable")]
    Unavailable,
    #[error("edge is shutting down")]
    Closed,
    #[error("frame could not be encoded: {0}")]
    Encode(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Hold,
    FailFast,
}

pub type ReplyRx = oneshot::Receiver<Result<Reply, LinkError>>;

/// What the worker sends unasked, in the order it sent it.
#[derive(Debug)]
pub enum Pushed {
    /// Messages other hosts (or other edges of the worker) received.
    Messages(Vec<Message>),
    /// Sessions claimed elsewhere.
    Claims(Vec<wharf_shared::Claim>),
    /// Every claim made before `as_of_ms` (host monotonic clock) has been pushed.
    Lease { as_of_ms: u64 },
}

/// A result that is ready at once, or a (boxed) wait for it.
pub type MaybeWaiting<'a, T> = Either<Ready<T>, BoxFuture<'a, T>>;

enum Command {
    Request {
        request: Request,
        policy: Policy,
        reply: oneshot::Sender<Result<Reply, LinkError>>,
        _permit: Option<OwnedSemaphorePermit>,
    },
    Notice(Bytes),
}

struct Pending {
    request: Request,
    policy: Policy,
    reply: oneshot::Sender<Result<Reply, LinkError>>,
    _permit: Option<OwnedSemaphorePermit>,
}

/// Handle to the link task; cheap to clone.
#[derive(Clone)]
pub struct Link {
    tx: mpsc::Sender<Command>,
    up: watch::Receiver<bool>,
    connections: Arc<std::sync::atomic::AtomicU64>,
    hold: Arc<Semaphore>,
    /// The pool's size: no request takes more.
    max_held: u32,
}

/// Where and who: the worker socket and this edge's identity in the handshake.
pub struct LinkConfig {
    pub socket: PathBuf,
    pub host: String,
    pub instance: String,
    pub max_held: usize,
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_millis(1_000);
/// Longest a notice (QoS 0 message, delivery records) waits in the buffer for company.
const NOTICE_LINGER: Duration = Duration::from_millis(1);
/// How long a fail-fast request waits for a link that is down.
const FAIL_FAST_WAIT: Duration = Duration::from_secs(2);

impl Link {
    /// Starts the link task; it runs until `shutdown` fires and every handle is dropped.
    /// Messages the worker pushes from other hosts go to `deliveries`.
    pub fn spawn(
        config: LinkConfig,
        deliveries: mpsc::Sender<Pushed>,
        shutdown: CancellationToken,
    ) -> (Link, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(1024);
        let (up, up_rx) = watch::channel(false);
        let connections = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let link = Link {
            tx,
            up: up_rx,
            connections: connections.clone(),
            hold: Arc::new(Semaphore::new(config.max_held)),
            max_held: u32::try_from(config.max_held).unwrap_or(u32::MAX),
        };
        let task = tokio::spawn(run(config, deliveries, rx, up, connections, shutdown));
        (link, task)
    }

    /// Permits a held request takes: one per message it persists (the pool bounds the
    /// publishes waiting for the worker), never more than the pool.
    fn permits(&self, request: &Request) -> u32 {
        let messages = match request {
            Request::Persist(messages) => messages.len(),
            _ => 1,
        };
        u32::try_from(messages.max(1))
            .unwrap_or(u32::MAX)
            .min(self.max_held)
    }

    /// Whether the worker handshake has completed and the socket is open.
    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// How many times the link has connected to a worker (a new one: the worker knows
    /// nothing this edge told an earlier one).
    pub fn connections(&self) -> u64 {
        self.connections.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Sends a request; the reply arrives on the returned receiver. A `Hold` request waits
    /// here for a permit when the pool is exhausted.
    ///
    /// When a permit and a channel slot are free (nearly always) this completes without
    /// waiting; only the waiting path is a (boxed) future. Every session task awaits this, and
    /// an inline future would add its size to every idle connection.
    pub fn request(
        &self,
        request: Request,
        policy: Policy,
    ) -> MaybeWaiting<'_, Result<ReplyRx, LinkError>> {
        if policy == Policy::Hold || self.is_up() {
            let permit = match policy {
                Policy::Hold => self
                    .hold
                    .clone()
                    .try_acquire_many_owned(self.permits(&request))
                    .ok(),
                Policy::FailFast => None,
            };
            if policy == Policy::FailFast || permit.is_some() {
                if let Ok(slot) = self.tx.try_reserve() {
                    let (reply, rx) = oneshot::channel();
                    slot.send(Command::Request {
                        request,
                        policy,
                        reply,
                        _permit: permit,
                    });
                    return Either::Left(ready(Ok(rx)));
                }
            }
        }
        Either::Right(Box::pin(self.request_waiting(request, policy)))
    }

    async fn request_waiting(
        &self,
        request: Request,
        policy: Policy,
    ) -> Result<ReplyRx, LinkError> {
        let (reply, rx) = oneshot::channel();
        if policy == Policy::FailFast && !self.is_up() {
            // Give a worker that is (re)connecting a moment before saying "unavailable".
            let mut up = self.up.clone();
            let back = tokio::time::timeout(FAIL_FAST_WAIT, up.wait_for(|up| *up)).await;
            if !matches!(back, Ok(Ok(_))) {
                return Err(LinkError::Unavailable);
            }
        }
        let permit = match policy {
            Policy::Hold => Some(
                self.hold
                    .clone()
                    .acquire_many_owned(self.permits(&request))
                    .await
                    .map_err(|_| LinkError::Closed)?,
            ),
            Policy::FailFast => None,
        };
        let command = Command::Request {
            request,
            policy,
            reply,
            _permit: permit,
        };
        self.tx.send(command).await.map_err(|_| LinkError::Closed)?;
        Ok(rx)
    }

    /// Queues a notice; waits only while the link's queue is full (the link task keeps
    /// draining it, dropping notices while the worker is away). Like [`Link::request`], only
    /// the waiting path is a future.
    pub fn notify(&self, notice: Notice) -> MaybeWaiting<'_, ()> {
        self.notify_encoded(encode_body(&EdgeFrame::Notice(notice)))
    }

    /// `notify(Notice::Store(messages))` without copying the messages.
    pub fn notify_store(&self, messages: &[Arc<Message>]) -> MaybeWaiting<'_, ()> {
        self.notify_encoded(encode_store_notice(messages))
    }

    fn notify_encoded(
        &self,
        body: Result<Vec<u8>, wharf_shared::codec::CodecError>,
    ) -> MaybeWaiting<'_, ()> {
        let Ok(body) = body else {
            return Either::Left(ready(()));
        };
        let command = match self.tx.try_send(Command::Notice(Bytes::from(body))) {
            Ok(()) => return Either::Left(ready(())),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                metrics::counter!("wharf_edge_notices_dropped_total").increment(1);
                return Either::Left(ready(()));
            }
            Err(mpsc::error::TrySendError::Full(command)) => command,
        };
        Either::Right(Box::pin(async move {
            if self.tx.send(command).await.is_err() {
                metrics::counter!("wharf_edge_notices_dropped_total").increment(1);
            }
        }))
    }
}

type Writer = FramedWrite<tokio::net::unix::OwnedWriteHalf, LengthDelimitedCodec>;
type Reader = FramedRead<tokio::net::unix::OwnedReadHalf, LengthDelimitedCodec>;

fn framing() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME_LENGTH)
        .new_codec()
}

async fn connect(config: &LinkConfig) -> Result<(Reader, Writer), String> {
    let stream = UnixStream::connect(&config.socket)
        .await
        .map_err(|e| format!("connect {}: {e}", config.socket.display()))?;
    let (read, write) = stream.into_split();
    let mut reader = FramedRead::new(read, framing());
    let mut writer = FramedWrite::new(write, framing());
    let hello = EdgeFrame::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        host: config.host.clone(),
        instance: config.instance.clone(),
    });
    let body = encode_body(&hello).map_err(|e| e.to_string())?;
    writer
        .send(Bytes::from(body))
        .await
        .map_err(|e| format!("send hello: {e}"))?;
    let frame = tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next())
        .await
        .map_err(|_| "no hello from the worker".to_string())?
        .ok_or("worker closed the socket during the handshake")?
        .map_err(|e| format!("read hello: {e}"))?;
    match decode_body::<WorkerFrame>(&frame) {
        Ok(WorkerFrame::Hello(h)) if h.protocol_version == PROTOCOL_VERSION => {
            tracing::info!(worker = %h.instance, worker_host = %h.host, "store-worker link up");
            Ok((reader, writer))
        }
        Ok(WorkerFrame::Hello(h)) => Err(format!(
            "worker speaks protocol {}, this edge {PROTOCOL_VERSION}",
            h.protocol_version
        )),
        Ok(other) => Err(format!("expected hello, got {other:?}")),
        Err(e) => Err(format!("bad hello: {e}")),
    }
}

struct State {
    next_id: u64,
    pending: BTreeMap<u64, Pending>,
    deliveries: mpsc::Sender<Pushed>,
}

impl State {
    /// Takes a command while the worker is away.
    fn offline(&mut self, command: Command) {
        match command {
            Command::Request {
                policy: Policy::FailFast,
                reply,
                ..
            } => {
                let _ = reply.send(Err(LinkError::Unavailable));
            }
            Command::Request {
                request,
                policy,
                reply,
                _permit,
            } => {
                self.next_id += 1;
                self.pending.insert(
                    self.next_id,
                    Pending {
                        request,
                        policy,
                        reply,
                        _permit,
                    },
                );
            }
            Command::Notice(_) => {
                metrics::counter!("wharf_edge_notices_dropped_total").increment(1);
            }
        }
    }

    /// The socket closed: fail-fast requests fail, held ones wait for the next connection.
    fn lost(&mut self) {
        let ids: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.policy == Policy::FailFast)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(p) = self.pending.remove(&id) {
                let _ = p.reply.send(Err(LinkError::Unavailable));
            }
        }
    }

    /// A frame from the worker: a reply, or messages from other hosts to route.
    async fn incoming(&mut self, frame: &[u8]) -> Result<(), String> {
        match decode_body::<WorkerFrame>(frame) {
            // Waiting here pushes back on the worker while routing is behind. One channel for
            // all three keeps their order: a lease follows the claims read before it.
            Ok(WorkerFrame::Deliver { messages }) => {
                let _ = self.deliveries.send(Pushed::Messages(messages)).await;
                Ok(())
            }
            Ok(WorkerFrame::Claims { claims }) => {
                let _ = self.deliveries.send(Pushed::Claims(claims)).await;
                Ok(())
            }
            Ok(WorkerFrame::Lease { as_of_ms }) => {
                let _ = self.deliveries.send(Pushed::Lease { as_of_ms }).await;
                Ok(())
            }
            Ok(WorkerFrame::Reply { id, reply }) => {
                if let Some(p) = self.pending.remove(&id) {
                    let _ = p.reply.send(Ok(reply));
                    Ok(())
                } else {
                    Err(format!("reply to unknown request {id}"))
                }
            }
            Ok(other) => Err(format!("unexpected frame {other:?}")),
            Err(e) => Err(format!("undecodable frame: {e}")),
        }
    }
}

async fn run(
    config: LinkConfig,
    deliveries: mpsc::Sender<Pushed>,
    mut rx: mpsc::Receiver<Command>,
    up: watch::Sender<bool>,
    connections: Arc<std::sync::atomic::AtomicU64>,
    shutdown: CancellationToken,
) {
    let mut state = State {
        next_id: 0,
        pending: BTreeMap::new(),
        deliveries,
    };
    let mut backoff = Duration::from_millis(50);
    loop {
        let connected = tokio::select! {
            c = connect(&config) => c,
            _ = shutdown.cancelled(), if state.pending.is_empty() => return,
        };
        let (mut reader, mut writer) = match connected {
            Ok(halves) => halves,
            Err(e) => {
                if backoff < MAX_BACKOFF {
                    // Usual while both processes start, or during a quick worker restart.
                    tracing::info!(error = %e, retry_in = ?backoff, "waiting for the store-worker");
                } else {
                    tracing::warn!(error = %e, retry_in = ?backoff, "store-worker link down");
                }
                let sleep = tokio::time::sleep(backoff);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = &mut sleep => break,
                        command = rx.recv() => match command {
                            Some(c) => state.offline(c),
                            None if state.pending.is_empty() => return,
                            None => {}
                        },
                    }
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let mut result = Ok(());
        for (id, p) in &state.pending {
            let frame = match encode_request(*id, &p.request) {
                Ok(body) => Bytes::from(body),
                Err(e) => {
                    result = Err(e.to_string());
                    break;
                }
            };
            if let Err(e) = writer.feed(frame).await {
                result = Err(e.to_string());
                break;
            }
        }
        if result.is_ok() {
            result = SinkExt::<Bytes>::flush(&mut writer)
                .await
                .map_err(|e| e.to_string());
        }
        if result.is_ok() {
            connections.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            up.send_replace(true);
            metrics::gauge!("wharf_edge_worker_link_up").set(1.0);
            result = serve(&mut state, &mut rx, &mut reader, &mut writer, &shutdown).await;
        }
        up.send_replace(false);
        metrics::gauge!("wharf_edge_worker_link_up").set(0.0);
        state.lost();
        match result {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, held = state.pending.len(), "store-worker link lost")
            }
        }
    }
}

/// Runs one connection until it breaks (`Err`) or every handle is gone (`Ok`).
async fn serve(
    state: &mut State,
    rx: &mut mpsc::Receiver<Command>,
    reader: &mut Reader,
    writer: &mut Writer,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    // Notices are written at most NOTICE_LINGER after they were queued; a request is written
    // at once, with whatever notices are buffered before it.
    let flush_at = tokio::time::sleep(Duration::from_secs(86_400));
    tokio::pin!(flush_at);
    let mut unflushed = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled(), if state.pending.is_empty() => {
                flush(writer).await?;
                return Ok(());
            }
            command = rx.recv() => {
                let Some(command) = command else {
                    flush(writer).await?;
                    if state.pending.is_empty() {
                        return Ok(());
                    }
                    // Keep serving replies for what is still pending.
                    while !state.pending.is_empty() {
                        let frame = reader.next().await.ok_or("worker closed the socket")?;
                        state.incoming(&frame.map_err(|e| e.to_string())?).await?;
                    }
                    return Ok(());
                };
                let mut waited = send(state, command, writer).await?;
                // Batch whatever else is queued into the same write.
                while let Ok(command) = rx.try_recv() {
                    waited |= send(state, command, writer).await?;
                }
                if waited {
                    flush(writer).await?;
                    unflushed = false;
                } else if !unflushed {
                    unflushed = true;
                    flush_at.as_mut().reset(tokio::time::Instant::now() + NOTICE_LINGER);
                }
                metrics::gauge!("wharf_edge_worker_pending_requests").set(state.pending.len() as f64);
            }
            _ = &mut flush_at, if unflushed => {
                flush(writer).await?;
                unflushed = false;
            }
            frame = reader.next() => {
                let frame = frame.ok_or("worker closed the socket")?.map_err(|e| format!("read: {e}"))?;
                state.incoming(&frame).await?;
            }
        }
    }
}

/// Writes what the framed writer holds.
async fn flush(writer: &mut Writer) -> Result<(), String> {
    SinkExt::<Bytes>::flush(writer)
        .await
        .map_err(|e| format!("write: {e}"))
}

/// Buffers one command's frame (the framed writer writes once its buffer is large); returns
/// whether someone waits for it (a request).
async fn send(state: &mut State, command: Command, writer: &mut Writer) -> Result<bool, String> {
    match command {
        Command::Request {
            request,
            policy,
            reply,
            _permit,
        } => {
            let body = match encode_request(state.next_id + 1, &request) {
                Ok(body) => body,
                Err(e) => {
                    let _ = reply.send(Err(LinkError::Encode(e.to_string())));
                    return Ok(false);
                }
            };
            state.next_id += 1;
            let id = state.next_id;
            writer
                .feed(Bytes::from(body))
                .await
                .map_err(|e| format!("write: {e}"))?;
            state.pending.insert(
                id,
                Pending {
                    request,
                    policy,
                    reply,
                    _permit,
                },
            );
            Ok(true)
        }
        Command::Notice(frame) => {
            writer
                .feed(frame)
                .await
                .map_err(|e| format!("write: {e}"))?;
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wharf_shared::{MessageId, Qos};

    fn persist(messages: usize) -> Request {
        let message = Message {
            id: MessageId([1; 12]),
            topic: "t".into(),
            payload: vec![1],
            qos: Qos::AtLeastOnce,
            retain: false,
            client_id: "c".into(),
            host: "h".into(),
            created_ms: 0,
            properties: None,
        };
        Request::Persist(vec![message; messages])
    }

    /// A link to a worker that never answers: what is held stays held.
    fn away(max_held: usize) -> Link {
        let (deliveries, _rx) = mpsc::channel(1);
        let config = LinkConfig {
            socket: "/nonexistent/wharf-link-test.sock".into(),
            host: "h".into(),
            instance: "i".into(),
            max_held,
        };
        Link::spawn(config, deliveries, CancellationToken::new()).0
    }

    /// The pool of held requests counts messages: a persist of several takes a permit for
    /// each, and one larger than the pool takes the whole pool instead of waiting forever.
    #[tokio::test]
    async fn held_persists_take_a_permit_per_message() {
        let patience = Duration::from_millis(200);
        let link = away(3);
        let held = |n| tokio::time::timeout(patience, link.request(persist(n), Policy::Hold));
        assert!(held(2).await.is_ok(), "two of three permits");
        assert!(held(2).await.is_err(), "two more wait: one is left");
        assert!(held(1).await.is_ok(), "the last one");
        assert!(held(1).await.is_err(), "the pool is empty");

        let link = away(3);
        let held = |n| tokio::time::timeout(patience, link.request(persist(n), Policy::Hold));
        assert!(held(5).await.is_ok(), "more than the pool takes all of it");
        assert!(held(1).await.is_err());
    }
}
