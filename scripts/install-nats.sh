#!/usr/bin/env bash
# Installs nats-server (the Debian package) when it is missing; the cluster tests and
# scripts/cluster.sh need it. Does nothing when nats-server is already on PATH.
set -euo pipefail
if command -v nats-server >/dev/null 2>&1; then
    echo "nats-server: $(nats-server --version)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-nats: nats-server is missing and apt-get is not available; install nats-server (2.9 or later) by hand" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
# Another apt run (or an unattended upgrade) may hold the lock for a while: wait for it.
$SUDO apt-get -o DPkg::Lock::Timeout=300 update -q
$SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -q nats-server
echo "nats-server: $(nats-server --version)"
