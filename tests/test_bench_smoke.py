"""The benchmark scripts run (tiny sizes, no timing assertions): bench/README.md has the numbers."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import compile_bench  # noqa: E402
import http_bench  # noqa: E402
from policies import api_rules, haproxy_acls, policy_text, requests  # noqa: E402

from sockpol.codegen.lower import lower  # noqa: E402
from sockpol.codegen.simulate import run  # noqa: E402
from sockpol.dsl import load_source  # noqa: E402


@pytest.mark.parametrize("n", [4, 10, 57])
def test_generated_policies_are_valid_and_allow_their_requests(n):
    rules = api_rules(n)
    assert len(rules) == n
    policy_file, warnings = load_source(policy_text("p", 8080, rules), "p.pol")
    ir = lower(policy_file.policies[0])
    mix = http_bench.allowed_mix(rules, 20)
    assert mix and len(mix) >= len(requests(rules, 20)) // 2
    for method, path, headers in mix:
        head = f"{method} {path} HTTP/1.1\r\nHost: h\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        assert run(ir, head.encode()).allow
    acls = haproxy_acls(rules)
    assert len(acls) == n + 1 and acls[-1].strip() == "http-request deny"


def test_compile_bench_runs(tmp_path, capsys):
    out = tmp_path / "compile.json"
    assert compile_bench.main(["--sizes", "10,20", "--repeat", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["rules"] for r in rows] == [10, 20]
    assert all("error" not in r and r["object_bytes"] > 0 for r in rows), rows
    assert "| rules |" in capsys.readouterr().out


def test_wrk_output_is_parsed():
    out = """Running 1s test @ http://127.0.0.1:18080/
  Latency Distribution
     50%  196.00us
     90%    1.63ms
     99%    1.20s
  49658 requests in 1.00s, 7.00MB read
  Non-2xx or 3xx responses: 3
Requests/sec:  49658.31
"""
    got = http_bench.parse_wrk(out)
    assert (got["rps"], got["p50_ms"], got["p90_ms"], got["p99_ms"]) == (
        49658.31,
        0.196,
        1.63,
        1200,
    )
    assert "non2xx 3" in got["errors"]
    script = http_bench.wrk_script([("GET", "/a", {}), ("POST", "/b", {"x": "1"})])
    assert 'wrk.format("POST", "/b", {["x"] = "1"})' in script and "function init" in script


@pytest.mark.skipif(
    os.geteuid() != 0 or any(shutil.which(t) is None for t in ("wrk", "nginx", "haproxy")),
    reason="needs root, wrk, nginx and haproxy (bench/run.sh installs them)",
)
def test_http_bench_runs(tmp_path):
    out = tmp_path / "http.json"
    args = ["--sizes", "4", "--duration", "1", "--rounds", "1", "--requests", "4"]
    assert (
        http_bench.main([*args, "--port", "18380", "--proxy-port", "18381", "--out", str(out)]) == 0
    )
    rows = {r["config"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"none", "sockpol-4", "haproxy-4"}
    assert all(r["rps"] > 0 and not r["errors"] for r in rows.values()), rows
