//! Storage and API behaviour of a single multifeed (JS checklist items 1–4, 9–12,
//! 14, 20, 26, 28, re-expressed for Rust and asserted by key), plus reopen,
//! damage and durability.

mod common;

use std::collections::HashSet;

use common::*;
use futures::StreamExt;
use multifeed::{Durability, Error, Event, FeedKey, Multifeed, Options, SharedKey, StorageConfig};

// [basic] no feeds
#[tokio::test]
async fn a_fresh_multifeed_has_no_feeds() {
    let group = open_memory().await;
    assert!(group.feeds().is_empty());
    assert!(group.writers().is_empty());
}

// [basic] create writer
#[tokio::test]
async fn create_writer_append_and_get() {
    let group = open_memory().await;
    let w = group.writer("default").await.unwrap();
    assert_eq!(w.append(b"foo").await.unwrap(), 0);
    assert_eq!(w.get(0).await.unwrap(), Some(b"foo".to_vec()));
    assert_eq!(w.get(1).await.unwrap(), None);
    assert_eq!(group.feeds(), vec![w.clone()]);
    assert_eq!(w.len().await, 1);
    assert!(w.is_local());
}

#[tokio::test]
async fn batch_append_returns_first_seq_and_keeps_order() {
    let group = open_memory().await;
    let w = group.writer("w").await.unwrap();
    w.append(b"zero").await.unwrap();
    let blocks: Vec<String> = (1..=50).map(|i| format!("block {i}")).collect();
    assert_eq!(w.append_batch(&blocks).await.unwrap(), 1);
    assert_eq!(w.len().await, 51);
    for (i, block) in blocks.iter().enumerate() {
        assert_eq!(
            w.get(i as u64 + 1).await.unwrap().unwrap(),
            block.as_bytes()
        );
    }
}

// [basic] get feed by key
#[tokio::test]
async fn feed_by_key_bytes_and_hex_in_either_case() {
    let group = open_memory().await;
    let w = group.writer("w").await.unwrap();
    let key = w.key();
    assert_eq!(group.feed(key), Some(w.clone()));
    assert_eq!(group.feed(*key.as_bytes()), Some(w.clone()));
    assert_eq!(group.feed(&key.as_bytes()[..]), Some(w.clone()));
    assert_eq!(group.feed(key.to_hex()), Some(w.clone()));
    assert_eq!(
        group.feed(key.to_hex().to_uppercase().as_str()),
        Some(w.clone())
    );
    assert_eq!(group.feed("not a key"), None);
    assert_eq!(group.feed(FeedKey::from_bytes([9; 32])), None);
    assert!(matches!(
        FeedKey::from_hex("abc"),
        Err(Error::InvalidKey { .. })
    ));
}

// [basic] get localfeed by name
#[tokio::test]
async fn writer_by_name_returns_the_same_feed() {
    let group = open_memory().await;
    let a = group.writer("bob").await.unwrap();
    let b = group.writer("bob").await.unwrap();
    assert_eq!(a.key(), b.key());
    assert_eq!(group.feeds().len(), 1);
}

// JS creates duplicate feeds here; we must not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writer_calls_with_one_name_create_one_feed() {
    let dir = tempfile::tempdir().unwrap();
    let group = open_dir(dir.path()).await;
    let calls = (0..16).map(|_| {
        let group = group.clone();
        tokio::spawn(async move { group.writer("minuette").await.unwrap().key() })
    });
    let keys: HashSet<FeedKey> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(keys.len(), 1);
    assert_eq!(group.feeds().len(), 1);
    group.close().await.unwrap();
    let group = open_dir(dir.path()).await;
    assert_eq!(group.feeds().len(), 1, "the index recorded the writer once");
}

