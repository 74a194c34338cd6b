"""Path words (codegen/literals.py): the call that took a method takes the first eight bytes of
the request target whole where the rules spell them (`/api/v1/`, `/healthz`). Run as BPF
machine code by tests/bpfemu.py, a head must scan as the reference simulation says (state,
facts, path, path automaton state, where it ends), whether a word was taken or not: the word
and its near misses, after every method, followed by the path's end, a query, a refused
spelling, and with the head's end too close to read the word. The kernel test
(tests/kernel/test_differential.py) sends policygen's heads, whose paths start with the rules'
prefixes, through real sockets.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sockpol.compiler import compile_source

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(REPO / "bench"))
from bpfemu import ScanEmu  # noqa: E402
from policies import issue_rules, policy_text  # noqa: E402
from test_section_memo import check as check_on  # noqa: E402

WORDY = """policy w {
    port 80
    default deny
    allow GET,HEAD /api/v1/orders/*
    allow POST /api/v1/orders if header content-type = "application/json"
    allow * /healthz
    allow GET /static/**
    allow GET /a%20b/static/x
    deny DELETE /api/v1/**
}
"""
POLICIES = {
    "mix": policy_text("mix", 80, issue_rules(10)),
    "wordy": WORDY,
    "orders-api": (REPO / "examples" / "orders-api.pol").read_text(),
}
METHODS = ["GET", "HEAD", "POST", "DELETE", "PUT", "FOO"]
TARGETS = [
    "/api/v1/orders/17", "/api/v1/orders", "/api/v1/", "/api/v1//x", "/api/v1/./x",
    "/api/v1/..", "/api/v1/%41", "/api/v1/%2f", "/api/v1?x=1", "/api/v1x", "/api/v2/orders/1",
    "/API/v1/orders/1", "/healthz", "/healthz/", "/healthz?probe=1", "/healthy", "/healthzz",
    "/static/css/a.css", "/static", "/static/", "/a%20b/static/x", "/a%20b/stat", "/", "*",
    "/api/v1/" + "x" * 2100,
]  # fmt: skip
TAILS = ["HTTP/1.1\r\nHost: a\r\n\r\n", "HTTP/1.0\r\n\r\n", "HTTP/1.1\r\nContent-Length: 2\r\n\r\n"]


@pytest.fixture(scope="module", params=sorted(POLICIES))
def compiled(request):
    c = compile_source(POLICIES[request.param], f"{request.param}.pol")[0][0]
    return c, ScanEmu(c)


def check(c, emu: ScanEmu, head: bytes):
    """test_section_memo's comparison with the reference, on a connection of its own."""
    return check_on(c, emu, emu.connection(), head)


def test_heads_scan_alike_with_and_without_path_words(compiled) -> None:
    c, emu = compiled
    for method in METHODS:
        for target in TARGETS:
            for tail in TAILS:
                check(c, emu, f"{method} {target} {tail}".encode())


def test_a_head_too_short_to_read_a_word_ahead(compiled) -> None:
    """The word is read with the eight bytes after it (two words, as every literal): a head
    that ends sooner, or is cut there (the rest in a later send), walks byte by byte."""
    c, emu = compiled
    for head in (b"GET /healthz\r\n\r\n", b"GET /healthz HTTP/1.1\r\n\r\n"):
        for cut in range(4, len(head) + 1):
            check(c, emu, head[:cut])


def test_the_mix_takes_its_words() -> None:
    """A path word saves the path chunk's walk of its eight bytes: about 45 instructions each
    (tests/test_insn_budget.py). `/healthy` differs from the word `/healthz` in its last byte."""
    c = compile_source(POLICIES["mix"], "mix.pol")[0][0]
    emu = ScanEmu(c)
    taken = check(c, emu, b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
    missed = check(c, emu, b"GET /healthy HTTP/1.1\r\nHost: a\r\n\r\n")
    assert taken.insns + 8 * 30 < missed.insns, (taken.insns, missed.insns)
