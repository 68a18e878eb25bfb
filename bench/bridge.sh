#!/usr/bin/env bash
# A bridge's backlog drain: Wharf (release, embedded store) bridges `bench/#` to Debian's
# Mosquitto; Mosquitto is stopped, publishers put BACKLOG-ish QoS 1 messages into Wharf (all
# acknowledged, so all owed to the bridge), Mosquitto comes back with a live consumer, and the
# drain is timed from the bridge's reconnect to the remote's last PUBACK (the bridge's
# `forwarded` count), with LIVE msg/s of live traffic published meanwhile. The consumer on
# Mosquitto counts distinct messages (loss by identity: payloads carry publisher and sequence).
#
#   DURATION=10 PUBLISHERS=4 LIVE=1000 bench/bridge.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
DURATION="${DURATION:-10}"
PUBLISHERS="${PUBLISHERS:-4}"
LIVE="${LIVE:-1000}"
RUNS="${RUNS:-1}"
OUT="${OUT:-bench/results/$(date -u +%Y%m%dT%H%M%SZ)-bridge.jsonl}"
cargo build --release --locked -p wharf-edge -p wharf-store-worker -p wharf-bench --bins >&2
BIN=target/release
DIR=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$DIR"' EXIT
REMOTE=18883 EDGE=18884 OPS=18885
status() { curl -s -H "Authorization: Bearer bench-bridge" "127.0.0.1:$OPS/api/v1/bridges"; }
field() { status | python3 -c "import json,sys; print(json.load(sys.stdin)['bridges'][0]['$1'])"; }
cat > "$DIR/mosquitto.conf" <<EOF
listener $REMOTE 127.0.0.1
user root
allow_anonymous true
max_queued_messages 0
max_inflight_messages 0
EOF
for run in $(seq "$RUNS"); do
  rm -rf "$DIR/data" && mkdir -p "$DIR/data"
  "$BIN/store-worker" --socket "$DIR/w.sock" --data-dir "$DIR/data" --host b1 >"$DIR/worker.log" 2>&1 &
  WORKER=$!
  for _ in $(seq 100); do [ -S "$DIR/w.sock" ] && break; sleep 0.1; done
  "$BIN/edge" --listen "127.0.0.1:$EDGE" --worker-socket "$DIR/w.sock" --host b1 \
    --metrics-listen "127.0.0.1:$OPS" --admin-password bench-bridge \
    --bridges "[{\"name\":\"cloud\",\"address\":\"127.0.0.1:$REMOTE\",\"protocol\":\"3.1.1\",\"out\":[{\"filter\":\"bench/#\"}]}]" \
    >"$DIR/edge.log" 2>&1 &
  EDGE_PID=$!
  wait_port "$EDGE"
  # The remote is away while the backlog builds.
  "$BIN/wharf-bench" load --broker "127.0.0.1:$EDGE" --publishers "$PUBLISHERS" --subscribers 0 \
    --qos 1 --duration "$DURATION" --topic-per-publisher --label wharf --scenario backlog \
    --namespace bench >"$DIR/backlog.json"
  BACKLOG=$(python3 -c "import json; d=json.load(open('$DIR/backlog.json')); print(d['acked'])")
  mosquitto -c "$DIR/mosquitto.conf" >"$DIR/mosquitto.log" 2>&1 &
  MOSQ=$!
  wait_port "$REMOTE"
  # The consumer subscribes before the bridge's next attempt (its backoff is at least 0.5 s).
  timeout 600 mosquitto_sub -p "$REMOTE" -t 'bench/#' -q 1 -F '%t %x' >"$DIR/consumed.txt" &
  CONSUMER=$!
  until [ "$(field state)" = connected ]; do sleep 0.05; done
  START=$(date +%s.%N)
  "$BIN/wharf-bench" load --broker "127.0.0.1:$EDGE" --publishers 1 --subscribers 0 --qos 1 \
    --rate "$LIVE" --duration 600 --label wharf --scenario live --namespace bench/live \
    >"$DIR/live.json" 2>/dev/null &
  LIVE_PID=$!
  until [ "$(field forwarded)" -ge "$BACKLOG" ]; do sleep 0.05; done
  END=$(date +%s.%N)
  kill "$LIVE_PID" 2>/dev/null || true
  sleep 2
  kill "$CONSUMER" 2>/dev/null || true
  # Distinct backlog messages at the remote's consumer (the live ones are under bench/live).
  DISTINCT=$(grep -v '^bench/live' "$DIR/consumed.txt" | sort -u | wc -l || true)
  python3 - "$BACKLOG" "$START" "$END" "$DISTINCT" "$LIVE" <<'PY' | tee -a "$OUT"
import json, sys
backlog, start, end, distinct, live = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
secs = end - start
print(json.dumps({"scenario": "bridge_drain", "backlog": backlog, "drain_secs": round(secs, 2),
                  "drain_msgs_per_sec": round(backlog / secs), "live_msgs_per_sec": live,
                  "backlog_distinct_at_remote_consumer": distinct, "lost": backlog - min(distinct, backlog)}))
PY
  kill "$EDGE_PID" "$WORKER" "$MOSQ" 2>/dev/null || true
  wait "$EDGE_PID" "$WORKER" "$MOSQ" 2>/dev/null || true
done
