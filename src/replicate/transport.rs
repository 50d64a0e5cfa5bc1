//! Connection layer for replication: framing + Noise XX + `hypercore_protocol::Protocol`,
//! with workarounds for defects in hypercore-protocol 0.7.2 / hypercore_handshake 0.6.0
//! (see rust-stack-notes.md):
//!
//! - framing: tokio `LengthDelimitedCodec`, 3-byte LE length (= JS `uint24le_framing`), bounded;
//! - the cipher `todo!()`-panics on inbound IO errors, so EOF/errors never reach it: they are
//!   recorded in [`TransportStatus`] and the inner stream stays pending; our wrapper above the
//!   cipher then yields one error to `Protocol` (its `next()` returns `Some(Err(_))`);
//! - inbound batch frames that switch channel are split per channel (upstream decoder misreads
//!   them); outbound batches are split per channel and chunked under the frame limit;
//! - every inbound frame is checked by [`frame_check`] before `Protocol` decodes it: each
//!   declared length and element count against the bytes present (compact-encoding
//!   reserves vectors by the peer's count, and a failed allocation aborts the process),
//!   and channel ids above [`TransportLimits::max_channel_id`] (`alloc_remote` grows a Vec
//!   to the id). A frame that fails ends that connection with [`TransportFault::Frame`];
//! - inbound batches reach `Protocol` in pieces of at most [`MAX_INBOUND_BATCH_MESSAGES`];
//! - the handshake completes before `Protocol` is built: otherwise the responder sends `Open`
//!   without a capability when `open` is called early, and the remote rejects the channel.
//!   As a side effect `Event::Handshake` is always the first event (defect 6 cannot occur).
//!
//! - hypercore-protocol queues inbound messages per channel without bound: receivers
//!   registered with [`TransportStatus::watch_inbound`] are counted, and while more
//!   than [`MAX_QUEUED_INBOUND`] messages wait in them, no further frame is read from
//!   the socket (TCP then slows the peer down), and frames already read wait as bytes
//!   instead of being handed to `Protocol`. A peer flooding requests faster than they
//!   are served cannot grow our memory without bound.
//!
//! Caller notes: keep polling the `Protocol` (faults are only noticed while it is polled);
//! `Protocol` has no keepalive, so idle detection is the caller's job via
//! [`TransportStatus::last_received`].

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

// The tokio clock, so idle and stall timeouts follow a paused test clock.
use tokio::time::Instant;

use super::frame_check::{self, FrameFault, Unit};
use super::preauth::{self, PreAuth};
use bytes::BytesMut;
use futures::{Sink, Stream};
use hypercore_handshake::state_machine::PUBLIC_KEYLEN;
use hypercore_handshake::state_machine::hc_specific::generate_keypair;
use hypercore_handshake::{Cipher, CipherEvent, CipherTrait, HandshakePattern};
use hypercore_protocol::{ChannelReceiver, Message, Protocol};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_util::codec::{
    Decoder, Encoder, Framed, LengthDelimitedCodec, LengthDelimitedCodecError,
};

/// Largest length a 3-byte length prefix can express.
const U24_MAX: usize = (1 << 24) - 1;

/// Bounds applied to everything a peer sends.
#[derive(Debug, Clone)]
pub struct TransportLimits {
    /// Largest accepted encrypted frame (clamped to 2^24-1 by the 3-byte prefix).
    pub max_frame_len: usize,
    /// Largest accepted channel id in any inbound frame.
    pub max_channel_id: u64,
    /// The key whose channel authenticates the peer: a valid `Open` for it (the
    /// capability proves the peer holds the key) ends the pre-authentication limits.
    /// The group's shared key, or the feed key of a single-feed session.
    pub root_key: Option<[u8; 32]>,
    /// Limits until the peer authenticates (see [`PreAuth`]); `None`: no limits beyond
    /// the above. Needs `root_key`, or the connection never authenticates.
    pub pre_auth: Option<PreAuth>,
}

impl Default for TransportLimits {
    fn default() -> Self {
        // 4 MiB blocks plus room for proofs and encryption overhead.
        Self {
            max_frame_len: 4 * 1024 * 1024 + 64 * 1024,
            max_channel_id: 65_536,
            root_key: None,
            pre_auth: None,
        }
    }
}

