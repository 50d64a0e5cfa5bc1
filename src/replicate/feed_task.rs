//! Async driver: runs a [`FeedSync`] over one `Channel` against a shared core.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use hypercore::{Hypercore, HypercoreError};
use hypercore_protocol::schema::{Data, Extension, NoData, Request};
use hypercore_protocol::{Channel, Message};
use tokio::sync::mpsc;

use super::feed_sync::{
    Action, Apply, ApplyOutcome, BlockRequest, DEFAULT_WINDOW, FeedSync, LocalInfo,
    ProtocolViolation,
};
use super::transport::{LastSeen, TransportStatus};
use crate::residency::{CoreInfo, SharedFeed};

#[derive(Debug, Clone)]
pub struct FeedSyncOptions {
    /// Keep running after sync and forward new data both ways.
    pub live: bool,
    /// Max requests in flight.
    pub window: usize,
    /// How a one-shot channel ends; see [`OneShotClose`].
    pub close: OneShotClose,
    /// Feeds syncing on the same connection (this one included), if shared: with
    /// more than [`OVERLAP_MAX_FEEDS`], a feed does not overlap downloading and
    /// applying (the feeds overlap each other instead).
    pub active_feeds: Option<Arc<AtomicUsize>>,
    /// Touched whenever the channel receives a message, if shared: the session
    /// tells a stalled peer from a busy one by it.
    pub activity: Option<Arc<LastSeen>>,
    /// The connection, which counts this channel's queued messages to pause reading
    /// when too many wait (see `transport::MAX_QUEUED_INBOUND`).
    pub inbound: Option<TransportStatus>,
}

impl Default for FeedSyncOptions {
    fn default() -> Self {
        FeedSyncOptions {
            live: false,
            window: DEFAULT_WINDOW,
            close: OneShotClose::Immediate,
            active_feeds: None,
            activity: None,
            inbound: None,
        }
    }
}

/// How a one-shot channel ends once the feed is in sync.
///
/// hypercore-protocol frees a channel's id as soon as the peer's `Close` arrives and
/// hands it to the next channel opened, so a message still in flight on the old
/// channel lands on the new one (a stray Synchronize or Data for another feed).
/// Between our own peers each side therefore says [`FEED_DONE`] once in sync and
/// sends nothing unprompted after it, and only one side, the closer, sends `Close`,
/// after both have said it: nothing can follow a `Close` in either direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OneShotClose {
    /// Close as soon as this side judges the feed in sync (plain hypercore peers).
    Immediate,
    /// The `FEED_DONE` exchange; `closer` says whether this side sends the `Close`.
    Agreed { closer: bool },
}

/// Extension message on a feed channel: "in sync; nothing more from me but answers".
pub(crate) const FEED_DONE: &str = "multifeed/feed-done";

