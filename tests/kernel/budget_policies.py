"""The policies whose programs must verify within the budget on every kernel, compiled once.

Every example, the benchmark's generated API policies at 10 and 10,000 rules, and a `tls` policy
with every kind of condition (hosts, headers with and without values, regex paths, audit and log
rules, a dry-run mode): together they reach every part of sockpol_msg that a policy can switch on.
The VM runner compiles them on the host (Python under TCG is slow) and hands the guest the
directory through SOCKPOL_BUDGET_OBJECTS; without it the test compiles them itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sockpol.compiler import compile_source
from sockpol.selfcheck import REFERENCE_POLICY

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from policies import api_rules, policy_text  # noqa: E402


def sources() -> dict[str, str]:
    """{file name: policy text}."""
    out = {p.name: p.read_text() for p in sorted((REPO / "examples").glob("*.pol"))}
    for n in (10, 10_000):
        out[f"api-{n}.pol"] = policy_text(f"api-{n}", 8080, api_rules(n))
    out["everything.pol"] = REFERENCE_POLICY  # the policy `sockpol doctor` loads
    # The ingress program (sk_skb) for the same policies: every feature but `tls` (E159).
    out["ingress-everything.pol"] = REFERENCE_POLICY.replace(
        "policy everything {", "policy ingress-everything {\n    side ingress"
    ).replace("    tls userspace allow\n", "")
    out["ingress-api-10000.pol"] = policy_text(
        "ingress-api-10000", 8080, api_rules(10_000)
    ).replace("    port 8080\n", "    port 8080\n    side ingress\n")
    return out


def compile_all(out_dir: Path) -> dict[str, Path]:
    """Compile every policy of `sources()` into `out_dir`; {policy name: object path}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    objects = {}
    for file_name, text in sources().items():
        compiled, _ = compile_source(text, file_name)
        for c in compiled:
            path = out_dir / f"{c.policy.name}.bpf.o"
            path.write_bytes(c.object_code())
            objects[c.policy.name] = path
    return objects
