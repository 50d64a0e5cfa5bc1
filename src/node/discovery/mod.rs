//! Finding peers by the group alone: sources of addresses and the book that
//! decides whom to dial.
//!
//! - [`lan`]: mDNS/DNS-SD on the local network, under the group's discovery topic
//!   ([`multifeed::SharedKey::discovery_topic`]).
//! - [`PeerBook`]: IO-less. Every discovered peer comes in as a node id and its
//!   addresses; the book answers with dials to start and stop. The node's task
//!   ([`super::discover`]) drives it and runs the dialers.
//!
//! The rules:
//!
//! - one dialer per remote node, whatever the number of its addresses or of the
//!   sources that found it, and never one to this node itself;
//! - of two nodes that found each other, the one with the smaller id dials
//!   ([`super::peers::keeps_own_dial`]); the other waits [`FALLBACK_AFTER`] for
//!   that session and dials itself only if none came, so a one-way reachable pair
//!   still meets;
//! - a node that refused us for good (another group, an incompatible version) is
//!   never dialed again in this run, however often it is announced;
//! - at most `max_dialers` discovered dialers at once; the rest wait their turn;
//! - a discovered session is only added where no other session with that node
//!   runs, and yields to one that comes later and is kept
//!   ([`super::peers::Registry::dialed_discovered`]); its peer is dialed again
//!   once no session with it has been up for [`FALLBACK_AFTER`];
//! - a peer whose announcement is withdrawn (it said goodbye, or its record
//!   expired) is no longer dialed.

pub mod lan;

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    time::Duration,
};

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use tokio::time::Instant;

use super::peers::{NodeId, keeps_own_dial};

/// How long the node with the larger id waits for the other to dial before it
/// dials itself.
pub const FALLBACK_AFTER: Duration = Duration::from_secs(10);

/// Refusals remembered, by node id; the oldest is forgotten first.
pub const REFUSALS_KEPT: usize = 4096;

/// Addresses kept per discovered peer (an announcement carries them; they are
/// tried in order).
pub const ADDRESSES_KEPT: usize = 8;

/// What discovery did, for `/health` and `/metrics`.
#[derive(Debug, Default)]
pub struct DiscoveryMetrics {
    /// Records of our topic received (every announcement, repeats included).
    pub announcements: AtomicU64,
    /// Announcements withdrawn.
    pub withdrawals: AtomicU64,
    /// Discovered dialers running now.
    pub dialers: AtomicU64,
    /// Discovered nodes that refused us for good.
    pub refusals: AtomicU64,
}

impl DiscoveryMetrics {
    /// `(name, kind, help, value)` for each metric.
    pub fn lines(&self) -> [(&'static str, &'static str, &'static str, u64); 4] {
        let get = |v: &AtomicU64| v.load(Ordering::Relaxed);
        [
            (
                "multifeed_discovery_announcements_total",
                "counter",
                "Announcements of peers of this group received (repeats included).",
                get(&self.announcements),
            ),
            (
                "multifeed_discovery_withdrawals_total",
                "counter",
                "Announcements of peers withdrawn (goodbye or expiry).",
                get(&self.withdrawals),
            ),
            (
                "multifeed_discovery_dialers",
                "gauge",
                "Discovered peers being dialed now.",
                get(&self.dialers),
            ),
            (
                "multifeed_discovery_refusals_total",
                "counter",
                "Discovered peers that refused this node for good (not dialed again).",
                get(&self.refusals),
            ),
        ]
    }
}

/// How a peer was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `--peer ADDR`.
    Configured,
    /// mDNS on the local network.
    Lan,
    /// The Hyperswarm DHT.
    #[cfg_attr(not(feature = "dht"), allow(dead_code))] // `--discover dht` (feature `dht`)
    Dht,
    /// It connected to us.
    Inbound,
}

/// What a discovery source reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    Found {
        node: NodeId,
        addrs: Vec<SocketAddr>,
        source: Source,
    },
    Lost {
        node: NodeId,
    },
}

/// What the book asks the node to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Dial {
        node: NodeId,
        addrs: Vec<SocketAddr>,
        source: Source,
    },
    /// Stop dialing `node` (a live session may run to its end).
    Stop { node: NodeId },
}

