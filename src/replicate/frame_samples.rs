//! Test support: real frames written by hypercore-protocol's own encoder, proptest
//! strategies for every message type, and hostile variants with mutated lengths.

use compact_encoding::CompactEncoding;
use hypercore_protocol::Message;
use hypercore_protocol::schema::{
    Bitfield, Cancel, Close, Data, Extension, NoData, Open, Range, Request, Synchronize, Unwant,
    Want,
};
use hypercore_schema::{
    DataBlock, DataHash, DataSeek, DataUpgrade, Node, RequestBlock, RequestSeek, RequestUpgrade,
};
use proptest::prelude::*;

use super::frame_check::write_uint;

/// A message as the crate encodes it: type and body (an `Open` or `Close` has no type).
pub fn encode(message: &Message) -> Vec<u8> {
    message
        .to_encoded_bytes()
        .expect("the crate encodes its own message")
        .into_vec()
}

/// `<channel> <message>`: the frame the crate sends for one message.
pub fn single(channel: u64, message: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    write_uint(&mut out, channel);
    out.extend(encode(message));
    out
}

/// `00 01 <open>`.
pub fn open_frame(open: &Open) -> Vec<u8> {
    [vec![0, 1], encode(&Message::Open(open.clone()))].concat()
}

/// `00 03 <close>`.
pub fn close_frame(channel: u64) -> Vec<u8> {
    [vec![0, 3], encode(&Message::Close(Close { channel }))].concat()
}

/// A batch as the crate and protomux write it, with `00 <channel>` where the channel changes.
pub fn batch(messages: &[(u64, Message)]) -> Vec<u8> {
    let mut out = vec![0, 0];
    let mut current = None;
    for (channel, message) in messages {
        if current.is_some_and(|c| c != *channel) {
            out.push(0);
        }
        if current != Some(*channel) {
            write_uint(&mut out, *channel);
            current = Some(*channel);
        }
        let bytes = encode(message);
        write_uint(&mut out, bytes.len() as u64);
        out.extend(bytes);
    }
    out
}

fn node(i: u64) -> Node {
    Node::new(i, vec![i as u8; 32], i * 10)
}

/// One message of every type, with every optional part present.
pub fn sample_messages() -> Vec<Message> {
    vec![
        Message::Synchronize(Synchronize {
            fork: 1,
            length: 300,
            remote_length: 70_000,
            downloading: true,
            uploading: true,
            can_upgrade: true,
        }),
        Message::Request(Request {
            id: 9,
            fork: 0,
            block: Some(RequestBlock { index: 5, nodes: 2 }),
            hash: Some(RequestBlock { index: 6, nodes: 0 }),
            seek: Some(RequestSeek { bytes: 1 << 33 }),
            upgrade: Some(RequestUpgrade {
                start: 0,
                length: 10,
            }),
            manifest: true,
            priority: 3,
        }),
        Message::Cancel(Cancel { request: 9 }),
        Message::Data(Data {
            request: 9,
            fork: 0,
            block: Some(DataBlock {
                index: 5,
                value: vec![0xab; 300],
                nodes: vec![node(1), node(2)],
            }),
            hash: Some(DataHash {
                index: 6,
                nodes: vec![node(3)],
            }),
            seek: Some(DataSeek {
                bytes: 10,
                nodes: vec![node(4)],
            }),
            upgrade: Some(DataUpgrade {
                start: 0,
                length: 10,
                nodes: vec![node(5), node(6)],
                additional_nodes: vec![node(7)],
                signature: vec![0x5a; 64],
            }),
        }),
        Message::NoData(NoData { request: 9 }),
        Message::Want(Want {
            start: 0,
            length: 1024,
        }),
        Message::Unwant(Unwant {
            start: 0,
            length: 1024,
        }),
        Message::Bitfield(Bitfield {
            start: 0,
            bitfield: vec![u32::MAX, 0, 0x0101_0101],
        }),
        Message::Range(Range {
            drop: false,
            start: 0,
            length: 1,
        }),
        Message::Range(Range {
            drop: true,
            start: 7,
            length: 100_000,
        }),
        Message::Extension(Extension {
            name: "multifeed/exchange".into(),
            message: vec![1, 2, 3],
        }),
    ]
}

