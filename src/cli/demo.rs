//! `multifeed demo`: three sensor gateway nodes on loopback, each with a store
//! that already holds readings, replicate live in a chain while all three publish
//! through their HTTP APIs; they converge, show one merged view and their peers,
//! and a peer on another protocol version is refused. `--stay` keeps them up with
//! their web pages until Ctrl-C.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use multifeed::{
    Multifeed, Options, ReplicateOptions, SharedKey, StorageConfig,
    topics::{Cursor, Message},
};

use super::{
    output::{self, Labelled},
    remote::NodeApi,
    signal::shutdown_signal,
    store::{KeySource, Store},
};
use crate::node::{self, AdmissionCaps, Node, NodeConfig};

const GATEWAYS: [&str; 3] = ["gateway-a", "gateway-b", "gateway-c"];
const TOPICS: [(&str, &str, f64); 2] = [("temperature", "C", 19.0), ("humidity", "%", 52.0)];
/// Readings each gateway held before its node started: one a minute.
const HISTORY: u64 = 20;
const HISTORY_PERIOD_MS: u64 = 60_000;
/// Then, live: one reading per gateway and topic every 100 ms for 3 s.
const LIVE_ROUNDS: u64 = 30;
const LIVE_PERIOD: Duration = Duration::from_millis(100);
/// Generous for a busy 2-core machine; convergence takes milliseconds.
const CONVERGE_WITHIN: Duration = Duration::from_secs(30);

struct Gateway {
    name: &'static str,
    node: Node,
    api: NodeApi,
    listen: String,
    page: String,
}

/// A reading's payload: JSON the web page charts.
fn reading(gateway: &str, value: f64, unit: &str) -> String {
    format!("{{\"gateway\":\"{gateway}\",\"value\":{value:.2},\"unit\":\"{unit}\"}}")
}

