//! Test-only fuzzing on stable Rust: seeded proptest rounds for a fixed time, the
//! mutations that turn valid encodings into hostile ones, and the allocation bound
//! every decoder of peer or user bytes is held to.
//!
//! Each fuzz test runs for `FUZZ_SECONDS` (default 2) and prints `inputs run: N`;
//! `FUZZ_SEED` replays a run. `scripts/fuzz.sh` runs them for longer.

use std::cell::Cell;
use std::fmt::Debug;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestError, TestRng, TestRunner};

/// How long each fuzz test runs: `FUZZ_SECONDS`, 2 s by default (what CI runs).
pub(crate) fn fuzz_seconds() -> Duration {
    let secs = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(2.0);
    Duration::from_secs_f64(secs)
}

/// `FUZZ_SEED` to replay a run, else a random seed (printed with the results).
pub(crate) fn fuzz_seed() -> u64 {
    std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

/// Runs `case` on values of `strategy` in seeded rounds of `per_round` until the time is
/// up; a failing case is shrunk by proptest and reported with the seed to replay it.
/// Prints and returns the number of inputs run.
pub(crate) fn fuzz_for<T: Debug>(
    name: &str,
    strategy: BoxedStrategy<T>,
    per_round: u32,
    case: impl Fn(T) -> Result<(), TestCaseError>,
) -> u64 {
    let seed = fuzz_seed();
    let started = Instant::now();
    let inputs = Cell::new(0u64);
    let mut round = 0u64;
    while round == 0 || started.elapsed() < fuzz_seconds() {
        let mut rng_seed = [0u8; 32];
        rng_seed[..8].copy_from_slice(&seed.to_le_bytes());
        rng_seed[8..16].copy_from_slice(&round.to_le_bytes());
        let config = Config {
            cases: per_round,
            failure_persistence: None,
            ..Config::default()
        };
        let mut runner =
            TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &rng_seed));
        let result = runner.run(&strategy, |value| {
            inputs.set(inputs.get() + 1);
            case(value)
        });
        match result {
            Ok(()) => {}
            Err(TestError::Fail(reason, minimal)) => {
                panic!("{name}: {reason}\nminimal input: {minimal:?}\nreplay: FUZZ_SEED={seed}")
            }
            Err(e) => panic!("{name}: {e}\nreplay: FUZZ_SEED={seed}"),
        }
        round += 1;
    }
    println!(
        "{name}: inputs run: {} in {:.1?} (FUZZ_SEED={seed}); 0 panics, 0 aborts, 0 hangs",
        inputs.get(),
        started.elapsed()
    );
    inputs.get()
}

/// One edit of an encoding; positions are taken modulo its length.
#[derive(Debug, Clone)]
pub(crate) enum Mutation {
    /// XOR a byte with a non-zero mask.
    Flip(usize, u8),
    /// Set a byte to a value that often means something in a varint or a tag.
    Set(usize, u8),
    /// Keep only the first bytes.
    Truncate(usize),
    /// Insert bytes at a position.
    Insert(usize, Vec<u8>),
    /// Remove up to a few bytes.
    Delete(usize, u8),
    /// Replace the byte at a position with a huge varint (a declared length or count).
    HugeVarint(usize, u64),
    /// Repeat a slice in place (repeated fields, which protobuf merges).
    Repeat(usize, u8, u8),
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    let interesting = prop_oneof![
        Just(0x00u8),
        Just(0x01),
        Just(0x02),
        Just(0x0a),
        Just(0x12),
        Just(0x1a),
        Just(0x7f),
        Just(0x80),
        Just(0xff),
        any::<u8>(),
    ];
    let huge = prop_oneof![
        Just(u64::MAX),
        Just(u64::from(u32::MAX)),
        Just(1u64 << 31),
        Just(1u64 << 22),
        0u64..1 << 16,
    ];
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(at, mask)| Mutation::Flip(at, mask)),
        (any::<usize>(), interesting).prop_map(|(at, b)| Mutation::Set(at, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(at, bytes)| Mutation::Insert(at, bytes)),
        (any::<usize>(), 1u8..8).prop_map(|(at, n)| Mutation::Delete(at, n)),
        (any::<usize>(), huge).prop_map(|(at, v)| Mutation::HugeVarint(at, v)),
        (any::<usize>(), 1u8..32, 2u8..64)
            .prop_map(|(at, n, times)| Mutation::Repeat(at, n, times)),
    ]
}

/// Applies `mutation` to `bytes`.
pub(crate) fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
    let at = |pos: usize, len: usize| if len == 0 { 0 } else { pos % len };
    let len = bytes.len();
    match mutation {
        Mutation::Flip(pos, mask) if len > 0 => bytes[at(*pos, len)] ^= mask,
        Mutation::Set(pos, value) if len > 0 => bytes[at(*pos, len)] = *value,
        Mutation::Truncate(pos) => bytes.truncate(at(*pos, len + 1)),
        Mutation::Insert(pos, insert) => {
            let pos = at(*pos, len + 1);
            bytes.splice(pos..pos, insert.iter().copied());
        }
        Mutation::Delete(pos, n) if len > 0 => {
            let pos = at(*pos, len);
            bytes.drain(pos..(pos + usize::from(*n)).min(len));
        }
        Mutation::HugeVarint(pos, value) if len > 0 => {
            let pos = at(*pos, len);
            let mut varint = Vec::new();
            prost::encoding::encode_varint(*value, &mut varint);
            bytes.splice(pos..pos + 1, varint);
        }
        Mutation::Repeat(pos, n, times) if len > 0 => {
            let pos = at(*pos, len);
            let end = (pos + usize::from(*n)).min(len);
            let slice = bytes[pos..end].to_vec();
            let repeated = slice.repeat(usize::from(*times));
            bytes.splice(end..end, repeated);
        }
        _ => {}
    }
}

/// Inputs for a decoder: arbitrary bytes, valid encodings from `valid`, and valid
/// encodings with one to four mutations (flips, truncations, insertions, huge
/// lengths, repeated slices).
pub(crate) fn hostile_inputs(valid: BoxedStrategy<Vec<u8>>) -> BoxedStrategy<Vec<u8>> {
    let mutated = (
        valid.clone(),
        proptest::collection::vec(arb_mutation(), 1..5),
    )
        .prop_map(|(mut bytes, mutations)| {
            for mutation in &mutations {
                apply(&mut bytes, mutation);
            }
            bytes
        });
    prop_oneof![
        2 => proptest::collection::vec(any::<u8>(), 0..256),
        1 => valid,
        5 => mutated,
    ]
    .boxed()
}

/// What a hostile maximum-size input may cost: 8 times its size plus a few KiB of
/// error text, and no fixed allowance for entries, which are counted first.
pub(crate) fn within_hostile_bound(input_len: usize, peak: usize) -> bool {
    within_bound(input_len, peak, 4096)
}

/// The bound a decoder's peak allocation is held to: 8 times its input, plus
/// `fixed` for what does not grow with the input (named per decoder, from its limits).
pub(crate) fn within_bound(input_len: usize, peak: usize, fixed: usize) -> bool {
    peak <= 8 * input_len + fixed
}

/// A length-delimited protobuf field: the key byte `tag`, the length, `body`.
pub(crate) fn length_delimited(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    prost::encoding::encode_varint(body.len() as u64, &mut out);
    out.extend_from_slice(body);
    out
}
