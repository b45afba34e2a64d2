#!/bin/bash
# Part of bench-results/wake.md: latency at half of the measured peak.
# For each --cores value: the peak is the median events/s of RUNS unpaced harness runs of
# EVENTS events; then RUNS harness runs of EVENTS events paced at half that rate (--rate),
# reporting p50/p99/p99.9 of the per-notification latency (from each batch's scheduled time).
# With BUSY=2 in the environment, two busy loops (`sh -c 'while :; do :; done'`) load both
# cores during the paced runs (not during the peak runs).
# usage: paced.sh SERVER_BIN LOAD_BIN EVENTS RUNS CORES...
set -u
server=$1; load=$2; events=$3; runs=$4; shift 4
port=$((20000 + RANDOM % 10000))
one() { # cores json rate-or-empty
  port=$((port + 3))
  "$server" --cores "$1" --event-port $port --client-port $((port + 1)) \
    --metrics-addr 127.0.0.1:$((port + 2)) 2>/dev/null &
  local pid=$!
  for _ in $(seq 400); do (exec 3<>/dev/tcp/127.0.0.1/$((port + 2))) 2>/dev/null && break; sleep 0.05; done
  local rate=()
  [ -n "$3" ] && rate=(--rate "$3")
  "$load" --event-port $port --client-port $((port + 1)) --metrics-url 127.0.0.1:$((port + 2)) \
    --progress off --json "$2" "${rate[@]}" harness --total-events "$events" >/dev/null 2>&1
  kill $pid; wait $pid 2>/dev/null
}
field() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print($2)" "$1"; }
for cores in "$@"; do
  peaks=()
  for run in $(seq "$runs"); do
    j=/tmp/paced_peak_${cores}_$run.json; one "$cores" $j ""
    peaks+=("$(field $j "int(d['events_per_s']) if d['pass'] else 0")")
  done
  peak=$(printf '%s\n' "${peaks[@]}" | sort -n | sed -n "$(( (runs + 1) / 2 ))p")
  half=$((peak / 2))
  echo "cores=$cores peak events/s runs: ${peaks[*]} -> median $peak; pacing at $half"
  busy=()
  for _ in $(seq "${BUSY:-0}"); do sh -c 'while :; do :; done' & busy+=($!); done
  for run in $(seq "$runs"); do
    j=/tmp/paced_half_${cores}_$run.json; one "$cores" $j $half
    echo "cores=$cores busy=${BUSY:-0} run=$run rate=$half: $(field $j "'pass=%s p50=%.3fms p99=%.3fms p99.9=%.3fms max=%.3fms events/s=%d' % (d['pass'], d['latency']['p50_us']/1e3, d['latency']['p99_us']/1e3, d['latency']['p999_us']/1e3, d['latency']['max_us']/1e3, d['events_per_s'])")"
  done
  [ ${#busy[@]} -gt 0 ] && kill "${busy[@]}"
done
