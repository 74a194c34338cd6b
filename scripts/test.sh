#!/usr/bin/env bash
# Install what the tests need (Debian packages, sockpol with its test extras) and run them all.
# Kernel tests need root; under CI=true a kernel test that cannot run fails instead of skipping.
# The VM tests (tests/vm, marker vm) boot Debian's kernels, 6.1 to the newest of trixie-backports
# (docs/kernels.md), under qemu and run the kernel and kTLS tests inside: they need qemu, busybox,
# kmod and virtme-ng (the `vm` extra), and the guest's tests use nginx, openssl and curl; about 25
# minutes on two cores. Leave them out with: ./scripts/test.sh -m "not vm"
# clang builds the benchmark's hand-written floor program and wrk drives the benchmarks' smoke
# runs (tests/test_bench_smoke.py).
# The server oracle (tests/servers) runs real servers: nginx, haproxy, apache2, tomcat10 (with a
# JRE) and nodejs; the tests start their own instances on free ports of 127.0.0.1.
# The `agent` extra (the kubernetes client, PyYAML) is for `sockpol agent`'s tests (tests/agent,
# tests/kernel/test_agent.py); kubernetes-validate (in `test`) checks deploy/ offline.
#   sudo ./scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
SOCKPOL_EXTRAS="[test,vm,agent]" bash scripts/setup.sh libbpf1 bpftool iproute2 python3-venv \
    qemu-system-x86 busybox-static kmod nginx openssl curl clang \
    haproxy apache2 tomcat10 nodejs wrk
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
