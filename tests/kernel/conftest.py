"""Fixtures for tests that load policies into the running kernel.

Every test under tests/kernel is marked `kernel` and needs root (CAP_BPF + CAP_NET_ADMIN), a cgroup
v2 mount and a bpffs (mounted here if missing). When any of that is missing the tests skip, loudly
(a banner at the end of the run); with CI=true they FAIL instead, so a CI that silently lost its
privileges cannot pass.

Fixtures:
    bpffs                   Path of the mounted bpffs
    cgroup2_root            Path of the cgroup v2 mount
    cgroup                  a fresh child cgroup, removed after the test (processes moved out first)
    free_port               an unused TCP port on 127.0.0.1
    http_server             RecordingHTTPServer on 127.0.0.1: records every byte per connection,
                            answers each request 200 with a small body, keep-alive
    run_in_cgroup           run(cgroup, argv | callable, *args) -> CompletedProcess | return value;
                            the child is in the cgroup before it runs anything
    http_client             client(cgroup, port, [[bytes, ...], ...]) -> list[ClientConnection]:
                            one connection per inner list, one send() per bytes, with what each
                            send returned (or its errno) and what came back
    connect_in_cgroup       connect(cgroup, port) -> socket made by a process in the cgroup and
                            passed back (SCM_RIGHTS), to send on it from the test at any time
    compiled_policy         compile(policy_text) -> Path of the object (sockpol.compiler)
    unverifiable_copy       copy(obj) -> Path of a copy whose sk_msg program the verifier rejects
    assert_nothing_left     check(name, cgroup=None): no pins, programs, maps or cgroup attachment

A safety net unloads any policy that a test (or the whole session) loaded and left behind; then
every test must leave no new map named sockpol* that nothing keeps (no pin, no program, no open
fd): such a map never goes (the orphaned `sockpol_next` arrays, libbpf.ProgArrayRef).
All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import pickle
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sockpol.contract import (
    CONN_MAP,
    MSG_PROGRAM,
    NEXT_MAP,
    SKB_PROGRAM,
    SOCK_MAP,
    SOCKOPS_PROGRAM,
)

HERE = Path(__file__).parent
TEST_CGROUP_PREFIX = "sockpol-test-"
# Each test session pins under a pin root of its own (sockpol/runtime/pins.py): two sessions on
# one host (two checkouts, or a developer's run next to CI's) cannot then see, replace or unload
# each other's policies, whatever the tests name them. Set here, at import, so that every
# `sockpol` command the tests start inherits it. A root chosen by the caller is kept.
TEST_PIN_ROOT = f"sockpol-test-{os.getpid()}"
os.environ.setdefault("SOCKPOL_PIN_ROOT", TEST_PIN_ROOT)
SOCKPOL_PROGS = {MSG_PROGRAM, SKB_PROGRAM, SOCKOPS_PROGRAM}
# The maps of a policy object, and the telemetry maps (sockpol/telemetry.py).
SOCKPOL_MAPS = {SOCK_MAP, CONN_MAP, NEXT_MAP, "sockpol_state", "sockpol_zero"} | {
    "sockpol_counts",
    "sockpol_events",
    "sockpol_evbuf",
    "sockpol_ctl",
}
SOCKPOL_MAP_PREFIX = "sockpol."  # libbpf's global-data maps: sockpol.rodata, sockpol.data, ...
SOCKPOL_NAME_PREFIX = "sockpol"  # every map of sockpol's objects, the runtime's and the probes'

_loud_skips: list[str] = []


# ---------------------------------------------------------------------------------------------
# Gating: mark, skip loudly, fail on CI


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.kernel)


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"kernel tests cannot run on CI: {reason}", pytrace=False)
    reason += " (needs root on Linux with cgroup v2; with CI=true this fails instead)"
    if reason not in _loud_skips:
        _loud_skips.append(reason)
    pytest.skip(f"KERNEL TEST SKIPPED: {reason}")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _loud_skips:
        return
    terminalreporter.write_sep("!", "KERNEL TESTS WERE SKIPPED", red=True, bold=True)
    for reason in _loud_skips:
        terminalreporter.write_line(f"  {reason}", red=True)


def _environment_problem() -> str | None:
    if sys.platform != "linux":
        return "not Linux"
    if os.geteuid() != 0:
        return "not running as root (needs CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN to mount bpffs)"
    from sockpol.diagnostics import SockpolError
    from sockpol.runtime import libbpf
    from sockpol.runtime.system import cgroup2_mount, check_privileges, ensure_bpffs

    try:
        check_privileges()
        cgroup2_mount()
        ensure_bpffs()
        libbpf.lib()
    except SockpolError as e:
        return str(e)
    if shutil.which("bpftool") is None:
        return "bpftool not installed (apt-get install bpftool)"
    return None


@pytest.fixture(scope="session")
def kernel_env() -> None:
    problem = _environment_problem()
    if problem is not None:
        _skip_or_fail(problem)


@pytest.fixture(scope="session")
def bpffs(kernel_env: None) -> Path:
    from sockpol.runtime.system import ensure_bpffs

    return ensure_bpffs()


@pytest.fixture(scope="session")
def cgroup2_root(kernel_env: None) -> Path:
    from sockpol.runtime.system import cgroup2_mount

    return cgroup2_mount()


# ---------------------------------------------------------------------------------------------
# Safety net: unload what tests leave behind


# Kernel tests name their policies with one of these prefixes; the safety net touches nothing
# else, so a test run never unloads a policy an operator (or another test run) loaded meanwhile.
TEST_NAME_PREFIXES = ("t-", "rt-", "test-")


def _loaded_names() -> set[str]:
    """Test policies loaded by this session: a test name, and attached to one of this
    session's cgroups (or to none). Another pytest session on the same machine (a second
    checkout's tests) has its own policies in the same bpffs; they are not ours to unload."""
    from sockpol.runtime import pins, status

    root = pins.pin_root(create=False)
    if root is None:
        return set()
    mine = f"{TEST_CGROUP_PREFIX}{os.getpid()}-"
    names = set()
    for p in root.iterdir():
        if not (p.is_dir() and pins.valid_name(p.name) and p.name.startswith(TEST_NAME_PREFIXES)):
            continue
        try:
            cgroup = next(iter(status(p.name)), None)
        except Exception:  # half-removed by its owner: not ours either way
            continue
        if cgroup is not None and (cgroup.cgroup is None or mine in cgroup.cgroup):
            names.add(p.name)
    return names


