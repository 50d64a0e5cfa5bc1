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
//!
//! The rules live in [`SessionCore`](super::session_core), which does no IO; this
//! module is its driver: it polls the protocol, the group channel, the feed tasks
//! and the timers, hands what happened to the core, and carries out its actions.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use hypercore_protocol::{
    Channel, CommandTx, Event as ProtocolEvent, Message, Protocol, schema::Extension,
};
use tokio::time::Instant;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{mpsc, oneshot, watch},
    task::JoinSet,
};

use super::{
    ReplicateOptions, ReplicationEvent, ReplicationSummary,
    admission::{Admission, Admitted},
    feed_task::{
        FeedSyncError, FeedSyncOptions, FeedSyncSummary, OneShotClose, Progress, run_feed,
    },
    session_core::{Action, Input, LocalFeeds, SessionCore, feed_error},
    transport::{self, TransportFault, TransportLimits, TransportStatus},
};
use crate::{
    Event, FeedKey, Multifeed,
    error::{Error, Result},
    exchange::ExchangeMessage,
};

/// Name of the Extension message that carries the feed exchange.
const EXCHANGE_EXTENSION: &str = "multifeed/exchange";
/// How long a finished one-shot session waits for feed tasks still closing their
/// channels (to count them), and a raw session for the peer to hang up.
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
    let root_key = *multifeed.shared_key().as_bytes();
    let (protocol, status) = connect(io, &options, root_key).await?;
    let mut session = Session::new(
        multifeed,
        options,
        protocol.commands(),
        events,
        status.clone(),
    );
    let result = session.drive(protocol, stop).await;
    session.tasks.abort_all();
    // The tasks' handles on feeds on trial must go before the trial ends.
    while session.tasks.join_next().await.is_some() {}
    session.synced.abort_all();
    session.growth.abort_all();
    let Session {
        multifeed,
        admission,
        mut on_trial,
        options: session_options,
        ..
    } = session;
    let options_account = session_options.admission_account;
    on_trial.extend(admission.shutdown().await);
    // Feeds still on trial here: the ones that delivered become members, the
    // others leave no trace (unless another session still holds them).
    let on_trial: Vec<FeedKey> = on_trial.into_iter().collect();
    if let Some(account) = &options_account {
        account.refund(on_trial.len());
    }
    let mut result = result;
    match multifeed.release_candidates(&on_trial).await {
        Ok(learnt) => {
            if let Ok(summary) = &mut result {
                summary.feeds_learnt += learnt;
            }
        }
        Err(error) => tracing::warn!(%error, "ending the trial of offered feeds"),
    }
    if matches!(result, Err(Error::TooManyUnprovenFeeds { .. })) {
        multifeed.count_limit_hit();
    }
    result
}

/// The encrypted, framed protocol over `io`, within the handshake timeout.
/// `root_key`'s channel authenticates the peer (see [`ReplicateOptions::pre_auth`]).
async fn connect<S>(
    io: S,
    options: &ReplicateOptions,
    root_key: [u8; 32],
) -> Result<(Protocol, TransportStatus)>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let limits = TransportLimits {
        max_frame_len: options.max_message_len + 64 * 1024,
        root_key: Some(root_key),
        pre_auth: options.pre_auth.clone(),
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
        // A stranger that never proved it holds the key: to the user, a peer that
        // never completed the handshake.
        TransportFault::NotAuthenticated { after } => Error::HandshakeTimeout { after },
        TransportFault::Evicted => Error::ConnectionLost {
            reason: fault.to_string(),
        },
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

/// The session's view of the local store.
struct Store<'a>(&'a Multifeed);

impl LocalFeeds for Store<'_> {
    fn members(&self) -> Vec<(FeedKey, u64)> {
        self.0
            .feeds()
            .iter()
            .map(|feed| (feed.key(), feed.shared().info().length))
            .collect()
    }

    fn is_member(&self, key: &FeedKey) -> bool {
        self.0.contains(key)
    }

    fn length(&self, key: &FeedKey) -> Option<u64> {
        self.0
            .feed(*key)
            .or_else(|| self.0.candidate(key))
            .map(|feed| feed.shared().info().length)
    }

    fn contiguous_length(&self, key: &FeedKey) -> Option<u64> {
        self.0
            .feed(*key)
            .map(|feed| feed.shared().info().contiguous_length)
    }

    fn metadata(&self, key: &FeedKey) -> crate::FeedMetadata {
        self.0
            .feed(*key)
            .map(|feed| feed.metadata().clone())
            .unwrap_or_default()
    }
}

