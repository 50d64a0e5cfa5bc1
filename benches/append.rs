//! Append throughput and on-disk overhead of one feed.
//!
//! `cargo bench --bench append` appends 100,000 entries of 100 bytes to one
//! on-disk feed, one at a time and in batches of 100, and prints messages/s and
//! bytes on disk per entry. Set `APPEND_BENCH_N` to change the count.

use std::{path::Path, time::Instant};

use multifeed::{Durability, Multifeed, Options, SharedKey, StorageConfig};

fn dir_bytes(dir: &Path) -> (u64, u64) {
    // (apparent length, allocated bytes) of every file under `dir`.
    use std::os::unix::fs::MetadataExt;
    let (mut len, mut allocated) = (0, 0);
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            let (l, a) = dir_bytes(&entry.path());
            len += l;
            allocated += a;
        } else {
            len += meta.len();
            allocated += meta.blocks() * 512;
        }
    }
    (len, allocated)
}

async fn run(n: usize, batch: usize, durability: Durability) {
    let dir = tempfile::tempdir().unwrap();
    let group = Multifeed::open(
        StorageConfig::dir(dir.path()),
        SharedKey::generate(),
        Options::default().durability(durability),
    )
    .await
    .unwrap();
    let feed = group.writer("bench").await.unwrap();
    let entry = [0x61u8; 100];
    let blocks = vec![entry; batch];
    let start = Instant::now();
    let mut written = 0;
    while written < n {
        if batch == 1 {
            feed.append(&entry).await.unwrap();
        } else {
            feed.append_batch(&blocks).await.unwrap();
        }
        written += batch;
    }
    let elapsed = start.elapsed();
    group.close().await.unwrap();
    let feed_dir = dir.path().join("feeds").join(feed.key().to_hex());
    let (len, allocated) = dir_bytes(&feed_dir);
    println!(
        "{:>9} x 100 B, batch {:>3}, {:?}: {:>9.0} msg/s ({:.2?}); on disk {:.1} B/entry ({:.1} B overhead), allocated {:.1} B/entry",
        written,
        batch,
        durability,
        written as f64 / elapsed.as_secs_f64(),
        elapsed,
        len as f64 / written as f64,
        len as f64 / written as f64 - 100.0,
        allocated as f64 / written as f64,
    );
}

/// Group commit: `writers` tasks append single entries at once with power-loss
/// durability; concurrent appends share fsyncs.
async fn run_concurrent(n: usize, writers: usize) {
    let dir = tempfile::tempdir().unwrap();
    let group = Multifeed::open(
        StorageConfig::dir(dir.path()),
        SharedKey::generate(),
        Options::default().durability(Durability::PowerLoss),
    )
    .await
    .unwrap();
    let feed = group.writer("bench").await.unwrap();
    let start = Instant::now();
    let tasks = (0..writers).map(|_| {
        let feed = feed.clone();
        async move {
            for _ in 0..n / writers {
                feed.append(&[0x61u8; 100]).await.unwrap();
            }
        }
    });
    futures::future::join_all(tasks).await;
    let elapsed = start.elapsed();
    println!(
        "{:>9} x 100 B, {writers} concurrent single appenders, PowerLoss (group commit): {:>9.0} msg/s ({:.2?})",
        n,
        n as f64 / elapsed.as_secs_f64(),
        elapsed
    );
    group.close().await.unwrap();
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n: usize = std::env::var("APPEND_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    println!(
        "append bench: one on-disk feed (anchors: JS hypercore 10 = 5,164 msg/s single, 89,330 msg/s batch 100, 80 B overhead)"
    );
    run(n, 1, Durability::Process).await;
    run(n, 100, Durability::Process).await;
    run(n / 50, 1, Durability::PowerLoss).await;
    run(n, 100, Durability::PowerLoss).await;
    run_concurrent(n / 10, 32).await;
}
