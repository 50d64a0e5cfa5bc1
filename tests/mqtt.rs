//! MQTT ingest through the node's embedded listener (`serve --mqtt-listen`), as
//! separate processes on loopback: QoS 0/1 publishes from rumqttc (3.1.1 and 5)
//! land in the topic, are read through the node and on a replica; kill -9 in
//! mid-stream loses no acknowledged message; bad input ends only that client.

mod cli_common;
#[path = "common/mqtt.rs"]
mod mqtt;

use std::collections::HashMap;

use cli_common::*;
use mqtt::{Publisher, Subscriber, metric, path};

const TOPIC: &str = "sensors/t1";

/// Every message of `topic` a node holds, as JSON, page by page.
fn read_json(http_addr: &str, topic: &str) -> Vec<serde_json::Value> {
    let mut all = Vec::new();
    let mut cursor = String::new();
    loop {
        let answer = http(
            http_addr,
            "GET",
            &format!("/topics/{}/messages?limit=5000&from={cursor}", path(topic)),
            &[],
            b"",
        )
        .expect("the node answers");
        assert_eq!(answer.status, 200, "{}", answer.body);
        let page = answer.json();
        let messages = page["messages"].as_array().expect("messages").clone();
        if messages.is_empty() {
            return all;
        }
        all.extend(messages);
        cursor = page["cursor"].as_str().expect("cursor").to_owned();
    }
}

fn counts(payloads: &[String]) -> HashMap<&str, usize> {
    let mut counts = HashMap::new();
    for p in payloads {
        *counts.entry(p.as_str()).or_default() += 1;
    }
    counts
}

fn text(payloads: Vec<Vec<u8>>) -> Vec<String> {
    payloads
        .into_iter()
        .map(|p| String::from_utf8(p).expect("text payloads"))
        .collect()
}

#[test]
fn qos_0_and_1_publishes_land_in_the_topic_read_through_the_node_and_on_a_replica() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 2);
    let listen = format!("127.0.0.1:{}", free_port());
    let mqtt_addr = format!("127.0.0.1:{}", free_port());
    let a = gws[0].node(&[
        "--listen",
        &listen,
        "--http",
        "127.0.0.1:0",
        "--mqtt-listen",
        &mqtt_addr,
    ]);
    let b = gws[1].node(&["--peer", &listen, "--http", "127.0.0.1:0"]);

    let publisher = Publisher::connect(&mqtt_addr, "sensor-1");
    let mut sent = Vec::new();
    for i in 0..300 {
        let payload = format!("{{\"t\": {i}}}");
        publisher.publish(TOPIC, payload.as_bytes());
        sent.push(payload);
    }
    for i in 0..20 {
        publisher.publish_qos0(TOPIC, format!("q0-{i}").as_bytes());
    }
    assert!(
        poll_until(WAIT, || publisher.acked_count() == sent.len()),
        "{} of {} acknowledged",
        publisher.acked_count(),
        sent.len()
    );
    // A PUBACK means appended: every acknowledged message is already there.
    let acked = text(publisher.acked());
    let (held, _) = gws[0].read(TOPIC, None);
    let held_counts = counts(&held);
    for payload in &acked {
        assert_eq!(held_counts.get(payload.as_str()), Some(&1), "{payload}");
    }
    // QoS 0 is best effort, but on loopback nothing is lost; it lands after the
    // QoS 1 publishes queued before it.
    assert!(poll_until(WAIT, || {
        let held = read_all(&a.http, &path(TOPIC)).unwrap_or_default();
        (0..20).all(|i| held.contains(&format!("q0-{i}")))
    }));

    // MQTT 5: a binary payload keeps its bytes and its content type.
    let binary: Vec<u8> = (0..=255u8).rev().collect();
    mqtt::publish_v5(
        &mqtt_addr,
        "sensors/raw",
        &binary,
        "application/octet-stream",
    );
    let raw = read_json(&a.http, "sensors/raw");
    assert_eq!(raw.len(), 1);
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(raw[0]["payload_base64"].as_str().expect("a binary payload"))
        .unwrap();
    assert_eq!(decoded, binary);
    assert_eq!(raw[0]["content_type"], "application/octet-stream");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let time_ms = raw[0]["time_ms"].as_u64().unwrap();
    assert!(now_ms - time_ms < 120_000, "stamped when received");

    // Readings share blocks: far fewer blocks than messages.
    let blocks: std::collections::HashSet<u64> = read_json(&a.http, TOPIC)
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert!(
        blocks.len() < sent.len() / 2,
        "{} blocks for {} messages",
        blocks.len(),
        sent.len()
    );

    // Replicated to the other gateway as they are.
    assert!(
        poll_until(WAIT, || {
            read_all(&b.http, &path(TOPIC)).is_some_and(|held| {
                let held = counts(&held);
                acked.iter().all(|p| held.get(p.as_str()) == Some(&1))
            })
        }),
        "gateway 2 did not receive every acknowledged message"
    );
    // Its own feed, which may replicate after the readings' one.
    assert!(
        poll_until(WAIT, || read_json(&b.http, "sensors/raw").len() == 1),
        "gateway 2 did not receive the binary message"
    );

    assert_eq!(metric(&a.http, "multifeed_mqtt_acked_total"), 301);
    assert_eq!(
        metric(&a.http, "multifeed_mqtt_received_messages_total"),
        321
    );
    drop(publisher);
    a.running.stop();
    b.running.stop();
}

