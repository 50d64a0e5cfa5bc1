//! Replication benchmarks over TCP on 127.0.0.1, on-disk stores, two tasks in one
//! process (peak RSS is therefore for both sides together).
//!
//! `cargo bench --bench replicate [group|single|many]`
//! 1. group:  2 peers x 50 feeds x 1,000 entries x 100 B, until both hold all 100 feeds.
//! 2. single: one feed of 100,000 x 100 B.
//! 3. many:   one side with N feeds of 1 entry (N = `MANY_FEEDS`, default 10,000), the other with one.

use std::time::{Duration, Instant};

use multifeed::{Multifeed, Options, ReplicateOptions, SharedKey, StorageConfig};

async fn group(dir: &std::path::Path, key: &SharedKey) -> Multifeed {
    Multifeed::open(StorageConfig::dir(dir), key.clone(), Options::default())
        .await
        .unwrap()
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn open_files() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// One-shot sync of `a` and `b` over loopback TCP; returns the elapsed time.
fn options(initiator: bool) -> ReplicateOptions {
    let mut options = ReplicateOptions::new(initiator);
    if let Some(window) = std::env::var("WINDOW").ok().and_then(|v| v.parse().ok()) {
        options.window = window;
    }
    options
}

async fn sync(a: &Multifeed, b: &Multifeed) -> Duration {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let start = Instant::now();
    let server = {
        let a = a.clone();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            socket.set_nodelay(true).unwrap();
            a.replicate(socket, options(false)).await
        })
    };
    let socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.set_nodelay(true).unwrap();
    let rb = b.replicate(socket, options(true)).await.unwrap();
    let ra = server.await.unwrap().unwrap();
    let elapsed = start.elapsed();
    println!(
        "    a: received {} blocks / {} B, b: received {} blocks / {} B",
        ra.blocks_received, ra.bytes_received, rb.blocks_received, rb.bytes_received
    );
    elapsed
}

async fn bench_group() {
    let key = SharedKey::generate();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (group(da.path(), &key).await, group(db.path(), &key).await);
    let entries: Vec<[u8; 100]> = vec![[0x42; 100]; 1000];
    for side in [&a, &b] {
        for i in 0..50 {
            side.writer(&format!("feed-{i}"))
                .await
                .unwrap()
                .append_batch(&entries)
                .await
                .unwrap();
        }
    }
    let elapsed = sync(&a, &b).await;
    assert_eq!((a.feeds().len(), b.feeds().len()), (100, 100));
    println!(
        "group sync 2 x 50 feeds x 1,000 x 100 B: {:.2?} ({:.0} blocks/s)  [target <= 3 s; JS multifeed 6: 14.4 s]",
        elapsed,
        100_000.0 / elapsed.as_secs_f64()
    );
}

async fn bench_single() {
    let key = SharedKey::generate();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (group(da.path(), &key).await, group(db.path(), &key).await);
    let w = a.writer("big").await.unwrap();
    let entries: Vec<[u8; 100]> = vec![[0x42; 100]; 1000];
    for _ in 0..100 {
        w.append_batch(&entries).await.unwrap();
    }
    let elapsed = sync(&a, &b).await;
    assert_eq!(b.feed(w.key()).unwrap().contiguous_len().await, 100_000);
    println!(
        "one feed 100,000 x 100 B: {:.2?} ({:.0} msg/s)  [target <= 4 s; JS hypercore 11: 12.1 s]",
        elapsed,
        100_000.0 / elapsed.as_secs_f64()
    );
}

async fn bench_many() {
    let n: usize = std::env::var("MANY_FEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let key = SharedKey::generate();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (group(da.path(), &key).await, group(db.path(), &key).await);
    let prepared = Instant::now();
    for i in 0..n {
        a.writer(&format!("f{i}"))
            .await
            .unwrap()
            .append(b"x")
            .await
            .unwrap();
    }
    b.writer("single")
        .await
        .unwrap()
        .append(b"y")
        .await
        .unwrap();
    println!(
        "    prepared {n} feeds in {:.2?}; open files now {}",
        prepared.elapsed(),
        open_files()
    );
    let elapsed = sync(&a, &b).await;
    assert_eq!((a.feeds().len(), b.feeds().len()), (n + 1, n + 1));
    println!(
        "{n} feeds x 1 entry vs 1 feed: {:.2?}; peak RSS {:.0} MB (both sides, one process); open files {}  [target <= 5 s, <= 200 MB per side]",
        elapsed,
        peak_rss_mb(),
        open_files()
    );
}

#[tokio::main]
async fn main() {
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let run = |name: &str| which.is_empty() || which.iter().any(|w| w == name);
    if run("group") {
        bench_group().await;
    }
    if run("single") {
        bench_single().await;
    }
    if run("many") {
        bench_many().await;
    }
}
