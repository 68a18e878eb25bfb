//! MQTT packets as the session sees them, whatever the protocol version.
//!
//! [`v4`] turns MQTT 3.1.1 bytes into [`Inbound`] and [`Outbound`] into bytes; an MQTT 5
//! module will do the same with its properties, leaving the session logic untouched.

pub mod v4;

use bytes::Bytes;
use wharf_shared::Qos;

/// A CONNECT, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Connect {
    pub client_id: String,
    pub clean_session: bool,
    /// Seconds; 0 turns keepalive off.
    pub keep_alive: u16,
    pub will: Option<Will>,
    pub username: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: Qos,
    pub retain: bool,
}

/// An incoming PUBLISH; its payload is copied out of the read buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishIn {
    pub topic: String,
    pub payload: Bytes,
    pub qos: Qos,
    pub retain: bool,
    pub dup: bool,
    /// 0 for QoS 0.
    pub pkid: u16,
}

/// Packets a client may send.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    Connect(Connect),
    Publish(PublishIn),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<(String, Qos)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect,
}

/// CONNACK return codes of MQTT 3.1.1 (section 3.2.2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectCode {
    Accepted = 0,
    UnacceptableProtocolVersion = 1,
    IdentifierRejected = 2,
    ServerUnavailable = 3,
    BadUsernameOrPassword = 4,
    NotAuthorized = 5,
}

/// Why a byte stream is not a valid packet; each closes the connection.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("protocol name is not MQTT")]
    BadProtocolName,
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolLevel(u8),
    #[error("packet type {0} may not be sent by a client")]
    UnexpectedPacket(u8),
}
