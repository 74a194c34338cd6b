#!/usr/bin/env bash
# Shared setup for demo.sh and test.sh: Debian packages, a virtualenv in .venv with sockpol, bpffs.
# Idempotent; needs root (it installs packages and later loads BPF programs).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "sockpol: run as root (it installs packages and loads BPF programs)" >&2
    exit 1
fi

need_apt=()
for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if [ "${#need_apt[@]}" -gt 0 ]; then
    echo "== installing Debian packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv with $($PYTHON --version)"
    $PYTHON -m venv .venv
fi
echo "== installing sockpol into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${SOCKPOL_EXTRAS:-}"

if ! mount | grep -q " /sys/fs/bpf type bpf"; then
    mount -t bpf bpf /sys/fs/bpf
fi
