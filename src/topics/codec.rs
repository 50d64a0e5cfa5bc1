//! The message record and block format (IO-less): validation, packing several
//! messages into one block, and decoding a block that may come from a peer with
//! bounds checked before anything is allocated or trusted.

use prost::Message as _;

use super::Message;
use crate::{error::Error, proto::pb};

/// Longest topic name, in bytes.
pub const MAX_TOPIC_LEN: usize = 200;
/// Longest content type, in bytes.
pub const MAX_CONTENT_TYPE_LEN: usize = 255;
/// Largest payload of one message, in bytes.
pub const MAX_PAYLOAD_LEN: usize = 4 * 1024 * 1024;
/// Most messages a block may hold; blocks with more are refused when read.
pub const MAX_MESSAGES_PER_BLOCK: usize = 4096;
/// Largest block that is decoded; larger ones are refused when read.
pub(crate) const MAX_BLOCK_LEN: usize = MAX_PAYLOAD_LEN + 64 * 1024;

/// How [`Topics::publish_batch_with`](super::Topics::publish_batch_with) packs
/// messages into blocks.
///
/// Packing cuts the per-block cost (a Merkle tree node pair, a bitfield bit and,
/// for unbatched appends, a signature) and shares the topic name between the
/// messages of a block. Each message keeps its own address
/// `(feed key, seq, index)`. The trade-off: a peer replicates whole blocks, so a
/// block is the smallest unit that sparse replication can fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packing {
    /// A block is closed once adding the next message would pass this many bytes
    /// (a single larger message still gets a block of its own). Default: 64 KiB.
    pub max_block_bytes: usize,
    /// Most messages per block, at most [`MAX_MESSAGES_PER_BLOCK`]. Default: 1024.
    pub max_messages: usize,
}

impl Default for Packing {
    fn default() -> Self {
        Self {
            max_block_bytes: 64 * 1024,
            max_messages: 1024,
        }
    }
}

impl Packing {
    /// One message per block (no packing), still appended as one signed batch.
    pub fn one_per_block() -> Self {
        Self {
            max_block_bytes: 0,
            max_messages: 1,
        }
    }

    /// At most `max_messages` per block (and the default byte bound).
    pub fn max_messages(max_messages: usize) -> Self {
        Self {
            max_messages,
            ..Self::default()
        }
    }
}

/// Why a topic name is refused, or `None` if it is fine.
pub fn topic_problem(topic: &str) -> Option<&'static str> {
    if topic.is_empty() {
        Some("it is empty")
    } else if topic.len() > MAX_TOPIC_LEN {
        Some("it is longer than 200 bytes")
    } else if topic.chars().any(char::is_control) {
        Some("it contains a control character")
    } else {
        None
    }
}

pub(crate) fn validate_topic(topic: &str) -> Result<(), Error> {
    match topic_problem(topic) {
        None => Ok(()),
        Some(reason) => Err(Error::InvalidTopic {
            topic: topic.chars().take(64).collect(),
            reason,
        }),
    }
}

/// Checks a message before it is published.
pub(crate) fn validate_message(message: &Message) -> Result<(), Error> {
    validate_topic(&message.topic)?;
    if message.payload.len() > MAX_PAYLOAD_LEN {
        return Err(Error::InvalidMessage {
            reason: format!(
                "a payload of {} bytes exceeds the limit of {MAX_PAYLOAD_LEN}; split it, or store it elsewhere and publish a reference",
                message.payload.len()
            ),
        });
    }
    if let Some(content_type) = &message.content_type
        && content_type.len() > MAX_CONTENT_TYPE_LEN
    {
        return Err(Error::InvalidMessage {
            reason: format!(
                "a content type of {} bytes exceeds the limit of {MAX_CONTENT_TYPE_LEN}",
                content_type.len()
            ),
        });
    }
    Ok(())
}

/// Packs messages of one topic into encoded blocks, in order; returns each block
/// with the number of messages it holds. Only the first message of each block
/// carries the topic name.
pub(crate) fn pack(topic: &str, messages: Vec<Message>, packing: Packing) -> Vec<(Vec<u8>, usize)> {
    let max_messages = packing.max_messages.clamp(1, MAX_MESSAGES_PER_BLOCK);
    let max_bytes = packing.max_block_bytes.min(MAX_PAYLOAD_LEN);
    let mut blocks = Vec::new();
    let mut current: Vec<pb::TopicMessage> = Vec::new();
    let mut current_len = 0;
    let mut flush = |current: &mut Vec<pb::TopicMessage>| {
        if let Some(first) = current.first_mut() {
            first.topic = topic.to_owned();
            let count = current.len();
            let block = pb::MessageBlock {
                messages: std::mem::take(current),
            };
            blocks.push((block.encode_to_vec(), count));
        }
    };
    for message in messages {
        let record = pb::TopicMessage {
            topic: String::new(),
            timestamp_ms: message.timestamp_ms,
            payload: message.payload,
            content_type: message.content_type,
        };
        let len = record.encoded_len();
        let framed = 1 + prost::encoding::encoded_len_varint(len as u64) + len;
        if !current.is_empty()
            && (current.len() >= max_messages || current_len + framed > max_bytes)
        {
            flush(&mut current);
            current_len = 0;
        }
        current.push(record);
        current_len += framed;
    }
    flush(&mut current);
    blocks
}

