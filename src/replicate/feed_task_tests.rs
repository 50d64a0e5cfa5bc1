//! Malicious-peer tests: a hand-driven remote serves real proofs from the writer but
//! tampers with them; the receiver's `run_feed` must reject them without corrupting its core.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hypercore::{Hypercore, HypercoreBuilder, PartialKeypair, Storage};
use hypercore_protocol::schema::{Data, Range, Synchronize};
use hypercore_protocol::{Channel, Event, Message, Protocol};
use tokio::sync::mpsc;
use tokio::time::timeout;

use super::{FeedSyncError, FeedSyncOptions, FeedSyncSummary, run_feed};
use crate::feed::SharedFeed;
use crate::keys::FeedKey;
use crate::replicate::feed_sync::ProtocolViolation;
use crate::replicate::transport::{TransportLimits, protocol};

const T: Duration = Duration::from_secs(30);

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    timeout(T, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// A connected, handshaken Protocol pair over an in-memory duplex.
async fn protocol_pair() -> (Protocol, Protocol) {
    let (a, b) = tokio::io::duplex(1 << 20);
    let (pa, pb) = within("handshake", async {
        tokio::join!(
            protocol(a, true, TransportLimits::default()),
            protocol(b, false, TransportLimits::default()),
        )
    })
    .await;
    (pa.expect("initiator").0, pb.expect("responder").0)
}

/// Drive a protocol forever, opening `key` and handing out its channel.
fn drive(mut proto: Protocol, key: [u8; 32], initiator: bool) -> mpsc::Receiver<Channel> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        if initiator {
            let _ = proto.open(key).await;
        }
        while let Some(ev) = proto.next().await {
            match ev {
                Ok(Event::DiscoveryKey(_)) if !initiator => {
                    let _ = proto.open(key).await;
                }
                Ok(Event::Channel(c)) => {
                    let _ = tx.send(c).await;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    rx
}

/// A connected channel pair for `key`.
async fn channel_pair(key: [u8; 32]) -> (Channel, Channel) {
    let (a, b) = protocol_pair().await;
    let mut ra = drive(a, key, true);
    let mut rb = drive(b, key, false);
    let ca = within("channel a", ra.recv()).await.expect("channel a");
    let cb = within("channel b", rb.recv()).await.expect("channel b");
    (ca, cb)
}

async fn shared(core: Hypercore) -> Arc<SharedFeed> {
    let key = FeedKey::from_bytes(key_of(&core));
    SharedFeed::new(key, false, core, None).await
}

async fn writer() -> Hypercore {
    HypercoreBuilder::new(Storage::new_memory().await.expect("storage"))
        .build()
        .await
        .expect("core")
}

async fn reader_of(w: &Hypercore) -> Hypercore {
    HypercoreBuilder::new(Storage::new_memory().await.expect("storage"))
        .key_pair(PartialKeypair {
            public: w.key_pair().public,
            secret: None,
        })
        .build()
        .await
        .expect("core")
}

fn key_of(c: &Hypercore) -> [u8; 32] {
    c.key_pair().public.to_bytes()
}

fn entry(i: u64) -> Vec<u8> {
    format!("entry-{i:06}-{}", "x".repeat(80)).into_bytes()
}

async fn append_n(feed: &Arc<SharedFeed>, from: u64, n: u64) {
    let mut core = feed.core().await.expect("core");
    let batch: Vec<Vec<u8>> = (from..from + n).map(entry).collect();
    let out = core.append_batch(&batch).await.expect("append");
    drop(core);
    feed.changed.send_replace(out.length);
}

#[derive(Clone, Copy)]
enum Evil {
    /// Flip a byte in every block value.
    FlipAll,
    /// Honest for Data carrying an upgrade, flip plain block Data.
    FlipPlainBlocks,
    /// Answer the first request with Data for a request id never sent.
    UnknownId,
}

async fn evil_peer(mut ch: Channel, writer: Arc<SharedFeed>, evil: Evil) {
    let rx = ch.take_receiver().expect("rx");
    let len = writer.core().await.expect("core").info().length;
    let _ = ch
        .send_batch(&[
            // Range before Sync so the receiver knows the haves when it plans the upgrade.
            Message::Range(Range {
                drop: false,
                start: 0,
                length: len,
            }),
            Message::Synchronize(Synchronize {
                fork: 0,
                length: len,
                remote_length: 0,
                can_upgrade: true,
                uploading: true,
                downloading: true,
            }),
        ])
        .await;
    while let Ok(msg) = rx.recv().await {
        let Message::Request(r) = msg else { continue };
        let proof = writer
            .core()
            .await
            .expect("core")
            .create_proof(r.block, r.hash, r.seek, r.upgrade)
            .await
            .expect("proof")
            .expect("has block");
        let mut d = Data {
            request: r.id,
            fork: proof.fork,
            block: proof.block,
            hash: proof.hash,
            seek: proof.seek,
            upgrade: proof.upgrade,
        };
        match evil {
            Evil::FlipAll => flip(&mut d),
            Evil::FlipPlainBlocks if d.upgrade.is_none() => flip(&mut d),
            Evil::FlipPlainBlocks => {}
            Evil::UnknownId => d.request = 999_999,
        }
        if ch.send(Message::Data(d)).await.is_err() {
            return;
        }
    }
}

fn flip(d: &mut Data) {
    if let Some(x) = d.block.as_mut().and_then(|b| b.value.get_mut(3)) {
        *x ^= 0x01;
    }
}

/// B holds 10 honest blocks; A then has 20; an evil peer serves A's proofs.
async fn setup() -> (Arc<SharedFeed>, Arc<SharedFeed>, [u8; 32]) {
    let w = writer().await;
    let key = key_of(&w);
    let r = reader_of(&w).await;
    let (a, b) = (shared(w).await, shared(r).await);
    append_n(&a, 0, 10).await;
    let (ca, cb) = channel_pair(key).await;
    let opts = FeedSyncOptions::default();
    let ta = tokio::spawn(run_feed(ca, a.clone(), opts.clone(), None, None));
    let sb = within("honest sync", run_feed(cb, b.clone(), opts, None, None))
        .await
        .expect("honest sync");
    assert_eq!(sb.blocks_received, 10);
    let _ = timeout(T, ta).await;
    append_n(&a, 10, 10).await;
    (a, b, key)
}

async fn run_against(
    evil: Evil,
) -> (
    Result<FeedSyncSummary, FeedSyncError>,
    Arc<SharedFeed>,
    Arc<SharedFeed>,
) {
    let (a, b, key) = setup().await;
    let (cm, cb) = channel_pair(key).await;
    let m = tokio::spawn(evil_peer(cm, a.clone(), evil));
    let res = within(
        "receiver must fail, not hang",
        run_feed(cb, b.clone(), FeedSyncOptions::default(), None, None),
    )
    .await;
    m.abort();
    (res, a, b)
}

async fn assert_held_blocks_intact(a: &Arc<SharedFeed>, b: &Arc<SharedFeed>) {
    let mut a = a.core().await.expect("core");
    let mut b = b.core().await.expect("core");
    for i in 0..b.info().length {
        if b.has(i) {
            assert_eq!(
                b.get(i).await.expect("get"),
                a.get(i).await.expect("get"),
                "block {i}"
            );
        }
    }
    for i in 0..b.info().contiguous_length {
        assert!(b.get(i).await.expect("get").is_some(), "block {i} readable");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_upgrade_block_is_rejected_core_unchanged() {
    let (res, a, b) = run_against(Evil::FlipAll).await;
    match res {
        Err(FeedSyncError::InvalidData { index, .. }) => assert_eq!(index, Some(10)),
        other => panic!("expected InvalidData, got {other:?}"),
    }
    let info = b.core().await.expect("core").info();
    assert_eq!((info.length, info.contiguous_length), (10, 10));
    assert!(!b.core().await.expect("core").has(10));
    assert_held_blocks_intact(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_plain_block_is_rejected_verified_part_kept() {
    let (res, a, b) = run_against(Evil::FlipPlainBlocks).await;
    let Err(FeedSyncError::InvalidData { index: Some(i), .. }) = res else {
        panic!("expected InvalidData, got {res:?}");
    };
    // 10 if the upgrade went alone (Range not yet seen), else 11.
    assert!(i >= 10);
    let info = b.core().await.expect("core").info();
    // The honest, signed upgrade was kept; the tampered block was not.
    assert_eq!(info.length, 20);
    assert_eq!(info.contiguous_length, i);
    assert!(!b.core().await.expect("core").has(i));
    assert_held_blocks_intact(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrequested_data_is_a_protocol_error() {
    let (res, a, b) = run_against(Evil::UnknownId).await;
    assert!(
        matches!(
            res,
            Err(FeedSyncError::Protocol(
                ProtocolViolation::UnrequestedData { request: 999_999 }
            ))
        ),
        "{res:?}"
    );
    assert_eq!(b.core().await.expect("core").info().length, 10);
    assert_held_blocks_intact(&a, &b).await;
}
