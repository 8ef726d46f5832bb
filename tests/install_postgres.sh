#!/usr/bin/env bash
# Install Debian's PostgreSQL server for the Prefect-on-PostgreSQL tests and `make prefect-postgres`.
# Idempotent and non-interactive; exits at once when initdb is already there. Nothing is started here:
# `distill postgres start` (or the tests) create and start their own clusters.
set -euo pipefail

if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo -n"  # never prompt: fail instead
    else
        echo "install_postgres.sh: need root (or sudo) to apt-get install postgresql" >&2
        exit 1
    fi
fi

$SUDO apt-get update -q
# policy-rc.d keeps the package from starting (and keeping) a cluster of its own on port 5432
echo 'exit 101' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
$SUDO chmod +x /usr/sbin/policy-rc.d
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql
$SUDO rm -f /usr/sbin/policy-rc.d

ls /usr/lib/postgresql/*/bin/initdb
