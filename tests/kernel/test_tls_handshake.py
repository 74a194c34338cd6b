"""The TLS handshake walk of a `tls` policy in the real kernel, with real OpenSSL (Python `ssl`)
doing TLS in user space: the program sees the client's handshake records and then its
encrypted requests, exactly what a client without kTLS sends. kTLS itself is not needed (the
host kernels here have no CONFIG_TLS), so the policies are loaded with `check_tls=False`; the
kTLS side (plaintext judged after the handshake) is tests/kernel/ktls/test_ktls_clients.py.

The server is a Python TLS server in the test process (outside the cgroup): what it decrypted
is what got through.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sockpol import runtime
from sockpol.runtime import counters as rc

pytestmark = pytest.mark.kernel

VERSIONS = {"tls12": ssl.TLSVersion.TLSv1_2, "tls13": ssl.TLSVersion.TLSv1_3}
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"


@dataclass
class TlsServer:
    """Accepts TLS connections, reads one request head each, answers 200."""

    cert: Path
    key: Path
    listener: socket.socket = field(init=False)
    port: int = field(init=False)
    handshakes: int = 0
    received: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(self.cert, self.key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(raw,), daemon=True).start()

    def _one(self, raw: socket.socket) -> None:
        raw.settimeout(5)
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as s:
                with self.lock:
                    self.handshakes += 1
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
                    while b"\r\n\r\n" in data:
                        head, data = data.split(b"\r\n\r\n", 1)
                        with self.lock:
                            self.received.append(head)
                        s.sendall(RESPONSE)
        except OSError:
            pass

    def wait_handshakes(self, n: int, timeout: float = 5.0) -> int:
        """The server finishes a TLS 1.3 handshake after the client does: wait for it."""
        deadline = time.monotonic() + timeout
        while self.handshakes < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.handshakes

    def stop(self) -> None:
        self.listener.close()


@pytest.fixture
def server(self_signed: tuple[Path, Path], kernel_env: None) -> Iterator[TlsServer]:
    s = TlsServer(*self_signed)
    yield s
    s.stop()


def client(port: int, cafile: str | None, version: int | None, requests: list[bytes]) -> dict:
    """Runs in the cgroup: one connection, TLS in user space (cafile) or plaintext, the requests
    in turn; says how far it got."""
    out: dict = {"sent": 0}
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if cafile is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(cafile)
            ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion(version)
            sock = ctx.wrap_socket(sock, server_hostname="localhost")
            out["cipher"] = sock.cipher()[0]
        with sock:
            for data in requests:
                sock.sendall(data)
                out["sent"] += 1
                response = b""
                while b"ok\n" not in response and (chunk := sock.recv(4096)):
                    response += chunk
                out.setdefault("responses", []).append(response.split(b"\r\n", 1)[0].decode())
    except OSError as e:
        out["error"] = f"{type(e).__name__}: {e}"
        out["errno"] = e.errno
    return out


def request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()


def policy(name: str, port: int, tls: str | None) -> str:
    return (
        f"policy {name} {{\n    port {port}\n    default deny\n"
        + (f"    {tls}\n" if tls else "")
        + "    allow GET /ok\n}\n"
    )


@pytest.fixture
def loaded(compiled_policy, cgroup) -> Iterator:
    names: list[str] = []

    def load(name: str, port: int, tls: str | None) -> Path:
        obj = compiled_policy(policy(name, port, tls), f"{name}.pol")
        runtime.load(obj, cgroup, name=name, check_tls=False).close()
        names.append(name)
        return cgroup

    yield load
    for name in names:
        runtime.unload(name)


def counters(name: str) -> rc.PolicyCounters:
    s = next(s for s in runtime.status() if s.name == name)
    return rc.read_counters(s.pin_dir, s.metadata)


@pytest.mark.parametrize("version", VERSIONS)
def test_userspace_tls_handshake_passes_and_its_requests_are_refused(
    version, server, loaded, run_in_cgroup, self_signed
):
    cg = loaded("t-tls-deny", server.port, "tls")
    out = run_in_cgroup(
        cg, client, server.port, str(self_signed[0]), VERSIONS[version].value, [request("/ok")]
    )
    assert "cipher" in out, out  # the whole handshake went through the program
    # The request did not: the write failed (EACCES, which OpenSSL reports as an EOF).
    assert out["sent"] == 0 and "error" in out, out
    assert server.wait_handshakes(1) == 1 and server.received == [], server.received
    c = counters("t-tls-deny")
    assert c.refused.get("tls-userspace", rc.Count()).requests == 1, c
    assert sum(r.requests for r in c.rules) == 0 and c.default.requests == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_userspace_allow_lets_the_connection_pass_unjudged(
    version, server, loaded, run_in_cgroup, self_signed
):
    cg = loaded("t-tls-allow", server.port, "tls userspace allow")
    reqs = [request("/ok"), request("/denied-in-plaintext")]
    out = run_in_cgroup(cg, client, server.port, str(self_signed[0]), VERSIONS[version].value, reqs)
    assert out.get("responses") == ["HTTP/1.1 200 OK"] * 2, out
    assert [r.split(b"\r\n")[0] for r in server.received] == [r.split(b"\r\n")[0] for r in reqs]
    c = counters("t-tls-allow")
    assert c.would_refuse.get("tls-userspace", rc.Count()).requests == 1, c
    assert c.unjudged.requests >= 1, c  # the second request's record, at least
    assert not c.refused, c


def test_tls_on_a_plaintext_policy_is_refused_at_the_client_hello(
    server, loaded, run_in_cgroup, self_signed
):
    cg = loaded("t-tls-none", server.port, None)
    out = run_in_cgroup(cg, client, server.port, str(self_signed[0]), VERSIONS["tls13"].value, [])
    assert "cipher" not in out and out.get("errno") == 13, out
    assert server.handshakes == 0
    assert counters("t-tls-none").refused["tls-not-declared"].requests == 1


def test_plaintext_http_on_a_tls_policy_is_judged_as_http(http_server, loaded, run_in_cgroup):
    cg = loaded("t-tls-plain", http_server.port, "tls")
    ok = run_in_cgroup(cg, client, http_server.port, None, None, [request("/ok")] * 2)
    denied = run_in_cgroup(cg, client, http_server.port, None, None, [request("/admin")])
    assert ok.get("sent") == 2 and "error" not in ok, ok
    assert denied.get("errno") == 13, denied
    http_server.settle()
    assert http_server.request_lines() == [b"GET /ok HTTP/1.1"] * 2
    c = counters("t-tls-plain")
    assert c.rules[0].requests == 2 and c.default.requests == 1, c
