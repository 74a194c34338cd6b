"""The kernel program's scan, call by call, on this machine's CPU (tests/scanjit.py): the same
outcome as the Python mirror (simulate.py) for heads that exercise the call boundaries, and
the number of calls a head takes where that number is the cost (no root, no kernel)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from sockpol.codegen import simulate
from sockpol.codegen.judge import SCAN_CHUNK
from sockpol.codegen.lower import lower
from sockpol.codegen.scanner import END, TERMINAL_STATES
from sockpol.contract import PATH_MAX
from sockpol.dsl import load_source

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scanjit import ScanJit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
POLICIES = {
    "orders-api": (REPO / "examples" / "orders-api.pol").read_text(),
    # No method condition: the SP after the method leads to the path without facts.
    "any-method": """policy p {
    port 80
    default deny
    max-head 64KiB
    allow * /a/** if header x-api-key
    allow * /b/*/c
}""",
    "propfind": """policy p {
    port 80
    default deny
    max-head 64KiB
    allow PROPFIND,GET /a/**
    allow POST /b if host "x.example.com"
}""",
}
METHODS = ["GET", "POST", "PROPFIND", "X-CUSTOM_1", "get", "M"]
HEADERS = [
    "Host: x.example.com", "User-Agent: curl/8.5.0", "Accept: */*", "x-api-key: k",
    "Content-Length: 0", "Cookie: " + "a" * 40, "Connection: keep-alive", "X-A: b",
]  # fmt: skip
SEGMENTS = ["a", "b", "c", "api", "v1", "orders", "12", "x.json", "%5B", "~u", "", ".", ".."]


@pytest.fixture(scope="module", params=sorted(POLICIES))
def policy(request):
    ir_ = lower(load_source(POLICIES[request.param], request.param)[0].policies[0])
    return ir_, ScanJit(ir_)


def random_head(rng: random.Random) -> bytes:
    if rng.random() < 0.15:  # near and past the path's limit, and the chunk before it
        n = rng.choice([PATH_MAX - SCAN_CHUNK - 1, PATH_MAX - SCAN_CHUNK, PATH_MAX - 1, PATH_MAX,
                        PATH_MAX + 1, rng.randrange(1_900, 2_100)])  # fmt: skip
        path = ("/a/" + "x" * n)[:n]
    else:
        path = "/" + "/".join(rng.choice(SEGMENTS) for _ in range(rng.randint(0, 6)))
        path += "?q=1" if rng.random() < 0.1 else ""
    lines = [rng.choice(HEADERS) for _ in range(rng.randint(0, 5))]
    version = rng.choice(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0"])
    head = f"{rng.choice(METHODS)} {path} {version}\r\n" + "".join(f"{h}\r\n" for h in lines)
    head = (head + "\r\n").encode()
    if rng.random() < 0.3:  # a byte changed: refusals at every place
        k = rng.randrange(len(head))
        head = head[:k] + bytes([rng.choice(b" ./%?\r\n\x00\x80a#;")]) + head[k + 1 :]
    return head


def test_the_scan_agrees_with_simulate(policy) -> None:
    ir_, jit = policy
    rng = random.Random(19)
    for _ in range(400):
        head = random_head(rng)
        expected = simulate.scan(ir_, head)
        s = jit.begin()
        walk = jit.scan(s, head)
        assert walk.stopped or jit.get(s, "pos") >= len(head), (head[:80], walk)
        assert jit.get(s, "state") == expected.state, head[:120]
        if expected.state == END:
            assert jit.path(s) == expected.path, head[:120]
            assert jit.path_state(s) == expected.path_state, head[:120]


@pytest.mark.parametrize("path_length", [2_000, PATH_MAX - SCAN_CHUNK, 2_020, PATH_MAX])
def test_a_long_path_leaves_the_rest_of_the_head_to_the_chunks(policy, path_length) -> None:
    """After a path of PATH_MAX - SCAN_CHUNK bytes or more, every later byte of the head took a
    call of its own (the whole scan went byte by byte from there: 4,406 calls for this head
    with a 2,020-byte path against 199 with a 2,000-byte one). Only the path chunk must stay
    out then; the header lines after it go 32 bytes a call."""
    ir_, jit = policy
    path = ("/a/" + "x" * path_length)[:path_length]
    head = f"GET {path} HTTP/1.1\r\nHost: x.example.com\r\nx-api-key: k\r\n".encode()
    head += b"X-Pad: " + b"a b" * 1_300 + b"\r\n" + b"X-B: 1\r\n" * 50 + b"\r\n"
    s = jit.begin()
    walk = jit.scan(s, head)
    assert walk.stopped and jit.get(s, "state") == simulate.scan(ir_, head).state
    after_path = len(head) - path_length
    assert walk.calls < path_length / 16 + after_path / 16, walk


def test_a_head_resumed_in_a_second_window_agrees_with_simulate(policy) -> None:
    """As the sk_skb program resumes a head cut by the end of an skb (skb.py: the scan's
    scalars kept, `pos` 0 in the next skb, `pending` cleared), with a window of 256 bytes so
    that heads cross its last read_ahead bytes, where path bytes go to the slow path unwalked
    and the rest of the path then takes the slow path in the next window."""
    ir_, _ = policy
    jit = ScanJit(ir_, window=256)
    rng = random.Random(17)
    for _ in range(300):
        head = random_head(rng)[:256]
        cut = rng.randrange(len(head) + 1)
        expected = simulate.scan(ir_, head)
        s = jit.begin()
        for i, part in enumerate((head[:cut], head[cut:])):
            if i and jit.get(s, "state") < TERMINAL_STATES:
                break
            if i:
                jit.put(s, "pending", 0)
            walk = jit.scan(s, part)
            assert walk.stopped or jit.get(s, "pos") >= len(part), (head[:80], cut, walk)
        assert jit.get(s, "state") == expected.state, (head[:120], cut)
        if expected.state == END:
            assert jit.path(s) == expected.path, (head[:120], cut)
            assert jit.path_state(s) == expected.path_state, (head[:120], cut)
