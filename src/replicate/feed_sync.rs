//! IO-less replication state machine for one hypercore over one channel.
//!
//! Feed it local core info and remote messages; drain [`Action`]s. It never touches the core
//! or the network, so every decision can be tested with plain message sequences.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use crate::residency::CoreInfo;
use hypercore_protocol::Message;
use hypercore_protocol::schema::{Data, NoData, Range, Request, Synchronize};
use hypercore_schema::{RequestBlock, RequestUpgrade};

/// Default number of requests kept in flight.
pub const DEFAULT_WINDOW: usize = 32;
/// Upper bound for a configured window (keeps in-flight state bounded).
pub const MAX_WINDOW: usize = 4096;
/// Max disjoint intervals remembered for the remote bitfield: peer messages cannot grow it further.
pub const MAX_REMOTE_RANGES: usize = 4096;
/// Max `nodes` we accept in a remote block request (a tree deeper than 64 cannot exist).
pub const MAX_REQUEST_NODES: u64 = 64;
/// Block bytes one feed may have requested and not yet stored: the window shrinks
/// for large blocks (1 MiB blocks: 4 requests; 4 MiB: 1), so the memory a
/// connection needs stays near `max_active_feeds` times this, whatever the feed.
pub const IN_FLIGHT_BYTES: u64 = 4 * 1024 * 1024;
/// Window while no block of the feed was seen yet (its block size is unknown).
const UNSIZED_WINDOW: usize = 4;

/// The part of `hypercore::Info` the state machine needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LocalInfo {
    pub length: u64,
    pub contiguous_length: u64,
    pub fork: u64,
}

impl From<CoreInfo> for LocalInfo {
    fn from(i: CoreInfo) -> Self {
        LocalInfo {
            length: i.length,
            contiguous_length: i.contiguous_length,
            fork: i.fork,
        }
    }
}

/// What we know about the remote's core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RemoteInfo {
    /// At least one Synchronize received.
    pub synced: bool,
    pub fork: u64,
    pub length: u64,
    /// The remote's view of our length (its last `remote_length`), 0 if forks differ.
    pub length_acked: u64,
    pub can_upgrade: bool,
    pub uploading: bool,
    pub downloading: bool,
}

/// A block request whose `nodes` count the driver must fill from `Hypercore::missing_nodes`.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockRequest {
    pub id: u64,
    pub fork: u64,
    pub index: u64,
    pub upgrade: Option<RequestUpgrade>,
}

impl BlockRequest {
    pub fn into_message(self, nodes: u64) -> Message {
        Message::Request(Request {
            id: self.id,
            fork: self.fork,
            block: Some(RequestBlock {
                index: self.index,
                nodes,
            }),
            hash: None,
            seek: None,
            upgrade: self.upgrade,
            manifest: false,
            priority: 0,
        })
    }
}

/// Data the driver must verify and apply, then report with [`FeedSync::on_applied`].
#[derive(Debug, Clone, PartialEq)]
pub struct Apply {
    pub id: u64,
    /// Block index carried (already checked to be the one requested).
    pub index: Option<u64>,
    pub data: Data,
}

/// Output of the state machine.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send as is.
    Send(Message),
    /// Fill `nodes`, then send; if the core already has the block, report `AlreadyHad` instead.
    Request(BlockRequest),
    /// Create a proof and reply `Data`, or `NoData` if the core cannot.
    /// Already validated against our length; `nodes` is clamped.
    Serve(Request),
    /// Verify and apply.
    Apply(Apply),
}

/// Result of an [`Action::Apply`] or a skipped [`Action::Request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Verified and stored.
    Applied,
    /// The block was already present (e.g. downloaded on another connection).
    AlreadyHad,
    /// The proof no longer fits the core (another connection upgraded it first); retry later.
    Stale,
}

/// A remote message that breaks the protocol; the connection should be dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolViolation {
    #[error("data for request {request} which was never requested or already answered")]
    UnrequestedData { request: u64 },
    #[error("data for request {request} does not match it: {reason}")]
    MismatchedData { request: u64, reason: &'static str },
}

#[derive(Debug, Clone, Copy)]
struct Inflight {
    index: Option<u64>,
    upgrade: bool,
    /// Data arrived, waiting for `on_applied`.
    applying: bool,
}

/// Set of half-open intervals `[start, end)`, merged, with a cap on the interval count.
#[derive(Debug, Clone)]
pub struct RangeSet {
    map: BTreeMap<u64, u64>,
    cap: usize,
}

