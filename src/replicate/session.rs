//! One replication session: the feed exchange on the root channel, and one
//! hypercore channel per agreed feed, over a single connection.
//!
//! Sequence: Noise handshake → both open the root channel on the shared key (the
//! capability check proves the peer knows it) → `Handshake` both ways (client,
//! semver) → `Manifest` of member keys with lengths → `Request` for what each side
//! wants (always sent, possibly empty) → the requester opens a channel per wanted
//! feed, at most `max_active_feeds` syncing at once; the other side answers each open
//! → per-feed replication. One-shot: each side sends `Done` when it wants nothing
//! more and has served every request; the session ends when both have.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use hypercore_protocol::{
    Channel, CommandTx, DiscoveryKey, Event as ProtocolEvent, Message, Protocol, discovery_key,
    schema::Extension,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{mpsc, oneshot, watch},
    task::JoinSet,
};

use super::{
    ReplicateOptions, ReplicationEvent, ReplicationSummary, SessionEnd,
    admission::{Admission, Admitted},
    feed_task::{
        FeedSyncError, FeedSyncOptions, FeedSyncSummary, OneShotClose, Progress, run_feed,
    },
    transport::{self, TransportFault, TransportLimits, TransportStatus},
};
use crate::{
    Event, FeedKey, Multifeed,
    error::{Error, Result},
    exchange::{DecodeError, ExchangeLimits, ExchangeMessage, Handshake, OfferedFeed},
};

/// Name of the Extension message that carries the feed exchange.
const EXCHANGE_EXTENSION: &str = "multifeed/exchange";
/// How long a session that fails the handshake keeps the link up so the peer
/// receives our handshake too (both sides must see the mismatch).
const LINGER: Duration = Duration::from_millis(500);

type FeedResult = (FeedKey, std::result::Result<FeedSyncSummary, FeedSyncError>);

pub(crate) async fn run<S>(
    multifeed: Multifeed,
    io: S,
    options: ReplicateOptions,
    events: mpsc::Sender<ReplicationEvent>,
    stop: watch::Receiver<bool>,
) -> Result<ReplicationSummary>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (protocol, status) = connect(io, &options).await?;
    let mut session = Session::new(
        multifeed,
        options,
        protocol.commands(),
        events,
        status.clone(),
    );
    let result = session.drive(protocol, &status, stop).await;
    session.tasks.abort_all();
    session.synced.abort_all();
    session.admission.shutdown().await;
    result
}

/// The encrypted, framed protocol over `io`, within the handshake timeout.
async fn connect<S>(io: S, options: &ReplicateOptions) -> Result<(Protocol, TransportStatus)>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let limits = TransportLimits {
        max_frame_len: options.max_message_len + 64 * 1024,
        ..TransportLimits::default()
    };
    tokio::time::timeout(
        options.handshake_timeout,
        transport::protocol(io, options.initiator, limits),
    )
    .await
    .map_err(|_| Error::HandshakeTimeout {
        after: options.handshake_timeout,
    })?
    .map_err(transport_error)
}

fn transport_error(fault: TransportFault) -> Error {
    match fault {
        TransportFault::Eof | TransportFault::Io(_) | TransportFault::Cipher(_) => {
            Error::ConnectionLost {
                reason: fault.to_string(),
            }
        }
        other => Error::PeerFault {
            reason: other.to_string(),
        },
    }
}

fn feed_error(key: FeedKey, error: FeedSyncError) -> Error {
    match error {
        FeedSyncError::InvalidData { reason, .. } => Error::InvalidData {
            key: key.to_hex(),
            reason,
        },
        FeedSyncError::Protocol(violation) => Error::PeerFault {
            reason: format!("feed {key}: {violation}"),
        },
        FeedSyncError::Core(source) => Error::core(key, source),
        FeedSyncError::Load(error) => *error,
        FeedSyncError::ClosedBeforeSync | FeedSyncError::Io(_) => Error::ConnectionLost {
            reason: format!("feed {key}: {error}"),
        },
        other => Error::PeerFault {
            reason: format!("feed {key}: {other}"),
        },
    }
}

