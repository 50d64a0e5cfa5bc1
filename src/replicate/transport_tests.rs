use std::future::Future;
use std::io;
use std::time::Duration;

use super::{Inspected, TransportFault, TransportLimits, TransportStatus, inspect_frame, protocol};
use crate::replicate::frame_check::FrameFault;
use futures::{SinkExt, StreamExt, TryStreamExt, future};
use hypercore_handshake::{Cipher, HandshakePattern};
use hypercore_protocol::schema::Extension;
use hypercore_protocol::{Channel, CommandTx, Event, Message, Protocol};
use rand::RngCore;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

const T: Duration = Duration::from_secs(20);

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    timeout(T, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// One side of a connection: the protocol runs in its own task and reports channels / its end.
struct Side {
    commands: CommandTx,
    status: TransportStatus,
    channels: mpsc::UnboundedReceiver<Channel>,
    task: JoinHandle<io::Result<()>>,
}

async fn start<S>(io: S, initiator: bool) -> Side
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (proto, status) = within(
        "handshake",
        protocol(io, initiator, TransportLimits::default()),
    )
    .await
    .unwrap();
    drive(proto, status)
}

fn drive(mut proto: Protocol, status: TransportStatus) -> Side {
    let commands = proto.commands();
    let (tx, channels) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Some(event) = proto.next().await {
            if let Event::Channel(channel) = event? {
                let _ = tx.send(channel);
            }
        }
        Ok(())
    });
    Side {
        commands,
        status,
        channels,
        task,
    }
}

impl Side {
    async fn channel(&mut self) -> Channel {
        match within("channel", self.channels.recv()).await {
            Some(c) => c,
            None => {
                let end = within("task end", &mut self.task).await;
                panic!(
                    "protocol ended before channel: {end:?}, fault {:?}",
                    self.status.fault()
                )
            }
        }
    }
}

async fn duplex_pair() -> (Side, Side) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    tokio::join!(start(a, true), start(b, false))
}

async fn tcp_pair() -> (Side, Side) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
    tokio::join!(start(a.unwrap(), true), start(b.unwrap().0, false))
}

fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    key
}

fn extension(payload: Vec<u8>) -> Message {
    Message::Extension(Extension {
        name: "multifeed/test".into(),
        message: payload,
    })
}

async fn next_extension(channel: &mut Channel) -> Vec<u8> {
    loop {
        match within("extension message", channel.next()).await {
            Some(Message::Extension(ext)) => {
                assert_eq!(ext.name, "multifeed/test");
                return ext.message;
            }
            Some(_) => continue,
            None => panic!("channel ended before the extension arrived"),
        }
    }
}

async fn open_and_exchange(a: &mut Side, b: &mut Side) {
    let key = random_key();
    within("open a", a.commands.open(key)).await.unwrap();
    within("open b", b.commands.open(key)).await.unwrap();
    let mut ca = a.channel().await;
    let mut cb = b.channel().await;
    assert_eq!(ca.discovery_key(), cb.discovery_key());

    let big: Vec<u8> = (0..1024 * 1024 + 17).map(|i| (i % 251) as u8).collect();
    let small = b"0123456789".to_vec();
    for payload in [big, small] {
        within("send a", ca.send(extension(payload.clone())))
            .await
            .unwrap();
        assert_eq!(next_extension(&mut cb).await, payload);
        within("send b", cb.send(extension(payload.clone())))
            .await
            .unwrap();
        assert_eq!(next_extension(&mut ca).await, payload);
    }
    assert!(!a.status.is_closed() && !b.status.is_closed());
}

#[tokio::test]
async fn duplex_handshake_channel_and_large_extension() {
    let (mut a, mut b) = duplex_pair().await;
    open_and_exchange(&mut a, &mut b).await;
}

#[tokio::test]
async fn tcp_handshake_channel_and_large_extension() {
    let (mut a, mut b) = tcp_pair().await;
    open_and_exchange(&mut a, &mut b).await;
}

