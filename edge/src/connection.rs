//! One client connection: CONNECT, then one task waiting on one poll function
//! ([`Connection::poll_wake`]) over the socket, the session's queue (deliveries, and the
//! shutdown and keepalive signals), replies from the store-worker and a takeover by a newer
//! connection.
//!
//! Backpressure: the socket is not read while `max_pending_persists` publishes wait for the
//! store or while the output buffer is above its high-water mark; the queue is not drained
//! while the inflight window is full.
//!
//! Here: the connection's types and its start ([`serve`]). Beside it in `connection/`:
//! `handshake.rs` (CONNECT to CONNACK), `run.rs` (the loop), `inbound.rs` (what the client
//! sends), `subscribe.rs`, `outbound.rs` (what the session sends), `dedupe.rs`,
//! `ending.rs`, `transport.rs` (the byte streams) and `in_order.rs`.

mod dedupe;
mod ending;
mod handshake;
mod in_order;
mod inbound;
mod outbound;
mod run;
mod subscribe;
mod transport;

use in_order::InOrder;
use transport::poll_read_some;
pub use transport::{Reader, Transport};

use crate::auth::{acl::Access, PublishDenied};
use crate::broker::Broker;
use crate::link::{LinkError, Policy, ReplyRx};
use crate::protocol::{encode, reason, Inbound, PublishIn, SubscribeFilter, Version, Will};
use crate::registry::Released;
use crate::router::{Event, Grant, SessionTx, Signals};
use crate::session::Ack;
use crate::topic;
use bytes::{Buf, BytesMut};
use futures::future::{BoxFuture, Either};
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use outbound::Outbound;
use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use wharf_shared::{Message, Qos, Reply, Request};

