//! The local commands: init, join, write, read, topics, feeds, verify.

use anyhow::{Context, bail};
use futures::{FutureExt, StreamExt};
use multifeed::{
    SharedKey,
    topics::{Cursor, DamagedBlock, Message, ReceivedMessage},
};
use serde_json::json;
use tokio::io::AsyncBufReadExt;

use super::{
    ndjson, net, output,
    remote::NodeApi,
    report::{DialReport, out, say, tell},
    signal::shutdown_signal,
    store::{self, Access, KeySource, Store, Want, open_or_node},
};
use crate::Global;
use crate::node::AdmissionCaps;

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
        out!(
            "{}",
            json!({"key": key.to_hex(), "dir": dir, "key_file": key_file, "group_id": store::group_id(&key)})
        );
    } else {
        out!("{}", key.to_hex());
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
        out!(
            "{}",
            json!({"dir": dir, "key_file": key_file, "group_id": store::group_id(&key)})
        );
    } else {
        out!(
            "joined group {} in {} (key in {})",
            &store::group_id(&key)[..16],
            dir.display(),
            key_file.display()
        );
    }
    Ok(())
}

/// How `write` stamps and reports what it publishes.
pub struct WriteOptions {
    pub content_type: Option<String>,
    pub quiet: bool,
    /// The readings' time instead of now.
    pub timestamp_ms: Option<u64>,
    /// How stdin holds messages.
    pub format: StdinFormat,
}

/// How `write` reads messages from stdin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum StdinFormat {
    /// Each non-empty line is one text message.
    #[default]
    Lines,
    /// Each non-empty line is a JSON object (`{"payload": ...}` or
    /// `{"payload_base64": ...}`, optional `content_type` and `time_ms`), as
    /// `read --json` prints: binary-safe.
    Ndjson,
}

pub async fn write(
    global: &Global,
    topic: &str,
    message: Option<String>,
    options: WriteOptions,
) -> anyhow::Result<()> {
    match open_or_node(global, Want::Write).await? {
        Access::Local(store) => {
            let target = Via::Store(&store.topics);
            let result = write_inner(&target, topic, message, &options, global.json).await;
            let closed = store.close().await;
            result.and(closed)
        }
        Access::Node(api) => {
            let target = Via::Node(&api);
            write_inner(&target, topic, message, &options, global.json).await
        }
    }
}

/// Where `write` publishes and `read` reads: the store, or the node holding it.
enum Via<'a> {
    Store(&'a multifeed::Topics),
    Node(&'a NodeApi),
}

impl Via<'_> {
    async fn publish(&self, message: Message) -> anyhow::Result<String> {
        Ok(match self {
            Via::Store(topics) => topics.publish(message).await?.to_string(),
            Via::Node(api) => api.publish(message).await?,
        })
    }

    async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<Message>,
    ) -> anyhow::Result<Vec<String>> {
        Ok(match self {
            Via::Store(topics) => topics
                .publish_batch(messages)
                .await?
                .iter()
                .map(ToString::to_string)
                .collect(),
            Via::Node(api) => api.publish_batch(topic, &messages).await?,
        })
    }

    /// Up to `limit` messages after `cursor`, the cursor past them, and the
    /// blocks passed over as damaged (a node reports its own in its log).
    async fn read(
        &self,
        topic: &str,
        cursor: &Cursor,
        limit: usize,
    ) -> anyhow::Result<(Vec<output::Labelled>, Cursor, Vec<DamagedBlock>)> {
        Ok(match self {
            Via::Store(topics) => {
                let read = topics.read_report(topic, cursor, limit).await?;
                let group = topics.group();
                let labelled = read
                    .messages
                    .into_iter()
                    .map(|message| output::Labelled {
                        gateway: output::gateway_for(group, message.address.key),
                        message,
                    })
                    .collect();
                (labelled, read.cursor, read.damaged)
            }
            Via::Node(api) => {
                let (messages, next) = api.read(topic, cursor, limit).await?;
                (messages, next, Vec::new())
            }
        })
    }
}

