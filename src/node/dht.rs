//! Finding the group's peers on the Hyperswarm DHT (`serve --discover dht`, cargo
//! feature `dht`).
//!
//! An owned task joins the group's discovery topic ([`multifeed::SharedKey::discovery_topic`])
//! with the `hyperswarm` crate, announcing and looking it up, and hands every
//! connection out as a [`DhtPeer`] on a bounded channel; [`run_dht`] replicates over
//! each like an accepted TCP peer. The DHT's connection is already encrypted (Noise
//! and secretstream over UDX); the replication session runs hypercore-protocol's own
//! Noise handshake inside it, which proves the shared key as over TCP. Plugging the
//! DHT's cipher into the session instead would mean opening up our guarded transport
//! (`replicate/transport.rs`) to a second cipher: not done.
//!
//! The crates are early (hyperswarm 0.1.0, hyperdht 0.1.1, pinned exactly). What we
//! guard against here:
//! - They panic on some inputs and paths (`todo!()`, `unwrap()` on locks). The swarm
//!   runs in a task of its own; a panic there is logged, and the swarm starts again
//!   after a backoff while the node keeps running.
//! - They hand out several connections to the same peer (one per relay); we keep one
//!   live connection per remote public key. A Rust client dials with a fresh random
//!   key every time (hyperdht 0.1.1), so for those the node's own duplicate check
//!   (by node id, after the handshake) is what ends a second session.
//! - With no bootstrap list they silently use the public network; we never pass an
//!   empty list (see [`DhtConfig::new`]).
//!
//! Not supported by the crates: hole punching (two peers both behind NAT do not
//! meet) and connecting through relays; a peer is reached only at the address the
//! DHT saw it at.

use std::{
    collections::{HashMap, HashSet},
    fmt, io,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use futures::{FutureExt, Sink, Stream, StreamExt, future::BoxFuture, stream::FuturesUnordered};
use hypercore_handshake::CipherEvent;
use hyperswarm::{Connection, JoinOpts, PublicKey, Swarm, SwarmConfig, Topic};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::mpsc,
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use super::{Admission, Shared, discovery::Source, serve_peer};

/// Connections waiting for [`run_dht`] to pick them up.
const PEER_QUEUE: usize = 16;
/// Largest message handed to the DHT's cipher in one write.
const MAX_MESSAGE: usize = 64 * 1024;
/// Bytes handed to the cipher before a write waits for them to be flushed: its
/// queue accepts without limit, so the bound is ours.
const WRITE_HIGH_WATER: usize = 256 * 1024;
/// First wait before the swarm starts again after it failed or panicked.
const RESTART_INITIAL: Duration = Duration::from_secs(1);
/// Longest wait between restarts; a swarm that ran this long resets the wait.
const RESTART_MAX: Duration = Duration::from_secs(60);
/// First wait before the topic is joined again. hyperswarm 0.1.0 looks the topic
/// up only as part of an announce, once per ~10 minutes: two nodes that announce
/// at the same moment miss each other until then. Joining again looks it up again.
const REJOIN_FIRST: Duration = Duration::from_secs(2);
/// Longest wait between joins (the wait doubles from [`REJOIN_FIRST`]).
const REJOIN_MAX: Duration = Duration::from_secs(300);
/// First wait before a peer we dialed is dialed again after its connection ended:
/// hyperswarm 0.1.0 never dials a key twice.
const REDIAL_FIRST: Duration = Duration::from_secs(1);
/// Redials of one peer in a row before giving up (1 s doubling: about a minute).
const MAX_REDIALS: u32 = 6;
/// A connection that lasted this long worked: its peer's redials start over.
const REDIAL_RESET_AFTER: Duration = Duration::from_secs(60);
/// Ended connections waiting to be considered for a redial (more are not redialed).
const ENDED_QUEUE: usize = 64;
/// How often the swarm is polled. dht-rpc 0.0.2 wakes its task again on every
/// poll (a busy loop, marked as such in its `MessageDataStream`): polled on wake-up
/// it keeps a core at 100 %. Polled on this tick instead, each DHT message waits
/// at most this long.
const SWARM_TICK: Duration = Duration::from_millis(10);

/// How the node joins the DHT.
#[derive(Debug, Clone)]
pub struct DhtConfig {
    /// DHT nodes to join through; never empty.
    pub bootstrap: Vec<SocketAddr>,
    /// The local UDP address of the DHT socket.
    pub bind: SocketAddr,
    /// Most connections the swarm keeps.
    pub max_peers: usize,
}

/// Why the DHT could not be joined from the command line's settings.
#[derive(Debug, thiserror::Error)]
pub enum DhtConfigError {
    #[error(
        "--discover dht needs a DHT node to join through: give --bootstrap HOST:PORT (a node you run, e.g. `npx hyperdht --bootstrap --port 49737`), or --dht-public to use the public Hyperswarm network"
    )]
    NoBootstrap,
    #[error("cannot resolve the DHT bootstrap node {addr}: {source}")]
    Resolve {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("--dht-bind {addr} is not an IPv4 address with a port (e.g. 0.0.0.0:49737)")]
    BindAddress { addr: String },
    #[error(
        "cannot bind the DHT's UDP socket on {addr} ({source}); pick another --dht-bind, or port 0 for any free one"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

