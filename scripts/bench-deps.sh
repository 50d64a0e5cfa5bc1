#!/usr/bin/env bash
# What the benchmarks compare against and cargo can't provide: nats-server (its
# MQTT listener with JetStream is the anchor of benches/mqtt.rs). Idempotent.
set -euo pipefail
command -v nats-server >/dev/null 2>&1 && exit 0
sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q --no-install-recommends nats-server
