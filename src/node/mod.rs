//! The gateway node: one long-running process that holds a store, accepts peers
//! (`--listen`), dials configured peers with reconnect and backoff (`--peer`),
//! replicates live with all of them, and answers local clients over HTTP
//! (`--http`, see [`http`]).
//!
//! ## Tasks
//!
//! [`Node`] owns every task in one `JoinSet`: the accept loop (which owns its
//! sessions' tasks in turn), one task per dialed peer, and the HTTP server. One
//! `CancellationToken` stops them all: [`Node::shutdown`] cancels it, waits
//! (bounded) for every session to end with a reason, then flushes and closes the
//! store, which releases its lock. Channels are bounded; the session and dialer
//! events the tasks consume are advisory and never hold replication back.
//!
//! Two nodes that dial each other keep one session: see [`peers`]. Peers found
//! by the group alone (`--discover lan`) are dialed as [`discovery`] decides.

#[cfg(feature = "dht")]
pub mod dht;
pub mod discovery;
pub mod http;
pub mod mqtt;
pub mod peers;
pub mod web;

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use multifeed::{
    DialEvent, DialOptions, FeedKey, Multifeed, PreAuth, ReplicateOptions, ReplicationEvent,
    ReplicationSummary, Topics,
    replicate::{
        dialer::connect_tcp,
        preauth::{
            AdmissionAccount, ConnectionSlots, PeerAdmissions, PeerSlots, PreAuthLimits, SlotLimits,
        },
    },
};
use serde_json::json;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use self::{
    discovery::{Action, Discovery, PeerBook, Source, lan::LanConfig},
    peers::{Direction, NodeId, PeerState, PeerTable, Registry},
};
use crate::cli::{
    remote,
    report::{end_reason, say, summary_json, summary_text},
    store::Store,
};

/// How long shutdown waits for sessions to end cleanly before aborting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// A dialer's connect attempt waits in standby for as long as needed; the TCP
/// connect itself has its own timeout.
const STANDBY_FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);

/// What a node does; built from `serve`'s flags.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Accept peers here.
    pub listen: Option<String>,
    /// Dial these peers and keep dialing.
    pub peers: Vec<String>,
    /// Serve the HTTP API here.
    pub http: Option<String>,
    /// The bearer token the HTTP API requires (mandatory off loopback).
    pub token: Option<String>,
    /// Most accepted peers at once.
    pub max_peers: usize,
    /// Time allowed to connect and to complete a handshake.
    pub timeout: Duration,
    /// Print JSON lines.
    pub json: bool,
    /// Print no line per peer event.
    pub quiet: bool,
    /// Rename this gateway (its feeds carry the name to peers).
    pub name: Option<String>,
    /// MQTT ingest (`--mqtt-listen` and its bounds).
    pub mqtt: mqtt::MqttConfig,
    /// What peers' offers may cost (`--max-unproven-feeds` and the like).
    pub caps: AdmissionCaps,
    /// Find peers of the group on the local network (`--discover lan`).
    pub lan: Option<LanConfig>,
    /// Find peers on the Hyperswarm DHT (`--discover dht`).
    #[cfg(feature = "dht")]
    pub dht: Option<dht::DhtConfig>,
}

/// Caps on what a peer's offer of feeds may cost us: the library's admission
/// settings that `serve` and `sync` take as flags. Defaults are the library's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionCaps {
    /// [`ReplicateOptions::max_offered_feeds`]: most feeds one peer may offer.
    pub max_offered_feeds: usize,
    /// [`ReplicateOptions::max_unproven_feeds`]: most feeds on trial per session,
    /// and per source address on a listening node.
    pub max_unproven_feeds: usize,
    /// [`ReplicateOptions::max_waiting_feeds`]: most offered feeds requested and
    /// waiting for a place on trial, per session.
    pub max_waiting_feeds: usize,
    /// [`multifeed::Options::max_unproven_feeds`]: most feeds on trial over all
    /// sessions of the group.
    pub group_max_unproven_feeds: usize,
}

impl Default for AdmissionCaps {
    fn default() -> Self {
        // Either side's defaults: the caps do not depend on who dialed.
        let session = ReplicateOptions::new(true);
        Self {
            max_offered_feeds: session.max_offered_feeds,
            max_unproven_feeds: session.max_unproven_feeds,
            max_waiting_feeds: session.max_waiting_feeds,
            group_max_unproven_feeds: multifeed::Options::default().max_unproven_feeds,
        }
    }
}

impl AdmissionCaps {
    /// `options` with this session's caps.
    pub fn apply(&self, options: ReplicateOptions) -> ReplicateOptions {
        options
            .max_offered_feeds(self.max_offered_feeds)
            .max_unproven_feeds(self.max_unproven_feeds)
            .max_waiting_feeds(self.max_waiting_feeds)
    }
}

