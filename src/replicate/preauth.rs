//! Limits on a connection until the peer has authenticated: until it has opened the root
//! channel with a capability that proves it holds the key (issue 11). Before that, anyone
//! who can reach the port may be on the other end, so it gets little time, few bytes and
//! small frames, and strangers are counted apart from members:
//!
//! - [`PreAuth`], handed to the transport (`TransportLimits::pre_auth`), which enforces
//!   its [`PreAuthLimits`]: a deadline, a read budget and a smaller frame limit, all
//!   lifted the moment a valid `Open` for the root key arrives. Whoever accepted the
//!   connection can wait for that moment with [`PreAuth::authenticated`].
//! - [`ConnectionSlots`]: caps on unauthenticated connections in total and per source
//!   address, for an accept loop; a slot held in a [`PreAuth`] is released on
//!   authentication (or when the connection ends), so silent or slow strangers never
//!   hold a member's place. An address over its cap is refused; when all slots are
//!   taken, the connection that has waited longest is cut off to make room, so
//!   strangers from many addresses cannot keep a member out either (they would
//!   have to open the whole cap's worth of connections within one member
//!   handshake). Refusals and evictions are counted and reported at most once per
//!   interval.
//! - [`PeerSlots`]: the places of authenticated peers (`serve --max-peers`). A
//!   [`PreAuth`] given them takes one the moment its peer authenticates, and holds it
//!   while the connection lives; with none left, the session tells that peer the
//!   server is busy ([`crate::Error::ServerBusy`]). Only a member learns it: the
//!   answer goes on the group channel, which a stranger never opens.
//!
//! The capability check is written here from the protocol (JS hypercore `caps.replicate`:
//! BLAKE2b-256 keyed with the Noise handshake hash over a role constant and the key).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blake2::digest::{FixedOutput, Update, typenum::U32};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

/// What a connection may do before it authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreAuthLimits {
    /// Time from the start of the connection to a valid root `Open` (Noise included).
    pub deadline: Duration,
    /// Bytes the peer may send before it authenticates (frame headers included). A
    /// member needs well under 2 KiB: the Noise messages, the stream header, its `Open`
    /// and perhaps its feed-exchange handshake.
    pub read_budget: usize,
    /// Largest frame accepted before authentication (the full limit applies after).
    pub max_frame_len: usize,
}

impl Default for PreAuthLimits {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(5),
            read_budget: 64 * 1024,
            max_frame_len: 16 * 1024,
        }
    }
}

struct PreAuthInner {
    limits: PreAuthLimits,
    authenticated: watch::Sender<bool>,
    slot: Mutex<Option<PreAuthSlot>>,
    peer_slots: Option<PeerSlots>,
    /// Taken on authentication: a peer's place, or `Busy` when none was left.
    peer_place: Mutex<PeerPlace>,
}

/// What an authenticated connection got from its [`PeerSlots`].
enum PeerPlace {
    /// Not authenticated yet, or no peer slots to take one from.
    None,
    /// Held while the connection lives (dropped with the last clone of its PreAuth).
    Held {
        _permit: OwnedSemaphorePermit,
    },
    Busy,
}

/// One connection's pre-authentication state, shared by the transport that enforces it
/// and whoever accepted the connection. Cheap to clone.
#[derive(Clone)]
pub struct PreAuth(Arc<PreAuthInner>);

impl std::fmt::Debug for PreAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreAuth")
            .field("limits", &self.0.limits)
            .field("authenticated", &self.is_authenticated())
            .finish()
    }
}

impl PreAuth {
    /// Not yet authenticated, with these limits.
    pub fn new(limits: PreAuthLimits) -> Self {
        Self(Arc::new(PreAuthInner {
            limits,
            authenticated: watch::Sender::new(false),
            slot: Mutex::new(None),
            peer_slots: None,
            peer_place: Mutex::new(PeerPlace::None),
        }))
    }

    /// Not yet authenticated, with these limits; on authentication the peer takes a
    /// place in `peer_slots` (see [`PreAuth::busy`]).
    pub fn with_peer_slots(limits: PreAuthLimits, peer_slots: PeerSlots) -> Self {
        Self(Arc::new(PreAuthInner {
            limits,
            authenticated: watch::Sender::new(false),
            slot: Mutex::new(None),
            peer_slots: Some(peer_slots),
            peer_place: Mutex::new(PeerPlace::None),
        }))
    }

