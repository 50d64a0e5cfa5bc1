//! `serve --discover dht` (cargo feature `dht`) on a local Hyperswarm DHT testnet:
//! a JS `hyperdht` bootstrapper with two more JS DHT nodes on 127.0.0.1
//! (`tests/js-dht/swarm.js`, pinned by its `package-lock.json`), two `multifeed`
//! nodes and one JS `hyperswarm` peer that know only the group's topic. Nothing
//! reaches the public DHT: every node is given the local bootstrap node.
//!
//! Needs `node` and `npm` on PATH and the npm registry reachable the first time
//! (`npm ci` runs once into `tests/js-dht/node_modules`). Without them these tests
//! fail saying so: they never skip.

mod cli_common;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{OnceLock, mpsc},
    time::{Duration, Instant},
};

use cli_common::{Gw, Running, WAIT, group, http, poll_until, publish, read_all};
use multifeed::SharedKey;

/// Upper bound for `npm ci`.
const NPM_TIMEOUT: Duration = Duration::from_secs(300);
/// Written into node_modules after a successful install: the lockfile it installed.
const STAMP: &str = "node_modules/.multifeed-installed-lock.json";
/// The node's own log lines the tests read (on stderr).
const LOG: &str = "warn,multifeed::node::dht=debug";

fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("js-dht")
}

/// Installs the pinned JS packages once per test process, or panics saying why
/// that is impossible.
fn ensure_js_deps() {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(message) = READY.get_or_init(install_js_deps) {
        panic!("the DHT tests cannot run: {message}");
    }
}

fn install_js_deps() -> Result<(), String> {
    let dir = js_dir();
    match Command::new("node").arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => return Err(format!("`node --version` failed: {}", out.status)),
        Err(e) => {
            return Err(format!(
                "`node` could not be run ({e}); Node.js (v18 or later) and npm must be on PATH"
            ));
        }
    }
    let lock = std::fs::read(dir.join("package-lock.json"))
        .map_err(|e| format!("cannot read {}/package-lock.json: {e}", dir.display()))?;
    if std::fs::read(dir.join(STAMP)).ok().as_deref() == Some(&lock[..])
        && dir.join("node_modules/hyperswarm/package.json").is_file()
    {
        return Ok(());
    }
    let mut npm = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("`npm` could not be run ({e}); Node.js and npm must be on PATH"))?;
    let (tx, rx) = mpsc::channel();
    let pid = npm.id();
    let stdout = npm.stdout.take();
    let stderr = npm.stderr.take();
    std::thread::spawn(move || {
        let _ = tx.send(npm.wait());
    });
    let status = match rx.recv_timeout(NPM_TIMEOUT) {
        Ok(status) => status.map_err(|e| format!("waiting for npm: {e}"))?,
        Err(_) => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            return Err(format!(
                "`npm ci` in {} took over {NPM_TIMEOUT:?}",
                dir.display()
            ));
        }
    };
    if !status.success() {
        let mut text = String::new();
        for pipe in [stdout.map(read_all_of), stderr.map(read_all_of)]
            .into_iter()
            .flatten()
        {
            text.push_str(&pipe);
        }
        return Err(format!(
            "`npm ci` in {} failed ({status}):\n{text}",
            dir.display()
        ));
    }
    std::fs::write(dir.join(STAMP), &lock)
        .map_err(|e| format!("cannot write the install stamp: {e}"))
}

fn read_all_of(mut pipe: impl std::io::Read) -> String {
    let mut text = String::new();
    let _ = pipe.read_to_string(&mut text);
    text
}

/// A running `node swarm.js ...`, killed when dropped.
struct Js {
    child: Child,
    lines: mpsc::Receiver<String>,
    errors: mpsc::Receiver<String>,
}

