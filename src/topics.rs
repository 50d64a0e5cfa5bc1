//! Topics: timestamped messages from many writers, read back merged, with a
//! resumable consumer [`Cursor`] (a Kafka-style consumer over a multi-writer group).
//!
//! ## Model
//!
//! Each gateway (peer) publishes to a topic `T` through its own local writer
//! named `topic/T`, so every gateway's log of `T` is one feed, and replication
//! merges all of them under the group's shared key. A feed holds one topic: every
//! block is a protobuf `MessageBlock` (see `proto/multifeed.proto`) of 1..N
//! [`Message`]s (topic, timestamp in ms, payload, optional content type). The
//! topic of a remote feed is learnt from its block 0; a feed whose block 0 is not
//! a message block is not a topic feed and is ignored.
//!
//! [`Topics::publish`] writes one message per block; [`Topics::publish_batch`]
//! packs many into each block ([`Packing`]), which cuts the per-message overhead
//! on disk and on the wire. Either way every message keeps a stable
//! [`MessageAddress`]: `(feed key, block seq, index in the block)`.
//!
//! ## Reading and the cursor
//!
//! A [`Cursor`] holds, **per feed, the address of the next unread message**.
//! [`Topics::read`]`(topic, cursor, limit)` merges the unread messages of every
//! feed of the topic and returns up to `limit` of them with the advanced cursor:
//!
//! - The merge is a k-way merge: it repeatedly takes, among the feeds' next
//!   unread messages, the one with the smallest `(timestamp, feed key, seq,
//!   index)`. Each feed is therefore consumed in its own order, as a prefix, and
//!   when every feed's timestamps are non-decreasing (one clock per gateway) a
//!   read is sorted by timestamp with ties broken by key and offset.
//! - A feed is read only up to its first block this peer does not hold: a hole
//!   left by sparse or unfinished replication is waited for, never skipped.
//! - The returned cursor moves each feed's position past the messages returned,
//!   and no further.
//!
//! **Guarantee: resuming never loses or repeats a message.** A message is
//! returned exactly when it is at or after its feed's position; returning it
//! moves that position past it, and positions only move forward. A message that
//! arrives later by replication, even with a timestamp older than everything
//! already read, is still ahead of its own feed's position (which has not moved
//! past a block it never saw), so the next read returns it, once.
//!
//! **Order across reads** is therefore "merged by timestamp within each read":
//! what a read returns is sorted, but a later read may return a message older
//! than ones an earlier read returned, if it arrived (or was written) late. A
//! consumer that needs a global order must wait for the feeds it expects before
//! reading; a consumer that needs each message once needs nothing more.
//!
//! The cursor is saved as text (`cursor.to_string()`, URL-safe) and restored
//! with `text.parse::<Cursor>()`. Its size grows with the number of feeds of the
//! topic (about 55 characters per feed), not with the number of messages.
//!
//! [`Topics::follow`] is the live form of `read`: a stream that yields each
//! message as it becomes readable, locally or by replication, with the same
//! guarantee; keep a cursor with [`Cursor::advance`] to resume it later.
//!
//! Blocks that cannot be decoded, or that hold another topic's messages, are
//! passed over with a warning (they are signed by the feed's owner and will never
//! change, so waiting for them would stall the topic forever). A block *damaged on
//! disk* is passed over too, but the cursor keeps it ([`Cursor::passed_over`], at
//! most [`MAX_PASSED_OVER`]) and every later read tries it again, so its messages
//! are returned, once, when the block is restored or fetched again.
//!
//! ## Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), multifeed::Error> {
//! use multifeed::{Multifeed, Options, SharedKey, StorageConfig, Topics};
//! use multifeed::topics::{Cursor, Message};
//!
//! let group = Multifeed::open(StorageConfig::Memory, SharedKey::generate(), Options::default()).await?;
//! let topics = Topics::new(group);
//! topics.publish(Message::new("alerts", "disk full").with_content_type("text/plain")).await?;
//! topics.publish_batch((0..3).map(|i| Message::new("alerts", format!("{i}")))).await?;
//!
//! let (first, cursor) = topics.read("alerts", &Cursor::default(), 2).await?;
//! assert_eq!(first.len(), 2);
//! let saved = cursor.to_string();
//! let (rest, _) = topics.read("alerts", &saved.parse()?, 100).await?;
//! assert_eq!(rest.len(), 2);
//! # Ok(()) }
//! ```

