//! Deterministic simulator of replication sessions (tests only).
//!
//! Drives [`SessionCore`]s of N peers through random appends, new writers,
//! connects, cuts, stops and reconnects, on a virtual clock with a seeded RNG.
//! Everything around the core is modelled the way it really behaves:
//!
//! - the connection is in order, with random delays; messages of different
//!   channels interleave as tasks and the protocol's queues are scheduled (opens
//!   go straight to the wire, channel messages through one outbound queue, as in
//!   hypercore-protocol 0.7.2);
//! - hypercore-protocol's channel map: a channel opens once both sides opened the
//!   key; a second open of a key by one side makes a second channel that takes the
//!   peer's messages from the first; a channel id is freed (and reused by the next
//!   open) when a close is sent or the peer's close arrives; messages for a channel
//!   that is gone are dropped, and a message for a channel whose receiver was
//!   dropped ends the whole connection ("sending into a closed channel");
//! - feed tasks as `feed_task::run_feed` runs them (its loop, its end rules and
//!   the agreed `FEED_DONE` close), with the replication of one feed reduced to
//!   lengths: all copies of a feed are prefixes of its writer's log.
//!
//! Properties checked: no side opens a channel twice before it closed; no
//! message sent on one feed's channel reaches another feed's channel through a
//! reused channel id; no session ends unless a side asked (stop, one-shot
//! completion), the simulator cut the connection, or a peer sent garbage (then
//! the error is the typed peer fault); a completed session holds every feed the
//! peer announced, at least as long as announced, and its summary counts the
//! feeds it learnt; one-shot sessions always end; after the last append, peers
//! joined by live sessions converge to the same feeds and lengths.
//!
//! `SIM_SEEDS=n` runs n seeds (default 2,000), `SIM_SEED=s` runs only seed s,
//! `SIM_TRACE=1` prints its trace. `scripts/sim.sh` runs a long batch.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, HashSet, VecDeque},
    fmt::Write as _,
    sync::OnceLock,
    time::Duration,
};

use hypercore_protocol::{DiscoveryKey, discovery_key};
use tokio::time::Instant;

use super::{
    ReplicateOptions, ReplicationEvent, ReplicationSummary, SessionEnd,
    feed_task::{FeedSyncError, FeedSyncSummary},
    session_core::{Action, Input, LocalFeeds, SessionCore},
};
use crate::{FeedKey, error::Error, keys::Keypair};

type ChanId = usize;
type TaskId = usize;
/// Virtual time in microseconds.
type Micros = u64;

const MS: Micros = 1_000;
const SEC: Micros = 1_000_000;
/// How long a finished one-shot side waits for its feed tasks (as `session::LINGER`).
const LINGER: Micros = 500 * MS;
/// Messages a feed task takes from its channel per step (as `feed_task`).
const MAX_MESSAGES_PER_STEP: usize = 512;
/// The group's shared key (the group channel's key).
const SHARED_KEY: [u8; 32] = [7; 32];

/// SplitMix64: small, fast and the same on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Feed keys (valid ed25519 public keys, as manifests require).
fn feed_keys() -> &'static [FeedKey] {
    static KEYS: OnceLock<Vec<FeedKey>> = OnceLock::new();
    KEYS.get_or_init(|| {
        (0..64u8)
            .map(|i| Keypair::from_secret_bytes([i.wrapping_add(100); 32]).public_key())
            .collect()
    })
}

/// A message on a channel. Feed replication is reduced to lengths.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ChanMsg {
    /// An encoded feed-exchange message (group channel).
    Exchange(Vec<u8>),
    /// "I hold `len` blocks; I saw you holding `seen`" (a Synchronize).
    Have {
        len: u64,
        seen: Option<u64>,
    },
    /// "Send me your blocks up to this length."
    Request(u64),
    /// Blocks up to this length (with their proofs).
    Data(u64),
    /// The `FEED_DONE` extension message.
    FeedDone,
    Close,
}

#[derive(Debug, Clone)]
enum Frame {
    Open {
        ch: usize,
        dk: DiscoveryKey,
    },
    /// `of`: the key of the channel it was sent on, which only the simulator sees.
    Msg {
        ch: usize,
        msg: ChanMsg,
        of: [u8; 32],
    },
    /// The peer's end of the connection closed.
    Eof,
}

/// The protocol's events, as the session's driver receives them.
#[derive(Debug)]
enum ProtoEvent {
    Channel(ChanId),
    DiscoveryKey(DiscoveryKey),
    Close(DiscoveryKey),
    Failed(String),
}

/// hypercore-protocol's `ChannelHandle`.
#[derive(Debug)]
struct Handle {
    /// Handle number, for its `closed` flag shared with its channels.
    hid: usize,
    local: Option<(usize, [u8; 32])>,
    remote: Option<usize>,
    /// The channel the peer's messages go to.
    inbound: Option<ChanId>,
}

/// Who holds a channel's receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// The driver or the core (an event not yet handled, a parked channel, the
    /// group channel): messages queue.
    Held,
    Task(TaskId),
    /// Read and discarded until the connection ends.
    Drain,
    /// Gone: a message for it ends the connection.
    Dropped,
}

#[derive(Debug)]
struct Chan {
    key: [u8; 32],
    hid: usize,
    local_id: usize,
    inbox: VecDeque<ChanMsg>,
    owner: Owner,
}

/// The abstract replication of one feed over one channel (`FeedSync` reduced to
/// lengths): announce, request what the peer has more of, answer requests.
#[derive(Debug, Default)]
struct FeedModel {
    remote: Option<u64>,
    /// The peer's view of our length, from its last announcement.
    remote_seen: Option<u64>,
    sent: Option<(u64, Option<u64>)>,
    requested: u64,
    finished: bool,
}

impl FeedModel {
    fn announce(&mut self, local: u64, out: &mut Vec<ChanMsg>) {
        let pair = (local, self.remote);
        if self.sent != Some(pair) {
            self.sent = Some(pair);
            out.push(ChanMsg::Have {
                len: local,
                seen: self.remote,
            });
        }
        if let Some(remote) = self.remote
            && remote > local
            && self.requested < remote
            && !self.finished
        {
            self.requested = remote;
            out.push(ChanMsg::Request(remote));
        }
    }

    fn is_synced(&self, local: u64) -> bool {
        self.remote == Some(local) && self.remote_seen == Some(local)
    }

    fn downloaded(&self, local: u64) -> bool {
        self.remote.is_some_and(|remote| local >= remote)
    }
}

#[derive(Debug)]
struct Task {
    key: FeedKey,
    chan: ChanId,
    started: bool,
    model: FeedModel,
    sum: FeedSyncSummary,
    closed: bool,
    done_sent: bool,
    peer_done: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Inbound,
    Command,
    Outbound,
    Proto,
    Root,
    TaskDone,
    Synced,
    Progress,
    Admitted,
    Members,
    Grew,
    Task(TaskId),
    Tick,
    Timeout,
    Stop,
    LingerEnd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    /// Ended well; one-shot feed tasks are still finishing.
    Lingering,
    Closed,
}

struct Side {
    peer: usize,
    live: bool,
    initiator: bool,
    core: SessionCore<ChanId>,
    state: State,
    // The protocol.
    handles: HashMap<DiscoveryKey, Handle>,
    local_ids: Vec<Option<DiscoveryKey>>,
    remote_ids: Vec<Option<DiscoveryKey>>,
    handle_closed: Vec<bool>,
    failed: bool,
    chans: Vec<Chan>,
    // Queues, each worked through by wakeups at random times.
    inbound: VecDeque<Frame>,
    commands: VecDeque<[u8; 32]>,
    outbound: VecDeque<(usize, ChanMsg, [u8; 32])>,
    proto: VecDeque<ProtoEvent>,
    root_inbox: VecDeque<ChanMsg>,
    tasks_done: VecDeque<(FeedKey, Result<FeedSyncSummary, FeedSyncError>)>,
    synced: VecDeque<FeedKey>,
    admitted: VecDeque<Vec<FeedKey>>,
    progressed: VecDeque<FeedKey>,
    /// Feeds on trial this side holds.
    held: HashSet<FeedKey>,
    members: VecDeque<FeedKey>,
    /// Members watched until they hold a block (`Action::WatchGrowth`).
    watched: HashSet<FeedKey>,
    grew: VecDeque<FeedKey>,
    // The driver.
    root: Option<ChanId>,
    root_rx_taken: bool,
    tasks: HashMap<TaskId, Task>,
    task_wake: HashSet<TaskId>,
    timeout_at: Option<Micros>,
    driver_error: Option<Error>,
    pending_end: Option<Result<(), Error>>,
    last_received: Micros,
    feed_activity: Micros,
    wire_last: Micros,
    // What the checks need.
    announced: Vec<(FeedKey, Option<u64>)>,
    created: usize,
    blocks_applied: u64,
    stop_asked: bool,
    result: Option<Result<ReplicationSummary, String>>,
}

