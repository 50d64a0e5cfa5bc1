//! One long feed: append, close, reopen, read and verify.
//!
//! `cargo bench --bench long_feed` appends 1,000,000 blocks of 100 bytes to one
//! on-disk feed in batches of 1,000 (and `LONG_FEED_SINGLE`, default 100,000, one at
//! a time to another), closes the group, then times reopening it, reading every
//! block and verifying it. Set `LONG_FEED_N` to change the count.

use std::time::Instant;

use multifeed::{Multifeed, Options, SharedKey, StorageConfig};

fn count(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rate(n: u64, elapsed: std::time::Duration) -> String {
    format!(
        "{:>9.2?} ({:>9.0} blocks/s)",
        elapsed,
        n as f64 / elapsed.as_secs_f64()
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n = count("LONG_FEED_N", 1_000_000);
    let single = count("LONG_FEED_SINGLE", 100_000);
    let dir = tempfile::tempdir().unwrap();
    let key = SharedKey::generate();
    let open = || {
        Multifeed::open(
            StorageConfig::dir(dir.path()),
            key.clone(),
            Options::default(),
        )
    };
    let group = open().await.unwrap();
    let block = [0x61u8; 100];

    let feed = group.writer("batched").await.unwrap();
    let batch = vec![block; 1000];
    let start = Instant::now();
    let mut len = 0;
    while len < n {
        let k = 1000.min(n - len) as usize;
        feed.append_batch(&batch[..k]).await.unwrap();
        len += k as u64;
    }
    println!(
        "append {n} x 100 B, batches of 1,000: {}",
        rate(n, start.elapsed())
    );
    let feed = group.writer("single").await.unwrap();
    let start = Instant::now();
    for _ in 0..single {
        feed.append(&block).await.unwrap();
    }
    println!(
        "append {single} x 100 B, one at a time: {}",
        rate(single, start.elapsed())
    );
    let start = Instant::now();
    group.close().await.unwrap();
    println!("close: {:.2?}", start.elapsed());

    let start = Instant::now();
    let group = open().await.unwrap();
    let feeds = group.feeds();
    assert_eq!(feeds.len(), 2, "{:?}", group.skipped());
    for feed in &feeds {
        // Reading one block loads the feed's core.
        feed.get(0).await.unwrap();
    }
    println!("reopen and load both feeds: {:.2?}", start.elapsed());

    let total = n + single;
    let start = Instant::now();
    for feed in &feeds {
        for seq in 0..feed.len().await {
            feed.get(seq).await.unwrap().unwrap();
        }
    }
    println!("read all {total} blocks: {}", rate(total, start.elapsed()));

    let start = Instant::now();
    let report = group.verify().await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    println!(
        "verify all {total} blocks: {}",
        rate(total, start.elapsed())
    );
    group.close().await.unwrap();
}
