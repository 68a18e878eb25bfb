#!/usr/bin/env bash
# Where a message's CPU goes at a fixed rate: one release edge and worker (embedded store), a
# fleet scenario, and for each process its system calls and context switches per message
# (perf stat), or a summary of its system calls (TRACE=1, perf trace -s), or a profile
# (PERF=1, perf record -g into /tmp/perf.{worker,edge}.data).
#   bench/profile.sh                                  # fleet4x1: 4 publishers x 250 msg/s
#   SCENARIO=fleet200x1 bench/profile.sh              # 200 publishers x 50 msg/s
#   WORKER_ARGS="--commit-delay-ms 0" bench/profile.sh
#   TRACE=1 bench/profile.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v perf >/dev/null || { echo "needs perf (linux-perf)" >&2; exit 1; }
cargo build --release --locked -p wharf-bench -p wharf-edge -p wharf-store-worker
SCENARIO="${SCENARIO:-fleet4x1}"
case "$SCENARIO" in
  fleet4x1) args=(--qos 1 --publishers 4 --rate 250 --topic-per-publisher); rate=1000 ;;
  fleet200x1) args=(--qos 1 --publishers 200 --rate 50 --topic-per-publisher); rate=10000 ;;
  fleet8x8) args=(--qos 1 --publishers 8 --subscribers 8 --rate 1000); rate=64000 ;;
  *) echo "unknown scenario $SCENARIO" >&2; exit 64 ;;
esac
work=$(mktemp -d)
mkdir -p target
data=$(mktemp -d -p "$PWD/target" profile-data.XXXXXX)
trap 'kill $edge $worker 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work" "$data"' EXIT
# shellcheck disable=SC2086
target/release/store-worker --socket "$work/w.sock" --data-dir "$data" --host bench ${WORKER_ARGS:-} 2>"$work/worker.log" &
worker=$!
sleep 0.5
# shellcheck disable=SC2086
TOKIO_WORKER_THREADS=1 target/release/edge --listen 127.0.0.1:18861 --worker-socket "$work/w.sock" --host bench ${EDGE_ARGS:-} 2>"$work/edge.log" &
edge=$!
sleep 1
bench() { target/release/wharf-bench load --broker 127.0.0.1:18861 --label wharf --scenario "$SCENARIO" --pids "$worker,$edge" "$@" "${args[@]}"; }
bench --duration 3 >/dev/null # warm
bench --duration 12 >"$work/run.json" &
load=$!
sleep 3
span=6
for who in worker edge; do
  pid=${!who}
  if [ -n "${PERF:-}" ]; then
    perf record -F 2000 -g -p "$pid" -o "/tmp/perf.$who.data" -- sleep "$span" 2>/dev/null &
  elif [ -n "${TRACE:-}" ]; then
    perf trace -s -p "$pid" -o "$work/$who.txt" -- sleep "$span" &
  else
    perf stat -e context-switches,raw_syscalls:sys_enter -p "$pid" -- sleep "$span" 2>"$work/$who.txt" &
  fi
done
wait "$load"
sleep 0.5
python3 - "$work" "$span" "$rate" <<'EOF'
import json, re, sys, collections
work, span, rate = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
run = json.load(open(f"{work}/run.json"))
print({k: run[k] for k in ["msgs_per_sec", "cpu_us_per_msg", "p50_us", "p99_us", "lost_by_id"]})
messages = span * rate
for who in ["worker", "edge"]:
    try:
        text = open(f"{work}/{who}.txt").read()
    except FileNotFoundError:
        continue
    counts = collections.Counter()
    for line in text.splitlines():
        p = line.split()
        if len(p) >= 2 and p[0].replace(",", "").isdigit():  # perf stat
            counts[p[1]] += int(p[0].replace(",", ""))
        elif len(p) >= 3 and p[1].isdigit() and re.match(r"^[a-z_0-9]+$", p[0]):  # perf trace -s
            counts[p[0]] += int(p[1])
    per = ", ".join(f"{k} {v / messages:.2f}" for k, v in counts.most_common(8))
    print(f"{who}: per message over {span:.0f} s: {per}")
EOF