/// Upstream encodes queued messages of many channels as one batch with channel switches,
/// which its own decoder misreads (defect 1); the transport splits such batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_channels_on_one_connection() {
    const N: usize = 300;
    let (mut a, mut b) = tcp_pair().await;
    let keys: Vec<[u8; 32]> = (0..N).map(|_| random_key()).collect();
    for key in &keys {
        within("open a", a.commands.open(*key)).await.unwrap();
        within("open b", b.commands.open(*key)).await.unwrap();
    }
    let mut chans_a = Vec::new();
    let mut chans_b = Vec::new();
    for _ in 0..N {
        chans_a.push(a.channel().await);
        chans_b.push(b.channel().await);
    }
    // Send on every channel before reading anything, so the protocol batches across channels.
    for c in chans_a.iter().chain(chans_b.iter()) {
        let payload = c.discovery_key().to_vec();
        within("send", c.send(extension(payload))).await.unwrap();
    }
    for c in chans_a.iter_mut().chain(chans_b.iter_mut()) {
        let dk = c.discovery_key().to_vec();
        assert_eq!(next_extension(c).await, dk);
    }
    assert_eq!(a.status.fault(), None);
    assert_eq!(b.status.fault(), None);
}

fn assert_peer_gone(fault: Option<TransportFault>) {
    match fault {
        Some(TransportFault::Eof | TransportFault::Io(_)) => {}
        other => panic!("expected Eof/Io, got {other:?}"),
    }
}

#[tokio::test]
async fn killing_tcp_peer_closes_status_and_errors_protocol() {
    let (mut a, mut b) = tcp_pair().await;
    open_and_exchange(&mut a, &mut b).await;
    b.task.abort(); // drops b's Protocol and its TcpStream
    within("status closed", a.status.closed()).await;
    assert!(a.status.is_closed());
    assert_peer_gone(a.status.fault());
    let ended = within("protocol error", a.task).await.unwrap();
    assert!(
        ended.is_err(),
        "protocol must surface the dead peer as an error"
    );
}

#[tokio::test]
async fn peer_gone_during_handshake_is_an_error() {
    let (a, b) = tokio::io::duplex(1024);
    drop(b);
    let res = within("handshake", protocol(a, true, TransportLimits::default())).await;
    assert_peer_gone(res.err());
}

#[tokio::test]
async fn oversized_frame_is_a_fault_not_a_hang() {
    let (a, mut b) = tokio::io::duplex(1024);
    b.write_all(&[0xff, 0xff, 0xff, 1, 2, 3]).await.unwrap();
    let res = within("handshake", protocol(a, false, TransportLimits::default())).await;
    let max = TransportLimits::default().max_frame_len;
    assert_eq!(
        res.err(),
        Some(TransportFault::FrameTooLarge {
            len: 0xff_ffff,
            max
        })
    );
}

/// A peer speaking raw Noise (XX initiator) over the same framing, for hand-made frames.
fn raw_peer(io: tokio::io::DuplexStream) -> Cipher {
    let codec = LengthDelimitedCodec::builder()
        .little_endian()
        .length_field_length(3)
        .max_frame_length(8 << 20)
        .new_codec();
    let raw_io = Framed::new(io, codec)
        .map_ok(|frame| frame.to_vec())
        .with(|v: Vec<u8>| future::ready(Ok::<_, io::Error>(bytes::Bytes::from(v))));
    Cipher::new_dht_init_with_pattern(Some(Box::new(raw_io)), HandshakePattern::XX, None, &[])
        .unwrap()
}

/// Runs our responder and the raw initiator's handshake together.
async fn connect_raw(ours: tokio::io::DuplexStream, raw: &mut Cipher) -> Side {
    let raw_handshake = future::poll_fn(|cx| {
        let _ = raw.poll_next_unpin(cx);
        if raw.ready() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    });
    tokio::join!(start(ours, false), within("raw handshake", raw_handshake)).0
}

