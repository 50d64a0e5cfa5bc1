#!/usr/bin/env bash
# System packages the tests need and cargo can't provide: Chromium for the web
# page's end-to-end test (tests/web.rs), mosquitto and openssl for the MQTT
# bridge's tests.
# Idempotent: installs only what is missing. Run as root (CI) or with sudo.
set -euo pipefail

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
{ command -v mosquitto || [ -x /usr/sbin/mosquitto ]; } >/dev/null 2>&1 || need+=(mosquitto)
# Test certificates for the broker over TLS (tests/mqtt_broker.rs).
command -v openssl >/dev/null 2>&1 || need+=(openssl)
[ ${#need[@]} -eq 0 ] && exit 0

sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${need[@]}"
