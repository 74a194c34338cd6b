"""Literal runs (codegen/literals.py): each literal is exactly its bytes taken one by one through
plain states, the table finds it where the program looks, and a walk that takes literals
wherever it may (the kernel takes them at some of those places) ends where the byte-wise walk
does. The kernel's side (the hash in BPF, the chunk trying literals where it enters a state
that has them) is compared with the interpreter by tests/kernel/test_differential.py, whose
heads carry the literals and near misses of them (policygen.CLIENT_HEADERS)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockpol.codegen.literals import (
    ENTRY_WORDS,
    LITERAL_BYTES,
    LITERAL_MIN,
    LITERAL_SLOTS,
    METHOD_MIN,
    METHODS,
    NO_STATE,
    PATH_STATE_SHIFT,
    PATH_WORD,
    PATH_WORD_BYTES,
    SECTION_MARK,
    LiteralTable,
    key_word,
    literal_table,
    slot_of,
    target_prefixes,
)
from sockpol.codegen.lower import lower
from sockpol.codegen.scanner import TERMINAL_STATES, ScannerTables
from sockpol.codegen.tables import (
    LITERAL_BIT,
    STATE_PATH,
    STATE_PLAIN,
    plain_and_path_states,
    state_kinds,
    trans_entries,
)
from sockpol.dsl import load_source

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from policies import ISSUE_MIX, issue_rules, policy_text  # noqa: E402


def scanner(text: str) -> ScannerTables:
    return lower(load_source(text, "t.pol")[0].policies[0]).tables


def table_of(policy) -> tuple[ScannerTables, list[int], LiteralTable]:
    """The literal table as tables.py builds it: with the rules' path words."""
    t = lower(policy).tables
    kinds = state_kinds(t)
    prefixes = target_prefixes(r.path.text for r in policy.rules)
    return t, kinds, literal_table(t, *plain_and_path_states(kinds), prefixes)


@pytest.fixture(scope="module")
def mix() -> tuple[ScannerTables, list[int], LiteralTable]:
    return table_of(load_source(policy_text("mix", 8080, issue_rules(10)), "t.pol")[0].policies[0])


def test_a_literal_is_its_bytes_through_plain_states(mix) -> None:
    t, kinds, table = mix
    assert table.literals
    for lit in table.literals:
        if lit.state == t.start or lit.path_to is not None:
            continue  # methods and path words: the tests below
        assert LITERAL_MIN <= len(lit.text) <= LITERAL_BYTES and lit.facts == 0
        s = lit.state
        for byte in lit.text:
            s = t.step(s, byte)
            assert s >= TERMINAL_STATES and kinds[s] & (STATE_PLAIN | STATE_PATH) == STATE_PLAIN
        assert s == lit.target


def test_a_method_literal_is_its_bytes_and_the_facts_of_its_sp(mix) -> None:
    """From the start state: the method's bytes through plain states, then its SP into the
    state whose only work is the facts the literal carries (what the slow path would add)."""
    t, kinds, table = mix
    methods = {lit.text: lit for lit in table.literals if lit.state == t.start}
    assert {f"{m} ".encode() for m in METHODS} <= set(methods)
    facts = set()
    for text, lit in methods.items():
        assert METHOD_MIN <= len(text) <= 8
        s = t.start
        for byte in text[:-1]:
            s = t.step(s, byte)
            assert kinds[s] & (STATE_PLAIN | STATE_PATH) == STATE_PLAIN
        s = t.step(s, text[-1])
        assert s == lit.target and t.info[s] == lit.facts
        facts.add(lit.facts)
    assert len(facts) > 1  # the policy tells methods apart: their literals do too


def test_the_start_state_is_keyed_by_four_bytes(mix) -> None:
    """`GET /a` and `GET /b` find the same entry; the chunk never tries the start state's."""
    t, _, table = mix
    for path in (b"/a HTTP/1.1\r\n\r\n", b"/static/x HTTP/1.1\r\n"):
        assert table.take(t.start, b"GET " + path)[:2] == (methods_target(table, t), 4)
    assert t.start not in table.chunk_states


def methods_target(table: LiteralTable, t: ScannerTables) -> int:
    return next(lit.target for lit in table.literals if lit.text == b"GET ")


def test_the_mix_heads_literals_are_found(mix) -> None:
    """The version after the target and the names wrk sends: what the benchmark counts on."""
    _, _, table = mix
    texts = {lit.text for lit in table.literals}
    assert {b"HTTP/1.1\r\n", b"User-Agent: ", b"Accept: "} <= texts


