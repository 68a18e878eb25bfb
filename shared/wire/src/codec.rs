//! Framing for the edge<->worker socket: a 4-byte big-endian length, then one bincode 2
//! message. This module is the only place that knows the encoding.

use bytes::{Bytes, BytesMut};
use std::marker::PhantomData;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

/// Hard upper bound of one frame; a larger length field closes the connection before
/// anything is allocated for it.
pub const MAX_FRAME_LENGTH: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame could not be decoded: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("frame could not be encoded: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("frame has {0} bytes after its message")]
    TrailingBytes(usize),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME_LENGTH>()
}

/// Encodes one message to its frame body (without the length prefix).
pub fn encode_body<T: bincode::Encode>(item: &T) -> Result<Vec<u8>, CodecError> {
    Ok(bincode::encode_to_vec(item, config())?)
}

/// `EdgeFrame::Request` by reference, so that a request kept for re-sending is encoded
/// without a copy. Encodes to the same bytes as the owned frame (tested below).
#[derive(bincode::Encode)]
enum EdgeFrameRef<'a> {
    _Hello(&'a crate::wire::Hello),
    Request {
        id: u64,
        request: &'a crate::wire::Request,
    },
    Notice(NoticeRef<'a>),
}

/// `Notice::Store` by reference (same bytes as the owned notice: a slice encodes like a
/// `Vec`, an `Arc` like what it holds).
#[derive(bincode::Encode)]
enum NoticeRef<'a> {
    Store(&'a [std::sync::Arc<crate::wire::Message>]),
}

/// The body of `EdgeFrame::Request { id, request }`.
pub fn encode_request(id: u64, request: &crate::wire::Request) -> Result<Vec<u8>, CodecError> {
    encode_body(&EdgeFrameRef::Request { id, request })
}

/// `EdgeFrame::Notice(Notice::Store(messages))` without copying the messages.
pub fn encode_store_notice(
    messages: &[std::sync::Arc<crate::wire::Message>],
) -> Result<Vec<u8>, CodecError> {
    encode_body(&EdgeFrameRef::Notice(NoticeRef::Store(messages)))
}

/// Decodes one frame body; the whole body must be one message.
pub fn decode_body<T: bincode::Decode<()>>(body: &[u8]) -> Result<T, CodecError> {
    let (item, used) = bincode::decode_from_slice(body, config())?;
    if used != body.len() {
        return Err(CodecError::TrailingBytes(body.len() - used));
    }
    Ok(item)
}

/// The first byte of a block of stored messages in the current layout. Blocks written before
/// messages had properties begin with their message count, a bincode varint, whose first
/// byte is never 255: the two layouts are told apart without a migration.
const STORED_BLOCK_V2: u8 = 0xff;

/// A message as blocks stored it before MQTT 5.0 properties (read only).
#[derive(bincode::Decode)]
struct MessageV1 {
    id: crate::wire::MessageId,
    topic: String,
    payload: Vec<u8>,
    qos: crate::wire::Qos,
    retain: bool,
    client_id: String,
    host: String,
    created_ms: i64,
}

/// Messages as the embedded store keeps them in one row.
pub fn encode_stored_block(messages: &[&crate::wire::Message]) -> Result<Vec<u8>, CodecError> {
    let mut out = vec![STORED_BLOCK_V2];
    bincode::encode_into_std_write(messages, &mut out, config())?;
    Ok(out)
}

/// Where one message lies in a block that [`encode_stored_block_indexed`] wrote: its byte
/// offset and length, for [`decode_stored_message`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSpan {
    pub offset: u32,
    pub len: u32,
}

/// [`encode_stored_block`] (the same bytes), with the span of each message in the block, so
/// that a reader can decode one message without the rest.
pub fn encode_stored_block_indexed(
    messages: &[&crate::wire::Message],
) -> Result<(Vec<u8>, Vec<BlockSpan>), CodecError> {
    let mut out = vec![STORED_BLOCK_V2];
    // A slice encodes as its length (a varint, as `u64`), then its items.
    bincode::encode_into_std_write(messages.len() as u64, &mut out, config())?;
    let mut spans = Vec::with_capacity(messages.len());
    for m in messages {
        let offset = out.len();
        bincode::encode_into_std_write(m, &mut out, config())?;
        spans.push(BlockSpan {
            offset: offset as u32,
            len: (out.len() - offset) as u32,
        });
    }
    Ok((out, spans))
}

