"""Differential test: the real kernel against the reference interpreter (sockpol.model.interp).

Hypothesis draws a random valid policy (tests/policygen.py covers every construct of the language),
compiles it, loads it for a cgroup (the verifier must accept it: a rejection fails the test), and
from a process in that cgroup opens a few connections to a server on 127.0.0.1, each sending
random requests (valid, malformed, adversarially spelled, pipelined, with Content-Length or chunked
bodies) cut into sends at random places. For every connection the bytes the server received, and
what every send() returned (a count, or EACCES), must equal what the interpreter predicts.

Bounded in CI; `SOCKPOL_DIFF_EXAMPLES=N` runs N policies instead (docs/testing.md records the
largest run). Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import errno
import importlib.util
import itertools
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/policygen.py

# Not `from conftest import ...`: with several conftest.py files under tests/ that name is
# whichever pytest imported last (tests/kernel/ktls/conftest.py, for one).
_spec = importlib.util.spec_from_file_location(
    "sockpol_kernel_conftest", Path(__file__).with_name("conftest.py")
)
_kernel_conftest = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _kernel_conftest  # dataclasses look their module up there
_spec.loader.exec_module(_kernel_conftest)
_remove_cgroup, run_in_cgroup = _kernel_conftest._remove_cgroup, _kernel_conftest.run_in_cgroup
from policygen import ConnectionSpec, PolicySpec, RuleSpec, connections, policies  # noqa: E402

from sockpol import runtime  # noqa: E402
from sockpol.compiler import compile_source  # noqa: E402
from sockpol.contract import MAX_SCAN  # noqa: E402
from sockpol.dsl.ast import Mode  # noqa: E402
from sockpol.model.interp import Connection  # noqa: E402

pytestmark = pytest.mark.kernel

EXAMPLES = int(os.environ.get("SOCKPOL_DIFF_EXAMPLES", "0")) or 30
CONNECTIONS = (2, 10)  # connections per policy (cheap; a policy costs ~2 s to compile and verify)
_names = itertools.count()
# Each example loads a policy into the kernel: slow, drawn from large data, with the module's rig.
SLOW_KERNEL_EXAMPLES = [
    HealthCheck.too_slow,
    HealthCheck.function_scoped_fixture,
    HealthCheck.data_too_large,
]


class SinkServer:
    """Accepts on 127.0.0.1 and records everything each connection delivers until EOF.

    It never answers: the client half-closes after its sends, so EOF marks the end of what the
    kernel passed, with no waiting for silence. It runs in the test process, outside the cgroup.
    """

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self.received: dict[int, bytes] = {}  # client port -> bytes, once the client closed
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._drain, args=(conn, peer[1]), daemon=True).start()

    def _drain(self, conn: socket.socket, peer_port: int) -> None:
        data = bytearray()
        conn.settimeout(10)
        try:
            while chunk := conn.recv(65536):
                data += chunk
        except OSError:
            pass
        finally:
            conn.close()
        with self._lock:
            self.received[peer_port] = bytes(data)

    def wait(self, peer_port: int, timeout: float = 10.0) -> bytes | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if peer_port in self.received:
                    return self.received.pop(peer_port)
            time.sleep(0.005)
        return None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.listener.close()


def send_all(
    port: int, conns: list[list[bytes | str]], name: str = ""
) -> list[tuple[int, list[int]]]:
    """In the child (in the cgroup): per connection its local port and each send's result,
    a byte count or -errno. Half-closes and reads to EOF so the server sees the end. A str item
    switches the loaded policy `name` to that mode first, as `sockpol mode` does."""
    out = []
    for sends in conns:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        results = []
        for data in sends:
            if isinstance(data, str):
                from sockpol.runtime.counters import set_mode

                set_mode(name, data)
                continue
            try:
                results.append(s.send(data))
            except OSError as e:
                results.append(-(e.errno or 1))
        local_port = s.getsockname()[1]
        s.shutdown(socket.SHUT_WR)
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
        s.close()
        out.append((local_port, results))
    return out


@dataclass
class Rig:
    cgroup_root: Path
    server: SinkServer
    tmp: Path
    modes: bool  # the code generator implements `mode` (a control map in the object)
    policies: int = 0
    connections: int = 0
    sends: int = 0
    failures: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def rig(cgroup2_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    server = SinkServer()
    probe = "policy p {\n port 1\n default allow\n mode dry-run\n}\n"
    modes = b"sockpol_ctl" in compile_source(probe, "probe.pol")[0][0].object_code()
    r = Rig(cgroup2_root, server, tmp_path_factory.mktemp("diff"), modes)
    try:
        yield r
    finally:
        server.stop()
        print(
            f"\ndifferential: {r.policies} policies, {r.connections} connections, "
            f"{r.sends} sends compared with the kernel",
            file=sys.stderr,
        )


def _check(
    rig: Rig, spec: PolicySpec, conns: list[ConnectionSpec], switches: list[int | None]
) -> None:
    """`switches[i]`: before which send of connection i to flip the mode (None: no switch)."""
    text = spec.render(rig.server.port)
    (compiled,), _ = compile_source(text, "differential.pol")
    obj = rig.tmp / "differential.bpf.o"
    obj.write_bytes(compiled.object_code())
    # Names of our own, not the conftest's test prefixes: a concurrent test session's clean-up
    # removes those (stale cgroups, policies left behind), which would pull the rug from here.
    name = f"diff-{os.getpid()}-{next(_names)}"
    cgroup = rig.cgroup_root / f"sockpol-{name}"
    cgroup.mkdir()
    try:
        # A LoadError here (the verifier refusing a valid policy) fails the test.
        runtime.load(obj, cgroup, name=name).close()
        try:
            plan = _plan(compiled.policy.mode, conns, switches)
            results = run_in_cgroup(cgroup, send_all, rig.server.port, plan, name)
        finally:
            runtime.unload(name)
    finally:
        _remove_cgroup(cgroup, rig.cgroup_root)
    policy = compiled.policy if spec.governed else None
    rig.policies += 1
    mode = compiled.policy.mode
    for items, (local_port, returned) in zip(plan, results, strict=True):
        rig.connections += 1
        received = rig.server.wait(local_port)
        model = Connection(policy, mode=mode)
        sends = []
        for item in items:
            if isinstance(item, str):
                mode = model.mode = Mode(item)
            else:
                sends.append(item)
                model.send(item)
        rig.sends += len(sends)
        predicted = [s.returned if s.returned is not None else -errno.EACCES for s in model.sends]
        if received != bytes(model.delivered) or returned != predicted:
            raise AssertionError(
                "the kernel and the interpreter disagree\n"
                f"policy:\n{text}\nsends and mode switches: {items!r}\n"
                f"kernel send() results: {returned}\ninterpreter:           {predicted}\n"
                f"server received: {received!r}\ninterpreter:     {bytes(model.delivered)!r}\n"
                f"interpreter verdicts: {[(v.allow, v.reason) for v in model.verdicts]}"
            )


def _plan(
    mode: Mode, conns: list[ConnectionSpec], switches: list[int | None]
) -> list[list[bytes | str]]:
    plan: list[list[bytes | str]] = []
    for conn, at in zip(conns, switches, strict=True):
        items: list[bytes | str] = list(conn.sends())
        if at is not None:
            mode = Mode.ENFORCE if mode is Mode.DRY_RUN else Mode.DRY_RUN
            items.insert(min(at, len(items)), mode.value)
        plan.append(items)
    return plan


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=SLOW_KERNEL_EXAMPLES,
)
@given(data=st.data())
def test_kernel_agrees_with_the_interpreter(rig: Rig, data: st.DataObject) -> None:
    spec = data.draw(policies(modes=rig.modes), label="policy")
    n = data.draw(st.integers(*CONNECTIONS), label="connections")
    conns = [data.draw(connections(spec), label=f"connection {i}") for i in range(n)]
    # `sockpol mode` between two sends, on a few connections (the mode then stays switched).
    switch = st.one_of(st.none(), st.none(), st.none(), st.integers(0, 6))
    switches = [data.draw(switch, label="switch") if rig.modes else None for _ in conns]
    _check(rig, spec, conns, switches)


# A scanner of more than 16 bits of state and class, which the generated policies above never
# reach: many header conditions, each value its own states. Its `trans` entries are byte offsets
# of over 18 bits under the kind bits (tables.TRANS_KIND_SHIFT), and its rows reach further
# into the slot; the scan must agree just as well.
BIG_SCANNER_RULES = tuple(
    RuleSpec(
        "allow", ("GET",), f"/big/{i}/**", False, (("header", f"x-big-{i}", f"v{i}-{i * 7919}"),)
    )
    for i in range(40)
)


@settings(
    max_examples=max(3, EXAMPLES // 6),
    deadline=None,
    suppress_health_check=SLOW_KERNEL_EXAMPLES,
)
@given(data=st.data())
def test_kernel_agrees_on_a_scanner_of_more_than_16_bits(rig: Rig, data: st.DataObject) -> None:
    drawn = data.draw(policies(modes=rig.modes, governed=True), label="policy")
    spec = replace(drawn, rules=drawn.rules + BIG_SCANNER_RULES)
    (compiled,), _ = compile_source(spec.render(rig.server.port), "big.pol")
    scanner = compiled.matcher.tables
    assert scanner.state_bits + scanner.class_bits > 16, "not the path this test is for"
    n = data.draw(st.integers(*CONNECTIONS), label="connections")
    conns = [data.draw(connections(spec), label=f"connection {i}") for i in range(n)]
    _check(rig, spec, conns, [None] * n)


@dataclass(frozen=True)
class RawConnection:
    """A connection's sends, written out (what ConnectionSpec.sends gives for drawn ones)."""

    data: tuple[bytes, ...]

    def sends(self) -> list[bytes]:
        return list(self.data)


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode()


