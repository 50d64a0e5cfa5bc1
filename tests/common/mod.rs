//! Helpers shared by the integration tests.
#![allow(dead_code)]

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
