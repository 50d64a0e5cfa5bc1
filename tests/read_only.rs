//! A group opened with `Options::read_only`: everything reads, nothing on disk
//! changes, and every change is refused with `Error::ReadOnly`. Real hypercores on
//! disk; a read-only bind mount and immutable files where this host permits them.

mod common;

use std::path::Path;

use common::{readonly::*, *};
use multifeed::{Error, FeedKey, Multifeed, Options, ReplicateOptions, StorageConfig};

/// Writers and how many blocks each holds.
const WRITERS: [(&str, u64); 3] = [("topic/temperature", 40), ("topic/humidity", 7), ("log", 1)];

fn block(name: &str, i: u64) -> Vec<u8> {
    format!("{name} {i}").into_bytes()
}

/// A closed store holding three local writers and one remote feed (synced from
/// another store, with blocks appended singly and in a batch).
async fn store_with_data(dir: &Path) -> Vec<(FeedKey, Vec<Vec<u8>>)> {
    let group = open_dir(dir).await;
    let mut expected = Vec::new();
    for (name, n) in WRITERS {
        let feed = group.writer(name).await.unwrap();
        for i in 0..n {
            feed.append(&block(name, i)).await.unwrap();
        }
        expected.push((feed.key(), (0..n).map(|i| block(name, i)).collect()));
    }
    let other_dir = tempfile::tempdir().unwrap();
    let other = open_dir(other_dir.path()).await;
    let remote = other.writer("elsewhere").await.unwrap();
    let remote_blocks: Vec<Vec<u8>> = (0..20).map(|i| block("elsewhere", i)).collect();
    remote.append_batch(&remote_blocks).await.unwrap();
    let (a, b) = sync_pair(&group, &other).await;
    a.unwrap();
    b.unwrap();
    assert_eq!(group.feed(remote.key()).unwrap().len().await, 20);
    expected.push((remote.key(), remote_blocks));
    other.close().await.unwrap();
    group.close().await.unwrap();
    expected
}

async fn open_read_only(dir: &Path) -> multifeed::Result<Multifeed> {
    Multifeed::open(
        StorageConfig::dir(dir),
        shared_key(),
        Options::default().read_only(true),
    )
    .await
}

fn assert_read_only(result: multifeed::Result<impl std::fmt::Debug>, what: &str) {
    match result {
        Err(e @ Error::ReadOnly { .. }) => {
            assert_eq!(e.code(), "read_only");
            let text = e.to_string();
            assert!(text.contains("opened read-only"), "{what}: {text}");
            assert!(!text.contains("restore"), "{what}: {text}");
        }
        other => panic!("{what}: expected Error::ReadOnly, got {other:?}"),
    }
}

/// Reads everything, checks every change is refused, closes: the directory
/// listing (sizes, modes, mtimes) must not change.
async fn read_everything_and_refuse_changes(dir: &Path, expected: &[(FeedKey, Vec<Vec<u8>>)]) {
    let group = open_read_only(dir).await.expect("open read-only");
    assert!(group.is_read_only());
    assert!(group.skipped().is_empty(), "{:?}", group.skipped());
    assert!(group.unlisted_feed_dirs().is_empty());
    assert_eq!(group.feeds().len(), expected.len());
    for (key, blocks) in expected {
        let feed = group.feed(*key).expect("member");
        assert_eq!(feed.len().await, blocks.len() as u64);
        for (seq, block) in blocks.iter().enumerate() {
            assert_eq!(feed.get(seq as u64).await.unwrap().as_ref(), Some(block));
        }
    }
    let report = group.verify().await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.feeds.len(), expected.len());

    let writer = group
        .writer("log")
        .await
        .expect("an existing writer is handed out");
    assert_read_only(writer.append(b"more").await, "append");
    assert_read_only(writer.append_batch(&[b"a", b"b"]).await, "append_batch");
    assert_read_only(group.writer("new").await, "a new writer");
    assert_read_only(
        group.add_remote(keypair(9).public_key()).await,
        "add_remote",
    );
    assert_read_only(group.repair().await, "repair");
    let peer_dir = tempfile::tempdir().unwrap();
    let peer = open_dir(peer_dir.path()).await;
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let refused = group.replicate(ours, ReplicateOptions::new(true)).await;
    assert_read_only(refused, "replicate");
    drop(theirs);
    peer.close().await.unwrap();
    assert_read_only(
        group
            .feeds()
            .into_iter()
            .next()
            .unwrap()
            .replicate_raw(tokio::io::duplex(1024).0, ReplicateOptions::new(true))
            .await,
        "replicate_raw",
    );
    group.flush().await.unwrap();
    group.close().await.unwrap();
}