fn reader(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Js {
    fn spawn(args: &[&str]) -> Js {
        ensure_js_deps();
        let mut child = Command::new("node")
            .arg("swarm.js")
            .args(args)
            .current_dir(js_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `node swarm.js {}`: {e}", args.join(" ")));
        let lines = reader(child.stdout.take().expect("piped stdout"));
        let errors = reader(child.stderr.take().expect("piped stderr"));
        Js {
            child,
            lines,
            errors,
        }
    }

    /// The rest of the next line that is `keyword` or starts with `keyword `, within
    /// `deadline`.
    fn expect(&mut self, keyword: &str, deadline: Instant) -> String {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = self.lines.recv_timeout(left) else {
                let stderr: Vec<String> = self.errors.try_iter().collect();
                panic!(
                    "timed out waiting for `{keyword} ...` from swarm.js; its stderr:\n{}",
                    stderr.join("\n")
                );
            };
            if line == keyword {
                return String::new();
            }
            if let Some(rest) = line.strip_prefix(keyword).and_then(|r| r.strip_prefix(' ')) {
                return rest.to_owned();
            }
        }
    }
}

impl Drop for Js {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A local DHT: a bootstrapper and two more nodes; its bootstrap address.
fn testnet() -> (Js, String) {
    let mut testnet = Js::spawn(&["testnet", "2"]);
    let bootstrap = testnet.expect("BOOTSTRAP", Instant::now() + WAIT);
    (testnet, bootstrap)
}

fn topic_of(gw: &Gw) -> String {
    let key_file = gw.dir.with_extension("key");
    let hex = std::fs::read_to_string(&key_file)
        .unwrap_or_else(|e| panic!("read {}: {e}", key_file.display()));
    SharedKey::from_hex(hex.trim())
        .expect("the key file holds a key")
        .discovery_topic()
        .to_hex()
}

/// `--json serve --discover dht` through `bootstrap`, with its HTTP API; the node
/// and its API address.
fn dht_node(gw: &Gw, bootstrap: &str) -> (Running, String) {
    let mut cmd = gw.cmd(&[
        "--json",
        "serve",
        "--http",
        "127.0.0.1:0",
        "--discover",
        "dht",
        "--bootstrap",
        bootstrap,
        "--dht-bind",
        "127.0.0.1:0",
    ]);
    cmd.env("RUST_LOG", LOG);
    let mut running = Running::spawn(cmd);
    let first = running.json();
    let http = first["http"].as_str().expect("an HTTP address").to_owned();
    (running, http)
}

/// The `key=` and `local=` of the node's "joined the group's topic" line.
fn joined(node: &mut Running) -> (String, String) {
    let line = node.stderr_line("joined the group's topic on the DHT");
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
            .to_owned()
    };
    let local = field("local=Some(");
    (field("key="), local.trim_end_matches(')').to_owned())
}

#[test]
fn discover_dht_needs_a_bootstrap_node_or_the_public_network_by_name() {
    let root = tempfile::tempdir().unwrap();
    let gw = &group(root.path(), 1)[0];
    let stderr = gw.fails(&["serve", "--discover", "dht"]);
    assert!(
        stderr.contains("--bootstrap HOST:PORT") && stderr.contains("--dht-public"),
        "{stderr}"
    );
    let stderr = gw.fails(&["serve", "--bootstrap", "127.0.0.1:49737"]);
    assert!(stderr.contains("add --discover dht"), "{stderr}");
}

#[test]
fn two_nodes_and_a_js_peer_meet_by_topic_and_the_nodes_replicate() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 2);
    gws[0].ok(&["write", "sensors", "written on gw0 before anyone met"]);
    let topic = topic_of(&gws[0]);
    let (_testnet, bootstrap) = testnet();

    let started = Instant::now();
    let (mut node0, http0) = dht_node(&gws[0], &bootstrap);
    let (mut node1, http1) = dht_node(&gws[1], &bootstrap);
    let mut js = Js::spawn(&["peer", &bootstrap, &topic, "1000"]);
    let js_key = js.expect("KEY", Instant::now() + WAIT);
    let (key0, _) = joined(&mut node0);
    let (key1, _) = joined(&mut node1);

    // The Rust nodes meet: a session that proved the shared key.
    node0.event("connected");
    let first0 = started.elapsed();
    node1.event("connected");
    let first1 = started.elapsed();

    // Both Rust nodes reach the JS peer, and it reaches both.
    node0.stderr_line(&format!("remote={js_key}"));
    node1.stderr_line(&format!("remote={js_key}"));
    let deadline = Instant::now() + WAIT;
    let mut unseen = vec![key0, key1];
    while !unseen.is_empty() {
        let peer = js.expect("PEER", deadline);
        unseen.retain(|key| !peer.starts_with(key.as_str()));
    }
    let js_met_both = started.elapsed();

    // What gw0 held before reaches gw1, and what gw1 writes now reaches gw0.
    assert!(
        poll_until(WAIT, || read_all(&http1, "sensors").is_some_and(|m| m
            .iter()
            .any(|p| p == "written on gw0 before anyone met"))),
        "gw1 never read gw0's message; gw1 stderr: {}",
        node1.stderr_so_far()
    );
    publish(&http1, "sensors", "written on gw1 while connected").expect("published");
    assert!(
        poll_until(WAIT, || read_all(&http0, "sensors").is_some_and(|m| m
            .iter()
            .any(|p| p == "written on gw1 while connected"))),
        "gw0 never read gw1's message; gw0 stderr: {}",
        node0.stderr_so_far()
    );
    let replicated = started.elapsed();

    // `/peers` says the session came over the DHT.
    let rows = http(&http0, "GET", "/peers", &[], b"")
        .map(|a| a.json()["peers"].as_array().cloned().unwrap_or_default())
        .unwrap_or_default();
    assert!(
        rows.iter()
            .any(|row| row["source"] == "dht" && row["state"] == "connected"),
        "{rows:?}"
    );
    // The two Rust nodes reached each other both ways; one session is kept,
    // seen from both sides.
    let node_id = |http_addr: &str| {
        http(http_addr, "GET", "/health", &[], b"")
            .expect("health")
            .json()["node"]
            .as_str()
            .expect("node id")
            .to_owned()
    };
    let sessions_with = |http_addr: &str, node: &str| {
        http(http_addr, "GET", "/peers", &[], b"")
            .map(|a| a.json()["peers"].as_array().cloned().unwrap_or_default())
            .unwrap_or_default()
            .iter()
            .filter(|row| row["node"] == node && row["state"] == "connected")
            .count()
    };
    let (id0, id1) = (node_id(&http0), node_id(&http1));
    assert!(
        poll_until(WAIT, || sessions_with(&http0, &id1) == 1
            && sessions_with(&http1, &id0) == 1),
        "expected one session between the nodes: gw0 lists {}, gw1 lists {}",
        sessions_with(&http0, &id1),
        sessions_with(&http1, &id0)
    );
    eprintln!(
        "DHT figures (loopback testnet): first authenticated peer after {first0:.2?} (gw0) and {first1:.2?} (gw1) from the nodes' start; the JS peer met both after {js_met_both:.2?}; both messages replicated after {replicated:.2?}"
    );
    node0.stop();
    node1.stop();
}

