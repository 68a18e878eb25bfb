//! One connection of a bridge: the remote and the local session, and the pump between them
//! (see the module above for what is acknowledged when).

use super::{Bridge, Owner, Phase, ECHO_WINDOW, OWN_EVERY};
use crate::broker::Broker;
use crate::protocol::client::{self, ConnectOut, FilterOut, FromServer};
use crate::protocol::encode::{self, PublishOut};
use crate::protocol::{PublishIn, Version};
use bytes::BytesMut;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use wharf_shared::Qos;

/// How the pump ended.
pub enum Ended {
    Shutdown,
    NotOwner,
    Failed(String),
}

/// How long connecting (TCP, TLS, CONNACK) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The in-process stream's buffer, each way.
const LOCAL_BUFFER: usize = 256 * 1024;
/// Largest packet read from either side: a remote may send what Wharf does not take, which
/// is then counted and acknowledged rather than read forever.
const MAX_READ: usize = 64 * 1024 * 1024;
/// The local session's keepalive (it only matters if the edge imposes a Server Keep Alive).
const LOCAL_KEEP_ALIVE: u16 = 60;
/// Packet id of the SUBSCRIBE on either side.
const SUBSCRIBE_PKID: u16 = 1;

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn connect_remote(bridge: &Bridge) -> Result<Box<dyn Stream>, String> {
    let c = &bridge.config;
    let tcp = tokio::net::TcpStream::connect(&c.address)
        .await
        .map_err(|e| format!("cannot reach {}: {e}", c.address))?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = &c.tls else {
        return Ok(Box::new(tcp));
    };
    let config = crate::tls::client_config("tls", &tls.ca, tls.cert.as_ref(), tls.key.as_ref())
        .map_err(|e| e.to_string())?;
    let host = tls.server_name.clone().unwrap_or_else(|| {
        let host = c.address.rsplit_once(':').map_or(&*c.address, |(h, _)| h);
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned()
    });
    let name = rustls_pki_types::ServerName::try_from(host.clone())
        .map_err(|e| format!("{host} is not a server name: {e}"))?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {} failed: {e}", c.address))?;
    Ok(Box::new(stream))
}

type LocalRead = tokio::io::ReadHalf<tokio::io::DuplexStream>;
type LocalWrite = tokio::io::WriteHalf<tokio::io::DuplexStream>;

/// Attaches the bridge's local session (`$bridge/<name>`, persistent, never expiring) over an
/// in-process stream, with `receive_maximum` deliveries at once.
async fn open_local(
    broker: &Arc<Broker>,
    bridge: &Bridge,
    receive_maximum: u16,
    shutdown: &CancellationToken,
) -> Result<(LocalRead, LocalWrite, BytesMut), String> {
    let (local, served) = tokio::io::duplex(LOCAL_BUFFER);
    let identity = crate::tls::PeerIdentity {
        names: Vec::new(),
        bridge: true,
    };
    tokio::spawn(crate::connection::serve(
        broker.clone(),
        served,
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        Some(Box::new(identity)),
        shutdown.clone(),
        (),
    ));
    let (mut local_r, mut local_w) = tokio::io::split(local);
    let mut out = BytesMut::new();
    let session = bridge.session();
    client::connect(
        &mut out,
        &ConnectOut {
            version: Version::V5,
            client_id: &session,
            clean_start: false,
            keep_alive: LOCAL_KEEP_ALIVE,
            username: None,
            password: None,
            session_expiry: u32::MAX,
            receive_maximum,
            max_packet_size: None,
        },
    );
    let mut local_buf = BytesMut::with_capacity(16 * 1024);
    let local_ack = async {
        local_w.write_all(&out).await.map_err(|e| e.to_string())?;
        read_packet(&mut local_r, &mut local_buf, Version::V5).await
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, local_ack).await {
        Ok(Ok(FromServer::ConnAck(a))) if a.code == 0 => Ok((local_r, local_w, local_buf)),
        Ok(Ok(FromServer::ConnAck(a))) => {
            Err(format!("the local session was refused ({:#04x})", a.code))
        }
        Ok(Ok(other)) => Err(format!("expected a local CONNACK, got {other:?}")),
        Ok(Err(e)) => Err(format!("local session: {e}")),
        Err(_) => Err("the local session did not start in time".into()),
    }
}

