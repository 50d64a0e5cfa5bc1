//! End-to-end tests of the `multifeed` binary: separate processes, temporary
//! directories, loopback ports, as a user would run it.

mod cli_common;

use std::process::Command;

use cli_common::*;

#[test]
fn init_writes_a_private_key_file_outside_the_store() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let gw = Gw::new(root.path(), "gw");
    let key = gw.ok(&["init"]).trim().to_owned();
    let key_file = root.path().join("gw.key");
    assert_eq!(std::fs::read_to_string(&key_file).unwrap().trim(), key);
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // The store never holds the key.
    let mut stack = vec![gw.dir.clone()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(d).unwrap().flatten() {
            if entry.path().is_dir() {
                stack.push(entry.path());
            } else {
                let bytes = std::fs::read(entry.path()).unwrap();
                let hex = key.as_bytes();
                let raw = hex::decode(&key).unwrap();
                assert!(!bytes.windows(64).any(|w| w == hex), "{:?}", entry.path());
                assert!(!bytes.windows(32).any(|w| w == raw), "{:?}", entry.path());
            }
        }
    }
    // A second init is refused; --key and MULTIFEED_KEY override the key file.
    assert!(gw.fails(&["init"]).contains("already holds a group"));
    let other = "ab".repeat(32);
    assert!(
        gw.fails(&["--key", &other, "topics"])
            .contains("wrong shared key")
    );
    let out = gw
        .cmd(&["topics"])
        .env("MULTIFEED_KEY", &other)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("MULTIFEED_KEY"));
}

#[test]
fn write_read_topics_feeds() {
    let root = tempfile::tempdir().unwrap();
    let gw = &group(root.path(), 1)[0];
    let address = gw.ok(&["write", "temperature", "21.5"]);
    assert!(address.trim().ends_with("/0/0"), "{address}");
    gw.write_stdin("humidity", "55\n\n56\r\n57\n");
    assert_eq!(gw.read("humidity", None).0, ["55", "56", "57"]);
    assert_eq!(gw.read("temperature", None).0, ["21.5"]);
    assert_eq!(gw.ok(&["topics"]), "humidity\ntemperature\n");
    let feeds: Vec<serde_json::Value> = gw
        .ok(&["--json", "feeds"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(feeds.len(), 2);
    assert!(feeds.iter().all(|f| f["local"] == true && f["length"] == 1));
}

#[test]
fn two_gateways_converge_through_serve_and_sync() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 2);
    gws[0].write_stdin("temperature", "a1\na2\n");
    gws[1].write_stdin("temperature", "b1\nb2\n");
    gws[1].ok(&["write", "humidity", "b-h"]);
    let server = gws[0].serve();
    let out = gws[1].ok(&["--json", "sync", &server.addr]);
    // Event lines, then the summary.
    let summary: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(summary["feeds_learnt"], 1);
    assert_eq!(summary["blocks_received"], 1);
    // The client holds everything at once; the server once it has stopped.
    assert_eq!(
        sorted(gws[1].read("temperature", None).0),
        ["a1", "a2", "b1", "b2"]
    );
    server.stop();
    assert_eq!(
        sorted(gws[0].read("temperature", None).0),
        ["a1", "a2", "b1", "b2"]
    );
    assert_eq!(gws[0].read("humidity", None).0, ["b-h"]);
    assert_eq!(gws[0].ok(&["topics"]), gws[1].ok(&["topics"]));
}

#[test]
fn three_gateways_converge_through_one_server() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 3);
    for (i, gw) in gws.iter().enumerate() {
        gw.ok(&["write", "temperature", &format!("from-{i}")]);
    }
    let server = gws[0].serve();
    gws[1].ok(&["sync", &server.addr]);
    gws[2].ok(&["sync", &server.addr]);
    gws[1].ok(&["sync", &server.addr]);
    server.stop();
    let all = ["from-0", "from-1", "from-2"];
    for gw in &gws {
        assert_eq!(sorted(gw.read("temperature", None).0), all);
    }
}

