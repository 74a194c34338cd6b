"""The checker: every semantic error and warning, on the offending token, all of them at once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sockpol.diagnostics import CompileError, Diagnostic, Source, Span
from sockpol.dsl import load_source
from sockpol.dsl.ast import (
    Action,
    HeaderCondition,
    HostCondition,
    MethodSet,
    PathPattern,
    Policy,
    PolicyFile,
    PortRange,
    Rule,
)
from sockpol.dsl.check import check, diagnose
from sockpol.dsl.parse import parse

ROOT = Path(__file__).parent.parent


def policy(*lines: str, name: str = "p", port: str = "80") -> str:
    body = "".join(f"    {x}\n" for x in lines)
    return f"policy {name} {{\n    port {port}\n    default deny\n{body}}}\n"


def diagnostics(text: str) -> list[Diagnostic]:
    try:
        _, warnings = load_source(text, "t.pol")
    except CompileError as e:
        return e.diagnostics
    return warnings


def found(text: str) -> list[tuple[str, int, int]]:
    """(code, line, column) of every diagnostic of `text`."""
    return [(d.code, d.span.line, d.span.column) for d in diagnostics(text) if d.span]


def one(text: str) -> Diagnostic:
    (d,) = diagnostics(text)
    return d


# -- policies and ports -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "code", "column"),
    [
        ("9lives", "E101", 8),
        ("-x", "E101", 8),
        ("café", "E101", 11),
        ("a.b", "E101", 9),
        ("a" * 33, "E102", 8),
    ],
)
def test_policy_names(name, code, column):
    assert found(policy(name=name)) == [(code, 1, column)]


def test_longest_and_keyword_names_are_fine():
    assert found(policy(name="a" * 32)) == []
    assert found(policy(name="deny")) == []


def test_duplicate_policy_name():
    text = policy(name="a", port="80") + policy(name="a", port="81")
    assert found(text) == [("E103", 5, 8)]


@pytest.mark.parametrize(
    ("ports", "code", "column"),
    [
        ("0", "E112", 10),
        ("65536", "E112", 10),
        ("80, 70000-70001", "E112", 14),
        ("90-80", "E113", 10),
    ],
)
def test_port_errors(ports, code, column):
    assert found(policy(port=ports)) == [(code, 2, column)]


def test_port_range_hint():
    assert one(policy(port="90-80")).hint == "write 80-90"


def test_port_overlaps_are_warnings():
    text = policy(port="80, 8000-8010, 80, 8005, 1-65535")
    assert found(text) == [("W114", 2, 25), ("W114", 2, 29), ("W114", 2, 35)]
    assert "repeats port 80" in diagnostics(text)[0].message
    _, warnings = load_source(text, "t.pol")  # warnings only: the file loads
    assert len(warnings) == 3


def test_a_port_belongs_to_one_policy():
    text = policy(name="a", port="80, 9000-9010") + policy(name="b", port="443, 9005")
    (d,) = diagnostics(text)
    assert (d.code, d.span.line, d.span.column) == ("E115", 6, 15)
    assert "also governed by policy 'a'" in d.message


# -- methods ------------------------------------------------------------------------------------


def test_lower_case_method():
    d = one(policy("allow GET,get /x"))
    assert (d.code, d.span.line, d.span.column, d.span.end_column) == ("E141", 4, 15, 18)
    assert d.hint == "methods are case-sensitive; write GET"


@pytest.mark.parametrize(
    ("methods", "code", "column"),
    [
        ("G@T", "E140", 11),
        ("1GET", "E140", 11),
        ("GET, *", "E143", 16),
        ("*,*", "E143", 11),
        ("GET ,  GET", "W142", 18),
    ],
)
def test_methods(methods, code, column):
    assert found(policy(f"allow {methods} /x"))[0] == (code, 4, column)


def test_custom_methods_are_fine():
    assert found(policy("allow PROPFIND,M-SEARCH,X_1 /x")) == []


# -- paths --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "code", "column"),
    [
        ("/a//b", "E165", 17),
        ("/a/../b", "E166", 18),
        ("/a?x=1", "E162", 17),
        ("/a#top", "E162", 17),
        ("/a%2Fb", "E164", 17),
        ("/a%41", "E164", 17),
        ("/%zz", "E163", 16),
        ("/a***", "E167", 17),
        ("/a**/b", "E168", 17),
        ('"/a b"', "E161", 18),
        ('"a"', "E160", 16),
        (r'"/x\"y"', "E161", 18),
    ],
)
def test_paths(path, code, column):
    assert found(policy(f"allow GET {path}")) == [(code, 4, column)]


def test_path_hint():
    d = one(policy("allow GET /caf\u00e9"))
    assert d.code == "E161" and "%C3%A9" in d.hint


def test_quoted_path_with_escape_before_the_problem():
    # `\\` is two characters of source but one of the path: carets must still be right.
    assert found(policy(r'allow GET "/a\\b c"')) == [("E161", 4, 18), ("E161", 4, 21)]
    assert diagnostics(policy(r'allow GET "/a\\b c"'))[0].span.end_column == 20  # all of `\\`
    assert found(policy(r'allow GET "/a\\b//c"'))[1] == ("E165", 4, 21)


# -- hosts and headers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "code", "column"),
    [
        ("api.example.com:8080", "E171", 42),
        ("example.com.", "E172", 38),
        ("a..b", "E173", 28),
        (".a", "E173", 27),
        ("a.*.b", "E174", 29),
        ("*", "E174", 27),
        ("", "E170", 26),
        ("a_b", "E170", 28),
        ("[::1]", "E170", 27),
        ("a" * 64 + ".com", "E175", 27),
    ],
)
def test_hosts(host, code, column):
    assert found(policy(f'allow GET /x if host "{host}"')) == [(code, 4, column)]


def test_host_port_hint():
    d = one(policy('allow GET /x if host "API.example.com:8080"'))
    assert 'write "api.example.com"' in d.hint and "any port" in d.hint


def test_valid_hosts():
    text = policy('allow GET /x if host "*.Example.COM"', 'allow GET /y if host "10.0.0.1"')
    assert found(text) == []


@pytest.mark.parametrize(
    ("condition", "code", "column"),
    [
        ("header Host", "E181", 28),
        ('header host = "x"', "E181", 28),
        ("header a(b)", "E180", 29),
        ("header a/b", "E180", 29),
        ('header a = " x"', "E183", 33),
        ('header a = "x "', "E183", 34),
        ('header a = "x\ty"', "E182", 34),
        ('header a = "caf\u00e9"', "E182", 36),
        ('header a = "\x01"', "E182", 33),
    ],
)
def test_headers(condition, code, column):
    assert found(policy(f"allow GET /x if {condition}")) == [(code, 4, column)]


def test_header_host_hint():
    assert 'use host "PATTERN"' in one(policy("allow GET /x if header host")).hint


def test_valid_headers():
    text = policy('allow GET /x if header X-Api_Key.v1 and header accept = "text/html; q=0.9"')
    assert found(text) == []
    assert found(policy('allow GET /x if header x-empty = ""')) == []


# -- rules --------------------------------------------------------------------------------------


def test_repeated_rule_warns():
    text = policy("allow GET,HEAD /x if header a", "deny HEAD,GET /x if header a")
    (d,) = diagnostics(text)
    assert (d.code, d.span.line) == ("W190", 5)
    assert "same match as the rule on line 4" in d.message


def test_different_rules_do_not_warn():
    assert found(policy("allow GET /x", "allow GET /x if header a", "allow POST /x")) == []


def test_repeated_condition_warns():
    assert found(policy("allow GET /x if header a and header A")) == [("W191", 4, 34)]


@pytest.mark.parametrize(
    ("a", "b", "warns"),
    [
        ("a.com", "b.com", True),
        ("*.a.com", "*.b.com", True),
        ("*.a.com", "x.y.a.com", True),
        ("*.a.com", "a.com", True),
        ("*.a.com", "x.a.com", False),
        ("x.a.com", "*.a.com", False),
        ("a.com", "A.com", False),  # the same host: W191, not W192
    ],
)
def test_conflicting_hosts(a, b, warns):
    codes = [c for c, _, _ in found(policy(f'allow GET /x if host "{a}" and host "{b}"'))]
    assert ("W192" in codes) == warns


# -- all at once --------------------------------------------------------------------------------


def test_syntax_and_semantic_errors_are_reported_together():
    text = policy("alow GET /", "allow get /x", "allow GET /a//b", "allow GET /x if header host")
    assert [code for code, _, _ in found(text)] == ["E004", "E141", "E165", "E181"]


def test_many_semantic_errors_in_one_rule():
    text = policy('allow get,* /a//b?c if host "x:1" and header host = " v"')
    assert [code for code, _, _ in found(text)] == [
        "E141",
        "E143",
        "E165",
        "E162",
        "E171",
        "E181",
        "E183",
    ]


def test_check_returns_the_file_and_warnings():
    file = parse(Source("t.pol", policy("allow GET,GET /x")))
    checked, warnings = check(file)
    assert checked is file
    assert [w.code for w in warnings] == ["W142"]


def test_check_raises_with_every_error():
    file = parse(Source("t.pol", policy("allow get /x", "allow GET /a//b")))
    with pytest.raises(CompileError) as info:
        check(file)
    assert [d.code for d in info.value.diagnostics] == ["E141", "E165"]


def test_hand_built_tree_without_matching_source():
    # Spans that don't match the source text: the checker blames whole nodes, never crashes.
    span = Span(1, 1, 1, 2)
    rule = Rule(
        span,
        0,
        Action.ALLOW,
        MethodSet(span, ("get", "*")),
        PathPattern(span, "/a//b"),
        (HostCondition(span, "a:1"), HeaderCondition(span, "host", " x")),
    )
    p = Policy(span, "p", span, (PortRange(span, 80, 80),), Action.DENY, span, 8192, (rule,))
    codes = [d.code for d in diagnose(PolicyFile(Source("x", ""), (p,)))]
    assert sorted(codes) == ["E141", "E143", "E165", "E171", "E181", "E183"]


def test_rendered_semantic_error():
    with pytest.raises(CompileError) as info:
        load_source(policy('allow GET /x if host "shop.example.com:443"'), "shop.pol")
    assert str(info.value).splitlines() == [
        "shop.pol:4:43: error: a host pattern cannot hold a port [E171]",
        '        allow GET /x if host "shop.example.com:443"',
        "                                              ^~~~",
        '  hint: host patterns match any port: write "shop.example.com"',
    ]


# -- error codes are documented -----------------------------------------------------------------


def test_every_code_is_documented():
    sources = "".join(p.read_text() for p in sorted((ROOT / "sockpol").rglob("*.py")))
    used = set(re.findall(r'"([EWN]\d{3})"', sources))
    documented = set(
        re.findall(r"^\| `([EWN]\d{3})`", (ROOT / "docs" / "errors.md").read_text(), re.M)
    )
    assert used, "no codes found"
    assert used <= documented, sorted(used - documented)
    assert documented <= used, sorted(documented - used)