#[test]
fn a_peer_we_dialed_is_dialed_again_after_its_connection_ended() {
    let root = tempfile::tempdir().unwrap();
    let gw = &group(root.path(), 1)[0];
    let (_testnet, bootstrap) = testnet();
    // The JS peer only announces: every connection to it is one the node dialed.
    let mut js = Js::spawn(&["peer", &bootstrap, &topic_of(gw), "1000", "server"]);
    let js_key = js.expect("KEY", Instant::now() + WAIT);
    let mut cmd = gw.cmd(&[
        "--json",
        "serve",
        "--discover",
        "dht",
        "--bootstrap",
        &bootstrap,
        "--dht-bind",
        "127.0.0.1:0",
        // The JS peer never speaks the replication protocol: its session ends after
        // a second, like a connection lost.
        "--timeout",
        "1",
    ]);
    cmd.env("RUST_LOG", LOG);
    let mut node = Running::spawn(cmd);
    let dialed = format!("remote={js_key} we_dialed=true");
    node.stderr_line(&dialed);
    // hyperswarm 0.1.0 never dials a key twice: this one is the node's redial.
    node.stderr_line(&dialed);
    node.stop();
}

#[test]
fn a_dht_request_that_panics_hyperdht_does_not_stop_the_node() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 2);
    let (_testnet, bootstrap) = testnet();
    let (mut node0, http0) = dht_node(&gws[0], &bootstrap);
    let (_, local) = joined(&mut node0);

    // One PEER_HOLEPUNCH request, which any DHT node may send, reaches a `todo!()`.
    let mut attacker = Js::spawn(&["holepunch", &bootstrap, &local]);
    attacker.expect("SENT", Instant::now() + WAIT);
    let line = node0.stderr_line("the DHT library (hyperswarm 0.1.0) panicked");
    assert!(line.contains("the node keeps running"), "{line}");
    joined(&mut node0);

    // The node still answers, and its restarted DHT still finds the group.
    publish(&http0, "sensors", "written on gw0 after the panic").expect("published");
    let (mut node1, http1) = dht_node(&gws[1], &bootstrap);
    node0.event("connected");
    assert!(
        poll_until(WAIT, || read_all(&http1, "sensors").is_some_and(|m| m
            .iter()
            .any(|p| p == "written on gw0 after the panic"))),
        "gw1 never read gw0's message; gw1 stderr: {}",
        node1.stderr_so_far()
    );
    node0.stop();
    node1.stop();
}
