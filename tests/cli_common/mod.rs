//! Helpers of the end-to-end tests of the `multifeed` binary: gateways in
//! temporary directories, long-running children whose output lines are read with
//! a timeout (never a sleep), signals.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

pub const BIN: &str = env!("CARGO_BIN_EXE_multifeed");
/// Generous: a 2-core host shared with builds can be slow.
pub const WAIT: Duration = Duration::from_secs(60);

/// One gateway: a storage directory (its key file sits next to it).
pub struct Gw {
    pub dir: PathBuf,
}

impl Gw {
    pub fn new(root: &Path, name: &str) -> Self {
        Self {
            dir: root.join(name),
        }
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        // A soak run points this at a copy, so a rebuild meanwhile cannot swap it.
        let bin = std::env::var_os("MULTIFEED_TEST_BIN").unwrap_or_else(|| BIN.into());
        let mut cmd = Command::new(bin);
        cmd.arg("--dir").arg(&self.dir).args(args);
        cmd.env_remove("MULTIFEED_KEY").env_remove("RUST_LOG");
        cmd
    }

    /// Runs a command to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("run multifeed")
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "multifeed {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// Runs a command that must fail; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "multifeed {args:?} should have failed"
        );
        String::from_utf8(out.stderr).expect("utf-8 output")
    }

    /// Publishes every line of `lines` to `topic`; returns the addresses printed.
    pub fn write_stdin(&self, topic: &str, lines: &str) -> Vec<String> {
        let out = self.write_stdin_with(&["write", topic], lines);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Runs `args` with `input` on stdin, to completion.
    pub fn write_stdin_with(&self, args: &[&str], input: &str) -> Output {
        let mut child = self
            .cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn write");
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_owned();
        // Fed from a thread so a large input cannot deadlock against the output.
        let feeder = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let out = child.wait_with_output().unwrap();
        // A command that refuses its input may close stdin before it is all written.
        let _ = feeder.join().unwrap();
        out
    }

    /// Payloads of `read <topic> --json` (from `from`), and the cursor.
    pub fn read(&self, topic: &str, from: Option<&str>) -> (Vec<String>, String) {
        let mut args = vec!["--json", "read", topic];
        if let Some(from) = from {
            args.extend(["--from", from]);
        }
        parse_read(&self.ok(&args))
    }

    /// Payloads of `read <topic> --json` with more arguments, and the cursor.
    pub fn read_args(&self, topic: &str, extra: &[&str]) -> (Vec<String>, String) {
        let mut args = vec!["--json", "read", topic];
        args.extend_from_slice(extra);
        parse_read(&self.ok(&args))
    }

    /// The hex key of this gateway's writer for `topic` (it must have written).
    pub fn writer_key(&self, topic: &str) -> String {
        let name = format!("topic/{topic}");
        self.ok(&["--json", "feeds"])
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|f| f["name"] == name.as_str())
            .and_then(|f| f["key"].as_str().map(str::to_owned))
            .unwrap_or_else(|| panic!("no writer for {topic}"))
    }

    /// `serve` on a free loopback port (text output).
    pub fn serve(&self) -> Running {
        self.serve_on("127.0.0.1:0")
    }

    /// `serve --listen addr` (text output); waits for it to listen.
    pub fn serve_on(&self, addr: &str) -> Running {
        let mut running = Running::spawn(self.cmd(&["serve", "--listen", addr]));
        let line = running.line();
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .trim()
            .to_owned();
        running.addr = addr;
        running
    }

    /// `--json serve --listen addr`; waits for it to listen.
    pub fn serve_json(&self, addr: &str) -> Running {
        let mut running = Running::spawn(self.cmd(&["--json", "serve", "--listen", addr]));
        let line = running.json();
        running.addr = line["listening"]
            .as_str()
            .unwrap_or_else(|| panic!("unexpected first line {line}"))
            .to_owned();
        running
    }

    pub fn verify(&self) {
        let out = self.ok(&["verify"]);
        assert!(out.contains("feeds verified"), "{out}");
    }
}

pub fn parse_read(stdout: &str) -> (Vec<String>, String) {
    let mut payloads = Vec::new();
    let mut cursor = String::new();
    for line in stdout.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        if let Some(c) = v["cursor"].as_str() {
            cursor = c.to_owned();
        } else if v.get("event").is_none() {
            payloads.push(v["payload"].as_str().expect("payload").to_owned());
        }
    }
    (payloads, cursor)
}

/// A long-running child whose stdout and stderr lines are read with a timeout;
/// killed on drop.
pub struct Running {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    errors: mpsc::Receiver<String>,
    errors_seen: Vec<String>,
    pub addr: String,
    /// Every stdout line read so far.
    pub seen: Vec<String>,
}