#[derive(Debug)]
enum Stage {
    /// The other node dials; since when we saw it without a session.
    Waiting {
        unconnected_since: Instant,
    },
    /// Over the cap, in line.
    Queued,
    Dialing,
    /// Lost while dialing: the dialer is being stopped. `found_again`: announced
    /// again meanwhile, so it is queued once the old dialer ended.
    Stopping {
        found_again: bool,
    },
}

#[derive(Debug)]
struct Known {
    addrs: Vec<SocketAddr>,
    source: Source,
    stage: Stage,
}

/// The discovered peers and what is being done about each (see the module docs).
#[derive(Debug)]
pub struct PeerBook {
    own: NodeId,
    max_dialers: usize,
    known: BTreeMap<NodeId, Known>,
    queue: VecDeque<NodeId>,
    dialing: usize,
    refused: VecDeque<NodeId>,
}

impl PeerBook {
    pub fn new(own: NodeId, max_dialers: usize) -> Self {
        Self {
            own,
            max_dialers: max_dialers.max(1),
            known: BTreeMap::new(),
            queue: VecDeque::new(),
            dialing: 0,
            refused: VecDeque::new(),
        }
    }

    /// Discovered peers dialed now.
    #[cfg(test)]
    pub fn dialing(&self) -> usize {
        self.dialing
    }

    /// Whether `node` refused us in this run.
    pub fn has_refused(&self, node: NodeId) -> bool {
        self.refused.contains(&node)
    }

    /// A source reported something.
    pub fn on_discovery(&mut self, discovery: Discovery, now: Instant) -> Vec<Action> {
        match discovery {
            Discovery::Found {
                node,
                addrs,
                source,
            } => self.found(node, addrs, source, now),
            Discovery::Lost { node } => self.lost(node),
        }
    }

    /// `node` was found at `addrs`.
    pub fn found(
        &mut self,
        node: NodeId,
        mut addrs: Vec<SocketAddr>,
        source: Source,
        now: Instant,
    ) -> Vec<Action> {
        addrs.truncate(ADDRESSES_KEPT);
        if node == self.own || addrs.is_empty() || self.has_refused(node) {
            return Vec::new();
        }
        if let Some(known) = self.known.get_mut(&node) {
            // A running dialer keeps the addresses it started with; the next
            // dialer takes the fresh ones.
            known.addrs = addrs;
            if let Stage::Stopping { found_again } = &mut known.stage {
                *found_again = true;
            }
            return Vec::new();
        }
        let stage = if keeps_own_dial(self.own, node) {
            Stage::Queued
        } else {
            Stage::Waiting {
                unconnected_since: now,
            }
        };
        self.known.insert(
            node,
            Known {
                addrs,
                source,
                stage,
            },
        );
        if matches!(self.known[&node].stage, Stage::Queued) {
            self.queue.push_back(node);
        }
        self.start_queued()
    }

    /// `node`'s announcement was withdrawn.
    pub fn lost(&mut self, node: NodeId) -> Vec<Action> {
        let Some(known) = self.known.get_mut(&node) else {
            return Vec::new();
        };
        match known.stage {
            Stage::Dialing => {
                known.stage = Stage::Stopping { found_again: false };
                vec![Action::Stop { node }]
            }
            Stage::Stopping { .. } => Vec::new(),
            Stage::Waiting { .. } | Stage::Queued => {
                self.known.remove(&node);
                self.queue.retain(|n| *n != node);
                Vec::new()
            }
        }
    }

