//! Topics over real multifeeds: publish, merged reads, cursors across replication
//! and live follow.

mod common;

use std::time::Duration;

use common::{open_dir, open_memory, sync_pair};
use futures::{Stream, StreamExt};
use multifeed::{
    Error, Multifeed, Options, ReplicateOptions, Result, SharedKey, StorageConfig, Topics,
    topics::{Cursor, Message, Packing, ReceivedMessage},
};

fn payloads(messages: &[ReceivedMessage]) -> Vec<String> {
    messages
        .iter()
        .map(|m| String::from_utf8(m.message.payload.clone()).unwrap())
        .collect()
}

fn at(topic: &str, ts: u64, payload: &str) -> Message {
    Message::new(topic, payload).with_timestamp_ms(ts)
}

/// The next item of a follow stream, or a panic after a few seconds: never a hang.
async fn next_message(
    stream: &mut (impl Stream<Item = Result<ReceivedMessage>> + Unpin),
) -> ReceivedMessage {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("timed out waiting for a followed message")
        .expect("follow stream ended")
        .expect("follow stream failed")
}

#[tokio::test]
async fn publish_read_and_resume_from_the_cursor_text() {
    let topics = Topics::new(open_memory().await);
    let first = topics
        .publish(at("alerts", 30, "c").with_content_type("text/plain"))
        .await
        .unwrap();
    assert_eq!((first.seq, first.index), (0, 0));
    topics
        .publish_batch([at("alerts", 10, "a"), at("alerts", 20, "b")])
        .await
        .unwrap();
    topics.publish(at("other", 5, "x")).await.unwrap();
    assert_eq!(topics.topics().await.unwrap(), ["alerts", "other"]);

    let (page, cursor) = topics.read("alerts", &Cursor::default(), 2).await.unwrap();
    // One writer: its own order (c was written first), not re-sorted.
    assert_eq!(payloads(&page), ["c", "a"]);
    assert_eq!(page[0].message.content_type.as_deref(), Some("text/plain"));
    assert_eq!(page[0].message.topic, "alerts");
    assert_eq!(page[0].address, first);
    let saved = cursor.to_string();

    topics.publish(at("alerts", 40, "d")).await.unwrap();
    let (rest, cursor) = topics
        .read("alerts", &saved.parse().unwrap(), 100)
        .await
        .unwrap();
    assert_eq!(payloads(&rest), ["b", "d"]);
    let (none, same) = topics.read("alerts", &cursor, 100).await.unwrap();
    assert!(none.is_empty());
    assert_eq!(same, cursor);
    // A topic nobody wrote is simply empty.
    let (none, _) = topics
        .read("nobody", &Cursor::default(), 100)
        .await
        .unwrap();
    assert!(none.is_empty());
}

#[tokio::test]
async fn packed_messages_keep_their_own_addresses() {
    let topics = Topics::new(open_memory().await);
    let addresses = topics
        .publish_batch_with(
            (0..10).map(|i| at("t", i, &format!("m{i}"))),
            Packing::max_messages(4),
        )
        .await
        .unwrap();
    let spots: Vec<_> = addresses.iter().map(|a| (a.seq, a.index)).collect();
    assert_eq!(
        spots,
        [
            (0, 0),
            (0, 1),
            (0, 2),
            (0, 3),
            (1, 0),
            (1, 1),
            (1, 2),
            (1, 3),
            (2, 0),
            (2, 1)
        ]
    );
    let writer = topics.group().writer("topic/t").await.unwrap();
    assert_eq!(writer.len().await, 3);
    // Reading in small pages, resuming mid-block, yields each message once.
    let mut cursor = Cursor::default();
    let mut read = Vec::new();
    loop {
        let (page, next) = topics.read("t", &cursor, 3).await.unwrap();
        if page.is_empty() {
            break;
        }
        read.extend(page);
        cursor = next.to_string().parse().unwrap();
    }
    assert_eq!(
        read.iter().map(|m| m.address).collect::<Vec<_>>(),
        addresses
    );
}