fn reader(stream: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Running {
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn multifeed");
        let lines = reader(child.stdout.take().unwrap());
        let errors = reader(child.stderr.take().unwrap());
        Self {
            child: Some(child),
            lines,
            errors,
            errors_seen: Vec::new(),
            addr: String::new(),
            seen: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The next stdout line.
    pub fn line(&mut self) -> String {
        let Ok(line) = self.lines.recv_timeout(WAIT) else {
            panic!(
                "timed out waiting for a line from the child; stderr: {}",
                self.stderr_so_far()
            )
        };
        self.seen.push(line.clone());
        line
    }

    /// The next stdout line, as JSON.
    pub fn json(&mut self) -> serde_json::Value {
        let line = self.line();
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("not a JSON line: {line:?}"))
    }

    /// Reads JSON lines until one satisfies `pred`; returns it and those before it.
    pub fn until(
        &mut self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> (serde_json::Value, Vec<serde_json::Value>) {
        let deadline = Instant::now() + WAIT;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = self.lines.recv_timeout(left) else {
                panic!(
                    "timed out waiting for {what}; stdout so far: {:?}; stderr: {}",
                    before,
                    self.stderr_so_far()
                )
            };
            self.seen.push(line.clone());
            let value: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|_| panic!("not a JSON line: {line:?}"));
            if pred(&value) {
                return (value, before);
            }
            before.push(value);
        }
    }

    /// Waits for an `{"event": name}` line; returns it and the lines before it.
    pub fn event(&mut self, name: &str) -> (serde_json::Value, Vec<serde_json::Value>) {
        self.until(&format!("event {name:?}"), |v| v["event"] == name)
    }

    /// What the child wrote on stderr so far (without waiting).
    pub fn stderr_so_far(&mut self) -> String {
        self.errors_seen.extend(self.errors.try_iter());
        self.errors_seen.join("\n")
    }

    /// Waits for a stderr line containing `needle`; returns it.
    pub fn stderr_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = self.errors.recv_timeout(left) else {
                panic!(
                    "timed out waiting for {needle:?} on stderr; so far: {}",
                    self.errors_seen.join("\n")
                )
            };
            self.errors_seen.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// Sends a signal by name (`INT`, `TERM`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Whether the child has exited (it is reaped if so).
    pub fn has_exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|child| child.try_wait().ok().flatten().is_some())
    }

    /// SIGKILL, then reaps it.
    pub fn kill9(mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill -9");
            child.wait().expect("reap");
        }
    }

    /// Waits (bounded) for the child to exit; returns its status, the rest of
    /// its stdout and its whole stderr.
    pub fn finish(mut self) -> (ExitStatus, Vec<String>, String) {
        let mut child = self.child.take().expect("running");
        let (tx, rx) = mpsc::channel();
        let pid = child.id();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let status = match rx.recv_timeout(WAIT) {
            Ok(status) => status.expect("wait"),
            Err(_) => {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
                panic!("the child did not exit within {WAIT:?}")
            }
        };
        // The pipes close at exit, so these end.
        let rest: Vec<String> = self.lines.iter().collect();
        self.errors_seen.extend(self.errors.iter());
        (status, rest, self.errors_seen.join("\n"))
    }

    /// Stops the child with SIGTERM (a clean shutdown) and waits for it.
    pub fn stop(self) {
        self.signal("TERM");
        let (status, _, stderr) = self.finish();
        assert!(status.success(), "{status}: {stderr}");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `n` gateways of one group: the first ran `init`, the others `join`.
pub fn group(root: &Path, n: usize) -> Vec<Gw> {
    let gws: Vec<Gw> = (0..n).map(|i| Gw::new(root, &format!("gw{i}"))).collect();
    let key = gws[0].ok(&["init"]).trim().to_owned();
    assert_eq!(key.len(), 64, "init prints the key");
    for gw in &gws[1..] {
        gw.ok(&["join", &key]);
    }
    gws
}

pub fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// A loopback port that was free a moment ago (the OS hands out a fresh one).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A running `multifeed --json serve` node with its peer and HTTP addresses.
pub struct Node {
    pub running: Running,
    pub http: String,
}

impl Gw {
    /// `--json serve` with `args` (e.g. `--listen`, `--peer`, `--http`); waits for
    /// its first line, which says where it listens.
    pub fn node(&self, args: &[&str]) -> Node {
        let mut all = vec!["--json", "serve"];
        all.extend_from_slice(args);
        let mut running = Running::spawn(self.cmd(&all));
        let first = running.json();
        running.addr = first["listening"].as_str().unwrap_or_default().to_owned();
        let http = first["http"].as_str().unwrap_or_default().to_owned();
        Node { running, http }
    }
}

/// An answer of the node's HTTP API.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub body: String,
}

impl HttpAnswer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|_| panic!("not JSON ({}): {:?}", self.status, self.body))
    }
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`); `None`
/// if the node cannot be reached or the connection broke.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<HttpAnswer> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(WAIT)).ok()?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    stream.write_all(body).ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut payload = raw[split + 4..].to_vec();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        payload = dechunk(&payload)?;
    }
    Some(HttpAnswer {
        status,
        body: String::from_utf8_lossy(&payload).into_owned(),
    })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..line_end]).ok()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// Publishes one message through the API; its address if acknowledged.
pub fn publish(http_addr: &str, topic: &str, payload: &str) -> Option<String> {
    let answer = http(
        http_addr,
        "POST",
        &format!("/topics/{topic}/messages"),
        &[("Content-Type", "text/plain")],
        payload.as_bytes(),
    )?;
    (answer.status == 201).then(|| answer.json()["address"].as_str().map(str::to_owned))?
}

/// Every payload of `topic` a node holds, read page by page with the cursor;
/// `None` if the node cannot be reached.
pub fn read_all(http_addr: &str, topic: &str) -> Option<Vec<String>> {
    let mut payloads = Vec::new();
    let mut cursor = String::new();
    loop {
        let answer = http(
            http_addr,
            "GET",
            &format!("/topics/{topic}/messages?limit=5000&from={cursor}"),
            &[],
            b"",
        )?;
        assert_eq!(answer.status, 200, "{}", answer.body);
        let page = answer.json();
        let messages = page["messages"].as_array().expect("messages");
        if messages.is_empty() {
            return Some(payloads);
        }
        payloads.extend(
            messages
                .iter()
                .map(|m| m["payload"].as_str().expect("a text payload").to_owned()),
        );
        cursor = page["cursor"].as_str().expect("cursor").to_owned();
    }
}

/// Polls `condition` until it holds or `deadline` passes; whether it held.
pub fn poll_until(deadline: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        // Polling interval for a condition checked over the network, not a wait
        // for an event: the condition decides.
        std::thread::sleep(Duration::from_millis(50));
    }
}
