"""The authors' commands: lint, fmt, test, explain; and that they need no root and no libbpf."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policygen import connections, policies

from sockpol.authoring import testfile
from sockpol.authoring.fmt import format_source, split_comment
from sockpol.authoring.lint import CODES, covered_by, lint_file, lint_files
from sockpol.cli import run
from sockpol.dsl import load_source
from sockpol.model.interp import evaluate

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.pol"))
SCHEMA = json.loads((ROOT / "tests/fixtures/sarif-schema-2.1.0.json").read_text())

LINTED = """\
policy t {
    port 80
    default deny
    allow GET /a/*
    allow GET /a/**
    allow GET,HEAD /a/b
    allow GET /a/b
    deny * /a/x/**
    allow * /b/* if host "*.example.com"
    deny * /b/x if host "a.example.com"
    allow POST /c if header x = "1"
    allow POST /c if header x = "1" and header x = "2"
    allow * /**
    allow GET /z
}
policy e {
    port 81
    default allow
}
"""


def codes(text: str) -> list[tuple[int, str]]:
    file, warnings = load_source(text, "t.pol")
    return sorted((f.span.line, f.code) for f in lint_file(file, warnings))


# -- lint -----------------------------------------------------------------------------------------


def test_lint_findings():
    assert codes(LINTED) == [
        (3, "L008"),  # the catch-all leaves nothing to the default
        (7, "L001"),  # GET /a/b after GET,HEAD /a/b
        (8, "L004"),  # deny /a/x/** overlaps allow /a/* partly
        (8, "L004"),  # ... and allow /a/**
        (10, "L001"),  # /b/x for a.example.com is inside /b/* for *.example.com
        (12, "L001"),  # the second value condition only narrows the rule above
        (14, "L003"),  # after `allow * /**`
        (16, "L007"),  # no rules
    ]


def test_lint_union_coverage_and_counter_examples():
    text = (
        "policy t {\n port 80\n default deny\n"
        " allow GET /a/*\n allow HEAD /a/**\n allow GET,HEAD /a/x\n allow GET,HEAD /a/y/z\n}\n"
    )
    # /a/x is covered by the two rules together (GET by the first, HEAD by the second).
    assert codes(text) == [(6, "L001")]
    p = load_source(text, "t.pol")[0].policies[0]
    coverage = covered_by(p.rules[3], list(p.rules[:1]))
    assert not coverage.covered and coverage.example == "GET /a/y/z"


def test_lint_unreachable_and_default_unused():
    long_path = "/" + "x" * 2100
    text = (
        f"policy t {{\n port 80\n default deny\n max-head 256\n allow GET {long_path}\n"
        f' allow GET /a if header h = "{"v" * 250}"\n allow * /**\n}}\n'
    )
    found = codes(text)
    assert (5, "L006") in found and (6, "L006") in found
    text = "policy t {\n port 80\n default deny\n allow GET /**\n allow * /**\n}\n"
    assert codes(text) == [(3, "L008")]


def test_lint_carve_out_is_not_flagged():
    text = "policy t {\n port 80\n default deny\n deny * /admin/**\n allow * /**\n}\n"
    assert codes(text) == [(3, "L008")]


def test_lint_ignore_comments():
    text = LINTED.replace("allow GET /a/b\n", "allow GET /a/b  # sockpol: ignore[shadowed]\n")
    text = text.replace("deny * /a/x/**\n", "deny * /a/x/**  # sockpol: ignore[L004]\n")
    text = text.replace("policy e {\n", "policy e {  # sockpol: ignore\n")
    text = text.replace("default deny\n", "default deny  # sockpol: ignore[default-unused]\n", 1)
    assert codes(text) == [(10, "L001"), (12, "L001"), (14, "L003")]


def test_lint_scope_overlap_across_files():
    a = load_source("policy a {\n port 80, 90-99\n default deny\n}\n", "a.pol")
    b = load_source("policy b {\n port 95\n default deny\n}\n", "b.pol")
    found = [f for f in lint_files([a, b]) if f.code == "L005"]
    assert [(f.path, f.span.line) for f in found] == [("b.pol", 2)]


def test_lint_examples_are_clean_one_by_one():
    for example in EXAMPLES:
        file, warnings = load_source(example.read_text(), str(example))
        assert lint_file(file, warnings) == [], example


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_lint_is_sound(data):
    """A rule lint calls dead (shadowed, duplicate, after a catch-all, unreachable) decides no
    request; a rule it leaves alone decides the counter-example lint finds for it."""
    spec = data.draw(policies(max_rules=6, modes=False))
    p = spec.policy(8080)
    file, warnings = load_source(spec.render(8080), "g.pol")
    dead = {
        f.span.line
        for f in lint_file(file, warnings)
        if f.code in ("L001", "L002", "L003", "L006", "W192")
    }
    for _ in range(3):
        conn = data.draw(connections(spec))
        for request in conn.requests:
            verdict = evaluate(p, request.data())
            if verdict.rule is not None:
                assert verdict.rule.span.line not in dead, (request, verdict.rule.describe())
    # And exact the other way: a rule lint leaves alive decides its counter-example.
    for rule in p.rules:
        coverage = covered_by(rule, list(p.rules[: rule.index]))
        if rule.span.line in dead or not coverage.analyzed:
            continue
        assert not coverage.covered and coverage.request is not None, rule.describe()
        verdict = evaluate(p, coverage.request)
        if verdict.refusal is None:  # (a witness head may exceed a tiny max-head)
            assert verdict.rule is rule, (coverage.request, rule.describe())


def test_sarif_is_valid(tmp_path, capsys):
    policy = tmp_path / "t.pol"
    policy.write_text(LINTED)
    assert run(["lint", "--format", "sarif", str(policy), *map(str, EXAMPLES)]) == 1
    log = json.loads(capsys.readouterr().out)
    jsonschema.Draft4Validator(SCHEMA).validate(log)
    results = log["runs"][0]["results"]
    assert {r["ruleId"] for r in results} >= {"L001", "L003", "L004", "L005", "L007"}
    rules = log["runs"][0]["tool"]["driver"]["rules"]
    assert all(rules[r["ruleIndex"]]["id"] == r["ruleId"] for r in results)
    assert set(CODES) <= {r["id"] for r in rules}


def test_lint_exit_codes_and_formats(tmp_path, capsys):
    clean = tmp_path / "clean.pol"
    clean.write_text("policy c {\n    port 80\n    default deny\n\n    allow GET /x\n}\n")
    assert run(["lint", str(clean)]) == 0
    bad = tmp_path / "bad.pol"
    bad.write_text("policy c {\n    port 80\n}\n")
    assert run(["lint", str(bad)]) == 2
    capsys.readouterr()
    linted = tmp_path / "l.pol"
    linted.write_text(LINTED)
    assert run(["lint", "--format", "json", str(linted)]) == 1
    found = json.loads(capsys.readouterr().out)
    assert (found[0]["code"], found[0]["line"]) == ("L008", 3)
    assert found[1]["code"] == "L001" and found[1]["name"] == "shadowed" and found[1]["line"] == 7
    assert run(["lint", str(linted)]) == 1
    out = capsys.readouterr().out
    assert "l.pol:7:5: warning:" in out and "[L001 shadowed]" in out and "ignore[shadowed]" in out


# -- fmt ------------------------------------------------------------------------------------------


def meaning(text: str):
    file, _ = load_source(text, "m.pol")
    out = []
    for p in file.policies:
        rules = [
            (
                r.action,
                r.methods.methods,
                r.path.text.upper() if "%" in r.path.text else r.path.text,
                tuple(str(c) for c in r.conditions),
                r.log,
            )
            for r in p.rules
        ]
        ports = [(r.low, r.high) for r in p.ports]
        out.append((p.name, ports, p.default, p.max_head, p.mode, rules))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies(), st.lists(st.sampled_from(["", "# note", "   ", "\t# x"]), max_size=4))
def test_fmt_round_trip(spec, extra):
    text = spec.render(8080)
    lines = text.split("\n")
    for n, line in enumerate(extra):  # comments and blanks in odd places
        lines.insert(1 + n * 3 % max(1, len(lines) - 2), line)
    text = "\n".join(lines).replace("    allow", "  allow  ", 1)
    formatted = format_source(text, "g.pol")
    assert meaning(formatted) == meaning(text)
    assert format_source(formatted, "g.pol") == formatted
    kept = [c for line in text.split("\n") if (c := split_comment(line)[1])]
    assert [c for line in formatted.split("\n") if (c := split_comment(line)[1])] == kept or (
        sorted(kept) == sorted(split_comment(x)[1] for x in formatted.split("\n") if "#" in x)
    )


def test_fmt_examples_are_stable_and_keep_comments():
    for example in EXAMPLES:
        text = example.read_text()
        formatted = format_source(text, str(example))
        assert format_source(formatted, str(example)) == formatted
        comments = [split_comment(x)[1] for x in text.split("\n") if split_comment(x)[1]]
        assert sorted(comments) == sorted(
            split_comment(x)[1] for x in formatted.split("\n") if split_comment(x)[1]
        )


def test_fmt_layout():
    text = (
        '# top\n\n\npolicy  p {\n  allow   GET ,HEAD "/a/%5b"   # why\n'
        '  max-head 4096\n  port 80,81\n\n\n  deny * /b if host "A.COM" and header X-Y = "1"\n'
        "  default deny\n  # last\n}\n"
    )
    assert format_source(text) == (
        "# top\n\npolicy p {\n    port 80, 81\n    default deny\n    max-head 4KiB\n\n"
        "    allow GET,HEAD /a/%5B  # why\n\n"
        '    deny * /b if host "a.com" and header x-y = "1"\n\n    # last\n}\n'
    )


def test_fmt_cli(tmp_path, capsys):
    f = tmp_path / "p.pol"
    f.write_text("policy p {\n port 80\n default deny\n}\n")
    assert run(["fmt", "--check", str(f)]) == 1
    assert run(["fmt", "--diff", str(f)]) == 1
    assert "+    port 80" in capsys.readouterr().out
    assert run(["fmt", str(f)]) == 0
    assert f.read_text() == "policy p {\n    port 80\n    default deny\n}\n"
    assert run(["fmt", "--check", str(f)]) == 0


# -- test files -----------------------------------------------------------------------------------


def test_examples_ship_with_tests(capsys):
    for example in EXAMPLES:
        assert example.with_suffix(".poltest").exists(), example
    assert run(["test", str(ROOT / "examples")]) == 0
    assert " 0 failed" in capsys.readouterr().out


def test_examples_are_in_the_formatters_layout(capsys):
    assert run(["fmt", "--check", str(ROOT / "examples")]) == 0, capsys.readouterr().out


def test_failing_test_shows_the_deciding_rule(tmp_path, capsys):
    (tmp_path / "p.pol").write_text(
        "policy p {\n    port 80\n    default allow\n    deny * /admin/**\n}\n"
    )
    (tmp_path / "p.poltest").write_text(
        'test "admin"\nGET /admin/users\nexpect allow\n\ntest "home"\nGET /\nexpect allow default\n'
    )
    junit = tmp_path / "junit.xml"
    assert run(["test", str(tmp_path / "p.pol"), "--junit", str(junit)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "expected: allow" in out and "got:      deny rule 0" in out
    assert "DENIED by rule 0 (line 4): deny * /admin/**" in out and "/admin/users" in out
    assert "1 passed, 1 failed" in out
    xml = junit.read_text()
    assert 'tests="2" failures="1"' in xml and "expected allow, got deny rule 0" in xml


def test_test_file_format():
    tf = testfile.parse_test_file(
        'policy p\n\ntest "raw one" raw\nGET / HTTP/1.1\\r\\n\\r\\n\nexpect refuse\n\n'
        "test plain name\nPOST /x\nX: 1\n\nbody\nexpect deny rule 2\n",
        "dir/p.poltest",
    )
    assert tf.policy_name == "p" and tf.policy_file == "dir/p.pol"
    assert tf.cases[0].request == b"GET / HTTP/1.1\r\n\r\n"
    assert tf.cases[1].request == b"POST /x HTTP/1.1\r\nX: 1\r\nContent-Length: 4\r\n\r\nbody"
    assert tf.cases[1].expect.rule == 2
    for bad in ["test x\nGET /\n", "test x\nGET /\nexpect maybe\n", "bogus\n", ""]:
        with pytest.raises(testfile.TestFileError):
            testfile.parse_test_file(bad, "t.poltest")


# -- explain --------------------------------------------------------------------------------------


def test_explain(capsys, tmp_path):
    orders = str(ROOT / "examples/orders-api.pol")
    args = ["explain", orders, "--method", "DELETE", "--path", "/api/v1/orders/1"]
    assert run([*args, "--host", "backoffice.shop.example.com", "--header", "X-Api-Key: k"]) == 0
    out = capsys.readouterr().out
    assert "/api/v1/orders/1" in out
    assert "ALLOWED by rule 7 (line 26)" in out
    assert "method DELETE is not GET,HEAD" in out
    request = tmp_path / "r.http"
    request.write_bytes(b"GET /a/%2e%2E/%5c HTTP/1.1\nHost: x\n\n")
    assert run(["explain", orders, str(request)]) == 1
    out = capsys.readouterr().out
    assert "REFUSED before any rule: ambiguous-path" in out and "converted to CRLF" in out


# -- CI habits: no root, no libbpf -----------------------------------------------------------------


def test_authoring_commands_never_import_the_runtime(tmp_path):
    (tmp_path / "p.pol").write_text("policy p {\n    port 80\n    default deny\n}\n")
    (tmp_path / "p.poltest").write_text('test "x"\nGET /\nexpect deny default\n')
    script = (
        "import sys\n"
        "from sockpol.cli import run\n"
        f"d = {str(tmp_path)!r}\n"
        "codes = [run(['lint', d]), run(['fmt', '--check', d]), run(['test', d]),\n"
        "         run(['explain', d + '/p.pol', '--path', '/'])]\n"
        "bad = sorted(m for m in sys.modules if m.startswith('sockpol.runtime'))\n"
        "print(codes, bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[1, 0, 0, 1] []" in done.stdout


def test_pre_commit_hooks_name_the_commands():
    hooks = (ROOT / ".pre-commit-hooks.yaml").read_text()
    for command in ("sockpol lint", "sockpol fmt", "sockpol test"):
        assert f"entry: {command}" in hooks


def test_the_test_file_docstring_example_runs(tmp_path):
    """testfile.py's own example is a real test file that passes against the example policy."""
    from sockpol.authoring.testfile import __doc__ as doc

    example = [line[4:] for line in doc.split("A test is")[0].splitlines()[2:]]
    shutil.copy(ROOT / "examples" / "orders-api.pol", tmp_path / "orders-api.pol")
    (tmp_path / "orders-api.poltest").write_text("\n".join(example) + "\n")
    assert run(["test", str(tmp_path)]) == 0