async fn write_inner(
    target: &Via<'_>,
    topic: &str,
    message: Option<String>,
    options: &WriteOptions,
    json: bool,
) -> anyhow::Result<()> {
    let quiet = options.quiet;
    let defaults = ndjson::Defaults {
        timestamp_ms: options.timestamp_ms,
        content_type: options.content_type.clone(),
    };
    let make = |payload: String| {
        let mut m = Message::new(topic, payload);
        if let Some(ms) = defaults.timestamp_ms {
            m = m.with_timestamp_ms(ms);
        }
        match &defaults.content_type {
            Some(ct) => m.with_content_type(ct.clone()),
            None => m,
        }
    };
    let print = |addresses: &[String]| {
        if quiet {
            return;
        }
        // A reader of the addresses that went away does not stop the publishing.
        for a in addresses {
            if json {
                say!("{}", json!({"address": a.to_string()}));
            } else {
                say!("{a}");
            }
        }
    };
    if let Some(message) = message {
        let address = target.publish(make(message)).await?;
        print(&[address]);
        return Ok(());
    }
    // One message per non-empty stdin line, published in batches of what is
    // already available (at most STDIN_BATCH), so a slow producer's lines are
    // written as they come and a fast one's share signatures.
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut total = 0usize;
    let mut line_number = 0usize;
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
        let mut messages = Vec::with_capacity(batch.len());
        // A bad line stops the input; the good lines before it are still written.
        let mut bad_line = None;
        for line in batch {
            line_number += 1;
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            match options.format {
                StdinFormat::Lines => messages.push(make(line.to_owned())),
                StdinFormat::Ndjson => match ndjson::parse(topic, line_number, line, &defaults) {
                    Ok(Some(message)) => messages.push(message),
                    Ok(None) => {}
                    Err(e) => {
                        bad_line = Some(e);
                        break;
                    }
                },
            }
        }
        if !messages.is_empty() {
            let addresses = target
                .publish_batch(topic, messages)
                .await
                .with_context(|| {
                    format!("publishing to {topic:?} after {total} messages (those are written)")
                })?;
            total += addresses.len();
            print(&addresses);
        }
        if let Some(e) = bad_line {
            return Err(anyhow::Error::new(e).context(format!(
                "stdin holds something that is not a message; the {total} messages before it are written"
            )));
        }
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
    tail: Option<usize>,
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
    // Following with a peer replicates into the store.
    let want = if follow && peer.is_some() {
        Want::Write
    } else {
        Want::Read
    };
    let store = match open_or_node(global, want).await? {
        Access::Local(store) => store,
        Access::Node(api) => {
            if peer.is_some() {
                bail!(
                    "the store is held by a running node, which replicates with its own peers; drop --peer, or have the node dial it (`serve --peer ADDR`)"
                );
            }
            let cursor = match tail {
                Some(tail) => api.tail_cursor(topic, tail).await?,
                None => cursor,
            };
            return if follow {
                follow_through_node(global, &api, topic, cursor, limit).await
            } else {
                read_topic(global, &Via::Node(&api), topic, cursor, limit).await
            };
        }
    };
    let cursor = match tail {
        Some(tail) => match store.topics.tail_cursor(topic, tail).await {
            Ok(cursor) => cursor,
            Err(e) => {
                store.close().await?;
                return Err(e.into());
            }
        },
        None => cursor,
    };
    let result = if follow {
        follow_topic(global, &store, topic, cursor, limit, peer).await
    } else {
        read_topic(global, &Via::Store(&store.topics), topic, cursor, limit).await
    };
    let closed = store.close().await;
    result.and(closed)
}

async fn follow_through_node(
    global: &Global,
    api: &NodeApi,
    topic: &str,
    mut cursor: Cursor,
    limit: Option<usize>,
) -> anyhow::Result<()> {
    let mut events = api.follow(topic, &cursor).await?;
    let mut left = limit.unwrap_or(usize::MAX);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut outcome = Ok(());
    while left > 0 {
        tokio::select! {
            item = events.next() => match item {
                Ok(Some((m, next))) => {
                    cursor = next;
                    print_message(global.json, &m.message, m.gateway.as_deref());
                    if global.json {
                        print_cursor(true, &cursor);
                    }
                    left -= 1;
                }
                Ok(None) => {
                    outcome = Err(anyhow::anyhow!(
                        "the node holding the store stopped; run the same command again with --from and the cursor printed last to go on"
                    ));
                    break;
                }
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            },
            _ = &mut shutdown => break,
        }
    }
    if !global.json {
        print_cursor(false, &cursor);
    }
    outcome
}