def _unload_quietly(names: set[str], why: str) -> None:
    from sockpol.runtime import PolicyNotFound, unload

    for name in sorted(names):
        try:
            unload(name)
            print(f"\nsafety net: unloaded policy {name!r} left behind by {why}", file=sys.stderr)
        except PolicyNotFound:
            pass
        except Exception as e:  # the net must not mask the test's own outcome
            print(f"\nsafety net: could not unload {name!r}: {e}", file=sys.stderr)


@pytest.fixture(scope="session", autouse=True)
def _session_safety_net() -> Iterator[None]:
    if _environment_problem() is not None:
        yield
        return
    from sockpol.runtime import libbpf

    _remove_stale_test_cgroups()
    before = _loaded_names()
    maps_before = libbpf.map_ids()
    yield
    _unload_quietly(_loaded_names() - before, "the test session")
    _remove_own_pin_root()
    # What module- and session-scoped fixtures unloaded after the last test's own check.
    left = _maps_left_behind(maps_before)
    assert not left, f"BPF maps left behind by the test session, held by nothing: {left}"


def _remove_own_pin_root() -> None:
    """The session's pin root goes once its policies are gone (one left loaded keeps it)."""
    from sockpol.runtime import pins

    if pins.root_name() == TEST_PIN_ROOT and (kept := pins.remove_root()):
        print(f"\nsafety net: pin root kept: {kept}", file=sys.stderr)


@pytest.fixture(autouse=True)
def _test_safety_net(kernel_env: None, request: pytest.FixtureRequest) -> Iterator[None]:
    from sockpol.runtime import libbpf

    before = _loaded_names()
    maps_before = libbpf.map_ids()
    yield
    _unload_quietly(_loaded_names() - before, request.node.nodeid)
    left = _maps_left_behind(maps_before)
    assert not left, (
        f"BPF maps left behind, held by nothing (no pin, program or fd), so never freed: "
        f"{left} (created while this test ran; on a shared host another test session may "
        f"have made them)"
    )


# ---------------------------------------------------------------------------------------------
# cgroups

_cgroup_counter = itertools.count()


