#!/usr/bin/env bash
# Runs the test suite (`cargo test --workspace --all-targets`) RUNS times in a row while two
# busy loops (`sh -c 'while :; do :; done'`) keep both cores of a 2-core machine busy, and
# stops at the first failure. This is how the suite is checked to be free of timing
# assumptions: every test waits for a condition with a generous deadline, so a loaded
# machine only makes it slower.
# usage: scripts/test-under-load.sh [RUNS] [BUSY_LOOPS]   (defaults: 10 runs, 2 loops)
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-10}
loops=${2:-2}
cargo test --workspace --all-targets --no-run >/dev/null 2>&1 || {
    echo "the tests do not build"; exit 1
}
busy=()
for _ in $(seq "$loops"); do sh -c 'while :; do :; done' & busy+=($!); done
trap 'kill "${busy[@]}" 2>/dev/null' EXIT
for run in $(seq "$runs"); do
    started=$SECONDS
    log=$(mktemp)
    if cargo test --workspace --all-targets >"$log" 2>&1; then
        echo "run $run/$runs: pass in $((SECONDS - started)) s (load $(cut -d' ' -f1-3 /proc/loadavg))"
        rm -f "$log"
    else
        echo "run $run/$runs: FAIL in $((SECONDS - started)) s; log kept in $log"
        grep -E "panicked|FAILED|failed" "$log" | head -20
        exit 1
    fi
done
echo "$runs runs in a row passed with $loops busy loops"