    /// Holds `slot` until the peer authenticates (or every clone is dropped).
    pub fn with_slot(self, slot: PreAuthSlot) -> Self {
        if let Ok(mut held) = self.0.slot.lock() {
            *held = Some(slot);
        }
        self
    }

    /// The limits in force until authentication.
    pub fn limits(&self) -> PreAuthLimits {
        self.0.limits
    }

    /// Resolves if the slot this connection holds is taken away for a newer one
    /// (see [`ConnectionSlots`]); never, without a slot or once authenticated.
    pub(crate) fn evicted(&self) -> impl std::future::Future<Output = ()> + Send + Sync + 'static {
        let evicted = self
            .0
            .slot
            .lock()
            .ok()
            .and_then(|held| held.as_ref().map(|slot| slot.evicted.clone()));
        async move {
            if let Some(mut rx) = evicted
                // An Err means the slot was released, not taken away.
                && rx.wait_for(|&e| e).await.is_ok()
            {
                return;
            }
            std::future::pending().await
        }
    }

    /// True once the peer has opened the root channel with a valid capability.
    pub fn is_authenticated(&self) -> bool {
        *self.0.authenticated.borrow()
    }

    /// Resolves once the peer has authenticated; never, if it does not (race it against
    /// the session's end).
    pub async fn authenticated(&self) {
        let mut rx = self.0.authenticated.subscribe();
        // The sender lives in `self`, so this cannot fail while we wait.
        let _ = rx.wait_for(|&done| done).await;
    }

    /// `Some(max peers)` if the peer authenticated and found every peer slot taken:
    /// its session then tells it so and ends.
    pub fn busy(&self) -> Option<usize> {
        let place = self.0.peer_place.lock().unwrap_or_else(|e| e.into_inner());
        match (&*place, &self.0.peer_slots) {
            (PeerPlace::Busy, Some(slots)) => Some(slots.max),
            _ => None,
        }
    }

    /// Records authentication, gives the unauthenticated slot back and takes a peer
    /// slot (before anyone waiting on [`PreAuth::authenticated`] wakes up).
    pub(crate) fn mark_authenticated(&self) {
        if let Some(slots) = &self.0.peer_slots {
            let mut place = self.0.peer_place.lock().unwrap_or_else(|e| e.into_inner());
            if matches!(*place, PeerPlace::None) {
                *place = match slots.semaphore.clone().try_acquire_owned() {
                    Ok(permit) => PeerPlace::Held { _permit: permit },
                    Err(_) => PeerPlace::Busy,
                };
            }
        }
        if let Ok(mut held) = self.0.slot.lock() {
            held.take();
        }
        self.0.authenticated.send_replace(true);
    }
}

/// Places for authenticated peers (`serve --max-peers`), taken at authentication by
/// each [`PreAuth`] made with them. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PeerSlots {
    semaphore: Arc<Semaphore>,
    max: usize,
}

impl PeerSlots {
    /// Room for `max` authenticated peers at once (at least one).
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        Self {
            semaphore: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// Authenticated peers holding a place now.
    pub fn in_use(&self) -> usize {
        self.max - self.semaphore.available_permits()
    }

    /// The most authenticated peers at once.
    pub fn max(&self) -> usize {
        self.max
    }
}

/// Caps on unauthenticated connections, for an accept loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLimits {
    /// Unauthenticated connections at once, from anywhere.
    pub max_total: usize,
    /// Unauthenticated connections at once from one address.
    pub max_per_address: usize,
    /// Refusals are reported at most once per this interval.
    pub report_interval: Duration,
}

impl Default for SlotLimits {
    fn default() -> Self {
        Self {
            max_total: 64,
            max_per_address: 8,
            report_interval: Duration::from_secs(10),
        }
    }
}

/// Why a connection got no slot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotRefused {
    /// No unauthenticated slot at all ([`SlotLimits::max_total`] is 0).
    #[error("{max} connections are already waiting to authenticate")]
    Total {
        /// [`SlotLimits::max_total`].
        max: usize,
    },
    /// This address holds all the slots it may.
    #[error("{max} connections from {address} are already waiting to authenticate")]
    PerAddress {
        /// The connecting address.
        address: IpAddr,
        /// [`SlotLimits::max_per_address`].
        max: usize,
    },
}

