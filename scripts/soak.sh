#!/usr/bin/env bash
# Soaks the gateway node under chaos (tests/chaos.rs) for longer than CI does: 3-5
# `multifeed serve` processes on loopback in a chain, then in a star, publishing over
# HTTP every 10 ms per node while a random node is killed with SIGKILL and restarted;
# then every node must hold every acknowledged message exactly once, `verify` clean.
#
#   scripts/soak.sh                      # 300 s per topology: 10 minutes of chaos
#   SOAK_SECONDS=60 scripts/soak.sh      # per topology
#   CHAOS_SEED=1234 scripts/soak.sh      # replay the choices of a printed seed
#
# Prints each run's figures and the totals: nodes, messages acknowledged, kills,
# lost, duplicated, convergence time after the writes stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
export CHAOS_SECS="${SOAK_SECONDS:-300}"
cargo build --release --bin multifeed
test_bin=$(cargo test --release --test chaos --no-run --message-format=json 2>/dev/null |
  sed -n 's/.*"executable":"\([^"]*chaos[^"]*\)".*/\1/p' | tail -1)
# Copies, so a rebuild during the soak cannot swap the binaries under it.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp target/release/multifeed "$work/multifeed"
cp "$test_bin" "$work/chaos"
export MULTIFEED_TEST_BIN="$work/multifeed"
log="$work/log"
started=$(date +%s)
status=0
"$work/chaos" --nocapture --test-threads=1 2>&1 | tee "$log" || status=$?
echo "soak: $(( $(date +%s) - started )) s in all"
grep 'figures:' "$log" | awk '
  { for (i = 1; i < NF; i++) v[$i] = $(i + 1);
    nodes += v["nodes"]; acked += v["acked"]; unacked += v["unacked"]; kills += v["kills"];
    lost += v["lost"]; dup += v["duplicated"]; if (v["convergence_ms"] > conv) conv = v["convergence_ms"]; runs++ }
  END { printf "soak totals: runs %d, nodes %d, acknowledged %d, unacknowledged %d, kills %d, lost %d, duplicated %d, slowest convergence %d ms\n",
        runs, nodes, acked, unacked, kills, lost, dup, conv }'
exit "$status"
