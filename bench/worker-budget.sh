#!/usr/bin/env bash
# The worker's byte budget under a QoS 0 flood 1 -> 1: three 5 s floods back to back (edge
# --max-queued 1000000, release, embedded store), then the peak RSS (VmHWM) of the worker and
# the edge. Loss by count at the subscriber (wharf-bench).
#
#   BUDGET=64MiB PAYLOAD=16384 bench/worker-budget.sh
#   BUDGET=1024GiB PAYLOAD=16384 ARENAS=8 bench/worker-budget.sh   # no budget, glibc default
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET="${BUDGET:-64MiB}" PAYLOAD="${PAYLOAD:-100}" ARENAS="${ARENAS:-2}"
cargo build --release --locked -p wharf-edge -p wharf-store-worker -p wharf-bench --bins >&2
D=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$D"' EXIT
MALLOC_ARENA_MAX="$ARENAS" target/release/store-worker --socket "$D/w.sock" --data-dir "$D/data" \
  --host flood --max-queued-bytes "$BUDGET" >"$D/worker.log" 2>&1 &
W=$!
for _ in $(seq 100); do [ -S "$D/w.sock" ] && break; sleep 0.1; done
target/release/edge --listen 127.0.0.1:18861 --worker-socket "$D/w.sock" --host flood \
  --max-queued 1000000 >"$D/edge.log" 2>&1 &
E=$!
sleep 1
for _ in 1 2 3; do
  target/release/wharf-bench load --broker 127.0.0.1:18861 --qos 0 --duration 5 \
    --payload "$PAYLOAD" --pids "$E,$W" --label "wharf-budget-$BUDGET" --scenario qos0flood
done
echo "{\"budget\":\"$BUDGET\",\"payload\":$PAYLOAD,\"malloc_arenas\":$ARENAS,\"worker_peak_kb\":$(awk '/VmHWM/{print $2}' /proc/$W/status),\"edge_peak_kb\":$(awk '/VmHWM/{print $2}' /proc/$E/status)}"
