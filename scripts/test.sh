#!/usr/bin/env bash
# Install what the tests need (Debian packages, sockpol with its test extras) and run them all.
# Kernel tests need root; under CI=true a kernel test that cannot run fails instead of skipping.
#   sudo ./scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
SOCKPOL_EXTRAS="[test]" bash scripts/setup.sh libbpf1 bpftool iproute2 python3-venv
echo "== ruff"
.venv/bin/ruff check sockpol tests
echo "== pytest"
set +e
.venv/bin/python -m pytest -ra "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests" >&2
    exit 1
fi
exit "$status"