#[tokio::test]
async fn names_never_resolve_to_remote_feeds() {
    let group = open_memory().await;
    let remote_key = keypair(3).public_key();
    let remote = group.add_remote(remote_key).await.unwrap();
    assert!(!remote.is_local());
    assert_eq!(remote.name(), None);
    let w = group.writer("0").await.unwrap();
    assert_ne!(w.key(), remote_key);
    assert!(w.is_local());
    assert_eq!(group.writers(), vec![w.clone()]);
    assert_eq!(group.feeds(), vec![remote.clone(), w]);
    // Adding the same remote twice returns the existing member.
    assert_eq!(group.add_remote(remote_key.to_hex()).await.unwrap(), remote);
    assert_eq!(group.feeds().len(), 2);
}

#[tokio::test]
async fn appending_to_a_remote_feed_is_a_typed_error() {
    let group = open_memory().await;
    let remote = group.add_remote(keypair(4).public_key()).await.unwrap();
    let err = remote.append(b"x").await.unwrap_err();
    assert!(matches!(err, Error::NotWritable { .. }), "{err}");
    let err = remote.append_batch(&[b"x"]).await.unwrap_err();
    assert!(matches!(err, Error::NotWritable { .. }), "{err}");
    assert_eq!(remote.len().await, 0);
}

#[tokio::test]
async fn invalid_names_and_keys_are_refused() {
    let group = open_memory().await;
    assert!(matches!(
        group.writer("").await,
        Err(Error::InvalidName { .. })
    ));
    assert!(matches!(
        group.writer(&"x".repeat(2000)).await,
        Err(Error::InvalidName { .. })
    ));
    assert!(matches!(
        group.add_remote("zz".repeat(32)).await,
        Err(Error::InvalidKey { .. })
    ));
    // The shared key is never a member feed's key.
    let shared = common::shared_key();
    assert!(matches!(
        group.add_remote(*shared.as_bytes()).await,
        Err(Error::SharedKeyAsFeedKey)
    ));
    assert!(group.feeds().is_empty());
}

// [basic] can create writer with custom keypair
#[tokio::test]
async fn writer_with_custom_keypair() {
    let group = open_memory().await;
    let kp = keypair(1);
    let w = group
        .writer_with_keypair("moose", kp.clone())
        .await
        .unwrap();
    assert_eq!(w.key(), kp.public_key());
    w.append(b"hello").await.unwrap();
    assert_eq!(w.get(0).await.unwrap(), Some(b"hello".to_vec()));
    assert_eq!(group.feeds(), vec![w.clone()]);
    // Same name, same pair: the same writer. Same name, another pair: refused.
    assert_eq!(group.writer_with_keypair("moose", kp).await.unwrap(), w);
    assert!(matches!(
        group.writer_with_keypair("moose", keypair(2)).await,
        Err(Error::WriterKeyMismatch { .. })
    ));
    // A pair that already owns a writer cannot own a second name.
    assert!(matches!(
        group.writer_with_keypair("elk", keypair(1)).await,
        Err(Error::KeyConflict { .. })
    ));
}

#[tokio::test]
async fn deterministic_keypair_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let group = open_dir(dir.path()).await;
    let w = group
        .writer_with_keypair("moose", keypair(1))
        .await
        .unwrap();
    w.append(b"a").await.unwrap();
    group.close().await.unwrap();
    let group = open_dir(dir.path()).await;
    let w = group.writer("moose").await.unwrap();
    assert_eq!(w.key(), keypair(1).public_key());
    w.append(b"b").await.unwrap();
    assert_eq!(w.get(1).await.unwrap(), Some(b"b".to_vec()));
}

// [basic] get localfeed by name across disk loads
#[tokio::test]
async fn writer_by_name_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let group = open_dir(dir.path()).await;
    let key = group.writer("minuette").await.unwrap().key();
    group.close().await.unwrap();
    let group = open_dir(dir.path()).await;
    let w = group.writer("minuette").await.unwrap();
    assert_eq!(w.key(), key);
    w.append(b"still writable").await.unwrap();
}

