//! Verified reads: a block read from disk is checked against its Merkle leaf, so
//! damaged bytes, tree nodes or files give `Error::DamagedBlock`, never wrong data,
//! and the other blocks stay readable. Real hypercores on disk, damaged by hand.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use multifeed::{
    Error, Feed, FeedKey, Multifeed, Topics,
    topics::{Cursor, MAX_PASSED_OVER, Message, Packing},
};

/// Blocks of `BLOCK` bytes each, so block `i` sits at `i * BLOCK` in the data file.
const BLOCK: usize = 100;

fn block(i: u64) -> Vec<u8> {
    let mut value = format!("block {i} ").into_bytes();
    value.resize(BLOCK, b'.');
    value
}

/// A group with one writer of `n` blocks, appended one at a time (each its own
/// oplog entry, so the last few stay in the oplog until hypercore next flushes).
async fn writer_with(dir: &Path, n: u64) -> (Multifeed, Feed) {
    let group = open_dir(dir).await;
    let feed = group.writer("w").await.unwrap();
    for i in 0..n {
        feed.append(&block(i)).await.unwrap();
    }
    (group, feed)
}

fn feed_file(dir: &Path, key: FeedKey, name: &str) -> PathBuf {
    dir.join("feeds").join(key.to_hex()).join(name)
}

fn flip_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x20;
    std::fs::write(path, bytes).unwrap();
}

/// The block at `seq`, which must be damaged.
async fn damaged(feed: &Feed, seq: u64) -> String {
    match feed.get(seq).await {
        Err(Error::DamagedBlock {
            key,
            seq: at,
            reason,
        }) => {
            assert_eq!((key, at), (feed.key().to_hex(), seq));
            reason
        }
        other => panic!("block {seq}: expected DamagedBlock, got {other:?}"),
    }
}

async fn intact(feed: &Feed, seqs: impl IntoIterator<Item = u64>) {
    for seq in seqs {
        assert_eq!(
            feed.get(seq).await.unwrap(),
            Some(block(seq)),
            "block {seq}"
        );
    }
}

#[tokio::test]
async fn a_flipped_byte_in_a_block_is_a_damaged_block_and_its_neighbours_read() {
    let dir = tempfile::tempdir().unwrap();
    let (group, feed) = writer_with(dir.path(), 300).await;
    let key = feed.key();
    group.close().await.unwrap();
    let data = feed_file(dir.path(), key, "data");
    // Block 150's leaf is in the tree file; block 299's is still only in an oplog
    // entry, replayed at open.
    flip_byte(&data, 150 * BLOCK + 7);
    flip_byte(&data, 299 * BLOCK + 7);

    let group = open_dir(dir.path()).await;
    let feed = group.feed(key).unwrap();
    let reason = damaged(&feed, 150).await;
    assert!(reason.contains("do not match"), "{reason}");
    damaged(&feed, 299).await;
    intact(&feed, (0..150).chain(151..299)).await;
    let text = feed.get(150).await.unwrap_err().to_string();
    assert!(
        text.contains(&format!(
            "feed {}, block 150: damaged on disk",
            key.to_hex()
        )) && text.contains("other blocks are unaffected"),
        "{text}"
    );
    group.close().await.unwrap();
}

#[tokio::test]
async fn damage_to_blocks_written_in_this_process_is_found_before_any_flush() {
    let dir = tempfile::tempdir().unwrap();
    let (group, feed) = writer_with(dir.path(), 41).await;
    // The newest blocks' leaves are only in hypercore's memory and its oplog.
    intact(&feed, 0..41).await;
    flip_byte(&feed_file(dir.path(), feed.key(), "data"), 40 * BLOCK);
    damaged(&feed, 40).await;
    intact(&feed, 0..40).await;
    group.close().await.unwrap();
}

