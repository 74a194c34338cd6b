"""`sockpol compile --stats`: sizes from the IR and the object, the verifier's count as root."""

from __future__ import annotations

import os

import pytest

from sockpol import cli
from sockpol.compiler import compile_source
from sockpol.stats import compile_stats


def routes(n: int) -> str:
    rules = "".join(
        f"    allow GET,HEAD /api/v1/s{i % 7}/r{i}/*\n"
        f'    allow POST /api/v1/s{i % 7}/r{i} if header content-type = "application/json"\n'
        for i in range(n // 2)
    )
    return f"policy r{n} {{\n    port 80\n    default deny\n{rules}    deny * /api/**\n}}\n"


def stats(text: str, verify: bool = False):
    (c,), _ = compile_source(text, "p.pol")
    return compile_stats(c, c.object_code(), verify=verify)


def test_sizes():
    s = stats(routes(40))
    assert (s.rules, s.rule_classes, s.facts) == (41, 3, 3)
    assert s.longest_candidates == 2  # the route's own rule, then the catch-all deny
    assert s.path_states > 40 and s.path_slots >= s.path_states - 1
    assert 0 < s.data_bytes < s.object_bytes
    text = "\n".join(s.lines())
    assert "41 rules in 3 classes" in text and "verifier: not loaded" in text


def test_cli_prints_stats(tmp_path, capsys):
    policy = tmp_path / "p.pol"
    policy.write_text(routes(4))
    assert cli.run(["compile", str(policy), "-o", str(tmp_path / "p.o"), "--stats"]) == 0
    err = capsys.readouterr().err
    assert "head scanner:" in err and "path automaton:" in err and "verifier:" in err


root = pytest.mark.skipif(os.geteuid() != 0, reason="loading a program needs root")


@root
def test_verifier_count_is_reported():
    s = stats(routes(10), verify=True)
    assert s.verified_insns.get("sockpol_msg", 0) > 0, s.verifier_note


@root
def test_verifier_count_does_not_grow_with_rules():
    small, large = stats(routes(10), verify=True), stats(routes(600), verify=True)
    assert small.verified_insns["sockpol_msg"] == large.verified_insns["sockpol_msg"]
