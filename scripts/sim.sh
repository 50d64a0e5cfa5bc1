#!/usr/bin/env bash
# Long run of the replication-session simulator (src/replicate/sim.rs).
#
#   scripts/sim.sh                 1,000,000 seeds from seed 0, on every core
#   SIM_SEEDS=50000 SIM_FIRST=7000000 scripts/sim.sh
#   SIM_SEED=1234 SIM_TRACE=1 scripts/sim.sh    one seed, with its trace
#
# It prints the seeds run, the time per 1,000 seeds and what the sessions did;
# a failure prints its seed and the command that reruns it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
export SIM_SEEDS="${SIM_SEEDS:-1000000}"
export SIM_FIRST="${SIM_FIRST:-0}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
exec cargo test --release --lib simulated_sessions -- --nocapture
