//! MQTT ingest: sensors publish over MQTT and their messages land in the
//! group's topic of the same name.
//!
//! The node runs its own small listener (`serve --mqtt-listen`, see
//! [`listener`]) on rumqttc's packet codec rather than an embedded broker:
//! rumqttd acknowledges a QoS 1 publish in its router as soon as it is received,
//! before anyone could append it, so it cannot keep our promise that
//! **a PUBACK means the message is appended** (durable under the store's
//! durability mode, as an HTTP publish's answer is). QoS 0 is best effort: it
//! is appended like the rest, but a crash may lose what was not yet appended.
//!
//! Every message goes through [`ingest`], which packs messages that arrive
//! close together into shared blocks (one signed append per topic and batch).
//!
//! Duplicates: a QoS 1 publisher resends what it has no PUBACK for. A resend on
//! the same connection while the first is still being appended is dropped (its
//! ack covers both) and counted as a duplicate. A resend after a reconnect (the
//! node was killed between the append and the PUBACK) cannot be told apart from
//! a new message with the same bytes, so it is appended again and counted as a
//! possible duplicate: every publish flagged DUP, and the first publishes of a
//! resumed session up to the inflight window (a client resends its unacked
//! messages first, and rumqttc, for one, does not set DUP when it does). The
//! extra copies a log holds are bounded by that count.

pub mod announce;
pub mod broker;
pub mod codec;
pub mod egress;
pub mod filter;
pub mod ingest;
pub mod listener;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use multifeed::Topics;
use tokio::{net::TcpListener, sync::mpsc, task::JoinSet};
use tokio_util::sync::CancellationToken;

pub use self::{ingest::Batching, listener::Limits};

/// What `serve`'s MQTT flags ask for.
#[derive(Debug, Clone, Default)]
pub struct MqttConfig {
    /// Accept MQTT clients here.
    pub listen: Option<String>,
    /// Accept clients off loopback although the listener has no authentication.
    pub allow_anonymous: bool,
    /// Mirror from this external broker.
    pub broker: Option<broker::BrokerConfig>,
    pub batching: Batching,
    pub limits: Limits,
    /// Where filters are announced to the group; [`announce::DEFAULT_TOPIC`] when empty.
    pub announce_topic: String,
    /// Publish other gateways' messages under this prefix ([`egress`]).
    pub publish_remote: Option<String>,
    /// Take a message's time from this MQTT 5 user property when present.
    pub timestamp_property: Option<String>,
    /// The password every listener client must send (the gateway's token, off
    /// loopback); `None`: no authentication.
    pub password: Option<String>,
}

impl MqttConfig {
    /// The rules both ways in (listener and broker) apply.
    pub fn rules(&self) -> Rules {
        Rules {
            announce_topic: if self.announce_topic.is_empty() {
                announce::DEFAULT_TOPIC.to_owned()
            } else {
                self.announce_topic.clone()
            },
            egress_prefix: self.publish_remote.clone(),
        }
    }
}

/// What is mirrored into the group and what never is.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Messages here must be topic filters ([`announce`]).
    pub announce_topic: String,
    /// Messages under this prefix are egress's own output: never mirrored back.
    pub egress_prefix: Option<String>,
}

/// Why a message is not mirrored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the topic {0}")]
    Topic(&'static str),
    #[error(
        "the topic is under the egress prefix (--mqtt-publish-remote), where this node publishes other gateways' messages: mirroring it would loop them back into the group"
    )]
    Echo,
    #[error("an announcement must be a topic filter such as sensors/#, and this one is not: {0}")]
    Announcement(&'static str),
}

impl Rules {
    /// Whether a publish of `payload` to `topic` may be mirrored.
    pub fn check(&self, topic: &str, payload: &[u8]) -> Result<(), Refusal> {
        if let Some(reason) = filter::topic_problem(topic) {
            return Err(Refusal::Topic(reason));
        }
        if let Some(prefix) = &self.egress_prefix
            && filter::is_under(topic, prefix)
        {
            return Err(Refusal::Echo);
        }
        if topic == self.announce_topic {
            announce::announcement(payload).map_err(Refusal::Announcement)?;
        }
        Ok(())
    }
}

