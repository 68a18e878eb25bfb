#!/usr/bin/env bash
# How the cluster's cost grows with its hosts: N = 1, 2, 4, 8 Wharf hosts (an edge and a
# store-worker each, processes on this machine) on one Rust SecantusDB (secantusd-rs; built
# with cargo if missing), loaded with a fleet (`wharf-bench fleet`): DEVICES devices spread
# over the hosts, each subscribed to its own command topic and publishing QoS 1 telemetry
# (RATE msg/s over the fleet), one persistent consumer of `fleet/#` on host 1, COMMANDS
# commands/s from host 1 to devices on other hosts. Two shapes per N:
#   fleet: every host's devices publish (the consumer on host 1 wants everything);
#   one:   only host 1's devices publish (no session on another host wants any telemetry:
#          the issue's shape, where each extra host used to cost half of host 1's work).
# Per host: CPU per telemetry message (edge + worker, the idle rate subtracted), documents its
# follower received per message; the database's CPU per message; consumer and command
# latency; loss by identity. Hosts and database are fresh for each N; RUNS runs per shape.
# Appends JSON lines to bench/results/<stamp>-cluster-scale.jsonl and prints a table.
#   bench/cluster-scale.sh     FOLLOW=poll HOSTS="1 2 4 8" RUNS=3 DEVICES=400 RATE=1000 DURATION=20 bench/cluster-scale.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
HOSTS="${HOSTS:-1 2 4 8}"
RUNS="${RUNS:-3}"
DEVICES="${DEVICES:-400}"
RATE="${RATE:-1000}"
COMMANDS="${COMMANDS:-10}"
DURATION="${DURATION:-20}"
SHAPES="${SHAPES:-fleet one}"
FOLLOW="${FOLLOW:-auto}"
cargo build --release --locked -p wharf-bench -p wharf-edge -p wharf-store-worker
secantus="$(secantus_bin)"
mkdir -p bench/results
out="bench/results/$(date -u +%Y%m%dT%H%M%SZ)-cluster-scale.jsonl"
work=$(mktemp -d)
pids=()
stop_all() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
trap 'stop_all; rm -rf "$work"' EXIT

for n in $HOSTS; do
  rm -rf "$work/db" && mkdir -p "$work/db"
  "$secantus" --host 127.0.0.1 --port 18890 --storage-path "$work/db" >"$work/secantus.log" 2>&1 &
  db=$!
  pids+=("$db")
  wait_port 18890
  uri="mongodb://127.0.0.1:18890/?directConnection=true"
  brokers=() groups=() metrics=()
  for h in $(seq "$n"); do
    d="$work/h$h"; rm -rf "$d"; mkdir -p "$d"
    mport=$((18900 + h)); port=$((18920 + h))
    target/release/store-worker --socket "$d/w.sock" --host "h$h" --mongodb-uri "$uri" \
      --metrics-listen "127.0.0.1:$mport" --follow "$FOLLOW" 2>>"$d/worker.log" &
    w=$!
    for _ in $(seq 100); do [ -S "$d/w.sock" ] && break; sleep 0.1; done
    target/release/edge --listen "127.0.0.1:$port" --worker-socket "$d/w.sock" --host "h$h" \
      --metrics-listen "127.0.0.1:$((18940 + h))" 2>>"$d/edge.log" &
    e=$!
    pids+=("$w" "$e")
    wait_port "$port"
    brokers+=("127.0.0.1:$port"); groups+=("$w+$e"); metrics+=("127.0.0.1:$mport")
  done
  sleep 1
  for shape in $SHAPES; do
    publishing=0; [ "$shape" = one ] && publishing=1
    for run in $(seq "$RUNS"); do
      target/release/wharf-bench fleet --brokers "$(IFS=,; echo "${brokers[*]}")" \
        --host-pids "$(IFS=,; echo "${groups[*]}")" \
        --worker-metrics "$(IFS=,; echo "${metrics[*]}")" --db-pid "$db" \
        --devices "$DEVICES" --publishing-hosts "$publishing" --rate "$RATE" \
        --commands "$COMMANDS" --duration-secs "$DURATION" --prefix "f$n$shape$run" \
        --label "wharf-$shape-$FOLLOW" >>"$out"
      tail -n 1 "$out"
    done
  done
  stop_all
done
echo "results: $out"
python3 - "$out" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
med = lambda xs: statistics.median(xs) if xs else float("nan")
print("| shape | hosts | msg/s | host 1 us/msg | each other host us/msg (max) | max other / host 1 | followed docs/msg | db us/msg | consumer p50/p99 ms (other hosts' devices) | command p50/p99 ms | missing |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for label in sorted({r["label"] for r in rows}):
    for n in sorted({r["hosts"] for r in rows if r["label"] == label}):
        rs = [r for r in rows if r["label"] == label and r["hosts"] == n]
        h1 = med([r["host_cpu_us_per_msg"][0] for r in rs])
        other = med([max(r["host_cpu_us_per_msg"][1:] or [float("nan")]) for r in rs])
        print(f"| {label[6:].replace('-', ' ')} | {n} | {med([r['msgs_per_sec'] for r in rs]):.0f} | {h1:.0f} | {other:.0f} | "
              f"{med([r['max_other_host_over_host1'] for r in rs]):.3f} | {med([r['followed_per_msg_total'] for r in rs]):.3f} | "
              f"{med([r['db_cpu_us_per_msg'] for r in rs]):.0f} | "
              f"{med([r['consumer_remote_p50_ms'] for r in rs]):.1f} / {med([r['consumer_remote_p99_ms'] for r in rs]):.1f} | "
              f"{med([r['command_p50_ms'] for r in rs]):.1f} / {med([r['command_p99_ms'] for r in rs]):.1f} | "
              f"{sum(r['missing'] + r['commands_missing'] for r in rs)} |")
EOF