/// Refusals since the last report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusalReport {
    /// Connections refused because all slots were taken.
    pub total_full: u64,
    /// Connections refused because their address had all its slots.
    pub address_full: u64,
    /// Waiting connections cut off to make room for newer ones.
    pub evicted: u64,
    /// How long these were counted over.
    pub over: Duration,
}

impl std::fmt::Display for RefusalReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "refused {} connections in the last {:.0?} ({} with no unauthenticated slot, {} over the per-address cap); cut off {} that waited longest to make room",
            self.total_full + self.address_full,
            self.over,
            self.total_full,
            self.address_full,
            self.evicted
        )
    }
}

/// A connection holding a slot, oldest first in [`SlotState::holders`].
struct Holder {
    id: u64,
    address: IpAddr,
    evict: watch::Sender<bool>,
}

struct SlotState {
    holders: std::collections::VecDeque<Holder>,
    next_id: u64,
    per_address: HashMap<IpAddr, usize>,
    refused_total_full: u64,
    refused_address_full: u64,
    evicted: u64,
    counting_since: Instant,
}

impl SlotState {
    fn remove_at(&mut self, position: usize) -> Option<Holder> {
        let holder = self.holders.remove(position)?;
        if let Some(n) = self.per_address.get_mut(&holder.address) {
            *n -= 1;
            if *n == 0 {
                self.per_address.remove(&holder.address);
            }
        }
        Some(holder)
    }
}

struct SlotsInner {
    limits: SlotLimits,
    state: Mutex<SlotState>,
}

/// Unauthenticated connection slots, in total and per source address. Cheap to clone.
#[derive(Clone)]
pub struct ConnectionSlots(Arc<SlotsInner>);