#[tokio::test]
async fn gateways_merge_by_timestamp_and_late_older_messages_are_read_exactly_once() {
    let gateway_a = Topics::new(open_memory().await);
    let gateway_c = Topics::new(open_memory().await);
    let reader = Topics::new(open_memory().await);
    gateway_a
        .publish_batch([at("t", 100, "a100"), at("t", 300, "a300")])
        .await
        .unwrap();
    gateway_c.publish(at("t", 200, "c200")).await.unwrap();
    let (ra, rb) = sync_pair(gateway_a.group(), reader.group()).await;
    ra.unwrap();
    rb.unwrap();
    let (ra, rb) = sync_pair(gateway_c.group(), reader.group()).await;
    ra.unwrap();
    rb.unwrap();

    let (first, cursor) = reader.read("t", &Cursor::default(), 100).await.unwrap();
    assert_eq!(payloads(&first), ["a100", "c200", "a300"]);
    let saved = cursor.to_string();

    // Later, older messages: a clock-skewed gateway and a new gateway.
    gateway_a.publish(at("t", 50, "a50")).await.unwrap();
    gateway_c.publish(at("t", 150, "c150")).await.unwrap();
    let gateway_d = Topics::new(open_memory().await);
    gateway_d.publish(at("t", 10, "d10")).await.unwrap();
    for gateway in [&gateway_a, &gateway_c, &gateway_d] {
        let (ra, rb) = sync_pair(gateway.group(), reader.group()).await;
        ra.unwrap();
        rb.unwrap();
    }
    // The reader's own publishes count too.
    reader.publish(at("t", 20, "r20")).await.unwrap();

    let (second, cursor) = reader
        .read("t", &saved.parse().unwrap(), 100)
        .await
        .unwrap();
    assert_eq!(payloads(&second), ["d10", "r20", "a50", "c150"]);
    let (none, _) = reader.read("t", &cursor, 100).await.unwrap();
    assert!(none.is_empty(), "{:?}", payloads(&none));
}

#[tokio::test]
async fn feeds_that_are_not_topic_feeds_are_ignored() {
    let topics = Topics::new(open_memory().await);
    let raw = topics.group().writer("temperature").await.unwrap();
    raw.append(b"21.5").await.unwrap();
    raw.append(b"").await.unwrap();
    topics.group().writer("empty").await.unwrap();
    topics.publish(at("t", 1, "m")).await.unwrap();
    assert_eq!(topics.topics().await.unwrap(), ["t"]);
    let (all, _) = topics.read("t", &Cursor::default(), 100).await.unwrap();
    assert_eq!(payloads(&all), ["m"]);
}

#[tokio::test]
async fn invalid_topics_batches_and_cursors_are_typed_errors() {
    let topics = Topics::new(open_memory().await);
    for topic in ["", "a\nb", &"x".repeat(201)] {
        assert!(matches!(
            topics.publish(Message::new(topic, "m")).await,
            Err(Error::InvalidTopic { .. })
        ));
        assert!(matches!(
            topics.read(topic, &Cursor::default(), 1).await,
            Err(Error::InvalidTopic { .. })
        ));
    }
    let mixed = topics
        .publish_batch([Message::new("a", "1"), Message::new("b", "2")])
        .await;
    assert!(matches!(mixed, Err(Error::InvalidTopic { .. })));
    assert!(
        topics.topics().await.unwrap().is_empty(),
        "nothing published"
    );
    assert!(topics.publish_batch([]).await.unwrap().is_empty());
    let bad = "v1.not*base64".parse::<Cursor>().unwrap_err();
    assert!(matches!(bad, Error::InvalidCursor { .. }));
    assert!(bad.to_string().contains("Cursor::default()"), "{bad}");
}

