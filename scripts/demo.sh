#!/usr/bin/env bash
# Set up sockpol and run the main job: compile an example policy and enforce it on live loopback
# traffic from a temporary cgroup, showing which requests passed and which were refused.
#   sudo ./scripts/demo.sh [POLICY.pol]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh libbpf1 python3-venv
policy=${1:-examples/orders-api.pol}
echo "== compiling $policy"
.venv/bin/sockpol compile "$policy" -o /tmp/sockpol-demo.bpf.o --stats
echo "== enforcing it on live traffic"
exec .venv/bin/sockpol demo "$policy"
