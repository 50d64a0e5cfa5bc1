//! The network commands: `serve` and `sync`.

use std::{
    collections::{HashMap, HashSet},
    io::IsTerminal,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use multifeed::{
    DialEvent, DialOptions, Dialer, Error, FeedKey, Multifeed, PreAuth, ReplicateOptions,
    ReplicationEvent, ReplicationSummary, SessionEnd,
    replicate::preauth::{ConnectionSlots, PeerSlots, PreAuthLimits, SlotLimits},
};
use serde_json::json;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
};

use super::{
    output,
    progress::{self, Settled, Tally},
    report::{DialReport, end_reason, say, summary_json, summary_text, tell},
    signal::{Interrupted, Signal, shutdown_signal},
    store,
};
use crate::Global;

/// Connects to `addr` within `timeout_secs`, with errors that say what to do.
pub async fn connect(addr: &str, timeout_secs: u64) -> anyhow::Result<TcpStream> {
    let target = crate::resolve_addr(addr).await?;
    match tokio::time::timeout(
        Duration::from_secs(timeout_secs),
        TcpStream::connect(target),
    )
    .await
    {
        Ok(Ok(socket)) => {
            let _ = socket.set_nodelay(true);
            Ok(socket)
        }
        Ok(Err(e)) => Err(anyhow::anyhow!(
            "cannot reach the peer at {addr}: {e}; check that `multifeed serve` runs there and the address and port are right"
        )),
        Err(_) => Err(anyhow::anyhow!(
            "cannot reach the peer at {addr}: no answer within {timeout_secs} s; check the address, the network and any firewall"
        )),
    }
}

/// Replicates live with the peer at `addr`, reconnecting after every loss until
/// stopped. The address must resolve now; reaching it may wait.
pub async fn dial(group: &Multifeed, addr: &str, timeout_secs: u64) -> anyhow::Result<Dialer> {
    crate::resolve_addr(addr).await?;
    let timeout = Duration::from_secs(timeout_secs);
    Ok(group.dial(
        addr,
        DialOptions::default()
            .connect_timeout(timeout)
            .replicate(ReplicateOptions::new(true).handshake_timeout(timeout)),
    ))
}

/// The error a dialer gave up with, for the user.
pub fn gave_up(addr: &str, error: multifeed::Error) -> anyhow::Error {
    anyhow::anyhow!("replication with {addr} refused: {error}")
}

/// A session's error, for the user of `sync`.
fn sync_failed(addr: &str, error: multifeed::Error) -> anyhow::Error {
    match error {
        Error::ServerBusy { max_peers } => anyhow::anyhow!(
            "the server at {addr} is full (it serves {max_peers} peers at once); try again later, or use `sync --live`, which retries by itself"
        ),
        error => anyhow::anyhow!("sync with {addr} failed: {error}"),
    }
}

/// Connections `serve` ended without a line each: counted, and logged once per
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

pub async fn serve(global: &Global, listen: &str, max_peers: usize) -> anyhow::Result<()> {
    let addr = crate::resolve_addr(listen).await?;
    let store = store::open(global).await?;
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            store.close().await?;
            return Err(anyhow::anyhow!(
                "cannot listen on {listen}: {e}; pick another port (or 0 for any free one)"
            ));
        }
    };
    let bound = listener.local_addr()?;
    if global.json {
        say!(
            "{}",
            json!({"listening": bound.to_string(), "dir": store.dir})
        );
    } else {
        say!("listening on {bound}");
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    // Strangers wait for their handshake in slots of their own; a member takes one of
    // the `max_peers` places only once it proved it holds the key.
    let slot_limits = SlotLimits::default();
    let slots = ConnectionSlots::new(slot_limits);
    let peer_slots = PeerSlots::new(max_peers);
    let quiet = Arc::new(Quiet::default());
    let mut report_tick = tokio::time::interval(slot_limits.report_interval);
    let mut peers = JoinSet::new();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = report_tick.tick() => quiet.report(&slots, peer_slots.max(), slot_limits.report_interval),
            Some(done) = peers.join_next(), if !peers.is_empty() => {
                if let Err(e) = done {
                    tracing::warn!("a peer task failed: {e}");
                }
            }
            accepted = listener.accept() => {
                let (socket, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        continue;
                    }
                };
                // Refusals are counted by the slots and reported on the tick.
                let Ok(slot) = slots.try_admit(peer.ip()) else {
                    drop(socket);
                    continue;
                };
                let _ = socket.set_nodelay(true);
                let pre_auth = PreAuth::with_peer_slots(PreAuthLimits::default(), peer_slots.clone())
                    .with_slot(slot);
                let group = store.group.clone();
                let stop = stop_rx.clone();
                let json = global.json;
                let quiet = quiet.clone();
                peers.spawn(async move {
                    serve_peer(group, socket, peer, pre_auth, stop, json, &quiet).await;
                });
            }
        }
    }
    // Stop every session cleanly, then close the group.
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        while peers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        peers.abort_all();
    }
    store.close().await?;
    if !global.json {
        tell!("stopped");
    }
    Ok(())
}

