//! Who the node replicates with: the table `/peers` shows, and the registry that
//! keeps two nodes that dial each other down to one session.
//!
//! ## One session per pair of nodes
//!
//! Every node sends a random node id in its handshake's `user_data`. When node X
//! both dials node Y and is dialed by it, the session kept is the one the node
//! with the **smaller id** dialed; both sides reach that verdict on their own:
//!
//! - the smaller node ends the session Y dialed (an accepted one) as soon as its
//!   own dialed session with Y is up, whichever came first;
//! - the larger node holds its dialer back ("standby") while a session the
//!   smaller node dialed is up, and dials again once it ends.
//!
//! A node only ever ends sessions it accepted, so no dialer is torn down from
//! outside, with one exception: a session to a *discovered* peer
//! ([`Registry::dialed_discovered`]) yields to any other session with that node
//! (a configured dial, or an accepted one the peer's rule keeps). Discovery only
//! adds sessions where none exists.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    sync::{Arc, Mutex, MutexGuard},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tokio::sync::watch;

pub use super::discovery::Source;

/// Prefix of the handshake `user_data` that carries a node id.
const NODE_ID_PREFIX: &str = "multifeed-node:";

/// A node's id for this run: random, 16 bytes. Only compared, never trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId([u8; 16]);

impl NodeId {
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// The handshake `user_data` that announces this id.
    pub fn hello(&self) -> Vec<u8> {
        format!("{NODE_ID_PREFIX}{self}").into_bytes()
    }

    /// The id a peer's handshake announced, if it is a node (a `sync` client is not).
    pub fn from_hello(user_data: Option<&[u8]>) -> Option<Self> {
        let text = std::str::from_utf8(user_data?).ok()?;
        Self::parse(text.strip_prefix(NODE_ID_PREFIX)?)
    }

    /// An id from its 32 hex characters.
    pub fn parse(hex_id: &str) -> Option<Self> {
        let mut id = [0u8; 16];
        hex::decode_to_slice(hex_id, &mut id).ok()?;
        Some(Self(id))
    }

    #[cfg(test)]
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// Whether, between `own` and `remote`, the session `own` dialed is the one kept.
pub fn keeps_own_dial(own: NodeId, remote: NodeId) -> bool {
    own < remote
}

#[derive(Default)]
struct Sessions {
    /// Accepted sessions by the remote node's id: a stop switch for each.
    accepted: HashMap<NodeId, HashMap<u64, watch::Sender<bool>>>,
    /// Dialed sessions that are up, by remote node id.
    dialed: HashMap<NodeId, usize>,
    /// The dialed sessions to discovered peers among them: a stop switch each.
    discovered: HashMap<NodeId, HashMap<u64, watch::Sender<bool>>>,
    next_session: u64,
}

/// The node's live sessions by remote node id (see the module docs).
pub struct Registry {
    own: NodeId,
    sessions: Mutex<Sessions>,
    /// Bumped on every change, for dialers in standby.
    changed: watch::Sender<u64>,
}

impl Registry {
    pub fn new(own: NodeId) -> Arc<Self> {
        Arc::new(Self {
            own,
            sessions: Mutex::new(Sessions::default()),
            changed: watch::channel(0).0,
        })
    }

    pub fn own(&self) -> NodeId {
        self.own
    }

    fn lock(&self) -> MutexGuard<'_, Sessions> {
        // Every change is a single insert or remove: a panic elsewhere leaves it whole.
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// An accepted session from `remote` is up; `stop` ends it. Ends it at once if
    /// it duplicates a session this node dialed and keeps.
    pub fn accepted(self: &Arc<Self>, remote: NodeId, stop: watch::Sender<bool>) -> AcceptedGuard {
        let mut sessions = self.lock();
        let id = sessions.next_session;
        sessions.next_session += 1;
        let discovered_only = sessions.discovered.get(&remote).map_or(0, HashMap::len)
            == sessions.dialed.get(&remote).copied().unwrap_or(0);
        if sessions.dialed.get(&remote).copied().unwrap_or(0) > 0 {
            if keeps_own_dial(self.own, remote) {
                let _ = stop.send(true);
            } else if discovered_only {
                // The peer's dial is the one kept: our discovered session yields.
                for yielding in sessions.discovered.get(&remote).into_iter().flatten() {
                    let _ = yielding.1.send(true);
                }
            }
        }
        sessions
            .accepted
            .entry(remote)
            .or_default()
            .insert(id, stop);
        drop(sessions);
        self.bump();
        AcceptedGuard {
            registry: self.clone(),
            remote,
            id,
        }
    }

