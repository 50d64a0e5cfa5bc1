//! The gateway node (`serve --listen --peer --http`) as separate processes on
//! loopback: publishing through HTTP while replicating, one session between two
//! nodes that dial each other, kill -9 and restart, the token off loopback.

mod cli_common;

use std::collections::HashMap;

use cli_common::*;

const TOPIC: &str = "readings";

/// How many times each payload occurs.
fn counts(payloads: &[String]) -> HashMap<&str, usize> {
    let mut counts = HashMap::new();
    for p in payloads {
        *counts.entry(p.as_str()).or_default() += 1;
    }
    counts
}

/// Asserts every acknowledged payload is held exactly once, and none twice.
fn assert_exactly_once(node: &str, held: &[String], acked: &[String]) {
    let counts = counts(held);
    if let Some((payload, n)) = counts.iter().find(|(_, n)| **n > 1) {
        panic!("{node} holds {payload:?} {n} times");
    }
    let missing: Vec<&String> = acked
        .iter()
        .filter(|p| !counts.contains_key(p.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{node} lacks {} acknowledged messages, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}

/// Whether every node holds every acknowledged message.
fn converged(https: &[&str], acked: &[String]) -> bool {
    https.iter().all(|http| {
        read_all(http, TOPIC).is_some_and(|held| {
            let held = counts(&held);
            acked.iter().all(|p| held.contains_key(p.as_str()))
        })
    })
}

/// Connected sessions a node's `/peers` lists.
fn connected(http_addr: &str) -> usize {
    let Some(answer) = http(http_addr, "GET", "/peers", &[], b"") else {
        return usize::MAX;
    };
    answer.json()["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .filter(|p| p["state"] == "connected")
        .count()
}

#[test]
fn two_nodes_dialing_each_other_converge_on_one_session_while_both_publish() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 2);
    let (pa, pb) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let a = gws[0].node(&["--listen", &pa, "--peer", &pb, "--http", "127.0.0.1:0"]);
    let b = gws[1].node(&["--listen", &pb, "--peer", &pa, "--http", "127.0.0.1:0"]);
    let mut acked = Vec::new();
    for i in 0..150 {
        for (name, node) in [("a", &a), ("b", &b)] {
            let payload = format!("{name}-{i}");
            publish(&node.http, TOPIC, &payload).expect("acknowledged");
            acked.push(payload);
        }
    }
    assert!(
        poll_until(WAIT, || converged(&[&a.http, &b.http], &acked)),
        "the two nodes did not converge"
    );
    for (name, node) in [("a", &a), ("b", &b)] {
        assert_exactly_once(name, &read_all(&node.http, TOPIC).unwrap(), &acked);
    }
    // Each dialed the other; one session is kept, seen from both sides.
    assert!(
        poll_until(WAIT, || connected(&a.http) == 1 && connected(&b.http) == 1),
        "expected one session: a lists {}, b lists {} connected",
        connected(&a.http),
        connected(&b.http)
    );
    // Messages still flow over the session that was kept.
    publish(&a.http, TOPIC, "after").expect("acknowledged");
    acked.push("after".into());
    assert!(poll_until(WAIT, || converged(&[&b.http], &acked)));
    // SIGTERM: the session ends with its reason, and the node exits 0.
    a.running.signal("TERM");
    let (status, lines, stderr) = a.running.finish();
    assert!(status.success(), "{status}: {stderr}");
    let ended: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "disconnected")
        .collect();
    assert!(
        ended.iter().any(|v| v["reason"] == "local_stop"),
        "no session ended with local_stop: {lines:?}"
    );
    b.running.stop();
    for gw in &gws {
        gw.verify();
    }
}

/// Publishes `<name>-<i>` to each node; keeps what was acknowledged.
fn publish_round(i: usize, nodes: &[(&str, &str)], acked: &mut Vec<String>) {
    for (name, http_addr) in nodes {
        let payload = format!("{name}-{i}");
        if publish(http_addr, TOPIC, &payload).is_some() {
            acked.push(payload);
        }
    }
}

