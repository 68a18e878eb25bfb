#!/usr/bin/env bash
# Runs Wharf (edge + store-worker, embedded store: every message persisted), Mosquitto (Debian
# package) and rumqttd (cargo install rumqttd) one after the other on loopback, each scenario
# RUNS times (default 3), and writes one JSON line per run to bench/results/<stamp>.jsonl;
# then bench/report.py prints medians and ratios and draws the plots.
#   bench/run.sh                 # everything
#   RUNS=5 SCENARIOS="qos0 qos1" bench/run.sh
#   RUNS=3 DURATION=10 SCENARIOS="qos1x8to1 qos1x8to8" bench/run.sh   # several publishers
#   WARM=1 RUNS=3 DURATION=10 SCENARIOS="fleet8x8 fleet200x1 fleet4x1" BROKERS="wharf mosquitto" bench/run.sh
#   WARM=1 RUNS=5 DURATION=30 SCENARIOS="qos0 qos1x8to8" bench/run.sh   # sustained, warm
#   BACKEND=mongo BROKERS=wharf WARM=1 RUNS=5 SCENARIOS="catchup1 qos1x8to1" bench/run.sh
#   WHARF_EDGE_ARGS="--max-queued 1000000" WARM=1 RUNS=6 DURATION=2 SCENARIOS=qos0 bench/run.sh
#   BROKERS="wharf wharf5" RUNS=5 SCENARIOS="qos1 lat1 qos1x8to8" bench/run.sh   # MQTT 5.0 A/B
# The broker "wharf5" is Wharf loaded by MQTT 5.0 clients (every other broker by 3.1.1 ones);
# "wharf-base" is Wharf from the binaries in $WHARF_BASELINE (another build, for an A/B):
#   WHARF_BASELINE=/tmp/old-target/release BROKERS="wharf-base wharf wharf5" bench/run.sh
# WARM=1 keeps one broker instance for all runs of a scenario (each run meets the data and the
# state the earlier ones left, as a broker in service does); without it every run gets a fresh
# broker. BACKEND=mongo stores Wharf's messages in MongoDB instead of the embedded store: on the
# Rust build of SecantusDB (secantusd-rs, a MongoDB-wire server; installed here with cargo if
# missing, which takes minutes), one instance for the whole run, so that its data grows from
# run to run as a real database's does.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
RUNS="${RUNS:-3}"
WARM="${WARM:-0}"
BACKEND="${BACKEND:-embedded}"
DURATION="${DURATION:-3}"
SCENARIOS="${SCENARIOS:-qos0 qos1 lat0 lat1 fanin fanout idle catchup sync}"
BROKERS="${BROKERS:-wharf mosquitto rumqttd}"
IDLE_CONNECTIONS="${IDLE_CONNECTIONS:-20000}"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
out="bench/results/$stamp.jsonl"
mkdir -p bench/results
ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true

command -v mosquitto >/dev/null || { apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null; }
rumqttd_bin="${RUMQTTD:-$(command -v rumqttd || echo "$HOME/.cargo/bin/rumqttd")}"
if [ ! -x "$rumqttd_bin" ]; then
  # Not --locked: rumqttd 0.20's lock file pins a metrics release that newer compilers refuse.
  cargo install rumqttd
  rumqttd_bin="$HOME/.cargo/bin/rumqttd"
fi
cargo build --release --locked -p wharf-bench -p wharf-edge -p wharf-store-worker
bench=target/release/wharf-bench
work=$(mktemp -d)
# Wharf's data on the repository's disk, not in /tmp (a tmpfs on some machines, where an fsync
# costs nothing); sockets and logs stay in /tmp (a socket path is limited to 108 bytes).
mkdir -p target
data=$(mktemp -d -p "$PWD/target" bench-data.XXXXXX)
pids=""
stop() {
  for p in ${pids//,/ }; do kill -TERM "$p" 2>/dev/null || true; done
  for p in ${pids//,/ }; do while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; done
  pids=""
}
mongo_pid=""
stop_mongo() {
  [ -n "$mongo_pid" ] || return 0
  kill "$mongo_pid" 2>/dev/null || true
  while kill -0 "$mongo_pid" 2>/dev/null; do sleep 0.1; done
}
trap 'stop; stop_mongo; rm -rf "$work" "$data"' EXIT


store_args=()
if [ "$BACKEND" = mongo ]; then
  secantus="$(secantus_bin)"
  mkdir -p "$data/mongo"
  "$secantus" --host 127.0.0.1 --port 18857 --storage-path "$data/mongo" >"$work/secantus.log" 2>&1 &
  mongo_pid=$!
  wait_port 18857
  store_args=(--mongodb-uri "mongodb://127.0.0.1:18857/?directConnection=true" --mongodb-database "bench$stamp")
fi

start() { # broker -> sets port and pids
  case "$1" in
    wharf|wharf5|wharf-base)
      local bin=target/release
      [ "$1" = wharf-base ] && bin="${WHARF_BASELINE:?WHARF_BASELINE names the baseline build}"
      rm -rf "$work/wharf" "$data/wharf"; mkdir -p "$work/wharf"
      "$bin/store-worker" --socket "$work/wharf/w.sock" --data-dir "$data/wharf" --host bench "${store_args[@]}" 2>"$work/worker.log" &
      local w=$!
      # One runtime thread for the edge (WHARF_EDGE_THREADS): on a 2-core machine shared with
      # the worker and the load generator it measured better than one per core (BENCHMARKS.md).
      TOKIO_WORKER_THREADS="${WHARF_EDGE_THREADS:-1}" "$bin/edge" --listen 127.0.0.1:18851 --worker-socket "$work/wharf/w.sock" --host bench ${WHARF_EDGE_ARGS:-} 2>"$work/edge.log" &
      pids="$w,$!"; port=18851
      # The MongoDB server's CPU is part of what each message costs.
      [ -n "$mongo_pid" ] && pids="$pids,$mongo_pid" ;;
    mosquitto)
      mosquitto -c bench/mosquitto.conf 2>"$work/mosquitto.log" &
      pids="$!"; port=18852 ;;
    mosquitto-nodelay) # not in the default set: BROKERS=mosquitto-nodelay SCENARIOS="lat0 lat1"
      mosquitto -c bench/mosquitto-nodelay.conf 2>"$work/mosquitto.log" &
      pids="$!"; port=18854 ;;
    rumqttd)
      "$rumqttd_bin" -c bench/rumqttd.toml 2>"$work/rumqttd.log" >/dev/null &
      pids="$!"; port=18853 ;;
  esac
  wait_port "$port"
  sleep 0.5
}

