//! Many publishers and lagging subscribers over real sockets, checked by message identity.
//!
//! A [`Publisher`] sends `"<client id>:<seq>"` payloads flat out with a window of unacknowledged
//! messages and reports which sequence numbers the broker acknowledged; a [`Subscriber`] reads
//! (slowly, if asked), acknowledges, and keeps every payload in arrival order. [`check`] then
//! says, per publisher, whether every acknowledged message arrived, in order, and how often
//! one came twice.

use crate::PATIENCE;
use bytes::BytesMut;
use rumqttc::mqttbytes::{self, v4::Packet};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The payload that identifies message `seq` of publisher `client_id`.
pub fn payload(client_id: &str, seq: u32) -> String {
    format!("{client_id}:{seq}")
}

fn parse(payload: &[u8]) -> Option<(String, u32)> {
    let text = std::str::from_utf8(payload).ok()?;
    let (client, seq) = text.rsplit_once(':')?;
    Some((client.to_owned(), seq.parse().ok()?))
}

/// Connects and reads the CONNACK; returns the stream and whatever came after the CONNACK
/// (a resumed session's messages follow it at once).
async fn connect(
    addr: SocketAddr,
    client_id: &str,
    clean: bool,
) -> std::io::Result<(TcpStream, BytesMut)> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut raw = crate::raw::Raw::from_stream(stream);
    raw.send(&crate::raw::connect_bytes(client_id, clean, 30))
        .await;
    // Longer than the broker's session fetch (10 s), so that its answer is seen.
    match raw.recv_within(PATIENCE * 3).await {
        Some(Packet::ConnAck(a)) if a.code == mqttbytes::v4::ConnectReturnCode::Success => {
            Ok(raw.into_parts())
        }
        Some(other) => Err(std::io::Error::other(format!(
            "{client_id}: expected CONNACK, got {other:?}"
        ))),
        None => Err(std::io::Error::other(format!(
            "{client_id}: closed before CONNACK"
        ))),
    }
}

/// A publisher sending flat out with a window of unacknowledged messages.
pub struct Publisher {
    pub client_id: String,
    pub topic: String,
    pub qos: u8,
    pub window: usize,
}

impl Publisher {
    pub fn new(client_id: impl Into<String>, topic: impl Into<String>, qos: u8) -> Publisher {
        Publisher {
            client_id: client_id.into(),
            topic: topic.into(),
            qos,
            window: 100,
        }
    }