/// Why a connection ended; logged with the client id.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Decode(#[from] crate::protocol::DecodeError),
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    /// A 5.0 rule broken, with the reason code the DISCONNECT gives.
    #[error("{why}")]
    Refused { reason: u8, why: &'static str },
    #[error("no packet within 1.5 x keepalive")]
    KeepAliveTimeout,
    #[error("no CONNECT within the connect timeout")]
    ConnectTimeout,
    #[error("store-worker refused: {0}")]
    Store(String),
    #[error(transparent)]
    Link(#[from] LinkError),
}

impl SessionError {
    /// The reason code of the DISCONNECT that tells a 5.0 client why it is closed; `None`
    /// when the socket is gone.
    fn disconnect_reason(&self) -> Option<u8> {
        match self {
            SessionError::Io(_) => None,
            SessionError::Decode(e) => Some(e.reason()),
            SessionError::Protocol(_) => Some(reason::PROTOCOL_ERROR),
            SessionError::Refused { reason, .. } => Some(*reason),
            SessionError::KeepAliveTimeout => Some(reason::KEEP_ALIVE_TIMEOUT),
            SessionError::ConnectTimeout => None,
            SessionError::Store(_) | SessionError::Link(_) => {
                Some(reason::IMPLEMENTATION_SPECIFIC_ERROR)
            }
        }
    }
}

/// How the run loop ended.
enum End {
    /// DISCONNECT received: no will.
    Graceful,
    /// Another connection took the client id; the state goes to it.
    TakenOver(crate::registry::Handover),
    /// The edge is shutting down.
    Shutdown,
    Error(SessionError),
}

/// What the run loop may wait on this turn; `None` for a source it must leave alone.
struct Sources<'a, R, W> {
    takeover: Option<&'a mut TakeoverRx>,
    /// The socket, and how much of the output may be written.
    writer: Option<(&'a mut W, usize)>,
    /// The socket, and the room to offer a read.
    reader: Option<(&'a mut R, usize)>,
    /// Set while the lease is lost.
    recheck: Option<&'a mut Pin<Box<tokio::time::Sleep>>>,
    wants_queue: bool,
}

/// What woke the run loop.
enum Wake {
    Handover(Result<crate::registry::Handover, oneshot::error::RecvError>),
    Written(std::io::Result<usize>),
    Tracked((u16, bool, Result<Reply, LinkError>)),
    Op(Op),
    CaughtUp(Result<Result<Reply, LinkError>, oneshot::error::RecvError>),
    Event(Event),
    Recheck,
    Read(std::io::Result<(usize, usize)>),
}

/// Why the run loop stopped reading: it ends once what is pending is answered. (Not an
/// [`End`], which is four times larger and would be part of every connection's task.)
#[derive(Clone, Copy)]
enum Closing {
    Graceful,
    Shutdown,
}

impl From<Closing> for End {
    fn from(closing: Closing) -> End {
        match closing {
            Closing::Graceful => End::Graceful,
            Closing::Shutdown => End::Shutdown,
        }
    }
}

type OpFuture = Pin<Box<dyn Future<Output = Op> + Send>>;

/// Where a newer connection with the same client id asks for the session state.
type TakeoverRx = oneshot::Receiver<crate::registry::Handover>;

/// Replies the client waits for, answered in the order its packets arrived.
enum Op {
    /// The QoS 1 messages of one read (their packet ids, in order).
    PersistedMany {
        pkids: Vec<u16>,
        result: Result<Reply, LinkError>,
    },
    /// A QoS 2 message.
    PersistedQos2 {
        pkid: u16,
        message: Arc<Message>,
        result: Result<Reply, LinkError>,
        /// Released once the message is routed (or given up).
        in_transit: crate::transit::InTransitGuard,
    },
    Subscribed {
        pkid: u16,
        codes: Vec<u8>,
        filters: Vec<(String, Grant)>,
        /// The new subscriptions that take retained messages now (5.0 Retain Handling).
        retained_for: Vec<(String, Grant)>,
        /// When the SUBSCRIBE was taken (Unix ms).
        since_ms: i64,
        result: Result<Reply, LinkError>,
    },
    /// An acknowledgement with its reason code, kept behind those still waiting for the store.
    Ack(Ack, u16, u8),
}

/// Consecutive QoS 0 PUBLISHes, or QoS 1 ones, of one read, sent to the worker together.
#[derive(Default)]
struct Batch {
    messages: Vec<Arc<Message>>,
    /// QoS 1: the packet ids to acknowledge once stored; empty for QoS 0.
    pkids: Vec<u16>,
    /// QoS 1: the batch is in transit until it is routed.
    in_transit: Option<crate::transit::InTransitGuard>,
    /// The read epoch before this read's bytes arrived ([`SessionTx::read_epoch`]): a
    /// SUBSCRIBE among them gets what was routed since (`Router::subscribe_after`).
    read_epoch: u64,
}

impl Batch {
    /// Whether a PUBLISH at `qos` joins this batch (an empty batch takes QoS 0 or 1).
    fn takes(&self, qos: Qos) -> bool {
        match qos {
            Qos::AtMostOnce => self.pkids.is_empty(),
            Qos::AtLeastOnce => self.messages.is_empty() || !self.pkids.is_empty(),
            Qos::ExactlyOnce => false,
        }
    }
}

async fn reply_of(rx: Result<crate::link::ReplyRx, LinkError>) -> Result<Reply, LinkError> {
    match rx {
        Ok(rx) => rx.await.unwrap_or(Err(LinkError::Closed)),
        Err(e) => Err(e),
    }
}

/// Serves one accepted socket until it closes; `permit` (a connection slot) is given back
/// at the end. `identity`: `None` on the plain listener; on the TLS listener the client
/// certificate's names (empty without a certificate).
///
/// Not an `async fn`: its arguments would be stored in the task for its whole life, and this
/// future is what every idle connection costs. They come in one box instead, emptied at the
/// start: what only the CONNECT phase needs (the address, the certificate's names, the
/// shutdown token, the broker) is not kept while the session runs.
#[allow(clippy::manual_async_fn)]
pub fn serve<S: Transport, P: Send + 'static>(
    broker: Arc<Broker>,
    stream: S,
    peer: SocketAddr,
    identity: Option<Box<crate::tls::PeerIdentity>>,
    shutdown: CancellationToken,
    permit: P,
) -> impl Future<Output = ()> + Send {
    let opening = Box::new(Opening {
        stream,
        permit,
        start: Start {
            broker,
            peer,
            identity,
            shutdown,
        },
    });
    async move {
        let Opening {
            mut stream,
            permit,
            start,
        } = Opening::unbox(opening);
        let (mut reader, mut writer) = stream.halves();
        // The CONNECT phase and the ending run once per connection: boxed, so that the task
        // (kept for the whole connection) is only as large as the run loop. `start` goes to
        // it whole, so that none of it is kept in the task.
        let Some((mut conn, mut takeover_rx, stopping)) =
            Box::pin(open(start, &mut reader, &mut writer)).await
        else {
            return;
        };
        metrics::gauge!("wharf_edge_sessions").increment(1.0);
        let end = conn
            .run(&mut reader, &mut writer, &mut takeover_rx, stopping)
            .await;
        // Boxed: it runs once. `end` goes to it at once, so that the task keeps no room for it.
        Box::pin(conn.close(end, &mut writer, &mut takeover_rx)).await;
        metrics::gauge!("wharf_edge_sessions").decrement(1.0);
        drop(permit);
    }
}

/// The CONNECT phase: the session, its takeover receiver, and whether the edge was already
/// shutting down when it was attached (later shutdowns arrive as signals on its queue).
/// `None` when the connection ended before its session started.
async fn open<R: Reader, W: AsyncWrite + Unpin>(
    start: Start,
    reader: &mut R,
    writer: &mut W,
) -> Option<(Connection, TakeoverRx, bool)> {
    let Start {
        broker,
        peer,
        identity,
        shutdown,
    } = start;
    let mut read_buf = BytesMut::with_capacity(512);
    let accepted = handshake::accept(
        &broker,
        peer,
        reader,
        writer,
        &mut read_buf,
        identity.as_deref(),
        &shutdown,
    )
    .await;
    let (conn, takeover_rx) = match accepted {
        Ok(Some(hs)) => Connection::new(&broker, *hs, read_buf),
        Ok(None) => return None,
        Err(e) => {
            tracing::info!(%peer, error = %e, "connection closed before the session started");
            return None;
        }
    };
    tracing::debug!(%peer, client_id = %conn.out.state.client_id, protocol = conn.version.label(), session_expiry = conn.session_expiry, "session started");
    Some((conn, takeover_rx, shutdown.is_cancelled()))
}

/// Tells a 5.0 client why the server closes (MQTT 5.0 3.14), if it does.
/// Without the Reason String if it would take the packet over the client's Maximum Packet
/// Size (`max_packet`).
async fn say_why<W: AsyncWrite + Unpin>(writer: &mut W, end: &End, max_packet: Option<u32>) {
    if let Some((code, why)) = end.disconnect_reason() {
        let mut buf = BytesMut::new();
        encode::disconnect(&mut buf, code, why.as_deref());
        if max_packet.is_some_and(|max| buf.len() > max as usize) {
            buf.clear();
            encode::disconnect(&mut buf, code, None);
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), writer.write_all(&buf)).await;
    }
}

