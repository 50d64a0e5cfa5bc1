#!/usr/bin/env bash
# Crash figures: kill -9 `write`, `sync` (the receiver) and `serve` at random
# moments, CRASH_RUNS times each (default 100), on stores holding a feed below
# and one well above 32,768 blocks (one bitfield page), and count what went wrong:
#
#   acked lost    messages `write` printed an address for (it prints one only once
#                 the message is appended) that the store no longer holds
#   unopenable    stores that fail to open after the kill (`feeds` fails or warns
#                 of a damaged feed)
#   verify fails  `verify` failing after the kill, or after the next sync
#   never refetched  blocks a receiver still lacks after the next (complete) sync
#
# Every count should be 0. Usage: scripts/crash-loop.sh [write|sync|serve ...]
# Env: CRASH_RUNS (default 100), CRASH_BIG (blocks of the long feed, default 40000),
# CRASH_SMALL (default 1000), CRASH_SEED (for $RANDOM), KEEP=1 keeps the work dir,
# CRASH_BIN (another multifeed binary to test, e.g. an older build).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${CRASH_RUNS:-100}
BIG=${CRASH_BIG:-40000}
SMALL=${CRASH_SMALL:-1000}
RANDOM=${CRASH_SEED:-$$}
COMMANDS=("$@")
[ ${#COMMANDS[@]} -eq 0 ] && COMMANDS=(write sync serve)

cargo build --release --quiet --bin multifeed --example long_topic
BIN=${CRASH_BIN:-$PWD/target/release/multifeed}
FILL=$PWD/target/release/examples/long_topic
WORK=$(mktemp -d /tmp/crash-loop.XXXXXX)
CHILDREN=()
cleanup() {
  for pid in "${CHILDREN[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  [ "${KEEP:-0}" = 1 ] && echo "work dir kept: $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT
mf() { "$BIN" --dir "$@"; }

# A source store: topic "big" (BIG blocks, one message each) and "small".
mf "$WORK/source" init >"$WORK/key" 2>/dev/null
KEY=$(cat "$WORK/key")
"$FILL" "$WORK/source" "$KEY" big "$BIG" >/dev/null
"$FILL" "$WORK/source" "$KEY" small "$SMALL" >/dev/null

# Random milliseconds in [lo, hi).
random_ms() { echo $(($1 + (RANDOM * 32768 + RANDOM) % ($2 - $1))); }
pause_ms() { sleep "$(printf '0.%03d' "$1")"; }
# `pause_ms` takes < 1000: longer pauses in steps.
wait_ms() { local ms=$1; while [ "$ms" -ge 1000 ]; do sleep 1; ms=$((ms - 1000)); done; pause_ms "$ms"; }

# Checks a store after a kill: opens (`feeds`), verifies. Adds to the counts.
UNOPENABLE=0 VERIFY_FAILS=0 LOST=0 ACKED=0 NOT_REFETCHED=0
check_store() {
  local dir=$1 what=$2
  if ! mf "$dir" feeds >/dev/null 2>"$WORK/feeds.err" || grep -q "damaged member feed" "$WORK/feeds.err"; then
    UNOPENABLE=$((UNOPENABLE + 1))
    echo "  $what: store does not open cleanly: $(head -c 300 "$WORK/feeds.err")"
  fi
  if ! mf "$dir" verify >"$WORK/verify.out" 2>&1; then
    VERIFY_FAILS=$((VERIFY_FAILS + 1))
    echo "  $what: verify failed: $(grep -v '^ok' "$WORK/verify.out" | head -c 400)"
  fi
}

# Acked messages (the first `count` lines run-prefix-1.. fed to write) missing from
# topic `topic` of store `dir`.
count_lost() {
  local dir=$1 topic=$2 prefix=$3 count=$4
  [ "$count" -eq 0 ] && { echo 0; return; }
  mf "$dir" --json read "$topic" 2>/dev/null \
    | jq -r 'select(.payload != null) | .payload' \
    | awk -v p="$prefix-" -v n="$count" '
        index($0, p) == 1 { i = substr($0, length(p) + 1) + 0; if (i >= 1 && i <= n) seen[i] = 1 }
        END { c = 0; for (k in seen) c++; print n - c }'
}

# Blocks the receiver lacks compared with the source, over all feeds.
missing_blocks() {
  local source=$1 receiver=$2
  join -a1 -e0 -o 1.2,2.2 \
    <(mf "$source" --json feeds | jq -r '"\(.key) \(.length)"' | sort) \
    <(mf "$receiver" --json feeds | jq -r '"\(.key) \(.held)"' | sort) \
    | awk '{ d = $1 - $2; if (d > 0) s += d } END { print s + 0 }'
}

# A node on `dir`; sets NODE_PID and NODE_ADDR.
start_serve() {
  local dir=$1 log=$2
  # Removed here, not only truncated by the child's redirection: the child may
  # truncate after the first look below, which then read the address of the node
  # killed before (serve runs 50 and 40 of two 100-run loops: "Connection refused").
  rm -f "$log"
  "$BIN" --dir "$dir" serve --listen 127.0.0.1:0 >"$log" 2>&1 &
  NODE_PID=$!
  CHILDREN+=("$NODE_PID")
  for _ in $(seq 1 200); do
    NODE_ADDR=$(sed -n 's/^listening on //p' "$log" 2>/dev/null)
    [ -n "$NODE_ADDR" ] && return 0
    sleep 0.05
  done
  echo "serve on $dir did not start: $(cat "$log")" >&2
  exit 1
}

# Input for `write`: lines prefix-1, prefix-2, ... in bursts (several blocks of
# many messages, and single messages, as a sensor's lines arrive).
feed_lines() {
  local prefix=$1
  awk -v p="$prefix" 'BEGIN { n = 0; srand(); while (1) { k = int(rand() * 50) + 1;
      for (j = 0; j < k; j++) printf "%s-%d\n", p, ++n; fflush(); system("sleep 0.00" int(rand() * 9 + 1)) } }'
}

run_write() {
  local store=$WORK/writer
  rm -rf "$store" "$store.key"
  cp -a "$WORK/source" "$store"
  cp "$WORK/source.key" "$store.key"
  for i in $(seq 1 "$RUNS"); do
    local topic=big
    [ $((i % 2)) -eq 0 ] && topic=small
    local out=$WORK/write.out
    # Not through `mf`: $! must be the multifeed process itself.
    feed_lines "w$i" | "$BIN" --dir "$store" write "$topic" >"$out" 2>"$WORK/write.err" &
    local pid=$!
    wait_ms "$(random_ms 30 1500)"
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    local acked
    acked=$(grep -c / "$out" || true)
    ACKED=$((ACKED + acked))
    check_store "$store" "write run $i"
    local lost
    lost=$(count_lost "$store" "$topic" "w$i" "$acked")
    LOST=$((LOST + lost))
    [ "$lost" -ne 0 ] && echo "  write run $i: $lost of $acked acked messages lost"
  done
  echo "write: runs $RUNS, acked $ACKED, acked lost $LOST, unopenable $UNOPENABLE, verify failures $VERIFY_FAILS"
}

run_sync() {
  start_serve "$WORK/source" "$WORK/source-serve.log"
  local source_pid=$NODE_PID source_addr=$NODE_ADDR receiver=$WORK/receiver
  # How long a whole sync takes, to kill within it.
  rm -rf "$receiver" "$receiver.key"
  mf "$receiver" join "$KEY" >/dev/null
  local t0 t1 full_ms
  t0=$(date +%s%N)
  mf "$receiver" sync "$source_addr" >/dev/null 2>&1
  t1=$(date +%s%N)
  full_ms=$(((t1 - t0) / 1000000))
  echo "sync: a whole sync of $((BIG + SMALL)) blocks takes $full_ms ms; killing within it"
  for i in $(seq 1 "$RUNS"); do
    rm -rf "$receiver" "$receiver.key"
    mf "$receiver" join "$KEY" >/dev/null
    "$BIN" --dir "$receiver" sync "$source_addr" >/dev/null 2>&1 &
    local pid=$!
    wait_ms "$(random_ms 10 "$((full_ms + 10))")"
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    check_store "$receiver" "sync run $i (after the kill)"
    if ! mf "$receiver" sync "$source_addr" >"$WORK/sync.out" 2>&1; then
      echo "  sync run $i: the next sync failed: $(tail -c 300 "$WORK/sync.out")"
    fi
    local missing
    missing=$(missing_blocks "$WORK/source" "$receiver")
    NOT_REFETCHED=$((NOT_REFETCHED + missing))
    [ "$missing" -ne 0 ] && echo "  sync run $i: $missing blocks never refetched"
    check_store "$receiver" "sync run $i (after the next sync)"
  done
  kill "$source_pid" 2>/dev/null || true
  wait "$source_pid" 2>/dev/null || true
  echo "sync: runs $RUNS, unopenable $UNOPENABLE, verify failures $VERIFY_FAILS, blocks never refetched $NOT_REFETCHED"
}

run_serve() {
  local store=$WORK/node receiver=$WORK/node-receiver
  rm -rf "$store" "$store.key"
  cp -a "$WORK/source" "$store"
  cp "$WORK/source.key" "$store.key"
  for i in $(seq 1 "$RUNS"); do
    local topic=big
    [ $((i % 2)) -eq 0 ] && topic=small
    start_serve "$store" "$WORK/node-serve.log"
    local node_pid=$NODE_PID addr=$NODE_ADDR
    # While the node appends what `write` sends it and serves a receiver.
    rm -rf "$receiver" "$receiver.key"
    mf "$receiver" join "$KEY" >/dev/null
    "$BIN" --dir "$receiver" sync "$addr" >/dev/null 2>&1 &
    local sync_pid=$!
    feed_lines "s$i" | "$BIN" --dir "$store" write "$topic" >"$WORK/node-write.out" 2>"$WORK/node-write.err" &
    local write_pid=$!
    wait_ms "$(random_ms 30 2000)"
    kill -9 "$node_pid" 2>/dev/null || true
    wait "$node_pid" 2>/dev/null || true
    # The clients end on the lost connection.
    kill -9 "$sync_pid" 2>/dev/null || true
    wait "$sync_pid" 2>/dev/null || true
    wait "$write_pid" 2>/dev/null || true
    local acked lost
    acked=$(grep -c / "$WORK/node-write.out" || true)
    ACKED=$((ACKED + acked))
    check_store "$store" "serve run $i"
    lost=$(count_lost "$store" "$topic" "s$i" "$acked")
    LOST=$((LOST + lost))
    [ "$lost" -ne 0 ] && echo "  serve run $i: $lost of $acked acked messages lost"
    # The receiver, killed mid-download with it, catches up from the restarted node.
    check_store "$receiver" "serve run $i (its receiver)"
    start_serve "$store" "$WORK/node-serve.log"
    mf "$receiver" sync "$NODE_ADDR" >"$WORK/node-sync.out" 2>&1 \
      || echo "  serve run $i: the next sync failed: $(tail -c 400 "$WORK/node-sync.out")"
    kill "$NODE_PID" 2>/dev/null || true
    wait "$NODE_PID" 2>/dev/null || true
    local missing
    missing=$(missing_blocks "$store" "$receiver")
    NOT_REFETCHED=$((NOT_REFETCHED + missing))
    [ "$missing" -ne 0 ] && echo "  serve run $i: $missing blocks never refetched"
    check_store "$receiver" "serve run $i (receiver after the next sync)"
  done
  echo "serve: runs $RUNS, acked $ACKED, acked lost $LOST, unopenable $UNOPENABLE, verify failures $VERIFY_FAILS, blocks never refetched $NOT_REFETCHED"
}

echo "crash loop: $RUNS kills per command; feeds of $BIG and $SMALL blocks; work dir $WORK"
for command in "${COMMANDS[@]}"; do
  UNOPENABLE=0 VERIFY_FAILS=0 LOST=0 ACKED=0 NOT_REFETCHED=0
  start=$(date +%s)
  "run_$command"
  echo "  ($command took $(($(date +%s) - start)) s)"
done
