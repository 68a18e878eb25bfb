#!/usr/bin/env bash
# Cross-host delivery latency under load: three Wharf hosts (edge + store-worker each) on one
# Rust SecantusDB (secantusd-rs; built with cargo if missing, which CI does not do). Each host
# takes RATE QoS 1 msg/s from its own publisher, whose subscriber is on the next host
# (a -> b, b -> c, c -> a), all three at once, for DURATION seconds; RUNS runs back to back
# on the same warm hosts. Appends JSON lines to bench/results/<stamp>-cluster3.jsonl and
# prints the medians.
#   bench/cluster3.sh        RUNS=5 RATE=1000 DURATION=30 FOLLOW=auto bench/cluster3.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
RUNS="${RUNS:-5}"
RATE="${RATE:-1000}"
DURATION="${DURATION:-30}"
FOLLOW="${FOLLOW:-auto}"
cargo build --release --locked -p wharf-bench -p wharf-edge -p wharf-store-worker
secantus="$(secantus_bin)"
out="bench/results/$(date -u +%Y%m%dT%H%M%SZ)-cluster3.jsonl"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

"$secantus" --host 127.0.0.1 --port 18880 --storage-path "$work/db" >"$work/secantus.log" 2>&1 &
pids+=($!)
wait_port 18880
uri="mongodb://127.0.0.1:18880/?directConnection=true"
declare -A port=([a]=18881 [b]=18882 [c]=18883)
hosts=()
for h in a b c; do
  mkdir -p "$work/$h"
  target/release/store-worker --socket "$work/$h/w.sock" --host "$h" --mongodb-uri "$uri" \
    --follow "$FOLLOW" 2>>"$work/$h/worker.log" &
  hosts+=($!)
  for _ in $(seq 100); do [ -S "$work/$h/w.sock" ] && break; sleep 0.1; done
  target/release/edge --listen "127.0.0.1:${port[$h]}" --worker-socket "$work/$h/w.sock" \
    --host "$h" 2>>"$work/$h/edge.log" &
  hosts+=($!)
  wait_port "${port[$h]}"
done
pids+=("${hosts[@]}")
sleep 1
for run in $(seq "$RUNS"); do
  bench=()
  for pair in ab bc ca; do
    from=${pair:0:1}; to=${pair:1:1}
    target/release/wharf-bench load --broker "127.0.0.1:${port[$from]}" \
      --sub-broker "127.0.0.1:${port[$to]}" --namespace "x$pair" \
      --label "wharf-3hosts-$FOLLOW" --scenario "cross-host-$pair" --qos 1 --rate "$RATE" \
      --duration "$DURATION" --pids "$(IFS=,; echo "${hosts[*]}")" >>"$out" &
    bench+=($!)
  done
  wait "${bench[@]}"
done
echo "results: $out"
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(f"{len(rows)} pair-runs: sent {sum(r.get('expected', 0) for r in rows)}, "
      f"lost {sum(r.get('lost', 0) for r in rows)}, lost by id {sum(r.get('lost_by_id', 0) for r in rows)}, duplicates {sum(r.get('duplicates', 0) for r in rows)}")
for key in ("p50_us", "p99_us", "p999_us", "msgs_per_sec"):
    vals = [r[key] for r in rows if key in r]
    if vals:
        print(f"{key}: median {statistics.median(vals):.0f}, max {max(vals):.0f}")
PY