// [basic] close
#[tokio::test]
async fn close_empties_feeds_and_releases_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("group");
    let group = open_dir(&path).await;
    let w = group.writer("w").await.unwrap();
    w.append(b"x").await.unwrap();
    group.close().await.unwrap();
    assert!(group.is_closed());
    assert!(group.feeds().is_empty());
    std::fs::remove_dir_all(&path).unwrap();
    // Handles held across close fail cleanly, and so does the group.
    assert!(matches!(w.append(b"y").await, Err(Error::Closed)));
    assert!(matches!(w.get(0).await, Err(Error::Closed)));
    assert!(matches!(group.writer("w2").await, Err(Error::Closed)));
    assert!(!path.exists(), "nothing was re-created after close");
}

// [basic] close after double-open
#[tokio::test]
async fn close_after_double_open() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..2u8 {
        let group = open_dir(dir.path()).await;
        let w = group.writer("minuette").await.unwrap();
        w.append(&[round]).await.unwrap();
        group.close().await.unwrap();
    }
    let group = open_dir(dir.path()).await;
    let w = group.writer("minuette").await.unwrap();
    assert_eq!(w.len().await, 2);
    group.close().await.unwrap();
    std::fs::remove_dir_all(dir.path()).unwrap();
}

// [regression] calling close while closing should not throw errors
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_close_is_safe_and_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let group = open_dir(dir.path()).await;
    group.writer("w").await.unwrap().append(b"x").await.unwrap();
    let other = group.clone();
    let (a, b) = tokio::join!(group.close(), other.close());
    a.unwrap();
    b.unwrap();
    assert!(group.is_closed());
    group.close().await.unwrap();
}

// [basic] can provide custom encryption key
#[tokio::test]
async fn custom_shared_key_from_hex() {
    let hex = "ce1f0639a7f3ba6e9d5ae2b4b9c31ea8c8d6f3df6e5ff7c44fba3e2a11c9157e";
    let key = SharedKey::from_hex(hex).unwrap();
    let group = Multifeed::open(StorageConfig::Memory, key.clone(), Options::default())
        .await
        .unwrap();
    assert_eq!(group.shared_key(), &key);
    assert_eq!(group.shared_key().to_hex(), hex);
    assert_eq!(SharedKey::from_hex(&hex.to_uppercase()).unwrap(), key);
    assert!(matches!(
        SharedKey::from_hex("beef"),
        Err(Error::InvalidKey { .. })
    ));
    assert!(
        !format!("{key:?}").contains(&hex[..8]),
        "Debug must not print the key"
    );
}

// [regression] ensure encryption key is not written to disk
#[tokio::test]
async fn shared_key_bytes_appear_in_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let key = SharedKey::generate();
    let group = Multifeed::open(
        StorageConfig::dir(dir.path()),
        key.clone(),
        Options::default(),
    )
    .await
    .unwrap();
    for name in ["a", "b"] {
        let w = group.writer(name).await.unwrap();
        w.append(b"entry").await.unwrap();
    }
    group.add_remote(keypair(7).public_key()).await.unwrap();
    group.close().await.unwrap();
    let hex = key.to_hex();
    let files = files_under(dir.path());
    assert!(files.len() > 4);
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !bytes.windows(32).any(|w| w == key.as_bytes()),
            "{} holds the shared key",
            file.display()
        );
        assert!(!String::from_utf8_lossy(&bytes).contains(&hex));
    }
    // Only our two top-level entries: the index and the member feeds.
    let mut top: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    top.sort();
    assert_eq!(top, ["feeds", "index"]);
}

