use super::encode::{self, ConnackProperties, PublishOut};
use super::*;
use bytes::{BufMut, BytesMut};

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

fn decode_as(version: Option<Version>, bytes: &[u8]) -> Result<Option<Inbound>, DecodeError> {
    decode(&mut BytesMut::from(bytes), version, 1024)
}

fn decode_all(bytes: &[u8]) -> Result<Option<Inbound>, DecodeError> {
    let version = (bytes.first() != Some(&0x10)).then_some(Version::V3_1_1);
    decode_as(version, bytes)
}

/// A packet: first byte, then the remaining length and `body`.
fn packet(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    buf.put_u8(byte1);
    super::properties::put_variable_int(&mut buf, body.len());
    buf.put_slice(body);
    buf.to_vec()
}

fn string(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

/// A 5.0 CONNECT with `flags`, the property block `props` and then `payload`.
fn connect_v5(flags: u8, props: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = string("MQTT");
    body.extend_from_slice(&[5, flags, 0, 30, props.len() as u8]);
    body.extend_from_slice(props);
    body.extend_from_slice(payload);
    packet(0x10, &body)
}

fn connect(version: Option<Version>, bytes: &[u8]) -> Connect {
    match decode_as(version, bytes) {
        Ok(Some(Inbound::Connect(c))) => *c,
        other => panic!("not a CONNECT: {other:?}"),
    }
}

#[test]
fn connect_decodes_when_fed_one_byte_at_a_time() {
    let mut buf = BytesMut::new();
    for (i, b) in CONNECT.iter().enumerate() {
        buf.put_u8(*b);
        let got = decode(&mut buf, None, 1024).expect("valid prefix");
        if i + 1 < CONNECT.len() {
            assert_eq!(got, None, "decoded early at byte {i}");
        } else {
            let Some(Inbound::Connect(c)) = got else {
                panic!("not a connect: {got:?}")
            };
            assert_eq!(c.client_id, "dev1");
            assert_eq!(c.version, Version::V3_1_1);
            assert!(c.clean_start);
            assert_eq!(c.keep_alive, 60);
        }
    }
    assert!(buf.is_empty());
}

#[test]
fn publish_round_trips_through_encoder_and_decoder() {
    let props = wharf_shared::Properties {
        payload_format_indicator: Some(1),
        message_expiry_secs: Some(30),
        content_type: Some("text/plain".into()),
        response_topic: Some("r/1".into()),
        correlation_data: Some(vec![0, 1, 2]),
        user_properties: vec![
            ("b".into(), "2".into()),
            ("a".into(), "1".into()),
            ("b".into(), "3".into()),
        ],
    };
    for version in [Version::V3_1, Version::V3_1_1, Version::V5] {
        let mut buf = BytesMut::new();
        let out = PublishOut {
            topic: "a/b",
            payload: b"1,2",
            qos: Qos::ExactlyOnce,
            pkid: 77,
            retain: true,
            dup: true,
            properties: Some(&props),
            message_expiry: Some(12),
            topic_alias: None,
            subscription_ids: &[],
        };
        encode::publish(&mut buf, version, &out);
        assert_eq!(buf.len(), encode::publish_len(version, &out));
        let Some(Inbound::Publish(p)) = decode(&mut buf, Some(version), 1024).expect("decode")
        else {
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
        if version.is_v5() {
            let got = p.properties.expect("properties");
            // The expiry left replaces the published one; the rest comes back as it went,
            // user properties in their order.
            assert_eq!(got.message_expiry_secs, Some(12));
            assert_eq!(
                wharf_shared::Properties {
                    message_expiry_secs: Some(30),
                    ..*got
                },
                props
            );
        } else {
            assert_eq!(p.properties, None);
        }
    }
}

#[test]
fn a_5_0_publish_with_subscription_ids_and_an_alias_is_byte_exact() {
    let mut buf = BytesMut::new();
    encode::publish(
        &mut buf,
        Version::V5,
        &PublishOut {
            topic: "",
            payload: b"x",
            qos: Qos::AtMostOnce,
            pkid: 0,
            retain: false,
            dup: false,
            properties: None,
            message_expiry: None,
            topic_alias: Some(2),
            subscription_ids: &[1, 200],
        },
    );
    assert_eq!(
        &buf[..],
        &[0x30, 12, 0, 0, 8, 0x23, 0, 2, 0x0b, 1, 0x0b, 0xc8, 0x01, b'x']
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
        (
            "subscribe option bits above the QoS",
            &[0x82, 6, 0, 1, 0, 1, b'a', 4],
        ),
        ("packet id 0", &[0x32, 5, 0, 1, b'a', 0, 0]),
        ("puback with a reason code in 3.1.1", &[0x40, 3, 0, 1, 0]),
        ("disconnect with a body in 3.1.1", &[0xe0, 1, 0]),
        ("type 0", &[0x00, 0]),
        ("auth in 3.1.1", &[0xf0, 0]),
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
            "a password without a user name in 3.1.1",
            &[
                0x10, 16, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x42, 0, 60, 0, 1, b'a', 0, 1, b'p',
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
                0x10, 18, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x1e, 0, 60, 0, 1, b'a', 0, 1, b't', 0,
                0,
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
fn bad_5_0_packets_are_refused_with_their_reason() {
    let v5 = Some(Version::V5);
    use reason::{MALFORMED_PACKET as M, PROTOCOL_ERROR as P};
    let cases: Vec<(&str, Vec<u8>, u8)> = vec![
        // PUBLISH "a", QoS 0, properties...
        (
            "a property twice",
            packet(0x30, &[0, 1, b'a', 4, 0x01, 0, 0x01, 1]),
            P,
        ),
        (
            "a property length past the packet",
            packet(0x30, &[0, 1, b'a', 9, 0x01, 0]),
            M,
        ),
        (
            "a subscription id from a client",
            packet(0x30, &[0, 1, b'a', 2, 0x0b, 1]),
            P,
        ),
        (
            "a property of another packet",
            packet(0x30, &[0, 1, b'a', 2, 0x21, 1]),
            P,
        ),
        (
            "payload format 2",
            packet(0x30, &[0, 1, b'a', 2, 0x01, 2]),
            P,
        ),
        (
            "a response topic with a wildcard",
            packet(0x30, &[0, 1, b'a', 4, 0x08, 0, 1, b'#']),
            P,
        ),
        // SUBSCRIBE id 1, properties, "a" with options.
        (
            "subscription identifier 0",
            packet(0x82, &[0, 1, 2, 0x0b, 0, 0, 1, b'a', 0]),
            P,
        ),
        (
            "retain handling 3",
            packet(0x82, &[0, 1, 0, 0, 1, b'a', 0x30]),
            P,
        ),
        (
            "reserved option bits",
            packet(0x82, &[0, 1, 0, 0, 1, b'a', 0x40]),
            M,
        ),
        (
            "an unknown disconnect property",
            packet(0xe0, &[0, 2, 0x02, 0]),
            P,
        ),
    ];
    for (name, bytes, expected) in cases {
        match decode_as(v5, &bytes) {
            Err(e) => assert_eq!(e.reason(), expected, "{name}: {e}"),
            Ok(p) => panic!("{name} was accepted: {p:?}"),
        }
    }
    let auth_data_alone = connect_v5(2, &[0x16, 0, 1, 9], &string("c"));
    assert_eq!(
        decode_as(None, &auth_data_alone).map_err(|e| e.reason()),
        Err(P)
    );
    let receive_max_0 = connect_v5(2, &[0x21, 0, 0], &string("c"));
    assert_eq!(
        decode_as(None, &receive_max_0).map_err(|e| e.reason()),
        Err(P)
    );
}

#[test]
fn a_5_0_connect_carries_its_properties_and_its_will_properties() {
    let mut props = vec![0x11, 0, 0, 0, 60, 0x21, 0, 5, 0x27, 0, 0, 1, 0, 0x22, 0, 3];
    props.extend_from_slice(&[0x26]);
    props.extend(string("k"));
    props.extend(string("v"));
    let mut payload = string("dev");
    let will_props = [0x18, 0, 0, 0, 9, 0x02, 0, 0, 0, 30, 0x03, 0, 1, b't'];
    payload.push(will_props.len() as u8);
    payload.extend_from_slice(&will_props);
    payload.extend(string("w/t"));
    payload.extend(string("bye"));
    payload.extend(string("u"));
    payload.extend(string("pw"));
    // Will QoS 1, will flag, user name and password, clean start.
    let c = connect(None, &connect_v5(0xce, &props, &payload));
    assert_eq!(c.version, Version::V5);
    assert_eq!(
        (
            c.client_id.as_str(),
            c.clean_start,
            c.session_expiry,
            c.receive_maximum
        ),
        ("dev", true, 60, 5)
    );
    assert_eq!((c.max_packet_size, c.topic_alias_max), (Some(256), 3));
    assert_eq!(c.user_properties, vec![("k".to_owned(), "v".to_owned())]);
    assert_eq!(c.username.as_deref(), Some("u"));
    assert_eq!(c.password.as_deref(), Some(&b"pw"[..]));
    let will = c.will.expect("will");
    assert_eq!(
        (will.topic.as_str(), &will.payload[..], will.qos),
        ("w/t", &b"bye"[..], Qos::AtLeastOnce)
    );
    assert_eq!(will.delay_secs, 9);
    let wp = will.properties.expect("will properties");
    assert_eq!(
        (wp.message_expiry_secs, wp.content_type.as_deref()),
        (Some(30), Some("t"))
    );
    // 5.0 allows a password without a user name.
    let c = connect(
        None,
        &connect_v5(0x42, &[], &[string("d"), string("pw")].concat()),
    );
    assert_eq!(
        (c.username, c.password.as_deref()),
        (None, Some(&b"pw"[..]))
    );
}

#[test]
fn mqtt_3_1_connects_with_its_own_protocol_name() {
    let mut body = string("MQIsdp");
    body.extend_from_slice(&[3, 2, 0, 10]);
    body.extend(string("old-device"));
    let c = connect(None, &packet(0x10, &body));
    assert_eq!(
        (c.version, c.client_id.as_str()),
        (Version::V3_1, "old-device")
    );
    // "MQTT" at level 3, or "MQIsdp" at level 4, is not a protocol that exists.
    let mut body = string("MQIsdp");
    body.extend_from_slice(&[4, 2, 0, 10]);
    body.extend(string("d"));
    assert_eq!(
        decode_as(None, &packet(0x10, &body)),
        Err(DecodeError::UnsupportedProtocolLevel(4))
    );
    let mut connect = CONNECT.to_vec();
    connect[8] = 3;
    assert_eq!(
        decode_as(None, &connect),
        Err(DecodeError::UnsupportedProtocolLevel(3))
    );
    connect[8] = 6;
    assert_eq!(
        decode_as(None, &connect),
        Err(DecodeError::UnsupportedProtocolLevel(6))
    );
}

#[test]
fn only_one_connect_and_nothing_before_it() {
    assert!(matches!(
        decode_as(None, &[0xc0, 0]),
        Err(DecodeError::Protocol(_))
    ));
    assert!(matches!(
        decode_as(Some(Version::V3_1_1), CONNECT),
        Err(DecodeError::Protocol(_))
    ));
}

#[test]
fn the_size_limit_counts_the_whole_packet_and_is_checked_from_its_header() {
    // Declares 256 MB; only the header has arrived.
    let got = decode_all(&[0x30, 0xff, 0xff, 0xff, 0x7f]);
    assert!(matches!(got, Err(DecodeError::TooLarge { .. })), "{got:?}");
    // 2 header bytes + 8: over a limit of 9, though its remaining length is 8.
    let publish = packet(0x30, &[0, 1, b'a', b'1', b'2', b'3', b'4', b'5']);
    assert!(matches!(
        decode(&mut BytesMut::from(&publish[..]), Some(Version::V3_1_1), 9),
        Err(DecodeError::TooLarge { size: 10, max: 9 })
    ));
    assert!(decode(&mut BytesMut::from(&publish[..]), Some(Version::V3_1_1), 10).is_ok());
}

#[test]
fn short_5_0_acknowledgements_and_disconnects_are_read() {
    let v5 = Some(Version::V5);
    assert_eq!(
        decode_as(v5, &[0x40, 2, 0, 7]),
        Ok(Some(Inbound::PubAck(Ack { pkid: 7, reason: 0 })))
    );
    assert_eq!(
        decode_as(v5, &[0x50, 3, 0, 7, 0x80]),
        Ok(Some(Inbound::PubRec(Ack {
            pkid: 7,
            reason: 0x80
        })))
    );
    assert_eq!(
        decode_as(v5, &[0xe0, 0]),
        Ok(Some(Inbound::Disconnect {
            reason: 0,
            session_expiry: None
        }))
    );
    assert_eq!(
        decode_as(v5, &[0xe0, 7, 4, 5, 0x11, 0, 0, 0, 9]),
        Ok(Some(Inbound::Disconnect {
            reason: 4,
            session_expiry: Some(9)
        }))
    );
    assert_eq!(
        decode_as(v5, &[0xf0, 0]),
        Ok(Some(Inbound::Auth {
            reason: 0,
            method: None
        }))
    );
}

#[test]
fn a_5_0_subscribe_carries_options_and_an_identifier() {
    let bytes = packet(
        0x82,
        &[0, 9, 2, 0x0b, 5, 0, 1, b'a', 0x2e, 0, 1, b'b', 0x01],
    );
    let Ok(Some(Inbound::Subscribe {
        pkid,
        filters,
        identifier,
    })) = decode_as(Some(Version::V5), &bytes)
    else {
        panic!("not a subscribe")
    };
    assert_eq!((pkid, identifier), (9, Some(5)));
    assert_eq!(
        filters[0],
        SubscribeFilter {
            filter: "a".into(),
            qos: Qos::ExactlyOnce,
            no_local: true,
            retain_as_published: true,
            retain_handling: 2
        }
    );
    assert_eq!(
        (filters[1].qos, filters[1].no_local),
        (Qos::AtLeastOnce, false)
    );
}

#[test]
fn connacks_are_byte_exact_for_each_version() {
    let mut buf = BytesMut::new();
    encode::connack(
        &mut buf,
        Version::V3_1_1,
        true,
        0,
        &ConnackProperties::default(),
    );
    assert_eq!(&buf[..], &[0x20, 2, 1, 0]);
    buf.clear();
    encode::connack(
        &mut buf,
        Version::V3_1,
        true,
        0,
        &ConnackProperties::default(),
    );
    assert_eq!(&buf[..], &[0x20, 2, 0, 0], "3.1 has no Session Present");
    buf.clear();
    encode::connack(
        &mut buf,
        Version::V5,
        false,
        0,
        &ConnackProperties::default(),
    );
    assert_eq!(
        &buf[..],
        &[0x20, 3, 0, 0, 0],
        "the property length is always there"
    );
    buf.clear();
    let props = ConnackProperties {
        receive_maximum: Some(2),
        topic_alias_max: Some(2),
        ..Default::default()
    };
    encode::connack(&mut buf, Version::V5, true, 0, &props);
    assert_eq!(&buf[..], &[0x20, 9, 1, 0, 6, 0x21, 0, 2, 0x22, 0, 2]);
}

#[test]
fn acknowledgements_carry_a_reason_only_in_5_0_and_only_when_not_success() {
    let mut buf = BytesMut::new();
    encode::puback(&mut buf, Version::V5, 3, 0);
    encode::puback(&mut buf, Version::V5, 3, 0x99);
    encode::puback(&mut buf, Version::V3_1_1, 3, 0x99);
    assert_eq!(
        &buf[..],
        &[0x40, 2, 0, 3, 0x40, 3, 0, 3, 0x99, 0x40, 2, 0, 3]
    );
    buf.clear();
    encode::unsuback(&mut buf, Version::V5, 4, &[0, 0x11]);
    encode::unsuback(&mut buf, Version::V3_1_1, 4, &[0, 0x11]);
    assert_eq!(&buf[..], &[0xb0, 5, 0, 4, 0, 0, 0x11, 0xb0, 2, 0, 4]);
    buf.clear();
    encode::suback(&mut buf, Version::V5, 4, &[1, 0x9e]);
    assert_eq!(&buf[..], &[0x90, 5, 0, 4, 0, 1, 0x9e]);
    buf.clear();
    encode::disconnect(&mut buf, reason::SESSION_TAKEN_OVER, None);
    assert_eq!(&buf[..], &[0xe0, 1, 0x8e]);
}
