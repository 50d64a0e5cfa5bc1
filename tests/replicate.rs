//! Replication between multifeeds (JS checklist items 5–8, 13, 15–19, 21–25, 27, 29,
//! asserted by key), over in-memory pipes and TCP on 127.0.0.1.

mod common;

use std::time::Duration;

use common::*;
use multifeed::{
    Error, Multifeed, Options, ReplicateOptions, ReplicationEvent, SharedKey, StorageConfig,
};

// [basic] replicate two multifeeds, one empty
#[tokio::test]
async fn one_empty_side_receives_everything() {
    let a = open_memory().await;
    let b = open_memory().await;
    let w = a.writer("w").await.unwrap();
    w.append(b"foo").await.unwrap();
    let (ra, rb) = sync_pair(&a, &b).await;
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(rb.feeds_learnt, 1);
    assert_eq!(rb.blocks_received, 1);
    assert_eq!(ra.blocks_sent, 1);
    assert_eq!(b.feeds().len(), 1);
    assert_eq!(
        b.feed(w.key()).unwrap().get(0).await.unwrap(),
        Some(b"foo".to_vec())
    );
    assert!(!b.feed(w.key()).unwrap().is_local());
}

// [basic] replicate two empty multifeeds
#[tokio::test]
async fn two_empty_multifeeds_finish() {
    let a = open_memory().await;
    let b = open_memory().await;
    let (ra, rb) = sync_pair(&a, &b).await;
    assert_eq!(ra.unwrap().feeds_synced, 0);
    assert_eq!(rb.unwrap().feeds_synced, 0);
    assert!(a.feeds().is_empty() && b.feeds().is_empty());
}

// [basic] replicate two multifeeds; [regression] ... 1000 vs 10 entries
#[tokio::test]
async fn two_writers_cross_over() {
    let a = open_memory().await;
    let b = open_memory().await;
    let wa = a.writer("local").await.unwrap();
    let wb = b.writer("local").await.unwrap();
    let blocks: Vec<String> = (0..1000).map(|i| format!("foo {i}")).collect();
    wa.append_batch(&blocks).await.unwrap();
    for i in 0..10 {
        wb.append(format!("bar {i}").as_bytes()).await.unwrap();
    }
    let (ra, rb) = sync_pair(&a, &b).await;
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!((ra.blocks_received, rb.blocks_received), (10, 1000));
    assert_eq!(a.feeds().len(), 2);
    assert_eq!(b.feeds().len(), 2);
    assert_eq!(a.feed(wb.key()).unwrap().len().await, 10);
    assert_eq!(b.feed(wa.key()).unwrap().len().await, 1000);
    assert_eq!(contents(&a).await, contents(&b).await);
    // Names stay local: the remote copy has none, the local writer keeps its own.
    assert_eq!(a.feed(wb.key()).unwrap().name(), None);
    assert_eq!(a.writer("local").await.unwrap().key(), wa.key());
}

// [basic] can replicate with custom keypairs
#[tokio::test]
async fn custom_keypairs_replicate() {
    let a = open_memory().await;
    let b = open_memory().await;
    let wa = a.writer_with_keypair("local", keypair(1)).await.unwrap();
    let wb = b.writer_with_keypair("local", keypair(2)).await.unwrap();
    wa.append(b"foo").await.unwrap();
    wb.append(b"bar").await.unwrap();
    let (ra, rb) = sync_pair(&a, &b).await;
    ra.unwrap();
    rb.unwrap();
    assert_eq!(
        a.feed(keypair(2).public_key())
            .unwrap()
            .get(0)
            .await
            .unwrap(),
        Some(b"bar".to_vec())
    );
    assert_eq!(
        b.feed(keypair(1).public_key())
            .unwrap()
            .get(0)
            .await
            .unwrap(),
        Some(b"foo".to_vec())
    );
}