    /// The dialer of `node` ended; `refusal` says whether `node` refused us for good.
    pub fn dial_ended(&mut self, node: NodeId, refused: bool, now: Instant) -> Vec<Action> {
        let Some(known) = self.known.remove(&node) else {
            return Vec::new();
        };
        if !matches!(known.stage, Stage::Dialing | Stage::Stopping { .. }) {
            // Not ours to end: keep it as it was.
            self.known.insert(node, known);
            return Vec::new();
        }
        self.dialing = self.dialing.saturating_sub(1);
        if refused {
            if self.refused.len() >= REFUSALS_KEPT {
                self.refused.pop_front();
            }
            self.refused.push_back(node);
        } else if matches!(known.stage, Stage::Dialing) {
            // Still announced; it ended to leave another session with that node
            // alone: dialed again if none is up for a while.
            self.known.insert(
                node,
                Known {
                    stage: Stage::Waiting {
                        unconnected_since: now,
                    },
                    ..known
                },
            );
        } else if matches!(known.stage, Stage::Stopping { found_again: true }) {
            let mut actions = self.found(node, known.addrs, known.source, now);
            actions.extend(self.start_queued());
            return actions;
        }
        self.start_queued()
    }

    /// Dials the waiting peers that never dialed us within [`FALLBACK_AFTER`];
    /// `connected` says whether a session with a node is up now.
    pub fn tick(&mut self, now: Instant, mut connected: impl FnMut(NodeId) -> bool) -> Vec<Action> {
        let mut due = Vec::new();
        for (node, known) in &mut self.known {
            if let Stage::Waiting { unconnected_since } = &mut known.stage {
                if connected(*node) {
                    *unconnected_since = now;
                } else if now.duration_since(*unconnected_since) >= FALLBACK_AFTER {
                    known.stage = Stage::Queued;
                    due.push(*node);
                }
            }
        }
        self.queue.extend(due);
        self.start_queued()
    }

