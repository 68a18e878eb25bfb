//! What the server sends, as bytes for the client's version. Every packet but PUBLISH is a
//! few bytes; a PUBLISH is written straight from the stored message, without copies.

use super::properties::{id, put_binary, put_string, put_variable_int, variable_int_len};
use super::Version;
use bytes::{BufMut, BytesMut};
use wharf_shared::{Properties, Qos};

/// Why a CONNECT is refused, in terms both CONNACK formats can say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    ProtocolVersion,
    ClientIdentifier,
    ServerUnavailable,
    BadUserNameOrPassword,
    NotAuthorized,
    /// 5.0 only (3.1.1 has no enhanced authentication; it gets "not authorized").
    BadAuthenticationMethod,
    /// Too many CONNECTs waiting for a password check (3.1.1: "server unavailable").
    ServerBusy,
}

impl Refusal {
    /// The CONNACK return code (3.1, 3.1.1) or reason code (5.0).
    pub fn code(self, version: Version) -> u8 {
        use super::reason::*;
        let (v4, v5) = match self {
            Refusal::ProtocolVersion => (1, UNSUPPORTED_PROTOCOL_VERSION),
            Refusal::ClientIdentifier => (2, CLIENT_IDENTIFIER_NOT_VALID),
            Refusal::ServerUnavailable => (3, SERVER_UNAVAILABLE),
            Refusal::BadUserNameOrPassword => (4, BAD_USER_NAME_OR_PASSWORD),
            Refusal::NotAuthorized => (5, NOT_AUTHORIZED),
            Refusal::BadAuthenticationMethod => (5, BAD_AUTHENTICATION_METHOD),
            Refusal::ServerBusy => (3, SERVER_BUSY),
        };
        if version.is_v5() {
            v5
        } else {
            v4
        }
    }
}

/// The CONNACK properties the server sends (5.0 section 3.2.2.3); `None` leaves the
/// specification's default.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ConnackProperties {
    pub session_expiry: Option<u32>,
    pub receive_maximum: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<bool>,
    pub max_packet_size: Option<u32>,
    pub assigned_client_id: Option<String>,
    pub topic_alias_max: Option<u16>,
    pub reason_string: Option<String>,
    pub wildcard_available: Option<bool>,
    pub subscription_ids_available: Option<bool>,
    pub shared_available: Option<bool>,
    pub server_keep_alive: Option<u16>,
}

fn put_remaining_length(buf: &mut BytesMut, len: usize) {
    put_variable_int(buf, len);
}