fn print_message(json: bool, m: &ReceivedMessage, gateway: Option<&str>) {
    if json {
        out!("{}", output::message_json(m, gateway));
    } else {
        out!("{}", output::message_line(m, gateway));
    }
}

fn print_cursor(json: bool, cursor: &Cursor) {
    if json {
        out!("{}", json!({"cursor": cursor.to_string()}));
    } else {
        eprintln!("cursor: {cursor}");
    }
}

async fn read_topic(
    global: &Global,
    via: &Via<'_>,
    topic: &str,
    mut cursor: Cursor,
    limit: Option<usize>,
) -> anyhow::Result<()> {
    let mut left = limit.unwrap_or(usize::MAX);
    // Reported at the end, once each and in runs: a truncated file damages every
    // block after the cut, and a damaged block 0 (the feed's topic) is met on
    // every read.
    let mut damaged: Vec<DamagedBlock> = Vec::new();
    while left > 0 {
        let (messages, next, passed_over) = via.read(topic, &cursor, left.min(READ_BATCH)).await?;
        let moved = next != cursor;
        cursor = next;
        for run in &passed_over {
            for seq in run.first..=run.last {
                let known = damaged
                    .iter_mut()
                    .any(|d| d.absorb(run.key, seq, &run.reason));
                if !known {
                    let mut single = run.clone();
                    (single.first, single.last) = (seq, seq);
                    damaged.push(single);
                }
            }
        }
        if messages.is_empty() && (passed_over.is_empty() || !moved) {
            break;
        }
        left = left.saturating_sub(messages.len());
        for m in &messages {
            print_message(global.json, &m.message, m.gateway.as_deref());
        }
    }
    print_cursor(global.json, &cursor);
    for run in &damaged {
        if global.json {
            eprintln!(
                "{}",
                json!({"damaged": {"key": run.key.to_hex(), "first": run.first, "last": run.last, "message": run.to_string()}})
            );
        } else {
            eprintln!("error: {run}");
        }
    }
    if !damaged.is_empty() {
        let count: u64 = damaged.iter().map(|d| d.last - d.first + 1).sum();
        let (blocks, them, their) = if count == 1 {
            ("block", "it", "its")
        } else {
            ("blocks", "them", "their")
        };
        bail!(
            "{count} damaged {blocks} passed over (see above), every intact message printed; run `multifeed verify` to see the extent of the damage; the cursor printed keeps {them}, so a read from it returns {their} messages once restored"
        );
    }
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
        Some(addr) => Some(net::dial(&store.group, addr, 10, &AdmissionCaps::default()).await?),
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
                let gateway = output::gateway_for(&store.group, m.address.key);
                print_message(global.json, &m, gateway.as_deref());
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
    let topics = match open_or_node(global, Want::Read).await? {
        Access::Local(store) => {
            let topics = store.topics.topics().await;
            let closed = store.close().await;
            let topics = topics?;
            closed?;
            topics
        }
        Access::Node(api) => api.topics().await?,
    };
    for topic in topics {
        if global.json {
            out!("{}", json!({"topic": topic}));
        } else {
            out!("{topic}");
        }
    }
    Ok(())
}

pub async fn feeds(global: &Global) -> anyhow::Result<()> {
    let rows = match open_or_node(global, Want::Read).await? {
        Access::Local(store) => {
            let mut rows = Vec::new();
            for feed in store.group.feeds() {
                rows.push(output::feed_json(&feed).await);
            }
            store.close().await?;
            rows
        }
        Access::Node(api) => api.feeds().await?,
    };
    if !global.json {
        out!("{}", output::feeds_heading());
    }
    for row in &rows {
        if global.json {
            out!("{row}");
        } else {
            out!("{}", output::feed_line(row));
        }
    }
    Ok(())
}

