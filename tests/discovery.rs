//! Finding peers by the group alone (`serve --discover lan`): real nodes as
//! separate processes on loopback, real mDNS (multicast on `lo`) on a UDP port
//! of the test's own, so parallel tests and the LAN's mDNS stay apart.

mod cli_common;

use std::{
    net::TcpListener as StdListener,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use cli_common::*;

const TOPIC: &str = "readings";

/// A UDP port that was free a moment ago, for one test's mDNS.
fn free_mdns_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port()
}

fn lan_node(gw: &Gw, mdns_port: u16) -> Node {
    lan_node_with(gw, mdns_port, &[])
}

fn lan_node_with(gw: &Gw, mdns_port: u16, extra: &[&str]) -> Node {
    let port = mdns_port.to_string();
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--discover",
        "lan",
        "--mdns-port",
        &port,
        "--http",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    gw.node(&args)
}

/// Whether every node holds every one of `expected`.
fn converged(nodes: &[&Node], expected: &[String]) -> bool {
    nodes.iter().all(|node| {
        read_all(&node.http, TOPIC).is_some_and(|held| expected.iter().all(|p| held.contains(p)))
    })
}

/// The rows of a node's `/peers`.
fn peers(node: &Node) -> Vec<serde_json::Value> {
    http(&node.http, "GET", "/peers", &[], b"")
        .map(|a| a.json()["peers"].as_array().cloned().unwrap_or_default())
        .unwrap_or_default()
}

fn connected(node: &Node) -> usize {
    peers(node)
        .iter()
        .filter(|p| p["state"] == "connected")
        .count()
}

fn publish_all(round: usize, nodes: &[(&str, &Node)], expected: &mut Vec<String>) {
    for (name, node) in nodes {
        let payload = format!("{name}-{round}");
        publish(&node.http, TOPIC, &payload).expect("acknowledged");
        expected.push(payload);
    }
}

/// Three gateways that already hold readings, given nothing but the key: they
/// find each other, converge while publishing, keep one session per pair (also
/// where a peer is both configured and discovered), and find each other again
/// after one of them restarts.
#[test]
fn nodes_with_only_the_key_find_each_other_on_the_lan_and_converge() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 3);
    let mut stored: Vec<Vec<String>> = Vec::new();
    for (i, gw) in gws.iter().enumerate() {
        stored.push(
            (0..5)
                .map(|n| {
                    let payload = format!("stored-{i}-{n}");
                    gw.ok(&["write", TOPIC, &payload]);
                    payload
                })
                .collect(),
        );
    }
    let mut expected = [stored[0].clone(), stored[1].clone()].concat();
    let mdns = free_mdns_port();
    let started = Instant::now();
    let mut a = lan_node(&gws[0], mdns);
    let b = lan_node(&gws[1], mdns);
    let (first, _) = a.running.event("connected");
    let found_after = started.elapsed();
    assert!(first["peer"].is_string(), "{first}");
    eprintln!("LAN: first peer connected {found_after:.2?} after the first node started");
    for round in 0..20 {
        publish_all(round, &[("a", &a), ("b", &b)], &mut expected);
    }
    assert!(
        poll_until(WAIT, || converged(&[&a, &b], &expected)),
        "a and b did not converge: a holds {:?}, b holds {:?}, a's peers {:?}",
        read_all(&a.http, TOPIC).map(|h| h.len()),
        read_all(&b.http, TOPIC).map(|h| h.len()),
        peers(&a)
    );

    // A third one joins later, with its own stored readings; it also has `a`
    // configured: still one session with it.
    let c = lan_node_with(&gws[2], mdns, &["--peer", &a.running.addr]);
    expected.extend(stored[2].clone());
    for round in 20..30 {
        publish_all(round, &[("a", &a), ("b", &b), ("c", &c)], &mut expected);
    }
    assert!(
        poll_until(WAIT, || converged(&[&a, &b, &c], &expected)),
        "the three nodes did not converge"
    );
    // One session per pair, and every peer was found on the LAN.
    assert!(
        poll_until(WAIT, || [&a, &b, &c].iter().all(|n| connected(n) == 2)),
        "expected 2 sessions each: a {}, b {}, c {}",
        connected(&a),
        connected(&b),
        connected(&c)
    );
    for node in [&a, &b, &c] {
        for row in peers(node) {
            if row["direction"] == "dialed" && row["address"] != a.running.addr.as_str() {
                assert_eq!(row["source"], "lan", "{row}");
            }
        }
    }

    // b restarts (a new node id, a new port): found again, and it catches up.
    b.running.stop();
    for round in 30..35 {
        publish_all(round, &[("a", &a), ("c", &c)], &mut expected);
    }
    let b = lan_node(&gws[1], mdns);
    publish_all(35, &[("b", &b)], &mut expected);
    assert!(
        poll_until(WAIT, || converged(&[&a, &b, &c], &expected)),
        "the restarted node did not catch up"
    );
    for node in [a, b, c] {
        node.running.stop();
    }
    for gw in &gws {
        gw.verify();
    }
}

