//! Bytes into [`Inbound`] packets, for MQTT 3.1, 3.1.1 and 5.0.
//!
//! Written over `bytes` rather than taken from `mqttbytes`: its 5.0 module has no AUTH, rejects
//! a DISCONNECT without a reason code, accepts duplicate properties and property lengths that
//! run past the packet, and checks the size limit against the remaining length instead of the
//! packet. Every field is checked here as the specifications ask: fixed-header flags, reserved
//! bits, UTF-8 strings (well formed, no U+0000), packet ids, property ids allowed per packet
//! and at most once, and the packet's length against what its fields use.

use super::properties::{self, id, not_allowed, owned, Reader, Seen, MAX_VARIABLE_INT};
use super::{Ack, Connect, DecodeError, Inbound, PublishIn, SubscribeFilter, Version, Will};
use bytes::{Buf, BytesMut};
use wharf_shared::{Properties, Qos};

/// Decodes one packet from the front of `buf`. `Ok(None)` means more bytes are needed; the
/// size limit (the whole packet, header included) is checked as soon as the length field is
/// read. `version` is `None` until the CONNECT has been read: only a CONNECT is accepted then,
/// and a second one is a protocol error.
pub fn decode(
    buf: &mut BytesMut,
    version: Option<Version>,
    max_packet_size: usize,
) -> Result<Option<Inbound>, DecodeError> {
    // Before the CONNECT, the first byte decides: anything but CONNECT's (a PROXY header on a
    // listener without `--proxy-protocol`, TLS on the plain port, HTTP) is refused at once,
    // not held until its announced length arrives or the CONNECT timeout.
    if version.is_none() && buf.first().is_some_and(|&b| b != 0x10) {
        return Err(DecodeError::Protocol("first packet is not CONNECT".into()));
    }
    let Some((header_len, size)) = whole_packet(buf, max_packet_size)? else {
        return Ok(None);
    };
    let byte1 = buf[0];
    let body = &buf[header_len..size];
    let packet = match version {
        None if byte1 >> 4 == 1 => {
            check_flags(byte1, Version::V3_1_1)?;
            Inbound::Connect(Box::new(connect(body)?))
        }
        None => return Err(DecodeError::Protocol("first packet is not CONNECT".into())),
        Some(_) if byte1 >> 4 == 1 => return Err(DecodeError::Protocol("second CONNECT".into())),
        Some(version) => {
            check_flags(byte1, version)?;
            packet(byte1, body, version)?
        }
    };
    buf.advance(size);
    Ok(Some(packet))
}

/// The fixed header's length and the remaining length, once both are in `buf`.
/// The header length and whole size of the packet at the front of `buf` once all of it has
/// arrived; the size limit (header included) is checked as soon as the length field is read.
pub(super) fn whole_packet(
    buf: &[u8],
    max_packet_size: usize,
) -> Result<Option<(usize, usize)>, DecodeError> {
    let Some((header_len, remaining)) = fixed_header(buf)? else {
        return Ok(None);
    };
    let size = header_len + remaining;
    if size > max_packet_size {
        return Err(DecodeError::TooLarge {
            size,
            max: max_packet_size,
        });
    }
    Ok((buf.len() >= size).then_some((header_len, size)))
}

fn fixed_header(buf: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((2 + i, remaining)));
        }
    }
    Err(DecodeError::Malformed(
        "remaining length of more than 4 bytes".into(),
    ))
}

/// Flags in the first byte that the specifications fix (3.1.1 section 2.2.2, 5.0 2.1.3).
fn check_flags(byte1: u8, version: Version) -> Result<(), DecodeError> {
    let (kind, flags) = (byte1 >> 4, byte1 & 0x0f);
    let ok = match kind {
        3 => {
            let qos = (flags >> 1) & 0b11;
            qos != 3 && !(qos == 0 && flags & 0b1000 != 0)
        }
        // 3.1 (3.6): PUBREL, SUBSCRIBE and UNSUBSCRIBE carry QoS 1 and may carry DUP when
        // resent; 3.1.1 and 5.0 fix the flags to 0010.
        6 | 8 | 10 if version == Version::V3_1 => flags & 0b0111 == 0b0010,
        6 | 8 | 10 => flags == 0b0010,
        1 | 4 | 5 | 7 | 12 | 14 => flags == 0,
        15 if version.is_v5() => flags == 0,
        0 | 15 => return Err(DecodeError::Malformed(format!("packet type {kind}"))),
        other => return Err(DecodeError::UnexpectedPacket(other)),
    };
    if ok {
        Ok(())
    } else {
        Err(DecodeError::Malformed(format!(
            "flags {flags:#06b} on packet type {kind}"
        )))
    }
}