#[test]
fn a_node_killed_mid_stream_catches_up_after_restart_with_every_acknowledged_message_once() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 2);
    let pa = format!("127.0.0.1:{}", free_port());
    let hb = format!("127.0.0.1:{}", free_port());
    let a = gws[0].node(&["--listen", &pa, "--http", "127.0.0.1:0"]);
    let b_args = ["--peer", pa.as_str(), "--http", hb.as_str()];
    let mut b = gws[1].node(&b_args);
    let mut acked = Vec::new();
    for i in 0..100 {
        publish_round(i, &[("a", &a.http), ("b", &b.http)], &mut acked);
    }
    // Mid-stream: B dies with messages in flight both ways.
    b.running.kill9();
    for i in 100..200 {
        publish_round(i, &[("a", &a.http)], &mut acked);
    }
    b = gws[1].node(&b_args);
    for i in 200..300 {
        publish_round(i, &[("a", &a.http), ("b", &b.http)], &mut acked);
    }
    assert!(acked.len() >= 500, "only {} acknowledged", acked.len());
    assert!(
        poll_until(WAIT, || converged(&[&a.http, &b.http], &acked)),
        "B did not catch up after its restart"
    );
    for (name, node) in [("a", &a), ("b", &b)] {
        assert_exactly_once(name, &read_all(&node.http, TOPIC).unwrap(), &acked);
    }
    a.running.stop();
    b.running.stop();
    for gw in &gws {
        gw.verify();
    }
    // The CLI reads the same after the nodes stopped.
    for gw in &gws {
        let (held, _) = gw.read(TOPIC, None);
        assert_exactly_once("the store", &held, &acked);
    }
}

#[test]
fn the_http_api_off_loopback_requires_the_token() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 1);
    let token_file = gws[0].dir.with_extension("token");
    let token = std::fs::read_to_string(&token_file)
        .expect("init writes the token file")
        .trim()
        .to_owned();
    assert_eq!(token.len(), 64);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // With the token file: served, and a request needs the token.
    let node = gws[0].node(&["--http", "0.0.0.0:0"]);
    let port = node.http.rsplit(':').next().unwrap().to_owned();
    let local = format!("127.0.0.1:{port}");
    let refused = http(&local, "GET", "/topics", &[], b"").expect("answer");
    assert_eq!(refused.status, 401, "{}", refused.body);
    let bearer = format!("Bearer {token}");
    let wrong = http(
        &local,
        "GET",
        "/topics",
        &[("Authorization", "Bearer 00")],
        b"",
    )
    .expect("answer");
    assert_eq!(wrong.status, 401);
    let ok = http(&local, "GET", "/topics", &[("Authorization", &bearer)], b"").expect("answer");
    assert_eq!(ok.status, 200, "{}", ok.body);
    node.running.stop();

    // Without it: refused at start, saying what to do.
    std::fs::remove_file(&token_file).unwrap();
    let stderr = gws[0].fails(&["serve", "--http", "0.0.0.0:0"]);
    assert!(stderr.contains("without a token"), "{stderr}");
    assert!(stderr.contains("multifeed join"), "{stderr}");
    // Loopback needs none.
    let node = gws[0].node(&["--http", "127.0.0.1:0"]);
    let ok = http(&node.http, "GET", "/health", &[], b"").expect("answer");
    assert_eq!(ok.status, 200);
    node.running.stop();
}

#[test]
fn a_stopped_node_releases_its_store_and_keeps_what_it_acknowledged() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 1);
    let node = gws[0].node(&["--http", "127.0.0.1:0"]);
    let batch = "{\"payload\": \"one\"}\n{\"payload\": \"two\"}\n";
    let answer = http(
        &node.http,
        "POST",
        &format!("/topics/{TOPIC}/batch"),
        &[],
        batch.as_bytes(),
    )
    .expect("answer");
    assert_eq!(answer.status, 201, "{}", answer.body);
    assert_eq!(answer.json()["addresses"].as_array().unwrap().len(), 2);
    let bad = http(
        &node.http,
        "GET",
        &format!("/topics/{TOPIC}/messages?from=garbage"),
        &[],
        b"",
    )
    .expect("answer");
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["error"]["kind"], "invalid_cursor");
    let metrics = http(&node.http, "GET", "/metrics", &[], b"").expect("answer");
    for line in [
        "multifeed_published_messages_total 2",
        "multifeed_feeds_unproven 0",
        "multifeed_blocks_missing 0",
        "multifeed_admission_limit_hits_total 0",
    ] {
        assert!(
            metrics.body.contains(line),
            "no {line:?} in {}",
            metrics.body
        );
    }
    // The store is held while the node runs (the CLI goes through its API)...
    assert_eq!(gws[0].ok(&["topics"]).trim(), TOPIC);
    node.running.stop();
    assert!(
        !gws[0].dir.join("node-api").exists(),
        "a stopped node leaves no API file"
    );
    // ...and released, intact, after SIGTERM.
    let (payloads, _) = gws[0].read(TOPIC, None);
    assert_eq!(payloads, ["one", "two"]);
}

