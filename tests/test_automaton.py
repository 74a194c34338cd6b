"""The automaton toolkit (position automata, subset construction, minimization) and the candidate
rule lookup, against independent oracles: Python's `re` for languages, a naive Moore refinement
for minimality, and a plain first-match loop over every rule for the lookup."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from sockpol.automata.automaton import (
    DFA,
    Alt,
    Re,
    Set,
    Star,
    Str,
    byteset,
    determinize,
    minimize,
    seq,
    trim,
)
from sockpol.codegen.lower import lower
from sockpol.codegen.simulate import first_matching_rule, scan
from sockpol.compiler import front_end
from sockpol.model import interp

ALPHABET = "ab/"


@st.composite
def regexes(draw, depth: int = 3) -> tuple[Re, str]:
    """A random regex as an automaton.Re and as the same language in Python syntax."""
    kind = draw(st.sampled_from(["str", "set", "seq", "alt", "star"] if depth else ["str", "set"]))
    if kind == "str":
        text = draw(st.text(ALPHABET, max_size=3))
        return Str(text.encode()), re.escape(text)
    if kind == "set":
        chars = draw(st.sets(st.sampled_from(ALPHABET), min_size=1))
        return Set(byteset("".join(chars))), "[" + re.escape("".join(sorted(chars))) + "]"
    if kind == "star":
        inner, text = draw(regexes(depth - 1))
        return Star(inner), f"(?:{text})*"
    parts = draw(st.lists(regexes(depth - 1), min_size=1, max_size=3))
    if kind == "seq":
        return seq(*(p for p, _ in parts)), "".join(f"(?:{t})" for _, t in parts)
    return Alt(tuple(p for p, _ in parts)), "|".join(f"(?:{t})" for _, t in parts)


def moore_size(dfa: DFA, key) -> int:
    """Number of classes of the naive Moore refinement (with an explicit dead state)."""
    n = len(dfa.delta)
    classes = range(dfa.n_classes)
    block = {s: key(s) for s in range(n)} | {-1: "dead"}
    while True:
        sig = {
            s: (block[s], tuple(block[dfa.delta[s].get(c, -1)] for c in classes)) for s in range(n)
        }
        sig[-1] = (block[-1], tuple(block[-1] for _ in classes))
        ids: dict[object, int] = {}
        new = {s: ids.setdefault(v, len(ids)) for s, v in sig.items()}
        if len(set(new.values())) == len(set(block.values())):
            return len(set(new.values())) - 1  # without the dead state
        block = new


@settings(max_examples=150, deadline=None)
@given(
    st.lists(regexes(), min_size=1, max_size=4),
    st.lists(st.text(ALPHABET, max_size=6), max_size=25),
)
def test_union_of_tagged_regexes_matches_re(patterns, words):
    dfa = determinize([(r, i) for i, (r, _) in enumerate(patterns)])
    small, _ = minimize(*_trimmed(dfa))
    for word in words:
        expected = frozenset(i for i, (_, text) in enumerate(patterns) if re.fullmatch(text, word))
        for d in (dfa, small):
            state = d.run(word.encode())
            assert (frozenset() if state is None else d.tags[state]) == expected, (word, patterns)


def _trimmed(dfa: DFA):
    dfa, _ = trim(dfa, lambda s: bool(dfa.tags[s]))
    return dfa, lambda s: dfa.tags[s]


@settings(max_examples=100, deadline=None)
@given(st.lists(regexes(), min_size=1, max_size=3))
def test_minimize_is_minimal(patterns):
    dfa, key = _trimmed(determinize([(r, i) for i, (r, _) in enumerate(patterns)]))
    small, mapping = minimize(dfa, key)
    assert len(small.delta) == moore_size(dfa, key)
    assert mapping[dfa.start] == small.start == 0


def test_shared_prefixes_share_positions():
    """Thousands of routes with a common prefix: the DFA is trie-shaped, not a product."""
    routes = [(Str(f"/api/v1/item{i}".encode()), i) for i in range(2000)]
    dfa = determinize(routes)
    assert len(dfa.delta) < 2000 * 6
    assert dfa.tags[dfa.run(b"/api/v1/item1234")] == {1234}


# --- the candidate lookup ------------------------------------------------------------------------

PATHS = ["/a", "/a/*", "/a/**", "/a/b", "/*", "/**", "/a/*/c", "/b/**", "/a*"]
CLASSES = ["", " if header x", " if header y", ' if host "h.example"', " if header x and header y"]
METHODS = ["GET", "POST", "*", "GET,POST"]
REQUEST_PATHS = ["/", "/a", "/a/", "/a/b", "/a/b/c", "/a/x/c", "/b", "/b/z", "/ab", "/c"]


@st.composite
def policies(draw) -> str:
    rules = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["allow", "deny"]),
                st.sampled_from(METHODS),
                st.sampled_from(PATHS),
                st.sampled_from(CLASSES),
            ),
            min_size=1,
            max_size=12,
        )
    )
    body = "\n".join(f"    {a} {m} {p}{c}" for a, m, p, c in rules)
    return f"policy p {{\n    port 80\n    default deny\n{body}\n}}\n"


@settings(max_examples=120, deadline=None)
@given(
    policies(),
    st.lists(
        st.tuples(
            st.sampled_from(["GET", "POST", "PUT"]),
            st.sampled_from(REQUEST_PATHS),
            st.sets(st.sampled_from(["X: 1", "Y: 2", "Host: h.example"])),
        ),
        min_size=1,
        max_size=10,
    ),
)
def test_candidate_lookup_finds_the_first_matching_rule(text, requests):
    # The reference interpreter tries every rule in order; the candidate lookup must pick the
    # same one from the path state's short list.
    policy = front_end(text, "p.pol")[0].policies[0]
    ir = lower(policy)
    for method, path, headers in requests:
        head = "\r\n".join([f"{method} {path} HTTP/1.1", *sorted(headers)]) + "\r\n\r\n"
        s = scan(ir, head.encode())
        parsed = interp.read_head(head.encode())
        assert isinstance(parsed, interp.Head), head
        rule = interp.decide(policy, parsed).rule
        expected = rule.index if rule is not None else None
        assert first_matching_rule(ir, s.facts, s.path_state) == expected, (text, head)


def test_candidate_lists_stop_at_an_unconditional_rule():
    text = (
        "policy p {\n port 80\n default deny\n"
        + "".join(f" allow GET /a/r{i} if header h{i}\n" for i in range(50))
        + " deny * /a/**\n"
        + "".join(f" allow GET /a/s{i}\n" for i in range(50))
        + "}\n"
    )
    ir = lower(front_end(text, "p.pol")[0].policies[0])
    assert ir.lookup.longest == 2  # at most one conditional rule, then the deny
    unreachable = {u.rule: u.by for u in ir.unreachable}
    assert set(unreachable) == set(range(51, 101))
    assert all(by == (50,) for by in unreachable.values())