/// Makes the local session and its subscriptions exist before the remote is reached, so that
/// what is published from the bridge's first start on is owed to it even while the remote
/// has never been reachable.
pub async fn register(
    broker: &Arc<Broker>,
    bridge: &Bridge,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    if bridge.config.out.is_empty() {
        return Ok(());
    }
    // Receive Maximum 1: what the session already owes waits in the store.
    let (mut r, mut w, mut buf) = open_local(broker, bridge, 1, shutdown).await?;
    let topics: Vec<String> = bridge.config.out.iter().map(|t| t.local_filter()).collect();
    let filters: Vec<FilterOut<'_>> = bridge
        .config
        .out
        .iter()
        .zip(&topics)
        .map(|(t, f)| FilterOut {
            filter: f,
            qos: t.qos,
            no_local: true,
        })
        .collect();
    let mut out = BytesMut::new();
    client::subscribe(&mut out, Version::V5, SUBSCRIBE_PKID, &filters);
    w.write_all(&out).await.map_err(|e| e.to_string())?;
    let subscribed = tokio::time::timeout(CONNECT_TIMEOUT, async {
        loop {
            match read_packet(&mut r, &mut buf, Version::V5).await? {
                FromServer::SubAck { codes, .. } => return Ok::<_, String>(codes),
                // A delivery the session owed: left unacknowledged, so it stays owed.
                _ => continue,
            }
        }
    })
    .await
    .map_err(|_| "the local session did not subscribe in time".to_string())??;
    if let Some(code) = subscribed
        .iter()
        .find(|&&c| crate::protocol::outcome::failed(c))
    {
        return Err(format!("the local subscription was refused ({code:#04x})"));
    }
    out.clear();
    client::disconnect(&mut out, Version::V5);
    let _ = w.write_all(&out).await;
    Ok(())
}

/// Reads until one whole packet has arrived.
async fn read_packet<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    version: Version,
) -> Result<FromServer, String> {
    loop {
        if let Some(p) = client::decode(buf, version, MAX_READ).map_err(|e| e.to_string())? {
            return Ok(p);
        }
        buf.reserve(4096);
        if reader.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("connection closed".into());
        }
    }
}

/// A CONNACK's refusal, in words.
fn refusal(version: Version, code: u8, reason: Option<&str>) -> String {
    let words = crate::protocol::outcome::connack_refusal(version, code);
    match reason {
        Some(r) => format!("remote refused the connection: {words} ({code:#04x}: {r})"),
        None => format!("remote refused the connection: {words} ({code:#04x})"),
    }
}