#[tokio::test]
async fn a_blank_tree_leaf_is_a_damaged_block() {
    let dir = tempfile::tempdir().unwrap();
    let (group, feed) = writer_with(dir.path(), 300).await;
    let key = feed.key();
    group.close().await.unwrap();
    // Node 2 * 100 is block 100's leaf: 40 bytes (length, hash).
    let tree = feed_file(dir.path(), key, "tree");
    let mut bytes = std::fs::read(&tree).unwrap();
    bytes[200 * 40..201 * 40].fill(0);
    std::fs::write(&tree, bytes).unwrap();

    let group = open_dir(dir.path()).await;
    let feed = group.feed(key).unwrap();
    let reason = damaged(&feed, 100).await;
    assert!(reason.contains("missing or blank"), "{reason}");
    // Block 101's place in the data file is found from block 100's length.
    damaged(&feed, 101).await;
    intact(&feed, (0..100).chain(102..300)).await;
    group.close().await.unwrap();
}

#[tokio::test]
async fn a_truncated_data_file_leaves_the_blocks_before_the_cut_readable() {
    let dir = tempfile::tempdir().unwrap();
    let (group, feed) = writer_with(dir.path(), 300).await;
    let key = feed.key();
    group.close().await.unwrap();
    let data = feed_file(dir.path(), key, "data");
    let file = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
    file.set_len((200 * BLOCK + 30) as u64).unwrap();

    let group = open_dir(dir.path()).await;
    let feed = group.feed(key).unwrap();
    intact(&feed, 0..200).await;
    for seq in [200, 201, 299] {
        let reason = damaged(&feed, seq).await;
        assert!(reason.contains("truncated"), "{reason}");
    }
    group.close().await.unwrap();
}

/// A topic read passes over a damaged block, returns the messages before and
/// after it, and reports it once; `read` alone does the same with a warning.
#[tokio::test]
async fn a_topic_read_passes_over_a_damaged_block_and_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let group = open_dir(dir.path()).await;
    let topics = Topics::new(group.clone());
    for i in 0..50 {
        topics
            .publish(Message::new("t", format!("m{i:02}")).with_timestamp_ms(1_000 + i))
            .await
            .unwrap();
    }
    let feed = group.feeds()[0].clone();
    let key = feed.key();
    // Block 20's payload "m20" is near the end of its bytes.
    let value = feed.get(20).await.unwrap().unwrap();
    let start: u64 = {
        let mut at = 0;
        for seq in 0..20 {
            at += feed.get(seq).await.unwrap().unwrap().len() as u64;
        }
        at
    };
    let within = value.windows(3).position(|w| w == b"m20").unwrap();
    group.close().await.unwrap();
    flip_byte(
        &feed_file(dir.path(), key, "data"),
        start as usize + within + 1,
    );

    let group = open_dir(dir.path()).await;
    let topics = Topics::new(group.clone());
    let read = topics
        .read_report("t", &Cursor::default(), 1_000)
        .await
        .unwrap();
    let payloads: Vec<String> = read
        .messages
        .iter()
        .map(|m| String::from_utf8(m.message.payload.clone()).unwrap())
        .collect();
    let expected: Vec<String> = (0..50)
        .filter(|&i| i != 20)
        .map(|i| format!("m{i:02}"))
        .collect();
    assert_eq!(payloads, expected);
    assert_eq!(read.damaged.len(), 1, "{:?}", read.damaged);
    assert_eq!(
        (
            read.damaged[0].key,
            read.damaged[0].first,
            read.damaged[0].last
        ),
        (key, 20, 20)
    );
    // The cursor keeps the damaged block (also in its text form): resuming repeats
    // nothing and reports the block again while it is still damaged.
    let kept: Vec<_> = read.cursor.passed_over().map(|a| (a.key, a.seq)).collect();
    assert_eq!(kept, [(key, 20)]);
    let saved: Cursor = read.cursor.to_string().parse().unwrap();
    assert_eq!(saved, read.cursor);
    let again = topics.read_report("t", &saved, 1_000).await.unwrap();
    assert!(again.messages.is_empty(), "{:?}", again.messages);
    assert_eq!(again.damaged.len(), 1);
    assert_eq!(again.cursor, saved);
    let (messages, _) = topics.read("t", &Cursor::default(), 1_000).await.unwrap();
    assert_eq!(messages.len(), 49);
    group.close().await.unwrap();

    // Restored (the byte flipped back, as a backup would), the block's message is
    // read from the saved cursor, once.
    flip_byte(
        &feed_file(dir.path(), key, "data"),
        start as usize + within + 1,
    );
    let group = open_dir(dir.path()).await;
    let topics = Topics::new(group.clone());
    let restored = topics.read_report("t", &saved, 1_000).await.unwrap();
    let payloads: Vec<&[u8]> = restored
        .messages
        .iter()
        .map(|m| &m.message.payload[..])
        .collect();
    assert_eq!(payloads, [b"m20"]);
    assert_eq!(restored.messages[0].address.seq, 20);
    assert!(restored.damaged.is_empty());
    assert_eq!(restored.cursor.passed_over().count(), 0);
    let after = topics
        .read_report("t", &restored.cursor, 1_000)
        .await
        .unwrap();
    assert!(after.messages.is_empty() && after.damaged.is_empty());
    group.close().await.unwrap();
}

