#!/usr/bin/env bash
# Idle connections beyond one process's open-file limit: one store-worker and EDGES edges on
# one host (the deployment scales edges independently), one `wharf-bench idle` per edge, all
# connected at once when they measure. Prints each edge's figures and the total.
#   EDGES=3 PER_EDGE=16667 bench/idle-many-edges.sh
# IDLE_FLAGS="--subscribe" (and "--persistent") for clients subscribed to their own topic.
set -euo pipefail
cd "$(dirname "$0")/.."
EDGES="${EDGES:-3}"
PER_EDGE="${PER_EDGE:-16667}"
ulimit -n "$(ulimit -Hn)"
cargo build --release --locked -p wharf-bench -p wharf-edge -p wharf-store-worker
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
target/release/store-worker --socket "$work/w.sock" --data-dir "$work/data" --host bench 2>"$work/worker.log" &
pids+=($!)
sleep 0.5
edge_pids=()
for e in $(seq "$EDGES"); do
  TOKIO_WORKER_THREADS=1 target/release/edge --listen "127.0.0.1:$((18860 + e))" \
    --worker-socket "$work/w.sock" --host bench 2>"$work/edge$e.log" &
  pids+=($!); edge_pids+=($!)
done
sleep 1
generators=()
for e in $(seq "$EDGES"); do
  # shellcheck disable=SC2086 # IDLE_FLAGS is a list of flags
  target/release/wharf-bench idle --broker "127.0.0.1:$((18860 + e))" --label "wharf-edge$e" \
    --connections "$PER_EDGE" --id-prefix "idle$e" --hold-secs 15 \
    --pids "${edge_pids[$((e - 1))]}" ${IDLE_FLAGS:-} >"$work/idle$e.json" &
  generators+=($!)
done
# The most connections the edges held at once (server side of each connection).
peak=0
while kill -0 "${generators[@]}" 2>/dev/null; do
  n=$(ss -Htn state established "( sport >= :18861 and sport <= :$((18860 + EDGES)) )" | wc -l)
  [ "$n" -gt "$peak" ] && peak=$n
  sleep 1
done
wait "${generators[@]}"
echo "most connections established at once: $peak"
cat "$work"/idle*.json
python3 - "$work"/idle*.json <<'PY'
import json, sys
runs = [json.load(open(f)) for f in sys.argv[1:]]
conns = sum(r["connections"] for r in runs)
grown = sum(r["rss_after_kib"] - r["rss_before_kib"] for r in runs) * 1024
total = sum(r["rss_after_kib"] for r in runs) * 1024
print(json.dumps({"scenario": "idle-many-edges", "edges": len(runs), "connections": conns,
                  "failed": sum(r["failed"] for r in runs),
                  "edge_rss_total_kib": total // 1024,
                  "bytes_per_connection": round(grown / conns) if conns else 0,
                  "edge_rss_total_per_connection": round(total / conns) if conns else 0}))
PY