/// A uint of any width: mostly small, sometimes at a width boundary or huge.
pub fn arb_uint() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 0u64..0xfd,
        1 => Just(0xfc),
        1 => Just(0xfd),
        1 => 0xfdu64..=0xffff,
        1 => 0x1_0000u64..=0xffff_ffff,
        1 => any::<u64>(),
    ]
}

fn arb_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

fn arb_node() -> impl Strategy<Value = Node> {
    (
        arb_uint(),
        proptest::array::uniform32(any::<u8>()),
        arb_uint(),
    )
        .prop_map(|(index, hash, length)| Node::new(index, hash.to_vec(), length))
}

fn arb_nodes() -> impl Strategy<Value = Vec<Node>> {
    proptest::collection::vec(arb_node(), 0..4)
}

fn arb_request_block() -> impl Strategy<Value = RequestBlock> {
    (arb_uint(), arb_uint()).prop_map(|(index, nodes)| RequestBlock { index, nodes })
}

/// Any message the crate can encode, of every type.
pub fn arb_message() -> BoxedStrategy<Message> {
    let synchronize = (arb_uint(), arb_uint(), arb_uint(), any::<[bool; 3]>()).prop_map(
        |(fork, length, remote_length, [d, u, c])| {
            Message::Synchronize(Synchronize {
                fork,
                length,
                remote_length,
                downloading: d,
                uploading: u,
                can_upgrade: c,
            })
        },
    );
    let request = (
        (arb_uint(), arb_uint()),
        proptest::option::of(arb_request_block()),
        proptest::option::of(arb_request_block()),
        proptest::option::of(arb_uint()),
        proptest::option::of((arb_uint(), arb_uint())),
        any::<bool>(),
        arb_uint(),
    )
        .prop_map(
            |((id, fork), block, hash, seek, upgrade, manifest, priority)| {
                Message::Request(Request {
                    id,
                    fork,
                    block,
                    hash,
                    seek: seek.map(|bytes| RequestSeek { bytes }),
                    upgrade: upgrade.map(|(start, length)| RequestUpgrade { start, length }),
                    manifest,
                    priority,
                })
            },
        )
        .boxed();
    let data = (
        (arb_uint(), arb_uint()),
        proptest::option::of((arb_uint(), arb_bytes(64), arb_nodes())),
        proptest::option::of((arb_uint(), arb_nodes())),
        proptest::option::of((arb_uint(), arb_nodes())),
        proptest::option::of((
            (arb_uint(), arb_uint()),
            arb_nodes(),
            arb_nodes(),
            arb_bytes(80),
        )),
    )
        .prop_map(|((request, fork), block, hash, seek, upgrade)| {
            Message::Data(Data {
                request,
                fork,
                block: block.map(|(index, value, nodes)| DataBlock {
                    index,
                    value,
                    nodes,
                }),
                hash: hash.map(|(index, nodes)| DataHash { index, nodes }),
                seek: seek.map(|(bytes, nodes)| DataSeek { bytes, nodes }),
                upgrade: upgrade.map(|((start, length), nodes, additional_nodes, signature)| {
                    DataUpgrade {
                        start,
                        length,
                        nodes,
                        additional_nodes,
                        signature,
                    }
                }),
            })
        })
        .boxed();
    prop_oneof![
        synchronize,
        request,
        arb_uint().prop_map(|request| Message::Cancel(Cancel { request })),
        data,
        arb_uint().prop_map(|request| Message::NoData(NoData { request })),
        (arb_uint(), arb_uint()).prop_map(|(start, length)| Message::Want(Want { start, length })),
        (arb_uint(), arb_uint())
            .prop_map(|(start, length)| Message::Unwant(Unwant { start, length })),
        (arb_uint(), proptest::collection::vec(any::<u32>(), 0..8))
            .prop_map(|(start, bitfield)| Message::Bitfield(Bitfield { start, bitfield })),
        (any::<bool>(), arb_uint(), arb_uint()).prop_map(|(drop, start, length)| Message::Range(
            Range {
                drop,
                start,
                length
            }
        )),
        ("[a-z/]{0,20}", arb_bytes(64))
            .prop_map(|(name, message)| Message::Extension(Extension { name, message })),
    ]
    .boxed()
}

/// An `Open` for `channel`, with or without a capability.
pub fn arb_open(channel: u64) -> impl Strategy<Value = Open> {
    (
        "[a-z/]{0,16}",
        arb_bytes(40),
        proptest::option::of(proptest::array::uniform32(any::<u8>())),
    )
        .prop_map(move |(protocol, discovery_key, capability)| Open {
            channel,
            protocol,
            discovery_key,
            capability: capability.map(|c| c.to_vec()),
        })
}

