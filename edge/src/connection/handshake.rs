//! The CONNECT phase: read CONNECT within the timeout, check it, take over an existing
//! session with the same client id, fetch the stored session, answer with CONNACK.

use super::outbound::Peer;
use super::{session_queue, SessionError};
use crate::auth::{acl::Access, SessionAuth};
use crate::broker::Broker;
use crate::link::Policy;
use crate::protocol::encode::{self, ConnackProperties, Refusal};
use crate::protocol::{Connect, DecodeError, Inbound, Version, Will};
use crate::registry::Previous;
use crate::router::{Delivery, Grant, SessionTx};
use crate::session::SessionState;
use crate::{ids, topic};
use bytes::BytesMut;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use wharf_shared::{Message, Reply, Request, StoredSession};

/// Longest client id accepted; longer ones get CONNACK "identifier rejected".
pub const MAX_CLIENT_ID_LEN: usize = 1024;
/// How long a new connection waits for the one it takes over to hand its session over.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a persistent session waits for its stored state once its fetch is sent.
const SESSION_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a persistent session waiting for its turn to fetch (see
/// [`Broker::session_fetches`]) looks whether the queue still moves: it waits as long as fetches
/// complete, and gives up once none has for [`SESSION_FETCH_TIMEOUT`] (the store is not
/// answering).
const SESSION_TURN_CHECK: Duration = Duration::from_secs(1);

/// A session that has been accepted (CONNACK 0 written to the buffer).
pub struct Handshake {
    pub state: SessionState,
    pub peer: Peer,
    /// The Session Expiry Interval in force (0: the session ends with the connection).
    pub session_expiry: u32,
    pub will: Option<Will>,
    /// The session's queue (with the connection's id).
    pub session_tx: Arc<SessionTx>,
    pub takeover_rx: oneshot::Receiver<crate::registry::Handover>,
    pub undelivered: Vec<Message>,
    pub next: Option<wharf_shared::Cursor>,
    pub connect_started_ms: i64,
    pub auth: SessionAuth,
    /// CONNACK and anything else to send first.
    pub write_buf: BytesMut,
}

/// `Ok(None)`: the connection was refused with a CONNACK code and is done.
pub async fn accept<R, W>(
    broker: &Arc<Broker>,
    peer: std::net::SocketAddr,
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
                // In the 3.1.1 format: a client of an unknown level reads that one (MQTT-3.1.2-2).
                tracing::info!(level, "unsupported protocol level");
                refuse(writer, Version::V3_1_1, Refusal::ProtocolVersion, None).await;
                metrics::counter!("wharf_edge_connections_refused_total", "reason" => "protocol_version").increment(1);
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
    if let Some(method) = &connect.auth_method {
        // No enhanced authentication method is served (MQTT 5.0 4.12): say so. Methods plug in
        // here, before the session starts.
        tracing::info!(method = %method, "unsupported authentication method");
        refuse_connect(writer, &connect, Refusal::BadAuthenticationMethod).await;
        return Ok(None);
    }
    let bridge = identity.is_some_and(|i| i.bridge);
    let client_id = match assign_client_id(&connect) {
        // `$bridge/...` names the sessions of the edge's own bridges.
        Some(id) if bridge || !id.starts_with(crate::bridge::config::SESSION_PREFIX) => id,
        _ => {
            refuse_connect(writer, &connect, Refusal::ClientIdentifier).await;
            return Ok(None);
        }
    };
    if let Some(identity) = identity.filter(|_| !bridge) {
        let required = broker.config.tls.as_ref().is_some_and(|t| t.cert_identity);
        if required && !identity.allows(&client_id) {
            tracing::warn!(client_id = %client_id, certificate = ?identity.names, "client id not in the client certificate");
            refuse_connect(writer, &connect, Refusal::NotAuthorized).await;
            return Ok(None);
        }
    }
    let credentials = crate::auth::Credentials {
        username: connect.username.as_deref(),
        password: connect.password.as_deref(),
        certificate: identity.map(|i| i.names.as_slice()),
    };
    let principal = if bridge {
        Some(crate::auth::Principal::bridge())
    } else {
        match broker.auth.authenticate(credentials).await {
            Ok(principal) => principal,
            Err(refusal) => {
                refuse_connect(writer, &connect, refusal).await;
                return Ok(None);
            }
        }
    };
    let auth = SessionAuth::new(broker.auth.policy(), principal);
    if let Some(will) = &connect.will {
        let allowed =
            auth.policy_now()
                .allows(&client_id, auth.principal(), Access::Write, &will.topic);
        if !allowed {
            tracing::info!(client_id = %client_id, topic = %will.topic, "will topic not authorized");
            metrics::counter!("wharf_edge_denied_total", "action" => "will").increment(1);
            refuse_connect(writer, &connect, Refusal::NotAuthorized).await;
            return Ok(None);
        }
    }
    start_session(broker, peer, connect, client_id, auth, writer).await
}

async fn read_connect<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Connect, SessionError> {
    loop {
        match crate::protocol::decode(buf, None, max)? {
            Some(Inbound::Connect(c)) => return Ok(*c),
            Some(_) => return Err(SessionError::Protocol("first packet is not CONNECT")),
            None => {}
        }
        buf.reserve(512);
        if reader.read_buf(buf).await? == 0 {
            return Err(SessionError::Protocol("closed before CONNECT"));
        }
    }
}

/// The client id to use, or `None` when it must be rejected. An empty one is assigned for
/// a 3.1.1 clean session and for any 5.0 session (whose CONNACK then names it); 3.1 has none.
fn assign_client_id(connect: &Connect) -> Option<Arc<str>> {
    // `$share/...` names the store's sessions of shared subscription groups.
    if connect.client_id.len() > MAX_CLIENT_ID_LEN || connect.client_id.starts_with("$share/") {
        return None;
    }
    if connect.client_id.is_empty() {
        let allowed = match connect.version {
            Version::V3_1 => false,
            Version::V3_1_1 => connect.clean_start,
            Version::V5 => true,
        };
        if !allowed {
            return None;
        }
        let (_, id) = ids::stamp();
        return Some(format!("wharf-{id}").into());
    }
    Some(connect.client_id.as_str().into())
}

/// [`refuse`] with the CONNECT's version and Maximum Packet Size.
async fn refuse_connect<W: AsyncWrite + Unpin>(
    writer: &mut W,
    connect: &Connect,
    refusal: Refusal,
) {
    refuse(writer, connect.version, refusal, connect.max_packet_size).await;
}

/// `max_packet`: the client's Maximum Packet Size (5.0), which the CONNACK must not exceed:
/// without its Reason String if that would.
async fn refuse<W: AsyncWrite + Unpin>(
    writer: &mut W,
    version: Version,
    refusal: Refusal,
    max_packet: Option<u32>,
) {
    let mut buf = BytesMut::new();
    // 5.0: a Reason String says why (MQTT 5.0 3.2.2.3.7).
    let why = match refusal {
        Refusal::ProtocolVersion => "this protocol level is not served",
        Refusal::ClientIdentifier => "client identifier not accepted",
        Refusal::ServerUnavailable => "the session store is unavailable",
        Refusal::BadUserNameOrPassword => "bad user name or password",
        Refusal::NotAuthorized => "not authorized",
        Refusal::BadAuthenticationMethod => "no enhanced authentication method is served",
        Refusal::ServerBusy => "too many connections waiting for a password check",
    };
    let mut props = ConnackProperties {
        reason_string: version.is_v5().then(|| why.to_owned()),
        ..ConnackProperties::default()
    };
    encode::connack(&mut buf, version, false, refusal.code(version), &props);
    if max_packet.is_some_and(|max| buf.len() > max as usize) {
        buf.clear();
        props.reason_string = None;
        encode::connack(&mut buf, version, false, refusal.code(version), &props);
    }
    let _ = writer.write_all(&buf).await;
    let _ = writer.shutdown().await;
}

async fn start_session<W: AsyncWrite + Unpin>(
    broker: &Arc<Broker>,
    peer: std::net::SocketAddr,
    connect: Connect,
    client_id: Arc<str>,
    auth: SessionAuth,
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
        Previous::Connected(old) => take_over(old, !connect.clean_start).await,
    };
    let limits = &broker.config.limits;
    let version = connect.version;
    let expiry = crate::protocol::rules::session_expiry(
        version,
        connect.clean_start,
        connect.session_expiry,
        limits.max_session_expiry,
    );
    let session_expiry = expiry.granted;
    let connect_started_ms = ids::now_ms();
    let mut undelivered = Vec::new();
    let mut next = None;
    let (state, present) = if connect.clean_start {
        let request = Request::Connect {
            client_id: client_id.to_string(),
            clean_start: true,
            session_expiry,
        };
        // Ordered before this session's own requests on the link; the session does not wait
        // for it: its claim's generation goes to the registry when the reply comes.
        match broker.link.request(request, Policy::Hold).await {
            Ok(rx) => {
                let (broker, client_id) = (broker.clone(), client_id.clone());
                tokio::spawn(async move {
                    if let Ok(Ok(Reply::Claimed { generation })) = rx.await {
                        broker
                            .registry
                            .confirm(&client_id, connection_id, generation);
                    }
                });
            }
            Err(e) => {
                // The link is closing: give the client id up rather than leave it claimed
                // by a connection that is gone.
                broker
                    .registry
                    .release(&client_id, connection_id, prior, u32::MAX);
                return Err(e.into());
            }
        }
        (SessionState::new(client_id.clone()), false)
    } else {
        match fetch_session(broker, &client_id, session_expiry).await {
            Ok(StoredSession {
                present,
                subscriptions,
                undelivered: messages,
                next: next_page,
                outbound_qos2: outbound,
                generation,
            }) => {
                broker
                    .registry
                    .confirm(&client_id, connection_id, generation);
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
                            let delivery = Delivery::new(
                                Arc::new(o.message),
                                wharf_shared::Qos::ExactlyOnce,
                                false,
                            );
                            state.restore(o.pkid, delivery, o.released);
                        }
                        state
                    }
                };
                let had_state = !state.subscriptions.is_empty() || state.inflight_len() > 0;
                for s in subscriptions {
                    let grant = Grant::of(&s);
                    state.subscriptions.insert(s.filter, grant);
                }
                (state, present || had_state)
            }
            Err(e) => {
                tracing::warn!(client_id = %client_id, error = %e, "stored session unavailable");
                broker
                    .registry
                    .release(&client_id, connection_id, prior, u32::MAX);
                refuse_connect(writer, &connect, Refusal::ServerUnavailable).await;
                return Ok(None);
            }
        }
    };
    let negotiated =
        crate::protocol::rules::keep_alive(version, connect.keep_alive, limits.server_keep_alive);
    let server_keep_alive = negotiated.told;
    let keep_alive = negotiated.close_after_ms.map(Duration::from_millis);
    let client = crate::router::ClientInfo {
        peer,
        version,
        connected_ms: crate::ids::now_ms(),
    };
    let session_tx = session_queue(broker, connection_id, keep_alive, client);
    broker.router.attach(client_id.clone(), session_tx.clone());
    for (filter, grant) in &state.subscriptions {
        broker.router.subscribe(&client_id, filter, *grant);
    }
    let mut write_buf = BytesMut::new();
    let props = ConnackProperties {
        session_expiry: expiry.told.then_some(session_expiry),
        receive_maximum: (limits.receive_maximum < u16::MAX).then_some(limits.receive_maximum),
        max_packet_size: Some(limits.max_packet_size.min(u32::MAX as usize) as u32),
        assigned_client_id: connect.client_id.is_empty().then(|| client_id.to_string()),
        topic_alias_max: (limits.topic_alias_max > 0).then_some(limits.topic_alias_max),
        server_keep_alive,
        ..ConnackProperties::default()
    };
    encode::connack(&mut write_buf, version, present, 0, &props);
    metrics::counter!("wharf_edge_connections_accepted_total", "protocol" => version.label())
        .increment(1);
    let peer = if version.is_v5() {
        Peer {
            version,
            receive_maximum: connect.receive_maximum,
            max_packet_size: connect.max_packet_size,
            topic_alias_max: connect.topic_alias_max.min(limits.topic_alias_max_out),
        }
    } else {
        Peer::v3(version)
    };
    Ok(Some(Box::new(Handshake {
        state,
        peer,
        session_expiry,
        will: connect.will,
        session_tx,
        takeover_rx,
        undelivered,
        next,
        connect_started_ms,
        auth,
        write_buf,
    })))
}

