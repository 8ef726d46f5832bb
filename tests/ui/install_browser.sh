#!/usr/bin/env bash
# Install Debian's chromium for tests/test_ui_browser.py (Playwright drives it; it never downloads browsers).
# Idempotent and non-interactive; exits at once when chromium is already there.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo -n"  # never prompt: fail instead
    else
        echo "install_browser.sh: need root (or sudo) to apt-get install chromium" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium fonts-liberation

/usr/bin/chromium --version