/// Counters `/metrics` shows.
#[derive(Default)]
pub struct Metrics {
    pub published_messages: std::sync::atomic::AtomicU64,
    pub published_bytes: std::sync::atomic::AtomicU64,
    pub http_errors: std::sync::atomic::AtomicU64,
    pub mqtt: Arc<mqtt::MqttMetrics>,
    pub discovery: discovery::DiscoveryMetrics,
}

/// Compares secrets without leaking where the first difference is.
pub(crate) fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What every task of the node shares.
pub struct Shared {
    /// This gateway's name.
    pub gateway: String,
    pub group: Multifeed,
    pub topics: Topics,
    pub registry: Arc<Registry>,
    pub peers: PeerTable,
    pub metrics: Metrics,
    pub json: bool,
    /// No line per peer event (the demo runs nodes in its own process).
    pub quiet: bool,
    pub token: Option<String>,
    pub started_ms: u64,
    /// MQTT ingest runs (a listener or a broker client).
    pub mqtt: bool,
    /// Cancelled when the node stops: long-lived responses (SSE) end with it.
    pub stopping: CancellationToken,
    timeout: Duration,
    caps: AdmissionCaps,
}

impl Shared {
    fn replicate_options(&self, initiator: bool) -> ReplicateOptions {
        self.caps
            .apply(ReplicateOptions::new(initiator))
            .live(true)
            .handshake_timeout(self.timeout)
            .user_data(self.registry.own().hello())
    }
}

/// A node whose sockets are bound, not started yet.
pub struct Bound {
    store: Store,
    config: NodeConfig,
    listener: Option<TcpListener>,
    http: Option<TcpListener>,
    mqtt: Option<TcpListener>,
    id: NodeId,
}

impl Bound {
    /// Where peers will connect.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Where the HTTP API will answer.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Where MQTT clients connect.
    pub fn mqtt_addr(&self) -> Option<SocketAddr> {
        self.mqtt.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// This run's node id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Starts every task.
    pub fn start(self) -> Node {
        Node::spawn(self)
    }
}

/// A running node. Stop it with [`Node::shutdown`] (or [`Node::run`]).
pub struct Node {
    shared: Arc<Shared>,
    store: Store,
    tasks: JoinSet<()>,
    cancel: CancellationToken,
}

impl Node {
    /// Binds what `config` asks for; [`Bound::start`] then starts every task.
    /// On error the store is closed again.
    pub async fn bind(store: Store, config: NodeConfig) -> anyhow::Result<Bound> {
        let sockets = if config.lan.is_some() && config.listen.is_none() {
            Err(anyhow::anyhow!(
                "--discover lan announces this node's replication port: add --listen ADDR (e.g. 0.0.0.0:7000)"
            ))
        } else {
            Self::bind_sockets(&config).await
        };
        match sockets {
            Ok((listener, http, mqtt)) => {
                // Before anyone hears the node is up: the CLI finds its API by this file.
                if let Some(addr) = http.as_ref().and_then(|l| l.local_addr().ok())
                    && let Err(e) = remote::write_api_file(&store.dir, addr)
                {
                    // The node still runs; only the CLI's way in is missing.
                    tracing::warn!(
                        "{e:#}; commands like `multifeed read` on this store will say it is in use"
                    );
                }
                Ok(Bound {
                    store,
                    config,
                    listener,
                    http,
                    mqtt,
                    id: NodeId::random(),
                })
            }
            Err(e) => {
                store.close().await?;
                Err(e)
            }
        }
    }

