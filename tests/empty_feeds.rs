//! Live sessions with a peer that holds many empty feeds (a writer per topic
//! created before anything was written): the empty feeds must not take the places
//! of feeds on trial, so everything the peer writes later still arrives.

mod common;

use common::*;
use multifeed::{Multifeed, ReplicateOptions};
use tokio::net::{TcpListener, TcpStream};

/// Empty writers on the serving side: more than the default per-session cap of
/// feeds on trial (256).
const EMPTY: usize = 300;

/// A live session between `a` (initiator) and `b` over TCP on 127.0.0.1.
async fn live_pair(
    a: &Multifeed,
    b: &Multifeed,
) -> (multifeed::Replication, multifeed::Replication) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (dialed, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let ra = a.start_replication(dialed.unwrap(), ReplicateOptions::new(true).live(true));
    let rb = b.start_replication(accepted.unwrap().0, ReplicateOptions::new(false).live(true));
    (ra, rb)
}

fn feed_dirs(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("feeds"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

/// A holds 300 empty writers, then five with data (offered after the empty ones);
/// B starts empty. Live both ways, B gets the five; then A writes to empty
/// writers (first, middle, last) and adds a new one: B gets those too. Empty
/// feeds leave no trace in B's store and none stays on trial. Before the fix the
/// first 256 empty feeds stayed on trial for the whole session and the rest
/// waited for a place forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_peer_with_hundreds_of_empty_feeds_still_delivers_everything() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = open_dir(dir_a.path()).await;
    let b = open_dir(dir_b.path()).await;
    let mut empty = Vec::new();
    for i in 0..EMPTY {
        empty.push(a.writer(&format!("topic-{i}")).await.unwrap());
    }
    let mut full = Vec::new();
    for i in 0..5 {
        let writer = a.writer(&format!("full-{i}")).await.unwrap();
        writer
            .append(format!("entry {i}").as_bytes())
            .await
            .unwrap();
        full.push(writer);
    }
    let (ra, rb) = live_pair(&a, &b).await;
    for writer in &full {
        wait_for_len(&b, writer.key(), 1).await;
    }
    for i in [0, EMPTY / 2, EMPTY - 1] {
        empty[i]
            .append(format!("late {i}").as_bytes())
            .await
            .unwrap();
    }
    let late = a.writer("late").await.unwrap();
    late.append(b"late writer").await.unwrap();
    for i in [0, EMPTY / 2, EMPTY - 1] {
        let copy = wait_for_len(&b, empty[i].key(), 1).await;
        assert_eq!(
            copy.get(0).await.unwrap(),
            Some(format!("late {i}").into_bytes())
        );
    }
    wait_for_len(&b, late.key(), 1).await;
    // A second append to a feed that started empty flows on its live channel.
    empty[EMPTY - 1].append(b"again").await.unwrap();
    wait_for_len(&b, empty[EMPTY - 1].key(), 2).await;
    // Only feeds with data are members of B, and only they have files there.
    assert_eq!(b.feeds().len(), 5 + 3 + 1);
    assert_eq!(b.admission_stats().unproven, 0);
    assert_eq!(feed_dirs(dir_b.path()), 5 + 3 + 1);
    ra.stop();
    rb.stop();
    ra.finish().await.unwrap();
    let _ = rb.finish().await;
}
