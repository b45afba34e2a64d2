#!/bin/bash
# Part of bench-results/wake.md: latency at half of the measured peak.
# For each --cores value: the peak is the median events/s of RUNS unpaced harness runs of
# EVENTS events; then RUNS harness runs of EVENTS events paced at half that rate (--rate),
# reporting p50/p99/p99.9 of the per-notification latency (from each batch's scheduled time)
# as efr-load measures it, and the server's own share from its efr_delivery_latency_seconds
# histogram (source read -> end of the client write; interpolated within 1-2-5 buckets).
# With PIN=1, the server runs on CPU 0 and efr-load on CPU 1 (taskset): no time-sharing of a
# core between the two. With NICE_LOAD=1, efr-load runs at nice 19, so the scheduler lets the
# server's threads run first when both want a core. With PEAK=N, N is taken as the peak (no peak runs).
# With BUSY=2 in the environment, two busy loops (`sh -c 'while :; do :; done'`) load both
# cores during the paced runs (not during the peak runs).
# usage: paced.sh SERVER_BIN LOAD_BIN EVENTS RUNS CORES...
set -u
server=$1; load=$2; events=$3; runs=$4; shift 4
port=$((20000 + RANDOM % 10000))
one() { # cores json rate-or-empty
  port=$((port + 3))
  local pin_server=() pin_load=()
  [ -n "${PIN:-}" ] && pin_server=(taskset -c 0) && pin_load=(taskset -c 1)
  [ -n "${NICE_LOAD:-}" ] && pin_load=(nice -n 19 "${pin_load[@]}")
  "${pin_server[@]}" "$server" --cores "$1" --event-port $port --client-port $((port + 1)) \
    --metrics-addr 127.0.0.1:$((port + 2)) 2>/dev/null &
  local pid=$!
  for _ in $(seq 400); do (exec 3<>/dev/tcp/127.0.0.1/$((port + 2))) 2>/dev/null && break; sleep 0.05; done
  local rate=()
  [ -n "$3" ] && rate=(--rate "$3")
  "${pin_load[@]}" "$load" --event-port $port --client-port $((port + 1)) --metrics-url 127.0.0.1:$((port + 2)) \
    --progress off --json "$2" "${rate[@]}" harness --total-events "$events" >/dev/null 2>&1
  python3 "$(dirname "$0")/server_latency.py" "$((port + 2))" > "$2.server"
  kill $pid; wait $pid 2>/dev/null
}
field() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print($2)" "$1"; }
for cores in "$@"; do
  peaks=()
  for run in $(seq "$runs"); do
    [ -n "${PEAK:-}" ] && peaks=("$PEAK") && break
    j=/tmp/paced_peak_${cores}_$run.json; one "$cores" $j ""
    peaks+=("$(field $j "int(d['events_per_s']) if d['pass'] else 0")")
  done
  peak=$(printf '%s\n' "${peaks[@]}" | sort -n | sed -n "$(( (${#peaks[@]} + 1) / 2 ))p")
  half=$((peak / 2))
  echo "cores=$cores peak events/s runs: ${peaks[*]} -> median $peak; pacing at $half"
  busy=()
  for _ in $(seq "${BUSY:-0}"); do sh -c 'while :; do :; done' & busy+=($!); done
  for run in $(seq "$runs"); do
    j=/tmp/paced_half_${cores}_$run.json; one "$cores" $j $half
    echo "cores=$cores busy=${BUSY:-0} run=$run rate=$half: $(field $j "'pass=%s p50=%.3fms p99=%.3fms p99.9=%.3fms max=%.3fms events/s=%d' % (d['pass'], d['latency']['p50_us']/1e3, d['latency']['p99_us']/1e3, d['latency']['p999_us']/1e3, d['latency']['max_us']/1e3, d['events_per_s'])"); $(cat $j.server)"
  done
  [ ${#busy[@]} -gt 0 ] && kill "${busy[@]}"
done