#[test]
fn kill_9_mid_stream_loses_no_acknowledged_message_and_counts_what_may_be_twice() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 1);
    let mqtt_addr = format!("127.0.0.1:{}", free_port());
    // A long linger keeps messages received but not yet appended at any moment:
    // the kill finds some, and an ack sent before the append would lose them.
    let args = [
        "--http",
        "127.0.0.1:0",
        "--mqtt-listen",
        &mqtt_addr,
        "--mqtt-linger-ms",
        "200",
    ];
    let mut node = Some(gws[0].node(&args));
    let total = 3_000;
    let payloads: Vec<String> = (0..total).map(|i| format!("r-{i}")).collect();
    let progress = mqtt::Progress::default();
    let possible = std::thread::scope(|scope| {
        let publisher = scope.spawn(|| {
            mqtt::publish_with_retry(
                &mqtt_addr,
                "sensor-k",
                TOPIC,
                &payloads,
                100,
                &progress,
                std::time::Instant::now() + WAIT,
            )
        });
        // Mid-stream: some acknowledged, some in flight, some not sent yet.
        assert!(poll_until(WAIT, || progress.acked.lock().unwrap().len() >= 300));
        node.take().expect("running").running.kill9();
        let restarted = gws[0].node(&args);
        publisher.join().expect("the publisher ends");
        let possible = metric(&restarted.http, "multifeed_mqtt_possible_duplicates_total");
        node = Some(restarted);
        possible
    });
    let node = node.expect("restarted");
    let acked = progress.acked.into_inner().unwrap();
    assert_eq!(acked.len(), total, "every message acknowledged in the end");
    assert!(
        *progress.reconnects.lock().unwrap() > 0,
        "the kill cut the connection"
    );
    node.running.stop();
    let (held, _) = gws[0].read(TOPIC, None);
    let held_counts = counts(&held);
    let missing: Vec<&String> = acked
        .iter()
        .filter(|p| !held_counts.contains_key(p.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged but lost: {:?}",
        &missing[..missing.len().min(10)]
    );
    let extra: usize = held_counts.values().map(|n| n - 1).sum();
    assert!(
        extra as u64 <= possible,
        "{extra} copies held twice, only {possible} counted as possible duplicates"
    );
    eprintln!(
        "kill -9 mid-stream: {} acknowledged, {extra} duplicates held, {possible} counted as possible",
        acked.len()
    );
}

