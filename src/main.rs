//! The `multifeed` command-line tool.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use multifeed::{Multifeed, Options, SharedKey, StorageConfig};

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
    /// Creates a group of sensor writers on local disk, appends readings, reopens the
    /// group and prints what it holds.
    Demo {
        /// Directory for the demo group (default: a temporary directory, removed after).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
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
    println!("group stored in {}", dir.display());

    let group = Multifeed::open(StorageConfig::dir(&dir), key.clone(), Options::default()).await?;
    for (topic, unit, base) in [
        ("temperature", "C", 20.0),
        ("humidity", "%", 55.0),
        ("pressure", "hPa", 1013.0),
    ] {
        let writer = group.writer(topic).await?;
        let readings: Vec<String> = (0..100)
            .map(|i| {
                format!(
                    "{{\"value\":{:.1},\"unit\":\"{unit}\"}}",
                    base + (i as f64 * 0.37).sin() * 2.0
                )
            })
            .collect();
        writer.append_batch(&readings).await?;
    }
    group.close().await?;

    let group = Multifeed::open(StorageConfig::dir(&dir), key, Options::default()).await?;
    println!("reopened: {} feeds", group.feeds().len());
    println!(
        "{:<12} {:<64} {:>6} {:>7}  last entry",
        "writer", "key", "blocks", "bytes"
    );
    for feed in group.feeds() {
        let len = feed.len().await;
        let last = match len {
            0 => String::new(),
            n => String::from_utf8_lossy(&feed.get(n - 1).await?.unwrap_or_default()).into_owned(),
        };
        println!(
            "{:<12} {} {:>6} {:>7}  {last}",
            feed.name().unwrap_or("(remote)"),
            feed.key(),
            len,
            feed.byte_len().await
        );
    }
    group.close().await?;
    Ok(())
}