async fn take_over(old: crate::registry::TakeoverTx, keeps_session: bool) -> Option<SessionState> {
    let (reply, rx) = oneshot::channel();
    let handover = crate::registry::Handover {
        reply,
        keeps_session,
    };
    if old.send(handover).is_err() {
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

async fn fetch_session(
    broker: &Broker,
    client_id: &str,
    session_expiry: u32,
) -> Result<StoredSession, SessionError> {
    let request = Request::Connect {
        client_id: client_id.to_owned(),
        clean_start: false,
        session_expiry,
    };
    let waiting_since = crate::ids::monotonic_ms();
    let turn = broker.session_fetches.acquire();
    tokio::pin!(turn);
    let _turn = loop {
        tokio::select! {
            permit = &mut turn => {
                break permit.map_err(|_| SessionError::Link(crate::link::LinkError::Closed))?
            }
            _ = tokio::time::sleep(SESSION_TURN_CHECK) => {
                let moved = broker.session_fetch_done_ms.load(Ordering::Relaxed);
                let idle = crate::ids::monotonic_ms().saturating_sub(moved.max(waiting_since));
                if idle > SESSION_FETCH_TIMEOUT.as_millis() as u64 {
                    return Err(SessionError::Store("the session fetches stopped moving".into()));
                }
            }
        }
    };
    let rx = broker.link.request(request, Policy::FailFast).await?;
    let reply = tokio::time::timeout(SESSION_FETCH_TIMEOUT, rx)
        .await
        .map_err(|_| SessionError::Store("session fetch timed out".into()))?
        .map_err(|_| SessionError::Link(crate::link::LinkError::Closed))??;
    broker
        .session_fetch_done_ms
        .store(crate::ids::monotonic_ms(), Ordering::Relaxed);
    match reply {
        Reply::Session(session) => Ok(session),
        other => Err(SessionError::Store(format!("connect: {other:?}"))),
    }
}
