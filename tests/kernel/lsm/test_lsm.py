"""The LSM backend (codegen/lsm.py) on plaintext HTTP: real clients in a test cgroup, a real
server outside it, the policy loaded with `backend="lsm"`.

The development and CI hosts refuse BPF LSM programs (EPERM, whatever the active LSM list says),
so there these tests skip, loudly, with the probe's reason; they run in the VM matrix
(tests/vm/vmkernels.py), where BPF LSM is in the Debian kernels' default LSM list and a refusal
is a failure. What they check, against the same policy on the sockmap backend where it differs:
verdicts, reasons, counters, events, dry-run and `sockpol mode`, a reload (replacement), heads
split across sends (the send that completes a refused head is refused, and every later send),
several requests in one send (refused whole), bodies, and unload leaving nothing attached.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
import warnings
from pathlib import Path

import pytest

from sockpol.compiler import compile_to_file
from sockpol.runtime import counters as rc
from sockpol.runtime import load, reload, status, unload
from sockpol.runtime.counters import set_mode
from sockpol.runtime.events import EventStream

NAME = "t-lsm-plain"
POLICY = """\
policy t-lsm-plain {{
    port {port}
    default deny
    allow GET /ok
    allow GET /ok2
    allow POST /upload
}}
"""


@pytest.fixture
def governed(lsm_kernel, cgroup: Path, http_server, tmp_path: Path):
    obj = compile_to_file(
        POLICY.format(port=http_server.port), tmp_path / "lsm.o", "lsm.pol", backend="lsm"
    )
    handle = load(obj, cgroup)
    assert handle.backend == "lsm"
    handle.close()
    yield cgroup
    unload(NAME)


def counters() -> rc.PolicyCounters:
    s = next(s for s in status() if s.name == NAME)
    return rc.read_counters(s.pin_dir, s.metadata)


def get(path: str, close: bool = False) -> bytes:
    extra = b"Connection: close\r\n" if close else b""
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: a\r\n" + extra + b"\r\n"


def test_allowed_requests_pass_and_denied_fail_before_any_byte_leaves(
    governed: Path, http_server, http_client
) -> None:
    conns = http_client(
        governed, http_server.port, [[get("/ok"), get("/ok2")], [get("/admin"), get("/ok")]]
    )
    ok, denied = conns
    assert [s.errno for s in ok.sends] == [None, None]
    assert ok.received.count(b"200 OK") == 2
    assert denied.sends[0].errno == errno.EACCES
    # A refusal ends the connection for sending, as with sk_msg.
    assert denied.sends[1].errno == errno.EACCES
    http_server.settle()
    assert http_server.request_lines() == [b"GET /ok HTTP/1.1", b"GET /ok2 HTTP/1.1"]
    assert b"/admin" not in http_server.received()
    c = counters()
    assert [r.requests for r in c.rules] == [1, 1, 0], c
    assert c.refused["default"].requests == 1 and c.default.requests == 1, c
    assert set(c.refused) == {"default"}, c


def test_malformed_and_ambiguous_heads_are_refused_with_their_reason(
    governed: Path, http_server, http_client
) -> None:
    conns = http_client(
        governed,
        http_server.port,
        [[get("/a/../ok")], [b"GET /ok HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"], [b"\x16\x03\x01"]],
    )
    assert all(c.sends[0].errno == errno.EACCES for c in conns), conns
    http_server.settle()
    assert http_server.received() == b""
    c = counters()
    assert {k: v.requests for k, v in c.refused.items()} == {
        "ambiguous-path": 1,
        "duplicate-header": 1,
        "tls-not-declared": 1,
    }, c


def test_a_head_split_across_sends_is_judged_whole_and_fails_closed(
    governed: Path, http_server, http_client
) -> None:
    allowed = [b"GET /o", b"k HTTP/1.1\r\nHo", b"st: a\r\n\r\n"]
    denied = [b"GET /adm", b"in HTTP/1.1\r\nHost: a\r\n", b"\r\n", get("/ok")]
    ok, refused = http_client(governed, http_server.port, [allowed, denied])
    assert [s.errno for s in ok.sends] == [None, None, None]
    assert b"200 OK" in ok.received
    # The sends before the end of the head pass (the server holds an unfinished head); the send
    # that completes the refused head is refused, and so is every later one.
    assert [s.errno for s in refused.sends] == [None, None, errno.EACCES, errno.EACCES]
    http_server.settle()
    assert http_server.request_lines() == [b"GET /ok HTTP/1.1"]  # /admin never complete
    assert b"GET /admin HTTP/1.1\r\nHost: a\r\n\r\n" not in http_server.received()
    c = counters()
    assert c.rules[0].requests == 1 and c.refused["default"].requests == 1, c


def test_heads_longer_than_a_chunk_are_judged_whole(
    governed: Path, http_server, http_client
) -> None:
    """The program copies and scans a head 512 bytes at a time (lsm.py, "Chunks"): a 1.6 KB
    head is judged as one, a refusal in its last chunk refuses the whole send."""
    pad = b"X-Pad: " + b"a" * 1500 + b"\r\n"
    ok = b"GET /ok HTTP/1.1\r\nHost: a\r\n" + pad + b"\r\n"
    denied = b"GET /admin HTTP/1.1\r\nHost: a\r\n" + pad + b"\r\n"
    duplicate = b"GET /ok HTTP/1.1\r\n" + pad + b"Host: a\r\nHost: b\r\n\r\n"
    conns = http_client(governed, http_server.port, [[ok], [denied], [duplicate]])
    assert [c.sends[0].errno for c in conns] == [None, errno.EACCES, errno.EACCES], conns
    http_server.settle()
    assert http_server.requests() == [ok]
    c = counters()
    assert c.rules[0].requests == 1 and c.rules[0].bytes == len(ok), c
    assert {k: v.requests for k, v in c.refused.items()} == {
        "default": 1,
        "duplicate-header": 1,
    }, c


def test_several_requests_in_one_send_pass_or_fail_together(
    governed: Path, http_server, http_client
) -> None:
    both_ok = get("/ok") + get("/ok2")
    mixed = get("/ok") + get("/admin")
    ok, refused = http_client(governed, http_server.port, [[both_ok], [mixed]])
    assert ok.sends[0].errno is None and refused.sends[0].errno == errno.EACCES
    http_server.settle()
    assert http_server.request_lines() == [b"GET /ok HTTP/1.1", b"GET /ok2 HTTP/1.1"]


def test_bodies_pass_and_the_next_request_is_judged(
    governed: Path, http_server, http_client
) -> None:
    body = b"x" * 50_000
    head = b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body)
    (conn,) = http_client(
        governed, http_server.port, [[head, body[:20_000], body[20_000:], get("/admin")]]
    )
    assert [s.errno for s in conn.sends] == [None, None, None, errno.EACCES]
    http_server.settle()
    assert http_server.requests() == [head + body]
    c = counters()
    assert c.rules[2].requests == 1 and c.rules[2].bytes == len(head) + len(body), c


def test_events_and_dry_run_through_the_lsm_backend(
    governed: Path, http_server, http_client
) -> None:
    with EventStream([NAME]) as stream:
        http_client(governed, http_server.port, [[get("/admin?x=1")]])
        events = _drain(stream, 1)
    (ev,) = events
    assert (ev.verdict, ev.reason, ev.method, (ev.host or "").strip(), ev.path) == (
        "refused", "default", "GET", "a", "/admin",
    ), ev  # fmt: skip
    assert ev.dport == http_server.port
    set_mode(NAME, "dry-run")
    with EventStream([NAME]) as stream:
        (conn,) = http_client(governed, http_server.port, [[get("/admin"), get("/ok")]])
        events = _drain(stream, 1)
    assert [s.errno for s in conn.sends] == [None, None]
    assert events[0].verdict == "dry-run"
    http_server.settle()
    assert http_server.request_lines()[-2:] == [b"GET /admin HTTP/1.1", b"GET /ok HTTP/1.1"]
    assert counters().would_refuse["default"].requests == 1


def test_reload_replaces_the_lsm_program_for_open_connections(
    governed: Path, http_server, connect_in_cgroup, tmp_path: Path
) -> None:
    sock = connect_in_cgroup(governed, http_server.port)
    sock.sendall(get("/ok"))
    new = POLICY.format(port=http_server.port).replace("allow GET /ok2", "allow GET /admin")
    result = reload(NAME, compile_to_file(new, tmp_path / "new.o", "new.pol", backend="lsm"))
    assert result.replaced
    sock.sendall(get("/admin"))  # the open connection is judged by the new policy
    with pytest.raises(OSError) as e:
        sock.sendall(get("/ok2"))
    assert e.value.errno == errno.EACCES
    http_server.wait_for_requests(2)
    http_server.settle()
    assert http_server.request_lines() == [b"GET /ok HTTP/1.1", b"GET /admin HTTP/1.1"]
    (s,) = [s for s in status() if s.name == NAME]
    assert s.backend == "lsm" and s.problem is None, s


def test_ungoverned_sockets_and_unload_leave_traffic_alone(
    lsm_kernel, cgroup: Path, http_server, http_client, tmp_path: Path
) -> None:
    obj = compile_to_file(
        POLICY.format(port=http_server.port), tmp_path / "lsm.o", "lsm.pol", backend="lsm"
    )
    load(obj, cgroup).close()
    try:
        # The test process is not in the cgroup: its connection is not governed.
        with socket.create_connection(("127.0.0.1", http_server.port), timeout=5) as s:
            s.sendall(get("/admin", close=True))
            assert b"200 OK" in s.recv(4096)
    finally:
        unload(NAME)
    (conn,) = http_client(cgroup, http_server.port, [[get("/admin")]])
    assert conn.sends[0].errno is None
    assert not any(s.name == NAME for s in status())


def _drain(stream: EventStream, n: int, timeout: float = 5.0) -> list:
    out: list = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += [e for e in stream.poll(0.2) if hasattr(e, "verdict")]
    return out


def test_the_lsm_program_verifies_within_the_budget(lsm_kernel, tmp_path: Path) -> None:
    """The policy `sockpol doctor` loads (every feature, eight fact words) and an example, on
    the lsm backend: within VERIFIER_BUDGET (the counts go to docs/kernels.md)."""
    from sockpol.contract import LSM_PROGRAM, VERIFIER_BUDGET
    from sockpol.selfcheck import REFERENCE_POLICY
    from sockpol.stats import verifier_counts

    examples = Path(__file__).resolve().parents[3] / "examples" / "orders-api.pol"
    counts = {}
    for name, text in (("everything", REFERENCE_POLICY), ("orders-api", examples.read_text())):
        obj = compile_to_file(text, tmp_path / f"{name}.o", f"{name}.pol", backend="lsm")
        got, note = verifier_counts(obj.read_bytes())
        assert got, f"{name}: {note}"
        counts[name] = got[LSM_PROGRAM]
    # Shown in the warnings summary (the VM runner's log keeps it): docs/kernels.md has them.
    warnings.warn(f"verifier on Linux {os.uname().release}: {LSM_PROGRAM} {counts}", stacklevel=1)
    report = os.environ.get("SOCKPOL_VERIFIER_REPORT")  # the VM runner's summary shows them
    if report:
        with open(report, "a") as f:
            for name, count in counts.items():
                record = {"release": os.uname().release, "policy": f"lsm:{name}"}
                f.write(json.dumps({**record, LSM_PROGRAM: count}) + "\n")
    assert max(counts.values()) <= VERIFIER_BUDGET, counts
