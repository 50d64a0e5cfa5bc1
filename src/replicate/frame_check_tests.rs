use hypercore_protocol::Message;
use hypercore_protocol::schema::{Extension, Open};
use proptest::prelude::*;

use super::{CheckedFrame, FrameFault, Unit, batches, check_frame};
use crate::replicate::frame_samples::*;

const MAX: u64 = 65_536;

fn accepted(frame: &[u8]) -> CheckedFrame<'_> {
    check_frame(frame, MAX).unwrap_or_else(|e| panic!("refused {frame:02x?}: {e}"))
}

fn refused(frame: &[u8]) -> FrameFault {
    match check_frame(frame, MAX) {
        Err(fault) => fault,
        Ok(checked) => panic!("accepted {frame:02x?}: {checked:?}"),
    }
}

/// The 12-byte frame of issue 11: channel 1, Bitfield, start 0, 2^40 words. The crate
/// would reserve 4 TiB before reading a word.
#[test]
fn the_twelve_byte_bitfield_is_refused_before_any_allocation() {
    let frame = [1, 7, 0, 0xff, 0, 0, 0, 0, 0, 1, 0, 0];
    assert_eq!(frame.len(), 12);
    assert_eq!(
        refused(&frame),
        FrameFault::CountPastEnd {
            field: "Bitfield words",
            declared: 1 << 40,
            min_len: 4,
            available: 0,
        }
    );
}

#[test]
fn every_message_type_from_the_crates_encoder_is_accepted_exactly() {
    for message in sample_messages() {
        let bytes = encode(&message);
        for channel in [1, 0xfc, 0xfd, 65_536] {
            let frame = single(channel, &message);
            let checked = accepted(&frame);
            assert!(checked.exact, "{message:?}");
            assert_eq!(
                checked.unit,
                Some(Unit::Single {
                    channel,
                    message: &bytes
                })
            );
        }
    }
    // All of them in one batch on one channel, as the crate batches queued messages.
    let all: Vec<(u64, Message)> = sample_messages().into_iter().map(|m| (7, m)).collect();
    let frame = batch(&all);
    let checked = accepted(&frame);
    assert!(checked.exact);
    let Some(Unit::Batch(entries)) = checked.unit else {
        panic!("not a batch")
    };
    let expected: Vec<Vec<u8>> = all.iter().map(|(_, m)| encode(m)).collect();
    assert_eq!(entries.len(), expected.len());
    for ((channel, got), want) in entries.iter().zip(&expected) {
        assert_eq!((*channel, *got), (7, want.as_slice()));
    }
}

#[test]
fn open_and_close_from_the_crates_encoder_are_accepted() {
    for capability in [None, Some(vec![9; 32])] {
        let open = Open {
            channel: 3,
            protocol: "hypercore/alpha".into(),
            discovery_key: vec![1; 32],
            capability,
        };
        let frame = open_frame(&open);
        let checked = accepted(&frame);
        assert!(checked.exact);
        assert_eq!(
            checked.unit,
            Some(Unit::Open {
                body: &frame[2..],
                discovery_key: &open.discovery_key,
                capability: open.capability.as_deref(),
            })
        );
    }
    let frame = close_frame(3);
    assert_eq!(accepted(&frame).unit, Some(Unit::Close(&[3])));
    assert_eq!(accepted(&[]).unit, None);
}

/// Each vector and buffer a message declares, set to a count or length the frame cannot
/// hold: refused, naming the field.
#[test]
fn hostile_counts_and_lengths_are_refused_for_every_field() {
    let huge = [1u64 << 40, u64::MAX, u64::from(u32::MAX), 1 << 20];
    // Data, flags, request 0, fork 0.
    let data = |flags| {
        Writer::default()
            .uint(1)
            .uint(3)
            .byte(flags)
            .uint(0)
            .uint(0)
    };
    for n in huge {
        let cases: Vec<(&str, Writer)> = vec![
            (
                "Bitfield words",
                Writer::default().uint(1).uint(7).uint(0).uint(n),
            ),
            ("Data block value", data(1).uint(0).uint(n)),
            ("Data block nodes", data(1).uint(0).uint(0).uint(n)),
            ("Data hash nodes", data(2).uint(0).uint(n)),
            ("Data seek nodes", data(4).uint(0).uint(n)),
            ("Data upgrade nodes", data(8).uint(0).uint(0).uint(n)),
            (
                "Data upgrade additional nodes",
                data(8).uint(0).uint(0).uint(0).uint(n),
            ),
            (
                "Data upgrade signature",
                data(8).uint(0).uint(0).uint(0).uint(0).uint(n),
            ),
            ("Extension name", Writer::default().uint(1).uint(9).uint(n)),
            (
                "Extension message",
                Writer::default()
                    .uint(1)
                    .uint(9)
                    .uint(1)
                    .bytes(b"x")
                    .uint(n),
            ),
            ("Open protocol", Writer(vec![0, 1]).uint(1).uint(n)),
            (
                "Open discovery key",
                Writer(vec![0, 1]).uint(1).uint(0).uint(n),
            ),
            // A batch entry longer than the frame.
            ("batch entry", Writer(vec![0, 0]).uint(1).uint(n.max(1))),
        ];
        for (field, frame) in cases {
            // Padding: the check compares with what is really there, not with zero.
            let frame = frame.bytes(&[0xee; 40]).0;
            match refused(&frame) {
                FrameFault::CountPastEnd {
                    field: f, declared, ..
                }
                | FrameFault::LengthPastEnd {
                    field: f, declared, ..
                } => assert_eq!((f, declared), (field, n.max(1)), "{frame:02x?}"),
                other => panic!("{field}: {other:?}"),
            }
        }
    }
}

