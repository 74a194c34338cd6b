#!/usr/bin/env bash
# Run the benchmarks and keep their results in bench/results/ (see bench/README.md).
#   sudo bench/run.sh                      # full: 10/100/1,000/10,000 rules; 3 x 10 s HTTP rounds
#   sudo bench/run.sh --quick              # tiny sizes, 1 s runs: proves the scripts work
#   sudo bench/run.sh [--quick] ARGS...    # ARGS go to every http_bench.py run (e.g. --port 18180)
# Installs what it needs from Debian (wrk, nginx, haproxy, libbpf1, bpftool, clang for the floor
# program); traffic stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

# Packages, .venv with sockpol, bpffs: the same setup as demo.sh and test.sh.
bash scripts/setup.sh wrk nginx haproxy libbpf1 bpftool clang
# The packaged nginx and haproxy services are not used (the benchmark starts its own on
# 127.0.0.1 with its own configuration); stop them if the install started them.
systemctl stop nginx haproxy 2>/dev/null || true
PYTHON=.venv/bin/python
out=bench/results
mkdir -p "$out"
if [ "${1:-}" = "--quick" ]; then
    shift
    compile_args=(--sizes 10,40 --repeat 1)
    http_args=(--sizes 10,40 --duration 1 --rounds 1)
    heads_args=(--sizes 10 --duration 1 --rounds 1 --head-sizes 100,2000)
    policy_args=(--requests 8)
    reload_args=(--sizes 10,40 --repeat 1 --duration 1)
    answer_args=(--rounds 1 --duration 1)
    agent_args=(--pods 3 --latency-repeat 2)
    out=$(mktemp -d)
else
    compile_args=()
    http_args=()
    heads_args=(--sizes 10 --head-sizes 100,500,2000)
    policy_args=()
    reload_args=()
    answer_args=()
    agent_args=()
fi
echo "== machine: $(nproc) CPUs, $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== compile benchmark"
$PYTHON bench/compile_bench.py "${compile_args[@]}" --out "$out/compile.json"
echo "== HTTP benchmark: the issue's mix (none, floor, sockpol-N, haproxy-N; ns per program run)"
$PYTHON bench/http_bench.py "${http_args[@]}" "$@" --out "$out/http.json"
echo "== HTTP benchmark: ns per program run by head size (heads padded with an X-Pad header)"
$PYTHON bench/http_bench.py "${heads_args[@]}" --configs none,floor,sockpol "$@" \
    --out "$out/http-heads.json"
echo "== HTTP benchmark: requests drawn from all over the policy"
$PYTHON bench/http_bench.py "${http_args[@]}" "${policy_args[@]}" --mix policy "$@" \
    --out "$out/http-policy.json"
echo "== reload benchmark: latency by size, and a reload storm under traffic"
$PYTHON bench/reload_bench.py "${reload_args[@]}" --out "$out/reload.json"
echo "== refusal benchmark: allowed against answered (403) and dropped refusals"
$PYTHON bench/answer_bench.py "${answer_args[@]}" --out "$out/answer.json"
echo "== agent benchmark: reconcile passes with N pods, and a new pod's mkdir-to-load time"
$PYTHON bench/agent_bench.py "${agent_args[@]}" --out "$out/agent.json"
echo "== results in $out"
