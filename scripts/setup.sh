#!/usr/bin/env bash
# Create .venv and install metalearn into it (with the test tools when given "test").
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
if [ "${1:-}" = "test" ]; then extras="[test]"; fi

if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# Pinned on purpose: an unpinned torch pulls a multi-GB CUDA build. On a machine
# without the CPU wheel at hand, add: --index-url https://download.pytorch.org/whl/cpu
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".${extras}"

if [ "${1:-}" = "test" ]; then
    # System packages the tests use: a real Redis (shared sessions), nginx
    # (deploy/nginx.conf in front of two replicas) and Chromium (renders /docs
    # offline). Installed only where missing.
    missing=()
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    if [ "${#missing[@]}" -gt 0 ]; then
        if [ "$(id -u)" = "0" ]; then
            apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
            if [[ " ${missing[*]} " == *" nginx-light "* ]]; then
                # Where systemd runs, the package starts a web server on every interface's port 80:
                # the tests start their own nginx on loopback, so stop that one and keep it off.
                (systemctl disable --now nginx || service nginx stop) >/dev/null 2>&1 || true
            fi
        else
            echo "note: ${missing[*]} not installed (need root: apt-get install ${missing[*]}); those tests will be skipped" >&2
        fi
    fi
fi
