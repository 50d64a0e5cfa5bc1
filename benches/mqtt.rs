//! MQTT QoS 1 publish -> PUBACK, 100-byte payloads, from 1 and 10 publishers,
//! against the node's embedded listener (`multifeed serve --mqtt-listen`, an
//! on-disk store, a PUBACK only once appended) and, as the anchor measured in the
//! same run, nats-server's MQTT listener with JetStream file storage (Debian
//! package `nats-server`; `scripts/bench-deps.sh` installs it; skipped with the
//! reason printed when it can't be run).
//!
//! The load generator is the same for both: per publisher one TCP connection
//! speaking MQTT 3.1.1 through rumqttc's codec, `WINDOW` (default 100) publishes
//! in flight, each latency from just before the PUBLISH is written to its PUBACK.
//!
//! `cargo bench --bench mqtt`; counts: `MESSAGES` per publisher (default 20,000);
//! `LINGER_MS` passes `--mqtt-linger-ms` to the node (default: the node's).

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use bytes::BytesMut;
use rumqttc::{QoS, mqttbytes::v4};

const BIN: &str = env!("CARGO_BIN_EXE_multifeed");

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn encode(packet: v4::Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    packet.write(&mut out, usize::MAX).expect("encodes");
    out.to_vec()
}

/// A server process, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `addr` accepts connections (the server is up).
fn wait_listening(addr: &str) {
    let end = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < end, "nothing listens on {addr}");
        // Polling a port another process opens: the connect decides.
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_node(dir: &Path) -> (Server, String) {
    let status = Command::new(BIN)
        .arg("--dir")
        .arg(dir)
        .arg("init")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("multifeed init");
    assert!(status.success());
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new(BIN)
        .arg("--dir")
        .arg(dir)
        .args(["serve", "--mqtt-listen", &addr])
        .args(
            std::env::var("LINGER_MS")
                .map(|ms| vec!["--mqtt-linger-ms".to_owned(), ms])
                .unwrap_or_default(),
        )
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("multifeed serve");
    wait_listening(&addr);
    (Server(child), addr)
}

fn start_nats(dir: &Path) -> Result<(Server, String), String> {
    let addr = format!("127.0.0.1:{}", free_port());
    let config = dir.join("nats.conf");
    std::fs::write(
        &config,
        format!(
            "server_name: bench\nlisten: 127.0.0.1:{}\njetstream {{ store_dir: {:?} }}\nmqtt {{ listen: {:?} }}\n",
            free_port(),
            dir.join("js"),
            addr
        ),
    )
    .map_err(|e| e.to_string())?;
    let child = Command::new("nats-server")
        .arg("-c")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            format!("nats-server cannot be run ({e}); install it with scripts/bench-deps.sh")
        })?;
    let server = Server(child);
    wait_listening(&addr);
    Ok((server, addr))
}

/// One publisher: `count` QoS 1 publishes with `window` in flight; the latency of each.
fn publish(addr: &str, client_id: &str, count: usize, window: usize) -> Vec<Duration> {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let mut connect = v4::Connect::new(client_id);
    connect.keep_alive = 60;
    stream
        .write_all(&encode(v4::Packet::Connect(connect)))
        .expect("CONNECT");
    let mut buffer = BytesMut::new();
    let read_packet = |stream: &mut TcpStream, buffer: &mut BytesMut| loop {
        match v4::Packet::read(buffer, 1 << 20) {
            Ok(packet) => return packet,
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                let mut chunk = [0u8; 16 * 1024];
                let n = stream.read(&mut chunk).expect("read");
                assert!(n > 0, "the server closed the connection");
                buffer.extend_from_slice(&chunk[..n]);
            }
            Err(e) => panic!("bad packet from the server: {e}"),
        }
    };
    let v4::Packet::ConnAck(_) = read_packet(&mut stream, &mut buffer) else {
        panic!("no CONNACK")
    };
    let payload = vec![b'7'; 100];
    let topic = format!("bench/{client_id}");
    let mut sent_at: HashMap<u16, Instant> = HashMap::new();
    let mut latencies = Vec::with_capacity(count);
    let mut next = 0usize;
    let mut out = Vec::new();
    while latencies.len() < count {
        while next < count && sent_at.len() < window {
            let mut publish = v4::Publish::new(&topic, QoS::AtLeastOnce, payload.clone());
            publish.pkid = (next % 65_535 + 1) as u16;
            out.extend(encode(v4::Packet::Publish(publish)));
            sent_at.insert((next % 65_535 + 1) as u16, Instant::now());
            next += 1;
        }
        if !out.is_empty() {
            stream.write_all(&out).expect("PUBLISH");
            out.clear();
        }
        if let v4::Packet::PubAck(ack) = read_packet(&mut stream, &mut buffer)
            && let Some(at) = sent_at.remove(&ack.pkid)
        {
            latencies.push(at.elapsed());
        }
    }
    latencies
}

/// Messages/s and p99 of `publishers` publishing `count` each.
fn run(addr: &str, publishers: usize, count: usize, window: usize) -> (f64, Duration) {
    let start = Instant::now();
    let threads: Vec<_> = (0..publishers)
        .map(|i| {
            let addr = addr.to_owned();
            std::thread::spawn(move || publish(&addr, &format!("p{i}"), count, window))
        })
        .collect();
    let mut all: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("publisher"))
        .collect();
    let rate = all.len() as f64 / start.elapsed().as_secs_f64();
    all.sort();
    let p99 = all[(all.len() * 99 / 100).min(all.len() - 1)];
    (rate, p99)
}

fn main() {
    let count = env_count("MESSAGES", 20_000);
    let window = env_count("WINDOW", 100);
    println!(
        "MQTT QoS 1 publish -> PUBACK, 100-byte payloads, {count} per publisher, {window} in flight each"
    );
    println!(
        "{:<40} {:>11} {:>14} {:>10}",
        "server", "publishers", "messages/s", "p99 ms"
    );
    let mut figures: HashMap<(&str, usize), (f64, Duration)> = HashMap::new();
    for publishers in [1, 10] {
        let dir = tempfile::tempdir().expect("temp dir");
        let (_node, addr) = start_node(&dir.path().join("store"));
        let figure = run(&addr, publishers, count, window);
        print_row("multifeed --mqtt-listen (disk store)", publishers, figure);
        figures.insert(("multifeed", publishers), figure);

        let dir = tempfile::tempdir().expect("temp dir");
        match start_nats(dir.path()) {
            Ok((_nats, addr)) => {
                let figure = run(&addr, publishers, count, window);
                print_row("nats-server MQTT (JetStream file)", publishers, figure);
                figures.insert(("nats", publishers), figure);
            }
            Err(reason) => println!("nats-server skipped: {reason}"),
        }
    }
    for publishers in [1, 10] {
        if let (Some(ours), Some(nats)) = (
            figures.get(&("multifeed", publishers)),
            figures.get(&("nats", publishers)),
        ) {
            println!(
                "{publishers} publisher(s): {:.2}x NATS throughput, p99 {:.2} ms vs {:.2} ms",
                ours.0 / nats.0,
                ours.1.as_secs_f64() * 1e3,
                nats.1.as_secs_f64() * 1e3
            );
        }
    }
}

/// One line of the table: messages/s and p99 in ms.
fn print_row(what: &str, publishers: usize, (rate, p99): (f64, Duration)) {
    println!(
        "{what:<40} {publishers:>11} {rate:>14.0} {:>10.2}",
        p99.as_secs_f64() * 1e3
    );
}