// [regression] replicate two multifeeds, twice
#[tokio::test]
async fn replicating_twice_is_idempotent_and_incremental() {
    let a = open_memory().await;
    let b = open_memory().await;
    let wa = a.writer("w").await.unwrap();
    wa.append_batch(&[b"1", b"2"]).await.unwrap();
    b.writer("w").await.unwrap().append(b"x").await.unwrap();
    let (ra, rb) = sync_pair(&a, &b).await;
    ra.unwrap();
    rb.unwrap();
    // Nothing new: finishes, moves nothing.
    let (ra, rb) = sync_pair(&a, &b).await;
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!((ra.blocks_received, rb.blocks_received), (0, 0));
    // New entries: only those move.
    wa.append_batch(&[b"3", b"4", b"5"]).await.unwrap();
    let (_, rb) = sync_pair(&a, &b).await;
    assert_eq!(rb.unwrap().blocks_received, 3);
    assert_eq!(contents(&a).await, contents(&b).await);
}

// [mux] regression: ensure we're receiving remote handshake (user data)
#[tokio::test]
async fn user_data_reaches_the_other_side() {
    let a = open_memory().await;
    let b = open_memory().await;
    let (ra, rb) = sync_pair_with(
        &a,
        &b,
        ReplicateOptions::new(true).user_data(b"from-a".to_vec()),
        ReplicateOptions::new(false).user_data(b"from-b".to_vec()),
    )
    .await;
    assert_eq!(ra.unwrap().remote_user_data, Some(b"from-b".to_vec()));
    assert_eq!(rb.unwrap().remote_user_data, Some(b"from-a".to_vec()));
}

// [basic] live replicate two multifeeds; [regression] announce new feed on existing connections
#[tokio::test]
async fn live_replication_carries_appends_and_new_feeds() {
    let a = open_memory().await;
    let b = open_memory().await;
    let wa = a.writer("w").await.unwrap();
    wa.append(b"first").await.unwrap();
    let (x, y) = tokio::io::duplex(64 * 1024);
    let ra = a.start_replication(x, ReplicateOptions::new(true).live(true));
    let rb = b.start_replication(y, ReplicateOptions::new(false).live(true));
    wait_for_len(&b, wa.key(), 1).await;
    wa.append(b"second").await.unwrap();
    let copy = wait_for_len(&b, wa.key(), 2).await;
    assert_eq!(copy.get(1).await.unwrap(), Some(b"second".to_vec()));
    // A writer created while connected is announced and replicated.
    let late = b.writer("late").await.unwrap();
    late.append(b"late entry").await.unwrap();
    let copy = wait_for_len(&a, late.key(), 1).await;
    assert_eq!(copy.get(0).await.unwrap(), Some(b"late entry".to_vec()));
    ra.stop();
    rb.stop();
    ra.finish().await.unwrap();
    let _ = rb.finish().await;
}

// [regression] announce new feed on existing connections (chain m1 - m2 - m3)
#[tokio::test]
async fn three_peers_in_a_chain_converge_live() {
    let a = open_memory().await;
    let b = open_memory().await;
    let c = open_memory().await;
    let wa = a.writer("local").await.unwrap();
    wa.append(b"First").await.unwrap();
    let wb = b.writer("local").await.unwrap();
    wb.append(b"Second").await.unwrap();
    let (x, y) = tokio::io::duplex(64 * 1024);
    let ab = (
        a.start_replication(x, ReplicateOptions::new(true).live(true)),
        b.start_replication(y, ReplicateOptions::new(false).live(true)),
    );
    let (x, y) = tokio::io::duplex(64 * 1024);
    let bc = (
        b.start_replication(x, ReplicateOptions::new(true).live(true)),
        c.start_replication(y, ReplicateOptions::new(false).live(true)),
    );
    // A feed created on C after both connections are up reaches A through B.
    let wc = c.writer("local").await.unwrap();
    wc.append(b"Third").await.unwrap();
    for (group, key, len) in [
        (&a, wc.key(), 1),
        (&c, wa.key(), 1),
        (&a, wb.key(), 1),
        (&c, wb.key(), 1),
    ] {
        wait_for_len(group, key, len).await;
    }
    // Live appends travel the chain too.
    wa.append(b"First again").await.unwrap();
    let copy = wait_for_len(&c, wa.key(), 2).await;
    assert_eq!(copy.get(1).await.unwrap(), Some(b"First again".to_vec()));
    for group in [&a, &b, &c] {
        assert_eq!(group.feeds().len(), 3);
    }
    drop((ab, bc));
}

