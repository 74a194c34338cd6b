#!/usr/bin/env bash
# Run both benchmarks and keep their results in bench/results/ (see bench/README.md).
#   sudo bench/run.sh                      # full: 10/100/1,000/10,000 rules; 3 x 10 s HTTP rounds
#   sudo bench/run.sh --quick              # tiny sizes, 1 s runs: proves the scripts work
# Installs what it needs from Debian (wrk, nginx, haproxy, libbpf1, bpftool); traffic stays on
# 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "bench: run as root (it installs packages, makes cgroups and loads BPF programs)" >&2
    exit 1
fi
need=()
for pkg in wrk nginx haproxy libbpf1 bpftool; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
    echo "== installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The packaged nginx and haproxy services are not used (the benchmark starts its own on
# 127.0.0.1 with its own configuration); stop them if the install started them.
systemctl stop nginx haproxy 2>/dev/null || true
mount | grep -q " /sys/fs/bpf type bpf" || mount -t bpf bpf /sys/fs/bpf

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] && PYTHON=.venv/bin/python
out=bench/results
mkdir -p "$out"
if [ "${1:-}" = "--quick" ]; then
    compile_args=(--sizes 10,40 --repeat 1)
    http_args=(--sizes 10,40 --duration 1 --rounds 1 --requests 8)
    out=$(mktemp -d)
else
    compile_args=()
    http_args=()
fi
echo "== machine: $(nproc) CPUs, $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== compile benchmark"
$PYTHON bench/compile_bench.py "${compile_args[@]}" --out "$out/compile.json"
echo "== HTTP benchmark"
$PYTHON bench/http_bench.py "${http_args[@]}" --out "$out/http.json"
echo "== results in $out"