    fn start_queued(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        while self.dialing < self.max_dialers
            && let Some(node) = self.queue.pop_front()
        {
            let Some(known) = self.known.get_mut(&node) else {
                continue;
            };
            known.stage = Stage::Dialing;
            self.dialing += 1;
            actions.push(Action::Dial {
                node,
                addrs: known.addrs.clone(),
                source: known.source,
            });
        }
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(byte: u8) -> NodeId {
        NodeId::from_bytes([byte; 16])
    }

    fn addr(port: u16) -> Vec<SocketAddr> {
        vec![SocketAddr::from(([127, 0, 0, 1], port))]
    }

    fn dialed(actions: &[Action]) -> Vec<NodeId> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Dial { node, .. } => Some(*node),
                Action::Stop { .. } => None,
            })
            .collect()
    }

    #[test]
    fn the_smaller_node_dials_at_once_and_only_once() {
        let now = Instant::now();
        let mut book = PeerBook::new(id(1), 8);
        assert_eq!(
            dialed(&book.found(id(2), addr(1), Source::Lan, now)),
            [id(2)]
        );
        // Announced again, on another address, by another source: still one dialer.
        assert!(book.found(id(2), addr(2), Source::Dht, now).is_empty());
        assert!(
            book.found(id(1), addr(3), Source::Lan, now).is_empty(),
            "itself"
        );
        assert_eq!(book.dialing(), 1);
    }

    #[test]
    fn the_larger_node_dials_only_when_no_session_came() {
        let start = Instant::now();
        let mut book = PeerBook::new(id(9), 8);
        assert!(book.found(id(2), addr(1), Source::Lan, start).is_empty());
        // The other node's session is up: nothing to do, however long.
        let later = start + FALLBACK_AFTER * 3;
        assert!(book.tick(later, |_| true).is_empty());
        // It ended and nobody came back for a while: we dial.
        assert!(book.tick(later + FALLBACK_AFTER / 2, |_| false).is_empty());
        assert_eq!(
            dialed(&book.tick(later + FALLBACK_AFTER, |_| false)),
            [id(2)]
        );
        assert!(book.tick(later + FALLBACK_AFTER * 9, |_| false).is_empty());
    }

    #[test]
    fn a_refusal_is_final_for_the_run() {
        let now = Instant::now();
        let mut book = PeerBook::new(id(1), 8);
        assert_eq!(
            dialed(&book.found(id(2), addr(1), Source::Lan, now)),
            [id(2)]
        );
        assert!(book.dial_ended(id(2), true, now).is_empty());
        for round in 0..10 {
            assert!(
                book.found(id(2), addr(1 + round), Source::Lan, now)
                    .is_empty(),
                "dialed again in round {round}"
            );
        }
        assert_eq!(book.dialing(), 0);
        // A dialer that ended without a refusal (it yielded to another session)
        // starts again once no session with that node is up for a while.
        assert_eq!(
            dialed(&book.found(id(3), addr(9), Source::Lan, now)),
            [id(3)]
        );
        book.dial_ended(id(3), false, now);
        assert!(book.found(id(3), addr(9), Source::Lan, now).is_empty());
        assert!(book.tick(now + FALLBACK_AFTER, |_| true).is_empty());
        let later = now + FALLBACK_AFTER * 2 + Duration::from_secs(1);
        assert_eq!(dialed(&book.tick(later, |_| false)), [id(3)]);
    }

    #[test]
    fn withdrawn_peers_are_stopped_or_forgotten() {
        let now = Instant::now();
        let mut book = PeerBook::new(id(5), 8);
        book.found(id(6), addr(1), Source::Lan, now);
        book.found(id(2), addr(2), Source::Lan, now);
        assert_eq!(book.lost(id(6)), [Action::Stop { node: id(6) }]);
        assert!(book.lost(id(6)).is_empty(), "stopped once");
        // Announced again while its dialer stops: dialed anew once that ended.
        book.found(id(6), addr(3), Source::Lan, now);
        assert_eq!(dialed(&book.dial_ended(id(6), false, now)), [id(6)]);
        assert_eq!(book.lost(id(6)), [Action::Stop { node: id(6) }]);
        assert!(
            book.lost(id(2)).is_empty(),
            "a waiting peer is just forgotten"
        );
        assert!(book.tick(now + FALLBACK_AFTER * 2, |_| false).is_empty());
        book.dial_ended(id(6), false, now);
        assert_eq!(book.dialing(), 0);
    }

    #[test]
    fn dialers_are_capped_and_the_rest_wait_their_turn() {
        let now = Instant::now();
        let mut book = PeerBook::new(id(0), 2);
        let mut started = Vec::new();
        for n in 1..=5 {
            started.extend(dialed(&book.found(id(n), addr(n.into()), Source::Lan, now)));
        }
        assert_eq!(started, [id(1), id(2)]);
        assert_eq!(dialed(&book.dial_ended(id(1), true, now)), [id(3)]);
        book.lost(id(4));
        assert_eq!(book.lost(id(2)), [Action::Stop { node: id(2) }]);
        assert_eq!(
            dialed(&book.dial_ended(id(2), false, now)),
            [id(5)],
            "4 was withdrawn"
        );
        assert_eq!(book.dialing(), 2);
    }

    /// A seeded walk through random events: the invariants hold at every step.
    #[test]
    fn random_events_keep_the_invariants() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        for seed in 0..200u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let own = id(rng.gen_range(0..12));
            let cap = rng.gen_range(1..4);
            let mut book = PeerBook::new(own, cap);
            let mut now = Instant::now();
            let mut running: Vec<NodeId> = Vec::new();
            let mut refused: Vec<NodeId> = Vec::new();
            for _ in 0..300 {
                now += Duration::from_millis(rng.gen_range(0..4000));
                let node = id(rng.gen_range(0..12));
                let actions = match rng.gen_range(0..5) {
                    0 | 1 => book.found(node, addr(7), Source::Lan, now),
                    2 => book.lost(node),
                    3 if running.contains(&node) => {
                        running.retain(|n| *n != node);
                        let refuse = rng.gen_bool(0.3);
                        if refuse {
                            refused.push(node);
                        }
                        book.dial_ended(node, refuse, now)
                    }
                    _ => book.tick(now, |n| rng.gen_bool(0.5) && n != own),
                };
                for action in actions {
                    if let Action::Dial { node, .. } = action {
                        assert_ne!(node, own, "seed {seed}: dialed itself");
                        assert!(!running.contains(&node), "seed {seed}: two dialers");
                        assert!(!refused.contains(&node), "seed {seed}: redialed a refusal");
                        running.push(node);
                    }
                }
                assert!(running.len() <= cap, "seed {seed}: over the cap");
                assert_eq!(book.dialing(), running.len(), "seed {seed}");
            }
        }
    }
}