mod codec;
mod cursor;
mod merge;

use std::{
    collections::{BTreeSet, HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use futures::{FutureExt, Stream, StreamExt, stream::BoxStream};
use tokio::sync::watch;

pub use self::{
    codec::{
        MAX_CONTENT_TYPE_LEN, MAX_MESSAGES_PER_BLOCK, MAX_PAYLOAD_LEN, MAX_TOPIC_LEN, Packing,
        topic_problem,
    },
    cursor::{Cursor, MAX_CURSOR_FEEDS, MAX_PASSED_OVER, MessageAddress, ReceivedMessage},
};
use self::{
    codec::{decode_block, pack, validate_message, validate_topic},
    merge::{Merge, Step},
};
use crate::{
    error::{DAMAGED_BLOCK_ADVICE, Error, Result},
    feed::Feed,
    keys::FeedKey,
    multifeed::{Event, Multifeed},
};

/// Prefix of the local writer name of a topic: topic `T` is written by `topic/T`.
pub const WRITER_PREFIX: &str = "topic/";
/// Blocks after a damaged block 0 tried for a feed's topic.
const TOPIC_PROBE_BLOCKS: u64 = 16;

/// How many messages [`Topics::follow`] reads at a time.
const FOLLOW_BATCH: usize = 256;

/// One message of a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The topic: 1 to [`MAX_TOPIC_LEN`] bytes, no control characters.
    pub topic: String,
    /// When it was published, in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// The message itself, at most [`MAX_PAYLOAD_LEN`] bytes.
    pub payload: Vec<u8>,
    /// Optional MIME type (or any label) of the payload, at most
    /// [`MAX_CONTENT_TYPE_LEN`] bytes.
    pub content_type: Option<String>,
}

impl Message {
    /// A message for `topic`, timestamped now, without a content type.
    pub fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            topic: topic.into(),
            timestamp_ms: now_ms(),
            payload: payload.into(),
            content_type: None,
        }
    }

    /// Sets the timestamp (milliseconds since the Unix epoch).
    pub fn with_timestamp_ms(mut self, timestamp_ms: u64) -> Self {
        self.timestamp_ms = timestamp_ms;
        self
    }

    /// Sets the content type.
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Whether [`Topics::publish`] would take it: the topic, payload and content
    /// type within their bounds. Lets a caller refuse a message before queueing it.
    pub fn validate(&self) -> Result<()> {
        validate_message(self)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct Inner {
    group: Multifeed,
    /// The topic of each feed whose block 0 was seen; `None`: not a topic feed.
    /// Block 0 never changes, so entries never go stale.
    feed_topics: Mutex<HashMap<FeedKey, Option<String>>>,
    /// Our local writer of each topic published to.
    writers: Mutex<HashMap<String, Feed>>,
}

/// Publishes to and reads topics of one [`Multifeed`]. Cheap to clone.
///
/// See the [module docs](self) for the model and the cursor's guarantee.
#[derive(Clone)]
pub struct Topics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Topics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topics")
            .field("group", &self.inner.group)
            .finish()
    }
}

