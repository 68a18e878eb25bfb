//! MQTT 3.1.1 framing: pure functions over buffers, no I/O, no session state.
//!
//! Decoding leans on `mqttbytes::v4` for the packet bodies and adds what it leaves out:
//! fixed-header flag checks, the CONNECT reserved flag, empty SUBSCRIBE/UNSUBSCRIBE, and
//! version-independent packets. Encoding is written here: every packet the server sends is a
//! few bytes, and a PUBLISH is encoded straight from the stored message without copies.

use super::{Connect, ConnectCode, DecodeError, Inbound, PublishIn, Will};
use bytes::{BufMut, Bytes, BytesMut};
use mqttbytes::v4 as mb;
use wharf_shared::Qos;

/// Decodes one packet from the front of `buf`. `Ok(None)` means more bytes are needed;
/// the size limit is checked as soon as the length field is read.
pub fn decode(buf: &mut BytesMut, max_packet_size: usize) -> Result<Option<Inbound>, DecodeError> {
    let header = match mqttbytes::check(buf.iter(), max_packet_size) {
        Ok(header) => header,
        Err(mqttbytes::Error::InsufficientBytes(_)) => return Ok(None),
        Err(mqttbytes::Error::PayloadSizeLimitExceeded(size)) => {
            return Err(DecodeError::TooLarge {
                size,
                max: max_packet_size,
            })
        }
        Err(e) => return Err(DecodeError::Malformed(format!("{e:?}"))),
    };
    let frame_len = header.frame_length();
    check_fixed_header(buf[0])?;
    if buf[0] >> 4 == 1 {
        check_connect(&buf[..frame_len])?;
    }
    let packet = mb::read(buf, max_packet_size).map_err(map_error)?;
    convert(packet).map(Some)
}

fn map_error(e: mqttbytes::Error) -> DecodeError {
    match e {
        mqttbytes::Error::InvalidProtocol => DecodeError::BadProtocolName,
        mqttbytes::Error::InvalidProtocolLevel(level) => {
            DecodeError::UnsupportedProtocolLevel(level)
        }
        other => DecodeError::Malformed(format!("{other:?}")),
    }
}

/// Flags in the first byte that MQTT 3.1.1 fixes (section 2.2.2).
fn check_fixed_header(byte1: u8) -> Result<(), DecodeError> {
    let (kind, flags) = (byte1 >> 4, byte1 & 0x0f);
    let ok = match kind {
        3 => {
            let qos = (flags >> 1) & 0b11;
            qos != 3 && !(qos == 0 && flags & 0b1000 != 0)
        }
        6 | 8 | 10 => flags == 0b0010,
        1 | 4 | 5 | 7 | 12 | 14 => flags == 0,
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

/// A CONNECT as MQTT 3.1.1 (3.1) fixes it, before its body is parsed: the protocol name and
/// level first (another level gets CONNACK 1, as MQTT-3.1.2-2 asks, also for MQTT 5.0 and
/// 3.1 clients, whose bodies differ), then the flags (reserved bit, password without user
/// name, will QoS and retain without a will), then the payload: exactly the fields the flags
/// announce, each a length and its bytes, filling the packet. A field present without its
/// flag, or missing with it, is malformed.
fn check_connect(frame: &[u8]) -> Result<(), DecodeError> {
    let short = || DecodeError::Malformed("short CONNECT".into());
    let mut at = 1;
    while frame.get(at).is_some_and(|b| b & 0x80 != 0) {
        at += 1;
    }
    at += 1;
    let field = |at: usize| -> Result<(&[u8], usize), DecodeError> {
        let len = frame.get(at..at + 2).ok_or_else(short)?;
        let len = u16::from_be_bytes([len[0], len[1]]) as usize;
        let bytes = frame.get(at + 2..at + 2 + len).ok_or_else(short)?;
        Ok((bytes, at + 2 + len))
    };
    let (name, next) = field(at)?;
    let level = *frame.get(next).ok_or_else(short)?;
    match name {
        b"MQTT" if level == 4 => {}
        b"MQTT" | b"MQIsdp" => return Err(DecodeError::UnsupportedProtocolLevel(level)),
        _ => return Err(DecodeError::BadProtocolName),
    }
    let flags = *frame.get(next + 1).ok_or_else(short)?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::Malformed("CONNECT reserved flag set".into()));
    }
    if flags & 0x40 != 0 && flags & 0x80 == 0 {
        return Err(DecodeError::Malformed("password without user name".into()));
    }
    let will = flags & 0x04 != 0;
    if !will && flags & 0x38 != 0 {
        return Err(DecodeError::Malformed(
            "will QoS or retain set without a will".into(),
        ));
    }
    if (flags >> 3) & 0b11 == 3 {
        return Err(DecodeError::Malformed("will QoS 3".into()));
    }
    // Keep alive (2 bytes), then the payload.
    let mut at = next + 4;
    let fields = 1
        + if will { 2 } else { 0 }
        + usize::from(flags & 0x80 != 0)
        + usize::from(flags & 0x40 != 0);
    for _ in 0..fields {
        at = field(at)?.1;
    }
    if at != frame.len() {
        return Err(DecodeError::Malformed(format!(
            "CONNECT has {} bytes after the fields its flags announce",
            frame.len() - at
        )));
    }
    Ok(())
}