#[tokio::test]
async fn events_report_remote_feeds_progress_and_sync() {
    let a = open_memory().await;
    let b = open_memory().await;
    let w = a.writer("w").await.unwrap();
    let blocks: Vec<Vec<u8>> = (0..100).map(|i| vec![i as u8; 10]).collect();
    w.append_batch(&blocks).await.unwrap();
    let (x, y) = tokio::io::duplex(64 * 1024);
    let ra = a.start_replication(x, ReplicateOptions::new(true).user_data(b"node-a".to_vec()));
    let mut rb = b.start_replication(y, ReplicateOptions::new(false));
    let mut events = Vec::new();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(20), rb.next_event())
        .await
        .expect("events stalled")
    {
        events.push(event);
    }
    ra.finish().await.unwrap();
    rb.finish().await.unwrap();
    // The peer's handshake comes first, saying who it is.
    assert_eq!(
        events.first(),
        Some(&ReplicationEvent::Handshake {
            remote_user_data: Some(b"node-a".to_vec())
        })
    );
    assert!(events.contains(&ReplicationEvent::RemoteFeeds {
        keys: vec![w.key()],
        lengths: vec![Some(w.len().await)],
    }));
    assert!(events.contains(&ReplicationEvent::FeedSynced { key: w.key() }));
    let last_progress = events
        .iter()
        .rev()
        .filter_map(|e| match e {
            ReplicationEvent::Progress { key, blocks, bytes } if *key == w.key() => {
                Some((*blocks, *bytes))
            }
            _ => None,
        })
        .next();
    assert_eq!(last_progress, Some((100, 1000)));
}

#[tokio::test]
async fn three_hundred_feeds_on_one_connection() {
    let a = open_memory().await;
    let b = open_memory().await;
    for i in 0..150 {
        a.writer(&format!("a{i}"))
            .await
            .unwrap()
            .append(format!("a{i}").as_bytes())
            .await
            .unwrap();
        b.writer(&format!("b{i}"))
            .await
            .unwrap()
            .append(format!("b{i}").as_bytes())
            .await
            .unwrap();
    }
    let (ra, rb) = sync_pair(&a, &b).await;
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!((ra.feeds_learnt, rb.feeds_learnt), (150, 150));
    assert_eq!(a.feeds().len(), 300);
    assert_eq!(contents(&a).await, contents(&b).await);
}

/// A peer holding a few thousand feeds, all new to us, hands every one over in
/// one sync (on disk, over TCP): only `max_unproven_feeds + max_waiting_feeds`
/// of them are requested at a time, the rest in waves as trials end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_new_feeds_arrive_in_one_sync() {
    const FEEDS: usize = 3_000;
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = open_dir(dir_a.path()).await;
    let b = open_dir(dir_b.path()).await;
    for i in 0..FEEDS {
        a.writer(&format!("w{i}"))
            .await
            .unwrap()
            .append(format!("entry {i}").as_bytes())
            .await
            .unwrap();
    }
    let defaults = ReplicateOptions::new(true);
    assert!(FEEDS > 2 * (defaults.max_unproven_feeds + defaults.max_waiting_feeds));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (dialed, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
    let (rb, ra) = tokio::time::timeout(
        Duration::from_secs(120),
        futures::future::join(
            b.replicate(dialed.unwrap(), ReplicateOptions::new(true)),
            a.replicate(accepted.unwrap().0, ReplicateOptions::new(false)),
        ),
    )
    .await
    .expect("the sync did not finish within 120 s");
    let (rb, ra) = (rb.unwrap(), ra.unwrap());
    assert_eq!((rb.feeds_learnt, ra.feeds_learnt), (FEEDS, 0));
    assert_eq!(b.feeds().len(), FEEDS);
    assert_eq!(contents(&a).await, contents(&b).await);
}

/// Two peers offer the same new feeds at once: both sessions hold them on trial,
/// but each feed is learnt once, so the sessions' `feeds_learnt` add up to the
/// feeds that arrived (both counted each feed, so `sync --live` with two
/// peers reported twice the feeds it learnt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_learnt_from_two_peers_at_once_counts_once() {
    const FEEDS: usize = 200;
    let a = open_memory().await;
    let b = open_memory().await;
    let c = open_memory().await;
    for i in 0..FEEDS {
        b.writer(&format!("w{i}"))
            .await
            .unwrap()
            .append(format!("entry {i}").as_bytes())
            .await
            .unwrap();
    }
    let (rc, _) = sync_pair(&c, &b).await;
    assert_eq!(rc.unwrap().feeds_learnt, FEEDS);
    let (from_b, from_c) = futures::future::join(sync_pair(&a, &b), sync_pair(&a, &c)).await;
    let learnt = from_b.0.unwrap().feeds_learnt + from_c.0.unwrap().feeds_learnt;
    assert_eq!(a.feeds().len(), FEEDS);
    assert_eq!(learnt, FEEDS, "feeds learnt from both peers counted twice");
}

