#!/usr/bin/env bash
# A fleet that comes back at once (wharf-bench storm), Wharf and Mosquitto side by side: DEVICES
# persistent sessions (3.1.1, clean session 0, each subscribed at QoS 1 to its own command
# topic) go away, UNRELATED messages nobody subscribes to are stored, OWED messages are
# published to each device, and then every device reconnects within RAMP seconds. Each run has a
# fresh broker; one JSON line per run goes to bench/results/storm-<stamp>.jsonl and the medians
# are printed. Checked by message identity: refused, missing, twice, out of order.
#   bench/storm.sh                                   # 10,000 devices x 20 owed, 3 runs
#   UNRELATED=2000000 DEVICES=1000 bench/storm.sh   # a store 100 x fuller of others' traffic
#   BROADCAST=1 DEVICES=5000 OWED=2000 BROKERS="wharf mosquitto" RUNS=1 bench/storm.sh
#   BROKERS="wharf-mongo" bench/storm.sh             # the MongoDB backend (secantusd-rs)
# Brokers: wharf (embedded store), wharf-mongo (MongoDB on the Rust build of SecantusDB,
# installed with cargo if missing), mosquitto (Debian's, in memory, queues unbounded).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
RUNS="${RUNS:-3}"
DEVICES="${DEVICES:-10000}"
OWED="${OWED:-20}"
UNRELATED="${UNRELATED:-0}"
RAMP="${RAMP:-2}"
BROADCAST="${BROADCAST:-0}"
TIMEOUT="${TIMEOUT:-900}" # seconds of storm before the devices still incomplete count as failed
BROKERS="${BROKERS:-wharf wharf-mongo mosquitto}"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
out="bench/results/storm-$stamp.jsonl"
mkdir -p bench/results target
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
command -v mosquitto >/dev/null || { apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null; }
cargo build --release --locked -p wharf-bench -p wharf-edge -p wharf-store-worker
bench=target/release/wharf-bench
work=$(mktemp -d)
pids=""
stop() {
  for p in ${pids//,/ }; do kill -TERM "$p" 2>/dev/null || true; done
  for p in ${pids//,/ }; do while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; done
  pids=""
}
trap 'stop; rm -rf "$work" target/storm-data' EXIT

start() { # broker -> sets port and pids
  rm -rf target/storm-data; mkdir -p target/storm-data
  case "$1" in
    wharf|wharf-mongo)
      local store=()
      if [ "$1" = wharf-mongo ]; then
        "$(secantus_bin)" --host 127.0.0.1 --port 18867 --storage-path target/storm-data/mongo >"$work/secantus.log" 2>&1 &
        pids="$!,"
        wait_port 18867
        store=(--mongodb-uri "mongodb://127.0.0.1:18867/?directConnection=true" --mongodb-database storm)
      fi
      # Data on the repository's disk, not /tmp (a tmpfs on some machines: no fsync cost).
      target/release/store-worker --socket "$work/w.sock" --data-dir target/storm-data --host storm "${store[@]}" 2>"$work/worker.log" &
      pids="$pids$!"
      target/release/edge --listen 127.0.0.1:18861 --worker-socket "$work/w.sock" --host storm ${WHARF_EDGE_ARGS:-} 2>"$work/edge.log" &
      pids="$pids,$!"; port=18861 ;;
    mosquitto)
      printf 'listener 18862 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages 20\n' >"$work/mosquitto.conf"
      mosquitto -c "$work/mosquitto.conf" 2>"$work/mosquitto.log" &
      pids="$!"; port=18862 ;;
  esac
  wait_port "$port"
  sleep 0.5
}

flags=(--devices "$DEVICES" --owed "$OWED" --unrelated "$UNRELATED" --ramp-secs "$RAMP" --timeout-secs "$TIMEOUT")
[ "$BROADCAST" = 1 ] && flags+=(--broadcast)
for run in $(seq "$RUNS"); do
  for broker in $BROKERS; do
    start "$broker"
    "$bench" storm --port "$port" --pids "$pids" "${flags[@]}" \
      | sed "s/^{/{\"broker\":\"$broker\",\"run\":$run,/" | tee -a "$out"
    if [ "$broker" != mosquitto ]; then du -sk target/storm-data | awk -v b="$broker" '{print "  " b " data directory: " $1 " KiB"}'; fi
    stop
  done
done
echo "results: $out"
python3 - "$out" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for broker in dict.fromkeys(r["broker"] for r in rows):
    rs = [r for r in rows if r["broker"] == broker]
    med = lambda k: statistics.median(r[k] for r in rs)
    print(f"{broker:12} runs {len(rs)}  last {med('last_secs'):7.2f} s  p50 {med('p50_secs'):6.2f} s  "
          f"{med('restore_msgs_per_sec'):8.0f} msg/s  CPU {med('cpu_us_per_msg'):6.1f} us/msg  "
          f"refused {sum(r['refused'] for r in rs)}  failed {sum(r['failed'] for r in rs)}  "
          f"missing {sum(r['missing'] for r in rs)}  twice {sum(r['twice'] for r in rs)}  "
          f"out of order {sum(r['out_of_order'] for r in rs)}")
EOF
