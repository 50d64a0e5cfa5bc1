//! Fuzzing the inbound path: arbitrary and structure-aware frames (valid messages of
//! every type with mutated lengths, truncations, inserted bytes) fed to the frame check
//! and, when accepted, to hypercore-protocol's own decoder, first in-process over a
//! channel already authenticated, then through real Noise sessions.
//!
//! A refused allocation aborts the process rather than panicking, so a hole in the check
//! would kill the test binary, never pass quietly; in addition every accepted message is
//! decoded by the crate and its reserved capacities are held against the frame's bytes.
//!
//! Each test runs for `FUZZ_SECONDS` (default 2) and prints what it ran; `FUZZ_SEED`
//! replays a run. `scripts/fuzz.sh frames` runs them for longer (see `crate::fuzz_support`).

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Sink, SinkExt, Stream, StreamExt};
use hypercore_handshake::state_machine::PUBLIC_KEYLEN;
use hypercore_handshake::{CipherEvent, CipherTrait};
use hypercore_protocol::{Event, Protocol, discovery_key};
use proptest::prelude::*;

use super::{capability, connect_raw, random_key, raw_peer, within};
use crate::fuzz_support::fuzz_for;
use crate::replicate::frame_check::{FrameFault, Unit, check_frame};
use crate::replicate::frame_samples::{arb_frame, decode_as_checked, open_frame};
use crate::replicate::transport::{
    Inspected, MAX_INBOUND_BATCH_MESSAGES, TransportFault, inspect_frame,
};

const MAX_CHANNEL_ID: u64 = 65_536;
/// A `Protocol` that still has work after this many polls of one frame is hung.
const MAX_POLLS_PER_FRAME: usize = 10_000;

/// A cipher that hands `Protocol` whatever frames are queued, as if decrypted.
struct FeedCipher {
    frames: Arc<Mutex<VecDeque<Vec<u8>>>>,
}

const HANDSHAKE_HASH: [u8; 64] = [3; 64];