impl Default for RangeSet {
    fn default() -> Self {
        Self::with_cap(MAX_REMOTE_RANGES)
    }
}

impl RangeSet {
    pub fn with_cap(cap: usize) -> Self {
        RangeSet {
            map: BTreeMap::new(),
            cap: cap.max(1),
        }
    }

    #[cfg(test)]
    pub fn intervals(&self) -> usize {
        self.map.len()
    }

    /// Insert `[start, end)`. Returns false if dropped because it would exceed the cap.
    pub fn insert(&mut self, start: u64, end: u64) -> bool {
        if start >= end {
            return true;
        }
        let (mut s, mut e) = (start, end);
        let mut merged = Vec::new();
        for (&is, &ie) in self.map.range(..=end).rev() {
            if ie < start {
                break;
            }
            merged.push(is);
            s = s.min(is);
            e = e.max(ie);
        }
        if merged.is_empty() && self.map.len() >= self.cap {
            return false;
        }
        for k in merged {
            self.map.remove(&k);
        }
        self.map.insert(s, e);
        true
    }

    /// Remove `[start, end)`. Never grows past the cap: a split that would is
    /// resolved by forgetting the right-hand remainder (forgetting is always safe).
    pub fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let hit: Vec<(u64, u64)> = self
            .map
            .range(..end)
            .rev()
            .take_while(|&(_, &ie)| ie > start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (is, ie) in hit {
            self.map.remove(&is);
            if is < start {
                self.map.insert(is, start);
            }
            if ie > end && self.map.len() < self.cap {
                self.map.insert(end, ie);
            }
        }
    }

    pub fn contains(&self, i: u64) -> bool {
        self.map
            .range(..=i)
            .next_back()
            .is_some_and(|(_, &e)| e > i)
    }

    /// True if every index in `[start, end)` is present (vacuously for an empty range).
    pub fn contains_range(&self, start: u64, end: u64) -> bool {
        start >= end
            || self
                .map
                .range(..=start)
                .next_back()
                .is_some_and(|(_, &e)| e >= end)
    }

    /// Smallest present index `>= from`.
    pub fn next_present(&self, from: u64) -> Option<u64> {
        if self.contains(from) {
            return Some(from);
        }
        self.map.range(from..).next().map(|(&s, _)| s)
    }
}

/// Replication state for one feed on one channel.
#[derive(Debug)]
pub struct FeedSync {
    window: usize,
    started: bool,
    local: LocalInfo,
    /// Blocks held above `local.contiguous_length` that we know of.
    local_sparse: BTreeSet<u64>,
    remote: RemoteInfo,
    remote_has: RangeSet,
    inflight: HashMap<u64, Inflight>,
    /// How many of `inflight` got their data and wait for `on_applied`.
    applying: usize,
    /// Largest block received on this channel (0: none yet).
    largest_block: u64,
    /// Whether new requests may leave while received data waits to be applied.
    overlap: bool,
    /// Set once we told the peer we are done: no new requests from then on.
    finished: bool,
    inflight_blocks: HashSet<u64>,
    upgrade_inflight: Option<u64>,
    /// Remote length at which the remote refused an upgrade; don't ask again until it changes.
    upgrade_refused_at: Option<u64>,
    next_id: u64,
    last_sync: Option<Synchronize>,
    announced_contiguous: u64,
    actions: VecDeque<Action>,
}

impl FeedSync {
    /// `window` is clamped to `1..=MAX_WINDOW`.
    pub fn new(window: usize) -> Self {
        FeedSync {
            window: window.clamp(1, MAX_WINDOW),
            started: false,
            local: LocalInfo::default(),
            local_sparse: BTreeSet::new(),
            remote: RemoteInfo::default(),
            remote_has: RangeSet::default(),
            inflight: HashMap::new(),
            applying: 0,
            largest_block: 0,
            overlap: true,
            finished: false,
            inflight_blocks: HashSet::new(),
            upgrade_inflight: None,
            upgrade_refused_at: None,
            next_id: 1,
            last_sync: None,
            announced_contiguous: 0,
            actions: VecDeque::new(),
        }
    }

    /// Begin: the next drain emits our Synchronize (and Range if we hold a prefix).
    pub fn start(&mut self, local: LocalInfo) {
        self.started = true;
        self.local = local;
    }

