//! Feeds well past hypercore's first bitfield page (32,768 blocks) and first
//! verify chunk (4,096 blocks) reopen, read, verify and replicate
//! (docs/upstream-defects.md, defects 7 and 8).

mod common;

use std::{path::Path, time::Duration};

use common::*;
use multifeed::{Feed, Multifeed, ReplicateOptions, verify::FeedStatus};

/// The 100-byte block at `seq`: its sequence number, then bytes derived from it.
fn block(seq: u64) -> [u8; 100] {
    let mut b = [0u8; 100];
    b[..8].copy_from_slice(&seq.to_le_bytes());
    for (i, byte) in b[8..].iter_mut().enumerate() {
        *byte = (seq as u8).wrapping_mul(31).wrapping_add(i as u8);
    }
    b
}

/// Appends blocks until `feed` is `to` long, in batches of `batch` (1: single appends).
async fn append_until(feed: &Feed, to: u64, batch: u64) {
    let mut len = feed.len().await;
    while len < to {
        let n = batch.min(to - len);
        let blocks: Vec<[u8; 100]> = (len..len + n).map(block).collect();
        let first = if n == 1 {
            feed.append(&blocks[0]).await.unwrap()
        } else {
            feed.append_batch(&blocks).await.unwrap()
        };
        assert_eq!(first, len);
        len += n;
    }
}

/// Every block of `feed` is held and reads back as written.
async fn assert_holds_all(feed: &Feed, len: u64) {
    assert_eq!(feed.len().await, len);
    assert_eq!(feed.contiguous_len().await, len);
    for seq in 0..len {
        let got = feed.get(seq).await.unwrap();
        assert_eq!(
            got.as_deref(),
            Some(&block(seq)[..]),
            "block {seq} of {len}"
        );
    }
    assert_eq!(feed.get(len).await.unwrap(), None);
}

/// Opens the group in `dir`, which must load every member.
async fn reopen(dir: &Path) -> Multifeed {
    let group = open_dir(dir).await;
    assert!(group.skipped().is_empty(), "{:?}", group.skipped());
    group
}

async fn assert_verifies(group: &Multifeed) {
    let report = group.verify().await.unwrap();
    for feed in &report.feeds {
        assert_eq!(feed.status, FeedStatus::Ok, "{feed:?}");
        assert_eq!(feed.checked, feed.length, "{feed:?}");
    }
    assert!(report.is_ok());
}

/// A local writer reopens intact at and around every bitfield page boundary
/// (32,768 blocks a page), grown by single appends and by batches, and keeps
/// appending where it left off.
#[tokio::test]
async fn local_writers_reopen_across_bitfield_pages() {
    let dir = tempfile::tempdir().unwrap();
    let group = reopen(dir.path()).await;
    let key = group.writer("w").await.unwrap().key();
    group.close().await.unwrap();
    let page = 32_768;
    let steps = [
        (page - 1, 1000),
        (page, 1),
        (page + 1, 1),
        (40_000, 1),
        (2 * page + 1, 1000),
        (3 * page + 5, 777),
        (4 * page + 1, 4096),
    ];
    for (to, batch) in steps {
        let group = reopen(dir.path()).await;
        let w = group.writer("w").await.unwrap();
        assert_eq!(w.key(), key, "the writer is the one created first");
        assert_eq!(group.feeds().len(), 1);
        append_until(&w, to, batch).await;
        group.close().await.unwrap();

        let group = reopen(dir.path()).await;
        assert_eq!(group.feeds().len(), 1);
        assert_holds_all(&group.feed(key).unwrap(), to).await;
        assert_verifies(&group).await;
        group.close().await.unwrap();
    }
}

/// Seeded rounds of reopen, append a random amount, close: the store always
/// holds exactly what was appended.
#[tokio::test]
async fn reopen_append_reopen_cycles_keep_every_block() {
    let dir = tempfile::tempdir().unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut len = 0;
    for round in 0..12 {
        let group = reopen(dir.path()).await;
        let w = group.writer("w").await.unwrap();
        assert_eq!(w.len().await, len, "round {round}");
        len += next() % 12_000;
        append_until(&w, len, 1 + next() % 600).await;
        if round % 3 == 0 {
            // Killed rather than closed: what was appended is in the OS.
            std::mem::forget(group);
        } else {
            group.close().await.unwrap();
        }
    }
    let group = reopen(dir.path()).await;
    assert_holds_all(&group.writer("w").await.unwrap(), len).await;
    assert_verifies(&group).await;
}

