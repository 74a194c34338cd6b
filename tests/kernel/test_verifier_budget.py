"""sockpol_msg verifies within VERIFIER_BUDGET processed instructions on this kernel, for every
policy of budget_policies (every example, 10 and 10,000 rules, a policy using every feature).

A verifier change that multiplies the count (as upstream f597664454bd did: every policy went from
about 200,000 instructions to over the 1,000,000 limit) fails here, on the host and on every
kernel of the VM matrix, before it reaches a user. The counts are also written, one JSON object
per line, to SOCKPOL_VERIFIER_REPORT when it is set (the VM runner collects them for
docs/kernels.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from budget_policies import compile_all

from sockpol.contract import MSG_PROGRAM, SKB_PROGRAM, SOCKOPS_PROGRAM, VERIFIER_BUDGET
from sockpol.stats import verifier_counts


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    given = os.environ.get("SOCKPOL_BUDGET_OBJECTS")
    if given:
        found = {p.name.removesuffix(".bpf.o"): p for p in Path(given).glob("*.bpf.o")}
        assert found, f"SOCKPOL_BUDGET_OBJECTS={given} holds no objects"
        return found
    return compile_all(tmp_path_factory.mktemp("budget"))


def test_every_policy_verifies_within_the_budget(objects: dict[str, Path]) -> None:
    assert {"api-10", "api-10000", "everything", "orders-api"} <= set(objects)
    assert {"ingress-everything", "ingress-api-10000"} <= set(objects)
    counts: dict[str, dict[str, int]] = {}
    refused: dict[str, str] = {}
    for name, path in sorted(objects.items()):
        got, note = verifier_counts(path.read_bytes())
        if not got:
            refused[name] = note
            continue
        counts[name] = got
    report = os.environ.get("SOCKPOL_VERIFIER_REPORT")
    if report:
        with open(report, "a") as f:
            for name, got in counts.items():
                record = {"release": os.uname().release, "policy": name, **got}
                f.write(json.dumps(record) + "\n")
    print(f"\nverifier on Linux {os.uname().release}:")

    def verdict(got: dict[str, int]) -> tuple[str, int]:
        """The judging program: sockpol_msg (egress) or sockpol_skb (ingress policies)."""
        name = SKB_PROGRAM if SKB_PROGRAM in got else MSG_PROGRAM
        return name, got[name]

    for name, got in counts.items():
        (prog, n), ops = verdict(got), got[SOCKOPS_PROGRAM]
        print(f"  {name}: {prog} {n:,}, {SOCKOPS_PROGRAM} {ops}")
    assert not refused, f"the kernel refused: {refused}"
    over = {n: verdict(c) for n, c in counts.items() if verdict(c)[1] > VERIFIER_BUDGET}
    assert not over, f"over the budget of {VERIFIER_BUDGET:,} processed instructions: {over}"
