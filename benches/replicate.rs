//! Replication benchmarks over TCP on 127.0.0.1, on-disk stores, two tasks in one
//! process (peak RSS is therefore for both sides together).
//!
//! `cargo bench --bench replicate [group|single|many]`
//! 1. group:  2 peers x 50 feeds x 1,000 entries x 100 B, until both hold all 100 feeds.
//! 2. single: one feed of 100,000 x 100 B.
//! 3. many:   one side with N feeds of 1 entry (N = `MANY_FEEDS`, default 10,000), the other with one.
//!    Each side reports its CPU time; `SIDE_B_WRAP="strace -f -c -o out.txt"` runs side b
//!    under a profiler.

use std::time::{Duration, Instant};

use multifeed::{Multifeed, Options, ReplicateOptions, SharedKey, StorageConfig};

async fn group(dir: &std::path::Path, key: &SharedKey) -> Multifeed {
    Multifeed::open(StorageConfig::dir(dir), key.clone(), Options::default())
        .await
        .unwrap()
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// User and system CPU seconds used by this process so far (from /proc/self/stat).
fn cpu_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 11 and 12 after the name.
    (ticks(11) / 100.0, ticks(12) / 100.0)
}

fn open_files() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// One-shot sync of `a` and `b` over loopback TCP; returns the elapsed time.
fn options(initiator: bool) -> ReplicateOptions {
    let mut options = ReplicateOptions::new(initiator);
    if let Some(window) = std::env::var("WINDOW").ok().and_then(|v| v.parse().ok()) {
        options.window = window;
    }
    if let Some(max) = std::env::var("MAX_ACTIVE")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        options.max_active_feeds = max;
    }
    options
}

async fn sync(a: &Multifeed, b: &Multifeed) -> Duration {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let start = Instant::now();
    let (user0, sys0) = cpu_seconds();
    let server = {
        let a = a.clone();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            socket.set_nodelay(true).unwrap();
            a.replicate(socket, options(false)).await
        })
    };
    let socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.set_nodelay(true).unwrap();
    let rb = b.replicate(socket, options(true)).await.unwrap();
    let ra = server.await.unwrap().unwrap();
    let elapsed = start.elapsed();
    let (user1, sys1) = cpu_seconds();
    println!(
        "    a: received {} blocks / {} B, b: received {} blocks / {} B; cpu (both sides) user {:.2}s sys {:.2}s",
        ra.blocks_received,
        ra.bytes_received,
        rb.blocks_received,
        rb.bytes_received,
        user1 - user0,
        sys1 - sys0
    );
    elapsed
}

async fn bench_group() {
    let key = SharedKey::generate();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (group(da.path(), &key).await, group(db.path(), &key).await);
    let entries: Vec<[u8; 100]> = vec![[0x42; 100]; 1000];
    for side in [&a, &b] {
        for i in 0..50 {
            side.writer(&format!("feed-{i}"))
                .await
                .unwrap()
                .append_batch(&entries)
                .await
                .unwrap();
        }
    }
    let elapsed = sync(&a, &b).await;
    assert_eq!((a.feeds().len(), b.feeds().len()), (100, 100));
    println!(
        "group sync 2 x 50 feeds x 1,000 x 100 B: {:.2?} ({:.0} blocks/s)  [target <= 3 s; JS multifeed 6: 14.4 s]",
        elapsed,
        100_000.0 / elapsed.as_secs_f64()
    );
}

async fn bench_single() {
    let key = SharedKey::generate();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (group(da.path(), &key).await, group(db.path(), &key).await);
    let w = a.writer("big").await.unwrap();
    let entries: Vec<[u8; 100]> = vec![[0x42; 100]; 1000];
    for _ in 0..100 {
        w.append_batch(&entries).await.unwrap();
    }
    let elapsed = sync(&a, &b).await;
    assert_eq!(b.feed(w.key()).unwrap().contiguous_len().await, 100_000);
    println!(
        "one feed 100,000 x 100 B: {:.2?} ({:.0} msg/s)  [target <= 4 s; JS hypercore 11: 12.1 s]",
        elapsed,
        100_000.0 / elapsed.as_secs_f64()
    );
}