async fn serve_peer(
    group: Multifeed,
    socket: TcpStream,
    peer: SocketAddr,
    pre_auth: PreAuth,
    mut stop: watch::Receiver<bool>,
    json: bool,
    quiet: &Quiet,
) {
    let peer = peer.to_string();
    let mut replication = group.start_replication(
        socket,
        ReplicateOptions::new(false)
            .live(true)
            .pre_auth(pre_auth.clone()),
    );
    // Until the peer proves it holds the key it gets no line of its own: anyone can
    // connect, and a line per stranger would flood the log.
    let authenticated = tokio::select! {
        biased;
        _ = pre_auth.authenticated() => true,
        // No event comes before the group channel opens: `None` is the session's end.
        event = replication.next_event() => event.is_some() || pre_auth.is_authenticated(),
        _ = stop.changed() => {
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
    drop(pre_auth);
    if json {
        say!("{}", json!({"event": "connected", "peer": peer}));
    } else {
        say!("peer {peer} connected");
    }
    // A live session's summary counts only feed channels that finished; what the
    // progress reports said counts too.
    let mut tally = Tally::default();
    loop {
        tokio::select! {
            event = replication.next_event() => match event {
                None => break,
                Some(ReplicationEvent::FeedSynced { key }) => {
                    if json {
                        say!("{}", json!({"event": "feed_synced", "peer": peer, "key": key.to_hex()}));
                    } else {
                        say!("peer {peer}: feed {} in sync", &key.to_hex()[..16]);
                    }
                }
                Some(ReplicationEvent::Progress { key, blocks, bytes }) => {
                    tally.on_progress(key, blocks, bytes);
                }
                Some(event) => tracing::debug!(%peer, ?event, "replication"),
            },
            _ = stop.changed() => {
                replication.stop();
                break;
            }
        }
    }
    let mut result = replication.finish().await;
    if let Ok(summary) = &mut result {
        let (blocks, bytes) = tally.received();
        summary.blocks_received = summary.blocks_received.max(blocks);
        summary.bytes_received = summary.bytes_received.max(bytes);
    }
    let (code, words) = end_reason(result.as_ref());
    if json {
        let mut line = match &result {
            Ok(summary) => summary_json(&peer, summary),
            Err(e) => json!({"peer": peer, "error": e.to_string()}),
        };
        line["event"] = json!("disconnected");
        line["reason"] = json!(code);
        say!("{line}");
    } else {
        match &result {
            Ok(summary) => say!(
                "peer {peer} disconnected ({words}): {}",
                summary_text(summary)
            ),
            Err(_) => say!("peer {peer} disconnected ({words})"),
        }
    }
}

pub async fn sync(global: &Global, addr: &str, live: bool, timeout: u64) -> anyhow::Result<()> {
    let store = store::open(global).await?;
    let result = if live {
        sync_live(global, &store.group, addr, timeout).await
    } else {
        sync_once(global, &store.group, addr, timeout).await
    };
    let closed = store.close().await;
    result.and(closed)
}

/// Prints a feed that reached sync (without a progress bar).
fn feed_synced(json: bool, key: FeedKey, received: (u64, u64)) {
    let (blocks, bytes) = received;
    if json {
        say!(
            "{}",
            json!({"event": "feed_synced", "key": key.to_hex(), "blocks": blocks, "bytes": bytes})
        );
    } else if blocks > 0 {
        tell!(
            "feed {} in sync ({blocks} blocks received, {})",
            &key.to_hex()[..16],
            output::bytes(bytes)
        );
    } else {
        tell!("feed {} in sync", &key.to_hex()[..16]);
    }
}

fn progress_json(key: FeedKey, blocks: u64, bytes: u64, tally: &Tally) -> serde_json::Value {
    let (total, total_bytes) = tally.received();
    json!({"event": "progress", "key": key.to_hex(), "blocks": blocks, "bytes": bytes,
           "received_blocks": total, "received_bytes": total_bytes, "expected_blocks": tally.expected()})
}

/// A bar on a terminal (and not with --json).
fn progress_bar(global: &Global) -> Option<indicatif::ProgressBar> {
    (std::io::stderr().is_terminal() && !global.json).then(progress::bar)
}

async fn sync_once(
    global: &Global,
    group: &Multifeed,
    addr: &str,
    timeout: u64,
) -> anyhow::Result<()> {
    let mut tally = Tally::of(group).await;
    let socket = connect(addr, timeout).await?;
    let mut replication = group.start_replication(
        socket,
        ReplicateOptions::new(true).handshake_timeout(Duration::from_secs(timeout)),
    );
    let bar = progress_bar(global);
    let mut synced: HashSet<FeedKey> = HashSet::new();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut interrupted: Option<Signal> = None;
    loop {
        tokio::select! {
            event = replication.next_event() => {
                let Some(event) = event else { break };
                match event {
                    ReplicationEvent::RemoteFeeds { keys, lengths } => {
                        tally.on_remote_feeds(&keys, &lengths);
                    }
                    ReplicationEvent::Progress { key, blocks, bytes } => {
                        tally.on_progress(key, blocks, bytes);
                        if global.json {
                            say!("{}", progress_json(key, blocks, bytes, &tally));
                        }
                    }
                    ReplicationEvent::FeedSynced { key } => {
                        if synced.insert(key) && bar.is_none() {
                            feed_synced(global.json, key, tally.received_of(&key));
                        }
                    }
                    other => tracing::debug!(?other, "replication event"),
                }
                if let Some(bar) = &bar {
                    progress::show(bar, &tally);
                }
            }
            signal = &mut shutdown, if interrupted.is_none() => {
                replication.stop();
                interrupted = Some(signal);
            }
        }
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let summary = replication
        .finish()
        .await
        .map_err(|e| sync_failed(addr, e))?;
    if let Some(signal) = interrupted
        && summary.ended != SessionEnd::Completed
    {
        let mut settled = tally.settle(group).await;
        settled.bytes = settled.bytes.max(summary.bytes_received);
        return Err(interrupted_sync(global.json, addr, signal, &summary, settled).into());
    }
    if global.json {
        say!("{}", summary_json(addr, &summary));
    } else {
        say!("synced with {addr}: {}", summary_text(&summary));
    }
    Ok(())
}

fn interrupted_sync(
    json: bool,
    addr: &str,
    signal: Signal,
    summary: &ReplicationSummary,
    settled: Settled,
) -> Interrupted {
    if json {
        let mut line = summary_json(addr, summary);
        line["event"] = json!("interrupted");
        line["signal"] = json!(signal.to_string());
        line["blocks_received"] = json!(settled.blocks);
        line["bytes_received"] = json!(settled.bytes);
        line["blocks_missing"] = json!(settled.missing);
        say!("{line}");
    }
    let missing = if settled.missing > 0 {
        format!(
            "{} blocks the peer announced are still missing",
            settled.missing
        )
    } else {
        "every block the peer announced is here, but the peer may not hold all of ours".into()
    };
    Interrupted {
        signal,
        report: format!(
            "received {} blocks ({}) before stopping, {missing}; what arrived is kept, run `multifeed sync {addr}` again to finish",
            settled.blocks,
            output::bytes(settled.bytes),
        ),
    }
}

async fn sync_live(
    global: &Global,
    group: &Multifeed,
    addr: &str,
    timeout: u64,
) -> anyhow::Result<()> {
    let mut dialer = dial(group, addr, timeout).await?;
    let mut report = DialReport::new(addr, global.json);
    // Per session: what is expected and what arrived; feeds already reported in sync.
    let mut tally = Tally::default();
    let mut synced: HashSet<FeedKey> = HashSet::new();
    // Per session: what each feed's last line reported.
    let mut printed: HashMap<FeedKey, (u64, u64)> = HashMap::new();
    let bar = progress_bar(global);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut stopping = false;
    loop {
        let event = tokio::select! {
            event = dialer.next_event() => match event {
                Some(event) => event,
                None => break,
            },
            _ = &mut shutdown, if !stopping => {
                dialer.stop();
                stopping = true;
                continue;
            }
        };
        if let Some(bar) = &bar {
            bar.suspend(|| report.event(&event));
        } else {
            report.event(&event);
        }
        match event {
            DialEvent::Connected { .. } => {
                tally = Tally::of(group).await;
                printed.clear();
            }
            DialEvent::Replication(ReplicationEvent::RemoteFeeds { keys, lengths }) => {
                tally.on_remote_feeds(&keys, &lengths);
            }
            DialEvent::Replication(ReplicationEvent::Progress { key, blocks, bytes }) => {
                tally.on_progress(key, blocks, bytes);
                if global.json {
                    say!("{}", progress_json(key, blocks, bytes, &tally));
                } else if bar.is_none() && tally.caught_up(&key) {
                    // A line once a feed has what the peer announced, then one per
                    // live update.
                    let now = tally.received_of(&key);
                    let shown = printed.insert(key, now).unwrap_or_default();
                    tell!(
                        "feed {}: received {} blocks ({})",
                        &key.to_hex()[..16],
                        now.0.saturating_sub(shown.0),
                        output::bytes(now.1.saturating_sub(shown.1))
                    );
                }
            }
            DialEvent::Replication(ReplicationEvent::FeedSynced { key })
                if synced.insert(key) && bar.is_none() =>
            {
                feed_synced(global.json, key, tally.received_of(&key));
            }
            _ => {}
        }
        if let Some(bar) = &bar {
            progress::show(bar, &tally);
        }
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let summary = dialer.finish().await.map_err(|e| gave_up(addr, e))?;
    if global.json {
        say!(
            "{}",
            json!({"event": "stopped", "peer": addr, "sessions": summary.sessions,
                   "attempts": summary.attempts, "blocks_received": summary.blocks_received,
                   "bytes_received": summary.bytes_received, "blocks_sent": summary.blocks_sent,
                   "bytes_sent": summary.bytes_sent, "feeds_learnt": summary.feeds_learnt})
        );
    } else {
        say!(
            "stopped live sync with {addr}: received {} blocks ({}) over {} sessions",
            summary.blocks_received,
            output::bytes(summary.bytes_received),
            summary.sessions
        );
    }
    Ok(())
}
