"""A 10,000-rule policy in the real kernel: it loads (the verifier accepts the same program as
for 10 rules) and judges requests decided by rules from all over the file, the last ones
included. Compile time is a benchmark (bench/README.md), not asserted here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sockpol import runtime
from sockpol.codegen.simulate import run as simulate
from sockpol.compiler import compile_source

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.policies import api_rules, policy_text, requests  # noqa: E402

pytestmark = pytest.mark.kernel

N_RULES = 10_000


def request(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    body = b""
    if method in ("POST", "PUT", "PATCH"):
        body = b"{}"
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def test_ten_thousand_rules_load_and_judge_like_the_tables(
    tmp_path, cgroup, http_server, http_client
):
    rules = api_rules(N_RULES)
    text = policy_text("t-scale", http_server.port, rules)
    (compiled,), _ = compile_source(text, "scale.pol")
    obj = tmp_path / "scale.o"
    obj.write_bytes(compiled.object_code())
    allowed = [request(m, p, h) for m, p, h in requests(rules, 40)]
    # Refused: a denied admin area, a DELETE (denied per resource), the catch-all deny.
    admin = next(r.path for r in rules if r.path.endswith("/admin/**"))
    refused = [
        request("GET", admin.replace("**", "users"), {}),
        request("DELETE", next(r.sample for r in rules if r.methods == ("PUT", "PATCH")), {}),
        request("GET", "/no/such/route", {}),
    ]
    for data in allowed:
        assert simulate(compiled.matcher, data).allow, data
    for data in refused:
        assert not simulate(compiled.matcher, data).allow, data

    runtime.load(obj, cgroup, name="t-scale").close()
    try:
        status = next(s for s in runtime.status() if s.name == "t-scale")
        assert status.metadata.rules and len(status.metadata.rules) == N_RULES
        conns = http_client(cgroup, http_server.port, [[d] for d in allowed + refused])
        assert [c.refused for c in conns] == [False] * len(allowed) + [True] * len(refused)
        http_server.settle()
        arrived = sorted(http_server.request_lines())
        assert arrived == sorted(d.split(b"\r\n", 1)[0] for d in allowed)
    finally:
        runtime.unload("t-scale")