/// Ingest counters `/metrics` shows.
#[derive(Default)]
pub struct MqttMetrics {
    /// PUBLISH packets received (QoS 0 and 1).
    pub received_messages: AtomicU64,
    pub received_bytes: AtomicU64,
    /// Messages appended to their topic.
    pub appended_messages: AtomicU64,
    pub appended_bytes: AtomicU64,
    /// PUBACKs sent (each after its message was appended).
    pub acked: AtomicU64,
    /// Resends dropped because their first copy was still being appended.
    pub duplicates: AtomicU64,
    /// QoS 1 publishes that may be resends of messages already appended: flagged
    /// DUP, or among the first (inflight window) of a resumed session.
    pub possible_duplicates: AtomicU64,
    /// Messages the store refused.
    pub refused_messages: AtomicU64,
    /// From arrival to durable append, for the oldest message of the last batch.
    pub append_lag_ms: AtomicU64,
    /// Publishes under the egress prefix that came back: skipped, never mirrored.
    pub echoes_skipped: AtomicU64,
    /// Filters announced to the group that this node mirrors.
    pub announced_filters: AtomicU64,
    /// Other gateways' messages published by egress.
    pub egress_published: AtomicU64,
    /// Egress deliveries dropped because a listener subscriber fell behind.
    pub egress_dropped: AtomicU64,
    /// Clients connected now.
    pub clients: AtomicU64,
    /// Clients turned away because every slot was taken.
    pub clients_refused: AtomicU64,
    /// Connections ended for a client's fault or a broken connection.
    pub client_errors: AtomicU64,
}

impl MqttMetrics {
    /// The Prometheus lines: `(name, kind, help, value)`.
    pub fn lines(&self) -> Vec<(&'static str, &'static str, &'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            (
                "multifeed_mqtt_received_messages_total",
                "counter",
                "MQTT PUBLISH packets received.",
                get(&self.received_messages),
            ),
            (
                "multifeed_mqtt_received_bytes_total",
                "counter",
                "Payload bytes of MQTT publishes received.",
                get(&self.received_bytes),
            ),
            (
                "multifeed_mqtt_appended_messages_total",
                "counter",
                "MQTT messages appended to their topic.",
                get(&self.appended_messages),
            ),
            (
                "multifeed_mqtt_appended_bytes_total",
                "counter",
                "Payload bytes of MQTT messages appended.",
                get(&self.appended_bytes),
            ),
            (
                "multifeed_mqtt_acked_total",
                "counter",
                "PUBACKs sent, each after its message was appended.",
                get(&self.acked),
            ),
            (
                "multifeed_mqtt_duplicates_total",
                "counter",
                "QoS 1 resends dropped because their first copy was still being appended.",
                get(&self.duplicates),
            ),
            (
                "multifeed_mqtt_possible_duplicates_total",
                "counter",
                "QoS 1 publishes appended that may be resends of a message already held (flagged DUP, or first of a resumed session).",
                get(&self.possible_duplicates),
            ),
            (
                "multifeed_mqtt_refused_messages_total",
                "counter",
                "MQTT messages the store refused.",
                get(&self.refused_messages),
            ),
            (
                "multifeed_mqtt_append_lag_ms",
                "gauge",
                "Milliseconds from arrival to durable append of the oldest message of the last batch.",
                get(&self.append_lag_ms),
            ),
            (
                "multifeed_mqtt_echoes_skipped_total",
                "counter",
                "Publishes under the egress prefix that were not mirrored back into the group.",
                get(&self.echoes_skipped),
            ),
            (
                "multifeed_mqtt_announced_filters",
                "gauge",
                "Topic filters announced to the group and mirrored from the broker.",
                get(&self.announced_filters),
            ),
            (
                "multifeed_mqtt_egress_published_total",
                "counter",
                "Messages of other gateways published to MQTT under the egress prefix.",
                get(&self.egress_published),
            ),
            (
                "multifeed_mqtt_egress_dropped_total",
                "counter",
                "Egress deliveries dropped because a listener subscriber fell behind (QoS 0).",
                get(&self.egress_dropped),
            ),
            (
                "multifeed_mqtt_clients",
                "gauge",
                "MQTT clients connected.",
                get(&self.clients),
            ),
            (
                "multifeed_mqtt_clients_refused_total",
                "counter",
                "MQTT clients turned away because every slot was taken.",
                get(&self.clients_refused),
            ),
            (
                "multifeed_mqtt_client_errors_total",
                "counter",
                "MQTT connections ended by a client's fault or a broken connection.",
                get(&self.client_errors),
            ),
        ]
    }
}