    /// A session this node dialed to `remote` is up. Ends the accepted sessions
    /// from `remote` if this one is kept.
    pub fn dialed(self: &Arc<Self>, remote: NodeId) -> DialedGuard {
        let mut sessions = self.lock();
        *sessions.dialed.entry(remote).or_default() += 1;
        // A configured peer's session is kept over a discovered one.
        for yielding in sessions.discovered.get(&remote).into_iter().flatten() {
            let _ = yielding.1.send(true);
        }
        if keeps_own_dial(self.own, remote)
            && let Some(accepted) = sessions.accepted.get(&remote)
        {
            for stop in accepted.values() {
                let _ = stop.send(true);
            }
        }
        drop(sessions);
        self.bump();
        DialedGuard {
            registry: self.clone(),
            remote,
            discovered: None,
        }
    }

    /// A session to the discovered peer `remote` is up: registered (and `None`
    /// returned) only if no other session with `remote` is, else the caller ends
    /// it. `stop` ends it later if another session comes that is kept over it.
    pub fn dialed_discovered(
        self: &Arc<Self>,
        remote: NodeId,
        stop: watch::Sender<bool>,
    ) -> Option<DialedGuard> {
        let mut sessions = self.lock();
        let busy = sessions.dialed.contains_key(&remote)
            || sessions
                .accepted
                .get(&remote)
                .is_some_and(|s| !s.is_empty());
        if busy {
            return None;
        }
        *sessions.dialed.entry(remote).or_default() += 1;
        let id = sessions.next_session;
        sessions.next_session += 1;
        sessions
            .discovered
            .entry(remote)
            .or_default()
            .insert(id, stop);
        drop(sessions);
        self.bump();
        Some(DialedGuard {
            registry: self.clone(),
            remote,
            discovered: Some(id),
        })
    }

    /// Whether a session with `remote` is up, in either direction.
    pub fn has_session(&self, remote: NodeId) -> bool {
        let sessions = self.lock();
        sessions.dialed.contains_key(&remote)
            || sessions
                .accepted
                .get(&remote)
                .is_some_and(|s| !s.is_empty())
    }

    /// Whether a dialer to `remote` must stand by: `remote` dialed us, and its
    /// session is the one kept.
    pub fn must_stand_by(&self, remote: NodeId) -> bool {
        !keeps_own_dial(self.own, remote)
            && self
                .lock()
                .accepted
                .get(&remote)
                .is_some_and(|sessions| !sessions.is_empty())
    }

    /// Waits until no session with `remote` is up (at once if none is).
    pub async fn until_no_session(&self, remote: NodeId) {
        let mut changed = self.changed.subscribe();
        while self.has_session(remote) {
            if changed.changed().await.is_err() {
                return;
            }
        }
    }

