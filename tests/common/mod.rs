//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod readonly;
pub mod rogue;

use std::{path::Path, time::Duration};

use futures::{Stream, StreamExt};
use multifeed::{Event, Keypair, Multifeed, Options, SharedKey, StorageConfig};

/// The key every test group uses unless a test needs another.
pub fn shared_key() -> SharedKey {
    SharedKey::from_bytes([0x5a; 32])
}

/// Fixed key pairs (from the JS multifeed test vectors' spirit: deterministic identities).
pub fn keypair(n: u8) -> Keypair {
    Keypair::from_secret_bytes([n; 32])
}

pub async fn open_dir(dir: &Path) -> Multifeed {
    Multifeed::open(StorageConfig::dir(dir), shared_key(), Options::default())
        .await
        .expect("open multifeed")
}

pub async fn open_memory() -> Multifeed {
    Multifeed::open(StorageConfig::Memory, shared_key(), Options::default())
        .await
        .expect("open in-memory multifeed")
}

/// The next event, or a panic after a few seconds: never a hang.
pub async fn next_event(events: &mut (impl Stream<Item = Event> + Unpin)) -> Event {
    tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("timed out waiting for an event")
        .expect("event stream ended")
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// Runs a one-shot replication between `a` (initiator) and `b` over an in-memory pipe.
pub async fn sync_pair(
    a: &Multifeed,
    b: &Multifeed,
) -> (
    multifeed::Result<multifeed::ReplicationSummary>,
    multifeed::Result<multifeed::ReplicationSummary>,
) {
    sync_pair_with(
        a,
        b,
        multifeed::ReplicateOptions::new(true),
        multifeed::ReplicateOptions::new(false),
    )
    .await
}

/// Like [`sync_pair`] with explicit options, bounded by a timeout.
pub async fn sync_pair_with(
    a: &Multifeed,
    b: &Multifeed,
    a_options: multifeed::ReplicateOptions,
    b_options: multifeed::ReplicateOptions,
) -> (
    multifeed::Result<multifeed::ReplicationSummary>,
    multifeed::Result<multifeed::ReplicationSummary>,
) {
    let (x, y) = tokio::io::duplex(64 * 1024);
    tokio::time::timeout(
        Duration::from_secs(60),
        futures::future::join(a.replicate(x, a_options), b.replicate(y, b_options)),
    )
    .await
    .expect("replication did not finish within 60 s")
}

/// Waits until `group` holds `key` with at least `len` blocks, or panics after 20 s.
pub async fn wait_for_len(group: &Multifeed, key: multifeed::FeedKey, len: u64) -> multifeed::Feed {
    tokio::time::timeout(Duration::from_secs(20), async {
        let mut events = group.events();
        loop {
            if let Some(feed) = group.feed(key) {
                let mut signal = feed.subscribe_len();
                let _ = signal.wait_for(|&l| l >= len).await;
                return feed;
            }
            events.next().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("feed {key} did not reach length {len}"))
}

/// Every (key, name, length, blocks) in a group, sorted by key, for comparing stores.
pub async fn contents(group: &Multifeed) -> Vec<(multifeed::FeedKey, Vec<Vec<u8>>)> {
    let mut out = Vec::new();
    for feed in group.feeds() {
        let mut blocks = Vec::new();
        for seq in 0..feed.len().await {
            blocks.push(feed.get(seq).await.unwrap().unwrap_or_default());
        }
        out.push((feed.key(), blocks));
    }
    out.sort();
    out
}
