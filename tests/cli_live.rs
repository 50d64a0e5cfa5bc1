//! End-to-end tests of gateways that keep syncing: repeated rounds against a
//! running `serve`, live sessions that stay up and survive server restarts,
//! servers killed mid-transfer, interrupted syncs. Separate processes, loopback,
//! temporary directories; every wait is for a line of output, bounded by a timeout.

mod cli_common;

use cli_common::*;

/// Lines for `write` from stdin: `n` messages `prefix-0` ...
fn lines(prefix: &str, n: usize) -> String {
    (0..n).map(|i| format!("{prefix}-{i}\n")).collect()
}

/// A large topic: about 15 MiB in ~800 blocks, so a sync takes a while.
fn large(gw: &Gw) -> usize {
    let n = 200_000;
    let padding = "x".repeat(60);
    let text: String = (0..n).map(|i| format!("reading-{i} {padding}\n")).collect();
    gw.write_stdin("bulk", &text);
    n
}

fn is_progress(v: &serde_json::Value) -> bool {
    v["event"] == "progress"
}

/// Every payload exactly once, and nothing else.
fn assert_exactly(got: Vec<String>, want: Vec<String>) {
    let (got, want) = (sorted(got), sorted(want));
    assert_eq!(got.len(), want.len(), "message count");
    assert!(got == want, "messages differ");
}

#[test]
fn a_gateway_catches_up_from_a_running_server_round_after_round() {
    const ROUNDS: usize = 12;
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 3);
    let (server_gw, reader, writer) = (&gws[0], &gws[1], &gws[2]);
    server_gw.ok(&["write", "t", "from-server"]);
    let server = server_gw.serve();
    // The reader holds data of its own too.
    reader.ok(&["write", "t", "from-reader"]);
    let mut cursor: Option<String> = None;
    let mut all = vec!["from-server".to_owned(), "from-reader".to_owned()];
    let mut passed = 0;
    for round in 0..ROUNDS {
        // New blocks reach the server from a third gateway.
        let new: Vec<String> = (0..3).map(|i| format!("r{round}-{i}")).collect();
        writer.write_stdin("t", &lines(&format!("r{round}"), 3));
        writer.ok(&["sync", &server.addr]);
        all.extend(new.iter().cloned());
        // The reader, already holding the earlier rounds, catches up.
        let out = reader.run(&["--json", "sync", &server.addr]);
        assert!(
            out.status.success(),
            "round {round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (got, next) = reader.read("t", cursor.as_deref());
        if round == 0 {
            let mut want = new.clone();
            want.extend(["from-server".to_owned(), "from-reader".to_owned()]);
            assert_exactly(got, want);
        } else {
            assert_exactly(got, new);
        }
        cursor = Some(next);
        passed += 1;
    }
    assert_eq!(passed, ROUNDS);
    server.stop();
    for gw in &gws {
        assert_exactly(gw.read("t", None).0, all.clone());
        gw.verify();
    }
}

#[test]
fn a_live_sync_between_stores_in_sync_stays_up_and_carries_later_messages() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 3);
    let (server_gw, follower, writer) = (&gws[0], &gws[1], &gws[2]);
    server_gw.ok(&["write", "t", "s"]);
    follower.ok(&["write", "t", "f"]);
    writer.ok(&["write", "t", "w-first"]);
    let mut server = server_gw.serve_json("127.0.0.1:0");
    let addr = server.addr.clone();
    // Everyone in sync first.
    writer.ok(&["sync", &addr]);
    follower.ok(&["sync", &addr]);
    writer.ok(&["sync", &addr]);
    let writer_key = writer.writer_key("t");

    let mut live = Running::spawn(follower.cmd(&["--json", "sync", "--live", &addr]));
    live.event("connected");
    for round in 0..8 {
        writer.ok(&["write", "t", &format!("w-{round}")]);
        writer.ok(&["sync", &addr]);
        let (_, before) = live.until("the new block", |v| {
            is_progress(v) && v["key"] == writer_key.as_str()
        });
        assert!(
            before.iter().all(|v| v["event"] != "disconnected"),
            "round {round}: the live session ended: {before:?}"
        );
    }
    // Ctrl-C ends a live sync normally, after one session.
    live.signal("INT");
    let (status, rest, stderr) = live.finish();
    assert!(status.success(), "{status}: {stderr}");
    let stopped: serde_json::Value = serde_json::from_str(rest.last().unwrap()).unwrap();
    assert_eq!(stopped["event"], "stopped", "{rest:?}");
    assert_eq!(stopped["sessions"], 1, "{rest:?}");
    // The server says why each peer left: 11 one-shot syncs and the live one,
    // all ended on purpose.
    let mut ends = Vec::new();
    while ends.len() < 12 {
        let (end, _) = server.event("disconnected");
        ends.push(end);
    }
    for end in &ends {
        assert!(
            end["reason"] == "completed" || end["reason"] == "peer_closed",
            "{end}"
        );
        assert!(end.get("error").is_none(), "{end}");
    }
    server.stop();
    let mut want: Vec<String> = ["s", "f", "w-first"].map(str::to_owned).to_vec();
    want.extend((0..8).map(|r| format!("w-{r}")));
    assert_exactly(follower.read("t", None).0, want);
}

