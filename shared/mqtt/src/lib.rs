//! MQTT packets as the session sees them, whatever the protocol version.
//!
//! [`decode`] turns the bytes of MQTT 3.1, 3.1.1 and 5.0 into [`Inbound`] packets and
//! [`encode`] turns what the session sends into bytes for the client's version. Everything
//! that differs between the versions (properties, reason codes, the CONNECT header, which
//! fields exist) stays in these modules: the session sees one set of packets. Pure functions
//! over buffers, no I/O, no session state.

pub mod client;
pub mod decode;
pub mod encode;
#[doc(hidden)]
pub mod fuzzing;
pub mod outcome;
mod properties;
pub mod rules;
#[cfg(test)]
mod tests;

use bytes::Bytes;
pub use decode::decode;
use wharf_shared::{Properties, Qos, SubscriptionOptions};

/// The protocol version a client speaks, fixed by its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    /// MQTT 3.1: protocol name "MQIsdp", level 3.
    V3_1,
    /// MQTT 3.1.1: "MQTT", level 4.
    V3_1_1,
    /// MQTT 5.0: "MQTT", level 5.
    V5,
}

impl Version {
    pub fn is_v5(self) -> bool {
        self == Version::V5
    }

    pub fn label(self) -> &'static str {
        match self {
            Version::V3_1 => "3.1",
            Version::V3_1_1 => "3.1.1",
            Version::V5 => "5.0",
        }
    }
}

/// A CONNECT, validated. The MQTT 5.0 properties have their specification defaults when the
/// client (or its version) sent none.
#[derive(Debug, Clone, PartialEq)]
pub struct Connect {
    pub version: Version,
    pub client_id: String,
    /// Clean Session (3.1, 3.1.1) or Clean Start (5.0).
    pub clean_start: bool,
    /// Seconds; 0 turns keepalive off.
    pub keep_alive: u16,
    pub will: Option<Will>,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    /// 5.0 Session Expiry Interval in seconds (0: the session ends with the connection;
    /// `u32::MAX`: never expires).
    pub session_expiry: u32,
    /// 5.0 Receive Maximum: QoS 1/2 deliveries the client takes at once.
    pub receive_maximum: u16,
    /// 5.0 Maximum Packet Size the client accepts.
    pub max_packet_size: Option<u32>,
    /// 5.0 Topic Alias Maximum: aliases the server may use towards the client.
    pub topic_alias_max: u16,
    pub request_problem_info: bool,
    pub user_properties: Vec<(String, String)>,
    /// 5.0 enhanced authentication.
    pub auth_method: Option<String>,
    pub auth_data: Option<Bytes>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: Qos,
    pub retain: bool,
    /// 5.0 Will Delay Interval in seconds.
    pub delay_secs: u32,
    pub properties: Option<Box<Properties>>,
}

/// An incoming PUBLISH; its payload is copied out of the read buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishIn {
    /// Empty when a 5.0 client names the topic by its alias only.
    pub topic: String,
    pub payload: Bytes,
    pub qos: Qos,
    pub retain: bool,
    pub dup: bool,
    /// 0 for QoS 0.
    pub pkid: u16,
    /// 5.0 Topic Alias.
    pub topic_alias: Option<u16>,
    pub properties: Option<Box<Properties>>,
}

/// One filter of a SUBSCRIBE with its options (3.1/3.1.1: a QoS only).
#[derive(Debug, Clone, PartialEq)]
pub struct SubscribeFilter {
    pub filter: String,
    pub qos: Qos,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0: send retained messages at subscribe; 1: only for a new subscription; 2: never.
    pub retain_handling: u8,
}

impl SubscribeFilter {
    pub fn options(&self, identifier: Option<u32>) -> SubscriptionOptions {
        SubscriptionOptions {
            no_local: self.no_local,
            retain_as_published: self.retain_as_published,
            identifier,
        }
    }
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP: the packet id and (5.0) a reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub pkid: u16,
    pub reason: u8,
}

/// Packets a client may send.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    Connect(Box<Connect>),
    Publish(PublishIn),
    PubAck(Ack),
    PubRec(Ack),
    PubRel(Ack),
    PubComp(Ack),
    Subscribe {
        pkid: u16,
        filters: Vec<SubscribeFilter>,
        /// 5.0 Subscription Identifier, for every filter of the packet.
        identifier: Option<u32>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect {
        /// 5.0 reason code (0 for 3.1/3.1.1).
        reason: u8,
        /// 5.0: a new Session Expiry Interval.
        session_expiry: Option<u32>,
    },
    /// 5.0 AUTH.
    Auth {
        reason: u8,
        method: Option<String>,
    },
}

/// CONNACK return codes of MQTT 3.1 and 3.1.1 (3.1.1 section 3.2.2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectCode {
    Accepted = 0,
    UnacceptableProtocolVersion = 1,
    IdentifierRejected = 2,
    ServerUnavailable = 3,
    BadUsernameOrPassword = 4,
    NotAuthorized = 5,
}

/// MQTT 5.0 reason codes the server sends (5.0 section 2.4).
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    pub const UNSPECIFIED_ERROR: u8 = 0x80;
    pub const MALFORMED_PACKET: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const IMPLEMENTATION_SPECIFIC_ERROR: u8 = 0x83;
    pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
    pub const CLIENT_IDENTIFIER_NOT_VALID: u8 = 0x85;
    pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const SERVER_BUSY: u8 = 0x89;
    pub const BANNED: u8 = 0x8A;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const PACKET_IDENTIFIER_NOT_FOUND: u8 = 0x92;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
    pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
}

/// Why a byte stream is not a valid packet; each closes the connection (5.0: after a
/// DISCONNECT with [`DecodeError::reason`]).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("protocol name is not MQTT")]
    BadProtocolName,
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolLevel(u8),
    #[error("packet type {0} may not be sent by a client")]
    UnexpectedPacket(u8),
}

impl DecodeError {
    /// The MQTT 5.0 reason code that tells the client why.
    pub fn reason(&self) -> u8 {
        match self {
            DecodeError::TooLarge { .. } => reason::PACKET_TOO_LARGE,
            DecodeError::Protocol(_) | DecodeError::UnexpectedPacket(_) => reason::PROTOCOL_ERROR,
            DecodeError::UnsupportedProtocolLevel(_) => reason::UNSUPPORTED_PROTOCOL_VERSION,
            DecodeError::Malformed(_) | DecodeError::BadProtocolName => reason::MALFORMED_PACKET,
        }
    }
}