    async fn bind_sockets(
        config: &NodeConfig,
    ) -> anyhow::Result<(
        Option<TcpListener>,
        Option<TcpListener>,
        Option<TcpListener>,
    )> {
        for peer in &config.peers {
            crate::resolve_addr(peer).await?;
        }
        let listener = match &config.listen {
            Some(listen) => Some(bind(listen, "peers").await?),
            None => None,
        };
        let http = match &config.http {
            Some(addr) => {
                let listener = bind(addr, "the HTTP API").await?;
                let local = listener.local_addr()?;
                if !local.ip().is_loopback() && config.token.is_none() {
                    anyhow::bail!(
                        "refusing to serve the HTTP API on {local} without a token: off loopback every request must carry the group's bearer token; run `multifeed join <key>` once to create the token file beside the key file, or bind to 127.0.0.1"
                    );
                }
                Some(listener)
            }
            // The CLI reaches a running node through its API (see `cli::remote`),
            // so there is always one, on loopback unless `--http` says otherwise.
            None => Some(bind("127.0.0.1:0", "the local API").await?),
        };
        if let Some(broker) = &config.mqtt.broker {
            mqtt::broker::check(broker).map_err(anyhow::Error::msg)?;
            for filter in &broker.filters {
                if let Some(reason) = mqtt::filter::filter_problem(filter) {
                    anyhow::bail!(
                        "--mqtt-subscribe {filter:?} is not a topic filter: {reason} (e.g. 'sensors/#')"
                    );
                }
            }
            if broker.filters.is_empty() {
                tracing::info!(
                    "no --mqtt-subscribe given: only the filters announced to the group are mirrored from the broker"
                );
            }
        }
        let rules = config.mqtt.rules();
        if let Some(reason) = mqtt::filter::topic_problem(&rules.announce_topic) {
            anyhow::bail!(
                "--mqtt-announce-topic {:?} cannot be a topic: {reason}",
                rules.announce_topic
            );
        }
        if let Some(prefix) = &config.mqtt.publish_remote {
            if let Some(reason) = mqtt::filter::topic_problem(prefix) {
                anyhow::bail!("--mqtt-publish-remote {prefix:?} cannot start a topic: {reason}");
            }
            if config.mqtt.listen.is_none() && config.mqtt.broker.is_none() {
                anyhow::bail!(
                    "--mqtt-publish-remote needs somewhere to publish: --mqtt-listen (to this node's MQTT clients) or --mqtt-broker"
                );
            }
            if mqtt::filter::is_under(&rules.announce_topic, prefix) {
                anyhow::bail!(
                    "--mqtt-publish-remote {prefix:?} would hold the announce topic {:?}; choose another prefix",
                    rules.announce_topic
                );
            }
        }
        let mqtt = match &config.mqtt.listen {
            Some(addr) => {
                let listener = bind(addr, "MQTT clients").await?;
                let local = listener.local_addr()?;
                if !local.ip().is_loopback() {
                    // As mosquitto 2 does: no anonymous clients from the network
                    // unless the operator says so.
                    if config.mqtt.allow_anonymous {
                        tracing::warn!(
                            "MQTT clients are accepted on {local} without authentication (--mqtt-allow-anonymous): anyone who reaches it can publish to the group's topics"
                        );
                    } else if config.token.is_none() {
                        anyhow::bail!(
                            "refusing to accept MQTT clients on {local} without a token: off loopback every client must send this gateway's token as its CONNECT password; run `multifeed join <key>` once to create the token file beside the key file, bind to 127.0.0.1, or accept anonymous clients on a trusted network with --mqtt-allow-anonymous"
                        );
                    }
                }
                Some(listener)
            }
            None => None,
        };
        Ok((listener, http, mqtt))
    }

    fn spawn(bound: Bound) -> Node {
        let Bound {
            store,
            config,
            listener,
            http,
            mqtt,
            id,
        } = bound;
        let cancel = CancellationToken::new();
        let http_addr = http.as_ref().and_then(|l| l.local_addr().ok());
        let listen_addr = listener.as_ref().and_then(|l| l.local_addr().ok());
        let shared = Arc::new(Shared {
            gateway: store.name.clone(),
            group: store.group.clone(),
            topics: store.topics.clone(),
            registry: Registry::new(id),
            peers: PeerTable::default(),
            metrics: Metrics::default(),
            json: config.json,
            quiet: config.quiet,
            // Loopback is this machine's own: only a bind beyond it needs the token.
            token: config
                .token
                .clone()
                .filter(|_| http_addr.is_some_and(|a| !a.ip().is_loopback())),
            started_ms: peers::now_ms(),
            mqtt: mqtt.is_some() || config.mqtt.broker.is_some(),
            stopping: cancel.clone(),
            timeout: config.timeout,
            caps: config.caps,
        });
        let mut tasks = JoinSet::new();
        if let Some(listener) = listener {
            tasks.spawn(accept_peers(
                shared.clone(),
                listener,
                config.max_peers.max(1),
                cancel.clone(),
            ));
        }
        for addr in config.peers {
            let target = DialTarget {
                label: addr.clone(),
                addrs: vec![addr],
                source: Source::Configured,
                node: None,
                lost: CancellationToken::new(),
            };
            let (shared, cancel) = (shared.clone(), cancel.clone());
            tasks.spawn(async move {
                dial_peer(shared, target, cancel).await;
            });
        }
        if let (Some(lan), Some(listen)) = (config.lan.clone(), listen_addr) {
            let (found, discoveries) = tokio::sync::mpsc::channel(64);
            let topic = store.group.shared_key().discovery_topic();
            let (own, stop) = (shared.registry.own(), cancel.clone());
            tasks.spawn(async move {
                if let Err(e) = discovery::lan::run(topic, own, listen, lan, found, stop).await {
                    tracing::warn!("{e}; peers are not looked for on the local network");
                }
            });
            tasks.spawn(discover(
                shared.clone(),
                discoveries,
                config.max_peers.max(1),
                cancel.clone(),
            ));
        }
        if let Some(http) = http {
            tasks.spawn(http::serve(shared.clone(), http, cancel.clone()));
        }
        #[cfg(feature = "dht")]
        if let Some(dht) = config.dht.clone() {
            tasks.spawn(dht::run_dht(shared.clone(), dht, cancel.clone()));
        }
        if mqtt.is_some() || config.mqtt.broker.is_some() {
            let mut mqtt_config = config.mqtt.clone();
            if let Some(broker) = &mut mqtt_config.broker
                && broker.client_id.is_empty()
            {
                broker.client_id = mqtt::broker_client_id(&store.dir);
            }
            // Off loopback, clients show the token (unless anonymous is accepted).
            let off_loopback = mqtt
                .as_ref()
                .and_then(|l| l.local_addr().ok())
                .is_some_and(|a| !a.ip().is_loopback());
            if off_loopback && !mqtt_config.allow_anonymous {
                mqtt_config.password = config.token.clone();
            }
            tasks.spawn(mqtt::serve(
                shared.topics.clone(),
                shared.metrics.mqtt.clone(),
                mqtt_config,
                mqtt,
                store.dir.clone(),
                cancel.clone(),
            ));
        }
        Node {
            shared,
            store,
            tasks,
            cancel,
        }
    }