/// A valid frame as a peer sends it: one message, an open, a close, or a batch (some
/// switching channel) on channels 1 to 3.
pub fn arb_valid_frame() -> BoxedStrategy<Vec<u8>> {
    let channel = 1u64..=3;
    prop_oneof![
        4 => (channel.clone(), arb_message()).prop_map(|(c, m)| single(c, &m)),
        1 => channel.clone().prop_flat_map(arb_open).prop_map(|o| open_frame(&o)),
        1 => channel.clone().prop_map(close_frame),
        3 => proptest::collection::vec((channel, arb_message()), 1..6).prop_map(|m| batch(&m)),
    ]
    .boxed()
}

/// How a valid frame is damaged.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Overwrite from this position (mod len) with a uint of this value: a length or
    /// count the frame cannot back, when it lands on one.
    Uint(usize, u64),
    /// Cut the frame here (mod len).
    Truncate(usize),
    /// Replace the byte here (mod len).
    Byte(usize, u8),
    /// Insert these bytes here (mod len + 1).
    Insert(usize, Vec<u8>),
}

pub fn arb_mutation() -> BoxedStrategy<Mutation> {
    let huge = prop_oneof![
        Just(1u64 << 40),
        Just(u64::MAX),
        Just(u64::from(u32::MAX)),
        Just(0x1_0000),
        any::<u64>(),
        0u64..600,
    ];
    prop_oneof![
        4 => (any::<usize>(), huge).prop_map(|(at, n)| Mutation::Uint(at, n)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::Byte(at, b)),
        1 => (any::<usize>(), arb_bytes(10)).prop_map(|(at, b)| Mutation::Insert(at, b)),
    ]
    .boxed()
}

impl Mutation {
    pub fn apply(&self, frame: &mut Vec<u8>) {
        if frame.is_empty() {
            return;
        }
        let len = frame.len();
        match self {
            Mutation::Uint(at, n) => {
                let at = at % len;
                let mut bytes = Vec::new();
                write_uint(&mut bytes, *n);
                let end = (at + bytes.len()).min(len);
                frame.splice(at..end, bytes);
            }
            Mutation::Truncate(at) => frame.truncate(at % len),
            Mutation::Byte(at, b) => frame[at % len] = *b,
            Mutation::Insert(at, bytes) => {
                let at = at % (len + 1);
                frame.splice(at..at, bytes.iter().copied());
            }
        }
    }
}

/// A valid frame with one to three mutations.
pub fn arb_mutated_frame() -> BoxedStrategy<Vec<u8>> {
    (
        arb_valid_frame(),
        proptest::collection::vec(arb_mutation(), 1..4),
    )
        .prop_map(|(mut frame, mutations)| {
            for m in &mutations {
                m.apply(&mut frame);
            }
            frame
        })
        .boxed()
}

/// Arbitrary bytes, biased to look like frames (a small channel id first, then a type).
pub fn arb_raw_frame() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        arb_bytes(48),
        (0u8..4, 0u8..12, arb_bytes(48)).prop_map(|(c, t, rest)| [vec![c, t], rest].concat()),
        (0u8..4, arb_bytes(48)).prop_map(|(t, rest)| [vec![0, t], rest].concat()),
    ]
    .boxed()
}

/// A declared length or count far past any frame, or just past this one.
fn arb_hostile_len() -> BoxedStrategy<u64> {
    prop_oneof![
        Just(1u64 << 40),
        Just(u64::MAX),
        Just(u64::from(u32::MAX)),
        Just(1 << 30),
        0x1_0000u64..=u64::MAX,
        1u64..64,
    ]
    .boxed()
}

