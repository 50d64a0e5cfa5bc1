//! The bounded crash loop (scripts/crash-loop.sh runs the long one): `kill -9`
//! of `write`, `sync` (the receiver) and `serve` at seeded random moments, on
//! stores holding a feed past one bitfield page (32,768 blocks) and a short one.
//! After every kill the store opens cleanly and verifies, every message `write`
//! printed an address for (it prints one only once the message is appended) is
//! there, and a receiver's next complete sync leaves no block missing.
//!
//! Kill moments follow progress (acknowledgements read, bytes downloaded), never
//! a sleep. `CRASH_KILLS` sets the kills per command (default 10).

mod cli_common;

use std::{
    collections::HashSet,
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use cli_common::*;
use multifeed::{
    Multifeed, Options, SharedKey, StorageConfig, Topics,
    topics::{Message, Packing},
};

/// Blocks of the long feed: past one bitfield page.
const BIG: u64 = 34_000;
const SMALL: u64 = 500;

fn kills() -> usize {
    std::env::var("CRASH_KILLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10)
}

/// xorshift64: seeded, so a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// A new group whose store holds topics `big` (BIG blocks, one message each)
/// and `small` (SMALL blocks), written with the library: through `write`, lines
/// that arrive together share a block.
fn source(root: &Path) -> (Gw, String) {
    let gw = Gw::new(root, "source");
    let key = gw.ok(&["init"]).trim().to_owned();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let group = Multifeed::open(
            StorageConfig::dir(&gw.dir),
            SharedKey::from_hex(&key).unwrap(),
            Options::default(),
        )
        .await
        .unwrap();
        let topics = Topics::new(group.clone());
        for (topic, count) in [("big", BIG), ("small", SMALL)] {
            for start in (0..count).step_by(1000) {
                let batch: Vec<Message> = (start..(start + 1000).min(count))
                    .map(|i| Message::new(topic, format!("{topic}-{i}")))
                    .collect();
                topics
                    .publish_batch_with(batch, Packing::one_per_block())
                    .await
                    .unwrap();
            }
        }
        group.close().await.unwrap();
    });
    (gw, key)
}

/// A copy of `from`'s store and key file as a new gateway `name`.
fn copy_of(from: &Gw, root: &Path, name: &str) -> Gw {
    let gw = Gw::new(root, name);
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(&from.dir)
        .arg(&gw.dir)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::copy(from.dir.with_extension("key"), gw.dir.with_extension("key")).unwrap();
    gw
}

