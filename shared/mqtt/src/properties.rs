//! The data types of MQTT packets (MQTT 5.0 section 1.5): a cursor that reads them from one
//! packet's bytes, checking each, and the writers for the encoder.

use super::DecodeError;
use bytes::{BufMut, Bytes, BytesMut};

/// MQTT 5.0 property identifiers (section 2.2.2.2).
pub mod id {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

/// Largest Variable Byte Integer (four bytes).
pub const MAX_VARIABLE_INT: u32 = 268_435_455;

fn short() -> DecodeError {
    DecodeError::Malformed("packet shorter than its fields".into())
}

/// Reads the fields of one packet, front to back.
pub struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn remaining(&self) -> usize {
        self.bytes.len()
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(short());
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    /// The rest of the packet.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A Variable Byte Integer in its shortest form is not required by the specification,
    /// but at most four bytes are.
    pub fn variable_int(&mut self) -> Result<u32, DecodeError> {
        let mut value = 0u32;
        for i in 0..4 {
            let byte = self.u8()?;
            value |= u32::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::Malformed(
            "variable byte integer of more than 4 bytes".into(),
        ))
    }

    pub fn binary(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u16()? as usize;
        self.take(len)
    }

    /// A UTF-8 Encoded String: well-formed UTF-8 (MQTT-1.5.4-1), without U+0000
    /// (MQTT-1.5.4-2).
    pub fn string(&mut self) -> Result<String, DecodeError> {
        let bytes = self.binary()?;
        let s = std::str::from_utf8(bytes)
            .map_err(|_| DecodeError::Malformed("ill-formed UTF-8 in a string".into()))?;
        if s.contains('\0') {
            return Err(DecodeError::Malformed("U+0000 in a string".into()));
        }
        Ok(s.to_owned())
    }

    /// The property block: its length, then a reader over exactly its bytes.
    pub fn properties(&mut self) -> Result<Reader<'a>, DecodeError> {
        let len = self.variable_int()? as usize;
        if len > self.bytes.len() {
            return Err(DecodeError::Malformed(
                "property length beyond the packet".into(),
            ));
        }
        Ok(Reader::new(self.take(len)?))
    }
}

/// Tracks which properties a block held: each may appear once, except the User Property
/// (and the Subscription Identifier, in a PUBLISH from the server).
#[derive(Default)]
pub struct Seen(u64);

impl Seen {
    pub fn once(&mut self, id: u8) -> Result<(), DecodeError> {
        let bit = 1u64 << (id & 0x3f);
        if self.0 & bit != 0 {
            return Err(DecodeError::Protocol(format!(
                "property {id:#04x} appears twice"
            )));
        }
        self.0 |= bit;
        Ok(())
    }
}

/// A 0/1 byte property.
pub fn flag(reader: &mut Reader<'_>, id: u8) -> Result<bool, DecodeError> {
    match reader.u8()? {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(DecodeError::Protocol(format!(
            "property {id:#04x} is {other}, not 0 or 1"
        ))),
    }
}

pub fn not_allowed(id: u8, packet: &str) -> DecodeError {
    DecodeError::Protocol(format!("property {id:#04x} is not allowed in {packet}"))
}

pub fn put_variable_int(buf: &mut BytesMut, mut value: usize) {
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

pub fn variable_int_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

pub fn put_string(buf: &mut BytesMut, s: &str) {
    buf.put_u16(s.len() as u16);
    buf.put_slice(s.as_bytes());
}

pub fn put_binary(buf: &mut BytesMut, b: &[u8]) {
    buf.put_u16(b.len() as u16);
    buf.put_slice(b);
}

/// Copies `bytes` out of the read buffer.
pub fn owned(bytes: &[u8]) -> Bytes {
    Bytes::copy_from_slice(bytes)
}
