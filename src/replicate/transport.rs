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
//! - channel ids above [`TransportLimits::max_channel_id`] end the connection before
//!   `alloc_remote` can grow a Vec to that size;
//! - the handshake completes before `Protocol` is built: otherwise the responder sends `Open`
//!   without a capability when `open` is called early, and the remote rejects the channel.
//!   As a side effect `Event::Handshake` is always the first event (defect 6 cannot occur).
//!
//! - hypercore-protocol queues inbound messages per channel without bound: receivers
//!   registered with [`TransportStatus::watch_inbound`] are counted, and while more
//!   than [`MAX_QUEUED_INBOUND`] messages wait in them, no further frame is read from
//!   the socket (TCP then slows the peer down). A peer flooding requests faster than
//!   they are served cannot grow our memory without bound.
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

use bytes::{Buf, BytesMut};
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
#[derive(Debug, Clone, Copy)]
pub struct TransportLimits {
    /// Largest accepted encrypted frame (clamped to 2^24-1 by the 3-byte prefix).
    pub max_frame_len: usize,
    /// Largest accepted channel id in any inbound frame.
    pub max_channel_id: u64,
}

impl Default for TransportLimits {
    fn default() -> Self {
        // 4 MiB blocks plus room for proofs and encryption overhead.
        Self {
            max_frame_len: 4 * 1024 * 1024 + 64 * 1024,
            max_channel_id: 65_536,
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
    #[error("channel id {id} exceeds limit of {max}")]
    ChannelIdTooLarge { id: u64, max: u64 },
    #[error("malformed frame: {0}")]
    MalformedFrame(&'static str),
    #[error("cipher error: {0}")]
    Cipher(String),
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

/// `LengthDelimitedCodec` with a size check that reports the offending length.
struct FrameCodec {
    inner: LengthDelimitedCodec,
    max: usize,
}

impl FrameCodec {
    fn new(max: usize) -> Self {
        let max = max.min(U24_MAX);
        let inner = LengthDelimitedCodec::builder()
            .little_endian()
            .length_field_length(3)
            .max_frame_length(max)
            .new_codec();
        Self { inner, max }
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = TransportFault;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, TransportFault> {
        self.inner.decode(src).map_err(|e| {
            // On "frame too big" the codec leaves the header in `src`: report the length.
            match e
                .get_ref()
                .and_then(|e| e.downcast_ref::<LengthDelimitedCodecError>())
            {
                Some(_) if src.len() >= 3 => TransportFault::FrameTooLarge {
                    len: usize::from(src[0]) | usize::from(src[1]) << 8 | usize::from(src[2]) << 16,
                    max: self.max,
                },
                _ => e.into(),
            }
        })
    }
}

impl Encoder<Vec<u8>> for FrameCodec {
    type Error = TransportFault;

    fn encode(&mut self, item: Vec<u8>, dst: &mut BytesMut) -> Result<(), TransportFault> {
        Ok(Encoder::<&[u8]>::encode(&mut self.inner, &item, dst)?)
    }
}

/// The cipher's inner transport. Never yields an error or end-of-stream (the cipher would
/// panic on errors and spin/hang on EOF); faults go to `status` and the stream stays pending.
struct FramedIo<S> {
    framed: Framed<S, FrameCodec>,
    status: TransportStatus,
    /// Set while reading is paused for a full inbound backlog.
    paused: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream for FramedIo<S> {
    type Item = io::Result<Vec<u8>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.status.is_closed() {
            return Poll::Pending;
        }
        loop {
            if let Some(pause) = &mut self.paused {
                if pause.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.paused = None;
            }
            if self.status.queued_inbound() <= MAX_QUEUED_INBOUND {
                break;
            }
            // Writing goes on meanwhile: only reading waits for the queues to drain.
            self.paused = Some(Box::pin(tokio::time::sleep(INBOUND_RECHECK)));
        }
        match Pin::new(&mut self.framed).poll_next(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                self.status.touch();
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

/// Reads a compact-encoding uint (`<0xfd` | `0xfd u16` | `0xfe u32` | `0xff u64`, LE).
fn read_uint(buf: &mut &[u8]) -> Option<u64> {
    let (&first, rest) = buf.split_first()?;
    let width = match first {
        0xfd => 2,
        0xfe => 4,
        0xff => 8,
        n => {
            *buf = rest;
            return Some(u64::from(n));
        }
    };
    if rest.len() < width {
        return None;
    }
    let mut bytes = [0u8; 8];
    bytes[..width].copy_from_slice(&rest[..width]);
    *buf = &rest[width..];
    Some(u64::from_le_bytes(bytes))
}

fn write_uint(out: &mut Vec<u8>, n: u64) {
    if n < 0xfd {
        out.push(n as u8);
    } else if n <= u64::from(u16::MAX) {
        out.push(0xfd);
        out.extend_from_slice(&(n as u16).to_le_bytes());
    } else if n <= u64::from(u32::MAX) {
        out.push(0xfe);
        out.extend_from_slice(&(n as u32).to_le_bytes());
    } else {
        out.push(0xff);
        out.extend_from_slice(&n.to_le_bytes());
    }
}

fn check_channel(id: u64, max: u64) -> Result<u64, TransportFault> {
    if id > max {
        return Err(TransportFault::ChannelIdTooLarge { id, max });
    }
    Ok(id)
}

/// Outcome of inspecting one frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Inspected {
    /// Use the frame unchanged.
    Pass,
    /// Use these batches instead, in order: one channel each, each at most `max_len` bytes
    /// unless a single message is larger.
    Split(Vec<Vec<u8>>),
}

/// Checks channel ids and splits batches that switch channel or exceed `max_len`.
///
/// Layouts (hypercore-protocol `message.rs`): batch `00 00 <ch> (<len> <msg>)*` with channel
/// switches `00 <ch>` (a zero length); open `00 01 <ch> ...`; close `00 03 <ch>`;
/// single message `<ch> <type> ...` (also any frame shorter than 3 bytes).
pub fn inspect_frame(
    frame: &[u8],
    max_channel_id: u64,
    max_len: usize,
) -> Result<Inspected, TransportFault> {
    const TRUNCATED: TransportFault = TransportFault::MalformedFrame("truncated channel id");
    if frame.is_empty() {
        return Ok(Inspected::Pass); // keepalive-style empty message; decodes to nothing
    }
    if frame.len() < 3 || frame[0] != 0 {
        let mut rest = frame;
        check_channel(read_uint(&mut rest).ok_or(TRUNCATED)?, max_channel_id)?;
        return Ok(Inspected::Pass);
    }
    let mut rest = &frame[2..];
    match frame[1] {
        0x00 => {}
        0x01 | 0x03 => {
            check_channel(read_uint(&mut rest).ok_or(TRUNCATED)?, max_channel_id)?;
            return Ok(Inspected::Pass);
        }
        _ => return Ok(Inspected::Pass), // upstream rejects it as an invalid special message
    }

    let mut channel = check_channel(read_uint(&mut rest).ok_or(TRUNCATED)?, max_channel_id)?;
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut current: Option<Vec<u8>> = None;
    let mut switched = false;
    while !rest.is_empty() {
        let before = rest;
        let len = read_uint(&mut rest)
            .ok_or(TransportFault::MalformedFrame("truncated message length"))?;
        if len == 0 {
            channel = check_channel(read_uint(&mut rest).ok_or(TRUNCATED)?, max_channel_id)?;
            out.extend(current.take());
            switched = true;
            continue;
        }
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > rest.len() {
            return Err(TransportFault::MalformedFrame(
                "message length past end of frame",
            ));
        }
        let entry = &before[..before.len() - rest.len() + len]; // `<len> <msg>`
        rest.advance(len);
        if current
            .as_ref()
            .is_some_and(|c| c.len() + entry.len() > max_len)
        {
            out.extend(current.take());
        }
        let batch = current.get_or_insert_with(|| {
            let mut b = vec![0, 0];
            write_uint(&mut b, channel);
            b
        });
        batch.extend_from_slice(entry);
    }
    out.extend(current);
    if !switched && out.len() <= 1 {
        return Ok(Inspected::Pass);
    }
    Ok(Inspected::Split(out))
}

/// `Cipher` wrapper that `Protocol` talks to: sanitises decrypted frames and turns a recorded
/// fault into a single error event.
struct GuardedCipher {
    cipher: Cipher,
    status: TransportStatus,
    max_channel_id: u64,
    max_out_len: usize,
    queued: VecDeque<Vec<u8>>,
    reported: bool,
}

impl GuardedCipher {
    /// Drives the Noise handshake to completion before `Protocol` exists: `Protocol` would
    /// otherwise process `open` commands early and send `Open` without a capability (the
    /// handshake hash is missing), which the remote rejects.
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportFault>> {
        loop {
            let polled = Pin::new(&mut self.cipher).poll_next(cx);
            let pending = polled.is_pending();
            match polled {
                Poll::Ready(Some(CipherEvent::Message(frame))) => {
                    match inspect_frame(&frame, self.max_channel_id, usize::MAX) {
                        Ok(Inspected::Pass) => self.queued.push_back(frame),
                        Ok(Inspected::Split(frames)) => self.queued.extend(frames),
                        Err(fault) => self.status.set_fault(fault),
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
            if let Some(frame) = this.queued.pop_front() {
                return Poll::Ready(Some(CipherEvent::Message(frame)));
            }
            if this.reported {
                return Poll::Pending; // connection is over; the error was already surfaced
            }
            // Keep polling the cipher after a read fault: it still holds frames received
            // before EOF. Our inner stream is pending by then, so this only drains.
            match Pin::new(&mut this.cipher).poll_next(cx) {
                Poll::Ready(Some(CipherEvent::Message(frame))) => {
                    match inspect_frame(&frame, this.max_channel_id, usize::MAX) {
                        Ok(Inspected::Pass) => {
                            return Poll::Ready(Some(CipherEvent::Message(frame)));
                        }
                        Ok(Inspected::Split(frames)) => this.queued.extend(frames),
                        Err(fault) => return this.report(fault),
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
        match inspect_frame(&item, u64::MAX, self.max_out_len) {
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
        framed: Framed::new(io, FrameCodec::new(limits.max_frame_len)),
        status: status.clone(),
        paused: None,
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
        reported: false,
    };
    futures::future::poll_fn(|cx| guarded.poll_handshake(cx)).await?;
    Ok((Protocol::new(Box::new(guarded)), status))
}

#[cfg(test)]
#[path = "transport_tests.rs"]
mod tests;