    /// Requests sent or being applied.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// The local core changed (append, or download on any connection).
    pub fn on_local_update(&mut self, local: LocalInfo) {
        if local.fork == self.local.fork {
            // Reads can race; length and contiguous length never shrink on one fork.
            self.local.length = self.local.length.max(local.length);
            self.local.contiguous_length =
                self.local.contiguous_length.max(local.contiguous_length);
        } else {
            self.local = local;
            self.local_sparse.clear();
        }
        let c = self.local.contiguous_length;
        self.local_sparse = self.local_sparse.split_off(&c);
    }

    pub fn on_message(&mut self, msg: Message) -> Result<(), ProtocolViolation> {
        match msg {
            Message::Synchronize(s) => self.on_synchronize(s),
            Message::Range(r) => {
                let end = r.start.saturating_add(r.length);
                if r.drop {
                    self.remote_has.remove(r.start, end);
                } else {
                    self.remote_has.insert(r.start, end);
                }
            }
            Message::Bitfield(b) => {
                // Work is bounded by the (already decoded) frame, not by any peer-given number.
                for (w, word) in b.bitfield.iter().enumerate() {
                    let Some(base) = (w as u64)
                        .checked_mul(32)
                        .and_then(|o| b.start.checked_add(o))
                    else {
                        break;
                    };
                    let mut bit = 0u32;
                    while bit < 32 {
                        if word & (1 << bit) == 0 {
                            bit += 1;
                            continue;
                        }
                        let run_start = bit;
                        while bit < 32 && word & (1 << bit) != 0 {
                            bit += 1;
                        }
                        let s = base.saturating_add(run_start as u64);
                        let e = base.saturating_add(bit as u64);
                        self.remote_has.insert(s, e);
                    }
                }
            }
            Message::Request(r) => self.on_request(r),
            Message::Data(d) => return self.on_data(d),
            Message::NoData(n) => self.on_no_data(n),
            // We always upload and don't support cancelling an answer already queued.
            _ => {}
        }
        Ok(())
    }

    fn on_synchronize(&mut self, s: Synchronize) {
        if s.length != self.remote.length {
            self.upgrade_refused_at = None;
        }
        self.remote = RemoteInfo {
            synced: true,
            fork: s.fork,
            length: s.length,
            length_acked: if s.fork == self.local.fork {
                s.remote_length
            } else {
                0
            },
            can_upgrade: s.can_upgrade,
            uploading: s.uploading,
            downloading: s.downloading,
        };
    }

    fn no_data(&mut self, id: u64) {
        self.actions
            .push_back(Action::Send(Message::NoData(NoData { request: id })));
    }

    fn on_request(&mut self, mut r: Request) {
        // Validate everything peer-controlled before the core sees it.
        let len = self.local.length;
        let unsupported = r.hash.is_some() || r.seek.is_some();
        let block_ok = r.block.as_ref().is_none_or(|b| b.index < len);
        let upgrade_ok = r.upgrade.as_ref().is_none_or(|u| {
            u.length > 0 && u.start.checked_add(u.length).is_some_and(|end| end <= len)
        });
        let empty = r.block.is_none() && r.upgrade.is_none();
        if r.fork != self.local.fork || unsupported || empty || !block_ok || !upgrade_ok {
            self.no_data(r.id);
            return;
        }
        if let Some(b) = r.block.as_mut() {
            b.nodes = b.nodes.min(MAX_REQUEST_NODES);
        }
        self.actions.push_back(Action::Serve(r));
    }

    fn on_data(&mut self, d: Data) -> Result<(), ProtocolViolation> {
        let request = d.request;
        let Some(inf) = self.inflight.get_mut(&request) else {
            return Err(ProtocolViolation::UnrequestedData { request });
        };
        if inf.applying {
            return Err(ProtocolViolation::UnrequestedData { request });
        }
        let mismatch = |reason| Err(ProtocolViolation::MismatchedData { request, reason });
        let got = d.block.as_ref().map(|b| b.index);
        if got != inf.index {
            return mismatch("block index differs from the request");
        }
        if d.upgrade.is_some() != inf.upgrade {
            return mismatch("upgrade presence differs from the request");
        }
        if d.hash.is_some() || d.seek.is_some() {
            return mismatch("hash/seek proof was not requested");
        }
        if d.fork != self.local.fork {
            return mismatch("fork differs");
        }
        inf.applying = true;
        self.applying += 1;
        if let Some(block) = &d.block {
            // An empty block still counts as sized.
            let len = (block.value.len() as u64).max(1);
            self.largest_block = self.largest_block.max(len);
        }
        let index = inf.index;
        if let Some(i) = index {
            self.remote_has.insert(i, i.saturating_add(1));
        }
        self.actions.push_back(Action::Apply(Apply {
            id: request,
            index,
            data: d,
        }));
        Ok(())
    }

