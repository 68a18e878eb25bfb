//! The client's half of the protocol, for the bridge: the packets a client sends, as bytes
//! for 3.1.1 or 5.0, and the packets a server sends, decoded and checked like the server's
//! half ([`super::decode`]). PUBLISH and its acknowledgements have one format both ways and
//! reuse [`super::encode::publish`] and [`super::encode::puback`].

use super::decode::{ack, all_read, each_property, publish_from, whole_packet};
use super::properties::{id, put_binary, put_string, put_variable_int, Reader};
use super::{Ack, DecodeError, PublishIn, Version};
use bytes::{Buf, BufMut, BytesMut};
use wharf_shared::Qos;

/// The CONNECT a bridge sends.
pub struct ConnectOut<'a> {
    pub version: Version,
    pub client_id: &'a str,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    /// 5.0 Session Expiry Interval (3.1.1: a persistent session is `!clean_start`).
    pub session_expiry: u32,
    /// 5.0 Receive Maximum: QoS 1/2 messages the server may have unacknowledged towards us.
    pub receive_maximum: u16,
    /// 5.0 Maximum Packet Size we accept.
    pub max_packet_size: Option<u32>,
}

pub fn connect(buf: &mut BytesMut, c: &ConnectOut<'_>) {
    let v5 = c.version.is_v5();
    let mut props = BytesMut::new();
    if v5 {
        if c.session_expiry != 0 {
            props.put_u8(id::SESSION_EXPIRY_INTERVAL);
            props.put_u32(c.session_expiry);
        }
        if c.receive_maximum != u16::MAX {
            props.put_u8(id::RECEIVE_MAXIMUM);
            props.put_u16(c.receive_maximum.max(1));
        }
        if let Some(max) = c.max_packet_size {
            props.put_u8(id::MAXIMUM_PACKET_SIZE);
            props.put_u32(max);
        }
    }
    let mut body = BytesMut::new();
    put_string(&mut body, "MQTT");
    body.put_u8(if v5 { 5 } else { 4 });
    let mut flags = u8::from(c.clean_start) << 1;
    if c.username.is_some() {
        flags |= 0x80;
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    body.put_u8(flags);
    body.put_u16(c.keep_alive);
    if v5 {
        put_variable_int(&mut body, props.len());
        body.put_slice(&props);
    }
    put_string(&mut body, c.client_id);
    if let Some(user) = c.username {
        put_string(&mut body, user);
    }
    if let Some(password) = c.password {
        put_binary(&mut body, password);
    }
    buf.put_u8(0x10);
    put_variable_int(buf, body.len());
    buf.put_slice(&body);
}

/// One filter of a SUBSCRIBE. In 5.0 the bridge asks for No Local (what it publishes itself
/// is not sent back to it), Retain As Published, and retained messages only for a new
/// subscription (a resumed session has had them).
pub struct FilterOut<'a> {
    pub filter: &'a str,
    pub qos: Qos,
    pub no_local: bool,
}

pub fn subscribe(buf: &mut BytesMut, version: Version, pkid: u16, filters: &[FilterOut<'_>]) {
    let v5 = version.is_v5();
    let mut len = 2 + usize::from(v5);
    for f in filters {
        len += 2 + f.filter.len() + 1;
    }
    buf.put_u8(0x82);
    put_variable_int(buf, len);
    buf.put_u16(pkid);
    if v5 {
        buf.put_u8(0);
    }
    for f in filters {
        put_string(buf, f.filter);
        let mut options = f.qos.as_u8();
        if v5 {
            options |= u8::from(f.no_local) << 2 | 1 << 3 | 1 << 4;
        }
        buf.put_u8(options);
    }
}

pub fn pingreq(buf: &mut BytesMut) {
    buf.put_slice(&[0xc0, 0]);
}

/// A normal DISCONNECT (5.0: reason Success, the will is not sent).
pub fn disconnect(buf: &mut BytesMut, version: Version) {
    if version.is_v5() {
        buf.put_slice(&[0xe0, 1, 0]);
    } else {
        buf.put_slice(&[0xe0, 0]);
    }
}

/// A CONNACK as the client reads it; 5.0 properties at their defaults when absent.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnAck {
    pub session_present: bool,
    /// 0: accepted; otherwise the 3.1.1 return code or 5.0 reason code.
    pub code: u8,
    pub receive_maximum: u16,
    pub max_packet_size: Option<u32>,
    pub maximum_qos: u8,
    pub server_keep_alive: Option<u16>,
    pub reason_string: Option<String>,
}