/// Why a connection ended (first fault wins).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportFault {
    #[error("remote closed the connection")]
    Eof,
    #[error("io error: {0}")]
    Io(String),
    #[error("frame of {len} bytes exceeds limit of {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error("invalid frame: {0}")]
    Frame(#[from] FrameFault),
    #[error("cipher error: {0}")]
    Cipher(String),
    #[error("the peer did not authenticate within {after:?}")]
    NotAuthenticated { after: Duration },
    #[error("cut off before authenticating: newer connections needed its slot")]
    Evicted,
    #[error("the peer sent more than {budget} bytes before authenticating")]
    PreAuthBudget { budget: usize },
    #[error("the peer broke the Noise handshake: {0}")]
    Handshake(&'static str),
}

impl From<io::Error> for TransportFault {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::UnexpectedEof => TransportFault::Eof,
            _ => TransportFault::Io(e.to_string()),
        }
    }
}

impl From<TransportFault> for io::Error {
    fn from(f: TransportFault) -> Self {
        let kind = match f {
            TransportFault::Eof => io::ErrorKind::UnexpectedEof,
            TransportFault::Io(_) => io::ErrorKind::BrokenPipe,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, f)
    }
}

/// Messages that may wait in registered channel receivers before reading pauses.
pub const MAX_QUEUED_INBOUND: usize = 4096;
/// How soon a paused read looks at the queues again.
const INBOUND_RECHECK: Duration = Duration::from_millis(1);
/// Inbound batches are handed to `Protocol` in pieces of at most this many messages: it
/// decodes a whole frame into one `Vec` (a 4 MiB frame of 3-byte messages would be over
/// a million entries of ~250 bytes), and the inbound gate can only act between pieces.
pub const MAX_INBOUND_BATCH_MESSAGES: usize = 256;

/// Holds inbound frames back while more than [`MAX_QUEUED_INBOUND`] messages wait in
/// watched receivers, looking again every [`INBOUND_RECHECK`].
struct InboundGate {
    status: TransportStatus,
    paused: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl InboundGate {
    fn new(status: TransportStatus) -> Self {
        Self {
            status,
            paused: None,
        }
    }

    fn poll_open(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if let Some(pause) = &mut self.paused {
                if pause.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.paused = None;
            }
            if self.status.queued_inbound() <= MAX_QUEUED_INBOUND {
                return Poll::Ready(());
            }
            self.paused = Some(Box::pin(tokio::time::sleep(INBOUND_RECHECK)));
        }
    }
}

/// When something last happened; touched and read from any thread.
#[derive(Debug)]
pub struct LastSeen {
    epoch: Instant,
    nanos: AtomicU64,
}

impl LastSeen {
    /// Starts as "just now".
    pub fn new() -> Self {
        LastSeen {
            epoch: Instant::now(),
            nanos: AtomicU64::new(0),
        }
    }

    pub fn touch(&self) {
        let nanos = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_max(nanos, Ordering::Relaxed);
    }

    pub fn at(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }
}

impl Default for LastSeen {
    fn default() -> Self {
        Self::new()
    }
}

struct StatusInner {
    last_received: LastSeen,
    fault: watch::Sender<Option<TransportFault>>,
    /// Receivers whose queues count against [`MAX_QUEUED_INBOUND`], each with a token
    /// that its user holds: a dead token drops the entry.
    inbound: std::sync::Mutex<Vec<(std::sync::Weak<()>, ChannelReceiver<Message>)>>,
}

/// Keeps a receiver counted by [`TransportStatus::watch_inbound`] while held.
#[must_use = "the receiver is only counted while this is held"]
pub struct InboundWatch(#[allow(dead_code)] Arc<()>);

/// Shared view of the connection's liveness; cheap to clone.
#[derive(Clone)]
pub struct TransportStatus(Arc<StatusInner>);

impl std::fmt::Debug for TransportStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportStatus")
            .field("fault", &self.fault())
            .finish()
    }
}