/// MQTT-1.5.3-2: a string may not contain U+0000 (ill-formed UTF-8 is already refused by
/// the parser); the connection is closed.
fn no_null(s: &str) -> Result<(), DecodeError> {
    if s.contains('\0') {
        return Err(DecodeError::Malformed("U+0000 in a string".into()));
    }
    Ok(())
}

fn qos(q: mqttbytes::QoS) -> Qos {
    match q {
        mqttbytes::QoS::AtMostOnce => Qos::AtMostOnce,
        mqttbytes::QoS::AtLeastOnce => Qos::AtLeastOnce,
        mqttbytes::QoS::ExactlyOnce => Qos::ExactlyOnce,
    }
}

fn convert(packet: mb::Packet) -> Result<Inbound, DecodeError> {
    Ok(match packet {
        mb::Packet::Connect(c) => {
            no_null(&c.client_id)?;
            if let Some(w) = &c.last_will {
                no_null(&w.topic)?;
            }
            if let Some(l) = &c.login {
                no_null(&l.username)?;
            }
            Inbound::Connect(Connect {
                client_id: c.client_id,
                clean_session: c.clean_session,
                keep_alive: c.keep_alive,
                will: c.last_will.map(|w| Will {
                    topic: w.topic,
                    payload: Bytes::copy_from_slice(&w.message),
                    qos: qos(w.qos),
                    retain: w.retain,
                }),
                username: c.login.map(|l| l.username).filter(|u| !u.is_empty()),
            })
        }
        mb::Packet::Publish(p) => Inbound::Publish(PublishIn {
            topic: {
                no_null(&p.topic)?;
                p.topic
            },
            // Copied so that a queued message does not pin the connection's read buffer.
            payload: Bytes::copy_from_slice(&p.payload),
            qos: qos(p.qos),
            retain: p.retain,
            dup: p.dup,
            pkid: p.pkid,
        }),
        mb::Packet::PubAck(a) => Inbound::PubAck(a.pkid),
        mb::Packet::PubRec(a) => Inbound::PubRec(a.pkid),
        mb::Packet::PubRel(a) => Inbound::PubRel(a.pkid),
        mb::Packet::PubComp(a) => Inbound::PubComp(a.pkid),
        mb::Packet::Subscribe(s) => {
            if s.filters.is_empty() {
                return Err(DecodeError::Malformed("SUBSCRIBE without filters".into()));
            }
            for f in &s.filters {
                no_null(&f.path)?;
            }
            Inbound::Subscribe {
                pkid: s.pkid,
                filters: s
                    .filters
                    .into_iter()
                    .map(|f| (f.path, qos(f.qos)))
                    .collect(),
            }
        }
        mb::Packet::Unsubscribe(u) => {
            if u.topics.is_empty() {
                return Err(DecodeError::Malformed("UNSUBSCRIBE without filters".into()));
            }
            for t in &u.topics {
                no_null(t)?;
            }
            Inbound::Unsubscribe {
                pkid: u.pkid,
                filters: u.topics,
            }
        }
        mb::Packet::PingReq => Inbound::PingReq,
        mb::Packet::Disconnect => Inbound::Disconnect,
        mb::Packet::ConnAck(_)
        | mb::Packet::SubAck(_)
        | mb::Packet::UnsubAck(_)
        | mb::Packet::PingResp => {
            return Err(DecodeError::Malformed("server packet from a client".into()))
        }
    })
}

fn put_remaining_length(buf: &mut BytesMut, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if len == 0 {
            break;
        }
    }
}

