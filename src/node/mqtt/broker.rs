//! An external broker (`serve --mqtt-broker mqtt://host:port`): the node is a
//! client (rumqttc) with a persistent session (clean session off, a client id
//! stable for the store) and QoS 1 subscriptions (`--mqtt-subscribe`). Acks are
//! manual: a message is acknowledged to the broker only once it is appended, so
//! the broker redelivers whatever the node did not get to keep (a kill, a lost
//! connection). Acks go out in the order the messages came, as MQTT asks.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    sync::atomic::Ordering,
    time::Duration,
};

use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
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
    /// `mqtts://`: the CA certificates (PEM) to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// `mqtts://`: a client certificate chain and its key (PEM), when the broker
    /// asks for one.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Where the broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
    /// `mqtts://`: TLS.
    pub tls: bool,
}

/// `mqtt://host:port` (1883 by default) or `mqtts://host:port` (TLS, 8883 by
/// default); an error in words otherwise.
pub fn parse_url(url: &str) -> Result<BrokerAddr, String> {
    let (rest, tls, default_port) = if let Some(rest) = url.strip_prefix("mqtt://") {
        (rest, false, 1883)
    } else if let Some(rest) = url.strip_prefix("mqtts://") {
        (rest, true, 8883)
    } else {
        return Err(format!(
            "the broker address {url:?} must start with mqtt:// or mqtts:// (TLS), e.g. mqtt://127.0.0.1:1883"
        ));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) => (
            host.trim_matches(['[', ']']),
            port.parse()
                .map_err(|_| format!("the broker address {url:?} has no valid port"))?,
        ),
        None => (rest, default_port),
    };
    if host.is_empty() {
        return Err(format!("the broker address {url:?} names no host"));
    }
    Ok(BrokerAddr {
        host: host.to_owned(),
        port,
        tls,
    })
}

/// The TLS settings for `config`: its CA file or the system's roots, and its
/// client certificate if any.
fn tls_config(config: &BrokerConfig) -> Result<rustls::ClientConfig, String> {
    let read = |what: &str, path: &Path| {
        std::fs::read(path).map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    match &config.ca_file {
        Some(path) => {
            let pem = read("CA file", path)?;
            for cert in rustls_pemfile::certs(&mut &pem[..]) {
                let cert =
                    cert.map_err(|e| format!("the CA file {} is not PEM: {e}", path.display()))?;
                roots.add(cert).map_err(|e| {
                    format!(
                        "the CA file {} holds a bad certificate: {e}",
                        path.display()
                    )
                })?;
            }
            if roots.is_empty() {
                return Err(format!(
                    "the CA file {} holds no certificate",
                    path.display()
                ));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err("no system CA certificates were found for mqtts://; give the broker's CA with --mqtt-ca-file".into());
            }
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS cannot be set up: {e}"))?
    .with_root_certificates(roots);
    match &config.client_cert {
        None => Ok(builder.with_no_client_auth()),
        Some((cert_path, key_path)) => {
            let pem = read("client certificate", cert_path)?;
            let chain = rustls_pemfile::certs(&mut &pem[..])
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    format!(
                        "the client certificate {} is not PEM: {e}",
                        cert_path.display()
                    )
                })?;
            let pem = read("client key", key_path)?;
            let key = rustls_pemfile::private_key(&mut &pem[..])
                .ok()
                .flatten()
                .ok_or_else(|| {
                    format!(
                        "the client key {} holds no private key in PEM",
                        key_path.display()
                    )
                })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("the client certificate and key do not fit: {e}"))
        }
    }
}

/// The client for `config` and its event loop (not connected yet).
/// Whether `config` can work (its address, its TLS files), before anything
/// connects: the node checks this when it starts.
pub fn check(config: &BrokerConfig) -> Result<(), String> {
    let addr = parse_url(&config.url)?;
    if addr.tls {
        tls_config(config).map(|_| ())
    } else if config.ca_file.is_some() || config.client_cert.is_some() {
        Err(format!(
            "--mqtt-ca-file and --mqtt-client-cert are for TLS: write the broker as mqtts://… instead of {}",
            config.url
        ))
    } else {
        Ok(())
    }
}

/// The client for `config` and its event loop (not connected yet).
pub fn connect(config: &BrokerConfig) -> Result<(AsyncClient, EventLoop), String> {
    let addr = parse_url(&config.url)?;
    let mut options = MqttOptions::new(config.client_id.clone(), addr.host, addr.port);
    check(config)?;
    if addr.tls {
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls_config(config)?),
        )));
    }
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
                let message = Message::new(publish.topic.clone(), publish.payload.to_vec());
                // `Some(None)`: skipped quietly (our own egress, back); `Some(Some(why))`: refused.
                let problem = match rules.check(&publish.topic, &publish.payload) {
                    Err(Refusal::Echo) => {
                        metrics.echoes_skipped.fetch_add(1, Ordering::Relaxed);
                        Some(None)
                    }
                    Err(refusal) => Some(Some(refusal.to_string())),
                    Ok(()) => message.validate().err().map(|e| Some(e.to_string())),
                };
                if let Some(reason) = problem {
                    // It must never be appended: acked so the broker stops resending it.
                    if let Some(reason) = reason {
                        tracing::warn!(
                            "a message of {:?} from the broker is dropped: {reason}",
                            publish.topic
                        );
                        metrics.refused_messages.fetch_add(1, Ordering::Relaxed);
                    }
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
        let addr = |host: &str, port, tls| BrokerAddr {
            host: host.into(),
            port,
            tls,
        };
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1884"),
            Ok(addr("127.0.0.1", 1884, false))
        );
        assert_eq!(parse_url("mqtt://broker"), Ok(addr("broker", 1883, false)));
        assert_eq!(parse_url("mqtts://broker"), Ok(addr("broker", 8883, true)));
        assert_eq!(parse_url("mqtts://[::1]:9"), Ok(addr("::1", 9, true)));
        assert!(parse_url("tcp://broker:1883").is_err());
        assert!(parse_url("mqtt://broker:x").is_err());
        assert!(parse_url("mqtt://").is_err());
        assert!(parse_url("mqtts://:1").is_err());
    }
}
