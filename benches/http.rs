//! The node's HTTP API, as separate `multifeed serve` processes on 127.0.0.1
//! with on-disk stores; the client is this process (plain HTTP/1.1 keep-alive).
//!
//! `cargo bench --bench http [single|batch|latency]`
//! 1. single:  publish 64-byte readings one per request, from `CLIENTS` (default 32)
//!    connections at once, into one node with no peer.
//! 2. batch:   publish NDJSON batches of 1,000 such readings, from 4 connections.
//! 3. latency: node B dials node A; publish on A at 1,000 messages/s (one request
//!    each) while following the topic on B over SSE; the time from just before
//!    the publish request to the event's arrival on B, p50/p99/max.
//!
//! Counts: `SINGLE` (default 40,000), `BATCHES` (default 200), `LATENCY_MESSAGES`
//! (default 10,000).

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

const BIN: &str = env!("CARGO_BIN_EXE_multifeed");

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn multifeed(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("multifeed runs");
    assert!(
        out.status.success(),
        "multifeed {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running `serve`, killed when dropped.
struct Node {
    child: Child,
    http: String,
    listening: String,
}

impl Node {
    fn start(dir: &Path, args: &[&str]) -> Node {
        let mut child = Command::new(BIN)
            .arg("--dir")
            .arg(dir)
            .args(["--json", "serve"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("serve starts");
        let mut first = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut first,
        )
        .unwrap();
        let first: serde_json::Value = serde_json::from_str(&first).expect("serve's first line");
        Node {
            child,
            http: first["http"].as_str().unwrap_or_default().to_owned(),
            listening: first["listening"].as_str().unwrap_or_default().to_owned(),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// One keep-alive HTTP/1.1 connection.
struct Client {
    stream: BufReader<TcpStream>,
    host: String,
}

impl Client {
    async fn connect(addr: &str) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            stream: BufReader::new(stream),
            host: addr.to_owned(),
        }
    }

    /// Sends a request, reads the answer; its status and body.
    async fn request(&mut self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        let stream = self.stream.get_mut();
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body).await.unwrap();
        let mut status = 0;
        let mut length = 0;
        let mut line = String::new();
        loop {
            line.clear();
            self.stream.read_line(&mut line).await.unwrap();
            let trimmed = line.trim_end();
            if trimmed.is_empty() {
                break;
            }
            if let Some(rest) = trimmed.strip_prefix("HTTP/1.1 ") {
                status = rest[..3].parse().unwrap();
            } else if let Some((name, value)) = trimmed.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap();
            }
        }
        let mut answer = vec![0; length];
        self.stream.read_exact(&mut answer).await.unwrap();
        (status, answer)
    }
}

/// A 64-byte reading.
fn reading(i: usize) -> String {
    let text = format!(
        "{{\"seq\":{i},\"temp\":{}.{},\"unit\":\"C\"",
        20 + i % 9,
        i % 10
    );
    format!("{text:<63}}}")
}

async fn single(http: &str, total: usize, clients: usize) {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let http = http.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(&http).await;
            for i in (c..total).step_by(clients) {
                let (status, body) = client
                    .request("POST", "/topics/single/messages", reading(i).as_bytes())
                    .await;
                assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "single: {total} messages x 64 B, one per request, {clients} connections: {secs:.2} s, {:.0} msg/s",
        total as f64 / secs
    );
}

async fn batch(http: &str, batches: usize) {
    const PER_BATCH: usize = 1_000;
    const CLIENTS: usize = 4;
    let body = |b: usize| {
        let mut text = String::new();
        for i in 0..PER_BATCH {
            let payload = reading(b * PER_BATCH + i).replace('"', "\\\"");
            text.push_str(&format!("{{\"payload\":\"{payload}\"}}\n"));
        }
        text
    };
    let bodies: Vec<String> = (0..batches).map(body).collect();
    let bodies = std::sync::Arc::new(bodies);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (http, bodies) = (http.to_owned(), bodies.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(&http).await;
            for b in (c..bodies.len()).step_by(CLIENTS) {
                let (status, answer) = client
                    .request("POST", "/topics/batch/batch", bodies[b].as_bytes())
                    .await;
                assert_eq!(status, 201, "{}", String::from_utf8_lossy(&answer));
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let total = batches * PER_BATCH;
    println!(
        "batch: {batches} NDJSON batches x {PER_BATCH} messages x 64 B, {CLIENTS} connections: {secs:.2} s, {:.0} msg/s",
        total as f64 / secs
    );
}

fn micros_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

async fn connected(http: &str) -> bool {
    let mut client = Client::connect(http).await;
    let (_, body) = client.request("GET", "/peers", b"").await;
    let peers: serde_json::Value = serde_json::from_slice(&body).unwrap();
    peers["peers"]
        .as_array()
        .is_some_and(|p| p.iter().any(|p| p["state"] == "connected"))
}

async fn latency(a: &Node, b: &Node, total: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !connected(&b.http).await {
        assert!(Instant::now() < deadline, "B never connected to A");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Follow on B: SSE over chunked HTTP; each event's data line is one message.
    let mut follower = TcpStream::connect(&b.http).await.unwrap();
    follower.set_nodelay(true).unwrap();
    let request = format!(
        "GET /topics/latency/events HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
        b.http
    );
    follower.write_all(request.as_bytes()).await.unwrap();
    let receiver = tokio::spawn(async move {
        let mut lines = BufReader::new(follower).lines();
        let mut delays = Vec::with_capacity(total);
        while delays.len() < total {
            let Some(line) = lines.next_line().await.unwrap() else {
                break;
            };
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            let arrived = micros_now();
            let message: serde_json::Value = serde_json::from_str(data).unwrap();
            let sent: u64 = message["payload"].as_str().unwrap().parse().unwrap();
            delays.push(arrived.saturating_sub(sent));
        }
        delays
    });
    let mut publisher = Client::connect(&a.http).await;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let start = Instant::now();
    for _ in 0..total {
        tick.tick().await;
        let (status, _) = publisher
            .request(
                "POST",
                "/topics/latency/messages",
                micros_now().to_string().as_bytes(),
            )
            .await;
        assert_eq!(status, 201);
    }
    let rate = total as f64 / start.elapsed().as_secs_f64();
    let mut delays = tokio::time::timeout(Duration::from_secs(60), receiver)
        .await
        .expect("every message reached B")
        .unwrap();
    assert_eq!(delays.len(), total, "B's follow ended early");
    delays.sort_unstable();
    let at = |q: f64| delays[((delays.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    println!(
        "latency: {total} messages published on A at {rate:.0} msg/s, SSE on B (peer {}): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        a.listening,
        at(0.5),
        at(0.99),
        at(1.0)
    );
}

#[tokio::main]
async fn main() {
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let run = |name: &str| which.is_empty() || which.iter().any(|w| w == name);
    let root = tempfile::tempdir().unwrap();
    let (dir_a, dir_b) = (root.path().join("a"), root.path().join("b"));
    let key = multifeed(&dir_a, &["init"]).trim().to_owned();
    multifeed(&dir_b, &["join", &key]);

    if run("single") || run("batch") {
        let a = Node::start(&dir_a, &["--http", "127.0.0.1:0"]);
        if run("single") {
            single(
                &a.http,
                env_count("SINGLE", 40_000),
                env_count("CLIENTS", 32),
            )
            .await;
        }
        if run("batch") {
            batch(&a.http, env_count("BATCHES", 200)).await;
        }
    }
    if run("latency") {
        // Fresh stores: the throughput runs' feeds would be replicated first.
        let (dir_c, dir_d) = (root.path().join("c"), root.path().join("d"));
        let key = multifeed(&dir_c, &["init"]).trim().to_owned();
        multifeed(&dir_d, &["join", &key]);
        let a = Node::start(
            &dir_c,
            &["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"],
        );
        let b = Node::start(
            &dir_d,
            &["--peer", a.listening.as_str(), "--http", "127.0.0.1:0"],
        );
        latency(&a, &b, env_count("LATENCY_MESSAGES", 10_000)).await;
    }
}