#[tokio::test]
async fn over_tcp_on_loopback() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = open_dir(dir_a.path()).await;
    let b = open_dir(dir_b.path()).await;
    let w = a.writer("w").await.unwrap();
    let blocks: Vec<Vec<u8>> = (0..2000u32).map(|i| i.to_le_bytes().repeat(25)).collect();
    w.append_batch(&blocks).await.unwrap();
    let big = vec![7u8; 1024 * 1024];
    w.append(&big).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = {
        let a = a.clone();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            a.replicate(socket, ReplicateOptions::new(false)).await
        })
    };
    let socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let rb = tokio::time::timeout(
        Duration::from_secs(60),
        b.replicate(socket, ReplicateOptions::new(true)),
    )
    .await
    .unwrap()
    .unwrap();
    server.await.unwrap().unwrap();
    assert_eq!(rb.blocks_received, 2001);
    let copy = b.feed(w.key()).unwrap();
    assert_eq!(copy.get(2000).await.unwrap(), Some(big));
    assert_eq!(copy.get(1234).await.unwrap(), Some(blocks[1234].clone()));
}

#[tokio::test]
async fn major_version_mismatch_is_refused_on_both_sides_and_changes_nothing() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = open_dir(dir_a.path()).await;
    let b = open_dir(dir_b.path()).await;
    a.writer("w").await.unwrap().append(b"a").await.unwrap();
    b.writer("w").await.unwrap().append(b"b").await.unwrap();
    a.flush().await.unwrap();
    b.flush().await.unwrap();
    let snapshot = |dir: &std::path::Path| {
        let mut files: Vec<_> = files_under(dir)
            .into_iter()
            .map(|f| (f.clone(), std::fs::read(f).unwrap()))
            .collect();
        files.sort();
        files
    };
    let (before_a, before_b) = (snapshot(dir_a.path()), snapshot(dir_b.path()));
    let (ra, rb) = sync_pair_with(
        &a,
        &b,
        ReplicateOptions::new(true).protocol_version("2.0.0"),
        ReplicateOptions::new(false),
    )
    .await;
    match ra.unwrap_err() {
        Error::VersionMismatch { ours, theirs } => assert_eq!(
            (ours.as_str(), theirs.as_str()),
            ("2.0.0", multifeed::PROTOCOL_VERSION)
        ),
        e => panic!("expected a version mismatch, got {e}"),
    }
    match rb.unwrap_err() {
        Error::VersionMismatch { ours, theirs } => assert_eq!(
            (ours.as_str(), theirs.as_str()),
            (multifeed::PROTOCOL_VERSION, "2.0.0")
        ),
        e => panic!("expected a version mismatch, got {e}"),
    }
    assert_eq!(a.feeds().len(), 1);
    assert_eq!(b.feeds().len(), 1);
    assert_eq!(snapshot(dir_a.path()), before_a);
    assert_eq!(snapshot(dir_b.path()), before_b);
}

#[tokio::test]
async fn unparsable_version_and_other_client_are_typed_errors() {
    let a = open_memory().await;
    let b = open_memory().await;
    let (ra, rb) = sync_pair_with(
        &a,
        &b,
        ReplicateOptions::new(true).protocol_version("v1"),
        ReplicateOptions::new(false),
    )
    .await;
    assert!(matches!(rb.unwrap_err(), Error::VersionMismatch { theirs, .. } if theirs == "v1"));
    assert!(matches!(ra.unwrap_err(), Error::VersionMismatch { .. }));
    let (ra, rb) = sync_pair_with(
        &a,
        &b,
        ReplicateOptions::new(true).client_name("cabal"),
        ReplicateOptions::new(false),
    )
    .await;
    assert!(matches!(rb.unwrap_err(), Error::ClientMismatch { theirs, .. } if theirs == "cabal"));
    assert!(matches!(ra.unwrap_err(), Error::ClientMismatch { .. }));
}

