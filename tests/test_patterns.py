"""Path patterns: the token list, the reference regex, and every way a pattern can be refused."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockpol.dsl.pathmatch import to_regex
from sockpol.dsl.patterns import (
    AnyRest,
    AnySegments,
    AnySubpath,
    Literal,
    PatternError,
    Star,
    parse_pattern,
    problems,
)


@pytest.mark.parametrize(
    ("pattern", "tokens"),
    [
        ("/", [Literal("/")]),
        ("/healthz", [Literal("/healthz")]),
        ("/a/", [Literal("/a/")]),
        ("/api/v1/orders/*", [Literal("/api/v1/orders/"), Star(True)]),
        ("/static/**", [Literal("/static"), AnySubpath()]),
        ("/a/**/b", [Literal("/a"), AnySegments(), Literal("/b")]),
        ("/**", [AnySubpath()]),
        ("/ad**", [Literal("/ad"), AnyRest()]),
        ("/*.json", [Literal("/"), Star(False), Literal(".json")]),
        ("/a/*/b*c", [Literal("/a/"), Star(True), Literal("/b"), Star(False), Literal("c")]),
        ("/a/**/*", [Literal("/a"), AnySegments(), Literal("/"), Star(True)]),
        ("/**/a/**", [AnySegments(), Literal("/a"), AnySubpath()]),
        ("/a%5bb", [Literal("/a%5Bb")]),  # escapes are kept encoded, hex upper-cased
    ],
)
def test_tokens(pattern, tokens):
    assert list(parse_pattern(pattern).tokens) == tokens


def test_exact_and_prefix():
    assert parse_pattern("/healthz").is_exact
    assert not parse_pattern("/a/*").is_exact
    assert parse_pattern("/static/**").literal_prefix == "/static"
    assert parse_pattern("/**").literal_prefix == ""


MATCHES = {
    "/healthz": (["/healthz"], ["/healthz/", "/healthzx", "/Healthz", "/"]),
    "/api/v1/orders/*": (
        ["/api/v1/orders/1", "/api/v1/orders/abc"],
        ["/api/v1/orders/", "/api/v1/orders", "/api/v1/orders/1/items"],
    ),
    "/static/**": (
        ["/static", "/static/", "/static/a", "/static/a/b/c.css"],
        ["/staticx", "/stati", "/other/static"],
    ),
    "/a/**/b": (["/a/b", "/a/x/b", "/a/x/y/b"], ["/a/xb", "/ab", "/a/b/c", "/a/", "/a//b"]),
    "/ad**": (["/ad", "/admin", "/ad/x/y", "/ad/"], ["/a", "/Ad"]),
    "/**": (["/", "/a", "/a/b/"], []),
    "/*.json": (["/a.json", "/.json"], ["/a/b.json", "/a.jsonx"]),
    "/a%5Bb": (["/a%5Bb", "/a%5bb"], ["/a[b", "/a%5Cb"]),
    "/x/*": (["/x/y"], ["/x/", "/x/y/z"]),
}


@pytest.mark.parametrize("pattern", sorted(MATCHES))
def test_reference_regex(pattern):
    regex = to_regex(pattern)
    matching, other = MATCHES[pattern]
    for path in matching:
        assert re.match(regex, path), (pattern, path)
    for path in other:
        assert not re.match(regex, path), (pattern, path)


@pytest.mark.parametrize(
    ("pattern", "code", "offset"),
    [
        ("api", "E160", 0),
        ("", "E160", 0),
        ("/a b", "E161", 2),
        ("/a\\b", "E161", 2),
        ("/é", "E161", 1),
        ("/a\x00", "E161", 2),
        ("/a?x=1", "E162", 2),
        ("/a#frag", "E162", 2),
        ("/a%2", "E163", 2),
        ("/a%zz", "E163", 2),
        ("/a%41", "E164", 2),
        ("/a%7e", "E164", 2),
        ("/a%2F", "E164", 2),
        ("/a%5c", "E164", 2),
        ("/a%00", "E164", 2),
        # Requests spell these raw; their escapes (and ';', path parameters) are refused.
        ("/a%3A", "E164", 2),
        ("/a%40", "E164", 2),
        ("/a%2a", "E164", 2),
        ("/a%3B", "E164", 2),
        ("/a;x=1", "E161", 2),
        ("/a//b", "E165", 2),
        ("//", "E165", 0),
        ("/a/./b", "E166", 3),
        ("/a/..", "E166", 3),
        ("/a/***", "E167", 3),
        ("/a**/b", "E168", 2),
        ("/a/**x", "E168", 3),
        ("/**/a**b", "E168", 5),
        ("/**/**", "E169", 3),
        ("/a/**/**/b", "E169", 5),
    ],
)
def test_problems(pattern, code, offset):
    found = problems(pattern)
    assert [(p.code, p.offset) for p in found][:1] == [(code, offset)]
    with pytest.raises(PatternError):
        parse_pattern(pattern)


def test_every_problem_is_reported():
    found = problems("/a//b/./c d/x**y")
    assert [p.code for p in found] == ["E165", "E166", "E161", "E168"]


def test_query_reported_once():
    assert [p.code for p in problems("/a?b//c d")] == ["E162"]


@pytest.mark.parametrize("pattern", ["/a%20b", "/a%5B", "/@user:1/!$&'()+,=", "/a/b.c-d_e~f"])
def test_allowed_characters(pattern):
    assert problems(pattern) == []


# -- the regex against an independent, segment-by-segment reading of the spec ------------------


def _segment_glob(pattern: str, segment: str) -> bool:
    """`*` within one segment; non-empty when the pattern segment is exactly `*`."""
    if pattern == "*":
        return segment != ""
    regex = "".join(
        "[^/]*" if part == "*" else re.escape(part) for part in re.split(r"(\*)", pattern)
    )
    return re.fullmatch(regex, segment) is not None


def _spec_match(pattern: list[str], path: list[str], rest: str) -> bool:
    """Does `pattern` (segments) match `path` (segments, `rest` = the same joined by '/')?"""
    if not pattern:
        return not path
    head, *tail = pattern
    if head == "**":
        if not tail:
            return True  # zero or more segments, a trailing slash included
        # zero or more whole (non-empty) segments, then the rest of the pattern
        for k in range(len(path) + 1):
            if all(path[:k]) and _spec_match(tail, path[k:], "/".join(path[k:])):
                return True
        return False
    if head.endswith("**") and not tail:
        prefix = head[:-2]
        return any(
            _segment_glob(prefix, rest[:i]) for i in range(len(rest) + 1) if "/" not in rest[:i]
        )
    if not path:
        return False
    return _segment_glob(head, path[0]) and _spec_match(tail, path[1:], "/".join(path[1:]))


def spec_match(pattern: str, path: str) -> bool:
    if pattern == "/**":  # the root itself is zero segments
        return True
    return _spec_match(pattern[1:].split("/"), path[1:].split("/"), path[1:])


SEGMENTS = st.sampled_from(["a", "b", "ab", "*", "a*", "*b", "**"])
PATH_SEGMENTS = st.sampled_from(["a", "b", "ab", "ba", "aab", "x"])


@st.composite
def patterns_and_paths(draw):
    segments = draw(st.lists(SEGMENTS, min_size=1, max_size=4))
    if draw(st.booleans()) and segments[-1] not in ("**",):
        segments[-1] += "**"
    pattern = "/" + "/".join(segments)
    path_segments = draw(st.lists(PATH_SEGMENTS, max_size=5))
    path = "/" + "/".join(path_segments) + ("/" if draw(st.booleans()) else "")
    return pattern, path


@settings(max_examples=400)
@given(patterns_and_paths())
def test_regex_agrees_with_the_spec(case):
    pattern, path = case
    if problems(pattern):
        return  # e.g. `***` from "*" + "**"; refused patterns have no semantics
    assert bool(re.match(to_regex(pattern), path)) == spec_match(pattern, path), (pattern, path)


@settings(max_examples=300)
@given(st.text(max_size=60))
def test_any_text_gets_problems_or_a_regex(text):
    if problems(text):
        with pytest.raises(PatternError):
            parse_pattern(text)
    else:
        re.compile(to_regex(text))


# -- the compiled matcher agrees with the reference -----------------------------------------------

CODEGEN_SEGMENTS = st.sampled_from(["a", "b", "ab", "*", "a*", "*b", "**", "%5b", "x%5B*"])
REQUEST_SEGMENTS = st.sampled_from(["a", "b", "ab", "ba", "aab", "x%5b", "x%5B"])


@st.composite
def compiled_cases(draw):
    segments = draw(st.lists(CODEGEN_SEGMENTS, min_size=1, max_size=4))
    if draw(st.booleans()) and segments[-1] != "**":
        segments[-1] += "**"
    paths = draw(st.lists(st.lists(REQUEST_SEGMENTS, max_size=4), min_size=1, max_size=8))
    slash = draw(st.booleans())
    return "/" + "/".join(segments), [
        "/" + "/".join(p) + ("/" if slash and p else "") for p in paths
    ]


@settings(max_examples=150, deadline=None)
@given(compiled_cases())
def test_compiled_matcher_agrees_with_to_regex(case):
    """End to end: a one-rule policy, compiled and simulated, allows exactly what `to_regex`
    matches (on canonical paths, which is all that reaches the rules)."""
    from sockpol.codegen.lower import lower
    from sockpol.codegen.simulate import run
    from sockpol.dsl import load_source

    pattern, paths = case
    if problems(pattern):
        return
    text = f"policy p {{\n port 80\n default deny\n allow GET {pattern}\n}}\n"
    matcher = lower(load_source(text, "p.pol")[0].policies[0])
    from sockpol.model.head import Head, read_head

    for path in paths:
        request = f"GET {path} HTTP/1.1\r\nHost: h\r\n\r\n".encode()
        canonical = isinstance(read_head(request), Head)  # else refused (ambiguous-path)
        expected = canonical and bool(re.match(to_regex(pattern), path))
        assert run(matcher, request).allow == expected, (pattern, path)
