"""`sockpol demo`: enforce a policy on live loopback traffic and show every verdict.

It makes a temporary cgroup, serves HTTP on 127.0.0.1 at the policy's first port, loads the
policy for that cgroup, and sends sample requests (one per rule, plus refused ones) from client
processes placed in the cgroup, each on its own connection. For each request it prints what the
server received and the client saw, beside what the policy predicts. Everything it made is
removed at the end, whatever happens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from sockpol.codegen.simulate import run as simulate
from sockpol.compiler import compile_source, select
from sockpol.diagnostics import SockpolError, Source
from sockpol.samples import Sample, samples

DEFAULT_EXAMPLE = "examples/orders-api.pol"

# Runs in the client process: one connection, one send, report what happened as JSON.
CLIENT = r"""
import json, socket, sys
host, port, data = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
out = {"sent": False, "errno": None, "status": None}
s = socket.create_connection((host, port), timeout=3)
try:
    s.sendall(data)
    out["sent"] = True
    s.shutdown(socket.SHUT_WR)
    reply = s.recv(200)
    out["status"] = reply.split(b"\r\n", 1)[0].decode("latin-1") if reply else None
except OSError as e:
    out["errno"] = e.errno
print(json.dumps(out))
"""


class _Recorder(BaseHTTPRequestHandler):
    received: list[str] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        _Recorder.received.append(f"{self.command} {self.path}")
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _answer

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def _server(port: int):
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), _Recorder)
    except OSError as e:
        raise SockpolError(f"demo: cannot listen on 127.0.0.1:{port}: {e.strerror}") from None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def _temporary_cgroup(parent: str | None):
    from sockpol.runtime.system import cgroup2_mount

    base = Path(parent) if parent else cgroup2_mount()
    path = base / f"sockpol-demo-{os.getpid()}"
    try:
        path.mkdir()
    except OSError as e:
        raise SockpolError(f"demo: cannot create cgroup {path}: {e.strerror}") from None
    try:
        yield path
    finally:
        path.rmdir()


def _send_from_cgroup(cgroup: Path, port: int, sample: Sample) -> dict:
    procs = cgroup / "cgroup.procs"

    def enter_cgroup() -> None:
        procs.write_text(str(os.getpid()))

    result = subprocess.run(
        [sys.executable, "-c", CLIENT, "127.0.0.1", str(port), sample.data.hex()],
        preexec_fn=enter_cgroup,
        capture_output=True,
        text=True,
        timeout=10,
    )
    if result.returncode != 0:
        return {"sent": False, "errno": None, "status": None, "error": result.stderr.strip()[-200:]}
    return json.loads(result.stdout)


def run_demo(file: str | None, policy: str | None = None, cgroup_parent: str | None = None) -> int:
    from sockpol import runtime
    from sockpol.runtime import pins

    path = file or DEFAULT_EXAMPLE
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise SockpolError(f"{path}: {e.strerror}") from None
    compiled = select(compile_source(text, path)[0], policy, Source(path, text))
    port = compiled.policy.ports[0].low
    print(
        f"policy {compiled.policy.name} from {path}: port {port}, "
        f"default {compiled.policy.default.value}"
    )
    mismatches = 0
    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="sockpol-demo-"))
        obj = Path(tmp) / "demo.bpf.o"
        obj.write_bytes(compiled.object_code())
        cgroup = stack.enter_context(_temporary_cgroup(cgroup_parent))
        stack.enter_context(_server(port))
        name = f"demo-{os.getpid()}"
        if pins.pin_root(create=False) is None:  # the demo makes the pin root: it removes it
            stack.callback(pins.remove_root)  # (unless a policy loaded meanwhile is pinned)
        loaded = runtime.load(obj, cgroup, name=name)
        loaded.close()
        stack.callback(runtime.unload, name)
        print(f"loaded as '{name}' for cgroup {cgroup}; sending from a client process in it:\n")
        for sample in samples(compiled.policy):
            expected = simulate(compiled.matcher, sample.data)
            _Recorder.received.clear()
            seen = _send_from_cgroup(cgroup, port, sample)
            passed = seen.get("status") is not None and seen["status"].startswith("HTTP/")
            if expected.allow:
                why = f"rule {expected.rule}" if expected.rule is not None else "default"
            else:
                why = expected.reason.slug
                if expected.rule is not None:
                    why += f" {expected.rule}"
            if passed:
                got = f"PASSED   server answered {seen['status']}"
            elif seen.get("errno") == 13:
                got = "REFUSED  send() failed with EACCES; server received nothing"
            else:
                got = f"FAILED   {seen}"
            ok = passed == expected.allow
            mismatches += not ok
            flag = "" if ok else "   <-- differs from the policy's verdict!"
            line = sample.request_line if sample.data.isascii() else sample.data[:12].hex() + "..."
            print(
                f"  {line[:60]:<60} {got}  ({'allow' if expected.allow else 'deny'}: {why}){flag}"
            )
    print("\nunloaded; cgroup, server and pins removed.")
    if mismatches:
        print(f"{mismatches} verdict(s) differed from the policy", file=sys.stderr)
        return 1
    return 0
