#!/usr/bin/env bash
# Idle devices as fleets have them (issue 21): each client connects and subscribes to its own
# command topic `dev/<id>/cmd` at QoS 1, keepalive 600 s, then idles. Wharf (one edge, one
# store-worker, embedded store) and Mosquitto side by side in the same run, a fresh broker for
# each variant: clean sessions, then persistent ones. The edge's and the worker's memory per
# client are reported apart. Every client pings once PING_AFTER seconds after connecting.
#   CONNECTIONS=18000 RUNS=3 bench/idle-subscribed.sh
# One process here may hold at most 20,000 files: for 50,000 clients, see
# `IDLE_FLAGS="--subscribe" bench/idle-many-edges.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
CONNECTIONS="${CONNECTIONS:-18000}"
RUNS="${RUNS:-1}"
# Every client pings once this many seconds after connecting, before the measurement (as
# devices do every keepalive): the fleet's steady state. 0 measures right after the CONNECTs.
PING_AFTER="${PING_AFTER:-12}"
ulimit -n "$(ulimit -Hn)"
cargo build --release --locked -p wharf-bench -p wharf-edge -p wharf-store-worker >&2
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
out="bench/results/idle-subscribed-$(date +%Y%m%d-%H%M%S).jsonl"
mkdir -p bench/results

wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "port $1 did not open" >&2
  return 1
}

for run in $(seq "$RUNS"); do
  for variant in "--subscribe" "--subscribe --persistent"; do
    # Wharf: a fresh worker and edge.
    rm -rf "$work/data"
    target/release/store-worker --socket "$work/w.sock" --data-dir "$work/data" --host bench \
      2>"$work/worker.log" &
    worker=$!; pids+=("$worker")
    sleep 0.5
    target/release/edge --listen 127.0.0.1:18871 --worker-socket "$work/w.sock" --host bench \
      2>"$work/edge.log" &
    edge=$!; pids+=("$edge")
    wait_port 18871
    # shellcheck disable=SC2086
    target/release/wharf-bench idle --broker 127.0.0.1:18871 --label wharf \
      --connections "$CONNECTIONS" --pids "$edge" --worker-pids "$worker" \
      --ping-after-secs "$PING_AFTER" $variant | tee -a "$out"
    kill -TERM "$edge" "$worker"; wait "$edge" "$worker" 2>/dev/null || true
    # Mosquitto: in memory, the same clients.
    printf 'listener 18872 127.0.0.1\nallow_anonymous true\nmax_queued_messages 1000\n' \
      >"$work/mosquitto.conf"
    mosquitto -c "$work/mosquitto.conf" 2>"$work/mosquitto.log" &
    mosq=$!; pids+=("$mosq")
    wait_port 18872
    # shellcheck disable=SC2086
    target/release/wharf-bench idle --broker 127.0.0.1:18872 --label mosquitto \
      --connections "$CONNECTIONS" --pids "$mosq" --ping-after-secs "$PING_AFTER" $variant \
      | tee -a "$out"
    kill -TERM "$mosq"; wait "$mosq" 2>/dev/null || true
  done
done
echo "results: $out" >&2
