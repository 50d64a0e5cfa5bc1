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

pub mod broker;
pub mod codec;
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
use tokio::net::TcpListener;
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

/// Runs the listener (if any) and the broker client (if any) until `cancel`;
/// then every client ends and what was queued is appended before this returns
/// (the store closes after).
pub async fn serve(
    topics: Topics,
    metrics: Arc<MqttMetrics>,
    config: MqttConfig,
    listener: Option<TcpListener>,
    cancel: CancellationToken,
) {
    let (ingest, committer) = ingest::Ingest::start(topics, config.batching, metrics.clone());
    let bridge = config.broker.clone().map(|broker| {
        tokio::spawn(broker::run(
            ingest.clone(),
            metrics.clone(),
            broker,
            cancel.clone(),
        ))
    });
    if let Some(listener) = listener {
        let context = Arc::new(listener::Context {
            ingest,
            metrics,
            limits: config.limits,
            log: listener::QuietLog::new(Duration::from_secs(10)),
        });
        listener::accept(context, listener, cancel).await;
    } else {
        drop(ingest);
    }
    if let Some(bridge) = bridge
        && let Err(e) = bridge.await
    {
        tracing::error!("the MQTT broker client failed: {e}");
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
