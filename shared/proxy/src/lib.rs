//! The PROXY protocol (HAProxy's, versions 1 and 2): the header a TCP load balancer puts in
//! front of a connection to pass on the client's address. On a listener that requires it, a
//! connection must start with one; one that does not (or whose header is malformed) is closed.
//!
//! Pure parsing (bytes in, a header out), on its own so that it can be fuzzed alone; the
//! edge reads exactly the header's bytes from the socket with these.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The version 2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A version 1 line is at most 107 bytes, CRLF included.
pub const V1_MAX: usize = 107;
/// Largest version 2 header accepted (addresses and TLVs after the 16 fixed bytes).
pub const V2_MAX_BODY: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyError {
    #[error("no PROXY protocol header")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
}

/// The client's address as the header gives it; `None` for a connection the proxy made for
/// itself (v1 `UNKNOWN`, v2 `LOCAL` or a family other than TCP over IPv4/IPv6): the socket's
/// own address then stands.
pub type Source = Option<SocketAddr>;

/// Parses a version 1 line (`PROXY TCP4 src dst sport dport\r\n`, CRLF included).
pub fn parse_v1(line: &[u8]) -> Result<Source, ProxyError> {
    let line = line
        .strip_suffix(b"\r\n")
        .ok_or(ProxyError::Malformed("v1 line without CRLF"))?;
    let line = std::str::from_utf8(line).map_err(|_| ProxyError::Malformed("v1 not ASCII"))?;
    let mut fields = line.split(' ');
    if fields.next() != Some("PROXY") {
        return Err(ProxyError::Missing);
    }
    let v6 = match fields.next() {
        Some("TCP4") => false,
        Some("TCP6") => true,
        Some("UNKNOWN") => return Ok(None),
        _ => {
            return Err(ProxyError::Malformed(
                "v1 protocol not TCP4, TCP6 or UNKNOWN",
            ))
        }
    };
    let (Some(src), Some(_dst), Some(sport), Some(_dport), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(ProxyError::Malformed("v1 needs four addresses and ports"));
    };
    let ip: IpAddr = match v6 {
        false => src
            .parse::<Ipv4Addr>()
            .map(IpAddr::V4)
            .map_err(|_| ProxyError::Malformed("v1 source not an IPv4 address"))?,
        true => src
            .parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| ProxyError::Malformed("v1 source not an IPv6 address"))?,
    };
    // Ports are decimal without a sign or leading zeros' tricks: u16's parser takes "+1".
    if !sport.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ProxyError::Malformed("v1 source port"));
    }
    let port = sport
        .parse::<u16>()
        .map_err(|_| ProxyError::Malformed("v1 source port"))?;
    Ok(Some(SocketAddr::new(ip, port)))
}

/// The length of a version 2 header's body, from its 16 fixed bytes.
pub fn v2_body_len(fixed: &[u8; 16]) -> Result<usize, ProxyError> {
    if fixed[..12] != V2_SIGNATURE {
        return Err(ProxyError::Missing);
    }
    if fixed[12] >> 4 != 2 {
        return Err(ProxyError::Malformed("v2 version not 2"));
    }
    let len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
    if len > V2_MAX_BODY {
        return Err(ProxyError::Malformed("v2 header too long"));
    }
    Ok(len)
}

/// Parses a version 2 header: its 16 fixed bytes and its body.
pub fn parse_v2(fixed: &[u8; 16], body: &[u8]) -> Result<Source, ProxyError> {
    if v2_body_len(fixed)? != body.len() {
        return Err(ProxyError::Malformed("v2 length"));
    }
    match fixed[12] & 0x0f {
        0 => return Ok(None), // LOCAL: the proxy's own connection (a health check)
        1 => {}
        _ => return Err(ProxyError::Malformed("v2 command not LOCAL or PROXY")),
    }
    let (family, transport) = (fixed[13] >> 4, fixed[13] & 0x0f);
    if transport != 1 {
        // UNSPEC, datagrams, Unix sockets: no client address to take.
        return Ok(None);
    }
    match family {
        1 => {
            let a = body
                .get(..12)
                .ok_or(ProxyError::Malformed("v2 IPv4 addresses short"))?;
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Ok(Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([a[8], a[9]]),
            )))
        }
        2 => {
            let a = body
                .get(..36)
                .ok_or(ProxyError::Malformed("v2 IPv6 addresses short"))?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&a[..16]);
            Ok(Some(SocketAddr::new(
                Ipv6Addr::from(octets).into(),
                u16::from_be_bytes([a[32], a[33]]),
            )))
        }
        _ => Ok(None),
    }
}