/// Packets a server may send to a client that uses QoS 0 and 1 only.
#[derive(Debug, Clone, PartialEq)]
pub enum FromServer {
    ConnAck(ConnAck),
    Publish(PublishIn),
    PubAck(Ack),
    SubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    PingResp,
    /// 5.0 reason code (0 for 3.1.1, which has no server DISCONNECT).
    Disconnect {
        reason: u8,
        reason_string: Option<String>,
    },
}

/// Decodes one packet from a server; `Ok(None)` until a whole one has arrived.
pub fn decode(
    buf: &mut BytesMut,
    version: Version,
    max_packet_size: usize,
) -> Result<Option<FromServer>, DecodeError> {
    let Some((header_len, size)) = whole_packet(buf, max_packet_size)? else {
        return Ok(None);
    };
    let byte1 = buf[0];
    let v5 = version.is_v5();
    let mut r = Reader::new(&buf[header_len..size]);
    let packet = match byte1 >> 4 {
        2 => FromServer::ConnAck(connack(&mut r, v5)?),
        3 => {
            let qos = (byte1 >> 1) & 0b11;
            if qos == 3 || (qos == 0 && byte1 & 0x08 != 0) {
                return Err(DecodeError::Malformed(format!(
                    "PUBLISH flags {byte1:#04x}"
                )));
            }
            FromServer::Publish(publish_from(byte1, &mut r, v5, true)?)
        }
        4 => FromServer::PubAck(ack(&mut r, v5)?),
        9 => {
            let pkid = r.u16()?;
            if v5 {
                each_property(&mut r.properties()?, "SUBACK", |pid, r| {
                    if pid == id::REASON_STRING {
                        r.string()?;
                        return Ok(true);
                    }
                    Ok(false)
                })?;
            }
            FromServer::SubAck {
                pkid,
                codes: r.rest().to_vec(),
            }
        }
        13 => FromServer::PingResp,
        14 => {
            let mut reason = 0;
            let mut reason_string = None;
            if v5 && !r.is_empty() {
                reason = r.u8()?;
                if !r.is_empty() {
                    each_property(&mut r.properties()?, "DISCONNECT", |pid, r| match pid {
                        id::REASON_STRING => {
                            reason_string = Some(r.string()?);
                            Ok(true)
                        }
                        id::SERVER_REFERENCE => {
                            r.string()?;
                            Ok(true)
                        }
                        _ => Ok(false),
                    })?;
                }
            }
            FromServer::Disconnect {
                reason,
                reason_string,
            }
        }
        other => return Err(DecodeError::UnexpectedPacket(other)),
    };
    all_read(&r, byte1)?;
    buf.advance(size);
    Ok(Some(packet))
}