impl TransportStatus {
    fn new() -> Self {
        Self(Arc::new(StatusInner {
            last_received: LastSeen::new(),
            fault: watch::Sender::new(None),
            inbound: std::sync::Mutex::new(Vec::new()),
        }))
    }

    /// Counts the messages waiting in `receiver` against [`MAX_QUEUED_INBOUND`] for as
    /// long as the returned watch is held. (It keeps a clone of the receiver; dropping
    /// the watch releases it at the next count.)
    pub fn watch_inbound(&self, receiver: &ChannelReceiver<Message>) -> InboundWatch {
        let token = Arc::new(());
        if let Ok(mut inbound) = self.0.inbound.lock() {
            inbound.push((Arc::downgrade(&token), receiver.clone()));
        }
        InboundWatch(token)
    }

    /// Messages waiting in watched receivers (forgetting released ones).
    fn queued_inbound(&self) -> usize {
        let Ok(mut inbound) = self.0.inbound.lock() else {
            return 0;
        };
        inbound.retain(|(token, _)| token.strong_count() > 0);
        inbound.iter().map(|(_, rx)| rx.len()).sum()
    }

    /// Time of the last inbound frame (connection start if none yet).
    pub fn last_received(&self) -> Instant {
        self.0.last_received.at()
    }

    /// True once the connection has ended (EOF, IO error or a protocol fault).
    pub fn is_closed(&self) -> bool {
        self.0.fault.borrow().is_some()
    }

    /// Resolves once the connection has ended.
    pub async fn closed(&self) {
        let mut rx = self.0.fault.subscribe();
        // The sender lives in `self`, so this cannot fail while we wait.
        let _ = rx.wait_for(Option::is_some).await;
    }

    /// Why the connection ended, if it has.
    pub fn fault(&self) -> Option<TransportFault> {
        self.0.fault.borrow().clone()
    }

    /// Record a fault; only the first one is kept.
    pub fn set_fault(&self, fault: TransportFault) {
        self.0.fault.send_if_modified(|f| {
            if f.is_some() {
                return false;
            }
            tracing::debug!(%fault, "transport closed");
            *f = Some(fault);
            true
        });
    }

    fn touch(&self) {
        self.0.last_received.touch();
    }
}

/// `LengthDelimitedCodec` with a size check that reports the offending length, and a
/// smaller inbound limit until the peer authenticates.
struct FrameCodec {
    inner: LengthDelimitedCodec,
    max: usize,
    pre_auth: Option<PreAuth>,
}

impl FrameCodec {
    fn new(max: usize, pre_auth: Option<PreAuth>) -> Self {
        let max = max.min(U24_MAX);
        let inner = LengthDelimitedCodec::builder()
            .little_endian()
            .length_field_length(3)
            .max_frame_length(max)
            .new_codec();
        Self {
            inner,
            max,
            pre_auth,
        }
    }

    /// The inbound limit now.
    fn inbound_max(&mut self) -> usize {
        match &self.pre_auth {
            Some(p) if !p.is_authenticated() => p.limits().max_frame_len.min(self.max),
            _ => {
                self.pre_auth = None;
                self.max
            }
        }
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = TransportFault;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, TransportFault> {
        let max = self.inbound_max();
        self.inner.set_max_frame_length(max);
        self.inner.decode(src).map_err(|e| {
            // On "frame too big" the codec leaves the header in `src`: report the length.
            match e
                .get_ref()
                .and_then(|e| e.downcast_ref::<LengthDelimitedCodecError>())
            {
                Some(_) if src.len() >= 3 => TransportFault::FrameTooLarge {
                    len: usize::from(src[0]) | usize::from(src[1]) << 8 | usize::from(src[2]) << 16,
                    max,
                },
                _ => e.into(),
            }
        })
    }
}

impl Encoder<Vec<u8>> for FrameCodec {
    type Error = TransportFault;

