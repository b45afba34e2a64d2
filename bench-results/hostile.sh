#!/bin/bash
# The hostile-peer measurements of bench-results/hostile.md, run from the repository root after
# `cargo build --release`. Each starts its own server (release build, --cores 2) on fixed ports.
#   bench-results/hostile.sh flood    [SERVER_BINARY] [ROUNDS]   harness 300k/100 clients, without and with 1 flooder, alternating
#   bench-results/hostile.sh stall    [SERVER_BINARY]            400 stalled clients, 3M broadcasts, --max-output-memory 256MiB
#   bench-results/hostile.sh idle     [SERVER_BINARY]            19,000 idle connections kept open, then harness 300k/100 clients
#   bench-results/hostile.sh shutdown [SERVER_BINARY]            200 stalled clients, 5 s of broadcasts, SIGTERM, --shutdown-timeout-ms 3000
set -u
MODE=$1; BIN=${2:-target/release/efr-sharded}
ATTACK=bench-results/hostile-attack.py
LOAD=target/release/efr-load
LOG=${TMPDIR:-/tmp}/efr-hostile-server.log
metric() { curl -s "127.0.0.1:$1/metrics" | awk -v name="efr_$2" '$1 == name {print $2}'; }
case $MODE in
flood)
  $BIN --cores 2 --event-port 19090 --client-port 19099 >"$LOG" 2>&1 & SERVER=$!
  sleep 1
  for round in $(seq 1 "${3:-5}"); do
    for mode in clean flood; do
      if [ $mode = flood ]; then python3 $ATTACK flood 127.0.0.1:19099 1 >/dev/null 2>&1 & FLOODER=$!; sleep 1; fi
      out=$(timeout 60 $LOAD harness --total-events 300000 --concurrency 100 --event-port 19090 \
        --client-port 19099 --timeout 10000 --progress off 2>&1)
      echo "round $round $mode: $(echo "$out" | grep -E '^  (Events|Notifications|Result)' | tr -s ' ' | tr '\n' ' ')"
      if [ $mode = flood ]; then kill $FLOODER; wait $FLOODER 2>/dev/null; fi
    done
  done
  kill -TERM $SERVER; wait $SERVER ;;
stall)
  $BIN --cores 2 --event-port 19190 --client-port 19199 --metrics-addr 127.0.0.1:19191 \
    --max-output-memory 256MiB >"$LOG" 2>&1 & SERVER=$!
  sleep 1
  python3 $ATTACK stall 127.0.0.1:19199 400 & STALL=$!
  sleep 2
  python3 $ATTACK broadcast 127.0.0.1:19190 127.0.0.1:19199 3000000
  grep VmHWM /proc/$SERVER/status
  echo "closed for the budget: $(metric 19191 clients_closed_output_memory)"
  kill $STALL; wait $STALL 2>/dev/null
  kill -TERM $SERVER; wait $SERVER ;;
idle)
  $BIN --cores 2 --event-port 19290 --client-port 19299 --metrics-addr 127.0.0.1:19291 >"$LOG" 2>&1 & SERVER=$!
  sleep 1
  python3 $ATTACK idle 127.0.0.1:19299 19000 >/dev/null 2>&1 & IDLE=$!
  until [ "$(metric 19291 clients_accepted)" -ge 19000 ] 2>/dev/null; do sleep 0.2; done
  grep VmRSS /proc/$SERVER/status
  timeout 120 $LOAD harness --total-events 300000 --concurrency 100 --event-port 19290 --client-port 19299 \
    --timeout 10000 --progress off 2>&1 | grep -E '^  (Events|Notifications|Result)'
  echo "handshakes open $(metric 19291 handshakes_open), evicted $(metric 19291 handshakes_evicted)"
  grep VmHWM /proc/$SERVER/status
  kill $IDLE; wait $IDLE 2>/dev/null
  kill -TERM $SERVER; wait $SERVER ;;
shutdown)
  $BIN --cores 2 --event-port 19390 --client-port 19399 --shutdown-timeout-ms 3000 >"$LOG" 2>&1 & SERVER=$!
  sleep 1
  python3 $ATTACK stall 127.0.0.1:19399 200 & STALL=$!
  sleep 2
  timeout 5 python3 -c '
import socket, sys
s = socket.create_connection(("127.0.0.1", 19390)); seq = 1
while True:
    s.sendall(b"".join(b"%d|B\n" % (seq + i) for i in range(1000))); seq += 1000'
  echo "rss before SIGTERM: $(grep VmRSS /proc/$SERVER/status)"
  started=$(date +%s.%N); kill -TERM $SERVER; wait $SERVER; code=$?
  echo "exit $code after $(echo "$(date +%s.%N) - $started" | bc) s (deadline 3 s)"
  kill $STALL; wait $STALL 2>/dev/null ;;
esac
