//! Message addresses and the consumer [`Cursor`] with its text form (IO-less).

use std::{collections::BTreeMap, fmt, str::FromStr};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use prost::Message as _;

use super::Message;
use crate::{error::Error, keys::FeedKey, proto::pb};

/// Prefix of a cursor's text form; names the format version. Version 2 adds the
/// scope; version 1 cursors (no scope) are still read.
const CURSOR_PREFIX: &str = "v2.";
const CURSOR_PREFIX_V1: &str = "v1.";
/// Bytes of a cursor's scope fingerprint.
const SCOPE_LEN: usize = 8;
/// Most feeds a cursor's text form may list.
pub const MAX_CURSOR_FEEDS: usize = 65_536;
/// Most damaged blocks a cursor keeps to read again (see [`Cursor::passed_over`]);
/// a read that meets more stops that feed at the damage instead of passing over it.
pub const MAX_PASSED_OVER: usize = 1024;
/// Longest text form of a cursor that is parsed (4 MiB).
const MAX_CURSOR_TEXT_LEN: usize = 4 * 1024 * 1024;

/// The stable address of one message: which feed, which block, which message in
/// the block. Never changes once the message is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageAddress {
    /// The feed (one gateway's writer for the topic).
    pub key: FeedKey,
    /// Block sequence number within the feed.
    pub seq: u64,
    /// Index of the message within the block (0 unless the block is packed).
    pub index: u32,
}

impl fmt::Display for MessageAddress {
    /// `<hex key>/<seq>/<index>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.key, self.seq, self.index)
    }
}

/// A message read from a topic, with its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    /// Where it is stored.
    pub address: MessageAddress,
    /// The message.
    pub message: Message,
}

/// Where a consumer stands in one topic: for each feed, the address of the next
/// unread message. Feeds it does not list are read from their start, so
/// [`Cursor::default`] reads a topic from the beginning.
///
/// Save it as text with `to_string()` (compact and URL-safe) and restore it with
/// `parse()`. See the [module docs](super) for why resuming from a cursor never
/// loses or repeats a message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Next unread (seq, index) per feed; never holds (0, 0).
    positions: BTreeMap<FeedKey, (u64, u32)>,
    /// The group and topic it was read from, once it was (see [`Scope`]).
    scope: Option<Scope>,
    /// Damaged blocks passed over, behind their feed's position: (key, seq) to
    /// the index of the next unread message in that block.
    passed_over: BTreeMap<(FeedKey, u64), u32>,
}

/// A short fingerprint of a group and a topic: a cursor read from one is refused
/// for another, instead of silently re-reading everything. It reveals neither the
/// shared key nor the topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scope([u8; SCOPE_LEN]);

impl Scope {
    /// The scope of `topic` in the group whose public id is `group_id`.
    pub(crate) fn new(group_id: &[u8; 32], topic: &str) -> Self {
        use blake2::{Blake2b512, Digest};
        let mut hasher = Blake2b512::new();
        hasher.update(b"multifeed cursor scope v2\0");
        hasher.update(group_id);
        hasher.update((topic.len() as u64).to_le_bytes());
        hasher.update(topic.as_bytes());
        let digest = hasher.finalize();
        let mut out = [0u8; SCOPE_LEN];
        out.copy_from_slice(&digest[..SCOPE_LEN]);
        Scope(out)
    }
}

impl Cursor {
    /// A cursor at the beginning of every feed.
    pub fn new() -> Self {
        Self::default()
    }

    /// The address of the next unread message of feed `key` (block 0, index 0
    /// if the cursor has not moved in that feed).
    pub fn next_address(&self, key: &FeedKey) -> MessageAddress {
        let (seq, index) = self.position(key);
        MessageAddress {
            key: *key,
            seq,
            index,
        }
    }

