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
use mqtt::{Subscriber, metric, path};

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
        Self::start_with(dir, port, "")
    }

    /// With `extra` lines at the end of its config (e.g. a TLS listener).
    fn start_with(dir: &Path, port: u16, extra: &str) -> Self {
        let config = dir.join("mosquitto.conf");
        std::fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\n{}allow_anonymous true\npersistence true\npersistence_location {}/\nmax_queued_messages 100000\nlog_dest file {}/mosquitto.log\nlog_type all\n{extra}",
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
        // Paced (a load shape, not a wait), so the stream still flows when the
        // kill comes.
        let publisher = scope.spawn(|| {
            for chunk in payloads.chunks(50) {
                publish_all(&broker_addr, "sensor", topic, chunk);
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        });
        let http = http_of(&node);
        // The kill comes while messages are received and not yet appended (the
        // 200 ms linger): acks sent on receipt would lose them (tried: rumqttc's
        // automatic acks lost 50, 250 and 200 of them in 3 runs).
        assert!(poll_until(WAIT, || {
            let received = metric(&http, "multifeed_mqtt_received_messages_total");
            let appended = metric(&http, "multifeed_mqtt_appended_messages_total");
            appended >= 300 && received >= appended + 20
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
    if !held_all(&node, &payloads) {
        let held = read_all(&node.http, &path(topic)).unwrap_or_default();
        let held = counts(&held);
        let lost = payloads
            .iter()
            .filter(|p| !held.contains_key(p.as_str()))
            .count();
        panic!("{lost} messages lost: the broker did not redeliver them after the kill");
    }

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

/// Two sites, each with its own mosquitto: a filter announced at one site is
/// mirrored at both; each site's broker gets the other site's messages under
/// the egress prefix; a site subscribed to `#` gets its own egress back from its
/// broker and does not mirror it (no loop).
#[test]
fn an_announced_filter_is_mirrored_by_every_gateway_and_egress_never_loops() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 2);
    let brokers: Vec<(Broker, String)> = (0..2)
        .map(|i| {
            let dir = root.path().join(format!("broker{i}"));
            std::fs::create_dir(&dir).unwrap();
            let port = free_port();
            (Broker::start(&dir, port), format!("127.0.0.1:{port}"))
        })
        .collect();
    let (broker_a, broker_b) = (&brokers[0].1, &brokers[1].1);
    let listen = format!("127.0.0.1:{}", free_port());
    let url_a = format!("mqtt://{broker_a}");
    let url_b = format!("mqtt://{broker_b}");
    // site-a mirrors everything on its broker; site-b only what is announced.
    let a = gws[0].node(&[
        "--listen",
        &listen,
        "--http",
        "127.0.0.1:0",
        "--name",
        "site-a",
        "--mqtt-broker",
        &url_a,
        "--mqtt-subscribe",
        "#",
        "--mqtt-publish-remote",
        "remote",
    ]);
    let b = gws[1].node(&[
        "--peer",
        &listen,
        "--http",
        "127.0.0.1:0",
        "--name",
        "site-b",
        "--mqtt-broker",
        &url_b,
        "--mqtt-publish-remote",
        "remote",
    ]);
    let watcher_b = Subscriber::connect(broker_b, "watcher-b", "remote/#").expect("subscribed");

    // site-a's sensor: mirrored on site-a, replicated, published on site-b's broker.
    let mut probes = 0;
    assert!(
        poll_until(WAIT, || {
            probes += 1;
            publish_all(broker_a, "sensor-a", "sensors/t", &[format!("a-{probes}")]);
            watcher_b
                .received()
                .iter()
                .any(|(topic, _)| topic == "remote/site-a/sensors/t")
        }),
        "site-a's readings reach site-b's broker under remote/site-a/"
    );

    // site-b mirrors nothing of alerts/ until it is announced (at site-a).
    publish_all(
        broker_a,
        "operator",
        "multifeed/announce",
        &["alerts/#".into()],
    );
    assert!(poll_until(WAIT, || {
        metric(&b.http, "multifeed_mqtt_announced_filters") == 1
            && metric(&a.http, "multifeed_mqtt_announced_filters") == 1
    }));
    let mut fires = 0;
    assert!(
        poll_until(WAIT, || {
            fires += 1;
            publish_all(
                broker_b,
                "smoke-b",
                "alerts/fire",
                &[format!("fire-{fires}")],
            );
            read_all(&a.http, &path("alerts/fire")).is_some_and(|held| !held.is_empty())
        }),
        "an alert at site-b is mirrored there and replicated to site-a"
    );
    let (held_b, _) = gws[1].read("alerts/fire", None);
    assert!(!held_b.is_empty());

    // site-a's broker got site-b's alerts under remote/site-b/ and its `#`
    // subscription brought them back: skipped, never mirrored.
    assert!(poll_until(WAIT, || {
        metric(&a.http, "multifeed_mqtt_echoes_skipped_total") > 0
    }));
    for gw in &gws {
        let topics = gw.ok(&["topics"]);
        assert!(!topics.contains("remote/"), "nothing looped back: {topics}");
    }
    // An announcement that is no filter is dropped (acked, never stored).
    publish_all(
        broker_a,
        "operator",
        "multifeed/announce",
        &["a/#/b".into()],
    );
    assert!(poll_until(WAIT, || {
        metric(&a.http, "multifeed_mqtt_refused_messages_total") >= 1
    }));
    let (announced, _) = gws[0].read("multifeed/announce", None);
    assert_eq!(announced, vec!["alerts/#".to_owned()]);

    drop(watcher_b);
    a.running.stop();
    b.running.stop();
    for (broker, _) in brokers {
        broker.stop();
    }
}

/// A CA and a server certificate for 127.0.0.1 signed by it, made with the
/// openssl command (scripts/ci-deps.sh installs it where missing).
fn certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=multifeed test CA",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    );
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
}

/// `mqtts://`: the node mirrors a broker over TLS, trusting the CA it is
/// given; without it (the system's roots) it refuses the broker's certificate
/// and says so; a CA file it cannot read stops it at start.
#[test]
fn a_broker_over_tls_is_mirrored_with_the_ca_given_and_refused_without() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 2);
    let broker_dir = root.path().join("broker");
    std::fs::create_dir(&broker_dir).unwrap();
    certificates(&broker_dir);
    let (plain, tls) = (free_port(), free_port());
    let broker = Broker::start_with(
        &broker_dir,
        plain,
        &format!(
            "listener {tls} 127.0.0.1\ncafile {0}/ca.pem\ncertfile {0}/server.pem\nkeyfile {0}/server.key\n",
            broker_dir.display()
        ),
    );
    let url = format!("mqtts://127.0.0.1:{tls}");
    let ca = broker_dir.join("ca.pem");
    let node = gws[0].node(&[
        "--http",
        "127.0.0.1:0",
        "--mqtt-broker",
        &url,
        "--mqtt-ca-file",
        ca.to_str().unwrap(),
        "--mqtt-subscribe",
        "sensors/#",
    ]);
    let plain_addr = format!("127.0.0.1:{plain}");
    let mut probes = 0;
    assert!(
        poll_until(WAIT, || {
            probes += 1;
            publish_all(
                &plain_addr,
                "sensor",
                "sensors/tls",
                &[format!("r-{probes}")],
            );
            read_all(&node.http, &path("sensors/tls")).is_some_and(|held| !held.is_empty())
        }),
        "mirrored over TLS"
    );

    // The system's roots do not hold our test CA: refused, and said why.
    let mut untrusting = gws[1].node(&["--http", "127.0.0.1:0", "--mqtt-broker", &url]);
    let line = untrusting.running.stderr_line("is unreachable");
    assert!(line.to_lowercase().contains("certificate"), "{line}");
    untrusting.running.stop();

    let missing = root.path().join("no-such-ca.pem");
    let refused = gws[1].fails(&[
        "serve",
        "--mqtt-broker",
        &url,
        "--mqtt-ca-file",
        missing.to_str().unwrap(),
    ]);
    assert!(refused.contains("cannot read the CA file"), "{refused}");
    let refused = gws[1].fails(&[
        "serve",
        "--mqtt-broker",
        &format!("mqtt://{plain_addr}"),
        "--mqtt-ca-file",
        ca.to_str().unwrap(),
    ]);
    assert!(refused.contains("mqtts://"), "{refused}");
    node.running.stop();
    broker.stop();
}
