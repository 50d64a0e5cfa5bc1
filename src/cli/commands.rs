//! The local commands: init, join, write, read, topics, feeds, verify.

use anyhow::{Context, bail};
use futures::{FutureExt, StreamExt};
use multifeed::{
    FeedStatus, SharedKey,
    topics::{Cursor, Message},
};
use serde_json::json;
use tokio::io::AsyncBufReadExt;

use super::{
    net, output,
    report::{DialReport, tell},
    signal::shutdown_signal,
    store::{self, KeySource, Store, open},
};
use crate::Global;

/// Most messages published in one signed append when reading stdin.
const STDIN_BATCH: usize = 1024;
/// Messages fetched per read.
const READ_BATCH: usize = 1024;

pub async fn init(global: &Global) -> anyhow::Result<()> {
    let dir = store::resolve_dir(global.dir.as_deref())?;
    let key_file = store::key_file(&dir)?;
    if key_file.exists() || store::is_group_dir(&dir) {
        bail!(
            "{} already holds a group (or its key file {} exists); use another --dir to start a new group",
            dir.display(),
            key_file.display()
        );
    }
    let key = SharedKey::generate();
    let key_file = adopt_key(&dir, &key).await?;
    if global.json {
        println!(
            "{}",
            json!({"key": key.to_hex(), "dir": dir, "key_file": key_file, "group_id": store::group_id(&key)})
        );
    } else {
        println!("{}", key.to_hex());
        eprintln!(
            "new group in {}; its shared key (above) is in {} (mode 600).\nGive it to the other gateways: multifeed join <key>. Keep it secret: it admits a peer to the group.",
            dir.display(),
            key_file.display()
        );
    }
    Ok(())
}

/// Opens (creating) the store under `key`, then writes the key file beside it.
/// Opening checks the group id first, so a store of another group is refused
/// before any key file is written.
async fn adopt_key(dir: &std::path::Path, key: &SharedKey) -> anyhow::Result<std::path::PathBuf> {
    let store = Store::open(dir, key.clone(), KeySource::Flag).await?;
    store.close().await?;
    let key_file = store::write_key_file(dir, key)?;
    store::write_token_file(dir)?;
    Ok(key_file)
}

pub async fn join(global: &Global, key_text: &str) -> anyhow::Result<()> {
    let dir = store::resolve_dir(global.dir.as_deref())?;
    let key = SharedKey::from_hex(key_text.trim()).map_err(|_| {
        // Never echoed: a key with one character missing is still most of a secret.
        anyhow::anyhow!(
            "malformed shared key ({} characters): expected 64 hex characters as printed by `multifeed init`",
            key_text.trim().chars().count()
        )
    })?;
    let key_file = adopt_key(&dir, &key).await?;
    if global.json {
        println!(
            "{}",
            json!({"dir": dir, "key_file": key_file, "group_id": store::group_id(&key)})
        );
    } else {
        println!(
            "joined group {} in {} (key in {})",
            &store::group_id(&key)[..16],
            dir.display(),
            key_file.display()
        );
    }
    Ok(())
}

pub async fn write(
    global: &Global,
    topic: &str,
    message: Option<String>,
    content_type: Option<String>,
    quiet: bool,
) -> anyhow::Result<()> {
    let store = open(global).await?;
    let result = write_inner(&store, topic, message, content_type, quiet, global.json).await;
    let closed = store.close().await;
    result.and(closed)
}