/// A remote feed filled by replication reopens intact past page boundaries, and
/// keeps replicating after reopen.
#[tokio::test]
async fn replicated_feeds_reopen_across_bitfield_pages() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = reopen(dir_a.path()).await;
    let w = a.writer("w").await.unwrap();
    for to in [40_000u64, 70_000, 98_305] {
        append_until(&w, to, 1000).await;
        let b = reopen(dir_b.path()).await;
        let (ra, rb) = sync_pair(&a, &b).await;
        ra.unwrap();
        rb.unwrap();
        b.close().await.unwrap();

        let b = reopen(dir_b.path()).await;
        assert_holds_all(&b.feed(w.key()).unwrap(), to).await;
        assert_verifies(&b).await;
        b.close().await.unwrap();
    }
}

/// `verify` checks feeds of any length, and still finds a flipped byte.
#[tokio::test]
async fn verify_checks_long_feeds_and_finds_a_flipped_byte() {
    let dir = tempfile::tempdir().unwrap();
    let group = reopen(dir.path()).await;
    let lengths = [4_097u64, 5_000, 12_289, 40_000];
    let mut keys = Vec::new();
    for (i, len) in lengths.iter().enumerate() {
        let w = group.writer(&format!("w{i}")).await.unwrap();
        append_until(&w, *len, 1).await;
        keys.push(w.key());
    }
    assert_verifies(&group).await;
    group.close().await.unwrap();

    // Blocks are 100 bytes, so block `seq` starts at byte 100 * seq of `data`.
    let damaged = 38_111u64;
    let data = dir.path().join("feeds").join(keys[3].to_hex()).join("data");
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[damaged as usize * 100 + 42] ^= 0x10;
    std::fs::write(&data, bytes).unwrap();

    let group = reopen(dir.path()).await;
    let report = group.verify().await.unwrap();
    assert!(!report.is_ok());
    assert_eq!(report.damaged(), 1);
    for feed in &report.feeds {
        if feed.key == keys[3] {
            assert!(
                matches!(feed.status, FeedStatus::Damaged { seq: Some(seq), .. } if seq == damaged),
                "{feed:?}"
            );
        } else {
            assert_eq!(feed.status, FeedStatus::Ok, "{feed:?}");
        }
    }
}

/// A million blocks appended in batches, and a hundred thousand (three bitfield
/// pages) appended one at a time, survive close and reopen, read back, verify,
/// and replicate to a peer whose copy reopens, reads back and verifies in turn.
/// (A million single appends cost a signature each, about a minute here: the
/// `long_feed` bench runs them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_blocks_append_reopen_read_verify_and_replicate() {
    const MILLION: u64 = 1_000_000;
    const SINGLES: u64 = 100_000;
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = reopen(dir_a.path()).await;
    let batched = a.writer("batched").await.unwrap();
    let single = a.writer("single").await.unwrap();
    let lengths = [(batched.key(), MILLION), (single.key(), SINGLES)];
    append_until(&batched, MILLION, 1000).await;
    append_until(&single, SINGLES, 1).await;
    a.close().await.unwrap();

    let a = reopen(dir_a.path()).await;
    for (key, len) in lengths {
        assert_holds_all(&a.feed(key).unwrap(), len).await;
    }
    assert_verifies(&a).await;

    let b = reopen(dir_b.path()).await;
    let (x, y) = tokio::io::duplex(64 * 1024);
    let options = |initiator| ReplicateOptions::new(initiator).live(false);
    let sides = (
        tokio::spawn({
            let a = a.clone();
            async move { a.replicate(x, options(true)).await }
        }),
        tokio::spawn({
            let b = b.clone();
            async move { b.replicate(y, options(false)).await }
        }),
    );
    let (ra, rb) = tokio::time::timeout(Duration::from_secs(600), async {
        (sides.0.await.unwrap(), sides.1.await.unwrap())
    })
    .await
    .expect("replicating a million blocks did not finish within 10 minutes");
    ra.unwrap();
    rb.unwrap();
    b.close().await.unwrap();

    let b = reopen(dir_b.path()).await;
    assert_eq!(b.feeds().len(), 2);
    for (key, len) in lengths {
        assert_holds_all(&b.feed(key).unwrap(), len).await;
    }
    assert_verifies(&b).await;
}