#[test]
fn the_cli_goes_through_a_running_node_and_opens_the_store_itself_once_the_node_is_gone() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 2);
    let gw = &gws[0];
    // The store already holds data when the node starts.
    gw.write_stdin(TOPIC, "old-1\nold-2\n");
    let listen = format!("127.0.0.1:{}", free_port());
    // No --http: the node answers its local CLI on loopback anyway.
    let node = gw.node(&["--listen", &listen]);
    let mut follower = Running::spawn(gw.cmd(&["--json", "read", TOPIC, "--follow"]));
    let first = follower.until("the first message", |v| v["payload"].is_string());
    assert_eq!(first.0["payload"], "old-1");

    // write: one message, then stdin lines in a batch, through the node.
    let address = gw.ok(&["write", TOPIC, "new-1"]);
    assert!(address.trim().contains('/'), "{address}");
    assert_eq!(gw.write_stdin(TOPIC, "new-2\n\nnew-3\n").len(), 2);
    // A peer's messages arrive by replication while the CLI reads through the node.
    gws[1].write_stdin(TOPIC, "peer-1\n");
    gws[1].ok(&["sync", &listen]);
    let all = ["old-1", "old-2", "new-1", "new-2", "new-3", "peer-1"];
    let (payloads, cursor) = gw.read(TOPIC, None);
    assert_eq!(sorted(payloads), sorted(all.map(String::from).to_vec()));
    // The cursor read through the node resumes through the node: nothing new yet.
    let (after, _) = gw.read(TOPIC, Some(&cursor));
    assert!(after.is_empty(), "{after:?}");
    gw.ok(&[
        "write",
        TOPIC,
        "new-4",
        "--timestamp",
        "2030-01-01T00:00:00Z",
    ]);
    let (after, _) = gw.read(TOPIC, Some(&cursor));
    assert_eq!(after, ["new-4"]);
    let stamped = gw.ok(&["--json", "read", TOPIC, "--from", &cursor]);
    assert!(
        stamped.contains("\"time_ms\":1893456000000"),
        "the node kept the reading's time: {stamped}"
    );

    // The follower saw every message once, in order of arrival.
    let mut followed = vec!["old-1".to_owned()];
    while followed.len() < all.len() + 1 {
        let (line, _) = follower.until("a message", |v| v["payload"].is_string());
        followed.push(line["payload"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        sorted(followed.clone()),
        sorted(
            ["new-4"]
                .iter()
                .chain(&all)
                .map(|s| s.to_string())
                .collect()
        )
    );
    assert_eq!(&followed[..2], ["old-1", "old-2"]);

    // topics, feeds and verify.
    assert_eq!(gw.ok(&["topics"]).trim(), TOPIC);
    let feeds: Vec<serde_json::Value> = gw
        .ok(&["--json", "feeds"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(feeds.len(), 2, "{feeds:?}");
    assert_eq!(feeds.iter().filter(|f| f["local"] == true).count(), 1);
    assert!(feeds.iter().all(|f| f["held"] == f["length"]));
    assert!(gw.ok(&["feeds"]).contains("remote"));
    let verified = gw.ok(&["verify"]);
    assert!(verified.contains("all 2 feeds verified"), "{verified}");

    // What the node cannot do for the CLI is refused in words.
    let refused = gw.fails(&["read", TOPIC, "--follow", "--peer", &listen]);
    assert!(refused.contains("held by a running node"), "{refused}");
    // Another group's key is refused before anything reaches the node.
    let stranger = Gw::new(root.path(), "stranger");
    stranger.ok(&["init"]);
    let stranger_key = std::fs::read_to_string(stranger.dir.with_extension("key")).unwrap();
    let wrong = gw.fails(&["--key", stranger_key.trim(), "write", TOPIC, "intruder"]);
    assert!(wrong.contains("wrong shared key"), "{wrong}");

    // kill -9: the follower says the node went away; the stale API file does not
    // stop the CLI, which opens the store itself.
    node.running.kill9();
    let (status, _, stderr) = follower.finish();
    assert!(!status.success());
    assert!(
        stderr.contains("node holding the store stopped"),
        "{stderr}"
    );
    assert!(
        gw.dir.join("node-api").exists(),
        "a killed node leaves its file"
    );
    let (payloads, _) = gw.read(TOPIC, None);
    assert_eq!(payloads.len(), all.len() + 1);
    assert!(!payloads.contains(&"intruder".to_owned()));
    assert!(
        !gw.dir.join("node-api").exists(),
        "the stale file is removed"
    );
    gw.verify();
}

/// One Server-Sent Events connection to a topic's follow.
struct Follower {
    lines: std::io::BufReader<std::net::TcpStream>,
}

impl Follower {
    /// Follows `topic` on `http_addr`, resuming after `last_id` if given, as a
    /// browser's `EventSource` does when it reconnects.
    fn connect(http_addr: &str, topic: &str, last_id: Option<&str>) -> Follower {
        use std::io::Write;
        let mut stream = std::net::TcpStream::connect(http_addr).expect("the node answers");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut request = format!(
            "GET /topics/{topic}/events HTTP/1.1\r\nHost: {http_addr}\r\nAccept: text/event-stream\r\n"
        );
        if let Some(id) = last_id {
            request.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).unwrap();
        let mut follower = Follower {
            lines: std::io::BufReader::new(stream),
        };
        let status = follower.line();
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        follower
    }

    fn line(&mut self) -> String {
        use std::io::BufRead;
        let mut line = String::new();
        let read = self
            .lines
            .read_line(&mut line)
            .expect("an SSE line in time");
        assert!(read > 0, "the node ended the follow");
        line.trim_end().to_owned()
    }

    /// The next message event: its id (the cursor past it) and its payload.
    /// Keep-alives, the chunked framing's size lines and other fields pass by.
    fn next(&mut self) -> (String, String) {
        let (mut id, mut data) = (None, None);
        loop {
            let line = self.line();
            if let Some(value) = line.strip_prefix("id: ") {
                id = Some(value.to_owned());
            } else if let Some(value) = line.strip_prefix("data: ") {
                data = Some(value.to_owned());
            } else if line.is_empty()
                && let (Some(id), Some(data)) = (id.take(), data.take())
            {
                let message: serde_json::Value = serde_json::from_str(&data).expect("JSON data");
                return (id, message["payload"].as_str().expect("text").to_owned());
            }
        }
    }
}

#[test]
fn an_sse_follower_resumes_with_last_event_id_without_loss_or_repeat() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 2);
    let pa = format!("127.0.0.1:{}", free_port());
    let a = gws[0].node(&["--listen", &pa, "--http", "127.0.0.1:0"]);
    let b = gws[1].node(&["--peer", &pa, "--http", "127.0.0.1:0"]);
    let nodes = [("a", a.http.as_str()), ("b", b.http.as_str())];
    let mut acked = Vec::new();
    let mut received: Vec<String> = Vec::new();
    let mut last_id: Option<String> = None;
    // Rounds: publish on both nodes (some while the follower is away), follow on
    // B for a while, drop the connection mid-stream, resume from the last id.
    for round in 0..4 {
        for i in 0..30 {
            publish_round(round * 100 + i, &nodes, &mut acked);
        }
        let mut follower = Follower::connect(&b.http, TOPIC, last_id.as_deref());
        for i in 30..40 {
            publish_round(round * 100 + i, &nodes, &mut acked);
        }
        // Fewer than are there: the connection drops with events still in flight.
        let take = acked.len() - received.len() - 15;
        for _ in 0..take {
            let (id, payload) = follower.next();
            received.push(payload);
            last_id = Some(id);
        }
        drop(follower);
    }
    // Last: a marker published after everything; all before it arrives once.
    publish(&a.http, TOPIC, "end").expect("acknowledged");
    let mut follower = Follower::connect(&b.http, TOPIC, last_id.as_deref());
    loop {
        let (_, payload) = follower.next();
        if payload == "end" {
            break;
        }
        received.push(payload);
    }
    assert_eq!(
        received.len(),
        acked.len(),
        "lost or repeated across resumes"
    );
    assert_exactly_once("the follower", &received, &acked);
    // Each gateway's messages arrive in the order it published them.
    for name in ["a", "b"] {
        let seen: Vec<usize> = received
            .iter()
            .filter_map(|p| p.strip_prefix(&format!("{name}-")))
            .map(|n| n.parse().unwrap())
            .collect();
        assert!(seen.is_sorted(), "{name}'s messages out of order: {seen:?}");
    }
    a.running.stop();
    b.running.stop();
}

#[test]
fn a_sigterm_right_after_the_node_says_it_is_up_stops_it_cleanly() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 1);
    // The handlers must be in place before the first line: a SIGTERM in that
    // window used to kill the node outright (status "signal: 15").
    for _ in 0..20 {
        gws[0].node(&["--http", "127.0.0.1:0"]).running.stop();
    }
    gws[0].verify();
}