load() { # label scenario args...
  local label=$1 scenario=$2 mqtt=4; shift 2
  [ "$label" = wharf5 ] && mqtt=5
  "$bench" load --broker "127.0.0.1:$port" --label "$label" --scenario "$scenario" --pids "$pids" --duration "$DURATION" --mqtt "$mqtt" "$@" | tee -a "$out"
}

for broker in $BROKERS; do
  for scenario in $SCENARIOS; do
    if [ "$WARM" = 1 ]; then start "$broker"; fi
    for run in $(seq "$RUNS"); do
      case "$scenario" in
        catchup) [ "$broker" = wharf ] && [ "$run" = 1 ] && "$bench" catchup | tee -a "$out"; continue ;;
        # The disk under Wharf's data directory: what one durable acknowledgement costs.
        sync) [ "$broker" = wharf ] && [ "$run" = 1 ] && "$bench" sync --dir "$data" | tee -a "$out"; continue ;;
      esac
      # A fresh broker for every run, so that no run inherits another's state (unless WARM=1).
      if [ "$WARM" != 1 ]; then start "$broker"; fi
      case "$scenario" in
        qos0) load "$broker" qos0 --qos 0 ;;
        qos1) load "$broker" qos1 --qos 1 ;;
        # Several publishers at once (issue 15): eight QoS 1 publishers flat out to one topic,
        # read by one subscriber and by eight; loss is counted by message identity.
        qos1x8to1) load "$broker" qos1x8to1 --qos 1 --publishers 8 ;;
        qos1x8to8) load "$broker" qos1x8to8 --qos 1 --publishers 8 --subscribers 8 ;;
        # A persistent session offline while eight QoS 1 publishers run, then back: how fast
        # the broker hands over what it kept (catchup_msgs_per_sec), every message by identity.
        catchup1) load "$broker" catchup1 --qos 1 --publishers 8 --subscribers 1 --offline ;;
        # A 100 us pacing tick: two messages at a time, not bursts of 20 every millisecond.
        lat0) load "$broker" lat0 --qos 0 --rate 20000 --tick-us 100 ;;
        lat1) load "$broker" lat1 --qos 1 --rate 20000 --tick-us 100 ;;
        # Fleet rates, below saturation (issue 35): broker CPU per message is the figure.
        fleet8x8) load "$broker" fleet8x8 --qos 1 --publishers 8 --subscribers 8 --rate 1000 ;;
        fleet200x1) load "$broker" fleet200x1 --qos 1 --publishers 200 --rate 50 --topic-per-publisher ;;
        fleet4x1) load "$broker" fleet4x1 --qos 1 --publishers 4 --rate 250 --topic-per-publisher ;;
        fanin) load "$broker" fanin --qos 1 --publishers 1000 --rate 20 --topic-per-publisher ;;
        fanout) load "$broker" fanout --qos 0 --subscribers 1000 --rate 20 ;;
        idle) "$bench" idle --broker "127.0.0.1:$port" --label "$broker" --connections "$IDLE_CONNECTIONS" --pids "$pids" | tee -a "$out" ;;
      esac
      if [ "$WARM" != 1 ]; then stop; fi
    done
    if [ "$WARM" = 1 ]; then stop; fi
  done
done
echo "results: $out"
"${WHARF_VENV:-.venv}/bin/python" bench/report.py "$out"
