//! Replication: the feed exchange over the Hypercore v10 wire protocol.
//!
//! - `admission`: creates the feeds a peer offers, beside the session loop.
//! - [`dialer`]: keeps a live session with one peer going, reconnecting with
//!   backoff ([`Dialer`], [`Backoff`]).
//! - `session_core`: IO-less state machine of a session — the feed exchange and the
//!   bookkeeping of feed channels.
//! - `session`: the tokio driver of `session_core` over one connection — root
//!   channel, feed channels, feed tasks, timers.
//! - `sim` (tests): a deterministic simulator of many sessions around `session_core`.
//! - `transport`: framing, Noise, and the workarounds for hypercore-protocol's defects.
//! - `frame_check`: IO-less check of every inbound frame before hypercore-protocol decodes it.
//! - [`preauth`]: limits on a connection until the peer authenticates, and slots for
//!   unauthenticated connections.
//! - `feed_sync`: IO-less state machine replicating one feed over one channel.
//! - `feed_task`: the async driver of `feed_sync` against a shared core.

mod admission;
pub mod dialer;
pub(crate) mod feed_sync;
pub(crate) mod feed_task;
pub(crate) mod frame_check;
#[cfg(test)]
mod frame_samples;
pub mod preauth;
mod session;
mod session_core;
#[cfg(test)]
mod sim;
pub(crate) mod transport;

use std::time::Duration;

use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{mpsc, watch},
    task::JoinHandle,
};

pub use self::dialer::{
    Backoff, BackoffPolicy, DialEvent, DialOptions, DialSummary, Dialer, is_fatal,
};
pub use self::preauth::PreAuth;
use crate::{
    FeedKey, Multifeed,
    error::{Error, Result},
    exchange::{CLIENT_NAME, PROTOCOL_VERSION},
};

/// How a replication session behaves. Start from `ReplicateOptions::new(initiator)`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ReplicateOptions {
    /// Whether this side initiated the connection. Exactly one side must be.
    pub initiator: bool,
    /// Keep replicating new data and new feeds until stopped (`true`), or return once
    /// both sides hold every agreed feed (`false`, the default).
    pub live: bool,
    /// Time allowed for the connection, shared-key check and feed-exchange handshake.
    /// Default 10 s. A peer with another shared key fails faster, as soon as its first
    /// channel arrives.
    pub handshake_timeout: Duration,
    /// A session that receives nothing for this long ends with [`Error::IdleTimeout`].
    /// Both sides send keep-alives at a third of it. Default 30 s.
    pub idle_timeout: Duration,
    /// A session waiting on the peer (for feed data, answers or exchange messages)
    /// that gets nothing but keep-alives for this long ends with [`Error::Stalled`]:
    /// a peer that stays connected but never answers cannot hang `replicate`.
    /// Checked at keep-alive ticks. Default 60 s; raise it for very slow links with
    /// large blocks, where one block may take longer than that to arrive.
    pub stall_timeout: Duration,
    /// At most this many feeds sync at once on this connection; the rest wait their
    /// turn. Default 64.
    pub max_active_feeds: usize,
    /// At most this many feeds the peer may offer. Default 100,000.
    pub max_offered_feeds: usize,
    /// At most this many feeds new to us that the peer offered are on trial at
    /// once (requested, not yet delivered a verified block or signed length; more
    /// wait their turn), and at most this many may end their trial having
    /// delivered nothing before the session ends with
    /// [`crate::Error::TooManyUnprovenFeeds`]. Default 256.
    pub max_unproven_feeds: usize,
    /// At most this many offered feeds new to us are requested and waiting for a
    /// place on trial; the rest of the offer is requested as places free up, so
    /// a large offer still arrives in one session while a peer offering
    /// `max_offered_feeds` junk keys costs little more than the keys. Default 1,024.
    pub max_waiting_feeds: usize,
    /// Largest feed-exchange message or block accepted from the peer. Default 4 MiB.
    pub max_message_len: usize,
    /// Block requests in flight per feed. Default 32. A feed with large blocks gets
    /// fewer, so that at most 4 MiB of its blocks are requested and not yet stored
    /// (1 MiB blocks: 4 requests); a connection's memory for data in flight thus
    /// stays near `max_active_feeds` × 4 MiB.
    pub window: usize,
    /// Client name sent in the handshake; peers must use the same. Default `multifeed-rs`.
    pub client_name: String,
    /// Feed-exchange protocol version (semver) sent in the handshake. Peers must share
    /// the major version. Default: this crate's [`PROTOCOL_VERSION`].
    pub protocol_version: String,
    /// Opaque data handed to the peer in the handshake.
    pub user_data: Option<Vec<u8>>,
    /// Limits until the peer proves it holds the key by opening the group channel
    /// (the feed's channel for [`crate::Feed::replicate_raw`]): a deadline, a read
    /// budget and a smaller frame limit (see [`PreAuth`]). A peer that misses the
    /// deadline ends as [`Error::HandshakeTimeout`]. A [`PreAuth`] made with
    /// [`preauth::PeerSlots`] takes a peer slot on authentication, and a server with
    /// none left answers [`Error::ServerBusy`]. Default `None`: for a server open to
    /// anyone, set it on every accepted connection. Costs nothing once authenticated.
    pub pre_auth: Option<PreAuth>,
    /// The account of the peer's address in a [`preauth::PeerAdmissions`]: this
    /// session's feeds on trial are charged to it, and a session that would pass
    /// its limit ends with [`crate::Error::TooManyUnprovenFeeds`] (scope `Peer`).
    /// Default `None` (only the session's and the group's caps apply).
    pub admission_account: Option<preauth::AdmissionAccount>,
}

