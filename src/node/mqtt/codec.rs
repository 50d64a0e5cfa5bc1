//! MQTT 3.1.1 and 5 packets in and out, through rumqttc's public `mqttbytes`
//! modules (no packet encoding of our own): what the listener needs of them,
//! as one enum for both versions, with the client's bounds checked.

use bytes::{Buf, BytesMut};
use rumqttc::{
    mqttbytes::{self as v4bytes, v4},
    v5::mqttbytes::{self as v5bytes, v5},
};

use super::listener::ClientError;

/// The protocol a client speaks, from its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1.
    V4,
    /// MQTT 5.
    V5,
}

/// A packet from a client, in the terms the listener uses.
#[derive(Debug)]
pub enum Incoming {
    Connect {
        version: Version,
        client_id: String,
        keep_alive: u16,
        /// The client asks to keep its session (clean session / clean start off).
        keep_session: bool,
        /// The CONNECT's password, if it has one.
        password: Option<String>,
    },
    Publish(Publish),
    Subscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect,
    /// A packet a client may send that needs nothing from us (a PUBACK: we only
    /// send QoS 0).
    Ignored(&'static str),
}

/// One PUBLISH.
#[derive(Debug)]
pub struct Publish {
    pub qos: u8,
    pub pkid: u16,
    pub dup: bool,
    pub topic: String,
    pub payload: bytes::Bytes,
    /// MQTT 5's content type property.
    pub content_type: Option<String>,
    /// MQTT 5's user properties (bounded by the packet size).
    pub user_properties: Vec<(String, String)>,
}

fn v4_error(e: v4bytes::Error) -> ClientError {
    match e {
        v4bytes::Error::PayloadSizeLimitExceeded(size) => ClientError::PacketTooLarge { size },
        v4bytes::Error::TopicNotUtf8 => ClientError::TopicNotUtf8,
        other => ClientError::Malformed(other.to_string()),
    }
}

fn v5_error(e: v5bytes::Error) -> ClientError {
    match e {
        v5bytes::Error::PayloadSizeLimitExceeded { pkt_size, .. } => {
            ClientError::PacketTooLarge { size: pkt_size }
        }
        v5bytes::Error::TopicNotUtf8 => ClientError::TopicNotUtf8,
        other => ClientError::Malformed(other.to_string()),
    }
}

/// Decodes the next packet in `buffer`: `Ok(None)` if more bytes are needed.
/// `version` is `None` until the CONNECT: the first packet must be one.
/// A packet whose remaining length passes `max_packet` is refused from its
/// header, before its bytes are read.
pub fn decode(
    buffer: &mut BytesMut,
    version: Option<Version>,
    max_packet: usize,
) -> Result<Option<Incoming>, ClientError> {
    // Something else than a CONNECT is refused from its first byte, before its
    // length is waited for: a stranger speaking another protocol ends at once.
    if version.is_none()
        && let Some(&byte1) = buffer.first()
        && v4bytes::FixedHeader::new(byte1, 0, 0).packet_type().ok()
            != Some(v4bytes::PacketType::Connect)
    {
        return Err(ClientError::NotConnect);
    }
    // The fixed header is the same in both versions.
    let header = match v4bytes::check(buffer.iter(), max_packet) {
        Ok(header) => header,
        Err(v4bytes::Error::InsufficientBytes(_)) => return Ok(None),
        Err(e) => return Err(v4_error(e)),
    };
    let kind = header.packet_type().map_err(v4_error)?;
    match version {
        // A CONNECT: any other first packet was refused above, from its first byte.
        None => {
            // MQTT 5 first: its reader refuses other levels by name.
            let mut probe = buffer.clone();
            match v5::Packet::read(&mut probe, Some(max_packet as u32)) {
                Ok(v5::Packet::Connect(connect, _, login)) => {
                    *buffer = probe;
                    return Ok(Some(Incoming::Connect {
                        version: Version::V5,
                        client_id: connect.client_id,
                        keep_alive: connect.keep_alive,
                        keep_session: !connect.clean_start,
                        password: login.map(|l| l.password),
                    }));
                }
                Err(v5bytes::Error::InvalidProtocolLevel(4)) => {}
                Err(v5bytes::Error::InvalidProtocolLevel(level)) => {
                    return Err(ClientError::UnsupportedVersion { level });
                }
                Err(e) => return Err(v5_error(e)),
                Ok(_) => return Err(ClientError::NotConnect),
            }
            match v4::Packet::read(buffer, max_packet).map_err(v4_error)? {
                v4::Packet::Connect(connect) => Ok(Some(Incoming::Connect {
                    version: Version::V4,
                    client_id: connect.client_id,
                    keep_alive: connect.keep_alive,
                    keep_session: !connect.clean_session,
                    password: connect.login.map(|l| l.password),
                })),
                _ => Err(ClientError::NotConnect),
            }
        }
        Some(Version::V4) => {
            let packet = v4::Packet::read(buffer, max_packet).map_err(v4_error)?;
            Ok(Some(match packet {
                v4::Packet::Connect(_) => return Err(ClientError::SecondConnect),
                v4::Packet::Publish(p) => Incoming::Publish(Publish {
                    qos: p.qos as u8,
                    pkid: p.pkid,
                    dup: p.dup,
                    topic: p.topic,
                    payload: p.payload,
                    content_type: None,
                    user_properties: Vec::new(),
                }),
                v4::Packet::Subscribe(s) => Incoming::Subscribe {
                    pkid: s.pkid,
                    filters: s.filters.into_iter().map(|f| f.path).collect(),
                },
                v4::Packet::PingReq => Incoming::PingReq,
                v4::Packet::Disconnect => Incoming::Disconnect,
                v4::Packet::Unsubscribe(u) => Incoming::Unsubscribe {
                    pkid: u.pkid,
                    filters: u.topics,
                },
                v4::Packet::PubAck(_) => Incoming::Ignored("PUBACK"),
                other => return Err(ClientError::Unexpected(packet_name_v4(&other))),
            }))
        }
        Some(Version::V5) => {
            // A bare DISCONNECT (no reason code) is valid in MQTT 5; the reader
            // wants a payload, so it is taken from its header here.
            if kind == v4bytes::PacketType::Disconnect && header.frame_length() == 2 {
                buffer.advance(2);
                return Ok(Some(Incoming::Disconnect));
            }
            let packet = v5::Packet::read(buffer, Some(max_packet as u32)).map_err(v5_error)?;
            Ok(Some(match packet {
                v5::Packet::Connect(..) => return Err(ClientError::SecondConnect),
                v5::Packet::Publish(p) => {
                    let topic = String::from_utf8(p.topic.to_vec())
                        .map_err(|_| ClientError::TopicNotUtf8)?;
                    let (content_type, user_properties) = p
                        .properties
                        .map(|p| (p.content_type, p.user_properties))
                        .unwrap_or_default();
                    Incoming::Publish(Publish {
                        qos: p.qos as u8,
                        pkid: p.pkid,
                        dup: p.dup,
                        topic,
                        payload: p.payload,
                        content_type,
                        user_properties,
                    })
                }
                v5::Packet::Subscribe(s) => Incoming::Subscribe {
                    pkid: s.pkid,
                    filters: s.filters.into_iter().map(|f| f.path).collect(),
                },
                v5::Packet::PingReq(_) => Incoming::PingReq,
                v5::Packet::Disconnect(_) => Incoming::Disconnect,
                v5::Packet::Unsubscribe(u) => Incoming::Unsubscribe {
                    pkid: u.pkid,
                    filters: u.filters,
                },
                v5::Packet::PubAck(_) => Incoming::Ignored("PUBACK"),
                v5::Packet::Auth(_) => return Err(ClientError::Unexpected("AUTH")),
                _ => return Err(ClientError::Unexpected("a server's packet")),
            }))
        }
    }
}

fn packet_name_v4(packet: &v4::Packet) -> &'static str {
    match packet {
        v4::Packet::PubRec(_) | v4::Packet::PubRel(_) | v4::Packet::PubComp(_) => "QoS 2 flow",
        _ => "a server's packet",
    }
}

