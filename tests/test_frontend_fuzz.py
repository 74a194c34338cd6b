"""Front-end robustness for the authors' tools: any input gives a result or positioned errors
with documented codes, and no command (check, lint, fmt, explain, test) shows a traceback.

tests/test_parse.py fuzzes the parser on its own; this file adds policies of every construct
(tests/policygen.py) mutated at random, run through the command line, and holds every code the
front end and the linter can emit to docs/errors.md.
"""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policygen import policies

from sockpol.authoring.lint import CODES
from sockpol.cli import EXIT_INTERNAL, run
from sockpol.diagnostics import CompileError, Severity
from sockpol.dsl import load_source

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTED = set(re.findall(r"`([EWNL]\d{3})`", (ROOT / "docs/errors.md").read_text()))
UNPOSITIONED = {"E010", "E012", "N001"}  # about the whole file: unreadable, empty, too many errors
SOURCES = [
    "sockpol/dsl/parse.py",
    "sockpol/dsl/check.py",
    "sockpol/dsl/patterns.py",
    "sockpol/dsl/regex.py",
]


def test_every_code_is_documented():
    emitted = set()
    for source in SOURCES + ["sockpol/dsl/__init__.py"]:
        emitted |= set(re.findall(r'"([EWN]\d{3})"', (ROOT / source).read_text()))
    emitted |= set(CODES)
    assert emitted, "no codes found"
    assert emitted <= DOCUMENTED, sorted(emitted - DOCUMENTED)


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text = list(draw(policies()).render(draw(st.integers(1, 65535))))
    for _ in range(draw(st.integers(0, 5))):
        at = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "copy", "swap-line"]))
        if op == "insert":
            piece = draw(
                st.sampled_from(
                    [*'{}",=*/#\\\n\t %:.?', "**", "\x00", "audit", " log", "mode ", "é", "\r"]
                )
            )
            text.insert(at, piece)
        elif op == "delete" and text:
            del text[min(at, len(text) - 1)]
        elif op == "copy":
            text[at:at] = text[draw(st.integers(0, len(text))) :][:15]
        else:
            lines = "".join(text).split("\n")
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
            text = list("\n".join(lines))
    return "".join(text)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_results_or_positioned_documented_errors(text):
    try:
        load_source(text, "fuzz.pol")
    except CompileError as e:
        errors = [d for d in e.diagnostics if d.severity is Severity.ERROR]
        assert errors
        for d in e.diagnostics:
            assert d.code in DOCUMENTED, d
            if d.code not in UNPOSITIONED:
                assert d.span is not None and d.span.line >= 1 and d.span.column >= 1, d
        str(e)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_no_command_shows_a_traceback(tmp_path_factory, text):
    folder = tmp_path_factory.mktemp("cli")
    path = folder / "f.pol"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    (folder / "f.poltest").write_text('test "t"\nGET /\nexpect allow\n')
    messages: list[str] = []
    for argv in (
        ["check", str(path)],
        ["lint", str(path)],
        ["fmt", "--check", str(path)],
        ["test", str(folder)],
        ["explain", str(path), "--path", "/a/../b"],
    ):
        assert run(argv, on_error=messages.append) != EXIT_INTERNAL, (argv, messages)
