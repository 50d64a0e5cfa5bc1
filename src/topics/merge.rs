//! The k-way merge of a topic's feeds (IO-less).
//!
//! [`Merge`] is a small state machine: it asks for blocks ([`Step::Need`]), is
//! given them ([`Merge::supply`]), and yields messages ([`Step::Message`]) in
//! merged order. The caller does the I/O, so the logic is tested here without
//! hypercores.

use std::collections::VecDeque;

use super::{Cursor, Message, MessageAddress, ReceivedMessage};
use crate::keys::FeedKey;

/// What the merge needs next.
#[derive(Debug)]
pub(crate) enum Step {
    /// Supply block `seq` of feed number `feed` (its key is given for logging).
    Need { feed: usize, key: FeedKey, seq: u64 },
    /// The next message in merged order.
    Message(ReceivedMessage),
    /// The limit is reached, or no feed has an unread message available.
    Done,
}

struct FeedState {
    key: FeedKey,
    /// Next unread position.
    seq: u64,
    index: u32,
    /// The unread rest of block `seq`, once supplied.
    block: Option<VecDeque<Message>>,
    /// Block `seq` is not held: the feed contributes nothing more to this read.
    stopped: bool,
}

impl FeedState {
    fn head_order(&self) -> Option<(u64, FeedKey, u64, u32)> {
        let head = self.block.as_ref()?.front()?;
        Some((head.timestamp_ms, self.key, self.seq, self.index))
    }
}

/// One read of a topic: merges the unread messages of its feeds, starting at a
/// cursor, by `(timestamp, key, seq, index)` while keeping each feed in its own
/// order, and stops after `limit` messages.
pub(crate) struct Merge {
    feeds: Vec<FeedState>,
    limit: usize,
    emitted: usize,
}

impl Merge {
    /// A merge of the feeds `keys` (one topic's feeds, each once) from `cursor`.
    pub(crate) fn new(
        keys: impl IntoIterator<Item = FeedKey>,
        cursor: &Cursor,
        limit: usize,
    ) -> Self {
        let feeds = keys
            .into_iter()
            .map(|key| {
                let (seq, index) = cursor.position(&key);
                FeedState {
                    key,
                    seq,
                    index,
                    block: None,
                    stopped: false,
                }
            })
            .collect();
        Self {
            feeds,
            limit,
            emitted: 0,
        }
    }

    /// The next step. Every feed's head must be known before the smallest can be
    /// chosen, so blocks are asked for first, at most one per feed at a time.
    pub(crate) fn step(&mut self) -> Step {
        if self.emitted >= self.limit {
            return Step::Done;
        }
        if let Some((feed, state)) = self
            .feeds
            .iter()
            .enumerate()
            .find(|(_, f)| !f.stopped && f.block.is_none())
        {
            return Step::Need {
                feed,
                key: state.key,
                seq: state.seq,
            };
        }
        let Some(best) = self
            .feeds
            .iter()
            .enumerate()
            .filter_map(|(i, f)| f.head_order().map(|order| (order, i)))
            .min()
            .map(|(_, i)| i)
        else {
            return Step::Done;
        };
        let feed = &mut self.feeds[best];
        let address = MessageAddress {
            key: feed.key,
            seq: feed.seq,
            index: feed.index,
        };
        let block = feed.block.as_mut().expect("the chosen feed has a head");
        let message = block.pop_front().expect("the chosen feed has a head");
        if block.is_empty() {
            feed.block = None;
            feed.seq += 1;
            feed.index = 0;
        } else {
            feed.index += 1;
        }
        self.emitted += 1;
        Step::Message(ReceivedMessage { address, message })
    }

    /// Answers [`Step::Need`] for feed number `feed`: the messages of the block
    /// (empty for a block that holds none of this topic's messages, which is then
    /// passed over), or `None` if the block is not held (yet), which stops this
    /// feed for this read so that a hole is never skipped.
    pub(crate) fn supply(&mut self, feed: usize, block: Option<Vec<Message>>) {
        let Some(state) = self.feeds.get_mut(feed) else {
            return;
        };
        match block {
            None => state.stopped = true,
            Some(messages) => {
                let skip = state.index as usize;
                if skip >= messages.len() {
                    // Nothing unread in this block: go on with the next one.
                    state.seq += 1;
                    state.index = 0;
                } else {
                    state.block = Some(messages.into_iter().skip(skip).collect());
                }
            }
        }
    }

