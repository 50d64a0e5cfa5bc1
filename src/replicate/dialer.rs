//! A dialer: keeps a live replication with one peer going across connection losses.
//!
//! - [`Backoff`]: the retry schedule, IO-less (capped exponential growth with
//!   decorrelated jitter, reset after a session that lasted).
//! - [`Dialer`]: the handle of the task that connects, replicates live, and on any
//!   loss or healable error waits its backoff delay and connects again, until
//!   [`Dialer::stop`] or a fatal refusal ([`is_fatal`]).

use std::{collections::HashMap, future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::{mpsc, watch},
    task::JoinHandle,
    time::Instant,
};

use super::{ReplicateOptions, ReplicationEvent, ReplicationSummary, SessionEnd};
use crate::{
    FeedKey, Multifeed,
    error::{Error, Result},
};

/// How long to wait between connection attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackoffPolicy {
    /// The shortest delay, and the first one's lower bound. Default 250 ms.
    pub initial: Duration,
    /// No delay is longer. Default 30 s.
    pub max: Duration,
    /// A session that lasted at least this long resets the schedule: the next loss
    /// is treated as the first. Default 10 s.
    pub reset_after: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(10),
        }
    }
}

impl BackoffPolicy {
    /// Sets [`BackoffPolicy::initial`].
    pub fn initial(mut self, delay: Duration) -> Self {
        self.initial = delay;
        self
    }

    /// Sets [`BackoffPolicy::max`].
    pub fn max(mut self, delay: Duration) -> Self {
        self.max = delay;
        self
    }

    /// Sets [`BackoffPolicy::reset_after`].
    pub fn reset_after(mut self, lasted: Duration) -> Self {
        self.reset_after = lasted;
        self
    }
}

/// The shortest delay a [`Backoff`] hands out, whatever its policy says.
pub const MIN_DELAY: Duration = Duration::from_millis(1);

/// The retry schedule, without any IO or clock: the caller says what happened and
/// asks for the next delay.
///
/// Capped exponential backoff with full jitter (as in the AWS architecture blog's
/// "Exponential Backoff And Jitter"): after the n-th failure in a row (from 0)
/// the delay is drawn uniformly between [`BackoffPolicy::initial`] and a ceiling
/// of `initial × 2ⁿ⁺¹`, capped at [`BackoffPolicy::max`]. With the defaults the
/// first retry comes after 250–500 ms and the ceiling reaches 30 s after seven
/// failures. Gateways that lost the same server at the same moment spread their
/// retries over the whole window instead of returning in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: BackoffPolicy,
    failures: u32,
    rng: StdRng,
}