async fn write_inner(
    store: &Store,
    topic: &str,
    message: Option<String>,
    content_type: Option<String>,
    quiet: bool,
    json: bool,
) -> anyhow::Result<()> {
    let make = |payload: String| {
        let m = Message::new(topic, payload);
        match &content_type {
            Some(ct) => m.with_content_type(ct.clone()),
            None => m,
        }
    };
    let print = |addresses: &[multifeed::topics::MessageAddress]| {
        if quiet {
            return;
        }
        for a in addresses {
            if json {
                println!("{}", json!({"address": a.to_string()}));
            } else {
                println!("{a}");
            }
        }
    };
    if let Some(message) = message {
        let address = store.topics.publish(make(message)).await?;
        print(&[address]);
        return Ok(());
    }
    // One message per non-empty stdin line, published in batches of what is
    // already available (at most STDIN_BATCH), so a slow producer's lines are
    // written as they come and a fast one's share signatures.
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut total = 0usize;
    loop {
        let Some(first) = lines.next_line().await.context("reading stdin")? else {
            break;
        };
        let mut batch = vec![first];
        let mut eof = false;
        while batch.len() < STDIN_BATCH {
            // `next_line` is cancel-safe: a line not yet complete stays buffered.
            match lines.next_line().now_or_never() {
                Some(Ok(Some(line))) => batch.push(line),
                Some(Ok(None)) => {
                    eof = true;
                    break;
                }
                Some(Err(e)) => return Err(e).context("reading stdin"),
                None => break,
            }
        }
        let messages: Vec<Message> = batch
            .into_iter()
            .map(|l| l.trim_end_matches('\r').to_owned())
            .filter(|l| !l.is_empty())
            .map(make)
            .collect();
        let addresses = store
            .topics
            .publish_batch(messages)
            .await
            .with_context(|| {
                format!("publishing to {topic:?} after {total} messages (those are written)")
            })?;
        total += addresses.len();
        print(&addresses);
        if eof {
            break;
        }
    }
    tracing::info!(total, topic, "published");
    Ok(())
}

pub async fn read(
    global: &Global,
    topic: &str,
    from: Option<String>,
    limit: Option<usize>,
    follow: bool,
    peer: Option<String>,
) -> anyhow::Result<()> {
    // Check the cursor before opening anything.
    let cursor: Cursor = match &from {
        Some(text) => text.trim().parse().map_err(|e: multifeed::Error| {
            tracing::debug!("cursor: {e}");
            anyhow::anyhow!(
                "malformed cursor given to --from: pass the text a previous `multifeed read` printed after `cursor:` (it starts with v1.)"
            )
        })?,
        None => Cursor::default(),
    };
    let store = open(global).await?;
    let result = if follow {
        follow_topic(global, &store, topic, cursor, limit, peer).await
    } else {
        read_topic(global, &store, topic, cursor, limit).await
    };
    let closed = store.close().await;
    result.and(closed)
}

fn print_message(json: bool, m: &multifeed::topics::ReceivedMessage) {
    if json {
        println!("{}", output::message_json(m));
    } else {
        println!("{}", output::message_line(m));
    }
}

fn print_cursor(json: bool, cursor: &Cursor) {
    if json {
        println!("{}", json!({"cursor": cursor.to_string()}));
    } else {
        eprintln!("cursor: {cursor}");
    }
}

async fn read_topic(
    global: &Global,
    store: &Store,
    topic: &str,
    mut cursor: Cursor,
    limit: Option<usize>,
) -> anyhow::Result<()> {
    let mut left = limit.unwrap_or(usize::MAX);
    while left > 0 {
        let (messages, next) = store
            .topics
            .read(topic, &cursor, left.min(READ_BATCH))
            .await?;
        cursor = next;
        if messages.is_empty() {
            break;
        }
        left -= messages.len();
        for m in &messages {
            print_message(global.json, m);
        }
    }
    print_cursor(global.json, &cursor);
    Ok(())
}

async fn follow_topic(
    global: &Global,
    store: &Store,
    topic: &str,
    mut cursor: Cursor,
    limit: Option<usize>,
    peer: Option<String>,
) -> anyhow::Result<()> {
    let mut dialer = match &peer {
        Some(addr) => Some(net::dial(&store.group, addr, 10).await?),
        None => None,
    };
    let mut report = peer
        .as_deref()
        .map(|addr| DialReport::new(addr, global.json));
    if let Some(peer) = &peer
        && !global.json
    {
        tell!("following {topic:?}, replicating live with {peer}");
    }
    let mut stream = store.topics.follow(topic, cursor.clone());
    let mut left = limit.unwrap_or(usize::MAX);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut outcome = Ok(());
    while left > 0 {
        tokio::select! {
            item = stream.next() => {
                let Some(item) = item else { break };
                let m = item?;
                cursor.advance(&m.address);
                print_message(global.json, &m);
                if global.json {
                    print_cursor(true, &cursor);
                }
                left -= 1;
            }
            event = async {
                match dialer.as_mut() {
                    Some(d) => d.next_event().await,
                    None => std::future::pending().await,
                }
            } => match event {
                Some(event) => {
                    if let Some(report) = &mut report {
                        report.event(&event);
                    }
                }
                // Only a refusal ends a dialer that was not stopped.
                None => {
                    if let (Some(d), Some(addr)) = (dialer.take(), &peer) {
                        outcome = d.finish().await.map(drop).map_err(|e| net::gave_up(addr, e));
                    }
                    break;
                }
            },
            _ = &mut shutdown => break,
        }
    }
    if let Some(d) = dialer {
        d.stop();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), d.finish()).await;
    }
    if !global.json {
        print_cursor(false, &cursor);
    }
    outcome
}

