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