pub fn encode_connack(buf: &mut BytesMut, code: ConnectCode, session_present: bool) {
    buf.put_slice(&[0x20, 2, session_present as u8, code as u8]);
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP and UNSUBACK: a type byte, length 2, the packet id.
fn encode_id_packet(buf: &mut BytesMut, byte1: u8, pkid: u16) {
    buf.put_u8(byte1);
    buf.put_u8(2);
    buf.put_u16(pkid);
}

pub fn encode_puback(buf: &mut BytesMut, pkid: u16) {
    encode_id_packet(buf, 0x40, pkid)
}

pub fn encode_pubrec(buf: &mut BytesMut, pkid: u16) {
    encode_id_packet(buf, 0x50, pkid)
}

pub fn encode_pubrel(buf: &mut BytesMut, pkid: u16) {
    encode_id_packet(buf, 0x62, pkid)
}

pub fn encode_pubcomp(buf: &mut BytesMut, pkid: u16) {
    encode_id_packet(buf, 0x70, pkid)
}

pub fn encode_unsuback(buf: &mut BytesMut, pkid: u16) {
    encode_id_packet(buf, 0xb0, pkid)
}

pub fn encode_pingresp(buf: &mut BytesMut) {
    buf.put_slice(&[0xd0, 0]);
}

/// SUBACK with one return code per filter: the granted QoS, or 0x80 for a refused filter.
pub fn encode_suback(buf: &mut BytesMut, pkid: u16, codes: &[u8]) {
    buf.put_u8(0x90);
    put_remaining_length(buf, 2 + codes.len());
    buf.put_u16(pkid);
    buf.put_slice(codes);
}

/// The fields of an outgoing PUBLISH.
pub struct PublishOut<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub qos: Qos,
    pub pkid: u16,
    pub retain: bool,
    pub dup: bool,
}

