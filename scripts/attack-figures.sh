#!/usr/bin/env bash
# Issue 11's figures: serve's peak memory (VmHWM) and a member's sync under each
# full-size attack (256 connections sending 4 MiB - 1 byte of a 4 MiB frame; 256
# silent connections; 10 members opening 65,000 channels each; 10 members each
# offering 3 manifests of 20,000 fresh keys), from tests/attacks.rs
# `full_size_figures`. ATTACK_ONLY=<part of a name> (e.g. "fresh keys") runs only
# the matching attacks. ATTACK_PER_ADDRESS=n puts n attacking connections on
# each source address (default 8, the per-address cap; 1: every attacking member
# from an address of its own, 127.0.0.2, 127.0.0.3, ...). ATTACK_ROUNDS=n
# (default 3) runs each attack n times against one serve: what a later round adds
# to the peak is what serve kept of the earlier ones once their connections ended.
#
#   scripts/attack-figures.sh                 this build
#   BEFORE_BIN=/path/to/old/multifeed scripts/attack-figures.sh
#                                             also an older build's serve, side by side
#   ATTACK_PER_ADDRESS=1 BEFORE_BIN=... scripts/attack-figures.sh
#                                             one address per attacker, before and after
#
# Targets: serve never aborts, < 64 MB extra peak memory per attack, the member's
# sync always succeeds.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== ${ATTACK_PER_ADDRESS:-8} attacking connection(s) per source address, ${ATTACK_ROUNDS:-3} round(s) per attack"
run() {
    cargo test --release --test attacks full_size_figures -- --ignored --nocapture --test-threads=1 2>&1 \
        | grep -E 'MiB|member sync:|panicked|test result' || true
}

if [[ -n "${BEFORE_BIN:-}" ]]; then
    echo "== before: serve from $BEFORE_BIN"
    ATTACK_SERVE_BIN="$BEFORE_BIN" run
fi
echo "== after: serve from this build"
run