impl Side {
    /// The protocol's handle for `dk`, made (with its closed flag) on first use.
    fn handle(&mut self, dk: DiscoveryKey) -> &mut Handle {
        let hid = self.handle_closed.len();
        let handle = self.handles.entry(dk).or_insert_with(|| Handle {
            hid,
            local: None,
            remote: None,
            inbound: None,
        });
        if handle.hid == hid {
            self.handle_closed.push(false);
        }
        handle
    }
}

struct Conn {
    sides: [Side; 2],
    cut: bool,
    /// A side sent garbage or closed a channel early.
    faulted: bool,
    /// A side closed a channel early.
    early_closed: bool,
    /// Part of the final live chain.
    final_link: bool,
}

#[derive(Default)]
struct Peer {
    order: Vec<FeedKey>,
    /// Members and feeds on trial.
    lens: HashMap<FeedKey, u64>,
    /// Feeds on trial, with how many sessions hold them.
    trial: HashMap<FeedKey, usize>,
}

impl LocalFeeds for Peer {
    fn members(&self) -> Vec<(FeedKey, u64)> {
        self.order.iter().map(|k| (*k, self.lens[k])).collect()
    }

    fn is_member(&self, key: &FeedKey) -> bool {
        self.lens.contains_key(key) && !self.trial.contains_key(key)
    }

    fn length(&self, key: &FeedKey) -> Option<u64> {
        self.lens.get(key).copied()
    }

    fn contiguous_length(&self, key: &FeedKey) -> Option<u64> {
        self.lens.get(key).copied()
    }
}

#[derive(Debug)]
enum Ev {
    Wake {
        conn: usize,
        side: usize,
        src: Source,
    },
    Deliver {
        conn: usize,
        to: usize,
        frame: Frame,
    },
    Admission {
        conn: usize,
        side: usize,
        keys: Vec<FeedKey>,
    },
    Append {
        peer: usize,
    },
    NewWriter {
        peer: usize,
    },
    Connect,
    Cut,
    Stop,
    /// A side sends an undecodable exchange message (a peer fault).
    Garbage,
    /// A side's feed task closes its channel early, before the agreed close (as
    /// a plain hypercore peer would).
    EarlyClose,
    FinalPhase,
    Check,
}

struct Scheduled {
    at: Micros,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// What one seed did, for the report: how often each path was taken.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct SeedStats {
    pub(super) seeds: u64,
    pub(super) sessions: u64,
    pub(super) events: u64,
    pub(super) virtual_time: Duration,
    pub(super) completed: u64,
    pub(super) peer_closed: u64,
    pub(super) local_stops: u64,
    pub(super) connections_lost: u64,
    /// Sessions that ended on the peer's fault (it sent garbage).
    pub(super) peer_faults: u64,
    pub(super) garbage_sent: u64,
    pub(super) early_closes: u64,
    /// Messages that reached another feed's channel after an early close.
    pub(super) strays_after_early_close: u64,
    /// Messages that reached another channel of a side that had ended.
    pub(super) strays_after_end: u64,
    /// Feed tasks that ended with `ClosedBeforeSync` (the core retries them).
    pub(super) closed_before_sync: u64,
    /// Channels that opened while their feed's previous task was still running.
    pub(super) reopened_while_running: u64,
    pub(super) refused: u64,
    /// Messages for a channel already gone, dropped by the protocol.
    pub(super) dropped_messages: u64,
    pub(super) blocks: u64,
}

impl SeedStats {
    fn add(&mut self, other: &SeedStats) {
        self.seeds += other.seeds;
        self.sessions += other.sessions;
        self.events += other.events;
        self.virtual_time += other.virtual_time;
        self.completed += other.completed;
        self.peer_closed += other.peer_closed;
        self.local_stops += other.local_stops;
        self.connections_lost += other.connections_lost;
        self.peer_faults += other.peer_faults;
        self.garbage_sent += other.garbage_sent;
        self.early_closes += other.early_closes;
        self.strays_after_early_close += other.strays_after_early_close;
        self.strays_after_end += other.strays_after_end;
        self.closed_before_sync += other.closed_before_sync;
        self.reopened_while_running += other.reopened_while_running;
        self.refused += other.refused;
        self.dropped_messages += other.dropped_messages;
        self.blocks += other.blocks;
    }
}

struct Sim {
    rng: Rng,
    now: Micros,
    base: Instant,
    seq: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    peers: Vec<Peer>,
    /// Every feed's writer length.
    truth: HashMap<FeedKey, u64>,
    writers: Vec<(usize, FeedKey)>,
    unused_keys: Vec<FeedKey>,
    conns: Vec<Conn>,
    churn_end: Micros,
    deadline: Micros,
    /// `ReplicateOptions::max_unproven_feeds` of every side: small in the seeds
    /// that give peers many empty writers.
    max_unproven: usize,
    /// `ReplicateOptions::max_waiting_feeds` of every side: small in some seeds,
    /// so offers are requested in many waves.
    max_waiting: usize,
    failure: Option<String>,
    done: bool,
    trace: Option<String>,
    stats: SeedStats,
}

macro_rules! trace {
    ($sim:expr, $($arg:tt)*) => {
        if let Some(trace) = $sim.trace.as_mut() {
            let _ = write!(trace, "{:>10.3} ms  ", $sim.now as f64 / 1000.0);
            let _ = writeln!(trace, $($arg)*);
        }
    };
}

fn short(key: &[u8; 32]) -> String {
    hex::encode(&key[..3])
}

impl Sim {
    fn new(seed: u64, trace: bool) -> Self {
        let mut rng = Rng(seed);
        let peer_count = rng.range(2, 4) as usize;
        let mut keys: Vec<FeedKey> = feed_keys().to_vec();
        // A seeded shuffle, so seeds differ in which keys sort first.
        for i in (1..keys.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            keys.swap(i, j);
        }
        let mut sim = Sim {
            rng,
            now: 0,
            base: Instant::now(),
            seq: 0,
            queue: BinaryHeap::new(),
            peers: (0..peer_count).map(|_| Peer::default()).collect(),
            truth: HashMap::new(),
            writers: Vec::new(),
            unused_keys: keys,
            conns: Vec::new(),
            churn_end: 0,
            deadline: 0,
            max_unproven: ReplicateOptions::new(true).max_unproven_feeds,
            max_waiting: ReplicateOptions::new(true).max_waiting_feeds,
            failure: None,
            done: false,
            trace: trace.then(String::new),
            stats: SeedStats::default(),
        };
        // Stores that already hold data: writers, and copies of others' feeds.
        for peer in 0..peer_count {
            for _ in 0..sim.rng.range(0, 2) {
                sim.new_writer(peer);
                let key = sim.writers.last().map(|w| w.1).unwrap_or(feed_keys()[0]);
                let len = sim.rng.range(0, 5);
                sim.peers[peer].lens.insert(key, len);
                sim.truth.insert(key, len);
            }
        }
        // Many empty writers (one per topic, nothing written yet) against a small
        // cap of feeds on trial: empty feeds must not hold the places (they did,
        // and live sessions stalled).
        if sim.rng.chance(30) {
            sim.max_unproven = sim.rng.range(1, 3) as usize;
            for peer in 0..peer_count {
                for _ in 0..sim.rng.range(2, 8) {
                    sim.new_writer(peer);
                }
            }
        }
        if sim.rng.chance(40) {
            sim.max_waiting = sim.rng.range(1, 2) as usize;
        }
        let writers = sim.writers.clone();
        for (owner, key) in writers {
            for peer in 0..peer_count {
                if peer != owner && sim.rng.chance(30) {
                    let len = sim.rng.range(0, sim.truth[&key]);
                    sim.peers[peer].order.push(key);
                    sim.peers[peer].lens.insert(key, len);
                }
            }
        }
        sim.churn_end = sim.rng.range(200 * MS, 3 * SEC);
        sim.deadline = sim.churn_end + 240 * SEC;
        let churn_end = sim.churn_end;
        let at = |sim: &mut Sim| sim.rng.below(churn_end + 1);
        for _ in 0..sim.rng.range(1, 6) {
            let t = at(&mut sim);
            sim.schedule_at(t, Ev::Connect);
        }
        for _ in 0..sim.rng.range(0, 30) {
            let t = at(&mut sim);
            let peer = sim.rng.below(peer_count as u64) as usize;
            sim.schedule_at(t, Ev::Append { peer });
        }
        for _ in 0..sim.rng.range(0, 3) {
            let t = at(&mut sim);
            let peer = sim.rng.below(peer_count as u64) as usize;
            sim.schedule_at(t, Ev::NewWriter { peer });
        }
        for _ in 0..sim.rng.range(0, 2) {
            let t = at(&mut sim);
            sim.schedule_at(t, Ev::Cut);
        }
        for _ in 0..sim.rng.range(0, 2) {
            let t = at(&mut sim);
            sim.schedule_at(t, Ev::Stop);
        }
        if sim.rng.chance(10) {
            let t = at(&mut sim);
            sim.schedule_at(t, Ev::Garbage);
        }
        if sim.rng.chance(20) {
            for _ in 0..sim.rng.range(1, 4) {
                let t = at(&mut sim);
                sim.schedule_at(t, Ev::EarlyClose);
            }
        }
        sim.schedule_at(churn_end, Ev::FinalPhase);
        sim
    }