/// The tokio driver of a [`SessionCore`]: turns protocol events, channel messages,
/// task ends and timers into its inputs, and carries out its actions.
struct Session {
    multifeed: Multifeed,
    options: ReplicateOptions,
    commands: CommandTx,
    events: mpsc::Sender<ReplicationEvent>,
    core: SessionCore<Channel>,
    root: Option<Channel>,
    root_rx: Option<hypercore_protocol::ChannelReceiver<Message>>,
    /// The connection; its inbound backlog counts the root channel's queue.
    status: TransportStatus,
    _root_watch: Option<transport::InboundWatch>,
    /// Count of running feed tasks, which they read to pick their pipelining.
    active_feeds: Arc<AtomicUsize>,
    /// When a feed channel last received a message (see `SessionCore::waiting_on_peer`).
    activity: Arc<transport::LastSeen>,
    admission: Admission,
    /// Feeds on trial this session holds (see `Multifeed::hold_candidates`).
    on_trial: HashSet<FeedKey>,
    tasks: JoinSet<FeedResult>,
    /// Resolves with a feed's key when its channel first reaches sync.
    synced: JoinSet<Option<FeedKey>>,
    /// Resolves with the key of a member offered empty once it holds a block
    /// (see [`Action::WatchGrowth`]).
    growth: JoinSet<Option<FeedKey>>,
    progress_tx: mpsc::Sender<Progress>,
    progress_rx: mpsc::Receiver<Progress>,
}

impl Session {
    fn new(
        multifeed: Multifeed,
        options: ReplicateOptions,
        commands: CommandTx,
        events: mpsc::Sender<ReplicationEvent>,
        status: TransportStatus,
    ) -> Self {
        let (progress_tx, progress_rx) = mpsc::channel(1024);
        let core = SessionCore::new(
            options.clone(),
            *multifeed.shared_key().as_bytes(),
            Instant::now(),
            rand::random(),
        );
        Self {
            admission: Admission::spawn(multifeed.clone(), options.admission_account.clone()),
            on_trial: HashSet::new(),
            multifeed,
            options,
            commands,
            events,
            core,
            root: None,
            root_rx: None,
            status,
            _root_watch: None,
            active_feeds: Arc::new(AtomicUsize::new(0)),
            activity: Arc::new(transport::LastSeen::new()),
            tasks: JoinSet::new(),
            synced: JoinSet::new(),
            growth: JoinSet::new(),
            progress_tx,
            progress_rx,
        }
    }

    fn emit(&self, event: ReplicationEvent) {
        // Events are advisory: a consumer that does not keep up loses some, never stalls us.
        let _ = self.events.try_send(event);
    }

