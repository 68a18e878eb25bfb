//! The PROXY protocol header on a listener that requires it: [`read_header`] reads exactly
//! the header's bytes from the socket, so that what follows (TLS, a WebSocket upgrade, MQTT)
//! is untouched; the parsing is `wharf-proxy`'s.

use tokio::io::{AsyncRead, AsyncReadExt};
pub use wharf_proxy::*;

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