    /// Waits until a dialer to `remote` may dial (at once if it may now).
    pub async fn stand_by(&self, remote: NodeId) {
        let mut changed = self.changed.subscribe();
        while self.must_stand_by(remote) {
            if changed.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Unregisters an accepted session when dropped.
pub struct AcceptedGuard {
    registry: Arc<Registry>,
    remote: NodeId,
    id: u64,
}

impl Drop for AcceptedGuard {
    fn drop(&mut self) {
        let mut sessions = self.registry.lock();
        if let Some(accepted) = sessions.accepted.get_mut(&self.remote) {
            accepted.remove(&self.id);
            if accepted.is_empty() {
                sessions.accepted.remove(&self.remote);
            }
        }
        drop(sessions);
        self.registry.bump();
    }
}

/// Unregisters a dialed session when dropped.
pub struct DialedGuard {
    registry: Arc<Registry>,
    remote: NodeId,
    /// Its id among the discovered sessions, if it is one.
    discovered: Option<u64>,
}

impl Drop for DialedGuard {
    fn drop(&mut self) {
        let mut sessions = self.registry.lock();
        if let Some(count) = sessions.dialed.get_mut(&self.remote) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                sessions.dialed.remove(&self.remote);
            }
        }
        if let Some(id) = self.discovered
            && let Some(discovered) = sessions.discovered.get_mut(&self.remote)
        {
            discovered.remove(&id);
            if discovered.is_empty() {
                sessions.discovered.remove(&self.remote);
            }
        }
        drop(sessions);
        self.registry.bump();
    }
}

/// How a peer is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// This node dials it (configured with `--peer`, or discovered).
    Dialed,
    /// It connected to `--listen`.
    Accepted,
}

/// Where a peer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerState {
    Connecting,
    Connected,
    /// Waiting out the backoff delay before the next attempt.
    Retrying,
    /// Not dialing: the peer dialed us and that session is the one kept.
    Standby,
    /// The peer refused us for good (another group, an incompatible version).
    Refused,
    Stopped,
}

/// One row of `/peers`.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    pub address: String,
    pub direction: Direction,
    /// How it was found.
    pub source: Source,
    pub state: PeerState,
    /// When the state last changed, in ms since the Unix epoch.
    pub since_ms: u64,
    /// The peer's node id, once a session told it.
    pub node: Option<String>,
    pub last_error: Option<String>,
    pub sessions: u64,
    pub blocks_received: u64,
    pub bytes_received: u64,
    pub blocks_sent: u64,
    pub bytes_sent: u64,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Every peer's status, by row key (its address, or a discovered node's own
/// key). Accepted peers leave it when they disconnect (their number is bounded
/// by `--max-peers`); configured ones stay; discovered ones stay while dialed,
/// or to show a refusal.
#[derive(Default)]
pub struct PeerTable {
    rows: Mutex<BTreeMap<String, PeerStatus>>,
}

impl PeerTable {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, PeerStatus>> {
        self.rows.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds (or replaces) the row `key`: a configured address, an accepted
    /// peer's address, or a discovered node's own key.
    pub fn insert(
        &self,
        key: &str,
        address: &str,
        direction: Direction,
        source: Source,
        state: PeerState,
    ) {
        self.lock().insert(
            key.to_owned(),
            PeerStatus {
                address: address.to_owned(),
                direction,
                source,
                state,
                since_ms: now_ms(),
                node: None,
                last_error: None,
                sessions: 0,
                blocks_received: 0,
                bytes_received: 0,
                blocks_sent: 0,
                bytes_sent: 0,
            },
        );
    }

    pub fn remove(&self, address: &str) {
        self.lock().remove(address);
    }

    /// Changes a peer's row (if it has one).
    pub fn update(&self, address: &str, change: impl FnOnce(&mut PeerStatus)) {
        if let Some(row) = self.lock().get_mut(address) {
            change(row);
        }
    }

    /// Sets a peer's state (and its `since`, if the state changed).
    pub fn set_state(&self, address: &str, state: PeerState) {
        self.update(address, |row| {
            if row.state != state {
                row.state = state;
                row.since_ms = now_ms();
            }
        });
    }

