#!/usr/bin/env bash
# Cross-host delivery latency: two Wharf hosts (edge + store-worker each) on one SecantusDB
# (MongoDB wire protocol), publishers on host A, subscribers on host B, at a moderate fixed
# rate. Runs with the change-stream follower and with the polling follower, RUNS times each,
# and appends JSON lines to bench/results/<stamp>-cluster.jsonl.
#   bench/cluster.sh            RUNS=5 RATE=2000 bench/cluster.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-3}"
RATE="${RATE:-1000}"
DURATION="${DURATION:-5}"
venv="${WHARF_VENV:-$PWD/.venv}"
[ -x "$venv/bin/secantusd-py" ] || ./scripts/install-deps.sh
cargo build --release --locked -p wharf-bench -p wharf-edge -p wharf-store-worker
out="bench/results/$(date -u +%Y%m%dT%H%M%SZ)-cluster.jsonl"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

"$venv/bin/secantusd-py" --host 127.0.0.1 --port 18870 --storage-path "$work/db" >/dev/null 2>&1 &
pids+=($!)
wait_port 18870
uri="mongodb://127.0.0.1:18870/?directConnection=true"
for follow in auto poll; do
  for run in $(seq "$RUNS"); do
    hosts=()
    for h in a b; do
      port=$([ $h = a ] && echo 18871 || echo 18872)
      mkdir -p "$work/$h"
      target/release/store-worker --socket "$work/$h/w.sock" --host "$h" --mongodb-uri "$uri" \
        --follow "$follow" 2>>"$work/$h/worker.log" &
      hosts+=($!)
      for _ in $(seq 100); do [ -S "$work/$h/w.sock" ] && break; sleep 0.1; done
      target/release/edge --listen "127.0.0.1:$port" --worker-socket "$work/$h/w.sock" --host "$h" \
        2>>"$work/$h/edge.log" &
      hosts+=($!)
      wait_port "$port"
    done
    sleep 1
    target/release/wharf-bench load --broker 127.0.0.1:18871 --sub-broker 127.0.0.1:18872 \
      --label "wharf-follow-$follow" --scenario cross-host --qos 1 --rate "$RATE" \
      --duration "$DURATION" --pids "$(IFS=,; echo "${hosts[*]}")" | tee -a "$out"
    for p in "${hosts[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${hosts[@]}"; do while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; done
    rm -rf "$work/a" "$work/b"
  done
done
echo "results: $out"