/// The same fields inside a batch, behind a valid first message.
#[test]
fn hostile_counts_inside_a_batch_are_refused() {
    let good = encode(&sample_messages()[0]);
    let bad = Writer::default().uint(7).uint(0).uint(1 << 40).0;
    let frame = Writer(vec![0, 0])
        .uint(1)
        .uint(good.len() as u64)
        .bytes(&good)
        .uint(bad.len() as u64)
        .bytes(&bad)
        .0;
    assert!(matches!(
        refused(&frame),
        FrameFault::CountPastEnd {
            field: "Bitfield words",
            ..
        }
    ));
}

/// A count that fits the frame but whose elements do not is refused by the walk.
#[test]
fn counts_are_checked_against_element_sizes() {
    // 2 nodes declared, 68 bytes present but the first node's hash is cut short.
    let frame = Writer::default()
        .uint(1)
        .uint(3)
        .byte(2)
        .uint(0)
        .uint(0)
        .uint(0)
        .uint(2)
        .uint(0)
        .uint(0)
        .bytes(&[1; 31])
        .0;
    assert!(matches!(refused(&frame), FrameFault::CountPastEnd { .. }));
    // Exactly two minimal nodes: accepted.
    let frame = Writer::default()
        .uint(1)
        .uint(3)
        .byte(2)
        .uint(0)
        .uint(0)
        .uint(0)
        .uint(2)
        .uint(0)
        .uint(0)
        .bytes(&[1; 32])
        .uint(0)
        .uint(0)
        .bytes(&[2; 32])
        .0;
    assert!(accepted(&frame).exact);
}

#[test]
fn malformed_frames_are_refused() {
    let f = refused;
    assert_eq!(
        f(&[1]),
        FrameFault::Truncated {
            field: "message type"
        }
    );
    assert_eq!(f(&[1, 10, 0]), FrameFault::UnknownMessageType(10));
    assert_eq!(
        f(&[1, 0xfd, 0xff, 0xff]),
        FrameFault::UnknownMessageType(0xffff)
    );
    assert_eq!(f(&[0, 2, 1]), FrameFault::UnknownControl(2));
    assert_eq!(f(&[0, 9]), FrameFault::ReservedChannel); // single message on channel 0
    assert_eq!(f(&[0, 0, 0]), FrameFault::ReservedChannel); // batch on channel 0
    assert_eq!(f(&[0, 3, 0]), FrameFault::ReservedChannel);
    assert_eq!(
        f(&[0, 0, 0xfe, 1, 0, 1, 0]),
        FrameFault::ChannelIdTooLarge {
            id: 65_537,
            max: MAX
        }
    );
    assert_eq!(
        f(&[0, 1, 0xfd, 1, 0]),
        FrameFault::Truncated {
            field: "Open protocol"
        }
    );
    // A zero entry length written wide: the crate would decode what follows anyway.
    assert_eq!(
        f(&[0, 0, 1, 0xfd, 0, 0, 2, 1]),
        FrameFault::Malformed("batch entry of length zero")
    );
    // An Open with 1 to 32 bytes after the discovery key: a cut capability.
    let open = Writer(vec![0, 1]).uint(1).uint(0).uint(0).bytes(&[0; 20]).0;
    assert_eq!(
        f(&open),
        FrameFault::Truncated {
            field: "Open capability"
        }
    );
    // Names must be UTF-8, as the crate requires.
    let ext = Writer::default()
        .uint(1)
        .uint(9)
        .uint(1)
        .byte(0xff)
        .uint(0)
        .0;
    assert_eq!(
        f(&ext),
        FrameFault::InvalidUtf8 {
            field: "Extension name"
        }
    );
    // A message cut short inside its batch entry.
    let frame = Writer(vec![0, 0]).uint(1).uint(2).bytes(&[9, 5]).0;
    assert_eq!(
        f(&frame),
        FrameFault::LengthPastEnd {
            field: "Extension name",
            declared: 5,
            available: 0
        }
    );
}