/// Cumulative counts for this connection, sent after each batch of verified blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// The feed's key (the channel's key).
    pub key: [u8; 32],
    pub blocks: u64,
    pub bytes: u64,
    /// Counts of blocks sent to the peer, not received.
    pub uploaded: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FeedSyncSummary {
    pub blocks_received: u64,
    pub bytes_received: u64,
    pub blocks_sent: u64,
    pub bytes_sent: u64,
    /// Whether the sync condition was reached (always true for a one-shot `Ok`).
    pub synced: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum FeedSyncError {
    /// The peer sent a proof that does not verify; nothing of it was stored.
    #[error("invalid data from peer (request {request}, block {index:?}): {reason}")]
    InvalidData {
        request: u64,
        index: Option<u64>,
        reason: String,
    },
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtocolViolation),
    #[error("hypercore: {0}")]
    Core(#[source] HypercoreError),
    #[error("channel io: {0}")]
    Io(#[from] std::io::Error),
    #[error("channel closed before the feed was in sync")]
    ClosedBeforeSync,
    #[error("the channel's receiver was already taken")]
    ReceiverTaken,
    #[error("core task failed: {0}")]
    Task(String),
    /// The feed's hypercore could not be loaded from storage (or the group closed).
    #[error("cannot load the feed: {0}")]
    Load(#[source] Box<crate::Error>),
}

/// Up to this many feeds syncing on a connection, each overlaps its downloading and
/// applying (one per core of a small gateway).
pub const OVERLAP_MAX_FEEDS: usize = 2;

/// From this many blocks to apply in one round, requests go out before the applies
/// run, so the peer prepares the next blocks while we verify these.
const OVERLAP_MIN_APPLIES: usize = 8;

/// Max messages taken from the channel per step, so one step's core work stays short.
const MAX_MESSAGES_PER_STEP: usize = 512;

/// Replicate `feed` over `channel`. One-shot (`live: false`) returns once both sides hold
/// everything the other has, and closes the channel. Live runs until the channel closes.
/// Cancel-safe: core mutations run in a spawned task that completes even if this future is
/// dropped.
pub async fn run_feed(
    mut channel: Channel,
    feed: Arc<SharedFeed>,
    opts: FeedSyncOptions,
    progress: Option<mpsc::Sender<Progress>>,
    mut on_synced: Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<FeedSyncSummary, FeedSyncError> {
    let rx = channel
        .take_receiver()
        .ok_or(FeedSyncError::ReceiverTaken)?;
    let _counted = opts
        .inbound
        .as_ref()
        .map(|status| status.watch_inbound(&rx));
    // Subscribe before reading info so no change between the two is missed.
    let mut changed = feed.changed.subscribe();
    let mut fsm = FeedSync::new(opts.window);
    fsm.start(LocalInfo::from(feed.info()));
    let mut sum = FeedSyncSummary::default();
    let mut closed = false;
    // Agreed close: whether we said FEED_DONE, and whether the peer did.
    let mut done_sent = false;
    let mut peer_done = false;

    loop {
        let overlap = opts
            .active_feeds
            .as_ref()
            .is_none_or(|n| n.load(Ordering::Relaxed) <= OVERLAP_MAX_FEEDS);
        fsm.set_overlap(overlap);
        // After FEED_DONE only answers to requests go out (see OneShotClose).
        let answers_only = done_sent;
        if !step(
            &mut fsm,
            &channel,
            &feed,
            &mut sum,
            progress.as_ref(),
            answers_only,
            overlap,
        )
        .await?
        {
            closed = true; // the peer closed first; nothing more can be sent
        }
        // Once the peer said it is done, it asks for nothing more: holding what it
        // has is enough, even if we grew meanwhile (a one-shot sync never chases a
        // busy writer).
        let in_sync = fsm.is_synced() || (peer_done && fsm.downloaded());
        if in_sync && !sum.synced {
            sum.synced = true;
            if let Some(tx) = on_synced.take() {
                let _ = tx.send(());
            }
        }
        // A live channel ends the same way once the peer, a one-shot session, is done.
        if sum.synced && (!opts.live || peer_done) {
            match opts.close {
                OneShotClose::Immediate => {
                    // Best effort: the peer may already have closed.
                    let _ = channel.close().await;
                    if !closed {
                        drain(rx);
                    }
                    return Ok(sum);
                }
                OneShotClose::Agreed { closer } => {
                    if !done_sent && !closed {
                        channel.send(feed_done()).await?;
                        done_sent = true;
                        fsm.finish();
                    }
                    if closed && peer_done {
                        return Ok(sum);
                    }
                    if closer && done_sent && peer_done {
                        // Nothing follows the peer's FEED_DONE but its answers to our
                        // requests, and we have none in flight: the channel is quiet.
                        let _ = channel.close().await;
                        drain(rx);
                        return Ok(sum);
                    }
                }
            }
        }
        if closed {
            return if opts.live {
                Ok(sum)
            } else {
                Err(FeedSyncError::ClosedBeforeSync)
            };
        }
        tokio::select! {
            msg = rx.recv() => {
                let mut next = msg.ok();
                let mut taken = 0;
                // Drain what is already queued so core work and sends are batched.
                while let Some(m) = next.take() {
                    match m {
                        Message::Close(_) => {
                            closed = true;
                            break;
                        }
                        Message::Extension(ref e) if e.name == FEED_DONE => peer_done = true,
                        m => fsm.on_message(m)?,
                    }
                    taken += 1;
                    if taken >= MAX_MESSAGES_PER_STEP {
                        break;
                    }
                    match rx.try_recv() {
                        Ok(m) => next = Some(m),
                        Err(e) if e.is_closed() => closed = true,
                        Err(_) => {}
                    }
                }
                if taken == 0 && !closed {
                    closed = true; // recv error: channel gone
                }
                if taken > 0
                    && let Some(activity) = &opts.activity
                {
                    activity.touch();
                }
            }
            res = changed.changed(), if !done_sent => {
                if res.is_ok() {
                    fsm.on_local_update(LocalInfo::from(feed.info()));
                }
                // Err is impossible while `feed` (which owns the sender) is alive.
            }
        }
    }
}

/// Receives and discards until the channel closes (at the latest, with the
/// connection). hypercore-protocol ends the whole connection if a message arrives
/// for a channel whose receiver is gone, and the peer may still send a few before it
/// sees our Close.
fn drain(rx: hypercore_protocol::ChannelReceiver<Message>) {
    tokio::spawn(async move { while rx.recv().await.is_ok() {} });
}

fn feed_done() -> Message {
    Message::Extension(Extension {
        name: FEED_DONE.to_string(),
        message: Vec::new(),
    })
}

/// Work needing the core, done under one lock.
enum CoreJob {
    Apply(Apply),
    Request(BlockRequest),
    Serve(Request),
}

enum JobResult {
    Applied {
        id: u64,
        outcome: ApplyOutcome,
        bytes: u64,
    },
    Send(Message),
    Skipped {
        id: u64,
    },
    Served {
        msg: Message,
        block: bool,
        bytes: u64,
    },
}

/// Run actions until the state machine is quiet. Returns false if the channel is closed.
///
/// Requests and answers go out before received data is applied, so the peer works
/// on the next requests while we verify and store the last batch.
async fn step(
    fsm: &mut FeedSync,
    channel: &Channel,
    feed: &Arc<SharedFeed>,
    sum: &mut FeedSyncSummary,
    progress: Option<&mpsc::Sender<Progress>>,
    answers_only: bool,
    overlap: bool,
) -> Result<bool, FeedSyncError> {
    // Messages produced by applies wait for the next round's requests, so a step
    // sends one batch per round rather than two.
    let mut out = Vec::new();
    loop {
        let actions = fsm.drain_actions();
        if actions.is_empty() {
            return send(channel, &mut out, answers_only).await;
        }
        let mut applies = Vec::new();
        let mut quick = Vec::new();
        for a in actions {
            match a {
                Action::Send(m) => out.push(m),
                Action::Apply(x) => applies.push(CoreJob::Apply(x)),
                Action::Request(x) => quick.push(CoreJob::Request(x)),
                Action::Serve(x) => quick.push(CoreJob::Serve(x)),
            }
        }
        if !overlap || applies.len() < OVERLAP_MIN_APPLIES {
            // A small round: one trip to the core is cheaper than overlapping.
            quick.append(&mut applies);
        }
        if !quick.is_empty() {
            run_jobs(quick, fsm, channel, feed, sum, progress, &mut out).await?;
        }
        if !applies.is_empty() {
            if !send(channel, &mut out, answers_only).await? {
                return Ok(false);
            }
            run_jobs(applies, fsm, channel, feed, sum, progress, &mut out).await?;
        }
    }
}

/// Runs core jobs (in a task of their own) and feeds the results to the state machine;
/// messages to send are added to `out`.
async fn run_jobs(
    jobs: Vec<CoreJob>,
    fsm: &mut FeedSync,
    channel: &Channel,
    feed: &Arc<SharedFeed>,
    sum: &mut FeedSyncSummary,
    progress: Option<&mpsc::Sender<Progress>>,
    out: &mut Vec<Message>,
) -> Result<(), FeedSyncError> {
    // Spawned so a dropped run_feed never leaves a half-applied proof behind.
    let (results, info, err) = tokio::spawn(core_jobs(feed.clone(), jobs))
        .await
        .map_err(|e| FeedSyncError::Task(e.to_string()))?;
    let local = LocalInfo::from(info);
    let received_before = sum.blocks_received;
    let sent_before = sum.blocks_sent;
    for r in results {
        match r {
            JobResult::Applied { id, outcome, bytes } => {
                if outcome == ApplyOutcome::Applied {
                    sum.blocks_received += 1;
                    sum.bytes_received += bytes;
                }
                fsm.on_applied(id, outcome, local);
            }
            JobResult::Skipped { id } => fsm.on_applied(id, ApplyOutcome::AlreadyHad, local),
            JobResult::Send(m) => out.push(m),
            JobResult::Served { msg, block, bytes } => {
                if block {
                    sum.blocks_sent += 1;
                    sum.bytes_sent += bytes;
                }
                out.push(msg);
            }
        }
    }
    // One report per batch and direction (counts are cumulative): a per-block
    // report woke the session once per block. Never stall replication on a slow
    // consumer: a report that does not fit is dropped (the next one carries it).
    if let Some(p) = progress {
        let key = *channel.key();
        let reports = [
            (sum.blocks_received > received_before).then_some(Progress {
                key,
                blocks: sum.blocks_received,
                bytes: sum.bytes_received,
                uploaded: false,
            }),
            (sum.blocks_sent > sent_before).then_some(Progress {
                key,
                blocks: sum.blocks_sent,
                bytes: sum.bytes_sent,
                uploaded: true,
            }),
        ];
        for report in reports.into_iter().flatten() {
            let _ = p.try_send(report);
        }
    }
    fsm.on_local_update(local);
    // Sending what we owe (e.g. served data) is pointless now: fail fast.
    err.map_or(Ok(()), Err)
}

/// Sends and clears `out`. Returns false if the channel is closed.
async fn send(
    channel: &Channel,
    out: &mut Vec<Message>,
    answers_only: bool,
) -> Result<bool, FeedSyncError> {
    if answers_only {
        out.retain(|m| matches!(m, Message::Data(_) | Message::NoData(_)));
    }
    if out.is_empty() {
        return Ok(true);
    }
    let result = channel.send_batch(out).await;
    out.clear();
    match result {
        Ok(()) => Ok(true),
        Err(_) if channel.closed() => Ok(false),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::BrokenPipe
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// Executes jobs under one lock. Applies first (so requests see the new tree), then requests,
/// then serves. Stops applying at the first invalid proof.
async fn core_jobs(
    feed: Arc<SharedFeed>,
    jobs: Vec<CoreJob>,
) -> (Vec<JobResult>, CoreInfo, Option<FeedSyncError>) {
    let mut core = match feed.core().await {
        Ok(core) => core,
        Err(e) => {
            return (
                Vec::new(),
                feed.info(),
                Some(FeedSyncError::Load(Box::new(e))),
            );
        }
    };
    let mut results = Vec::with_capacity(jobs.len());
    let mut err = None;
    let mut applied_any = false;
    let (mut applies, mut others): (Vec<_>, Vec<_>) = jobs
        .into_iter()
        .partition(|j| matches!(j, CoreJob::Apply(_)));
    others.sort_by_key(|j| matches!(j, CoreJob::Serve(_)));
    for job in applies.drain(..) {
        let CoreJob::Apply(a) = job else { continue };
        match apply_one(&mut core, a).await {
            Ok(r) => {
                if let JobResult::Applied {
                    outcome: ApplyOutcome::Applied,
                    ..
                } = r
                {
                    applied_any = true;
                }
                results.push(r);
            }
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    if err.is_none() {
        for job in others {
            let r = match job {
                CoreJob::Request(req) => request_one(&mut core, req).await,
                CoreJob::Serve(req) => serve_one(&mut core, req).await,
                CoreJob::Apply(_) => continue,
            };
            match r {
                Ok(r) => results.push(r),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
    }
    let info = CoreInfo::from(&core.info());
    drop(core);
    if applied_any {
        feed.changed.send_replace(info.length);
    }
    (results, info, err)
}

fn is_storage_error(e: &HypercoreError) -> bool {
    matches!(
        e,
        HypercoreError::IO { .. }
            | HypercoreError::EmptyStorage { .. }
            | HypercoreError::CorruptStorage { .. }
    )
}

async fn apply_one(core: &mut Hypercore, a: Apply) -> Result<JobResult, FeedSyncError> {
    let info = core.info();
    let id = a.id;
    let stale = |id| {
        Ok(JobResult::Applied {
            id,
            outcome: ApplyOutcome::Stale,
            bytes: 0,
        })
    };
    if let Some(up) = &a.data.upgrade {
        // Built against a length we no longer have (another connection upgraded first).
        if up.start != info.length {
            return stale(id);
        }
    } else if let Some(i) = a.index {
        if core.has(i) {
            return Ok(JobResult::Applied {
                id,
                outcome: ApplyOutcome::AlreadyHad,
                bytes: 0,
            });
        }
        if i >= info.length {
            return stale(id);
        }
    }
    let bytes = a.data.block.as_ref().map_or(0, |b| b.value.len() as u64);
    let invalid = |reason: String| FeedSyncError::InvalidData {
        request: id,
        index: a.index,
        reason,
    };
    let proof = a.data.into_proof();
    match core.verify_and_apply_proof(&proof).await {
        Ok(true) => Ok(JobResult::Applied {
            id,
            outcome: ApplyOutcome::Applied,
            bytes,
        }),
        Ok(false) => Err(invalid("proof not applicable to this core".into())),
        Err(e) if is_storage_error(&e) => Err(FeedSyncError::Core(e)),
        Err(e) => Err(invalid(e.to_string())),
    }
}

async fn request_one(core: &mut Hypercore, req: BlockRequest) -> Result<JobResult, FeedSyncError> {
    if req.upgrade.is_none() && core.has(req.index) {
        return Ok(JobResult::Skipped { id: req.id });
    }
    let nodes = core
        .missing_nodes(req.index)
        .await
        .map_err(FeedSyncError::Core)?;
    Ok(JobResult::Send(req.into_message(nodes)))
}

async fn serve_one(core: &mut Hypercore, req: Request) -> Result<JobResult, FeedSyncError> {
    let id = req.id;
    let info = core.info();
    let no_data = Ok(JobResult::Served {
        msg: Message::NoData(NoData { request: id }),
        block: false,
        bytes: 0,
    });
    if req.fork != info.fork {
        return no_data;
    }
    match core
        .create_proof(req.block, req.hash, req.seek, req.upgrade)
        .await
    {
        Ok(Some(p)) => {
            let bytes = p.block.as_ref().map_or(0, |b| b.value.len() as u64);
            let block = p.block.is_some();
            Ok(JobResult::Served {
                block,
                msg: Message::Data(Data {
                    request: id,
                    fork: p.fork,
                    block: p.block,
                    hash: p.hash,
                    seek: p.seek,
                    upgrade: p.upgrade,
                }),
                bytes,
            })
        }
        Ok(None) => no_data,
        Err(e) if is_storage_error(&e) => Err(FeedSyncError::Core(e)),
        // A request we cannot prove (bad nodes count, odd upgrade): the peer's problem.
        Err(e) => {
            tracing::debug!(request = id, error = %e, "cannot serve request");
            no_data
        }
    }
}

#[cfg(test)]
#[path = "feed_task_tests.rs"]
mod tests;