#[test]
fn bad_input_ends_only_that_client_with_a_typed_reason_logged_once_per_kind() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 1);
    let mqtt_addr = format!("127.0.0.1:{}", free_port());
    let mut node = gws[0].node(&[
        "--http",
        "127.0.0.1:0",
        "--mqtt-listen",
        &mqtt_addr,
        "--mqtt-max-packet",
        "4096",
    ]);
    let good = Publisher::connect(&mqtt_addr, "good");
    good.publish(TOPIC, b"before");
    assert!(poll_until(WAIT, || good.acked_count() == 1));

    let closed = |bytes: &[u8]| {
        mqtt::send_raw(&mqtt_addr, bytes, WAIT).expect("the node closes the connection")
    };
    // Garbage instead of CONNECT, many times: ended at once, logged once per kind.
    for _ in 0..10 {
        assert!(closed(b"GET / HTTP/1.1\r\n\r\n").is_empty());
        assert!(closed(b"\x10\xff\xff\xff\xff\x01").is_empty());
    }
    // A payload over the packet bound, refused from its header.
    let mut oversized = mqtt::connect_packet("big");
    oversized.extend(mqtt::publish_packet(TOPIC, &vec![7u8; 10_000], 1));
    // At most the CONNACK (the close may cut what the client still sends).
    let answer = closed(&oversized);
    assert!(answer.len() <= 4, "only the CONNACK: {answer:?}");
    // A topic name that is not UTF-8 (rumqttc's encoding with its bytes replaced).
    let mut bad_topic = mqtt::connect_packet("utf8");
    let mut publish = mqtt::publish_packet("ab", b"x", 1);
    let at = publish.windows(2).position(|w| w == b"ab").unwrap();
    publish[at..at + 2].copy_from_slice(&[0xff, 0xfe]);
    bad_topic.extend(publish);
    assert_eq!(closed(&bad_topic).len(), 4);
    // A topic that cannot be a multifeed topic.
    let mut wildcard = mqtt::connect_packet("wild");
    wildcard.extend(mqtt::publish_packet("a/#", b"x", 1));
    assert_eq!(closed(&wildcard).len(), 4);

    // The good client never noticed.
    good.publish(TOPIC, b"after");
    assert!(poll_until(WAIT, || good.acked_count() == 2));
    assert_eq!(good.errors(), 0);
    assert_eq!(
        read_all(&node.http, &path(TOPIC)).unwrap(),
        vec!["before", "after"]
    );
    assert_eq!(metric(&node.http, "multifeed_mqtt_client_errors_total"), 23);

    node.running
        .stderr_line("is larger than this listener accepts");
    node.running.stderr_line("a topic name is not valid UTF-8");
    node.running.stderr_line("\"a/#\" cannot be mirrored");
    let stderr = node.running.stderr_so_far();
    for kind in ["the first packet was not CONNECT", "malformed"] {
        let lines = stderr.lines().filter(|l| l.contains(kind)).count();
        assert_eq!(
            lines, 1,
            "{kind}: logged once per kind and interval: {stderr}"
        );
    }
    drop(good);
    node.running.stop();
}