/// compact-encoding uint, small values only.
fn uint(out: &mut Vec<u8>, n: usize) {
    if n < 0xfd {
        out.push(n as u8);
    } else {
        out.push(0xfd);
        out.extend_from_slice(&u16::try_from(n).unwrap().to_le_bytes());
    }
}

/// A hostile peer sends an Open for channel 2^24: the frame is dropped before `Protocol`
/// would grow its remote-id table to that size.
#[tokio::test]
async fn huge_channel_id_from_peer_is_a_fault() {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let mut raw = raw_peer(b);
    let side = connect_raw(a, &mut raw).await;
    // 00 01 = Open, then channel id 0xfe u32 = 2^24, then garbage the guard never reads.
    within("raw send", raw.send(vec![0, 1, 0xfe, 0, 0, 0, 1, 7, 7]))
        .await
        .unwrap();

    within("status closed", side.status.closed()).await;
    assert_eq!(
        side.status.fault(),
        Some(TransportFault::Frame(FrameFault::ChannelIdTooLarge {
            id: 1 << 24,
            max: 65_536
        }))
    );
    assert!(within("protocol error", side.task).await.unwrap().is_err());
}

/// Capability as in JS hypercore `caps.replicate` (constants from hypercore-protocol).
fn capability(initiator: bool, key: &[u8], handshake_hash: &[u8]) -> Vec<u8> {
    use blake2::digest::{FixedOutput, Update, typenum::U32};
    const INITIATOR: [u8; 32] = [
        0x51, 0x81, 0x2A, 0x2A, 0x35, 0x9B, 0x50, 0x36, 0x95, 0x36, 0x77, 0x5D, 0xF8, 0x9E, 0x18,
        0xE4, 0x77, 0x40, 0xF3, 0xDB, 0x72, 0xAC, 0x0A, 0xE7, 0x0B, 0x29, 0x59, 0x4C, 0x19, 0x4D,
        0xC3, 0x16,
    ];
    const RESPONDER: [u8; 32] = [
        0x04, 0x38, 0x49, 0x2D, 0x02, 0x97, 0x0C, 0xC1, 0x35, 0x28, 0xAC, 0x02, 0x62, 0xBC, 0xA0,
        0x07, 0x4E, 0x09, 0x26, 0x26, 0x02, 0x56, 0x86, 0x5A, 0xCC, 0xC0, 0xBF, 0x15, 0xBD, 0x79,
        0x12, 0x7D,
    ];
    let mut mac =
        blake2::Blake2bMac::<U32>::new_with_salt_and_personal(handshake_hash, &[], &[]).unwrap();
    mac.update(if initiator { &INITIATOR } else { &RESPONDER });
    mac.update(key);
    mac.finalize_fixed().to_vec()
}

/// 300 channels, with the peer batching one Extension per channel into a single frame that
/// switches channel 299 times (as protomux does when corked). Upstream's decoder misreads
/// such frames (defect 1); the transport splits them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_channels_with_cross_channel_batch() {
    const N: usize = 300;
    let (a, b) = tokio::io::duplex(64 * 1024);
    let mut raw = raw_peer(b);
    let mut side = connect_raw(a, &mut raw).await;
    let hash = raw.handshake_hash().unwrap().to_vec();

    let keys: Vec<[u8; 32]> = (0..N).map(|_| random_key()).collect();
    for key in &keys {
        within("open", side.commands.open(*key)).await.unwrap();
    }
    // Wait for all our Opens, so every channel is attached locally before the batch lands.
    let mut opens = 0;
    while opens < N {
        match within("our opens", raw.next()).await {
            Some(hypercore_handshake::CipherEvent::Message(m)) if m.starts_with(&[0, 1]) => {
                opens += 1
            }
            Some(_) => {}
            None => panic!("raw peer stream ended"),
        }
    }
    for (i, key) in keys.iter().enumerate() {
        let mut open = vec![0, 1];
        uint(&mut open, i + 1);
        uint(&mut open, "hypercore/alpha".len());
        open.extend_from_slice(b"hypercore/alpha");
        uint(&mut open, 32);
        open.extend_from_slice(&hypercore_protocol::discovery_key(key));
        open.push(1);
        open.extend_from_slice(&capability(true, key, &hash));
        raw.feed(open).await.unwrap();
    }
    let mut batch = vec![0, 0];
    for (i, key) in keys.iter().enumerate() {
        if i > 0 {
            batch.push(0);
        }
        uint(&mut batch, i + 1);
        let mut msg = vec![9];
        uint(&mut msg, "multifeed/test".len());
        msg.extend_from_slice(b"multifeed/test");
        uint(&mut msg, 32);
        msg.extend_from_slice(&hypercore_protocol::discovery_key(key));
        uint(&mut batch, msg.len());
        batch.extend_from_slice(&msg);
    }
    within("raw send", raw.send(batch)).await.unwrap();

    for _ in 0..N {
        let mut channel = side.channel().await;
        let dk = channel.discovery_key().to_vec();
        assert_eq!(next_extension(&mut channel).await, dk);
    }
    assert_eq!(side.status.fault(), None);
}