    fn on_no_data(&mut self, n: NoData) {
        let Some(inf) = self.inflight.get(&n.request).copied() else {
            return; // Unknown: harmless, costs nothing.
        };
        if inf.applying {
            return;
        }
        self.inflight.remove(&n.request);
        if let Some(i) = inf.index {
            self.inflight_blocks.remove(&i);
            // Don't ask again until the remote announces it.
            self.remote_has.remove(i, i.saturating_add(1));
        }
        if inf.upgrade {
            self.upgrade_inflight = None;
            if inf.index.is_none() {
                self.upgrade_refused_at = Some(self.remote.length);
            }
        }
    }

    /// Report the outcome of an `Apply` (or a `Request` the driver skipped because the block
    /// was already local) together with fresh core info.
    pub fn on_applied(&mut self, id: u64, outcome: ApplyOutcome, local: LocalInfo) {
        if let Some(inf) = self.inflight.remove(&id) {
            if inf.applying {
                self.applying -= 1;
            }
            if let Some(i) = inf.index {
                self.inflight_blocks.remove(&i);
                if outcome != ApplyOutcome::Stale {
                    self.local_sparse.insert(i);
                }
            }
            if inf.upgrade {
                self.upgrade_inflight = None;
            }
        }
        self.on_local_update(local);
    }

    /// Whether another request may go out. With overlap the window counts requests
    /// still waiting for data, so the next ones leave while a batch is verified and
    /// stored (data awaiting its apply is capped at another window); without, it
    /// counts every request until applied.
    fn has_room(&self) -> bool {
        let window = self.window();
        if self.overlap {
            self.inflight.len() - self.applying < window && self.inflight.len() < 2 * window
        } else {
            self.inflight.len() < window
        }
    }

    /// The configured window, narrowed so that the blocks requested stay within
    /// [`IN_FLIGHT_BYTES`] at the largest block size seen.
    fn window(&self) -> usize {
        let by_bytes = match self.largest_block {
            0 => UNSIZED_WINDOW,
            block => usize::try_from(IN_FLIGHT_BYTES / block).unwrap_or(usize::MAX),
        };
        self.window.min(by_bytes).max(1)
    }

    /// Sets whether downloading and applying overlap (see [`FeedSync::has_room`]).
    /// Worth it when few feeds share the connection; with many, feeds overlap
    /// each other and the extra requests only cost.
    pub fn set_overlap(&mut self, overlap: bool) {
        self.overlap = overlap;
    }

    fn local_has(&self, i: u64) -> bool {
        i < self.local.contiguous_length || self.local_sparse.contains(&i)
    }

    fn alloc_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    fn announce(&mut self) {
        // Range first: a peer reading our Sync then already knows what we hold, so its
        // upgrade request can carry the first block.
        let c = self.local.contiguous_length;
        if c > self.announced_contiguous {
            self.actions.push_back(Action::Send(Message::Range(Range {
                drop: false,
                start: self.announced_contiguous,
                length: c - self.announced_contiguous,
            })));
            self.announced_contiguous = c;
        }
        let same_fork = self.remote.synced && self.remote.fork == self.local.fork;
        let sync = Synchronize {
            fork: self.local.fork,
            length: self.local.length,
            remote_length: if same_fork { self.remote.length } else { 0 },
            can_upgrade: true,
            uploading: true,
            downloading: true,
        };
        // Resend whenever our length or our view of theirs changed: otherwise a peer
        // waiting for an acknowledgement of its length can stall (upstream example's deadlock).
        if self.last_sync.as_ref() != Some(&sync) {
            self.last_sync = Some(sync.clone());
            self.actions
                .push_back(Action::Send(Message::Synchronize(sync)));
        }
    }

