//! The embedded MQTT listener: sensors connect straight to the node.
//!
//! Each client gets one task. It reads packets, hands publishes to the
//! [`Ingest`] committer and writes PUBACKs in the order the publishes came, each
//! only once its message is appended. Everything a client controls is bounded:
//! packet size (refused from the header, before the bytes are read), QoS 1
//! publishes awaiting their ack (reading stops at the bound), time to CONNECT and
//! between packets (keep alive), and the number of clients. A client that breaks
//! a rule gets a typed [`ClientError`] and its connection ends; nobody else
//! notices, and the log hears of it at most once per interval and kind.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use bytes::BytesMut;
use futures::{StreamExt, future::BoxFuture, stream::FuturesOrdered};
use multifeed::topics::{MAX_PAYLOAD_LEN, Message};
use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpListener,
    sync::Semaphore,
    task::JoinSet,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use super::{
    MqttMetrics, Refusal, Rules,
    codec::{self, Incoming, Outgoing, Version},
    egress::{Subscribers, Subscription},
    filter::filter_problem,
    ingest::Ingest,
};

/// What one client may use.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest packet (its remaining length), in bytes.
    pub max_packet: usize,
    /// Most QoS 1 publishes of one client awaiting their PUBACK.
    pub max_inflight: u16,
    /// Most clients at once.
    pub max_clients: usize,
    /// Time a new connection has to send CONNECT.
    pub connect_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_packet: 256 * 1024,
            max_inflight: 256,
            max_clients: 1_024,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a client's connection was ended. Client faults, never the node's.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the packet is malformed ({0})")]
    Malformed(String),
    #[error("a packet of {size} bytes is larger than this listener accepts (--mqtt-max-packet)")]
    PacketTooLarge { size: usize },
    #[error("a topic name is not valid UTF-8")]
    TopicNotUtf8,
    #[error("topic {topic:?} cannot be mirrored: {reason}")]
    InvalidTopic { topic: String, reason: &'static str },
    #[error("a publish to {topic:?} is not mirrored: {refusal}")]
    NotMirrored { topic: String, refusal: Refusal },
    #[error(
        "no or a wrong password: off loopback the listener wants this gateway's token (the file <DIR>.token) as the CONNECT password"
    )]
    NotAuthorized,
    #[error("the first packet was not CONNECT")]
    NotConnect,
    #[error("a second CONNECT on one connection")]
    SecondConnect,
    #[error("protocol level {level} is not spoken here (MQTT 3.1.1 and 5 are)")]
    UnsupportedVersion { level: u8 },
    #[error("QoS 2 is not supported; publish with QoS 0 or 1")]
    QoS2,
    #[error("{0} is not expected from a client")]
    Unexpected(&'static str),
    #[error("no CONNECT within {0:?}")]
    ConnectTimeout(Duration),
    #[error("silent for longer than its keep alive allows")]
    KeepAliveExpired,
    #[error("the message was refused: {0}")]
    Refused(multifeed::Error),
    /// The node's own failure (storage, stopping), not the client's.
    #[error("the node could not take the message: {0}")]
    Node(multifeed::Error),
    #[error("the connection broke: {0}")]
    Io(#[from] std::io::Error),
}

impl ClientError {
    /// A short name for counting and logging.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::PacketTooLarge { .. } => "packet_too_large",
            Self::TopicNotUtf8 => "topic_not_utf8",
            Self::InvalidTopic { .. } => "invalid_topic",
            Self::NotMirrored {
                refusal: Refusal::Echo,
                ..
            } => "echo",
            Self::NotMirrored { .. } => "invalid_announcement",
            Self::NotAuthorized => "not_authorized",
            Self::NotConnect | Self::SecondConnect | Self::Unexpected(_) => "protocol",
            Self::UnsupportedVersion { .. } => "unsupported_version",
            Self::QoS2 => "qos2",
            Self::ConnectTimeout(_) | Self::KeepAliveExpired => "timeout",
            Self::Refused(_) => "refused",
            Self::Node(_) => "node",
            Self::Io(_) => "io",
        }
    }

    fn reason_code(&self) -> DisconnectReasonCode {
        match self {
            Self::Malformed(_) => DisconnectReasonCode::MalformedPacket,
            Self::PacketTooLarge { .. } => DisconnectReasonCode::PacketTooLarge,
            Self::TopicNotUtf8 | Self::InvalidTopic { .. } => {
                DisconnectReasonCode::TopicNameInvalid
            }
            Self::NotMirrored {
                refusal: Refusal::Echo,
                ..
            } => DisconnectReasonCode::TopicNameInvalid,
            Self::NotMirrored { .. } => DisconnectReasonCode::PayloadFormatInvalid,
            Self::QoS2 => DisconnectReasonCode::QoSNotSupported,
            Self::KeepAliveExpired | Self::ConnectTimeout(_) => {
                DisconnectReasonCode::KeepAliveTimeout
            }
            Self::Refused(_) => DisconnectReasonCode::ImplementationSpecificError,
            Self::Node(multifeed::Error::Closed) => DisconnectReasonCode::ServerShuttingDown,
            Self::Node(_) => DisconnectReasonCode::UnspecifiedError,
            _ => DisconnectReasonCode::ProtocolError,
        }
    }
}

