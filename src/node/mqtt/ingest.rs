//! The ingest committer: every message MQTT brings in goes through here, into
//! [`Topics::publish_batch_with`], the node's publish path.
//!
//! Messages that arrive within the linger window (or while an append runs) are
//! committed together: one signed append per topic, several messages packed per
//! block, so a stream of small readings costs a handful of signatures. A
//! QoS 1 message's reply is sent only once its append has returned, i.e. once it
//! is durable under the store's [`multifeed::Durability`]; the listener sends the
//! PUBACK then and not before.

use std::{collections::HashMap, sync::Arc, sync::atomic::Ordering, time::Duration};

use multifeed::{
    Error, Topics,
    topics::{Message, Packing},
};
use tokio::sync::{mpsc, oneshot};

use super::MqttMetrics;

/// Messages waiting for the committer; a full queue holds the publishers back.
const QUEUE: usize = 8_192;

/// How the committer groups messages.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// How long the first message of a batch waits for more.
    pub linger: Duration,
    /// Most messages committed at once.
    pub max_messages: usize,
    /// Most payload bytes committed at once (a larger single message still goes).
    pub max_bytes: usize,
}

impl Default for Batching {
    fn default() -> Self {
        Self {
            linger: Duration::ZERO,
            max_messages: 4_096,
            max_bytes: 4 * 1024 * 1024,
        }
    }
}

/// What the sender of a message hears back: appended (durable), or why not.
pub type Reply = oneshot::Receiver<Result<(), Error>>;

struct Pending {
    message: Message,
    /// When it reached the queue, for the lag metric.
    queued_at: tokio::time::Instant,
    /// `None` for QoS 0: nobody waits.
    reply: Option<oneshot::Sender<Result<(), Error>>>,
}

/// The handle connections publish through. Cheap to clone.
#[derive(Clone)]
pub struct Ingest {
    queue: mpsc::Sender<Pending>,
}

impl Ingest {
    /// Starts the committer over `topics`; it ends once every handle is dropped
    /// and what was queued is committed.
    pub fn start(
        topics: Topics,
        batching: Batching,
        metrics: Arc<MqttMetrics>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (queue, receiver) = mpsc::channel(QUEUE);
        let task = tokio::spawn(commit(topics, batching, metrics, receiver));
        (Self { queue }, task)
    }

    /// Queues a message whose sender waits for it to be durable.
    pub async fn publish_acked(&self, message: Message) -> Result<Reply, Error> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending {
                message,
                queued_at: tokio::time::Instant::now(),
                reply: Some(reply),
            })
            .await
            .map_err(|_| Error::Closed)?;
        Ok(answer)
    }

    /// Queues a best-effort (QoS 0) message.
    pub async fn publish(&self, message: Message) -> Result<(), Error> {
        self.queue
            .send(Pending {
                message,
                queued_at: tokio::time::Instant::now(),
                reply: None,
            })
            .await
            .map_err(|_| Error::Closed)
    }
}

async fn commit(
    topics: Topics,
    batching: Batching,
    metrics: Arc<MqttMetrics>,
    mut queue: mpsc::Receiver<Pending>,
) {
    let max_messages = batching.max_messages.max(1);
    let mut batch = Vec::new();
    while queue.recv_many(&mut batch, max_messages).await > 0 {
        if !batching.linger.is_zero() {
            let deadline = tokio::time::Instant::now() + batching.linger;
            // A running total: summing the batch again each round was quadratic.
            let mut bytes = payload_bytes(&batch);
            while batch.len() < max_messages && bytes < batching.max_bytes {
                let room = max_messages - batch.len();
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => break,
                    added = queue.recv_many(&mut batch, room) => {
                        if added == 0 {
                            break;
                        }
                        bytes += payload_bytes(&batch[batch.len() - added..]);
                    }
                }
            }
        }
        commit_batch(&topics, &metrics, std::mem::take(&mut batch)).await;
    }
}

fn payload_bytes(batch: &[Pending]) -> usize {
    batch.iter().map(|p| p.message.payload.len()).sum()
}

/// Appends a batch, one signed append per topic, and answers every message.
/// Messages were validated before they were queued ([`Message::validate`]), so
/// a topic's append fails only as a whole (storage), never for one message.
async fn commit_batch(topics: &Topics, metrics: &MqttMetrics, batch: Vec<Pending>) {
    let mut by_topic: HashMap<String, Vec<Pending>> = HashMap::new();
    for pending in batch {
        by_topic
            .entry(pending.message.topic.clone())
            .or_default()
            .push(pending);
    }
    for (topic, group) in by_topic {
        let count = group.len() as u64;
        let bytes: usize = group.iter().map(|p| p.message.payload.len()).sum();
        let oldest = group.iter().map(|p| p.queued_at).min();
        let (messages, replies): (Vec<Message>, Vec<_>) =
            group.into_iter().map(|p| (p.message, p.reply)).unzip();
        let result = topics
            .publish_batch_with(messages, Packing::default())
            .await
            .map(|_| ());
        match &result {
            Ok(()) => {
                metrics.append_lag_ms.store(
                    oldest.map_or(0, |t| t.elapsed().as_millis() as u64),
                    Ordering::Relaxed,
                );
                metrics
                    .appended_messages
                    .fetch_add(count, Ordering::Relaxed);
                metrics
                    .appended_bytes
                    .fetch_add(bytes as u64, Ordering::Relaxed);
            }
            Err(e) => {
                // Nothing is acknowledged: each sender hears why and retries.
                tracing::error!("appending MQTT messages to topic {topic:?} failed: {e}");
                metrics.refused_messages.fetch_add(count, Ordering::Relaxed);
            }
        }
        for reply in replies.into_iter().flatten() {
            let _ = reply.send(match &result {
                Ok(()) => Ok(()),
                Err(Error::InvalidTopic { topic, reason }) => Err(Error::InvalidTopic {
                    topic: topic.clone(),
                    reason,
                }),
                Err(Error::InvalidMessage { reason }) => Err(Error::InvalidMessage {
                    reason: reason.clone(),
                }),
                Err(e) => Err(Error::Io {
                    context: format!("publishing to {topic:?}"),
                    source: std::io::Error::other(e.to_string()),
                }),
            });
        }
    }
}