    fn plan(&mut self) {
        let r = self.remote;
        if self.finished || !r.synced || r.fork != self.local.fork || !r.uploading {
            return;
        }
        let fork = self.local.fork;
        if r.length > self.local.length
            && self.upgrade_inflight.is_none()
            && r.can_upgrade
            && self.upgrade_refused_at != Some(r.length)
            && self.has_room()
        {
            let start = self.local.length;
            let upgrade = RequestUpgrade {
                start,
                length: r.length - start,
            };
            // Piggy-back the first new block when the remote has it: saves a round trip per append.
            let with_block = self.remote_has.contains(start)
                && !self.local_has(start)
                && !self.inflight_blocks.contains(&start);
            let id = self.alloc_id();
            if with_block {
                self.inflight_blocks.insert(start);
                self.actions.push_back(Action::Request(BlockRequest {
                    id,
                    fork,
                    index: start,
                    upgrade: Some(upgrade),
                }));
            } else {
                self.actions
                    .push_back(Action::Send(Message::Request(Request {
                        id,
                        fork,
                        block: None,
                        hash: None,
                        seek: None,
                        upgrade: Some(upgrade),
                        manifest: false,
                        priority: 0,
                    })));
            }
            self.inflight.insert(
                id,
                Inflight {
                    index: with_block.then_some(start),
                    upgrade: true,
                    applying: false,
                },
            );
            self.upgrade_inflight = Some(id);
        }

        // Only blocks inside our verified tree and the remote's length can be requested.
        let limit = self.local.length.min(r.length);
        let mut i = self.local.contiguous_length;
        while self.has_room() && i < limit {
            match self.remote_has.next_present(i) {
                Some(j) if j < limit => i = j,
                _ => break,
            }
            if self.local_has(i) || self.inflight_blocks.contains(&i) {
                i += 1;
                continue;
            }
            let id = self.alloc_id();
            self.inflight_blocks.insert(i);
            self.inflight.insert(
                id,
                Inflight {
                    index: Some(i),
                    upgrade: false,
                    applying: false,
                },
            );
            self.actions.push_back(Action::Request(BlockRequest {
                id,
                fork,
                index: i,
                upgrade: None,
            }));
            i += 1;
        }
    }

    /// Take everything to do now. Announcements and new requests are planned here, after a
    /// whole batch of input, so e.g. a Synchronize+Range pair yields one combined request.
    pub fn drain_actions(&mut self) -> Vec<Action> {
        if !self.started {
            return Vec::new();
        }
        self.announce();
        self.plan();
        self.actions.drain(..).collect()
    }

    /// Both sides hold everything the other has, and nothing is pending.
    pub fn is_synced(&self) -> bool {
        self.downloaded() && self.remote_has.contains_range(0, self.local.length)
    }

    /// We hold everything the peer announced, and nothing is pending. Enough to end
    /// a one-shot channel once the peer said it is done: it wants nothing more, even
    /// if we grew meanwhile.
    pub fn downloaded(&self) -> bool {
        let r = &self.remote;
        self.started
            && r.synced
            && r.fork == self.local.fork
            && self.inflight.is_empty()
            && self.actions.is_empty()
            && self.local.length >= r.length
            && (self.local.contiguous_length >= r.length
                || (self.local.contiguous_length..r.length).all(|i| self.local_sparse.contains(&i)))
    }

