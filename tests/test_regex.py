"""Path regexes (`~"..."`): the parser's errors, and compiled policies against Python's `re`.

Python's `re` is the oracle: the supported subset is also Python syntax with the same meaning on
paths (with DOTALL, `.` matches `/` in both), so a one-rule policy must allow exactly
the paths `re.fullmatch` accepts.
"""

from __future__ import annotations

import re

import pytest
import re2
from hypothesis import given, settings
from hypothesis import strategies as st

from sockpol.codegen.lower import LoweringError, lower
from sockpol.codegen.simulate import run
from sockpol.diagnostics import CompileError
from sockpol.dsl import load_source, regex
from sockpol.dsl.pathmatch import to_regex
from sockpol.model.head import Head, read_head


def policy(path: str, extra: str = "") -> str:
    return f"policy p {{\n    port 80\n    default deny\n    allow GET {path}\n{extra}}}\n"


@pytest.mark.parametrize(
    "text, code, offset",
    [
        ('~"a"', "E208", 0),  # cannot start with '/'
        ('~""', "E208", 0),
        ('~"/a(?=b)"', "E206", 4),  # lookahead
        ('~"/(?P<x>a)"', "E206", 3),  # named group
        ('~"/(a)\\1"', "E206", 6),  # backreference
        ('~"/a*?"', "E203", 5),  # lazy
        ('~"/a++"', "E203", 5),  # possessive
        ('~"/a|*"', "E203", 5),  # nothing to repeat
        ('~"/a{2,1}"', "E204", 4),
        ('~"/a{99}"', "E204", 4),
        ('~"/a{"', "E204", 4),
        ('~"/(a"', "E201", 3),
        ('~"/a)"', "E201", 4),
        ('~"/[ab"', "E202", 3),
        ('~"/[z-a]"', "E202", 4),
        ('~"/a b"', "E207", 4),  # space never occurs
        ('~"/a\\?"', "E207", 4),  # the query is cut off
        ('~"/[^\\d\\D]"', "E207", 3),  # empty class
        ('~"/%41"', "E164", 3),  # decoded before matching
        ('~"/%2F"', "E164", 3),  # refused before matching
        ('~"/%3A"', "E164", 3),  # requests spell it raw
        ('~"/a;b"', "E207", 4),  # path parameters: refused before matching
        ('~"/[;]"', "E207", 4),
        ('~"/%4"', "E163", 3),
        ('~"/a^"', "E205", 4),
        ('~"/a$b"', "E205", 4),
        ('~"/a\\b"', "E206", 4),
    ],
)
def test_problems_are_positioned(text, code, offset):
    found = regex.problems(text)
    assert found, text
    assert (found[0].code, found[0].offset) == (code, offset), found


@pytest.mark.parametrize(
    "text",
    [
        '~"/api/v[0-9]+/users/\\d+"',
        '~"^/admin(/.*)?$"',
        '~".*\\.json"',
        '~"/(?:a|b|c){1,3}/[^/]*"',
        '~"/a%5b\\(x\\)"',
        '~"/[\\w.~-]+"',
    ],
)
def test_valid_regexes(text):
    assert regex.problems(text) == []


def test_checker_points_into_the_regex():
    with pytest.raises(CompileError) as e:
        load_source(policy('~"/a(?=b)"'), "p.pol")
    (d,) = e.value.diagnostics
    assert d.code == "E206" and (d.span.line, d.span.column) == (4, 19)


def test_syntax_after_a_regex_is_named():
    with pytest.raises(CompileError) as e:
        load_source(policy('~"/x" y'), "p.pol")
    assert "after the path" in e.value.diagnostics[0].message


# Random regexes of the subset, over a small alphabet, and random paths.
ATOMS = ["a", "b", "/", ".", "[^/]", "[ab]", "\\d", "1", "%5B", "x"]


@st.composite
def regex_sources(draw, depth: int = 1) -> str:
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        if depth and draw(st.booleans()):
            options = draw(st.lists(regex_sources(depth=depth - 1), min_size=1, max_size=3))
            atom = "(" + "|".join(options) + ")"
        else:
            atom = draw(st.sampled_from(ATOMS))
        quantifier = draw(st.sampled_from(["", "", "*", "+", "?", "{2}", "{0,2}", "{1,}"]))
        parts.append(atom + quantifier)
    return "".join(parts)


PATHS = st.lists(
    st.lists(st.sampled_from(["a", "b", "/", "1", "x", "%5B", "."]), max_size=8).map(
        lambda parts: "/" + "".join(parts)
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(regex_sources(), PATHS)
def test_compiled_regex_agrees_with_python_re(source, paths):
    text = f'~"/{source}"'
    if regex.problems(text):
        return
    try:
        ir = lower(load_source(policy(text), "p.pol")[0].policies[0])
    except LoweringError as e:  # past the state limit: a documented refusal, not a bug
        assert e.code == "E901"
        return
    # A `%XX` escape is one atom to a path regex (`%5B*` repeats the escape), three to RE2.
    # The oracles are RE2 (linear time): Python's backtracking `re` ran for over ten minutes on
    # a generated regex with nested quantifiers. RE2 spells "end of text" \z, not \Z.
    oracle = re2.compile("(?s)/" + source.replace("%5B", "(?:%5B)"))
    reference = re2.compile(to_regex(text).replace("\\Z", "\\z"))
    for path in paths:
        expected = oracle.fullmatch(path) is not None
        assert (reference.search(path) is not None) == expected, (source, path)
        request = f"GET {path} HTTP/1.1\r\nHost: h\r\n\r\n".encode()
        if not isinstance(read_head(request), Head):  # not canonical: refused, never matched
            expected = False
        got = run(ir, request).allow
        assert got == expected, (source, path)


def test_regexes_and_globs_share_one_automaton():
    text = policy(
        '~"/api/v[0-9]+/.*"',
        '    deny * /api/v1/admin/**\n    allow POST ~"/api/v2/items/\\d+"\n',
    )
    ir = lower(load_source(text, "p.pol")[0].policies[0])

    def verdict(line: str):
        r = run(ir, f"{line} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        return r.allow, r.rule

    assert verdict("GET /api/v1/admin/x") == (True, 0)  # rule 0 comes first
    assert verdict("DELETE /api/v1/admin/x") == (False, 1)
    assert verdict("POST /api/v2/items/7") == (True, 2)
    assert verdict("POST /api/v2/items/x") == (False, None)


@pytest.mark.parametrize(
    "text",
    ['~"/api/v[0-9]+/users/\\d+"', '~".*\\.json"', '~"/admin(/.*)?"', '~"/a%5b(x|yy){2}"'],
)
def test_example_paths_match_and_look_like_paths(text):
    path = regex.example(text)
    assert path.startswith("/") and "//" not in path
    assert re.fullmatch(to_regex(text), path)