#[test]
fn a_gateway_runs_from_a_config_file_and_flags_override_it() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 3);
    let (a, b, c) = (&gws[0], &gws[1], &gws[2]);
    b.write_stdin(TOPIC, "b-old\n");
    c.write_stdin(TOPIC, "c-alone\n");
    let a_listen = format!("127.0.0.1:{}", free_port());
    let a_node = a.node(&["--listen", &a_listen]);
    let b_http = format!("127.0.0.1:{}", free_port());
    // A relative dir is taken from the file's folder, not the working directory.
    let config = root.path().join("b.toml");
    std::fs::write(
        &config,
        format!(
            "dir = \"gw1\"\njson = true\n\n[serve]\npeers = [\"{a_listen}\"]\nhttp = \"{b_http}\"\nmax-peers = 4\n"
        ),
    )
    .unwrap();
    let with_config = |args: &[&str]| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.current_dir("/").arg("--config").arg(&config).args(args);
        cmd.env_remove("MULTIFEED_KEY").env_remove("RUST_LOG");
        cmd
    };
    let mut b_node = Running::spawn(with_config(&["serve"]));
    let first = b_node.json();
    assert_eq!(first["http"], b_http.as_str(), "{first}");
    // B dials A as the file says: A's message arrives; the CLI finds B's node.
    assert!(publish(&a_node.http, TOPIC, "a-new").is_some());
    assert!(
        poll_until(WAIT, || read_all(&b_http, TOPIC)
            .is_some_and(|held| held.contains(&"a-new".to_string()))),
        "B never received A's message"
    );
    let out = with_config(&["read", TOPIC]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (held, _) = parse_read(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(sorted(held), ["a-new", "b-old"]);
    // A flag overrides the file: --dir points at C's store, which syncs with nobody.
    let out = with_config(&["--dir", c.dir.to_str().unwrap(), "read", TOPIC])
        .output()
        .unwrap();
    let (held, _) = parse_read(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(held, ["c-alone"]);
    b_node.stop();

    // A typo and a key in the file are refused before anything opens.
    for (content, needle) in [
        ("[serve]\nmax-peer = 3\n", "max-peer"),
        (
            "key = \"0000000000000000000000000000000000000000000000000000000000000000\"\n",
            "never goes in a config file",
        ),
    ] {
        std::fs::write(&config, content).unwrap();
        let out = with_config(&["--json", "feeds"]).output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        let error: serde_json::Value = serde_json::from_slice(out.stderr.trim_ascii()).unwrap();
        assert_eq!(error["error"]["kind"], "invalid_config");
        assert!(
            error["error"]["message"].as_str().unwrap().contains(needle),
            "{error}"
        );
    }
}

#[test]
fn peers_count_blocks_both_ways_while_sessions_are_live() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 2);
    let listen = format!("127.0.0.1:{}", free_port());
    let a = gws[0].node(&["--listen", &listen]);
    let b = gws[1].node(&["--peer", &listen]);
    let row = |addr: &str| -> serde_json::Value {
        http(addr, "GET", "/peers", &[], b"")
            .map(|answer| answer.json()["peers"][0].clone())
            .unwrap_or_default()
    };
    // Two rounds: counts keep growing within one live session.
    for round in 1..=2u64 {
        for i in 0..10 {
            assert!(publish(&a.http, TOPIC, &format!("r{round}-{i}")).is_some());
        }
        let want = 10 * round;
        assert!(
            poll_until(WAIT, || row(&a.http)["blocks_sent"].as_u64() >= Some(want)
                && row(&b.http)["blocks_received"].as_u64() >= Some(want)),
            "a: {}, b: {}",
            row(&a.http),
            row(&b.http)
        );
        assert_eq!(row(&a.http)["state"], "connected");
    }
    a.running.stop();
    b.running.stop();
}