    /// We told the peer we are done (one-shot): ask for nothing more, whatever it
    /// announces from now on.
    pub fn finish(&mut self) {
        self.finished = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypercore_schema::DataBlock;

    fn info(length: u64, contiguous: u64) -> LocalInfo {
        LocalInfo {
            length,
            contiguous_length: contiguous,
            fork: 0,
        }
    }

    fn sync(length: u64, remote_length: u64) -> Message {
        Message::Synchronize(Synchronize {
            fork: 0,
            length,
            remote_length,
            can_upgrade: true,
            uploading: true,
            downloading: true,
        })
    }

    fn range(start: u64, length: u64) -> Message {
        Message::Range(Range {
            drop: false,
            start,
            length,
        })
    }

    fn data(request: u64, index: Option<u64>, upgrade: bool) -> Message {
        Message::Data(Data {
            request,
            fork: 0,
            block: index.map(|index| DataBlock {
                index,
                value: vec![1],
                nodes: vec![],
            }),
            hash: None,
            seek: None,
            upgrade: upgrade.then(|| hypercore_schema::DataUpgrade {
                start: 0,
                length: 1,
                nodes: vec![],
                additional_nodes: vec![],
                signature: vec![],
            }),
        })
    }

    /// A side that said it is done asks for nothing more when the peer grows, and a
    /// side whose peer is done only needs what that peer has, not the reverse.
    #[test]
    fn finished_side_stops_asking_and_downloaded_ignores_what_the_peer_lacks() {
        let mut s = FeedSync::new(4);
        s.start(info(3, 3));
        s.on_message(sync(3, 3)).unwrap();
        s.on_message(range(0, 3)).unwrap();
        s.drain_actions();
        assert!(s.is_synced());
        s.finish();
        s.on_message(sync(10, 3)).unwrap();
        s.on_message(range(0, 10)).unwrap();
        assert!(block_requests(&s.drain_actions()).is_empty());
        assert_eq!(s.in_flight(), 0);

        // The writer side: it grew to 10, the peer holds 3 and wants no more.
        let mut w = FeedSync::new(4);
        w.start(info(10, 10));
        w.on_message(sync(3, 10)).unwrap();
        w.on_message(range(0, 3)).unwrap();
        w.drain_actions();
        assert!(!w.is_synced(), "the peer lacks 7 blocks");
        assert!(w.downloaded(), "we hold all the peer has");
    }

    fn block_requests(a: &[Action]) -> Vec<BlockRequest> {
        a.iter()
            .filter_map(|a| match a {
                Action::Request(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn start_announces_sync_and_range() {
        let mut s = FeedSync::new(4);
        assert!(s.drain_actions().is_empty(), "nothing before start");
        s.start(info(5, 5));
        let a = s.drain_actions();
        assert!(
            matches!(&a[1], Action::Send(Message::Synchronize(x)) if x.length == 5 && x.remote_length == 0)
        );
        assert!(matches!(&a[0], Action::Send(Message::Range(r)) if r.start == 0 && r.length == 5));
        assert!(s.drain_actions().is_empty(), "no repeats");
    }

    #[test]
    fn resyncs_when_remote_length_learned() {
        let mut s = FeedSync::new(4);
        s.start(info(0, 0));
        s.drain_actions();
        s.on_message(sync(0, 0)).unwrap();
        assert!(s.drain_actions().is_empty(), "nothing changed");
        s.on_message(sync(3, 0)).unwrap();
        let a = s.drain_actions();
        assert!(
            a.iter().any(
                |a| matches!(a, Action::Send(Message::Synchronize(x)) if x.remote_length == 3)
            )
        );
    }

    #[test]
    fn upgrade_with_block_then_window() {
        let mut s = FeedSync::new(4);
        s.start(info(0, 0));
        s.drain_actions();
        s.on_message(sync(100, 0)).unwrap();
        s.on_message(range(0, 100)).unwrap();
        let a = s.drain_actions();
        let reqs = block_requests(&a);
        assert_eq!(reqs.len(), 1, "only the upgrade request: no tree yet");
        assert_eq!(reqs[0].index, 0);
        let up = reqs[0].upgrade.clone().unwrap();
        assert_eq!((up.start, up.length), (0, 100));
        assert!(!s.is_synced());

        s.on_message(data(reqs[0].id, Some(0), true)).unwrap();
        let a = s.drain_actions();
        assert!(matches!(&a[0], Action::Apply(x) if x.index == Some(0)));
        s.on_applied(reqs[0].id, ApplyOutcome::Applied, info(100, 1));
        let a = s.drain_actions();
        let reqs = block_requests(&a);
        assert_eq!(
            reqs.iter().map(|r| r.index).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert!(a.iter().any(
            |a| matches!(a, Action::Send(Message::Range(r)) if r.start == 0 && r.length == 1)
        ));
        assert_eq!(s.in_flight(), 4);
    }

    /// The window narrows to the byte budget once the feed's blocks turn out large,
    /// and stays at the configured size for small ones.
    #[test]
    fn window_bounds_bytes_in_flight() {
        for (block_len, expected) in [(100usize, 32usize), (1 << 20, 4), (4 << 20, 1)] {
            let mut s = FeedSync::new(32);
            s.start(info(0, 0));
            s.drain_actions();
            s.on_message(sync(1000, 0)).unwrap();
            s.on_message(range(0, 1000)).unwrap();
            let reqs = block_requests(&s.drain_actions());
            assert_eq!(reqs.len(), 1, "the upgrade request alone");
            let Message::Data(mut first) = data(reqs[0].id, Some(0), true) else {
                unreachable!()
            };
            first.block.as_mut().unwrap().value = vec![7; block_len];
            s.on_message(Message::Data(first)).unwrap();
            s.drain_actions();
            s.on_applied(reqs[0].id, ApplyOutcome::Applied, info(1000, 1));
            let reqs = block_requests(&s.drain_actions());
            assert_eq!(reqs.len(), expected, "blocks of {block_len} bytes");
            assert!(expected as u64 * block_len as u64 <= IN_FLIGHT_BYTES || expected == 32);
        }
        // Before any block is seen (a resumed sync needs no upgrade first), the
        // window is small until the size is known.
        let mut s = FeedSync::new(32);
        s.start(info(1000, 10));
        s.drain_actions();
        s.on_message(sync(1000, 10)).unwrap();
        s.on_message(range(0, 1000)).unwrap();
        assert_eq!(block_requests(&s.drain_actions()).len(), UNSIZED_WINDOW);
    }

    #[test]
    fn upgrade_alone_when_remote_lacks_block_and_no_repeat_after_refusal() {
        let mut s = FeedSync::new(4);
        s.start(info(0, 0));
        s.drain_actions();
        s.on_message(sync(10, 0)).unwrap();
        let a = s.drain_actions();
        let id = a
            .iter()
            .find_map(|a| match a {
                Action::Send(Message::Request(r)) if r.block.is_none() && r.upgrade.is_some() => {
                    Some(r.id)
                }
                _ => None,
            })
            .expect("upgrade-only request");
        s.on_message(Message::NoData(NoData { request: id }))
            .unwrap();
        assert!(
            s.drain_actions().is_empty(),
            "refused upgrade is not retried at once"
        );
        s.on_message(sync(11, 0)).unwrap();
        let a = s.drain_actions();
        assert!(
            a.iter()
                .any(|a| matches!(a, Action::Send(Message::Request(r)) if r.upgrade.is_some()))
        );
    }

    #[test]
    fn requests_only_below_both_lengths_and_what_remote_has() {
        let mut s = FeedSync::new(32);
        s.start(info(10, 0)); // tree known to 10, no data
        s.drain_actions();
        s.on_message(sync(8, 10)).unwrap();
        s.on_message(range(2, 3)).unwrap();
        s.on_message(range(6, u64::MAX)).unwrap(); // lying remote
        let indexes = |reqs: &[BlockRequest]| reqs.iter().map(|r| r.index).collect::<Vec<_>>();
        let reqs = block_requests(&s.drain_actions());
        // The first few (the block size is unknown yet)...
        assert_eq!(indexes(&reqs), vec![2, 3, 4, 6]);
        for r in &reqs {
            s.on_message(data(r.id, Some(r.index), false)).unwrap();
        }
        // ...then the rest (requests overlap the applies), and nothing at or past
        // the remote's length of 8.
        let mut more = block_requests(&s.drain_actions());
        for r in &reqs {
            s.on_applied(r.id, ApplyOutcome::Applied, info(10, 0));
        }
        more.extend(block_requests(&s.drain_actions()));
        assert_eq!(indexes(&more), vec![7]);
    }

    #[test]
    fn unrequested_and_mismatched_data_rejected() {
        let mut s = FeedSync::new(4);
        s.start(info(4, 0));
        s.drain_actions();
        assert_eq!(
            s.on_message(data(77, Some(0), false)),
            Err(ProtocolViolation::UnrequestedData { request: 77 })
        );
        s.on_message(sync(4, 4)).unwrap();
        s.on_message(range(0, 4)).unwrap();
        let reqs = block_requests(&s.drain_actions());
        assert!(matches!(
            s.on_message(data(reqs[0].id, Some(3), false)),
            Err(ProtocolViolation::MismatchedData { .. })
        ));
        assert!(matches!(
            s.on_message(data(reqs[0].id, Some(0), true)),
            Err(ProtocolViolation::MismatchedData { .. })
        ));
        s.on_message(data(reqs[0].id, Some(0), false)).unwrap();
        // A second answer to the same request is unrequested.
        assert_eq!(
            s.on_message(data(reqs[0].id, Some(0), false)),
            Err(ProtocolViolation::UnrequestedData {
                request: reqs[0].id
            })
        );
    }

    #[test]
    fn no_data_for_block_drops_remote_have() {
        let mut s = FeedSync::new(4);
        s.start(info(2, 0));
        s.drain_actions();
        s.on_message(sync(2, 2)).unwrap();
        s.on_message(range(0, 2)).unwrap();
        let reqs = block_requests(&s.drain_actions());
        assert_eq!(reqs.len(), 2);
        s.on_message(Message::NoData(NoData {
            request: reqs[0].id,
        }))
        .unwrap();
        assert!(
            block_requests(&s.drain_actions()).is_empty(),
            "not re-requested"
        );
        s.on_message(range(0, 1)).unwrap();
        assert_eq!(
            block_requests(&s.drain_actions())[0].index,
            0,
            "re-requested after announce"
        );
    }

    #[test]
    fn serve_validation() {
        let mut s = FeedSync::new(4);
        s.start(info(5, 5));
        s.drain_actions();
        let req = |id, block: Option<(u64, u64)>, upgrade: Option<(u64, u64)>| {
            Message::Request(Request {
                id,
                fork: 0,
                block: block.map(|(index, nodes)| RequestBlock { index, nodes }),
                hash: None,
                seek: None,
                upgrade: upgrade.map(|(start, length)| RequestUpgrade { start, length }),
                manifest: false,
                priority: 0,
            })
        };
        s.on_message(req(1, Some((4, 1_000_000)), None)).unwrap();
        s.on_message(req(2, Some((5, 0)), None)).unwrap();
        s.on_message(req(3, None, Some((2, u64::MAX)))).unwrap();
        s.on_message(req(4, None, Some((0, 5)))).unwrap();
        s.on_message(req(5, None, None)).unwrap();
        let a = s.drain_actions();
        let mut served = vec![];
        let mut nodata = vec![];
        for x in a {
            match x {
                Action::Serve(r) => {
                    if let Some(b) = &r.block {
                        assert!(b.nodes <= MAX_REQUEST_NODES);
                    }
                    served.push(r.id)
                }
                Action::Send(Message::NoData(n)) => nodata.push(n.request),
                _ => {}
            }
        }
        assert_eq!(served, vec![1, 4]);
        assert_eq!(nodata, vec![2, 3, 5]);
    }

    #[test]
    fn synced_conditions() {
        // Both empty.
        let mut s = FeedSync::new(4);
        s.start(info(0, 0));
        s.drain_actions();
        assert!(!s.is_synced(), "remote unknown");
        s.on_message(sync(0, 0)).unwrap();
        s.drain_actions();
        assert!(s.is_synced());

        // We have 3, remote empty: synced only when the remote announces it holds them.
        let mut s = FeedSync::new(4);
        s.start(info(3, 3));
        s.drain_actions();
        s.on_message(sync(0, 3)).unwrap();
        s.drain_actions();
        assert!(!s.is_synced());
        s.on_message(sync(3, 3)).unwrap();
        s.on_message(range(0, 2)).unwrap();
        s.drain_actions();
        assert!(!s.is_synced());
        s.on_message(range(2, 1)).unwrap();
        s.drain_actions();
        assert!(s.is_synced());
    }

    #[test]
    fn local_update_from_other_connection_skips_blocks() {
        let mut s = FeedSync::new(2);
        s.start(info(6, 0));
        s.drain_actions();
        s.on_message(sync(6, 6)).unwrap();
        s.on_message(range(0, 6)).unwrap();
        let r1 = block_requests(&s.drain_actions());
        assert_eq!(r1.iter().map(|r| r.index).collect::<Vec<_>>(), vec![0, 1]);
        s.on_local_update(info(6, 4)); // another connection fetched 0..4
        s.on_applied(r1[0].id, ApplyOutcome::AlreadyHad, info(6, 4));
        s.on_applied(r1[1].id, ApplyOutcome::AlreadyHad, info(6, 4));
        let idx: Vec<u64> = block_requests(&s.drain_actions())
            .iter()
            .map(|r| r.index)
            .collect();
        assert_eq!(idx, vec![4, 5]);
    }

    #[test]
    fn rangeset_merge_remove_cap() {
        let mut r = RangeSet::with_cap(3);
        assert!(r.insert(0, 2));
        assert!(r.insert(2, 4)); // adjacent merges
        assert_eq!(r.intervals(), 1);
        assert!(r.insert(10, 12));
        assert!(r.insert(20, 22));
        assert!(!r.insert(30, 31), "cap reached");
        assert!(r.insert(11, 25), "merging is still allowed");
        assert!(r.contains_range(10, 25) && !r.contains(25));
        r.remove(1, 2);
        assert!(r.contains(0) && !r.contains(1) && r.contains(2));
        assert!(r.intervals() <= 3);
        assert_eq!(r.next_present(4), Some(10));
        assert_eq!(r.next_present(26), None);
    }

    #[test]
    fn bitfield_sets_runs() {
        let mut s = FeedSync::new(64);
        s.start(info(64, 0));
        s.drain_actions();
        s.on_message(sync(64, 64)).unwrap();
        s.on_message(Message::Bitfield(hypercore_protocol::schema::Bitfield {
            start: 0,
            bitfield: vec![0b1011, 1 << 31],
        }))
        .unwrap();
        let idx: Vec<u64> = block_requests(&s.drain_actions())
            .iter()
            .map(|r| r.index)
            .collect();
        assert_eq!(idx, vec![0, 1, 3, 63]);
    }
}