    /// Runs until `stop` resolves (a signal), then shuts down.
    pub async fn run(mut self, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                Some(done) = self.tasks.join_next() => {
                    // A task ends early only on a failure it reported itself.
                    if let Err(e) = done {
                        tracing::error!("a node task failed: {e}");
                    }
                }
            }
        }
        self.shutdown().await
    }

    /// Stops accepting and dialing, ends every session with a reason, stops the
    /// HTTP API (after the requests in flight), then flushes and closes the store.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.cancel.cancel();
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while let Some(done) = self.tasks.join_next().await {
                if let Err(e) = done {
                    tracing::error!("a node task failed while stopping: {e}");
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                "sessions did not end within {SHUTDOWN_GRACE:?}; closing the store anyway"
            );
            self.tasks.shutdown().await;
        }
        drop(self.shared);
        // Before the lock goes: a node started next must not lose its file to ours.
        remote::remove_api_file(&self.store.dir);
        self.store.close().await
    }
}

async fn bind(addr: &str, what: &str) -> anyhow::Result<TcpListener> {
    let target = crate::resolve_addr(addr).await?;
    TcpListener::bind(target).await.with_context(|| {
        format!("cannot listen on {addr} for {what}; pick another port (or 0 for any free one)")
    })
}

/// Connections the node ended without a line each: counted, and logged once per
/// interval, so a flood of strangers cannot flood the log.
#[derive(Default)]
struct Quiet {
    /// Ended before proving they hold the key (silent, slow, too chatty, strangers).
    unauthenticated: AtomicU64,
    /// Members turned away because every peer slot was taken.
    busy: AtomicU64,
}

impl Quiet {
    fn report(&self, slots: &ConnectionSlots, max_peers: usize, over: Duration) {
        if let Some(refused) = slots.refusals_due() {
            tracing::warn!("{refused}");
        }
        let ended = self.unauthenticated.swap(0, Ordering::Relaxed);
        if ended > 0 {
            tracing::info!(
                "{ended} connections in the last {over:.0?} ended before proving they hold the key (not members, or too slow)"
            );
        }
        let busy = self.busy.swap(0, Ordering::Relaxed);
        if busy > 0 {
            tracing::warn!(
                "turned away {busy} members in the last {over:.0?}: all {max_peers} peer slots were taken (raise --max-peers if this machine can serve more)"
            );
        }
    }
}

/// What admits peers that connect to us (over TCP or the DHT): strangers wait for
/// their handshake in slots of their own; a member takes one of the `max_peers`
/// places only once it proved it holds the key; one address holds at most one
/// session's worth of the group's places on trial.
struct Admission {
    limits: SlotLimits,
    slots: ConnectionSlots,
    peer_slots: PeerSlots,
    admissions: PeerAdmissions,
    quiet: Arc<Quiet>,
}

impl Admission {
    fn new(shared: &Shared, max_peers: usize) -> Self {
        let limits = SlotLimits::default();
        Self {
            limits,
            slots: ConnectionSlots::new(limits),
            peer_slots: PeerSlots::new(max_peers),
            admissions: PeerAdmissions::new(shared.replicate_options(false).max_unproven_feeds),
            quiet: Arc::new(Quiet::default()),
        }
    }

    /// Ticks when refusals and quiet endings are due to be reported.
    fn report_tick(&self) -> tokio::time::Interval {
        tokio::time::interval(self.limits.report_interval)
    }

    fn report(&self) {
        self.quiet.report(
            &self.slots,
            self.peer_slots.max(),
            self.limits.report_interval,
        );
    }

    /// A stranger's slot and its address's account, unless its address has too
    /// many connections waiting (refusals are counted and reported on the tick).
    fn admit(&self, address: IpAddr) -> Option<(PreAuth, AdmissionAccount)> {
        let slot = self.slots.try_admit(address).ok()?;
        let pre_auth = PreAuth::with_peer_slots(PreAuthLimits::default(), self.peer_slots.clone())
            .with_slot(slot);
        Some((pre_auth, self.admissions.account(address)))
    }
}