impl DhtConfig {
    /// From `--bootstrap` (repeatable), `--dht-public` and `--dht-bind`. Refuses an
    /// empty bootstrap list unless `public` asks for the public network by name.
    pub async fn new(
        bootstrap: &[String],
        public: bool,
        bind: Option<&str>,
        max_peers: usize,
    ) -> Result<Self, DhtConfigError> {
        let mut names: Vec<String> = bootstrap.to_vec();
        if public {
            names.extend(hyperdht::DEFAULT_BOOTSTRAP.iter().map(|s| s.to_string()));
        }
        if names.is_empty() {
            return Err(DhtConfigError::NoBootstrap);
        }
        let mut addrs = Vec::new();
        for name in names {
            let found = tokio::net::lookup_host(name.as_str())
                .await
                .map_err(|source| DhtConfigError::Resolve {
                    addr: name.clone(),
                    source,
                })?;
            // The crates speak IPv4 only.
            addrs.extend(found.filter(SocketAddr::is_ipv4));
        }
        if addrs.is_empty() {
            return Err(DhtConfigError::Resolve {
                addr: bootstrap.join(", "),
                source: io::Error::new(io::ErrorKind::NotFound, "no IPv4 address"),
            });
        }
        let bind_text = bind.unwrap_or("0.0.0.0:0");
        let bind: SocketAddr = bind_text
            .parse()
            .ok()
            .filter(SocketAddr::is_ipv4)
            .ok_or_else(|| DhtConfigError::BindAddress {
                addr: bind_text.to_string(),
            })?;
        // Refused here rather than by the swarm, which would retry it forever.
        std::net::UdpSocket::bind(bind)
            .map_err(|source| DhtConfigError::Bind { addr: bind, source })?;
        Ok(Self {
            bootstrap: addrs,
            bind,
            max_peers: max_peers.max(1),
        })
    }
}

/// Why a swarm stopped (it is started again).
#[derive(Debug, thiserror::Error)]
enum SwarmError {
    #[error("cannot bind the DHT's UDP socket on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: hyperswarm::Error,
    },
    #[error("cannot start the DHT: {0}")]
    Start(#[source] hyperswarm::Error),
    #[error("the swarm stopped handing out connections")]
    Ended,
}

/// A connection to a peer found on the DHT.
pub struct DhtPeer {
    /// The remote's public key on the DHT (for a Rust client, a fresh key per
    /// connection).
    pub remote_public_key: [u8; 32],
    /// The encrypted DHT stream, as bytes.
    pub stream: DhtStream,
    /// Whether we dialed (the Noise initiator of the session inside).
    pub initiator: bool,
}

impl fmt::Debug for DhtPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DhtPeer")
            .field("remote_public_key", &hex::encode(self.remote_public_key))
            .field("initiator", &self.initiator)
            .finish_non_exhaustive()
    }
}