pub async fn run(dir: Option<PathBuf>, stay: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let temp;
    let dir = match dir {
        Some(dir) => dir,
        None => {
            temp = tempfile::tempdir().context("creating a temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    let key = SharedKey::generate();
    println!(
        "Three sensor gateways in {}, one shared group key. Each store already holds\n{HISTORY} readings per topic (`temperature`, `humidity`), one a minute, on its own feeds.\n",
        dir.display()
    );
    let mut gateways: Vec<Gateway> = Vec::new();
    let mut sensor = None;
    for (g, name) in GATEWAYS.into_iter().enumerate() {
        let store = open_with_history(&dir.join(name), &key, g).await?;
        let gateway_dir = store.dir.clone();
        // A chain: b dials a, c dials b; each also accepts peers and serves its API.
        let config = NodeConfig {
            listen: Some("127.0.0.1:0".into()),
            peers: gateways
                .last()
                .map(|p| p.listen.clone())
                .into_iter()
                .collect(),
            http: Some("127.0.0.1:0".into()),
            token: None,
            max_peers: 16,
            timeout: Duration::from_secs(10),
            json: false,
            quiet: true,
            name: None,
            // gateway-a's sensors publish over MQTT to its embedded listener.
            mqtt: node::mqtt::MqttConfig {
                listen: (g == 0).then(|| "127.0.0.1:0".to_owned()),
                ..Default::default()
            },
            caps: AdmissionCaps::default(),
            lan: None,
            #[cfg(feature = "dht")]
            dht: None,
        };
        let bound = Node::bind(store, config).await?;
        let listen = bound.listen_addr().context("the node listens")?.to_string();
        let http = bound.http_addr().context("the node serves its API")?;
        let mqtt = bound.mqtt_addr();
        let node = bound.start();
        let api = NodeApi::find(&gateway_dir, None)?.context("the node wrote its API file")?;
        println!(
            "  {name}: node up, peers on {listen}{}{}, web page http://{http}/",
            match gateways.last() {
                Some(prev) => format!(", dials {}", prev.name),
                None => String::new(),
            },
            match mqtt {
                Some(addr) => format!(", MQTT on {addr}"),
                None => String::new(),
            }
        );
        if let Some(addr) = mqtt {
            sensor = Some(Sensor::connect(addr).await?);
        }
        gateways.push(Gateway {
            name,
            node,
            api,
            listen,
            page: format!("http://{http}/"),
        });
    }

    let mut sensor = sensor.context("gateway-a listens for MQTT")?;
    println!(
        "\nLive: every gateway publishes a reading per topic every {} ms for {:.0} s, gateway-a's\nsensor over MQTT (QoS 1), the others through their HTTP APIs, while the nodes\nreplicate live.",
        LIVE_PERIOD.as_millis(),
        (LIVE_PERIOD * LIVE_ROUNDS as u32).as_secs_f64()
    );
    let live_started = Instant::now();
    let mut ticks = tokio::time::interval(LIVE_PERIOD);
    for round in 0..LIVE_ROUNDS {
        ticks.tick().await;
        for (g, gateway) in gateways.iter().enumerate() {
            for (topic, unit, base) in TOPICS {
                let value = base
                    + g as f64 * 1.5
                    + ((HISTORY + round) as f64 * 0.5).sin()
                    + (round as f64 * 0.37 + g as f64).cos() * 0.2;
                let payload = reading(gateway.name, value, unit);
                if g == 0 {
                    sensor.publish(topic, payload).await?;
                } else {
                    let message =
                        Message::new(topic, payload).with_content_type("application/json");
                    gateway.api.publish(message).await?;
                }
            }
        }
    }
    // Every MQTT reading acknowledged: each was appended before its PUBACK.
    let acked = sensor.finish().await?;
    let published = Instant::now();
    let each = (HISTORY + LIVE_ROUNDS) as usize * GATEWAYS.len();
    wait_until_converged(&gateways, each).await?;
    println!(
        "  {} readings published ({acked} over MQTT, each acknowledged once appended) in {:.1} s;\n  all three gateways hold all {each} of each topic {} ms after the last one.",
        LIVE_ROUNDS as usize * GATEWAYS.len() * TOPICS.len(),
        (published - live_started).as_secs_f64(),
        published.elapsed().as_millis()
    );

    let c = &gateways[2];
    let merged = read_all(&c.api, "temperature").await?;
    println!(
        "\n`temperature` merged by time, as {} reads it ({} readings from 3 gateways), the latest:",
        c.name,
        merged.len()
    );
    println!("  {:<24}  {:<10}  value", "time (UTC)", "gateway");
    let shown = 6;
    if merged.len() > shown {
        println!("  ... {} earlier", merged.len() - shown);
    }
    // The gateway column comes from each feed's metadata, learnt by replication
    // (through gateway-b for gateway-a's feeds), not from the payload.
    for m in merged.iter().skip(merged.len().saturating_sub(shown)) {
        let reading: serde_json::Value =
            serde_json::from_slice(&m.message.message.payload).unwrap_or_default();
        println!(
            "  {:<24}  {:<10}  {} {}",
            output::format_time(m.message.message.timestamp_ms),
            m.gateway.as_deref().unwrap_or("?"),
            reading["value"],
            reading["unit"].as_str().unwrap_or("")
        );
    }

    println!("\nEach gateway's peers, from its /peers:");
    println!(
        "  {:<10}  {:<16}  {:<9}  {:<10}  {:>9}  {:>10}",
        "gateway", "peer", "how", "state", "blocks in", "blocks out"
    );
    for g in &gateways {
        for peer in g.api.peers().await? {
            println!(
                "  {:<10}  {:<16}  {:<9}  {:<10}  {:>9}  {:>10}",
                g.name,
                peer["address"].as_str().unwrap_or("?"),
                peer["direction"].as_str().unwrap_or("?"),
                peer["state"].as_str().unwrap_or("?"),
                peer["blocks_received"].as_u64().unwrap_or(0),
                peer["blocks_sent"].as_u64().unwrap_or(0),
            );
        }
    }

    refuse_another_version(&dir, &key, &gateways[0]).await?;

    if stay {
        // Installed before the line that invites it: a Ctrl-C right after that
        // line stops the nodes cleanly instead of killing the process.
        let stop = shutdown_signal();
        println!("\nThe nodes stay up; open a web page:");
        for g in &gateways {
            println!("  {:<10}  {}", g.name, g.page);
        }
        println!("Ctrl-C stops them.");
        stop.await;
    }
    for g in gateways {
        g.node.shutdown().await?;
    }
    println!(
        "\nDone in {:.1} s. The same with the command-line tool: `multifeed init`, `join`, `serve --listen --peer --http --mqtt-listen`, `write`, `read` (see the README).",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A sensor publishing QoS 1 readings to a gateway's MQTT listener.
struct Sensor {
    client: rumqttc::AsyncClient,
    /// PUBACKs received so far.
    acked: tokio::sync::watch::Receiver<usize>,
    events: tokio::task::JoinHandle<anyhow::Result<()>>,
    sent: usize,
}

impl Sensor {
    async fn connect(addr: std::net::SocketAddr) -> anyhow::Result<Self> {
        let mut options =
            rumqttc::MqttOptions::new("demo-sensor", addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 64);
        let (count, acked) = tokio::sync::watch::channel(0);
        let events = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        count.send_modify(|n| *n += 1);
                    }
                    Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => bail!("the demo's MQTT sensor lost gateway-a: {e}"),
                }
            }
        });
        Ok(Self {
            client,
            acked,
            events,
            sent: 0,
        })
    }

    async fn publish(&mut self, topic: &str, payload: String) -> anyhow::Result<()> {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .await
            .context("the demo's MQTT sensor stopped")?;
        self.sent += 1;
        Ok(())
    }

    /// Waits for a PUBACK of every reading, then disconnects; how many there were.
    async fn finish(mut self) -> anyhow::Result<usize> {
        let sent = self.sent;
        let all_acked = tokio::time::timeout(CONVERGE_WITHIN, self.acked.wait_for(|n| *n >= sent))
            .await
            .map(|waited| waited.map(drop));
        match all_acked {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => {
                // The event loop ended: its error says why.
                self.events.await??;
                bail!("the demo's MQTT sensor stopped early");
            }
            Err(_) => bail!(
                "gateway-a acknowledged {} of {sent} MQTT readings within {CONVERGE_WITHIN:?}",
                *self.acked.borrow()
            ),
        }
        self.client
            .disconnect()
            .await
            .context("the demo's MQTT sensor stopped")?;
        self.events.await??;
        Ok(sent)
    }
}

