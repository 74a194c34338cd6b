"""kTLS receive on a connection that an ingress policy governs (issue 17; docs/ktls.md, "The
receiving side"): what the kernel allows, and that a denied request never reaches the server.

The server's accepted socket is in the policy's sockhash from PASSIVE_ESTABLISHED on; the server
then asks for kTLS receive (TCP_ULP "tls", TLS_RX with static keys), the client for kTLS send.
Kernels with "tls: reject the combination of TLS and sockmap" refuse the server's setsockopt;
on the others the TLS receive path runs the verdict program on decrypted records. Either way, a
denied request's plaintext must never be readable by the server. What happened is printed (the
VM runs keep it) and summarized in docs/ktls.md.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from sockpol.compiler import compile_source
from sockpol.runtime import ktls, load, unload
from sockpol.runtime.counters import read_counters

NAME = "t-in-ktls"


def head(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: api.test\r\n\r\n".encode()


def listener_in(cgroup: Path, root: Path) -> socket.socket:
    """A listener of `cgroup` (as tests/kernel/test_ingress.py makes them: the accepted sockets
    take the listener's cgroup, and a socket takes its creator's)."""
    home = root
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            home = root / line[3:].lstrip("/")
    (cgroup / "cgroup.procs").write_text(str(os.getpid()))
    try:
        sock = socket.socket()
    finally:
        (home / "cgroup.procs").write_text(str(os.getpid()))
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(5)
    return sock


def _read(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    got = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and b"\r\n\r\n" not in got:
            chunk = sock.recv(4096)
            if not chunk:
                break
            got += chunk
    except OSError:
        pass
    return got


def test_ktls_receive_on_an_ingress_connection(
    ktls_kernel, ktls_sockmap, cgroup: Path, cgroup2_root: Path, tmp_path: Path
) -> None:
    listener = listener_in(cgroup, cgroup2_root)
    port = listener.getsockname()[1]
    text = (
        f"policy {NAME} {{\n    port {port}\n    side ingress\n    default deny\n"
        "    allow GET /ok/**\n}\n"
    )
    compiled, _ = compile_source(text, "ktls-ingress.pol")
    obj = tmp_path / "ktls-ingress.bpf.o"
    obj.write_bytes(compiled[0].object_code())
    loaded = load(str(obj), str(cgroup), name=NAME)
    keys = ktls.StaticKeys.fixed()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            server, _ = listener.accept()
            with server:
                try:
                    ktls.enable_rx(server, keys)
                    rx_error = None
                except OSError as e:
                    rx_error = e.errno
                print(f"\n{ktls_kernel.detail}; kTLS on sockhash sockets: {ktls_sockmap.detail}")
                print(f"TLS_RX on a governed accepted socket: {rx_error or 'accepted'}")
                if rx_error is not None:
                    # Refused: the server cannot use kTLS receive on a governed connection; the
                    # plaintext connection stays governed as any other.
                    client.sendall(head("/admin"))
                    got = _read(server, 1.0)
                    assert b"/admin" not in got
                    assert not ktls_sockmap.ok or rx_error is not None
                    return
                ktls.enable_tx(client, keys)
                client.sendall(head("/ok/ktls"))
                allowed = _read(server, 2.0)
                print(f"allowed request, read by the server through kTLS: {allowed[:40]!r}")
                client.sendall(head("/admin/ktls"))
                denied = _read(server, 2.0)
                print(f"denied request, read by the server through kTLS: {denied[:40]!r}")
                c = read_counters(loaded.pin_dir, loaded.metadata)
                judged = {"allowed": c.rules[0].requests, "default": c.default.requests}
                print(f"the policy's counts: {judged}, refused {c.refused}")
                # Fail closed whatever the kernel does with the records.
                assert b"/admin/ktls" not in denied
    finally:
        loaded.close()
        unload(NAME)
        listener.close()
