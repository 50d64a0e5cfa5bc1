#!/usr/bin/env bash
# Fuzzes every decoder of peer or user bytes for longer than CI does: frames (in-process
# and over real Noise sessions), feed-exchange messages, message blocks, index records,
# cursor text, feed info files, typed keys and MQTT packets. Each test feeds arbitrary
# bytes, valid encodings and mutated ones (flipped, truncated, huge lengths, inserted and
# repeated bytes) and holds the decoder to its allocation bound (src/fuzz_support.rs).
#
#   scripts/fuzz.sh                          # every fuzz test, 600 s each, one after the other
#   scripts/fuzz.sh exchange                 # only the tests whose name contains "exchange"
#   FUZZ_SECONDS=3600 scripts/fuzz.sh cursor
#   FUZZ_SEED=1234 scripts/fuzz.sh cursor    # replay the run a failure printed
#
# Filters: frames, exchange, message_blocks, index_records, cursor, feed_info,
# typed_keys, mqtt (or any part of a test's name). Each test prints `inputs run: N`.
# A failure prints the shrunk input and its seed; an allocation the frame check let
# through would abort the test binary (SIGABRT) instead.
set -euo pipefail
cd "$(dirname "$0")/.."
export FUZZ_SECONDS="${FUZZ_SECONDS:-600}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
filter="${1:-}"
exec cargo test --release --lib --bin multifeed "fuzz_${filter}" -- --nocapture --test-threads=1