#[test]
fn a_server_killed_mid_sync_is_restarted_and_the_next_sync_succeeds() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 2);
    let (server_gw, reader) = (&gws[0], &gws[1]);
    let n = large(server_gw);
    // Twice killed in the middle of a transfer, then a sync that completes.
    for round in 0..3 {
        let server = server_gw.serve();
        let mut sync = Running::spawn(reader.cmd(&["--json", "sync", &server.addr]));
        if round < 2 {
            sync.until("a first block", is_progress);
            server.kill9();
            let (status, _, stderr) = sync.finish();
            assert!(!status.success(), "round {round}: the sync ended well");
            // With --json the error is one JSON object naming its kind.
            let error: serde_json::Value =
                serde_json::from_str(stderr.lines().last().unwrap_or_default())
                    .unwrap_or_else(|_| panic!("round {round}: not a JSON error: {stderr}"));
            assert!(
                error["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("sync with")),
                "round {round}: {error}"
            );
            assert_eq!(
                error["error"]["kind"], "connection_lost",
                "round {round}: {error}"
            );
        } else {
            let (status, rest, stderr) = sync.finish();
            assert!(status.success(), "{stderr}");
            let summary: serde_json::Value = serde_json::from_str(rest.last().unwrap()).unwrap();
            assert!(
                summary["blocks_received"].as_u64().unwrap() > 0,
                "{summary}"
            );
            server.stop();
        }
    }
    let (payloads, _) = reader.read("bulk", None);
    assert_eq!(payloads.len(), n);
    let mut seen = std::collections::HashSet::new();
    assert!(
        payloads.iter().all(|p| seen.insert(p.clone())),
        "duplicates"
    );
    reader.verify();
    server_gw.verify();
}

#[test]
fn a_live_sync_survives_server_restarts_and_gets_what_was_written_meanwhile() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 3);
    let (server_gw, follower, writer) = (&gws[0], &gws[1], &gws[2]);
    writer.ok(&["write", "t", "w-start"]);
    let mut server = server_gw.serve();
    let addr = server.addr.clone();
    writer.ok(&["sync", &addr]);
    let writer_key = writer.writer_key("t");
    let mut live = Running::spawn(follower.cmd(&["--json", "sync", "--live", &addr]));
    live.event("connected");
    live.until("the first message", |v| {
        is_progress(v) && v["key"] == writer_key.as_str()
    });
    for round in 0..4 {
        // A crash (kill -9) or a clean stop (SIGTERM) of the server.
        let reason = if round % 2 == 0 {
            server.kill9();
            "connection_lost"
        } else {
            server.stop();
            "peer_closed"
        };
        let (lost, _) = live.event("disconnected");
        assert_eq!(lost["reason"], reason, "{lost}");
        assert!(lost["retry_in_ms"].as_u64().is_some(), "{lost}");
        // Back on the same address, with a message written while it was down.
        writer.ok(&["write", "t", &format!("w-{round}")]);
        server = server_gw.serve_on(&addr);
        writer.ok(&["sync", &addr]);
        let (connected, _) = live.event("connected");
        assert_eq!(connected["session"], round + 2, "{connected}");
        live.until("the message written meanwhile", |v| {
            is_progress(v) && v["key"] == writer_key.as_str()
        });
    }
    live.signal("INT");
    let (status, _, stderr) = live.finish();
    assert!(status.success(), "{status}: {stderr}");
    server.stop();
    let mut want = vec!["w-start".to_owned()];
    want.extend((0..4).map(|r| format!("w-{r}")));
    assert_exactly(follower.read("t", None).0, want);
    follower.verify();
}