#[test]
fn reads_and_follows_can_start_at_the_tail_of_a_long_topic() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 1);
    let gw = &gws[0];
    let history: String = (0..500).map(|i| format!("old-{i}\n")).collect();
    gw.write_stdin(TOPIC, &history);
    let node = gw.node(&["--http", "127.0.0.1:0"]);
    let read = |query: &str| -> Vec<String> {
        let answer = http(
            &node.http,
            "GET",
            &format!("/topics/{TOPIC}/messages?{query}"),
            &[],
            b"",
        )
        .unwrap()
        .json();
        answer["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["payload"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(read("tail=3"), ["old-497", "old-498", "old-499"]);
    assert!(read("tail=0").is_empty());
    // An empty `from` is no cursor: the tail applies.
    assert_eq!(read("from=&tail=1&limit=2"), ["old-499"]);
    // The CLI's --tail, through the node and then on the store itself.
    assert_eq!(
        gw.read_args(TOPIC, &["--tail", "2"]).0,
        ["old-498", "old-499"]
    );
    node.running.stop();
    assert_eq!(gw.read_args(TOPIC, &["--tail", "1"]).0, ["old-499"]);
    assert!(gw.read_args(TOPIC, &["--tail", "0"]).0.is_empty());
}

#[test]
fn topics_with_slashes_need_no_encoding_in_api_paths() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 1);
    let node = gws[0].node(&["--http", "127.0.0.1:0"]);
    let post = |path: &str, body: &str| {
        http(
            &node.http,
            "POST",
            path,
            &[("Content-Type", "text/plain")],
            body.as_bytes(),
        )
        .unwrap()
        .status
    };
    assert_eq!(post("/topics/sensors/site-a/temp/messages", "21.5"), 201);
    assert_eq!(
        post("/topics/sensors%2Fsite-a%2Ftemp/messages", "22.0"),
        201
    );
    assert_eq!(
        post(
            "/topics/sensors/site-a/temp/batch",
            "{\"payload\": \"22.5\"}\n{\"payload\": \"23.0\"}"
        ),
        201
    );
    let read = |path: &str| {
        let answer = http(&node.http, "GET", path, &[], b"").unwrap().json();
        answer["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["payload"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let all = ["21.5", "22.0", "22.5", "23.0"];
    assert_eq!(read("/topics/sensors/site-a/temp/messages"), all);
    assert_eq!(
        read("/topics/sensors%2Fsite-a%2Ftemp/messages?limit=2"),
        all[..2]
    );
    assert_eq!(
        read("/topics/sensors/site-a/temp/messages?limit=1"),
        all[..1]
    );
    assert_eq!(gws[0].read("sensors/site-a/temp", None).0, all);
    // Other paths are left alone.
    assert_eq!(
        http(&node.http, "GET", "/topics/a/b/nothing", &[], b"")
            .unwrap()
            .status,
        404
    );
    node.running.stop();
}