/// What [`serve`] is given, boxed.
struct Opening<S, P> {
    stream: S,
    permit: P,
    start: Start,
}

impl<S, P> Opening<S, P> {
    /// Takes it out of its box and frees the box now (`*boxed` in place would free it only
    /// at the end of the connection).
    #[allow(clippy::boxed_local)]
    fn unbox(boxed: Box<Self>) -> Self {
        *boxed
    }
}

/// What only the CONNECT phase needs.
struct Start {
    broker: Arc<Broker>,
    peer: SocketAddr,
    identity: Option<Box<crate::tls::PeerIdentity>>,
    shutdown: CancellationToken,
}

impl End {
    /// The reason code (and Reason String) of the DISCONNECT a 5.0 client gets.
    fn disconnect_reason(&self) -> Option<(u8, Option<String>)> {
        match self {
            End::Graceful => None,
            End::TakenOver(_) => Some((reason::SESSION_TAKEN_OVER, None)),
            End::Shutdown => Some((reason::SERVER_SHUTTING_DOWN, None)),
            End::Error(e) => e
                .disconnect_reason()
                .map(|code| (code, Some(e.to_string()))),
        }
    }
}

struct Connection {
    broker: Arc<Broker>,
    version: Version,
    /// The Session Expiry Interval in force (seconds): 0 ends the session with the
    /// connection; `u32::MAX` never. 3.1/3.1.1: 0 for a clean session.
    session_expiry: u32,
    /// Boxed: most clients have none, and this is part of every connection's task.
    will: Option<Box<Will>>,
    /// 5.0 topic aliases the client set (boxed, only once it uses one: a pointer in every
    /// connection's task instead of a map's 48 bytes).
    #[allow(clippy::box_collection)]
    topic_aliases: Option<Box<HashMap<u16, String>>>,
    /// QoS 2 PUBLISHes whose PUBCOMP has not been sent (5.0 Receive Maximum, see
    /// [`Connection::publish`]).
    inbound_unacked: u32,
    out: Outbound,
    /// The outstanding catch-up query, if any.
    catch_up: Option<ReplyRx>,
    ops: InOrder<OpFuture>,
    /// Store replies for QoS 2 delivery steps: (packet id, released, result).
    tracking: InOrder<TrackFuture>,
    read_buf: BytesMut,
    /// How much room to offer the next socket read: doubled whenever a read fills it.
    read_chunk: u32,
    /// `--max-publish-rate`: the second being counted and its PUBLISHes.
    publish_second: u32,
    publishes: u32,
}

