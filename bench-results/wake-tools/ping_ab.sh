#!/bin/bash
# Part of bench-results/wake.md: see there for how it was run.
# One-event-at-a-time round trips, old and new binaries side by side.
# usage: ping_ab.sh OLD_BIN NEW_BIN PING_BIN COUNT [CORES...]
old=$1; new=$2; ping=$3; count=${4:-3000}; shift 4
cores_list=${@:-1 2 8}
port=$((20000 + RANDOM % 10000))
for cores in $cores_list; do
  for which in old new; do
    bin=${!which}
    port=$((port+2))
    $bin --cores $cores --event-port $port --client-port $((port+1)) 2>/tmp/ping_ab_server_${cores}_${which}.log &
    pid=$!
    for i in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$((port+1))) 2>/dev/null && break; sleep 0.05; done
    echo "== $which"
    $ping $port $((port+1)) $cores $count
    kill $pid; wait $pid 2>/dev/null
  done
done