    async fn drive(
        &mut self,
        mut protocol: Protocol,
        mut stop: watch::Receiver<bool>,
    ) -> Result<ReplicationSummary> {
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
            let timeout = self.core.timeout();
            let step = tokio::select! {
                event = protocol.next() => match event {
                    Some(Ok(event)) => self.on_protocol_event(event).await,
                    Some(Err(e)) => {
                        let lost = self.status.fault().map(transport_error).unwrap_or(Error::ConnectionLost { reason: e.to_string() });
                        self.on_connection_end(&mut protocol, lost).await
                    }
                    None => {
                        let lost = Error::ConnectionLost { reason: "the protocol stream ended".into() };
                        self.on_connection_end(&mut protocol, lost).await
                    }
                },
                message = recv_root(&mut self.root_rx) => match message {
                    Some(message) => self.on_root_message(message).await,
                    None => self.on_root_closed().await,
                },
                Some(joined) = self.tasks.join_next() => match joined {
                    Ok((key, result)) => self.step(Input::FeedFinished { key, result }).await,
                    Err(e) => Err(Error::PeerFault { reason: format!("feed task failed: {e}") }),
                },
                Some(Ok(Some(key))) = self.synced.join_next() => {
                    self.step(Input::FeedSynced(key)).await
                },
                Some(Ok(Some(key))) = self.growth.join_next() => {
                    self.step(Input::Grew(key)).await
                },
                admitted = self.admission.next(), if self.core.accepts_admitted() => {
                    match admitted {
                        Ok(Admitted { keys, held }) => {
                            self.on_trial.extend(held);
                            self.step(Input::Admitted { keys }).await
                        }
                        Err(e) => Err(e),
                    }
                },
                Some(progress) = self.progress_rx.recv() => {
                    let key = FeedKey::from_bytes(progress.key);
                    if progress.uploaded {
                        self.emit(ReplicationEvent::Uploaded {
                            key,
                            blocks: progress.blocks,
                            bytes: progress.bytes,
                        });
                        Ok(())
                    } else {
                        self.emit(ReplicationEvent::Progress {
                            key,
                            blocks: progress.blocks,
                            bytes: progress.bytes,
                        });
                        self.step(Input::Progress(key)).await
                    }
                },
                Some(event) = member_events.next(), if self.core.handshake_done() => {
                    match event {
                        Event::FeedAdded { key, .. } => self.step(Input::MemberAdded(key)).await,
                        Event::Lagged { .. } => self.step(Input::MembersLagged).await,
                    }
                },
                _ = sleep_until(timeout), if timeout.is_some() => self.step(Input::Timeout).await,
                _ = keepalive.tick() => {
                    self.step(Input::Tick {
                        last_received: self.status.last_received(),
                        feed_activity: self.activity.at(),
                    }).await
                },
                _ = stop.changed() => self.step(Input::Stop).await,
            };
            if let Err(e) = step {
                break Err(e);
            }
            if let Some(outcome) = self.core.take_outcome() {
                break outcome;
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
                Ok(self.core.summary().clone())
            }
            Err(error) => {
                if error.is_handshake_refusal() {
                    // The peer must get our handshake too, so both sides see the mismatch
                    // (or that we are full).
                    flush(&mut protocol);
                }
                Err(error)
            }
        }
    }

    /// Hands `input` to the core and carries out what it decides. An action that
    /// fails (the connection is gone) ends the session, unless it has ended already.
    async fn step(&mut self, input: Input<Channel>) -> Result<()> {
        self.core
            .handle(Instant::now(), input, &Store(&self.multifeed));
        while let Some(action) = self.core.poll_action() {
            if let Err(error) = self.execute(action).await
                && !self.core.is_ended()
            {
                return Err(error);
            }
        }
        Ok(())
    }

    async fn execute(&mut self, action: Action<Channel>) -> Result<()> {
        match action {
            Action::Send(message) => self.send(message).await,
            Action::Open(key) => {
                self.commands
                    .open(*key.as_bytes())
                    .await
                    .map_err(|e| Error::ConnectionLost {
                        reason: e.to_string(),
                    })
            }
            Action::StartFeed { key, channel } => {
                self.start_feed(key, channel);
                Ok(())
            }
            Action::Refuse(channel) => {
                refuse_channel(channel);
                Ok(())
            }
            Action::Admit(keys) => {
                self.admission.submit(keys);
                Ok(())
            }
            Action::WatchGrowth(key) => {
                if let Some(feed) = self.multifeed.feed(key) {
                    let mut length = feed.subscribe_len();
                    self.growth.spawn(async move {
                        length.wait_for(|&length| length > 0).await.ok()?;
                        Some(key)
                    });
                }
                Ok(())
            }
            Action::Release(keys) => {
                let keys: Vec<FeedKey> = keys
                    .into_iter()
                    .filter(|key| self.on_trial.remove(key))
                    .collect();
                if let Some(account) = &self.options.admission_account {
                    account.refund(keys.len());
                }
                let learnt = self.multifeed.release_candidates(&keys).await?;
                self.core.count_learnt(learnt);
                Ok(())
            }
            Action::Emit(event) => {
                self.emit(event);
                Ok(())
            }
            Action::LearnMetadata(offered) => {
                self.multifeed.learn_metadata(offered).await;
                Ok(())
            }
        }
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
                if channel.discovery_key() == self.core.root_discovery_key() {
                    self.root_rx = channel.take_receiver();
                    self._root_watch = self
                        .root_rx
                        .as_ref()
                        .map(|rx| self.status.watch_inbound(rx));
                    self.root = Some(channel);
                    self.step(Input::RootOpened).await
                } else {
                    let key = FeedKey::from_bytes(*channel.key());
                    self.step(Input::ChannelReady { key, channel }).await
                }
            }
            ProtocolEvent::DiscoveryKey(dk) => self.step(Input::PeerOpened(dk)).await,
            ProtocolEvent::Close(dk) if &dk == self.core.root_discovery_key() => {
                self.on_root_closed().await
            }
            ProtocolEvent::Close(dk) => self.step(Input::ChannelClosed(dk)).await,
            _ => Ok(()),
        }
    }

    /// The group channel closed. Messages the peer sent before closing may still
    /// be queued behind the close event: they go first.
    async fn on_root_closed(&mut self) -> Result<()> {
        if let Some(rx) = self.root_rx.take() {
            while let Ok(message) = rx.try_recv() {
                self.on_root_message(message).await?;
            }
        }
        self.step(Input::RootClosed).await
    }

    async fn on_root_message(&mut self, message: Message) -> Result<()> {
        match message {
            Message::Extension(Extension { name, message }) if name == EXCHANGE_EXTENSION => {
                self.step(Input::Exchange(message)).await
            }
            _ => Ok(()),
        }
    }

    fn start_feed(&mut self, key: FeedKey, channel: Channel) {
        let Some(feed) = self
            .multifeed
            .feed(key)
            .or_else(|| self.multifeed.candidate(&key))
        else {
            refuse_channel(channel);
            return;
        };
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
                        self.core.count_late(key, summary);
                        // The session has ended: only its events still go out.
                        while let Some(action) = self.core.poll_action() {
                            if let Action::Emit(event) = action {
                                self.emit(event);
                            }
                        }
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
        let mut root_closed_by_peer = false;
        if let Some(rx) = self.root_rx.take() {
            while let Ok(message) = rx.try_recv() {
                root_closed_by_peer |= matches!(message, Message::Close(_));
                self.on_root_message(message).await?;
            }
        }
        self.step(Input::ConnectionLost {
            error: lost,
            root_closed_by_peer,
        })
        .await
    }
}