impl Backoff {
    /// A fresh schedule; `seed` fixes the jitter (tests, simulations), `None` draws one.
    pub fn new(policy: BackoffPolicy, seed: Option<u64>) -> Self {
        // Never a hot loop: at least a millisecond between attempts.
        let max = policy.max.max(MIN_DELAY);
        let policy = BackoffPolicy {
            initial: policy.initial.clamp(MIN_DELAY, max),
            max,
            ..policy
        };
        Self {
            policy,
            failures: 0,
            rng: StdRng::seed_from_u64(seed.unwrap_or_else(rand::random)),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &BackoffPolicy {
        &self.policy
    }

    /// Failures since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A connection was made and its session lasted `lasted`: a long enough one
    /// resets the schedule.
    pub fn session_lasted(&mut self, lasted: Duration) {
        if lasted >= self.policy.reset_after {
            self.reset();
        }
    }

    /// Forgets past failures.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// The longest delay the next failure can get.
    pub fn ceiling(&self) -> Duration {
        let doubling = 2u32.saturating_pow(self.failures.saturating_add(1));
        self.policy
            .initial
            .saturating_mul(doubling)
            .min(self.policy.max)
    }

    /// The delay before the next attempt, after a failure (or any end of a session).
    pub fn next_delay(&mut self) -> Duration {
        let (low, high) = (self.policy.initial, self.ceiling());
        self.failures = self.failures.saturating_add(1);
        if high <= low {
            return high;
        }
        // Nanosecond resolution; a window over 584 years (u64::MAX ns) is cut to that.
        let span = u64::try_from((high - low).as_nanos()).unwrap_or(u64::MAX);
        low.saturating_add(Duration::from_nanos(self.rng.gen_range(0..=span)))
    }
}

/// Whether retrying cannot heal `error`: the peer refuses us for what we are
/// (another group, an incompatible version or client), or this side cannot go on
/// (the group is closed or read-only, its storage is damaged). Everything else (lost
/// connections, timeouts, stalls, a peer's protocol fault, a local I/O error
/// such as a full disk or too many open files) may heal, and is retried.
pub fn is_fatal(error: &Error) -> bool {
    fatal_copy(error).is_some()
}

/// A copy of `error` if it is fatal. Every fatal error is made of plain data, so
/// the dialer can both report it as an event and return it.
fn fatal_copy(error: &Error) -> Option<Error> {
    match error {
        Error::SharedKeyMismatch => Some(Error::SharedKeyMismatch),
        Error::VersionMismatch { ours, theirs } => Some(Error::VersionMismatch {
            ours: ours.clone(),
            theirs: theirs.clone(),
        }),
        Error::ClientMismatch { ours, theirs } => Some(Error::ClientMismatch {
            ours: ours.clone(),
            theirs: theirs.clone(),
        }),
        Error::Closed => Some(Error::Closed),
        // A read-only group stays read-only however often it is retried.
        Error::ReadOnly { what } => Some(Error::ReadOnly { what: what.clone() }),
        Error::Damaged { path, reason } => Some(Error::Damaged {
            path: path.clone(),
            reason: reason.clone(),
        }),
        Error::InvalidKey { .. }
        | Error::InvalidName { .. }
        | Error::SharedKeyAsFeedKey
        | Error::WriterKeyMismatch { .. }
        | Error::KeyConflict { .. }
        | Error::NotWritable { .. }
        | Error::Io { .. }
        | Error::Core { .. }
        | Error::HandshakeTimeout { .. }
        | Error::ServerBusy { .. }
        | Error::IdleTimeout { .. }
        | Error::Stalled { .. }
        | Error::ConnectionLost { .. }
        | Error::PeerFault { .. }
        | Error::TooManyUnprovenFeeds { .. }
        | Error::InvalidData { .. }
        // One damaged block does not stop the rest of the group replicating.
        | Error::DamagedBlock { .. }
        | Error::InvalidTopic { .. }
        | Error::InvalidMessage { .. }
        | Error::InvalidCursor { .. } => None,
    }
}

/// How a [`Dialer`] behaves. Start from `DialOptions::default()`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DialOptions {
    /// The options of each session. The dialer always initiates and replicates
    /// live, whatever `initiator` and `live` say.
    pub replicate: ReplicateOptions,
    /// Time allowed to establish each connection (resolving included). Default 10 s.
    pub connect_timeout: Duration,
    /// The retry schedule.
    pub backoff: BackoffPolicy,
    /// Fixes the jitter of the retry delays (tests); `None` draws it at random.
    pub jitter_seed: Option<u64>,
}

impl Default for DialOptions {
    fn default() -> Self {
        Self {
            replicate: ReplicateOptions::new(true).live(true),
            connect_timeout: Duration::from_secs(10),
            backoff: BackoffPolicy::default(),
            jitter_seed: None,
        }
    }
}

impl DialOptions {
    /// Sets [`DialOptions::replicate`].
    pub fn replicate(mut self, options: ReplicateOptions) -> Self {
        self.replicate = options;
        self
    }

    /// Sets [`DialOptions::connect_timeout`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`DialOptions::backoff`].
    pub fn backoff(mut self, policy: BackoffPolicy) -> Self {
        self.backoff = policy;
        self
    }