/// A gateway's store holding its history: one reading a minute per topic, the
/// gateways 20 s apart.
async fn open_with_history(dir: &Path, key: &SharedKey, g: usize) -> anyhow::Result<Store> {
    let name = GATEWAYS[g];
    let store = Store::open_as(
        dir,
        key.clone(),
        KeySource::Flag,
        Some(name),
        &AdmissionCaps::default(),
    )
    .await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let start = now - now % HISTORY_PERIOD_MS - HISTORY * HISTORY_PERIOD_MS;
    for (topic, unit, base) in TOPICS {
        let readings = (0..HISTORY).map(|i| {
            let value = base + g as f64 * 1.5 + ((i + 3 * g as u64) as f64 * 0.5).sin();
            Message::new(topic, reading(name, value, unit))
                .with_timestamp_ms(start + i * HISTORY_PERIOD_MS + g as u64 * 20_000)
                .with_content_type("application/json")
        });
        store.topics.publish_batch(readings).await?;
    }
    Ok(store)
}

/// Every message of `topic` the node holds, merged by time.
async fn read_all(api: &NodeApi, topic: &str) -> anyhow::Result<Vec<Labelled>> {
    let mut all = Vec::new();
    let mut cursor = Cursor::default();
    loop {
        let (messages, next) = api.read(topic, &cursor, 10_000).await?;
        if messages.is_empty() {
            return Ok(all);
        }
        all.extend(messages);
        cursor = next;
    }
}

/// Waits until every gateway holds `each` messages of every topic, reading only
/// what arrived since its last look.
async fn wait_until_converged(gateways: &[Gateway], each: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + CONVERGE_WITHIN;
    let mut seen: Vec<(Cursor, usize)> =
        vec![(Cursor::default(), 0); gateways.len() * TOPICS.len()];
    loop {
        let mut short = Vec::new();
        for (g, gateway) in gateways.iter().enumerate() {
            for (t, (topic, _, _)) in TOPICS.into_iter().enumerate() {
                let (cursor, held) = &mut seen[g * TOPICS.len() + t];
                loop {
                    let (messages, next) = gateway.api.read(topic, cursor, 10_000).await?;
                    if messages.is_empty() {
                        break;
                    }
                    *held += messages.len();
                    *cursor = next;
                }
                if *held != each {
                    short.push(format!("{} holds {held} of {each} {topic}", gateway.name));
                }
            }
        }
        if short.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the gateways did not converge within {CONVERGE_WITHIN:?}: {}",
                short.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A peer speaking another major version of the feed exchange connects to
/// `gateway`: it is refused, and the gateway's store does not change.
async fn refuse_another_version(
    dir: &Path,
    key: &SharedKey,
    gateway: &Gateway,
) -> anyhow::Result<()> {
    let before = gateway.api.feeds().await?.len();
    let old = Multifeed::open(
        StorageConfig::dir(dir.join("old-version")),
        key.clone(),
        Options::default(),
    )
    .await?;
    old.writer("topic/temperature")
        .await?
        .append(b"from the future")
        .await?;
    let socket = tokio::net::TcpStream::connect(&gateway.listen).await?;
    let refused = old
        .replicate(
            socket,
            ReplicateOptions::new(true).protocol_version("2.0.0"),
        )
        .await;
    old.close().await?;
    println!(
        "\nA peer speaking feed-exchange protocol 2.0.0 connects to {}:",
        gateway.name
    );
    match refused {
        Err(e) => println!("  refused: {e}"),
        Ok(_) => bail!("{} did not refuse a version-mismatched peer", gateway.name),
    }
    let after = gateway.api.feeds().await?.len();
    if after != before {
        bail!("the refused peer changed {}", gateway.name);
    }
    println!("  {} still holds {before} feeds, unchanged.", gateway.name);
    Ok(())
}
