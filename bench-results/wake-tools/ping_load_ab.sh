#!/bin/bash
# Part of bench-results/wake.md: ping round trips (efr-load ping --count 3000) of several server commands, alternated run by run.
# usage: ping_load_ab.sh RUNS CORES NAME=CMD ...   (efr-load path: EFR_LOAD, default target/release/efr-load)
runs=$1; cores=$2; shift 2
port=$((40000 + RANDOM % 10000))
for run in $(seq $runs); do
  for spec in "$@"; do
    name=${spec%%=*}; cmd=${spec#*=}; port=$((port+2))
    $cmd --cores $cores --event-port $port --client-port $((port+1)) 2>/dev/null & pid=$!
    for t in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$((port+1))) 2>/dev/null && break; sleep 0.05; done
    rm -f /tmp/ping_load_ab_$name.json; ${EFR_LOAD:-target/release/efr-load} --event-port $port --client-port $((port+1)) --progress plain --json /tmp/ping_load_ab_$name.json ping --count 3000 >/dev/null 2>&1
    python3 -c "
import json; d=json.load(open('/tmp/ping_load_ab_$name.json'))
l=d['latency']
print('cores=$cores run=$run $name: pass=%s' % d['pass'], {k:v for k,v in l.items() if k in ('p50_us','p99_us','p999_us','max_us')})"
    kill $pid; wait $pid 2>/dev/null
  done
done