pub async fn connect_and_pump(
    broker: &Arc<Broker>,
    bridge: &Arc<Bridge>,
    owner: &Owner,
    shutdown: &CancellationToken,
) -> Ended {
    let c = &bridge.config;
    let max_packet = broker.config.limits.max_packet_size;
    // The remote first: its CONNACK says how much the local session may send at once.
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, async {
        let stream = connect_remote(bridge).await?;
        let (mut reader, mut writer) = tokio::io::split(stream);
        let mut out = BytesMut::new();
        client::connect(
            &mut out,
            &ConnectOut {
                version: c.version,
                client_id: &c.client_id,
                clean_start: false,
                keep_alive: c.keep_alive,
                username: c.username.as_deref(),
                password: c.password.as_deref().map(str::as_bytes),
                session_expiry: u32::MAX,
                receive_maximum: c.max_inflight,
                max_packet_size: Some(max_packet as u32),
            },
        );
        writer.write_all(&out).await.map_err(|e| e.to_string())?;
        let mut buf = BytesMut::with_capacity(4096);
        let ack = match read_packet(&mut reader, &mut buf, c.version).await? {
            FromServer::ConnAck(ack) => ack,
            other => return Err(format!("expected CONNACK from the remote, got {other:?}")),
        };
        if ack.code != 0 {
            return Err(refusal(c.version, ack.code, ack.reason_string.as_deref()));
        }
        Ok::<_, String>((reader, writer, buf, ack))
    })
    .await;
    let (remote_r, remote_w, remote_buf, ack) = match connected {
        Ok(Ok(parts)) => parts,
        Ok(Err(e)) => return Ended::Failed(e),
        Err(_) => return Ended::Failed(format!("no CONNACK from {} in time", c.address)),
    };
    tracing::info!(bridge = %c.name, remote = %c.address, session_present = ack.session_present, receive_maximum = ack.receive_maximum, "bridge connected to the remote");
    let receive_maximum = c.max_inflight.min(ack.receive_maximum);
    let (local_r, local_w, local_buf) =
        match open_local(broker, bridge, receive_maximum, shutdown).await {
            Ok(local) => local,
            Err(e) => return Ended::Failed(e),
        };
    bridge.connects.fetch_add(1, Ordering::Relaxed);
    bridge
        .connected_since_ms
        .store(crate::ids::now_ms(), Ordering::Relaxed);
    bridge.set_phase(Phase::Connected);
    let mut pump = Pump {
        bridge: bridge.clone(),
        remote_version: c.version,
        remote_max_qos: ack.maximum_qos.min(1),
        remote_max_packet: ack.max_packet_size.map_or(usize::MAX, |m| m as usize),
        local_max_packet: max_packet,
        out_flight: HashMap::new(),
        in_flight: HashMap::new(),
        next_remote: 0,
        next_local: 0,
        echoes: Echoes::default(),
        remote_out: BytesMut::new(),
        local_out: BytesMut::new(),
        subscribed: [c.out.is_empty(), c.inbound.is_empty()],
    };
    pump.subscribe();
    let keep_alive = ack.server_keep_alive.unwrap_or(c.keep_alive).max(1);
    let ended = pump
        .run(
            (remote_r, remote_w, remote_buf),
            (local_r, local_w, local_buf),
            Duration::from_secs(u64::from(keep_alive)),
            broker,
            owner,
            shutdown,
        )
        .await;
    ended
}

/// What was forwarded to a 3.1.1 remote, by topic and payload, to recognise its echo.
#[derive(Default)]
struct Echoes {
    counts: HashMap<u64, u32>,
    order: VecDeque<(tokio::time::Instant, u64)>,
}

impl Echoes {
    fn key(topic: &str, payload: &[u8]) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        topic.hash(&mut h);
        payload.hash(&mut h);
        h.finish()
    }

    fn expire(&mut self) {
        let now = tokio::time::Instant::now();
        while let Some(&(at, key)) = self.order.front() {
            if now.duration_since(at) < ECHO_WINDOW && self.order.len() <= 1_000_000 {
                break;
            }
            self.order.pop_front();
            if let Some(n) = self.counts.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    self.counts.remove(&key);
                }
            }
        }
    }

    fn sent(&mut self, topic: &str, payload: &[u8]) {
        self.expire();
        let key = Self::key(topic, payload);
        *self.counts.entry(key).or_default() += 1;
        self.order.push_back((tokio::time::Instant::now(), key));
    }

    /// Whether a message from the remote is one copy of something forwarded to it.
    fn take(&mut self, topic: &str, payload: &[u8]) -> bool {
        self.expire();
        let key = Self::key(topic, payload);
        let Some(n) = self.counts.get_mut(&key) else {
            return false;
        };
        *n -= 1;
        if *n == 0 {
            self.counts.remove(&key);
        }
        // Its place in `order` goes when it expires (the count is what is checked).
        if let Some(pos) = self.order.iter().position(|&(_, k)| k == key) {
            self.order.remove(pos);
        }
        true
    }
}

struct Pump {
    bridge: Arc<Bridge>,
    remote_version: Version,
    remote_max_qos: u8,
    remote_max_packet: usize,
    local_max_packet: usize,
    /// Remote packet id -> (local packet id, when sent, Unix ms) of forwarded QoS 1 messages.
    out_flight: HashMap<u16, (u16, i64)>,
    /// Local packet id -> remote packet id of messages taken in.
    in_flight: HashMap<u16, u16>,
    next_remote: u16,
    next_local: u16,
    echoes: Echoes,
    remote_out: BytesMut,
    local_out: BytesMut,
    /// SUBACK received: [local, remote].
    subscribed: [bool; 2],
}