/// Client errors, logged at most once per interval and kind with a count of the rest.
pub struct QuietLog {
    interval: Duration,
    last: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl QuietLog {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// Logs `error` of `client` unless one of its kind was logged lately.
    pub fn client_ended(&self, client: &str, error: &ClientError) {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let entry = last.entry(error.kind()).or_insert((now, 0));
        if entry.1 > 0 && now.duration_since(entry.0) < self.interval {
            entry.1 += 1;
            return;
        }
        let suppressed = entry.1.saturating_sub(1);
        *entry = (now, 1);
        drop(last);
        if suppressed > 0 {
            tracing::warn!(
                "MQTT client {client} disconnected: {error} ({suppressed} more of this kind in the last {:.0?})",
                self.interval
            );
        } else {
            tracing::warn!("MQTT client {client} disconnected: {error}");
        }
    }
}

/// What every client task shares.
pub struct Context {
    pub ingest: Ingest,
    pub metrics: Arc<MqttMetrics>,
    pub limits: Limits,
    pub log: QuietLog,
    pub rules: Arc<Rules>,
    /// The password every CONNECT must carry, if any (the gateway's token).
    pub password: Option<String>,
    /// The MQTT 5 user property holding a message's time, if configured.
    pub timestamp_property: Option<String>,
    /// Clients may subscribe (to egress's output) when this is set.
    pub subscribers: Option<Arc<Subscribers>>,
}

/// Accepts clients until `cancel`, then waits for their tasks.
pub async fn accept(context: Arc<Context>, listener: TcpListener, cancel: CancellationToken) {
    let slots = Arc::new(Semaphore::new(context.limits.max_clients.max(1)));
    let mut clients = JoinSet::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            Some(done) = clients.join_next(), if !clients.is_empty() => {
                if let Err(e) = done {
                    tracing::warn!("an MQTT client task failed: {e}");
                }
            }
            accepted = listener.accept() => {
                let (socket, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: pause instead of spinning.
                        tracing::warn!("accepting an MQTT client failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    context.metrics.clients_refused.fetch_add(1, Ordering::Relaxed);
                    drop(socket);
                    continue;
                };
                let _ = socket.set_nodelay(true);
                let (context, cancel) = (context.clone(), cancel.clone());
                clients.spawn(async move {
                    let _slot = slot;
                    context.metrics.clients.fetch_add(1, Ordering::Relaxed);
                    let result = serve_client(&context, socket, cancel).await;
                    context.metrics.clients.fetch_sub(1, Ordering::Relaxed);
                    if let Err(error) = result {
                        context.metrics.client_errors.fetch_add(1, Ordering::Relaxed);
                        context.log.client_ended(&peer.to_string(), &error);
                    }
                });
            }
        }
    }
    while let Some(done) = clients.join_next().await {
        if let Err(e) = done {
            tracing::warn!("an MQTT client task failed while stopping: {e}");
        }
    }
}

/// A message's own fault is the client's; anything else is the node's.
fn refused(error: multifeed::Error) -> ClientError {
    match error {
        multifeed::Error::InvalidTopic { .. } | multifeed::Error::InvalidMessage { .. } => {
            ClientError::Refused(error)
        }
        other => ClientError::Node(other),
    }
}

type Ack = BoxFuture<'static, (u16, Result<(), ClientError>)>;