struct Session {
    multifeed: Multifeed,
    options: ReplicateOptions,
    commands: CommandTx,
    events: mpsc::Sender<ReplicationEvent>,
    root_dk: DiscoveryKey,
    root: Option<Channel>,
    root_rx: Option<hypercore_protocol::ChannelReceiver<Message>>,
    /// The connection; its inbound backlog counts the root channel's queue.
    status: TransportStatus,
    _root_watch: Option<transport::InboundWatch>,
    handshake_done: bool,
    /// Member feeds we told the peer about, by discovery key.
    offered: HashMap<DiscoveryKey, FeedKey>,
    /// The same feeds by key, so membership events need no hashing.
    offered_keys: HashSet<FeedKey>,
    /// Feeds the peer told us about.
    remote_offer: HashSet<FeedKey>,
    /// Feeds we requested that are new to us, being created.
    admission: Admission,
    /// Feeds we requested and have not opened yet (all members by now).
    queue: FeedQueue,
    /// Feeds we opened and that are not in sync yet.
    syncing: HashSet<FeedKey>,
    /// Feeds the peer requested from us and that are not in sync yet.
    serving: HashSet<FeedKey>,
    /// Feeds with a running channel on this connection.
    running: HashSet<FeedKey>,
    /// Feed channels we asked the protocol to open and that have not closed since, by
    /// discovery key. hypercore-protocol makes a second `Channel` for a second open of
    /// the same key and routes the peer's messages to it alone, so a key is opened at
    /// most once until its channel closes.
    open_channels: HashMap<DiscoveryKey, FeedKey>,
    /// A channel that opened again while the task of its previous channel was still
    /// finishing; it starts when that task ends (its messages queue meanwhile).
    next_channels: HashMap<FeedKey, Channel>,
    /// Count of running feed tasks, which they read to pick their pipelining.
    active_feeds: Arc<AtomicUsize>,
    /// When the peer last moved replication on (see [`Session::waiting_on_peer`]).
    activity: Arc<transport::LastSeen>,
    /// Times a feed was re-requested after the peer closed its channel early.
    retries: HashMap<FeedKey, u8>,
    got_manifest: bool,
    got_request: bool,
    /// Live: the peer closed the group channel on purpose.
    peer_left: bool,
    /// The connection ended after the agreed end of the session.
    connection_ended: bool,
    /// The connection ended; decided on after the protocol's last events.
    lost: Option<Error>,
    done_sent: bool,
    done_received: bool,
    tasks: JoinSet<FeedResult>,
    /// Resolves with a feed's key when its channel first reaches sync (live mode).
    synced: JoinSet<Option<FeedKey>>,
    progress_tx: mpsc::Sender<Progress>,
    progress_rx: mpsc::Receiver<Progress>,
    summary: ReplicationSummary,
    limits: ExchangeLimits,
}

impl Session {
    fn new(
        multifeed: Multifeed,
        options: ReplicateOptions,
        commands: CommandTx,
        events: mpsc::Sender<ReplicationEvent>,
        status: TransportStatus,
    ) -> Self {
        let root_dk = discovery_key(multifeed.shared_key().as_bytes());
        let (progress_tx, progress_rx) = mpsc::channel(1024);
        let limits = ExchangeLimits {
            max_message_len: options.max_message_len,
            max_feeds_per_message: options.max_offered_feeds,
        };
        Self {
            admission: Admission::spawn(multifeed.clone()),
            multifeed,
            options,
            commands,
            events,
            root_dk,
            root: None,
            root_rx: None,
            status,
            _root_watch: None,
            handshake_done: false,
            offered: HashMap::new(),
            offered_keys: HashSet::new(),
            remote_offer: HashSet::new(),
            queue: FeedQueue::default(),
            syncing: HashSet::new(),
            serving: HashSet::new(),
            running: HashSet::new(),
            open_channels: HashMap::new(),
            next_channels: HashMap::new(),
            active_feeds: Arc::new(AtomicUsize::new(0)),
            activity: Arc::new(transport::LastSeen::new()),
            retries: HashMap::new(),
            got_manifest: false,
            got_request: false,
            peer_left: false,
            connection_ended: false,
            lost: None,
            done_sent: false,
            done_received: false,
            tasks: JoinSet::new(),
            synced: JoinSet::new(),
            progress_tx,
            progress_rx,
            summary: ReplicationSummary::default(),
            limits,
        }
    }

    fn offer(&mut self, key: FeedKey) {
        self.offered.insert(discovery_key(key.as_bytes()), key);
        self.offered_keys.insert(key);
    }

    fn emit(&self, event: ReplicationEvent) {
        // Events are advisory: a consumer that does not keep up loses some, never stalls us.
        let _ = self.events.try_send(event);
    }

