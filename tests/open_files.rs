//! The number of open files stays bounded however many feeds a group has.
//! (Its own test binary, so no other test's files are counted.)

mod common;

use common::*;
use multifeed::{Durability, Multifeed, Options, StorageConfig};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test(flavor = "current_thread")]
async fn many_feeds_with_a_small_file_pool() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options::default()
        .max_open_files(16)
        .durability(Durability::PowerLoss);
    let baseline = open_fds();
    let group = Multifeed::open(
        StorageConfig::dir(dir.path()),
        shared_key(),
        options.clone(),
    )
    .await
    .unwrap();
    let mut writers = Vec::new();
    for i in 0..300 {
        let w = group.writer(&format!("w{i}")).await.unwrap();
        w.append(format!("first {i}").as_bytes()).await.unwrap();
        writers.push(w);
        assert!(
            open_fds() <= baseline + 40,
            "{} files open after {i} feeds",
            open_fds() - baseline
        );
    }
    // Reads and appends reopen evicted files transparently.
    for (i, w) in writers.iter().enumerate() {
        w.append(format!("second {i}").as_bytes()).await.unwrap();
        assert_eq!(
            w.get(0).await.unwrap().unwrap(),
            format!("first {i}").as_bytes()
        );
    }
    group.flush().await.unwrap();
    assert!(open_fds() <= baseline + 40);
    group.close().await.unwrap();
    assert!(open_fds() <= baseline + 2, "close releases every file");

    let group = Multifeed::open(StorageConfig::dir(dir.path()), shared_key(), options)
        .await
        .unwrap();
    assert_eq!(group.feeds().len(), 300);
    assert!(
        open_fds() <= baseline + 40,
        "reopening 300 feeds keeps the pool bound"
    );
    for (i, w) in group.writers().iter().enumerate() {
        assert_eq!(
            w.get(1).await.unwrap().unwrap(),
            format!("second {i}").as_bytes()
        );
    }
}
