#!/usr/bin/env bash
# One run against a fresh Wharf (embedded store), with the CPU each process used per delivered
# message: for A/B comparisons of edge or worker builds (run them alternating, several times).
#   bench/split.sh [worker-binary] [edge-binary] "load args"
#   bench/split.sh target/release/store-worker target/release/edge "--qos 0"
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-target/release/store-worker}; E=${2:-target/release/edge}; ARGS=${3:-}
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
w=$(mktemp -d)
# The data on the repository's disk (/tmp may be a tmpfs, where an fsync costs nothing).
mkdir -p target; d=$(mktemp -d -p "$PWD/target" split-data.XXXXXX)
"$W" --socket "$w/w.sock" --data-dir "$d" --host bench 2>/dev/null & wp=$!
sleep 0.5
TOKIO_WORKER_THREADS=1 "$E" --listen 127.0.0.1:18851 --worker-socket "$w/w.sock" --host bench 2>/dev/null & ep=$!
sleep 0.7
w0=$(cpu $wp); e0=$(cpu $ep)
# shellcheck disable=SC2086
out=$(target/release/wharf-bench load --broker 127.0.0.1:18851 --duration 3 $ARGS 2>/dev/null)
w1=$(cpu $wp); e1=$(cpu $ep)
kill $ep $wp; wait 2>/dev/null || true; rm -rf "$w" "$d"
echo "$out" | python3 -c "
import json, sys
d = json.loads(sys.stdin.read()); r = d['received']; tick = 1e6 / $(getconf CLK_TCK)
print('msg/s', d['msgs_per_sec'], 'lost', d['lost'], 'p50_us', d['p50_us'], 'p99_us', d['p99_us'],
      'worker_us/msg %.2f edge_us/msg %.2f' % (($w1 - $w0) * tick / r, ($e1 - $e0) * tick / r))"