    async fn drive(
        &mut self,
        mut protocol: Protocol,
        status: &TransportStatus,
        mut stop: watch::Receiver<bool>,
    ) -> Result<ReplicationSummary> {
        let handshake_deadline = tokio::time::Instant::now() + self.options.handshake_timeout;
        self.commands
            .open(*self.multifeed.shared_key().as_bytes())
            .await
            .map_err(|e| Error::ConnectionLost {
                reason: e.to_string(),
            })?;
        let mut member_events = self.multifeed.events();
        // The first tick is one period away, not immediate.
        let period = self.options.keepalive_interval();
        let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        let outcome: Result<()> = loop {
            let step = tokio::select! {
                event = protocol.next() => match event {
                    Some(Ok(event)) => self.on_protocol_event(event).await,
                    Some(Err(e)) => {
                        self.lost = Some(status.fault().map(transport_error).unwrap_or(Error::ConnectionLost { reason: e.to_string() }));
                        Ok(())
                    }
                    None => {
                        self.lost = Some(Error::ConnectionLost { reason: "the protocol stream ended".into() });
                        Ok(())
                    }
                },
                message = recv_root(&mut self.root_rx) => match message {
                    Some(message) => self.on_root_message(message).await,
                    None => self.on_root_closed().await,
                },
                Some(joined) = self.tasks.join_next() => match joined {
                    Ok((key, result)) => self.on_feed_finished(key, result).await,
                    Err(e) => Err(Error::PeerFault { reason: format!("feed task failed: {e}") }),
                },
                Some(Ok(Some(key))) = self.synced.join_next() => {
                    self.syncing.remove(&key);
                    self.serving.remove(&key);
                    match self.pump_queue().await {
                        Ok(()) => self.maybe_done().await,
                        Err(e) => Err(e),
                    }
                },
                admitted = self.admission.next(), if self.queue.len() < self.options.max_active_feeds * 4 => {
                    match admitted {
                        Ok(admitted) => self.on_admitted(admitted).await,
                        Err(e) => Err(e),
                    }
                },
                Some(progress) = self.progress_rx.recv() => {
                    self.emit(ReplicationEvent::Progress {
                        key: FeedKey::from_bytes(progress.key),
                        blocks: progress.blocks,
                        bytes: progress.bytes,
                    });
                    Ok(())
                },
                Some(event) = member_events.next(), if self.handshake_done => {
                    self.on_member_event(event).await
                },
                _ = tokio::time::sleep_until(handshake_deadline), if !self.handshake_done => {
                    Err(Error::HandshakeTimeout { after: self.options.handshake_timeout })
                },
                _ = keepalive.tick() => self.on_tick(status).await,
                _ = stop.changed() => {
                    self.summary.ended = SessionEnd::LocalStop;
                    break Ok(());
                },
            };
            let step = match (step, self.lost.take()) {
                (Ok(()), Some(lost)) => self.on_connection_end(&mut protocol, lost).await,
                (step, _) => step,
            };
            if let Err(e) = step {
                break Err(e);
            }
            if self.peer_left {
                self.summary.ended = SessionEnd::PeerClosed;
                break Ok(());
            }
            if self.connection_ended {
                break Ok(());
            }
            // A live session answering a one-shot peer keeps its channels open, so it
            // ends when that peer, having both Dones, closes the group channel.
            if self.done_sent
                && self.done_received
                && (self.running.is_empty() || self.root_rx.is_none())
            {
                break Ok(());
            }
        };

        match outcome {
            Ok(()) => {
                if let Some(root) = &self.root {
                    let _ = root.close().await;
                }
                // Let the close (and anything queued before it) reach the peer, and
                // count feed tasks that were still finishing their channels.
                self.linger_collecting(&mut protocol).await;
                Ok(self.summary.clone())
            }
            Err(error) => {
                if matches!(
                    error,
                    Error::VersionMismatch { .. }
                        | Error::ClientMismatch { .. }
                        | Error::SharedKeyMismatch
                ) {
                    // The peer must get our handshake too, so both sides see the mismatch.
                    flush(&mut protocol);
                }
                Err(error)
            }
        }
    }

    async fn on_tick(&mut self, status: &TransportStatus) -> Result<()> {
        if !self.handshake_done {
            return Ok(());
        }
        tracing::debug!(
            queued = self.queue.len(),
            admitting = !self.admission.is_idle(),
            syncing = self.syncing.len(),
            serving = self.serving.len(),
            running = self.running.len(),
            got_manifest = self.got_manifest,
            got_request = self.got_request,
            done_sent = self.done_sent,
            done_received = self.done_received,
            "replication state"
        );
        if status.last_received().elapsed() >= self.options.idle_timeout {
            return Err(Error::IdleTimeout {
                after: self.options.idle_timeout,
            });
        }
        if self.waiting_on_peer() && self.activity.at().elapsed() >= self.options.stall_timeout {
            return Err(Error::Stalled {
                after: self.options.stall_timeout,
            });
        }
        // Both Dones exchanged: the peer may already have closed the group channel.
        if self.done_sent && self.done_received {
            return Ok(());
        }
        self.send(ExchangeMessage::Ping(rand::random())).await
    }