def _move_out(cgroup: Path, to: Path) -> None:
    for child in [p for p in cgroup.iterdir() if p.is_dir()]:
        _move_out(child, to)
    for pid in (cgroup / "cgroup.procs").read_text().split():
        try:
            (to / "cgroup.procs").write_text(pid)
        except OSError as e:
            if e.errno != errno.ESRCH:  # it exited meanwhile
                raise


def _remove_cgroup(cgroup: Path, root: Path) -> None:
    if not cgroup.exists():
        return
    _move_out(cgroup, root)
    for child in [p for p in cgroup.iterdir() if p.is_dir()]:
        _remove_cgroup(child, root)
    for _ in range(50):  # rmdir is EBUSY until exited members are fully gone
        try:
            cgroup.rmdir()
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            time.sleep(0.05)
    cgroup.rmdir()


def _remove_stale_test_cgroups() -> None:
    from sockpol.runtime.system import cgroup2_mount

    root = cgroup2_mount()
    for stale in root.glob(f"{TEST_CGROUP_PREFIX}*"):
        # Named <prefix><pid>-<n>: a cgroup of a test session that is still running is not stale.
        owner = stale.name[len(TEST_CGROUP_PREFIX) :].split("-")[0]
        if owner.isdigit() and Path(f"/proc/{owner}").exists():
            continue
        try:
            _remove_cgroup(stale, root)
        except OSError as e:
            print(f"\ncould not remove stale test cgroup {stale}: {e}", file=sys.stderr)


@pytest.fixture
def cgroup(cgroup2_root: Path) -> Iterator[Path]:
    path = cgroup2_root / f"{TEST_CGROUP_PREFIX}{os.getpid()}-{next(_cgroup_counter)}"
    path.mkdir()
    try:
        yield path
    finally:
        _remove_cgroup(path, cgroup2_root)


# ---------------------------------------------------------------------------------------------
# Ports and the recording HTTP server


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerConnection:
    """What one accepted connection delivered, byte for byte, and the requests parsed from it."""

    peer: tuple[str, int]
    received: bytearray = field(default_factory=bytearray)
    requests: list[bytes] = field(default_factory=list)
    closed: bool = False