pub async fn verify(global: &Global) -> anyhow::Result<()> {
    let (rows, feeds) = match open_or_node(global, Want::Read).await? {
        Access::Local(store) => {
            let report = store.group.verify().await;
            let closed = store.close().await;
            let report = report?;
            closed?;
            (output::verify_rows(&report), report.feeds.len())
        }
        Access::Node(api) => {
            let answer = api.verify().await?;
            let rows = answer["feeds"].as_array().cloned().unwrap_or_default();
            let feeds = rows
                .iter()
                .filter(|r| r["skipped"].as_bool() != Some(true))
                .count();
            (rows, feeds)
        }
    };
    for row in &rows {
        if global.json {
            out!("{row}");
        } else {
            out!("{}", output::verify_line(row));
        }
    }
    let unlisted = rows
        .iter()
        .filter(|r| r["unlisted"].as_bool() == Some(true))
        .count();
    let refused = rows
        .iter()
        .filter(|r| r["access_refused"].as_bool() == Some(true))
        .count();
    let damaged = rows
        .iter()
        .filter(|r| r["ok"].as_bool() != Some(true))
        .count()
        - unlisted
        - refused;
    if refused > 0 && damaged == 0 {
        bail!(
            "{refused} of {} feeds in {} could not be opened because the system refused access to their files (REFUSED above); nothing is known to be damaged: check their owner and permissions and that none is immutable (lsattr shows an 'i'; chattr -i clears it), then run verify again",
            rows.len() - unlisted,
            store_dir_display(global)
        );
    }
    if unlisted > 0 && damaged == 0 {
        bail!(
            "{unlisted} feed directories in {} are not in the store's index (listed above; a lost or damaged index/, or an interrupted writer creation or download); their data is intact and was not changed: restore index/ from a backup, and keep those directories",
            store_dir_display(global)
        );
    }
    if damaged > 0 {
        bail!(
            "{damaged} of {} feeds are damaged (listed above) in {}; restore those feeds' directories from a backup; blocks before the damage are intact and nothing was changed{}",
            rows.len() - unlisted,
            store_dir_display(global),
            [
                (unlisted > 0).then(|| format!(
                    "; {unlisted} feed directories are also not in the store's index (UNLISTED above)"
                )),
                (refused > 0).then(|| format!(
                    "; {refused} more could not be opened because the system refused access to their files (REFUSED above: check their permissions)"
                )),
            ]
            .into_iter()
            .flatten()
            .collect::<String>()
        );
    }
    if !global.json {
        out!("all {feeds} feeds verified");
    }
    Ok(())
}

pub async fn repair(global: &Global) -> anyhow::Result<()> {
    let dir = store::resolve_dir(global.dir.as_deref())?;
    let store = match store::open(global).await {
        Ok(store) => store,
        Err(e) if damaged_index(&e, &dir) => {
            // Kept, never deleted: it may still be read by hand or restored.
            let index = dir.join("index");
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let aside = dir.join(format!("index.damaged-{secs}"));
            std::fs::rename(&index, &aside).with_context(|| {
                format!("cannot move the damaged index {} aside", index.display())
            })?;
            tell!(
                "the index was damaged ({e:#}); it is kept as {} and a new one is built",
                aside.display()
            );
            store::open(global).await?
        }
        Err(e) => return Err(e),
    };
    let report = store.group.repair().await;
    let closed = store.close().await;
    let report = report?;
    closed?;
    for (key, name) in &report.relisted {
        let what = match name {
            Some(name) => format!("writer {name:?}"),
            None => "remote feed".to_owned(),
        };
        if global.json {
            out!("{}", json!({"relisted": key.to_hex(), "name": name}));
        } else {
            out!("relisted {} ({what})", key.to_hex());
        }
    }
    for (path, reason) in &report.left {
        if global.json {
            out!("{}", json!({"left": path, "reason": reason}));
        } else {
            out!("left     {}: {reason}", path.display());
        }
    }
    if !report.left.is_empty() {
        bail!(
            "{} feed directories could not be taken back (listed above) and were left as they are; nothing was deleted",
            report.left.len()
        );
    }
    if !global.json {
        out!(
            "{} feeds taken back into the index; run `multifeed verify` to check them",
            report.relisted.len()
        );
    }
    Ok(())
}

/// Whether `error` says the index of the store at `dir` is damaged.
fn damaged_index(error: &anyhow::Error, dir: &std::path::Path) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<multifeed::Error>(),
            Some(multifeed::Error::Damaged { path, .. }) if path.starts_with(dir.join("index"))
        )
    })
}

fn store_dir_display(global: &Global) -> String {
    store::resolve_dir(global.dir.as_deref())
        .map(|d| d.display().to_string())
        .unwrap_or_default()
}
