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
    /// The sender is full (it serves at most this many peers) and ends the session.
    pub(crate) busy_max_peers: Option<u32>,
}

/// A member feed offered in a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OfferedFeed {
    pub(crate) key: FeedKey,
    pub(crate) length: Option<u64>,
    /// Received: what [`crate::metadata::bounded`] keeps of what the peer sent.
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
    /// A kind of message this version does not know: a newer minor version may add
    /// kinds, which older peers ignore (as they ignore new fields).
    Unknown,
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
    #[error("a feed carries {count} metadata entries, more than the limit of {max}")]
    TooMuchMetadata { count: usize, max: usize },
}

/// Most metadata entries one offered feed may carry.
pub(crate) const MAX_METADATA_ENTRIES: usize = 64;

/// Walks the protobuf without decoding it and refuses a message listing more feeds
/// (manifest entries or requested keys, over every repetition of the body, which
/// protobuf merges) or more metadata entries per feed than the limits allow, or a
/// feed key that is not 32 bytes. An entry can be two bytes on the wire and a
/// hundred in memory, so this is what keeps a maximum-size message from costing
/// more than a small multiple of its size: every entry left carries a whole key.
fn count_entries(bytes: &[u8], limits: &ExchangeLimits) -> Result<(), DecodeError> {
    const MANIFEST: u32 = 2;
    const REQUEST: u32 = 3;
    const FEED_INFO: u32 = 1;
    const FEED_KEY: u32 = 1;
    const METADATA: u32 = 3;
    let mut feeds = 0usize;
    for_each_field(bytes, |tag, body| {
        if tag != MANIFEST && tag != REQUEST {
            return Ok(());
        }
        for_each_field(body, |inner, feed| {
            if inner != FEED_INFO {
                return Ok(());
            }
            feeds += 1;
            if feeds > limits.max_feeds_per_message {
                return Err(DecodeError::TooManyFeeds {
                    count: feeds,
                    max: limits.max_feeds_per_message,
                });
            }
            if tag == REQUEST {
                // A requested key is the field's body itself.
                if feed.len() != 32 {
                    return Err(DecodeError::BadKey(feed.len()));
                }
                return Ok(());
            }
            let mut entries = 0usize;
            let mut key_len = 0;
            for_each_field(feed, |field, body| {
                if field == FEED_KEY {
                    key_len = body.len();
                }
                entries += usize::from(field == METADATA);
                if entries > MAX_METADATA_ENTRIES {
                    return Err(DecodeError::TooMuchMetadata {
                        count: entries,
                        max: MAX_METADATA_ENTRIES,
                    });
                }
                Ok(())
            })?;
            if key_len != 32 {
                return Err(DecodeError::BadKey(key_len));
            }
            Ok(())
        })
    })
}