/// One client, from CONNECT to its end. `Ok` when it disconnected or the node stops.
async fn serve_client<S>(
    context: &Context,
    socket: S,
    cancel: CancellationToken,
) -> Result<(), ClientError>
where
    S: AsyncRead + AsyncWrite + Send,
{
    let limits = context.limits;
    let metrics = &context.metrics;
    let (mut reader, mut writer) = tokio::io::split(socket);
    let mut buffer = BytesMut::with_capacity(4 * 1024);
    let mut out = BytesMut::new();
    let mut version: Option<Version> = None;
    // PUBACKs go out in the order the publishes came: MQTT asks for that order.
    let mut acks: FuturesOrdered<Ack> = FuturesOrdered::new();
    let mut waiting: HashSet<u16> = HashSet::new();
    let mut idle_limit = limits.connect_timeout;
    let mut deadline = Instant::now() + idle_limit;
    let max_inflight = usize::from(limits.max_inflight.max(1));
    let mut resend_window = 0usize;
    // Egress deliveries, once the client subscribes.
    let mut subscription: Option<Subscription> = None;
    // The client sent DISCONNECT: nothing more is read.
    let mut disconnecting = false;
    let result = loop {
        // Every whole packet already read, as long as the ack window has room.
        let step: Result<bool, ClientError> = async {
            while !disconnecting && acks.len() < max_inflight {
                let Some(packet) = codec::decode(&mut buffer, version, limits.max_packet)? else {
                    break;
                };
                match packet {
                    Incoming::Connect {
                        version: v,
                        client_id,
                        keep_alive,
                        keep_session,
                        password,
                    } => {
                        version = Some(v);
                        if let Some(expected) = &context.password
                            && !password.is_some_and(|given| {
                                crate::node::same_secret(given.as_bytes(), expected.as_bytes())
                            })
                        {
                            codec::encode(Outgoing::ConnAckNotAuthorized, v, &mut out);
                            return Err(ClientError::NotAuthorized);
                        }
                        tracing::debug!(client_id, ?v, keep_alive, "MQTT client connected");
                        // A client resuming its session resends first what it had no
                        // PUBACK for: at most its inflight window.
                        if keep_session {
                            resend_window = max_inflight;
                        }
                        // Keep alive 0 turns the check off; the client slot still bounds it.
                        idle_limit = if keep_alive == 0 {
                            Duration::from_secs(365 * 24 * 3600)
                        } else {
                            Duration::from_secs(u64::from(keep_alive)) * 3 / 2
                        };
                        // The read that brought the CONNECT set the deadline by the
                        // connect timeout: from now on the keep alive rules.
                        deadline = Instant::now() + idle_limit;
                        codec::encode(
                            Outgoing::ConnAck {
                                // What a session holds here is empty (no subscriptions,
                                // no QoS 1 to deliver, no QoS 2), so one asked for is
                                // always present; the client then resends every
                                // publish that has no PUBACK, as MQTT asks.
                                session_present: keep_session,
                                receive_max: limits.max_inflight.max(1),
                                max_packet: limits.max_packet as u32,
                            },
                            v,
                            &mut out,
                        );
                    }
                    Incoming::Publish(publish) => {
                        if publish.qos > 1 {
                            return Err(ClientError::QoS2);
                        }
                        match context.rules.check(&publish.topic, &publish.payload) {
                            Ok(()) => {}
                            Err(Refusal::Topic(reason)) => {
                                return Err(ClientError::InvalidTopic {
                                    topic: publish.topic.chars().take(64).collect(),
                                    reason,
                                });
                            }
                            Err(refusal) => {
                                return Err(ClientError::NotMirrored {
                                    topic: publish.topic.chars().take(64).collect(),
                                    refusal,
                                });
                            }
                        }
                        if publish.payload.len() > MAX_PAYLOAD_LEN {
                            return Err(ClientError::PacketTooLarge {
                                size: publish.payload.len(),
                            });
                        }
                        metrics.received_messages.fetch_add(1, Ordering::Relaxed);
                        metrics
                            .received_bytes
                            .fetch_add(publish.payload.len() as u64, Ordering::Relaxed);
                        // A resend after a lost PUBACK (the node died between append
                        // and ack) may already be held: counted, not told apart.
                        if publish.qos == 1 {
                            if publish.dup || resend_window > 0 {
                                metrics.possible_duplicates.fetch_add(1, Ordering::Relaxed);
                            }
                            resend_window = resend_window.saturating_sub(1);
                        }
                        let mut message = Message::new(publish.topic, publish.payload.to_vec());
                        if let Some(content_type) = publish.content_type {
                            message = message.with_content_type(content_type);
                        }
                        if let Some(name) = &context.timestamp_property
                            && let Some((_, value)) =
                                publish.user_properties.iter().find(|(k, _)| k == name)
                        {
                            let ms = crate::parse_timestamp(value).map_err(|reason| {
                                ClientError::Refused(multifeed::Error::InvalidMessage {
                                    reason: format!(
                                        "its user property {name:?} is no time ({reason})"
                                    ),
                                })
                            })?;
                            message = message.with_timestamp_ms(ms);
                        }
                        // Refused here, so a batch never fails for one message.
                        message.validate().map_err(ClientError::Refused)?;
                        if publish.qos == 0 {
                            context
                                .ingest
                                .publish(message)
                                .await
                                .map_err(ClientError::Node)?;
                            continue;
                        }
                        // A resend of a publish still awaiting its ack: that ack covers both.
                        if !waiting.insert(publish.pkid) {
                            metrics.duplicates.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let reply = context
                            .ingest
                            .publish_acked(message)
                            .await
                            .map_err(ClientError::Node)?;
                        let pkid = publish.pkid;
                        acks.push_back(Box::pin(async move {
                            let result = match reply.await {
                                Ok(Ok(())) => Ok(()),
                                Ok(Err(e)) => Err(refused(e)),
                                Err(_) => Err(ClientError::Node(multifeed::Error::Closed)),
                            };
                            (pkid, result)
                        }));
                    }
                    Incoming::Subscribe { pkid, filters } => {
                        // Only egress's output is served, and only when it runs.
                        let granted = match &context.subscribers {
                            Some(subscribers) => {
                                let me = subscription.get_or_insert_with(|| subscribers.register());
                                filters
                                    .iter()
                                    .map(|f| filter_problem(f).is_none() && me.add(f))
                                    .collect()
                            }
                            None => vec![false; filters.len()],
                        };
                        codec::encode(
                            Outgoing::SubAck { pkid, granted },
                            version.unwrap_or(Version::V4),
                            &mut out,
                        );
                    }
                    Incoming::Unsubscribe { pkid, filters } => {
                        if let Some(me) = &subscription {
                            for filter in &filters {
                                me.remove(filter);
                            }
                        }
                        codec::encode(
                            Outgoing::UnsubAck {
                                pkid,
                                filters: filters.len(),
                            },
                            version.unwrap_or(Version::V4),
                            &mut out,
                        );
                    }
                    Incoming::PingReq => {
                        codec::encode(Outgoing::PingResp, version.unwrap_or(Version::V4), &mut out);
                    }
                    Incoming::Disconnect => return Ok(true),
                    Incoming::Ignored(what) => {
                        tracing::debug!("ignored {what} from an MQTT client")
                    }
                }
            }
            Ok(false)
        }
        .await;
        match step {
            Ok(true) => disconnecting = true,
            Ok(false) => {}
            Err(e) => break Err(e),
        }
        if !out.is_empty() {
            if let Err(e) = writer.write_all(&out).await {
                break Err(e.into());
            }
            out.clear();
        }
        // A DISCONNECT after publishes: their acks still go out, then the end.
        if disconnecting && acks.is_empty() {
            break Ok(());
        }
        // Room for one more packet (and its header) at most: the bound on memory.
        let may_read =
            !disconnecting && acks.len() < max_inflight && buffer.len() <= limits.max_packet + 5;
        tokio::select! {
            biased;
            () = cancel.cancelled() => {
                if let Some(v) = version {
                    codec::encode(Outgoing::Disconnect(DisconnectReasonCode::ServerShuttingDown), v, &mut out);
                    let _ = writer.write_all(&out).await;
                }
                break Ok(());
            }
            Some((pkid, result)) = acks.next(), if !acks.is_empty() => {
                waiting.remove(&pkid);
                if let Err(e) = result {
                    break Err(e);
                }
                metrics.acked.fetch_add(1, Ordering::Relaxed);
                codec::encode(Outgoing::PubAck(pkid), version.unwrap_or(Version::V4), &mut out);
            }
            Some(delivery) = next_delivery(&mut subscription), if subscription.is_some() => {
                codec::encode(Outgoing::Publish(delivery), version.unwrap_or(Version::V4), &mut out);
            }
            read = reader.read_buf(&mut buffer), if may_read => match read {
                Ok(0) => break Ok(()),
                Ok(_) => deadline = Instant::now() + idle_limit,
                Err(e) => break Err(e.into()),
            },
            () = tokio::time::sleep_until(deadline) => {
                break Err(if version.is_none() {
                    ClientError::ConnectTimeout(limits.connect_timeout)
                } else {
                    ClientError::KeepAliveExpired
                });
            }
        }
    };
    // What was answered before the fault still goes out (a CONNACK, acks), then why.
    if let (Err(e), Some(v)) = (&result, version)
        && !matches!(e, ClientError::Io(_))
    {
        // A refused CONNECT's CONNACK says it all: no DISCONNECT after it.
        if !matches!(e, ClientError::NotAuthorized) {
            codec::encode(Outgoing::Disconnect(e.reason_code()), v, &mut out);
        }
        let _ = writer.write_all(&out).await;
    }
    let _ = writer.shutdown().await;
    result
}

/// The next egress delivery for a subscribed client.
async fn next_delivery(
    subscription: &mut Option<Subscription>,
) -> Option<Arc<super::egress::Delivery>> {
    match subscription {
        Some(me) => me.deliveries.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use multifeed::{Multifeed, Options, SharedKey, StorageConfig, Topics};
    use tokio::io::DuplexStream;

    /// A client task on an in-memory connection, over an in-memory store.
    async fn client() -> (
        DuplexStream,
        tokio::task::JoinHandle<Result<(), ClientError>>,
        CancellationToken,
    ) {
        let (peer, task, cancel, _) = client_of_topics().await;
        (peer, task, cancel)
    }

    async fn client_of_topics() -> (
        DuplexStream,
        tokio::task::JoinHandle<Result<(), ClientError>>,
        CancellationToken,
        Topics,
    ) {
        let group = Multifeed::open(
            StorageConfig::Memory,
            SharedKey::from_bytes([5; 32]),
            Options::default(),
        )
        .await
        .unwrap();
        let metrics = Arc::new(MqttMetrics::default());
        let topics = Topics::new(group);
        let (ingest, _committer) =
            Ingest::start(topics.clone(), Default::default(), metrics.clone());
        let context = Context {
            ingest,
            metrics,
            limits: Limits::default(),
            log: QuietLog::new(Duration::from_secs(10)),
            rules: Arc::new(super::super::MqttConfig::default().rules()),
            password: None,
            timestamp_property: Some("ts".into()),
            subscribers: None,
        };
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let cancel = CancellationToken::new();
        let task = {
            let cancel = cancel.clone();
            tokio::spawn(async move { serve_client(&context, ours, cancel).await })
        };
        (theirs, task, cancel, topics)
    }

    fn connect(keep_alive: u16) -> Vec<u8> {
        use rumqttc::mqttbytes::v4;
        let mut connect = v4::Connect::new("quiet");
        connect.keep_alive = keep_alive;
        let mut out = BytesMut::new();
        v4::Packet::Connect(connect).write(&mut out, 1024).unwrap();
        out.to_vec()
    }

    /// Paused clock: the deadlines are virtual time, exact, and cost no wall time.
    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_ended_after_one_and_a_half_keep_alives_and_not_before() {
        let (mut peer, task, _cancel) = client().await;
        let started = Instant::now();
        peer.write_all(&connect(10)).await.unwrap();
        let mut connack = [0u8; 4];
        peer.read_exact(&mut connack).await.unwrap();
        assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
        // A PINGREQ at 14 s keeps it alive for another 15 s.
        tokio::time::sleep(Duration::from_secs(14)).await;
        assert!(!task.is_finished());
        peer.write_all(&[0xC0, 0x00]).await.unwrap();
        let mut pong = [0u8; 2];
        peer.read_exact(&mut pong).await.unwrap();
        assert_eq!(pong, [0xD0, 0x00]);
        let result = task.await.unwrap();
        assert!(
            matches!(result, Err(ClientError::KeepAliveExpired)),
            "{result:?}"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(29));
    }

    /// An MQTT 5 CONNECT.
    fn v5_connect() -> BytesMut {
        use rumqttc::v5::mqttbytes::v5;
        let mut out = BytesMut::new();
        let connect = v5::Connect {
            keep_alive: 30,
            client_id: "v5-client".into(),
            clean_start: true,
            properties: None,
        };
        v5::Packet::Connect(connect, None, None)
            .write(&mut out, None)
            .unwrap();
        out
    }

    #[tokio::test]
    async fn a_content_type_over_the_bound_is_refused_before_it_is_queued() {
        use rumqttc::v5::mqttbytes::{QoS, v5};
        let (mut peer, task, _cancel) = client().await;
        let mut out = v5_connect();
        let properties = v5::PublishProperties {
            content_type: Some("x".repeat(multifeed::topics::MAX_CONTENT_TYPE_LEN + 1)),
            ..Default::default()
        };
        let mut publish = v5::Publish::new("sensors/t", QoS::AtLeastOnce, "1", Some(properties));
        publish.pkid = 1;
        v5::Packet::Publish(publish).write(&mut out, None).unwrap();
        peer.write_all(&out).await.unwrap();
        let result = task.await.unwrap();
        assert!(
            matches!(
                &result,
                Err(ClientError::Refused(
                    multifeed::Error::InvalidMessage { .. }
                ))
            ),
            "{result:?}"
        );
    }

    /// MQTT 5 CONNECT, then a QoS 1 PUBLISH with the user property `ts`.
    fn v5_publish_with_time(ts: &str) -> Vec<u8> {
        use rumqttc::v5::mqttbytes::{QoS, v5};
        let mut out = v5_connect();
        let properties = v5::PublishProperties {
            user_properties: vec![("site".into(), "a".into()), ("ts".into(), ts.into())],
            ..Default::default()
        };
        let mut publish = v5::Publish::new("sensors/t", QoS::AtLeastOnce, "7", Some(properties));
        publish.pkid = 1;
        v5::Packet::Publish(publish).write(&mut out, None).unwrap();
        out.to_vec()
    }

    #[tokio::test]
    async fn a_configured_user_property_gives_the_time_and_a_bad_one_is_refused() {
        let (mut peer, task, cancel, topics) = client_of_topics().await;
        peer.write_all(&v5_publish_with_time("2026-01-02T03:04:05Z"))
            .await
            .unwrap();
        // CONNACK (with properties), then PUBACK 1: wait for the PUBACK's bytes.
        let mut seen = Vec::new();
        while !seen.ends_with(&[0x40, 0x02, 0x00, 0x01])
            && !seen.ends_with(&[0x40, 0x03, 0x00, 0x01, 0x00])
        {
            let mut byte = [0u8; 1];
            peer.read_exact(&mut byte).await.unwrap();
            seen.push(byte[0]);
        }
        let (read, _) = topics
            .read("sensors/t", &multifeed::topics::Cursor::new(), 10)
            .await
            .unwrap();
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].message.timestamp_ms, 1_767_323_045_000);
        cancel.cancel();
        task.await.unwrap().unwrap();

        let (mut peer, task, _cancel, _) = client_of_topics().await;
        peer.write_all(&v5_publish_with_time("yesterday"))
            .await
            .unwrap();
        let result = task.await.unwrap();
        assert!(
            matches!(&result, Err(ClientError::Refused(multifeed::Error::InvalidMessage { reason })) if reason.contains("\"ts\"")),
            "{result:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_connect_is_ended_at_the_connect_timeout() {
        let (_peer, task, _cancel) = client().await;
        let started = Instant::now();
        let result = task.await.unwrap();
        assert!(
            matches!(result, Err(ClientError::ConnectTimeout(t)) if t == Limits::default().connect_timeout),
            "{result:?}"
        );
        assert_eq!(started.elapsed(), Limits::default().connect_timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_zero_means_no_deadline_and_stopping_ends_the_client() {
        let (mut peer, task, cancel) = client().await;
        peer.write_all(&connect(0)).await.unwrap();
        let mut connack = [0u8; 4];
        peer.read_exact(&mut connack).await.unwrap();
        tokio::time::sleep(Duration::from_secs(7 * 24 * 3600)).await;
        assert!(!task.is_finished());
        cancel.cancel();
        assert!(task.await.unwrap().is_ok());
    }
}
