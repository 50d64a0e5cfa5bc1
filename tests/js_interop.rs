//! Interop with real JS `hypercore` 11 peers (`tests/js/peer.js`, pinned by
//! `tests/js/package-lock.json`): a JS core downloads a Rust member feed, and a Rust
//! multifeed downloads a JS core, each over TCP on 127.0.0.1 with [`Feed::replicate_raw`].
//!
//! Needs `node` and `npm` on PATH and the npm registry reachable the first time
//! (`npm ci` runs once into `tests/js/node_modules`). Without them these tests fail:
//! they never skip.
//!
//! Roles: the TCP client is always the Noise initiator. In the first test JS is the
//! client (JS initiates, Rust responds); in the second Rust is the client.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use multifeed::{Feed, FeedKey, Multifeed, Options, ReplicateOptions, SharedKey, StorageConfig};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines},
    net::{TcpListener, TcpStream},
    process::{Child, ChildStdout, Command},
    sync::OnceCell,
    task::JoinHandle,
    time::{Instant, timeout, timeout_at},
};

/// Upper bound for each step of a test (JS's own overall limit is 30 s).
const STEP: Duration = Duration::from_secs(30);
/// Upper bound for `npm ci`.
const NPM_TIMEOUT: Duration = Duration::from_secs(300);
/// Written into node_modules after a successful install: the lockfile it installed.
const STAMP: &str = "node_modules/.multifeed-installed-lock.json";

fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("js")
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Installs the pinned JS dependencies once per test process (tests run in parallel),
/// or panics saying why that is impossible.
async fn ensure_js_deps() {
    static READY: OnceCell<Result<(), String>> = OnceCell::const_new();
    if let Err(message) = READY.get_or_init(install_js_deps).await {
        panic!("JS interop tests cannot run: {message}");
    }
}

