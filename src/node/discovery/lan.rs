//! LAN discovery: mDNS/DNS-SD (RFC 6762/6763) with `mdns-sd`.
//!
//! Each node registers one service instance of [`SERVICE_TYPE`], named by its
//! node id, on its replication port, with two TXT properties: `topic` (the
//! group's discovery topic, hex) and `node` (its node id). It browses the same
//! type and reports every instance of its own topic to the [`super::PeerBook`].
//! Groups sharing a LAN see each other's records and skip them by topic.
//!
//! Everything in a record is untrusted: a record that does not parse is skipped,
//! and at most [`super::ADDRESSES_KEPT`] addresses are taken from it. A record of
//! our topic that points at a node of another group gets one refused dial, then
//! none (see [`super::PeerBook`]).
//!
//! `mdns-sd` runs its own thread; if it fails (or panics), LAN discovery stops
//! with a warning and the node goes on without it.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};
use multifeed::DiscoveryTopic;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{ADDRESSES_KEPT, Discovery, Source};
use crate::node::peers::NodeId;

/// The DNS-SD service type of a multifeed node.
pub const SERVICE_TYPE: &str = "_multifeed._tcp.local.";

/// The standard mDNS port.
pub const MDNS_PORT: u16 = 5353;

/// How long shutdown waits for the goodbye packets to go out.
const GOODBYE_WAIT: Duration = Duration::from_secs(1);

/// What LAN discovery needs to know.
#[derive(Debug, Clone)]
pub struct LanConfig {
    /// The UDP port of mDNS: 5353, or another one to keep a test (or an
    /// isolated set of nodes) apart from the LAN's.
    pub mdns_port: u16,
}

impl Default for LanConfig {
    fn default() -> Self {
        Self {
            mdns_port: MDNS_PORT,
        }
    }
}

/// Why LAN discovery could not start.
#[derive(Debug, thiserror::Error)]
pub enum LanError {
    #[error("cannot start mDNS on UDP port {port}: {source}")]
    Start { port: u16, source: mdns_sd::Error },
    #[error("cannot announce this node over mDNS: {0}")]
    Announce(mdns_sd::Error),
}

/// The record this node announces: its instance name and TXT properties.
fn own_record(
    topic: &DiscoveryTopic,
    own: NodeId,
    listen: SocketAddr,
) -> Result<ServiceInfo, mdns_sd::Error> {
    let name = own.to_string();
    let host = format!("multifeed-{name}.local.");
    let properties = [("topic", topic.to_hex()), ("node", name.clone())];
    let ip = listen.ip();
    if ip.is_unspecified() {
        // Bound to every interface: announce every interface's address.
        Ok(ServiceInfo::new(
            SERVICE_TYPE,
            &name,
            &host,
            "",
            listen.port(),
            &properties[..],
        )?
        .enable_addr_auto())
    } else {
        ServiceInfo::new(
            SERVICE_TYPE,
            &name,
            &host,
            ip.to_string().as_str(),
            listen.port(),
            &properties[..],
        )
    }
}

/// A resolved record of our topic, as a discovery; `None` for anything else.
pub fn parse_record(
    topic: &DiscoveryTopic,
    record_topic: Option<&str>,
    record_node: Option<&str>,
    addrs: impl IntoIterator<Item = IpAddr>,
    port: u16,
) -> Option<Discovery> {
    if record_topic? != topic.to_hex() || port == 0 {
        return None;
    }
    let node = NodeId::parse(record_node?)?;
    let mut addrs: Vec<SocketAddr> = addrs
        .into_iter()
        // A link-local IPv6 address needs its scope, which a socket address
        // from a record does not carry.
        .filter(|ip| !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()))
        .filter(|ip| !ip.is_unspecified() && !ip.is_multicast())
        .take(ADDRESSES_KEPT)
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    // IPv4 first, then in a fixed order: the dialer tries them in turn.
    addrs.sort_by_key(|a| (a.is_ipv6(), *a));
    (!addrs.is_empty()).then_some(Discovery::Found {
        node,
        addrs,
        source: Source::Lan,
    })
}

