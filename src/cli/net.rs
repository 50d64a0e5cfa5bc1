//! The network commands: `serve` and `sync`.

use std::{collections::HashSet, io::IsTerminal, net::SocketAddr, sync::Arc, time::Duration};

use multifeed::{
    FeedKey, Multifeed, ReplicateOptions, Replication, ReplicationEvent, ReplicationSummary,
};
use serde_json::json;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
    task::JoinSet,
};

use super::{commands::open, output};
use crate::Global;

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

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

/// Starts live replication with the peer at `addr`.
pub async fn connect_live(
    group: &Multifeed,
    addr: &str,
    timeout_secs: u64,
) -> anyhow::Result<Replication> {
    let socket = connect(addr, timeout_secs).await?;
    Ok(group.start_replication(
        socket,
        ReplicateOptions::new(true)
            .live(true)
            .handshake_timeout(Duration::from_secs(timeout_secs)),
    ))
}

fn summary_json(peer: &str, s: &ReplicationSummary) -> serde_json::Value {
    json!({
        "peer": peer,
        "feeds_learnt": s.feeds_learnt,
        "feeds_synced": s.feeds_synced,
        "blocks_received": s.blocks_received,
        "bytes_received": s.bytes_received,
        "blocks_sent": s.blocks_sent,
        "bytes_sent": s.bytes_sent,
    })
}

fn summary_text(s: &ReplicationSummary) -> String {
    format!(
        "received {} blocks ({}), sent {} blocks ({}), learnt {} feeds, {} feeds in sync",
        s.blocks_received,
        output::bytes(s.bytes_received),
        s.blocks_sent,
        output::bytes(s.bytes_sent),
        s.feeds_learnt,
        s.feeds_synced
    )
}

/// Prints a line on stdout. A long-running `serve` must not die because whoever
/// read its output went away (println! panics on a broken pipe).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

pub async fn serve(global: &Global, listen: &str, max_peers: usize) -> anyhow::Result<()> {
    let addr = crate::resolve_addr(listen).await?;
    let store = open(global).await?;
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
    let permits = Arc::new(Semaphore::new(max_peers.max(1)));
    let mut peers = JoinSet::new();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
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
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, max_peers, "too many peers; refusing");
                    drop(socket);
                    continue;
                };
                let _ = socket.set_nodelay(true);
                let group = store.group.clone();
                let stop = stop_rx.clone();
                let json = global.json;
                peers.spawn(async move {
                    serve_peer(group, socket, peer, stop, json).await;
                    drop(permit);
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
        eprintln!("stopped");
    }
    Ok(())
}

async fn serve_peer(
    group: Multifeed,
    socket: TcpStream,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
    json: bool,
) {
    let peer = peer.to_string();
    if json {
        say!("{}", json!({"event": "connected", "peer": peer}));
    } else {
        say!("peer {peer} connected");
    }
    let mut replication = group.start_replication(socket, ReplicateOptions::new(false).live(true));
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
                Some(event) => tracing::debug!(%peer, ?event, "replication"),
            },
            _ = stop.changed() => {
                replication.stop();
                break;
            }
        }
    }
    match replication.finish().await {
        Ok(summary) => {
            if json {
                let mut line = summary_json(&peer, &summary);
                line["event"] = json!("disconnected");
                say!("{line}");
            } else {
                say!("peer {peer} disconnected: {}", summary_text(&summary));
            }
        }
        // A peer that goes away without finishing.
        Err(multifeed::Error::ConnectionLost { .. }) => {
            if json {
                say!("{}", json!({"event": "disconnected", "peer": peer}));
            } else {
                say!("peer {peer} disconnected");
            }
        }
        Err(e) => {
            if json {
                say!(
                    "{}",
                    json!({"event": "error", "peer": peer, "error": e.to_string()})
                );
            } else {
                say!("peer {peer}: {e}");
            }
        }
    }
}

pub async fn sync(global: &Global, addr: &str, live: bool, timeout: u64) -> anyhow::Result<()> {
    let store = open(global).await?;
    let result = sync_inner(global, &store.group, addr, live, timeout).await;
    let closed = store.close().await;
    let summary = result?;
    closed?;
    if global.json {
        say!("{}", summary_json(addr, &summary));
    } else {
        say!("synced with {addr}: {}", summary_text(&summary));
    }
    Ok(())
}

async fn sync_inner(
    global: &Global,
    group: &Multifeed,
    addr: &str,
    live: bool,
    timeout: u64,
) -> anyhow::Result<ReplicationSummary> {
    let socket = connect(addr, timeout).await?;
    let mut replication = group.start_replication(
        socket,
        ReplicateOptions::new(true)
            .live(live)
            .handshake_timeout(Duration::from_secs(timeout)),
    );
    let bar = (std::io::stdout().is_terminal() && !global.json).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} feeds  {msg}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    });
    let mut synced: HashSet<FeedKey> = HashSet::new();
    let mut per_feed: std::collections::HashMap<FeedKey, (u64, u64)> = Default::default();
    // Feeds either side holds: the length of the progress bar.
    let mut expected: HashSet<FeedKey> = group.feeds().iter().map(|f| f.key()).collect();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            event = replication.next_event() => {
                let Some(event) = event else { break };
                match event {
                    ReplicationEvent::RemoteFeeds { keys, .. } => {
                        expected.extend(keys.iter().copied());
                        if let Some(bar) = &bar {
                            bar.set_length(expected.len() as u64);
                        }
                    }
                    ReplicationEvent::Progress { key, blocks, bytes } => {
                        per_feed.insert(key, (blocks, bytes));
                        if let Some(bar) = &bar {
                            let (b, n) = per_feed.values().fold((0, 0), |a, v| (a.0 + v.0, a.1 + v.1));
                            bar.set_message(format!("{b} blocks, {}", output::bytes(n)));
                        }
                    }
                    ReplicationEvent::FeedSynced { key } => {
                        if synced.insert(key) {
                            let (blocks, bytes) = per_feed.get(&key).copied().unwrap_or_default();
                            match &bar {
                                Some(bar) => bar.set_position(synced.len() as u64),
                                None if global.json => say!(
                                    "{}",
                                    json!({"event": "feed_synced", "key": key.to_hex(), "blocks": blocks, "bytes": bytes})
                                ),
                                None if blocks > 0 => eprintln!(
                                    "feed {} in sync ({blocks} blocks received, {})",
                                    &key.to_hex()[..16],
                                    output::bytes(bytes)
                                ),
                                None => eprintln!("feed {} in sync", &key.to_hex()[..16]),
                            }
                        }
                    }
                    other => tracing::debug!(?other, "replication event"),
                }
            }
            () = &mut shutdown => {
                replication.stop();
                break;
            }
        }
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let peer = addr.to_owned();
    replication
        .finish()
        .await
        .map_err(|e| anyhow::anyhow!("sync with {peer} failed: {e}"))
}