async fn install_js_deps() -> Result<(), String> {
    let dir = js_dir();
    let node = Command::new("node")
        .arg("--version")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    match timeout(STEP, node).await {
        Ok(Ok(out)) if out.status.success() => {}
        Ok(Ok(out)) => return Err(format!("`node --version` failed: {}", out.status)),
        Ok(Err(e)) => {
            return Err(format!(
                "`node` could not be run ({e}); Node.js (v18 or later) and npm must be on PATH"
            ));
        }
        Err(_) => return Err("`node --version` did not finish".into()),
    }
    let lock = std::fs::read(dir.join("package-lock.json")).map_err(|e| {
        format!(
            "cannot read {}: {e}",
            dir.join("package-lock.json").display()
        )
    })?;
    if std::fs::read(dir.join(STAMP)).ok().as_deref() == Some(&lock[..])
        && dir.join("node_modules/hypercore/package.json").is_file()
    {
        return Ok(());
    }
    let npm = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match timeout(NPM_TIMEOUT, npm).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => {
            return Err(format!(
                "`npm` could not be run ({e}); Node.js and npm must be on PATH"
            ));
        }
        Err(_) => {
            return Err(format!(
                "`npm ci` in {} took over {NPM_TIMEOUT:?}",
                dir.display()
            ));
        }
    };
    if !out.status.success() {
        return Err(format!(
            "`npm ci` in {} failed ({}):\n{}\n{}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    std::fs::write(dir.join(STAMP), &lock)
        .map_err(|e| format!("cannot write the install stamp: {e}"))
}

/// A running `node peer.js ...`, killed when dropped.
struct JsPeer {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: Option<JoinHandle<String>>,
}

impl JsPeer {
    async fn spawn(args: &[&str]) -> JsPeer {
        ensure_js_deps().await;
        let mut child = Command::new("node")
            .arg("peer.js")
            .args(args)
            .current_dir(js_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `node peer.js {}`: {e}", args.join(" ")));
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let mut stderr = child.stderr.take().expect("piped stderr");
        let stderr = tokio::spawn(async move {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text).await;
            text
        });
        JsPeer {
            child,
            stdout,
            stderr: Some(stderr),
        }
    }

    /// Kills the peer and returns what it wrote to stderr, for a failure message.
    async fn diagnostics(&mut self) -> String {
        let _ = self.child.start_kill();
        let status = timeout(Duration::from_secs(5), self.child.wait()).await;
        let stderr = match self.stderr.take() {
            Some(task) => timeout(Duration::from_secs(5), task)
                .await
                .ok()
                .and_then(|r| r.ok())
                .unwrap_or_default(),
            None => String::new(),
        };
        format!("JS peer exit: {status:?}\n--- JS peer stderr ---\n{stderr}--- end ---")
    }

    /// The next stdout line, or a panic with the peer's stderr.
    async fn next_line(&mut self, deadline: Instant) -> String {
        match timeout_at(deadline, self.stdout.next_line()).await {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => panic!("JS peer closed stdout early\n{}", self.diagnostics().await),
            Ok(Err(e)) => panic!("reading JS peer stdout: {e}\n{}", self.diagnostics().await),
            Err(_) => panic!(
                "timed out waiting for JS peer output\n{}",
                self.diagnostics().await
            ),
        }
    }

    /// The rest of the next line, which must be `<keyword> <rest>`.
    async fn expect(&mut self, keyword: &str, deadline: Instant) -> String {
        let line = self.next_line(deadline).await;
        match line
            .strip_prefix(keyword)
            .and_then(|rest| rest.strip_prefix(' '))
        {
            Some(rest) => rest.to_string(),
            None => panic!(
                "expected `{keyword} ...` from the JS peer, got {:?}\n{}",
                line.chars().take(200).collect::<String>(),
                self.diagnostics().await
            ),
        }
    }

    /// Waits for the peer to exit successfully, returning its remaining stdout lines.
    async fn finish(&mut self, deadline: Instant) -> Vec<String> {
        let mut rest = Vec::new();
        loop {
            match timeout_at(deadline, self.stdout.next_line()).await {
                Ok(Ok(Some(line))) => rest.push(line),
                Ok(Ok(None)) => break,
                Ok(Err(e)) => panic!("reading JS peer stdout: {e}\n{}", self.diagnostics().await),
                Err(_) => panic!("JS peer did not exit in time\n{}", self.diagnostics().await),
            }
        }
        match timeout_at(deadline, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            other => panic!("JS peer failed: {other:?}\n{}", self.diagnostics().await),
        }
        // Shown with --nocapture: what JS logged on a successful run.
        if let Some(task) = self.stderr.take()
            && let Ok(Ok(stderr)) = timeout_at(deadline, task).await
            && !stderr.is_empty()
        {
            eprintln!("--- JS peer stderr ---\n{stderr}--- end ---");
        }
        rest
    }
}

async fn open_group(dir: &Path) -> Multifeed {
    Multifeed::open(
        StorageConfig::dir(dir),
        SharedKey::generate(),
        Options::default(),
    )
    .await
    .expect("open multifeed")
}

fn spawn_replication(
    feed: &Feed,
    io: TcpStream,
    options: ReplicateOptions,
) -> JoinHandle<multifeed::Result<multifeed::ReplicationSummary>> {
    let feed = feed.clone();
    tokio::spawn(async move { feed.replicate_raw(io, options).await })
}

#[tokio::test]
async fn js_peer_downloads_a_rust_member_feed() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let group = open_group(&tmp.path().join("rust")).await;
    let sensors = group.writer("sensors").await.unwrap();
    let mut entries: Vec<Vec<u8>> = (0..50)
        .map(|i| format!("sensor reading {i}: {}", i * 37 % 101).into_bytes())
        .collect();
    entries[25] = (0..100 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    sensors.append_batch(&entries[..25]).await.unwrap();
    sensors.append(&entries[25]).await.unwrap();
    sensors.append_batch(&entries[26..]).await.unwrap();
    assert_eq!(sensors.len().await, 50);

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let key = sensors.key().to_hex();
    let js_dir = tmp.path().join("js");
    let mut js = JsPeer::spawn(&[
        "download",
        &port,
        &key,
        &entries.len().to_string(),
        js_dir.to_str().unwrap(),
    ])
    .await;

    let deadline = Instant::now() + STEP;
    // Stop waiting as soon as the JS peer exits (it prints nothing before connecting).
    let accepted = tokio::select! {
        accepted = timeout_at(deadline, listener.accept()) => Ok(accepted),
        exited = js.child.wait() => Err(exited),
    };
    let socket = match accepted {
        Ok(Ok(Ok((socket, _)))) => socket,
        other => panic!(
            "JS peer did not connect: {other:?}\n{}",
            js.diagnostics().await
        ),
    };
    let replication = spawn_replication(&sensors, socket, ReplicateOptions::new(false));

    let mut received: Vec<Vec<u8>> = Vec::new();
    loop {
        let line = js.next_line(deadline).await;
        if line == "DONE" {
            break;
        }
        let Some(rest) = line.strip_prefix("BLOCK ") else {
            panic!(
                "unexpected JS peer output {line:?}\n{}",
                js.diagnostics().await
            );
        };
        let (index, hex_block) = rest.split_once(' ').expect("BLOCK <i> <hex>");
        assert_eq!(
            index.parse::<usize>().unwrap(),
            received.len(),
            "blocks out of order"
        );
        received.push(hex::decode(hex_block).expect("hex block"));
    }
    assert_eq!(
        received.len(),
        entries.len(),
        "JS received a different number of blocks"
    );
    for (i, (got, want)) in received.iter().zip(&entries).enumerate() {
        assert!(
            got == want,
            "block {i} differs: JS got {} bytes, Rust wrote {} bytes",
            got.len(),
            want.len()
        );
    }

    let summary = match timeout_at(deadline, replication).await {
        Ok(Ok(Ok(summary))) => summary,
        other => panic!(
            "the Rust side of the replication did not end cleanly: {other:?}\n{}",
            js.diagnostics().await
        ),
    };
    assert_eq!(summary.feeds_synced, 1, "{summary:?}");
    assert_eq!(summary.blocks_received, 0, "{summary:?}");
    assert!(summary.blocks_sent >= 50, "{summary:?}");
    js.finish(deadline).await;
    group.close().await.unwrap();
}

#[tokio::test]
async fn rust_multifeed_downloads_a_js_core() {
    init_tracing();
    const COUNT: u64 = 100;
    let tmp = tempfile::tempdir().unwrap();
    let js_dir = tmp.path().join("js");
    let mut js = JsPeer::spawn(&[
        "serve-writer",
        js_dir.to_str().unwrap(),
        "0",
        &COUNT.to_string(),
    ])
    .await;
    let deadline = Instant::now() + STEP;
    let key = js.expect("KEY", deadline).await;
    let port: u16 = js.expect("PORT", deadline).await.parse().expect("PORT <n>");
    let key = FeedKey::from_hex(&key).expect("JS printed a feed key");

    let group = open_group(&tmp.path().join("rust")).await;
    let remote = group.add_remote(key).await.unwrap();
    assert!(!remote.is_local());
    assert_eq!(remote.len().await, 0);

    let socket = match timeout_at(deadline, TcpStream::connect(("127.0.0.1", port))).await {
        Ok(Ok(socket)) => socket,
        other => panic!(
            "cannot connect to the JS peer: {other:?}\n{}",
            js.diagnostics().await
        ),
    };
    let summary = match timeout_at(
        deadline,
        remote.replicate_raw(socket, ReplicateOptions::new(true)),
    )
    .await
    {
        Ok(Ok(summary)) => summary,
        other => panic!(
            "Rust replication with the JS peer failed: {other:?}\n{}",
            js.diagnostics().await
        ),
    };
    assert_eq!(summary.feeds_synced, 1, "{summary:?}");
    assert_eq!(summary.blocks_received, COUNT, "{summary:?}");
    assert_eq!(summary.blocks_sent, 0, "{summary:?}");

    assert_eq!(remote.len().await, COUNT);
    assert_eq!(remote.contiguous_len().await, COUNT);
    for i in 0..COUNT {
        assert_eq!(
            remote.get(i).await.unwrap(),
            Some(format!("js-entry-{i}").into_bytes()),
            "block {i}"
        );
    }

    let rest = js.finish(deadline).await;
    assert!(
        rest.iter().any(|l| l.starts_with("CLOSED")),
        "JS peer did not report the connection closing: {rest:?}"
    );
    group.close().await.unwrap();
}