/// The remote keys with a live connection: one each.
#[derive(Clone, Default)]
struct LiveKeys(Arc<Mutex<HashSet<[u8; 32]>>>);

impl LiveKeys {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<[u8; 32]>> {
        // Each change is one insert or remove: a panic elsewhere leaves it whole.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The slot for `key`, unless a connection to it is live. `ended` hears when
    /// it ends, and how long it lasted.
    fn claim(&self, key: [u8; 32], ended: Option<mpsc::Sender<Ended>>) -> Option<LiveSlot> {
        self.lock().insert(key).then(|| LiveSlot {
            keys: self.clone(),
            key,
            ended,
            since: Instant::now(),
        })
    }
}

/// A connection we dialed ended: the remote key, and how long it lasted.
type Ended = ([u8; 32], Duration);

/// Frees its key when the connection holding it is dropped.
struct LiveSlot {
    keys: LiveKeys,
    key: [u8; 32],
    ended: Option<mpsc::Sender<Ended>>,
    since: Instant,
}

impl Drop for LiveSlot {
    fn drop(&mut self) {
        self.keys.lock().remove(&self.key);
        if let Some(ended) = &self.ended {
            // Full or gone: the peer is found again when the topic is next joined.
            let _ = ended.try_send((self.key, self.since.elapsed()));
        }
    }
}

/// When to dial a peer again after a connection we dialed ended (IO-less).
#[derive(Debug, Default)]
struct Redials {
    /// Redials in a row per remote key, since its last connection that worked.
    failures: HashMap<[u8; 32], u32>,
}

impl Redials {
    /// The wait before dialing `key` again after a connection that lasted
    /// `lasted`, or `None`: give up on it.
    fn ended(&mut self, key: [u8; 32], lasted: Duration) -> Option<Duration> {
        let failures = self.failures.entry(key).or_default();
        if lasted >= REDIAL_RESET_AFTER {
            *failures = 0;
        }
        if *failures >= MAX_REDIALS {
            self.failures.remove(&key);
            return None;
        }
        let delay = REDIAL_FIRST * 2u32.pow(*failures);
        *failures += 1;
        Some(delay)
    }
}

/// A DHT connection (a stream of encrypted messages) as a byte stream.
pub struct DhtStream {
    connection: Connection,
    /// The last message received, read up to `read_at`.
    unread: Vec<u8>,
    read_at: usize,
    /// Bytes handed to the cipher since it last flushed.
    unflushed: usize,
    _slot: LiveSlot,
}

impl AsyncRead for DhtStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.read_at < this.unread.len() {
                let n = buf.remaining().min(this.unread.len() - this.read_at);
                buf.put_slice(&this.unread[this.read_at..this.read_at + n]);
                this.read_at += n;
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.connection).poll_next(cx)) {
                Some(CipherEvent::Message(message)) => {
                    this.unread = message;
                    this.read_at = 0;
                }
                // The DHT's own handshake payload: not ours to read.
                Some(CipherEvent::HandshakePayload(_)) => {}
                Some(CipherEvent::ErrStuff(e)) => return Poll::Ready(Err(e)),
                None => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl AsyncWrite for DhtStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.unflushed >= WRITE_HIGH_WATER {
            ready!(Pin::new(&mut this.connection).poll_flush(cx))?;
            this.unflushed = 0;
        }
        ready!(Pin::new(&mut this.connection).poll_ready(cx))?;
        let n = buf.len().min(MAX_MESSAGE);
        Pin::new(&mut this.connection).start_send(buf[..n].to_vec())?;
        this.unflushed += n;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.connection).poll_flush(cx))?;
        this.unflushed = 0;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().connection).poll_close(cx)
    }
}

