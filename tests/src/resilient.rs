//! Clients that behave as MQTT 3.1.1 requires across broker crashes: persistent sessions that
//! reconnect, re-send what was not acknowledged (PUBLISH with DUP, or PUBREL) with the same
//! packet ids, and a subscriber that completes the QoS 2 handshake and never counts a message
//! twice. Byte level, so nothing is hidden by a client library.

use crate::raw;
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::Packet;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const STEP: Duration = Duration::from_secs(2);

struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    /// Connects with a persistent session, retrying until the broker answers.
    async fn open(addr: SocketAddr, id: &str, deadline: tokio::time::Instant) -> Option<Conn> {
        while tokio::time::Instant::now() < deadline {
            if let Ok(Ok(stream)) = tokio::time::timeout(STEP, TcpStream::connect(addr)).await {
                let mut conn = Conn {
                    stream,
                    buf: BytesMut::new(),
                };
                if conn.send(&raw::connect_bytes(id, false, 30)).await {
                    if let Some(Packet::ConnAck(a)) = conn.recv().await {
                        if a.code == rumqttc::mqttbytes::v4::ConnectReturnCode::Success {
                            return Some(conn);
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    async fn send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }

    async fn recv(&mut self) -> Option<Packet> {
        tokio::time::timeout(STEP, async {
            loop {
                match Packet::read(&mut self.buf, 1 << 20) {
                    Ok(p) => return Some(p),
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(_) => return None,
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .ok()
        .flatten()
    }
}

fn ack(kind: u8, pkid: u16) -> [u8; 4] {
    [kind, 2, (pkid >> 8) as u8, pkid as u8]
}

/// Publishes `payloads` in order at `qos` (1 or 2); each is retried across broker failures
/// until acknowledged (PUBACK, or PUBCOMP). Returns how many reconnects it took.
pub async fn publish_all(
    addrs: &[SocketAddr],
    id: &str,
    topic: &str,
    qos: u8,
    payloads: Vec<String>,
    deadline: tokio::time::Instant,
) -> Result<usize, String> {
    let mut reconnects = 0;
    let mut conn: Option<Conn> = None;
    for (i, payload) in payloads.iter().enumerate() {
        let pkid = (i % 65_000) as u16 + 1;
        let mut released = false; // QoS 2: PUBREC seen, PUBREL is what to re-send
        let mut first = true;
        loop {
            if tokio::time::Instant::now() > deadline {
                return Err(format!("{id}: gave up at message {i}"));
            }
            if conn.is_none() {
                let addr = addrs[reconnects % addrs.len()];
                conn = Conn::open(addr, id, deadline).await;
                reconnects += 1;
                continue;
            }
            let c = conn.as_mut().expect("connected");
            let ok = if released {
                c.send(&ack(0x62, pkid)).await
            } else {
                c.send(&raw::publish_bytes(
                    topic,
                    qos,
                    pkid,
                    !first,
                    payload.as_bytes(),
                ))
                .await
            };
            first = false;
            let mut done = false;
            if ok {
                while let Some(p) = c.recv().await {
                    match p {
                        Packet::PubAck(a) if qos == 1 && a.pkid == pkid => {
                            done = true;
                            break;
                        }
                        Packet::PubRec(r) if qos == 2 && r.pkid == pkid => {
                            released = true;
                            if !c.send(&ack(0x62, pkid)).await {
                                break;
                            }
                        }
                        Packet::PubComp(r) if qos == 2 && r.pkid == pkid => {
                            done = true;
                            break;
                        }
                        _ => {}
                    }
                }
            }
            if done {
                break;
            }
            conn = None;
        }
    }
    Ok(reconnects.saturating_sub(1))
}

/// A persistent subscriber that reconnects and collects payloads until it has seen every one
/// of `expected` or the deadline passes. Returns every payload received (a QoS 2 re-send of a
/// packet id not yet released is not counted twice, as the protocol requires).
pub async fn collect(
    addrs: &[SocketAddr],
    id: &str,
    filter: &str,
    qos: u8,
    expected: &HashSet<String>,
    deadline: tokio::time::Instant,
) -> Vec<String> {
    let mut got = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut unreleased: HashSet<u16> = HashSet::new();
    // QoS 2 arrivals per payload, and the connections that saw each packet id released:
    // printed for a payload counted twice.
    let mut arrivals: HashMap<String, Vec<Arrival>> = HashMap::new();
    let mut releases: HashMap<u16, Vec<usize>> = HashMap::new();
    let mut attempt = 0;
    while tokio::time::Instant::now() < deadline && !expected.is_subset(&seen) {
        let addr = addrs[attempt % addrs.len()];
        attempt += 1;
        let Some(mut c) = Conn::open(addr, id, deadline).await else {
            break;
        };
        if !c.send(&raw::subscribe_bytes(1, &[(filter, qos)])).await {
            continue;
        }
        while !expected.is_subset(&seen) {
            let Some(p) = c.recv().await else { break };
            match p {
                Packet::Publish(p) => {
                    let text = String::from_utf8_lossy(&p.payload).into_owned();
                    let sent = match p.qos as u8 {
                        1 => {
                            got.push(text.clone());
                            c.send(&ack(0x40, p.pkid)).await
                        }
                        2 => {
                            let counted = unreleased.insert(p.pkid);
                            if counted {
                                got.push(text.clone());
                            }
                            arrivals.entry(text.clone()).or_default().push(Arrival {
                                connection: attempt,
                                pkid: p.pkid,
                                dup: p.dup,
                                counted,
                            });
                            c.send(&ack(0x50, p.pkid)).await
                        }
                        _ => {
                            got.push(text.clone());
                            true
                        }
                    };
                    seen.insert(text);
                    if !sent {
                        break;
                    }
                }
                Packet::PubRel(r) => {
                    unreleased.remove(&r.pkid);
                    releases.entry(r.pkid).or_default().push(attempt);
                    if !c.send(&ack(0x70, r.pkid)).await {
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    for (text, seen) in &arrivals {
        if seen.iter().filter(|a| a.counted).count() > 1 {
            println!("{id}: {text} counted twice: {seen:?}");
            for a in seen {
                let released = releases.get(&a.pkid);
                println!("  pkid {}: released on connections {released:?}", a.pkid);
            }
        }
    }
    got
}

/// One QoS 2 PUBLISH as a subscriber received it.
#[derive(Debug)]
#[allow(dead_code)] // `connection` and `dup` are read through Debug, in the report above
struct Arrival {
    connection: usize,
    pkid: u16,
    dup: bool,
    counted: bool,
}
