"""Hot reload on the real kernel: tables swap under live traffic, programs and sockets stay."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from sockpol import runtime
from sockpol.codegen.lower import TableShape
from sockpol.compiler import compile_policy, front_end

pytestmark = pytest.mark.kernel

POLICY_A = """
policy swap {{
    port {port}
    default deny
    allow GET /common
    allow GET /a
}}
"""
POLICY_B = """
policy swap {{
    port {port}
    default deny
    allow GET /common
    allow GET /b
    deny * /a
}}
"""


ROUNDS = 600


def compile_for(text: str, out: Path, shape: TableShape | None = None) -> Path:
    policy_file, _ = front_end(text, "swap.pol")
    out.write_bytes(
        compile_policy(policy_file.policies[0], policy_file.source, shape).object_code()
    )
    return out


def request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()


def read_response(s: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data or not data.endswith(b"ok\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def client(port: int, rounds: int) -> dict:
    """Runs in the cgroup: one keep-alive connection that only asks for /common (allowed by
    both policies), and a fresh connection per /a or /b request, each timed."""
    keep = socket.create_connection(("127.0.0.1", port), timeout=5)
    keepalive_ok = 0
    results = []
    for i in range(rounds):
        keep.sendall(request("/common"))
        if read_response(keep).startswith(b"HTTP/1.1 200"):
            keepalive_ok += 1
        path = "/a" if i % 2 == 0 else "/b"
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        t0 = time.monotonic()
        try:
            s.sendall(request(path))
            t1 = time.monotonic()
            allowed = read_response(s).startswith(b"HTTP/1.1 200")
        except OSError:
            t1 = time.monotonic()
            allowed = False
        s.close()
        results.append((path, t0, t1, allowed))
        time.sleep(0.002)  # spread the traffic over many reloads
    keep.close()
    return {"keepalive_ok": keepalive_ok, "results": results}


def test_reload_under_traffic_judges_each_request_by_the_policy_in_force(
    tmp_path, cgroup, http_server, run_in_cgroup
):
    port = http_server.port
    a = compile_for(POLICY_A.format(port=port), tmp_path / "a.o")
    loaded = runtime.load(a, cgroup, name="t-swap")
    program_ids = dict(loaded.program_ids)
    loaded.close()
    loaded_status = next(s for s in runtime.status() if s.name == "t-swap")
    shape = TableShape(**loaded_status.metadata.shape)
    b = compile_for(POLICY_B.format(port=port), tmp_path / "b.o", shape)

    flips: list[tuple[float, float, str]] = [(0.0, 0.0, "A")]
    stop = threading.Event()

    def reloader() -> None:
        which = "A"
        while not stop.is_set():
            time.sleep(0.02)
            which = "B" if which == "A" else "A"
            t0 = time.monotonic()
            runtime.reload("t-swap", b if which == "B" else a)
            flips.append((t0, time.monotonic(), which))

    thread = threading.Thread(target=reloader)
    thread.start()
    try:
        outcome = run_in_cgroup(cgroup, client, port, ROUNDS)
    finally:
        stop.set()
        thread.join()
    try:
        # Thresholds leave room for a loaded machine, where a grace period takes longer.
        assert len(flips) > 5, f"too few reloads happened during the traffic ({len(flips)})"
        # The keep-alive connection was never refused or reset by any of the reloads.
        assert outcome["keepalive_ok"] == ROUNDS
        expected = {"A": {"/a": True, "/b": False}, "B": {"/a": False, "/b": True}}
        judged = ambiguous = 0
        for path, t0, t1, allowed in outcome["results"]:
            # Policies whose flip window overlaps the send are both possible; otherwise exactly
            # the one whose flip completed last before the send started is.
            in_force = [w for s, e, w in flips if e <= t0][-1]
            overlapping = {w for s, e, w in flips if s <= t1 and e >= t0}
            possible = {in_force} | overlapping
            assert allowed in {expected[w][path] for w in possible}, (path, possible)
            if len(possible) == 1:
                judged += 1
            else:
                ambiguous += 1
        # Enough requests fell between flips for the check to mean something (fewer do when a
        # loaded machine makes each grace period, hence each flip window, longer).
        assert judged >= 30, f"only {judged} requests were unambiguous ({ambiguous} were not)"
        status = next(s for s in runtime.status() if s.name == "t-swap")
        assert status.program_ids == program_ids  # the same programs throughout
    finally:
        runtime.unload("t-swap")


def test_reload_rejects_what_does_not_fit_and_leaves_the_policy_alone(
    tmp_path, cgroup, http_server, http_client
):
    port = http_server.port
    a = compile_for(POLICY_A.format(port=port), tmp_path / "a.o")
    runtime.load(a, cgroup, name="t-swap2").close()
    try:
        other_port = compile_for(POLICY_B.format(port=port + 1), tmp_path / "p.o")
        with pytest.raises(runtime.ReloadError, match="ports changed"):
            runtime.reload("t-swap2", other_port)
        tiny = TableShape(6, 5, 3, 1, 1, 4, 1, 1, 1)
        with pytest.raises(Exception, match="larger tables"):
            compile_for(POLICY_B.format(port=port), tmp_path / "t.o", tiny)
        # Still policy A.
        conns = http_client(cgroup, port, [[request("/a")], [request("/b")]])
        assert [c.refused for c in conns] == [False, True]
    finally:
        runtime.unload("t-swap2")


def test_established_connection_gets_the_new_policy_at_its_next_request(
    tmp_path, cgroup, http_server, connect_in_cgroup
):
    port = http_server.port
    a = compile_for(POLICY_A.format(port=port), tmp_path / "a.o")
    runtime.load(a, cgroup, name="t-swap3").close()
    try:
        shape = TableShape(
            **next(s for s in runtime.status() if s.name == "t-swap3").metadata.shape
        )
        b = compile_for(POLICY_B.format(port=port), tmp_path / "b.o", shape)
        conn = connect_in_cgroup(cgroup, port)
        conn.sendall(request("/a"))
        assert read_response(conn).startswith(b"HTTP/1.1 200")
        runtime.reload("t-swap3", b)
        conn.sendall(request("/b"))  # allowed only by B: the same connection now runs B
        assert read_response(conn).startswith(b"HTTP/1.1 200")
        with pytest.raises(PermissionError):
            conn.sendall(request("/a"))
        http_server.settle()
        assert http_server.request_lines() == [b"GET /a HTTP/1.1", b"GET /b HTTP/1.1"]
    finally:
        runtime.unload("t-swap3")
