//! A byte-level MQTT client for malformed input and exact checks of what the broker sends.

use crate::PATIENCE;
use bytes::BytesMut;
use rumqttc::mqttbytes::{
    self,
    v4::{self, Packet},
};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Raw {
    stream: TcpStream,
    buf: BytesMut,
}

/// Encodes a CONNECT.
pub fn connect_bytes(client_id: &str, clean: bool, keep_alive: u16) -> Vec<u8> {
    let mut c = v4::Connect::new(client_id);
    c.clean_session = clean;
    c.keep_alive = keep_alive;
    let mut buf = BytesMut::new();
    c.write(&mut buf).expect("encode connect");
    buf.to_vec()
}

pub fn publish_bytes(topic: &str, qos: u8, pkid: u16, dup: bool, payload: &[u8]) -> Vec<u8> {
    let q = mqttbytes::qos(qos).expect("qos");
    let mut p = v4::Publish::new(topic, q, payload.to_vec());
    p.pkid = pkid;
    p.dup = dup;
    let mut buf = BytesMut::new();
    p.write(&mut buf).expect("encode publish");
    buf.to_vec()
}

pub fn subscribe_bytes(pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut s = v4::Subscribe {
        pkid,
        filters: Vec::new(),
    };
    for (f, q) in filters {
        s.add((*f).to_owned(), mqttbytes::qos(*q).expect("qos"));
    }
    let mut buf = BytesMut::new();
    s.write(&mut buf).expect("encode subscribe");
    buf.to_vec()
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            stream: TcpStream::connect(addr).await.expect("tcp connect"),
            buf: BytesMut::new(),
        }
    }

    /// Connects and completes CONNECT/CONNACK, asserting acceptance.
    pub async fn session(addr: SocketAddr, client_id: &str, clean: bool) -> Raw {
        let mut raw = Raw::connect(addr).await;
        raw.send(&connect_bytes(client_id, clean, 60)).await;
        match raw.recv().await {
            Some(Packet::ConnAck(a)) => {
                assert_eq!(
                    a.code,
                    v4::ConnectReturnCode::Success,
                    "{client_id} refused"
                )
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
        raw
    }

    /// A byte-level client over a stream the caller opened.
    pub fn from_stream(stream: TcpStream) -> Raw {
        Raw {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// The stream, and the bytes read from it that no packet has taken yet.
    pub fn into_parts(self) -> (TcpStream, BytesMut) {
        (self.stream, self.buf)
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        // The broker may already have closed the socket; the test checks that separately.
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next packet, or `None` when the broker closed the connection or nothing came.
    pub async fn recv(&mut self) -> Option<Packet> {
        self.recv_within(PATIENCE).await
    }

    pub async fn recv_within(&mut self, patience: Duration) -> Option<Packet> {
        tokio::time::timeout(patience, async {
            loop {
                match Packet::read(&mut self.buf, 1 << 20) {
                    Ok(p) => return Some(p),
                    Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(e) => panic!("broker sent an undecodable packet: {e:?}"),
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

    /// Waits until the broker closes the connection, failing on any packet but those allowed.
    pub async fn expect_closed(&mut self) {
        let closed = tokio::time::timeout(PATIENCE, async {
            loop {
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "broker did not close the connection");
    }
}