    fn encode(&mut self, item: Vec<u8>, dst: &mut BytesMut) -> Result<(), TransportFault> {
        // Our own frames: always the full limit, whatever inbound allows now.
        self.inner.set_max_frame_length(self.max);
        Ok(Encoder::<&[u8]>::encode(&mut self.inner, &item, dst)?)
    }
}

/// The cipher's inner transport. Never yields an error or end-of-stream (the cipher would
/// panic on errors and spin/hang on EOF); faults go to `status` and the stream stays pending.
struct FramedIo<S> {
    framed: Framed<S, FrameCodec>,
    status: TransportStatus,
    /// Closed while the inbound backlog is full.
    gate: InboundGate,
    /// Until the peer authenticates: its deadline and read budget.
    pre_auth: Option<PreAuthWatch>,
    /// Inbound frames until the peer's stream header (after its Noise messages), which
    /// hypercore_handshake slices and `expect`s without checking its length.
    frames_to_header: usize,
}

/// The peer's stream header: a 32-byte stream id and a 24-byte secretstream header.
const STREAM_HEADER_LEN: usize = 32 + 24;

/// The deadline and read budget of a connection that has not authenticated yet.
struct PreAuthWatch {
    pre_auth: PreAuth,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// Resolves if its unauthenticated slot is taken for a newer connection.
    evicted: Pin<Box<dyn std::future::Future<Output = ()> + Send + Sync>>,
    read: usize,
}

impl PreAuthWatch {
    fn new(pre_auth: PreAuth) -> Self {
        let deadline = Box::pin(tokio::time::sleep(pre_auth.limits().deadline));
        let evicted = Box::pin(pre_auth.evicted());
        Self {
            pre_auth,
            deadline,
            evicted,
            read: 0,
        }
    }

    /// A fault once the deadline has passed or the slot was taken away (registers
    /// the timer and the eviction waker otherwise).
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Option<TransportFault> {
        if self.evicted.as_mut().poll(cx).is_ready() {
            return Some(TransportFault::Evicted);
        }
        self.deadline
            .as_mut()
            .poll(cx)
            .is_ready()
            .then(|| TransportFault::NotAuthenticated {
                after: self.pre_auth.limits().deadline,
            })
    }