/// Publishes `n` messages `m00..` to topic `t`, one per block.
async fn publish_t(topics: &Topics, n: u64) {
    for i in 0..n {
        topics
            .publish(Message::new("t", format!("m{i:02}")).with_timestamp_ms(1_000 + i))
            .await
            .unwrap();
    }
}

/// Flips a byte of block 0's payload in the feed `key` under `dir`.
fn damage_block_0(dir: &Path, key: FeedKey) {
    // Block 0's payload "m00" comes last in its bytes, after the topic.
    let data = feed_file(dir, key, "data");
    let bytes = std::fs::read(&data).unwrap();
    let at = bytes.windows(3).position(|w| w == b"m00").unwrap();
    flip_byte(&data, at + 1);
}

/// What a read of `t` from the start returns: payloads and damaged runs.
async fn read_t(topics: &Topics) -> (Vec<String>, Vec<(FeedKey, u64, u64)>) {
    let read = topics
        .read_report("t", &Cursor::default(), 1_000)
        .await
        .unwrap();
    let payloads = read
        .messages
        .iter()
        .map(|m| String::from_utf8(m.message.payload.clone()).unwrap())
        .collect();
    let damaged = read
        .damaged
        .iter()
        .map(|d| (d.key, d.first, d.last))
        .collect();
    (payloads, damaged)
}

#[tokio::test]
async fn a_damaged_block_0_does_not_hide_the_topic_of_our_writer_or_a_remote_feed() {
    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    let writer_group = open_dir(ours.path()).await;
    publish_t(&Topics::new(writer_group.clone()), 10).await;
    let key = writer_group.feeds()[0].key();
    let reader_group = open_dir(theirs.path()).await;
    let (a, b) = sync_pair(&writer_group, &reader_group).await;
    a.unwrap();
    b.unwrap();
    assert_eq!(reader_group.feeds()[0].len().await, 10);
    writer_group.close().await.unwrap();
    reader_group.close().await.unwrap();

    let expected: Vec<String> = (1..10).map(|i| format!("m{i:02}")).collect();
    // Our own writer (its topic is in its name) and a copy held as a remote feed
    // (its topic is in block 1).
    for dir in [ours.path(), theirs.path()] {
        damage_block_0(dir, key);
        let group = open_dir(dir).await;
        let topics = Topics::new(group.clone());
        assert_eq!(topics.topics().await.unwrap(), ["t"], "{}", dir.display());
        assert_eq!(read_t(&topics).await, (expected.clone(), vec![(key, 0, 0)]));
        group.close().await.unwrap();
    }
}