/// The node id an instance's full name carries (`<id>._multifeed._tcp.local.`).
fn node_of_fullname(fullname: &str) -> Option<NodeId> {
    NodeId::parse(fullname.strip_suffix(SERVICE_TYPE)?.strip_suffix('.')?)
}

/// Announces this node and reports peers of `topic` on `found` until `cancel`.
pub async fn run(
    topic: DiscoveryTopic,
    own: NodeId,
    listen: SocketAddr,
    config: LanConfig,
    found: mpsc::Sender<Discovery>,
    cancel: CancellationToken,
) -> Result<(), LanError> {
    let port = config.mdns_port;
    let daemon =
        ServiceDaemon::new_with_port(port).map_err(|source| LanError::Start { port, source })?;
    let record = own_record(&topic, own, listen).map_err(LanError::Announce)?;
    let fullname = record.get_fullname().to_owned();
    daemon.register(record).map_err(LanError::Announce)?;
    let browse = daemon
        .browse(SERVICE_TYPE)
        .map_err(|source| LanError::Start { port, source })?;
    loop {
        let event = tokio::select! {
            () = cancel.cancelled() => break,
            event = browse.recv_async() => match event {
                Ok(event) => event,
                Err(_) => {
                    tracing::warn!("LAN discovery stopped: the mDNS thread ended; peers already found stay connected");
                    return Ok(());
                }
            },
        };
        let discovery = match event {
            ServiceEvent::ServiceResolved(service) => parse_record(
                &topic,
                service.get_property_val_str("topic"),
                service.get_property_val_str("node"),
                service.addresses.iter().map(|a| a.to_ip_addr()),
                service.port,
            ),
            ServiceEvent::ServiceRemoved(_, fullname) => {
                node_of_fullname(&fullname).map(|node| Discovery::Lost { node })
            }
            _ => None,
        };
        if let Some(discovery) = discovery
            && found.send(discovery).await.is_err()
        {
            break;
        }
    }
    // Goodbye packets tell the others at once that this node left.
    if let Ok(done) = daemon.unregister(&fullname) {
        let _ = tokio::time::timeout(GOODBYE_WAIT, done.recv_async()).await;
    }
    if let Ok(done) = daemon.shutdown() {
        let _ = tokio::time::timeout(GOODBYE_WAIT, done.recv_async()).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use multifeed::SharedKey;

    #[test]
    fn only_well_formed_records_of_our_topic_are_taken() {
        let topic = SharedKey::generate().discovery_topic();
        let other = SharedKey::generate().discovery_topic();
        let node = NodeId::random();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let hex = topic.to_hex();
        let id = node.to_string();
        let found = parse_record(&topic, Some(&hex), Some(&id), [lo], 7000);
        assert_eq!(
            found,
            Some(Discovery::Found {
                node,
                addrs: vec![SocketAddr::new(lo, 7000)],
                source: Source::Lan
            })
        );
        let other_hex = other.to_hex();
        for (t, n, port) in [
            (Some(other_hex.as_str()), Some(id.as_str()), 7000),
            (None, Some(id.as_str()), 7000),
            (Some(hex.as_str()), None, 7000),
            (Some(hex.as_str()), Some("not-a-node"), 7000),
            (Some(hex.as_str()), Some(id.as_str()), 0),
        ] {
            assert_eq!(
                parse_record(&topic, t, n, [lo], port),
                None,
                "{t:?} {n:?} {port}"
            );
        }
        let link_local: IpAddr = "fe80::1".parse().unwrap();
        assert_eq!(
            parse_record(&topic, Some(&hex), Some(&id), [link_local], 7000),
            None
        );
        let many = (0..100u8).map(|i| IpAddr::from([10, 0, 0, i]));
        let Some(Discovery::Found { addrs, .. }) =
            parse_record(&topic, Some(&hex), Some(&id), many, 1)
        else {
            panic!("found");
        };
        assert_eq!(addrs.len(), ADDRESSES_KEPT);
    }

    #[test]
    fn a_removed_instance_names_its_node() {
        let node = NodeId::random();
        assert_eq!(
            node_of_fullname(&format!("{node}.{SERVICE_TYPE}")),
            Some(node)
        );
        assert_eq!(node_of_fullname("printer._ipp._tcp.local."), None);
    }
}
