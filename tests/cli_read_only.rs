//! The binary on stores it cannot write (a read-only bind mount, immutable files):
//! `read`, `feeds`, `topics` and `verify` work with the full data and say writes
//! are disabled, nothing under the store changes, and `write` fails saying why,
//! never calling it damage. Also: output into a pipe whose reader went away.

mod cli_common;
#[path = "common/readonly.rs"]
mod readonly;

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::Stdio,
};

use cli_common::*;
use readonly::*;

const TOPICS: [&str; 3] = ["temperature", "humidity", "wind"];

/// A gateway `a` in `root` holding three topics of its own and one feed synced
/// from another gateway; returns it.
fn gateway_with_data(root: &Path) -> Gw {
    let a = Gw::new(root, "a");
    let key = a.ok(&["init"]).trim().to_owned();
    for (i, topic) in TOPICS.iter().enumerate() {
        let lines: String = (0..5 + i * 10).map(|n| format!("{topic} {n}\n")).collect();
        a.write_stdin(topic, &lines);
    }
    let elsewhere = tempfile::tempdir().unwrap();
    let b = Gw::new(elsewhere.path(), "b");
    b.ok(&["join", &key]);
    b.write_stdin("temperature", "from b 1\nfrom b 2\n");
    let server = b.serve();
    a.ok(&["sync", &server.addr]);
    drop(server);
    a
}

/// What the read commands print, stdout only.
fn read_outputs(gw: &Gw) -> Vec<String> {
    let mut outputs = Vec::new();
    for topic in TOPICS {
        outputs.push(gw.ok(&["--json", "read", topic]));
    }
    outputs.push(gw.ok(&["--json", "feeds"]));
    outputs.push(gw.ok(&["topics"]));
    outputs.push(gw.ok(&["--json", "verify"]));
    outputs
}

/// Runs every read command on `gw`, which cannot be written because of `why`:
/// each succeeds, prints `expected` and says once that writes are disabled.
fn reads_with_notice(gw: &Gw, expected: &[String], why: &str) {
    let mut commands: Vec<Vec<&str>> = TOPICS.iter().map(|t| vec!["--json", "read", t]).collect();
    commands.push(vec!["--json", "feeds"]);
    commands.push(vec!["topics"]);
    commands.push(vec!["--json", "verify"]);
    for (args, expected) in commands.iter().zip(expected) {
        let out = gw.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?} failed: {stderr}");
        assert_eq!(&String::from_utf8_lossy(&out.stdout), expected, "{args:?}");
        let notices: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("opened read-only and writes are disabled"))
            .collect();
        assert_eq!(notices.len(), 1, "{args:?}: {stderr}");
        assert!(notices[0].contains(why), "{args:?}: {stderr}");
        assert_not_called_damage(&stderr);
    }
}

/// Nothing in `stderr` calls the store damaged or advises restoring it.
fn assert_not_called_damage(stderr: &str) {
    for word in ["damaged storage", "damaged member", "DAMAGED", "restore"] {
        assert!(!stderr.contains(word), "{word:?} in: {stderr}");
    }
}