/// A server's DISCONNECT, in words.
fn disconnected(what: &str, reason: u8, reason_string: Option<String>) -> String {
    match reason_string {
        Some(r) => format!("{what} ({reason:#04x}: {r})"),
        None => format!("{what} ({reason:#04x})"),
    }
}

fn next_id<V>(next: &mut u16, used: &HashMap<u16, V>) -> u16 {
    loop {
        *next = next.wrapping_add(1);
        if *next != 0 && !used.contains_key(next) {
            return *next;
        }
    }
}

impl Pump {
    fn subscribe(&mut self) {
        let c = &self.bridge.config;
        if !c.out.is_empty() {
            let filters: Vec<String> = c.out.iter().map(|t| t.local_filter()).collect();
            let out: Vec<FilterOut<'_>> = c
                .out
                .iter()
                .zip(&filters)
                .map(|(t, f)| FilterOut {
                    filter: f,
                    qos: t.qos,
                    no_local: true,
                })
                .collect();
            client::subscribe(&mut self.local_out, Version::V5, SUBSCRIBE_PKID, &out);
        }
        if !c.inbound.is_empty() {
            let filters: Vec<String> = c.inbound.iter().map(|t| t.remote_filter()).collect();
            let inbound: Vec<FilterOut<'_>> = c
                .inbound
                .iter()
                .zip(&filters)
                .map(|(t, f)| FilterOut {
                    filter: f,
                    qos: t.qos,
                    no_local: true,
                })
                .collect();
            client::subscribe(
                &mut self.remote_out,
                self.remote_version,
                SUBSCRIBE_PKID,
                &inbound,
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run<RR, RW, LR, LW>(
        &mut self,
        remote: (RR, RW, BytesMut),
        local: (LR, LW, BytesMut),
        keep_alive: Duration,
        broker: &Broker,
        owner: &Owner,
        shutdown: &CancellationToken,
    ) -> Ended
    where
        RR: AsyncRead + Unpin,
        RW: AsyncWrite + Unpin,
        LR: AsyncRead + Unpin,
        LW: AsyncWrite + Unpin,
    {
        let (mut rr, mut rw, mut rbuf) = remote;
        let (mut lr, mut lw, mut lbuf) = local;
        let mut own = tokio::time::interval(OWN_EVERY);
        own.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ping = tokio::time::interval(keep_alive / 2);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        let mut local_ping =
            tokio::time::interval(Duration::from_secs(u64::from(LOCAL_KEEP_ALIVE) / 2));
        local_ping.tick().await;
        // PINGREQs the remote has not answered.
        let mut unanswered = 0u32;
        let result: Result<(), String> = loop {
            if let Err(e) = self.flush(&mut rw, &mut lw).await {
                break Err(e);
            }
            rbuf.reserve(16 * 1024);
            lbuf.reserve(16 * 1024);
            let step = tokio::select! {
                n = rr.read_buf(&mut rbuf) => match n {
                    Ok(0) => Err("the remote closed the connection".to_string()),
                    Ok(_) => {
                        unanswered = 0;
                        self.on_remote(&mut rbuf)
                    }
                    Err(e) => Err(format!("remote: {e}")),
                },
                n = lr.read_buf(&mut lbuf) => match n {
                    Ok(0) => Err("the local session ended".to_string()),
                    Ok(_) => self.on_local(&mut lbuf),
                    Err(e) => Err(format!("local session: {e}")),
                },
                _ = ping.tick() => {
                    if unanswered >= 2 {
                        Err("the remote did not answer PINGREQ".to_string())
                    } else {
                        unanswered += 1;
                        client::pingreq(&mut self.remote_out);
                        Ok(())
                    }
                }
                _ = local_ping.tick() => {
                    client::pingreq(&mut self.local_out);
                    Ok(())
                }
                _ = own.tick() => {
                    self.report();
                    match owner.renew(broker).await {
                        Ok(true) => Ok(()),
                        Ok(false) => {
                            self.disconnect(&mut rw, &mut lw).await;
                            return Ended::NotOwner;
                        }
                        Err(e) if owner.holds() => {
                            tracing::debug!(bridge = %self.bridge.config.name, error = %e, "bridge ownership not renewed; asking again");
                            Ok(())
                        }
                        Err(e) => {
                            self.disconnect(&mut rw, &mut lw).await;
                            return Ended::Failed(format!("ownership not renewed: {e}"));
                        }
                    }
                }
                _ = shutdown.cancelled() => {
                    self.disconnect(&mut rw, &mut lw).await;
                    return Ended::Shutdown;
                }
            };
            if let Err(e) = step {
                break Err(e);
            }
        };
        match result {
            Ok(()) => Ended::Shutdown,
            Err(e) => Ended::Failed(e),
        }
    }

    async fn flush<RW, LW>(&mut self, rw: &mut RW, lw: &mut LW) -> Result<(), String>
    where
        RW: AsyncWrite + Unpin,
        LW: AsyncWrite + Unpin,
    {
        if !self.remote_out.is_empty() {
            rw.write_all(&self.remote_out)
                .await
                .map_err(|e| format!("remote: {e}"))?;
            self.remote_out.clear();
        }
        if !self.local_out.is_empty() {
            lw.write_all(&self.local_out)
                .await
                .map_err(|e| format!("local session: {e}"))?;
            self.local_out.clear();
        }
        Ok(())
    }

    /// A clean DISCONNECT on both sides; what is in flight stays owed on each.
    async fn disconnect<RW, LW>(&mut self, rw: &mut RW, lw: &mut LW)
    where
        RW: AsyncWrite + Unpin,
        LW: AsyncWrite + Unpin,
    {
        self.remote_out.clear();
        self.local_out.clear();
        client::disconnect(&mut self.remote_out, self.remote_version);
        client::disconnect(&mut self.local_out, Version::V5);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.flush(rw, lw)).await;
    }

    fn report(&self) {
        let b = &self.bridge;
        b.out_in_flight
            .store(self.out_flight.len() as u64, Ordering::Relaxed);
        b.in_in_flight
            .store(self.in_flight.len() as u64, Ordering::Relaxed);
        let oldest = self
            .out_flight
            .values()
            .map(|&(_, at)| at)
            .min()
            .unwrap_or(0);
        b.oldest_in_flight_ms.store(oldest, Ordering::Relaxed);
    }

    fn on_remote(&mut self, buf: &mut BytesMut) -> Result<(), String> {
        while let Some(packet) = client::decode(buf, self.remote_version, MAX_READ)
            .map_err(|e| format!("remote: {e}"))?
        {
            match packet {
                FromServer::PubAck(ack) => self.forwarded(ack.pkid, ack.reason)?,
                FromServer::Publish(p) => self.take_in(p)?,
                FromServer::SubAck { pkid, codes } => {
                    self.suback("remote", pkid, &codes, |t| t.remote_filter())?
                }
                FromServer::PingResp => {}
                FromServer::Disconnect {
                    reason,
                    reason_string,
                } => {
                    return Err(disconnected(
                        "the remote disconnected",
                        reason,
                        reason_string,
                    ))
                }
                FromServer::ConnAck(_) => return Err("a second CONNACK from the remote".into()),
            }
        }
        Ok(())
    }

    fn on_local(&mut self, buf: &mut BytesMut) -> Result<(), String> {
        while let Some(packet) =
            client::decode(buf, Version::V5, MAX_READ).map_err(|e| format!("local session: {e}"))?
        {
            match packet {
                FromServer::Publish(p) => self.send_out(p)?,
                FromServer::PubAck(ack) => self.stored(ack.pkid, ack.reason)?,
                FromServer::SubAck { pkid, codes } => {
                    self.suback("local", pkid, &codes, |t| t.local_filter())?
                }
                FromServer::PingResp => {}
                FromServer::Disconnect {
                    reason,
                    reason_string,
                } => {
                    return Err(disconnected(
                        "the local session was ended",
                        reason,
                        reason_string,
                    ))
                }
                FromServer::ConnAck(_) => return Err("a second local CONNACK".into()),
            }
        }
        Ok(())
    }

    fn suback(
        &mut self,
        side: &str,
        pkid: u16,
        codes: &[u8],
        filter: impl Fn(&super::config::Topic) -> String,
    ) -> Result<(), String> {
        let c = &self.bridge.config;
        let topics = if side == "local" { &c.out } else { &c.inbound };
        if pkid != SUBSCRIBE_PKID || codes.len() != topics.len() {
            return Err(format!("{side} SUBACK does not answer the SUBSCRIBE"));
        }
        for (code, t) in codes.iter().zip(topics) {
            if crate::protocol::outcome::failed(*code) {
                return Err(format!(
                    "{side} broker refused the subscription to {} ({code:#04x})",
                    filter(t)
                ));
            }
        }
        self.subscribed[usize::from(side != "local")] = true;
        Ok(())
    }

    /// A local message: to the remote, acknowledged here once the remote has it.
    fn send_out(&mut self, p: PublishIn) -> Result<(), String> {
        let b = self.bridge.clone();
        let Some((pattern, topic)) = b
            .config
            .out
            .iter()
            .find_map(|t| t.to_remote(&p.topic).map(|topic| (t, topic)))
        else {
            // Matched by no pattern (cannot happen with the bridge's own subscriptions).
            self.drop_local(&p, "matches no out pattern");
            return Ok(());
        };
        let qos = p.qos.min(pattern.qos).min(if self.remote_max_qos == 0 {
            Qos::AtMostOnce
        } else {
            Qos::AtLeastOnce
        });
        let expiry = p.properties.as_ref().and_then(|x| x.message_expiry_secs);
        let mut out = PublishOut {
            topic: &topic,
            payload: &p.payload,
            qos,
            pkid: 0,
            retain: p.retain,
            dup: false,
            properties: p.properties.as_deref(),
            message_expiry: expiry,
            topic_alias: None,
            subscription_ids: &[],
        };
        if encode::publish_len(self.remote_version, &out) > self.remote_max_packet {
            self.drop_local(&p, "larger than the remote's Maximum Packet Size");
            return Ok(());
        }
        if qos == Qos::AtLeastOnce {
            out.pkid = next_id(&mut self.next_remote, &self.out_flight);
            self.out_flight
                .insert(out.pkid, (p.pkid, crate::ids::now_ms()));
        }
        encode::publish(&mut self.remote_out, self.remote_version, &out);
        if self.remote_version != Version::V5 && !b.config.inbound.is_empty() {
            self.echoes.sent(&topic, &p.payload);
        }
        if qos == Qos::AtMostOnce {
            if p.qos != Qos::AtMostOnce {
                encode::puback(&mut self.local_out, Version::V5, p.pkid, 0);
            }
            b.forwarded.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("wharf_bridge_forwarded_total", "bridge" => b.config.name.clone())
                .increment(1);
        }
        Ok(())
    }

    /// A local message that can never cross: acknowledged so that it does not block the
    /// session, and counted.
    fn drop_local(&mut self, p: &PublishIn, why: &str) {
        tracing::warn!(bridge = %self.bridge.config.name, topic = %p.topic, bytes = p.payload.len(), why, "message not forwarded");
        if p.qos != Qos::AtMostOnce {
            encode::puback(&mut self.local_out, Version::V5, p.pkid, 0);
        }
        self.count_dropped();
    }

    fn count_dropped(&self) {
        let b = &self.bridge;
        b.dropped.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("wharf_bridge_dropped_total", "bridge" => b.config.name.clone())
            .increment(1);
    }

    /// The remote's PUBACK: the local session's copy is acknowledged.
    fn forwarded(&mut self, pkid: u16, reason: u8) -> Result<(), String> {
        let Some((local, _)) = self.out_flight.remove(&pkid) else {
            return Ok(());
        };
        if crate::protocol::outcome::failed(reason) {
            // Kept owed: the connection ends and the message is sent again.
            return Err(format!(
                "the remote refused a forwarded message ({reason:#04x}); it stays owed"
            ));
        }
        encode::puback(&mut self.local_out, Version::V5, local, 0);
        let b = &self.bridge;
        b.forwarded.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("wharf_bridge_forwarded_total", "bridge" => b.config.name.clone())
            .increment(1);
        Ok(())
    }

    /// A remote message: published here, acknowledged to the remote once stored.
    fn take_in(&mut self, p: PublishIn) -> Result<(), String> {
        let b = self.bridge.clone();
        if p.topic_alias.is_some() {
            return Err("the remote used a topic alias it was not given".into());
        }
        if p.qos == Qos::ExactlyOnce {
            return Err("the remote sent QoS 2 to a QoS 1 subscription".into());
        }
        let (version, qos_in, pkid) = (self.remote_version, p.qos, p.pkid);
        let ack_remote = |out: &mut BytesMut| {
            if qos_in == Qos::AtLeastOnce {
                encode::puback(out, version, pkid, 0);
            }
        };
        if self.remote_version != Version::V5 && self.echoes.take(&p.topic, &p.payload) {
            ack_remote(&mut self.remote_out);
            b.echoes.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let Some((pattern, topic)) = b
            .config
            .inbound
            .iter()
            .find_map(|t| t.to_local(&p.topic).map(|topic| (t, topic)))
        else {
            tracing::warn!(bridge = %b.config.name, topic = %p.topic, "remote message matches no in pattern; not taken");
            ack_remote(&mut self.remote_out);
            self.count_dropped();
            return Ok(());
        };
        let qos = p.qos.min(pattern.qos);
        let mut out = PublishOut {
            topic: &topic,
            payload: &p.payload,
            qos,
            pkid: 0,
            retain: p.retain,
            dup: false,
            properties: p.properties.as_deref(),
            message_expiry: p.properties.as_ref().and_then(|x| x.message_expiry_secs),
            topic_alias: None,
            subscription_ids: &[],
        };
        if encode::publish_len(Version::V5, &out) > self.local_max_packet {
            tracing::warn!(bridge = %b.config.name, topic = %p.topic, bytes = p.payload.len(), "remote message larger than maxPacketSize; not taken");
            ack_remote(&mut self.remote_out);
            self.count_dropped();
            return Ok(());
        }
        if qos == Qos::AtLeastOnce {
            out.pkid = next_id(&mut self.next_local, &self.in_flight);
            self.in_flight.insert(out.pkid, p.pkid);
        }
        encode::publish(&mut self.local_out, Version::V5, &out);
        if qos == Qos::AtMostOnce {
            ack_remote(&mut self.remote_out);
            b.received.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// This edge's PUBACK for a message taken in: now the remote's.
    fn stored(&mut self, pkid: u16, reason: u8) -> Result<(), String> {
        let Some(remote) = self.in_flight.remove(&pkid) else {
            return Ok(());
        };
        if crate::protocol::outcome::failed(reason) {
            return Err(format!(
                "this broker did not take a message from the remote ({reason:#04x}); the remote keeps it"
            ));
        }
        encode::puback(&mut self.remote_out, self.remote_version, remote, 0);
        let b = &self.bridge;
        b.received.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("wharf_bridge_received_total", "bridge" => b.config.name.clone())
            .increment(1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_echo_is_taken_per_forward() {
        let mut e = Echoes::default();
        e.sent("a", b"1");
        e.sent("a", b"1");
        assert!(e.take("a", b"1"));
        assert!(e.take("a", b"1"));
        assert!(!e.take("a", b"1"));
        assert!(!e.take("a", b"2"));
    }

    #[test]
    fn packet_ids_skip_those_in_flight_and_zero() {
        let mut used = HashMap::new();
        let mut next = u16::MAX - 1;
        used.insert(u16::MAX, ());
        used.insert(1, ());
        assert_eq!(next_id(&mut next, &used), 2);
    }
}