# Paths near PATH_MAX (2,048 bytes): their first bytes take the scan's path chunk (the path
# automaton walked in step with the scanner), the bytes of the last chunk before the limit the
# slow path (appended, walked after the head), past the limit path-too-long. Exact rules on
# either side of the seam, and near misses of them, tell whether the two walks join up.
LONG_A = "/p/" + "a" * 2000 + "/ok"  # 2,006 bytes: the path chunk, then the general walk
LONG_B = "/q/" + "b" * 2036 + "/ok"  # 2,042 bytes: across the seam at 2,016
LONG_RULES = (
    RuleSpec("allow", ("GET",), LONG_A, True, ()),
    RuleSpec("allow", ("GET",), LONG_B, True, ()),
    RuleSpec("allow", ("GET",), "/r/**", False, ()),
)


def test_kernel_agrees_on_paths_near_and_past_the_path_limit(rig: Rig) -> None:
    spec = PolicySpec("longpaths", (("{PORT}",),), "deny", "8192", LONG_RULES, mode=None)
    near_misses = [LONG_A[:-1] + "K", LONG_B[:-1] + "K", LONG_B[:-3] + "/k", LONG_A[:-4]]
    lengths = [2015, 2016, 2017, 2047, 2048, 2049, 2100]
    catch_all = ["/r/" + "c" * (n - 3) for n in lengths]
    conns = [RawConnection((_get(path),)) for path in [LONG_A, LONG_B, *near_misses, *catch_all]]
    conns.append(RawConnection((_get(LONG_A) + _get(LONG_B) + _get("/r/x"),)))  # pipelined
    conns.append(RawConnection((_get(LONG_B)[:1000], _get(LONG_B)[1000:])))  # split
    _check(rig, spec, conns, [None] * len(conns))


