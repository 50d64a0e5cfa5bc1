//! The network commands: `serve` and `sync`.

use std::{
    collections::{HashMap, HashSet},
    io::IsTerminal,
    time::Duration,
};

use multifeed::{
    DialEvent, DialOptions, Dialer, Error, FeedKey, Multifeed, ReplicateOptions, ReplicationEvent,
    ReplicationSummary, SessionEnd,
};
use serde_json::json;
use tokio::net::TcpStream;

use super::{
    output,
    progress::{self, Settled, Tally},
    report::{DialReport, say, summary_json, summary_text, tell},
    signal::{Interrupted, Signal, shutdown_signal},
    store,
};
use crate::{
    Global,
    node::{AdmissionCaps, Node, NodeConfig},
};

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
        // The OS error stays in the chain (said once): `--json` tells its kind.
        Ok(Err(e)) => {
            let words = format!(
                "cannot reach the peer at {addr}: {e}; check that `multifeed serve` runs there and the address and port are right"
            );
            Err(anyhow::Error::new(e).context(words))
        }
        Err(_) => Err(anyhow::Error::new(std::io::Error::from(
            std::io::ErrorKind::TimedOut,
        ))
        .context(format!(
            "cannot reach the peer at {addr}: no answer within {timeout_secs} s; check the address, the network and any firewall"
        ))),
    }
}

/// Replicates live with the peer at `addr`, reconnecting after every loss until
/// stopped. The address must resolve now; reaching it may wait.
pub async fn dial(
    group: &Multifeed,
    addr: &str,
    timeout_secs: u64,
    caps: &AdmissionCaps,
) -> anyhow::Result<Dialer> {
    crate::resolve_addr(addr).await?;
    let timeout = Duration::from_secs(timeout_secs);
    Ok(group.dial(
        addr,
        DialOptions::default()
            .connect_timeout(timeout)
            .replicate(caps.apply(ReplicateOptions::new(true).handshake_timeout(timeout))),
    ))
}

/// The error a dialer gave up with, for the user.
pub fn gave_up(addr: &str, error: multifeed::Error) -> anyhow::Error {
    anyhow::anyhow!("replication with {addr} refused: {error}")
}

/// A session's error, for the user of `sync`: our words, and the library's
/// error kept for `--json` to name its kind.
#[derive(Debug)]
pub struct SyncFailed {
    words: String,
    pub error: multifeed::Error,
}

impl std::fmt::Display for SyncFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.words)
    }
}

impl std::error::Error for SyncFailed {}

fn sync_failed(addr: &str, error: multifeed::Error) -> anyhow::Error {
    let words = match &error {
        Error::ServerBusy { max_peers } => format!(
            "the server at {addr} is full (it serves {max_peers} peers at once); try again later, or use `sync --live`, which retries by itself"
        ),
        error => format!("sync with {addr} failed: {error}"),
    };
    SyncFailed { words, error }.into()
}

#[cfg(feature = "dht")]
fn dht_enabled(config: &NodeConfig) -> bool {
    config.dht.is_some()
}

#[cfg(not(feature = "dht"))]
fn dht_enabled(_: &NodeConfig) -> bool {
    false
}

/// Runs the gateway node (see [`crate::node`]) until Ctrl-C or SIGTERM.
pub async fn serve(global: &Global, mut config: NodeConfig) -> anyhow::Result<()> {
    if config.listen.is_none()
        && config.peers.is_empty()
        && config.http.is_none()
        && config.mqtt.listen.is_none()
        && config.mqtt.broker.is_none()
        && !dht_enabled(&config)
    {
        anyhow::bail!(
            "nothing to serve: give --listen ADDR to accept peers, --peer ADDR to dial one, --discover dht to find them, --http ADDR for the local API, --mqtt-listen ADDR for MQTT clients, or --mqtt-broker URL"
        );
    }
    let store = store::open_as(global, config.name.as_deref(), &config.caps).await?;
    if config.http.is_some() {
        config.token = match store::read_token_file(&store.dir) {
            Ok(token) => token,
            Err(e) => {
                store.close().await?;
                return Err(e);
            }
        };
    }
    let dir = store.dir.clone();
    let gateway = store.name.clone();
    // Installed before anyone hears the node is up: a SIGTERM right after its first
    // line or answer stops it cleanly.
    let stop = shutdown_signal();
    let bound = Node::bind(store, config).await?;
    let listening = bound.listen_addr().map(|a| a.to_string());
    let http = bound.http_addr().map(|a| a.to_string());
    let mqtt = bound.mqtt_addr().map(|a| a.to_string());
    if global.json {
        say!(
            "{}",
            json!({"listening": listening, "http": http, "mqtt": mqtt, "node": bound.id().to_string(), "dir": dir, "gateway": gateway})
        );
    } else {
        if let Some(addr) = &listening {
            say!("listening on {addr}");
        }
        if let Some(addr) = &http {
            say!("http api on http://{addr}");
        }
        say!("gateway {name}", name = output::printable(&gateway));
        if let Some(addr) = &mqtt {
            say!("mqtt on {addr}");
        }
    }
    // Peers connect and dial only once the addresses are out.
    bound
        .start()
        .run(async {
            stop.await;
        })
        .await?;
    if !global.json {
        tell!("stopped");
    }
    Ok(())
}

pub async fn sync(
    global: &Global,
    addr: &str,
    live: bool,
    timeout: u64,
    caps: &AdmissionCaps,
) -> anyhow::Result<()> {
    let store = store::open_as(global, None, caps).await?;
    let result = if live {
        sync_live(global, &store.group, addr, timeout, caps).await
    } else {
        sync_once(global, &store.group, addr, timeout, caps).await
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
    caps: &AdmissionCaps,
) -> anyhow::Result<()> {
    let mut tally = Tally::of(group).await;
    let socket = connect(addr, timeout).await?;
    let mut replication = group.start_replication(
        socket,
        caps.apply(ReplicateOptions::new(true).handshake_timeout(Duration::from_secs(timeout))),
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
    caps: &AdmissionCaps,
) -> anyhow::Result<()> {
    let mut dialer = dial(group, addr, timeout, caps).await?;
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
