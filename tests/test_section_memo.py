"""The connection's remembered header section (judge.JudgeCore.memo_section, tables.MEMO_*), run
as BPF machine code by tests/bpfemu.py on one connection's work area, head after head: whether
a head's section is taken from memory or walked, the scan must come out as the reference
simulation says (state, facts, path, Content-Length, singleton flags, the head's end). The
kernel test (tests/kernel/test_differential.py, connections that repeat their sections) runs
the same through real sockets.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from sockpol.codegen import simulate
from sockpol.codegen.scanner import END
from sockpol.codegen.tables import MEMO_MAX, MEMO_PATH_MAX, MEMO_TAG
from sockpol.compiler import compile_source

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from bpfemu import Connection, ScanEmu  # noqa: E402
from test_scan_jit import POLICIES, random_head  # noqa: E402

# Policies whose verdicts hang on header lines (a condition, Content-Length, Host).
HEADER_POLICY = """policy h {
    port 80
    default deny
    allow GET /r/**
    allow POST /api/** if header x-key = "k1"
    allow GET /h/** if host "a.example"
}
"""
POLICIES = POLICIES | {"headers": HEADER_POLICY}

REQUEST_LINES = [
    "GET /r/a HTTP/1.1", "GET /r/b/c HTTP/1.1", "POST /api/x HTTP/1.1", "GET /h/1 HTTP/1.1",
    "GET /r/a HTTP/1.0", "PUT /r/z HTTP/1.1", "GET /api/v1/orders/17 HTTP/1.1",
]  # fmt: skip
SECTIONS = [
    "Host: a.example\r\nUser-Agent: wrk/4.1.0\r\nAccept: */*\r\n",
    "Host: a.example\r\nx-key: k1\r\nContent-Length: 5\r\n",
    "Host: a.example\r\nx-key: k2\r\nContent-Length: 5\r\n",
    "Host: b.example\r\nTransfer-Encoding: chunked\r\n",
    "Host: a.example\r\nHost: a.example\r\n",  # a duplicate: refused, never remembered
    "Host: a.example\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n",  # smuggling
    "Host: a.example\r\nCookie: " + "c" * 300 + "\r\n",
    "Host: a.example\r\nCookie: " + "c" * 600 + "\r\n",  # longer than MEMO_MAX
    "Host: a\r\n",
    "",
]


def compiled(text: str, name: str):
    return compile_source(text, name)[0][0]


def check(c, emu: ScanEmu, conn: Connection, head: bytes, serial: int = 0):
    walk = emu.walk(head, conn=conn, serial=serial)
    expected = simulate.scan(c.matcher, head)
    assert walk.state == expected.state, head[:200]
    if expected.state == END:
        got = (walk.facts, walk.path, walk.pstate, walk.pos, walk.cl, walk.seen)
        want = (
            expected.facts, expected.path, expected.path_state, expected.pos,
            expected.content_length, expected.seen,
        )  # fmt: skip
        assert got == want, head[:200]
    return walk


def head_of(line: str, section: str, rng: random.Random | None = None) -> bytes:
    head = (line + "\r\n" + section + "\r\n").encode()
    if rng is not None and rng.random() < 0.2:  # a byte of the section changed
        k = rng.randrange(len(line) + 2, len(head))
        head = head[:k] + bytes([rng.choice(b" :\r\nAa0\x00\x80\t")]) + head[k + 1 :]
    return head


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_heads_on_one_connection_agree_with_simulate(name) -> None:
    c = compiled(POLICIES[name], name)
    emu, conn = ScanEmu(c), Connection(c.matcher.fact_words)
    rng = random.Random(31)
    taken, section = 0, SECTIONS[0]
    for _ in range(400):
        if rng.random() < 0.2:
            head = random_head(rng)
        else:
            # A connection's clients mostly repeat their section; sometimes it changes.
            section = section if rng.random() < 0.6 else rng.choice(SECTIONS)
            head = head_of(rng.choice(REQUEST_LINES), section, rng)
        taken += check(c, emu, conn, head).memo_taken
    assert taken >= 40, taken  # the remembered sections were taken, not only walked