async fn accept_peers(
    shared: Arc<Shared>,
    listener: TcpListener,
    max_peers: usize,
    cancel: CancellationToken,
) {
    let admission = Admission::new(&shared, max_peers);
    let mut report_tick = admission.report_tick();
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = report_tick.tick() => admission.report(),
            Some(done) = sessions.join_next(), if !sessions.is_empty() => {
                if let Err(e) = done {
                    tracing::warn!("a peer task failed: {e}");
                }
            }
            accepted = listener.accept() => {
                let (socket, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: pause instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some((pre_auth, account)) = admission.admit(peer.ip()) else {
                    drop(socket);
                    continue;
                };
                let _ = socket.set_nodelay(true);
                sessions.spawn(serve_peer(
                    shared.clone(),
                    socket,
                    peer,
                    Source::Inbound,
                    false,
                    pre_auth,
                    account,
                    admission.quiet.clone(),
                    cancel.clone(),
                ));
            }
        }
    }
    // Every session sees the same cancellation and ends with a reason.
    while let Some(done) = sessions.join_next().await {
        if let Err(e) = done {
            tracing::warn!("a peer task failed while stopping: {e}");
        }
    }
}

/// Running totals of one session's download or upload, from its progress reports.
#[derive(Default)]
struct Totals {
    per_feed: HashMap<FeedKey, (u64, u64)>,
}

impl Totals {
    /// Records a report; returns what it adds.
    fn on_progress(&mut self, key: FeedKey, blocks: u64, bytes: u64) -> (u64, u64) {
        let seen = self.per_feed.entry(key).or_default();
        let added = (blocks.saturating_sub(seen.0), bytes.saturating_sub(seen.1));
        *seen = (seen.0.max(blocks), seen.1.max(bytes));
        added
    }

    fn total(&self) -> (u64, u64) {
        self.per_feed
            .values()
            .fold((0, 0), |(a, b), (x, y)| (a + x, b + y))
    }
}

fn say_connected(shared: &Shared, peer: &str, direction: Direction) {
    if shared.quiet {
        return;
    }
    if shared.json {
        say!(
            "{}",
            json!({"event": "connected", "peer": peer, "direction": direction})
        );
    } else {
        say!("peer {peer} connected");
    }
}

fn say_synced(shared: &Shared, peer: &str, key: FeedKey) {
    if shared.quiet {
        return;
    }
    if shared.json {
        say!(
            "{}",
            json!({"event": "feed_synced", "peer": peer, "key": key.to_hex()})
        );
    } else {
        say!("peer {peer}: feed {} in sync", &key.to_hex()[..16]);
    }
}