/// Counts the messages of an encoded block without decoding them, so a block
/// holding millions of tiny records is refused before they are allocated.
fn count_messages(mut buf: &[u8]) -> Result<usize, String> {
    let mut count = 0usize;
    while !buf.is_empty() {
        let (tag, wire_type) =
            prost::encoding::decode_key(&mut buf).map_err(|e| format!("malformed: {e}"))?;
        if tag == 1 {
            count += 1;
            if count > MAX_MESSAGES_PER_BLOCK {
                return Err(format!(
                    "more than {MAX_MESSAGES_PER_BLOCK} messages in one block"
                ));
            }
        }
        prost::encoding::skip_field(wire_type, tag, &mut buf, Default::default())
            .map_err(|e| format!("malformed: {e}"))?;
    }
    Ok(count)
}

/// Decodes a block (possibly written by a peer): its topic and its messages,
/// each carrying the topic. Never panics; refuses oversized blocks, empty
/// blocks, invalid or mixed topics and oversized content types.
pub(crate) fn decode_block(bytes: &[u8]) -> Result<(String, Vec<Message>), String> {
    if bytes.len() > MAX_BLOCK_LEN {
        return Err(format!(
            "block of {} bytes exceeds the limit of {MAX_BLOCK_LEN}",
            bytes.len()
        ));
    }
    if count_messages(bytes)? == 0 {
        return Err("not a message block (no messages)".into());
    }
    let block = pb::MessageBlock::decode(bytes).map_err(|e| format!("malformed: {e}"))?;
    let mut records = block.messages.into_iter();
    let first = records
        .next()
        .ok_or_else(|| "not a message block (no messages)".to_owned())?;
    if let Some(reason) = topic_problem(&first.topic) {
        return Err(format!("invalid topic: {reason}"));
    }
    let topic = first.topic.clone();
    let mut messages = Vec::with_capacity(records.len() + 1);
    for record in std::iter::once(first).chain(records) {
        if !record.topic.is_empty() && record.topic != topic {
            return Err("messages of several topics in one block".into());
        }
        if record
            .content_type
            .as_ref()
            .is_some_and(|c| c.len() > MAX_CONTENT_TYPE_LEN)
        {
            return Err("content type too long".into());
        }
        messages.push(Message {
            topic: topic.clone(),
            timestamp_ms: record.timestamp_ms,
            payload: record.payload,
            content_type: record.content_type,
        });
    }
    Ok((topic, messages))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(n: u8, len: usize) -> Message {
        Message {
            topic: "t".into(),
            timestamp_ms: u64::from(n),
            payload: vec![n; len],
            content_type: n.is_multiple_of(2).then(|| "text/plain".to_owned()),
        }
    }

    #[test]
    fn packed_blocks_round_trip_and_share_the_topic() {
        let messages: Vec<_> = (0..10).map(|n| message(n, 100)).collect();
        let blocks = pack("t", messages.clone(), Packing::max_messages(4));
        assert_eq!(
            blocks.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
            [4, 4, 2]
        );
        let decoded: Vec<Message> = blocks
            .iter()
            .flat_map(|(b, _)| decode_block(b).unwrap().1)
            .collect();
        assert_eq!(decoded, messages);
        // Only the first record of a block names the topic.
        let raw = pb::MessageBlock::decode(&blocks[0].0[..]).unwrap();
        assert_eq!(raw.messages[0].topic, "t");
        assert!(raw.messages[1..].iter().all(|m| m.topic.is_empty()));
    }

    #[test]
    fn packing_respects_the_byte_bound_and_keeps_big_messages_whole() {
        let packing = Packing {
            max_block_bytes: 1000,
            max_messages: 100,
        };
        let messages = vec![message(1, 400), message(2, 400), message(3, 5000)];
        let blocks = pack("t", messages, packing);
        assert_eq!(blocks.iter().map(|(_, n)| *n).collect::<Vec<_>>(), [2, 1]);
        let one = pack(
            "t",
            vec![message(1, 1), message(2, 1)],
            Packing::one_per_block(),
        );
        assert_eq!(one.len(), 2);
    }

    #[test]
    fn topic_names_are_validated() {
        assert!(topic_problem("sensors/temperature").is_none());
        assert!(topic_problem("").is_some());
        assert!(topic_problem(&"x".repeat(201)).is_some());
        assert!(topic_problem(&"x".repeat(200)).is_none());
        assert!(topic_problem("a\nb").is_some());
        assert!(topic_problem("a\u{7f}").is_some());
    }

    #[test]
    fn foreign_or_malformed_blocks_are_errors_not_panics() {
        let mixed = pb::MessageBlock {
            messages: vec![
                pb::TopicMessage {
                    topic: "a".into(),
                    ..Default::default()
                },
                pb::TopicMessage {
                    topic: "b".into(),
                    ..Default::default()
                },
            ],
        }
        .encode_to_vec();
        let no_topic = pb::MessageBlock {
            messages: vec![pb::TopicMessage::default()],
        }
        .encode_to_vec();
        let long_type = pb::MessageBlock {
            messages: vec![pb::TopicMessage {
                topic: "a".into(),
                content_type: Some("x".repeat(256)),
                ..Default::default()
            }],
        }
        .encode_to_vec();
        let too_many = pb::MessageBlock {
            messages: vec![
                pb::TopicMessage {
                    topic: "a".into(),
                    ..Default::default()
                };
                MAX_MESSAGES_PER_BLOCK + 1
            ],
        }
        .encode_to_vec();
        for bytes in [
            &b""[..],
            b"21.5",
            b"\xff\xff\xff",
            b"\x0a\x05abc",
            b"\x0a\xff\xff\xff\xff\x0f",
            &mixed,
            &no_topic,
            &long_type,
            &too_many,
        ] {
            assert!(decode_block(bytes).is_err(), "{bytes:?}");
        }
        assert!(decode_block(&vec![0; MAX_BLOCK_LEN + 1]).is_err());
    }

    /// What a block may cost in memory beyond 8 times its size: every message of a
    /// block carries its own copy of the topic, and a record of two bytes is two
    /// structs (the protobuf one and ours) while it is decoded.
    const BLOCK_FIXED_BYTES: usize = MAX_MESSAGES_PER_BLOCK
        * (MAX_TOPIC_LEN
            + std::mem::size_of::<pb::TopicMessage>()
            + std::mem::size_of::<Message>())
        + 4096;

    /// Decodes `bytes` as a block read from a peer's feed, measuring its peak
    /// allocation: a value within the limits that decodes the same after a round
    /// trip, or an error; never a panic, never more than the bound.
    fn check_block(bytes: &[u8]) -> Result<bool, proptest::test_runner::TestCaseError> {
        use proptest::prelude::*;
        let (decoded, peak) = crate::alloc_probe::peak_bytes(|| decode_block(bytes));
        prop_assert!(
            crate::fuzz_support::within_bound(bytes.len(), peak, BLOCK_FIXED_BYTES),
            "{peak} bytes allocated for a block of {}",
            bytes.len()
        );
        let Ok((topic, messages)) = decoded else {
            return Ok(false);
        };
        prop_assert!(topic_problem(&topic).is_none());
        prop_assert!(!messages.is_empty() && messages.len() <= MAX_MESSAGES_PER_BLOCK);
        for m in &messages {
            prop_assert_eq!(&m.topic, &topic);
            prop_assert!(
                m.content_type
                    .as_ref()
                    .is_none_or(|c| c.len() <= MAX_CONTENT_TYPE_LEN)
            );
        }
        let packing = Packing {
            max_block_bytes: usize::MAX,
            max_messages: MAX_MESSAGES_PER_BLOCK,
        };
        // Packed again (into more than one block if it is near the size limit), the
        // messages decode the same.
        let mut again = Vec::new();
        for (block, _) in pack(&topic, messages.clone(), packing) {
            match decode_block(&block) {
                Ok((_, decoded)) => again.extend(decoded),
                Err(e) => return Err(TestCaseError::fail(format!("repacked: {e}"))),
            }
        }
        prop_assert_eq!(again, messages);
        Ok(true)
    }

    fn arb_block() -> proptest::strategy::BoxedStrategy<Vec<u8>> {
        use proptest::prelude::*;
        let record = (
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..48),
            proptest::option::of("[a-z/+.]{0,12}"),
        );
        ("[a-z/]{1,16}", proptest::collection::vec(record, 1..8))
            .prop_map(|(topic, records)| {
                let messages = records
                    .into_iter()
                    .map(|(timestamp_ms, payload, content_type)| Message {
                        topic: topic.clone(),
                        timestamp_ms,
                        payload,
                        content_type,
                    })
                    .collect();
                let packing = Packing {
                    max_block_bytes: usize::MAX,
                    max_messages: MAX_MESSAGES_PER_BLOCK,
                };
                pack(&topic, messages, packing).remove(0).0
            })
            .boxed()
    }

    /// Arbitrary bytes, valid blocks and mutated ones (flipped, truncated, huge
    /// lengths, inserted and repeated bytes) through `decode_block`.
    #[test]
    fn fuzz_message_blocks() {
        let decoded = std::cell::Cell::new(0u64);
        let strategy = crate::fuzz_support::hostile_inputs(arb_block());
        let inputs = crate::fuzz_support::fuzz_for("message blocks", strategy, 1024, |bytes| {
            decoded.set(decoded.get() + u64::from(check_block(&bytes)?));
            Ok(())
        });
        println!(
            "message blocks: {} of {inputs} inputs decoded",
            decoded.get()
        );
        assert!(decoded.get() > 0 && decoded.get() < inputs);
    }

    /// Blocks of the largest size a feed's block may have, filled with the worst
    /// a peer can put there: refused, or decoded within the bound.
    #[test]
    fn hostile_maximum_size_blocks_are_bounded() {
        let field = |tag: u8, body: &[u8]| {
            let mut out = vec![tag];
            prost::encoding::encode_varint(body.len() as u64, &mut out);
            out.extend_from_slice(body);
            out
        };
        let topic = "t".repeat(MAX_TOPIC_LEN);
        let first = field(0x0a, &field(0x0a, topic.as_bytes()));
        // Empty records to the brim (more than the count allows).
        let empty_records = [
            first.clone(),
            [0x0a, 0x00].repeat((MAX_BLOCK_LEN - 300) / 2),
        ]
        .concat();
        // As many records as allowed, each naming the longest topic.
        let longest_topics = first.repeat(MAX_MESSAGES_PER_BLOCK);
        // As many records as allowed, the rest of the block one payload.
        let payload = field(0x0a, &field(0x1a, &vec![7; MAX_BLOCK_LEN - 64 * 1024]));
        let allowed_then_payload = [
            first.clone(),
            [0x0a, 0x00].repeat(MAX_MESSAGES_PER_BLOCK - 2),
            payload,
        ]
        .concat();
        // One record repeating its topic field (protobuf keeps the last).
        let repeated_topic = field(0x0a, &field(0x0a, b"x").repeat((MAX_BLOCK_LEN - 16) / 3));
        // A record declaring a length far past the block.
        let huge_length = [first.clone(), vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]].concat();
        // Unknown fields to the brim.
        let unknown = [first, [0x10, 0x01].repeat((MAX_BLOCK_LEN - 300) / 2)].concat();
        for (name, bytes, ok) in [
            ("empty records", empty_records, false),
            ("longest topics", longest_topics, true),
            ("allowed records then a payload", allowed_then_payload, true),
            ("repeated topic field", repeated_topic, true),
            ("huge declared length", huge_length, false),
            ("unknown fields", unknown, true),
        ] {
            assert!(bytes.len() <= MAX_BLOCK_LEN, "{name}: {}", bytes.len());
            let (result, peak) = crate::alloc_probe::peak_bytes(|| decode_block(&bytes));
            println!(
                "hostile block {name}: {} bytes, {} ({peak} bytes allocated at the peak, {:.2}x)",
                bytes.len(),
                if result.is_ok() { "decoded" } else { "refused" },
                peak as f64 / bytes.len() as f64
            );
            assert_eq!(result.is_ok(), ok, "{name}: {:?}", result.err());
            assert!(
                crate::fuzz_support::within_hostile_bound(bytes.len(), peak),
                "{name}: {peak} bytes"
            );
            assert!(check_block(&bytes).is_ok(), "{name}");
        }
    }

    #[test]
    fn oversized_messages_are_refused_at_publish() {
        let mut m = message(1, MAX_PAYLOAD_LEN + 1);
        assert!(matches!(
            validate_message(&m),
            Err(Error::InvalidMessage { .. })
        ));
        m.payload.clear();
        m.content_type = Some("x".repeat(MAX_CONTENT_TYPE_LEN + 1));
        assert!(validate_message(&m).is_err());
        m.content_type = None;
        m.topic = String::new();
        assert!(matches!(
            validate_message(&m),
            Err(Error::InvalidTopic { .. })
        ));
    }
}
