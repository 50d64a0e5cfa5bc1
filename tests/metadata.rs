//! Feed metadata (the gateway name a feed carries): offered in manifests, passed
//! on by every holder, kept across reopens, bounded, never overriding our own.

mod common;

use common::*;
use multifeed::{FeedMetadata, Multifeed, Options, StorageConfig};

fn gateway(name: &str) -> FeedMetadata {
    [("gateway".to_string(), name.to_string())].into()
}

async fn open_named(dir: &std::path::Path, name: &str) -> Multifeed {
    Multifeed::open(
        StorageConfig::dir(dir),
        shared_key(),
        Options::default().writer_metadata(gateway(name)),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn a_gateway_name_travels_through_a_relay_and_survives_reopen() {
    let root = tempfile::tempdir().unwrap();
    let (da, db, dc) = (
        root.path().join("a"),
        root.path().join("b"),
        root.path().join("c"),
    );
    let a = open_named(&da, "site-a").await;
    let b = open_named(&db, "site-b").await;
    let c = open_named(&dc, "site-c").await;
    let a_feed = a.writer("t").await.unwrap();
    a_feed.append(b"1").await.unwrap();
    let b_feed = b.writer("t").await.unwrap();
    b_feed.append(b"2").await.unwrap();
    // Rounds over stores that already hold data: a<->b, then b<->c (a relayed by b).
    for _ in 0..2 {
        let (x, y) = sync_pair(&a, &b).await;
        x.unwrap();
        y.unwrap();
        let (x, y) = sync_pair(&c, &b).await;
        x.unwrap();
        y.unwrap();
    }
    assert_eq!(a_feed.metadata(), &gateway("site-a"));
    for (group, label) in [(&b, "b"), (&c, "c")] {
        let learnt = group.feed(a_feed.key()).unwrap();
        assert_eq!(learnt.metadata(), &gateway("site-a"), "{label}");
    }
    assert_eq!(c.feed(b_feed.key()).unwrap().metadata(), &gateway("site-b"));
    c.close().await.unwrap();

    // Reopened, c still knows who writes what, even renamed itself.
    let c = open_named(&dc, "renamed").await;
    assert_eq!(c.feed(a_feed.key()).unwrap().metadata(), &gateway("site-a"));
    assert_eq!(c.feed(b_feed.key()).unwrap().metadata(), &gateway("site-b"));
    assert_eq!(c.writers().len(), 0);
    // Our own writers carry what we say now.
    let own = c.writer("t").await.unwrap();
    assert_eq!(own.metadata(), &gateway("renamed"));
    for g in [a, b, c] {
        g.close().await.unwrap();
    }
}

#[tokio::test]
async fn a_peer_cannot_relabel_our_writers_or_a_feed_already_labelled() {
    let root = tempfile::tempdir().unwrap();
    let a = open_named(&root.path().join("a"), "site-a").await;
    let b = open_named(&root.path().join("b"), "site-b").await;
    let a_feed = a.writer("t").await.unwrap();
    a_feed.append(b"1").await.unwrap();
    let (x, y) = sync_pair(&a, &b).await;
    x.unwrap();
    y.unwrap();
    // b reopens under another name for a's feed: a new Options can't relabel what
    // b learnt, and a keeps its own label whatever b says.
    b.close().await.unwrap();
    let b = open_named(&root.path().join("b"), "liar").await;
    let (x, y) = sync_pair(&a, &b).await;
    x.unwrap();
    y.unwrap();
    assert_eq!(b.feed(a_feed.key()).unwrap().metadata(), &gateway("site-a"));
    assert_eq!(a_feed.metadata(), &gateway("site-a"));
    a.close().await.unwrap();
    b.close().await.unwrap();
}