    pub fn snapshot(&self) -> Vec<PeerStatus> {
        self.lock().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(byte: u8) -> NodeId {
        NodeId([byte; 16])
    }

    #[test]
    fn node_ids_round_trip_through_the_hello() {
        let own = NodeId::random();
        assert_eq!(NodeId::from_hello(Some(&own.hello())), Some(own));
        assert_eq!(NodeId::from_hello(None), None);
        assert_eq!(NodeId::from_hello(Some(b"gateway-7")), None);
        assert_eq!(NodeId::from_hello(Some(b"multifeed-node:zz")), None);
        assert_eq!(NodeId::from_hello(Some(&[0xff, 0xfe])), None);
    }

    #[test]
    fn the_smaller_node_ends_the_session_it_accepted_whichever_came_first() {
        // Accepted first, then our own dial comes up.
        let small = Registry::new(id(1));
        let (stop, stopped) = watch::channel(false);
        let _accepted = small.accepted(id(2), stop);
        assert!(!*stopped.borrow());
        let _dialed = small.dialed(id(2));
        assert!(*stopped.borrow(), "the duplicate accepted session is ended");

        // Our dial first, then the peer's.
        let small = Registry::new(id(1));
        let _dialed = small.dialed(id(2));
        let (stop, stopped) = watch::channel(false);
        let _accepted = small.accepted(id(2), stop);
        assert!(*stopped.borrow());
    }

    #[test]
    fn the_larger_node_keeps_what_it_accepted_and_stands_by() {
        let large = Registry::new(id(2));
        assert!(!large.must_stand_by(id(1)));
        let (stop, stopped) = watch::channel(false);
        let accepted = large.accepted(id(1), stop);
        let _dialed = large.dialed(id(1));
        assert!(
            !*stopped.borrow(),
            "the larger node never ends the kept session"
        );
        assert!(large.must_stand_by(id(1)));
        drop(accepted);
        assert!(!large.must_stand_by(id(1)), "it dials again once that ends");
    }

    #[test]
    fn sessions_with_other_nodes_are_left_alone() {
        let node = Registry::new(id(5));
        let (stop, stopped) = watch::channel(false);
        let _accepted = node.accepted(id(9), stop);
        let _dialed = node.dialed(id(7));
        assert!(!*stopped.borrow());
        assert!(!node.must_stand_by(id(9)), "9 > 5: our own dial is kept");
    }

    #[test]
    fn a_discovered_session_is_added_only_where_none_is_and_yields_to_others() {
        let node = Registry::new(id(5));
        // Where a session is up already, none is added.
        let (stop, _) = watch::channel(false);
        let configured = node.dialed(id(7));
        assert!(node.dialed_discovered(id(7), stop).is_none());
        drop(configured);

        // A configured dial coming later is kept over the discovered one.
        let (stop, stopped) = watch::channel(false);
        let _discovered = node
            .dialed_discovered(id(7), stop)
            .expect("the only session");
        let _configured = node.dialed(id(7));
        assert!(*stopped.borrow());

        // The smaller peer dials us: its session is kept, ours yields.
        let (stop, stopped) = watch::channel(false);
        let _discovered = node
            .dialed_discovered(id(2), stop)
            .expect("the only session");
        let (accepted_stop, accepted_stopped) = watch::channel(false);
        let _accepted = node.accepted(id(2), accepted_stop);
        assert!(*stopped.borrow());
        assert!(!*accepted_stopped.borrow());

        // The larger peer dials us: our discovered session is kept.
        let (stop, stopped) = watch::channel(false);
        let _discovered = node
            .dialed_discovered(id(9), stop)
            .expect("the only session");
        let (accepted_stop, accepted_stopped) = watch::channel(false);
        let _accepted = node.accepted(id(9), accepted_stop);
        assert!(!*stopped.borrow());
        assert!(*accepted_stopped.borrow());
    }

    #[tokio::test]
    async fn stand_by_returns_once_the_kept_session_ends() {
        let large = Registry::new(id(2));
        let (stop, _stopped) = watch::channel(false);
        let accepted = large.accepted(id(1), stop);
        let waiting = tokio::spawn({
            let large = large.clone();
            async move { large.stand_by(id(1)).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(accepted);
        tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
            .await
            .expect("stand_by returns")
            .expect("task");
    }
}