/// `write` is refused, saying why and what to do, not "damage".
fn write_refused(gw: &Gw, why: &str, advice: &str) {
    let out = gw.write_stdin_with(&["write", "temperature"], "refused 1\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "write succeeded: {stderr}");
    assert!(stderr.contains("cannot be written"), "{stderr}");
    assert!(stderr.contains(why) && stderr.contains(advice), "{stderr}");
    assert!(
        stderr.contains("read, feeds, topics and verify work"),
        "{stderr}"
    );
    assert_not_called_damage(&stderr);
}

#[test]
fn a_store_on_a_read_only_mount_is_read_with_writes_disabled() {
    let root = tempfile::tempdir().unwrap();
    let source = root.path().join("src");
    let a = gateway_with_data(&source);
    let expected = read_outputs(&a);
    assert!(expected[0].lines().count() > 5, "{}", expected[0]);
    let before = listing(&source);
    let mount = match ReadOnlyMount::new(&source, &root.path().join("ro")) {
        Ok(mount) => mount,
        Err(reason) => {
            eprintln!("skipped: cannot make a read-only bind mount here ({reason})");
            return;
        }
    };
    let ro = Gw::new(&mount.path, "a");
    reads_with_notice(&ro, &expected, "read-only file system");
    write_refused(&ro, "read-only file system", "remount it read-write");

    // A reader holds a shared lock on LOCK (the same file through the mount):
    // another reader runs beside it, a writer on the writable path is refused
    // until it ends.
    let mut follower = Running::spawn(ro.cmd(&["read", "temperature", "--follow"]));
    assert!(follower.line().contains("temperature 0"));
    assert_eq!(ro.ok(&["topics"]), expected[TOPICS.len() + 1]);
    let out = a.write_stdin_with(&["write", "temperature"], "while a reader runs\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("in use by another multifeed process"),
        "{stderr}"
    );
    follower.kill9();
    drop(mount);
    assert_eq!(listing(&source), before, "the store changed");
    // Writable again where it is.
    a.write_stdin("temperature", "after\n");
}

#[test]
fn an_immutable_store_is_read_with_writes_disabled() {
    let root = tempfile::tempdir().unwrap();
    let a = gateway_with_data(root.path());
    if let Err(reason) = immutable_files_supported(root.path()) {
        eprintln!("skipped: immutable files are not supported here ({reason})");
        return;
    }
    let expected = read_outputs(&a);

    // One feed's files immutable: everything still reads, without notice (the
    // store can be written); appending to that feed says why it cannot.
    let key = a.writer_key("temperature");
    let feed_dir = a.dir.join("feeds").join(&key);
    let guard = Immutable::new(&[&feed_dir]).unwrap();
    for args in [
        &["--json", "read", "temperature"][..],
        &["verify"],
        &["feeds"],
    ] {
        let out = a.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {stderr}");
        assert_not_called_damage(&stderr);
        assert!(!stderr.contains("read-only"), "{args:?}: {stderr}");
    }
    let (payloads, _) = a.read("temperature", None);
    assert_eq!(payloads.len(), 5 + 2);
    let out = a.write_stdin_with(&["write", "temperature"], "refused\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("permission denied (not damage)") && stderr.contains("chattr -i"),
        "{stderr}"
    );
    assert_not_called_damage(&stderr);
    a.write_stdin("humidity", "still fine\n");
    drop(guard);
    let expected_after = read_outputs(&a);

    // The whole store immutable: read-only with the notice.
    let before = listing(&a.dir);
    let guard = Immutable::new(&[&a.dir]).unwrap();
    reads_with_notice(&a, &expected_after, "permission denied");
    write_refused(&a, "permission denied", "chattr -i");
    drop(guard);
    assert_eq!(listing(&a.dir), before, "the store changed");
    assert_ne!(expected, expected_after);
}

/// Every command that prints a lot stops quietly when its reader goes away:
/// no panic message, exit code 141 (as for a process ended by SIGPIPE).
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let root = tempfile::tempdir().unwrap();
    let a = Gw::new(root.path(), "a");
    a.ok(&["init"]);
    // Far more output than a pipe buffers (64 KiB), so `read` is still printing
    // when its reader goes.
    let lines: String = (0..20_000)
        .map(|n| format!("reading number {n}\n"))
        .collect();
    a.write_stdin("temperature", &lines);

    // `read | head -1`: the reader takes one line and goes.
    let mut child = a
        .cmd(&["read", "temperature"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.contains("reading number 0"), "{first}");
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(141), "{stderr}");

    // A reader gone before anything was printed.
    for args in [
        &["read", "temperature"][..],
        &["--json", "read", "temperature"],
        &["feeds"],
        &["--json", "feeds"],
        &["topics"],
        &["verify"],
        &["--json", "verify"],
    ] {
        let mut child = a
            .cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(out.status.code(), Some(141), "{args:?}: {stderr}");
    }
    // Nothing was lost or changed by it.
    a.verify();
}