impl ReplicateOptions {
    /// Defaults, for the initiating or the responding side.
    pub fn new(initiator: bool) -> Self {
        Self {
            initiator,
            live: false,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(60),
            max_active_feeds: 64,
            max_offered_feeds: 100_000,
            max_unproven_feeds: 256,
            max_waiting_feeds: 1024,
            max_message_len: 4 * 1024 * 1024,
            window: 32,
            client_name: CLIENT_NAME.to_string(),
            protocol_version: PROTOCOL_VERSION.to_string(),
            user_data: None,
            pre_auth: None,
            admission_account: None,
        }
    }

    /// Sets [`ReplicateOptions::live`].
    pub fn live(mut self, live: bool) -> Self {
        self.live = live;
        self
    }

    /// Sets [`ReplicateOptions::handshake_timeout`].
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Sets [`ReplicateOptions::idle_timeout`].
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Sets [`ReplicateOptions::stall_timeout`].
    pub fn stall_timeout(mut self, timeout: Duration) -> Self {
        self.stall_timeout = timeout;
        self
    }

    /// Sets [`ReplicateOptions::max_active_feeds`].
    pub fn max_active_feeds(mut self, max: usize) -> Self {
        self.max_active_feeds = max.max(1);
        self
    }

    /// Sets [`ReplicateOptions::max_offered_feeds`].
    pub fn max_offered_feeds(mut self, max: usize) -> Self {
        self.max_offered_feeds = max;
        self
    }

    /// Sets [`ReplicateOptions::admission_account`].
    pub fn admission_account(mut self, account: preauth::AdmissionAccount) -> Self {
        self.admission_account = Some(account);
        self
    }

    /// Sets [`ReplicateOptions::max_unproven_feeds`].
    pub fn max_unproven_feeds(mut self, max: usize) -> Self {
        self.max_unproven_feeds = max.max(1);
        self
    }

    /// Sets [`ReplicateOptions::max_waiting_feeds`].
    pub fn max_waiting_feeds(mut self, max: usize) -> Self {
        self.max_waiting_feeds = max.max(1);
        self
    }

    /// Sets [`ReplicateOptions::protocol_version`].
    pub fn protocol_version(mut self, version: impl Into<String>) -> Self {
        self.protocol_version = version.into();
        self
    }

    /// Sets [`ReplicateOptions::client_name`].
    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.client_name = name.into();
        self
    }

    /// Sets [`ReplicateOptions::user_data`].
    pub fn user_data(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.user_data = Some(data.into());
        self
    }

    /// Sets [`ReplicateOptions::pre_auth`].
    pub fn pre_auth(mut self, pre_auth: PreAuth) -> Self {
        self.pre_auth = Some(pre_auth);
        self
    }

    pub(crate) fn keepalive_interval(&self) -> Duration {
        (self.idle_timeout / 3).max(Duration::from_millis(10))
    }
}

/// What a session did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplicationSummary {
    /// Remote feeds this side learnt (admitted as new members). A feed that
    /// several sessions had on trial at once counts in the one that admitted it.
    pub feeds_learnt: usize,
    /// Feed channels that reached sync.
    pub feeds_synced: usize,
    /// Verified blocks received.
    pub blocks_received: u64,
    /// Bytes of verified blocks received.
    pub bytes_received: u64,
    /// Blocks sent to the peer.
    pub blocks_sent: u64,
    /// Bytes of blocks sent to the peer.
    pub bytes_sent: u64,
    /// The `user_data` of the peer's handshake.
    pub remote_user_data: Option<Vec<u8>>,
    /// How the session ended.
    pub ended: SessionEnd,
}