impl Stream for FeedCipher {
    type Item = CipherEvent;
    fn poll_next(self: std::pin::Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<CipherEvent>> {
        match self.frames.lock().unwrap().pop_front() {
            Some(frame) => Poll::Ready(Some(CipherEvent::Message(frame))),
            None => Poll::Pending, // the driver polls again after queueing
        }
    }
}

impl Sink<Vec<u8>> for FeedCipher {
    type Error = std::io::Error;
    fn poll_ready(
        self: std::pin::Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn start_send(self: std::pin::Pin<&mut Self>, _: Vec<u8>) -> std::io::Result<()> {
        Ok(())
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(
        self: std::pin::Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl CipherTrait for FeedCipher {
    fn remote_public_key(&self) -> Option<[u8; PUBLIC_KEYLEN]> {
        Some([1; PUBLIC_KEYLEN])
    }
    fn local_public_key(&self) -> [u8; PUBLIC_KEYLEN] {
        [2; PUBLIC_KEYLEN]
    }
    fn handshake_hash(&self) -> Option<Vec<u8>> {
        Some(HANDSHAKE_HASH.to_vec())
    }
    fn is_initiator(&self) -> bool {
        false
    }
}

/// The peer's `Open` for `key` on `channel`, with the capability our side checks.
fn peer_open(channel: u64, key: &[u8; 32], hash: &[u8]) -> Vec<u8> {
    open_frame(&hypercore_protocol::schema::Open {
        channel,
        protocol: "hypercore/alpha".into(),
        discovery_key: discovery_key(key).to_vec(),
        capability: Some(capability(true, key, hash)),
    })
}

/// Polls until nothing is left to do; `Err` if the protocol failed (a typed error),
/// a test failure if it never settles.
fn settle(
    protocol: &mut Protocol,
    events: &mut Vec<Event>,
) -> Result<Result<(), String>, TestCaseError> {
    let mut cx = Context::from_waker(futures::task::noop_waker_ref());
    for _ in 0..MAX_POLLS_PER_FRAME {
        match protocol.poll_next_unpin(&mut cx) {
            Poll::Ready(Some(Ok(event))) => events.push(event),
            Poll::Ready(Some(Err(e))) => return Ok(Err(e.to_string())),
            Poll::Ready(None) => return Ok(Err("ended".into())),
            Poll::Pending => return Ok(Ok(())),
        }
    }
    Err(TestCaseError::fail(
        "protocol hung: still busy after 10,000 polls",
    ))
}

/// Tallies of one fuzz run.
#[derive(Default)]
struct Tally {
    accepted: Cell<u64>,
    refused: Cell<u64>,
    /// Refused frames whose declared count would have had the crate reserve 1 GiB or
    /// more (an abort, or a "capacity overflow" panic, before this check).
    huge_reservations: Cell<u64>,
    protocol_errors: Cell<u64>,
    /// What those errors said (message up to the first digit or quote), and how often.
    protocol_error_kinds: Mutex<std::collections::BTreeMap<String, u64>>,
}

fn bump(c: &Cell<u64>) {
    c.set(c.get() + 1);
}

fn would_reserve(fault: &FrameFault) -> u128 {
    // In memory: a u32 per bitfield word, a hypercore_schema::Node per node, a byte per
    // buffer byte (buffers are copied only after their length is checked, so harmless).
    let node = std::mem::size_of::<hypercore_schema::Node>() as u128;
    match fault {
        FrameFault::CountPastEnd {
            declared, min_len, ..
        } => u128::from(*declared) * if *min_len == 4 { 4 } else { node },
        _ => 0,
    }
}

/// One fuzz case in-process: a `Protocol` with channel 1 open and authenticated, fed the
/// frames through the check; accepted messages are also decoded on their own.
fn protocol_case(frames: Vec<Vec<u8>>, tally: &Tally) -> Result<(), TestCaseError> {
    let queue = Arc::new(Mutex::new(VecDeque::new()));
    let mut protocol = Protocol::new(Box::new(FeedCipher {
        frames: queue.clone(),
    }));
    let key = [7u8; 32];
    futures::executor::block_on(protocol.commands().open(key)).unwrap();
    queue
        .lock()
        .unwrap()
        .push_back(peer_open(1, &key, &HANDSHAKE_HASH));
    let mut events = Vec::new();
    let _ = settle(&mut protocol, &mut events)?;
    let mut channel = events
        .into_iter()
        .find_map(|e| match e {
            Event::Channel(c) => Some(c),
            _ => None,
        })
        .expect("channel 1 opens with the right capability");

    for frame in frames {
        let forwarded = match inspect_frame(
            &frame,
            MAX_CHANNEL_ID,
            usize::MAX,
            MAX_INBOUND_BATCH_MESSAGES,
        ) {
            Err(fault) => {
                bump(&tally.refused);
                if would_reserve(&fault) >= 1 << 30 {
                    bump(&tally.huge_reservations);
                }
                return Ok(()); // the transport ends the connection here
            }
            Ok(Inspected::Pass) => vec![frame],
            Ok(Inspected::Split(frames)) => frames,
        };
        bump(&tally.accepted);
        for f in &forwarded {
            let checked = check_frame(f, MAX_CHANNEL_ID).expect("forwarded frames check");
            prop_assert!(checked.exact, "forwarded frame not exact: {:02x?}", f);
            match checked.unit {
                Some(Unit::Single { message, .. }) => {
                    decode_as_checked(message);
                }
                Some(Unit::Batch(entries)) => {
                    prop_assert!(entries.len() <= MAX_INBOUND_BATCH_MESSAGES);
                    for (_, message) in entries {
                        decode_as_checked(message);
                    }
                }
                _ => {}
            }
        }
        queue.lock().unwrap().extend(forwarded);
        if let Err(error) = settle(&mut protocol, &mut Vec::new())? {
            bump(&tally.protocol_errors);
            let kind: String = error
                .chars()
                .take_while(|c| !c.is_ascii_digit() && *c != '[' && *c != '"')
                .collect();
            *tally
                .protocol_error_kinds
                .lock()
                .unwrap()
                .entry(kind)
                .or_default() += 1;
            return Ok(());
        }
        // Take what reached the channel, as a session would.
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        while let Poll::Ready(Some(_)) = channel.poll_next_unpin(&mut cx) {}
    }
    Ok(())
}

/// Arbitrary, valid and mutated frames through the check into hypercore-protocol's
/// decoder and channel dispatch, in-process: no panic, no abort, no hang, and every
/// accepted message decodes exactly as checked.
#[test]
fn fuzz_frames_through_the_check_into_the_protocol() {
    let tally = Tally::default();
    let strategy = proptest::collection::vec(arb_frame(), 1..6).boxed();
    let inputs = fuzz_for("in-process fuzz", strategy, 512, |frames| {
        protocol_case(frames, &tally)
    });
    println!(
        "in-process fuzz: {inputs} cases; frames accepted {}, refused {} (of which {} declared a reservation of 1 GiB or more), protocol errors after the check {}: {:?}",
        tally.accepted.get(),
        tally.refused.get(),
        tally.huge_reservations.get(),
        tally.protocol_errors.get(),
        tally.protocol_error_kinds.lock().unwrap()
    );
    assert!(tally.accepted.get() > 0 && tally.huge_reservations.get() > 0);
}

/// One fuzz case over a real connection: Noise over a duplex pipe, our responder with
/// channel 1 authenticated, the rogue's frames, then a probe: a fresh channel must open
/// unless the connection ended with an error.
async fn session_case(frames: Vec<Vec<u8>>) -> Result<&'static str, TestCaseError> {
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let mut raw = raw_peer(theirs);
    let mut side = connect_raw(ours, &mut raw).await;
    let hash = raw.handshake_hash().unwrap().to_vec();
    let key = random_key();
    within("open", side.commands.open(key)).await.unwrap();
    within("rogue open", raw.send(peer_open(1, &key, &hash)))
        .await
        .unwrap();
    let _channel = side.channel().await;

    for frame in frames {
        // A refused frame ends the connection: later sends may fail, which is fine.
        if within("rogue send", raw.send(frame)).await.is_err() {
            break;
        }
    }
    let probe = random_key();
    let _ = within("probe open", side.commands.open(probe)).await;
    let _ = within("rogue probe", raw.send(peer_open(60_000, &probe, &hash))).await;
    let outcome = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match side.channels.recv().await {
                Some(c) if *c.discovery_key() == discovery_key(&probe) => return "alive",
                Some(_) => continue,
                None => return "ended",
            }
        }
    })
    .await
    .map_err(|_| TestCaseError::fail("hung: neither the probe channel nor an end"))?;
    if outcome == "ended" {
        let joined = within("task end", &mut side.task).await;
        match joined {
            Err(e) if e.is_panic() => return Err(TestCaseError::fail(format!("panicked: {e}"))),
            Ok(Ok(())) => return Err(TestCaseError::fail("ended without an error")),
            _ => {}
        }
        if let Some(fault) = side.status.fault() {
            prop_assert!(
                matches!(fault, TransportFault::Frame(_)),
                "unexpected fault {fault:?}"
            );
            return Ok("refused");
        }
        return Ok("protocol error");
    }
    prop_assert_eq!(side.status.fault(), None);
    Ok(outcome)
}

/// The same frames through real Noise sessions: the transport refuses or passes each,
/// the session either goes on (a fresh channel still opens) or ends with a typed error.
#[test]
fn fuzz_frames_through_real_sessions() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let outcomes = Mutex::new(std::collections::BTreeMap::<&str, u64>::new());
    let strategy = proptest::collection::vec(arb_frame(), 1..5).boxed();
    let inputs = fuzz_for("session fuzz", strategy, 32, |frames| {
        let outcome = rt.block_on(session_case(frames))?;
        *outcomes.lock().unwrap().entry(outcome).or_default() += 1;
        Ok(())
    });
    let outcomes = outcomes.into_inner().unwrap();
    println!("session fuzz: {inputs} sessions; outcomes {outcomes:?}");
    assert!(outcomes.contains_key("alive") && outcomes.contains_key("refused"));
}
