//! The node mirroring an external broker (`serve --mqtt-broker --mqtt-subscribe`)
//! against a real mosquitto started here on a free loopback port with a temporary
//! config (Debian package `mosquitto`; installed with scripts/ci-deps.sh when
//! missing): messages mirrored; kill -9 of the node mid-stream and a restart lose
//! nothing the broker accepted; the broker stopped and restarted: the node
//! reconnects and nothing is lost.

mod cli_common;
#[path = "common/mqtt.rs"]
mod mqtt;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Instant,
};

use cli_common::*;
use mqtt::{metric, path};

fn mosquitto() -> PathBuf {
    let found = || {
        ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    };
    if let Some(path) = found() {
        return path;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ci-deps.sh");
    let status = Command::new("bash").arg(script).status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "mosquitto is missing and scripts/ci-deps.sh could not install it"
    );
    found().expect("mosquitto installed by scripts/ci-deps.sh")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// A mosquitto on `port` keeping its sessions in `dir`; killed on drop.
struct Broker {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Broker {
    fn start(dir: &Path, port: u16) -> Self {
        let config = dir.join("mosquitto.conf");
        std::fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\n{}allow_anonymous true\npersistence true\npersistence_location {}/\nmax_queued_messages 100000\nlog_dest file {}/mosquitto.log\nlog_type all\n",
                // As root mosquitto drops to its own user, which can't write the
                // temporary directory: it stays who it is.
                if is_root() { "user root\n" } else { "" },
                dir.display(),
                dir.display()
            ),
        )
        .unwrap();
        let child = Command::new(mosquitto())
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto runs");
        let addr = format!("127.0.0.1:{port}");
        assert!(
            poll_until(WAIT, || std::net::TcpStream::connect(&addr).is_ok()),
            "mosquitto listens"
        );
        Self {
            child: Some(child),
            port,
            dir: dir.to_owned(),
        }
    }

    /// SIGTERM (mosquitto saves its sessions), then waits for it.
    fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            child.wait().expect("mosquitto exits");
        }
    }

    fn restart(self) -> Self {
        let (dir, port) = (self.dir.clone(), self.port);
        self.stop();
        Self::start(&dir, port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn counts(payloads: &[String]) -> HashMap<&str, usize> {
    let mut counts = HashMap::new();
    for p in payloads {
        *counts.entry(p.as_str()).or_default() += 1;
    }
    counts
}

/// Publishes `payloads` to the broker, each acknowledged by it.
fn publish_all(broker_addr: &str, client: &str, topic: &str, payloads: &[String]) {
    let progress = mqtt::Progress::default();
    mqtt::publish_with_retry(
        broker_addr,
        client,
        topic,
        payloads,
        20,
        &progress,
        Instant::now() + WAIT,
    );
    assert_eq!(progress.acked.lock().unwrap().len(), payloads.len());
}

#[test]
fn an_external_broker_is_mirrored_through_a_kill_9_of_the_node_and_a_broker_restart() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 1);
    let broker_dir = root.path().join("broker");
    std::fs::create_dir(&broker_dir).unwrap();
    let port = free_port();
    let broker_addr = format!("127.0.0.1:{port}");
    let mut broker = Broker::start(&broker_dir, port);
    let url = format!("mqtt://{broker_addr}");
    let args = [
        "--http",
        "127.0.0.1:0",
        "--mqtt-broker",
        &url,
        "--mqtt-subscribe",
        "sensors/#",
        // Messages wait a while between arrival and append: the kill finds some,
        // and an ack to the broker before the append would lose them.
        "--mqtt-linger-ms",
        "200",
    ];
    let mut node = Some(gws[0].node(&args));
    let http_of = |node: &Option<Node>| node.as_ref().expect("running").http.clone();
    let topic = "sensors/a";

    // Mirrored once the node's subscription is in place.
    let mut probes = 0;
    assert!(poll_until(WAIT, || {
        probes += 1;
        publish_all(
            &broker_addr,
            "probe",
            "sensors/probe",
            &[format!("probe-{probes}")],
        );
        read_all(&http_of(&node), &path("sensors/probe")).is_some_and(|held| !held.is_empty())
    }));

    // kill -9 of the node in mid-stream; the broker keeps what was not acked.
    let payloads: Vec<String> = (0..2_000).map(|i| format!("m-{i}")).collect();
    std::thread::scope(|scope| {
        let publisher = scope.spawn(|| publish_all(&broker_addr, "sensor", topic, &payloads));
        let http = http_of(&node);
        assert!(poll_until(WAIT, || {
            metric(&http, "multifeed_mqtt_acked_total") >= 300
        }));
        node.take().expect("running").running.kill9();
        node = Some(gws[0].node(&args));
        publisher.join().expect("the publisher ends");
    });
    let mut node = node.expect("restarted");
    let held_all = |node: &Node, expected: &[String]| {
        poll_until(WAIT, || {
            read_all(&node.http, &path(topic)).is_some_and(|held| {
                let held = counts(&held);
                expected.iter().all(|p| held.contains_key(p.as_str()))
            })
        })
    };
    assert!(
        held_all(&node, &payloads),
        "the broker redelivered what the killed node had not acked"
    );

    // The broker stops and comes back: the node reconnects, nothing is lost.
    broker = broker.restart();
    eprintln!("broker restarted");
    let more: Vec<String> = (0..300).map(|i| format!("after-{i}")).collect();
    publish_all(&broker_addr, "sensor", topic, &more);
    let everything: Vec<String> = payloads.iter().chain(&more).cloned().collect();
    if !held_all(&node, &everything) {
        eprintln!(
            "{}",
            std::fs::read_to_string(broker_dir.join("mosquitto.log")).unwrap_or_default()
        );
        panic!(
            "not mirrored after the broker's restart: {} held; the node said: {}",
            read_all(&node.http, &path(topic)).unwrap_or_default().len(),
            node.running.stderr_so_far()
        );
    }
    if std::env::var_os("MQTT_TEST_DEBUG").is_some() {
        eprintln!(
            "{}",
            std::fs::read_to_string(broker_dir.join("mosquitto.log")).unwrap_or_default()
        );
    }

    let held = read_all(&node.http, &path(topic)).unwrap();
    let extra: usize = counts(&held).values().map(|n| n - 1).sum();
    let possible = metric(&node.http, "multifeed_mqtt_possible_duplicates_total");
    assert!(
        extra as u64 <= possible,
        "{extra} held twice, {possible} counted as possible duplicates (since the restart)"
    );
    eprintln!(
        "broker mirror: {} held, {extra} duplicates, {possible} possible",
        held.len()
    );
    node.running.stop();
    broker.stop();
}