// [regression] concurrency of writer creation: readers never see a half-made
// membership, and every snapshot of feeds() is a prefix of the final admission order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feeds_snapshots_during_writer_creation_are_prefixes() {
    let dir = tempfile::tempdir().unwrap();
    let group = open_dir(dir.path()).await;
    assert!(group.feeds().is_empty());
    let reader = {
        let group = group.clone();
        tokio::spawn(async move {
            let mut snapshots = Vec::new();
            while snapshots.last().map_or(0, Vec::len) < 20 {
                snapshots.push(group.feeds().iter().map(|f| f.key()).collect::<Vec<_>>());
                tokio::task::yield_now().await;
            }
            snapshots
        })
    };
    for i in 0..20 {
        group.writer(&format!("w{i}")).await.unwrap();
    }
    let final_keys: Vec<FeedKey> = group.feeds().iter().map(|f| f.key()).collect();
    let snapshots = tokio::time::timeout(std::time::Duration::from_secs(10), reader)
        .await
        .unwrap()
        .unwrap();
    for snapshot in snapshots {
        assert_eq!(snapshot[..], final_keys[..snapshot.len()]);
    }
}

#[tokio::test]
async fn reopen_keeps_names_keys_order_and_data() {
    let dir = tempfile::tempdir().unwrap();
    let group = open_dir(dir.path()).await;
    let mut expected = Vec::new();
    for i in 0..5 {
        let w = group.writer(&format!("w{i}")).await.unwrap();
        w.append(format!("data {i}").as_bytes()).await.unwrap();
        expected.push((w.key(), Some(format!("w{i}"))));
        let r = group
            .add_remote(keypair(100 + i).public_key())
            .await
            .unwrap();
        expected.push((r.key(), None));
    }
    group.close().await.unwrap();
    let group = open_dir(dir.path()).await;
    let got: Vec<_> = group
        .feeds()
        .iter()
        .map(|f| (f.key(), f.name().map(str::to_owned)))
        .collect();
    assert_eq!(got, expected);
    for (i, w) in group.writers().iter().enumerate() {
        assert_eq!(
            w.get(0).await.unwrap().unwrap(),
            format!("data {i}").as_bytes()
        );
    }
    assert!(group.skipped().is_empty());
}

#[tokio::test]
async fn reopen_with_a_thousand_feeds() {
    let dir = tempfile::tempdir().unwrap();
    let group = open_dir(dir.path()).await;
    let mut expected = Vec::new();
    for i in 0..1000u32 {
        let feed = if i % 2 == 0 {
            group.writer(&format!("topic-{i}")).await.unwrap()
        } else {
            group
                .add_remote(multifeed::Keypair::generate().public_key())
                .await
                .unwrap()
        };
        expected.push((feed.key(), feed.name().map(str::to_owned)));
    }
    group.close().await.unwrap();
    let group = open_dir(dir.path()).await;
    let got: Vec<_> = group
        .feeds()
        .iter()
        .map(|f| (f.key(), f.name().map(str::to_owned)))
        .collect();
    assert_eq!(got.len(), 1000);
    assert_eq!(got, expected);
    assert_eq!(group.writers().len(), 500);
    group.close().await.unwrap();
}

#[tokio::test]
async fn a_deleted_member_directory_does_not_hide_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let group = open_dir(dir.path()).await;
    let mut keys = Vec::new();
    for i in 0..5 {
        let w = group.writer(&format!("w{i}")).await.unwrap();
        w.append(b"x").await.unwrap();
        keys.push(w.key());
    }
    group.close().await.unwrap();
    std::fs::remove_dir_all(dir.path().join("feeds").join(keys[1].to_hex())).unwrap();

    let group = open_dir(dir.path()).await;
    let got: Vec<FeedKey> = group.feeds().iter().map(|f| f.key()).collect();
    assert_eq!(got, vec![keys[0], keys[2], keys[3], keys[4]]);
    assert_eq!(group.skipped().len(), 1);
    let skipped = &group.skipped()[0];
    assert_eq!(skipped.key, Some(keys[1]));
    assert_eq!(skipped.name.as_deref(), Some("w1"));
    assert!(skipped.reason.contains("missing"), "{}", skipped.reason);
    for key in [keys[0], keys[2], keys[3], keys[4]] {
        assert_eq!(
            group.feed(key).unwrap().get(0).await.unwrap(),
            Some(b"x".to_vec())
        );
    }
}