fn packet(byte1: u8, body: &[u8], version: Version) -> Result<Inbound, DecodeError> {
    let mut r = Reader::new(body);
    let v5 = version.is_v5();
    let packet = match byte1 >> 4 {
        3 => Inbound::Publish(publish(byte1, &mut r, v5)?),
        4 => Inbound::PubAck(ack(&mut r, v5)?),
        5 => Inbound::PubRec(ack(&mut r, v5)?),
        6 => Inbound::PubRel(ack(&mut r, v5)?),
        7 => Inbound::PubComp(ack(&mut r, v5)?),
        8 => subscribe(&mut r, v5)?,
        10 => unsubscribe(&mut r, v5)?,
        12 => Inbound::PingReq,
        14 => disconnect(&mut r, v5)?,
        15 => auth(&mut r)?,
        other => return Err(DecodeError::UnexpectedPacket(other)),
    };
    all_read(&r, byte1)?;
    Ok(packet)
}

/// A packet's fields must use all of its bytes.
pub(super) fn all_read(r: &Reader<'_>, byte1: u8) -> Result<(), DecodeError> {
    if r.is_empty() {
        return Ok(());
    }
    Err(DecodeError::Malformed(format!(
        "{} bytes after the fields of packet type {}",
        r.remaining(),
        byte1 >> 4
    )))
}

/// A CONNECT of any version: the protocol name and level first (an unknown level is reported
/// before its body is parsed, for CONNACK 1 / 0x84), then the flags, then exactly the fields
/// the flags announce.
fn connect(body: &[u8]) -> Result<Connect, DecodeError> {
    let mut r = Reader::new(body);
    let name = r.binary()?;
    let level = r.u8()?;
    let version = match (name, level) {
        (b"MQTT", 4) => Version::V3_1_1,
        (b"MQTT", 5) => Version::V5,
        (b"MQIsdp", 3) => Version::V3_1,
        (b"MQTT" | b"MQIsdp", level) => return Err(DecodeError::UnsupportedProtocolLevel(level)),
        _ => return Err(DecodeError::BadProtocolName),
    };
    let v5 = version.is_v5();
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::Malformed("CONNECT reserved flag set".into()));
    }
    let has_user = flags & 0x80 != 0;
    let has_password = flags & 0x40 != 0;
    if has_password && !has_user && !v5 {
        return Err(DecodeError::Malformed("password without user name".into()));
    }
    let has_will = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0x20 != 0;
    if !has_will && (will_qos != 0 || will_retain) {
        return Err(DecodeError::Malformed(
            "will QoS or retain set without a will".into(),
        ));
    }
    let will_qos =
        Qos::from_u8(will_qos).ok_or_else(|| DecodeError::Malformed("will QoS 3".into()))?;
    let keep_alive = r.u16()?;
    let mut c = Connect {
        version,
        client_id: String::new(),
        clean_start: flags & 0x02 != 0,
        keep_alive,
        will: None,
        username: None,
        password: None,
        session_expiry: 0,
        receive_maximum: u16::MAX,
        max_packet_size: None,
        topic_alias_max: 0,
        request_problem_info: true,
        user_properties: Vec::new(),
        auth_method: None,
        auth_data: None,
    };
    if v5 {
        connect_properties(&mut r.properties()?, &mut c)?;
    }
    c.client_id = r.string()?;
    if has_will {
        let (delay_secs, properties) = if v5 {
            will_properties(&mut r.properties()?)?
        } else {
            (0, None)
        };
        let topic = r.string()?;
        let payload = owned(r.binary()?);
        c.will = Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            delay_secs,
            properties,
        });
    }
    if has_user {
        c.username = Some(r.string()?);
    }
    if has_password {
        c.password = Some(owned(r.binary()?));
    }
    if !r.is_empty() {
        return Err(DecodeError::Malformed(format!(
            "CONNECT has {} bytes after the fields its flags announce",
            r.remaining()
        )));
    }
    Ok(c)
}