    /// Whether the next step is the peer's: its exchange messages, its answer to a
    /// feed channel we opened, or data on a running feed channel. A live session
    /// with every feed in sync waits on nobody; feeds still being created or queued
    /// wait on us.
    fn waiting_on_peer(&self) -> bool {
        let exchange = !self.got_manifest || (!self.options.live && !self.got_request);
        let feeds = !self.syncing.is_empty() || (!self.options.live && !self.running.is_empty());
        let done = !self.options.live && self.done_sent && !self.done_received;
        exchange || feeds || done
    }

    async fn send(&self, message: ExchangeMessage) -> Result<()> {
        let Some(root) = &self.root else {
            return Ok(());
        };
        root.send(Message::Extension(Extension {
            name: EXCHANGE_EXTENSION.to_string(),
            message: message.encode(),
        }))
        .await
        .map_err(|e| Error::ConnectionLost {
            reason: e.to_string(),
        })
    }

    async fn on_protocol_event(&mut self, event: ProtocolEvent) -> Result<()> {
        match event {
            ProtocolEvent::Channel(mut channel) => {
                if *channel.discovery_key() == self.root_dk {
                    self.root_rx = channel.take_receiver();
                    self._root_watch = self
                        .root_rx
                        .as_ref()
                        .map(|rx| self.status.watch_inbound(rx));
                    self.root = Some(channel);
                    self.send(ExchangeMessage::Handshake(Handshake {
                        client: self.options.client_name.clone(),
                        protocol_version: self.options.protocol_version.clone(),
                        user_data: self.options.user_data.clone(),
                    }))
                    .await?;
                } else {
                    self.start_feed(channel);
                }
            }
            ProtocolEvent::DiscoveryKey(dk) => {
                if dk == self.root_dk {
                    return Ok(());
                }
                if self.root.is_none() {
                    // The peer's first channel is another group's root: another shared key.
                    return Err(Error::SharedKeyMismatch);
                }
                if let Some(key) = self.offered.get(&dk).copied() {
                    // The peer's channel also serves our own want of this feed.
                    if self.queue.remove(&key) {
                        self.syncing.insert(key);
                    }
                    self.open(key).await?;
                } else {
                    tracing::debug!(dk = %hex::encode(dk), "peer opened a feed we did not offer; ignored");
                }
            }
            ProtocolEvent::Close(dk) if dk == self.root_dk => {
                return self.on_root_closed().await;
            }
            ProtocolEvent::Close(dk) => {
                // A feed we still want whose task already ended (it was re-queued
                // while this close was on its way) opens a fresh channel now.
                if let Some(key) = self.open_channels.remove(&dk)
                    && self.syncing.contains(&key)
                    && !self.running.contains(&key)
                {
                    self.open(key).await?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The peer closed the group channel: fine once both sides said `Done`.
    async fn on_root_closed(&mut self) -> Result<()> {
        // Messages it sent before closing may still be queued behind the close event.
        if let Some(rx) = self.root_rx.take() {
            while let Ok(message) = rx.try_recv() {
                self.on_root_message(message).await?;
            }
        }
        if self.done_sent && self.done_received {
            if self.options.live {
                self.peer_left = true;
            }
            Ok(())
        } else if self.options.live && self.handshake_done {
            // A live session has no end of its own: the peer leaving is one.
            self.peer_left = true;
            Ok(())
        } else {
            Err(Error::ConnectionLost {
                reason: "the peer closed the group channel before replication finished".into(),
            })
        }
    }

    fn start_feed(&mut self, channel: Channel) {
        let key = FeedKey::from_bytes(*channel.key());
        let Some(feed) = self.multifeed.feed(key) else {
            tracing::debug!(%key, "channel for a feed that is not a member; closed");
            refuse_channel(channel);
            return;
        };
        if self.running.contains(&key) {
            // The previous channel's task is still finishing: this one waits for it.
            if let Some(older) = self.next_channels.insert(key, channel) {
                refuse_channel(older);
            }
            return;
        }
        self.running.insert(key);
        let (synced_tx, synced_rx) = oneshot::channel();
        self.synced
            .spawn(async move { synced_rx.await.ok().map(|()| key) });
        let options = FeedSyncOptions {
            live: self.options.live,
            window: self.options.window,
            close: OneShotClose::Agreed {
                closer: self.options.initiator,
            },
            active_feeds: Some(self.active_feeds.clone()),
            activity: Some(self.activity.clone()),
            inbound: Some(self.status.clone()),
        };
        let shared = feed.shared().clone();
        let progress = self.progress_tx.clone();
        let active = ActiveFeed::enter(&self.active_feeds);
        self.tasks.spawn(async move {
            let result = run_feed(channel, shared, options, Some(progress), Some(synced_tx)).await;
            drop(active);
            (key, result)
        });
    }

    /// Opens the feed's channel unless it is open or opening already.
    async fn open(&mut self, key: FeedKey) -> Result<()> {
        let dk = discovery_key(key.as_bytes());
        if self.open_channels.insert(dk, key).is_some() {
            return Ok(());
        }
        self.commands
            .open(*key.as_bytes())
            .await
            .map_err(|e| Error::ConnectionLost {
                reason: e.to_string(),
            })
    }

    async fn on_feed_finished(
        &mut self,
        key: FeedKey,
        result: std::result::Result<FeedSyncSummary, FeedSyncError>,
    ) -> Result<()> {
        tracing::trace!(%key, ?result, "feed channel finished");
        let outcome = self.on_feed_result(key, result).await;
        if outcome.is_ok()
            && !self.running.contains(&key)
            && let Some(channel) = self.next_channels.remove(&key)
        {
            self.start_feed(channel);
        }
        outcome
    }

    async fn on_feed_result(
        &mut self,
        key: FeedKey,
        result: std::result::Result<FeedSyncSummary, FeedSyncError>,
    ) -> Result<()> {
        match result {
            Ok(summary) => {
                self.count_finished(key, summary);
                self.pump_queue().await?;
                self.maybe_done().await
            }
            // The peer judged the feed in sync and closed first, before our view caught
            // up: ask for it again (bounded), which settles it on a fresh channel.
            Err(FeedSyncError::ClosedBeforeSync)
                if self.retries.get(&key).copied().unwrap_or(0) < 3 =>
            {
                self.running.remove(&key);
                *self.retries.entry(key).or_insert(0) += 1;
                self.serving.remove(&key);
                if self.syncing.remove(&key) {
                    self.queue.push(key);
                }
                self.pump_queue().await?;
                self.maybe_done().await
            }
            Err(error) => Err(feed_error(key, error)),
        }
    }

    /// Adds a feed task's counts to the summary.
    fn count_finished(&mut self, key: FeedKey, summary: FeedSyncSummary) {
        self.running.remove(&key);
        self.summary.blocks_received += summary.blocks_received;
        self.summary.bytes_received += summary.bytes_received;
        self.summary.blocks_sent += summary.blocks_sent;
        self.summary.bytes_sent += summary.bytes_sent;
        if summary.synced {
            self.summary.feeds_synced += 1;
            self.syncing.remove(&key);
            self.serving.remove(&key);
            self.emit(ReplicationEvent::FeedSynced { key });
        }
    }

    /// Writes out what we queued (our close), then, one-shot, waits (at most
    /// [`LINGER`]) for feed tasks still finishing their channels, to count them.
    /// Nothing waits for the peer to hang up: it has what it needs once our
    /// messages are written.
    async fn linger_collecting(&mut self, protocol: &mut Protocol) {
        flush(protocol);
        let deadline = tokio::time::Instant::now() + LINGER;
        let status = self.status.clone();
        let mut connected = true;
        while !self.options.live && !self.tasks.is_empty() {
            tokio::select! {
                biased;
                Some(joined) = self.tasks.join_next() => {
                    if let Ok((key, Ok(summary))) = joined {
                        self.count_finished(key, summary);
                    }
                }
                event = protocol.next(), if connected => {
                    connected = matches!(event, Some(Ok(_)));
                }
                _ = status.closed(), if connected => connected = false,
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        flush(protocol);
    }

    /// The connection ended. The peer's last exchange messages (its `Done`, its
    /// handshake) may still wait in the group channel's queue: they decide whether
    /// this was the agreed end of a one-shot session, a refusal, or a lost link.
    async fn on_connection_end(&mut self, protocol: &mut Protocol, lost: Error) -> Result<()> {
        // Events the protocol queued before it met the end (the peer's open of
        // another group's channel, say) come first.
        for _ in 0..64 {
            match futures::FutureExt::now_or_never(protocol.next()) {
                Some(Some(Ok(event))) => self.on_protocol_event(event).await?,
                _ => break,
            }
        }
        let mut closed_by_peer = false;
        if let Some(rx) = self.root_rx.take() {
            while let Ok(message) = rx.try_recv() {
                closed_by_peer |= matches!(message, Message::Close(_));
                self.on_root_message(message).await?;
            }
        }
        if self.done_sent && self.done_received {
            self.peer_left = self.options.live;
            self.connection_ended = true;
            Ok(())
        } else if self.peer_left || (closed_by_peer && self.options.live && self.handshake_done) {
            // It closed the group channel before hanging up: it left on purpose.
            self.peer_left = true;
            Ok(())
        } else {
            Err(lost)
        }
    }

    async fn on_root_message(&mut self, message: Message) -> Result<()> {
        let Message::Extension(Extension { name, message }) = message else {
            return Ok(());
        };
        if name != EXCHANGE_EXTENSION {
            return Ok(());
        }
        let message = ExchangeMessage::decode(&message, &self.limits).map_err(|e| match e {
            DecodeError::TooManyFeeds { count, max } => Error::PeerFault {
                reason: format!("it offered {count} feeds in one message (limit {max})"),
            },
            other => Error::PeerFault {
                reason: format!("undecodable exchange message: {other}"),
            },
        })?;
        if !matches!(message, ExchangeMessage::Ping(_)) {
            self.activity.touch();
        }
        match message {
            ExchangeMessage::Handshake(handshake) => self.on_handshake(handshake).await,
            ExchangeMessage::Manifest(feeds) if self.handshake_done => {
                self.on_manifest(feeds).await
            }
            ExchangeMessage::Request(keys) if self.handshake_done => self.on_request(keys).await,
            ExchangeMessage::Done if self.handshake_done => {
                self.done_received = true;
                self.maybe_done().await
            }
            ExchangeMessage::Ping(_) => Ok(()),
            ExchangeMessage::Unknown if self.handshake_done => {
                tracing::debug!(
                    "ignored a feed-exchange message of a kind this version does not know"
                );
                Ok(())
            }
            _ => Err(Error::PeerFault {
                reason: "it sent feed-exchange messages before its handshake".into(),
            }),
        }
    }

    async fn on_handshake(&mut self, handshake: Handshake) -> Result<()> {
        if self.handshake_done {
            return Err(Error::PeerFault {
                reason: "it sent a second handshake".into(),
            });
        }
        if handshake.client != self.options.client_name {
            return Err(Error::ClientMismatch {
                ours: self.options.client_name.clone(),
                theirs: handshake.client.chars().take(100).collect(),
            });
        }
        let ours = semver::Version::parse(&self.options.protocol_version).ok();
        let theirs = semver::Version::parse(&handshake.protocol_version).ok();
        match (ours, theirs) {
            (Some(ours), Some(theirs)) if ours.major == theirs.major => {}
            _ => {
                return Err(Error::VersionMismatch {
                    ours: self.options.protocol_version.clone(),
                    theirs: handshake.protocol_version.chars().take(100).collect(),
                });
            }
        }
        self.handshake_done = true;
        self.summary.remote_user_data = handshake.user_data;
        // Offer every member; later members are announced as they are added.
        let feeds = self.multifeed.feeds();
        let mut offer = Vec::with_capacity(feeds.len());
        for feed in feeds {
            let key = feed.key();
            self.offer(key);
            offer.push(OfferedFeed {
                key,
                length: Some(feed.len().await),
                metadata: Default::default(),
            });
        }
        for chunk in offer.chunks(self.limits.max_feeds_per_message.clamp(1, 10_000)) {
            self.send(ExchangeMessage::Manifest(chunk.to_vec())).await?;
        }
        if offer.is_empty() {
            self.send(ExchangeMessage::Manifest(Vec::new())).await?;
        }
        Ok(())
    }

    async fn on_manifest(&mut self, feeds: Vec<OfferedFeed>) -> Result<()> {
        if self.remote_offer.len() + feeds.len() > self.options.max_offered_feeds {
            return Err(Error::PeerFault {
                reason: format!(
                    "it offered more than {} feeds (ReplicateOptions::max_offered_feeds)",
                    self.options.max_offered_feeds
                ),
            });
        }
        // A correct peer offers only feed public keys; refuse before admitting any.
        if let Some(bad) = feeds.iter().find(|f| f.key.verifying_key().is_err()) {
            return Err(Error::PeerFault {
                reason: format!("it offered {}, which is not a feed public key", bad.key),
            });
        }
        let mut wanted = Vec::new();
        for offered in &feeds {
            let key = offered.key;
            if key.as_bytes() == self.multifeed.shared_key().as_bytes() {
                continue;
            }
            self.remote_offer.insert(key);
            let want = match self.multifeed.feed(key) {
                None => true,
                // Live: keep a channel on every shared feed so appends flow both ways.
                Some(_) if self.options.live => true,
                // Compare with what we hold without gaps: a cut sync leaves holes.
                Some(feed) => offered.length.unwrap_or(u64::MAX) > feed.contiguous_len().await,
            };
            if want
                && !self.queue.contains(&key)
                && !self.syncing.contains(&key)
                && !self.admission.contains(&key)
            {
                wanted.push(key);
            }
        }
        self.got_manifest = true;
        self.emit(ReplicationEvent::RemoteFeeds {
            keys: feeds.iter().map(|f| f.key).collect(),
            lengths: feeds.iter().map(|f| f.length).collect(),
        });
        self.send(ExchangeMessage::Request(wanted.clone())).await?;
        let (known, new): (Vec<FeedKey>, Vec<FeedKey>) = wanted
            .into_iter()
            .partition(|key| self.multifeed.contains(key));
        self.admission.submit(new);
        for key in known {
            self.queue.push(key);
        }
        self.pump_queue().await?;
        self.maybe_done().await
    }

    /// Feeds the admission task created: they join the queue.
    async fn on_admitted(&mut self, admitted: Admitted) -> Result<()> {
        self.summary.feeds_learnt += admitted.created;
        for key in admitted.keys {
            self.queue.push(key);
        }
        self.pump_queue().await?;
        self.maybe_done().await
    }

    async fn on_request(&mut self, keys: Vec<FeedKey>) -> Result<()> {
        for key in keys {
            if self.offered_keys.contains(&key) {
                self.serving.insert(key);
            } else {
                tracing::debug!(%key, "peer requested a feed we did not offer; ignored");
            }
        }
        self.got_request = true;
        self.maybe_done().await
    }

    /// Opens queued feeds while fewer than `max_active_feeds` are syncing.
    async fn pump_queue(&mut self) -> Result<()> {
        while self.syncing.len() < self.options.max_active_feeds {
            let Some(key) = self.queue.pop() else {
                break;
            };
            tracing::trace!(%key, "opening feed channel");
            self.syncing.insert(key);
            self.open(key).await?;
        }
        Ok(())
    }

    /// One-shot: says `Done` once we want nothing more and served every request.
    /// Live: says it only in answer to a one-shot peer's `Done`, so that peer's
    /// `replicate` can return; the live session stays up for other peers' sake.
    async fn maybe_done(&mut self) -> Result<()> {
        if self.done_sent || (self.options.live && !self.done_received) {
            return Ok(());
        }
        if self.got_manifest
            && self.got_request
            && self.queue.is_empty()
            && self.admission.is_idle()
            && self.syncing.is_empty()
            && self.serving.is_empty()
        {
            self.done_sent = true;
            self.send(ExchangeMessage::Done).await?;
        }
        Ok(())
    }

    async fn on_member_event(&mut self, event: Event) -> Result<()> {
        if self.done_sent {
            return Ok(());
        }
        let keys: Vec<FeedKey> = match event {
            Event::FeedAdded { key, .. } => vec![key],
            Event::Lagged { .. } => self.multifeed.feeds().iter().map(|f| f.key()).collect(),
        };
        let mut announce = Vec::new();
        for key in keys {
            if self.offered_keys.contains(&key) || self.remote_offer.contains(&key) {
                continue;
            }
            let Some(feed) = self.multifeed.feed(key) else {
                continue;
            };
            self.offer(key);
            announce.push(OfferedFeed {
                key,
                length: Some(feed.len().await),
                metadata: Default::default(),
            });
        }
        if announce.is_empty() {
            return Ok(());
        }
        self.send(ExchangeMessage::Manifest(announce)).await
    }
}

/// Counts a running feed task for as long as it lives (also when aborted).
struct ActiveFeed(Arc<AtomicUsize>);

impl ActiveFeed {
    fn enter(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        ActiveFeed(count.clone())
    }
}

impl Drop for ActiveFeed {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Closes a channel we will not run, and reads what the peer sent before seeing the
/// close: hypercore-protocol ends the whole connection when a message arrives for a
/// channel whose receiver is gone.
fn refuse_channel(mut channel: Channel) {
    let receiver = channel.take_receiver();
    tokio::spawn(async move {
        let _ = channel.close().await;
        if let Some(receiver) = receiver {
            while receiver.recv().await.is_ok() {}
        }
    });
}

/// Feeds waiting for a channel, in request order, with O(1) membership.
#[derive(Default)]
struct FeedQueue {
    order: VecDeque<FeedKey>,
    members: HashSet<FeedKey>,
}

impl FeedQueue {
    fn push(&mut self, key: FeedKey) {
        if self.members.insert(key) {
            self.order.push_back(key);
        }
    }

    fn pop(&mut self) -> Option<FeedKey> {
        // Keys removed out of order are skipped here.
        while let Some(key) = self.order.pop_front() {
            if self.members.remove(&key) {
                return Some(key);
            }
        }
        None
    }

    /// Takes `key` out of the queue; whether it was queued.
    fn remove(&mut self, key: &FeedKey) -> bool {
        self.members.remove(key)
    }

    fn contains(&self, key: &FeedKey) -> bool {
        self.members.contains(key)
    }

    fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    fn len(&self) -> usize {
        self.members.len()
    }
}

/// Writes out what the protocol has queued (its close, say) without waiting for
/// anything to arrive: each poll that finds nothing to read has written the outbound
/// queue and flushed it.
fn flush(protocol: &mut Protocol) {
    use futures::FutureExt;
    for _ in 0..64 {
        match protocol.next().now_or_never() {
            Some(Some(Ok(_))) => continue,
            _ => break,
        }
    }
}

/// Keeps the protocol polled for at most [`LINGER`] so queued messages reach the
/// peer before the connection is dropped; ends early when the peer closes.
async fn linger(protocol: &mut Protocol) {
    let _ = tokio::time::timeout(LINGER, async {
        while let Some(Ok(_)) = protocol.next().await {}
    })
    .await;
}

async fn recv_root(
    rx: &mut Option<hypercore_protocol::ChannelReceiver<Message>>,
) -> Option<Message> {
    match rx {
        Some(rx) => rx.recv().await.ok(),
        None => std::future::pending().await,
    }
}

/// Replicates one feed with a plain hypercore peer: no root channel, no exchange.
pub(crate) async fn run_single<S>(
    feed: crate::Feed,
    io: S,
    options: ReplicateOptions,
) -> Result<ReplicationSummary>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut protocol, status) = connect(io, &options).await?;
    let key = feed.key();
    protocol
        .commands()
        .open(*key.as_bytes())
        .await
        .map_err(|e| Error::ConnectionLost {
            reason: e.to_string(),
        })?;
    let deadline = tokio::time::Instant::now() + options.handshake_timeout;
    let channel = loop {
        let event = tokio::time::timeout_at(deadline, protocol.next())
            .await
            .map_err(|_| Error::HandshakeTimeout {
                after: options.handshake_timeout,
            })?;
        match event {
            Some(Ok(ProtocolEvent::Channel(channel))) if channel.key() == key.as_bytes() => {
                break channel;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                return Err(status
                    .fault()
                    .map(transport_error)
                    .unwrap_or(Error::ConnectionLost {
                        reason: e.to_string(),
                    }));
            }
            None => {
                return Err(Error::ConnectionLost {
                    reason: "the protocol stream ended".into(),
                });
            }
        }
    };
    // Plain hypercore peers know nothing of FEED_DONE.
    let sync_options = FeedSyncOptions {
        live: options.live,
        window: options.window,
        close: OneShotClose::Immediate,
        active_feeds: None,
        activity: None,
        inbound: Some(status.clone()),
    };
    let mut task = tokio::spawn(run_feed(
        channel,
        feed.shared().clone(),
        sync_options,
        None,
        None,
    ));
    let mut idle = tokio::time::interval(options.keepalive_interval());
    let result = loop {
        tokio::select! {
            joined = &mut task => break joined.map_err(|e| Error::PeerFault { reason: e.to_string() })?,
            event = protocol.next() => match event {
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    task.abort();
                    return Err(status.fault().map(transport_error).unwrap_or(Error::ConnectionLost { reason: e.to_string() }));
                }
                None => {
                    task.abort();
                    return Err(Error::ConnectionLost { reason: "the protocol stream ended".into() });
                }
            },
            _ = idle.tick() => {
                if !options.live && status.last_received().elapsed() >= options.idle_timeout {
                    task.abort();
                    return Err(Error::IdleTimeout { after: options.idle_timeout });
                }
            }
        }
    };
    let summary = result.map_err(|e| feed_error(key, e))?;
    // Let the channel close reach the peer.
    linger(&mut protocol).await;
    Ok(ReplicationSummary {
        feeds_synced: usize::from(summary.synced),
        blocks_received: summary.blocks_received,
        bytes_received: summary.bytes_received,
        blocks_sent: summary.blocks_sent,
        bytes_sent: summary.bytes_sent,
        ..ReplicationSummary::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Options, SharedKey, StorageConfig};

    /// A peer that knows the key and opens the group channel but never sends the
    /// feed-exchange handshake is cut off at the handshake timeout, not at a keep-alive tick.
    #[tokio::test]
    async fn a_mute_peer_hits_the_handshake_timeout_on_time() {
        let key = SharedKey::from_bytes([3; 32]);
        let group = Multifeed::open(StorageConfig::Memory, key.clone(), Options::default())
            .await
            .unwrap();
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let mute = tokio::spawn(async move {
            let (mut protocol, _status) =
                transport::protocol(theirs, false, TransportLimits::default())
                    .await
                    .unwrap();
            protocol.commands().open(*key.as_bytes()).await.unwrap();
            // Keep the connection alive and answer nothing.
            while let Some(Ok(_)) = protocol.next().await {}
        });
        let timeout = Duration::from_millis(400);
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            group.replicate(ours, ReplicateOptions::new(true).handshake_timeout(timeout)),
        )
        .await
        .expect("the session must end by itself");
        assert!(
            matches!(result, Err(Error::HandshakeTimeout { .. })),
            "{result:?}"
        );
        assert!(
            started.elapsed() < timeout * 3,
            "took {:?}",
            started.elapsed()
        );
        mute.abort();
    }
}