fn connack(r: &mut Reader<'_>, v5: bool) -> Result<ConnAck, DecodeError> {
    let flags = r.u8()?;
    let mut c = ConnAck {
        session_present: flags & 1 != 0,
        code: r.u8()?,
        receive_maximum: u16::MAX,
        max_packet_size: None,
        maximum_qos: 2,
        server_keep_alive: None,
        reason_string: None,
    };
    if v5 && !r.is_empty() {
        each_property(&mut r.properties()?, "CONNACK", |pid, r| {
            match pid {
                id::RECEIVE_MAXIMUM => c.receive_maximum = r.u16()?.max(1),
                id::MAXIMUM_PACKET_SIZE => c.max_packet_size = Some(r.u32()?),
                id::MAXIMUM_QOS => c.maximum_qos = r.u8()?,
                id::SERVER_KEEP_ALIVE => c.server_keep_alive = Some(r.u16()?),
                id::REASON_STRING => c.reason_string = Some(r.string()?),
                id::SESSION_EXPIRY_INTERVAL => {
                    r.u32()?;
                }
                id::ASSIGNED_CLIENT_IDENTIFIER | id::RESPONSE_INFORMATION => {
                    r.string()?;
                }
                id::SERVER_REFERENCE | id::AUTHENTICATION_METHOD => {
                    r.string()?;
                }
                id::AUTHENTICATION_DATA => {
                    r.binary()?;
                }
                id::TOPIC_ALIAS_MAXIMUM => {
                    r.u16()?;
                }
                id::RETAIN_AVAILABLE
                | id::WILDCARD_SUBSCRIPTION_AVAILABLE
                | id::SUBSCRIPTION_IDENTIFIER_AVAILABLE
                | id::SHARED_SUBSCRIPTION_AVAILABLE => {
                    r.u8()?;
                }
                _ => return Ok(false),
            }
            Ok(true)
        })?;
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode as server_decode, encode, Inbound};

    #[test]
    fn a_connect_reads_back_as_the_server_sees_it() {
        for version in [Version::V3_1_1, Version::V5] {
            let mut buf = BytesMut::new();
            connect(
                &mut buf,
                &ConnectOut {
                    version,
                    client_id: "bridge-1",
                    clean_start: false,
                    keep_alive: 30,
                    username: Some("u"),
                    password: Some(b"p"),
                    session_expiry: u32::MAX,
                    receive_maximum: 20,
                    max_packet_size: Some(1 << 20),
                },
            );
            let Some(Inbound::Connect(c)) =
                server_decode(&mut buf, None, 1 << 20).expect("decodes")
            else {
                panic!("not a CONNECT");
            };
            assert_eq!(c.version, version);
            assert_eq!(c.client_id, "bridge-1");
            assert!(!c.clean_start);
            assert_eq!(c.keep_alive, 30);
            assert_eq!(c.username.as_deref(), Some("u"));
            assert_eq!(c.password.as_deref(), Some(&b"p"[..]));
            if version.is_v5() {
                assert_eq!(c.session_expiry, u32::MAX);
                assert_eq!(c.receive_maximum, 20);
                assert_eq!(c.max_packet_size, Some(1 << 20));
            }
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn a_subscribe_reads_back_with_its_options() {
        for version in [Version::V3_1_1, Version::V5] {
            let mut buf = BytesMut::new();
            let filters = [
                FilterOut {
                    filter: "a/#",
                    qos: Qos::AtLeastOnce,
                    no_local: true,
                },
                FilterOut {
                    filter: "b/+",
                    qos: Qos::AtMostOnce,
                    no_local: false,
                },
            ];
            subscribe(&mut buf, version, 7, &filters);
            let decoded = server_decode(&mut buf, Some(version), 1 << 20).expect("decodes");
            let Some(Inbound::Subscribe { pkid, filters, .. }) = decoded else {
                panic!("not a SUBSCRIBE: {decoded:?}");
            };
            assert_eq!(pkid, 7);
            assert_eq!(filters[0].filter, "a/#");
            assert_eq!(filters[0].qos, Qos::AtLeastOnce);
            assert_eq!(filters[0].no_local, version.is_v5());
            assert_eq!(filters[1].filter, "b/+");
            assert!(!filters[1].no_local);
        }
    }

    #[test]
    fn server_packets_decode() {
        for version in [Version::V3_1_1, Version::V5] {
            let mut buf = BytesMut::new();
            let props = encode::ConnackProperties {
                receive_maximum: Some(20),
                max_packet_size: Some(4096),
                maximum_qos: Some(1),
                ..Default::default()
            };
            encode::connack(&mut buf, version, true, 0, &props);
            encode::suback(&mut buf, version, 3, &[1, 0x80]);
            encode::puback(&mut buf, version, 9, 0);
            encode::publish(
                &mut buf,
                version,
                &encode::PublishOut {
                    topic: "t/1",
                    payload: b"hi",
                    qos: Qos::AtLeastOnce,
                    pkid: 5,
                    retain: true,
                    dup: false,
                    properties: None,
                    message_expiry: None,
                    topic_alias: None,
                    subscription_ids: &[4],
                },
            );
            encode::pingresp(&mut buf);
            let mut out = Vec::new();
            while let Some(p) = decode(&mut buf, version, 1 << 20).expect("decodes") {
                out.push(p);
            }
            let FromServer::ConnAck(ack) = &out[0] else {
                panic!("{out:?}")
            };
            assert!(ack.session_present);
            assert_eq!(ack.code, 0);
            if version.is_v5() {
                assert_eq!(ack.receive_maximum, 20);
                assert_eq!(ack.max_packet_size, Some(4096));
                assert_eq!(ack.maximum_qos, 1);
            }
            assert_eq!(
                out[1],
                FromServer::SubAck {
                    pkid: 3,
                    codes: vec![1, 0x80]
                }
            );
            assert_eq!(out[2], FromServer::PubAck(Ack { pkid: 9, reason: 0 }));
            let FromServer::Publish(p) = &out[3] else {
                panic!("{out:?}")
            };
            assert_eq!(
                (p.topic.as_str(), &p.payload[..], p.pkid),
                ("t/1", &b"hi"[..], 5)
            );
            assert!(p.retain);
            assert_eq!(out[4], FromServer::PingResp);
        }
    }

    #[test]
    fn a_truncated_or_oversized_packet_is_an_error_or_waits() {
        let mut buf = BytesMut::from(&[0x20u8, 2, 0][..]);
        assert_eq!(decode(&mut buf, Version::V3_1_1, 100).expect("waits"), None);
        let mut buf = BytesMut::from(&[0x30u8, 0x7f][..]);
        assert!(decode(&mut buf, Version::V3_1_1, 10).is_err());
        let mut buf = BytesMut::from(&[0x20u8, 3, 0, 0, 9][..]);
        assert!(decode(&mut buf, Version::V3_1_1, 100).is_err());
    }
}