const MAX: u64 = 65_536;

/// Inbound splitting as the transport does it.
fn inspect(frame: &[u8], max_len: usize) -> Result<Inspected, FrameFault> {
    inspect_frame(frame, MAX, max_len, usize::MAX)
}

#[test]
fn splitter_passes_non_switching_frames() {
    // `9 0 1 x` is an Extension named "" carrying [x].
    // single message on channel 1: <ch> <type 9> ...
    assert_eq!(inspect(&[1, 9, 0, 1, 7], usize::MAX), Ok(Inspected::Pass));
    // batch on channel 1 with two messages
    assert_eq!(
        inspect(&[0, 0, 1, 4, 9, 0, 1, 7, 4, 9, 0, 1, 8], usize::MAX),
        Ok(Inspected::Pass)
    );
    // open / close on small channels
    assert_eq!(
        inspect(&[0, 1, 3, 1, b'p', 2, 5, 6], usize::MAX),
        Ok(Inspected::Pass)
    );
    assert_eq!(inspect(&[0, 3, 3], usize::MAX), Ok(Inspected::Pass));
    assert_eq!(inspect(&[], usize::MAX), Ok(Inspected::Pass));
}

#[test]
fn splitter_splits_channel_switches() {
    // ch 1: [a]; switch to ch 0x1234 (0xfd u16); [b]; switch to ch 2; [c], [d]
    let frame = [
        0, 0, 1, 4, 9, 0, 1, 0xa, 0, 0xfd, 0x34, 0x12, 4, 9, 0, 1, 0xb, 0, 2, 4, 9, 0, 1, 0xc, 4,
        9, 0, 1, 0xd,
    ];
    let expected = vec![
        vec![0, 0, 1, 4, 9, 0, 1, 0xa],
        vec![0, 0, 0xfd, 0x34, 0x12, 4, 9, 0, 1, 0xb],
        vec![0, 0, 2, 4, 9, 0, 1, 0xc, 4, 9, 0, 1, 0xd],
    ];
    assert_eq!(inspect(&frame, usize::MAX), Ok(Inspected::Split(expected)));
}

#[test]
fn splitter_chunks_oversized_batches() {
    // three 5-byte entries on channel 1, at most 8 bytes per batch: header (3) + one entry
    let frame = [0, 0, 1, 4, 9, 0, 1, 1, 4, 9, 0, 1, 2, 4, 9, 0, 1, 3];
    let expected = vec![
        vec![0, 0, 1, 4, 9, 0, 1, 1],
        vec![0, 0, 1, 4, 9, 0, 1, 2],
        vec![0, 0, 1, 4, 9, 0, 1, 3],
    ];
    assert_eq!(inspect(&frame, 8), Ok(Inspected::Split(expected.clone())));
    assert_eq!(inspect(&frame, 18), Ok(Inspected::Pass));
    // and by message count, as inbound batches are
    assert_eq!(
        inspect_frame(&frame, MAX, usize::MAX, 1),
        Ok(Inspected::Split(expected))
    );
    assert_eq!(
        inspect_frame(&frame, MAX, usize::MAX, 3),
        Ok(Inspected::Pass)
    );
}