def test_each_literal_sits_where_its_hash_points(mix) -> None:
    _, _, table = mix
    rows = table.rows()
    assert len(rows) == LITERAL_SLOTS * ENTRY_WORDS
    for lit in table.literals:
        w1, m1, w2, m2 = lit.words()
        at = slot_of(lit.state, key_word(lit.state, w1, table.start), table.mul) * ENTRY_WORDS
        mark = SECTION_MARK if lit.section else 0
        if lit.path_to is not None:
            mark |= PATH_WORD | lit.path_to << PATH_STATE_SHIFT
        entry = [w1, m1, w2, m2, lit.state, lit.target, len(lit.text), lit.facts | mark]
        assert rows[at : at + ENTRY_WORDS] == entry
        # A version with its CRLF, and only that, marks where a header section starts.
        assert lit.section == (lit.text in (b"HTTP/1.1\r\n", b"HTTP/1.0\r\n"))
    empty = sum(rows[i * ENTRY_WORDS + 4] == NO_STATE for i in range(LITERAL_SLOTS))
    assert empty == LITERAL_SLOTS - len(table.literals)


def test_trans_entries_mark_the_states_with_literals(mix) -> None:
    t, kinds, table = mix
    entries = trans_entries(t, kinds, table.chunk_states)
    for target, entry in zip(t.trans, entries, strict=True):
        plain = {lit.state for lit in table.literals if lit.path_to is None}
        assert bool(entry & LITERAL_BIT) == (target in plain and target != t.start)


def test_path_words_are_their_bytes_through_the_path_states_and_automaton(mix) -> None:
    """A path word (from the state after a method's SP): the scanner moves through path states
    only, and the path automaton from its start to the state the entry carries; the call that
    took the method tries it, the chunk never does (those states carry facts)."""
    t, kinds, table = mix
    words = [lit for lit in table.literals if lit.path_to is not None]
    method_ends = {lit.target for lit in table.literals if lit.state == t.start}
    assert words
    for lit in words:
        assert lit.state in method_ends and len(lit.text) == PATH_WORD_BYTES
        s, pid = lit.state, t.path.start
        for byte in lit.text:
            s, pid = t.step(s, byte), t.path.step(pid, byte)
            assert kinds[s] & STATE_PATH
        assert (s, pid) == (lit.target, lit.path_to) and lit.facts == 0
        assert lit.state not in table.chunk_states
    get = methods_target(table, t)
    texts = {lit.text for lit in words if lit.state == get}
    # The mix's four paths start with three of them.
    assert {b"/api/v1/", b"/healthz", b"/static/"} <= texts


def test_path_words_come_from_the_rules_literal_prefixes() -> None:
    assert target_prefixes(["/api/v1/orders/*", "/healthz", "/**", '~"/v[0-9]+/.*"', "/a*b"]) == [
        b"/api/v1/orders/", b"/healthz", b"/a"
    ]  # fmt: skip


def walk(t: ScannerTables, state: int, head: bytes) -> int:
    for byte in head:
        state = t.step(state, byte)
        if state < TERMINAL_STATES:
            break
    return state


def walk_with_literals(t: ScannerTables, table: LiteralTable, state: int, head: bytes) -> int:
    """At every state with literals, try them (two in a row), then go on byte by byte."""
    i = 0
    while i < len(head) and state >= TERMINAL_STATES:
        if state in table.states:
            for _ in range(2):
                state, taken, _ = table.take(state, head[i:])
                i += taken
                if not taken:
                    break
            if i >= len(head):
                break
        state = t.step(state, head[i])
        i += 1
    return state


HEAD_PARTS = [
    b"GET /static/css/a.css HTTP/1.1\r\n", b"POST /api HTTP/1.0\r\n", b"GET / HTTP/1.2\r\n",
    b"Host: a\r\n", b"User-Agent: wrk/4.1.0\r\n", b"User-Agent:x\r\n", b"Accept: */*\r\n",
    b"Accept-Encoding: gzip\r\n", b"Accept-Encodinh: x\r\n", b"Cookie: a=b\r\n",
    b"Content-Length: 3\r\n", b"Content-Type: x\r\n", b"user-agent: n\r\n", b"X: y\r\n",
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.sampled_from(HEAD_PARTS), min_size=1, max_size=6), cut=st.integers(0, 40))
def test_a_walk_taking_literals_ends_where_the_bytewise_walk_does(mix, parts, cut) -> None:
    t, _, table = mix
    head = b"".join(parts) + b"\r\n"
    head = head[: len(head) - cut] if cut < len(head) else head  # fewer than 16 bytes left, too
    assert walk_with_literals(t, table, t.start, head) == walk(t, t.start, head)


def test_issue_mix_heads_take_their_literals(mix) -> None:
    t, _, table = mix
    for method, path, headers in ISSUE_MIX:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        assert walk_with_literals(t, table, t.start, head.encode()) == walk(
            t, t.start, head.encode()
        )


@pytest.mark.parametrize("example", sorted((REPO / "examples").glob("*.pol")), ids=lambda p: p.name)
def test_every_method_and_version_keeps_its_entry(example: Path) -> None:
    """Where no multiplier fits every literal, the one chosen keeps the methods and versions
    (every request has one of each) before header names (admin-denied.pol lost `POST ` to a
    multiplier that kept one more header name)."""
    for policy in load_source(example.read_text(), str(example))[0].policies:
        _, _, table = table_of(policy)
        texts = {lit.text for lit in table.literals}
        assert {f"{m} ".encode() for m in METHODS} <= texts
        assert {b"HTTP/1.1\r\n", b"HTTP/1.0\r\n"} <= texts