/// Says how a session ended; `why` overrides the reason the result gives.
fn say_disconnected(
    shared: &Shared,
    peer: &str,
    result: Result<&ReplicationSummary, &multifeed::Error>,
    why: Option<(&'static str, String)>,
) {
    if shared.quiet {
        return;
    }
    let (code, words) = why.unwrap_or_else(|| end_reason(result));
    if shared.json {
        let mut line = match result {
            Ok(summary) => summary_json(peer, summary),
            Err(e) => json!({"peer": peer, "error": e.to_string()}),
        };
        line["event"] = json!("disconnected");
        line["reason"] = json!(code);
        say!("{line}");
    } else {
        match result {
            Ok(summary) => say!(
                "peer {peer} disconnected ({words}): {}",
                summary_text(summary)
            ),
            Err(_) => say!("peer {peer} disconnected ({words})"),
        }
    }
}

/// The reason given when this node ends a session on purpose.
fn local_reason(duplicate: bool, itself: bool) -> Option<(&'static str, String)> {
    if itself {
        Some((
            "self",
            "this node connected to itself; check the --peer addresses".into(),
        ))
    } else if duplicate {
        Some((
            "duplicate",
            "a second session with the same node; the one this node dialed is kept".into(),
        ))
    } else {
        None
    }
}

/// One accepted peer's live session, until it ends or the node stops. `initiator`:
/// the Noise role, which a DHT connection decides (an accepted socket responds).
#[allow(clippy::too_many_arguments)]
async fn serve_peer<S>(
    shared: Arc<Shared>,
    socket: S,
    peer: impl std::fmt::Display,
    source: Source,
    initiator: bool,
    pre_auth: PreAuth,
    admission_account: AdmissionAccount,
    quiet: Arc<Quiet>,
    cancel: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let peer = peer.to_string();
    let mut replication = shared.group.start_replication(
        socket,
        shared
            .replicate_options(initiator)
            .pre_auth(pre_auth.clone())
            .admission_account(admission_account),
    );
    // Until the peer proves it holds the key it gets no line and no row of its own:
    // anyone can connect, and a line per stranger would flood the log.
    let mut first = None;
    let authenticated = tokio::select! {
        biased;
        () = pre_auth.authenticated() => true,
        // No event comes before the group channel opens: `None` is the session's end.
        event = replication.next_event() => {
            first = event;
            first.is_some() || pre_auth.is_authenticated()
        }
        () = cancel.cancelled() => {
            replication.stop();
            false
        }
    };
    if !authenticated || pre_auth.busy().is_some() {
        let counter = if authenticated {
            &quiet.busy
        } else {
            &quiet.unauthenticated
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let result = replication.finish().await;
        tracing::debug!(%peer, ?result, "connection ended unheard");
        return;
    }
    // Holds the peer slot for as long as the session runs.
    let _pre_auth = pre_auth;
    let direction = if initiator {
        Direction::Dialed
    } else {
        Direction::Accepted
    };
    shared
        .peers
        .insert(&peer, &peer, direction, source, PeerState::Connected);
    shared.peers.update(&peer, |row| row.sessions = 1);
    say_connected(&shared, &peer, direction);
    let (duplicate_tx, mut duplicate_rx) = watch::channel(false);
    let mut _registered = None;
    let mut received = Totals::default();
    // The same running totals for what we send.
    let mut sent = Totals::default();
    let (mut duplicate, mut itself) = (false, false);
    loop {
        tokio::select! {
            event = async {
                match first.take() {
                    Some(event) => Some(event),
                    None => replication.next_event().await,
                }
            } => match event {
                None => break,
                Some(ReplicationEvent::Handshake { remote_user_data }) => {
                    let Some(remote) = NodeId::from_hello(remote_user_data.as_deref()) else {
                        continue;
                    };
                    shared.peers.update(&peer, |row| row.node = Some(remote.to_string()));
                    if remote == shared.registry.own() {
                        itself = true;
                        replication.stop();
                        break;
                    }
                    // A session this node opened (over the DHT) counts as dialed: of
                    // two nodes that reached each other both ways, both keep the one
                    // the smaller node opened.
                    _registered = Some(if initiator {
                        (None, Some(shared.registry.dialed(remote)))
                    } else {
                        (Some(shared.registry.accepted(remote, duplicate_tx.clone())), None)
                    });
                }
                Some(ReplicationEvent::FeedSynced { key }) => say_synced(&shared, &peer, key),
                Some(ReplicationEvent::Progress { key, blocks, bytes }) => {
                    let (blocks, bytes) = received.on_progress(key, blocks, bytes);
                    shared.peers.update(&peer, |row| {
                        row.blocks_received += blocks;
                        row.bytes_received += bytes;
                    });
                }
                Some(ReplicationEvent::Uploaded { key, blocks, bytes }) => {
                    let (blocks, bytes) = sent.on_progress(key, blocks, bytes);
                    shared.peers.update(&peer, |row| {
                        row.blocks_sent += blocks;
                        row.bytes_sent += bytes;
                    });
                }
                Some(event) => tracing::debug!(%peer, ?event, "replication"),
            },
            Ok(()) = duplicate_rx.changed() => {
                if *duplicate_rx.borrow() {
                    duplicate = true;
                    replication.stop();
                    break;
                }
            }
            () = cancel.cancelled() => {
                replication.stop();
                break;
            }
        }
    }
    let mut result = replication.finish().await;
    if let Ok(summary) = &mut result {
        let (blocks, bytes) = received.total();
        summary.blocks_received = summary.blocks_received.max(blocks);
        summary.bytes_received = summary.bytes_received.max(bytes);
    }
    say_disconnected(
        &shared,
        &peer,
        result.as_ref(),
        local_reason(duplicate, itself),
    );
    shared.peers.remove(&peer);
}

/// Connects to the first of `addrs` that answers, each within `timeout`.
async fn connect(
    addrs: &[String],
    timeout: Duration,
) -> io::Result<(TcpStream, Option<SocketAddr>)> {
    let mut last = io::Error::new(io::ErrorKind::AddrNotAvailable, "no address to dial");
    for addr in addrs {
        let attempt = tokio::time::timeout(timeout, connect_tcp(addr)).await;
        match attempt {
            Ok(Ok(connected)) => return Ok(connected),
            Ok(Err(e)) => last = e,
            Err(_) => {
                last = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {timeout:?}"),
                )
            }
        }
    }
    Err(last)
}

/// A peer to dial and keep dialing.
struct DialTarget {
    /// Its row in `/peers`: the configured address, or the first one found.
    label: String,
    /// Tried in turn at each attempt.
    addrs: Vec<String>,
    source: Source,
    /// The node announced there, for a discovered peer: its session is only
    /// added where no other session with that node runs, and yields to others.
    node: Option<NodeId>,
    /// Cancelled when the peer's announcement was withdrawn: the dialer ends
    /// once no session runs.
    lost: CancellationToken,
}

/// Keeps the discovered peers dialed as the [`PeerBook`] decides: one dialer per
/// remote node, none after a refusal, at most `max_dialers` at once.
async fn discover(
    shared: Arc<Shared>,
    mut discoveries: tokio::sync::mpsc::Receiver<Discovery>,
    max_dialers: usize,
    cancel: CancellationToken,
) {
    let mut book = PeerBook::new(shared.registry.own(), max_dialers);
    let metrics = &shared.metrics.discovery;
    let mut dialers: JoinSet<(NodeId, bool)> = JoinSet::new();
    let mut lost: HashMap<NodeId, CancellationToken> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let now = tokio::time::Instant::now();
        let actions = tokio::select! {
            () = cancel.cancelled() => break,
            discovery = discoveries.recv() => match discovery {
                Some(discovery) => {
                    let counter = match discovery {
                        Discovery::Found { .. } => &metrics.announcements,
                        Discovery::Lost { .. } => &metrics.withdrawals,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    book.on_discovery(discovery, now)
                }
                None => break,
            },
            Some(ended) = dialers.join_next() => match ended {
                Ok((node, refused)) => {
                    lost.remove(&node);
                    metrics.dialers.fetch_sub(1, Ordering::Relaxed);
                    if refused {
                        metrics.refusals.fetch_add(1, Ordering::Relaxed);
                    }
                    book.dial_ended(node, refused, now)
                }
                Err(e) => {
                    tracing::warn!("a discovered peer's dialer failed: {e}");
                    Vec::new()
                }
            },
            _ = tick.tick() => book.tick(now, |node| shared.registry.has_session(node)),
        };
        for action in actions {
            match action {
                Action::Dial {
                    node,
                    addrs,
                    source,
                } => {
                    let token = CancellationToken::new();
                    lost.insert(node, token.clone());
                    metrics.dialers.fetch_add(1, Ordering::Relaxed);
                    let target = DialTarget {
                        label: addrs.first().map(|a| a.to_string()).unwrap_or_default(),
                        addrs: addrs.iter().map(|a| a.to_string()).collect(),
                        source,
                        node: Some(node),
                        lost: token,
                    };
                    let (shared, cancel) = (shared.clone(), cancel.clone());
                    dialers.spawn(async move {
                        let refused = dial_peer(shared.clone(), target, cancel).await;
                        (node, refused)
                    });
                }
                Action::Stop { node } => {
                    if let Some(token) = lost.get(&node) {
                        token.cancel();
                    }
                }
            }
        }
    }
    while let Some(ended) = dialers.join_next().await {
        if let Err(e) = ended {
            tracing::warn!("a discovered peer's dialer failed while stopping: {e}");
        }
    }
}

/// One peer: dial, replicate live, and after any loss dial again with backoff,
/// until the node stops, the peer's announcement is withdrawn (with no session
/// up), or the peer refuses us for good. Returns whether it refused us.
async fn dial_peer(shared: Arc<Shared>, target: DialTarget, cancel: CancellationToken) -> bool {
    let DialTarget {
        label: addr,
        addrs,
        source,
        node: announced,
        lost,
    } = target;
    // Its row in `/peers`: a discovered node's is its own, apart from a
    // configured peer's at the same address.
    let row = match announced {
        Some(node) => format!("{source:?} {node}"),
        None => addr.clone(),
    };
    shared.peers.insert(
        &row,
        &addr,
        Direction::Dialed,
        source,
        PeerState::Connecting,
    );
    // The node at `addr`, once a session told us; it decides standby.
    let target: Arc<Mutex<Option<NodeId>>> = Arc::new(Mutex::new(announced));
    let discovered = announced.is_some();
    let addrs = Arc::new(addrs);
    let connect_once = {
        let (shared, target, row) = (shared.clone(), target.clone(), row.clone());
        move || {
            let (shared, target, row, addrs) =
                (shared.clone(), target.clone(), row.clone(), addrs.clone());
            async move {
                let remote = *target.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(remote) = remote {
                    if discovered && shared.registry.has_session(remote) {
                        shared.peers.set_state(&row, PeerState::Standby);
                        shared.registry.until_no_session(remote).await;
                    } else if shared.registry.must_stand_by(remote) {
                        shared.peers.set_state(&row, PeerState::Standby);
                        shared.registry.stand_by(remote).await;
                    }
                }
                shared.peers.set_state(&row, PeerState::Connecting);
                connect(&addrs, shared.timeout).await
            }
        }
    };
    let mut dialer = shared.group.dial_with(
        connect_once,
        DialOptions::default()
            .connect_timeout(STANDBY_FOREVER)
            .replicate(shared.replicate_options(true)),
    );
    let mut registered = None;
    let mut received = Totals::default();
    // The same running totals for what we send.
    let mut sent = Totals::default();
    let mut stopping = false;
    let (mut connected, mut withdrawn, mut refused) = (false, false, false);
    // Set when a discovered session yields to another session with its node.
    let (yield_switch, mut must_yield) = watch::channel(false);
    loop {
        let event = tokio::select! {
            Ok(()) = must_yield.changed(), if !stopping && *must_yield.borrow() => {
                dialer.stop();
                stopping = true;
                continue;
            }
            event = dialer.next_event() => match event {
                Some(event) => event,
                None => break,
            },
            () = cancel.cancelled(), if !stopping => {
                dialer.stop();
                stopping = true;
                continue;
            }
            () = lost.cancelled(), if !stopping && !withdrawn => {
                // A live session runs to its end; no new attempt after it.
                withdrawn = true;
                if !connected {
                    dialer.stop();
                    stopping = true;
                }
                continue;
            }
        };
        match event {
            // The connect step itself says connecting or standby.
            DialEvent::Connecting { .. } => {}
            DialEvent::ConnectFailed { error, retry_in } => {
                shared.peers.set_state(&row, PeerState::Retrying);
                shared.peers.update(&row, |row| {
                    row.last_error = Some(format!(
                        "cannot connect: {error}; retrying in {:.1} s",
                        retry_in.as_secs_f64()
                    ));
                });
            }
            DialEvent::Connected { .. } => {
                connected = true;
                received = Totals::default();
                sent = Totals::default();
                shared.peers.set_state(&row, PeerState::Connected);
                shared.peers.update(&row, |row| row.sessions += 1);
                say_connected(&shared, &addr, Direction::Dialed);
            }
            DialEvent::Replication(ReplicationEvent::Handshake { remote_user_data }) => {
                if let Some(remote) = NodeId::from_hello(remote_user_data.as_deref()) {
                    *target.lock().unwrap_or_else(|e| e.into_inner()) = Some(remote);
                    shared
                        .peers
                        .update(&row, |row| row.node = Some(remote.to_string()));
                    let own = remote == shared.registry.own();
                    if !own && discovered {
                        registered = shared
                            .registry
                            .dialed_discovered(remote, yield_switch.clone());
                        if registered.is_none() && !stopping {
                            // Another session with that node is up already.
                            dialer.stop();
                            stopping = true;
                        }
                    } else if !own {
                        registered = Some(shared.registry.dialed(remote));
                    }
                }
            }
            DialEvent::Replication(ReplicationEvent::FeedSynced { key }) => {
                say_synced(&shared, &addr, key);
            }
            DialEvent::Replication(ReplicationEvent::Progress { key, blocks, bytes }) => {
                let (blocks, bytes) = received.on_progress(key, blocks, bytes);
                shared.peers.update(&row, |row| {
                    row.blocks_received += blocks;
                    row.bytes_received += bytes;
                });
            }
            DialEvent::Replication(ReplicationEvent::Uploaded { key, blocks, bytes }) => {
                let (blocks, bytes) = sent.on_progress(key, blocks, bytes);
                shared.peers.update(&row, |row| {
                    row.blocks_sent += blocks;
                    row.bytes_sent += bytes;
                });
            }
            DialEvent::SessionEnded {
                result, retry_in, ..
            } => {
                registered = None;
                connected = false;
                if withdrawn && !stopping {
                    dialer.stop();
                    stopping = true;
                }
                let state = if retry_in.is_some() {
                    PeerState::Retrying
                } else {
                    PeerState::Stopped
                };
                shared.peers.set_state(&row, state);
                let result = result.as_ref().map_err(|e| e.as_ref());
                let (_, words) = end_reason(result);
                // What the live reports did not count yet (a last batch).
                let (counted_blocks, counted_bytes) = sent.total();
                shared.peers.update(&row, |row| {
                    if let Ok(summary) = result {
                        row.blocks_sent += summary.blocks_sent.saturating_sub(counted_blocks);
                        row.bytes_sent += summary.bytes_sent.saturating_sub(counted_bytes);
                    }
                    if result.is_err() {
                        row.last_error = Some(words);
                    }
                });
                say_disconnected(&shared, &addr, result, None);
            }
            DialEvent::GaveUp { error } => {
                refused = true;
                shared.peers.set_state(&row, PeerState::Refused);
                shared
                    .peers
                    .update(&row, |row| row.last_error = Some(error.to_string()));
            }
            other => tracing::debug!(peer = %addr, ?other, "dialer"),
        }
    }
    drop(registered);
    if let Err(e) = dialer.finish().await {
        tracing::warn!(peer = %addr, "gave up dialing: {e}");
        if shared.json {
            say!(
                "{}",
                json!({"event": "gave_up", "peer": addr, "error": e.to_string()})
            );
        } else {
            say!("gave up dialing {addr}: {e}");
        }
        refused = true;
    }
    // A discovered peer's row goes with its dialer, unless it shows a refusal.
    if source != Source::Configured && !refused {
        shared.peers.remove(&row);
    }
    refused
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
        assert!(!same_secret(b"", b"a"));
    }
}