#[tokio::test]
async fn a_saved_cursor_resumes_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let saved = {
        let topics = Topics::new(open_dir(dir.path()).await);
        topics
            .publish_batch((0..5).map(|i| at("t", i, &format!("m{i}"))))
            .await
            .unwrap();
        let (page, cursor) = topics.read("t", &Cursor::default(), 3).await.unwrap();
        assert_eq!(payloads(&page), ["m0", "m1", "m2"]);
        topics.group().close().await.unwrap();
        cursor.to_string()
    };
    let topics = Topics::new(open_dir(dir.path()).await);
    topics.publish(at("t", 9, "m9")).await.unwrap();
    let (rest, _) = topics
        .read("t", &saved.parse().unwrap(), 100)
        .await
        .unwrap();
    assert_eq!(payloads(&rest), ["m3", "m4", "m9"]);
}

#[tokio::test]
async fn follow_yields_backlog_then_local_publishes_and_a_kept_cursor_resumes() {
    let topics = Topics::new(open_memory().await);
    topics.publish(at("t", 1, "old")).await.unwrap();
    let mut stream = topics.follow("t", Cursor::default());
    let mut kept = Cursor::default();
    let first = next_message(&mut stream).await;
    assert_eq!(first.message.payload, b"old");
    kept.advance(&first.address);

    let publisher = topics.clone();
    let publish = tokio::spawn(async move {
        publisher
            .publish_batch([at("t", 2, "new1"), at("t", 3, "new2")])
            .await
            .unwrap();
    });
    let second = next_message(&mut stream).await;
    kept.advance(&second.address);
    assert_eq!(second.message.payload, b"new1");
    publish.await.unwrap();
    drop(stream);

    // Resuming from the kept cursor picks up exactly where the consumer stopped.
    let mut resumed = topics.follow("t", kept.to_string().parse().unwrap());
    assert_eq!(next_message(&mut resumed).await.message.payload, b"new2");
    topics.publish(at("t", 4, "new3")).await.unwrap();
    assert_eq!(next_message(&mut resumed).await.message.payload, b"new3");
}

#[tokio::test]
async fn follow_sees_messages_published_on_another_multifeed_over_live_replication() {
    let a = Topics::new(open_memory().await);
    let b = Topics::new(open_memory().await);
    // b follows before a has even created its topic writer: a new feed must wake it.
    let mut stream = b.follow("t", Cursor::default());
    let (x, y) = tokio::io::duplex(64 * 1024);
    let ra = a
        .group()
        .start_replication(x, ReplicateOptions::new(true).live(true));
    let rb = b
        .group()
        .start_replication(y, ReplicateOptions::new(false).live(true));

    let sent = a.publish(at("t", 100, "first")).await.unwrap();
    let got = next_message(&mut stream).await;
    assert_eq!(got.message.payload, b"first");
    assert_eq!(got.address, sent);

    // A later, older message on the same feed arrives by replication too.
    a.publish(at("t", 50, "second")).await.unwrap();
    assert_eq!(next_message(&mut stream).await.message.payload, b"second");
    // So does another topic's message: it is not delivered to this follower.
    a.publish(at("other", 1, "elsewhere")).await.unwrap();
    a.publish(at("t", 200, "third")).await.unwrap();
    assert_eq!(next_message(&mut stream).await.message.payload, b"third");

    ra.stop();
    rb.stop();
    ra.finish().await.unwrap();
    let _ = rb.finish().await;
}

#[tokio::test]
async fn follow_of_an_invalid_topic_yields_one_error() {
    let topics = Topics::new(open_memory().await);
    let mut stream = topics.follow("", Cursor::default());
    assert!(matches!(
        stream.next().await,
        Some(Err(Error::InvalidTopic { .. }))
    ));
    assert!(stream.next().await.is_none());
}

