#!/bin/bash
# Part of bench-results/wake.md: where the CPU goes in a paced run.
# Runs one harness run of EVENTS events (paced at RATE events/s; RATE 0: unpaced) against
# `SERVER --cores CORES`, samples every thread of both processes over one second in the middle
# of the run (/proc/PID/task/*/stat and schedstat), and prints per thread: CPU (% of one core),
# time spent runnable but waiting for a core (ms per second), voluntary and involuntary context
# switches per second. Then efr-load's verdict and latency, and the server's own latency from
# its efr_delivery_latency_seconds histogram and the batches it applied (server_latency.py;
# batches per second = batches-applied / wall).
# usage: thread_cpu.sh SERVER_BIN LOAD_BIN CORES RATE EVENTS
set -u
server=$1; load=$2; cores=$3; rate=$4; events=$5
port=$((20000 + RANDOM % 10000))
"$server" --cores "$cores" --event-port $port --client-port $((port + 1)) \
  --metrics-addr 127.0.0.1:$((port + 2)) 2>/dev/null &
spid=$!
for _ in $(seq 400); do (exec 3<>/dev/tcp/127.0.0.1/$((port + 2))) 2>/dev/null && break; sleep 0.05; done
pace=(); [ "$rate" != 0 ] && pace=(--rate "$rate")
"$load" --event-port $port --client-port $((port + 1)) --metrics-url 127.0.0.1:$((port + 2)) \
  --progress off --json /tmp/thread_cpu.json "${pace[@]}" harness --total-events "$events" \
  >/dev/null 2>&1 &
lpid=$!
snapshot() {
  for p in $spid $lpid; do
    for t in /proc/$p/task/*; do
      echo "$(basename $t) $(tr ' ' '_' < $t/comm) $(awk '{print $14 + $15}' $t/stat)" \
        "$(awk '{print $2}' $t/schedstat)" \
        "$(awk '/^voluntary_ctxt/ {v=$2} /^nonvoluntary_ctxt/ {n=$2} END {print v, n}' $t/status)"
    done
  done 2>/dev/null | sort
}
# The sample starts half a second after efr-load's reader thread appears (the run has begun).
for _ in $(seq 600); do grep -qs efr-load-reader /proc/$lpid/task/*/comm && break; sleep 0.05; done
sleep 0.5
snapshot > /tmp/thread_cpu.1; t1=$(date +%s.%N)
sleep 1
snapshot > /tmp/thread_cpu.2; t2=$(date +%s.%N)
wait $lpid
python3 - "$((port + 2))" "$t1" "$t2" <<'PY'
import json, sys
port, t1, t2 = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
hz, dt = 100, t2 - t1
# A thread that ended between the reads leaves a short line: skipped.
before = {l.split()[0]: l.split() for l in open("/tmp/thread_cpu.1") if len(l.split()) == 6}
for line in open("/tmp/thread_cpu.2"):
    if len(line.split()) != 6 or line.split()[0] not in before:
        continue
    tid, comm, ticks, wait, vol, invol = line.split()
    b = before[tid]
    cpu = (int(ticks) - int(b[2])) / hz / dt * 100
    if cpu < 0.5:
        continue
    print("  %-18s cpu %5.1f%%  runqueue wait %5.1f ms/s  switches/s: voluntary %6.0f involuntary %6.0f"
          % (comm, cpu, (int(wait) - int(b[3])) / 1e6 / dt, (int(vol) - int(b[4])) / dt,
             (int(invol) - int(b[5])) / dt))
d = json.load(open("/tmp/thread_cpu.json"))
l = d["latency"]
print("  efr-load: pass=%s events/s=%d wall=%.2fs p50=%.3fms p99=%.3fms p99.9=%.3fms"
      % (d["pass"], d["events_per_s"], d["wall_s"], l["p50_us"] / 1e3, l["p99_us"] / 1e3,
         l["p999_us"] / 1e3))
PY
python3 "$(dirname "$0")/server_latency.py" "$((port + 2))" | sed "s/^/  /"
kill $spid; wait $spid 2>/dev/null
