//! An external broker (`serve --mqtt-broker mqtt://host:port`): the node is a
//! client (rumqttc) with a persistent session (clean session off, a client id
//! stable for the store) and QoS 1 subscriptions (`--mqtt-subscribe`). Acks are
//! manual: a message is acknowledged to the broker only once it is appended, so
//! the broker redelivers whatever the node did not get to keep (a kill, a lost
//! connection). Acks go out in the order the messages came, as MQTT asks.

use std::{sync::Arc, sync::atomic::Ordering, time::Duration};

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    MqttMetrics, Refusal, Rules,
    filter::matches,
    ingest::{Ingest, Reply},
};
use multifeed::topics::Message;

/// The broker to mirror from.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// `mqtt://host:port` (port 1883 when left out).
    pub url: String,
    /// Topic filters, wildcards allowed.
    pub filters: Vec<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// The session's client id: the same for every run on this store.
    pub client_id: String,
    /// Largest packet accepted from the broker.
    pub max_packet: usize,
}

/// `mqtt://host:port` into host and port; an error in words otherwise.
pub fn parse_url(url: &str) -> Result<(String, u16), String> {
    let rest = url.strip_prefix("mqtt://").ok_or_else(|| {
        format!("the broker address {url:?} must start with mqtt:// (e.g. mqtt://127.0.0.1:1883)")
    })?;
    let rest = rest.trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((host, port)) => port
            .parse()
            .map(|port| (host.trim_matches(['[', ']']).to_owned(), port))
            .map_err(|_| format!("the broker address {url:?} has no valid port")),
        None if !rest.is_empty() => Ok((rest.to_owned(), 1883)),
        None => Err(format!("the broker address {url:?} names no host")),
    }
}

/// The client for `config` and its event loop (not connected yet).
pub fn connect(config: &BrokerConfig) -> Result<(AsyncClient, EventLoop), String> {
    let (host, port) = parse_url(&config.url)?;
    let mut options = MqttOptions::new(config.client_id.clone(), host, port);
    options.set_clean_session(false);
    options.set_manual_acks(true);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(config.max_packet, config.max_packet);
    if let Some(user) = &config.username {
        options.set_credentials(user.clone(), config.password.clone().unwrap_or_default());
    }
    Ok(AsyncClient::new(options, 1_024))
}

/// What the broker client works with.
pub struct Bridge {
    pub ingest: Ingest,
    pub metrics: Arc<MqttMetrics>,
    pub rules: Arc<Rules>,
    pub client: AsyncClient,
    /// Filters announced to the group, to subscribe to as they come.
    pub to_subscribe: mpsc::Receiver<String>,
}