fn connect_properties(r: &mut Reader<'_>, c: &mut Connect) -> Result<(), DecodeError> {
    each_property(r, "CONNECT", |pid, r| {
        match pid {
            id::SESSION_EXPIRY_INTERVAL => c.session_expiry = r.u32()?,
            id::RECEIVE_MAXIMUM => {
                c.receive_maximum = r.u16()?;
                if c.receive_maximum == 0 {
                    return Err(DecodeError::Protocol("Receive Maximum 0".into()));
                }
            }
            id::MAXIMUM_PACKET_SIZE => {
                let max = r.u32()?;
                if max == 0 {
                    return Err(DecodeError::Protocol("Maximum Packet Size 0".into()));
                }
                c.max_packet_size = Some(max);
            }
            id::TOPIC_ALIAS_MAXIMUM => c.topic_alias_max = r.u16()?,
            id::REQUEST_RESPONSE_INFORMATION => {
                properties::flag(r, pid)?;
            }
            id::REQUEST_PROBLEM_INFORMATION => c.request_problem_info = properties::flag(r, pid)?,
            id::USER_PROPERTY => c.user_properties.push((r.string()?, r.string()?)),
            id::AUTHENTICATION_METHOD => c.auth_method = Some(r.string()?),
            id::AUTHENTICATION_DATA => c.auth_data = Some(owned(r.binary()?)),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    if c.auth_data.is_some() && c.auth_method.is_none() {
        return Err(DecodeError::Protocol(
            "Authentication Data without a method".into(),
        ));
    }
    Ok(())
}

/// Reads one of the properties an application message carries (PUBLISH, will); `false` when
/// `pid` is not one of them.
fn message_property(r: &mut Reader<'_>, pid: u8, p: &mut Properties) -> Result<bool, DecodeError> {
    match pid {
        id::PAYLOAD_FORMAT_INDICATOR => {
            p.payload_format_indicator = Some(u8::from(properties::flag(r, pid)?))
        }
        id::MESSAGE_EXPIRY_INTERVAL => p.message_expiry_secs = Some(r.u32()?),
        id::CONTENT_TYPE => p.content_type = Some(r.string()?),
        id::RESPONSE_TOPIC => {
            let topic = r.string()?;
            if !wharf_shared::topic::valid_topic_name(&topic) {
                return Err(DecodeError::Protocol(
                    "Response Topic is not a topic name".into(),
                ));
            }
            p.response_topic = Some(topic);
        }
        id::CORRELATION_DATA => p.correlation_data = Some(r.binary()?.to_vec()),
        id::USER_PROPERTY => p.user_properties.push((r.string()?, r.string()?)),
        _ => return Ok(false),
    }
    Ok(true)
}

fn boxed(p: Properties) -> Option<Box<Properties>> {
    (!p.is_empty()).then(|| Box::new(p))
}

/// Reads a property block: each property at most once (the User Property any number of times),
/// each given to `take`, which returns false for one that `packet` may not carry. User
/// Properties that `take` leaves are read and dropped.
pub(super) fn each_property(
    r: &mut Reader<'_>,
    packet: &str,
    mut take: impl FnMut(u8, &mut Reader<'_>) -> Result<bool, DecodeError>,
) -> Result<(), DecodeError> {
    let mut seen = Seen::default();
    while !r.is_empty() {
        let pid = r.u8()?;
        if pid != id::USER_PROPERTY {
            seen.once(pid)?;
        }
        if take(pid, r)? {
            continue;
        }
        if pid != id::USER_PROPERTY {
            return Err(not_allowed(pid, packet));
        }
        r.string()?;
        r.string()?;
    }
    Ok(())
}

fn will_properties(r: &mut Reader<'_>) -> Result<(u32, Option<Box<Properties>>), DecodeError> {
    let mut p = Properties::default();
    let mut delay = 0;
    each_property(r, "the will properties", |pid, r| {
        if pid == id::WILL_DELAY_INTERVAL {
            delay = r.u32()?;
            return Ok(true);
        }
        message_property(r, pid, &mut p)
    })?;
    Ok((delay, boxed(p)))
}

fn nonzero_pkid(r: &mut Reader<'_>) -> Result<u16, DecodeError> {
    match r.u16()? {
        0 => Err(DecodeError::Malformed("packet id 0".into())),
        pkid => Ok(pkid),
    }
}

pub(super) fn publish(byte1: u8, r: &mut Reader<'_>, v5: bool) -> Result<PublishIn, DecodeError> {
    publish_from(byte1, r, v5, false)
}

/// A PUBLISH; `from_server` allows the Subscription Identifiers a server adds (read and
/// dropped: the bridge, the only client here, sets none).
pub(super) fn publish_from(
    byte1: u8,
    r: &mut Reader<'_>,
    v5: bool,
    from_server: bool,
) -> Result<PublishIn, DecodeError> {
    let qos = Qos::from_u8((byte1 >> 1) & 0b11).unwrap_or(Qos::AtMostOnce);
    let topic = r.string()?;
    let pkid = if qos == Qos::AtMostOnce {
        0
    } else {
        nonzero_pkid(r)?
    };
    let mut topic_alias = None;
    let mut props = Properties::default();
    if v5 {
        each_property(&mut r.properties()?, "PUBLISH", |pid, r| match pid {
            id::TOPIC_ALIAS => {
                topic_alias = Some(r.u16()?);
                Ok(true)
            }
            id::SUBSCRIPTION_IDENTIFIER if from_server => {
                r.variable_int()?;
                Ok(true)
            }
            id::SUBSCRIPTION_IDENTIFIER => Err(DecodeError::Protocol(
                "Subscription Identifier in a PUBLISH from a client".into(),
            )),
            _ => message_property(r, pid, &mut props),
        })?;
    }
    Ok(PublishIn {
        topic,
        // Copied so that a queued message does not pin the connection's read buffer.
        payload: owned(r.rest()),
        qos,
        retain: byte1 & 0x01 != 0,
        dup: byte1 & 0x08 != 0,
        pkid,
        topic_alias,
        properties: boxed(props),
    })
}

/// Properties that only carry information for people (Reason String, User Property).
fn informational(r: &mut Reader<'_>, packet: &str) -> Result<(), DecodeError> {
    each_property(r, packet, |pid, r| {
        if pid == id::REASON_STRING {
            r.string()?;
            return Ok(true);
        }
        Ok(false)
    })
}

pub(super) fn ack(r: &mut Reader<'_>, v5: bool) -> Result<Ack, DecodeError> {
    let pkid = nonzero_pkid(r)?;
    let mut reason = 0;
    if v5 && !r.is_empty() {
        reason = r.u8()?;
        if !r.is_empty() {
            informational(&mut r.properties()?, "an acknowledgement")?;
        }
    }
    Ok(Ack { pkid, reason })
}

fn subscribe(r: &mut Reader<'_>, v5: bool) -> Result<Inbound, DecodeError> {
    let pkid = nonzero_pkid(r)?;
    let mut identifier = None;
    if v5 {
        each_property(&mut r.properties()?, "SUBSCRIBE", |pid, r| {
            if pid != id::SUBSCRIPTION_IDENTIFIER {
                return Ok(false);
            }
            let value = r.variable_int()?;
            if value == 0 || value > MAX_VARIABLE_INT {
                return Err(DecodeError::Protocol("Subscription Identifier 0".into()));
            }
            identifier = Some(value);
            Ok(true)
        })?;
    }
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.string()?;
        let options = r.u8()?;
        let reserved = if v5 { 0xc0 } else { 0xfc };
        if options & reserved != 0 {
            return Err(DecodeError::Malformed(format!(
                "reserved subscription option bits {options:#04x}"
            )));
        }
        let qos = Qos::from_u8(options & 0b11)
            .ok_or_else(|| DecodeError::Malformed("subscription QoS 3".into()))?;
        let retain_handling = (options >> 4) & 0b11;
        if retain_handling == 3 {
            return Err(DecodeError::Protocol("Retain Handling 3".into()));
        }
        filters.push(SubscribeFilter {
            filter,
            qos,
            no_local: options & 0x04 != 0,
            retain_as_published: options & 0x08 != 0,
            retain_handling,
        });
    }
    if filters.is_empty() {
        return Err(DecodeError::Malformed("SUBSCRIBE without filters".into()));
    }
    Ok(Inbound::Subscribe {
        pkid,
        filters,
        identifier,
    })
}

fn unsubscribe(r: &mut Reader<'_>, v5: bool) -> Result<Inbound, DecodeError> {
    let pkid = nonzero_pkid(r)?;
    if v5 {
        informational(&mut r.properties()?, "UNSUBSCRIBE")?;
    }
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(r.string()?);
    }
    if filters.is_empty() {
        return Err(DecodeError::Malformed("UNSUBSCRIBE without filters".into()));
    }
    Ok(Inbound::Unsubscribe { pkid, filters })
}

fn disconnect(r: &mut Reader<'_>, v5: bool) -> Result<Inbound, DecodeError> {
    let mut reason = 0;
    let mut session_expiry = None;
    if v5 && !r.is_empty() {
        reason = r.u8()?;
        if !r.is_empty() {
            each_property(&mut r.properties()?, "DISCONNECT", |pid, r| {
                match pid {
                    id::SESSION_EXPIRY_INTERVAL => session_expiry = Some(r.u32()?),
                    id::REASON_STRING | id::SERVER_REFERENCE => {
                        r.string()?;
                    }
                    _ => return Ok(false),
                }
                Ok(true)
            })?;
        }
    }
    Ok(Inbound::Disconnect {
        reason,
        session_expiry,
    })
}

fn auth(r: &mut Reader<'_>) -> Result<Inbound, DecodeError> {
    let mut reason = 0;
    let mut method = None;
    if !r.is_empty() {
        reason = r.u8()?;
        each_property(&mut r.properties()?, "AUTH", |pid, r| {
            match pid {
                id::AUTHENTICATION_METHOD => method = Some(r.string()?),
                id::AUTHENTICATION_DATA => {
                    r.binary()?;
                }
                id::REASON_STRING => {
                    r.string()?;
                }
                _ => return Ok(false),
            }
            Ok(true)
        })?;
    }
    Ok(Inbound::Auth { reason, method })
}