/// The store opens without a damaged or skipped feed, and verifies.
fn assert_sound(gw: &Gw, what: &str) {
    let out = gw.run(&["feeds"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("damaged"),
        "{what}: the store does not open cleanly: {stderr}"
    );
    let out = gw.run(&["verify"]);
    assert!(
        out.status.success(),
        "{what}: verify failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Blocks `receiver` lacks of what `source` holds, over all feeds.
fn missing_blocks(source: &Gw, receiver: &Gw) -> u64 {
    let feeds = |gw: &Gw| -> Vec<serde_json::Value> {
        gw.ok(&["--json", "feeds"])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let held = feeds(receiver);
    feeds(source)
        .iter()
        .map(|feed| {
            let length = feed["length"].as_u64().unwrap();
            let have = held
                .iter()
                .find(|f| f["key"] == feed["key"])
                .and_then(|f| f["held"].as_u64())
                .unwrap_or(0);
            length.saturating_sub(have)
        })
        .sum()
}

/// Whom to kill once `write` has acknowledged enough messages.
enum Victim<'a> {
    /// The `write` process itself.
    Writer,
    /// The node it writes through.
    Node(&'a mut Option<Running>),
}

/// Runs `write topic` fed lines `prefix-1`, `prefix-2`, ... (bursts written at
/// once, and runs of single lines each sent once the one before is
/// acknowledged, so blocks hold one message or many), kills `victim` once
/// `kill_after` messages are acknowledged, and returns how many were.
fn write_until_killed(
    gw: &Gw,
    topic: &str,
    prefix: &str,
    kill_after: usize,
    rng: &mut Rng,
    victim: Victim<'_>,
) -> usize {
    let mut child: Child = gw
        .cmd(&["write", topic])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (acked_tx, acked_rx) = mpsc::channel::<usize>();
    let prefix = prefix.to_owned();
    let mut feeder_rng = Rng(rng.below(u64::MAX) | 1);
    let feeder = std::thread::spawn(move || {
        let mut sent = 0usize;
        loop {
            if feeder_rng.below(2) == 0 {
                let burst = 1 + feeder_rng.below(300) as usize;
                let mut chunk = String::new();
                for _ in 0..burst {
                    sent += 1;
                    chunk.push_str(&format!("{prefix}-{sent}\n"));
                }
                if stdin.write_all(chunk.as_bytes()).is_err() {
                    return;
                }
            } else {
                for _ in 0..1 + feeder_rng.below(20) {
                    sent += 1;
                    if writeln!(stdin, "{prefix}-{sent}").is_err() {
                        return;
                    }
                    // Waits for its acknowledgement (or the end of the output).
                    loop {
                        match acked_rx.recv() {
                            Ok(n) if n >= sent => break,
                            Ok(_) => {}
                            Err(_) => return,
                        }
                    }
                }
            }
        }
    });
    let mut acked = 0usize;
    let mut victim = Some(victim);
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        assert!(line.contains('/'), "an address: {line:?}");
        acked += 1;
        let _ = acked_tx.send(acked);
        if acked >= kill_after {
            match victim.take() {
                Some(Victim::Writer) => child.kill().unwrap(),
                Some(Victim::Node(node)) => {
                    if let Some(node) = node.take() {
                        node.kill9();
                    }
                }
                None => {}
            }
        }
    }
    drop(acked_tx);
    // Its output ended: it was killed, or its node was and it gave up.
    let deadline = Instant::now() + WAIT;
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "write did not end");
        std::thread::sleep(Duration::from_millis(5));
    }
    feeder.join().unwrap();
    acked
}

/// Every one of the `acked` messages `prefix-1..` is in `topic`.
fn assert_acked_kept(gw: &Gw, topic: &str, prefix: &str, acked: usize, what: &str) {
    let (payloads, _) = gw.read(topic, None);
    let held: HashSet<&str> = payloads.iter().map(String::as_str).collect();
    let lost: Vec<usize> = (1..=acked)
        .filter(|n| !held.contains(format!("{prefix}-{n}").as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{what}: {} of {acked} acknowledged messages lost, first {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}

#[test]
fn killed_writes_lose_no_acknowledged_message() {
    let root = tempfile::tempdir().unwrap();
    let (writer, _) = source(root.path());
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for run in 0..kills() {
        let topic = if run % 2 == 0 { "big" } else { "small" };
        let prefix = format!("w{run}");
        let kill_after = 1 + rng.below(2000) as usize;
        let acked = write_until_killed(
            &writer,
            topic,
            &prefix,
            kill_after,
            &mut rng,
            Victim::Writer,
        );
        let what = format!("write run {run} (killed after {acked} acknowledged)");
        assert_sound(&writer, &what);
        assert_acked_kept(&writer, topic, &prefix, acked, &what);
    }
}

#[test]
fn a_killed_sync_leaves_a_sound_store_and_the_next_sync_completes_it() {
    let root = tempfile::tempdir().unwrap();
    let (source, key) = source(root.path());
    let big_key = source.writer_key("big");
    let full = std::fs::metadata(source.dir.join("feeds").join(&big_key).join("data"))
        .unwrap()
        .len();
    let node = source.serve();
    let receiver = Gw::new(root.path(), "receiver");
    receiver.ok(&["join", &key]);
    let data = receiver.dir.join("feeds").join(&big_key).join("data");
    let mut rng = Rng(0xd1b5_4a32_d192_ed03);
    // Each sync resumes the one killed before it; kill points spread over the download.
    let mut points: Vec<u64> = (0..kills()).map(|_| rng.below(full)).collect();
    points.sort_unstable();
    for (run, point) in points.into_iter().enumerate() {
        let mut sync = Running::spawn(receiver.cmd(&["sync", &node.addr]));
        let deadline = Instant::now() + WAIT;
        loop {
            let got = std::fs::metadata(&data).map(|m| m.len()).unwrap_or(0);
            if got >= point {
                sync.kill9();
                break;
            }
            if sync.has_exited() {
                break; // it finished before the kill point
            }
            assert!(Instant::now() < deadline, "run {run}: the sync stalled");
            // Polls the download's progress: the kill point, not a wait for an event.
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_sound(
            &receiver,
            &format!("sync run {run} (killed at {point} bytes)"),
        );
    }
    receiver.ok(&["sync", &node.addr]);
    assert_eq!(
        missing_blocks(&source, &receiver),
        0,
        "blocks never fetched again"
    );
    assert_sound(&receiver, "the receiver after the last sync");
    node.stop();
}

#[test]
fn a_killed_node_loses_no_acknowledged_message_and_its_receiver_recovers() {
    let root = tempfile::tempdir().unwrap();
    let (source, key) = source(root.path());
    let store = copy_of(&source, root.path(), "node");
    let receiver = Gw::new(root.path(), "receiver");
    receiver.ok(&["join", &key]);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for run in 0..kills() {
        let topic = if run % 2 == 0 { "big" } else { "small" };
        let prefix = format!("s{run}");
        let mut node = Some(store.serve());
        // It serves a receiver while `write` publishes through it.
        let addr = node.as_ref().unwrap().addr.clone();
        let sync = Running::spawn(receiver.cmd(&["sync", &addr]));
        let kill_after = 1 + rng.below(1500) as usize;
        let acked = write_until_killed(
            &store,
            topic,
            &prefix,
            kill_after,
            &mut rng,
            Victim::Node(&mut node),
        );
        sync.kill9();
        assert!(node.is_none(), "run {run}: the node was killed");
        let what = format!("serve run {run} (killed after {acked} acknowledged)");
        assert_sound(&store, &what);
        assert_acked_kept(&store, topic, &prefix, acked, &what);
        assert_sound(&receiver, &format!("{what}: its receiver"));
    }
    let node = store.serve();
    receiver.ok(&["sync", &node.addr]);
    assert_eq!(
        missing_blocks(&store, &receiver),
        0,
        "blocks never fetched again"
    );
    assert_sound(&receiver, "the receiver after the last sync");
    node.stop();
}
