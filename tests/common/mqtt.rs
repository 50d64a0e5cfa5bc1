//! MQTT helpers of the tests: a rumqttc publisher that records which payloads
//! the node acknowledged, and raw packets built with rumqttc's codec.
#![allow(dead_code)]

use std::{
    collections::{HashMap, VecDeque},
    io::{Read, Write},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use bytes::BytesMut;
use rumqttc::{Client, Event, MqttOptions, Outgoing, Packet, QoS, mqttbytes::v4};

/// What the publisher's event thread saw.
#[derive(Default)]
struct Seen {
    /// Payloads handed to the client, not yet matched to a packet id.
    queued: VecDeque<Vec<u8>>,
    /// The payload each unacknowledged packet id carries.
    by_pkid: HashMap<u16, Vec<u8>>,
    acked: Vec<Vec<u8>>,
    errors: usize,
}

/// A QoS 1 MQTT 3.1.1 publisher (rumqttc) that keeps its session: after a lost
/// connection it reconnects and resends what has no PUBACK.
pub struct Publisher {
    client: Client,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Publisher {
    pub fn connect(addr: &str, client_id: &str) -> Self {
        let (host, port) = addr.rsplit_once(':').expect("host:port");
        let mut options = MqttOptions::new(client_id, host, port.parse().expect("a port"));
        options.set_clean_session(false);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(8 * 1024 * 1024, 8 * 1024 * 1024);
        let (client, mut connection) = Client::new(options, 1_000);
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                for event in connection.iter() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let mut seen = seen.lock().unwrap();
                    match event {
                        Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                            // A resend keeps its id; a new publish takes the next payload.
                            if !seen.by_pkid.contains_key(&pkid) {
                                let payload = seen.queued.pop_front().expect("a queued payload");
                                seen.by_pkid.insert(pkid, payload);
                            }
                        }
                        Ok(Event::Incoming(Packet::PubAck(ack))) => {
                            if let Some(payload) = seen.by_pkid.remove(&ack.pkid) {
                                seen.acked.push(payload);
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            if std::env::var_os("MQTT_TEST_DEBUG").is_some() {
                                eprintln!("publisher: {e:?}; {} unacked", seen.by_pkid.len());
                            }
                            seen.errors += 1;
                            drop(seen);
                            // The client's reconnect interval while the node is down.
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })
        };
        Self {
            client,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// Queues a QoS 1 publish.
    pub fn publish(&self, topic: &str, payload: &[u8]) {
        self.seen.lock().unwrap().queued.push_back(payload.to_vec());
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .expect("queued");
    }

    /// Queues a QoS 0 publish (best effort, never acknowledged).
    pub fn publish_qos0(&self, topic: &str, payload: &[u8]) {
        self.client
            .publish(topic, QoS::AtMostOnce, false, payload.to_vec())
            .expect("queued");
    }

    /// Payloads acknowledged so far.
    pub fn acked(&self) -> Vec<Vec<u8>> {
        self.seen.lock().unwrap().acked.clone()
    }

    pub fn acked_count(&self) -> usize {
        self.seen.lock().unwrap().acked.len()
    }

    /// Connection errors seen (each followed by a reconnect).
    pub fn errors(&self) -> usize {
        self.seen.lock().unwrap().errors
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.client.disconnect();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An MQTT 5 publisher (rumqttc v5): publishes one QoS 1 message with a content
/// type and waits for its PUBACK.
pub fn publish_v5(addr: &str, topic: &str, payload: &[u8], content_type: &str) {
    use rumqttc::v5::{
        Client, Event, MqttOptions,
        mqttbytes::{QoS, v5::Packet, v5::PublishProperties},
    };
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    let options = MqttOptions::new("v5-publisher", host, port.parse().expect("a port"));
    let (client, mut connection) = Client::new(options, 10);
    let properties = PublishProperties {
        content_type: Some(content_type.into()),
        ..Default::default()
    };
    client
        .publish_with_properties(topic, QoS::AtLeastOnce, false, payload.to_vec(), properties)
        .expect("queued");
    for event in connection.iter() {
        match event.expect("the node answers an MQTT 5 client") {
            Event::Incoming(Packet::PubAck(_)) => break,
            Event::Incoming(Packet::Disconnect(d)) => panic!("disconnected: {d:?}"),
            _ => {}
        }
    }
    let _ = client.disconnect();
}

/// `(topic, payload)` of each publish a [`Subscriber`] got.
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// An MQTT 3.1.1 subscriber (rumqttc) recording every publish it gets.
pub struct Subscriber {
    client: Client,
    received: Received,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Subscriber {
    /// Connects, subscribes to `filter` and waits for the SUBACK; `None` if the
    /// server refused the filter.
    pub fn connect(addr: &str, client_id: &str, filter: &str) -> Option<Self> {
        let (host, port) = addr.rsplit_once(':').expect("host:port");
        let mut options = MqttOptions::new(client_id, host, port.parse().expect("a port"));
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut connection) = Client::new(options, 100);
        client.subscribe(filter, QoS::AtLeastOnce).expect("queued");
        let received: Received = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (subacked, suback) = mpsc::channel();
        let thread = {
            let (received, stop) = (received.clone(), stop.clone());
            std::thread::spawn(move || {
                for event in connection.iter() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match event {
                        Ok(Event::Incoming(Packet::SubAck(ack))) => {
                            let _ = subacked.send(ack.return_codes);
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            received.lock().unwrap().push((p.topic, p.payload.to_vec()));
                        }
                        Ok(_) => {}
                        // A refused filter, or the server went away: reconnects.
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                }
            })
        };
        let subscriber = Self {
            client,
            received,
            stop,
            thread: Some(thread),
        };
        let codes = recv(&suback, Duration::from_secs(20)).expect("a SUBACK");
        codes
            .iter()
            .all(|c| matches!(c, v4::SubscribeReasonCode::Success(_)))
            .then_some(subscriber)
    }

    /// Every `(topic, payload)` received so far.
    pub fn received(&self) -> Vec<(String, Vec<u8>)> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.client.disconnect();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A 3.1.1 packet as bytes, from rumqttc's encoder.
pub fn encode(packet: v4::Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    packet.write(&mut out, usize::MAX).expect("encodes");
    out.to_vec()
}

pub fn connect_packet(client_id: &str) -> Vec<u8> {
    encode(v4::Packet::Connect(v4::Connect::new(client_id)))
}

pub fn connect_packet_with(client_id: &str, username: &str, password: &str) -> Vec<u8> {
    let mut connect = v4::Connect::new(client_id);
    connect.set_login(username, password);
    encode(v4::Packet::Connect(connect))
}

pub fn publish_packet(topic: &str, payload: &[u8], pkid: u16) -> Vec<u8> {
    let mut publish = v4::Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
    publish.pkid = pkid;
    encode(v4::Packet::Publish(publish))
}

/// Sends `bytes` on a fresh connection and reads until the node closes it;
/// what it answered, or `None` if it kept the connection open for `wait`.
pub fn send_raw(addr: &str, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(wait)).expect("timeout");
    // The node may close before it read everything: a failed write is fine.
    let _ = stream.write_all(bytes);
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return Some(answer),
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(answer),
            Err(_) => return None,
        }
    }
}

/// Waits for a value from `rx` (a thread's answer), bounded.
pub fn recv<T>(rx: &mpsc::Receiver<T>, wait: Duration) -> Option<T> {
    rx.recv_timeout(wait).ok()
}

/// What [`publish_with_retry`] got done so far.
#[derive(Default)]
pub struct Progress {
    /// Payloads acknowledged, in the order of their PUBACKs.
    pub acked: Mutex<Vec<String>>,
    /// Connections lost (each followed by a reconnect).
    pub reconnects: Mutex<usize>,
}

/// A QoS 1 publisher written for the kill tests on rumqttc's codec, so that
/// which payload each PUBACK acknowledges is known exactly: it keeps a window
/// of publishes in flight, and after a lost connection it reconnects (keeping
/// its session) and resends every unacknowledged one with the DUP flag, as MQTT
/// asks. Returns once every payload is acknowledged or `deadline` passes.
pub fn publish_with_retry(
    addr: &str,
    client_id: &str,
    topic: &str,
    payloads: &[String],
    window: usize,
    progress: &Progress,
    deadline: std::time::Instant,
) {
    let (acked, reconnects) = (&progress.acked, &progress.reconnects);
    let pkid = |i: usize| (i % 65_535 + 1) as u16;
    let mut unacked: std::collections::BTreeMap<u16, usize> = Default::default();
    let mut next = 0;
    while (next < payloads.len() || !unacked.is_empty()) && std::time::Instant::now() < deadline {
        let Ok(stream) = std::net::TcpStream::connect(addr) else {
            // The client's reconnect interval while the node is down.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let mut connect = v4::Connect::new(client_id);
        connect.clean_session = false;
        let mut run = || -> std::io::Result<()> {
            let send = |bytes: &[u8]| (&stream).write_all(bytes);
            send(&encode(v4::Packet::Connect(connect.clone())))?;
            let mut buffer = BytesMut::new();
            let read_packet = |buffer: &mut BytesMut| -> std::io::Result<v4::Packet> {
                loop {
                    match v4::Packet::read(buffer, 1 << 20) {
                        Ok(packet) => return Ok(packet),
                        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                            let mut chunk = [0u8; 4096];
                            let n = (&stream).read(&mut chunk)?;
                            if n == 0 {
                                return Err(std::io::ErrorKind::UnexpectedEof.into());
                            }
                            buffer.extend_from_slice(&chunk[..n]);
                        }
                        Err(e) => return Err(std::io::Error::other(e.to_string())),
                    }
                }
            };
            let v4::Packet::ConnAck(_) = read_packet(&mut buffer)? else {
                return Err(std::io::Error::other("no CONNACK"));
            };
            let resend: Vec<(u16, usize)> = unacked.iter().map(|(k, v)| (*k, *v)).collect();
            for (id, index) in resend {
                let mut publish = v4::Publish::new(
                    topic,
                    QoS::AtLeastOnce,
                    payloads[index].clone().into_bytes(),
                );
                publish.pkid = id;
                publish.dup = true;
                send(&encode(v4::Packet::Publish(publish)))?;
            }
            while next < payloads.len() || !unacked.is_empty() {
                while next < payloads.len() && unacked.len() < window {
                    let mut publish = v4::Publish::new(
                        topic,
                        QoS::AtLeastOnce,
                        payloads[next].clone().into_bytes(),
                    );
                    publish.pkid = pkid(next);
                    unacked.insert(publish.pkid, next);
                    send(&encode(v4::Packet::Publish(publish)))?;
                    next += 1;
                }
                if let v4::Packet::PubAck(ack) = read_packet(&mut buffer)?
                    && let Some(index) = unacked.remove(&ack.pkid)
                {
                    acked.lock().unwrap().push(payloads[index].clone());
                }
            }
            Ok(())
        };
        if run().is_err() {
            *reconnects.lock().unwrap() += 1;
        }
    }
}

/// `topic` as one segment of an API path.
pub fn path(topic: &str) -> String {
    topic.replace('/', "%2F")
}

/// A `/metrics` counter of a node.
pub fn metric(http_addr: &str, name: &str) -> u64 {
    let answer = crate::cli_common::http(http_addr, "GET", "/metrics", &[], b"").expect("metrics");
    answer
        .body
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} missing from /metrics: {}", answer.body))
        .parse()
        .expect("a number")
}