pub async fn topics(global: &Global) -> anyhow::Result<()> {
    let store = open(global).await?;
    let result = async {
        for topic in store.topics.topics().await? {
            if global.json {
                println!("{}", json!({"topic": topic}));
            } else {
                println!("{topic}");
            }
        }
        anyhow::Ok(())
    }
    .await;
    let closed = store.close().await;
    result.and(closed)
}

pub async fn feeds(global: &Global) -> anyhow::Result<()> {
    let store = open(global).await?;
    if !global.json {
        println!(
            "{:<64}  {:<20}  {:<6}  {:>9}  {:>9}  {:>10}",
            "key", "name", "kind", "length", "held", "bytes"
        );
    }
    for feed in store.group.feeds() {
        let (len, held, bytes) = (
            feed.len().await,
            feed.contiguous_len().await,
            feed.byte_len().await,
        );
        let kind = if feed.is_local() { "local" } else { "remote" };
        if global.json {
            println!(
                "{}",
                json!({"key": feed.key().to_hex(), "name": feed.name(), "local": feed.is_local(),
                       "length": len, "held": held, "bytes": bytes})
            );
        } else {
            println!(
                "{:<64}  {:<20}  {:<6}  {:>9}  {:>9}  {:>10}",
                feed.key().to_hex(),
                feed.name().unwrap_or("-"),
                kind,
                len,
                held,
                output::bytes(bytes)
            );
        }
    }
    store.close().await
}

pub async fn verify(global: &Global) -> anyhow::Result<()> {
    let store = open(global).await?;
    let report = store.group.verify().await;
    let closed = store.close().await;
    let report = report?;
    closed?;
    for feed in &report.feeds {
        let name = feed.name.as_deref().unwrap_or("(remote)");
        let (ok, seq, reason) = match &feed.status {
            FeedStatus::Ok => (true, None, None),
            FeedStatus::Damaged { seq, reason } => (false, *seq, Some(reason.as_str())),
            _ => (false, None, Some("unknown")),
        };
        if global.json {
            println!(
                "{}",
                json!({"key": feed.key.to_hex(), "name": feed.name, "length": feed.length,
                       "checked": feed.checked, "fork": feed.fork, "ok": ok,
                       "damaged_at": seq, "reason": reason})
            );
        } else if ok {
            println!(
                "ok       {}  {name}: {} of {} blocks held and verified{}",
                feed.key,
                feed.checked,
                feed.length,
                if feed.fork > 0 {
                    format!(" (truncated by its writer: fork {})", feed.fork)
                } else {
                    String::new()
                }
            );
        } else {
            let at = seq.map_or("its signed tree".to_owned(), |s| format!("block {s}"));
            println!(
                "DAMAGED  {}  {name}: at {at}: {}",
                feed.key,
                reason.unwrap_or_default()
            );
        }
    }
    for skipped in &report.skipped {
        let key = skipped
            .key
            .map(|k| k.to_hex())
            .unwrap_or_else(|| "?".into());
        if global.json {
            println!(
                "{}",
                json!({"key": key, "name": skipped.name, "ok": false, "skipped": true,
                       "path": skipped.path, "reason": skipped.reason})
            );
        } else {
            println!(
                "DAMAGED  {key}  {}: cannot be loaded ({}): {}",
                skipped.name.as_deref().unwrap_or("(remote)"),
                skipped.path.display(),
                skipped.reason
            );
        }
    }
    if !report.is_ok() {
        bail!(
            "{} of {} feeds are damaged (listed above) in {}; restore those feeds' directories from a backup; blocks before the damage are intact and nothing was changed",
            report.damaged(),
            report.feeds.len() + report.skipped.len(),
            store_dir_display(global)
        );
    }
    if !global.json {
        println!("all {} feeds verified", report.feeds.len());
    }
    Ok(())
}

fn store_dir_display(global: &Global) -> String {
    store::resolve_dir(global.dir.as_deref())
        .map(|d| d.display().to_string())
        .unwrap_or_default()
}