/// What the listener sends.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// Accepted; MQTT 5 also hears our limits.
    ConnAck {
        session_present: bool,
        receive_max: u16,
        max_packet: u32,
    },
    /// Refused: no or a wrong password.
    ConnAckNotAuthorized,
    PubAck(u16),
    /// For each filter: granted at QoS 0 (`true`) or refused.
    SubAck {
        pkid: u16,
        granted: Vec<bool>,
    },
    UnsubAck {
        pkid: u16,
        filters: usize,
    },
    /// A QoS 0 publish to a subscriber (egress).
    Publish(std::sync::Arc<super::egress::Delivery>),
    PingResp,
    /// MQTT 5 only: why we end the connection.
    Disconnect(v5::DisconnectReasonCode),
}

/// Appends `packet` to `out`, encoded for `version`.
pub fn encode(packet: Outgoing, version: Version, out: &mut BytesMut) {
    // Our own packets are small and well formed: encoding cannot fail, and the
    // size bound is the protocol's own.
    const MAX: usize = 268_435_455;
    let result = match version {
        Version::V4 => {
            let packet = match packet {
                Outgoing::ConnAck {
                    session_present, ..
                } => v4::Packet::ConnAck(v4::ConnAck::new(
                    v4::ConnectReturnCode::Success,
                    session_present,
                )),
                Outgoing::ConnAckNotAuthorized => v4::Packet::ConnAck(v4::ConnAck::new(
                    v4::ConnectReturnCode::BadUserNamePassword,
                    false,
                )),
                Outgoing::PubAck(pkid) => v4::Packet::PubAck(v4::PubAck::new(pkid)),
                Outgoing::SubAck { pkid, granted } => v4::Packet::SubAck(v4::SubAck::new(
                    pkid,
                    granted
                        .into_iter()
                        .map(|ok| match ok {
                            true => v4::SubscribeReasonCode::Success(v4bytes::QoS::AtMostOnce),
                            false => v4::SubscribeReasonCode::Failure,
                        })
                        .collect(),
                )),
                Outgoing::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(pkid)),
                Outgoing::Publish(out) => v4::Packet::Publish(v4::Publish::new(
                    out.topic.clone(),
                    v4bytes::QoS::AtMostOnce,
                    out.payload.clone(),
                )),
                Outgoing::PingResp => v4::Packet::PingResp,
                // 3.1.1 has no server DISCONNECT: closing the socket says it.
                Outgoing::Disconnect(_) => return,
            };
            packet
                .write(out, MAX)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        Version::V5 => {
            let packet = match packet {
                Outgoing::ConnAck {
                    session_present,
                    receive_max,
                    max_packet,
                } => v5::Packet::ConnAck(v5::ConnAck {
                    session_present,
                    code: v5::ConnectReturnCode::Success,
                    properties: Some(v5::ConnAckProperties {
                        receive_max: Some(receive_max),
                        max_qos: Some(1),
                        retain_available: Some(0),
                        max_packet_size: Some(max_packet),
                        wildcard_subscription_available: Some(1),
                        subscription_identifiers_available: Some(0),
                        shared_subscription_available: Some(0),
                        ..empty_connack_properties()
                    }),
                }),
                Outgoing::ConnAckNotAuthorized => v5::Packet::ConnAck(v5::ConnAck {
                    session_present: false,
                    code: v5::ConnectReturnCode::BadUserNamePassword,
                    properties: None,
                }),
                Outgoing::PubAck(pkid) => v5::Packet::PubAck(v5::PubAck::new(pkid, None)),
                Outgoing::SubAck { pkid, granted } => v5::Packet::SubAck(v5::SubAck {
                    pkid,
                    return_codes: granted
                        .into_iter()
                        .map(|ok| match ok {
                            true => v5::SubscribeReasonCode::Success(v5bytes::QoS::AtMostOnce),
                            false => v5::SubscribeReasonCode::ImplementationSpecific,
                        })
                        .collect(),
                    properties: None,
                }),
                Outgoing::UnsubAck { pkid, filters } => v5::Packet::UnsubAck(v5::UnsubAck {
                    pkid,
                    reasons: vec![v5::UnsubAckReason::Success; filters],
                    properties: None,
                }),
                Outgoing::Publish(out) => v5::Packet::Publish(v5::Publish::new(
                    out.topic.clone(),
                    v5bytes::QoS::AtMostOnce,
                    out.payload.clone(),
                    out.content_type
                        .clone()
                        .map(|content_type| v5::PublishProperties {
                            content_type: Some(content_type),
                            ..Default::default()
                        }),
                )),
                Outgoing::PingResp => v5::Packet::PingResp(v5::PingResp),
                Outgoing::Disconnect(reason) => v5::Packet::Disconnect(v5::Disconnect {
                    reason_code: reason,
                    properties: None,
                }),
            };
            packet
                .write(out, Some(MAX as u32))
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    if let Err(e) = result {
        tracing::error!("encoding an MQTT packet of ours failed: {e}");
    }
}

fn empty_connack_properties() -> v5::ConnAckProperties {
    v5::ConnAckProperties {
        session_expiry_interval: None,
        receive_max: None,
        max_qos: None,
        retain_available: None,
        max_packet_size: None,
        assigned_client_identifier: None,
        topic_alias_max: None,
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: None,
        subscription_identifiers_available: None,
        shared_subscription_available: None,
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rumqttc::v5::mqttbytes::v5::{Filter, PublishProperties};

    use super::*;

    /// What decoding a client's packets may allocate beyond 8 times their bytes:
    /// rumqttc builds a struct per topic filter (three bytes on the wire) and per
    /// user property (five), up to the packet bound (here the fuzz's small one).
    const FUZZ_MAX_PACKET: usize = 4096;
    const MQTT_FIXED_BYTES: usize = 32 * FUZZ_MAX_PACKET;

    /// A CONNECT then packets a client sends, both versions, from rumqttc's encoders.
    fn arb_session() -> BoxedStrategy<Vec<u8>> {
        let v4_packet = prop_oneof![
            (
                "[a-z/]{1,12}",
                proptest::collection::vec(any::<u8>(), 0..32),
                0u8..2
            )
                .prop_map(|(topic, payload, qos)| {
                    let qos = if qos == 0 {
                        v4bytes::QoS::AtMostOnce
                    } else {
                        v4bytes::QoS::AtLeastOnce
                    };
                    let mut publish = v4::Publish::new(topic, qos, payload);
                    publish.pkid = u16::from(qos as u8);
                    v4::Packet::Publish(publish)
                }),
            proptest::collection::vec("[a-z/#+]{1,8}", 1..4).prop_map(|filters| {
                let mut subscribe = v4::Subscribe::new_many(
                    filters
                        .into_iter()
                        .map(|f| v4::SubscribeFilter::new(f, v4bytes::QoS::AtMostOnce)),
                );
                subscribe.pkid = 1;
                v4::Packet::Subscribe(subscribe)
            }),
            "[a-z/]{1,8}".prop_map(|f| {
                let mut unsubscribe = v4::Unsubscribe::new(f);
                unsubscribe.pkid = 2;
                v4::Packet::Unsubscribe(unsubscribe)
            }),
            Just(v4::Packet::PingReq),
            Just(v4::Packet::Disconnect),
        ];
        let v5_packet = prop_oneof![
            (
                "[a-z/]{1,12}",
                proptest::collection::vec(any::<u8>(), 0..32),
                proptest::option::of("[a-z/]{0,8}"),
                proptest::collection::vec(("[a-z]{0,4}", "[a-z0-9]{0,4}"), 0..3)
            )
                .prop_map(|(topic, payload, content_type, user_properties)| {
                    let properties = PublishProperties {
                        content_type,
                        user_properties,
                        ..Default::default()
                    };
                    let mut publish = v5::Publish::new(
                        topic,
                        v5bytes::QoS::AtLeastOnce,
                        payload,
                        Some(properties),
                    );
                    publish.pkid = 1;
                    v5::Packet::Publish(publish)
                }),
            proptest::collection::vec("[a-z/#+]{1,8}", 1..4).prop_map(|filters| {
                let mut subscribe = v5::Subscribe::new_many(
                    filters
                        .into_iter()
                        .map(|f| Filter::new(f, v5bytes::QoS::AtMostOnce)),
                    None,
                );
                subscribe.pkid = 1;
                v5::Packet::Subscribe(subscribe)
            }),
            "[a-z/]{1,8}".prop_map(|f| {
                let mut unsubscribe = v5::Unsubscribe::new(f, None);
                unsubscribe.pkid = 2;
                v5::Packet::Unsubscribe(unsubscribe)
            }),
            Just(v5::Packet::PingReq(v5::PingReq)),
        ];
        let v4_session = ("[a-z0-9]{0,12}", proptest::collection::vec(v4_packet, 0..4)).prop_map(
            |(client_id, packets)| {
                let mut out = BytesMut::new();
                v4::Packet::Connect(v4::Connect::new(client_id))
                    .write(&mut out, usize::MAX)
                    .expect("encodes");
                for packet in packets {
                    packet.write(&mut out, usize::MAX).expect("encodes");
                }
                out.to_vec()
            },
        );
        let v5_session = ("[a-z0-9]{0,12}", proptest::collection::vec(v5_packet, 0..4)).prop_map(
            |(client_id, packets)| {
                let mut out = BytesMut::new();
                let connect = v5::Connect {
                    keep_alive: 30,
                    client_id,
                    clean_start: true,
                    properties: None,
                };
                v5::Packet::Connect(connect, None, None)
                    .write(&mut out, None)
                    .expect("encodes");
                for packet in packets {
                    packet.write(&mut out, None).expect("encodes");
                }
                out.to_vec()
            },
        );
        prop_oneof![v4_session, v5_session].boxed()
    }

    /// Decodes a client's bytes as the listener does, packet by packet, measuring
    /// the peak allocation; the number of packets decoded.
    fn decode_all(bytes: &[u8]) -> Result<usize, TestCaseError> {
        let mut buffer = BytesMut::from(bytes);
        let mut version = None;
        let mut packets = 0;
        let (outcome, peak) = crate::alloc_probe::peak_bytes(|| {
            loop {
                let before = buffer.len();
                match decode(&mut buffer, version, FUZZ_MAX_PACKET) {
                    Ok(Some(packet)) => {
                        packets += 1;
                        if buffer.len() >= before {
                            return Err("a packet was decoded from no bytes".to_string());
                        }
                        if let Incoming::Connect { version: v, .. } = packet {
                            version = Some(v);
                        }
                    }
                    Ok(None) | Err(_) => return Ok(()),
                }
            }
        });
        outcome.map_err(TestCaseError::fail)?;
        prop_assert!(
            crate::fuzz_support::within_bound(bytes.len(), peak, MQTT_FIXED_BYTES),
            "{peak} bytes allocated for {} bytes of packets",
            bytes.len()
        );
        Ok(packets)
    }

    /// Arbitrary bytes, valid MQTT 3.1.1 and 5 sessions and mutated ones through the
    /// listener's decoder: packets or a typed error, never a panic or a packet of
    /// no bytes, and allocations within the bound.
    #[test]
    fn fuzz_mqtt_packets() {
        let decoded = std::cell::Cell::new(0u64);
        let strategy = crate::fuzz_support::hostile_inputs(arb_session());
        let inputs = crate::fuzz_support::fuzz_for("mqtt packets", strategy, 1024, |bytes| {
            decoded.set(decoded.get() + decode_all(&bytes)? as u64);
            Ok(())
        });
        println!(
            "mqtt packets: {} packets decoded from {inputs} inputs",
            decoded.get()
        );
        assert!(decoded.get() > 0);
    }

    /// Packets of the listener's default maximum size filled with the cheapest
    /// repeated entries (topic filters, user properties): decoded within 16 times
    /// their size. rumqttc decodes a packet whole before we can count its entries
    /// (a 24-byte `String` per 3-byte topic, a 48-byte pair per 5-byte property),
    /// so this is its bound, not 8x: up to 3.2 MB per client at the 256 KiB default.
    #[test]
    fn hostile_maximum_size_packets_are_bounded() {
        let max = super::super::listener::Limits::default().max_packet;
        let packet = |byte1: u8, body: &[u8]| {
            let mut out = BytesMut::new();
            out.extend_from_slice(&[byte1]);
            let mut len = body.len();
            loop {
                let mut digit = (len % 128) as u8;
                len /= 128;
                if len > 0 {
                    digit |= 0x80;
                }
                out.extend_from_slice(&[digit]);
                if len == 0 {
                    break;
                }
            }
            out.extend_from_slice(body);
            out
        };
        let connect = |v5: bool| {
            let mut out = BytesMut::new();
            if v5 {
                let connect = v5::Connect {
                    keep_alive: 30,
                    client_id: "c".into(),
                    clean_start: true,
                    properties: None,
                };
                v5::Packet::Connect(connect, None, None)
                    .write(&mut out, None)
                    .unwrap();
            } else {
                v4::Packet::Connect(v4::Connect::new("c"))
                    .write(&mut out, usize::MAX)
                    .unwrap();
            }
            out
        };
        let room = max - 16;
        // SUBSCRIBE (pkid 1): one-letter filters, QoS 0.
        let v4_filters = [&[0, 1][..], &[0, 1, b'a', 0].repeat(room / 4)].concat();
        // MQTT 5: pkid, no properties, then filters.
        let v5_filters = [&[0, 1, 0][..], &[0, 1, b'a', 0].repeat(room / 4)].concat();
        // UNSUBSCRIBE (pkid 2): one-letter topics.
        let v4_topics = [&[0, 2][..], &[0, 1, b'a'].repeat(room / 3)].concat();
        // MQTT 5 PUBLISH QoS 0: topic "t", properties of empty user properties.
        let properties = [0x26, 0, 0, 0, 0].repeat(room / 5);
        let mut v5_publish = vec![0, 1, b't'];
        let mut varint = BytesMut::new();
        let mut len = properties.len();
        loop {
            let mut digit = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                digit |= 0x80;
            }
            varint.extend_from_slice(&[digit]);
            if len == 0 {
                break;
            }
        }
        v5_publish.extend_from_slice(&varint);
        v5_publish.extend_from_slice(&properties);
        for (name, v5, packet) in [
            (
                "3.1.1 subscribe of one-letter filters",
                false,
                packet(0x82, &v4_filters),
            ),
            (
                "5 subscribe of one-letter filters",
                true,
                packet(0x82, &v5_filters),
            ),
            (
                "3.1.1 unsubscribe of one-letter topics",
                false,
                packet(0xa2, &v4_topics),
            ),
            (
                "5 publish of empty user properties",
                true,
                packet(0x30, &v5_publish),
            ),
        ] {
            let mut buffer = connect(v5);
            decode(&mut buffer, None, max).unwrap().unwrap();
            let len = packet.len();
            assert!(len <= max + 5, "{name}: {len}");
            let mut buffer = packet;
            let version = Some(if v5 { Version::V5 } else { Version::V4 });
            let (result, peak) = crate::alloc_probe::peak_bytes(|| {
                decode(&mut buffer, version, max).map(|p| p.is_some())
            });
            println!(
                "hostile mqtt packet {name}: {len} bytes, {} ({peak} bytes allocated at the peak, {:.2}x)",
                match &result {
                    Ok(_) => "decoded".to_string(),
                    Err(e) => format!("refused: {e}"),
                },
                peak as f64 / len as f64
            );
            assert!(result.is_ok(), "{name}");
            assert!(peak <= 16 * len, "{name}: {peak} bytes");
        }
    }
}