/// Bytes after a message are cut off (a JS peer ignores them; the crate would parse them
/// as further messages that nobody checked).
#[test]
fn bytes_past_a_message_are_cut_off() {
    let cancel = encode(&sample_messages()[2]);
    let frame = [single(4, &sample_messages()[2]), vec![7, 0xff, 0, 0]].concat();
    let checked = accepted(&frame);
    assert!(!checked.exact);
    let unit = checked.unit.unwrap();
    assert_eq!(
        unit,
        Unit::Single {
            channel: 4,
            message: &cancel
        }
    );
    assert_eq!(
        unit.frames(usize::MAX, usize::MAX),
        vec![single(4, &sample_messages()[2])]
    );

    // Inside a batch entry: the entry is rewritten with its real length.
    let frame = Writer(vec![0, 0])
        .uint(2)
        .uint(cancel.len() as u64 + 3)
        .bytes(&cancel)
        .bytes(&[1, 2, 3])
        .0;
    let checked = accepted(&frame);
    assert!(!checked.exact);
    assert_eq!(
        checked.unit.unwrap().frames(usize::MAX, usize::MAX),
        vec![batch(&[(2, sample_messages()[2].clone())])]
    );

    // After an Open's capability, and after a Close.
    let open = Open {
        channel: 1,
        protocol: "hypercore/alpha".into(),
        discovery_key: vec![1; 32],
        capability: Some(vec![2; 32]),
    };
    let frame = [open_frame(&open), vec![5, 5]].concat();
    let checked = accepted(&frame);
    assert!(!checked.exact);
    assert_eq!(
        checked.unit.unwrap().frames(usize::MAX, usize::MAX),
        vec![open_frame(&open)]
    );
    let checked = accepted(&[0, 3, 1, 1, 9]);
    assert_eq!(
        checked.unit.unwrap().frames(usize::MAX, usize::MAX),
        vec![vec![0, 3, 1]]
    );
}

#[test]
fn batches_are_split_by_channel_size_and_count() {
    let m = |i: u8| {
        Message::Extension(Extension {
            name: String::new(),
            message: vec![i],
        })
    };
    let bytes: Vec<Vec<u8>> = (0..5).map(|i| encode(&m(i))).collect();
    let entries: Vec<(u64, &[u8])> = vec![
        (1, &bytes[0]),
        (1, &bytes[1]),
        (2, &bytes[2]),
        (2, &bytes[3]),
        (2, &bytes[4]),
    ];
    assert_eq!(
        batches(&entries, usize::MAX, usize::MAX),
        vec![
            batch(&[(1, m(0)), (1, m(1))]),
            batch(&[(2, m(2)), (2, m(3)), (2, m(4))])
        ]
    );
    assert_eq!(
        batches(&entries, usize::MAX, 2),
        vec![
            batch(&[(1, m(0)), (1, m(1))]),
            batch(&[(2, m(2)), (2, m(3))]),
            batch(&[(2, m(4))])
        ]
    );
    // Each entry is 5 bytes (length + 4), the header 3: at most one entry per 8 bytes.
    assert_eq!(batches(&entries, 8, usize::MAX).len(), 5);
    // The crate's own batch that switches channel is split the same way.
    let frame = batch(&[(1, m(0)), (1, m(1)), (2, m(2)), (2, m(3)), (2, m(4))]);
    let checked = accepted(&frame);
    assert!(!checked.exact);
    assert_eq!(
        checked.unit.unwrap().frames(usize::MAX, usize::MAX),
        batches(&entries, usize::MAX, usize::MAX)
    );
}

proptest! {
    /// The check and the crate's encoder agree on every message: each is accepted,
    /// exactly, and the crate decodes it back from the checked bytes.
    #[test]
    fn the_crates_encoding_of_any_message_is_accepted(
        message in arb_message(),
        channel in 1u64..=MAX,
    ) {
        let bytes = encode(&message);
        let frame = single(channel, &message);
        let checked = accepted(&frame);
        prop_assert!(checked.exact);
        prop_assert_eq!(checked.unit, Some(Unit::Single { channel, message: &bytes }));
        prop_assert_eq!(decode_as_checked(&bytes), message);
    }

    /// Any frame at all: the check never panics, and whatever it accepts the crate decodes
    /// exactly as checked, within the frame's bytes; rewritten frames check exactly.
    #[test]
    fn any_accepted_frame_decodes_as_checked(frame in arb_frame()) {
        if let Ok(checked) = check_frame(&frame, MAX) {
            let Some(unit) = checked.unit else { return Ok(()) };
            match &unit {
                Unit::Single { message, .. } => { decode_as_checked(message); }
                Unit::Batch(entries) => {
                    for (_, message) in entries {
                        decode_as_checked(message);
                    }
                }
                Unit::Open { .. } | Unit::Close(_) => {}
            }
            for rewritten in unit.frames(usize::MAX, usize::MAX) {
                let again = accepted(&rewritten);
                prop_assert!(again.exact, "{:02x?}", rewritten);
            }
        }
    }
}