/// Smallest and largest room offered to a socket read. A read's PUBLISHes are routed
/// together, and then the connection yields: at most 16 KiB per turn (about 130 messages of
/// 100 bytes), a quarter of what a subscriber may write per turn (`write_high_water`), so that
/// the sessions a fast publisher feeds drain their queues faster than it fills them. With
/// 64 KiB, QoS 0 flat out lost a third of its messages at a full subscriber queue.
const MIN_READ: usize = 128;
const MAX_READ: usize = 16 * 1024;
/// Whether `buf` holds PINGRESPs and nothing else (read from a packet boundary).
fn only_pingresps(buf: &[u8]) -> bool {
    !buf.is_empty() && buf.len() % 2 == 0 && buf.chunks(2).all(|p| p == [0xd0, 0])
}

/// While held back for the store, the socket is read (for PINGREQs) only while less than
/// this much is waiting in the read buffer: the rest stays in the kernel.
const HELD_READ_LIMIT: usize = 1024;
/// How often a session without a lease looks whether it has one again.
const LEASE_RECHECK: Duration = Duration::from_millis(20);

type TrackFuture = Pin<Box<dyn Future<Output = (u16, bool, Result<Reply, LinkError>)> + Send>>;

impl Connection {
    fn new(
        broker: &Arc<Broker>,
        hs: handshake::Handshake,
        mut read_buf: BytesMut,
    ) -> (Self, TakeoverRx) {
        if read_buf.is_empty() {
            // Most clients then send little: start small, grow with the load.
            read_buf = BytesMut::new();
        }
        let mut conn = Connection {
            broker: broker.clone(),
            version: hs.peer.version,
            session_expiry: hs.session_expiry,
            will: hs.will.map(Box::new),
            topic_aliases: None,
            inbound_unacked: 0,
            out: Outbound::new(
                broker,
                hs.state,
                hs.session_tx,
                hs.write_buf,
                hs.session_expiry > 0,
                hs.peer,
                hs.auth,
            ),
            tracking: InOrder::default(),
            catch_up: None,
            ops: InOrder::default(),
            read_buf,
            read_chunk: MIN_READ as u32,
            publish_second: 0,
            publishes: 0,
        };
        conn.out
            .resume(hs.undelivered, hs.next, hs.connect_started_ms);
        (conn, hs.takeover_rx)
    }
}