    /// Counts an inbound frame (with its 3-byte header) against the budget.
    fn count(&mut self, frame_len: usize) -> Option<TransportFault> {
        self.read = self.read.saturating_add(frame_len + 3);
        let budget = self.pre_auth.limits().read_budget;
        (self.read > budget).then_some(TransportFault::PreAuthBudget { budget })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream for FramedIo<S> {
    type Item = io::Result<Vec<u8>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.status.is_closed() {
            return Poll::Pending;
        }
        if let Some(watch) = &mut self.pre_auth {
            if watch.pre_auth.is_authenticated() {
                self.pre_auth = None;
            } else if let Some(fault) = watch.poll_deadline(cx) {
                self.status.set_fault(fault);
                return Poll::Pending;
            }
        }
        // Writing goes on meanwhile: only reading waits for the queues to drain.
        if self.gate.poll_open(cx).is_pending() {
            return Poll::Pending;
        }
        match Pin::new(&mut self.framed).poll_next(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                self.status.touch();
                if self.frames_to_header > 0 {
                    self.frames_to_header -= 1;
                    if self.frames_to_header == 0 && frame.len() != STREAM_HEADER_LEN {
                        self.status.set_fault(TransportFault::Handshake(
                            "its stream header is not 56 bytes",
                        ));
                        return Poll::Pending;
                    }
                }
                if let Some(fault) = self.pre_auth.as_mut().and_then(|w| w.count(frame.len())) {
                    self.status.set_fault(fault);
                    return Poll::Pending;
                }
                Poll::Ready(Some(Ok(Vec::from(frame))))
            }
            Poll::Ready(Some(Err(fault))) => {
                self.status.set_fault(fault);
                Poll::Pending
            }
            Poll::Ready(None) => {
                self.status.set_fault(TransportFault::Eof);
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> FramedIo<S> {
    /// Records write errors. No fast-fail after a read fault: the cipher flushes before it
    /// decrypts, so failing writes would stop frames received before EOF from being delivered.
    fn sink_op(
        &mut self,
        op: impl FnOnce(Pin<&mut Framed<S, FrameCodec>>) -> Poll<Result<(), TransportFault>>,
    ) -> Poll<io::Result<()>> {
        op(Pin::new(&mut self.framed)).map_err(|fault| {
            self.status.set_fault(fault.clone());
            fault.into()
        })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Sink<Vec<u8>> for FramedIo<S> {
    type Error = io::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.sink_op(|f| f.poll_ready(cx))
    }

    fn start_send(mut self: Pin<&mut Self>, item: Vec<u8>) -> io::Result<()> {
        match self.sink_op(|f| Poll::Ready(f.start_send(item))) {
            Poll::Ready(r) => r,
            Poll::Pending => Ok(()),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.sink_op(|f| f.poll_flush(cx))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.sink_op(|f| f.poll_close(cx))
    }
}

/// Makes any `Send` stream `Sync` (required by `CipherIo`); only `&mut` access is ever used,
/// so the mutex is never locked.
struct SyncIo<S>(std::sync::Mutex<S>);

impl<S> SyncIo<S> {
    fn get(self: Pin<&mut Self>) -> Pin<&mut S>
    where
        S: Unpin,
    {
        let inner = self
            .get_mut()
            .0
            .get_mut()
            .unwrap_or_else(|e| e.into_inner());
        Pin::new(inner)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SyncIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get().poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SyncIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get().poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get().poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get().poll_shutdown(cx)
    }
}

/// Outcome of inspecting one frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Inspected {
    /// Use the frame unchanged.
    Pass,
    /// Use these frames instead, in order: batches of one channel each, each at most
    /// `max_len` bytes (unless a single message is larger) and `max_messages` messages;
    /// or the frame without bytes past its message.
    Split(Vec<Vec<u8>>),
}

/// Checks a frame ([`frame_check::check_frame`]: every declared length and count against
/// the bytes present, channel ids up to `max_channel_id`) and says what to forward:
/// batches that switch channel or exceed `max_len` bytes or `max_messages` messages are
/// split, and bytes past a message are cut off.
pub fn inspect_frame(
    frame: &[u8],
    max_channel_id: u64,
    max_len: usize,
    max_messages: usize,
) -> Result<Inspected, FrameFault> {
    let checked = frame_check::check_frame(frame, max_channel_id)?;
    Ok(forward(frame, checked, max_len, max_messages))
}

/// What to forward of a checked frame (see [`inspect_frame`]).
fn forward(
    frame: &[u8],
    checked: frame_check::CheckedFrame<'_>,
    max_len: usize,
    max_messages: usize,
) -> Inspected {
    let Some(unit) = checked.unit else {
        return Inspected::Pass; // empty: decodes to nothing
    };
    let fits = match &unit {
        Unit::Batch(entries) => entries.len() <= max_messages && frame.len() <= max_len,
        _ => true,
    };
    if checked.exact && fits {
        return Inspected::Pass;
    }
    Inspected::Split(unit.frames(max_len, max_messages))
}

/// `Cipher` wrapper that `Protocol` talks to: sanitises decrypted frames and turns a recorded
/// fault into a single error event.
struct GuardedCipher {
    cipher: Cipher,
    status: TransportStatus,
    max_channel_id: u64,
    max_out_len: usize,
    /// Checked frames not yet handed to `Protocol`.
    queued: VecDeque<Vec<u8>>,
    /// Closed while the inbound backlog is full: frames the cipher already holds or a
    /// split batch's pieces wait here instead of growing the channel queues.
    gate: InboundGate,
    reported: bool,
    /// Until the peer authenticates: what authenticates it (see [`GuardedCipher::authenticate`]).
    pre_auth: Option<(PreAuth, [u8; 32])>,
}

impl GuardedCipher {
    /// Drives the Noise handshake to completion before `Protocol` exists: `Protocol` would
    /// otherwise process `open` commands early and send `Open` without a capability (the
    /// handshake hash is missing), which the remote rejects.
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportFault>> {
        loop {
            // hypercore_handshake panics on a stream header with the wrong stream id: that
            // is the peer's fault, and it must end this connection only.
            let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                Pin::new(&mut self.cipher).poll_next(cx)
            }))
            .unwrap_or_else(|_| {
                self.status.set_fault(TransportFault::Handshake(
                    "its stream header does not match the session",
                ));
                Poll::Pending
            });
            let pending = polled.is_pending();
            match polled {
                Poll::Ready(Some(CipherEvent::Message(frame))) => {
                    if let Err(fault) = self.accept(frame) {
                        self.status.set_fault(fault);
                    }
                }
                Poll::Ready(Some(CipherEvent::HandshakePayload(_))) => {} // Protocol drops it too
                Poll::Ready(Some(CipherEvent::ErrStuff(e))) => {
                    self.status.set_fault(TransportFault::Cipher(e.to_string()));
                }
                Poll::Ready(None) => self.status.set_fault(TransportFault::Eof),
                Poll::Pending => {}
            }
            if let Some(fault) = self.status.fault() {
                return Poll::Ready(Err(fault));
            }
            // Checked after polling: the last handshake step may yield no event.
            if self.cipher.ready() {
                return Poll::Ready(Ok(()));
            }
            if pending {
                return Poll::Pending;
            }
        }
    }

    /// Checks an inbound frame and queues what `Protocol` may decode.
    fn accept(&mut self, frame: Vec<u8>) -> Result<(), TransportFault> {
        let checked = frame_check::check_frame(&frame, self.max_channel_id)?;
        if let Some(Unit::Open {
            discovery_key,
            capability: Some(capability),
            ..
        }) = &checked.unit
        {
            self.authenticate(discovery_key, capability);
        }
        match forward(&frame, checked, usize::MAX, MAX_INBOUND_BATCH_MESSAGES) {
            Inspected::Pass => self.queued.push_back(frame),
            Inspected::Split(frames) => self.queued.extend(frames),
        }
        Ok(())
    }

    /// Lifts the pre-authentication limits if this `Open` is for the root key and its
    /// capability is the one the peer can only compute holding that key (the same check
    /// `Protocol` then makes before it accepts the channel).
    fn authenticate(&mut self, discovery_key: &[u8], capability: &[u8]) {
        let Some((pre_auth, key)) = &self.pre_auth else {
            return;
        };
        let Some(hash) = CipherTrait::handshake_hash(&self.cipher) else {
            return;
        };
        let remote_is_initiator = !CipherTrait::is_initiator(&self.cipher);
        if discovery_key == hypercore_protocol::discovery_key(key)
            && capability == preauth::capability(remote_is_initiator, key, &hash)
        {
            pre_auth.mark_authenticated();
            self.pre_auth = None;
        }
    }

    fn report(&mut self, fault: TransportFault) -> Poll<Option<CipherEvent>> {
        self.status.set_fault(fault);
        self.reported = true;
        let fault = self.status.fault().unwrap_or(TransportFault::Eof); // first fault wins
        Poll::Ready(Some(CipherEvent::ErrStuff(fault.into())))
    }
}

impl Stream for GuardedCipher {
    type Item = CipherEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<CipherEvent>> {
        let this = &mut *self;
        loop {
            if !this.queued.is_empty() {
                if this.gate.poll_open(cx).is_pending() {
                    return Poll::Pending;
                }
                if let Some(frame) = this.queued.pop_front() {
                    return Poll::Ready(Some(CipherEvent::Message(frame)));
                }
            }
            if this.reported {
                return Poll::Pending; // connection is over; the error was already surfaced
            }
            // Keep polling the cipher after a read fault: it still holds frames received
            // before EOF. Our inner stream is pending by then, so this only drains.
            match Pin::new(&mut this.cipher).poll_next(cx) {
                Poll::Ready(Some(CipherEvent::Message(frame))) => {
                    if let Err(fault) = this.accept(frame) {
                        return this.report(fault);
                    }
                }
                // Report at once: the cipher may repeat a write error on every poll.
                Poll::Ready(Some(CipherEvent::ErrStuff(e))) => {
                    return this.report(TransportFault::Cipher(e.to_string()));
                }
                Poll::Ready(Some(payload @ CipherEvent::HandshakePayload(_))) => {
                    return Poll::Ready(Some(payload));
                }
                Poll::Ready(None) => return this.report(TransportFault::Eof),
                Poll::Pending => {
                    return match this.status.fault() {
                        Some(fault) => this.report(fault),
                        None => Poll::Pending,
                    };
                }
            }
        }
    }
}

impl GuardedCipher {
    fn check(&self) -> io::Result<()> {
        match self.status.fault() {
            Some(fault) => Err(fault.into()),
            None => Ok(()),
        }
    }
}

impl Sink<Vec<u8>> for GuardedCipher {
    type Error = io::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.cipher).poll_ready(cx)
    }