def test_the_mix_takes_its_section_from_the_second_head_on() -> None:
    c = compiled(POLICIES["headers"], "headers")
    emu, conn = ScanEmu(c), Connection(c.matcher.fact_words)
    section = SECTIONS[0]
    first = check(c, emu, conn, head_of(REQUEST_LINES[0], section))
    assert not first.memo_taken
    for line in REQUEST_LINES[:4]:
        walk = check(c, emu, conn, head_of(line, section))
        assert walk.memo_taken, line
        assert walk.insns < first.insns
    # One byte more or less, or another value: walked, and remembered instead.
    for changed in (section.replace("*/*", "*/x"), section + "X: y\r\n", section[:-3] + "\r\n"):
        walk = check(c, emu, conn, head_of(REQUEST_LINES[1], changed))
        assert not walk.memo_taken
        assert check(c, emu, conn, head_of(REQUEST_LINES[2], changed)).memo_taken


def test_a_section_is_remembered_up_to_its_limit() -> None:
    c = compiled(POLICIES["headers"], "headers")
    emu, conn = ScanEmu(c), Connection(c.matcher.fact_words)
    line = REQUEST_LINES[0]
    fits = "Host: a.example\r\nCookie: " + "c" * (MEMO_MAX - 29) + "\r\n"
    assert len(fits) + 2 == MEMO_MAX
    for section, remembered in ((fits, True), (fits.replace(": c", ": cc"), False)):
        check(c, emu, conn, head_of(line, section))
        assert check(c, emu, conn, head_of(line, section)).memo_taken is remembered


def test_a_long_path_forgets_the_section() -> None:
    """The remembered bytes sit in the path's room: a path that may have reached them makes
    the connection forget them (memo_end, memo_section)."""
    c = compiled(POLICIES["headers"], "headers")
    emu, conn = ScanEmu(c), Connection(c.matcher.fact_words)
    section = SECTIONS[0]
    check(c, emu, conn, head_of("GET /r/a HTTP/1.1", section))
    assert check(c, emu, conn, head_of("GET /r/b HTTP/1.1", section)).memo_taken
    for length in (MEMO_PATH_MAX + 1, 2000):
        long_line = "GET /r/" + "s" * (length - 3) + " HTTP/1.1"
        assert not check(c, emu, conn, head_of(long_line, section)).memo_taken
        assert int.from_bytes(conn.scratch[MEMO_TAG : MEMO_TAG + 8], "little") == 0
        # Refused in the path (a byte the path may not hold), after the bytes it stored.
        check(c, emu, conn, head_of(long_line.replace("ss ", "s\x01 "), section))
        assert int.from_bytes(conn.scratch[MEMO_TAG : MEMO_TAG + 8], "little") == 0
        assert not check(c, emu, conn, head_of("GET /r/c HTTP/1.1", section)).memo_taken
        assert check(c, emu, conn, head_of("GET /r/d HTTP/1.1", section)).memo_taken
    short_line = "GET /r/" + "s" * (MEMO_PATH_MAX - 3) + " HTTP/1.1"
    check(c, emu, conn, head_of(short_line, section))
    assert check(c, emu, conn, head_of(short_line, section)).memo_taken


def test_another_scanner_never_takes_a_section_remembered_under_the_first() -> None:
    """A reload or a replacement shares the connection's storage: the tables' digest keeps a
    section to the scanner that remembered it."""
    a, b = compiled(POLICIES["headers"], "a"), compiled(POLICIES["orders-api"], "b")
    assert a.matcher.fact_words == b.matcher.fact_words
    emu_a, emu_b = ScanEmu(a), ScanEmu(b)
    conn = Connection(a.matcher.fact_words)
    head = head_of("GET /r/a HTTP/1.1", SECTIONS[1])
    check(a, emu_a, conn, head)
    assert check(a, emu_a, conn, head).memo_taken
    assert not check(b, emu_b, conn, head).memo_taken
    assert check(b, emu_b, conn, head).memo_taken
    # The same policy compiled again has the same digest: what it remembered still holds.
    again = compiled(POLICIES["orders-api"], "b")
    assert check(again, ScanEmu(again), conn, head).memo_taken


def test_another_program_never_takes_a_section_remembered_by_the_first() -> None:
    """A replacement (another version of the program, even of the same policy) has another
    serial: it forgets what the first remembered. An older version knows nothing of the
    section and may have written over its bytes with a long path in between."""
    c = compiled(POLICIES["headers"], "a")
    emu, conn = ScanEmu(c), Connection(c.matcher.fact_words)
    head = head_of("GET /r/a HTTP/1.1", SECTIONS[1])
    check(c, emu, conn, head, serial=7)
    assert check(c, emu, conn, head, serial=7).memo_taken
    assert not check(c, emu, conn, head, serial=8).memo_taken
    assert check(c, emu, conn, head, serial=8).memo_taken
    assert not check(c, emu, conn, head, serial=7).memo_taken
