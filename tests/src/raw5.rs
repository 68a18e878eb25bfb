//! Byte-level MQTT 5.0 (and 3.1) packets, written and read here without any MQTT library:
//! the exact bytes a test sends, and each packet the broker sends as its first byte and body.

use crate::PATIENCE;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A packet: its first byte, the remaining length, the body.
pub fn packet(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![byte1];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

pub fn string(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

/// A property block: its length (one byte: tests keep blocks short), then `props`.
pub fn props(props: &[u8]) -> Vec<u8> {
    assert!(props.len() < 128);
    let mut v = vec![props.len() as u8];
    v.extend_from_slice(props);
    v
}

/// A 5.0 CONNECT with the properties `p` (a list of property bytes), keepalive 60 s.
/// A 5.0 CONNECT (clean start, Session Expiry Interval 60 s) with a QoS 1 will on
/// `will/<id>`, payload "gone", Will Delay Interval `delay` seconds, content type text/plain.
pub fn connect_with_will(client_id: &str, delay: u32) -> Vec<u8> {
    connect_with_will_expiring(client_id, delay, 60)
}

/// [`connect_with_will`] with a Session Expiry Interval of `expiry` seconds.
pub fn connect_with_will_expiring(client_id: &str, delay: u32, expiry: u32) -> Vec<u8> {
    let mut body = string("MQTT");
    // Will flag, will QoS 1, clean start.
    body.extend_from_slice(&[5, 0x0e, 0, 60]);
    let mut session_expiry = vec![0x11];
    session_expiry.extend_from_slice(&expiry.to_be_bytes());
    body.extend(props(&session_expiry));
    body.extend(string(client_id));
    let mut will_props = vec![0x18];
    will_props.extend_from_slice(&delay.to_be_bytes());
    will_props.extend_from_slice(&[0x03]);
    will_props.extend(string("text/plain"));
    body.extend(props(&will_props));
    body.extend(string(&format!("will/{client_id}")));
    body.extend(string("gone"));
    packet(0x10, &body)
}

pub fn connect(client_id: &str, clean_start: bool, p: &[u8]) -> Vec<u8> {
    connect_keep_alive(client_id, clean_start, 60, p)
}

pub fn connect_keep_alive(
    client_id: &str,
    clean_start: bool,
    keep_alive: u16,
    p: &[u8],
) -> Vec<u8> {
    let mut body = string("MQTT");
    body.extend_from_slice(&[5, if clean_start { 2 } else { 0 }]);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.extend(props(p));
    body.extend(string(client_id));
    packet(0x10, &body)
}

/// A 3.1 CONNECT ("MQIsdp", level 3).
pub fn connect_v31(client_id: &str, clean: bool) -> Vec<u8> {
    let mut body = string("MQIsdp");
    body.extend_from_slice(&[3, if clean { 2 } else { 0 }, 0, 60]);
    body.extend(string(client_id));
    packet(0x10, &body)
}

pub fn publish(topic: &str, qos: u8, pkid: u16, p: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = string(topic);
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    body.extend(props(p));
    body.extend_from_slice(payload);
    packet(0x30 | qos << 1, &body)
}

/// SUBSCRIBE with properties `p` and (filter, options byte) pairs.
pub fn subscribe(pkid: u16, p: &[u8], filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    body.extend(props(p));
    for (f, o) in filters {
        body.extend(string(f));
        body.push(*o);
    }
    packet(0x82, &body)
}

pub fn unsubscribe(pkid: u16, filters: &[&str]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    body.push(0);
    for f in filters {
        body.extend(string(f));
    }
    packet(0xa2, &body)
}

pub fn puback(pkid: u16) -> Vec<u8> {
    packet(0x40, &pkid.to_be_bytes())
}

/// One packet as the broker sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub byte1: u8,
    pub body: Vec<u8>,
}

impl Frame {
    pub fn kind(&self) -> u8 {
        self.byte1 >> 4
    }

    /// The reason code of a CONNACK or DISCONNECT.
    pub fn reason(&self) -> u8 {
        match self.kind() {
            2 => self.body[1],
            14 => self.body.first().copied().unwrap_or(0),
            _ => panic!("no reason code in packet type {}", self.kind()),
        }
    }

    /// A PUBLISH's topic and payload (properties skipped; one-byte property lengths).
    pub fn topic_and_payload(&self, v5: bool) -> (String, Vec<u8>) {
        assert_eq!(self.kind(), 3, "not a PUBLISH");
        let len = u16::from_be_bytes([self.body[0], self.body[1]]) as usize;
        let topic = String::from_utf8(self.body[2..2 + len].to_vec()).expect("utf-8 topic");
        let mut at = 2 + len;
        if (self.byte1 >> 1) & 3 > 0 {
            at += 2;
        }
        if v5 {
            at += 1 + self.body[at] as usize;
        }
        (topic, self.body[at..].to_vec())
    }

    pub fn pkid(&self) -> u16 {
        let at = match self.kind() {
            3 => 2 + u16::from_be_bytes([self.body[0], self.body[1]]) as usize,
            _ => 0,
        };
        u16::from_be_bytes([self.body[at], self.body[at + 1]])
    }
}

pub struct Raw5 {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw5 {
    pub async fn connect(addr: SocketAddr) -> Raw5 {
        Raw5 {
            stream: TcpStream::connect(addr).await.expect("tcp connect"),
            buf: Vec::new(),
        }
    }

    /// Connects with `connect_packet` and returns the CONNACK, asserting success.
    pub async fn session(addr: SocketAddr, connect_packet: &[u8]) -> (Raw5, Frame) {
        let mut raw = Raw5::connect(addr).await;
        raw.send(connect_packet).await;
        let connack = raw.recv().await.expect("CONNACK");
        assert_eq!((connack.kind(), connack.reason()), (2, 0), "{connack:?}");
        (raw, connack)
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    pub async fn recv(&mut self) -> Option<Frame> {
        self.recv_within(PATIENCE).await
    }

    /// The next packet, or `None` when the broker closed the connection or nothing came.
    pub async fn recv_within(&mut self, patience: Duration) -> Option<Frame> {
        tokio::time::timeout(patience, async {
            loop {
                if let Some(frame) = self.take() {
                    return Some(frame);
                }
                let mut chunk = [0u8; 4096];
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    fn take(&mut self) -> Option<Frame> {
        let mut len = 0usize;
        let mut at = 1;
        loop {
            let b = *self.buf.get(at)?;
            len |= usize::from(b & 0x7f) << (7 * (at - 1));
            at += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        if self.buf.len() < at + len {
            return None;
        }
        let frame = Frame {
            byte1: self.buf[0],
            body: self.buf[at..at + len].to_vec(),
        };
        self.buf.drain(..at + len);
        Some(frame)
    }

    /// Reads until the broker closes; returns the packets it sent before.
    pub async fn until_closed(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(f) = self.recv().await {
            frames.push(f);
        }
        frames
    }
}