/// CONNACK; `code` from [`Refusal::code`] or 0. 3.1 has no Session Present flag.
pub fn connack(
    buf: &mut BytesMut,
    version: Version,
    session_present: bool,
    code: u8,
    props: &ConnackProperties,
) {
    let present = u8::from(session_present && version != Version::V3_1);
    if !version.is_v5() {
        buf.put_slice(&[0x20, 2, present, code]);
        return;
    }
    let mut p = BytesMut::new();
    if let Some(v) = props.session_expiry {
        p.put_u8(id::SESSION_EXPIRY_INTERVAL);
        p.put_u32(v);
    }
    if let Some(v) = props.receive_maximum {
        p.put_u8(id::RECEIVE_MAXIMUM);
        p.put_u16(v);
    }
    if let Some(v) = props.maximum_qos {
        p.put_u8(id::MAXIMUM_QOS);
        p.put_u8(v);
    }
    if let Some(v) = props.retain_available {
        p.put_u8(id::RETAIN_AVAILABLE);
        p.put_u8(u8::from(v));
    }
    if let Some(v) = props.max_packet_size {
        p.put_u8(id::MAXIMUM_PACKET_SIZE);
        p.put_u32(v);
    }
    if let Some(v) = &props.assigned_client_id {
        p.put_u8(id::ASSIGNED_CLIENT_IDENTIFIER);
        put_string(&mut p, v);
    }
    if let Some(v) = props.topic_alias_max {
        p.put_u8(id::TOPIC_ALIAS_MAXIMUM);
        p.put_u16(v);
    }
    if let Some(v) = &props.reason_string {
        p.put_u8(id::REASON_STRING);
        put_string(&mut p, v);
    }
    for (pid, v) in [
        (
            id::WILDCARD_SUBSCRIPTION_AVAILABLE,
            props.wildcard_available,
        ),
        (
            id::SUBSCRIPTION_IDENTIFIER_AVAILABLE,
            props.subscription_ids_available,
        ),
        (id::SHARED_SUBSCRIPTION_AVAILABLE, props.shared_available),
    ] {
        if let Some(v) = v {
            p.put_u8(pid);
            p.put_u8(u8::from(v));
        }
    }
    if let Some(v) = props.server_keep_alive {
        p.put_u8(id::SERVER_KEEP_ALIVE);
        p.put_u16(v);
    }
    buf.put_u8(0x20);
    put_remaining_length(buf, 2 + variable_int_len(p.len()) + p.len());
    buf.put_u8(present);
    buf.put_u8(code);
    put_variable_int(buf, p.len());
    buf.put_slice(&p);
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP: the packet id, and in 5.0 a reason code unless it is
/// Success (the short form MQTT 5.0 allows).
fn ack(buf: &mut BytesMut, version: Version, byte1: u8, pkid: u16, reason: u8) {
    buf.put_u8(byte1);
    if version.is_v5() && reason != 0 {
        buf.put_u8(3);
        buf.put_u16(pkid);
        buf.put_u8(reason);
    } else {
        buf.put_u8(2);
        buf.put_u16(pkid);
    }
}

pub fn puback(buf: &mut BytesMut, version: Version, pkid: u16, reason: u8) {
    ack(buf, version, 0x40, pkid, reason)
}

pub fn pubrec(buf: &mut BytesMut, version: Version, pkid: u16, reason: u8) {
    ack(buf, version, 0x50, pkid, reason)
}

pub fn pubrel(buf: &mut BytesMut, version: Version, pkid: u16, reason: u8) {
    ack(buf, version, 0x62, pkid, reason)
}

pub fn pubcomp(buf: &mut BytesMut, version: Version, pkid: u16, reason: u8) {
    ack(buf, version, 0x70, pkid, reason)
}

/// SUBACK with one code per filter: the granted QoS, or a failure (0x80, or a 5.0 reason).
pub fn suback(buf: &mut BytesMut, version: Version, pkid: u16, codes: &[u8]) {
    let props = usize::from(version.is_v5());
    buf.put_u8(0x90);
    put_remaining_length(buf, 2 + props + codes.len());
    buf.put_u16(pkid);
    if props > 0 {
        buf.put_u8(0);
    }
    buf.put_slice(codes);
}

/// UNSUBACK: 3.1/3.1.1 carry the packet id only, 5.0 a reason code per filter.
pub fn unsuback(buf: &mut BytesMut, version: Version, pkid: u16, codes: &[u8]) {
    buf.put_u8(0xb0);
    if !version.is_v5() {
        buf.put_u8(2);
        buf.put_u16(pkid);
        return;
    }
    put_remaining_length(buf, 3 + codes.len());
    buf.put_u16(pkid);
    buf.put_u8(0);
    buf.put_slice(codes);
}

pub fn pingresp(buf: &mut BytesMut) {
    buf.put_slice(&[0xd0, 0]);
}

/// A DISCONNECT from the server (5.0 only), with a Reason String when one helps.
pub fn disconnect(buf: &mut BytesMut, reason: u8, reason_string: Option<&str>) {
    buf.put_u8(0xe0);
    match reason_string {
        None => {
            buf.put_u8(1);
            buf.put_u8(reason);
        }
        Some(s) => {
            let s = truncated(s, 256);
            let props = 3 + s.len();
            put_remaining_length(buf, 1 + variable_int_len(props) + props);
            buf.put_u8(reason);
            put_variable_int(buf, props);
            buf.put_u8(id::REASON_STRING);
            put_string(buf, s);
        }
    }
}

fn truncated(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The fields of an outgoing PUBLISH.
pub struct PublishOut<'a> {
    /// Empty when the topic goes by an alias the client already knows.
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub qos: Qos,
    pub pkid: u16,
    pub retain: bool,
    pub dup: bool,
    /// 5.0: the message's properties (ignored for 3.1/3.1.1).
    pub properties: Option<&'a Properties>,
    /// 5.0: the Message Expiry Interval left, which replaces the published one.
    pub message_expiry: Option<u32>,
    pub topic_alias: Option<u16>,
    pub subscription_ids: &'a [u32],
}

fn properties_len(p: &PublishOut<'_>) -> usize {
    let mut len = 0;
    if let Some(props) = p.properties {
        len += props.payload_format_indicator.map_or(0, |_| 2);
        len += props.content_type.as_ref().map_or(0, |s| 3 + s.len());
        len += props.response_topic.as_ref().map_or(0, |s| 3 + s.len());
        len += props.correlation_data.as_ref().map_or(0, |s| 3 + s.len());
        len += props
            .user_properties
            .iter()
            .map(|(k, v)| 5 + k.len() + v.len())
            .sum::<usize>();
    }
    len += p.message_expiry.map_or(0, |_| 5);
    len += p.topic_alias.map_or(0, |_| 3);
    len += p
        .subscription_ids
        .iter()
        .map(|&i| 1 + variable_int_len(i as usize))
        .sum::<usize>();
    len
}

fn remaining_len(version: Version, p: &PublishOut<'_>) -> (usize, usize) {
    let id_len = if p.qos == Qos::AtMostOnce { 0 } else { 2 };
    let props = if version.is_v5() {
        properties_len(p)
    } else {
        0
    };
    let props_field = if version.is_v5() {
        variable_int_len(props) + props
    } else {
        0
    };
    (
        2 + p.topic.len() + id_len + props_field + p.payload.len(),
        props,
    )
}

/// The size of the PUBLISH `publish` would write, header included (for the client's
/// Maximum Packet Size).
pub fn publish_len(version: Version, p: &PublishOut<'_>) -> usize {
    let (remaining, _) = remaining_len(version, p);
    1 + variable_int_len(remaining) + remaining
}

pub fn publish(buf: &mut BytesMut, version: Version, p: &PublishOut<'_>) {
    let (remaining, props_len) = remaining_len(version, p);
    buf.reserve(5 + remaining);
    buf.put_u8(0x30 | u8::from(p.dup) << 3 | p.qos.as_u8() << 1 | u8::from(p.retain));
    put_remaining_length(buf, remaining);
    put_string(buf, p.topic);
    if p.qos != Qos::AtMostOnce {
        buf.put_u16(p.pkid);
    }
    if version.is_v5() {
        put_variable_int(buf, props_len);
        if let Some(props) = p.properties {
            if let Some(v) = props.payload_format_indicator {
                buf.put_u8(id::PAYLOAD_FORMAT_INDICATOR);
                buf.put_u8(v);
            }
        }
        if let Some(v) = p.message_expiry {
            buf.put_u8(id::MESSAGE_EXPIRY_INTERVAL);
            buf.put_u32(v);
        }
        if let Some(v) = p.topic_alias {
            buf.put_u8(id::TOPIC_ALIAS);
            buf.put_u16(v);
        }
        if let Some(props) = p.properties {
            if let Some(v) = &props.response_topic {
                buf.put_u8(id::RESPONSE_TOPIC);
                put_string(buf, v);
            }
            if let Some(v) = &props.correlation_data {
                buf.put_u8(id::CORRELATION_DATA);
                put_binary(buf, v);
            }
            for (k, v) in &props.user_properties {
                buf.put_u8(id::USER_PROPERTY);
                put_string(buf, k);
                put_string(buf, v);
            }
            if let Some(v) = &props.content_type {
                buf.put_u8(id::CONTENT_TYPE);
                put_string(buf, v);
            }
        }
        for &i in p.subscription_ids {
            buf.put_u8(id::SUBSCRIPTION_IDENTIFIER);
            put_variable_int(buf, i as usize);
        }
    }
    buf.put_slice(p.payload);
}