/// A cursor from another topic or another group is refused with a clear error
/// instead of silently re-reading everything; its own topic resumes from it.
#[tokio::test]
async fn a_cursor_from_another_topic_or_group_is_refused() {
    let topics = Topics::new(open_memory().await);
    topics.publish(Message::new("t", "1")).await.unwrap();
    topics.publish(Message::new("u", "2")).await.unwrap();
    let (_, cursor) = topics.read("t", &Cursor::default(), 10).await.unwrap();
    let text = cursor.to_string();
    let cursor: Cursor = text.parse().unwrap();
    let refused = topics.read("u", &cursor, 10).await.unwrap_err();
    assert!(matches!(refused, Error::InvalidCursor { .. }), "{refused}");
    assert!(refused.to_string().contains("another topic"), "{refused}");
    let other_group = Topics::new(
        Multifeed::open(
            StorageConfig::Memory,
            SharedKey::from_bytes([0x77; 32]),
            Options::default(),
        )
        .await
        .unwrap(),
    );
    other_group.publish(Message::new("t", "x")).await.unwrap();
    assert!(matches!(
        other_group.read("t", &cursor, 10).await,
        Err(Error::InvalidCursor { .. })
    ));
    let (rest, _) = topics.read("t", &cursor, 10).await.unwrap();
    assert!(rest.is_empty());
}

/// Gateways publishing batches of `sizes` each (one block per batch), synced
/// into one reader; returns the reader and each gateway's payloads in order.
async fn gateways_with_batches(layout: &[Vec<usize>]) -> (Topics, Vec<Vec<String>>) {
    let reader = Topics::new(open_memory().await);
    let mut written = Vec::new();
    for (g, batches) in layout.iter().enumerate() {
        let gateway = Topics::new(open_memory().await);
        let mut payloads = Vec::new();
        for (b, &size) in batches.iter().enumerate() {
            let batch: Vec<Message> = (0..size)
                .map(|i| {
                    let payload = format!("g{g}-b{b}-m{i}");
                    payloads.push(payload.clone());
                    at("t", (b * 10 + i) as u64, &payload)
                })
                .collect();
            gateway.publish_batch(batch).await.unwrap();
        }
        let (ra, rb) = sync_pair(gateway.group(), reader.group()).await;
        ra.unwrap();
        rb.unwrap();
        written.push(payloads);
    }
    (reader, written)
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

    /// A read from the tail cursor returns exactly the last `n` messages of every
    /// feed, whatever the batch layout, and nothing after them.
    #[test]
    fn the_tail_cursor_reads_the_last_messages_of_every_feed(
        layout in proptest::collection::vec(proptest::collection::vec(1usize..5, 1..6), 1..4),
        n in 0usize..14,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let (reader, written) = gateways_with_batches(&layout).await;
            let cursor = reader.tail_cursor("t", n).await.unwrap();
            let (read, next) = reader.read("t", &cursor, usize::MAX).await.unwrap();
            let mut got = payloads(&read);
            got.sort();
            let mut want: Vec<String> = written
                .iter()
                .flat_map(|p| p[p.len().saturating_sub(n)..].to_vec())
                .collect();
            want.sort();
            assert_eq!(got, want);
            let (none, _) = reader.read("t", &next, usize::MAX).await.unwrap();
            assert!(none.is_empty());
        });
    }
}

#[tokio::test]
async fn following_from_the_end_yields_only_what_comes_next() {
    let (reader, _) = gateways_with_batches(&[vec![3, 2], vec![4]]).await;
    let end = reader.tail_cursor("t", 0).await.unwrap();
    // Its text works like any cursor's, and stays in its topic.
    let end: Cursor = end.to_string().parse().unwrap();
    assert!(reader.read("other", &end, 10).await.is_err());
    let mut follow = reader.follow("t", end);
    reader.publish(at("t", 1, "new")).await.unwrap();
    assert_eq!(payloads(&[next_message(&mut follow).await]), ["new"]);
}
