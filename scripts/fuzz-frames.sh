#!/usr/bin/env bash
# The frame fuzz tests only (kept for old commands): see scripts/fuzz.sh.
exec "$(dirname "$0")/fuzz.sh" frames "$@"
