#!/bin/bash
# Part of bench-results/wake.md: see there for how it was run.
# Throughput of several server commands, interleaved run by run, same efr-load.
# usage: tput_abc.sh LOAD_BIN RUNS CORES "NAME=CMD" ... -- WORKLOAD...
load=$1; runs=$2; cores=$3; shift 3
names=(); cmds=()
while [ "$1" != "--" ]; do names+=("${1%%=*}"); cmds+=("${1#*=}"); shift; done; shift
port=$((20000 + RANDOM % 10000))
for run in $(seq $runs); do
  for i in "${!names[@]}"; do
    port=$((port+2))
    ${cmds[$i]} --cores $cores --event-port $port --client-port $((port+1)) 2>/dev/null &
    pid=$!
    for t in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$((port+1))) 2>/dev/null && break; sleep 0.05; done
    json=/tmp/tput_${names[$i]}_${cores}_${run}.json
    $load --event-port $port --client-port $((port+1)) --progress plain --json $json "$@" >/dev/null 2>&1
    python3 -c "
import json; d=json.load(open('$json'))
print('cores=$cores run=$run ${names[$i]}: pass=%s wall=%.2fs notifications/s=%.2fM' % (d['pass'], d['wall_s'], d['notifications_per_s']/1e6))"
    kill $pid; wait $pid 2>/dev/null
  done
done