/// The queue a session's deliveries arrive on; the router holds it too.
/// `keep_alive`: 1.5 x the client's keepalive, if it has one.
pub fn session_queue(
    broker: &Broker,
    connection_id: u64,
    keep_alive: Option<Duration>,
    client: crate::router::ClientInfo,
) -> Arc<SessionTx> {
    Arc::new(
        SessionTx::new(connection_id, broker.config.limits.max_queued, keep_alive)
            .describing(client),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::net::{TcpListener, TcpStream};

    /// What every idle connection costs beside its socket: the connection task's future
    /// (the largest state it can suspend in: the run loop with `Connection` inside it), and
    /// the session's queue in the router. Turning one of the boxed steps back into a plain
    /// `.await` (1,992 bytes instead of 488), or a field added to `Connection`, shows here
    /// first. The bounds leave about a quarter for other compilers' layouts; raise one only
    /// with a reason and a run of `bench/idle-subscribed.sh` (the 2 KiB target).
    #[tokio::test]
    async fn an_idle_connection_costs_what_it_did() {
        let config = crate::EdgeConfig {
            listen: None,
            tls: None,
            web: Default::default(),
            proxy: Default::default(),
            worker_socket: std::env::temp_dir().join("wharf-size-guard-no-worker.sock"),
            host: "size-guard".into(),
            limits: crate::Limits::default(),
            shutdown_grace: Duration::from_secs(1),
            auth: Default::default(),
            publisher_identity: None,
            bridges: Vec::new(),
        };
        let shutdown = CancellationToken::new();
        let (deliveries, _rx) = tokio::sync::mpsc::channel(1);
        let (link, _task) = crate::link::Link::spawn(
            crate::link::LinkConfig {
                socket: config.worker_socket.clone(),
                host: config.host.clone(),
                instance: "size-guard".into(),
                max_held: 16,
            },
            deliveries,
            shutdown.clone(),
        );
        let auth = Arc::new(
            crate::auth::Auth::load(Default::default(), Duration::from_secs(1)).expect("auth"),
        );
        let broker = Arc::new(Broker::new(config, link, auth));
        let (stream, _other) = tokio::io::duplex(64);
        let peer = SocketAddr::from(([127, 0, 0, 1], 1));
        let task = serve(broker, stream, peer, None, shutdown.clone(), ());
        let sizes = [
            ("the connection task", std::mem::size_of_val(&task), 640),
            ("Connection", std::mem::size_of::<Connection>(), 384),
            ("SessionTx", std::mem::size_of::<SessionTx>(), 288),
            (
                "SessionState",
                std::mem::size_of::<crate::session::SessionState>(),
                160,
            ),
        ];
        shutdown.cancel();
        for (what, size, bound) in sizes {
            eprintln!("{what}: {size} bytes (bound {bound})");
            assert!(size <= bound, "{what} grew to {size} bytes (bound {bound})");
        }
    }

    async fn read_some<R: Reader>(
        reader: &mut R,
        buf: &mut BytesMut,
        chunk: usize,
    ) -> std::io::Result<(usize, usize)> {
        poll_fn(|cx| poll_read_some(cx, reader, buf, chunk)).await
    }

    #[tokio::test]
    async fn an_idle_tcp_connection_waits_without_a_read_buffer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (mut server, _) = listener.accept().await.expect("accept");
        let (mut reader, _writer) = server.halves();
        let mut buf = BytesMut::new();
        {
            let read = read_some(&mut reader, &mut buf, MIN_READ);
            tokio::pin!(read);
            // Nothing sent: the read waits, and has reserved nothing meanwhile.
            assert!(
                tokio::time::timeout(Duration::from_millis(50), read.as_mut())
                    .await
                    .is_err()
            );
        }
        assert_eq!(buf.capacity(), 0, "an idle connection holds a read buffer");
        client.write_all(b"\xc0\x00").await.expect("write");
        let (n, room) = tokio::time::timeout(
            Duration::from_secs(5),
            read_some(&mut reader, &mut buf, MIN_READ),
        )
        .await
        .expect("readable")
        .expect("read");
        assert_eq!((n, &buf[..]), (2, &b"\xc0\x00"[..]));
        assert!(room >= MIN_READ / 2);
        // Handled, so empty again; the client goes away: the wait ends, and the read finds the
        // end of the stream.
        buf.clear();
        drop(client);
        let (n, _) = read_some(&mut reader, &mut buf, MIN_READ)
            .await
            .expect("read");
        assert_eq!(n, 0);
    }
}
