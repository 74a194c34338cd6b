"""Ingress policies (`side ingress`, issue 17): the sk_skb verdict program judges the requests a
server in the cgroup receives, whoever the client is.

Real servers (the recording server of conftest, nginx), real clients (raw sockets with
TCP_NODELAY and pauses so heads arrive in several segments, curl, wrk, a client in a network
namespace reaching the server over a veth pair). Every test checks what the *server* received:
a refused request must never reach it whole, and nothing after it on that connection at all.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sockpol import runtime
from sockpol.compiler import compile_source
from sockpol.contract import ANSWER_BYTES, ANSWER_HEADER, SKB_PROGRAM
from sockpol.runtime.counters import read_counters
from sockpol.runtime.loader import LoadedPolicy

NAME = "t-in-api"


def policy_text(port: int, extra: str = "") -> str:
    return f"""policy {NAME} {{
    port {port}
    side ingress
    default deny
{extra}
    deny * /ok/secret answer 404
    deny * /drop/** answer drop
    allow GET,HEAD /ok/**
    allow POST /upload
}}
"""


def _cgroup_of_self(root: Path) -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return root / line[3:].lstrip("/")
    return root


def listener_in(cgroup: Path, root: Path, host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket that belongs to `cgroup`: a socket's cgroup is the one its creator
    was in, and an accepted socket takes its listener's. The test process steps into the
    cgroup for the socket() call only."""
    home = _cgroup_of_self(root)
    (cgroup / "cgroup.procs").write_text(str(os.getpid()))
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    finally:
        (home / "cgroup.procs").write_text(str(os.getpid()))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


@pytest.fixture(scope="module")
def port() -> int:
    """One port for the module's servers: the same policy text, compiled once (Python under
    the VMs' TCG takes seconds per compile)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(cgroup: Path, cgroup2_root: Path, port: int, make_http_server) -> Any:
    return make_http_server(listener_in(cgroup, cgroup2_root, port=port))


_OBJECTS: dict[str, bytes] = {}  # policy text -> object


def load(tmp_path: Path, text: str, cgroup: Path) -> LoadedPolicy:
    if text not in _OBJECTS:
        compiled, _ = compile_source(text, "ingress.pol")
        _OBJECTS[text] = compiled[0].object_code()
    obj = tmp_path / "ingress.bpf.o"
    obj.write_bytes(_OBJECTS[text])
    return runtime.load(str(obj), str(cgroup), name=NAME)


@pytest.fixture
def policy(tmp_path: Path, cgroup: Path, server: Any) -> Iterator[LoadedPolicy]:
    loaded = load(tmp_path, policy_text(server.port), cgroup)
    try:
        yield loaded
    finally:
        loaded.close()
        with contextlib.suppress(Exception):
            runtime.unload(NAME)


def exchange(
    port: int,
    parts: list[bytes],
    pause: float = 0.05,
    read_for: float = 1.0,
    host: str = "127.0.0.1",
) -> bytes:
    """Send `parts` as separate TCP segments (TCP_NODELAY, a pause between them), then read
    what comes back until the peer closes or `read_for` seconds pass without data."""
    with socket.create_connection((host, port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i, part in enumerate(parts):
            if i:
                time.sleep(pause)
            try:
                s.sendall(part)
            except OSError:
                break
        s.settimeout(read_for)
        got = b""
        with contextlib.suppress(OSError):
            while not _ends_with_answer(got) and (chunk := s.recv(65536)):
                got += chunk
        return got


def _ends_with_answer(got: bytes) -> bool:
    """The kernel's answer (ANSWER_BYTES, Connection: close) is the last thing the client can
    read on its connection: no need to wait for more."""
    at = got.find(ANSWER_HEADER.encode())
    return at >= 0 and len(got) - got.rfind(b"HTTP/1.1 ", 0, at) >= ANSWER_BYTES


def head(path: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: api.test\r\n{extra}\r\n".encode()


def quiet(*urls: str) -> list[str]:
    """curl arguments that fetch `urls` and throw their bodies away (-o is per URL)."""
    return [arg for url in urls for arg in ("-o", "/dev/null", url)]


def counters(loaded: LoadedPolicy):
    return read_counters(loaded.pin_dir, loaded.metadata)


# --- the basics ----------------------------------------------------------------------------------


def test_allowed_requests_reach_the_server_refused_ones_are_answered(
    policy: LoadedPolicy, server: Any
) -> None:
    assert policy.metadata.side == "ingress"
    assert SKB_PROGRAM in policy.program_ids
    ok = exchange(server.port, [head("/ok/a")], read_for=0.5)
    assert ok.startswith(b"HTTP/1.1 200 OK")
    refused = exchange(server.port, [head("/admin")])
    assert refused.startswith(b"HTTP/1.1 403 Forbidden\r\n"), refused
    assert f"{ANSWER_HEADER}: policy={NAME}; reason=default".encode() in refused
    by_rule = exchange(server.port, [head("/ok/secret")])
    assert by_rule.startswith(b"HTTP/1.1 404 Not Found\r\n"), by_rule
    server.settle(0.2)
    assert server.request_lines() == [b"GET /ok/a HTTP/1.1"]
    c = counters(policy)
    assert c.rules[2].requests == 1
    assert c.refused["default"].requests == 1 and c.refused["rule"].requests == 1
    assert c.answered.requests == 2


def test_curl_reads_the_answer_and_the_server_never_sees_the_request(
    policy: LoadedPolicy, server: Any
) -> None:
    base = f"http://127.0.0.1:{server.port}"
    run = subprocess.run(
        ["curl", "-s", "-m", "5", "-w", "%{http_code}\n",
         *quiet(f"{base}/ok/1", f"{base}/admin/x", f"{base}/ok/2")],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert run.stdout.split() == ["200", "403", "200"], run
    server.settle(0.2)
    assert server.request_lines() == [b"GET /ok/1 HTTP/1.1", b"GET /ok/2 HTTP/1.1"]


def test_nothing_after_a_refused_request_reaches_the_server(
    policy: LoadedPolicy, server: Any
) -> None:
    got = exchange(server.port, [head("/admin"), head("/ok/after"), head("/ok/later")], pause=0.1)
    assert got.startswith(b"HTTP/1.1 403")
    assert got.count(b"HTTP/1.1") == 1
    server.settle(0.2)
    assert server.received() == b""


# --- framing over TCP segments -------------------------------------------------------------------


def test_a_head_split_over_segments_is_judged_whole(policy: LoadedPolicy, server: Any) -> None:
    allowed = head("/ok/split/path")
    parts = [allowed[:3], allowed[3:9], allowed[9:21], allowed[21:-1], allowed[-1:]]
    assert exchange(server.port, parts).startswith(b"HTTP/1.1 200 OK")
    denied = head("/admin/users")
    parts = [denied[:5], denied[5:12], denied[12:]]
    got = exchange(server.port, parts)
    assert got.startswith(b"HTTP/1.1 403"), got
    server.settle(0.2)
    # The refused head never reached the server whole: only what came before its last segment.
    assert server.request_lines() == [b"GET /ok/split/path HTTP/1.1"]
    assert denied[:12] in server.received() and denied not in server.received()
    assert counters(policy).refused["default"].requests == 1


def test_a_refusal_inside_a_split_path_is_found_in_the_segment_that_shows_it(
    policy: LoadedPolicy, server: Any
) -> None:
    bad = head("/ok/a/../../admin")
    got = exchange(server.port, [bad[:8], bad[8:]])
    assert got.startswith(b"HTTP/1.1 403") and b"reason=ambiguous-path" in got
    server.settle(0.2)
    assert server.requests() == []


def test_pipelined_requests_in_one_segment_are_each_judged(
    policy: LoadedPolicy, server: Any
) -> None:
    got = exchange(server.port, [head("/ok/1") + head("/ok/2") + head("/ok/3", "HEAD")])
    assert got.count(b"HTTP/1.1 200 OK") == 3
    # A refused request behind allowed ones: the answer replaces the segment (one verdict per
    # skb), so nothing of it reaches the server; the client reads the refusal.
    got = exchange(server.port, [head("/ok/4") + head("/admin") + head("/ok/5")])
    assert got.startswith(b"HTTP/1.1 403") and got.count(b"HTTP/1.1") == 1
    # `answer drop`: the requests before the refused one pass, the rest of the segment does not.
    got = exchange(server.port, [head("/ok/6") + head("/drop/x") + head("/ok/7")], read_for=0.5)
    assert got.count(b"HTTP/1.1 200 OK") == 1
    server.settle(0.2)
    lines = server.request_lines()
    assert lines == [
        b"GET /ok/1 HTTP/1.1", b"GET /ok/2 HTTP/1.1", b"HEAD /ok/3 HTTP/1.1",
        b"GET /ok/6 HTTP/1.1",
    ]  # fmt: skip


def test_more_pipelined_requests_in_one_segment_than_tail_calls_fail_closed(
    policy: LoadedPolicy, server: Any
) -> None:
    """A run judges one request and tail-calls the next run for the rest of the skb; the kernel
    allows 33 tail calls. Past them the rest of the skb is cut off (never passed unjudged) and
    the connection ends."""
    many = b"".join(head(f"/ok/{i}") for i in range(60))
    assert len(many) < 4000  # one segment on loopback
    exchange(server.port, [many], read_for=1.0)
    server.settle(0.3)
    lines = server.request_lines()
    n = len(lines)
    assert 30 <= n <= 34, n
    assert lines == [f"GET /ok/{i} HTTP/1.1".encode() for i in range(n)]
    assert server.received() == many[: len(b"".join(head(f"/ok/{i}") for i in range(n)))]
    assert counters(policy).refused["pull-failed"].requests == 1


def test_bodies_are_skipped_by_length_and_requests_after_them_judged(
    policy: LoadedPolicy, server: Any
) -> None:
    body = head("/admin") * 3  # a request hidden in a body is body, not a request
    post = head("/upload", "POST", f"Content-Length: {len(body)}\r\n") + body
    got = exchange(server.port, [post + head("/ok/after")])
    assert got.count(b"HTTP/1.1 200 OK") == 2
    # The body over several segments, then a refused request after it.
    got = exchange(server.port, [post[:40], post[40:70], post[70:], head("/admin")])
    assert got.count(b"HTTP/1.1 200 OK") == 1 and b"HTTP/1.1 403" in got
    server.settle(0.2)
    assert [r.split(b"\r\n", 1)[0] for r in server.requests()] == [
        b"POST /upload HTTP/1.1", b"GET /ok/after HTTP/1.1", b"POST /upload HTTP/1.1",
    ]  # fmt: skip


def test_a_large_body_passes_through_and_the_next_request_is_judged(
    policy: LoadedPolicy, server: Any, tmp_path: Path
) -> None:
    body = tmp_path / "body.bin"
    body.write_bytes(head("/admin") * 20_000)  # ~800 KB, a request spelled over and over
    base = f"http://127.0.0.1:{server.port}"
    run = subprocess.run(
        ["curl", "-sS", "-v", "-m", "20", "-w", "%{http_code}\n", "-o", "/dev/null",
         "--data-binary", f"@{body}", f"{base}/upload",
         "-o", "/dev/null", f"{base}/admin"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    # Seen once in CI (not reproduced in 36 runs since): the second request got no response,
    # curl exit 55 (sending failed). What curl, the server and the counters saw, should it recur.
    seen = [(len(c.received), len(c.requests), c.closed) for c in server.connections]
    assert run.stdout.split() == ["200", "403"], (
        run.returncode,
        run.stdout,
        run.stderr[-3000:],
        seen,
        counters(policy),
    )
    server.settle(0.2)
    assert [r.split(b"\r\n", 1)[0] for r in server.requests()] == [b"POST /upload HTTP/1.1"]
    assert server.requests()[0].endswith(body.read_bytes())


def test_chunked_bodies_are_followed_chunk_by_chunk(policy: LoadedPolicy, server: Any) -> None:
    hidden = head("/admin")
    chunks = b"%x\r\n%s\r\n" % (len(hidden), hidden) + b"3\r\nabc\r\n0\r\n\r\n"
    post = head("/upload", "POST", "Transfer-Encoding: chunked\r\n")
    got = exchange(server.port, [post, chunks[:10], chunks[10:], head("/admin")])
    assert b"HTTP/1.1 403" in got
    server.settle(0.2)
    assert hidden in server.received()  # as chunk data
    assert server.received().endswith(b"0\r\n\r\n")  # the request after the body did not pass
    assert counters(policy).refused["default"].requests == 1


@pytest.mark.parametrize(
    "request_bytes, reason",
    [
        (head("//admin"), "ambiguous-path"),
        (head("/%61dmin"), "ambiguous-path"),
        (head("/ok/x;y"), "ambiguous-path"),
        (head("/ok/a", extra="Host: other\r\n"), "duplicate-header"),
        (head("/upload", "POST", "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n"),
         "transfer-encoding"),
        (head("/upload", "POST", "Content-Length: 3\r\nContent-Length: 3\r\n"),
         "duplicate-header"),
        (head("/ok/a", extra="Upgrade: h2c\r\n"), "upgrade"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "bad-target"),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", "bad-method"),  # a TLS ClientHello
    ],
)  # fmt: skip
def test_bypass_attempts_are_refused_on_the_receiving_side(
    policy: LoadedPolicy, server: Any, request_bytes: bytes, reason: str
) -> None:
    got = exchange(server.port, [request_bytes + head("/ok/after")])
    assert f"reason={reason}".encode() in got, got
    server.settle(0.2)
    assert server.received() == b""


def test_an_endless_head_is_refused_at_max_head(policy: LoadedPolicy, server: Any) -> None:
    start = b"GET /ok/a HTTP/1.1\r\nHost: api.test\r\n"
    filler = [b"X-Pad: " + b"a" * 1000 + b"\r\n"] * 9  # past the default max-head, 8 KiB
    got = exchange(server.port, [start, *filler, b"\r\n"], pause=0.02)
    assert b"reason=head-too-large" in got, got[:200]
    server.settle(0.2)
    assert b"\r\n\r\n" not in server.received()


def _scenarios() -> dict[str, list[bytes]]:
    denied, allowed = head("/admin/x"), head("/ok/split")
    body = head("/admin") * 2
    post = head("/upload", "POST", f"Content-Length: {len(body)}\r\n") + body
    hidden = head("/admin")
    chunked = head(
        "/upload", "POST", "Transfer-Encoding: chunked\r\n"
    ) + b"%x\r\n%s\r\n0\r\n\r\n" % (len(hidden), hidden)
    return {
        "split allowed": [allowed[:2], allowed[2:17], allowed[17:]],
        "split refused": [head("/ok/1"), denied[:6], denied[6:], head("/ok/2")],
        "pipelined answered": [head("/ok/1") + head("/admin") + head("/ok/2")],
        "pipelined dropped": [head("/ok/1") + head("/drop/a") + head("/ok/2")],
        "body then refused": [post[:25], post[25:] + head("/ok/3"), head("/admin")],
        "chunked then refused": [chunked[:50], chunked[50:], head("/ok/4") + head("/x")],
        "bad then more": [head("//ok"), head("/ok/5")],
    }


@pytest.mark.parametrize("scenario", sorted(_scenarios()))
def test_the_server_receives_what_the_model_of_the_receiving_side_predicts(
    policy: LoadedPolicy, server: Any, scenario: str
) -> None:
    from sockpol.dsl import load_source
    from sockpol.model.receive import receive_segments

    segments = _scenarios()[scenario]
    model = receive_segments(
        load_source(policy_text(server.port), "p.pol")[0].policies[0], segments
    )
    got = exchange(server.port, segments, pause=0.08, read_for=0.5)
    server.settle(0.2)
    assert server.received() == bytes(model.delivered)
    if model.answer:
        assert f"HTTP/1.1 {model.answer} ".encode() in got


def test_events_name_the_client_and_the_request_pipelined_or_not(
    policy: LoadedPolicy, server: Any
) -> None:
    from sockpol.runtime.events import Event, EventStream

    stream = EventStream([NAME])
    try:
        exchange(server.port, [head("/ok/1") + head("/ok/secret", "HEAD")])
        exchange(server.port, [head("/admin/x")])
        events: list[Event] = []
        deadline = time.monotonic() + 5
        while len(events) < 2 and time.monotonic() < deadline:
            events += [e for e in stream.poll(0.1) if isinstance(e, Event)]
    finally:
        stream.close()
    summary = [(e.verdict, e.reason, e.rule, e.method, e.host, e.path, e.answer) for e in events]
    assert summary == [
        ("refused", "rule", 0, "HEAD", "api.test", "/ok/secret", 404),  # second in its segment
        ("refused", "default", None, "GET", "api.test", "/admin/x", 403),
    ]
    assert all(e.dport == server.port and e.dst == "127.0.0.1" for e in events)
    assert all(e.sport != server.port for e in events)


# --- operating -----------------------------------------------------------------------------------


def test_status_and_metrics_show_the_receiving_side(policy: LoadedPolicy, server: Any) -> None:
    from prometheus_client import generate_latest

    from sockpol.runtime.metrics import registry

    exchange(server.port, [head("/admin")])
    [status] = runtime.status(NAME)
    assert status.metadata is not None and status.metadata.side == "ingress"
    assert SKB_PROGRAM in status.program_ids
    text = generate_latest(registry()).decode()
    info = [line for line in text.splitlines() if line.startswith("sockpol_policy_info{")]
    assert any(f'policy="{NAME}"' in line and 'side="ingress"' in line for line in info), info
    refused = f'sockpol_refused_requests_total{{policy="{NAME}",reason="default"}} 1.0'
    assert refused in text


def test_the_command_line_loads_shows_and_unloads_an_ingress_policy(
    server: Any, cgroup: Path, tmp_path: Path
) -> None:
    pol = tmp_path / "in.pol"
    pol.write_text(policy_text(server.port))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}

    def sockpol(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "sockpol.cli", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)

    done = sockpol("load", str(pol), "--cgroup", str(cgroup))
    assert done.returncode == 0 and "(ingress:" in done.stdout, done.stdout + done.stderr
    try:
        assert exchange(server.port, [head("/admin")]).startswith(b"HTTP/1.1 403")
        status = sockpol("status", NAME)
        assert "side     ingress" in status.stdout and SKB_PROGRAM in status.stdout, status.stdout
        refused = [line.split() for line in status.stdout.splitlines() if "default" in line]
        size = str(len(head("/admin")))
        assert ["default", "1", size] in refused, status.stdout  # REASON REQUESTS BYTES
        mode = sockpol("mode", NAME, "dry-run")
        assert mode.returncode == 0, mode.stderr
        assert exchange(server.port, [head("/admin")], read_for=0.5).startswith(b"HTTP/1.1 200")
    finally:
        done = sockpol("unload", NAME)
    assert done.returncode == 0, done.stderr


def test_dry_run_passes_and_counts_what_it_would_refuse(policy: LoadedPolicy, server: Any) -> None:
    from sockpol.runtime.counters import set_mode

    set_mode(NAME, "dry-run")
    got = exchange(server.port, [head("/admin")], read_for=0.5)
    assert got.startswith(b"HTTP/1.1 200 OK")
    set_mode(NAME, "enforce")
    assert exchange(server.port, [head("/admin")]).startswith(b"HTTP/1.1 403")
    c = counters(policy)
    assert c.would_refuse["default"].requests == 1 and c.refused["default"].requests == 1
    server.settle(0.2)
    assert server.request_lines() == [b"GET /admin HTTP/1.1"]


def test_reload_changes_what_open_connections_accept(
    policy: LoadedPolicy, server: Any, tmp_path: Path
) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(head("/ok/1"))
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        new = tmp_path / "new.pol"
        new.write_text(policy_text(server.port).replace("allow GET,HEAD /ok/**", "allow GET /new"))
        cli = [sys.executable, "-m", "sockpol.cli", "reload", NAME, str(new)]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        done = subprocess.run(cli, capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 0, done.stderr
        s.sendall(head("/ok/2"))
        s.settimeout(3)
        assert s.recv(4096).startswith(b"HTTP/1.1 403")
    assert exchange(server.port, [head("/new")]).startswith(b"HTTP/1.1 200")
    server.settle(0.2)
    assert server.request_lines() == [b"GET /ok/1 HTTP/1.1", b"GET /new HTTP/1.1"]


def test_a_replacement_takes_over_open_connections(
    policy: LoadedPolicy, server: Any, tmp_path: Path
) -> None:
    """Another port set cannot be swapped into the loaded program: the reload replaces the
    programs, and a connection opened before goes on with the new one (the hand-over)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(head("/ok/1"))
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        new = tmp_path / "new.pol"
        text = policy_text(server.port).replace(
            f"port {server.port}", f"port {server.port}, {server.port + 1}"
        )
        new.write_text(text.replace("allow GET,HEAD /ok/**", "allow GET /new"))
        cli = [sys.executable, "-m", "sockpol.cli", "reload", NAME, str(new)]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        done = subprocess.run(cli, capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 0, done.stderr
        assert "replaced" in done.stdout or "replace" in done.stdout, done.stdout
        s.sendall(head("/new"))
        s.settimeout(3)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        s.sendall(head("/ok/2"))
        assert s.recv(4096).startswith(b"HTTP/1.1 403")
    server.settle(0.2)
    assert server.request_lines() == [b"GET /ok/1 HTTP/1.1", b"GET /new HTTP/1.1"]


def test_unload_leaves_nothing_and_connections_go_ungoverned(
    assert_nothing_left, policy: LoadedPolicy, server: Any, cgroup: Path
) -> None:
    # (assert_nothing_left first: its baseline is taken before the policy is loaded)
    from sockpol.contract import CONN_MAP
    from sockpol.runtime import libbpf, pins

    exchange(server.port, [head("/ok/a")], read_for=0.3)
    exchange(server.port, [head("/admin")])
    server.settle(0.3)
    pin_dir = policy.pin_dir
    # Every connection's state was freed when it closed (sock_ops, TCP_CLOSE).
    fd = libbpf.obj_get(str(pin_dir / pins.map_pin_name(CONN_MAP)))
    try:
        deadline = time.monotonic() + 5
        while libbpf.map_keys(fd, 8) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert libbpf.map_keys(fd, 8) == []
    finally:
        os.close(fd)
    policy.close()
    runtime.unload(NAME)
    assert not pin_dir.exists()
    assert_nothing_left(NAME, cgroup)
    assert exchange(server.port, [head("/admin")], read_for=0.5).startswith(b"HTTP/1.1 200")


# --- clients and servers -------------------------------------------------------------------------


def test_other_ports_of_the_cgroup_and_its_clients_are_not_governed(
    policy: LoadedPolicy,
    server: Any,
    cgroup: Path,
    cgroup2_root: Path,
    make_http_server: Callable[..., Any],
    run_in_cgroup: Callable[..., Any],
) -> None:
    other = make_http_server(listener_in(cgroup, cgroup2_root))  # same cgroup, other port
    assert exchange(other.port, [head("/admin")], read_for=0.5).startswith(b"HTTP/1.1 200")
    # A client in the cgroup is not governed by an ingress policy either: the policy judges
    # what the cgroup receives on the port, and this recording server is outside the cgroup.
    outside = make_http_server()
    got = run_in_cgroup(cgroup, exchange, outside.port, [head("/admin")], 0.05, 0.5)
    assert got.startswith(b"HTTP/1.1 200")
    assert policy.sockets() == 0  # nothing governed is open now


def test_a_port_governed_on_both_sides_is_judged_on_each(
    policy: LoadedPolicy,
    server: Any,
    cgroup2_root: Path,
    tmp_path: Path,
    run_in_cgroup: Callable[..., Any],
) -> None:
    """An egress policy for a client cgroup and the ingress policy for the server's, on one
    port: the client's side refuses what it denies before it leaves, the server's side what it
    denies before the server reads it."""
    clients = cgroup2_root / f"sockpol-test-{os.getpid()}-clients"
    clients.mkdir()
    egress_text = f"""policy t-in-client {{
    port {server.port}
    default allow
    answer 451
    deny * /ok/client-denied
}}
"""
    compiled, _ = compile_source(egress_text, "client.pol")
    obj = tmp_path / "client.bpf.o"
    obj.write_bytes(compiled[0].object_code())
    egress = runtime.load(str(obj), str(clients), name="t-in-client")
    try:
        port = server.port
        by_client = run_in_cgroup(clients, exchange, port, [head("/ok/client-denied")], 0.05, 1)
        assert by_client.startswith(b"HTTP/1.1 451"), by_client  # the client side's answer
        by_server = run_in_cgroup(clients, exchange, port, [head("/admin")], 0.05, 1)
        assert by_server.startswith(b"HTTP/1.1 403"), by_server  # the server side's
        both = run_in_cgroup(clients, exchange, port, [head("/ok/both")], 0.05, 0.5)
        assert both.startswith(b"HTTP/1.1 200")
    finally:
        egress.close()
        runtime.unload("t-in-client")
        clients.rmdir()
    server.settle(0.2)
    assert server.request_lines() == [b"GET /ok/both HTTP/1.1"]


def test_ipv6_clients_are_judged_alike(
    tmp_path: Path, cgroup: Path, cgroup2_root: Path, make_http_server: Callable[..., Any]
) -> None:
    srv = make_http_server(listener_in(cgroup, cgroup2_root, "::1"))
    loaded = load(tmp_path, policy_text(srv.port), cgroup)
    try:
        assert exchange(srv.port, [head("/ok/v6")], host="::1").startswith(b"HTTP/1.1 200")
        denied = head("/admin/v6")
        got = exchange(srv.port, [denied[:10], denied[10:]], host="::1")
        assert got.startswith(b"HTTP/1.1 403"), got
        srv.settle(0.2)
        assert srv.request_lines() == [b"GET /ok/v6 HTTP/1.1"]
    finally:
        loaded.close()
        runtime.unload(NAME)


@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2 (ip netns)")
def test_a_remote_client_from_another_network_namespace_is_judged(
    tmp_path: Path, cgroup: Path, cgroup2_root: Path, make_http_server: Callable[..., Any]
) -> None:
    tag = f"{os.getpid() % 100000}"
    ns, host_if, ns_if = f"t-in-ns{tag}", f"tin{tag}a", f"tin{tag}b"
    net = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"

    def ip(*args: str, check: bool = True) -> None:
        subprocess.run(["ip", *args], check=check, capture_output=True, timeout=10)

    ip("netns", "add", ns)
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", ns)
        ip("addr", "add", f"{net}.1/24", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("-n", ns, "addr", "add", f"{net}.2/24", "dev", ns_if)
        ip("-n", ns, "link", "set", ns_if, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        srv = make_http_server(listener_in(cgroup, cgroup2_root, f"{net}.1"))
        loaded = load(tmp_path, policy_text(srv.port), cgroup)
        try:
            base = f"http://{net}.1:{srv.port}"
            run = subprocess.run(
                ["ip", "netns", "exec", ns, "curl", "-s", "-m", "5", "-w", "%{http_code}\n",
                 *quiet(f"{base}/ok/remote", f"{base}/admin")],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert run.stdout.split() == ["200", "403"], run
            srv.settle(0.2)
            assert srv.request_lines() == [b"GET /ok/remote HTTP/1.1"]
            assert srv.connections[0].peer[0] == f"{net}.2"
        finally:
            loaded.close()
            runtime.unload(NAME)
            srv.stop()
    finally:
        ip("link", "del", host_if, check=False)
        ip("netns", "del", ns, check=False)


def _start_in_cgroup(cgroup: Path, argv: list[str], log: Path) -> subprocess.Popen:
    shim = "import os, sys; sys.stdin.readline(); os.execvp(sys.argv[1], sys.argv[1:])"
    proc = subprocess.Popen(
        [sys.executable, "-c", shim, *argv], stdin=subprocess.PIPE,
        stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    (cgroup / "cgroup.procs").write_text(str(proc.pid))
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    proc.stdin.close()
    return proc


def _wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


@pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
                    reason="needs nginx")  # fmt: skip
def test_nginx_behind_an_ingress_policy_with_curl_and_wrk(
    tmp_path: Path, cgroup: Path, free_port: int
) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"""daemon off; master_process off; worker_processes 1; pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log {tmp_path}/access.log;
    client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fcgi; uwsgi_temp_path {tmp_path}/uwsgi;
    scgi_temp_path {tmp_path}/scgi;
    server {{ listen 127.0.0.1:{free_port}; keepalive_requests 100000;
        location / {{ return 200 "served $uri\\n"; }} }}
}}
"""
    )
    proc = _start_in_cgroup(cgroup, [nginx, "-p", str(tmp_path), "-c", str(conf)],
                            tmp_path / "nginx.out")  # fmt: skip
    try:
        _wait_listening(free_port)
        # (the probe connection above was accepted before the policy: nginx saw no request)
        loaded = load(tmp_path, policy_text(free_port), cgroup)
        try:
            base = f"http://127.0.0.1:{free_port}"
            run = subprocess.run(
                ["curl", "-s", "-m", "5", "-w", "%{http_code}\n",
                 f"{base}/ok/nginx", f"{base}/admin", f"{base}/ok/%2e%2e/admin"],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            codes = [line for line in run.stdout.split("\n") if line.isdigit()]
            assert codes == ["200", "403", "403"], run.stdout
            # Heads over several segments: nginx waits for the end of an allowed one, and never
            # gets the end of a refused one.
            split = head("/ok/split-nginx")
            got = exchange(free_port, [split[:4], split[4:15], split[15:]])
            assert got.startswith(b"HTTP/1.1 200") and b"served /ok/split-nginx" in got
            denied = head("/admin/split-nginx")
            got = exchange(free_port, [denied[:9], denied[9:]])
            assert got.startswith(b"HTTP/1.1 403"), got
            if shutil.which("wrk"):
                wrk = subprocess.run(
                    ["wrk", "-t1", "-c8", "-d2s", f"{base}/ok/load"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                assert "Non-2xx" not in wrk.stdout, wrk.stdout
                assert counters(loaded).rules[2].requests > 100
            denied = subprocess.run(
                ["curl", "-s", "-m", "5", f"{base}/admin/after-load"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            assert "Sockpol-Refused" not in denied.stdout  # (headers not shown: body only)
            assert "refused by sockpol" in denied.stdout
        finally:
            loaded.close()
            runtime.unload(NAME)
        access = (tmp_path / "access.log").read_text()
        assert "/ok/nginx" in access and "/ok/split-nginx" in access
        assert "/admin" not in access and "%2e" not in access
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(10)
