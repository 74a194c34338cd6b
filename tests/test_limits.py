"""Compile-time limits and what the automaton reveals: state limits stop with a positioned error
naming the rules responsible (never a hang), and rules that can never decide are reported."""

from __future__ import annotations

import pytest

from sockpol.compiler import compile_source
from sockpol.diagnostics import CompileError


def policy(*rules: str) -> str:
    body = "".join(f"    {r}\n" for r in rules)
    return f"policy p {{\n    port 80\n    default deny\n{body}}}\n"


def compile_error(text: str):
    with pytest.raises(CompileError) as e:
        compile_source(text, "p.pol")
    (d,) = e.value.diagnostics
    return d


def test_one_exploding_regex_is_named():
    d = compile_error(policy("allow GET /a", 'allow GET ~"/.*a.{20}"', "allow GET /b"))
    assert d.code == "E901"
    assert (d.span.line, d.span.column) == (5, 15)  # the regex of the rule on line 5
    assert "250,000 states" in d.message and "line 5 " in d.message


def test_overlapping_double_stars_are_named():
    rules = ["allow GET /healthz"] + [f"allow GET /**/k{i}/**/end" for i in range(24)]
    d = compile_error(policy(*rules, "allow GET /static/**"))
    assert d.code == "E901"
    assert d.span.line == 5  # the first of them
    assert "lines 5, 6, 7" in d.message and "more" in d.message
    assert "line 4," not in d.message and "line 29" not in d.message


def test_too_many_conditions_are_named():
    """Method sets and conditions are facts the head scanner sets, at most 512 of them; the
    rule that needs one more is named."""
    rules = [f'allow GET /h{i} if header x{i} and host "*.h{i}.example"' for i in range(600)]
    d = compile_error(policy(*rules))
    assert (d.code, d.span.line) == ("E900", 4 + 255)  # 1 + 2 * 256 facts > 512


def warnings_of(text: str) -> list[tuple[str, int]]:
    _, warnings = compile_source(text, "p.pol")
    return [(w.code, w.span.line) for w in warnings]


def test_rules_that_never_decide_are_reported_once():
    text = policy(
        "allow GET /a/*",
        "deny GET /a/b",  # every request it matches goes to line 4
        "allow * /c if header x",
        "allow GET /c if header x and header y",  # implied by line 6
        "allow GET /c if header x",  # implied by line 6; not a repetition of it
        "deny GET /a/b",  # a repetition: the checker's W190 says so already
        "allow POST /a/b",
    )
    assert warnings_of(text) == [("W190", 9), ("W910", 5), ("W910", 7), ("W910", 8)]


def test_reachable_rules_get_no_warning():
    text = policy("deny GET /a/b", 'allow GET ~"/a/[0-9]+"', "allow GET /a/*", "allow * /**")
    assert warnings_of(text) == []