    /// Sets [`DialOptions::jitter_seed`].
    pub fn jitter_seed(mut self, seed: u64) -> Self {
        self.jitter_seed = Some(seed);
        self
    }
}

/// Something a [`Dialer`] did.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum DialEvent {
    /// A connection attempt starts (numbered from 1 over the dialer's life).
    Connecting {
        /// The attempt's number.
        attempt: u64,
    },
    /// The attempt failed before a session could start; the next one follows in
    /// `retry_in`.
    ConnectFailed {
        /// Why (a timeout is [`io::ErrorKind::TimedOut`]).
        error: Arc<io::Error>,
        /// The delay before the next attempt.
        retry_in: Duration,
    },
    /// Connected: a live session runs.
    Connected {
        /// The peer's address, when the connection has one.
        peer: Option<SocketAddr>,
    },
    /// An event of the running session.
    Replication(ReplicationEvent),
    /// The session ended: with a summary whose `ended` says why, or with an error.
    SessionEnded {
        /// The outcome.
        result: std::result::Result<ReplicationSummary, Arc<Error>>,
        /// How long the session ran.
        lasted: Duration,
        /// The delay before the next attempt; `None` when the dialer stops (it was
        /// asked to, or the error is fatal).
        retry_in: Option<Duration>,
    },
    /// A fatal refusal ([`is_fatal`]): the dialer stops, and [`Dialer::finish`]
    /// returns this error.
    GaveUp {
        /// The error.
        error: Arc<Error>,
    },
}

/// What a dialer did over its life.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DialSummary {
    /// Connection attempts.
    pub attempts: u64,
    /// Sessions started (connections made).
    pub sessions: u64,
    /// Verified blocks received, over all sessions, as far as their progress
    /// reports were seen (the last report of a session that broke may be missed).
    pub blocks_received: u64,
    /// Bytes of those blocks.
    pub bytes_received: u64,
    /// Blocks sent by sessions that ended without an error.
    pub blocks_sent: u64,
    /// Bytes of those blocks.
    pub bytes_sent: u64,
    /// Remote feeds learnt by sessions that ended without an error.
    pub feeds_learnt: usize,
}

/// A running dialer. Dropping it aborts the dialer and its session.
#[derive(Debug)]
pub struct Dialer {
    events: mpsc::Receiver<DialEvent>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<DialSummary>>,
}

/// Events buffered for the consumer.
const EVENT_CAPACITY: usize = 1024;

impl Dialer {
    /// The next event, or `None` once the dialer has ended. Events are buffered
    /// (1,024); a consumer that falls further behind misses some, and the dialer
    /// never waits for it.
    pub async fn next_event(&mut self) -> Option<DialEvent> {
        self.events.recv().await
    }

    /// Asks the dialer to end: a running session ends cleanly
    /// ([`SessionEnd::LocalStop`]), a pending attempt or delay is abandoned.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits for the dialer to end: after [`Dialer::stop`] with its summary, or
    /// with the fatal error that made it give up.
    pub async fn finish(mut self) -> Result<DialSummary> {
        match (&mut self.task).await {
            Ok(result) => result,
            Err(e) => Err(Error::PeerFault {
                reason: format!("dialer task failed: {e}"),
            }),
        }
    }
}

impl Drop for Dialer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects over TCP to the first address `addr` (`host:port`) resolves to that
/// answers, with `TCP_NODELAY`; the address it reached. [`Multifeed::dial`]'s
/// connect step, for callers of [`Multifeed::dial_with`] that add their own.
pub async fn connect_tcp(addr: &str) -> io::Result<(TcpStream, Option<SocketAddr>)> {
    let mut last = None;
    for target in tokio::net::lookup_host(addr).await? {
        match TcpStream::connect(target).await {
            Ok(socket) => {
                let _ = socket.set_nodelay(true);
                return Ok((socket, Some(target)));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{addr} resolves to no address"),
        )
    }))
}

impl Multifeed {
    /// Replicates live with the peer at `addr` (`host:port`, resolved at every
    /// attempt) over TCP, reconnecting after every loss until stopped. See
    /// [`Dialer`] and [`DialOptions`]. Must be called inside a tokio runtime.
    pub fn dial(&self, addr: impl Into<String>, options: DialOptions) -> Dialer {
        let addr: String = addr.into();
        self.dial_with(
            move || {
                let addr = addr.clone();
                async move { connect_tcp(&addr).await }
            },
            options,
        )
    }