    /// Outbound batches are re-split too: one channel per batch keeps peers with the same
    /// decoder bug working, and chunking keeps frames under the limit (upstream batches
    /// everything queued into one frame, with no size bound).
    fn start_send(mut self: Pin<&mut Self>, item: Vec<u8>) -> io::Result<()> {
        self.check()?;
        match inspect_frame(&item, u64::MAX, self.max_out_len, usize::MAX) {
            Ok(Inspected::Split(frames)) => {
                for frame in frames {
                    Pin::new(&mut self.cipher).start_send(frame)?;
                }
                Ok(())
            }
            _ => Pin::new(&mut self.cipher).start_send(item),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.cipher).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.cipher).poll_close(cx)
    }
}

impl CipherTrait for GuardedCipher {
    fn remote_public_key(&self) -> Option<[u8; PUBLIC_KEYLEN]> {
        CipherTrait::remote_public_key(&self.cipher)
    }
    fn local_public_key(&self) -> [u8; PUBLIC_KEYLEN] {
        CipherTrait::local_public_key(&self.cipher)
    }
    fn handshake_hash(&self) -> Option<Vec<u8>> {
        CipherTrait::handshake_hash(&self.cipher)
    }
    fn is_initiator(&self) -> bool {
        CipherTrait::is_initiator(&self.cipher)
    }
}