def _request_length(buf: bytes) -> int | None:
    """Length of the first complete request (head + Content-Length body) in buf, if complete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[: end + 4]
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip() or 0)
    total = len(head) + length
    return total if len(buf) >= total else None


RESPONSE_BODY = b"ok\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (
    len(RESPONSE_BODY),
    RESPONSE_BODY,
)


class RecordingHTTPServer:
    """A real HTTP/1.1 server on 127.0.0.1 that records everything it receives.

    It runs in threads of the test process, which is not in the test cgroup, so its own sockets
    are never governed by the policy under test.
    """

    def __init__(self, listener: socket.socket | None = None) -> None:
        # `listener`: one made elsewhere (tests/kernel/test_ingress.py makes it inside a test
        # cgroup, so that the connections it accepts are governed by an ingress policy).
        if listener is None:
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", 0))
            listener.listen(128)
        self._listener = listener
        self.port: int = self._listener.getsockname()[1]
        self.connections: list[ServerConnection] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._accept_thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._listener], [], [], 0.1)
            if not ready:
                continue
            try:
                conn, peer = self._listener.accept()
            except OSError:
                continue
            record = ServerConnection(peer=peer)
            with self._lock:
                self.connections.append(record)
                self._socks.append(conn)
            t = threading.Thread(target=self._serve, args=(conn, record), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket, record: ServerConnection) -> None:
        buf = b""
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([conn], [], [], 0.1)
                if not ready:
                    continue
                data = conn.recv(65536)
                if not data:
                    break
                with self._lock:
                    record.received += data
                buf += data
                while (n := _request_length(buf)) is not None:
                    request, buf = buf[:n], buf[n:]
                    with self._lock:
                        record.requests.append(request)
                    conn.sendall(RESPONSE)
                    if b"connection: close" in request.lower():
                        return
        except OSError:
            pass
        finally:
            record.closed = True
            conn.close()

    # -- what tests look at ----------------------------------------------------------------

    def received(self) -> bytes:
        with self._lock:
            return b"".join(bytes(c.received) for c in self.connections)

    def requests(self) -> list[bytes]:
        with self._lock:
            return [r for c in self.connections for r in c.requests]

    def request_lines(self) -> list[bytes]:
        return [r.split(b"\r\n", 1)[0] for r in self.requests()]

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(self.requests()) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.requests()

    def settle(self, quiet: float = 0.3) -> None:
        """Wait until nothing new has arrived for `quiet` seconds (to assert on absence)."""
        last = -1
        while (size := len(self.received())) != last:
            last = size
            time.sleep(quiet)

    def stop(self) -> None:
        self._stop.set()
        self._accept_thread.join(2)
        for t in self._threads:
            t.join(2)
        self._listener.close()


@pytest.fixture
def make_http_server() -> Iterator[Callable[..., RecordingHTTPServer]]:
    """A factory of recording servers (optionally on a listener made elsewhere), stopped at the
    end of the test. (Tests take the class through this fixture: `from conftest import ...`
    finds another conftest when tests/kernel/ktls is collected in the same session.)"""
    made: list[RecordingHTTPServer] = []

    def make(listener: socket.socket | None = None) -> RecordingHTTPServer:
        made.append(RecordingHTTPServer(listener))
        return made[-1]

    try:
        yield make
    finally:
        for server in made:
            server.stop()


@pytest.fixture
def http_server() -> Iterator[RecordingHTTPServer]:
    server = RecordingHTTPServer()
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# Running clients inside a cgroup

_GO_SHIM = "import os, sys; sys.stdin.readline(); os.execvp(sys.argv[1], sys.argv[1:])"


def _enter(cgroup: Path, pid: int) -> None:
    (cgroup / "cgroup.procs").write_text(str(pid))


def run_in_cgroup(
    cgroup: Path, target: Sequence[str] | Callable[..., Any], *args: Any, timeout: float = 30.0
) -> Any:
    """Run a command (argv) or a Python callable in a child process that is in `cgroup` first.

    The child waits for a go signal until the parent has written its pid to cgroup.procs, so every
    socket it creates belongs to the cgroup. argv -> CompletedProcess (output captured as bytes);
    callable -> its return value (picklable builtins), or RuntimeError with the child's error.
    """
    if not callable(target):
        proc = subprocess.Popen(
            [sys.executable, "-c", _GO_SHIM, *target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            _enter(cgroup, proc.pid)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        out, err = proc.communicate(b"go\n", timeout=timeout)
        return subprocess.CompletedProcess(list(target), proc.returncode, out, err)

    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery from here on, and leave with os._exit
        status = 0
        try:
            os.close(go_w)
            os.close(res_r)
            os.read(go_r, 1)
            try:
                payload = pickle.dumps(("ok", target(*args)))
            except BaseException as e:
                payload = pickle.dumps(("error", f"{type(e).__name__}: {e}"))
            with os.fdopen(res_w, "wb") as f:
                f.write(payload)
        except BaseException:
            status = 1
        os._exit(status)
    os.close(go_r)
    os.close(res_w)
    try:
        _enter(cgroup, pid)
        os.write(go_w, b"g")
        os.close(go_w)
        go_w = -1
        data = _read_all(res_r, timeout)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        if go_w >= 0:
            os.close(go_w)
        os.close(res_r)
        os.waitpid(pid, 0)
    if not data:
        raise RuntimeError("child in cgroup died without a result")
    kind, value = pickle.loads(data)
    if kind == "error":
        raise RuntimeError(f"child in cgroup failed: {value}")
    return value


def _read_all(fd: int, timeout: float) -> bytes:
    chunks, deadline = [], time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("child in cgroup did not finish")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


@pytest.fixture(name="run_in_cgroup")
def run_in_cgroup_fixture(kernel_env: None) -> Callable[..., Any]:
    return run_in_cgroup


@dataclass(frozen=True)
class SendResult:
    data: bytes
    sent: int | None  # what send() returned, None if it failed
    errno: int | None  # errno of a failed send (EACCES: the policy dropped it)


@dataclass(frozen=True)
class ClientConnection:
    cookie: int  # SO_COOKIE: the key the sock_ops program uses in the sockhash
    sends: list[SendResult]
    received: bytes  # everything the server sent back on this connection

    @property
    def refused(self) -> bool:
        return any(s.errno == errno.EACCES for s in self.sends)


def _read_response(sock: socket.socket, timeout: float) -> bytes:
    """Read one HTTP response (head + Content-Length body), or what arrives before timeout."""
    sock.settimeout(timeout)
    buf = b""
    try:
        while _request_length(buf) is None:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    except (TimeoutError, OSError):
        pass
    return buf


def http_session(
    port: int, connections: list[list[bytes]], read_timeout: float = 1.0
) -> list[tuple[int, list[tuple[bytes, int | None, int | None]], bytes]]:
    """Client side (runs in the child): each inner list is one connection, each item one send()."""
    out = []
    for sends in connections:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        cookie = struct.unpack("<Q", s.getsockopt(socket.SOL_SOCKET, 57, 8))[0]
        results, received = [], b""
        for data in sends:
            try:
                results.append((data, s.send(data), None))
            except OSError as e:
                results.append((data, None, e.errno))
                continue
            if data.endswith(b"\r\n\r\n"):  # a complete head: expect a response
                received += _read_response(s, read_timeout)
        s.close()
        out.append((cookie, results, received))
    return out


def http_client(
    cgroup: Path, port: int, connections: list[list[bytes]], read_timeout: float = 1.0
) -> list[ClientConnection]:
    raw = run_in_cgroup(cgroup, http_session, port, connections, read_timeout)
    return [
        ClientConnection(cookie, [SendResult(*r) for r in results], received)
        for cookie, results, received in raw
    ]


def connect_in_cgroup(cgroup: Path, port: int) -> socket.socket:
    """A TCP connection to 127.0.0.1:port made by a process in `cgroup`, handed to the caller.

    The child connects (so sock_ops sees a connection of the cgroup) and passes the socket back
    over SCM_RIGHTS; the test then decides when to send on it, e.g. across a policy replacement.
    """
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def connect_and_pass() -> bool:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        socket.send_fds(child_end, [b"fd"], [s.fileno()])
        return True

    with parent_end, child_end:
        run_in_cgroup(cgroup, connect_and_pass)
        _, fds, _, _ = socket.recv_fds(parent_end, 16, 1)
    sock = socket.socket(fileno=fds[0])
    sock.settimeout(5)
    return sock


@pytest.fixture(name="connect_in_cgroup")
def connect_in_cgroup_fixture(kernel_env: None) -> Iterator[Callable[[Path, int], socket.socket]]:
    opened: list[socket.socket] = []

    def connect(cgroup: Path, port: int) -> socket.socket:
        opened.append(connect_in_cgroup(cgroup, port))
        return opened[-1]

    yield connect
    for s in opened:
        s.close()


@pytest.fixture(name="http_client")
def http_client_fixture(kernel_env: None) -> Callable[..., list[ClientConnection]]:
    return http_client


# ---------------------------------------------------------------------------------------------
# Objects


@pytest.fixture
def compiled_policy(tmp_path: Path) -> Callable[..., Path]:
    """compile(policy_text, source_name="test.pol") -> Path (sockpol.compiler.compile_to_file)."""
    try:
        from sockpol.compiler import compile_to_file
    except ImportError as e:
        missing_compiler = getattr(e, "name", None) in ("sockpol.compiler", None) or (
            "compile_to_file" in str(e)
        )
        if not missing_compiler:
            raise
        reason = f"sockpol.compiler.compile_to_file is not available ({e}); no object to load"
        if reason not in _loud_skips:
            _loud_skips.append(reason)
        pytest.skip(f"KERNEL TEST SKIPPED: {reason}")
    counter = itertools.count()

    def compile_policy(policy_text: str, source_name: str = "test.pol") -> Path:
        out = tmp_path / f"policy{next(counter)}.o"
        compile_to_file(policy_text, out, source_name=source_name)
        return out

    return compile_policy


_BPF_LDX_MEM_DW = 0x79
_BPF_LD_IMM64 = 0x18


def make_unverifiable(obj: Path, out: Path) -> Path:
    """Copy a compiled object, making the verifier reject its sk_msg program.

    One instruction of the program (the first one without a relocation or an ld_imm64 around it)
    becomes `r0 = *(u64 *)(r10 + 8)`, a read above the stack frame, which the verifier refuses
    on every path. libbpf still opens the object, so the failure is the verifier's.
    """
    from elftools.elf.elffile import ELFFile
    from elftools.elf.relocation import RelocationSection

    data = bytearray(obj.read_bytes())
    with obj.open("rb") as f:
        elf = ELFFile(f)
        index = next(i for i, s in enumerate(elf.iter_sections()) if s.name == "sk_msg")
        section = elf.get_section(index)
        start, size = section["sh_offset"], section["sh_size"]
        relocated = set()
        for rel_section in elf.iter_sections():
            if isinstance(rel_section, RelocationSection) and rel_section["sh_info"] == index:
                relocated |= {r["r_offset"] for r in rel_section.iter_relocations()}
    code = data[start : start + size]
    for off in range(0, size, 8):
        prev_is_imm64 = off >= 8 and code[off - 8] == _BPF_LD_IMM64
        if off not in relocated and code[off] != _BPF_LD_IMM64 and not prev_is_imm64:
            data[start + off : start + off + 8] = struct.pack(
                "<BBhi", _BPF_LDX_MEM_DW, 0xA0, 8, 0
            )  # dst r0, src r10, off +8
            out.write_bytes(bytes(data))
            return out
    raise AssertionError(f"{obj}: no instruction of sk_msg can be patched")


@pytest.fixture
def unverifiable_copy(tmp_path: Path) -> Callable[[Path], Path]:
    counter = itertools.count()
    return lambda obj: make_unverifiable(obj, tmp_path / f"unverifiable{next(counter)}.o")


# ---------------------------------------------------------------------------------------------
# Nothing left behind


def bpftool_json(*args: str) -> Any:
    out = subprocess.run(
        ["bpftool", "--json", *args], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out) if out.strip() else []


def _sockpol_objects(old_maps: set[int]) -> tuple[dict[int, str], dict[int, str]]:
    """sockpol's programs, and its maps but those in `old_maps` (ids): id -> name. Only the
    other maps are opened (by id) to read their names, see _maps_left_behind."""
    from sockpol.runtime import libbpf

    progs = {p["id"]: p.get("name", "") for p in bpftool_json("prog", "show")}
    maps = _map_names(libbpf.map_ids() - old_maps)
    return (
        {i: n for i, n in progs.items() if n in SOCKPOL_PROGS},
        {i: n for i, n in maps.items() if n in SOCKPOL_MAPS or n.startswith(SOCKPOL_MAP_PREFIX)},
    )


def _map_names(ids: set[int]) -> dict[int, str]:
    """id -> name of the maps `ids` that still exist. Opens each by id (_maps_left_behind)."""
    from sockpol.runtime import libbpf
    from sockpol.runtime.libbpf import BpfError

    names = {}
    for map_id in sorted(ids):
        fd = libbpf.lib().bpf_map_get_fd_by_id(map_id)
        if fd < 0:  # gone
            continue
        try:
            names[map_id] = libbpf.map_info(fd).name
        except BpfError:
            pass
        finally:
            os.close(fd)
    return names


def _owned_by_live_policies() -> tuple[set[int], set[int]]:
    """(program ids, map ids) someone keeps: this session's loaded policies, and anything
    pinned anywhere in the bpffs (another session's policies live under another pin root)."""
    from sockpol.runtime import status

    progs, maps = _pinned_ids()
    for st in status():
        progs |= set(st.program_ids.values())
        maps |= set(st.map_ids.values())
    return progs, maps


def _pinned_ids() -> tuple[set[int], set[int]]:
    """(program ids, map ids) of every object pinned in the bpffs, read through the pins.
    (Not `bpftool --bpffs map show`: that opens every map by id, see _maps_left_behind.)"""
    from sockpol.runtime import libbpf
    from sockpol.runtime.libbpf import BpfError
    from sockpol.runtime.system import BPFFS_DEFAULT, find_bpffs

    progs: set[int] = set()
    maps: set[int] = set()
    bpffs = find_bpffs(BPFFS_DEFAULT)
    if bpffs is None:
        return progs, maps
    for directory, _, files in os.walk(bpffs):
        for name in files:
            try:
                fd = libbpf.obj_get(os.path.join(directory, name))
            except BpfError:  # unpinned meanwhile, or not a program or map (an iterator)
                continue
            try:
                maps.add(libbpf.map_info(fd).id)
            except BpfError:
                try:
                    progs.add(libbpf.prog_info(fd).id)
                except BpfError:
                    pass  # a link
            finally:
                os.close(fd)
    return progs, maps


def _maps_open_in_processes() -> set[int]:
    """Ids of the maps some process has an fd of (/proc/<pid>/fdinfo says map_id)."""
    ids: set[int] = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            fds = list(fd_dir.iterdir())
        except OSError:  # the process is gone
            continue
        for f in fds:
            try:
                if os.readlink(f) != "anon_inode:bpf-map":
                    continue
                info = (fd_dir.parent / "fdinfo" / f.name).read_text()
            except OSError:  # the fd (or the process) is gone
                continue
            found = [line.split()[1] for line in info.splitlines() if line.startswith("map_id:")]
            ids |= {int(i) for i in found}
    return ids


MAPS_LEFT_TIMEOUT = 10.0


def _maps_left_behind(before: set[int], timeout: float = MAPS_LEFT_TIMEOUT) -> dict[int, str]:
    """Maps named sockpol* created since `before` (ids) that nothing keeps: not pinned, used by
    no live program, open in no process. The kernel never frees such a map: that is how the
    orphaned `sockpol_next` arrays look (libbpf.ProgArrayRef). One that is still being freed
    (deferred work, late on a loaded machine) goes by itself; hence a bounded wait.

    Only the id spaces, the pins and /proc are read while waiting: opening a map by id (as
    `bpftool map show` does, for every map) while a program array is being freed is what makes
    the kernel leak it. Only maps still there at the end are opened, to read their names.
    Each test compares with its own `before`: another test session's maps come and go in
    between (its loads are pinned or open in its process, its unloads go by themselves)."""
    from sockpol.runtime import libbpf

    deadline = time.monotonic() + timeout
    while True:
        new = libbpf.map_ids() - before
        if new:
            for prog_id in libbpf.prog_ids():
                new -= set(libbpf.prog_map_ids(prog_id) or ())
        if new:
            new -= _pinned_ids()[1]
        if new:
            new -= _maps_open_in_processes()
        if not new or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return {i: n for i, n in _map_names(new).items() if n.startswith(SOCKPOL_NAME_PREFIX)}


@pytest.fixture
def assert_nothing_left(kernel_env: None) -> Callable[..., None]:
    """check(name, cgroup=None, timeout=15.0): nothing of policy `name` remains in the kernel.

    Programs and maps are recognized by sockpol's names and must not be new since the test began
    (unless a still-loaded policy owns them); the kernel frees them asynchronously after the last
    fd closes (a closed socket's psock, which holds the program, goes in deferred work that a
    loaded machine runs late), hence the polling. With `cgroup`, `bpftool cgroup show` of it
    must be empty; without, no sockpol program may be attached anywhere in the cgroup tree.
    Maps that existed before the test are not even opened (see _maps_left_behind).
    """
    from sockpol.runtime import libbpf, pins

    baseline_progs = set(_sockpol_objects(libbpf.map_ids())[0])
    baseline_maps = libbpf.map_ids()

    def check(name: str, cgroup: Path | None = None, timeout: float = 15.0) -> None:
        root = pins.pin_root(create=False)
        assert root is None or not (root / name).exists(), f"pins of {name} remain in {root}"
        if root is not None:
            temps = [p.name for p in root.iterdir() if p.name.startswith(pins.TEMP_PREFIX)]
            assert not temps, f"temporary pin directories remain: {temps}"
        deadline = time.monotonic() + timeout
        while True:
            owned_progs, owned_maps = _owned_by_live_policies()
            owned = owned_progs | baseline_progs  # programs (cgroup attachments below too)
            progs, maps = _sockpol_objects(baseline_maps)
            left = {f"prog {i} {n}" for i, n in progs.items() if i not in owned}
            left |= {f"map {i} {n}" for i, n in maps.items() if i not in owned_maps}
            if cgroup is not None:
                attached = bpftool_json("cgroup", "show", str(cgroup))
                left |= {f"cgroup {cgroup}: {a.get('name')} (id {a.get('id')})" for a in attached}
            else:
                for entry in bpftool_json("cgroup", "tree"):
                    for prog in entry.get("programs", []):
                        if prog.get("name") in SOCKPOL_PROGS and prog.get("id") not in owned:
                            left.add(f"cgroup {entry.get('cgroup')}: {prog.get('name')}")
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert not left, f"policy {name} left behind: {sorted(left)}"

    return check


# ---------------------------------------------------------------------------------------------
# TLS


@pytest.fixture(scope="session")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(cert.pem, key.pem): a self-signed certificate for localhost (RSA 2048, one day), made
    with the openssl command (scripts/test.sh installs it)."""
    d = tmp_path_factory.mktemp("self-signed")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key