#[tokio::test]
async fn a_newer_minor_version_replicates() {
    let a = open_memory().await;
    let b = open_memory().await;
    let w = a.writer("w").await.unwrap();
    w.append(b"x").await.unwrap();
    let (ra, rb) = sync_pair_with(
        &a,
        &b,
        ReplicateOptions::new(true).protocol_version("1.7.3"),
        ReplicateOptions::new(false),
    )
    .await;
    ra.unwrap();
    assert_eq!(rb.unwrap().blocks_received, 1);
}

// [regression] MFs with different root keys cannot replicate
#[tokio::test(start_paused = true)]
async fn wrong_shared_key_fails_fast_and_leaks_no_keys() {
    let a = open_memory().await;
    let b = Multifeed::open(
        StorageConfig::Memory,
        SharedKey::generate(),
        Options::default(),
    )
    .await
    .unwrap();
    a.writer("w")
        .await
        .unwrap()
        .append(b"secret")
        .await
        .unwrap();
    b.writer("w")
        .await
        .unwrap()
        .append(b"secret")
        .await
        .unwrap();
    let timeout = Duration::from_secs(3);
    let (x, y) = tokio::io::duplex(64 * 1024);
    let mut ra = a.start_replication(x, ReplicateOptions::new(true).handshake_timeout(timeout));
    let mut rb = b.start_replication(y, ReplicateOptions::new(false).handshake_timeout(timeout));
    let started = tokio::time::Instant::now();
    let mut seen = Vec::new();
    while let Some(event) = tokio::time::timeout(timeout * 2, ra.next_event())
        .await
        .unwrap()
    {
        seen.push(event);
    }
    while let Some(event) = tokio::time::timeout(timeout * 2, rb.next_event())
        .await
        .unwrap()
    {
        seen.push(event);
    }
    let ea = ra.finish().await.unwrap_err();
    let eb = rb.finish().await.unwrap_err();
    // Virtual time: a wrong key is noticed as soon as the peer's channel arrives,
    // long before the handshake timeout.
    assert!(started.elapsed() < timeout, "took {:?}", started.elapsed());
    for e in [&ea, &eb] {
        assert!(
            matches!(e, Error::SharedKeyMismatch | Error::HandshakeTimeout { .. }),
            "unexpected error: {e}"
        );
    }
    assert!(seen.is_empty(), "no manifest may cross: {seen:?}");
    assert_eq!((a.feeds().len(), b.feeds().len()), (1, 1));
}