def _long_value_head(length: int, shift: int = 0) -> bytes:
    """A head of exactly `length` bytes whose last header's value (no rule reads it) the scan
    skips eight bytes at a time, up to the head's last few bytes; `shift` moves where the value
    starts (a longer path), so the calls' positions fall differently against the window's end."""
    start = f"GET /r/{'x' * (1 + shift)} HTTP/1.1\r\nHost: a\r\nUser-Agent: ".encode()
    return start + b"a" * (length - len(start) - 4) + b"\r\n\r\n"


def test_kernel_agrees_on_heads_that_end_in_the_windows_last_bytes(rig: Rig) -> None:
    """A call that goes on after skipped words (or after a path) must leave the last bytes of
    the 64 KiB window to the next call's slow path, as a call's start does: heads that end
    there, after a value skipped up to them, are judged like any other, whatever the calls'
    positions (a call walks 64 bytes of such a value: 32 skipped, 32 byte by byte); one byte
    past the window is too large."""
    spec = PolicySpec("window", (("{PORT}",),), "deny", "64KiB", LONG_RULES, mode=None)
    lengths = [MAX_SCAN - 40, MAX_SCAN - 9, MAX_SCAN - 1, MAX_SCAN]
    conns = [
        RawConnection((_long_value_head(n, shift),)) for n in lengths for shift in range(0, 64, 5)
    ]
    conns.append(RawConnection((_long_value_head(MAX_SCAN + 1),)))
    _check(rig, spec, conns, [None] * len(conns))