/// DHT discovery for one topic: its connections, and the task that finds them.
pub struct Discovery {
    pub peers: mpsc::Receiver<DhtPeer>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Discovery {
    /// Joins `topic` (announce and look up) until `cancel`, handing out one live
    /// connection per remote key. A failed or panicking swarm starts again.
    pub fn spawn(topic: [u8; 32], config: DhtConfig, cancel: CancellationToken) -> Self {
        let (peers_tx, peers) = mpsc::channel(PEER_QUEUE);
        let task = tokio::spawn(supervise(topic, config, peers_tx, cancel));
        Self { peers, task }
    }
}

/// Runs the swarm in a task of its own, again and again with backoff, until
/// `cancel` or until nobody takes the connections.
async fn supervise(
    topic: [u8; 32],
    config: DhtConfig,
    peers: mpsc::Sender<DhtPeer>,
    cancel: CancellationToken,
) {
    let live = LiveKeys::default();
    let mut delay = RESTART_INITIAL;
    loop {
        let started = Instant::now();
        let attempt = tokio::spawn(run_swarm(
            topic,
            config.clone(),
            peers.clone(),
            live.clone(),
            cancel.clone(),
        ));
        match attempt.await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => {
                tracing::warn!("DHT discovery stopped: {e}; it starts again in {delay:?}")
            }
            Err(e) if e.is_panic() => {
                let panic = e.into_panic();
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".into());
                tracing::error!(
                    "the DHT library (hyperswarm 0.1.0) panicked ({what}); the node keeps running, and DHT discovery starts again in {delay:?}"
                );
            }
            Err(_) => return,
        }
        if started.elapsed() >= RESTART_MAX {
            delay = RESTART_INITIAL;
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(RESTART_MAX);
    }
}

/// One swarm's life: join the topic, hand out its connections. `Ok` when
/// cancelled or when the receiver is gone.
async fn run_swarm(
    topic: [u8; 32],
    config: DhtConfig,
    peers: mpsc::Sender<DhtPeer>,
    live: LiveKeys,
    cancel: CancellationToken,
) -> Result<(), SwarmError> {
    let mut dht_config = hyperswarm::DhtConfig::default()
        .bind(config.bind)
        .map_err(|e| SwarmError::Bind {
            addr: config.bind,
            source: e.into(),
        })?;
    for addr in &config.bootstrap {
        dht_config = dht_config.add_bootstrap_node(*addr);
    }
    let swarm = Swarm::with_config(SwarmConfig::new(dht_config).max_peers(config.max_peers))
        .await
        .map_err(SwarmError::Start)?;
    let mut connections = swarm.connections();
    swarm.join(Topic(topic), JoinOpts::Both);
    let mut rejoin_every = REJOIN_FIRST;
    let rejoin = tokio::time::sleep(rejoin_every);
    tokio::pin!(rejoin);
    let mut tick = tokio::time::interval(SWARM_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let own_key = swarm.public_key().0;
    let (ended_tx, mut ended) = mpsc::channel(ENDED_QUEUE);
    let mut redials = Redials::default();
    let mut dialing: FuturesUnordered<BoxFuture<'static, Redialed>> = FuturesUnordered::new();
    tracing::info!(
        local = ?swarm.local_addr().ok(),
        key = %hex::encode(swarm.public_key().0),
        "joined the group's topic on the DHT"
    );
    loop {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            () = &mut rejoin => {
                swarm.leave(&Topic(topic));
                swarm.join(Topic(topic), JoinOpts::Both);
                rejoin_every = (rejoin_every * 2).min(REJOIN_MAX);
                rejoin.as_mut().reset(tokio::time::Instant::now() + rejoin_every);
            }
            _ = tick.tick() => {
                while let Ok((key, lasted)) = ended.try_recv() {
                    redial(&swarm, &mut redials, &mut dialing, key, lasted);
                }
                // With a no-op waker: the swarm's own wake-ups would spin (see SWARM_TICK).
                let mut found = Vec::new();
                while let Some(Some((key, result))) = dialing.next().now_or_never() {
                    match result {
                        Ok(connection) => found.push((connection, key, true)),
                        Err(e) => {
                            tracing::debug!(remote = %hex::encode(key), "redial failed: {e}");
                            redial(&swarm, &mut redials, &mut dialing, key, Duration::ZERO);
                        }
                    }
                }
                while let Some(event) = connections.next().now_or_never() {
                    match event {
                        Some(Ok(event)) => found.push((event.connection, event.remote_public_key.0, event.client)),
                        Some(Err(e)) => tracing::debug!("a DHT connection failed: {e}"),
                        None => return Err(SwarmError::Ended),
                    }
                }
                for (connection, remote, we_dialed) in found {
                    let ended = we_dialed.then(|| ended_tx.clone());
                    let Some(peer) = accept(connection, remote, we_dialed, own_key, &live, ended) else {
                        continue;
                    };
                    tokio::select! {
                        () = cancel.cancelled() => return Ok(()),
                        sent = peers.send(peer) => if sent.is_err() {
                            return Ok(());
                        },
                    }
                }
            }
        }
    }
}

/// A redial's outcome: the remote key and the connection.
type Redialed = ([u8; 32], hyperswarm::Result<Connection>);

/// Dials `key` again after a wait, unless it was dialed often enough in a row.
fn redial(
    swarm: &Swarm,
    redials: &mut Redials,
    dialing: &mut FuturesUnordered<BoxFuture<'static, Redialed>>,
    key: [u8; 32],
    lasted: Duration,
) {
    let Some(delay) = redials.ended(key, lasted) else {
        tracing::debug!(remote = %hex::encode(key), "gave up redialing a DHT peer");
        return;
    };
    let swarm = swarm.clone();
    dialing.push(Box::pin(async move {
        tokio::time::sleep(delay).await;
        (key, swarm.connect(PublicKey::from(key)).await)
    }));
}

/// The peer a new connection reaches, unless it is ourselves or a key with a live
/// connection already.
fn accept(
    connection: Connection,
    remote: [u8; 32],
    we_dialed: bool,
    own_key: [u8; 32],
    live: &LiveKeys,
    ended: Option<mpsc::Sender<Ended>>,
) -> Option<DhtPeer> {
    // hyperswarm 0.1.0 finds its own announcement and dials it.
    if remote == own_key {
        return None;
    }
    let Some(slot) = live.claim(remote, ended) else {
        tracing::debug!(
            remote = %hex::encode(remote),
            "dropped a second DHT connection to a peer already connected"
        );
        return None;
    };
    // A server-side connection polls the DHT's RPC on every read, and that poll
    // wakes its task again at once (see SWARM_TICK): the swarm's tick polls it instead.
    if let Ok(mut inner) = connection.inner.write() {
        inner.rpc = None;
    }
    tracing::debug!(
        remote = %hex::encode(remote),
        we_dialed,
        "connection over the DHT"
    );
    Some(DhtPeer {
        remote_public_key: remote,
        initiator: we_dialed,
        stream: DhtStream {
            connection,
            unread: Vec::new(),
            read_at: 0,
            unflushed: 0,
            _slot: slot,
        },
    })
}

/// A DHT peer has no address of its own for the per-address caps: its public key
/// stands in for one (as an IPv6 address no socket has).
fn stand_in_address(key: &[u8; 32]) -> IpAddr {
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&key[..16]);
    IpAddr::V6(Ipv6Addr::from(bytes))
}