#[test]
fn off_loopback_clients_must_show_the_gateways_token_unless_anonymous_is_accepted() {
    let root = tempfile::tempdir().unwrap();
    let gw = &group(root.path(), 1)[0];
    let token_file = root.path().join("gw0.token");
    let token = std::fs::read_to_string(&token_file).expect("join wrote a token");
    let token = token.trim();
    let port = free_port();
    let node = gw.node(&[
        "--http",
        "127.0.0.1:0",
        "--mqtt-listen",
        &format!("0.0.0.0:{port}"),
    ]);
    let addr = format!("127.0.0.1:{port}");
    // CONNACK return code 4 (bad user name or password), then the end.
    let refused = [0x20, 0x02, 0x00, 0x04];
    let anonymous = mqtt::send_raw(&addr, &mqtt::connect_packet("nobody"), WAIT);
    assert_eq!(anonymous.as_deref(), Some(&refused[..]));
    let wrong = mqtt::send_raw(
        &addr,
        &mqtt::connect_packet_with("guess", "x", "0000"),
        WAIT,
    );
    assert_eq!(wrong.as_deref(), Some(&refused[..]));
    // With the token: accepted, and the publish lands.
    let with_token = [
        mqtt::connect_packet_with("sensor", "any-user", token),
        mqtt::publish_packet("sensors/auth", b"hello", 7),
        mqtt::encode(rumqttc::mqttbytes::v4::Packet::Disconnect),
    ]
    .concat();
    let answer = mqtt::send_raw(&addr, &with_token, WAIT).expect("the node answers");
    assert_eq!(answer, [0x20, 0x02, 0x00, 0x00, 0x40, 0x02, 0x00, 0x07]);
    assert_eq!(
        read_all(&node.http, &path("sensors/auth")).unwrap(),
        vec!["hello".to_owned()]
    );
    assert_eq!(
        metric(&node.http, "multifeed_mqtt_client_errors_total"),
        2,
        "two refused"
    );
    node.running.stop();

    // Without a token file there is nothing to check against: refused to start.
    std::fs::remove_file(&token_file).unwrap();
    let refused = gw.fails(&["serve", "--mqtt-listen", "0.0.0.0:0"]);
    assert!(
        refused.contains("refusing to accept MQTT clients")
            && refused.contains("--mqtt-allow-anonymous"),
        "{refused}"
    );
    // Nothing was opened for good: the store is free again.
    gw.ok(&["feeds"]);
    let mut node = gw.node(&["--mqtt-listen", "0.0.0.0:0", "--mqtt-allow-anonymous"]);
    let warning = node.running.stderr_line("without authentication");
    assert!(warning.contains("--mqtt-allow-anonymous"), "{warning}");
    node.running.stop();
}