impl ConnectionSlots {
    /// No slot taken.
    pub fn new(limits: SlotLimits) -> Self {
        Self(Arc::new(SlotsInner {
            limits,
            state: Mutex::new(SlotState {
                holders: std::collections::VecDeque::new(),
                next_id: 0,
                per_address: HashMap::new(),
                refused_total_full: 0,
                refused_address_full: 0,
                evicted: 0,
                counting_since: Instant::now(),
            }),
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SlotState> {
        // Counters stay consistent under a poisoned lock: every update is one statement.
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a connection from `address`, held until the returned slot is dropped.
    /// With every slot taken, the connection that has waited longest is cut off (its
    /// transport ends it) and this one takes its place.
    pub fn try_admit(&self, address: IpAddr) -> Result<PreAuthSlot, SlotRefused> {
        let limits = self.0.limits;
        let mut state = self.state();
        if limits.max_total == 0 {
            state.refused_total_full += 1;
            return Err(SlotRefused::Total { max: 0 });
        }
        let from_address = state.per_address.get(&address).copied().unwrap_or(0);
        if from_address >= limits.max_per_address {
            state.refused_address_full += 1;
            return Err(SlotRefused::PerAddress {
                address,
                max: limits.max_per_address,
            });
        }
        if state.holders.len() >= limits.max_total
            && let Some(oldest) = state.remove_at(0)
        {
            oldest.evict.send_replace(true);
            state.evicted += 1;
        }
        let id = state.next_id;
        state.next_id += 1;
        let (evict, evicted) = watch::channel(false);
        state.holders.push_back(Holder { id, address, evict });
        *state.per_address.entry(address).or_insert(0) += 1;
        Ok(PreAuthSlot {
            slots: self.clone(),
            id,
            address,
            evicted,
        })
    }

    /// Unauthenticated connections holding a slot now.
    pub fn in_use(&self) -> usize {
        self.state().holders.len()
    }

    /// The refusals since the last report, once per `report_interval` and only if there
    /// were any: log this instead of a line per refused connection.
    pub fn refusals_due(&self) -> Option<RefusalReport> {
        let mut state = self.state();
        let over = state.counting_since.elapsed();
        if over < self.0.limits.report_interval
            || state.refused_total_full + state.refused_address_full + state.evicted == 0
        {
            return None;
        }
        let report = RefusalReport {
            total_full: state.refused_total_full,
            address_full: state.refused_address_full,
            evicted: state.evicted,
            over,
        };
        state.refused_total_full = 0;
        state.refused_address_full = 0;
        state.evicted = 0;
        state.counting_since = Instant::now();
        Some(report)
    }

    /// Gives a slot back, unless it was already taken away by an eviction.
    fn release(&self, id: u64) {
        let mut state = self.state();
        if let Some(position) = state.holders.iter().position(|h| h.id == id) {
            state.remove_at(position);
        }
    }
}

/// One unauthenticated connection's slot; released on drop.
pub struct PreAuthSlot {
    slots: ConnectionSlots,
    id: u64,
    address: IpAddr,
    /// Turns true if the slot is taken away for a newer connection.
    evicted: watch::Receiver<bool>,
}

impl PreAuthSlot {
    /// Whether the slot was taken away for a newer connection.
    pub fn is_evicted(&self) -> bool {
        *self.evicted.borrow()
    }
}

impl std::fmt::Debug for PreAuthSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreAuthSlot")
            .field("address", &self.address)
            .finish()
    }
}

impl Drop for PreAuthSlot {
    fn drop(&mut self) {
        self.slots.release(self.id);
    }
}

/// Role constants of hypercore's `caps.replicate` (the protocol's, not code).
const REPLICATE_INITIATOR: [u8; 32] = [
    0x51, 0x81, 0x2A, 0x2A, 0x35, 0x9B, 0x50, 0x36, 0x95, 0x36, 0x77, 0x5D, 0xF8, 0x9E, 0x18, 0xE4,
    0x77, 0x40, 0xF3, 0xDB, 0x72, 0xAC, 0x0A, 0xE7, 0x0B, 0x29, 0x59, 0x4C, 0x19, 0x4D, 0xC3, 0x16,
];
const REPLICATE_RESPONDER: [u8; 32] = [
    0x04, 0x38, 0x49, 0x2D, 0x02, 0x97, 0x0C, 0xC1, 0x35, 0x28, 0xAC, 0x02, 0x62, 0xBC, 0xA0, 0x07,
    0x4E, 0x09, 0x26, 0x26, 0x02, 0x56, 0x86, 0x5A, 0xCC, 0xC0, 0xBF, 0x15, 0xBD, 0x79, 0x12, 0x7D,
];

/// The capability the side with role `initiator` sends in its `Open` for `key`.
pub(crate) fn capability(initiator: bool, key: &[u8; 32], handshake_hash: &[u8]) -> [u8; 32] {
    let role = if initiator {
        &REPLICATE_INITIATOR
    } else {
        &REPLICATE_RESPONDER
    };
    // A 64-byte handshake hash is a valid BLAKE2b key; anything else means no session.
    let Ok(mut mac) =
        blake2::Blake2bMac::<U32>::new_with_salt_and_personal(handshake_hash, &[], &[])
    else {
        return [0; 32];
    };
    mac.update(role);
    mac.update(key);
    mac.finalize_fixed().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, n])
    }

    #[test]
    fn slots_cap_the_total_and_each_address_and_come_back_on_drop() {
        let slots = ConnectionSlots::new(SlotLimits {
            max_total: 3,
            max_per_address: 2,
            report_interval: Duration::ZERO,
        });
        let a1 = slots.try_admit(ip(1)).unwrap();
        let a2 = slots.try_admit(ip(1)).unwrap();
        assert_eq!(
            slots.try_admit(ip(1)).unwrap_err(),
            SlotRefused::PerAddress {
                address: ip(1),
                max: 2
            }
        );
        let b1 = slots.try_admit(ip(2)).unwrap();
        assert_eq!(slots.in_use(), 3);
        // Full: the one that waited longest makes room.
        let c1 = slots.try_admit(ip(3)).unwrap();
        assert!(a1.is_evicted() && !a2.is_evicted() && !b1.is_evicted());
        assert_eq!(slots.in_use(), 3);
        drop(a1); // an evicted slot is not given back twice
        assert_eq!(slots.in_use(), 3);
        let a3 = slots.try_admit(ip(1)).unwrap();
        assert!(a2.is_evicted());
        drop((a2, a3, b1, c1));
        assert_eq!(slots.in_use(), 0);
        let report = slots.refusals_due().unwrap();
        assert_eq!(
            (report.total_full, report.address_full, report.evicted),
            (0, 1, 2)
        );
        assert_eq!(slots.refusals_due(), None, "reported once");
    }

