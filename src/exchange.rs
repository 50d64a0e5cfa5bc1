//! The feed-exchange messages (IO-less): our own types, and their protobuf encoding
//! with limits checked before anything a peer sent is allocated or trusted.

use std::collections::BTreeMap;

use prost::Message;

use crate::{keys::FeedKey, proto::pb};

/// Client name this implementation announces.
pub const CLIENT_NAME: &str = "multifeed-rs";
/// Version of the feed-exchange protocol this implementation speaks.
pub const PROTOCOL_VERSION: &str = "1.0.0";

/// Bounds on what a peer may send in one exchange message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExchangeLimits {
    pub(crate) max_message_len: usize,
    pub(crate) max_feeds_per_message: usize,
}

impl Default for ExchangeLimits {
    fn default() -> Self {
        Self {
            max_message_len: 4 * 1024 * 1024,
            max_feeds_per_message: 20_000,
        }
    }
}

/// The first message each side sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Handshake {
    pub(crate) client: String,
    pub(crate) protocol_version: String,
    pub(crate) user_data: Option<Vec<u8>>,
}

/// A member feed offered in a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OfferedFeed {
    pub(crate) key: FeedKey,
    pub(crate) length: Option<u64>,
    pub(crate) metadata: BTreeMap<String, String>,
}

/// One feed-exchange message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ExchangeMessage {
    Handshake(Handshake),
    Manifest(Vec<OfferedFeed>),
    Request(Vec<FeedKey>),
    Ping(u64),
    Done,
}

/// Why a peer's exchange message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("message lists {count} feeds, more than the limit of {max}")]
    TooManyFeeds { count: usize, max: usize },
    #[error("malformed protobuf: {0}")]
    Malformed(String),
    #[error("a feed key of {0} bytes (keys are 32 bytes)")]
    BadKey(usize),
    #[error("empty message")]
    Empty,
}

fn key_from(bytes: &[u8]) -> Result<FeedKey, DecodeError> {
    FeedKey::from_slice(bytes).map_err(|_| DecodeError::BadKey(bytes.len()))
}

impl ExchangeMessage {
    pub(crate) fn encode(&self) -> Vec<u8> {
        use pb::exchange_message::Body;
        let body = match self {
            ExchangeMessage::Handshake(h) => Body::Handshake(pb::Handshake {
                client: h.client.clone(),
                protocol_version: h.protocol_version.clone(),
                user_data: h.user_data.clone(),
            }),
            ExchangeMessage::Manifest(feeds) => Body::Manifest(pb::Manifest {
                feeds: feeds
                    .iter()
                    .map(|f| pb::FeedInfo {
                        key: f.key.as_bytes().to_vec(),
                        length: f.length,
                        metadata: f.metadata.clone().into_iter().collect(),
                    })
                    .collect(),
            }),
            ExchangeMessage::Request(keys) => Body::Request(pb::Request {
                keys: keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
            }),
            ExchangeMessage::Ping(nonce) => Body::Ping(pb::Ping { nonce: *nonce }),
            ExchangeMessage::Done => Body::Done(pb::Done {}),
        };
        pb::ExchangeMessage { body: Some(body) }.encode_to_vec()
    }

    pub(crate) fn decode(bytes: &[u8], limits: &ExchangeLimits) -> Result<Self, DecodeError> {
        use pb::exchange_message::Body;
        if bytes.len() > limits.max_message_len {
            return Err(DecodeError::TooLarge {
                len: bytes.len(),
                max: limits.max_message_len,
            });
        }
        // prost allocates at most what the (already bounded) input holds.
        let message = pb::ExchangeMessage::decode(bytes)
            .map_err(|e| DecodeError::Malformed(e.to_string()))?;
        let check_count = |count: usize| {
            if count > limits.max_feeds_per_message {
                Err(DecodeError::TooManyFeeds {
                    count,
                    max: limits.max_feeds_per_message,
                })
            } else {
                Ok(())
            }
        };
        Ok(match message.body.ok_or(DecodeError::Empty)? {
            Body::Handshake(h) => ExchangeMessage::Handshake(Handshake {
                client: h.client,
                protocol_version: h.protocol_version,
                user_data: h.user_data,
            }),
            Body::Manifest(m) => {
                check_count(m.feeds.len())?;
                let feeds = m
                    .feeds
                    .into_iter()
                    .map(|f| {
                        Ok(OfferedFeed {
                            key: key_from(&f.key)?,
                            length: f.length,
                            metadata: f.metadata.into_iter().collect(),
                        })
                    })
                    .collect::<Result<_, DecodeError>>()?;
                ExchangeMessage::Manifest(feeds)
            }
            Body::Request(r) => {
                check_count(r.keys.len())?;
                ExchangeMessage::Request(
                    r.keys
                        .iter()
                        .map(|k| key_from(k))
                        .collect::<Result<_, _>>()?,
                )
            }
            Body::Ping(p) => ExchangeMessage::Ping(p.nonce),
            Body::Done(_) => ExchangeMessage::Done,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(message: ExchangeMessage) {
        let bytes = message.encode();
        assert_eq!(
            ExchangeMessage::decode(&bytes, &ExchangeLimits::default()).unwrap(),
            message
        );
    }

    #[test]
    fn messages_round_trip() {
        round_trip(ExchangeMessage::Handshake(Handshake {
            client: CLIENT_NAME.into(),
            protocol_version: PROTOCOL_VERSION.into(),
            user_data: Some(b"hi".to_vec()),
        }));
        round_trip(ExchangeMessage::Manifest(vec![OfferedFeed {
            key: FeedKey::from_bytes([1; 32]),
            length: Some(3),
            metadata: [("topic".to_string(), "temperature".to_string())].into(),
        }]));
        round_trip(ExchangeMessage::Request(vec![FeedKey::from_bytes([2; 32])]));
        round_trip(ExchangeMessage::Ping(9));
        round_trip(ExchangeMessage::Done);
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let limits = ExchangeLimits::default();
        for bytes in [
            &b""[..],
            b"\xff",
            b"\x12\x05\x0a\x03abc",
            b"\x0a\xff\xff\xff\xff\x0f",
        ] {
            assert!(
                ExchangeMessage::decode(bytes, &limits).is_err(),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn limits_are_enforced_before_trusting_the_peer() {
        let limits = ExchangeLimits {
            max_message_len: 100,
            max_feeds_per_message: 2,
        };
        let big = ExchangeMessage::Ping(1).encode().repeat(60);
        assert!(matches!(
            ExchangeMessage::decode(&big, &limits),
            Err(DecodeError::TooLarge { .. })
        ));
        let many = ExchangeMessage::Request(vec![FeedKey::from_bytes([0; 32]); 3]).encode();
        let limits = ExchangeLimits {
            max_message_len: 10_000,
            max_feeds_per_message: 2,
        };
        assert_eq!(
            ExchangeMessage::decode(&many, &limits),
            Err(DecodeError::TooManyFeeds { count: 3, max: 2 })
        );
        let short_key = pb::ExchangeMessage {
            body: Some(pb::exchange_message::Body::Request(pb::Request {
                keys: vec![vec![1; 31]],
            })),
        }
        .encode_to_vec();
        assert_eq!(
            ExchangeMessage::decode(&short_key, &limits),
            Err(DecodeError::BadKey(31))
        );
    }
}