    /// The next unread address of every feed the cursor has moved in, by key.
    pub fn positions(&self) -> impl Iterator<Item = MessageAddress> + '_ {
        self.positions
            .iter()
            .map(|(&key, &(seq, index))| MessageAddress { key, seq, index })
    }

    /// Number of feeds the cursor has moved in.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// Whether the cursor is at the beginning of every feed.
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Whether the message at `address` is behind the cursor (already read). A
    /// message of a damaged block that was passed over is not.
    pub fn has_consumed(&self, address: &MessageAddress) -> bool {
        if let Some(&index) = self.passed_over.get(&(address.key, address.seq)) {
            return address.index < index;
        }
        (address.seq, address.index) < self.position(&address.key)
    }

    /// The blocks damaged on disk that reads passed over, each as the address
    /// of its next unread message. Every read tries them again first and returns
    /// their messages once the block is intact (restored from a backup, or
    /// fetched again from a peer), so damage never makes a consumer lose a
    /// message for good. At most [`MAX_PASSED_OVER`].
    pub fn passed_over(&self) -> impl Iterator<Item = MessageAddress> + '_ {
        self.passed_over
            .iter()
            .map(|(&(key, seq), &index)| MessageAddress { key, seq, index })
    }

    /// Keeps the damaged block at `address` (from its message `index`) to read
    /// again; false, and nothing kept, when [`MAX_PASSED_OVER`] are kept already.
    pub(crate) fn pass_over(&mut self, address: MessageAddress) -> bool {
        let block = (address.key, address.seq);
        if !self.passed_over.contains_key(&block) && self.passed_over.len() >= MAX_PASSED_OVER {
            return false;
        }
        self.passed_over.insert(block, address.index);
        true
    }

    /// Forgets a passed-over block once it was read whole.
    pub(crate) fn forget_passed_over(&mut self, key: FeedKey, seq: u64) {
        self.passed_over.remove(&(key, seq));
    }

    /// Moves the cursor past the message at `address` (and so past every earlier
    /// message of that feed). Never moves it back. Use it to keep a cursor while
    /// consuming [`Topics::follow`](super::Topics::follow).
    pub fn advance(&mut self, address: &MessageAddress) {
        let next = match address.index.checked_add(1) {
            Some(index) => (address.seq, index),
            None => (address.seq.saturating_add(1), 0),
        };
        if let Some(index) = self.passed_over.get_mut(&(address.key, address.seq)) {
            // A message of a passed-over block, read again.
            *index = (*index).max(next.1);
            return;
        }
        if next > self.position(&address.key) {
            self.positions.insert(address.key, next);
        }
    }

    /// Checks that the cursor may be used for `scope` (an unscoped one may be used
    /// anywhere) and marks it as belonging to it.
    pub(crate) fn check_scope(&mut self, scope: Scope) -> Result<(), Error> {
        match self.scope {
            Some(own) if own != scope => Err(Error::InvalidCursor {
                reason: "it was read from another topic or another group".into(),
            }),
            _ => {
                self.scope = Some(scope);
                Ok(())
            }
        }
    }

    pub(crate) fn position(&self, key: &FeedKey) -> (u64, u32) {
        self.positions.get(key).copied().unwrap_or((0, 0))
    }

    /// Sets a feed's position as is (the merge only ever moves it forward).
    pub(crate) fn set(&mut self, key: FeedKey, seq: u64, index: u32) {
        if (seq, index) == (0, 0) {
            self.positions.remove(&key);
        } else {
            self.positions.insert(key, (seq, index));
        }
    }

    fn to_pb(&self) -> pb::Cursor {
        pb::Cursor {
            positions: self
                .positions
                .iter()
                .map(|(key, &(seq, index))| pb::FeedPosition {
                    key: key.as_bytes().to_vec(),
                    seq,
                    index,
                })
                .collect(),
            scope: self.scope.map(|scope| scope.0.to_vec()),
            passed_over: self
                .passed_over()
                .map(|address| pb::FeedPosition {
                    key: address.key.as_bytes().to_vec(),
                    seq: address.seq,
                    index: address.index,
                })
                .collect(),
        }
    }
}

impl fmt::Display for Cursor {
    /// `v2.` (`v1.` for a cursor without a scope) followed by the base64url
    /// (unpadded) protobuf `Cursor`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // An unscoped cursor (never read from a topic) keeps the v1 form.
        let prefix = match self.scope {
            Some(_) => CURSOR_PREFIX,
            None => CURSOR_PREFIX_V1,
        };
        write!(
            f,
            "{prefix}{}",
            URL_SAFE_NO_PAD.encode(self.to_pb().encode_to_vec())
        )
    }
}

impl FromStr for Cursor {
    type Err = Error;

