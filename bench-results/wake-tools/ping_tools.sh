#!/bin/bash
# Part of bench-results/wake.md: see there for how it was run.
# Round trips, one event at a time, measured by two efr-load binaries side by side: the old
# one (ping through the generic source thread + reader thread) and the new one (a dedicated
# round-trip loop; also with --spin), against one efr-sharded per --cores value and against
# `efr-load relay` (the floor: loopback TCP + wake-ups, no server work). Runs alternate tool by
# tool, RUNS rounds, so machine load hits every tool alike.
# usage: ping_tools.sh OLD_EFR_LOAD NEW_EFR_LOAD EFR_SHARDED [COUNT] [RUNS] [CORES...]
# optional: WAKE_PING=target/release/examples/wake_ping adds the hand-written pinger
# (examples/wake_ping.rs; its line for the user on shard 0) beside them.
set -u
old=$1; new=$2; server=$3; count=${4:-3000}; runs=${5:-3}; shift 3; shift $(( $# > 0 ? 1 : 0 )); shift $(( $# > 0 ? 1 : 0 ))
cores_list=${@:-1 2 8}
port=$((20000 + RANDOM % 10000))
out=$(mktemp -d)
wait_port() { for i in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.05; done; return 1; }
# one TOOL_NAME BIN EVENT_PORT CLIENT_PORT [METRICS] [PING FLAGS...]: prints "p50 p99" in us
one() {
  local name=$1 bin=$2 ep=$3 cp=$4 metrics=$5; shift 5
  local m=(--metrics-url "127.0.0.1:$metrics")
  "$bin" --event-port "$ep" --client-port "$cp" "${m[@]}" --progress off --json "$out/r.json" \
    ping --count "$count" "$@" >"$out/r.txt" || { echo "$name FAIL"; cat "$out/r.txt"; return; }
  python3 -c "import json;l=json.load(open('$out/r.json'))['latency'];print('%s p50 %.0f p99 %.0f p99.9 %.0f' % ('$name', l['p50_us'], l['p99_us'], l['p999_us']))"
}
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for target in $cores_list floor; do
  port=$((port+3))
  if [ "$target" = floor ]; then
    "$new" relay --listen-event-port $port --listen-client-port $((port+1)) \
      --listen-metrics-port $((port+2)) >/dev/null &
  else
    "$server" --cores "$target" --event-port $port --client-port $((port+1)) \
      --metrics-addr 127.0.0.1:$((port+2)) 2>"$out/server.log" &
  fi
  pid=$!; metrics=$((port+2))
  wait_port $((port+1)) || { echo "$target: server did not start"; kill $pid; continue; }
  echo "== ${target/#[0-9]*/--cores $target}"
  for r in $(seq "$runs"); do
    one old "$old" $port $((port+1)) "$metrics"
    one new "$new" $port $((port+1)) "$metrics"
    one new-spin "$new" $port $((port+1)) "$metrics" --spin
    if [ -n "${WAKE_PING:-}" ] && [ "$target" != floor ]; then
      "$WAKE_PING" $port $((port+1)) "$target" "$count" | sed -n '1s/^/wake_ping /p'
    fi
  done
  kill $pid; wait $pid 2>/dev/null
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
rm -rf "$out"