#[tokio::test]
async fn damaged_member_files_are_reported_not_panicked_on() {
    let dir = tempfile::tempdir().unwrap();
    let group = open_dir(dir.path()).await;
    let a = group.writer("a").await.unwrap();
    a.append(b"x").await.unwrap();
    let b = group.writer("b").await.unwrap();
    b.append(b"y").await.unwrap();
    let (a_key, b_key) = (a.key(), b.key());
    group.close().await.unwrap();
    // Overwrite a's oplog with garbage and swap b's files for another feed's.
    let feeds = dir.path().join("feeds");
    std::fs::write(feeds.join(a_key.to_hex()).join("oplog"), vec![0xa5; 300]).unwrap();
    let other = tempfile::tempdir().unwrap();
    let other_group = open_dir(other.path()).await;
    let o = other_group.writer("o").await.unwrap();
    let o_key = o.key();
    other_group.close().await.unwrap();
    let b_dir = feeds.join(b_key.to_hex());
    std::fs::remove_dir_all(&b_dir).unwrap();
    std::fs::create_dir(&b_dir).unwrap();
    for file in ["oplog", "tree", "data", "bitfield"] {
        let src = other.path().join("feeds").join(o_key.to_hex()).join(file);
        if src.exists() {
            std::fs::copy(src, b_dir.join(file)).unwrap();
        }
    }
    let group = open_dir(dir.path()).await;
    assert!(group.feeds().is_empty());
    let mut reasons: Vec<_> = group
        .skipped()
        .iter()
        .map(|s| (s.key, s.reason.clone()))
        .collect();
    reasons.sort();
    assert_eq!(reasons.len(), 2);
    assert!(
        reasons
            .iter()
            .any(|(k, r)| *k == Some(b_key) && r.contains("another feed"))
    );
    assert!(reasons.iter().any(|(k, _)| *k == Some(a_key)));
}

#[tokio::test]
async fn a_damaged_index_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let group = open_dir(dir.path()).await;
    group.writer("w").await.unwrap();
    group.close().await.unwrap();
    std::fs::write(dir.path().join("index").join("oplog"), vec![0xff; 100]).unwrap();
    let result = Multifeed::open(
        StorageConfig::dir(dir.path()),
        shared_key(),
        Options::default(),
    )
    .await;
    match result {
        Err(e) => assert!(matches!(e, Error::Damaged { .. }), "{e}"),
        Ok(group) => assert!(group.feeds().is_empty() || !group.skipped().is_empty()),
    }
}

#[tokio::test]
async fn events_include_existing_members_then_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let group = open_dir(dir.path()).await;
    let a = group.writer("a").await.unwrap();
    group.close().await.unwrap();

    let group = open_dir(dir.path()).await;
    let mut events = group.events();
    assert_eq!(
        next_event(&mut events).await,
        Event::FeedAdded {
            key: a.key(),
            name: Some("a".into()),
            local: true
        }
    );
    let b = group.writer("b").await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        Event::FeedAdded {
            key: b.key(),
            name: Some("b".into()),
            local: true
        }
    );
    let r = group.add_remote(keypair(9).public_key()).await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        Event::FeedAdded {
            key: r.key(),
            name: None,
            local: false
        }
    );
    // Re-adding a member and re-opening a writer announce nothing.
    group.writer("b").await.unwrap();
    group.add_remote(r.key()).await.unwrap();
    group.close().await.unwrap();
    drop(group);
    let rest: Vec<Event> =
        tokio::time::timeout(std::time::Duration::from_secs(5), events.collect())
            .await
            .unwrap();
    assert!(rest.is_empty(), "{rest:?}");
}

