//! Bytes on disk per 100-byte topic message, with and without packing.
//!
//! Publishes 10,000 messages of 100 bytes to a fresh on-disk group three ways,
//! closes it, and divides the size of every file under the group's directory by
//! the message count:
//!
//! - `publish` one at a time: one block and one signed append per message;
//! - `publish_batch_with(Packing::one_per_block())`, 100 per call: one block per
//!   message, one signature per 100;
//! - `publish_batch_with(Packing::max_messages(100))`, 100 per call: 100
//!   messages per block.
//!
//! Run with `cargo run --release --example topic_overhead`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use multifeed::{
    Multifeed, Options, SharedKey, StorageConfig, Topics,
    topics::{Message, Packing},
};

const MESSAGES: usize = 10_000;
const PAYLOAD: usize = 100;
const PER_CALL: usize = 100;

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir").flatten() {
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

fn message(i: usize) -> Message {
    let payload: Vec<u8> = (0..PAYLOAD).map(|j| (i * 31 + j) as u8).collect();
    Message::new("sensors/temperature", payload)
}

async fn measure(label: &str, packing: Option<Packing>) -> multifeed::Result<()> {
    let dir = tempfile::tempdir().expect("temp dir");
    let group = Multifeed::open(
        StorageConfig::dir(dir.path()),
        SharedKey::generate(),
        Options::default(),
    )
    .await?;
    let topics = Topics::new(group.clone());
    let started = std::time::Instant::now();
    match packing {
        None => {
            for i in 0..MESSAGES {
                topics.publish(message(i)).await?;
            }
        }
        Some(packing) => {
            for start in (0..MESSAGES).step_by(PER_CALL) {
                topics
                    .publish_batch_with((start..start + PER_CALL).map(message), packing)
                    .await?;
            }
        }
    }
    let elapsed = started.elapsed();
    let blocks = group.writer("topic/sensors/temperature").await?.len().await;
    group.close().await?;

    let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
    let mut total = 0;
    for path in files_under(dir.path()) {
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let kind = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        *by_kind.entry(kind).or_default() += len;
        total += len;
    }
    let per_message = total as f64 / MESSAGES as f64;
    println!(
        "{label:<40} {blocks:>6} blocks  {per_message:>7.1} B/message on disk  ({:>5.1} B overhead)  {:>6.0} ms",
        per_message - PAYLOAD as f64,
        elapsed.as_secs_f64() * 1000.0
    );
    let parts: Vec<String> = by_kind
        .iter()
        .map(|(kind, len)| format!("{kind} {:.1}", *len as f64 / MESSAGES as f64))
        .collect();
    println!("{:<40} per message by file: {}", "", parts.join(", "));
    Ok(())
}

#[tokio::main]
async fn main() -> multifeed::Result<()> {
    println!("{MESSAGES} messages of {PAYLOAD} bytes, topic \"sensors/temperature\"");
    measure("publish (1 per block, 1 append each)", None).await?;
    measure(
        "publish_batch, 1 per block, 100 per call",
        Some(Packing::one_per_block()),
    )
    .await?;
    measure(
        "publish_batch, 100 per block",
        Some(Packing::max_messages(100)),
    )
    .await?;
    Ok(())
}