/// Calls `f(tag, bytes)` for each field of an encoded message; `bytes` is the body
/// of a length-delimited field and empty for other wire types.
fn for_each_field(
    buf: &[u8],
    f: impl FnMut(u32, &[u8]) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    crate::proto::for_each_field(buf, DecodeError::Malformed, f)
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
                busy_max_peers: h.busy_max_peers,
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
            // Never sent: it only stands for what a newer peer sent.
            ExchangeMessage::Unknown => return pb::ExchangeMessage { body: None }.encode_to_vec(),
        };
        pb::ExchangeMessage { body: Some(body) }.encode_to_vec()
    }

    pub(crate) fn decode(bytes: &[u8], limits: &ExchangeLimits) -> Result<Self, DecodeError> {
        use pb::exchange_message_in::Body;
        if bytes.len() > limits.max_message_len {
            return Err(DecodeError::TooLarge {
                len: bytes.len(),
                max: limits.max_message_len,
            });
        }
        // Count (and check every key's length) before prost allocates a struct
        // per entry; a manifest's feeds stay bytes until each is decoded on its own.
        count_entries(bytes, limits)?;
        let malformed = |e: prost::DecodeError| DecodeError::Malformed(e.to_string());
        let message = pb::ExchangeMessageIn::decode(bytes).map_err(malformed)?;
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
        let Some(body) = message.body else {
            return Ok(ExchangeMessage::Unknown);
        };
        Ok(match body {
            Body::Handshake(h) => ExchangeMessage::Handshake(Handshake {
                client: h.client,
                protocol_version: h.protocol_version,
                user_data: h.user_data,
                busy_max_peers: h.busy_max_peers,
            }),
            Body::Manifest(m) => {
                check_count(m.feeds.len())?;
                let mut feeds = Vec::with_capacity(m.feeds.len());
                for bytes in m.feeds {
                    let feed = pb::FeedInfo::decode(&bytes[..]).map_err(malformed)?;
                    feeds.push(OfferedFeed {
                        key: key_from(&feed.key)?,
                        length: feed.length,
                        // Only what we keep of a peer's labels: a map of up to 64
                        // one-letter entries costs many times its bytes.
                        metadata: crate::metadata::bounded(&feed.metadata),
                    });
                }
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

    /// A maximum-size message of the cheapest entries (empty feed infos, empty
    /// keys, empty metadata entries) is refused, or decoded, without allocating
    /// more than a small multiple of its size.
    #[test]
    fn hostile_maximum_size_messages_are_bounded_before_allocation() {
        let limits = ExchangeLimits {
            max_message_len: 4 * 1024 * 1024,
            max_feeds_per_message: 100_000,
        };
        let max = limits.max_message_len;
        // ExchangeMessage { manifest (2) { feeds (1): empty FeedInfo } x N }.
        let nested = |outer: u8, inner: &[u8], room: usize| {
            let count = room / inner.len();
            let body: Vec<u8> = inner.repeat(count);
            let mut message = vec![outer];
            prost::encoding::encode_varint(body.len() as u64, &mut message);
            message.extend_from_slice(&body);
            message
        };
        let empty_feeds = nested(0x12, &[0x0a, 0x00], max - 8);
        let empty_keys = nested(0x1a, &[0x0a, 0x00], max - 8);
        // One feed with a huge number of empty metadata entries.
        let entries: Vec<u8> = [0x1a, 0x00].repeat((max - 16) / 2);
        let mut feed = vec![0x0a];
        prost::encoding::encode_varint(entries.len() as u64, &mut feed);
        feed.extend_from_slice(&entries);
        let mut metadata = vec![0x12];
        prost::encoding::encode_varint(feed.len() as u64, &mut metadata);
        metadata.extend_from_slice(&feed);
        // The manifest field repeated: protobuf merges the repetitions.
        let one = nested(0x12, &[0x0a, 0x00], 60_000 * 2);
        let repeated: Vec<u8> = one.repeat(3);
        for (name, bytes) in [
            ("empty feeds", empty_feeds),
            ("empty keys", empty_keys),
            ("metadata entries", metadata),
            ("repeated manifest", repeated),
        ] {
            assert!(bytes.len() <= max, "{name}");
            let (result, peak) =
                crate::alloc_probe::peak_bytes(|| ExchangeMessage::decode(&bytes, &limits));
            assert!(
                matches!(
                    result,
                    Err(DecodeError::TooManyFeeds { .. }
                        | DecodeError::TooMuchMetadata { .. }
                        | DecodeError::BadKey(_))
                ),
                "{name}: {result:?}"
            );
            assert!(
                peak <= 1024,
                "{name}: {peak} bytes allocated before refusing"
            );
        }
        // At the limit: decoded (or refused for bad keys) within 32 bytes per input byte.
        let at_limit = nested(0x12, &[0x0a, 0x00], 100_000 * 2);
        let (_, peak) =
            crate::alloc_probe::peak_bytes(|| ExchangeMessage::decode(&at_limit, &limits));
        assert!(
            peak <= 64 * at_limit.len(),
            "{peak} bytes for {} input bytes",
            at_limit.len()
        );
    }

    /// What decoding an exchange message may allocate beyond 8 times its size: prost's
    /// error text, one feed's whole metadata map while it is decoded, and a B-tree
    /// leaf of 11 slots per labelled feed kept (up to the fuzz's 8 feeds).
    const EXCHANGE_FIXED_BYTES: usize = 64 * 1024;

    fn check_exchange(
        bytes: &[u8],
        limits: &ExchangeLimits,
    ) -> Result<bool, proptest::test_runner::TestCaseError> {
        use proptest::prelude::*;
        let (decoded, peak) =
            crate::alloc_probe::peak_bytes(|| ExchangeMessage::decode(bytes, limits));
        prop_assert!(
            crate::fuzz_support::within_bound(bytes.len(), peak, EXCHANGE_FIXED_BYTES),
            "{peak} bytes allocated for a message of {}",
            bytes.len()
        );
        let Ok(message) = decoded else {
            return Ok(false);
        };
        match &message {
            ExchangeMessage::Manifest(feeds) => {
                prop_assert!(feeds.len() <= limits.max_feeds_per_message);
                prop_assert!(
                    feeds
                        .iter()
                        .all(|f| f.metadata.len() <= MAX_METADATA_ENTRIES)
                );
            }
            ExchangeMessage::Request(keys) => {
                prop_assert!(keys.len() <= limits.max_feeds_per_message)
            }
            _ => {}
        }
        if message != ExchangeMessage::Unknown {
            prop_assert_eq!(
                ExchangeMessage::decode(&message.encode(), limits),
                Ok(message)
            );
        }
        Ok(true)
    }

    fn arb_exchange() -> proptest::strategy::BoxedStrategy<Vec<u8>> {
        use proptest::prelude::*;
        let key = (1u8..6).prop_map(|n| FeedKey::from_bytes([n; 32]));
        let feed = (
            key.clone(),
            proptest::option::of(any::<u64>()),
            proptest::collection::btree_map("[a-z]{0,6}", "[a-z0-9 -]{0,12}", 0..4),
        )
            .prop_map(|(key, length, metadata)| OfferedFeed {
                key,
                length,
                metadata,
            });
        let handshake = (
            "[a-z-]{0,12}",
            "[0-9.]{0,6}",
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
            proptest::option::of(any::<u32>()),
        )
            .prop_map(|(client, protocol_version, user_data, busy_max_peers)| {
                ExchangeMessage::Handshake(Handshake {
                    client,
                    protocol_version,
                    user_data,
                    busy_max_peers,
                })
            });
        prop_oneof![
            handshake,
            proptest::collection::vec(feed, 0..5).prop_map(ExchangeMessage::Manifest),
            proptest::collection::vec(key, 0..5).prop_map(ExchangeMessage::Request),
            any::<u64>().prop_map(ExchangeMessage::Ping),
            Just(ExchangeMessage::Done),
        ]
        .prop_map(|message| message.encode())
        .boxed()
    }

    /// Arbitrary bytes, valid messages of every kind and mutated ones through
    /// `ExchangeMessage::decode`, with limits low enough for mutations to reach.
    #[test]
    fn fuzz_exchange_messages() {
        let limits = ExchangeLimits {
            max_message_len: 2048,
            max_feeds_per_message: 8,
        };
        let decoded = std::cell::Cell::new(0u64);
        let strategy = crate::fuzz_support::hostile_inputs(arb_exchange());
        let inputs = crate::fuzz_support::fuzz_for("exchange messages", strategy, 1024, |bytes| {
            decoded.set(decoded.get() + u64::from(check_exchange(&bytes, &limits)?));
            Ok(())
        });
        println!(
            "exchange messages: {} of {inputs} inputs decoded",
            decoded.get()
        );
        assert!(decoded.get() > 0 && decoded.get() < inputs);
    }

    /// The hostile maximum-size manifests under the default limits (what a session
    /// uses), each refused or decoded within 8 times its size; the first one is also
    /// decoded as plain prost does (all of it, then counted) to show what the count
    /// before allocating saves.
    #[test]
    fn hostile_maximum_size_manifests_under_the_default_limits() {
        let limits = ExchangeLimits::default();
        let max = limits.max_message_len;
        let field = crate::fuzz_support::length_delimited;
        let manifest_of = |feeds: &[Vec<u8>]| {
            let mut body = Vec::new();
            for feed in feeds {
                if 16 + body.len() + feed.len() > max {
                    break;
                }
                body.extend_from_slice(feed);
            }
            field(0x12, &body)
        };
        let key = |n: u32| field(0x0a, &[n.to_be_bytes().to_vec(), vec![0; 28]].concat());
        let empty_feeds = manifest_of(&vec![vec![0x0a, 0x00]; max / 2]);
        // Valid feeds, each with as many distinct one-letter metadata entries as allowed.
        let labelled = |n: u32| {
            let entries: Vec<u8> = (0..MAX_METADATA_ENTRIES as u8)
                .flat_map(|i| field(0x1a, &field(0x0a, &[b'0' + i])))
                .collect();
            field(0x0a, &[key(n), entries].concat())
        };
        let labelled_feeds = manifest_of(&(0..max as u32 / 300).map(labelled).collect::<Vec<_>>());
        // The most feeds, each with one label (what a gateway sends).
        let one_label = |n: u32| {
            let label = field(0x1a, &[field(0x0a, b"g"), field(0x12, b"a")].concat());
            field(0x0a, &[key(n), label].concat())
        };
        let one_label_feeds = manifest_of(
            &(0..limits.max_feeds_per_message as u32)
                .map(one_label)
                .collect::<Vec<_>>(),
        );
        let keyed_feeds = manifest_of(
            &(0..limits.max_feeds_per_message as u32)
                .map(|n| field(0x0a, &key(n)))
                .collect::<Vec<_>>(),
        );
        let requested = {
            let keys: Vec<u8> = (0..limits.max_feeds_per_message as u32)
                .flat_map(key)
                .collect();
            field(0x1a, &keys)
        };
        for (name, bytes) in [
            ("empty feeds", &empty_feeds),
            ("feeds with the most metadata entries", &labelled_feeds),
            ("the most feeds, one label each", &one_label_feeds),
            ("the most feeds, keys only", &keyed_feeds),
            ("the most requested keys", &requested),
        ] {
            assert!(bytes.len() <= max, "{name}");
            let (result, peak) =
                crate::alloc_probe::peak_bytes(|| ExchangeMessage::decode(bytes, &limits));
            println!(
                "hostile manifest {name}: {} bytes, {} ({peak} bytes allocated at the peak, {:.2}x)",
                bytes.len(),
                match &result {
                    Ok(_) => "decoded".to_string(),
                    Err(e) => format!("refused: {e}"),
                },
                peak as f64 / bytes.len() as f64
            );
            // A feed with a label holds a B-tree leaf of 11 slots (544 bytes) for
            // it: 20,000 feeds of 44 bytes with one label each cost 15x their size.
            // Only a smaller map type than `FeedMetadata` would lower that.
            let bounded = if name == "the most feeds, one label each" {
                peak <= 16 * bytes.len()
            } else {
                crate::fuzz_support::within_hostile_bound(bytes.len(), peak)
            };
            assert!(bounded, "{name}: {peak} bytes");
        }
        // Without the walk first: prost decodes the whole message (and before this
        // decoder kept a manifest's feeds as bytes, every feed's whole metadata map).
        for (name, bytes) in [
            ("empty feeds", &empty_feeds),
            ("feeds with the most metadata entries", &labelled_feeds),
            ("the most feeds, one label each", &one_label_feeds),
        ] {
            let (decoded, whole) =
                crate::alloc_probe::peak_bytes(|| pb::ExchangeMessage::decode(&bytes[..]).is_ok());
            println!(
                "hostile manifest {name}, decoded whole by prost: {whole} bytes at the peak, {:.2}x",
                whole as f64 / bytes.len() as f64
            );
            assert!(decoded && whole > 8 * bytes.len(), "{name}: {whole}");
        }
    }

    #[test]
    fn messages_round_trip() {
        round_trip(ExchangeMessage::Handshake(Handshake {
            client: CLIENT_NAME.into(),
            protocol_version: PROTOCOL_VERSION.into(),
            user_data: Some(b"hi".to_vec()),
            busy_max_peers: None,
        }));
        round_trip(ExchangeMessage::Handshake(Handshake {
            client: CLIENT_NAME.into(),
            protocol_version: PROTOCOL_VERSION.into(),
            user_data: None,
            busy_max_peers: Some(64),
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

    /// Where the wire fixtures live; `MULTIFEED_BLESS=1` rewrites them from the
    /// current encoder (only ever for a new protocol version, never to make a
    /// failing test pass).
    fn fixture(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/exchange-v1")
            .join(name)
    }

    fn golden_messages() -> Vec<(&'static str, ExchangeMessage)> {
        vec![
            (
                "handshake.bin",
                ExchangeMessage::Handshake(Handshake {
                    client: "multifeed-rs".into(),
                    protocol_version: "1.0.0".into(),
                    user_data: Some(b"gateway-7".to_vec()),
                    busy_max_peers: None,
                }),
            ),
            (
                "manifest.bin",
                ExchangeMessage::Manifest(vec![
                    OfferedFeed {
                        key: FeedKey::from_bytes([1; 32]),
                        length: Some(3),
                        metadata: [
                            ("site".to_string(), "north".to_string()),
                            ("topic".to_string(), "temperature".to_string()),
                        ]
                        .into(),
                    },
                    OfferedFeed {
                        key: FeedKey::from_bytes([2; 32]),
                        length: None,
                        metadata: BTreeMap::new(),
                    },
                ]),
            ),
            (
                "request.bin",
                ExchangeMessage::Request(vec![
                    FeedKey::from_bytes([1; 32]),
                    FeedKey::from_bytes([2; 32]),
                ]),
            ),
            ("ping.bin", ExchangeMessage::Ping(0x0123_4567_89ab_cdef)),
            ("done.bin", ExchangeMessage::Done),
        ]
    }

    /// Version 1.0.0 of the feed exchange, as bytes: today's encoder must produce
    /// exactly them and the decoder must read them, so a change to `proto/` or to
    /// prost that alters the wire is caught here, not between two deployed peers.
    #[test]
    fn wire_format_matches_the_v1_fixtures() {
        let bless = std::env::var_os("MULTIFEED_BLESS").is_some();
        for (name, message) in golden_messages() {
            let path = fixture(name);
            if bless {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, message.encode()).unwrap();
            }
            let golden = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(message.encode(), golden, "{name}: the encoding changed");
            assert_eq!(
                ExchangeMessage::decode(&golden, &ExchangeLimits::default()).unwrap(),
                message,
                "{name}"
            );
        }
    }

    /// What a newer minor version may send: a field this version does not know
    /// (tag 15 on a manifest's feed) is skipped, and a message of an unknown kind
    /// (body tag 9) decodes as `Unknown`, which the session ignores.
    #[test]
    fn newer_minor_fields_and_kinds_are_ignored() {
        let bless = std::env::var_os("MULTIFEED_BLESS").is_some();
        // FeedInfo { key: [1; 32], length: 3 } + field 15 (varint 1).
        let mut feed = pb::FeedInfo {
            key: vec![1; 32],
            length: Some(3),
            metadata: BTreeMap::new(),
        }
        .encode_to_vec();
        feed.extend_from_slice(&[15 << 3, 1]);
        let mut manifest = vec![(1 << 3) | 2];
        prost::encoding::encode_varint(feed.len() as u64, &mut manifest);
        manifest.extend_from_slice(&feed);
        let mut newer_manifest = vec![(2 << 3) | 2];
        prost::encoding::encode_varint(manifest.len() as u64, &mut newer_manifest);
        newer_manifest.extend_from_slice(&manifest);
        // Body tag 9, an empty message.
        let newer_kind = vec![(9 << 3) | 2, 0];
        for (name, bytes, expected) in [
            (
                "newer-minor-manifest.bin",
                newer_manifest,
                ExchangeMessage::Manifest(vec![OfferedFeed {
                    key: FeedKey::from_bytes([1; 32]),
                    length: Some(3),
                    metadata: BTreeMap::new(),
                }]),
            ),
            ("newer-minor-kind.bin", newer_kind, ExchangeMessage::Unknown),
        ] {
            let path = fixture(name);
            if bless {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &bytes).unwrap();
            }
            let golden = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(golden, bytes, "{name}");
            assert_eq!(
                ExchangeMessage::decode(&golden, &ExchangeLimits::default()).unwrap(),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let limits = ExchangeLimits::default();
        for bytes in [
            &b"\xff"[..],
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
