#!/usr/bin/env bash
# Starts an efr cluster on this machine to try it: nats-server (JetStream, a store in a
# temporary directory), one ingest and N edges. Ctrl-C stops everything.
#
#   scripts/cluster.sh [EDGES]        (default 3)
#
# Environment: NATS_PORT (4222), EVENT_PORT (9090), FIRST_CLIENT_PORT (9101: edge i listens on
# FIRST_CLIENT_PORT + i), EDGE_CORES (1), STREAM (EFR), EFR_BIN (target/release/efr-sharded,
# built when missing), RESUME (set to 1 for --resume). Other EFR_* variables reach every node.
# A source connects to EVENT_PORT; clients to any edge port, e.g.:
#   efr-load harness --event-port 9090 --client-ports 9101,9102,9103
set -euo pipefail
cd "$(dirname "$0")/.."

EDGES="${1:-3}"
NATS_PORT="${NATS_PORT:-4222}"
EVENT_PORT="${EVENT_PORT:-9090}"
FIRST_CLIENT_PORT="${FIRST_CLIENT_PORT:-9101}"
EDGE_CORES="${EDGE_CORES:-1}"
STREAM="${STREAM:-EFR}"
EFR_BIN="${EFR_BIN:-target/release/efr-sharded}"

command -v nats-server >/dev/null || {
    echo "nats-server is missing: run scripts/install-nats.sh" >&2
    exit 1
}
if [ ! -x "$EFR_BIN" ]; then
    cargo build --release --bin efr-sharded
fi

DIR="$(mktemp -d -t efr-cluster-XXXXXX)"
PIDS=()
stop() {
    trap - INT TERM EXIT
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$DIR"
}
trap stop INT TERM EXIT

nats-server -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$DIR/store" --ports_file_dir "$DIR" \
    2>"$DIR/nats.log" &
NATS_PID=$!
PIDS+=("$NATS_PID")
for _ in $(seq 1 500); do
    [ -e "$DIR/nats-server_${NATS_PID}.ports" ] && break
    kill -0 "$NATS_PID" 2>/dev/null || { cat "$DIR/nats.log" >&2; exit 1; }
    sleep 0.02
done
[ -e "$DIR/nats-server_${NATS_PID}.ports" ] || { echo "nats-server did not start" >&2; exit 1; }
NATS_URL="nats://127.0.0.1:$NATS_PORT"
echo "nats-server on $NATS_URL (store $DIR/store, log $DIR/nats.log)"

COMMON=(--nats "$NATS_URL" --nats-stream "$STREAM")
INGEST=("$EFR_BIN" --role ingest --event-port "$EVENT_PORT" "${COMMON[@]}")
if [ "${RESUME:-0}" = 1 ]; then
    INGEST+=(--resume)
fi
"${INGEST[@]}" 2>"$DIR/ingest.log" &
PIDS+=("$!")
PORTS=()
for i in $(seq 0 $((EDGES - 1))); do
    port=$((FIRST_CLIENT_PORT + i))
    "$EFR_BIN" --role edge --cores "$EDGE_CORES" --client-port "$port" "${COMMON[@]}" \
        2>"$DIR/edge-$i.log" &
    PIDS+=("$!")
    PORTS+=("$port")
done
echo "ingest: events on 127.0.0.1:$EVENT_PORT (log $DIR/ingest.log)"
echo "edges: clients on ports $(IFS=,; echo "${PORTS[*]}") (logs $DIR/edge-*.log)"
echo "Ctrl-C stops the cluster."
# Ends when any node ends (or at Ctrl-C); the trap stops the rest.
wait -n "${PIDS[@]}"
echo "a node ended; stopping the cluster" >&2