/// Sleeps until `deadline`; forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
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
    let key = feed.key();
    let (mut protocol, status) = connect(io, &options, *key.as_bytes()).await?;
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
    use crate::{Options, SharedKey, StorageConfig, replicate::PreAuth};

    /// A peer that knows the key and opens the group channel but never sends the
    /// feed-exchange handshake is cut off at the handshake timeout, not at a keep-alive tick.
    /// On the paused clock: the deadline is measured in virtual time, not on a busy host.
    #[tokio::test(start_paused = true)]
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
        let started = tokio::time::Instant::now();
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
        let took = started.elapsed();
        assert!(
            took >= timeout && took < timeout + Duration::from_millis(50),
            "the timeout was {timeout:?}; the session ended after {took:?}"
        );
        mute.abort();
    }

    /// A stranger that completes Noise and then stays silent (it cannot open the
    /// group channel without the key) is cut off at the pre-authentication deadline,
    /// before the handshake timeout, as a typed handshake timeout. So is one that
    /// never finishes Noise. Its unauthenticated slot comes back; it took no peer slot.
    #[tokio::test(start_paused = true)]
    async fn a_silent_stranger_ends_as_a_handshake_timeout_at_the_pre_auth_deadline() {
        use crate::replicate::preauth::{ConnectionSlots, PeerSlots, PreAuthLimits, SlotLimits};
        let key = SharedKey::from_bytes([3; 32]);
        let group = Multifeed::open(StorageConfig::Memory, key, Options::default())
            .await
            .unwrap();
        let slots = ConnectionSlots::new(SlotLimits::default());
        let peers = PeerSlots::new(4);
        let limits = PreAuthLimits::default();
        for finishes_noise in [true, false] {
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            let stranger = tokio::spawn(async move {
                if finishes_noise {
                    let (mut protocol, _status) =
                        transport::protocol(theirs, true, TransportLimits::default())
                            .await
                            .unwrap();
                    while let Some(Ok(_)) = protocol.next().await {}
                } else {
                    // Connected, and not a byte sent.
                    std::future::pending::<()>().await;
                    drop(theirs);
                }
            });
            let pre_auth = PreAuth::with_peer_slots(limits, peers.clone())
                .with_slot(slots.try_admit([127, 0, 0, 1].into()).unwrap());
            let started = tokio::time::Instant::now();
            let result = group
                .replicate(
                    ours,
                    ReplicateOptions::new(false)
                        .handshake_timeout(Duration::from_secs(10))
                        .pre_auth(pre_auth.clone()),
                )
                .await;
            assert!(
                matches!(result, Err(Error::HandshakeTimeout { after }) if after == limits.deadline),
                "{result:?}"
            );
            assert_eq!(started.elapsed(), limits.deadline);
            assert!(!pre_auth.is_authenticated());
            drop(pre_auth);
            assert_eq!((slots.in_use(), peers.in_use()), (0, 0));
            stranger.abort();
        }
    }
}