#[test]
fn splitter_rejects_malformed_input() {
    let malformed = |frame: &[u8]| {
        assert!(
            matches!(
                inspect(frame, usize::MAX),
                Err(FrameFault::Truncated { .. } | FrameFault::LengthPastEnd { .. })
            ),
            "{frame:?}"
        )
    };
    malformed(&[0, 0, 0xfd, 1]); // truncated batch channel
    malformed(&[0, 0, 1, 0xfe, 1, 2]); // truncated length
    malformed(&[0, 0, 1, 5, 9, 9]); // length past end
    malformed(&[
        0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    ]); // u64::MAX length
    malformed(&[0, 0, 1, 4, 9, 0, 1, 1, 0]); // switch with no channel
    malformed(&[0, 0, 1, 4, 9, 0, 1, 1, 0, 0xff, 1]); // switch with truncated channel
    malformed(&[0xfe, 1]); // single message with truncated channel
    malformed(&[0, 1, 0xff, 1, 2]); // open with truncated channel
}

#[test]
fn splitter_rejects_huge_channel_ids() {
    let too_large = |frame: &[u8], id: u64| {
        assert_eq!(
            inspect(frame, usize::MAX),
            Err(FrameFault::ChannelIdTooLarge { id, max: MAX })
        )
    };
    too_large(&[0xfe, 0, 0, 0, 1, 9, 0], 1 << 24); // single message
    too_large(&[0, 0, 0xfe, 0, 0, 0, 1, 1, 9], 1 << 24); // batch
    too_large(
        &[0, 0, 1, 4, 9, 0, 1, 1, 0, 0xff, 0, 0, 0, 0, 0, 0, 0, 0x80],
        1 << 63,
    ); // batch switch
    too_large(&[0, 1, 0xfe, 1, 0, 1, 0, 5], 65_537); // open
    too_large(&[0, 3, 0xfe, 1, 0, 1, 0], 65_537); // close
    assert_eq!(
        inspect(&[0, 3, 0xfe, 0, 0, 1, 0], usize::MAX),
        Ok(Inspected::Pass)
    ); // = max
}