#[test]
fn read_from_a_cursor_resumes_after_its_last_message_even_with_older_late_arrivals() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 2);
    // gw1 writes first (older timestamps) but syncs only later.
    gws[1].write_stdin("t", "old-1\nold-2\n");
    gws[0].write_stdin("t", "new-1\nnew-2\nnew-3\n");
    let out = gws[0].ok(&["--json", "read", "t", "--limit", "2"]);
    let (first, cursor) = parse_read(&out);
    assert_eq!(first, ["new-1", "new-2"]);

    let server = gws[0].serve();
    gws[1].ok(&["sync", &server.addr]);
    server.stop();

    // Exactly what was not read yet: the rest of gw0's and gw1's older messages.
    let (rest, cursor2) = gws[0].read("t", Some(&cursor));
    assert_eq!(sorted(rest), ["new-3", "old-1", "old-2"]);
    let (none, _) = gws[0].read("t", Some(&cursor2));
    assert!(none.is_empty());
    // The text cursor goes to stderr without --json.
    let out = gws[0].run(&["read", "t", "--from", &cursor2]);
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cursor: v2."));
}

#[test]
fn follow_sees_a_message_written_on_another_gateway() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 3);
    gws[0].ok(&["write", "alerts", "first"]);
    let server = gws[0].serve();
    // gw1 follows the topic while replicating live with gw0's server.
    let mut follower = Running::spawn(gws[1].cmd(&[
        "--json",
        "read",
        "alerts",
        "--follow",
        "--peer",
        &server.addr,
    ]));
    // Connection events are JSON lines too; messages carry a payload.
    let message = |follower: &mut Running| {
        let (line, _) = follower.until("a message", |v| v.get("payload").is_some());
        line["payload"].as_str().unwrap().to_owned()
    };
    assert_eq!(message(&mut follower), "first");
    follower.until("the cursor", |v| v.get("cursor").is_some());
    // gw2 writes and syncs to the server, which carries it live to gw1.
    gws[2].ok(&["write", "alerts", "from-gw2"]);
    gws[2].ok(&["sync", &server.addr]);
    assert_eq!(message(&mut follower), "from-gw2");
    follower.stop();
    server.stop();
}

#[test]
fn verify_reports_a_flipped_byte_in_a_data_file() {
    let root = tempfile::tempdir().unwrap();
    let gw = &group(root.path(), 1)[0];
    gw.write_stdin("t", "one\ntwo\n");
    gw.ok(&["write", "t", "three"]);
    assert!(gw.ok(&["verify"]).contains("all 1 feeds verified"));
    let feeds = gw.dir.join("feeds");
    let feed = std::fs::read_dir(&feeds).unwrap().next().unwrap().unwrap();
    let data = feed.path().join("data");
    let mut bytes = std::fs::read(&data).unwrap();
    let last = bytes.len() - 1; // inside the last block
    bytes[last] ^= 0x01;
    std::fs::write(&data, bytes).unwrap();
    let out = gw.run(&["verify"]);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("DAMAGED") && stdout.contains("block 1"),
        "{stdout}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: 1 of 1 feeds are damaged"));
}