/// Mirrors the broker's messages until `cancel`; reconnects after every loss.
/// Subscribes to the configured filters, the announce topic and every filter
/// announced to the group.
pub async fn run(
    bridge: Bridge,
    config: BrokerConfig,
    mut events: EventLoop,
    cancel: CancellationToken,
) {
    let Bridge {
        ingest,
        metrics,
        rules,
        client,
        mut to_subscribe,
    } = bridge;
    let mut filters = config.filters.clone();
    // Unless a configured filter covers it already (some brokers deliver a
    // message once per matching subscription).
    if !filters.iter().any(|f| matches(&rules.announce_topic, f)) {
        filters.push(rules.announce_topic.clone());
    }
    // Acks in arrival order, each once its message is appended.
    let (pending, mut to_ack) = mpsc::channel::<(rumqttc::Publish, Reply)>(4_096);
    let acker = {
        let (client, metrics) = (client.clone(), metrics.clone());
        tokio::spawn(async move {
            while let Some((publish, reply)) = to_ack.recv().await {
                match reply.await {
                    Ok(Ok(())) => {
                        if client.ack(&publish).await.is_err() {
                            break;
                        }
                        metrics.acked.fetch_add(1, Ordering::Relaxed);
                    }
                    // A message that can never be appended (too large, a bad content
                    // type): acked, or the broker would redeliver it forever.
                    Ok(Err(
                        e @ (multifeed::Error::InvalidTopic { .. }
                        | multifeed::Error::InvalidMessage { .. }),
                    )) => {
                        // (The committer counted it as refused.)
                        tracing::warn!(
                            "a message of {:?} from the broker is dropped: {e}",
                            publish.topic
                        );
                        if client.ack(&publish).await.is_err() {
                            break;
                        }
                    }
                    // Not appended for a reason of ours: no ack, the broker
                    // redelivers it to the next session.
                    Ok(Err(e)) => tracing::warn!(
                        "a message of {:?} from the broker was not appended: {e}",
                        publish.topic
                    ),
                    Err(_) => break,
                }
            }
        })
    };
    let mut failures = 0u32;
    loop {
        let event = tokio::select! {
            () = cancel.cancelled() => break,
            Some(filter) = to_subscribe.recv() => {
                if !filters.contains(&filter) {
                    // Queued while disconnected, sent on the next connection (and
                    // asked again with the rest at every CONNACK).
                    if let Err(e) = client.subscribe(filter.clone(), QoS::AtLeastOnce).await {
                        tracing::warn!("cannot subscribe to {filter:?}: {e}");
                    }
                    filters.push(filter);
                }
                continue;
            }
            event = events.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                failures = 0;
                tracing::info!("connected to the MQTT broker at {}", config.url);
                // Kept by the session too; asking again costs nothing and covers a
                // broker that lost it.
                for filter in &filters {
                    if let Err(e) = client.subscribe(filter.clone(), QoS::AtLeastOnce).await {
                        tracing::warn!("cannot subscribe to {filter:?}: {e}");
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                metrics.received_messages.fetch_add(1, Ordering::Relaxed);
                metrics
                    .received_bytes
                    .fetch_add(publish.payload.len() as u64, Ordering::Relaxed);
                if publish.dup {
                    metrics.possible_duplicates.fetch_add(1, Ordering::Relaxed);
                }
                if let Err(refusal) = rules.check(&publish.topic, &publish.payload) {
                    // It must never be appended: acked so the broker stops resending it.
                    if refusal == Refusal::Echo {
                        metrics.echoes_skipped.fetch_add(1, Ordering::Relaxed);
                    } else {
                        tracing::warn!(
                            "a message of {:?} from the broker is dropped: {refusal}",
                            publish.topic
                        );
                        metrics.refused_messages.fetch_add(1, Ordering::Relaxed);
                    }
                    if publish.qos != QoS::AtMostOnce {
                        let _ = client.ack(&publish).await;
                    }
                    continue;
                }
                let message = Message::new(publish.topic.clone(), publish.payload.to_vec());
                if let Err(e) = message.validate() {
                    // It can never be appended: acked, or the broker resends it forever.
                    tracing::warn!(
                        "a message of {:?} from the broker is dropped: {e}",
                        publish.topic
                    );
                    metrics.refused_messages.fetch_add(1, Ordering::Relaxed);
                    if publish.qos != QoS::AtMostOnce {
                        let _ = client.ack(&publish).await;
                    }
                    continue;
                }
                if publish.qos == QoS::AtMostOnce {
                    let _ = ingest.publish(message).await;
                    continue;
                }
                let Ok(reply) = ingest.publish_acked(message).await else {
                    break;
                };
                if pending.send((publish, reply)).await.is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                failures = failures.saturating_add(1);
                // Once per outage in the log, then quietly retried.
                if failures == 1 {
                    tracing::warn!(
                        "the MQTT broker at {} is unreachable ({e}); reconnecting",
                        config.url
                    );
                }
                let backoff = Duration::from_millis(100 * u64::from(failures.min(20)));
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
            }
        }
    }
    drop(pending);
    let _ = acker.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1884"),
            Ok(("127.0.0.1".into(), 1884))
        );
        assert_eq!(parse_url("mqtt://broker"), Ok(("broker".into(), 1883)));
        assert!(parse_url("tcp://broker:1883").is_err());
        assert!(parse_url("mqtt://broker:x").is_err());
        assert!(parse_url("mqtt://").is_err());
    }
}
