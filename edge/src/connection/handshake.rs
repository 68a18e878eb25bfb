//! The CONNECT phase: read CONNECT within the timeout, check it, take over an existing
//! session with the same client id, fetch the stored session, answer with CONNACK.

use super::{session_queue, SessionError};
use crate::broker::Broker;
use crate::link::Policy;
use crate::protocol::{v4, Connect, ConnectCode, DecodeError, Inbound, Will};
use crate::registry::Previous;
use crate::router::{Delivery, SessionTx};
use crate::session::SessionState;
use crate::{ids, topic};
use bytes::BytesMut;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use wharf_shared::{Message, Reply, Request};

/// Longest client id accepted; longer ones get CONNACK "identifier rejected".
pub const MAX_CLIENT_ID_LEN: usize = 1024;
/// How long a new connection waits for the one it takes over to hand its session over.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a persistent session waits for its stored state.
const SESSION_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// A session that has been accepted (CONNACK 0 written to the buffer).
pub struct Handshake {
    pub state: SessionState,
    pub clean: bool,
    pub will: Option<Will>,
    pub connection_id: u64,
    pub session_tx: Arc<SessionTx>,
    pub takeover_rx: oneshot::Receiver<oneshot::Sender<Option<SessionState>>>,
    pub undelivered: Vec<Message>,
    pub next: Option<wharf_shared::Cursor>,
    pub connect_started_ms: i64,
    /// CONNACK and anything else to send first.
    pub write_buf: BytesMut,
}

/// `Ok(None)`: the connection was refused with a CONNACK code and is done.
pub async fn accept<R, W>(
    broker: &Arc<Broker>,
    reader: &mut R,
    writer: &mut W,
    read_buf: &mut BytesMut,
    identity: Option<&crate::tls::PeerIdentity>,
    shutdown: &CancellationToken,
) -> Result<Option<Box<Handshake>>, SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let limits = &broker.config.limits;
    let read = read_connect(reader, read_buf, limits.max_packet_size);
    let connect = tokio::select! {
        r = tokio::time::timeout(limits.connect_timeout, read) => match r {
            Ok(Ok(c)) => c,
            Ok(Err(SessionError::Decode(DecodeError::UnsupportedProtocolLevel(level)))) => {
                tracing::info!(level, "unsupported protocol level");
                refuse(writer, ConnectCode::UnacceptableProtocolVersion).await;
                return Ok(None);
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(SessionError::ConnectTimeout),
        },
        _ = shutdown.cancelled() => return Ok(None),
    };
    if let Some(will) = &connect.will {
        if !topic::valid_topic_name(&will.topic) {
            return Err(SessionError::Protocol("invalid will topic"));
        }
    }
    let client_id = match assign_client_id(&connect) {
        Some(id) => id,
        None => {
            refuse(writer, ConnectCode::IdentifierRejected).await;
            return Ok(None);
        }
    };
    if let Some(identity) = identity {
        let required = broker.config.tls.as_ref().is_some_and(|t| t.cert_identity);
        if required && !identity.allows(&client_id) {
            tracing::warn!(client_id = %client_id, certificate = ?identity.names, "client id not in the client certificate");
            refuse(writer, ConnectCode::NotAuthorized).await;
            return Ok(None);
        }
    }
    start_session(broker, connect, client_id, writer).await
}

async fn read_connect<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Connect, SessionError> {
    loop {
        match v4::decode(buf, max)? {
            Some(Inbound::Connect(c)) => return Ok(c),
            Some(_) => return Err(SessionError::Protocol("first packet is not CONNECT")),
            None => {}
        }
        buf.reserve(512);
        if reader.read_buf(buf).await? == 0 {
            return Err(SessionError::Protocol("closed before CONNECT"));
        }
    }
}

/// The client id to use, or `None` when it must be rejected.
fn assign_client_id(connect: &Connect) -> Option<Arc<str>> {
    if connect.client_id.len() > MAX_CLIENT_ID_LEN {
        return None;
    }
    if connect.client_id.is_empty() {
        if !connect.clean_session {
            return None;
        }
        let id = ids::next_message_id(ids::now_ms());
        return Some(format!("wharf-{id}").into());
    }
    Some(connect.client_id.as_str().into())
}

async fn refuse<W: AsyncWrite + Unpin>(writer: &mut W, code: ConnectCode) {
    let mut buf = BytesMut::new();
    v4::encode_connack(&mut buf, code, false);
    let _ = writer.write_all(&buf).await;
    let _ = writer.shutdown().await;
}