# A connection that repeats its header section: from the second request on, the program takes
# the section from the connection's storage instead of walking it (judge.JudgeCore.memo_section)
# and must decide exactly as when it walks it: a value that changes the verdict, a body's length,
# chunked framing, a duplicate or smuggling header, a section past the remembered size, a long
# path (whose bytes share the room of the remembered ones), a head split over sends.
MEMO_RULES = (
    RuleSpec("allow", ("GET",), "/r/**", False, ()),
    RuleSpec("allow", ("POST",), "/api/**", False, (("header", "x-key", "k1"),)),
    RuleSpec("allow", ("GET",), "/h/**", False, (("host", "a.example", None),)),
)
_SECTION = "Host: a.example\r\nUser-Agent: wrk/4.1.0\r\nAccept: */*\r\n"


def _head(line: str, section: str = _SECTION, body: str = "") -> bytes:
    return f"{line}\r\n{section}\r\n{body}".encode()


def test_kernel_agrees_on_connections_that_repeat_their_header_section(rig: Rig) -> None:
    spec = PolicySpec("memo", (("{PORT}",),), "deny", "8KiB", MEMO_RULES, mode=None)
    repeated = [
        _head("GET /r/a HTTP/1.1"),
        _head("GET /r/bb/c HTTP/1.1"),
        _head("GET /h/1 HTTP/1.1"),
    ]
    keyed = "Host: a.example\r\nx-key: k1\r\nContent-Length: 5\r\n"
    cookie = "Host: a.example\r\nCookie: " + "c" * 300 + "\r\n"
    big = "Host: a.example\r\nCookie: " + "c" * 700 + "\r\n"
    chunked = "Host: a.example\r\nTransfer-Encoding: chunked\r\n"
    tails = [
        _head("GET /h/2 HTTP/1.1", _SECTION.replace("a.example", "b.example")),  # host: denied
        _head("POST /api/x HTTP/1.1", keyed.replace("k1", "k2"), "abcde"),  # denied
        _head("GET /r/x HTTP/1.1", _SECTION + "Host: a.example\r\n"),  # duplicate: refused
        _head("GET /r/x HTTP/1.1", keyed + "Transfer-Encoding: chunked\r\n", "abcde"),  # smuggling
        _head("GET /r/x HTTP/1.1", _SECTION[:-3] + "\r\n"),  # shorter than remembered: allowed
    ]
    conns = [RawConnection((*repeated, *repeated, tail)) for tail in tails]
    body = [_head("POST /api/x HTTP/1.1", keyed, "abcde")] * 3
    conns.append(RawConnection((*body, _head("POST /api/y HTTP/1.1", keyed, "abcdeGET /r/z"))))
    conns.append(
        RawConnection((*[_head("GET /r/a HTTP/1.1", chunked, "3\r\nabc\r\n0\r\n\r\n")] * 3,))
    )
    for section in (cookie, big):
        conns.append(RawConnection(tuple(_head(f"GET /r/{i} HTTP/1.1", section) for i in range(4))))
    long_line = "GET /r/" + "s" * 1600 + " HTTP/1.1"
    conns.append(RawConnection((*repeated, _head(long_line), *repeated)))
    split = _head("GET /r/q HTTP/1.1")
    conns.append(RawConnection((*repeated, split[:30], split[30:], *repeated)))
    pipelined = b"".join(repeated)
    conns.append(
        RawConnection((pipelined, pipelined, _head("GET /h/3 HTTP/1.1", "Host: a.example\r\n")))
    )
    _check(rig, spec, conns, [None] * len(conns))