    /// Writes every merged feed's position into `cursor`: past the messages
    /// returned, and no further.
    pub(crate) fn update_cursor(&self, cursor: &mut Cursor) {
        for feed in &self.feeds {
            cursor.set(feed.key, feed.seq, feed.index);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    /// A feed in memory: its blocks, of which the first `visible` are held.
    #[derive(Debug, Clone, Default)]
    struct ModelFeed {
        blocks: Vec<Vec<Message>>,
        visible: usize,
        /// Blocks held beyond a hole (sparse): not contiguous with `visible`.
        held_beyond: HashSet<usize>,
    }

    fn key(n: usize) -> FeedKey {
        FeedKey::from_bytes([n as u8 + 1; 32])
    }

    fn message(ts: u64, payload: &str) -> Message {
        Message {
            topic: "t".into(),
            timestamp_ms: ts,
            payload: payload.as_bytes().to_vec(),
            content_type: None,
        }
    }

    /// Drives a merge over in-memory feeds, as `Topics::read` does over cores.
    fn read(feeds: &[ModelFeed], cursor: &Cursor, limit: usize) -> (Vec<ReceivedMessage>, Cursor) {
        let mut merge = Merge::new((0..feeds.len()).map(key), cursor, limit);
        let mut out = Vec::new();
        loop {
            match merge.step() {
                Step::Done => break,
                Step::Message(m) => out.push(m),
                Step::Need { feed, seq, .. } => {
                    let f = &feeds[feed];
                    let seq = seq as usize;
                    let held = seq < f.visible || f.held_beyond.contains(&seq);
                    let block = (held && seq < f.blocks.len()).then(|| f.blocks[seq].clone());
                    merge.supply(feed, block);
                }
            }
        }
        let mut next = cursor.clone();
        merge.update_cursor(&mut next);
        (out, next)
    }

    fn payloads(messages: &[ReceivedMessage]) -> Vec<String> {
        messages
            .iter()
            .map(|m| String::from_utf8(m.message.payload.clone()).unwrap())
            .collect()
    }

    fn feed(blocks: Vec<Vec<Message>>) -> ModelFeed {
        ModelFeed {
            visible: blocks.len(),
            blocks,
            held_beyond: HashSet::new(),
        }
    }

    #[test]
    fn merges_by_timestamp_with_ties_broken_by_key_then_offset() {
        let feeds = [
            feed(vec![
                vec![message(1, "a1"), message(5, "a5")],
                vec![message(5, "a5b")],
            ]),
            feed(vec![vec![message(2, "b2")], vec![message(5, "b5")]]),
        ];
        let (all, cursor) = read(&feeds, &Cursor::default(), 100);
        assert_eq!(payloads(&all), ["a1", "b2", "a5", "a5b", "b5"]);
        assert_eq!(cursor.next_address(&key(0)).seq, 2);
        assert_eq!(cursor.next_address(&key(1)).seq, 2);
        assert_eq!(
            all[2].address,
            MessageAddress {
                key: key(0),
                seq: 0,
                index: 1
            }
        );
    }

    #[test]
    fn a_limit_advances_only_past_what_was_returned() {
        let feeds = [
            feed(vec![vec![
                message(1, "a1"),
                message(3, "a3"),
                message(5, "a5"),
            ]]),
            feed(vec![vec![message(2, "b2")], vec![message(4, "b4")]]),
        ];
        let (first, cursor) = read(&feeds, &Cursor::default(), 2);
        assert_eq!(payloads(&first), ["a1", "b2"]);
        assert_eq!(cursor.next_address(&key(0)).index, 1);
        assert_eq!(cursor.next_address(&key(1)).seq, 1);
        let cursor: Cursor = cursor.to_string().parse().unwrap();
        let (rest, cursor) = read(&feeds, &cursor, 100);
        assert_eq!(payloads(&rest), ["a3", "b4", "a5"]);
        let (none, again) = read(&feeds, &cursor, 100);
        assert!(none.is_empty());
        assert_eq!(again, cursor);
    }

    #[test]
    fn a_feed_keeps_its_own_order_even_if_its_clock_went_back() {
        // A cursor holds one position per feed, so a feed is consumed as a prefix.
        let feeds = [
            feed(vec![vec![message(10, "a10")], vec![message(1, "a1")]]),
            feed(vec![vec![message(5, "b5")]]),
        ];
        let (all, _) = read(&feeds, &Cursor::default(), 100);
        assert_eq!(payloads(&all), ["b5", "a10", "a1"]);
    }

    #[test]
    fn older_messages_arriving_later_are_read_after_a_resume() {
        let mut feeds = vec![
            feed(vec![vec![message(100, "a100")]]),
            ModelFeed {
                blocks: vec![vec![message(50, "b50")], vec![message(60, "b60")]],
                visible: 0,
                held_beyond: HashSet::new(),
            },
        ];
        let (first, cursor) = read(&feeds, &Cursor::default(), 100);
        assert_eq!(payloads(&first), ["a100"]);
        feeds[1].visible = 2; // replicated later, older timestamps
        let (second, cursor) = read(&feeds, &cursor, 100);
        assert_eq!(payloads(&second), ["b50", "b60"]);
        assert!(read(&feeds, &cursor, 100).0.is_empty());
    }

    #[test]
    fn a_hole_stops_the_feed_instead_of_skipping_it() {
        let mut feeds = vec![ModelFeed {
            blocks: vec![
                vec![message(1, "a1")],
                vec![message(2, "a2")],
                vec![message(3, "a3")],
            ],
            visible: 1,
            held_beyond: [2].into(),
        }];
        let (first, cursor) = read(&feeds, &Cursor::default(), 100);
        assert_eq!(payloads(&first), ["a1"]);
        feeds[0].visible = 3;
        let (second, _) = read(&feeds, &cursor, 100);
        assert_eq!(payloads(&second), ["a2", "a3"]);
    }

    #[test]
    fn blocks_without_messages_for_the_topic_are_passed_over() {
        let feeds = [feed(vec![
            vec![message(1, "a1")],
            vec![],
            vec![message(3, "a3")],
        ])];
        let (all, cursor) = read(&feeds, &Cursor::default(), 100);
        assert_eq!(payloads(&all), ["a1", "a3"]);
        assert_eq!(cursor.next_address(&key(0)).seq, 3);
    }

    #[test]
    fn a_cursor_kept_with_advance_resumes_like_the_read_cursor() {
        let feeds = [feed(vec![
            vec![message(1, "a1"), message(2, "a2")],
            vec![message(3, "a3")],
        ])];
        let (first, _) = read(&feeds, &Cursor::default(), 2);
        let mut kept = Cursor::default();
        for m in &first {
            kept.advance(&m.address);
        }
        // (seq 0, index 2) is past the end of block 0: the merge moves on.
        assert_eq!(kept.next_address(&key(0)).index, 2);
        let (rest, _) = read(&feeds, &kept, 100);
        assert_eq!(payloads(&rest), ["a3"]);
    }

    #[test]
    fn limit_zero_reads_nothing() {
        let feeds = [feed(vec![vec![message(1, "a1")]])];
        let (none, cursor) = read(&feeds, &Cursor::default(), 0);
        assert!(none.is_empty());
        assert!(cursor.is_empty());
    }

    /// One step of a random history.
    #[derive(Debug, Clone)]
    enum Op {
        /// Writer `w` appends a block of `n` messages with these timestamps.
        Publish { writer: usize, timestamps: Vec<u64> },
        /// The reader receives `blocks` more blocks of writer `w` (a sync).
        Sync { writer: usize, blocks: usize },
        /// The reader reads up to `limit`, then saves and restores its cursor.
        Read { limit: usize },
    }

    fn op(writers: usize) -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..writers, prop::collection::vec(0u64..50, 1..4))
                .prop_map(|(writer, timestamps)| Op::Publish { writer, timestamps }),
            (0..writers, 1usize..4).prop_map(|(writer, blocks)| Op::Sync { writer, blocks }),
            (0usize..6).prop_map(|limit| Op::Read { limit }),
        ]
    }

    fn history() -> impl Strategy<Value = (usize, Vec<Op>)> {
        (2usize..=3)
            .prop_flat_map(|writers| (Just(writers), prop::collection::vec(op(writers), 0..60)))
    }

    proptest! {
        /// Random interleavings of writers publishing (timestamps in any order,
        /// so later syncs bring older messages), syncs making feed prefixes
        /// visible, and reads with random limits resumed from the cursor's text
        /// form: every message is read exactly once, each feed in its order.
        #[test]
        fn interleaved_writers_and_syncs_never_lose_or_repeat_a_message((writers, ops) in history()) {
            let mut feeds = vec![ModelFeed::default(); writers];
            let mut cursor_text = Cursor::default().to_string();
            let mut seen: Vec<ReceivedMessage> = Vec::new();
            let mut next_id = 0;
            let read_once = |feeds: &[ModelFeed], limit: usize, cursor_text: &mut String, seen: &mut Vec<ReceivedMessage>| {
                let cursor: Cursor = cursor_text.parse().unwrap();
                let (got, next) = read(feeds, &cursor, limit);
                prop_assert!(got.len() <= limit);
                // Within one read, each feed's messages come in feed order.
                for w in 0..writers {
                    let mine: Vec<_> = got.iter().filter(|m| m.address.key == key(w)).map(|m| m.address).collect();
                    prop_assert!(mine.windows(2).all(|p| p[0] < p[1]));
                }
                for m in &got {
                    prop_assert!(!cursor.has_consumed(&m.address));
                    prop_assert!(next.has_consumed(&m.address));
                }
                seen.extend(got);
                *cursor_text = next.to_string();
                Ok(())
            };
            for op in ops {
                match op {
                    Op::Publish { writer, timestamps } => {
                        let block = timestamps
                            .into_iter()
                            .map(|ts| {
                                next_id += 1;
                                message(ts, &format!("m{next_id}"))
                            })
                            .collect();
                        feeds[writer].blocks.push(block);
                    }
                    Op::Sync { writer, blocks } => {
                        let f = &mut feeds[writer];
                        f.visible = (f.visible + blocks).min(f.blocks.len());
                    }
                    Op::Read { limit } => read_once(&feeds, limit, &mut cursor_text, &mut seen)?,
                }
            }
            // Finally everything syncs and the reader drains the topic.
            for f in &mut feeds {
                f.visible = f.blocks.len();
            }
            read_once(&feeds, usize::MAX, &mut cursor_text, &mut seen)?;

            let mut read_ids: Vec<_> = seen.iter().map(|m| m.message.payload.clone()).collect();
            let mut all_ids: Vec<_> = feeds.iter().flat_map(|f| f.blocks.iter().flatten()).map(|m| m.payload.clone()).collect();
            read_ids.sort();
            all_ids.sort();
            let unique: HashSet<_> = read_ids.iter().collect();
            prop_assert_eq!(unique.len(), read_ids.len(), "a message was read twice");
            prop_assert_eq!(read_ids, all_ids, "a message was lost");
            // Addresses match where the messages really are.
            for m in &seen {
                let w = (0..writers).find(|&w| key(w) == m.address.key).unwrap();
                prop_assert_eq!(&feeds[w].blocks[m.address.seq as usize][m.address.index as usize], &m.message);
            }
            // Resuming once more reads nothing.
            let cursor: Cursor = cursor_text.parse().unwrap();
            prop_assert!(read(&feeds, &cursor, usize::MAX).0.is_empty());
        }

        /// When every feed's timestamps are non-decreasing, one read returns its
        /// messages fully sorted by (timestamp, key, seq, index).
        #[test]
        fn a_read_of_time_ordered_feeds_is_globally_sorted(
            blocks in prop::collection::vec(prop::collection::vec(prop::collection::vec(0u64..20, 1..4), 0..5), 2..=3),
            limit in 0usize..40,
        ) {
            let feeds: Vec<ModelFeed> = blocks
                .into_iter()
                .map(|f| {
                    let mut ts: Vec<u64> = f.iter().flatten().copied().collect();
                    ts.sort();
                    let mut ts = ts.into_iter();
                    feed(f.iter().map(|b| b.iter().map(|_| message(ts.next().unwrap(), "x")).collect()).collect())
                })
                .collect();
            let (got, _) = read(&feeds, &Cursor::default(), limit);
            let orders: Vec<_> = got.iter().map(|m| (m.message.timestamp_ms, m.address)).collect();
            prop_assert!(orders.windows(2).all(|p| p[0] < p[1]));
            let total: usize = feeds.iter().map(|f| f.blocks.iter().map(Vec::len).sum::<usize>()).sum();
            prop_assert_eq!(got.len(), total.min(limit));
        }
    }
}