#[test]
fn other_gateways_messages_reach_local_subscribers_and_nothing_under_the_prefix_loops_back() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 2);
    let listen = format!("127.0.0.1:{}", free_port());
    let mqtt_addr = format!("127.0.0.1:{}", free_port());
    let a = gws[0].node(&[
        "--listen",
        &listen,
        "--http",
        "127.0.0.1:0",
        "--name",
        "site-a",
    ]);
    let b = gws[1].node(&[
        "--peer",
        &listen,
        "--http",
        "127.0.0.1:0",
        "--name",
        "site-b",
        "--mqtt-listen",
        &mqtt_addr,
        "--mqtt-publish-remote",
        "remote",
    ]);
    let dashboard = Subscriber::connect(&mqtt_addr, "dashboard", "remote/#")
        .expect("the listener serves subscriptions to egress");
    let temperatures =
        Subscriber::connect(&mqtt_addr, "panel", "remote/+/sensors/temp").expect("a filter with +");

    // site-b's own sensor: mirrored, but never published back to its subscribers.
    let sensor = Publisher::connect(&mqtt_addr, "sensor-b");
    for i in 0..20 {
        sensor.publish("sensors/temp", format!("b-{i}").as_bytes());
    }
    for i in 0..50 {
        publish(&a.http, &path("sensors/temp"), &format!("a-{i}")).expect("published on site-a");
        publish(&a.http, &path("sensors/hum"), &format!("h-{i}")).expect("published on site-a");
    }
    let expected: Vec<(String, Vec<u8>)> = (0..50)
        .map(|i| {
            (
                "remote/site-a/sensors/temp".to_owned(),
                format!("a-{i}").into_bytes(),
            )
        })
        .collect();
    assert!(
        poll_until(WAIT, || {
            let got = temperatures.received();
            expected.iter().all(|m| got.contains(m))
        }),
        "site-a's readings reach site-b's MQTT subscribers: got {:?}",
        temperatures.received().len()
    );
    assert!(poll_until(WAIT, || dashboard.received().len() >= 100));
    assert!(poll_until(WAIT, || sensor.acked_count() == 20));
    let all = dashboard.received();
    assert_eq!(
        all.len(),
        100,
        "each of site-a's messages once, nothing else"
    );
    assert!(
        all.iter()
            .all(|(topic, _)| topic.starts_with("remote/site-a/")),
        "site-b's own messages are not published back: {all:?}"
    );
    assert!(
        temperatures
            .received()
            .iter()
            .all(|(topic, _)| topic == "remote/+/sensors/temp".replace('+', "site-a").as_str())
    );
    assert_eq!(
        metric(&b.http, "multifeed_mqtt_egress_published_total"),
        100
    );

    // A publish under the prefix would loop: the client is refused, nothing is held.
    let looped = [
        mqtt::connect_packet("bridge"),
        mqtt::publish_packet("remote/site-a/sensors/temp", b"loop", 1),
    ]
    .concat();
    let answer = mqtt::send_raw(&mqtt_addr, &looped, WAIT).expect("the node closes");
    assert!(
        !answer.ends_with(&[0x40, 0x02, 0x00, 0x01]),
        "no PUBACK for a looping publish"
    );
    let topics = gws[1].ok(&["topics"]);
    assert!(
        !topics.contains("remote/"),
        "nothing under the prefix is mirrored: {topics}"
    );

    // An announcement must be a filter: a bad one is refused, a good one lands.
    let bad = [
        mqtt::connect_packet("announcer"),
        mqtt::publish_packet("multifeed/announce", b"alerts/#/x", 1),
    ]
    .concat();
    let answer = mqtt::send_raw(&mqtt_addr, &bad, WAIT).expect("the node closes");
    assert!(!answer.ends_with(&[0x40, 0x02, 0x00, 0x01]));
    sensor.publish("multifeed/announce", b"alerts/#");
    assert!(poll_until(WAIT, || sensor.acked_count() == 21));
    assert!(poll_until(WAIT, || {
        metric(&b.http, "multifeed_mqtt_announced_filters") == 1
    }));
    let (announced, _) = gws[1].read("multifeed/announce", None);
    assert_eq!(announced, vec!["alerts/#".to_owned()]);

    // A restart resumes egress where it stood: what arrived while the node was
    // down (here by a one-shot sync) is published, nothing is published twice.
    drop((dashboard, temperatures, sensor));
    b.running.stop();
    publish(&a.http, &path("sensors/temp"), "while-away").expect("published");
    gws[1].ok(&["sync", &listen]);
    let b = gws[1].node(&[
        "--peer",
        &listen,
        "--http",
        "127.0.0.1:0",
        "--name",
        "site-b",
        "--mqtt-listen",
        &mqtt_addr,
        "--mqtt-publish-remote",
        "remote",
    ]);
    let dashboard = Subscriber::connect(&mqtt_addr, "dashboard-2", "remote/#").expect("subscribed");
    // (Published at once, before this subscriber came: QoS 0 to whoever listens.)
    assert!(poll_until(WAIT, || {
        metric(&b.http, "multifeed_mqtt_egress_published_total") == 1
    }));
    publish(&a.http, &path("sensors/temp"), "after-restart").expect("published");
    assert!(poll_until(WAIT, || !dashboard.received().is_empty()));
    assert_eq!(
        dashboard.received(),
        vec![(
            "remote/site-a/sensors/temp".to_owned(),
            b"after-restart".to_vec()
        )],
    );
    assert_eq!(
        metric(&b.http, "multifeed_mqtt_egress_published_total"),
        2,
        "only what is new since the stop"
    );
    a.running.stop();
    b.running.stop();
}