/// A cursor keeps at most `MAX_PASSED_OVER` damaged blocks: a read that meets
/// more stops that feed at the damage instead of passing over it, so nothing
/// after it is read past; restored, every message is read from the saved cursor.
#[tokio::test]
async fn a_read_stops_at_damage_once_the_cursor_keeps_as_many_blocks_as_it_may() {
    let dir = tempfile::tempdir().unwrap();
    let group = open_dir(dir.path()).await;
    let topics = Topics::new(group.clone());
    let n = MAX_PASSED_OVER as u64 + 100;
    let messages =
        (0..n).map(|i| Message::new("t", format!("m{i:05}")).with_timestamp_ms(1_000 + i));
    topics
        .publish_batch_with(messages, Packing::one_per_block())
        .await
        .unwrap();
    let feed = group.feeds()[0].clone();
    let key = feed.key();
    // Every block but the last 10 is damaged.
    let mut tail = 0;
    for seq in n - 10..n {
        tail += feed.get(seq).await.unwrap().unwrap().len();
    }
    group.close().await.unwrap();
    let data = feed_file(dir.path(), key, "data");
    let scramble = || {
        let mut bytes = std::fs::read(&data).unwrap();
        let end = bytes.len() - tail;
        bytes[..end].iter_mut().for_each(|b| *b ^= 0x20);
        std::fs::write(&data, bytes).unwrap();
    };
    scramble();

    let group = open_dir(dir.path()).await;
    let topics = Topics::new(group.clone());
    let read = topics
        .read_report("t", &Cursor::default(), 100_000)
        .await
        .unwrap();
    assert!(read.messages.is_empty(), "{} read", read.messages.len());
    assert_eq!(read.cursor.passed_over().count(), MAX_PASSED_OVER);
    assert_eq!(read.cursor.next_address(&key).seq, MAX_PASSED_OVER as u64);
    let saved: Cursor = read.cursor.to_string().parse().unwrap();
    let again = topics.read_report("t", &saved, 100_000).await.unwrap();
    assert!(again.messages.is_empty());
    assert_eq!(again.cursor, saved);
    group.close().await.unwrap();

    scramble();
    let group = open_dir(dir.path()).await;
    let topics = Topics::new(group.clone());
    let restored = topics.read_report("t", &saved, 100_000).await.unwrap();
    let payloads: Vec<String> = restored
        .messages
        .iter()
        .map(|m| String::from_utf8(m.message.payload.clone()).unwrap())
        .collect();
    let expected: Vec<String> = (0..n).map(|i| format!("m{i:05}")).collect();
    assert_eq!(payloads, expected);
    assert!(restored.damaged.is_empty());
    assert_eq!(restored.cursor.passed_over().count(), 0);
    group.close().await.unwrap();
}