/// 10,000 feeds: the two sides run as two processes (this binary re-run with
/// `side-a` / `side-b`), so each reports its own peak RSS.
async fn bench_many() {
    let n: usize = std::env::var("MANY_FEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let key = SharedKey::generate();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let prepared = Instant::now();
    {
        let (a, b) = (group(da.path(), &key).await, group(db.path(), &key).await);
        for i in 0..n {
            a.writer(&format!("f{i}"))
                .await
                .unwrap()
                .append(b"x")
                .await
                .unwrap();
        }
        b.writer("single")
            .await
            .unwrap()
            .append(b"y")
            .await
            .unwrap();
        a.close().await.unwrap();
        b.close().await.unwrap();
    }
    println!("    prepared {n} feeds in {:.2?}", prepared.elapsed());
    let exe = std::env::current_exe().unwrap();
    let mut side_a = std::process::Command::new(&exe)
        .args(["side-a", da.path().to_str().unwrap(), &key.to_hex()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut a_out = std::io::BufReader::new(side_a.stdout.take().unwrap());
    let mut line = String::new();
    use std::io::BufRead;
    a_out.read_line(&mut line).unwrap();
    let port = line
        .trim()
        .strip_prefix("PORT ")
        .expect("side a announces its port")
        .to_string();
    let b_out = match std::env::var("SIDE_B_WRAP") {
        Ok(wrap) => {
            let mut words = wrap.split_whitespace();
            let mut cmd = std::process::Command::new(words.next().unwrap());
            cmd.args(words).arg(&exe);
            cmd
        }
        Err(_) => std::process::Command::new(&exe),
    }
    .args(["side-b", db.path().to_str().unwrap(), &key.to_hex(), &port])
    .output()
    .unwrap();
    let mut a_rest = String::new();
    std::io::Read::read_to_string(&mut a_out, &mut a_rest).unwrap();
    let a_ok = side_a.wait().unwrap().success();
    if !a_ok || !b_out.status.success() {
        eprintln!("side b: {}", String::from_utf8_lossy(&b_out.stderr));
        panic!(
            "a side failed (side a ok: {a_ok}, side b: {})",
            b_out.status
        );
    }
    println!("    side a: {}", a_rest.trim());
    println!(
        "    side b: {}",
        String::from_utf8_lossy(&b_out.stdout).trim()
    );
    println!(
        "{n} feeds x 1 entry vs 1 feed: see side b's sync time (the key exchange included)  [target <= 5 s, <= 200 MB per side]"
    );
}

/// One side of `bench_many`, in its own process. `RUST_LOG` turns on logs, written
/// to `<temp dir>/multifeed-<side>.log`.
async fn run_side(args: &[String]) {
    if std::env::var_os("RUST_LOG").is_some() {
        let path = std::env::temp_dir().join(format!("multifeed-{}.log", args[0]));
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::sync::Mutex::new(std::fs::File::create(path).unwrap()))
            .with_ansi(false)
            .init();
    }
    let key = SharedKey::from_hex(&args[2]).unwrap();
    let opened = Instant::now();
    let group = group(std::path::Path::new(&args[1]), &key).await;
    let open_time = opened.elapsed();
    let rss_open = peak_rss_mb();
    let (socket, initiator) = if args[0] == "side-a" {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("PORT {}", listener.local_addr().unwrap().port());
        use std::io::Write;
        std::io::stdout().flush().unwrap();
        (listener.accept().await.unwrap().0, false)
    } else {
        (
            tokio::net::TcpStream::connect(format!("127.0.0.1:{}", args[3]))
                .await
                .unwrap(),
            true,
        )
    };
    socket.set_nodelay(true).unwrap();
    let start = Instant::now();
    let (user0, sys0) = cpu_seconds();
    let summary = group.replicate(socket, options(initiator)).await.unwrap();
    let elapsed = start.elapsed();
    let (user1, sys1) = cpu_seconds();
    println!(
        "opened in {:.2?} (peak RSS {:.0} MB); synced {} feeds in {:.2?} (cpu user {:.2}s sys {:.2}s); received {} blocks in {} new feeds; peak RSS {:.0} MB; open files {}",
        open_time,
        rss_open,
        group.feeds().len(),
        elapsed,
        user1 - user0,
        sys1 - sys0,
        summary.blocks_received,
        summary.feeds_learnt,
        peak_rss_mb(),
        open_files()
    );
    group.close().await.unwrap();
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a.starts_with("side-")) {
        run_side(&args).await;
        return;
    }
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let run = |name: &str| which.is_empty() || which.iter().any(|w| w == name);
    if run("group") {
        bench_group().await;
    }
    if run("single") {
        bench_single().await;
    }
    if run("many") {
        bench_many().await;
    }
}