pub fn encode_publish(buf: &mut BytesMut, p: &PublishOut<'_>) {
    let id_len = if p.qos == Qos::AtMostOnce { 0 } else { 2 };
    let remaining = 2 + p.topic.len() + id_len + p.payload.len();
    buf.reserve(5 + remaining);
    buf.put_u8(0x30 | (p.dup as u8) << 3 | p.qos.as_u8() << 1 | p.retain as u8);
    put_remaining_length(buf, remaining);
    buf.put_u16(p.topic.len() as u16);
    buf.put_slice(p.topic.as_bytes());
    if id_len > 0 {
        buf.put_u16(p.pkid);
    }
    buf.put_slice(p.payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONNECT: &[u8] = &[
        0x10,
        16,
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
        0b0000_0010,
        0,
        60,
        0,
        4,
        b'd',
        b'e',
        b'v',
        b'1',
    ];

    fn decode_all(bytes: &[u8]) -> Result<Option<Inbound>, DecodeError> {
        decode(&mut BytesMut::from(bytes), 1024)
    }

    #[test]
    fn connect_decodes_when_fed_one_byte_at_a_time() {
        let mut buf = BytesMut::new();
        for (i, b) in CONNECT.iter().enumerate() {
            buf.put_u8(*b);
            let got = decode(&mut buf, 1024).expect("valid prefix");
            if i + 1 < CONNECT.len() {
                assert_eq!(got, None, "decoded early at byte {i}");
            } else {
                let Some(Inbound::Connect(c)) = got else {
                    panic!("not a connect: {got:?}")
                };
                assert_eq!(c.client_id, "dev1");
                assert!(c.clean_session);
                assert_eq!(c.keep_alive, 60);
            }
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn publish_round_trips_through_encoder_and_decoder() {
        let mut buf = BytesMut::new();
        let out = PublishOut {
            topic: "a/b",
            payload: b"1,2",
            qos: Qos::ExactlyOnce,
            pkid: 77,
            retain: true,
            dup: true,
        };
        encode_publish(&mut buf, &out);
        let Some(Inbound::Publish(p)) = decode(&mut buf, 1024).expect("decode") else {
            panic!("not a publish")
        };
        assert_eq!(
            (
                p.topic.as_str(),
                &p.payload[..],
                p.qos,
                p.pkid,
                p.retain,
                p.dup
            ),
            ("a/b", &b"1,2"[..], Qos::ExactlyOnce, 77, true, true)
        );
    }

    #[test]
    fn bad_packets_are_refused() {
        let cases: &[(&str, &[u8])] = &[
            (
                "reserved connect flag",
                &[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0b11, 0, 60, 0, 0],
            ),
            ("qos 3 publish", &[0x36, 5, 0, 1, b'a', 0, 1]),
            ("dup on qos 0", &[0x38, 3, 0, 1, b'a']),
            ("subscribe flags", &[0x80, 6, 0, 1, 0, 1, b'a', 0]),
            ("empty subscribe", &[0x82, 2, 0, 1]),
            ("packet id 0", &[0x32, 5, 0, 1, b'a', 0, 0]),
            ("type 0", &[0x00, 0]),
            ("connack from client", &[0x20, 2, 0, 0]),
            (
                "remaining length of 5 bytes",
                &[0x30, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
            ("invalid utf-8 topic", &[0x30, 4, 0, 2, 0xc3, 0x28]),
            ("U+0000 in a topic", &[0x30, 5, 0, 3, b'a', 0, b'b']),
            ("U+0000 in a filter", &[0x82, 7, 0, 1, 0, 2, b'a', 0, 1]),
            ("U+0000 in an unsubscribe", &[0xa2, 6, 0, 1, 0, 2, 0, b'a']),
            (
                "U+0000 in a client id",
                &[
                    0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 2, b'a', 0,
                ],
            ),
            (
                "a user name without its flag",
                &[
                    0x10, 16, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 1, b'a', 0, 1, b'u',
                ],
            ),
            (
                "the user name flag without a user name",
                &[
                    0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x82, 0, 60, 0, 1, b'a',
                ],
            ),
            (
                "will retain without a will",
                &[
                    0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x22, 0, 60, 0, 1, b'a',
                ],
            ),
            (
                "will QoS 3",
                &[
                    0x10, 18, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x1e, 0, 60, 0, 1, b'a', 0, 1, b't',
                    0, 0,
                ],
            ),
            (
                "protocol name MQTX",
                &[
                    0x10, 13, 0, 4, b'M', b'Q', b'T', b'X', 4, 2, 0, 60, 0, 1, b'a',
                ],
            ),
        ];
        for (name, bytes) in cases {
            assert!(decode_all(bytes).is_err(), "{name} was accepted");
        }
    }

    #[test]
    fn oversized_packet_is_refused_from_its_header() {
        // Declares 256 MB; only the header has arrived.
        let got = decode_all(&[0x30, 0xff, 0xff, 0xff, 0x7f]);
        assert!(matches!(got, Err(DecodeError::TooLarge { .. })), "{got:?}");
    }

    /// MQTT 5.0 and 3.1 clients learn from CONNACK 1 that the level is not served (their
    /// CONNECT bodies differ from 3.1.1's, so the level is read before the body).
    #[test]
    fn other_protocol_levels_are_reported_before_their_bodies_are_parsed() {
        // MQTT 5.0: a property length (0) before the client id.
        let v5 = [0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, 0, 0, 0];
        assert_eq!(
            decode_all(&v5),
            Err(DecodeError::UnsupportedProtocolLevel(5))
        );
        let v31 = [
            0x10, 15, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 2, 0, 60, 0, 1, b'a',
        ];
        assert_eq!(
            decode_all(&v31),
            Err(DecodeError::UnsupportedProtocolLevel(3))
        );
    }

    #[test]
    fn protocol_level_3_is_reported_for_a_connack() {
        let mut connect = CONNECT.to_vec();
        connect[8] = 3;
        assert_eq!(
            decode_all(&connect),
            Err(DecodeError::UnsupportedProtocolLevel(3))
        );
    }
}

/// Entry points for the fuzz targets (`fuzz/`) and their corpus regression test: decoding
/// arbitrary bytes must end in packets, "need more", or an error, never a panic.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// Decodes every packet in `data` (as one read buffer, and again split at `split`).
    pub fn decode_bytes(data: &[u8]) {
        let split = data
            .first()
            .map(|b| *b as usize % (data.len() + 1))
            .unwrap_or(0);
        for chunks in [vec![data], vec![&data[..split], &data[split..]]] {
            let mut buf = BytesMut::new();
            for chunk in chunks {
                buf.extend_from_slice(chunk);
                loop {
                    match decode(&mut buf, 64 * 1024) {
                        Ok(Some(_)) => continue,
                        Ok(None) => break,
                        Err(_) => return,
                    }
                }
            }
        }
    }

    /// A PUBLISH built from `data` encodes and decodes back to the same fields.
    pub fn publish_round_trip(data: &[u8]) {
        let Some((&flags, rest)) = data.split_first() else {
            return;
        };
        let cut = rest
            .first()
            .map(|b| *b as usize % (rest.len() + 1))
            .unwrap_or(0);
        let (topic, payload) = rest.split_at(cut);
        let Ok(topic) = std::str::from_utf8(topic) else {
            return;
        };
        if !crate::topic::valid_topic_name(topic) || topic.len() > u16::MAX as usize {
            return;
        }
        let qos = match flags % 3 {
            0 => Qos::AtMostOnce,
            1 => Qos::AtLeastOnce,
            _ => Qos::ExactlyOnce,
        };
        let pkid = if qos == Qos::AtMostOnce {
            0
        } else {
            u16::from(flags).max(1)
        };
        let out = PublishOut {
            topic,
            payload,
            qos,
            pkid,
            retain: flags & 0x40 != 0,
            dup: qos != Qos::AtMostOnce && flags & 0x80 != 0,
        };
        let mut buf = BytesMut::new();
        encode_publish(&mut buf, &out);
        match decode(&mut buf, 1 << 20) {
            Ok(Some(Inbound::Publish(p))) => {
                assert_eq!(p.topic, topic);
                assert_eq!(&p.payload[..], payload);
                assert_eq!(
                    (p.qos, p.pkid, p.retain, p.dup),
                    (qos, pkid, out.retain, out.dup)
                );
                assert!(buf.is_empty());
            }
            other => panic!("encoded PUBLISH did not decode: {other:?}"),
        }
    }
}