#[tokio::test]
async fn a_slow_event_subscriber_is_told_it_lagged() {
    let group = Multifeed::open(
        StorageConfig::Memory,
        shared_key(),
        Options::default().event_capacity(4),
    )
    .await
    .unwrap();
    let mut events = group.events();
    for i in 0..10 {
        group.writer(&format!("w{i}")).await.unwrap();
    }
    assert!(matches!(
        next_event(&mut events).await,
        Event::Lagged { missed: 6 }
    ));
}

#[tokio::test]
async fn power_loss_durability_appends_and_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options::default().durability(Durability::PowerLoss);
    let group = Multifeed::open(
        StorageConfig::dir(dir.path()),
        shared_key(),
        options.clone(),
    )
    .await
    .unwrap();
    let w = group.writer("w").await.unwrap();
    let appends = (0..20).map(|i| {
        let w = w.clone();
        async move { w.append(format!("{i}").as_bytes()).await.unwrap() }
    });
    let mut seqs = futures::future::join_all(appends).await;
    seqs.sort();
    assert_eq!(seqs, (0..20).collect::<Vec<u64>>());
    group.flush().await.unwrap();
    group.close().await.unwrap();
    let group = Multifeed::open(StorageConfig::dir(dir.path()), shared_key(), options)
        .await
        .unwrap();
    assert_eq!(group.writer("w").await.unwrap().len().await, 20);
}

/// Child half of the crash test: appends (single and batched) until killed,
/// printing each acknowledged seq. Ignored, so a normal run does not count it as
/// a passed test; `acknowledged_appends_survive_a_crash` runs it.
#[tokio::test]
#[ignore = "the child half of acknowledged_appends_survive_a_crash, which runs it"]
async fn crash_child() {
    let dir = std::env::var("MULTIFEED_CRASH_DIR")
        .expect("run by acknowledged_appends_survive_a_crash, which sets MULTIFEED_CRASH_DIR");
    let group = open_dir(std::path::Path::new(&dir)).await;
    let w = group.writer("crash").await.unwrap();
    for i in 0..1_000_000u32 {
        let seq = if i % 2 == 0 {
            w.append(format!("entry {i}").as_bytes()).await.unwrap()
        } else {
            w.append_batch(&[format!("entry {i}")]).await.unwrap()
        };
        // Line-buffered: each line is out before the next append starts.
        println!("acked {seq}");
    }
    unreachable!("killed long before");
}

/// A writer killed with SIGKILL at a moment chosen by the clock, mid-append,
/// loses none of the appends it had acknowledged.
#[test]
fn acknowledged_appends_survive_a_crash() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--ignored", "--nocapture"])
        .args(["--test-threads=1"])
        .env("MULTIFEED_CRASH_DIR", dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let kill_after = 100
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as usize
            % 900;
    let mut acked: Vec<u64> = Vec::new();
    for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        // The first shares its line with libtest's "test crash_child ... ".
        if let Some((_, n)) = line.split_once("acked ") {
            acked.push(n.trim().parse().unwrap());
            if acked.len() == kill_after {
                child.kill().unwrap();
            }
        }
    }
    let status = child.wait().unwrap();
    assert!(
        acked.len() >= kill_after,
        "the child stopped after {} appends ({status}) before the kill",
        acked.len()
    );
    assert!(!status.success(), "the child was killed: {status}");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let group = open_dir(dir.path()).await;
        let w = group.writer("crash").await.unwrap();
        assert!(w.len().await >= acked.len() as u64);
        for (i, seq) in acked.iter().enumerate() {
            assert_eq!(
                w.get(*seq).await.unwrap().unwrap(),
                format!("entry {i}").as_bytes(),
                "acknowledged entry {seq} lost (killed after {kill_after})"
            );
        }
    });
}

#[tokio::test]
async fn len_signal_follows_appends() {
    let group = open_memory().await;
    let w = group.writer("w").await.unwrap();
    let mut len = w.subscribe_len();
    w.append(b"a").await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), len.wait_for(|&l| l == 1))
        .await
        .unwrap()
        .unwrap();
    let _ = group.events().next().await;
}