    fn schedule_at(&mut self, at: Micros, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at: at.max(self.now),
            seq: self.seq,
            ev,
        }));
    }

    fn wake(&mut self, conn: usize, side: usize, src: Source, max_delay: Micros) {
        let at = self.now + self.rng.below(max_delay + 1);
        self.schedule_at(at, Ev::Wake { conn, side, src });
    }

    fn fail(&mut self, what: String) {
        if self.failure.is_none() {
            trace!(self, "FAILURE: {what}");
            self.failure = Some(what);
        }
    }

    fn instant(&self, at: Micros) -> Instant {
        self.base + Duration::from_micros(at)
    }

    fn run(mut self) -> (Result<SeedStats, String>, Option<String>) {
        while let Some(Reverse(next)) = self.queue.pop() {
            self.now = next.at;
            self.stats.events += 1;
            self.dispatch(next.ev);
            if self.failure.is_some() || self.done {
                break;
            }
            if self.now > self.deadline {
                let what = self.diagnose();
                self.fail(format!("no convergence by the deadline: {what}"));
                break;
            }
        }
        let mut stats = self.stats;
        stats.seeds = 1;
        stats.sessions = self.conns.len() as u64;
        stats.virtual_time = Duration::from_micros(self.now);
        let result = match self.failure.take() {
            Some(failure) => Err(failure),
            None if self.done => Ok(stats),
            None => Err("the simulation ran out of events".into()),
        };
        (result, self.trace.take())
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::Wake { conn, side, src } => self.on_wake(conn, side, src),
            Ev::Deliver { conn, to, frame } => {
                let c = &mut self.conns[conn];
                if c.cut || c.sides[to].state == State::Closed {
                    return;
                }
                c.sides[to].inbound.push_back(frame);
                self.wake(conn, to, Source::Inbound, MS);
            }
            Ev::Admission { conn, side, keys } => self.on_admission(conn, side, keys),
            Ev::Append { peer } => {
                let writers: Vec<FeedKey> = self
                    .writers
                    .iter()
                    .filter(|w| w.0 == peer)
                    .map(|w| w.1)
                    .collect();
                if writers.is_empty() {
                    return;
                }
                let key = writers[self.rng.below(writers.len() as u64) as usize];
                let n = self.rng.range(1, 3);
                let len = self.truth[&key] + n;
                trace!(
                    self,
                    "peer {peer} appends to {} (now {len})",
                    short(key.as_bytes())
                );
                self.truth.insert(key, len);
                self.set_len(peer, key, len);
            }
            Ev::NewWriter { peer } => self.new_writer(peer),
            Ev::Connect => {
                let n = self.peers.len() as u64;
                let a = self.rng.below(n) as usize;
                let b = (a + 1 + self.rng.below(n - 1) as usize) % n as usize;
                let (live_a, live_b) = (self.rng.chance(50), self.rng.chance(50));
                self.connect(a, b, live_a, live_b, false);
            }
            Ev::Cut => {
                let open: Vec<usize> = (0..self.conns.len())
                    .filter(|&c| !self.conns[c].cut && self.conn_open(c))
                    .collect();
                if open.is_empty() {
                    return;
                }
                let conn = open[self.rng.below(open.len() as u64) as usize];
                trace!(self, "conn {conn}: cut");
                self.conns[conn].cut = true;
                for side in 0..2 {
                    if self.conns[conn].sides[side].state != State::Closed {
                        self.conns[conn].sides[side].inbound.push_back(Frame::Eof);
                        self.wake(conn, side, Source::Inbound, 5 * MS);
                    }
                }
            }
            Ev::Stop => {
                let running: Vec<(usize, usize)> = (0..self.conns.len())
                    .flat_map(|c| [(c, 0), (c, 1)])
                    .filter(|&(c, s)| self.conns[c].sides[s].state == State::Running)
                    .collect();
                if running.is_empty() {
                    return;
                }
                let (conn, side) = running[self.rng.below(running.len() as u64) as usize];
                trace!(self, "conn {conn} side {side}: stop asked");
                self.conns[conn].sides[side].stop_asked = true;
                self.wake(conn, side, Source::Stop, MS);
            }
            Ev::Garbage => {
                let ready: Vec<(usize, usize)> = (0..self.conns.len())
                    .flat_map(|c| [(c, 0), (c, 1)])
                    .filter(|&(c, s)| {
                        let s = &self.conns[c].sides[s];
                        s.state == State::Running && s.root.is_some() && !s.failed
                    })
                    .collect();
                if ready.is_empty() {
                    return;
                }
                let (conn, side) = ready[self.rng.below(ready.len() as u64) as usize];
                trace!(self, "conn {conn} side {side}: sends garbage");
                self.conns[conn].faulted = true;
                self.stats.garbage_sent += 1;
                let s = &mut self.conns[conn].sides[side];
                let root = s.root.expect("filtered on an open group channel");
                let id = s.chans[root].local_id;
                s.outbound
                    .push_back((id, ChanMsg::Exchange(vec![0xff; 3]), SHARED_KEY));
                self.wake(conn, side, Source::Outbound, MS);
            }
            Ev::EarlyClose => {
                let running: Vec<(usize, usize, TaskId)> = (0..self.conns.len())
                    .flat_map(|c| [(c, 0), (c, 1)])
                    .filter(|&(c, s)| self.conns[c].sides[s].state == State::Running)
                    .flat_map(|(c, s)| {
                        let mut ids: Vec<TaskId> =
                            self.conns[c].sides[s].tasks.keys().copied().collect();
                        ids.sort_unstable();
                        ids.into_iter().map(move |id| (c, s, id))
                    })
                    .collect();
                if running.is_empty() {
                    return;
                }
                let (conn, side, id) = running[self.rng.below(running.len() as u64) as usize];
                trace!(
                    self,
                    "conn {conn} side {side}: task {id} closes its channel early"
                );
                self.conns[conn].faulted = true;
                self.conns[conn].early_closed = true;
                self.stats.early_closes += 1;
                let task = self.conns[conn].sides[side]
                    .tasks
                    .remove(&id)
                    .expect("picked among the running tasks");
                self.chan_close(conn, side, task.chan);
                self.conns[conn].sides[side].chans[task.chan].owner = Owner::Drain;
                let sum = task.sum;
                self.end_task(conn, side, task, Ok(sum));
            }
            Ev::FinalPhase => {
                trace!(self, "final phase: a live chain through every peer");
                for a in 1..self.peers.len() {
                    self.connect(a - 1, a, true, true, true);
                }
                self.schedule_at(self.now + 100 * MS, Ev::Check);
            }
            Ev::Check => {
                if self.converged() {
                    self.done = true;
                } else {
                    self.schedule_at(self.now + 500 * MS, Ev::Check);
                }
            }
        }
    }

    fn conn_open(&self, conn: usize) -> bool {
        self.conns[conn]
            .sides
            .iter()
            .any(|s| s.state != State::Closed)
    }

    fn new_writer(&mut self, peer: usize) {
        let Some(key) = self.unused_keys.pop() else {
            return;
        };
        trace!(self, "peer {peer}: new writer {}", short(key.as_bytes()));
        self.writers.push((peer, key));
        self.truth.insert(key, 0);
        self.add_member(peer, key, 0);
    }

    /// A new member of `peer`'s store; its sessions hear of it.
    fn add_member(&mut self, peer: usize, key: FeedKey, len: u64) {
        self.peers[peer].order.push(key);
        self.peers[peer].lens.insert(key, len);
        for conn in 0..self.conns.len() {
            for side in 0..2 {
                let s = &mut self.conns[conn].sides[side];
                if s.peer == peer && s.state == State::Running {
                    s.members.push_back(key);
                    self.wake(conn, side, Source::Members, 2 * MS);
                }
            }
        }
    }

    /// Drops a hold on a feed on trial, as `Multifeed::release_candidates` does:
    /// one that delivered becomes a member, one that did not goes once nobody
    /// holds it.
    /// Drops a hold on a feed on trial, as `Multifeed::release_candidates`;
    /// whether the feed became a member by it.
    fn release(&mut self, peer: usize, key: FeedKey) -> bool {
        let p = &mut self.peers[peer];
        let Some(holders) = p.trial.get_mut(&key) else {
            return false;
        };
        *holders = holders.saturating_sub(1);
        let len = p.lens.get(&key).copied().unwrap_or(0);
        if len > 0 {
            p.trial.remove(&key);
            p.lens.remove(&key);
            self.add_member(peer, key, len);
            return true;
        } else if *holders == 0 {
            p.trial.remove(&key);
            p.lens.remove(&key);
        }
        false
    }

    /// A feed of `peer` grew: every feed task of it looks again, and sessions
    /// watching it for its first block hear of it.
    fn set_len(&mut self, peer: usize, key: FeedKey, len: u64) {
        self.peers[peer].lens.insert(key, len);
        for conn in 0..self.conns.len() {
            for side in 0..2 {
                let s = &mut self.conns[conn].sides[side];
                if s.peer != peer || s.state == State::Closed {
                    continue;
                }
                if len > 0 && s.watched.remove(&key) {
                    s.grew.push_back(key);
                    self.wake(conn, side, Source::Grew, 2 * MS);
                }
                let s = &self.conns[conn].sides[side];
                let ids: Vec<TaskId> = s
                    .tasks
                    .iter()
                    .filter(|(_, t)| t.key == key)
                    .map(|(id, _)| *id)
                    .collect();
                for id in ids {
                    self.wake_task(conn, side, id);
                }
            }
        }
    }

    fn connect(&mut self, a: usize, b: usize, live_a: bool, live_b: bool, final_link: bool) {
        let conn = self.conns.len();
        let a_initiates = self.rng.chance(50);
        let max_a = self.rng.range(1, 3) as usize;
        let max_b = self.rng.range(1, 3) as usize;
        trace!(
            self,
            "conn {conn}: peer {a} ({}{}) - peer {b} ({}{})",
            if live_a { "live" } else { "one-shot" },
            if a_initiates { ", initiator" } else { "" },
            if live_b { "live" } else { "one-shot" },
            if a_initiates { "" } else { ", initiator" },
        );
        let sides = [
            self.new_side(a, live_a, a_initiates, max_a),
            self.new_side(b, live_b, !a_initiates, max_b),
        ];
        self.conns.push(Conn {
            sides,
            cut: false,
            faulted: false,
            early_closed: false,
            final_link,
        });
        for side in 0..2 {
            // The driver opens the group channel first thing.
            self.conns[conn].sides[side].commands.push_back(SHARED_KEY);
            self.wake(conn, side, Source::Command, MS);
            self.schedule_tick(conn, side);
            self.schedule_timeout(conn, side);
        }
    }

    fn new_side(&mut self, peer: usize, live: bool, initiator: bool, max_active: usize) -> Side {
        let options = ReplicateOptions::new(initiator)
            .live(live)
            .max_active_feeds(max_active)
            .max_unproven_feeds(self.max_unproven)
            .max_waiting_feeds(self.max_waiting);
        let ping_seed = self.rng.next();
        Side {
            peer,
            live,
            initiator,
            core: SessionCore::new(options, SHARED_KEY, self.instant(self.now), ping_seed),
            state: State::Running,
            handles: HashMap::new(),
            local_ids: vec![None],
            remote_ids: Vec::new(),
            handle_closed: Vec::new(),
            failed: false,
            chans: Vec::new(),
            inbound: VecDeque::new(),
            commands: VecDeque::new(),
            outbound: VecDeque::new(),
            proto: VecDeque::new(),
            root_inbox: VecDeque::new(),
            tasks_done: VecDeque::new(),
            synced: VecDeque::new(),
            admitted: VecDeque::new(),
            progressed: VecDeque::new(),
            held: HashSet::new(),
            members: VecDeque::new(),
            watched: HashSet::new(),
            grew: VecDeque::new(),
            root: None,
            root_rx_taken: false,
            tasks: HashMap::new(),
            task_wake: HashSet::new(),
            timeout_at: None,
            driver_error: None,
            pending_end: None,
            last_received: self.now,
            feed_activity: self.now,
            wire_last: self.now,
            announced: Vec::new(),
            created: 0,
            blocks_applied: 0,
            stop_asked: false,
            result: None,
        }
    }

    fn schedule_tick(&mut self, conn: usize, side: usize) {
        let period = ReplicateOptions::new(true).keepalive_interval().as_micros() as Micros;
        self.schedule_at(
            self.now + period,
            Ev::Wake {
                conn,
                side,
                src: Source::Tick,
            },
        );
    }

    fn schedule_timeout(&mut self, conn: usize, side: usize) {
        let s = &mut self.conns[conn].sides[side];
        let Some(deadline) = s.core.timeout() else {
            return;
        };
        let at = deadline.saturating_duration_since(self.base).as_micros() as Micros;
        if s.timeout_at != Some(at) {
            s.timeout_at = Some(at);
            self.schedule_at(
                at,
                Ev::Wake {
                    conn,
                    side,
                    src: Source::Timeout,
                },
            );
        }
    }

    fn on_wake(&mut self, conn: usize, side: usize, src: Source) {
        let state = self.conns[conn].sides[side].state;
        if state == State::Closed {
            return;
        }
        let running = state == State::Running;
        match src {
            Source::Inbound => {
                let s = &mut self.conns[conn].sides[side];
                if let Some(frame) = s.inbound.pop_front()
                    && !s.failed
                {
                    s.last_received = self.now;
                    self.read_frame(conn, side, frame);
                }
            }
            Source::Command => {
                let s = &mut self.conns[conn].sides[side];
                if let Some(key) = s.commands.pop_front()
                    && !s.failed
                {
                    self.command_open(conn, side, key);
                }
            }
            Source::Outbound => {
                let s = &mut self.conns[conn].sides[side];
                if let Some((id, msg, of)) = s.outbound.pop_front()
                    && !s.failed
                {
                    self.write_outbound(conn, side, id, msg, of);
                }
            }
            Source::Proto => {
                let Some(event) = self.conns[conn].sides[side].proto.pop_front() else {
                    return;
                };
                if running {
                    self.on_proto_event(conn, side, event);
                }
            }
            Source::Root => {
                let s = &mut self.conns[conn].sides[side];
                // The driver reads the group channel once it handled its opening.
                if s.root.is_none() {
                    return;
                }
                let Some(msg) = s.root_inbox.pop_front() else {
                    return;
                };
                if running && let ChanMsg::Exchange(bytes) = msg {
                    self.step(conn, side, Input::Exchange(bytes));
                }
            }
            Source::TaskDone => {
                let Some((key, result)) = self.conns[conn].sides[side].tasks_done.pop_front()
                else {
                    return;
                };
                if running {
                    self.step(conn, side, Input::FeedFinished { key, result });
                } else {
                    let s = &mut self.conns[conn].sides[side];
                    if let Ok(summary) = result {
                        s.core.count_late(key, summary);
                        while s.core.poll_action().is_some() {}
                    }
                    if s.tasks.is_empty() {
                        self.finalize(conn, side);
                    }
                }
            }
            Source::Synced => {
                let Some(key) = self.conns[conn].sides[side].synced.pop_front() else {
                    return;
                };
                if running {
                    self.step(conn, side, Input::FeedSynced(key));
                }
            }
            Source::Progress => {
                let Some(key) = self.conns[conn].sides[side].progressed.pop_front() else {
                    return;
                };
                if running {
                    self.step(conn, side, Input::Progress(key));
                }
            }
            Source::Admitted => {
                if !running {
                    return;
                }
                if !self.conns[conn].sides[side].core.accepts_admitted() {
                    // The driver leaves admission alone while the queue is long.
                    self.wake(conn, side, Source::Admitted, 20 * MS);
                    return;
                }
                let Some(keys) = self.conns[conn].sides[side].admitted.pop_front() else {
                    return;
                };
                self.step(conn, side, Input::Admitted { keys });
            }
            Source::Grew => {
                let Some(key) = self.conns[conn].sides[side].grew.pop_front() else {
                    return;
                };
                if running {
                    self.step(conn, side, Input::Grew(key));
                }
            }
            Source::Members => {
                let Some(key) = self.conns[conn].sides[side].members.pop_front() else {
                    return;
                };
                if running {
                    self.step(conn, side, Input::MemberAdded(key));
                }
            }
            Source::Task(id) => {
                self.conns[conn].sides[side].task_wake.remove(&id);
                self.run_task(conn, side, id);
            }
            Source::Tick => {
                if running {
                    let s = &self.conns[conn].sides[side];
                    let input = Input::Tick {
                        last_received: self.instant(s.last_received),
                        feed_activity: self.instant(s.feed_activity),
                    };
                    self.step(conn, side, input);
                    self.schedule_tick(conn, side);
                }
            }
            Source::Timeout => {
                if running {
                    self.conns[conn].sides[side].timeout_at = None;
                    self.step(conn, side, Input::Timeout);
                }
            }
            Source::Stop => {
                if running {
                    self.step(conn, side, Input::Stop);
                }
            }
            Source::LingerEnd => {
                if state == State::Lingering {
                    self.finalize(conn, side);
                }
            }
        }
    }

    // --- The protocol (hypercore-protocol 0.7.2's channel map) ---

    fn read_frame(&mut self, conn: usize, side: usize, frame: Frame) {
        match frame {
            Frame::Eof => {
                let reason = if self.conns[conn].cut {
                    "the connection was cut"
                } else {
                    "remote closed the connection"
                };
                self.proto_fail(conn, side, reason.into());
            }
            Frame::Open { ch, dk } => {
                let s = &mut self.conns[conn].sides[side];
                if s.remote_ids.len() > ch {
                    s.remote_ids[ch] = None;
                } else {
                    s.remote_ids.resize(ch + 1, None);
                }
                let handle = s.handle(dk);
                handle.remote = Some(ch);
                let ours_open = handle.local.is_some();
                s.remote_ids[ch] = Some(dk);
                if ours_open {
                    self.accept(conn, side, dk);
                } else {
                    self.proto_event(conn, side, ProtoEvent::DiscoveryKey(dk));
                }
            }
            Frame::Msg {
                ch,
                msg: ChanMsg::Close,
                of,
            } => {
                let s = &mut self.conns[conn].sides[side];
                let Some(Some(dk)) = s.remote_ids.get(ch).copied() else {
                    return;
                };
                if self.stray(conn, side, dk, &ChanMsg::Close, of) {
                    return;
                }
                let s = &mut self.conns[conn].sides[side];
                if let Some(chan) = s.handles.get(&dk).and_then(|h| h.inbound) {
                    self.deliver(conn, side, chan, ChanMsg::Close);
                }
                self.remove_handle(conn, side, dk);
                self.proto_event(conn, side, ProtoEvent::Close(dk));
            }
            Frame::Msg { ch, msg, of } => {
                let s = &self.conns[conn].sides[side];
                let Some(Some(dk)) = s.remote_ids.get(ch).copied() else {
                    trace!(
                        self,
                        "conn {conn} side {side}: dropped {msg:?} for gone channel {ch}"
                    );
                    self.stats.dropped_messages += 1;
                    return;
                };
                if self.stray(conn, side, dk, &msg, of) {
                    return;
                }
                let s = &self.conns[conn].sides[side];
                match s.handles.get(&dk).and_then(|h| h.inbound) {
                    Some(chan) => self.deliver(conn, side, chan, msg),
                    None => self.proto_fail(conn, side, "Channel is not open".into()),
                }
            }
        }
    }

    /// A message sent on one channel must not reach another feed's channel that took
    /// over its id (see `OneShotClose`): a failure, unless a peer closed a channel
    /// early (skipping the agreed close), which makes it possible, or this side has
    /// ended (it closed the group channel, so the peer's last exchange messages can
    /// be overtaken by its next open); then the connection fails, as the protocol
    /// or a confused feed task would fail it. Whether it did.
    fn stray(
        &mut self,
        conn: usize,
        side: usize,
        dk: DiscoveryKey,
        msg: &ChanMsg,
        of: [u8; 32],
    ) -> bool {
        if discovery_key(&of) == dk {
            return false;
        }
        let on = self.conns[conn].sides[side]
            .handles
            .get(&dk)
            .and_then(|h| h.local)
            .map_or_else(|| hex::encode(&dk[..3]), |(_, key)| short(&key));
        let what = format!(
            "{msg:?} sent on the channel of {} arrived on the channel of {on} (a reused channel id)",
            short(&of)
        );
        if self.conns[conn].sides[side].state != State::Running {
            self.stats.strays_after_end += 1;
            self.proto_fail(conn, side, what);
        } else if self.conns[conn].early_closed {
            self.stats.strays_after_early_close += 1;
            self.proto_fail(conn, side, what);
        } else {
            self.fail(format!("conn {conn} side {side}: {what}"));
        }
        true
    }

    /// A message for a channel: queued for its reader, or the connection ends.
    fn deliver(&mut self, conn: usize, side: usize, chan: ChanId, msg: ChanMsg) {
        let s = &mut self.conns[conn].sides[side];
        let tolerate = msg == ChanMsg::Close;
        match s.chans[chan].owner {
            Owner::Dropped if tolerate => {}
            Owner::Dropped => {
                let what = format!(
                    "Sending to channel failed: sending into a closed channel ({msg:?} for {})",
                    short(&s.chans[chan].key)
                );
                self.proto_fail(conn, side, what);
            }
            Owner::Drain => {}
            Owner::Held | Owner::Task(_) => {
                if s.root == Some(chan) || s.chans[chan].key == SHARED_KEY {
                    s.root_inbox.push_back(msg);
                    self.wake(conn, side, Source::Root, MS);
                } else {
                    s.chans[chan].inbox.push_back(msg);
                    if let Owner::Task(id) = s.chans[chan].owner {
                        self.wake_task(conn, side, id);
                    }
                }
            }
        }
    }

    fn proto_fail(&mut self, conn: usize, side: usize, reason: String) {
        let s = &mut self.conns[conn].sides[side];
        if s.failed {
            return;
        }
        trace!(self, "conn {conn} side {side}: protocol error: {reason}");
        s.failed = true;
        self.proto_event(conn, side, ProtoEvent::Failed(reason));
    }

    fn proto_event(&mut self, conn: usize, side: usize, event: ProtoEvent) {
        self.conns[conn].sides[side].proto.push_back(event);
        self.wake(conn, side, Source::Proto, MS);
    }

    fn remove_handle(&mut self, conn: usize, side: usize, dk: DiscoveryKey) {
        let s = &mut self.conns[conn].sides[side];
        if let Some(handle) = s.handles.remove(&dk) {
            if let Some((id, _)) = handle.local {
                s.local_ids[id] = None;
            }
            if let Some(id) = handle.remote {
                s.remote_ids[id] = None;
            }
            s.handle_closed[handle.hid] = true;
        }
    }

    /// A channel open on both sides: a new `Channel`, which takes the peer's messages.
    fn accept(&mut self, conn: usize, side: usize, dk: DiscoveryKey) {
        let s = &mut self.conns[conn].sides[side];
        let handle = s.handles.get_mut(&dk).expect("accepting a known handle");
        let (local_id, key) = handle.local.expect("accepting a local handle");
        let chan = s.chans.len();
        handle.inbound = Some(chan);
        let hid = handle.hid;
        s.chans.push(Chan {
            key,
            hid,
            local_id,
            inbox: VecDeque::new(),
            owner: Owner::Held,
        });
        self.proto_event(conn, side, ProtoEvent::Channel(chan));
    }

    fn command_open(&mut self, conn: usize, side: usize, key: [u8; 32]) {
        let dk = discovery_key(&key);
        let s = &mut self.conns[conn].sides[side];
        if s.handles.get(&dk).is_some_and(|h| h.local.is_some()) {
            self.fail(format!(
                "conn {conn} side {side} opened the channel of {} again before it closed",
                short(&key)
            ));
            return;
        }
        let s = &mut self.conns[conn].sides[side];
        let id = match s.local_ids.iter().skip(1).position(Option::is_none) {
            Some(free) => free + 1,
            None => {
                s.local_ids.push(None);
                s.local_ids.len() - 1
            }
        };
        let handle = s.handle(dk);
        handle.local = Some((id, key));
        let theirs_open = handle.remote.is_some();
        s.local_ids[id] = Some(dk);
        if theirs_open {
            self.accept(conn, side, dk);
        }
        self.send_frame(conn, side, Frame::Open { ch: id, dk });
    }

    fn write_outbound(&mut self, conn: usize, side: usize, id: usize, msg: ChanMsg, of: [u8; 32]) {
        if msg == ChanMsg::Close {
            let s = &self.conns[conn].sides[side];
            if let Some(Some(dk)) = s.local_ids.get(id).copied() {
                self.remove_handle(conn, side, dk);
                self.proto_event(conn, side, ProtoEvent::Close(dk));
            }
        }
        self.send_frame(conn, side, Frame::Msg { ch: id, msg, of });
    }

    /// Frames reach the peer in order, each after a random delay.
    fn send_frame(&mut self, conn: usize, side: usize, frame: Frame) {
        let delay = self.rng.range(50, 10 * MS);
        let c = &mut self.conns[conn];
        if c.cut {
            return;
        }
        let s = &mut c.sides[side];
        let at = s.wire_last.max(self.now + delay);
        s.wire_last = at;
        self.schedule_at(
            at,
            Ev::Deliver {
                conn,
                to: 1 - side,
                frame,
            },
        );
    }

    /// `Channel::send`: false if the channel is closed.
    fn chan_send(&mut self, conn: usize, side: usize, chan: ChanId, msg: ChanMsg) -> bool {
        let s = &mut self.conns[conn].sides[side];
        let c = &s.chans[chan];
        if s.handle_closed[c.hid] {
            return false;
        }
        s.outbound.push_back((c.local_id, msg, c.key));
        self.wake(conn, side, Source::Outbound, 2 * MS);
        true
    }

    /// `Channel::close`.
    fn chan_close(&mut self, conn: usize, side: usize, chan: ChanId) {
        if self.chan_send(conn, side, chan, ChanMsg::Close) {
            let s = &mut self.conns[conn].sides[side];
            let hid = s.chans[chan].hid;
            s.handle_closed[hid] = true;
        }
    }

    /// `flush` in `session`: what the protocol has queued goes out now.
    fn flush(&mut self, conn: usize, side: usize) {
        loop {
            let s = &mut self.conns[conn].sides[side];
            if s.failed {
                return;
            }
            if let Some(key) = s.commands.pop_front() {
                self.command_open(conn, side, key);
            } else if let Some((id, msg, of)) = s.outbound.pop_front() {
                self.write_outbound(conn, side, id, msg, of);
            } else {
                return;
            }
        }
    }

    // --- The driver (`session::Session`) ---

    fn on_proto_event(&mut self, conn: usize, side: usize, event: ProtoEvent) {
        match event {
            ProtoEvent::Channel(chan) => {
                let s = &mut self.conns[conn].sides[side];
                if s.chans[chan].key == SHARED_KEY {
                    s.root = Some(chan);
                    for _ in 0..s.root_inbox.len() {
                        self.wake(conn, side, Source::Root, MS);
                    }
                    self.step(conn, side, Input::RootOpened);
                } else {
                    let key = FeedKey::from_bytes(s.chans[chan].key);
                    if s.tasks.values().any(|t| t.key == key) {
                        self.stats.reopened_while_running += 1;
                    }
                    self.step(conn, side, Input::ChannelReady { key, channel: chan });
                }
            }
            ProtoEvent::DiscoveryKey(dk) => self.step(conn, side, Input::PeerOpened(dk)),
            ProtoEvent::Close(dk) if dk == discovery_key(&SHARED_KEY) => {
                self.drain_root(conn, side);
                self.step(conn, side, Input::RootClosed);
            }
            ProtoEvent::Close(dk) => self.step(conn, side, Input::ChannelClosed(dk)),
            ProtoEvent::Failed(reason) => {
                // Events queued before the end come first, then the group channel's
                // last messages.
                for _ in 0..64 {
                    let Some(event) = self.conns[conn].sides[side].proto.pop_front() else {
                        break;
                    };
                    if !matches!(event, ProtoEvent::Failed(_)) {
                        self.on_proto_event(conn, side, event);
                    }
                }
                let root_closed_by_peer = self.drain_root(conn, side);
                self.step(
                    conn,
                    side,
                    Input::ConnectionLost {
                        error: Error::ConnectionLost { reason },
                        root_closed_by_peer,
                    },
                );
            }
        }
    }

    /// Takes the group channel's receiver, handing in what it still holds;
    /// whether the peer's close was among it.
    fn drain_root(&mut self, conn: usize, side: usize) -> bool {
        let s = &mut self.conns[conn].sides[side];
        if s.root_rx_taken {
            return false;
        }
        s.root_rx_taken = true;
        if let Some(root) = s.root {
            s.chans[root].owner = Owner::Dropped;
        }
        let messages: Vec<ChanMsg> = s.root_inbox.drain(..).collect();
        let mut closed = false;
        for msg in messages {
            match msg {
                ChanMsg::Close => closed = true,
                ChanMsg::Exchange(bytes) => self.step(conn, side, Input::Exchange(bytes)),
                _ => {}
            }
        }
        closed
    }

    /// Hands `input` to the core and carries out its actions (`Session::step`).
    fn step(&mut self, conn: usize, side: usize, input: Input<ChanId>) {
        if self.conns[conn].sides[side].state != State::Running {
            return;
        }
        if !matches!(input, Input::Tick { .. } | Input::Exchange(_)) {
            trace!(self, "conn {conn} side {side}: input {input:?}");
        }
        let now = self.instant(self.now);
        let peer = self.conns[conn].sides[side].peer;
        let s = &mut self.conns[conn].sides[side];
        s.core.handle(now, input, &self.peers[peer]);
        let mut actions = Vec::new();
        while let Some(action) = s.core.poll_action() {
            actions.push(action);
        }
        for action in actions {
            if let Err(error) = self.execute(conn, side, action) {
                let s = &mut self.conns[conn].sides[side];
                if !s.core.is_ended() && s.driver_error.is_none() {
                    s.driver_error = Some(error);
                }
            }
        }
        self.schedule_timeout(conn, side);
        let s = &mut self.conns[conn].sides[side];
        let outcome = match s.driver_error.take() {
            Some(error) => Some(Err(error)),
            None => s.core.take_outcome(),
        };
        if let Some(outcome) = outcome {
            self.end_session(conn, side, outcome);
        }
    }

    fn execute(&mut self, conn: usize, side: usize, action: Action<ChanId>) -> Result<(), Error> {
        match action {
            Action::Send(message) => {
                let Some(root) = self.conns[conn].sides[side].root else {
                    return Ok(());
                };
                trace!(self, "conn {conn} side {side}: sends {message:?}");
                if self.chan_send(conn, side, root, ChanMsg::Exchange(message.encode())) {
                    Ok(())
                } else {
                    Err(Error::ConnectionLost {
                        reason: "Channel is closed".into(),
                    })
                }
            }
            Action::Open(key) => {
                trace!(
                    self,
                    "conn {conn} side {side}: opens {}",
                    short(key.as_bytes())
                );
                self.conns[conn].sides[side]
                    .commands
                    .push_back(*key.as_bytes());
                self.wake(conn, side, Source::Command, 2 * MS);
                Ok(())
            }
            Action::StartFeed { key, channel } => {
                trace!(
                    self,
                    "conn {conn} side {side}: starts {} on channel {channel}",
                    short(key.as_bytes())
                );
                let s = &mut self.conns[conn].sides[side];
                // A channel runs at most one task: it names the task.
                let id = channel;
                s.chans[channel].owner = Owner::Task(id);
                s.tasks.insert(
                    id,
                    Task {
                        key,
                        chan: channel,
                        started: false,
                        model: FeedModel::default(),
                        sum: FeedSyncSummary::default(),
                        closed: false,
                        done_sent: false,
                        peer_done: false,
                    },
                );
                self.wake_task(conn, side, id);
                Ok(())
            }
            Action::Refuse(channel) => {
                trace!(self, "conn {conn} side {side}: refuses channel {channel}");
                self.stats.refused += 1;
                let s = &mut self.conns[conn].sides[side];
                s.chans[channel].owner = Owner::Drain;
                s.chans[channel].inbox.clear();
                self.chan_close(conn, side, channel);
                Ok(())
            }
            Action::WatchGrowth(key) => {
                let peer = self.conns[conn].sides[side].peer;
                let s = &mut self.conns[conn].sides[side];
                if self.peers[peer].lens.get(&key).copied().unwrap_or(0) > 0 {
                    s.grew.push_back(key);
                    self.wake(conn, side, Source::Grew, 2 * MS);
                } else {
                    s.watched.insert(key);
                }
                Ok(())
            }
            Action::Admit(keys) => {
                let at = self.now + self.rng.range(100, 5 * MS);
                self.schedule_at(at, Ev::Admission { conn, side, keys });
                Ok(())
            }
            Action::Release(keys) => {
                let peer = self.conns[conn].sides[side].peer;
                let mut learnt = 0;
                for key in keys {
                    if self.conns[conn].sides[side].held.remove(&key) && self.release(peer, key) {
                        learnt += 1;
                    }
                }
                let s = &mut self.conns[conn].sides[side];
                s.created += learnt;
                s.core.count_learnt(learnt);
                Ok(())
            }
            Action::LearnMetadata(_) => Ok(()),
            Action::Emit(event) => {
                if let ReplicationEvent::RemoteFeeds { keys, lengths } = event {
                    let s = &mut self.conns[conn].sides[side];
                    s.announced.extend(keys.into_iter().zip(lengths));
                }
                Ok(())
            }
        }
    }

    /// The admission task: creates the feeds in batches.
    fn on_admission(&mut self, conn: usize, side: usize, keys: Vec<FeedKey>) {
        if self.conns[conn].sides[side].state != State::Running {
            return;
        }
        let peer = self.conns[conn].sides[side].peer;
        let split = self.rng.range(1, keys.len().max(1) as u64) as usize;
        let (now, later) = keys.split_at(split.min(keys.len()));
        let mut held = Vec::new();
        for key in now {
            let p = &mut self.peers[peer];
            if p.is_member(key) {
                continue;
            }
            *p.trial.entry(*key).or_insert(0) += 1;
            p.lens.entry(*key).or_insert(0);
            held.push(*key);
        }
        let s = &mut self.conns[conn].sides[side];
        s.held.extend(held);
        s.admitted.push_back(now.to_vec());
        self.wake(conn, side, Source::Admitted, 2 * MS);
        if !later.is_empty() {
            let at = self.now + self.rng.range(100, 5 * MS);
            self.schedule_at(
                at,
                Ev::Admission {
                    conn,
                    side,
                    keys: later.to_vec(),
                },
            );
        }
    }

    fn end_session(&mut self, conn: usize, side: usize, outcome: Result<(), Error>) {
        trace!(self, "conn {conn} side {side}: session ends: {outcome:?}");
        match outcome {
            Ok(()) => {
                if let Some(root) = self.conns[conn].sides[side].root {
                    self.chan_close(conn, side, root);
                }
                self.flush(conn, side);
                let s = &mut self.conns[conn].sides[side];
                s.pending_end = Some(Ok(()));
                if !s.live && !s.tasks.is_empty() {
                    s.state = State::Lingering;
                    let at = self.now + LINGER;
                    self.schedule_at(
                        at,
                        Ev::Wake {
                            conn,
                            side,
                            src: Source::LingerEnd,
                        },
                    );
                } else {
                    self.finalize(conn, side);
                }
            }
            Err(error) => {
                if error.is_handshake_refusal() {
                    self.flush(conn, side);
                }
                self.conns[conn].sides[side].pending_end = Some(Err(error));
                self.finalize(conn, side);
            }
        }
    }

    /// The session returned: its tasks are aborted and the connection is dropped.
    fn finalize(&mut self, conn: usize, side: usize) {
        let ok = matches!(self.conns[conn].sides[side].pending_end, Some(Ok(())));
        if ok {
            self.flush(conn, side);
        }
        let s = &mut self.conns[conn].sides[side];
        s.state = State::Closed;
        s.tasks.clear();
        let peer = s.peer;
        let mut learnt = 0;
        for key in std::mem::take(&mut s.held) {
            learnt += usize::from(self.release(peer, key));
        }
        let s = &mut self.conns[conn].sides[side];
        s.created += learnt;
        let result = match s.pending_end.take() {
            Some(Ok(())) => {
                let mut summary = s.core.summary().clone();
                summary.feeds_learnt += learnt;
                Ok(summary)
            }
            Some(Err(error)) => Err(error.to_string()),
            None => Err("ended without an outcome".into()),
        };
        trace!(self, "conn {conn} side {side}: returns {result:?}");
        self.conns[conn].sides[side].result = Some(result);
        self.send_frame(conn, side, Frame::Eof);
        self.check_end(conn, side);
    }

    // --- Feed tasks (`feed_task::run_feed`) ---

    fn wake_task(&mut self, conn: usize, side: usize, id: TaskId) {
        if self.conns[conn].sides[side].task_wake.insert(id) {
            self.wake(conn, side, Source::Task(id), 2 * MS);
        }
    }

    fn run_task(&mut self, conn: usize, side: usize, id: TaskId) {
        let peer = self.conns[conn].sides[side].peer;
        let live = self.conns[conn].sides[side].live;
        let closer = self.conns[conn].sides[side].initiator;
        let Some(mut task) = self.conns[conn].sides[side].tasks.remove(&id) else {
            return;
        };
        let mut local = self.peers[peer].lens.get(&task.key).copied().unwrap_or(0);
        let mut out = Vec::new();
        if !task.started {
            task.started = true;
            task.model.announce(local, &mut out);
        } else {
            let s = &mut self.conns[conn].sides[side];
            let mut taken = 0;
            while taken < MAX_MESSAGES_PER_STEP {
                let Some(msg) = s.chans[task.chan].inbox.pop_front() else {
                    break;
                };
                taken += 1;
                match msg {
                    ChanMsg::Close => {
                        task.closed = true;
                        break;
                    }
                    ChanMsg::FeedDone => task.peer_done = true,
                    ChanMsg::Have { len, seen } => {
                        task.model.remote = Some(task.model.remote.unwrap_or(0).max(len));
                        task.model.remote_seen = seen;
                    }
                    ChanMsg::Request(n) => out.push(ChanMsg::Data(n.min(local))),
                    ChanMsg::Data(n) => {
                        if n > local {
                            task.sum.blocks_received += n - local;
                            s.blocks_applied += n - local;
                            local = n;
                        }
                        task.model.requested = task.model.requested.min(local);
                    }
                    ChanMsg::Exchange(_) => {}
                }
            }
            if taken > 0 {
                s.feed_activity = self.now;
            }
            if !task.done_sent {
                task.model.announce(local, &mut out);
            }
            if local > self.peers[peer].lens.get(&task.key).copied().unwrap_or(0) {
                self.set_len(peer, task.key, local);
                self.conns[conn].sides[side].progressed.push_back(task.key);
                self.wake(conn, side, Source::Progress, MS);
            }
        }
        // After FEED_DONE only answers go out.
        if task.done_sent {
            out.retain(|m| matches!(m, ChanMsg::Data(_)));
        }
        if self.trace.is_some() {
            let s = &self.conns[conn].sides[side];
            let inbox = &s.chans[task.chan].inbox;
            trace!(
                self,
                "conn {conn} side {side}: task {} local {local} model {:?} sends {out:?} (closed {}, done {}/{}, {} queued)",
                short(task.key.as_bytes()),
                task.model,
                task.closed,
                task.done_sent,
                task.peer_done,
                inbox.len()
            );
        }
        for msg in out {
            if !self.chan_send(conn, side, task.chan, msg) {
                task.closed = true;
                break;
            }
        }
        let in_sync =
            task.model.is_synced(local) || (task.peer_done && task.model.downloaded(local));
        if in_sync && !task.sum.synced {
            task.sum.synced = true;
            let s = &mut self.conns[conn].sides[side];
            s.synced.push_back(task.key);
            self.wake(conn, side, Source::Synced, MS);
        }
        if task.sum.synced && (!live || task.peer_done) {
            if !task.done_sent && !task.closed {
                if !self.chan_send(conn, side, task.chan, ChanMsg::FeedDone) {
                    let error = std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "Channel is closed",
                    );
                    return self.end_task(conn, side, task, Err(FeedSyncError::Io(error)));
                }
                task.done_sent = true;
                task.model.finished = true;
            }
            if task.closed && task.peer_done {
                let sum = task.sum;
                return self.end_task(conn, side, task, Ok(sum));
            }
            if closer && task.done_sent && task.peer_done {
                self.chan_close(conn, side, task.chan);
                self.conns[conn].sides[side].chans[task.chan].owner = Owner::Drain;
                let sum = task.sum;
                return self.end_task(conn, side, task, Ok(sum));
            }
        }
        if task.closed {
            let result = if live {
                Ok(task.sum)
            } else {
                Err(FeedSyncError::ClosedBeforeSync)
            };
            return self.end_task(conn, side, task, result);
        }
        let s = &mut self.conns[conn].sides[side];
        let pending = !s.chans[task.chan].inbox.is_empty();
        s.tasks.insert(id, task);
        if pending {
            self.wake_task(conn, side, id);
        }
    }

    fn end_task(
        &mut self,
        conn: usize,
        side: usize,
        task: Task,
        result: Result<FeedSyncSummary, FeedSyncError>,
    ) {
        trace!(
            self,
            "conn {conn} side {side}: task of {} on channel {} ends: {result:?}",
            short(task.key.as_bytes()),
            task.chan
        );
        if matches!(result, Err(FeedSyncError::ClosedBeforeSync)) {
            self.stats.closed_before_sync += 1;
        }
        self.stats.blocks += task.sum.blocks_received;
        let s = &mut self.conns[conn].sides[side];
        let chan = &mut s.chans[task.chan];
        if chan.owner != Owner::Drain {
            chan.owner = Owner::Dropped;
        }
        s.tasks_done.push_back((task.key, result));
        self.wake(conn, side, Source::TaskDone, MS);
    }

    // --- Properties ---

    /// A session returned: was it allowed to end, and is its summary right?
    fn check_end(&mut self, conn: usize, side: usize) {
        let c = &self.conns[conn];
        let s = &c.sides[side];
        let other = &c.sides[1 - side];
        let disturbed = c.cut || c.faulted || s.stop_asked || other.stop_asked;
        let peer_fault = |e: &String| e.starts_with("the peer broke the protocol");
        match s.result.as_ref() {
            Some(Ok(summary)) => match summary.ended {
                SessionEnd::Completed => self.stats.completed += 1,
                SessionEnd::PeerClosed => self.stats.peer_closed += 1,
                _ => self.stats.local_stops += 1,
            },
            Some(Err(e)) if peer_fault(e) => self.stats.peer_faults += 1,
            _ => self.stats.connections_lost += 1,
        }
        let failure = match s.result.as_ref() {
            Some(Err(error)) if disturbed && error.starts_with("connection lost") => None,
            Some(Err(error)) if c.faulted && peer_fault(error) => None,
            Some(Err(error)) => Some(format!("ended with an error nobody caused: {error}")),
            Some(Ok(summary)) => match summary.ended {
                SessionEnd::LocalStop if !s.stop_asked => {
                    Some("ended as stopped here, but was not stopped".to_string())
                }
                SessionEnd::LocalStop => None,
                SessionEnd::PeerClosed if !s.live => {
                    Some("a one-shot session ended as closed by the peer".to_string())
                }
                SessionEnd::PeerClosed if other.live && !disturbed && other.result.is_none() => {
                    Some("ended as closed by a live peer that did not end".to_string())
                }
                SessionEnd::Completed if s.live && other.live => {
                    Some("a live session with a live peer ended as completed".to_string())
                }
                SessionEnd::Completed => self.check_completed(conn, side, summary),
                _ => None,
            },
            None => None,
        };
        if let Some(failure) = failure {
            self.fail(format!(
                "conn {conn} side {side} (peer {}): {failure}",
                s.peer
            ));
        }
    }

    /// A completed session holds every feed the peer announced, at least as long
    /// as announced, and counted what it learnt and received.
    fn check_completed(
        &self,
        conn: usize,
        side: usize,
        summary: &ReplicationSummary,
    ) -> Option<String> {
        let s = &self.conns[conn].sides[side];
        let store = &self.peers[s.peer];
        for (key, announced) in &s.announced {
            let held = store.lens.get(key).copied();
            // A feed announced empty delivers nothing, so it is not admitted.
            if *announced == Some(0) && held.is_none() {
                continue;
            }
            if held.is_none() || held < *announced {
                return Some(format!(
                    "completed holding {held:?} of {}, which the peer announced at {announced:?}",
                    short(key.as_bytes())
                ));
            }
        }
        if summary.feeds_learnt != s.created {
            return Some(format!(
                "summary says {} feeds learnt, the session created {}",
                summary.feeds_learnt, s.created
            ));
        }
        if summary.blocks_received > s.blocks_applied {
            return Some(format!(
                "summary says {} blocks received, the session applied {}",
                summary.blocks_received, s.blocks_applied
            ));
        }
        None
    }

    /// Every one-shot session ended, every final link is up, and every peer holds
    /// every feed at its writer's length.
    fn converged(&self) -> bool {
        let sessions_settled = self.conns.iter().all(|c| {
            let one_shot = c.sides.iter().any(|s| !s.live);
            let ended = c.sides.iter().all(|s| s.state == State::Closed);
            let up = c.sides.iter().all(|s| s.state == State::Running);
            if c.final_link {
                up
            } else {
                !one_shot || ended || c.cut
            }
        });
        // An empty feed never delivers, so only its writer holds it.
        sessions_settled
            && self.peers.iter().all(|p| {
                self.truth.iter().all(|(k, len)| {
                    *len == 0 || (p.lens.get(k) == Some(len) && !p.trial.contains_key(k))
                })
            })
    }

    fn diagnose(&self) -> String {
        let mut out = String::new();
        for (i, c) in self.conns.iter().enumerate() {
            for (j, s) in c.sides.iter().enumerate() {
                if s.state != State::Closed && (!s.live || c.final_link) {
                    let _ = write!(
                        out,
                        "[conn {i} side {j} peer {} {} {:?}, tasks {}] ",
                        s.peer,
                        if s.live { "live" } else { "one-shot" },
                        s.state,
                        s.tasks.len()
                    );
                }
            }
        }
        for (i, p) in self.peers.iter().enumerate() {
            for (k, len) in &self.truth {
                if *len > 0 && (p.lens.get(k) != Some(len) || p.trial.contains_key(k)) {
                    let _ = write!(
                        out,
                        "[peer {i} holds {:?} of {} (writer: {len})] ",
                        p.lens.get(k),
                        short(k.as_bytes())
                    );
                }
            }
        }
        out
    }
}