impl Topics {
    /// Topics over `group` (any feeds of the group that are not topic feeds are
    /// left alone).
    pub fn new(group: Multifeed) -> Self {
        Self {
            inner: Arc::new(Inner {
                group,
                feed_topics: Mutex::new(HashMap::new()),
                writers: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The underlying group.
    pub fn group(&self) -> &Multifeed {
        &self.inner.group
    }

    /// The fingerprint of `topic` in this group that cursors carry.
    fn scope(&self, topic: &str) -> cursor::Scope {
        let group_id = hypercore_protocol::discovery_key(self.inner.group.shared_key().as_bytes());
        cursor::Scope::new(&group_id, topic)
    }

    /// Publishes one message in a block of its own; returns its address.
    pub async fn publish(&self, message: Message) -> Result<MessageAddress> {
        let mut addresses = self
            .publish_batch_with([message], Packing::one_per_block())
            .await?;
        Ok(addresses.remove(0))
    }

    /// Publishes messages of one topic, packed several to a block with the
    /// default [`Packing`] (64 KiB or 1024 messages per block), in one signed
    /// append; returns their addresses in order. Empty input publishes nothing.
    pub async fn publish_batch(
        &self,
        messages: impl IntoIterator<Item = Message>,
    ) -> Result<Vec<MessageAddress>> {
        self.publish_batch_with(messages, Packing::default()).await
    }

    /// Like [`Topics::publish_batch`] with explicit packing bounds. All messages
    /// must have the same topic; nothing is published if one is invalid.
    pub async fn publish_batch_with(
        &self,
        messages: impl IntoIterator<Item = Message>,
        packing: Packing,
    ) -> Result<Vec<MessageAddress>> {
        let messages: Vec<Message> = messages.into_iter().collect();
        let Some(topic) = messages.first().map(|m| m.topic.clone()) else {
            return Ok(Vec::new());
        };
        for message in &messages {
            validate_message(message)?;
            if message.topic != topic {
                return Err(Error::InvalidTopic {
                    topic: message.topic.chars().take(64).collect(),
                    reason: "a batch holds one topic; publish each topic in its own batch",
                });
            }
        }
        let blocks = pack(&topic, messages, packing);
        let writer = self.writer(&topic).await?;
        let encoded: Vec<&[u8]> = blocks.iter().map(|(b, _)| &b[..]).collect();
        let first = writer.append_batch(&encoded).await?;
        let key = writer.key();
        Ok(blocks
            .iter()
            .enumerate()
            .flat_map(|(i, (_, count))| {
                (0..*count as u32).map(move |index| MessageAddress {
                    key,
                    seq: first + i as u64,
                    index,
                })
            })
            .collect())
    }

    /// Our local writer of `topic`, created on first use.
    async fn writer(&self, topic: &str) -> Result<Feed> {
        if let Some(feed) = lock(&self.inner.writers).get(topic) {
            return Ok(feed.clone());
        }
        let feed = self
            .inner
            .group
            .writer(&format!("{WRITER_PREFIX}{topic}"))
            .await?;
        lock(&self.inner.writers).insert(topic.to_owned(), feed.clone());
        Ok(feed)
    }

    /// Every topic that has at least one message in a feed this peer holds
    /// block 0 of, sorted.
    pub async fn topics(&self) -> Result<Vec<String>> {
        let mut topics = BTreeSet::new();
        let mut damaged = Vec::new();
        for feed in self.inner.group.feeds() {
            if let Some(topic) = self.feed_topic(&feed, &mut damaged).await? {
                topics.insert(topic);
            }
        }
        for block in damaged {
            tracing::warn!("{block}");
        }
        Ok(topics.into_iter().collect())
    }

    /// The topic of a feed, from its block 0; `None` if it is not a topic feed or
    /// its block 0 is not held yet. A damaged block 0 does not hide the feed: the
    /// topic is then our writer's name, else that of the next intact block (every
    /// block of a topic feed holds its topic); only if neither is known is block 0
    /// added to `damaged` (a read that reaches it reports it anyway).
    async fn feed_topic(
        &self,
        feed: &Feed,
        damaged: &mut Vec<DamagedBlock>,
    ) -> Result<Option<String>> {
        let key = feed.key();
        if let Some(topic) = lock(&self.inner.feed_topics).get(&key) {
            return Ok(topic.clone());
        }
        let block = match feed.get(0).await {
            Ok(block) => block,
            Err(Error::DamagedBlock { seq, reason, .. }) => {
                let topic = self.topic_past_damaged_block_0(feed).await?;
                if topic.is_none() {
                    note_damaged(damaged, key, seq, reason);
                }
                return Ok(topic);
            }
            Err(e) => return Err(e),
        };
        let Some(block) = block else {
            return Ok(None);
        };
        let topic = match decode_block(&block) {
            Ok((topic, _)) => Some(topic),
            Err(reason) => {
                tracing::debug!(%key, %reason, "not a topic feed");
                None
            }
        };
        lock(&self.inner.feed_topics).insert(key, topic.clone());
        Ok(topic)
    }

    /// The topic of a feed whose block 0 is damaged: our writer's name says it;
    /// else the first intact block among the next few held says it. Not cached
    /// when it comes from the name alone, so a restored block 0 is read again.
    async fn topic_past_damaged_block_0(&self, feed: &Feed) -> Result<Option<String>> {
        if feed.is_local()
            && let Some(topic) = feed.name().and_then(|n| n.strip_prefix(WRITER_PREFIX))
        {
            return Ok(Some(topic.to_owned()));
        }
        let held = feed.contiguous_len().await;
        for seq in 1..held.min(1 + TOPIC_PROBE_BLOCKS) {
            match feed.get(seq).await {
                Ok(Some(block)) => {
                    let topic = block_topic(&block);
                    lock(&self.inner.feed_topics).insert(feed.key(), topic.clone());
                    return Ok(topic);
                }
                Ok(None) => break,
                Err(Error::DamagedBlock { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// The feeds of `topic`.
    async fn topic_feeds(&self, topic: &str, damaged: &mut Vec<DamagedBlock>) -> Result<Vec<Feed>> {
        let mut feeds = Vec::new();
        for feed in self.inner.group.feeds() {
            if self.feed_topic(&feed, damaged).await?.as_deref() == Some(topic) {
                feeds.push(feed);
            }
        }
        Ok(feeds)
    }

    /// Up to `limit` unread messages of `topic` after `cursor`, merged by
    /// timestamp, and the cursor past them. Returns no messages and the same
    /// positions when nothing is unread. See the [module docs](self) for the
    /// order and the guarantee.
    ///
    /// A block damaged on disk is passed over with a warning: the cursor moves
    /// past it but keeps it ([`Cursor::passed_over`]), and a later read from that
    /// cursor returns its messages (first, before the merged ones) once the block
    /// is intact again, so nothing is lost to the damage.
    /// [`Topics::read_report`] returns such blocks instead of logging them.
    pub async fn read(
        &self,
        topic: &str,
        cursor: &Cursor,
        limit: usize,
    ) -> Result<(Vec<ReceivedMessage>, Cursor)> {
        let read = self.read_report(topic, cursor, limit).await?;
        for block in &read.damaged {
            tracing::warn!("{block}");
        }
        Ok((read.messages, read.cursor))
    }

    /// [`Topics::read`], returning the blocks it passed over because they are
    /// damaged on disk (see [`Error::DamagedBlock`]) instead of logging them. The
    /// messages before and after such a block are read as usual.
    pub async fn read_report(
        &self,
        topic: &str,
        cursor: &Cursor,
        limit: usize,
    ) -> Result<TopicRead> {
        validate_topic(topic)?;
        let mut cursor = cursor.clone();
        cursor.check_scope(self.scope(topic))?;
        let cursor = &cursor;
        let mut damaged = Vec::new();
        let feeds = self.topic_feeds(topic, &mut damaged).await?;
        let mut next = cursor.clone();
        // Messages of damaged blocks passed over before, now intact, come first.
        let mut messages =
            reread_passed_over(topic, &feeds, &mut next, limit, &mut damaged).await?;
        let mut merge = Merge::new(
            feeds.iter().map(Feed::key),
            cursor,
            limit.saturating_sub(messages.len()),
        );
        loop {
            match merge.step() {
                Step::Done => break,
                Step::Message(message) => messages.push(message),
                Step::Need { feed, key, seq } => {
                    let block = match pass_damaged(key, feeds[feed].get(seq).await, &mut damaged)? {
                        Some(block) => block.map(|bytes| topic_messages(&bytes, topic, &key, seq)),
                        // A damaged block holds no message this peer can trust: pass
                        // over it, keeping it in the cursor to read once intact. When
                        // the cursor keeps too many, the feed stops here instead.
                        None => {
                            let (at, index) = cursor.position(&key);
                            let index = if at == seq { index } else { 0 };
                            next.pass_over(MessageAddress { key, seq, index })
                                .then(Vec::new)
                        }
                    };
                    merge.supply(feed, block);
                }
            }
        }
        merge.update_cursor(&mut next);
        Ok(TopicRead {
            messages,
            cursor: next,
            damaged,
        })
    }

    /// A cursor from which a read of `topic` returns the last `per_feed` messages
    /// of each of its feeds (all of a shorter one): recent history without
    /// replaying the whole log, e.g. to draw a chart and then [`Topics::follow`].
    /// With `per_feed` 0 it is the end: only messages held later are read. It
    /// counts back from what each feed holds without a gap, so nothing still
    /// downloading is skipped.
    pub async fn tail_cursor(&self, topic: &str, per_feed: usize) -> Result<Cursor> {
        validate_topic(topic)?;
        let mut cursor = Cursor::new();
        cursor.check_scope(self.scope(topic))?;
        let mut damaged = Vec::new();
        for feed in self.topic_feeds(topic, &mut damaged).await? {
            let key = feed.key();
            let mut position = (feed.contiguous_len().await, 0u32);
            let mut wanted = per_feed;
            while wanted > 0 && position.0 > 0 {
                let seq = position.0 - 1;
                let count = match pass_damaged(key, feed.get(seq).await, &mut damaged)? {
                    Some(Some(block)) => topic_messages(&block, topic, &key, seq).len(),
                    Some(None) => break,
                    // A damaged block counts as holding no message; the read reports it.
                    None => 0,
                };
                if count >= wanted {
                    // Blocks hold at most u32::MAX messages (their index type).
                    position = (seq, u32::try_from(count - wanted).unwrap_or(u32::MAX));
                    break;
                }
                wanted -= count;
                position = (seq, 0);
            }
            cursor.set(key, position.0, position.1);
        }
        Ok(cursor)
    }

    /// A live read of `topic` from `cursor`: yields every unread message, then
    /// each new one as it becomes readable, whether published here or received
    /// by replication (including new feeds). It waits on feed and membership
    /// changes, never polls.
    ///
    /// Messages come in the order of successive [`Topics::read`]s. To resume
    /// later, keep a cursor: `cursor.advance(&received.address)` for each item.
    /// The stream keeps damaged blocks it passed over and yields their messages
    /// if they become intact while it runs; a cursor kept by `advance` does not
    /// know them (use [`Topics::read`] to keep them across restarts).
    /// The stream ends after yielding an error, such as [`Error::Closed`] when
    /// it wakes up to find the group closed.
    pub fn follow(
        &self,
        topic: &str,
        cursor: Cursor,
    ) -> impl Stream<Item = Result<ReceivedMessage>> + Send + Unpin + 'static + use<> {
        let state = Follow {
            topics: self.clone(),
            topic: topic.to_owned(),
            cursor,
            buffer: VecDeque::new(),
            events: self.inner.group.events().boxed(),
            watchers: HashMap::new(),
            warned: HashSet::new(),
            done: false,
        };
        futures::stream::unfold(state, |mut state| async move {
            let item = state.next().await?;
            Some((item, state))
        })
        .boxed()
    }
}

/// The topic of a message block, if `bytes` is one.
pub(crate) fn block_topic(bytes: &[u8]) -> Option<String> {
    decode_block(bytes).ok().map(|(topic, _)| topic)
}

/// What [`Topics::read_report`] returns.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TopicRead {
    /// Up to `limit` unread messages, merged by timestamp.
    pub messages: Vec<ReceivedMessage>,
    /// The cursor past them (and past any damaged block passed over).
    pub cursor: Cursor,
    /// Blocks passed over because they are damaged on disk, in the order met
    /// (consecutive blocks of a feed with the same fault as one run).
    pub damaged: Vec<DamagedBlock>,
}

/// Blocks a read passed over because they are damaged on disk: one block, or a
/// run of them in one feed with the same fault (as a truncated file gives).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DamagedBlock {
    /// The feed.
    pub key: FeedKey,
    /// The first damaged block of the run.
    pub first: u64,
    /// The last damaged block of the run (`first` for one block).
    pub last: u64,
    /// What did not match.
    pub reason: String,
}

impl DamagedBlock {
    /// Takes block `seq` of `key` into this run if it continues it with the
    /// same fault (or is already in it); false if it belongs to another run.
    pub fn absorb(&mut self, key: FeedKey, seq: u64, reason: &str) -> bool {
        if key != self.key || reason != self.reason {
            return false;
        }
        if (self.first..=self.last).contains(&seq) {
            return true;
        }
        if self.last.checked_add(1) == Some(seq) {
            self.last = seq;
            return true;
        }
        false
    }
}

impl std::fmt::Display for DamagedBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (key, reason) = (self.key.to_hex(), &self.reason);
        if self.first == self.last {
            write!(f, "feed {key}, block {}", self.first)?;
        } else {
            let count = self.last - self.first + 1;
            write!(
                f,
                "feed {key}, blocks {} to {} ({count} blocks)",
                self.first, self.last
            )?;
        }
        write!(f, ": damaged on disk ({reason}); {DAMAGED_BLOCK_ADVICE}")
    }
}

/// Reads again the damaged blocks `cursor` passed over (of `feeds`, up to `limit`
/// messages) and marks what it read in `cursor`; blocks still damaged are added
/// to `damaged`, blocks not held (yet) are left for a later read.
async fn reread_passed_over(
    topic: &str,
    feeds: &[Feed],
    cursor: &mut Cursor,
    limit: usize,
    damaged: &mut Vec<DamagedBlock>,
) -> Result<Vec<ReceivedMessage>> {
    let mut read = Vec::new();
    let blocks: Vec<MessageAddress> = cursor.passed_over().collect();
    for at in blocks {
        if read.len() >= limit {
            break;
        }
        let Some(feed) = feeds.iter().find(|f| f.key() == at.key) else {
            continue;
        };
        let Some(Some(bytes)) = pass_damaged(at.key, feed.get(at.seq).await, damaged)? else {
            continue;
        };
        let messages = topic_messages(&bytes, topic, &at.key, at.seq);
        let mut index = at.index;
        for message in messages.into_iter().skip(at.index as usize) {
            if read.len() >= limit {
                // Still kept, from its next unread message.
                cursor.pass_over(MessageAddress { index, ..at });
                return Ok(read);
            }
            read.push(ReceivedMessage {
                address: MessageAddress { index, ..at },
                message,
            });
            index = index.saturating_add(1);
        }
        cursor.forget_passed_over(at.key, at.seq);
    }
    Ok(read)
}

/// `Ok(Some(block))` for a read that worked, `Ok(None)` for a damaged block
/// (added to `damaged`); any other error as it is.
fn pass_damaged(
    key: FeedKey,
    read: Result<Option<Vec<u8>>>,
    damaged: &mut Vec<DamagedBlock>,
) -> Result<Option<Option<Vec<u8>>>> {
    match read {
        Ok(block) => Ok(Some(block)),
        Err(Error::DamagedBlock { seq, reason, .. }) => {
            note_damaged(damaged, key, seq, reason);
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Adds block `seq` of `key` to `damaged`, extending the last run if it continues it.
pub(crate) fn note_damaged(
    damaged: &mut Vec<DamagedBlock>,
    key: FeedKey,
    seq: u64,
    reason: String,
) {
    if let Some(run) = damaged.last_mut()
        && run.absorb(key, seq, &reason)
    {
        return;
    }
    damaged.push(DamagedBlock {
        key,
        first: seq,
        last: seq,
        reason,
    });
}

/// The messages of a block of `topic`'s feed `key`; none (with a warning) if the
/// block is unreadable or of another topic, so the read passes over it.
fn topic_messages(bytes: &[u8], topic: &str, key: &FeedKey, seq: u64) -> Vec<Message> {
    match decode_block(bytes) {
        Ok((block_topic, messages)) if block_topic == topic => messages,
        Ok((other, _)) => {
            tracing::warn!(%key, seq, topic, %other, "passing over a block of another topic");
            Vec::new()
        }
        Err(reason) => {
            tracing::warn!(%key, seq, topic, %reason, "passing over an unreadable block");
            Vec::new()
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere; the maps stay consistent
    // because every change is a single insert.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The state of one [`Topics::follow`] stream.
struct Follow {
    topics: Topics,
    topic: String,
    /// Past everything read into `buffer`.
    cursor: Cursor,
    buffer: VecDeque<ReceivedMessage>,
    /// Membership changes (new feeds), subscribed before the first read.
    events: BoxStream<'static, Event>,
    /// Length changes of every feed known so far.
    watchers: HashMap<FeedKey, watch::Receiver<u64>>,
    /// Damaged runs already reported by this stream.
    warned: HashSet<(FeedKey, u64, u64)>,
    done: bool,
}

impl Follow {
    async fn next(&mut self) -> Option<Result<ReceivedMessage>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(message) = self.buffer.pop_front() {
                return Some(Ok(message));
            }
            let group = &self.topics.inner.group;
            if group.is_closed() {
                self.done = true;
                return Some(Err(Error::Closed));
            }
            // Membership events already queued are covered by the read below (a
            // feed is a member before its event is sent): drop them.
            while let Some(event) = self.events.next().now_or_never() {
                if event.is_none() {
                    self.done = true;
                    return None;
                }
            }
            // Arm every watcher before reading: a change during or after the read
            // then wakes the wait below, so nothing slips between the two.
            for feed in group.feeds() {
                self.watchers
                    .entry(feed.key())
                    .or_insert_with(|| feed.subscribe_len());
            }
            for watcher in self.watchers.values_mut() {
                watcher.mark_unchanged();
            }
            match self
                .topics
                .read_report(&self.topic, &self.cursor, FOLLOW_BATCH)
                .await
            {
                Ok(read) => {
                    self.cursor = read.cursor;
                    // Each damaged run once, though every read tries it again.
                    for run in read.damaged {
                        if self.warned.len() >= MAX_PASSED_OVER {
                            self.warned.clear();
                        }
                        if self.warned.insert((run.key, run.first, run.last)) {
                            tracing::warn!("{run}");
                        }
                    }
                    if !read.messages.is_empty() {
                        self.buffer.extend(read.messages);
                        continue;
                    }
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
            self.wait_for_change().await;
        }
    }

    /// Waits until a feed grows, a feed joins the group, or a feed is released.
    async fn wait_for_change(&mut self) {
        let released = {
            let changes: Vec<_> = self
                .watchers
                .iter_mut()
                .map(|(key, watcher)| {
                    Box::pin(async move { watcher.changed().await.err().map(|_| *key) })
                })
                .collect();
            let any_change = async move {
                if changes.is_empty() {
                    std::future::pending().await
                } else {
                    futures::future::select_all(changes).await.0
                }
            };
            tokio::select! {
                event = self.events.next() => {
                    if event.is_none() {
                        self.done = true;
                    }
                    None
                }
                released = any_change => released,
            }
        };
        // A feed handle was dropped (the group is closing): stop watching it.
        if let Some(key) = released {
            self.watchers.remove(&key);
        }
    }
}