/// Losing the index does not look like an empty store: every feed directory is
/// reported as unlisted, verify is not ok, and `repair` takes every feed back,
/// writers under their names (kept in `writer-name`, or recovered from a topic
/// feed's first message in a store written before that file), remote feeds as
/// remote, with every block.
#[tokio::test]
async fn repair_after_losing_the_index_brings_back_every_feed_and_name() {
    let dir = tempfile::tempdir().unwrap();
    let source = tempfile::tempdir().unwrap();
    // A remote feed, replicated in from another store of the group.
    let other = open_dir(source.path()).await;
    let theirs = other.writer("theirs").await.unwrap();
    theirs.append_batch(&[b"r0", b"r1"]).await.unwrap();
    let group = open_dir(dir.path()).await;
    let topics = Topics::new(group.clone());
    topics
        .publish(Message::new("temperature", "21.5"))
        .await
        .unwrap();
    let plain = group.writer("plain").await.unwrap();
    for i in 0..100 {
        plain.append(&block(i)).await.unwrap();
    }
    let (a, b) = sync_pair(&group, &other).await;
    a.unwrap();
    b.unwrap();
    let topic_key = group.writer("topic/temperature").await.unwrap().key();
    let (plain_key, theirs_key) = (plain.key(), theirs.key());
    assert!(group.feed(theirs_key).is_some());
    group.close().await.unwrap();
    other.close().await.unwrap();
    // A store from before the name file: the topic writer's name must be inferred.
    std::fs::remove_file(feed_file(dir.path(), topic_key, "writer-name")).unwrap();
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();

    let group = open_dir(dir.path()).await;
    assert!(group.feeds().is_empty());
    assert_eq!(group.unlisted_feed_dirs().len(), 3);
    let report = group.verify().await.unwrap();
    assert!(
        !report.is_ok(),
        "a store that lost its index is never healthy"
    );
    assert_eq!(report.unlisted.len(), 3);

    let repaired = group.repair().await.unwrap();
    assert!(repaired.left.is_empty(), "{:?}", repaired.left);
    let mut relisted = repaired.relisted.clone();
    relisted.sort();
    let mut expected = vec![
        (topic_key, Some("topic/temperature".to_owned())),
        (plain_key, Some("plain".to_owned())),
        (theirs_key, None),
    ];
    expected.sort();
    assert_eq!(relisted, expected);
    assert!(group.unlisted_feed_dirs().is_empty());
    assert!(group.verify().await.unwrap().is_ok());
    group.close().await.unwrap();

    // Reopened: the same feeds under the same names, every block, and writable.
    let group = open_dir(dir.path()).await;
    assert!(group.unlisted_feed_dirs().is_empty());
    let plain = group.writer("plain").await.unwrap();
    assert_eq!(plain.key(), plain_key);
    intact(&plain, 0..100).await;
    plain.append(&block(100)).await.unwrap();
    let theirs = group.feed(theirs_key).unwrap();
    assert!(!theirs.is_local());
    assert_eq!(theirs.get(1).await.unwrap(), Some(b"r1".to_vec()));
    let topics = Topics::new(group.clone());
    let (messages, _) = topics
        .read("temperature", &Cursor::default(), 10)
        .await
        .unwrap();
    assert_eq!(messages.len(), 1);
    topics
        .publish(Message::new("temperature", "22.0"))
        .await
        .unwrap();
    assert_eq!(
        group.writer("topic/temperature").await.unwrap().key(),
        topic_key
    );
    group.close().await.unwrap();
}

/// A zeroed bitfield of a replicated feed looked like a feed not downloaded yet:
/// verify said "ok, 0 of 300 blocks held". The data file still holds every block
/// intact, and verify now counts them (not damage: a crash mid-download leaves a
/// few such blocks too, and the next sync fetches them again).
#[tokio::test]
async fn verify_counts_intact_blocks_the_bitfield_does_not_mark() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, writer) = writer_with(a_dir.path(), 300).await;
    let b = open_dir(b_dir.path()).await;
    let (x, y) = sync_pair(&a, &b).await;
    x.unwrap();
    y.unwrap();
    let key = writer.key();
    b.close().await.unwrap();
    let b = open_dir(b_dir.path()).await;
    let report = b.verify().await.unwrap();
    let feed = report.feeds.iter().find(|f| f.key == key).unwrap();
    assert_eq!((feed.checked, feed.unmarked), (300, 0));
    b.close().await.unwrap();

    let bitfield = feed_file(b_dir.path(), key, "bitfield");
    let len = std::fs::metadata(&bitfield).unwrap().len() as usize;
    std::fs::write(&bitfield, vec![0u8; len]).unwrap();
    let b = open_dir(b_dir.path()).await;
    let report = b.verify().await.unwrap();
    let feed = report.feeds.iter().find(|f| f.key == key).unwrap();
    assert_eq!((feed.checked, feed.unmarked), (0, 300));
    a.close().await.unwrap();
}