/// A message whose one vector, buffer or string declares a hostile length, the fields
/// before it valid and random, and a few random bytes after it (type included).
pub fn arb_hostile_message() -> BoxedStrategy<Vec<u8>> {
    // (prefix written by `field`, then the hostile length, then `tail`)
    let field = 0usize..11;
    (
        field,
        arb_uint(),
        arb_uint(),
        arb_hostile_len(),
        arb_bytes(40),
    )
        .prop_map(|(field, a, b, n, tail)| {
            let data = |flags: u8| Writer::default().uint(3).byte(flags).uint(a).uint(b);
            let w = match field {
                0 => Writer::default().uint(7).uint(a), // Bitfield words
                1 => data(1).uint(a),                   // block value
                2 => data(1).uint(a).uint(0),           // block nodes
                3 => data(2).uint(b),                   // hash nodes
                4 => data(4).uint(b),                   // seek nodes
                5 => data(8).uint(a).uint(b),           // upgrade nodes
                6 => data(8).uint(a).uint(b).uint(0),   // upgrade additional nodes
                7 => data(8).uint(a).uint(b).uint(0).uint(0), // upgrade signature
                8 => Writer::default().uint(9),         // Extension name
                9 => Writer::default().uint(9).uint(1).byte(b'x'), // Extension message
                _ => data(9).uint(a).uint(0).uint(0).uint(b), // block and upgrade
            };
            w.uint(n).bytes(&tail).0
        })
        .boxed()
}

/// Frames carrying a hostile message: alone, behind valid messages in a batch, or an
/// `Open` whose protocol or discovery key declares a hostile length.
pub fn arb_hostile_frame() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        3 => (1u64..=3, arb_hostile_message())
            .prop_map(|(c, m)| Writer::default().uint(c).bytes(&m).0),
        3 => (1u64..=3, proptest::collection::vec(arb_message(), 0..3), arb_hostile_message())
            .prop_map(|(c, valid, m)| {
                let mut w = Writer(vec![0, 0]).uint(c);
                for v in &valid {
                    let bytes = encode(v);
                    w = w.uint(bytes.len() as u64).bytes(&bytes);
                }
                w.uint(m.len() as u64).bytes(&m).0
            }),
        1 => (1u64..=3, any::<bool>(), arb_hostile_len(), arb_bytes(40)).prop_map(
            |(c, protocol, n, tail)| {
                let w = Writer(vec![0, 1]).uint(c);
                let w = if protocol { w } else { w.uint(0) };
                w.uint(n).bytes(&tail).0
            }
        ),
        1 => (1u64..=3, arb_hostile_len(), arb_bytes(40))
            .prop_map(|(c, n, tail)| Writer(vec![0, 0]).uint(c).uint(n).bytes(&tail).0),
    ]
    .boxed()
}

/// Any frame a fuzzer sends: valid, mutated, hostile or raw.
pub fn arb_frame() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        3 => arb_valid_frame(),
        4 => arb_mutated_frame(),
        2 => arb_hostile_frame(),
        2 => arb_raw_frame(),
    ]
    .boxed()
}

/// Every vector the crate reserves while decoding `message`, with the fewest bytes one
/// element takes on the wire.
fn reserved(message: &Message) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    match message {
        Message::Bitfield(b) => out.push((b.bitfield.capacity(), 4)),
        Message::Data(d) => {
            if let Some(b) = &d.block {
                out.extend([(b.nodes.capacity(), 34), (b.value.capacity(), 1)]);
            }
            if let Some(h) = &d.hash {
                out.push((h.nodes.capacity(), 34));
            }
            if let Some(s) = &d.seek {
                out.push((s.nodes.capacity(), 34));
            }
            if let Some(u) = &d.upgrade {
                out.extend([
                    (u.nodes.capacity(), 34),
                    (u.additional_nodes.capacity(), 34),
                    (u.signature.capacity(), 1),
                ]);
            }
        }
        Message::Extension(e) => out.extend([(e.name.capacity(), 1), (e.message.capacity(), 1)]),
        _ => {}
    }
    out
}

/// Decodes an accepted message with the crate's own decoder: it must take exactly the
/// bytes the check took, and reserve no more elements than those bytes can hold.
pub fn decode_as_checked(bytes: &[u8]) -> Message {
    let (message, rest) =
        <Message as CompactEncoding>::decode(bytes).expect("the crate decodes an accepted message");
    assert!(
        rest.is_empty(),
        "the crate read {} of {} bytes",
        bytes.len() - rest.len(),
        bytes.len()
    );
    for (capacity, min_len) in reserved(&message) {
        assert!(
            capacity.saturating_mul(min_len) <= bytes.len(),
            "{capacity} elements reserved for a {}-byte message",
            bytes.len()
        );
    }
    message
}

/// Writes hostile frames field by field.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn uint(mut self, n: u64) -> Self {
        write_uint(&mut self.0, n);
        self
    }
    pub fn byte(mut self, b: u8) -> Self {
        self.0.push(b);
        self
    }
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
}
