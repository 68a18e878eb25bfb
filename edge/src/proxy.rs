//! The PROXY protocol (HAProxy's, versions 1 and 2): the header a TCP load balancer puts in
//! front of a connection to pass on the client's address. On a listener that requires it, a
//! connection must start with one; one that does not (or whose header is malformed) is closed.
//!
//! The parsing is pure (bytes in, a header out); [`read_header`] reads exactly the header's
//! bytes from the socket, so that what follows (TLS, a WebSocket upgrade, MQTT) is untouched.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The version 2 signature.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A version 1 line is at most 107 bytes, CRLF included.
const V1_MAX: usize = 107;
/// Largest version 2 header accepted (addresses and TLVs after the 16 fixed bytes).
const V2_MAX_BODY: usize = 4096;

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

/// Reads the header at the start of `stream`, and nothing after it.
pub async fn read_header<R: AsyncRead + Unpin>(stream: &mut R) -> Result<Source, ProxyError> {
    let read_failed = |_| ProxyError::Missing;
    let mut fixed = [0u8; 16];
    // Both versions' headers are at least 16 bytes ("PROXY UNKNOWN\r\n" is 15: read it
    // byte by byte below).
    stream
        .read_exact(&mut fixed[..8])
        .await
        .map_err(read_failed)?;
    if fixed.starts_with(b"PROXY ") {
        let mut line = fixed[..8].to_vec();
        while !line.ends_with(b"\r\n") {
            if line.len() >= V1_MAX {
                return Err(ProxyError::Malformed("v1 line longer than 107 bytes"));
            }
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await.map_err(read_failed)?;
            line.push(byte[0]);
        }
        return parse_v1(&line);
    }
    if fixed[..8] != V2_SIGNATURE[..8] {
        return Err(ProxyError::Missing);
    }
    stream
        .read_exact(&mut fixed[8..])
        .await
        .map_err(read_failed)?;
    let mut body = vec![0u8; v2_body_len(&fixed)?];
    stream.read_exact(&mut body).await.map_err(read_failed)?;
    parse_v2(&fixed, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut header = V2_SIGNATURE.to_vec();
        header.push(0x20 | command);
        header.push(family);
        header.extend_from_slice(&(body.len() as u16).to_be_bytes());
        header.extend_from_slice(body);
        header
    }

    async fn read(bytes: &[u8]) -> (Result<Source, ProxyError>, Vec<u8>) {
        let mut cursor = std::io::Cursor::new(bytes.to_vec());
        let header = read_header(&mut cursor).await;
        let mut rest = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut cursor, &mut rest)
            .await
            .expect("rest");
        (header, rest)
    }

    #[tokio::test]
    async fn v1_gives_the_source_and_leaves_what_follows() {
        let (header, rest) = read(b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 1883\r\n\x10\x0c").await;
        assert_eq!(header, Ok(Some("192.0.2.7:51234".parse().expect("addr"))));
        assert_eq!(rest, b"\x10\x0c");
        let (header, _) = read(b"PROXY TCP6 2001:db8::1 ::1 4000 1883\r\n").await;
        assert_eq!(
            header,
            Ok(Some("[2001:db8::1]:4000".parse().expect("addr")))
        );
        let (header, rest) = read(b"PROXY UNKNOWN\r\nX").await;
        assert_eq!((header, rest), (Ok(None), b"X".to_vec()));
    }

    #[tokio::test]
    async fn v2_gives_the_source_and_skips_tlvs() {
        let mut body = vec![198, 51, 100, 9, 10, 0, 0, 1];
        body.extend_from_slice(&40000u16.to_be_bytes());
        body.extend_from_slice(&1883u16.to_be_bytes());
        body.extend_from_slice(&[0x04, 0x00, 0x01, 0xAA]); // a TLV (NOOP)
        let mut bytes = v2(1, 0x11, &body);
        bytes.extend_from_slice(b"\x10");
        let (header, rest) = read(&bytes).await;
        assert_eq!(
            header,
            Ok(Some("198.51.100.9:40000".parse().expect("addr")))
        );
        assert_eq!(rest, b"\x10");
        let mut body6 = vec![0u8; 36];
        body6[15] = 5;
        body6[32..34].copy_from_slice(&7u16.to_be_bytes());
        let (header, _) = read(&v2(1, 0x21, &body6)).await;
        assert_eq!(header, Ok(Some("[::5]:7".parse().expect("addr"))));
        let (header, rest) = read(&v2(0, 0x00, &[])).await;
        assert_eq!((header, rest), (Ok(None), vec![]));
    }

    /// Arbitrary bytes (and mutations of good headers) give a header or an error, never a
    /// panic. A cheap stand-in for the `proxy_header` fuzz target in CI.
    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let good_v1 = b"PROXY TCP6 2001:db8::1 ::1 4000 1883\r\n".to_vec();
        let good_v2 = v2(1, 0x21, &[7u8; 36]);
        for round in 0..50_000 {
            let mut bytes = match round % 3 {
                0 => good_v1.clone(),
                1 => good_v2.clone(),
                _ => (0..next() % 64).map(|_| next() as u8).collect(),
            };
            for _ in 0..(next() % 4) {
                if !bytes.is_empty() {
                    let i = (next() as usize) % bytes.len();
                    bytes[i] = next() as u8;
                }
            }
            let _ = parse_v1(&bytes);
            if let Some((fixed, body)) = bytes.split_first_chunk::<16>() {
                let _ = parse_v2(fixed, body);
            }
        }
    }

    #[tokio::test]
    async fn missing_and_malformed_headers_are_refused() {
        // An MQTT CONNECT where a header should be.
        let (header, _) = read(b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x00").await;
        assert_eq!(header, Err(ProxyError::Missing));
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2"[..], // no CRLF: the stream ends
            b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 2\r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        ] {
            let (header, _) = read(bad).await;
            assert!(
                header.is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(bad)
            );
        }
        let long = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 200], b"\r\n"].concat();
        assert!(read(&long).await.0.is_err());
        assert!(
            read(&v2(1, 0x11, &[1, 2, 3])).await.0.is_err(),
            "short addresses"
        );
        assert!(
            read(&v2(2, 0x11, &[0; 12])).await.0.is_err(),
            "unknown command"
        );
        let mut wrong_version = v2(1, 0x11, &[0; 12]);
        wrong_version[12] = 0x11;
        assert!(read(&wrong_version).await.0.is_err());
        let mut huge = v2(1, 0x11, &[]);
        huge[14..16].copy_from_slice(&60000u16.to_be_bytes());
        assert!(read(&huge).await.0.is_err(), "header longer than the bound");
    }
}
