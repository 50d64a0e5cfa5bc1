//! One long feed: append, close, reopen, read and verify.
//!
//! `cargo bench --bench long_feed` appends 1,000,000 blocks of 100 bytes to one
//! on-disk feed in batches of 1,000 (and `LONG_FEED_SINGLE`, default 100,000, one at
//! a time to another), closes the group, then times reopening it, reading every
//! block and verifying it. Set `LONG_FEED_N` to change the count.

use std::time::{Duration, Instant};

use multifeed::{Multifeed, Options, SharedKey, StorageConfig};

fn count(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time (user + system) of this process so far, from /proc (Linux): on a
/// shared machine it tells the work apart from the waiting.
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses: utime and stime are
    // the 12th and 13th, in clock ticks (100 per second on Linux).
    let ticks: u64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().skip(11).take(2))
        .into_iter()
        .flatten()
        .filter_map(|t| t.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

/// Times a phase: wall clock, CPU and rate.
struct Phase(Instant, Duration);

impl Phase {
    fn start() -> Self {
        Phase(Instant::now(), cpu())
    }

    fn done(self, what: &str, n: u64) {
        let (wall, cpu) = (self.0.elapsed(), cpu().saturating_sub(self.1));
        let rate = if n > 0 {
            format!(
                ", {:.0} blocks/s of CPU",
                n as f64 / cpu.as_secs_f64().max(0.01)
            )
        } else {
            String::new()
        };
        println!("{what}: {wall:.2?} ({cpu:.2?} CPU{rate})");
    }
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
    let phase = Phase::start();
    let mut len = 0;
    while len < n {
        let k = 1000.min(n - len) as usize;
        feed.append_batch(&batch[..k]).await.unwrap();
        len += k as u64;
    }
    phase.done(&format!("append {n} x 100 B, batches of 1,000"), n);
    let feed = group.writer("single").await.unwrap();
    let phase = Phase::start();
    for _ in 0..single {
        feed.append(&block).await.unwrap();
    }
    phase.done(&format!("append {single} x 100 B, one at a time"), single);
    let phase = Phase::start();
    group.close().await.unwrap();
    phase.done("close", 0);

    let phase = Phase::start();
    let group = open().await.unwrap();
    let feeds = group.feeds();
    assert_eq!(feeds.len(), 2, "{:?}", group.skipped());
    for feed in &feeds {
        // Reading one block loads the feed's core.
        feed.get(0).await.unwrap();
    }
    phase.done("reopen and load both feeds", 0);

    let total = n + single;
    let phase = Phase::start();
    for feed in &feeds {
        for seq in 0..feed.len().await {
            feed.get(seq).await.unwrap().unwrap();
        }
    }
    phase.done(&format!("read all {total} blocks"), total);

    let phase = Phase::start();
    let report = group.verify().await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    phase.done(&format!("verify all {total} blocks"), total);
    group.close().await.unwrap();
}