#[tokio::test]
async fn a_silent_peer_hits_the_handshake_timeout() {
    let a = open_memory().await;
    let (x, _y) = tokio::io::duplex(64 * 1024);
    let timeout = Duration::from_millis(500);
    let result = tokio::time::timeout(
        Duration::from_secs(5),
        a.replicate(x, ReplicateOptions::new(true).handshake_timeout(timeout)),
    )
    .await
    .expect("the handshake timeout must end the session");
    assert!(
        matches!(result, Err(Error::HandshakeTimeout { .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn a_killed_live_peer_is_noticed_within_the_idle_timeout() {
    let a = open_memory().await;
    let b = open_memory().await;
    a.writer("w").await.unwrap().append(b"x").await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let idle = Duration::from_millis(900);
    let server = {
        let a = a.clone();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            a.replicate(
                socket,
                ReplicateOptions::new(false).live(true).idle_timeout(idle),
            )
            .await
        })
    };
    let socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let rb = b.start_replication(
        socket,
        ReplicateOptions::new(true).live(true).idle_timeout(idle),
    );
    wait_for_len(&b, a.feeds()[0].key(), 1).await;
    // Kill B's side abruptly: the task and its socket vanish without a goodbye.
    drop(rb);
    let result = tokio::time::timeout(idle * 5, server)
        .await
        .expect("a dead peer must be noticed")
        .unwrap();
    assert!(
        matches!(
            result,
            Err(Error::IdleTimeout { .. } | Error::ConnectionLost { .. })
        ),
        "{result:?}"
    );
}

#[tokio::test]
async fn a_cut_connection_resumes_and_every_entry_arrives_once() {
    let a = open_memory().await;
    let b = open_memory().await;
    let w = a.writer("w").await.unwrap();
    let blocks: Vec<String> = (0..5000).map(|i| format!("entry {i}")).collect();
    w.append_batch(&blocks).await.unwrap();
    // First attempt: cut the pipe after some progress.
    let (x, y) = tokio::io::duplex(16 * 1024);
    let ra = a.start_replication(x, ReplicateOptions::new(true));
    let mut rb = b.start_replication(y, ReplicateOptions::new(false));
    loop {
        match tokio::time::timeout(Duration::from_secs(20), rb.next_event())
            .await
            .unwrap()
        {
            Some(ReplicationEvent::Progress { blocks, .. }) if blocks >= 100 => break,
            Some(_) => {}
            None => break,
        }
    }
    drop(ra);
    let first = rb.finish().await;
    let got = b.feed(w.key()).map(|f| f.key());
    assert!(got.is_some());
    let partial = b.feed(w.key()).unwrap().len().await;
    assert!(first.is_err() || partial == 5000);
    // Second attempt completes.
    let (ra, rb) = sync_pair(&a, &b).await;
    ra.unwrap();
    rb.unwrap();
    let copy = b.feed(w.key()).unwrap();
    assert_eq!(copy.len().await, 5000);
    for (i, block) in blocks.iter().enumerate() {
        assert_eq!(copy.get(i as u64).await.unwrap().unwrap(), block.as_bytes());
    }
}

/// A peer whose store was tampered with serves a block that does not match its
/// signed tree: the receiver rejects it with a typed error, keeps only verified
/// blocks, and completes later from an honest peer.
#[tokio::test]
async fn a_tampered_block_from_a_peer_is_rejected_and_the_store_stays_intact() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = open_dir(dir_a.path()).await;
    let w = a.writer("w").await.unwrap();
    let blocks: Vec<String> = (0..50).map(|i| format!("block-{i:04}")).collect(); // 10 bytes each
    w.append_batch(&blocks).await.unwrap();
    let honest = open_memory().await;
    let (r1, r2) = sync_pair(&a, &honest).await;
    r1.unwrap();
    r2.unwrap();
    a.close().await.unwrap();
    // Flip one byte of block 30 in A's data file.
    let data = dir_a
        .path()
        .join("feeds")
        .join(w.key().to_hex())
        .join("data");
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[30 * 10 + 3] ^= 0x01;
    std::fs::write(&data, bytes).unwrap();
    let a = open_dir(dir_a.path()).await;

    let b = open_dir(dir_b.path()).await;
    let (ra, rb) = sync_pair(&a, &b).await;
    match rb {
        Err(Error::InvalidData { key, .. }) => assert_eq!(key, w.key().to_hex()),
        other => panic!("expected InvalidData, got {other:?}"),
    }
    assert!(ra.is_err(), "the session ends on both sides");
    let copy = b.feed(w.key()).unwrap();
    for seq in 0..copy.len().await {
        if let Some(block) = copy.get(seq).await.unwrap() {
            assert_eq!(
                block,
                blocks[seq as usize].as_bytes(),
                "block {seq} was stored unverified"
            );
        }
    }
    assert!(copy.get(30).await.unwrap().is_none());
    // An honest peer completes the feed.
    let (rh, rb) = sync_pair(&honest, &b).await;
    rh.unwrap();
    rb.unwrap();
    for (seq, block) in blocks.iter().enumerate() {
        assert_eq!(
            copy.get(seq as u64).await.unwrap().unwrap(),
            block.as_bytes()
        );
    }
}

/// A one-shot peer syncing with a live one (a `sync` client against `serve`) returns
/// once both hold everything, and the live side ends that session cleanly.
#[tokio::test]
async fn a_one_shot_peer_finishes_against_a_live_peer() {
    let server = open_memory().await;
    let client = open_memory().await;
    let ws = server.writer("s").await.unwrap();
    ws.append_batch(&[b"s0", b"s1"]).await.unwrap();
    let wc = client.writer("c").await.unwrap();
    wc.append(b"c0").await.unwrap();
    let (ra, rb) = sync_pair_with(
        &server,
        &client,
        ReplicateOptions::new(false).live(true),
        ReplicateOptions::new(true),
    )
    .await;
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!((ra.blocks_received, rb.blocks_received), (1, 2));
    assert_eq!(contents(&server).await, contents(&client).await);
}

/// Feeds learnt from a peer are created in batches; when one of a batch cannot be
/// created (here a stray file sits where its directory goes), the session fails with
/// a typed error and the batch's other feeds are removed again: no member, no
/// directory left behind. Once the obstacle is gone, the next sync completes.
#[tokio::test]
async fn a_failed_admission_leaves_no_half_created_feeds() {
    let source = open_memory().await;
    let mut keys = Vec::new();
    for name in ["w1", "w2", "w3"] {
        let writer = source.writer(name).await.unwrap();
        writer.append(name.as_bytes()).await.unwrap();
        keys.push(writer.key());
    }
    let dir = tempfile::tempdir().unwrap();
    let m = open_dir(dir.path()).await;
    let feeds_dir = dir.path().join("feeds");
    let obstacle = feeds_dir.join(keys[2].to_hex());
    std::fs::write(&obstacle, b"not a feed directory").unwrap();

    let (_, ours) = sync_pair(&source, &m).await;
    let error = ours.expect_err("creating w3 fails");
    assert!(matches!(error, multifeed::Error::Io { .. }), "{error:?}");
    assert!(
        m.feeds().is_empty(),
        "no feed of the failed batch is a member"
    );
    let left: Vec<_> = std::fs::read_dir(&feeds_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(left, vec![obstacle.clone()], "only the obstacle is left");

    std::fs::remove_file(&obstacle).unwrap();
    let (theirs, ours) = sync_pair(&source, &m).await;
    theirs.unwrap();
    assert_eq!(ours.unwrap().feeds_learnt, 3);
    for key in keys {
        assert_eq!(m.feed(key).unwrap().len().await, 1);
    }
}

/// A half-open link: after the peers synced, the link silently stops carrying
/// anything (both ends stay open, as when a cable is pulled or a NAT forgets the
/// flow). The live session ends with `IdleTimeout` once its idle timeout passed
/// with nothing received, on a virtual clock: exactly then, never before.
#[tokio::test(start_paused = true)]
async fn a_half_open_link_ends_a_live_session_at_the_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = open_memory().await;
    let b = open_memory().await;
    let w = a.writer("w").await.unwrap();
    w.append(b"x").await.unwrap();
    let (a_io, a_link) = tokio::io::duplex(64 * 1024);
    let (b_io, b_link) = tokio::io::duplex(64 * 1024);
    let (cut_tx, cut) = tokio::sync::watch::channel(false);
    // Carries bytes one way until cut; then holds both ends open, silent.
    async fn forward(
        mut from: tokio::io::ReadHalf<tokio::io::DuplexStream>,
        mut to: tokio::io::WriteHalf<tokio::io::DuplexStream>,
        mut cut: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            tokio::select! {
                n = from.read(&mut buf) => match n {
                    Ok(0) | Err(_) => return,
                    Ok(n) => if to.write_all(&buf[..n]).await.is_err() { return },
                },
                _ = cut.changed() => break,
            }
        }
        // Both ends stay open (owned here), and nothing moves any more.
        std::future::pending::<()>().await;
        drop((from, to));
    }
    let (ar, aw) = tokio::io::split(a_link);
    let (br, bw) = tokio::io::split(b_link);
    let link = tokio::spawn(async move {
        tokio::join!(forward(ar, bw, cut.clone()), forward(br, aw, cut));
    });
    let idle = Duration::from_secs(30);
    let ra = a.start_replication(
        a_io,
        ReplicateOptions::new(true).live(true).idle_timeout(idle),
    );
    let rb = b.start_replication(
        b_io,
        ReplicateOptions::new(false).live(true).idle_timeout(idle),
    );
    wait_for_len(&b, w.key(), 1).await;
    let cut_at = tokio::time::Instant::now();
    cut_tx.send(true).unwrap();
    let result = ra.finish().await;
    let after = cut_at.elapsed();
    assert!(
        matches!(result, Err(Error::IdleTimeout { .. })),
        "{result:?}"
    );
    // Checked at keep-alive ticks (a third of the timeout): between 1 and 4/3 of it.
    assert!(
        after >= idle && after <= idle + idle / 3,
        "ended {after:?} after the cut"
    );
    assert!(matches!(rb.finish().await, Err(Error::IdleTimeout { .. })));
    link.abort();
}
