#!/usr/bin/env bash
# Fuzzes the inbound frame path (src/replicate/transport_fuzz.rs) for longer than CI does:
# arbitrary, valid, mutated and hostile frames through the frame check into
# hypercore-protocol's decoder, in-process and over real Noise sessions.
#
#   scripts/fuzz-frames.sh                  # 600 s per fuzz test (two tests, one after the other)
#   FUZZ_SECONDS=3600 scripts/fuzz-frames.sh
#   FUZZ_SEED=1234 scripts/fuzz-frames.sh   # replay the run a failure printed
#
# Each test prints the inputs it ran. A failure prints the shrunk input and its seed; an
# allocation the check let through would abort the test binary (SIGABRT) instead.
set -euo pipefail
cd "$(dirname "$0")/.."
export FUZZ_SECONDS="${FUZZ_SECONDS:-600}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
exec cargo test --release --lib replicate::transport::tests::fuzz -- --nocapture --test-threads=1
