#!/bin/bash
# The hostile-peer soak of bench-results/hostile.md: a verified efr-load --chaos harness run
# (EVENTS, default 10M) against efr-sharded --cores 2 while every attack runs at once: FLOODERS
# clients writing junk at full speed after their id, STALLED clients that never read (the
# harness's broadcasts fill their backlogs under --max-output-memory), IDLE connections that
# never identify (reopened as the server closes them). Prints the server's resident memory at
# start, at its peak, once the run ended and the attackers left, and the counters that show
# each defence at work. Run from the repository root after `cargo build --release`.
#   bench-results/hostile-soak.sh [EVENTS] [FLOODERS] [STALLED] [IDLE]
set -u
EVENTS=${1:-10000000}; FLOODERS=${2:-1}; STALLED=${3:-200}; IDLE=${4:-2000}
BIN=target/release/efr-sharded; LOAD=target/release/efr-load
ATTACK=bench-results/hostile-attack.py
LOG=${TMPDIR:-/tmp}/efr-hostile-soak.log
PORT=$((21000 + RANDOM % 10000))
metric() { curl -s "127.0.0.1:$((PORT + 2))/metrics" | awk -v name="efr_$1" '$1 == name {print $2}'; }
rss() { awk '/VmRSS/ {print $2 " kB"}' "/proc/$SERVER/status"; }
$BIN --cores 2 --event-port $PORT --client-port $((PORT + 1)) --metrics-addr 127.0.0.1:$((PORT + 2)) \
  --max-output-memory 256MiB >"$LOG" 2>&1 & SERVER=$!
until curl -s "127.0.0.1:$((PORT + 2))/metrics" >/dev/null; do sleep 0.1; done
echo "server RSS at start: $(rss)"
python3 $ATTACK flood 127.0.0.1:$((PORT + 1)) "$FLOODERS" >/dev/null 2>&1 & FLOOD=$!
python3 $ATTACK stall 127.0.0.1:$((PORT + 1)) "$STALLED" >/dev/null 2>&1 & STALL=$!
python3 $ATTACK idle 127.0.0.1:$((PORT + 1)) "$IDLE" >/dev/null 2>&1 & IDLERS=$!
until [ "$(metric clients_accepted)" -ge $((IDLE + STALLED)) ] 2>/dev/null; do sleep 0.2; done
echo "attackers connected: RSS $(rss)"
$LOAD --event-port $PORT --client-port $((PORT + 1)) --metrics-url 127.0.0.1:$((PORT + 2)) \
  --progress off --timeout 30000 --chaos harness --total-events "$EVENTS" 2>&1 \
  | grep -E '^  (Events|Notifications|Latency|Chaos|Result)'
echo "server peak RSS: $(awk '/VmHWM/ {print $2 " kB"}' /proc/$SERVER/status)"
kill $FLOOD $STALL $IDLERS; wait $FLOOD $STALL $IDLERS 2>/dev/null
until [ "$(metric clients_open)" = 0 ] 2>/dev/null; do sleep 0.2; done
sleep 1  # let freed memory go back to the system before reading RSS (a reading, not a wait for a condition)
echo "attackers gone, no client open: RSS $(rss)"
for name in clients_input_throttled clients_closed_output_memory clients_closed_write_timeout \
  clients_closed_backlog handshakes_evicted clients_closed_by_peer events_malformed lines_unparseable; do
  echo "  $name $(metric $name)"
done
kill -TERM $SERVER; wait $SERVER