/// A gateway holding `reading-00` .. `reading-29`, one block each; its feed's
/// data file.
fn thirty_readings(root: &std::path::Path) -> (Gw, std::path::PathBuf) {
    let gw = group(root, 1).remove(0);
    for i in 0..30 {
        gw.ok(&["write", "t", &format!("reading-{i:02}")]);
    }
    let feed = std::fs::read_dir(gw.dir.join("feeds"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let data = feed.path().join("data");
    (gw, data)
}

fn offset_of(data: &std::path::Path, needle: &str) -> usize {
    let bytes = std::fs::read(data).unwrap();
    bytes
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .unwrap()
}

fn payloads(stdout: &[u8]) -> Vec<String> {
    parse_read(&String::from_utf8_lossy(stdout)).0
}

#[test]
fn read_passes_over_a_damaged_block_reports_it_once_and_fails_at_the_end() {
    let root = tempfile::tempdir().unwrap();
    let (gw, data) = thirty_readings(root.path());
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[offset_of(&data, "reading-20") + 3] ^= 0x01;
    std::fs::write(&data, bytes).unwrap();

    let out = gw.run(&["--json", "read", "t"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a damaged block must fail the read: {stderr}"
    );
    let expected: Vec<String> = (0..30)
        .filter(|&i| i != 20)
        .map(|i| format!("reading-{i:02}"))
        .collect();
    assert_eq!(payloads(&out.stdout), expected, "{stderr}");

    let out = gw.run(&["read", "t"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 2, "{stderr}");
    assert!(
        errors[0].contains(", block 20: damaged on disk"),
        "{stderr}"
    );
    assert!(
        errors[1].contains("1 damaged block passed over"),
        "{stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "no colour codes into a pipe: {stderr}"
    );
}

#[test]
fn read_of_a_truncated_data_file_prints_the_blocks_before_the_cut_and_one_error() {
    let root = tempfile::tempdir().unwrap();
    let (gw, data) = thirty_readings(root.path());
    let cut = offset_of(&data, "reading-20");
    let file = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
    file.set_len(cut as u64).unwrap();

    let out = gw.run(&["read", "t"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let printed: Vec<&str> = stdout.lines().collect();
    assert_eq!(printed.len(), 20, "{stdout}\n{stderr}");
    assert!(printed[19].contains("reading-19"), "{stdout}");
    // One line for the damage, one to end on, and the cursor: no flood.
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("cursor: "))
        .collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(
        lines[0].contains("blocks 20 to 29 (10 blocks): damaged on disk")
            && lines[0].contains("truncated"),
        "{stderr}"
    );
}

#[test]
fn a_lost_index_is_never_an_empty_store_and_repair_brings_everything_back() {
    let root = tempfile::tempdir().unwrap();
    let (gw, _) = thirty_readings(root.path());
    gw.ok(&["write", "other", "x"]);
    let before = gw.read("t", None).0;
    std::fs::remove_dir_all(gw.dir.join("index")).unwrap();

    // read and feeds warn, verify fails and lists both directories.
    let out = gw.run(&["read", "t"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("2 feed directories under"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = gw.run(&["verify"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}");
    assert_eq!(stdout.matches("UNLISTED").count(), 2, "{stdout}");
    assert!(stderr.contains("not in the store's index"), "{stderr}");

    let out = gw.ok(&["repair"]);
    assert!(
        out.contains("writer \"topic/t\"") && out.contains("writer \"topic/other\""),
        "{out}"
    );
    assert!(gw.ok(&["verify"]).contains("all 2 feeds verified"));
    assert_eq!(gw.read("t", None).0, before);
    // The writer is the same feed: a new message lands after the old ones.
    gw.ok(&["write", "t", "after-repair"]);
    assert_eq!(
        gw.read("t", None).0.last().map(String::as_str),
        Some("after-repair")
    );
    let feeds = gw.ok(&["--json", "feeds"]);
    assert_eq!(feeds.lines().count(), 2, "{feeds}");
}

#[test]
fn repair_sets_a_damaged_index_aside_and_rebuilds_it() {
    let root = tempfile::tempdir().unwrap();
    let (gw, _) = thirty_readings(root.path());
    let before = gw.read("t", None).0;
    std::fs::write(gw.dir.join("index").join("oplog"), vec![0xff; 100]).unwrap();
    let out = gw.run(&["repair"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("the index was damaged"), "{stderr}");
    let aside: Vec<_> = std::fs::read_dir(&gw.dir)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("index.damaged-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "the damaged index is kept");
    assert_eq!(gw.read("t", None).0, before);
    gw.verify();
}

#[test]
fn verify_reports_a_zeroed_bitfield_of_our_own_writer() {
    let root = tempfile::tempdir().unwrap();
    let gw = &group(root.path(), 1)[0];
    let lines: String = (0..300).map(|i| format!("m{i}\n")).collect();
    // One block per line: written slowly enough that each is its own batch.
    for chunk in lines.lines().collect::<Vec<_>>().chunks(100) {
        gw.write_stdin("t", &(chunk.join("\n") + "\n"));
    }
    assert!(gw.ok(&["verify"]).contains("all 1 feeds verified"));
    let feed = std::fs::read_dir(gw.dir.join("feeds"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let bitfield = feed.path().join("bitfield");
    let len = std::fs::metadata(&bitfield).unwrap().len() as usize;
    std::fs::write(&bitfield, vec![0u8; len]).unwrap();
    let out = gw.run(&["verify"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("DAMAGED")
            && stdout.contains("marks 0 of 3 blocks held")
            && stdout.contains("3 more intact"),
        "{stdout}"
    );
}

#[test]
fn bad_input_fails_with_one_clear_line_and_leaves_the_store_intact() {
    let root = tempfile::tempdir().unwrap();
    let gw = &group(root.path(), 1)[0];
    gw.write_stdin("t", "kept-1\nkept-2\n");
    let one_line = |stderr: String, needle: &str| {
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(needle),
            "{stderr}"
        );
    };
    one_line(
        gw.fails(&["read", "t", "--from", "garbage"]),
        "malformed cursor",
    );
    one_line(
        gw.fails(&["--key", "xyz", "read", "t"]),
        "malformed shared key",
    );
    one_line(gw.fails(&["join", "not-a-key"]), "malformed shared key");
    one_line(gw.fails(&["sync", "127.0.0.1:1"]), "cannot reach the peer");
    one_line(gw.fails(&["sync", "nonsense"]), "HOST:PORT");
    one_line(gw.fails(&["write", "", "x"]), "invalid topic");
    one_line(
        Gw::new(root.path(), "nowhere").fails(&["topics"]),
        "run `multifeed init`",
    );
    // The store is in use while another process follows it (a node running on it
    // would take the write through its API instead).
    let mut follower = Running::spawn(gw.cmd(&["read", "t", "--follow"]));
    follower.line();
    one_line(
        gw.fails(&["write", "t", "x"]),
        "in use by another multifeed process",
    );
    drop(follower);
    let server = gw.serve();
    // A peer of another group is refused cleanly.
    let stranger = Gw::new(root.path(), "stranger");
    stranger.ok(&["init"]);
    let stderr = stranger.fails(&["sync", &server.addr, "--timeout", "3"]);
    assert!(stderr.starts_with("error: sync with"), "{stderr}");
    server.stop();
    assert_eq!(gw.read("t", None).0, ["kept-1", "kept-2"]);
    assert!(gw.ok(&["verify"]).contains("verified"));
}

#[test]
fn demo_runs() {
    let root = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["demo", "--dir"])
        .arg(root.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("all three gateways hold all 150 of each topic"),
        "{stdout}"
    );
    assert!(stdout.contains("150 readings from 3 gateways"), "{stdout}");
    assert!(
        stdout.contains("refused: protocol version mismatch"),
        "{stdout}"
    );
}

#[test]
fn demo_stay_keeps_the_nodes_and_their_pages_up_until_ctrl_c() {
    let mut demo = Running::spawn({
        let mut cmd = Command::new(BIN);
        cmd.args(["demo", "--stay"]);
        cmd
    });
    let mut pages = Vec::new();
    loop {
        let line = demo.line();
        if let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://"))
            && line.trim_start().starts_with("gateway-")
            && !line.contains("node up")
        {
            pages.push(
                url.trim_start_matches("http://")
                    .trim_end_matches('/')
                    .to_owned(),
            );
        }
        if line.contains("Ctrl-C stops them") {
            break;
        }
    }
    assert_eq!(pages.len(), 3, "{pages:?}");
    for page in &pages {
        let answer = http(page, "GET", "/", &[], b"").expect("the page answers");
        assert_eq!(answer.status, 200);
        assert!(answer.body.contains("<html"), "{}", answer.body);
    }
    demo.signal("INT");
    let (status, out, _) = demo.finish();
    assert!(status.success(), "{status:?}");
    assert!(out.iter().any(|l| l.starts_with("Done in")), "{out:?}");
}

/// A full disk is reported in our words, once, with what to do: not hypercore's
/// internals ("RandomAccess IO error. Context: None") twice over. The disk is
/// made full by pointing a feed's data file at /dev/full.
#[test]
fn a_full_disk_is_one_line_that_says_what_to_do() {
    let root = tempfile::tempdir().unwrap();
    let gw = &group(root.path(), 1)[0];
    gw.ok(&["write", "t", "kept"]);
    let feed = std::fs::read_dir(gw.dir.join("feeds"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::remove_file(feed.join("data")).unwrap();
    std::os::unix::fs::symlink("/dev/full", feed.join("data")).unwrap();
    let stderr = gw.fails(&["write", "t", "lost"]);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains("the disk is full; free some space"),
        "{stderr}"
    );
    for internal in ["Context", "RandomAccess", "Unrecoverable", "return_code"] {
        assert!(!stderr.contains(internal), "{internal} in: {stderr}");
    }
}

/// Logs into a pipe carry no terminal colour codes.
#[test]
fn logs_into_a_pipe_have_no_colour_codes() {
    let root = tempfile::tempdir().unwrap();
    let gw = &group(root.path(), 1)[0];
    let mut child = gw
        .cmd(&["-v", "write", "t"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"x\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("published"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "colour codes in: {stderr:?}");
}

/// Only `init` and `join` create a store: with a key in the environment, a
/// mistyped `--dir` is refused by every other command and left uncreated.
#[test]
fn only_init_and_join_create_a_store() {
    let root = tempfile::tempdir().unwrap();
    let gw = Gw::new(root.path(), "gw");
    let key = gw.ok(&["init"]);
    gw.ok(&["write", "t", "kept"]);
    let typo = Gw::new(root.path(), "gw-typo");
    for args in [
        &["write", "t", "lost"][..],
        &["read", "t"],
        &["topics"],
        &["feeds"],
        &["verify"],
    ] {
        let out = typo
            .cmd(args)
            .env("MULTIFEED_KEY", key.trim())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded on a typo");
        assert!(
            stderr.contains("no multifeed store at") && stderr.contains("multifeed init"),
            "{args:?}: {stderr}"
        );
        assert!(
            !typo.dir.exists(),
            "{args:?} created {}",
            typo.dir.display()
        );
    }
}

/// A malformed key given to `join` is not echoed back (it is most of a secret).
#[test]
fn join_never_echoes_a_malformed_key() {
    let root = tempfile::tempdir().unwrap();
    let gw = Gw::new(root.path(), "joiner");
    let almost = "c7".repeat(31) + "c";
    let stderr = gw.fails(&["join", &almost]);
    assert!(
        stderr.contains("malformed shared key (63 characters)"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(&almost[..16]),
        "the key was echoed: {stderr}"
    );
}

#[test]
fn a_payload_cannot_paint_the_terminal_and_json_errors_are_json() {
    let root = tempfile::tempdir().unwrap();
    let gw = &group(root.path(), 1)[0];
    gw.ok(&["write", "t", "\u{1b}[2J\u{1b}[31mred"]);
    gw.ok(&["write", "t", "line one\nline two\r\tend"]);
    let out = gw.ok(&["read", "t"]);
    assert!(
        !out.contains('\u{1b}'),
        "an escape sequence reached the terminal: {out:?}"
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "one line per message: {out:?}");
    assert!(
        lines[0].ends_with("\\u{1b}[2J\\u{1b}[31mred"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].ends_with("line one\\nline two\\r\\tend"),
        "{}",
        lines[1]
    );
    // --json keeps the payload exact.
    let json = gw.ok(&["--json", "read", "t"]);
    let first: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    assert_eq!(first["payload"], "\u{1b}[2J\u{1b}[31mred");

    // With --json an error is one JSON object: a kind and our words.
    for (args, kind) in [
        (vec!["--json", "write", "", "x"], "invalid_topic"),
        (vec!["--json", "read", "t", "--from", "garbage"], "error"),
        (
            vec!["--json", "sync", "127.0.0.1:1", "--timeout", "2"],
            "unreachable",
        ),
    ] {
        let stderr = gw.fails(&args);
        let line = stderr.lines().last().unwrap_or_default();
        let error: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|_| panic!("{args:?}: not a JSON error: {stderr:?}"));
        assert!(
            error["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{error}"
        );
        if kind != "error" {
            assert_eq!(error["error"]["kind"], kind, "{args:?}: {error}");
        }
    }
}

#[test]
fn write_timestamp_sets_the_readings_time() {
    let root = tempfile::tempdir().unwrap();
    let gw = &group(root.path(), 1)[0];
    gw.ok(&[
        "write",
        "t",
        "late",
        "--timestamp",
        "2026-12-01T08:00:00.250Z",
    ]);
    gw.ok(&["write", "t", "early", "--timestamp", "1000"]);
    let out = gw.ok(&["--json", "read", "t"]);
    let read: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["payload"].is_string())
        .collect();
    // One writer's messages stay in the order written; each keeps its time.
    assert_eq!(read[0]["payload"], "late");
    assert_eq!(read[0]["time_ms"], 1_796_112_000_250u64);
    assert_eq!(read[1]["payload"], "early");
    assert_eq!(read[1]["time_ms"], 1000);
    let refused = gw.fails(&["write", "t", "x", "--timestamp", "yesterday"]);
    assert!(refused.contains("RFC 3339"), "{refused}");
}

#[test]
fn binary_payloads_survive_read_json_into_write_ndjson_through_a_running_node() {
    use base64::Engine as _;
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 2);
    let (a, b) = (&gws[0], &gws[1]);
    let payloads: Vec<Vec<u8>> = vec![
        b"21.5".to_vec(),
        vec![0, 1, 2, 0xff, 0xfe],
        b"two\nlines".to_vec(),
        Vec::new(),
        (0..=255).collect(),
    ];
    let input: String = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| {
            format!(
                "{{\"payload_base64\":\"{}\",\"time_ms\":{}}}\n",
                base64::engine::general_purpose::STANDARD.encode(p),
                1000 + i
            )
        })
        .collect();
    let out = a.write_stdin_with(&["write", "raw", "--format", "ndjson"], &input);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exported = a.ok(&["--json", "read", "raw"]);

    // B is held by a running node: the import goes through its API.
    let _node = b.serve();
    let out = b.write_stdin_with(&["write", "raw", "--format", "ndjson"], &exported);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for gw in [a, b] {
        let read: Vec<serde_json::Value> = gw
            .ok(&["--json", "read", "raw"])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|v: &serde_json::Value| v.get("time_ms").is_some())
            .collect();
        let got: Vec<(Vec<u8>, u64)> = read
            .iter()
            .map(|v| {
                let bytes = match (v["payload"].as_str(), v["payload_base64"].as_str()) {
                    (Some(text), None) => text.as_bytes().to_vec(),
                    (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .unwrap(),
                    other => panic!("a message without one payload: {other:?}"),
                };
                (bytes, v["time_ms"].as_u64().unwrap())
            })
            .collect();
        let want: Vec<(Vec<u8>, u64)> = payloads.iter().cloned().zip(1000..).collect();
        assert_eq!(got, want);
    }

    // A bad line is refused with its number; the lines before it are written.
    let out = b.write_stdin_with(
        &["write", "bad", "--format", "ndjson"],
        "{\"payload\":\"ok\"}\n{\"paylod\":\"typo\"}\n",
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 2"), "{stderr}");
    let (held, _) = b.read("bad", None);
    assert_eq!(held, ["ok"]);
}

#[test]
fn messages_show_the_gateway_that_wrote_them_wherever_they_replicate() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 3);
    let (a, b, c) = (&gws[0], &gws[1], &gws[2]);
    a.write_stdin("t", "from-a\n");
    b.write_stdin("t", "from-b\n");
    // a names itself as it starts serving; b relays a's feed to c.
    let mut a_node =
        Running::spawn(a.cmd(&["serve", "--listen", "127.0.0.1:0", "--name", "roof-a"]));
    let listen = a_node
        .line()
        .strip_prefix("listening on ")
        .unwrap()
        .trim()
        .to_owned();
    b.ok(&["sync", &listen]);
    a_node.stop();
    let b_node = b.serve();
    c.ok(&["sync", &b_node.addr]);
    let b_name = b
        .ok(&["--json", "feeds"])
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|f| f["local"] == true)
        .and_then(|f| f["gateway"].as_str().map(str::to_owned))
        .expect("b's own feed has a gateway name (the host name by default)");
    assert!(!b_name.is_empty());

    // Text and JSON reads on c name the writers, not key prefixes.
    let text = c.ok(&["read", "t"]);
    let line_a = text.lines().find(|l| l.ends_with("from-a")).unwrap();
    assert!(line_a.contains("  roof-a  "), "{text}");
    let line_b = text.lines().find(|l| l.ends_with("from-b")).unwrap();
    assert!(line_b.contains(&format!("  {b_name}  ")), "{text}");
    let json: Vec<serde_json::Value> = c
        .ok(&["--json", "read", "t"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["payload"] == "from-a")
        .collect();
    assert_eq!(json[0]["gateway"], "roof-a");
    let feeds = c.ok(&["feeds"]);
    assert!(feeds.contains("roof-a"), "{feeds}");
    // b's node answers reads with the names too.
    let through_node = b.ok(&["read", "t"]);
    assert!(through_node.contains("  roof-a  "), "{through_node}");
    drop(b_node);

    let refused = a.fails(&["serve", "--listen", "127.0.0.1:0", "--name", "bad\nname"]);
    assert!(refused.contains("gateway name"), "{refused}");
}

/// A peer's offer refused by a `max-offered-feeds` of 3 (per message, or in all).
fn refused_by_cap_of_3(stderr: &str) -> bool {
    stderr.contains("the peer broke the protocol")
        && (stderr.contains("more than the 3 accepted") || stderr.contains("more than 3 feeds"))
}

/// The admission caps are flags of `sync` and `serve` and keys of the config
/// file: a lowered `max-offered-feeds` refuses a peer offering more, from the
/// flag and from the file, while lowered trial caps still let a group arrive.
#[test]
fn admission_caps_from_flags_and_config_take_effect() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 2);
    let topics = ["t0", "t1", "t2", "t3", "t4"];
    for topic in topics {
        gws[0].ok(&["write", topic, &format!("from-{topic}")]);
    }
    let server = gws[0].serve();

    let refused = gws[1].fails(&["sync", "--max-offered-feeds", "3", &server.addr]);
    assert!(refused_by_cap_of_3(&refused), "{refused}");
    let config = root.path().join("sync.toml");
    std::fs::write(&config, "[sync]\nmax-offered-feeds = 3\n").unwrap();
    let refused = gws[1].fails(&["--config", config.to_str().unwrap(), "sync", &server.addr]);
    assert!(refused_by_cap_of_3(&refused), "{refused}");
    // Refused as the peer's fault: nothing of the offer is kept.
    assert!(gws[1].ok(&["topics"]).is_empty());
    let zero = gws[1].fails(&["sync", "--max-unproven-feeds", "0", &server.addr]);
    assert!(zero.contains("--max-unproven-feeds"), "{zero}");

    // One feed on trial and one waiting at a time: the five arrive in waves.
    let out = gws[1].ok(&[
        "--json",
        "sync",
        "--max-unproven-feeds",
        "1",
        "--max-waiting-feeds",
        "1",
        &server.addr,
    ]);
    let summary: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(summary["feeds_learnt"], topics.len(), "{out}");
    server.stop();
    for topic in topics {
        assert_eq!(gws[1].read(topic, None).0, [format!("from-{topic}")]);
    }

    // The server's side, from its config file: a client offering more than the
    // server's cap is refused and none of its feeds is kept.
    let config = root.path().join("serve.toml");
    std::fs::write(&config, "[serve]\nmax-offered-feeds = 3\n").unwrap();
    gws[1].ok(&["write", "extra", "from-extra"]);
    let server = Running::spawn(gws[0].cmd(&[
        "--config",
        config.to_str().unwrap(),
        "serve",
        "--listen",
        "127.0.0.1:0",
    ]));
    let mut server = server;
    let line = server.line();
    let addr = line
        .strip_prefix("listening on ")
        .unwrap()
        .trim()
        .to_owned();
    let out = gws[1].run(&["sync", &addr]);
    server.stop();
    assert!(
        gws[0].read("extra", None).0.is_empty(),
        "sync: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
