#!/usr/bin/env bash
# Install the Debian packages the tests need besides chromium: PostgreSQL (Prefect on PostgreSQL, `make
# prefect-postgres`) and docker-compose (`docker-compose config` checks docker/compose.yaml without a daemon).
# Idempotent and non-interactive; exits at once when both are there. Nothing is started here: `distill
# postgres start` (or the tests) create and start their own clusters.
set -euo pipefail

want=()
command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || want+=(postgresql)
command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || want+=(docker-compose)
if [ ${#want[@]} -eq 0 ]; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo -n"  # never prompt: fail instead
    else
        echo "install_packages.sh: need root (or sudo) to apt-get install ${want[*]}" >&2
        exit 1
    fi
fi

$SUDO apt-get update -q
# policy-rc.d keeps the package from starting (and keeping) a cluster of its own on port 5432
echo 'exit 101' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
$SUDO chmod +x /usr/sbin/policy-rc.d
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${want[@]}"
$SUDO rm -f /usr/sbin/policy-rc.d