/// Runs one seed: its stats, or what failed; and its trace if asked.
pub(super) fn run_seed(seed: u64, trace: bool) -> (Result<SeedStats, String>, Option<String>) {
    Sim::new(seed, trace).run()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_u64(name: &str) -> Option<u64> {
        std::env::var(name)
            .ok()
            .and_then(|v| v.replace('_', "").parse().ok())
    }

    /// Thousands of seeded runs; a failure prints its seed and how to rerun it.
    #[test]
    fn simulated_sessions_keep_their_properties() {
        let trace = std::env::var_os("SIM_TRACE").is_some();
        if let Some(seed) = env_u64("SIM_SEED") {
            let (result, log) = run_seed(seed, trace);
            if let Some(log) = log {
                println!("{log}");
            }
            if let Err(failure) = result {
                panic!("seed {seed}: {failure}");
            }
            return;
        }
        let seeds = env_u64("SIM_SEEDS").unwrap_or(2_000);
        let first = env_u64("SIM_FIRST").unwrap_or(0);
        let threads = std::thread::available_parallelism()
            .map(|n| n.get() as u64)
            .unwrap_or(1)
            .min(seeds.max(1));
        let started = std::time::Instant::now();
        let outcomes: Vec<(Vec<(u64, String)>, SeedStats)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    scope.spawn(move || {
                        let mut failures = Vec::new();
                        let mut total = SeedStats::default();
                        let mut seed = first + t;
                        while seed < first + seeds && failures.len() < 5 {
                            match run_seed(seed, false).0 {
                                Ok(stats) => total.add(&stats),
                                Err(failure) => {
                                    total.seeds += 1;
                                    failures.push((seed, failure));
                                }
                            }
                            seed += threads;
                        }
                        (failures, total)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a simulator thread panicked"))
                .collect()
        });
        let elapsed = started.elapsed();
        let mut failures = Vec::new();
        let mut total = SeedStats::default();
        for (f, stats) in outcomes {
            failures.extend(f);
            total.add(&stats);
        }
        println!(
            "simulated {} seeds from {first} in {elapsed:.2?} ({:.1?} per 1,000 seeds, {threads} threads)",
            total.seeds,
            elapsed * 1000 / total.seeds.max(1) as u32,
        );
        println!("{total:#?}");
        if let Some((seed, failure)) = failures.iter().min_by_key(|f| f.0) {
            panic!(
                "{} seeds failed; first: seed {seed}: {failure}\nrerun it with: SIM_SEED={seed} SIM_TRACE=1 cargo test --release --lib simulated_sessions -- --nocapture",
                failures.len()
            );
        }
    }
}