    /// Sends messages `from..to` and returns the sequence numbers acknowledged (PUBACK for
    /// QoS 1, PUBREC for QoS 2, after which the PUBREL/PUBCOMP exchange completes), stopping
    /// early if the connection ends.
    pub async fn run(&self, addr: SocketAddr, from: u32, to: u32) -> Vec<u32> {
        assert!(self.qos > 0 && self.window > 0 && self.window < 60_000);
        let Ok((mut stream, mut buf)) = connect(addr, &self.client_id, true).await else {
            return Vec::new();
        };
        let mut acked = Vec::with_capacity((to - from) as usize);
        let mut pending: HashMap<u16, u32> = HashMap::new();
        let mut releasing = 0usize;
        let mut next = from;
        let mut pkid: u16 = 0;
        let mut out = Vec::new();
        while next < to || !pending.is_empty() || releasing > 0 {
            out.clear();
            while next < to && pending.len() + releasing < self.window {
                pkid = pkid % 60_000 + 1;
                out.extend(crate::raw::publish_bytes(
                    &self.topic,
                    self.qos,
                    pkid,
                    false,
                    payload(&self.client_id, next).as_bytes(),
                ));
                pending.insert(pkid, next);
                next += 1;
            }
            if !out.is_empty() && stream.write_all(&out).await.is_err() {
                break;
            }
            let read = tokio::time::timeout(PATIENCE * 3, stream.read_buf(&mut buf)).await;
            if !matches!(read, Ok(Ok(n)) if n > 0) {
                break;
            }
            out.clear();
            loop {
                match Packet::read(&mut buf, 1 << 20) {
                    Ok(Packet::PubAck(a)) => acked.extend(pending.remove(&a.pkid)),
                    Ok(Packet::PubRec(r)) => {
                        if let Some(seq) = pending.remove(&r.pkid) {
                            acked.push(seq);
                            releasing += 1;
                        }
                        out.extend([0x62, 2, (r.pkid >> 8) as u8, r.pkid as u8]);
                    }
                    Ok(Packet::PubComp(_)) => releasing = releasing.saturating_sub(1),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            if !out.is_empty() && stream.write_all(&out).await.is_err() {
                break;
            }
        }
        if pending.is_empty() && releasing == 0 {
            let _ = stream.write_all(&[0xe0, 0]).await;
        }
        acked.sort_unstable();
        acked
    }
}

/// How a subscriber reads: after every `every` messages it pauses for `pause`.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    pub every: usize,
    pub pause: Duration,
}

impl Pace {
    pub const FULL_SPEED: Pace = Pace {
        every: usize::MAX,
        pause: Duration::ZERO,
    };
}

/// A subscriber reading in a task of its own; every payload it got, in arrival order, is in
/// `received` (shared, so that a test can watch the count grow).
pub struct Subscriber {
    pub client_id: String,
    pub received: Arc<Mutex<Vec<(String, u32)>>>,
    /// QoS 2 packet ids received and not yet released (PUBREL): the client's part of the
    /// session, kept across reconnects as MQTT asks, so that a re-sent PUBLISH (DUP) of one is
    /// not taken as a new message.
    unreleased: Arc<Mutex<std::collections::HashSet<u16>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Subscriber {
    /// Connects, subscribes to `filter` at `qos` and starts reading at `pace`.
    pub async fn start(
        addr: SocketAddr,
        client_id: &str,
        clean: bool,
        filter: &str,
        qos: u8,
        pace: Pace,
    ) -> Subscriber {
        let mut sub = Subscriber {
            client_id: client_id.to_owned(),
            received: Arc::default(),
            unreleased: Arc::default(),
            task: None,
        };
        sub.connect(addr, clean, Some((filter, qos)), pace).await;
        sub
    }

    /// (Re)connects with the same client id; subscribes if `subscribe` is given.
    pub async fn connect(
        &mut self,
        addr: SocketAddr,
        clean: bool,
        subscribe: Option<(&str, u8)>,
        pace: Pace,
    ) {
        self.drop_connection();
        self.attach(addr, clean, subscribe, pace).await;
    }

    /// Connects again with the same client id while the current connection is still open:
    /// the broker must close the old one and hand the session to the new one.
    pub async fn take_over(&mut self, addr: SocketAddr, pace: Pace) {
        let old = self.task.take();
        self.attach(addr, false, None, pace).await;
        if let Some(old) = old {
            old.abort();
        }
    }

    async fn attach(
        &mut self,
        addr: SocketAddr,
        clean: bool,
        subscribe: Option<(&str, u8)>,
        pace: Pace,
    ) {
        if clean {
            self.unreleased
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        }
        // As a device would: a broker that says "server unavailable" (its store is too busy to
        // answer in time) is asked again a little later.
        let mut attempts = 0;
        let (mut stream, buf) = loop {
            match connect(addr, &self.client_id, clean).await {
                Ok(connected) => break connected,
                Err(e) if attempts < 10 && e.to_string().contains("ServiceUnavailable") => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("{} could not connect: {e}", self.client_id),
            }
        };
        if let Some((filter, qos)) = subscribe {
            // The reader takes the SUBACK with whatever comes before it.
            stream
                .write_all(&crate::raw::subscribe_bytes(1, &[(filter, qos)]))
                .await
                .expect("send SUBSCRIBE");
        }
        let received = self.received.clone();
        let subacked = Arc::new(tokio::sync::Notify::new());
        self.task = Some(tokio::spawn(read_loop(
            stream,
            buf,
            Inbox {
                received,
                unreleased: self.unreleased.clone(),
            },
            pace,
            subacked.clone(),
        )));
        if subscribe.is_some() {
            let acked = tokio::time::timeout(PATIENCE * 3, subacked.notified()).await;
            assert!(acked.is_ok(), "{}: no SUBACK", self.client_id);
        }
    }

    /// Drops the connection without DISCONNECT (the session stays if it is persistent).
    pub fn drop_connection(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    pub fn count(&self) -> usize {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    pub fn snapshot(&self) -> Vec<(String, u32)> {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until `done` holds for what arrived, or until nothing new arrived for `quiet`.
    pub async fn wait_for(&self, quiet: Duration, done: impl Fn(&[(String, u32)]) -> bool) {
        let mut last = usize::MAX;
        let mut still_since = tokio::time::Instant::now();
        loop {
            let snapshot = self.snapshot();
            if done(&snapshot) {
                return;
            }
            if snapshot.len() != last {
                last = snapshot.len();
                still_since = tokio::time::Instant::now();
            } else if still_since.elapsed() >= quiet {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.drop_connection();
    }
}

/// Where a subscriber's reader puts what it receives.
struct Inbox {
    received: Arc<Mutex<Vec<(String, u32)>>>,
    unreleased: Arc<Mutex<std::collections::HashSet<u16>>>,
}

impl Inbox {
    fn take(&self, payload: &[u8]) {
        if let Some(id) = parse(payload) {
            self.received
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(id);
        }
    }

    /// A QoS 2 PUBLISH is a new message unless its packet id is still unreleased.
    fn first_qos2(&self, pkid: u16) -> bool {
        self.unreleased
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pkid)
    }

    fn released(&self, pkid: u16) {
        self.unreleased
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pkid);
    }
}

async fn read_loop(
    mut stream: TcpStream,
    mut buf: BytesMut,
    inbox: Inbox,
    pace: Pace,
    subacked: Arc<tokio::sync::Notify>,
) {
    let mut since_pause = 0usize;
    let mut out = Vec::new();
    loop {
        out.clear();
        loop {
            match Packet::read(&mut buf, 1 << 20) {
                Ok(Packet::Publish(p)) => {
                    if p.qos != mqttbytes::QoS::ExactlyOnce || inbox.first_qos2(p.pkid) {
                        inbox.take(&p.payload);
                    }
                    match p.qos {
                        mqttbytes::QoS::AtLeastOnce => {
                            out.extend([0x40, 2, (p.pkid >> 8) as u8, p.pkid as u8])
                        }
                        mqttbytes::QoS::ExactlyOnce => {
                            out.extend([0x50, 2, (p.pkid >> 8) as u8, p.pkid as u8])
                        }
                        mqttbytes::QoS::AtMostOnce => {}
                    }
                    since_pause += 1;
                }
                Ok(Packet::PubRel(r)) => {
                    inbox.released(r.pkid);
                    out.extend([0x70, 2, (r.pkid >> 8) as u8, r.pkid as u8]);
                }
                Ok(Packet::SubAck(_)) => subacked.notify_one(),
                Ok(_) => {}
                Err(mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(_) => return,
            }
        }
        if !out.is_empty() && stream.write_all(&out).await.is_err() {
            return;
        }
        if since_pause >= pace.every {
            since_pause = 0;
            tokio::time::sleep(pace.pause).await;
        }
        match stream.read_buf(&mut buf).await {
            Ok(n) if n > 0 => {}
            _ => return,
        }
    }
}

/// What one subscriber got of one publisher's acknowledged messages.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub missing: Vec<u32>,
    /// Sequence numbers whose first arrival came after a later one's.
    pub out_of_order: usize,
    /// The first of those: (its position in the arrivals, it, the highest before it).
    pub first_disorder: Option<(usize, u32, u32)>,
    pub duplicates: usize,
}

/// Compares what arrived (in arrival order) with what each publisher had acknowledged.
pub fn check(
    arrived: &[(String, u32)],
    acked: &HashMap<String, Vec<u32>>,
) -> HashMap<String, Verdict> {
    let mut seen: HashMap<&str, (std::collections::HashSet<u32>, u32, Verdict)> = HashMap::new();
    for (position, (client, seq)) in arrived.iter().enumerate() {
        let (set, highest, verdict) = seen.entry(client.as_str()).or_default();
        if !set.insert(*seq) {
            verdict.duplicates += 1;
            continue;
        }
        if *seq < *highest {
            verdict.out_of_order += 1;
            verdict
                .first_disorder
                .get_or_insert((position, *seq, *highest));
        }
        *highest = (*highest).max(*seq);
    }
    acked
        .iter()
        .map(|(client, seqs)| {
            let (set, _, verdict) = seen.remove(client.as_str()).unwrap_or_default();
            let missing = seqs.iter().copied().filter(|s| !set.contains(s)).collect();
            (client.clone(), Verdict { missing, ..verdict })
        })
        .collect()
}

/// A failure message for verdicts that are not clean, or `None`. `duplicates_allowed` says of
/// a publisher whether its messages may come twice (QoS 1, after a reconnect).
pub fn complaints(
    who: &str,
    verdicts: &HashMap<String, Verdict>,
    duplicates_allowed: impl Fn(&str) -> bool,
) -> Option<String> {
    let mut out = Vec::new();
    let mut names: Vec<&String> = verdicts.keys().collect();
    names.sort();
    for name in names {
        let v = &verdicts[name];
        if !v.missing.is_empty() {
            let first: Vec<u32> = v.missing.iter().take(10).copied().collect();
            out.push(format!(
                "{who}: {} of {name}'s acknowledged messages missing (first {first:?})",
                v.missing.len()
            ));
        }
        if v.out_of_order > 0 {
            out.push(format!(
                "{who}: {} of {name}'s out of order (first: arrival, message, highest before: {:?})",
                v.out_of_order, v.first_disorder
            ));
        }
        if v.duplicates > 0 && !duplicates_allowed(name) {
            out.push(format!("{who}: {} of {name}'s twice", v.duplicates));
        }
    }
    (!out.is_empty()).then(|| out.join("\n"))
}
