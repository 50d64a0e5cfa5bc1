//! `multifeed demo`: three sensor gateways on loopback publish readings to topics,
//! sync in a chain, and show one merged view; a peer on another protocol version
//! is refused.

use std::{path::PathBuf, time::Instant};

use anyhow::Context;
use multifeed::{
    Multifeed, Options, ReplicateOptions, ReplicationSummary, SharedKey, StorageConfig, Topics,
    topics::{Cursor, Message},
};

use super::output;

const GATEWAYS: [&str; 3] = ["gateway-a", "gateway-b", "gateway-c"];
const READINGS: u64 = 20;
/// One reading per gateway and topic every minute; the gateways are 20 s apart.
const PERIOD_MS: u64 = 60_000;

struct Gateway {
    name: &'static str,
    group: Multifeed,
    topics: Topics,
}

pub async fn run(dir: Option<PathBuf>) -> anyhow::Result<()> {
    let started = Instant::now();
    let temp;
    let dir = match dir {
        Some(dir) => dir,
        None => {
            temp = tempfile::tempdir().context("creating a temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    let key = SharedKey::generate();
    println!(
        "Three sensor gateways in {}, one shared group key.\nEach publishes {READINGS} readings to `temperature` and `humidity` (its own feeds, its own clock).\n",
        dir.display()
    );

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let start = now - now % PERIOD_MS - READINGS * PERIOD_MS;
    let mut gateways = Vec::new();
    for (g, name) in GATEWAYS.into_iter().enumerate() {
        let group = Multifeed::open(
            StorageConfig::dir(dir.join(name)),
            key.clone(),
            Options::default(),
        )
        .await?;
        let topics = Topics::new(group.clone());
        for (topic, unit, base) in [("temperature", "C", 19.0), ("humidity", "%", 52.0)] {
            let readings = (0..READINGS).map(|i| {
                let value = base + g as f64 * 1.5 + ((i + 3 * g as u64) as f64 * 0.5).sin();
                Message::new(
                    topic,
                    format!("{{\"gateway\":\"{name}\",\"value\":{value:.1},\"unit\":\"{unit}\"}}"),
                )
                .with_timestamp_ms(start + i * PERIOD_MS + g as u64 * 20_000)
                .with_content_type("application/json")
            });
            topics.publish_batch(readings).await?;
        }
        gateways.push(Gateway {
            name,
            group,
            topics,
        });
    }

    println!("Sync over loopback TCP, one-shot, in a chain a <-> b <-> c, then a <-> b again:");
    for (x, y) in [(0, 1), (2, 1), (0, 1)] {
        let (summary, addr) = sync_pair(&gateways[x].group, &gateways[y].group).await?;
        println!(
            "  {} -> {} over {addr}: {} received {} blocks ({}) in {} new feeds",
            gateways[x].name,
            gateways[y].name,
            gateways[x].name,
            summary.blocks_received,
            output::bytes(summary.bytes_received),
            summary.feeds_learnt
        );
    }

    let c = &gateways[2];
    let (merged, _) = c
        .topics
        .read("temperature", &Cursor::default(), usize::MAX)
        .await?;
    println!(
        "\n`temperature` merged by time, as {} reads it ({} readings from 3 gateways):",
        c.name,
        merged.len()
    );
    println!("  {:<24}  {:<10}  value", "time (UTC)", "gateway");
    let shown = 9;
    for m in merged.iter().take(shown) {
        let reading: serde_json::Value =
            serde_json::from_slice(&m.message.payload).unwrap_or_default();
        println!(
            "  {:<24}  {:<10}  {} {}",
            output::format_time(m.message.timestamp_ms),
            reading["gateway"].as_str().unwrap_or("?"),
            reading["value"],
            reading["unit"].as_str().unwrap_or("")
        );
    }
    if merged.len() > shown {
        println!("  ... {} more", merged.len() - shown);
    }

    println!("\nWhat each gateway holds:");
    println!(
        "  {:<10}  {:>7}  {:>12}  {:>6}  {:>11}  {:>8}",
        "gateway", "writers", "remote feeds", "blocks", "temperature", "humidity"
    );
    for g in &gateways {
        let mut blocks = 0;
        for feed in g.group.feeds() {
            blocks += feed.contiguous_len().await;
        }
        let count = |topic: &'static str| {
            let topics = g.topics.clone();
            async move {
                topics
                    .read(topic, &Cursor::default(), usize::MAX)
                    .await
                    .map(|(m, _)| m.len())
            }
        };
        println!(
            "  {:<10}  {:>7}  {:>12}  {:>6}  {:>11}  {:>8}",
            g.name,
            g.group.writers().len(),
            g.group.feeds().len() - g.group.writers().len(),
            blocks,
            count("temperature").await?,
            count("humidity").await?
        );
    }

    // A peer speaking another major version of the feed exchange is refused, and
    // neither store changes.
    let before = gateways[0].group.feeds().len();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = gateways[0].group.clone();
    let accept = tokio::spawn(async move {
        let (socket, _) = listener.accept().await?;
        anyhow::Ok(server.replicate(socket, ReplicateOptions::new(false)).await)
    });
    let socket = tokio::net::TcpStream::connect(addr).await?;
    let refused = gateways[2]
        .group
        .replicate(
            socket,
            ReplicateOptions::new(true).protocol_version("2.0.0"),
        )
        .await;
    let server_side = accept.await??;
    anyhow::ensure!(
        refused.is_err(),
        "a version-mismatched peer was not refused"
    );
    println!("\nA peer speaking feed-exchange protocol 2.0.0 connects to gateway-a:");
    match server_side {
        Err(e) => println!("  gateway-a refuses it: {e}"),
        Ok(_) => anyhow::bail!("gateway-a did not refuse a version-mismatched peer"),
    }
    anyhow::ensure!(
        gateways[0].group.feeds().len() == before,
        "the refused peer changed gateway-a"
    );
    println!("  gateway-a still holds {before} feeds, unchanged.");

    for g in &gateways {
        g.group.close().await?;
    }
    println!(
        "\nDone in {:.1} s. The same with the command-line tool: `multifeed init`, `join`, `write`, `serve`, `sync`, `read` (see the README).",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// One-shot sync of two gateways over loopback TCP; returns `a`'s summary.
async fn sync_pair(
    a: &Multifeed,
    b: &Multifeed,
) -> anyhow::Result<(ReplicationSummary, std::net::SocketAddr)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = b.clone();
    let accept = tokio::spawn(async move {
        let (socket, _) = listener.accept().await?;
        anyhow::Ok(
            server
                .replicate(socket, ReplicateOptions::new(false))
                .await?,
        )
    });
    let socket = tokio::net::TcpStream::connect(addr).await?;
    let summary = a.replicate(socket, ReplicateOptions::new(true)).await?;
    accept.await??;
    Ok((summary, addr))
}