#[tokio::test]
async fn a_read_only_group_reads_everything_refuses_changes_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let expected = store_with_data(dir.path()).await;
    let before = listing(dir.path());
    read_everything_and_refuse_changes(dir.path(), &expected).await;
    assert_eq!(
        listing(dir.path()),
        before,
        "a read-only open changed the store"
    );

    // Still an ordinary store afterwards.
    let group = open_dir(dir.path()).await;
    let feed = group.writer("log").await.unwrap();
    feed.append(b"after").await.unwrap();
    group.close().await.unwrap();
}

#[tokio::test]
async fn a_read_only_group_without_an_index_creates_none() {
    let dir = tempfile::tempdir().unwrap();
    store_with_data(dir.path()).await;
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let before = listing(dir.path());
    let group = open_read_only(dir.path()).await.unwrap();
    // Not an empty store: every feed directory shows as unlisted.
    assert_eq!(group.unlisted_feed_dirs().len(), WRITERS.len() + 1);
    group.close().await.unwrap();
    assert_eq!(listing(dir.path()), before);
}

#[tokio::test]
async fn a_store_on_a_read_only_mount_reads_and_refuses_writes_as_not_damage() {
    let root = tempfile::tempdir().unwrap();
    let source = root.path().join("store");
    let expected = store_with_data(&source).await;
    let before = listing(&source);
    let mount = match ReadOnlyMount::new(&source, &root.path().join("ro")) {
        Ok(mount) => mount,
        Err(reason) => {
            eprintln!("skipped: cannot make a read-only bind mount here ({reason})");
            return;
        }
    };
    read_everything_and_refuse_changes(&mount.path, &expected).await;

    // Opened for writing anyway, it reads, and an append fails as a refusal by
    // the system, never as damage.
    let group = open_dir(&mount.path).await;
    assert!(group.skipped().is_empty(), "{:?}", group.skipped());
    let (key, blocks) = &expected[0];
    let feed = group.feed(*key).unwrap();
    assert_eq!(feed.get(3).await.unwrap().as_ref(), Some(&blocks[3]));
    let refused = feed.append(b"more").await.unwrap_err();
    assert!(refused.is_access_refused(), "{refused:?}");
    let text = refused.to_string();
    assert!(text.contains("read-only"), "{text}");
    assert!(
        !text.contains("restore") && !text.contains("damaged storage"),
        "{text}"
    );
    let _ = group.close().await;
    drop(mount);
    assert_eq!(
        listing(&source),
        before,
        "the store changed under the mount"
    );
}

#[tokio::test]
async fn immutable_feed_files_are_read_and_their_writes_refused_as_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let expected = store_with_data(dir.path()).await;
    if let Err(reason) = immutable_files_supported(dir.path()) {
        eprintln!("skipped: immutable files are not supported here ({reason})");
        return;
    }
    let (key, blocks) = &expected[0];
    let feed_dir = dir.path().join("feeds").join(key.to_hex());
    let before = listing(dir.path());
    let guard = Immutable::new(&[&feed_dir.join("data"), &feed_dir.join("oplog")]).unwrap();

    // Opened for writing: not skipped as damaged, every block reads.
    let group = open_dir(dir.path()).await;
    assert!(group.skipped().is_empty(), "{:?}", group.skipped());
    let feed = group.feed(*key).unwrap();
    for (seq, block) in blocks.iter().enumerate() {
        assert_eq!(feed.get(seq as u64).await.unwrap().as_ref(), Some(block));
    }
    assert!(group.verify().await.unwrap().is_ok());
    let refused = feed.append(b"more").await.unwrap_err();
    assert!(refused.is_access_refused(), "{refused:?}");
    let text = refused.to_string();
    assert!(
        text.contains("permission denied") && text.contains("immutable"),
        "{text}"
    );
    assert!(!text.contains("restore"), "{text}");
    // The other writers still append.
    let other = group.feed(expected[1].0).unwrap();
    other.append(b"fine").await.unwrap();
    group.close().await.unwrap();
    drop(guard);
    // The refused append left the feed's files as they were.
    for (path, entry) in listing(&feed_dir) {
        assert_eq!(
            before.get(&path),
            Some(&entry),
            "{} changed",
            path.display()
        );
    }

    // Read-only, the whole store is untouched by an open.
    let guard = Immutable::new(&[dir.path()]).unwrap();
    let before = listing(dir.path());
    let mut expected = expected;
    expected[1].1.push(b"fine".to_vec());
    read_everything_and_refuse_changes(dir.path(), &expected).await;
    assert_eq!(listing(dir.path()), before);
    drop(guard);
}