async fn start_session<W: AsyncWrite + Unpin>(
    broker: &Arc<Broker>,
    connect: Connect,
    client_id: Arc<str>,
    writer: &mut W,
) -> Result<Option<Box<Handshake>>, SessionError> {
    let connection_id = broker.connection_id();
    let (takeover_tx, takeover_rx) = oneshot::channel();
    let prior = match broker
        .registry
        .claim(client_id.clone(), connection_id, takeover_tx)
    {
        Previous::None => None,
        Previous::Parked(state) => Some(*state),
        Previous::Connected(old) => take_over(old).await,
    };
    let connect_started_ms = ids::now_ms();
    let mut undelivered = Vec::new();
    let mut next = None;
    let (state, present) = if connect.clean_session {
        let request = Request::Connect {
            client_id: client_id.to_string(),
            clean_session: true,
        };
        // Ordered before this session's own requests on the link; nobody waits for it.
        if let Err(e) = broker.link.request(request, Policy::Hold).await {
            // The link is closing: give the client id up rather than leave it claimed by a
            // connection that is gone.
            broker.registry.release(&client_id, connection_id, prior);
            return Err(e.into());
        }
        (SessionState::new(client_id.clone()), false)
    } else {
        match fetch_session(broker, &client_id).await {
            Ok((present, subscriptions, messages, next_page, outbound)) => {
                undelivered = messages;
                next = next_page;
                let mut state = match prior {
                    // Parked on this edge: its own state is the freshest.
                    Some(state) => state,
                    // New here (or this edge restarted): QoS 2 deliveries under way, from
                    // the store, with their packet ids.
                    None => {
                        let mut state = SessionState::new(client_id.clone());
                        for o in outbound {
                            let delivery = Delivery {
                                message: Arc::new(o.message),
                                qos: wharf_shared::Qos::ExactlyOnce,
                                retain: false,
                            };
                            state.restore(o.pkid, delivery, o.released);
                        }
                        state
                    }
                };
                let had_state = !state.subscriptions.is_empty() || state.inflight_len() > 0;
                for s in subscriptions {
                    state.subscriptions.insert(s.filter, s.qos);
                }
                (state, present || had_state)
            }
            Err(e) => {
                tracing::warn!(client_id = %client_id, error = %e, "stored session unavailable");
                broker.registry.release(&client_id, connection_id, prior);
                refuse(writer, ConnectCode::ServerUnavailable).await;
                return Ok(None);
            }
        }
    };
    // The server closes a client silent for 1.5 x its keepalive (MQTT 3.1.1, 3.1.2.10).
    let keep_alive =
        (connect.keep_alive > 0).then(|| Duration::from_millis(connect.keep_alive as u64 * 1500));
    let session_tx = session_queue(broker, connection_id, keep_alive);
    broker.router.attach(client_id.clone(), session_tx.clone());
    for (filter, qos) in &state.subscriptions {
        broker.router.subscribe(&client_id, filter, *qos);
    }
    let mut write_buf = BytesMut::new();
    v4::encode_connack(&mut write_buf, ConnectCode::Accepted, present);
    metrics::counter!("wharf_edge_connections_accepted_total").increment(1);
    Ok(Some(Box::new(Handshake {
        state,
        clean: connect.clean_session,
        will: connect.will,
        connection_id,
        session_tx,
        takeover_rx,
        undelivered,
        next,
        connect_started_ms,
        write_buf,
    })))
}

async fn take_over(old: crate::registry::TakeoverTx) -> Option<SessionState> {
    let (tx, rx) = oneshot::channel();
    if old.send(tx).is_err() {
        return None;
    }
    match tokio::time::timeout(TAKEOVER_TIMEOUT, rx).await {
        Ok(Ok(state)) => state,
        _ => {
            tracing::warn!("previous connection did not hand its session over in time");
            None
        }
    }
}

type StoredSession = (
    bool,
    Vec<wharf_shared::Subscription>,
    Vec<Message>,
    Option<wharf_shared::Cursor>,
    Vec<wharf_shared::OutboundQos2>,
);

async fn fetch_session(broker: &Broker, client_id: &str) -> Result<StoredSession, SessionError> {
    let request = Request::Connect {
        client_id: client_id.to_owned(),
        clean_session: false,
    };
    let rx = broker.link.request(request, Policy::FailFast).await?;
    let reply = tokio::time::timeout(SESSION_FETCH_TIMEOUT, rx)
        .await
        .map_err(|_| SessionError::Store("session fetch timed out".into()))?
        .map_err(|_| SessionError::Link(crate::link::LinkError::Closed))??;
    match reply {
        Reply::Session {
            present,
            subscriptions,
            undelivered,
            next,
            outbound_qos2,
        } => Ok((present, subscriptions, undelivered, next, outbound_qos2)),
        other => Err(SessionError::Store(format!("connect: {other:?}"))),
    }
}