/// Runs the listener (if any), the broker client (if any), the announce
/// follower and egress (if asked for) until `cancel`; then every client ends
/// and what was queued is appended before this returns (the store closes
/// after). `dir` is the store's folder, where egress keeps its place.
pub async fn serve(
    topics: Topics,
    metrics: Arc<MqttMetrics>,
    config: MqttConfig,
    listener: Option<TcpListener>,
    dir: std::path::PathBuf,
    cancel: CancellationToken,
) {
    let rules = Arc::new(config.rules());
    let (ingest, committer) =
        ingest::Ingest::start(topics.clone(), config.batching, metrics.clone());
    let mut helpers = JoinSet::new();
    let broker = match config
        .broker
        .clone()
        .map(|b| broker::connect(&b).map(|c| (b, c)))
    {
        Some(Err(e)) => {
            tracing::error!("{e}");
            None
        }
        Some(Ok(broker)) => Some(broker),
        None => None,
    };
    // Announced filters go to the broker client, which subscribes to them.
    let (announced, to_subscribe) = match &broker {
        Some(_) => {
            let (tx, rx) = mpsc::channel(announce::MAX_FILTERS);
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    helpers.spawn(announce::follow(
        topics.clone(),
        rules.announce_topic.clone(),
        announced,
        metrics.clone(),
        cancel.clone(),
    ));
    let subscribers = (listener.is_some() && config.publish_remote.is_some())
        .then(|| Arc::new(egress::Subscribers::default()));
    if let Some(prefix) = config.publish_remote.clone() {
        let sinks = egress::Sinks {
            listener: subscribers.clone(),
            broker: broker.as_ref().map(|(_, (client, _))| client.clone()),
        };
        helpers.spawn(egress::run(
            topics,
            prefix,
            dir,
            sinks,
            metrics.clone(),
            cancel.clone(),
        ));
    }
    if let Some((broker, (client, events))) = broker {
        helpers.spawn(broker::run(
            broker::Bridge {
                ingest: ingest.clone(),
                metrics: metrics.clone(),
                rules: rules.clone(),
                client,
                to_subscribe: to_subscribe.unwrap_or_else(|| mpsc::channel(1).1),
            },
            broker,
            events,
            cancel.clone(),
        ));
    }
    if let Some(listener) = listener {
        let context = Arc::new(listener::Context {
            ingest,
            metrics,
            limits: config.limits,
            log: listener::QuietLog::new(Duration::from_secs(10)),
            rules,
            password: config.password.clone(),
            timestamp_property: config.timestamp_property.clone(),
            subscribers,
        });
        listener::accept(context, listener, cancel).await;
    } else {
        drop(ingest);
        cancel.cancelled().await;
    }
    while let Some(done) = helpers.join_next().await {
        if let Err(e) = done {
            tracing::error!("an MQTT task failed: {e}");
        }
    }
    // The last handle is gone: the committer drains and ends.
    if let Err(e) = committer.await {
        tracing::error!("the MQTT committer failed: {e}");
    }
}

/// The broker session's client id for the store in `dir`: the same on every run
/// (so the broker keeps the session across restarts), different per store.
pub fn broker_client_id(dir: &std::path::Path) -> String {
    use blake2::Digest as _;
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    let digest = blake2::Blake2b512::digest(dir.to_string_lossy().as_bytes());
    format!("multifeed-{}", hex::encode(&digest[..8]))
}
