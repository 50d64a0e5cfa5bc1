//! The `multifeed` command-line tool.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use multifeed::{Multifeed, Options, ReplicateOptions, SharedKey, StorageConfig};

#[derive(Parser)]
#[command(
    name = "multifeed",
    version,
    about = "A multi-writer feed collection over hypercores"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Two sensor gateways on local disk write per-topic logs, sync over loopback TCP,
    /// refuse a version-mismatched peer, reopen and print what each holds.
    Demo {
        /// Directory for the demo group (default: a temporary directory, removed after).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        // The hypercore crates log an ERROR for every ordinary disconnect; we report
        // what matters ourselves. RUST_LOG overrides this.
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("warn,hypercore=off,hypercore_protocol=off")
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo { dir } => demo(dir).await,
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn demo(dir: Option<PathBuf>) -> anyhow::Result<()> {
    let temp;
    let dir = match dir {
        Some(dir) => dir,
        None => {
            temp = tempfile::tempdir().context("creating a temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    let key = SharedKey::generate();
    println!("two gateways in {}, one shared key", dir.display());

    // Each gateway writes its own per-topic logs.
    let mut gateways = Vec::new();
    for (gateway, offset) in [("gateway-a", 0.0), ("gateway-b", 3.0)] {
        let group = Multifeed::open(
            StorageConfig::dir(dir.join(gateway)),
            key.clone(),
            Options::default(),
        )
        .await?;
        for (topic, unit, base) in [("temperature", "C", 20.0), ("humidity", "%", 55.0)] {
            let writer = group.writer(topic).await?;
            let readings: Vec<String> = (0..100)
                .map(|i| {
                    let value = base + offset + (i as f64 * 0.37).sin() * 2.0;
                    format!(
                        "{{\"gateway\":\"{gateway}\",\"value\":{value:.1},\"unit\":\"{unit}\"}}"
                    )
                })
                .collect();
            writer.append_batch(&readings).await?;
        }
        gateways.push(group);
    }

    // Sync them once over TCP on loopback.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = gateways[0].clone();
    let accept = tokio::spawn(async move {
        let (socket, _) = listener.accept().await?;
        anyhow::Ok(
            server
                .replicate(socket, ReplicateOptions::new(false))
                .await?,
        )
    });
    let socket = tokio::net::TcpStream::connect(addr).await?;
    let summary = gateways[1]
        .replicate(socket, ReplicateOptions::new(true))
        .await?;
    accept.await??;
    println!(
        "synced over {addr}: gateway-b received {} blocks ({} bytes) in {} feeds",
        summary.blocks_received, summary.bytes_received, summary.feeds_learnt
    );

    // A peer on another major protocol version is refused cleanly.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = gateways[0].clone();
    let accept = tokio::spawn(async move {
        let (socket, _) = listener.accept().await?;
        anyhow::Ok(server.replicate(socket, ReplicateOptions::new(false)).await)
    });
    let socket = tokio::net::TcpStream::connect(addr).await?;
    let refused = gateways[1]
        .replicate(
            socket,
            ReplicateOptions::new(true).protocol_version("2.0.0"),
        )
        .await;
    let _ = accept.await?;
    match refused {
        Err(e) => println!("a peer speaking protocol 2.0.0 was refused: {e}"),
        Ok(_) => anyhow::bail!("a mismatched peer was not refused"),
    }

    for (name, group) in ["gateway-a", "gateway-b"].iter().zip(&gateways) {
        group.close().await?;
        // Reopen from disk: the hidden index recomposes every member.
        let group = Multifeed::open(
            StorageConfig::dir(dir.join(name)),
            key.clone(),
            Options::default(),
        )
        .await?;
        println!("\n{name} after reopening: {} feeds", group.feeds().len());
        println!(
            "  {:<12} {:<16} {:>9} {:>7}  last held entry",
            "writer", "key", "held/len", "bytes"
        );
        for feed in group.feeds() {
            let (len, held) = (feed.len().await, feed.contiguous_len().await);
            let last = match held {
                0 => String::new(),
                n => String::from_utf8_lossy(&feed.get(n - 1).await?.unwrap_or_default())
                    .into_owned(),
            };
            println!(
                "  {:<12} {:<16} {:>4}/{:<4} {:>7}  {last}",
                feed.name().unwrap_or("(remote)"),
                &feed.key().to_hex()[..16],
                held,
                len,
                feed.byte_len().await
            );
        }
        group.close().await?;
    }
    Ok(())
}
