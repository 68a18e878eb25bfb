#!/usr/bin/env bash
# Issue 15's reproduction with an independent subscriber: eight QoS 1 publishers flat out
# (wharf-bench, 8 s) against one Wharf (edge + embedded store), read by `mosquitto_sub -q 1`;
# each payload's identity (publisher, sequence) is decoded from mosquitto_sub's hex output.
# Prints acknowledged, distinct received, missing, twice and out of order (per publisher).
#   bench/mosquitto-sub-check.sh [bin-dir] [label]   # bin-dir holds edge and store-worker
# For an A/B, build another commit's binaries into another directory and run both.
set -u
cd "$(dirname "$0")/.."
B=${1:-target/release}; L=${2:-$B}
cargo build --release --locked -p wharf-bench >/dev/null 2>&1
w=$(mktemp -d); mkdir -p target; d=$(mktemp -d -p "$PWD/target" check-data.XXXXXX)
"$B/store-worker" --socket "$w/w.sock" --data-dir "$d" --host check 2>"$w/worker.log" & wp=$!
sleep 0.5
TOKIO_WORKER_THREADS=1 "$B/edge" --listen 127.0.0.1:18860 --worker-socket "$w/w.sock" --host check 2>"$w/edge.log" & ep=$!
sleep 0.7
mosquitto_sub -p 18860 -q 1 -k 5 -i check-sub -t bench/t -F '%x' > "$w/sub.txt" & sp=$!
sleep 0.5
out=$(target/release/wharf-bench load --broker 127.0.0.1:18860 --qos 1 --publishers 8 --subscribers 0 --duration 8 2>/dev/null)
acked=$(echo "$out" | python3 -c "import json,sys; print(json.loads(sys.stdin.read())['acked'])")
# Until the subscriber has them all, or nothing new came for 20 s.
last=-1; still=0
while :; do
  n=$(wc -l < "$w/sub.txt")
  [ "$n" -ge "$acked" ] && break
  if [ "$n" = "$last" ]; then still=$((still + 1)); [ $still -ge 20 ] && break; else still=0; last=$n; fi
  sleep 1
done
kill $sp $ep $wp 2>/dev/null; wait 2>/dev/null
python3 - "$w/sub.txt" "$acked" "$L" <<'PY'
import struct, sys
path, acked, label = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seen, twice, disorder, highest = set(), 0, 0, {}
for line in open(path):
    b = bytes.fromhex(line.strip())
    if len(b) < 20:
        continue
    p, s = struct.unpack('<I', b[8:12])[0], struct.unpack('<Q', b[12:20])[0]
    if (p, s) in seen:
        twice += 1
        continue
    seen.add((p, s))
    if s < highest.get(p, -1):
        disorder += 1
    highest[p] = max(highest.get(p, -1), s)
print(f"{label}: acknowledged {acked}, distinct received {len(seen)}, "
      f"missing {max(acked - len(seen), 0)}, twice {twice}, out of order {disorder}")
PY
rm -rf "$w" "$d"