/// One message of a current-layout block, from the bytes of its [`BlockSpan`].
pub fn decode_stored_message(bytes: &[u8]) -> Result<crate::wire::Message, CodecError> {
    decode_body(bytes)
}

/// A row of messages written by [`encode_stored_block`], or by an earlier version.
pub fn decode_stored_block(data: &[u8]) -> Result<Vec<crate::wire::Message>, CodecError> {
    match data.split_first() {
        Some((&STORED_BLOCK_V2, body)) => decode_body(body),
        _ => Ok(decode_body::<Vec<MessageV1>>(data)?
            .into_iter()
            .map(|m| crate::wire::Message {
                id: m.id,
                topic: m.topic,
                payload: m.payload,
                qos: m.qos,
                retain: m.retain,
                client_id: m.client_id,
                host: m.host,
                created_ms: m.created_ms,
                properties: None,
            })
            .collect()),
    }
}

/// Decodes `In` frames and encodes `Out` frames; holds no session state.
pub struct FrameCodec<In, Out> {
    framing: LengthDelimitedCodec,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    pub fn new() -> Self {
        FrameCodec {
            framing: LengthDelimitedCodec::builder()
                .max_frame_length(MAX_FRAME_LENGTH)
                .new_codec(),
            _types: PhantomData,
        }
    }
}

impl<In, Out> Default for FrameCodec<In, Out> {
    fn default() -> Self {
        Self::new()
    }
}

impl<In: bincode::Decode<()>, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, CodecError> {
        match self.framing.decode(src)? {
            Some(body) => decode_body(&body).map(Some),
            None => Ok(None),
        }
    }
}