    #[test]
    fn refusals_are_reported_at_most_once_per_interval() {
        let slots = ConnectionSlots::new(SlotLimits {
            max_total: 0,
            max_per_address: 1,
            report_interval: Duration::from_secs(3600),
        });
        for _ in 0..10_000 {
            assert!(slots.try_admit(ip(1)).is_err());
        }
        assert_eq!(slots.refusals_due(), None);
    }

    #[tokio::test]
    async fn authentication_releases_the_slot_and_wakes_the_waiter() {
        let slots = ConnectionSlots::new(SlotLimits::default());
        let pre_auth =
            PreAuth::new(PreAuthLimits::default()).with_slot(slots.try_admit(ip(1)).unwrap());
        let waiter = tokio::spawn({
            let pre_auth = pre_auth.clone();
            async move { pre_auth.authenticated().await }
        });
        assert_eq!(slots.in_use(), 1);
        assert!(!pre_auth.is_authenticated());
        pre_auth.mark_authenticated();
        assert_eq!(slots.in_use(), 0);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(pre_auth.busy(), None, "no peer slots: never busy");
        // A connection that ends unauthenticated gives its slot back too.
        let pre_auth =
            PreAuth::new(PreAuthLimits::default()).with_slot(slots.try_admit(ip(1)).unwrap());
        drop(pre_auth);
        assert_eq!(slots.in_use(), 0);
    }

    #[test]
    fn a_peer_slot_is_taken_on_authentication_and_held_while_the_connection_lives() {
        let peers = PeerSlots::new(1);
        let first = PreAuth::with_peer_slots(PreAuthLimits::default(), peers.clone());
        let second = PreAuth::with_peer_slots(PreAuthLimits::default(), peers.clone());
        // Strangers hold no peer slot, however many there are.
        assert_eq!(peers.in_use(), 0);
        first.mark_authenticated();
        first.mark_authenticated(); // once per connection, however often it is said
        assert_eq!((peers.in_use(), first.busy()), (1, None));
        second.mark_authenticated();
        assert_eq!(second.busy(), Some(1), "no slot left");
        drop(first);
        assert_eq!(
            peers.in_use(),
            0,
            "the place comes back when the connection ends"
        );
        let third = PreAuth::with_peer_slots(PreAuthLimits::default(), peers.clone());
        third.mark_authenticated();
        assert_eq!(third.busy(), None);
    }
}

/// Places on trial (feeds offered to us, not yet delivered) per source address,
/// over all of its sessions at once, for an accept loop: one peer reconnecting or
/// connecting many times cannot take more than one session's worth
/// ([`crate::ReplicateOptions::max_unproven_feeds`]) of the group's places
/// ([`crate::Options::max_unproven_feeds`]) and so cannot lock members out. Places
/// come back as feeds deliver or their session ends. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PeerAdmissions {
    limit: usize,
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PeerAdmissions {
    /// At most `limit` feeds on trial per address at once (at least one).
    pub fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
            held: Arc::default(),
        }
    }

    /// The account of `address`, for [`crate::ReplicateOptions::admission_account`].
    pub fn account(&self, address: IpAddr) -> AdmissionAccount {
        AdmissionAccount {
            admissions: self.clone(),
            address,
        }
    }

    /// Feeds on trial that `address` holds now.
    pub fn held(&self, address: IpAddr) -> usize {
        self.lock().get(&address).copied().unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One address's share of [`PeerAdmissions`], charged by each of its sessions for
/// the feeds it puts on trial.
#[derive(Debug, Clone)]
pub struct AdmissionAccount {
    admissions: PeerAdmissions,
    address: IpAddr,
}

impl AdmissionAccount {
    /// Takes `count` places, or none if that would pass the limit.
    pub(crate) fn try_charge(&self, count: usize) -> bool {
        let mut held = self.admissions.lock();
        let entry = held.entry(self.address).or_insert(0);
        if *entry + count > self.admissions.limit {
            if *entry == 0 {
                held.remove(&self.address);
            }
            return false;
        }
        *entry += count;
        true
    }

    /// Gives `count` places back.
    pub(crate) fn refund(&self, count: usize) {
        if count == 0 {
            return;
        }
        let mut held = self.admissions.lock();
        if let Some(entry) = held.get_mut(&self.address) {
            *entry = entry.saturating_sub(count);
            if *entry == 0 {
                held.remove(&self.address);
            }
        }
    }

    /// The limit per address.
    pub(crate) fn limit(&self) -> usize {
        self.admissions.limit
    }
}
