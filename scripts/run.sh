#!/usr/bin/env bash
# Starts a working Wharf broker on this machine: store-worker with the embedded store in
# ./data, and an edge listening on 127.0.0.1:1883 (no users configured: loopback only).
# Logs go to the terminal; Ctrl-C stops the
# edge first (sessions finish, pending writes complete), then the worker.
# Extra arguments go to the edge, e.g. `./scripts/run.sh --listen 127.0.0.1:1884`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh --build
cargo build --release --locked -p wharf-edge -p wharf-store-worker
data="${WHARF_DATA_DIR:-$PWD/data}"
socket="$data/worker.sock"
mkdir -p "$data"

set -m # children in their own process groups: Ctrl-C reaches this script only
# Two malloc arenas keep freed memory from piling up under a flood (deploy/systemd).
MALLOC_ARENA_MAX="${MALLOC_ARENA_MAX:-2}" ./target/release/store-worker --socket "$socket" --data-dir "$data" \
  --metrics-listen "${WHARF_WORKER_METRICS_LISTEN:-127.0.0.1:9642}" &
worker=$!
WHARF_METRICS_LISTEN="${WHARF_METRICS_LISTEN:-127.0.0.1:9641}" \
  ./target/release/edge --worker-socket "$socket" "$@" &
edge=$!

stop() {
  # A second Ctrl-C must not cut the orderly stop short; each process bounds its own grace.
  trap '' INT TERM
  kill -TERM "$edge" 2>/dev/null || true
  wait "$edge" 2>/dev/null || true
  kill -TERM "$worker" 2>/dev/null || true
  wait "$worker" 2>/dev/null || true
}
trap stop INT TERM
# Either process ending on its own ends the broker.
wait -n "$edge" "$worker" || true
stop