/// Finds the group's peers on the DHT and replicates with each, like an accepted
/// TCP peer, until `cancel`.
pub async fn run_dht(shared: Arc<Shared>, config: DhtConfig, cancel: CancellationToken) {
    let topic = *shared.group.shared_key().discovery_topic().as_bytes();
    let max_peers = config.max_peers;
    let Discovery { mut peers, task } = Discovery::spawn(topic, config, cancel.clone());
    let admission = Admission::new(&shared, max_peers);
    let mut report_tick = admission.report_tick();
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = report_tick.tick() => admission.report(),
            Some(done) = sessions.join_next(), if !sessions.is_empty() => {
                if let Err(e) = done {
                    tracing::warn!("a DHT peer task failed: {e}");
                }
            }
            peer = peers.recv() => {
                let Some(peer) = peer else { break };
                let address = stand_in_address(&peer.remote_public_key);
                let Some((pre_auth, account)) = admission.admit(address) else { continue };
                let label = format!("dht:{}", &hex::encode(peer.remote_public_key)[..16]);
                sessions.spawn(serve_peer(
                    shared.clone(),
                    peer.stream,
                    label,
                    Source::Dht,
                    peer.initiator,
                    pre_auth,
                    account,
                    admission.quiet.clone(),
                    cancel.clone(),
                ));
            }
        }
    }
    while let Some(done) = sessions.join_next().await {
        if let Err(e) = done {
            tracing::warn!("a DHT peer task failed while stopping: {e}");
        }
    }
    // The supervisor sees the same cancellation.
    if let Err(e) = task.await {
        tracing::warn!("DHT discovery failed while stopping: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_live_slot_per_key_until_dropped() {
        let live = LiveKeys::default();
        let first = live.claim([1; 32], None).expect("a free key is claimed");
        assert!(
            live.claim([1; 32], None).is_none(),
            "a second connection is refused"
        );
        assert!(
            live.claim([2; 32], None).is_some(),
            "another key is independent"
        );
        drop(first);
        assert!(
            live.claim([1; 32], None).is_some(),
            "the key is free once dropped"
        );
    }

    #[test]
    fn a_dialed_connection_that_ends_is_reported_with_its_key() {
        let live = LiveKeys::default();
        let (tx, mut rx) = mpsc::channel(1);
        drop(live.claim([3; 32], Some(tx)).unwrap());
        let (key, _lasted) = rx.try_recv().expect("the end is reported");
        assert_eq!(key, [3; 32]);
    }

    #[test]
    fn redials_back_off_give_up_and_start_over_after_a_working_connection() {
        let mut redials = Redials::default();
        let key = [4; 32];
        let delays: Vec<_> = (0..MAX_REDIALS)
            .map(|_| redials.ended(key, Duration::ZERO))
            .collect();
        let expected: Vec<_> = (0..MAX_REDIALS)
            .map(|n| Some(REDIAL_FIRST * 2u32.pow(n)))
            .collect();
        assert_eq!(delays, expected);
        assert_eq!(redials.ended(key, Duration::ZERO), None, "gives up");
        assert!(redials.failures.is_empty(), "forgets a peer it gave up on");
        redials.ended(key, Duration::ZERO);
        redials.ended(key, Duration::ZERO);
        assert_eq!(
            redials.ended(key, REDIAL_RESET_AFTER),
            Some(REDIAL_FIRST),
            "a connection that worked starts the waits over"
        );
    }

    #[tokio::test]
    async fn no_bootstrap_and_not_public_is_refused() {
        let e = DhtConfig::new(&[], false, None, 8).await.unwrap_err();
        assert!(matches!(e, DhtConfigError::NoBootstrap), "{e}");
        assert!(e.to_string().contains("--bootstrap HOST:PORT"), "{e}");
    }

    #[tokio::test]
    async fn bootstrap_is_resolved_and_bind_defaults_to_every_interface() {
        let config = DhtConfig::new(&["127.0.0.1:49737".into()], false, None, 0)
            .await
            .unwrap();
        assert_eq!(config.bootstrap, vec!["127.0.0.1:49737".parse().unwrap()]);
        assert_eq!(config.bind, "0.0.0.0:0".parse().unwrap());
        assert_eq!(config.max_peers, 1);
    }

    #[tokio::test]
    async fn a_bind_address_that_cannot_be_bound_is_refused_at_start() {
        let bootstrap = ["127.0.0.1:49737".to_string()];
        let e = DhtConfig::new(&bootstrap, false, Some("localhost"), 8)
            .await
            .unwrap_err();
        assert!(matches!(e, DhtConfigError::BindAddress { .. }), "{e}");
        // TEST-NET-3: no interface of this machine holds it.
        let e = DhtConfig::new(&bootstrap, false, Some("203.0.113.7:0"), 8)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("pick another --dht-bind"), "{e}");
    }
}
