#!/usr/bin/env bash
# The soak of issue 5: efr-sharded --cores 2 against efr-load --chaos harness, with the
# server's RSS sampled from /proc/PID/status every SAMPLE_S seconds.
#
#   bench-results/soak.sh [TOTAL_EVENTS]          (default 100000000)
#
# Environment: EVENT_PORT, CLIENT_PORT, METRICS_PORT (defaults 21190, 21199, 21191: below the ephemeral port range, so no outgoing connection holds them),
# SAMPLE_S (2), OUT (bench-results/soak-out), CHAOS_FLAGS (global efr-load flags, default
# --chaos; set it empty for the baseline without faults). Needs `cargo build --release` first.
# Writes to OUT: server.log, rss.tsv (seconds since server start, VmRSS KiB), load.txt (the
# efr-load summary), load.json, metrics-end.txt (the server's counters after the run).
set -u
cd "$(dirname "$0")/.."
TOTAL=${1:-100000000}
EVENT_PORT=${EVENT_PORT:-21190}
CLIENT_PORT=${CLIENT_PORT:-21199}
METRICS_PORT=${METRICS_PORT:-21191}
SAMPLE_S=${SAMPLE_S:-2}
OUT=${OUT:-bench-results/soak-out}
read -r -a CHAOS_FLAGS <<<"${CHAOS_FLAGS---chaos}"
mkdir -p "$OUT"

target/release/efr-sharded --cores 2 --event-port "$EVENT_PORT" --client-port "$CLIENT_PORT" \
    --metrics-addr "127.0.0.1:$METRICS_PORT" >"$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null' EXIT
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$METRICS_PORT/metrics" >/dev/null && break
    sleep 0.1
done

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$SERVER/status" 2>/dev/null; }
T0=$(date +%s.%N)
(
    while kill -0 "$SERVER" 2>/dev/null; do
        printf '%.1f\t%s\n' "$(echo "$(date +%s.%N) - $T0" | bc)" "$(rss_kib)"
        sleep "$SAMPLE_S"
    done
) >"$OUT/rss.tsv" &
SAMPLER=$!
sleep "$SAMPLE_S"
RSS_BEFORE=$(rss_kib)

CMD=(target/release/efr-load --event-port "$EVENT_PORT" --client-port "$CLIENT_PORT"
     --progress plain --json "$OUT/load.json" "${CHAOS_FLAGS[@]}" harness --total-events "$TOTAL")
echo "command: ${CMD[*]}"
START=$(date +%s.%N)
"${CMD[@]}" | tee "$OUT/load.txt"
STATUS=${PIPESTATUS[0]}
END=$(date +%s.%N)
sleep "$SAMPLE_S"
RSS_AFTER=$(rss_kib)
curl -sf "http://127.0.0.1:$METRICS_PORT/metrics" | grep -v '^#' >"$OUT/metrics-end.txt"
kill "$SAMPLER" 2>/dev/null
wait "$SAMPLER" 2>/dev/null

PEAK=$(awk -F'\t' '$2 > m {m = $2} END {print m}' "$OUT/rss.tsv")
echo
echo "soak: $TOTAL events, efr-load exit status $STATUS, wall $(printf "%.1f" "$(echo "$END - $START" | bc)") s"
echo "server RSS KiB: before the run $RSS_BEFORE, peak $PEAK, after the run $RSS_AFTER" \
     "($(wc -l <"$OUT/rss.tsv") samples every ${SAMPLE_S}s in $OUT/rss.tsv)"
echo "server counters after the run:"
sed 's/^/  /' "$OUT/metrics-end.txt"
kill -TERM "$SERVER"
wait "$SERVER"
echo "server exit status $?"
trap - EXIT
exit "$STATUS"
