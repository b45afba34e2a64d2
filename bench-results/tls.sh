#!/usr/bin/env bash
# Plaintext against TLS on both ports with a token per client and mutual TLS for the source:
# efr-load harness runs against a fresh efr-sharded each, alternating plain and TLS, RUNS
# of each per core count. Prints one tab-separated line per run:
#   cores mode run events_per_s wall_s efr_load_cpu_s server_cpu_s pass
# Usage: bash bench-results/tls.sh [EVENTS] [RUNS] [CORES...]   (from the repository root,
# after `cargo build --release`)
set -euo pipefail
EVENTS=${1:-1000000}
RUNS=${2:-3}
shift 2 || true
CORES=("${@:-2}")
[ ${#CORES[@]} -gt 0 ] || CORES=(2)
BIN=target/release
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# A CA, a server certificate for localhost, the source's client certificate, an HS256 secret.
cd "$WORK"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=efr-bench-ca -keyout ca.key -out ca.pem 2>/dev/null
for who in server source; do
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$who" \
        -addext subjectAltName=DNS:localhost -keyout $who.key -out $who.csr 2>/dev/null
    openssl x509 -req -in $who.csr -CA ca.pem -CAkey ca.key -copy_extensions copy \
        -days 2 -out $who.pem 2>/dev/null
done
head -c 48 /dev/urandom | base64 > jwt.key
cd - >/dev/null

cpu_s() { # user+system CPU of a process, seconds
    awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"
}

run_one() { # cores mode run
    local cores=$1 mode=$2 run=$3 base=$((20000 + RANDOM % 20000))
    local server_flags=() load_flags=()
    if [ "$mode" = tls ]; then
        server_flags=(--tls-cert "$WORK/server.pem" --tls-key "$WORK/server.key"
            --source-client-ca "$WORK/ca.pem" --client-jwt-key "$WORK/jwt.key")
        load_flags=(--tls-ca "$WORK/ca.pem" --client-cert "$WORK/source.pem"
            --client-key "$WORK/source.key" --jwt-key "$WORK/jwt.key")
    fi
    "$BIN/efr-sharded" --cores "$cores" --event-port $base --client-port $((base + 1)) \
        --metrics-addr 127.0.0.1:$((base + 2)) "${server_flags[@]}" \
        >"$WORK/server.log" 2>&1 &
    local pid=$!
    for _ in $(seq 200); do
        curl -sf "http://127.0.0.1:$((base + 2))/metrics" >/dev/null 2>&1 && break
        sleep 0.05
    done
    local cpu0
    cpu0=$(cpu_s $pid)
    "$BIN/efr-load" --event-port $base --client-port $((base + 1)) \
        --metrics-url 127.0.0.1:$((base + 2)) --progress off --json "$WORK/run.json" \
        "${load_flags[@]}" harness --total-events "$EVENTS" >"$WORK/load.txt" 2>&1 || true
    local cpu1
    cpu1=$(cpu_s $pid)
    kill $pid
    wait $pid 2>/dev/null || true
    jq -r --arg c "$cores" --arg m "$mode" --arg r "$run" --arg s "$(echo "$cpu1 - $cpu0" | bc -l)" \
        '[$c, $m, $r, (.events_per_s|floor), (.wall_s*100|floor/100),
          ((.cpu_user_s + .cpu_sys_s)*100|floor/100), ($s|tonumber*100|floor/100), .pass]
         | @tsv' "$WORK/run.json"
}

echo "# load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for cores in "${CORES[@]}"; do
    for run in $(seq "$RUNS"); do
        run_one "$cores" plain "$run"
        run_one "$cores" tls "$run"
    done
done
echo "# load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