/// Why a session that ended without an error ended. Errors say why the others did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEnd {
    /// One-shot: both sides hold every agreed feed and said `Done`.
    #[default]
    Completed,
    /// This side asked to stop ([`Replication::stop`]).
    LocalStop,
    /// Live: the peer closed the session on purpose (it stopped, or it was a
    /// one-shot peer that got what it wanted).
    PeerClosed,
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SessionEnd::Completed => "completed",
            SessionEnd::LocalStop => "stopped here",
            SessionEnd::PeerClosed => "the peer closed the session",
        })
    }
}

/// Something that happened during a session.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplicationEvent {
    /// The peer's handshake arrived and was accepted: the session runs. Says who
    /// the peer is, as far as its `user_data` tells (a node id, a name).
    Handshake {
        /// The `user_data` of the peer's handshake.
        remote_user_data: Option<Vec<u8>>,
    },
    /// The peer offered these feeds (one event per manifest it sent).
    RemoteFeeds {
        /// The offered keys.
        keys: Vec<FeedKey>,
        /// The length the peer announced for each key, in the same order (`None`:
        /// not said). With what this side holds, it tells how much is to come.
        lengths: Vec<Option<u64>>,
    },
    /// Download progress of one feed: running totals on this connection.
    Progress {
        /// The feed.
        key: FeedKey,
        /// Blocks received so far.
        blocks: u64,
        /// Bytes received so far.
        bytes: u64,
    },
    /// Upload progress of one feed: running totals sent on this connection.
    Uploaded {
        /// The feed.
        key: FeedKey,
        /// Blocks sent so far.
        blocks: u64,
        /// Bytes sent so far.
        bytes: u64,
    },
    /// A feed reached sync with the peer (both hold what the other had).
    FeedSynced {
        /// The feed.
        key: FeedKey,
    },
}

/// A running replication session. Dropping it aborts the session.
#[derive(Debug)]
pub struct Replication {
    events: mpsc::Receiver<ReplicationEvent>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<ReplicationSummary>>,
}

impl Replication {
    /// The next event, or `None` once the session has ended. Events are buffered
    /// (1,024); a consumer that falls further behind misses some, and replication
    /// never waits for it.
    pub async fn next_event(&mut self) -> Option<ReplicationEvent> {
        self.events.recv().await
    }

    /// Asks the session to end cleanly (closing its channels); [`Replication::finish`]
    /// then returns its summary.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits for the session to end: a one-shot session once everything is in sync, a
    /// live one after [`Replication::stop`] or an error.
    pub async fn finish(mut self) -> Result<ReplicationSummary> {
        let result = (&mut self.task).await;
        match result {
            Ok(result) => result,
            Err(e) => Err(Error::PeerFault {
                reason: format!("replication task failed: {e}"),
            }),
        }
    }
}

impl Drop for Replication {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Multifeed {
    /// Replicates with one peer over `io` (TCP, a duplex pipe, ...) until done: in
    /// one-shot mode until both sides hold every agreed feed. See [`ReplicateOptions`].
    pub async fn replicate<S>(&self, io: S, options: ReplicateOptions) -> Result<ReplicationSummary>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        self.start_replication(io, options).finish().await
    }

    /// Starts replicating with one peer over `io` in a task, returning a handle with
    /// events and a clean stop. Must be called inside a tokio runtime.
    pub fn start_replication<S>(&self, io: S, options: ReplicateOptions) -> Replication
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (events_tx, events) = mpsc::channel(1024);
        let (stop, stop_rx) = watch::channel(false);
        let task = if self.is_read_only() {
            // Replication writes what it receives (and admits new feeds).
            tokio::spawn(async { Err(Error::read_only("replicating")) })
        } else {
            tokio::spawn(session::run(self.clone(), io, options, events_tx, stop_rx))
        };
        Replication { events, stop, task }
    }
}

impl crate::Feed {
    /// Replicates just this feed with a plain Hypercore v10 peer (for example a JS
    /// `hypercore` 10/11 `core.replicate(...)` stream) over `io`, without the feed
    /// exchange: both sides open the feed's channel directly. One-shot mode returns
    /// once both sides hold the same blocks; live mode runs until the peer leaves.
    pub async fn replicate_raw<S>(
        &self,
        io: S,
        options: ReplicateOptions,
    ) -> Result<ReplicationSummary>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        if self.inner.shared.is_read_only() {
            return Err(Error::read_only(format!("replicating feed {}", self.key())));
        }
        session::run_single(self.clone(), io, options).await
    }
}