/// Counts the connections to `target` it forwards.
fn counting_proxy(target: String) -> (String, Arc<AtomicUsize>) {
    let listener = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    std::thread::spawn(move || {
        for inbound in listener.incoming() {
            let Ok(inbound) = inbound else { return };
            counted.fetch_add(1, Ordering::SeqCst);
            let Ok(outbound) = std::net::TcpStream::connect(&target) else {
                continue;
            };
            for (mut from, mut to) in [
                (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                (outbound, inbound),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    (addr, count)
}

/// Announces, over mDNS on `port`, a node of `topic` at `addr`.
fn announce(
    daemon: &mdns_sd::ServiceDaemon,
    topic: &multifeed::DiscoveryTopic,
    node: &str,
    addr: &str,
) -> String {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let properties = [("topic", topic.to_hex()), ("node", node.to_owned())];
    let info = mdns_sd::ServiceInfo::new(
        "_multifeed._tcp.local.",
        node,
        "impostor.local.",
        addr.ip().to_string().as_str(),
        addr.port(),
        &properties[..],
    )
    .unwrap();
    let fullname = info.get_fullname().to_owned();
    daemon.register(info).unwrap();
    fullname
}

/// A record of our topic that leads to a node of another group (misconfigured,
/// or hostile) costs each node one refused connection, however often it is
/// announced; the group's real peers are still found.
#[test]
fn a_node_of_another_group_announced_under_our_topic_is_dialed_once() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 2);
    let key = std::fs::read_to_string(root.path().join("gw0.key")).unwrap();
    let topic = multifeed::SharedKey::from_hex(key.trim())
        .unwrap()
        .discovery_topic();
    let stranger = Gw::new(root.path(), "stranger");
    stranger.ok(&["init"]);
    let stranger_node = stranger.node(&["--listen", "127.0.0.1:0"]);
    let (proxy, dials) = counting_proxy(stranger_node.running.addr.clone());

    let mdns = free_mdns_port();
    let a = lan_node(&gws[0], mdns);
    let impostor = mdns_sd::ServiceDaemon::new_with_port(mdns).unwrap();
    // The largest id: `a` is the smaller node, so it dials at once.
    let id = "f".repeat(32);
    let fullname = announce(&impostor, &topic, &id, &proxy);
    assert!(
        poll_until(WAIT, || peers(&a).iter().any(|p| p["state"] == "refused")),
        "the stranger was never refused: {:?}",
        peers(&a)
    );
    assert_eq!(dials.load(Ordering::SeqCst), 1);
    let refused: Vec<_> = peers(&a)
        .into_iter()
        .filter(|p| p["state"] == "refused")
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    let reason = refused[0]["last_error"].as_str().unwrap_or_default();
    assert!(reason.contains("group"), "{reason}");

    // Withdrawn and announced again, then a real member arrives and is found:
    // the stranger is not dialed again meanwhile.
    let heard_by = |node: &Node, what: &str| {
        http(&node.http, "GET", "/health", &[], b"").map_or(0, |h| {
            h.json()["discovery"][what].as_u64().unwrap_or_default()
        })
    };
    let heard = |what: &str| heard_by(&a, what);
    let announced_before = heard("announcements_total");
    let gone = impostor.unregister(&fullname).unwrap();
    let _ = gone.recv_timeout(WAIT);
    assert!(
        poll_until(WAIT, || heard("withdrawals_total") >= 1),
        "the withdrawal never reached a"
    );
    announce(&impostor, &topic, &id, &proxy);
    assert!(
        poll_until(WAIT, || heard("announcements_total") > announced_before),
        "the new announcement never reached a"
    );
    let b = lan_node(&gws[1], mdns);
    publish(&b.http, TOPIC, "from-b").expect("acknowledged");
    assert!(
        poll_until(WAIT, || converged(&[&a], &["from-b".to_owned()])),
        "a never found b"
    );
    // b sees the same record and is refused once too.
    assert!(
        poll_until(WAIT, || heard_by(&b, "refusals_total") == 1),
        "b never dialed the stranger"
    );
    assert_eq!(
        dials.load(Ordering::SeqCst),
        2,
        "the stranger was dialed again"
    );
    assert_eq!(heard("refusals_total"), 1);
    let _ = impostor.shutdown();
    for node in [a, b, stranger_node] {
        node.running.stop();
    }
}

/// The scale figure: `DISCOVERY_NODES` (default 50) gateways on one machine,
/// each holding one reading of its own and knowing nothing but the key,
/// converge on every feed. Prints the time to converge and the sessions per node.
#[test]
fn many_nodes_converge_by_the_topic_alone() {
    let n: usize = std::env::var("DISCOVERY_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), n);
    let mdns = free_mdns_port();
    let started = Instant::now();
    let nodes: Vec<Node> = gws.iter().map(|gw| lan_node(gw, mdns)).collect();
    let all_up = started.elapsed();
    let expected: Vec<String> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let payload = format!("from-{i}");
            publish(&node.http, TOPIC, &payload).expect("acknowledged");
            payload
        })
        .collect();
    let everyone: Vec<&Node> = nodes.iter().collect();
    assert!(
        poll_until(WAIT * 3, || converged(&everyone, &expected)),
        "{n} nodes did not converge"
    );
    let converged_after = started.elapsed();
    let sessions: Vec<usize> = nodes.iter().map(connected).collect();
    let (min, max) = (
        sessions.iter().min().copied().unwrap_or(0),
        sessions.iter().max().copied().unwrap_or(0),
    );
    let mean = sessions.iter().sum::<usize>() as f64 / n as f64;
    eprintln!(
        "{n} nodes: all started in {all_up:.2?}, converged on all {n} feeds {converged_after:.2?} after the first start; sessions per node min {min} mean {mean:.1} max {max}"
    );
    // Every node stops cleanly, all at once.
    for node in &nodes {
        node.running.signal("TERM");
    }
    for node in nodes {
        let (status, _, stderr) = node.running.finish();
        assert!(status.success(), "{status}: {stderr}");
    }
}

/// Network namespaces joined by a bridge: hosts of one LAN on this machine.
/// Removed (with their interfaces) on drop.
struct Lan {
    prefix: String,
    hosts: usize,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (Debian package iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Lan {
    /// `hosts` namespaces with addresses 10.77.0.1.. on one bridge (in a
    /// namespace of its own, so the machine's network is left alone).
    fn new(hosts: usize) -> Result<Self, String> {
        let prefix = format!("mf{}", std::process::id());
        let lan = Self { prefix, hosts };
        let switch = lan.switch();
        ip(&["netns", "add", &switch])?;
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", "br0", "up"])?;
        for i in 0..hosts {
            let host = lan.host(i);
            let (inside, outside) = (format!("{host}i"), format!("{host}o"));
            ip(&["netns", "add", &host])?;
            ip(&["-n", &host, "link", "set", "lo", "up"])?;
            ip(&[
                "link", "add", &inside, "netns", &host, "type", "veth", "peer", "name", &outside,
                "netns", &switch,
            ])?;
            ip(&["-n", &switch, "link", "set", &outside, "master", "br0"])?;
            ip(&["-n", &switch, "link", "set", &outside, "up"])?;
            let addr = format!("10.77.0.{}/24", i + 1);
            ip(&["-n", &host, "addr", "add", &addr, "dev", &inside])?;
            ip(&["-n", &host, "link", "set", &inside, "multicast", "on"])?;
            ip(&["-n", &host, "link", "set", &inside, "up"])?;
        }
        Ok(lan)
    }

    fn switch(&self) -> String {
        format!("{}s", self.prefix)
    }

    fn host(&self, i: usize) -> String {
        format!("{}h{i}", self.prefix)
    }

    /// `multifeed` run on host `i`.
    fn cmd(&self, i: usize, gw: &Gw, args: &[&str]) -> std::process::Command {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.host(i), BIN, "--dir"])
            .arg(&gw.dir)
            .args(args)
            .env_remove("MULTIFEED_KEY")
            .env_remove("RUST_LOG");
        cmd
    }

    /// Payloads of `topic` that gateway `gw` on host `i` holds (through its node).
    fn read(&self, i: usize, gw: &Gw, topic: &str) -> Vec<String> {
        let out = self.cmd(i, gw, &["read", topic]).output().expect("read");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split("  ").nth(2).map(str::to_owned))
            .collect()
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for i in 0..self.hosts {
            let _ = ip(&["netns", "del", &self.host(i)]);
        }
        let _ = ip(&["netns", "del", &self.switch()]);
    }
}

/// Three hosts of a LAN (network namespaces on a bridge, mDNS on its standard
/// port) hold gateways of one group and a fourth holds another group's: the
/// group finds itself by the key alone and converges; the other group's node
/// is never dialed (its topic differs).
#[test]
fn gateways_on_separate_hosts_of_a_lan_find_each_other() {
    let lan = Lan::new(4).unwrap_or_else(|reason| {
        panic!("this test needs network namespaces (run as root with iproute2): {reason}")
    });
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 3);
    let stranger = Gw::new(root.path(), "stranger");
    stranger.ok(&["init"]);
    let serve = [
        "--json",
        "serve",
        "--listen",
        "0.0.0.0:7000",
        "--discover",
        "lan",
        "--http",
        "127.0.0.1:0",
    ];
    let mut nodes: Vec<Running> = gws
        .iter()
        .chain([&stranger])
        .enumerate()
        .map(|(i, gw)| Running::spawn(lan.cmd(i, gw, &serve)))
        .collect();
    for node in &mut nodes {
        let first = node.json();
        assert_eq!(first["listening"], "0.0.0.0:7000", "{first}");
    }
    let mut expected = Vec::new();
    for (i, gw) in gws.iter().enumerate() {
        let payload = format!("host-{i}");
        let out = lan
            .cmd(i, gw, &["write", TOPIC, &payload])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        expected.push(payload);
    }
    assert!(
        poll_until(WAIT, || (0..3).all(|i| {
            let held = lan.read(i, &gws[i], TOPIC);
            expected.iter().all(|p| held.contains(p))
        })),
        "the hosts did not converge: {:?}",
        (0..3)
            .map(|i| lan.read(i, &gws[i], TOPIC))
            .collect::<Vec<_>>()
    );
    // Every peer was reached at its LAN address; the stranger never was.
    let stranger_node = nodes.pop().unwrap();
    stranger_node.signal("TERM");
    let (status, lines, stderr) = stranger_node.finish();
    assert!(status.success(), "{stderr}");
    assert!(
        !lines.iter().any(|l| l.contains("\"connected\"")),
        "the other group's node had a session: {lines:?}"
    );
    for node in nodes {
        node.signal("TERM");
        let (status, lines, stderr) = node.finish();
        assert!(status.success(), "{stderr}");
        let peers: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains("\"connected\""))
            .collect();
        assert!(peers.iter().all(|l| l.contains("10.77.0.")), "{peers:?}");
        assert!(!peers.iter().any(|l| l.contains("10.77.0.4")), "{peers:?}");
    }
}