/// Builds a `Protocol` over a byte stream after completing a Noise XX handshake (fresh static
/// key each time). Fails if the handshake fails or the peer goes away; a silent peer makes this
/// wait forever, so wrap it in a timeout. The returned `Protocol` must be polled for
/// `status.closed()` to resolve.
pub async fn protocol<S>(
    io: S,
    initiator: bool,
    limits: TransportLimits,
) -> Result<(Protocol, TransportStatus), TransportFault>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let status = TransportStatus::new();
    let io = SyncIo(std::sync::Mutex::new(io));
    let framed = FramedIo {
        framed: Framed::new(
            io,
            FrameCodec::new(limits.max_frame_len, limits.pre_auth.clone()),
        ),
        status: status.clone(),
        gate: InboundGate::new(status.clone()),
        pre_auth: limits.pre_auth.clone().map(PreAuthWatch::new),
        // XX: the initiator receives message 2 then the header; the responder 1, 3, header.
        frames_to_header: if initiator { 2 } else { 3 },
    };
    let io = Some(Box::new(framed) as Box<dyn hypercore_handshake::CipherIo<Error = io::Error>>);
    let setup = |e: hypercore_handshake::Error| TransportFault::Cipher(e.to_string());
    let cipher = if initiator {
        Cipher::new_dht_init_with_pattern(io, HandshakePattern::XX, None, &[]).map_err(setup)?
    } else {
        let keypair = generate_keypair().map_err(setup)?;
        Cipher::resp_from_private_with_pattern(io, &keypair, HandshakePattern::XX, &[])
            .map_err(setup)?
    };
    let mut guarded = GuardedCipher {
        cipher,
        status: status.clone(),
        max_channel_id: limits.max_channel_id,
        // Room for the cipher's per-message overhead (17 bytes) within the frame limit.
        max_out_len: limits.max_frame_len.min(U24_MAX).saturating_sub(64),
        queued: VecDeque::new(),
        gate: InboundGate::new(status.clone()),
        reported: false,
        pre_auth: limits.pre_auth.zip(limits.root_key),
    };
    futures::future::poll_fn(|cx| guarded.poll_handshake(cx)).await?;
    Ok((Protocol::new(Box::new(guarded)), status))
}

#[cfg(test)]
#[path = "transport_tests.rs"]
mod tests;