    /// Like [`Multifeed::dial`] over any connection `connect` makes (TLS, a
    /// proxy, an in-memory pipe): it is called for every attempt and returns the
    /// stream and, if it has one, the peer's address.
    pub fn dial_with<C, F, S>(&self, connect: C, options: DialOptions) -> Dialer
    where
        C: FnMut() -> F + Send + 'static,
        F: Future<Output = io::Result<(S, Option<SocketAddr>)>> + Send + 'static,
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (events_tx, events) = mpsc::channel(EVENT_CAPACITY);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(self.clone(), connect, options, events_tx, stop_rx));
        Dialer { events, stop, task }
    }
}

/// Resolves once a stop is asked (or the handle is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

async fn run<C, F, S>(
    group: Multifeed,
    mut connect: C,
    options: DialOptions,
    events: mpsc::Sender<DialEvent>,
    mut stop: watch::Receiver<bool>,
) -> Result<DialSummary>
where
    C: FnMut() -> F + Send + 'static,
    F: Future<Output = io::Result<(S, Option<SocketAddr>)>> + Send + 'static,
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    // Advisory, like the session's own events: never wait for a slow consumer.
    let emit = |event: DialEvent| {
        let _ = events.try_send(event);
    };
    let mut replicate = options.replicate.clone();
    replicate.initiator = true;
    replicate.live = true;
    let mut backoff = Backoff::new(options.backoff, options.jitter_seed);
    let mut summary = DialSummary::default();
    loop {
        if *stop.borrow() {
            return Ok(summary);
        }
        summary.attempts += 1;
        emit(DialEvent::Connecting {
            attempt: summary.attempts,
        });
        let attempt = tokio::time::timeout(options.connect_timeout, connect());
        let connected = tokio::select! {
            () = stopped(&mut stop) => return Ok(summary),
            connected = attempt => connected.unwrap_or_else(|_| Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no connection within {:?}", options.connect_timeout),
            ))),
        };
        let delay = match connected {
            Err(error) => {
                let retry_in = backoff.next_delay();
                emit(DialEvent::ConnectFailed {
                    error: Arc::new(error),
                    retry_in,
                });
                retry_in
            }
            Ok((io, peer)) => {
                summary.sessions += 1;
                emit(DialEvent::Connected { peer });
                let started = Instant::now();
                let ended = session(&group, io, replicate.clone(), &emit, &mut stop).await;
                let lasted = started.elapsed();
                backoff.session_lasted(lasted);
                summary.add(&ended);
                let result = match ended.result {
                    Ok(s) if ended.stopped || s.ended == SessionEnd::LocalStop => {
                        emit(DialEvent::SessionEnded {
                            result: Ok(s),
                            lasted,
                            retry_in: None,
                        });
                        return Ok(summary);
                    }
                    Ok(s) => Ok(s),
                    Err(error) => match fatal_copy(&error) {
                        Some(copy) => {
                            let error = Arc::new(error);
                            emit(DialEvent::SessionEnded {
                                result: Err(error.clone()),
                                lasted,
                                retry_in: None,
                            });
                            emit(DialEvent::GaveUp { error });
                            return Err(copy);
                        }
                        // Stopping made the session fail (say, mid-handshake): still a stop.
                        None if ended.stopped => {
                            emit(DialEvent::SessionEnded {
                                result: Err(Arc::new(error)),
                                lasted,
                                retry_in: None,
                            });
                            return Ok(summary);
                        }
                        None => Err(Arc::new(error)),
                    },
                };
                let retry_in = backoff.next_delay();
                emit(DialEvent::SessionEnded {
                    result,
                    lasted,
                    retry_in: Some(retry_in),
                });
                retry_in
            }
        };
        tokio::select! {
            () = stopped(&mut stop) => return Ok(summary),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// How one session ended.
struct Ended {
    result: Result<ReplicationSummary>,
    /// It ended because a stop was asked.
    stopped: bool,
    /// Blocks and bytes its progress events reported.
    progress: (u64, u64),
}

impl DialSummary {
    fn add(&mut self, ended: &Ended) {
        // A live session's summary counts only the feed channels that finished
        // before it ended, so the progress it reported counts too.
        let (mut blocks, mut bytes) = ended.progress;
        if let Ok(s) = &ended.result {
            blocks = blocks.max(s.blocks_received);
            bytes = bytes.max(s.bytes_received);
            self.blocks_sent += s.blocks_sent;
            self.bytes_sent += s.bytes_sent;
            self.feeds_learnt += s.feeds_learnt;
        }
        self.blocks_received += blocks;
        self.bytes_received += bytes;
    }
}

/// Runs one live session to its end, forwarding its events.
async fn session<S>(
    group: &Multifeed,
    io: S,
    options: ReplicateOptions,
    emit: &impl Fn(DialEvent),
    stop: &mut watch::Receiver<bool>,
) -> Ended
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut replication = group.start_replication(io, options);
    // Progress counts are running totals per feed on this connection.
    let mut received: HashMap<FeedKey, (u64, u64)> = HashMap::new();
    let mut stopped_here = false;
    loop {
        tokio::select! {
            event = replication.next_event() => match event {
                Some(event) => {
                    if let ReplicationEvent::Progress { key, blocks, bytes } = &event {
                        let seen = received.entry(*key).or_default();
                        *seen = ((*blocks).max(seen.0), (*bytes).max(seen.1));
                    }
                    emit(DialEvent::Replication(event));
                }
                None => break,
            },
            () = stopped(stop), if !stopped_here => {
                replication.stop();
                stopped_here = true;
            }
        }
    }
    let progress = received.values().fold((0, 0), |(blocks, bytes), seen| {
        (blocks + seen.0, bytes + seen.1)
    });
    Ended {
        result: replication.finish().await,
        stopped: stopped_here,
        progress,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEEDS: u64 = 1_000;

    fn policy() -> BackoffPolicy {
        BackoffPolicy::default()
    }

    fn schedule(seed: u64, n: usize) -> Vec<Duration> {
        let mut backoff = Backoff::new(policy(), Some(seed));
        (0..n).map(|_| backoff.next_delay()).collect()
    }

    /// The ceiling of the n-th failure's delay (from 0).
    fn ceiling(n: u32) -> Duration {
        let p = policy();
        p.initial
            .saturating_mul(2u32.saturating_pow(n + 1))
            .min(p.max)
    }

    #[test]
    fn delays_stay_between_the_initial_delay_and_a_doubling_ceiling() {
        let p = policy();
        for seed in 0..SEEDS {
            let delays = schedule(seed, 40);
            for (n, d) in delays.iter().enumerate() {
                assert!(
                    *d >= p.initial && *d <= ceiling(n as u32),
                    "seed {seed}, failure {n}: {d:?}"
                );
            }
        }
        // The ceiling reaches the cap after seven failures (250 ms × 2⁷ = 32 s).
        assert_eq!(ceiling(5), Duration::from_secs(16));
        assert_eq!(ceiling(6), p.max);
    }

    #[test]
    fn delays_climb_to_the_cap() {
        let p = policy();
        let mean = |n: usize| -> Duration {
            (0..SEEDS).map(|s| schedule(s, n + 1)[n]).sum::<Duration>() / SEEDS as u32
        };
        // Full jitter: the mean is half way up each window.
        for n in 0..12 {
            let expected = (p.initial + ceiling(n as u32)) / 2;
            let got = mean(n);
            assert!(
                got >= expected * 9 / 10 && got <= expected * 11 / 10,
                "failure {n}: mean {got:?}, expected about {expected:?}"
            );
        }
        // Every schedule gets well up the window once at the cap.
        for seed in 0..SEEDS {
            let delays = schedule(seed, 40);
            assert!(
                delays.iter().any(|d| *d >= p.max / 2),
                "seed {seed} stayed low: {delays:?}"
            );
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_seeds_spread_retries() {
        assert_eq!(schedule(7, 30), schedule(7, 30));
        // A hundred gateways that lost the same server retry at a hundred moments
        // spread over the whole first window, not in lockstep.
        let mut first: Vec<Duration> = (0..100).map(|s| schedule(s, 1)[0]).collect();
        first.sort();
        first.dedup();
        assert!(first.len() >= 95, "{} distinct first delays", first.len());
        let p = policy();
        assert!(first[0] < p.initial * 11 / 10, "{first:?}");
        assert!(*first.last().unwrap() > p.initial * 19 / 10, "{first:?}");
    }

    #[test]
    fn a_session_that_lasted_resets_the_schedule_and_a_short_one_does_not() {
        let p = policy();
        for seed in 0..SEEDS {
            let mut backoff = Backoff::new(p, Some(seed));
            for _ in 0..5 {
                backoff.next_delay();
            }
            assert_eq!(backoff.failures(), 5);
            assert_eq!(backoff.ceiling(), ceiling(5));
            // A session that died at once is one more failure.
            backoff.session_lasted(p.reset_after - Duration::from_millis(1));
            assert_eq!(backoff.failures(), 5);
            let next = backoff.next_delay();
            assert!(next <= ceiling(5));
            // One that lasted starts over.
            backoff.session_lasted(p.reset_after);
            assert_eq!(backoff.failures(), 0);
            let next = backoff.next_delay();
            assert!(next >= p.initial && next <= p.initial * 2, "{next:?}");
        }
    }

    #[test]
    fn degenerate_policies_still_give_bounded_delays() {
        // An initial delay above the cap is clamped to it.
        let mut backoff = Backoff::new(
            BackoffPolicy::default()
                .initial(Duration::from_secs(60))
                .max(Duration::from_secs(1)),
            Some(1),
        );
        for _ in 0..10 {
            assert_eq!(backoff.next_delay(), Duration::from_secs(1));
        }
        // A zero policy never makes a hot loop.
        let mut backoff = Backoff::new(
            BackoffPolicy::default()
                .initial(Duration::ZERO)
                .max(Duration::ZERO),
            Some(1),
        );
        for _ in 0..10 {
            assert_eq!(backoff.next_delay(), MIN_DELAY);
        }
        let mut backoff = Backoff::new(BackoffPolicy::default().initial(Duration::ZERO), Some(1));
        let delays: Vec<Duration> = (0..40).map(|_| backoff.next_delay()).collect();
        assert!(delays.iter().all(|d| *d >= MIN_DELAY), "{delays:?}");
        assert!(
            delays.iter().any(|d| *d >= Duration::from_secs(1)),
            "{delays:?}"
        );
        // Huge durations do not overflow.
        let mut backoff = Backoff::new(
            BackoffPolicy::default()
                .initial(Duration::from_secs(u64::MAX / 4))
                .max(Duration::MAX),
            Some(1),
        );
        for _ in 0..10 {
            assert!(backoff.next_delay() >= Duration::from_secs(u64::MAX / 4));
        }
    }

    #[test]
    fn only_refusals_and_a_dead_local_side_are_fatal() {
        assert!(is_fatal(&Error::SharedKeyMismatch));
        assert!(is_fatal(&Error::VersionMismatch {
            ours: "1.0.0".into(),
            theirs: "2.0.0".into()
        }));
        assert!(is_fatal(&Error::ClientMismatch {
            ours: "a".into(),
            theirs: "b".into()
        }));
        assert!(is_fatal(&Error::Closed));
        for healable in [
            Error::ConnectionLost {
                reason: "eof".into(),
            },
            Error::IdleTimeout {
                after: Duration::from_secs(1),
            },
            Error::Stalled {
                after: Duration::from_secs(1),
            },
            Error::HandshakeTimeout {
                after: Duration::from_secs(1),
            },
            Error::PeerFault {
                reason: "bad frame".into(),
            },
            Error::io("disk full", io::Error::other("no space left")),
        ] {
            assert!(!is_fatal(&healable), "{healable}");
        }
    }
}
