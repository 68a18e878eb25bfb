//! Entry points for the fuzz targets (`fuzz/`) and their corpus regression test: decoding
//! arbitrary bytes must end in packets, "need more", or an error, never a panic.

use super::encode::{self, PublishOut};
use super::{decode, Inbound, Version};
use bytes::BytesMut;
use wharf_shared::{Properties, Qos};

/// The version to decode `data` as: before a CONNECT, or as each of the three after one
/// (chosen by the last byte, so that every corpus entry exercises one of them).
fn version_for(data: &[u8]) -> Option<Version> {
    match data.last().map_or(0, |b| b % 4) {
        0 => None,
        1 => Some(Version::V3_1),
        2 => Some(Version::V3_1_1),
        _ => Some(Version::V5),
    }
}

/// Decodes every packet in `data` (as one read buffer, and again split at `split`); a
/// CONNECT fixes the version of what follows, as on a connection.
pub fn decode_bytes(data: &[u8]) {
    let split = data
        .first()
        .map(|b| *b as usize % (data.len() + 1))
        .unwrap_or(0);
    for chunks in [vec![data], vec![&data[..split], &data[split..]]] {
        let mut buf = BytesMut::new();
        let mut version = version_for(data);
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            loop {
                match decode(&mut buf, version, 64 * 1024) {
                    Ok(Some(Inbound::Connect(c))) => version = Some(c.version),
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
        }
    }
}

/// Decodes every packet in `data` as a server's packets to a client (the bridge's half), as
/// 3.1.1 and as 5.0: a hostile remote broker gets an error, never a panic.
pub fn decode_server_bytes(data: &[u8]) {
    for version in [Version::V3_1_1, Version::V5] {
        let mut buf = BytesMut::from(data);
        while let Ok(Some(_)) = super::client::decode(&mut buf, version, 64 * 1024) {}
    }
}

/// A PUBLISH built from `data` encodes and decodes back to the same fields, in 3.1.1 and,
/// with properties made from the same bytes, in 5.0.
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
    if !wharf_shared::topic::valid_topic_name(topic) || topic.len() > u16::MAX as usize {
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
    let properties = Properties {
        payload_format_indicator: (flags & 0x10 != 0).then_some(0),
        message_expiry_secs: (flags & 0x20 != 0).then_some(u32::from(flags)),
        content_type: (flags & 0x08 != 0).then(|| topic.to_owned()),
        response_topic: None,
        correlation_data: (flags & 0x04 != 0).then(|| payload.iter().take(64).copied().collect()),
        user_properties: if flags & 0x02 != 0 {
            vec![
                (topic.to_owned(), "v".to_owned()),
                ("k".into(), topic.to_owned()),
            ]
        } else {
            Vec::new()
        },
    };
    for version in [Version::V3_1_1, Version::V5] {
        let v5 = version.is_v5();
        let out = PublishOut {
            topic,
            payload,
            qos,
            pkid,
            retain: flags & 0x40 != 0,
            dup: qos != Qos::AtMostOnce && flags & 0x80 != 0,
            properties: v5.then_some(&properties),
            message_expiry: if v5 {
                properties.message_expiry_secs
            } else {
                None
            },
            topic_alias: None,
            subscription_ids: &[],
        };
        let mut buf = BytesMut::new();
        encode::publish(&mut buf, version, &out);
        assert_eq!(buf.len(), encode::publish_len(version, &out));
        match decode(&mut buf, Some(version), 1 << 20) {
            Ok(Some(Inbound::Publish(p))) => {
                assert_eq!(p.topic, topic);
                assert_eq!(&p.payload[..], payload);
                assert_eq!(
                    (p.qos, p.pkid, p.retain, p.dup),
                    (qos, pkid, out.retain, out.dup)
                );
                let expected = (v5 && !properties.is_empty()).then(|| properties.clone());
                assert_eq!(p.properties.map(|b| *b), expected);
                assert!(buf.is_empty());
            }
            other => panic!("encoded PUBLISH did not decode: {other:?}"),
        }
    }
}