/// A peer sending far more than we take from a channel: once the watched queue holds
/// `MAX_QUEUED_INBOUND` messages, reading from the socket pauses, so the queue stops
/// growing while the peer still has tens of thousands to send; every message still
/// arrives, in order, once the queue is drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_inbound_queue_pauses_reading_without_losing_messages() {
    use super::MAX_QUEUED_INBOUND;
    const TOTAL: u32 = 60_000;
    const BATCH: u32 = 250;
    // 1 KiB each: 60 MB in all, more than socket buffers can hide.
    let payload = |i: u32| {
        let mut bytes = i.to_le_bytes().to_vec();
        bytes.resize(1024, 0xab);
        bytes
    };
    let (mut a, mut b) = tcp_pair().await;
    let key = random_key();
    within("open a", a.commands.open(key)).await.unwrap();
    within("open b", b.commands.open(key)).await.unwrap();
    let ca = a.channel().await;
    let mut cb = b.channel().await;
    let rx = cb.take_receiver().unwrap();
    let _watch = b.status.watch_inbound(&rx);

    let sender = tokio::spawn(async move {
        for start in (0..TOTAL).step_by(BATCH as usize) {
            let batch: Vec<Message> = (start..start + BATCH)
                .map(|i| extension(payload(i)))
                .collect();
            ca.send_batch(&batch).await.unwrap();
        }
        ca
    });
    // Polls the queue's length: there is no event for "the queue grew".
    within("the queue fills up", async {
        while rx.len() < MAX_QUEUED_INBOUND {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    // Frames the cipher took in before the check paused reading still land: the
    // queue settles a little above the limit, far below what the peer has to send.
    let bound = 2 * MAX_QUEUED_INBOUND;
    let mut lens = Vec::new();
    let read_before = b.status.last_received();
    for _ in 0..50 {
        lens.push(rx.len());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(lens.iter().all(|&n| n <= bound), "queue grew: {lens:?}");
    assert_eq!(
        b.status.last_received(),
        read_before,
        "no frame was read while the queue was full"
    );

    for expected in 0..TOTAL {
        match within("next message", rx.recv()).await {
            Ok(Message::Extension(ext)) => {
                assert_eq!(ext.message, payload(expected));
            }
            other => panic!("message {expected}: {other:?}"),
        }
    }
    within("sender done", sender).await.unwrap();
    assert!(!b.status.is_closed());
}

#[path = "transport_fuzz.rs"]
mod fuzz;

// ---------------------------------------------------------------------------------
// Before authentication (issue 11 part 2): deadline, read budget, frame limit.
// ---------------------------------------------------------------------------------

use crate::replicate::preauth::{ConnectionSlots, PreAuth, PreAuthLimits, SlotLimits};

const ROOT_KEY: [u8; 32] = [0x42; 32];

fn guarded(pre_auth: &PreAuth) -> TransportLimits {
    TransportLimits {
        root_key: Some(ROOT_KEY),
        pre_auth: Some(pre_auth.clone()),
        ..TransportLimits::default()
    }
}

/// The raw initiator's `Open` for `key` on `channel`, with the capability it proves.
fn raw_open(raw: &Cipher, channel: usize, key: &[u8; 32], real_capability: bool) -> Vec<u8> {
    let hash = raw.handshake_hash().unwrap().to_vec();
    let mut open = vec![0, 1];
    uint(&mut open, channel);
    uint(&mut open, "hypercore/alpha".len());
    open.extend_from_slice(b"hypercore/alpha");
    uint(&mut open, 32);
    open.extend_from_slice(&hypercore_protocol::discovery_key(key));
    open.push(1);
    if real_capability {
        open.extend_from_slice(&capability(true, key, &hash));
    } else {
        open.extend_from_slice(&[7; 32]); // knows the discovery key, not the key
    }
    open
}

/// Our responder with pre-authentication limits, against a raw Noise initiator.
async fn guarded_raw(pre_auth: &PreAuth) -> (Side, Cipher) {
    let (a, b) = tokio::io::duplex(256 * 1024);
    let mut raw = raw_peer(b);
    let raw_handshake = future::poll_fn(|cx| {
        let _ = raw.poll_next_unpin(cx);
        if raw.ready() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    });
    let (ours, ()) = tokio::join!(
        async {
            let (proto, status) = within("handshake", protocol(a, false, guarded(pre_auth)))
                .await
                .unwrap();
            drive(proto, status)
        },
        within("raw handshake", raw_handshake)
    );
    (ours, raw)
}

async fn ended_with(side: Side) -> Option<TransportFault> {
    within("status closed", side.status.closed()).await;
    assert!(within("protocol error", side.task).await.unwrap().is_err());
    side.status.fault()
}

/// A connection that never says anything is cut at the deadline, during Noise.
#[tokio::test(start_paused = true)]
async fn a_silent_connection_is_cut_at_the_pre_auth_deadline() {
    let pre_auth = PreAuth::new(PreAuthLimits::default());
    let (a, _silent) = tokio::io::duplex(1024);
    let started = tokio::time::Instant::now();
    let res = within("pre-auth deadline", protocol(a, false, guarded(&pre_auth))).await;
    assert_eq!(
        res.err(),
        Some(TransportFault::NotAuthenticated {
            after: Duration::from_secs(5)
        })
    );
    assert_eq!(started.elapsed(), Duration::from_secs(5));
}

/// Completing Noise is not enough: without a valid root `Open` the connection ends at
/// the deadline, and knowing only the discovery key (a wrong capability) authenticates
/// nothing (the protocol then refuses the channel and ends the connection).
#[tokio::test(start_paused = true)]
async fn noise_without_the_key_does_not_authenticate() {
    let pre_auth = PreAuth::new(PreAuthLimits::default());
    let (side, _raw) = guarded_raw(&pre_auth).await;
    within("open", side.commands.open(ROOT_KEY)).await.unwrap();
    assert_eq!(
        ended_with(side).await,
        Some(TransportFault::NotAuthenticated {
            after: Duration::from_secs(5)
        })
    );
    assert!(!pre_auth.is_authenticated());

    let pre_auth = PreAuth::new(PreAuthLimits::default());
    let (side, mut raw) = guarded_raw(&pre_auth).await;
    within("open", side.commands.open(ROOT_KEY)).await.unwrap();
    let open = raw_open(&raw, 1, &ROOT_KEY, false);
    within("raw send", raw.send(open)).await.unwrap();
    let ended = within("protocol end", side.task).await.unwrap();
    assert!(ended.is_err(), "the channel must be refused");
    assert!(!pre_auth.is_authenticated());
}

/// Before authenticating, a peer may send little: frames over the pre-auth limit and
/// bytes past the budget end the connection.
#[tokio::test]
async fn before_authentication_frames_and_bytes_are_bounded() {
    let limits = PreAuthLimits::default();
    // One frame over the pre-auth frame limit (an Extension on channel 1).
    let pre_auth = PreAuth::new(limits);
    let (side, mut raw) = guarded_raw(&pre_auth).await;
    let mut big = vec![1, 9, 0];
    uint(&mut big, limits.max_frame_len);
    big.resize(big.len() + limits.max_frame_len, 0xab);
    let _ = raw.send(big).await;
    match ended_with(side).await {
        Some(TransportFault::FrameTooLarge { max, .. }) => assert_eq!(max, limits.max_frame_len),
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
    // Small frames past the read budget.
    let pre_auth = PreAuth::new(limits);
    let (side, mut raw) = guarded_raw(&pre_auth).await;
    let mut small = vec![1, 9, 0];
    uint(&mut small, 4000);
    small.resize(small.len() + 4000, 0xab);
    for _ in 0..limits.read_budget / 4000 + 2 {
        if raw.send(small.clone()).await.is_err() {
            break;
        }
    }
    assert_eq!(
        ended_with(side).await,
        Some(TransportFault::PreAuthBudget {
            budget: limits.read_budget
        })
    );
}

/// A valid root `Open` authenticates the peer: its slot is released, the deadline and
/// the small limits no longer apply, and large frames flow.
#[tokio::test(start_paused = true)]
async fn a_valid_root_open_lifts_the_limits_and_frees_the_slot() {
    let slots = ConnectionSlots::new(SlotLimits::default());
    let slot = slots.try_admit([127, 0, 0, 1].into()).unwrap();
    let pre_auth = PreAuth::new(PreAuthLimits::default()).with_slot(slot);
    let (mut side, mut raw) = guarded_raw(&pre_auth).await;
    within("open", side.commands.open(ROOT_KEY)).await.unwrap();
    within("raw open", raw.send(raw_open(&raw, 1, &ROOT_KEY, true)))
        .await
        .unwrap();
    let mut channel = side.channel().await;
    assert!(pre_auth.is_authenticated());
    assert_eq!(slots.in_use(), 0);
    within("authenticated()", pre_auth.authenticated()).await;

    // Well past the deadline, a frame far over the pre-auth limits still arrives.
    tokio::time::advance(Duration::from_secs(60)).await;
    let payload = vec![0x5a; 1024 * 1024];
    let mut ext = vec![1, 9];
    uint(&mut ext, "multifeed/test".len());
    ext.extend_from_slice(b"multifeed/test");
    ext.push(0xfe);
    ext.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    ext.extend_from_slice(&payload);
    within("raw send", raw.send(ext)).await.unwrap();
    assert_eq!(next_extension(&mut channel).await, payload);
    assert_eq!(side.status.fault(), None);
}

/// Two of our own transports with pre-authentication on both sides: they authenticate
/// each other and replicate as without it.
#[tokio::test]
async fn two_guarded_transports_authenticate_each_other() {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let (pa, pb) = (
        PreAuth::new(PreAuthLimits::default()),
        PreAuth::new(PreAuthLimits::default()),
    );
    let (ra, rb) = tokio::join!(
        protocol(a, true, guarded(&pa)),
        protocol(b, false, guarded(&pb))
    );
    let (pra, sa) = ra.unwrap();
    let (prb, sb) = rb.unwrap();
    let (mut a, mut b) = (drive(pra, sa), drive(prb, sb));
    within("open a", a.commands.open(ROOT_KEY)).await.unwrap();
    within("open b", b.commands.open(ROOT_KEY)).await.unwrap();
    let mut ca = a.channel().await;
    let mut cb = b.channel().await;
    assert!(pa.is_authenticated() && pb.is_authenticated());
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    within("send", ca.send(extension(big.clone())))
        .await
        .unwrap();
    assert_eq!(next_extension(&mut cb).await, big);
    within("send", cb.send(extension(big.clone())))
        .await
        .unwrap();
    assert_eq!(next_extension(&mut ca).await, big);
}

/// A raw initiator whose outbound frames pass through `tamper(index, frame)` (0: Noise
/// message 1, 1: message 3, 2: its stream header, ...).
fn tampering_raw_peer(
    io: tokio::io::DuplexStream,
    tamper: impl FnMut(usize, Vec<u8>) -> Vec<u8> + Send + Sync + 'static,
) -> Cipher {
    let codec = LengthDelimitedCodec::builder()
        .little_endian()
        .length_field_length(3)
        .max_frame_length(8 << 20)
        .new_codec();
    let tamper = std::sync::Mutex::new((0usize, tamper));
    let raw_io = Framed::new(io, codec)
        .map_ok(|frame| frame.to_vec())
        .with(move |v: Vec<u8>| {
            let mut t = tamper.lock().unwrap();
            let index = t.0;
            t.0 += 1;
            let v = (t.1)(index, v);
            future::ready(Ok::<_, io::Error>(bytes::Bytes::from(v)))
        });
    Cipher::new_dht_init_with_pattern(Some(Box::new(raw_io)), HandshakePattern::XX, None, &[])
        .unwrap()
}

/// hypercore_handshake slices, `expect`s and `panic!`s on a bad stream header: a peer
/// that sends one ends its connection with a typed fault instead.
#[tokio::test]
async fn a_bad_stream_header_is_a_fault_not_a_panic() {
    type Corrupt = fn(Vec<u8>) -> Vec<u8>;
    let cases: [(&str, Corrupt); 3] = [
        ("short", |h| h[..10].to_vec()),
        ("long", |h| [h, vec![0; 8]].concat()),
        ("wrong stream id", |mut h| {
            h[0] ^= 1;
            h
        }),
    ];
    for (what, corrupt) in cases {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let mut raw = tampering_raw_peer(b, move |i, f| if i == 2 { corrupt(f) } else { f });
        let raw_side = tokio::spawn(async move {
            // Drive the raw handshake; it may never complete.
            let _ = timeout(
                Duration::from_secs(5),
                future::poll_fn(|cx| {
                    let _ = raw.poll_next_unpin(cx);
                    std::task::Poll::<()>::Pending
                }),
            )
            .await;
        });
        let res = within("handshake", protocol(a, false, TransportLimits::default())).await;
        assert!(
            matches!(res, Err(TransportFault::Handshake(_))),
            "{what}: {:?}",
            res.err()
        );
        raw_side.abort();
    }
}
