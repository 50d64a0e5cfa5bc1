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
    round_over(server, client, x, y, key, len, server_live, client_live).await
}

/// [`round`] over TCP on 127.0.0.1.
async fn round_tcp(
    server: &Multifeed,
    client: &Multifeed,
    key: multifeed::FeedKey,
    len: u64,
    server_live: bool,
    client_live: bool,
) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (x, y) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
    let (x, (y, _)) = (x.unwrap(), y.unwrap());
    round_over(server, client, x, y, key, len, server_live, client_live).await
}

#[allow(clippy::too_many_arguments)]
async fn round_over<S>(
    server: &Multifeed,
    client: &Multifeed,
    x: S,
    y: S,
    key: multifeed::FeedKey,
    len: u64,
    server_live: bool,
    client_live: bool,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let srv = server.start_replication(y, ReplicateOptions::new(false).live(server_live));
    let mut cli = client.start_replication(x, ReplicateOptions::new(true).live(client_live));
    let outcome = tokio::time::timeout(Duration::from_secs(20), async {
        // A live client of a one-shot server ends when the server, done, closes.
        if client_live && server_live {
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
    let got = client.feed(key);
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

/// On disk over TCP, the reader reopened between rounds, several blocks per round
/// (some in batches), every mode combination in turn on the same two stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_disk_over_tcp_with_reopen_every_mode() {
    let server_dir = tempfile::tempdir().unwrap();
    let client_dir = tempfile::tempdir().unwrap();
    let server = open_dir(server_dir.path()).await;
    let w = server.writer("w").await.unwrap();
    let mut failures = Vec::new();
    let mut round_no = 0u64;
    for (server_live, client_live) in [(false, false), (true, false), (false, true), (true, true)] {
        for _ in 0..10 {
            if round_no.is_multiple_of(3) {
                let batch: Vec<String> = (0..50).map(|i| format!("r{round_no} b{i}")).collect();
                w.append_batch(&batch).await.unwrap();
            } else {
                w.append(format!("r{round_no}").as_bytes()).await.unwrap();
            }
            let len = w.len().await;
            let client = open_dir(client_dir.path()).await;
            if let Err(e) =
                round_tcp(&server, &client, w.key(), len, server_live, client_live).await
            {
                failures.push(format!(
                    "round {round_no} (server live {server_live}, client live {client_live}): {e}"
                ));
            }
            client.close().await.unwrap();
            round_no += 1;
        }
    }
    let client = open_dir(client_dir.path()).await;
    assert_eq!(contents(&client).await, contents(&server).await);
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Both sides write: each round both append and the two stores must end equal.
#[tokio::test]
async fn both_sides_append_between_rounds() {
    for (a_live, b_live) in [(false, false), (true, false), (false, true), (true, true)] {
        let a = open_memory().await;
        let b = open_memory().await;
        let wa = a.writer("a").await.unwrap();
        let wb = b.writer("b").await.unwrap();
        for r in 0..10u64 {
            wa.append(format!("a{r}").as_bytes()).await.unwrap();
            wb.append(format!("b{r}").as_bytes()).await.unwrap();
            round(&a, &b, wa.key(), r + 1, a_live, b_live)
                .await
                .unwrap_or_else(|e| panic!("a live {a_live}, b live {b_live}, round {r}: {e}"));
            if !a_live {
                // A one-shot server ends only once it holds b's feed too.
                assert_eq!(a.feed(wb.key()).unwrap().len().await, r + 1);
            }
        }
        let _ = ReplicationEvent::FeedSynced { key: wa.key() };
    }
}