    /// Parses the text form made by `to_string()`. Bounded: text longer than
    /// 4 MiB or listing more than [`MAX_CURSOR_FEEDS`] feeds is refused.
    fn from_str(text: &str) -> Result<Self, Error> {
        let invalid = |reason: String| Error::InvalidCursor { reason };
        if text.len() > MAX_CURSOR_TEXT_LEN {
            return Err(invalid(format!(
                "{} bytes of text, more than the limit of {MAX_CURSOR_TEXT_LEN}",
                text.len()
            )));
        }
        let (body, scoped) = match (
            text.strip_prefix(CURSOR_PREFIX),
            text.strip_prefix(CURSOR_PREFIX_V1),
        ) {
            (Some(body), _) => (body, true),
            (None, Some(body)) => (body, false),
            (None, None) => {
                return Err(invalid(format!(
                    "it does not start with {CURSOR_PREFIX:?} or {CURSOR_PREFIX_V1:?}"
                )));
            }
        };
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| invalid(format!("not base64url: {e}")))?;
        // Count, and check every key's length, before prost allocates a struct per
        // (possibly empty) position: each position left carries a whole key.
        let (mut listed, mut passed_over) = (0usize, 0usize);
        let malformed = |e: String| invalid(format!("malformed: {e}"));
        crate::proto::for_each_field(&bytes, malformed, |field, position| {
            match field {
                1 => {
                    listed += 1;
                    if listed > MAX_CURSOR_FEEDS {
                        return Err(invalid(format!(
                            "more than {MAX_CURSOR_FEEDS} feeds, the limit"
                        )));
                    }
                }
                3 => {
                    passed_over += 1;
                    if passed_over > MAX_PASSED_OVER {
                        return Err(invalid(format!(
                            "more than {MAX_PASSED_OVER} damaged blocks passed over, the limit"
                        )));
                    }
                }
                _ => return Ok(()),
            }
            match crate::proto::last_bytes_len(position, 1, malformed)? {
                32 => Ok(()),
                len => Err(invalid(format!(
                    "a feed key of {len} bytes (keys are 32 bytes)"
                ))),
            }
        })?;
        let decoded =
            pb::Cursor::decode(&bytes[..]).map_err(|e| invalid(format!("malformed: {e}")))?;
        let mut cursor = Cursor::default();
        if scoped {
            let scope = decoded.scope.as_deref().unwrap_or_default();
            let scope: [u8; SCOPE_LEN] = scope
                .try_into()
                .map_err(|_| invalid(format!("a scope of {} bytes", scope.len())))?;
            cursor.scope = Some(Scope(scope));
        }
        for position in decoded.positions {
            let key = FeedKey::from_slice(&position.key).map_err(|_| {
                invalid(format!(
                    "a feed key of {} bytes (keys are 32 bytes)",
                    position.key.len()
                ))
            })?;
            if cursor.positions.contains_key(&key) {
                return Err(invalid(format!("feed {key} is listed twice")));
            }
            cursor.set(key, position.seq, position.index);
        }
        for block in decoded.passed_over {
            let key = FeedKey::from_slice(&block.key).map_err(|_| {
                invalid(format!(
                    "a passed-over block's feed key of {} bytes (keys are 32 bytes)",
                    block.key.len()
                ))
            })?;
            if block.seq >= cursor.position(&key).0 {
                return Err(invalid(format!(
                    "block {} of feed {key} is both passed over and unread",
                    block.seq
                )));
            }
            cursor.passed_over.insert((key, block.seq), block.index);
        }
        Ok(cursor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> FeedKey {
        FeedKey::from_bytes([n; 32])
    }

    fn at(seq: u64, index: u32) -> MessageAddress {
        MessageAddress {
            key: key(1),
            seq,
            index,
        }
    }

    #[test]
    fn text_form_round_trips_and_is_url_safe() {
        let mut cursor = Cursor::default();
        assert_eq!(cursor.to_string().parse::<Cursor>().unwrap(), cursor);
        cursor.set(key(1), 7, 3);
        cursor.set(key(2), u64::MAX, u32::MAX);
        let text = cursor.to_string();
        assert!(
            text.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "{text}"
        );
        assert_eq!(text.parse::<Cursor>().unwrap(), cursor);
    }

    #[test]
    fn advance_moves_forward_only() {
        let mut cursor = Cursor::default();
        let at = |seq, index| MessageAddress {
            key: key(1),
            seq,
            index,
        };
        cursor.advance(&at(2, 1));
        assert_eq!(cursor.next_address(&key(1)), at(2, 2));
        assert!(cursor.has_consumed(&at(2, 1)));
        assert!(cursor.has_consumed(&at(0, 9)));
        assert!(!cursor.has_consumed(&at(2, 2)));
        cursor.advance(&at(1, 0));
        assert_eq!(cursor.next_address(&key(1)), at(2, 2));
        cursor.advance(&at(3, u32::MAX));
        assert_eq!(cursor.next_address(&key(1)), at(4, 0));
        assert!(!cursor.has_consumed(&MessageAddress {
            key: key(2),
            seq: 0,
            index: 0
        }));
    }

    /// A cursor read from one topic (or group) is refused for another; one without
    /// a scope (v1, or never read) is taken anywhere; the scope survives the text form.
    #[test]
    fn a_cursor_belongs_to_its_group_and_topic() {
        let group = [7u8; 32];
        let mut cursor = Cursor::default();
        cursor.check_scope(Scope::new(&group, "t")).unwrap();
        cursor.advance(&at(0, 0));
        let parsed: Cursor = cursor.to_string().parse().unwrap();
        assert_eq!(parsed, cursor);
        assert!(cursor.to_string().starts_with("v2."));
        for other in [Scope::new(&group, "u"), Scope::new(&[8; 32], "t")] {
            assert!(matches!(
                parsed.clone().check_scope(other),
                Err(Error::InvalidCursor { .. })
            ));
        }
        parsed.clone().check_scope(Scope::new(&group, "t")).unwrap();
        // A v1 cursor (no scope) keeps working for any topic.
        let v1 = format!(
            "v1.{}",
            URL_SAFE_NO_PAD.encode(
                pb::Cursor {
                    positions: vec![pb::FeedPosition {
                        key: vec![1; 32],
                        seq: 1,
                        index: 0
                    }],
                    scope: None,
                    passed_over: Vec::new(),
                }
                .encode_to_vec()
            )
        );
        let mut old: Cursor = v1.parse().unwrap();
        assert_eq!(old.next_address(&key(1)), at(1, 0));
        old.check_scope(Scope::new(&group, "u")).unwrap();
    }

    /// Damaged blocks a read passed over stay unread in the cursor and its text
    /// form, bounded; reading one again moves through it and then forgets it.
    #[test]
    fn passed_over_blocks_stay_unread_bounded_and_survive_the_text_form() {
        let mut cursor = Cursor::default();
        cursor.set(key(1), 10, 0);
        assert!(cursor.pass_over(at(4, 2)));
        assert!(cursor.has_consumed(&at(4, 1)));
        assert!(!cursor.has_consumed(&at(4, 2)));
        assert!(cursor.has_consumed(&at(5, 0)));
        let parsed: Cursor = cursor.to_string().parse().unwrap();
        assert_eq!(parsed, cursor);
        assert_eq!(parsed.passed_over().collect::<Vec<_>>(), [at(4, 2)]);
        // Advancing through the block marks its messages read, never back.
        cursor.advance(&at(4, 5));
        cursor.advance(&at(4, 3));
        assert!(!cursor.has_consumed(&at(4, 6)));
        assert_eq!(cursor.next_address(&key(1)), at(10, 0));
        cursor.forget_passed_over(key(1), 4);
        assert_eq!(cursor.passed_over().count(), 0);

        for seq in 0..MAX_PASSED_OVER as u64 {
            assert!(cursor.pass_over(MessageAddress {
                key: key(2),
                seq,
                index: 0
            }));
        }
        assert!(!cursor.pass_over(at(0, 0)), "one over the bound");
        // Keeping a block already kept is no growth.
        assert!(cursor.pass_over(MessageAddress {
            key: key(2),
            seq: 0,
            index: 1
        }));
    }

    #[test]
    fn a_cursor_text_with_too_many_or_unread_passed_over_blocks_is_refused() {
        let position = |seq| pb::FeedPosition {
            key: vec![1; 32],
            seq,
            index: 0,
        };
        let enc = |c: &pb::Cursor| format!("v2.{}", URL_SAFE_NO_PAD.encode(c.encode_to_vec()));
        let scope = Some(vec![0; SCOPE_LEN]);
        let too_many = pb::Cursor {
            positions: vec![position(u64::MAX)],
            scope: scope.clone(),
            passed_over: (0..=MAX_PASSED_OVER as u64).map(position).collect(),
        };
        let unread = pb::Cursor {
            positions: vec![position(3)],
            scope,
            passed_over: vec![position(3)],
        };
        for text in [enc(&too_many), enc(&unread)] {
            assert!(matches!(
                text.parse::<Cursor>(),
                Err(Error::InvalidCursor { .. })
            ));
        }
    }

    /// What parsing a cursor may allocate beyond 8 times its text: error text (every
    /// position is checked to carry a whole key before any is decoded).
    const CURSOR_FIXED_BYTES: usize = 4096;

    fn check_cursor(text: &str) -> Result<bool, proptest::test_runner::TestCaseError> {
        use proptest::prelude::*;
        let (parsed, peak) = crate::alloc_probe::peak_bytes(|| text.parse::<Cursor>());
        prop_assert!(
            crate::fuzz_support::within_bound(text.len(), peak, CURSOR_FIXED_BYTES),
            "{peak} bytes allocated for a cursor of {} characters",
            text.len()
        );
        match parsed {
            Ok(cursor) => {
                prop_assert!(cursor.len() <= MAX_CURSOR_FEEDS);
                prop_assert!(cursor.passed_over().count() <= MAX_PASSED_OVER);
                prop_assert!(cursor.positions().all(|a| (a.seq, a.index) != (0, 0)));
                prop_assert_eq!(cursor.to_string().parse::<Cursor>().ok(), Some(cursor));
                Ok(true)
            }
            Err(Error::InvalidCursor { .. }) => Ok(false),
            Err(other) => Err(TestCaseError::fail(format!("not InvalidCursor: {other}"))),
        }
    }

    /// A cursor's protobuf, as `to_pb` makes it.
    fn arb_cursor_pb() -> proptest::strategy::BoxedStrategy<Vec<u8>> {
        use proptest::prelude::*;
        let position = (1u8..8, any::<u64>(), any::<u32>());
        (
            proptest::collection::vec(position.clone(), 0..6),
            proptest::option::of(any::<[u8; SCOPE_LEN]>()),
            proptest::collection::vec(position, 0..4),
        )
            .prop_map(|(positions, scope, passed_over)| {
                let mut cursor = Cursor::default();
                for (k, seq, index) in positions {
                    cursor.set(key(k), seq, index);
                }
                for (k, seq, index) in passed_over {
                    let seq = seq % cursor.position(&key(k)).0.max(1);
                    if seq < cursor.position(&key(k)).0 {
                        cursor.pass_over(MessageAddress {
                            key: key(k),
                            seq,
                            index,
                        });
                    }
                }
                cursor.scope = scope.map(Scope);
                cursor.to_pb().encode_to_vec()
            })
            .boxed()
    }

    /// Text a user may paste as a cursor: arbitrary, valid, mutated text, and valid
    /// text around a mutated protobuf, through `Cursor::from_str`.
    #[test]
    fn fuzz_cursor_text() {
        use proptest::prelude::*;
        let valid_text = arb_cursor_pb()
            .prop_map(|bytes| format!("v2.{}", URL_SAFE_NO_PAD.encode(bytes)).into_bytes())
            .boxed();
        let mutated_pb = (
            crate::fuzz_support::hostile_inputs(arb_cursor_pb()),
            prop_oneof![Just(CURSOR_PREFIX), Just(CURSOR_PREFIX_V1)],
        )
            .prop_map(|(bytes, prefix)| format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes)));
        let mutated_text = crate::fuzz_support::hostile_inputs(valid_text)
            .prop_map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
        let strategy = prop_oneof![mutated_pb, mutated_text].boxed();
        let parsed = std::cell::Cell::new(0u64);
        let inputs = crate::fuzz_support::fuzz_for("cursor text", strategy, 1024, |text| {
            parsed.set(parsed.get() + u64::from(check_cursor(&text)?));
            Ok(())
        });
        println!("cursor text: {} of {inputs} inputs parsed", parsed.get());
        assert!(parsed.get() > 0 && parsed.get() < inputs);
    }

    /// Cursor text of the largest accepted length, filled with the worst a pasted
    /// text can hold: refused, or parsed within the bound.
    #[test]
    fn hostile_maximum_size_cursors_are_bounded() {
        let text = |bytes: &[u8]| format!("v2.{}", URL_SAFE_NO_PAD.encode(bytes));
        // Base64 of this many protobuf bytes fills the text limit.
        let room = (MAX_CURSOR_TEXT_LEN - 3) / 4 * 3;
        let position = |k: u32| pb::FeedPosition {
            key: [k.to_be_bytes().to_vec(), vec![0; 28]].concat(),
            seq: 1,
            index: 1,
        };
        let one = pb::Cursor {
            positions: vec![position(0)],
            scope: None,
            passed_over: Vec::new(),
        }
        .encode_to_vec();
        let allowed = pb::Cursor {
            positions: (0..MAX_CURSOR_FEEDS as u32)
                .map(|k| pb::FeedPosition {
                    seq: 2,
                    ..position(k)
                })
                .collect(),
            scope: Some(vec![1; SCOPE_LEN]),
            passed_over: (0..MAX_PASSED_OVER as u32).map(position).collect(),
        }
        .encode_to_vec();
        for (name, bytes, ok) in [
            ("empty positions", [0x0a, 0x00].repeat(room / 2), false),
            (
                "as many empty positions as allowed",
                [0x0a, 0x00].repeat(MAX_CURSOR_FEEDS),
                false,
            ),
            (
                "the same position repeated",
                one.repeat(room / one.len()),
                false,
            ),
            (
                "as many positions and passed-over blocks as allowed",
                allowed,
                true,
            ),
            (
                "empty passed-over blocks",
                [0x1a, 0x00].repeat(room / 2),
                false,
            ),
            (
                "repeated scope field",
                [0x12, 0x08, 1, 1, 1, 1, 1, 1, 1, 1].repeat(room / 10),
                true,
            ),
            (
                "a huge declared length",
                vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f],
                false,
            ),
        ] {
            let text = text(&bytes);
            assert!(text.len() <= MAX_CURSOR_TEXT_LEN, "{name}");
            let (result, peak) = crate::alloc_probe::peak_bytes(|| text.parse::<Cursor>());
            println!(
                "hostile cursor {name}: {} characters, {} ({peak} bytes allocated at the peak, {:.2}x)",
                text.len(),
                if result.is_ok() { "parsed" } else { "refused" },
                peak as f64 / text.len() as f64
            );
            assert_eq!(result.is_ok(), ok, "{name}: {:?}", result.err());
            assert!(
                crate::fuzz_support::within_hostile_bound(text.len(), peak),
                "{name}: {peak} bytes"
            );
            assert!(check_cursor(&text).is_ok(), "{name}");
        }
    }

    #[test]
    fn malformed_cursor_text_is_a_typed_error_not_a_panic() {
        let dup = pb::Cursor {
            positions: vec![
                pb::FeedPosition {
                    key: vec![1; 32],
                    seq: 1,
                    index: 0,
                };
                2
            ],
            scope: None,
            passed_over: Vec::new(),
        };
        let short = pb::Cursor {
            positions: vec![pb::FeedPosition {
                key: vec![1; 31],
                seq: 1,
                index: 0,
            }],
            scope: None,
            passed_over: Vec::new(),
        };
        let too_many = pb::Cursor {
            positions: (0..=MAX_CURSOR_FEEDS as u32)
                .map(|i| pb::FeedPosition {
                    key: [i.to_be_bytes().to_vec(), vec![0; 28]].concat(),
                    seq: 1,
                    index: 0,
                })
                .collect(),
            scope: None,
            passed_over: Vec::new(),
        };
        let enc = |c: &pb::Cursor| format!("v1.{}", URL_SAFE_NO_PAD.encode(c.encode_to_vec()));
        for text in [
            String::new(),
            "v2.".into(),
            "hello".into(),
            "v1.!!!".into(),
            "v1.____".into(),
            format!("v1.{}", URL_SAFE_NO_PAD.encode(b"\x0a\xff\xff\xff\xff\x0f")),
            enc(&dup),
            enc(&short),
            enc(&too_many),
            format!("v1.{}", "A".repeat(MAX_CURSOR_TEXT_LEN)),
        ] {
            assert!(
                matches!(text.parse::<Cursor>(), Err(Error::InvalidCursor { .. })),
                "{}",
                &text[..text.len().min(40)]
            );
        }
    }
}