#[test]
fn follow_with_a_peer_reconnects_after_a_server_restart() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 3);
    let (server_gw, follower, writer) = (&gws[0], &gws[1], &gws[2]);
    server_gw.ok(&["write", "alerts", "first"]);
    let server = server_gw.serve();
    let addr = server.addr.clone();
    let mut follow =
        Running::spawn(follower.cmd(&["--json", "read", "alerts", "--follow", "--peer", &addr]));
    let message = |follow: &mut Running| {
        let (line, _) = follow.until("a message", |v| v.get("payload").is_some());
        line["payload"].as_str().unwrap().to_owned()
    };
    assert_eq!(message(&mut follow), "first");
    server.kill9();
    follow.event("disconnected");
    let server = server_gw.serve_on(&addr);
    follow.event("connected");
    writer.ok(&["write", "alerts", "after-restart"]);
    writer.ok(&["sync", &addr]);
    assert_eq!(message(&mut follow), "after-restart");
    follow.signal("INT");
    let (status, _, stderr) = follow.finish();
    assert!(status.success(), "{status}: {stderr}");
    server.stop();
}

#[test]
fn a_live_sync_refused_by_another_group_stops_with_the_error() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 1);
    gws[0].ok(&["write", "t", "x"]);
    let server = gws[0].serve();
    let stranger = Gw::new(root.path(), "stranger");
    stranger.ok(&["init"]);
    stranger.ok(&["write", "t", "y"]);
    let mut live = Running::spawn(stranger.cmd(&["sync", "--live", &server.addr]));
    let (status, _, stderr) = {
        let line = live.stderr_line("error:");
        assert!(line.contains("another group"), "{line}");
        live.finish()
    };
    assert_eq!(status.code(), Some(1), "{stderr}");
    server.stop();
}

#[test]
fn an_interrupted_sync_exits_with_the_signal_and_says_what_it_received() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 2);
    let (server_gw, reader) = (&gws[0], &gws[1]);
    let n = large(server_gw);
    let server = server_gw.serve();
    for (signal, code, name) in [("INT", 130, "Ctrl-C"), ("TERM", 143, "SIGTERM")] {
        let mut sync = Running::spawn(reader.cmd(&["--json", "sync", &server.addr]));
        sync.until("a first block", is_progress);
        sync.signal(signal);
        let (status, rest, stderr) = sync.finish();
        assert_eq!(status.code(), Some(code), "{stderr}");
        assert!(
            stderr.contains(&format!("interrupted ({name}): received ")),
            "{stderr}"
        );
        assert!(stderr.contains("still missing"), "{stderr}");
        let report: serde_json::Value = serde_json::from_str(rest.last().unwrap()).unwrap();
        assert_eq!(report["event"], "interrupted", "{report}");
        assert!(report["blocks_missing"].as_u64().unwrap() > 0, "{report}");
    }
    // What arrived is kept; the next sync finishes the job.
    reader.ok(&["sync", &server.addr]);
    server.stop();
    assert_eq!(reader.read("bulk", None).0.len(), n);
    reader.verify();
}

/// A full server (`--max-peers 1`) tells a member so: a one-shot `sync` fails with
/// words that say what to do, and a live one keeps retrying and gets in once the
/// place is free.
#[test]
fn a_full_server_says_so_and_a_live_sync_waits_for_a_place() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 3);
    let (server_gw, first, second) = (&gws[0], &gws[1], &gws[2]);
    server_gw.ok(&["write", "t", "from-server"]);
    let mut server =
        Running::spawn(server_gw.cmd(&["serve", "--listen", "127.0.0.1:0", "--max-peers", "1"]));
    let line = server.line();
    let addr = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .trim()
        .to_owned();
    let mut holder = Running::spawn(first.cmd(&["--json", "sync", "--live", &addr]));
    holder.until("the server's message", is_progress);

    let stderr = second.fails(&["sync", &addr]);
    assert!(
        stderr.contains(&format!("the server at {addr} is full"))
            && stderr.contains("serves 1 peers")
            && stderr.contains("try again later"),
        "{stderr}"
    );

    let mut waiting = Running::spawn(second.cmd(&["--json", "sync", "--live", &addr]));
    let (busy, _) = waiting.event("disconnected");
    assert_eq!(busy["reason"], "server_busy", "{busy}");
    assert!(busy["retry_in_ms"].as_u64().is_some(), "{busy}");
    holder.signal("INT");
    holder.finish();
    waiting.until("the server's message once in", is_progress);
    waiting.signal("INT");
    let (status, _, stderr) = waiting.finish();
    assert!(status.success(), "{stderr}");
    server.stop();
}