impl<In, Out: bincode::Encode> Encoder<Out> for FrameCodec<In, Out> {
    type Error = CodecError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), CodecError> {
        let body = encode_body(&item)?;
        Ok(self.framing.encode(Bytes::from(body), dst)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::*;

    fn roundtrip<T: bincode::Encode + bincode::Decode<()> + PartialEq + std::fmt::Debug>(item: T) {
        let mut codec = FrameCodec::<T, T>::new();
        let mut buf = BytesMut::new();
        codec.encode(item_clone(&item), &mut buf).expect("encode");
        let bytes = buf.clone();
        // Fed one byte at a time, the frame appears only once it is complete.
        let mut partial = BytesMut::new();
        for (i, b) in bytes.iter().enumerate() {
            partial.extend_from_slice(&[*b]);
            let decoded = codec.decode(&mut partial).expect("decode");
            if i + 1 < bytes.len() {
                assert!(decoded.is_none(), "frame decoded early at byte {i}");
            } else {
                assert_eq!(decoded.as_ref(), Some(&item));
            }
        }
    }

    fn item_clone<T: bincode::Encode + bincode::Decode<()>>(item: &T) -> T {
        decode_body(&encode_body(item).expect("encode")).expect("decode")
    }

    fn sample_message() -> Message {
        Message {
            id: MessageId([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]),
            topic: "a/b".into(),
            payload: b"1.5,2".to_vec(),
            qos: Qos::AtLeastOnce,
            retain: true,
            client_id: "dev1".into(),
            host: "h".into(),
            created_ms: 1_700_000_000_000,
            properties: None,
        }
    }

    /// Blocks the embedded store wrote before messages had properties still read, and the
    /// new layout keeps the properties.
    #[test]
    fn stored_blocks_of_both_layouts_decode() {
        #[derive(bincode::Encode)]
        struct OldMessage {
            id: MessageId,
            topic: String,
            payload: Vec<u8>,
            qos: Qos,
            retain: bool,
            client_id: String,
            host: String,
            created_ms: i64,
        }
        let m = sample_message();
        let old: Vec<OldMessage> = (0..300)
            .map(|_| OldMessage {
                id: m.id,
                topic: m.topic.clone(),
                payload: m.payload.clone(),
                qos: m.qos,
                retain: m.retain,
                client_id: m.client_id.clone(),
                host: m.host.clone(),
                created_ms: m.created_ms,
            })
            .collect();
        let old = encode_body(&old).expect("encode");
        assert_ne!(old[0], STORED_BLOCK_V2);
        let decoded = decode_stored_block(&old).expect("old layout");
        assert_eq!(decoded.len(), 300);
        assert_eq!(decoded[0], m);
        let mut with = m.clone();
        with.properties = Some(Box::new(Properties {
            content_type: Some("text/plain".into()),
            user_properties: vec![("k".into(), "v".into())],
            ..Properties::default()
        }));
        let new = encode_stored_block(&[&m, &with]).expect("encode");
        assert_eq!(
            decode_stored_block(&new).expect("new layout"),
            vec![m, with]
        );
    }

    /// The indexed encoder writes the plain encoder's bytes, and each span decodes alone.
    #[test]
    fn an_indexed_block_is_a_block_whose_spans_decode_alone() {
        let mut messages: Vec<Message> = (0..300).map(|_| sample_message()).collect();
        for (i, m) in messages.iter_mut().enumerate() {
            m.topic = format!("dev/{i}/cmd");
            m.payload = vec![b'x'; i];
        }
        let refs: Vec<&Message> = messages.iter().collect();
        let plain = encode_stored_block(&refs).expect("encode");
        let (indexed, spans) = encode_stored_block_indexed(&refs).expect("encode");
        assert_eq!(plain, indexed);
        assert_eq!(spans.len(), messages.len());
        for (span, m) in spans.iter().zip(&messages) {
            let bytes = &indexed[span.offset as usize..(span.offset + span.len) as usize];
            assert_eq!(&decode_stored_message(bytes).expect("decode"), m);
        }
    }

    #[test]
    fn frames_round_trip_split_at_every_byte() {
        roundtrip(EdgeFrame::Request {
            id: 7,
            request: Request::Persist(vec![sample_message()]),
        });
        roundtrip(EdgeFrame::Request {
            id: 8,
            request: Request::LoadAuth {
                users: true,
                rules: false,
            },
        });
        roundtrip(WorkerFrame::Reply {
            id: 8,
            reply: Reply::Auth {
                users: vec![crate::StoredUser {
                    username: "u".into(),
                    password_hash: "$2b$04$x".into(),
                    salt: None,
                    superuser: true,
                }],
                rules: vec![crate::StoredRule {
                    username: None,
                    client_id: Some("c".into()),
                    permission: "allow".into(),
                    action: "all".into(),
                    topics: vec!["a/${clientid}".into()],
                }],
            },
        });
        roundtrip(WorkerFrame::Reply {
            id: 9,
            reply: Reply::Session(StoredSession {
                present: true,
                subscriptions: vec![Subscription {
                    filter: "a/#".into(),
                    qos: Qos::ExactlyOnce,
                    options: SubscriptionOptions {
                        no_local: true,
                        retain_as_published: false,
                        identifier: Some(7),
                    },
                }],
                undelivered: vec![sample_message()],
                next: Some(Cursor::since(5)),
                outbound_qos2: vec![OutboundQos2 {
                    pkid: 3,
                    message: sample_message(),
                    released: true,
                }],
                generation: Generation {
                    epoch_ms: 1_700_000_000_000,
                    claims: 3,
                },
            }),
        });
        roundtrip(WorkerFrame::Claims {
            claims: vec![Claim {
                client_id: "c".into(),
                generation: Generation {
                    epoch_ms: 5,
                    claims: 1,
                },
            }],
        });
        roundtrip(WorkerFrame::Lease { as_of_ms: 42 });
        roundtrip(EdgeFrame::Request {
            id: 4,
            request: Request::Retained {
                filter: "state/#".into(),
            },
        });
        roundtrip(EdgeFrame::Request {
            id: 5,
            request: Request::ClearRetained {
                topic: "state/a".into(),
            },
        });
    }

    /// Pins the bytes on the wire: a failing assertion here means the protocol changed, which
    /// must come with a new PROTOCOL_VERSION.
    #[test]
    fn encoded_bytes_are_pinned() {
        let mut codec = FrameCodec::<WorkerFrame, EdgeFrame>::new();
        let mut buf = BytesMut::new();
        let hello = EdgeFrame::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            host: "h1".into(),
            instance: "i".into(),
        });
        codec.encode(hello, &mut buf).expect("encode");
        assert_eq!(&buf[..], &[0, 0, 0, 7, 0, 17, 2, b'h', b'1', 1, b'i']);

        buf.clear();
        let persist = EdgeFrame::Request {
            id: 300,
            request: Request::Persist(vec![sample_message()]),
        };
        codec.encode(persist, &mut buf).expect("encode");
        let expected: Vec<u8> = [
            &[0u8, 0, 0, 47][..],
            // Request, id 300 (varint marker 251 + u16), Persist, one message.
            &[1, 251, 44, 1, 1, 1],
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
            &[3, b'a', b'/', b'b'],
            &[5, b'1', b'.', b'5', b',', b'2'],
            &[1, 1],
            &[4, b'd', b'e', b'v', b'1'],
            &[1, b'h'],
            // created_ms zigzag-encoded as a varint: marker 253, then 8 bytes little-endian.
            &[253, 0, 0xd0, 0xca, 0x9f, 0x17, 0x03, 0, 0],
            // No properties.
            &[0],
        ]
        .concat();
        assert_eq!(&buf[..], &expected[..]);

        buf.clear();
        let delivered = EdgeFrame::Notice(Notice::Delivered {
            client_id: "c".into(),
            messages: vec![DeliveredRecord {
                message_id: MessageId([0; 12]),
                topic: "t".into(),
            }],
        });
        codec.encode(delivered, &mut buf).expect("encode");
        let mut expected = vec![0u8, 0, 0, 19, 2, 1, 1, b'c', 1];
        expected.extend_from_slice(&[0; 12]);
        expected.extend_from_slice(&[1, b't']);
        assert_eq!(&buf[..], &expected[..]);
    }

    #[test]
    fn request_by_reference_encodes_like_the_owned_frame() {
        let request = Request::Persist(vec![sample_message()]);
        for id in [0u64, 250, 251, 70_000, u64::MAX] {
            let owned = encode_body(&EdgeFrame::Request {
                id,
                request: request.clone(),
            })
            .expect("encode");
            assert_eq!(encode_request(id, &request).expect("encode"), owned);
        }
        let mut second = sample_message();
        second.topic = "another/topic".into();
        for messages in [vec![sample_message()], vec![sample_message(), second]] {
            let owned = encode_body(&EdgeFrame::Notice(crate::wire::Notice::Store(
                messages.clone(),
            )))
            .expect("encode");
            let shared: Vec<std::sync::Arc<_>> =
                messages.into_iter().map(std::sync::Arc::new).collect();
            assert_eq!(encode_store_notice(&shared).expect("encode"), owned);
        }
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut codec = FrameCodec::<EdgeFrame, WorkerFrame>::new();
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0][..]);
        assert!(codec.decode(&mut buf).is_err());
    }

    #[test]
    fn garbage_body_is_an_error_not_a_panic() {
        let mut codec = FrameCodec::<EdgeFrame, WorkerFrame>::new();
        for body in [&[9u8][..], &[1, 0xff], &[0, 1, 2, 3, 4, 5, 6, 7]] {
            let mut buf = BytesMut::new();
            buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
            buf.extend_from_slice(body);
            assert!(codec.decode(&mut buf).is_err(), "body {body:?}");
        }
    }
}

/// Entry point for the frame fuzz target (`fuzz/`) and its corpus regression test.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;
    use crate::wire::{EdgeFrame, WorkerFrame};

    /// Decodes frames both ways from arbitrary bytes; anything but a panic is fine. Decoded
    /// frames must encode again.
    pub fn decode_frames(data: &[u8]) {
        let mut to_worker = FrameCodec::<EdgeFrame, EdgeFrame>::new();
        let mut buf = BytesMut::from(data);
        while let Ok(Some(frame)) = to_worker.decode(&mut buf) {
            let mut out = BytesMut::new();
            assert!(to_worker.encode(frame, &mut out).is_ok());
        }
        let mut to_edge = FrameCodec::<WorkerFrame, WorkerFrame>::new();
        let mut buf = BytesMut::from(data);
        while let Ok(Some(frame)) = to_edge.decode(&mut buf) {
            let mut out = BytesMut::new();
            assert!(to_edge.encode(frame, &mut out).is_ok());
        }
    }
}
