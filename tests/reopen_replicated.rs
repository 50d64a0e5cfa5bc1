//! Remote feeds filled by replication reopen intact.

mod common;

use common::*;

/// After a clean close, every downloaded block is there on reopen.
#[tokio::test]
async fn replicated_feeds_survive_a_clean_reopen() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = open_dir(dir_a.path()).await;
    let b = open_dir(dir_b.path()).await;
    let w = a.writer("w").await.unwrap();
    // Several rounds leave oplog entries of every kind: upgrades, blocks, both.
    for n in [1usize, 7, 100, 2] {
        let blocks: Vec<String> = (0..n).map(|i| format!("entry {i}")).collect();
        w.append_batch(&blocks).await.unwrap();
        let (ra, rb) = sync_pair(&a, &b).await;
        ra.unwrap();
        rb.unwrap();
    }
    let expected = contents(&b).await;
    assert_eq!(expected, contents(&a).await);
    b.close().await.unwrap();
    let b = open_dir(dir_b.path()).await;
    assert!(b.skipped().is_empty(), "{:?}", b.skipped());
    let copy = b.feed(w.key()).unwrap();
    assert_eq!(copy.len().await, 110);
    assert_eq!(copy.contiguous_len().await, 110);
    assert_eq!(contents(&b).await, expected);
}

/// After a crash (no close), a remote feed still opens; every block that survives is
/// intact and a sync restores the rest.
#[tokio::test]
async fn replicated_feeds_recover_after_a_crash() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = open_dir(dir_a.path()).await;
    let w = a.writer("w").await.unwrap();
    let blocks: Vec<String> = (0..101).map(|i| format!("entry {i}")).collect();
    w.append_batch(&blocks).await.unwrap();
    {
        let b = open_dir(dir_b.path()).await;
        let (ra, rb) = sync_pair(&a, &b).await;
        ra.unwrap();
        rb.unwrap();
        // Dropped without close: like a killed process, the files stay as written.
        std::mem::forget(b);
    }
    let b = open_dir(dir_b.path()).await;
    assert!(b.skipped().is_empty(), "{:?}", b.skipped());
    let copy = b.feed(w.key()).unwrap();
    let held = copy.contiguous_len().await;
    assert!(held >= 97, "only {held} blocks survived");
    for seq in 0..held {
        assert_eq!(
            copy.get(seq).await.unwrap().unwrap(),
            blocks[seq as usize].as_bytes()
        );
    }
    let (ra, rb) = sync_pair(&a, &b).await;
    ra.unwrap();
    rb.unwrap();
    assert_eq!(contents(&b).await, contents(&a).await);
}
