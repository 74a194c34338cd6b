"""Load, replace, inspect and unload compiled policies in the running kernel.

A load, in order (each step undone if a later one fails, so a failed load leaves nothing behind):
  0. a policy with a `tls` statement needs kTLS on sockets in a sockhash: where the kernel cannot
     do that (probe.tls_policy_support()), the load is refused before anything is touched;
  1. read `.sockpol.meta`, open the object with libbpf, check the object contract
     (sk_msg program `sockpol_msg`, sock_ops program `sockpol_sockops`, sockhash `sockpol_socks`);
  2. replacing a loaded policy of the same name: make the object reuse the pinned sockhash, so the
     connections it governs stay in it, their socket storage (stream state), the program array
     `sockpol_next`, the event ring and the control map (mode and serial);
  3. load (verify) the programs; a rejection becomes LoadError("load: verifier rejected ...") with
     the tail of the verifier log; until here nothing of a running policy was touched; then
     write the version's serial (one more than the one in force) into the program's `.data`;
  4. pin programs, maps and the state record (state.py) into a staging directory (pins.py);
  5. attach `sockpol_msg` to the sockhash (BPF_SK_MSG_VERDICT), before any socket can be inserted;
  6. attach `sockpol_sockops` to the cgroup with a bpf_link (multi-attach: coexists with other
     programs); on replacement in the same cgroup, swap the program of the existing link in place
     (bpf_link_update), so there is no moment without a sock_ops program;
  7. hand over: the new sk_msg program into slot 0 of `sockpol_next`, then its serial into the
     control map (in that order);
  8. swap the staging directory with `/sys/fs/bpf/sockpol/<name>/` in one rename: the commit point;
  9. then detach a link that the old version had on another cgroup (or had, when the new version
     is attached to no cgroup), and unpin the old version.

What connections see across a replacement: a socket keeps the sk_msg program it was given when it
was inserted into the sockhash (the kernel copies the map's program into the socket's psock), but
every run of an older version first compares its serial with the control map's and, when a newer
version is in force, tail-calls that version's program (emit.handover). So every connection is
judged by the new policy from its next message on, the ones opened before the replacement
included; none is ever ungoverned. The old programs stay in the kernel, held by those sockets, as
a first hop.

`unload` detaches the link (BPF_LINK_DETACH, so it goes even if some process still holds an fd),
removes every socket from the sockhash (they become ordinary sockets again), detaches the sk_msg
program from the map, empties `sockpol_next` and unpins the directory; the kernel frees the rest
once no fds remain. Our fd of `sockpol_next` is the last to go, once the programs that use it
are gone (libbpf.ProgArrayRef says why); a load that fails closes its new object's the same way.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from sockpol import kernelbtf
from sockpol import telemetry as t
from sockpol.contract import (
    CONN_MAP,
    KERNELS_DOC,
    LSM_CONN_KEY,
    LSM_CONN_MD,
    LSM_PROGRAM,
    MSG_FAMILY,
    MSG_LOCAL_IP4,
    MSG_LOCAL_IP6,
    MSG_LOCAL_PORT,
    MSG_PROGRAM,
    MSG_REMOTE_IP4,
    MSG_REMOTE_IP6,
    MSG_REMOTE_PORT,
    NEXT_MAP,
    SKB_PROGRAM,
    SOCK_MAP,
    SOCKOPS_PROGRAM,
    VERIFIER_BUDGET,
    WORK_MAP,
)
from sockpol.diagnostics import SockpolError
from sockpol.metadata import PolicyMetadata, read_metadata
from sockpol.runtime import libbpf, pins
from sockpol.runtime.counters import (
    CTL_PIN,
    read_mode_fd,
    read_serial_fd,
    write_answers_off,
    write_mode,
    write_serial,
)
from sockpol.runtime.datamap import write_data_serial
from sockpol.runtime.libbpf import BpfError
from sockpol.runtime.state import PolicyState, StateError, create_state_map, read_state
from sockpol.runtime.system import check_privileges, resolve_cgroup

log = logging.getLogger("sockpol.runtime")

OBJECT_NAME = "sockpol"  # libbpf names global-data maps after it: sockpol.rodata, sockpol.data
SO_COOKIE = 57
LOG_TAIL_LINES = 20
_SOCK_KEY = struct.Struct("<Q")  # sockhash key: socket cookie, u64
_SLOT0 = struct.Struct("<I")  # program array key and value (a program fd on update)
_SOCK_VALUE = struct.Struct("<I")  # sockhash value on update: the socket's fd, u32
ENOTSUPP = 524  # kernel-internal "not supported", leaks out of sock_map_update for some sockets
_NOT_INSERTABLE = (errno.EOPNOTSUPP, errno.EINVAL, ENOTSUPP)


class LoadError(SockpolError):
    """A policy could not be loaded: `stage` names the failed step, `log_lines` the kernel's why."""

    def __init__(self, stage: str, message: str, log_lines: list[str] | None = None) -> None:
        self.stage = stage
        self.message = message
        self.log_lines = log_lines or []
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.stage}: {self.message}"
        if self.log_lines:
            text += "\n" + "\n".join(f"  | {line}" for line in self.log_lines)
        return text


class PolicyNotFound(SockpolError):
    pass


class RuntimeOpError(SockpolError):
    """A runtime operation other than load failed (unload, adding a socket...)."""


# ---------------------------------------------------------------------------------------------
# Public results


@dataclass
class LoadedPolicy:
    """A policy in force. Holds an fd of its sockhash for add/remove_socket; pins outlive it."""

    name: str
    pin_dir: Path
    metadata: PolicyMetadata
    cgroup: Path | None
    program_ids: dict[str, int]
    link_id: int | None
    map_id: int
    _socks_fd: int | None = field(repr=False, default=None)
    _conn_fd: int | None = field(repr=False, default=None)  # the LSM backend's socket storage

    @property
    def backend(self) -> str:
        return self.metadata.backend

    def add_socket(self, sock: socket.socket) -> bool:
        """Put an established TCP socket under the policy; False if it already was.

        The key is the socket's cookie, as for sockets the sock_ops program inserts. On the
        lsm backend: the socket's storage, made as sock_ops makes it (any time: no ordering
        with the TLS ULP as for a sockhash).
        """
        if self._conn_fd is not None:
            value = _lsm_conn_value(sock, libbpf.map_info(self._conn_fd).value_size)
            try:
                libbpf.map_update(
                    self._conn_fd, struct.pack("<i", sock.fileno()), value, libbpf.BPF_NOEXIST
                )
            except BpfError as e:
                if e.errno == errno.EEXIST:
                    return False
                raise RuntimeOpError(f"add_socket: {e.op}: {libbpf.strerror(e.errno)}") from None
            return True
        key = _SOCK_KEY.pack(_cookie(sock))
        try:
            libbpf.map_update(self._fd(), key, _SOCK_VALUE.pack(sock.fileno()), libbpf.BPF_NOEXIST)
        except BpfError as e:
            # A socket already in the map fails with EBUSY (its psock is taken), not EEXIST.
            if e.errno in (errno.EEXIST, errno.EBUSY) and libbpf.map_has_key(self._fd(), key):
                return False
            hint = ""
            if e.errno in _NOT_INSERTABLE:
                hint = " (only established TCP sockets without a TLS ULP can be added)"
            elif e.errno == errno.EBUSY:
                hint = " (the socket is already in another sockmap or sockhash)"
            raise RuntimeOpError(f"add_socket: {e.op}: {libbpf.strerror(e.errno)}{hint}") from None
        return True

    def remove_socket(self, sock: socket.socket) -> bool:
        """Release a socket from the policy; False if it was not governed by it."""
        if self._conn_fd is not None:
            try:
                return libbpf.map_delete(self._conn_fd, struct.pack("<i", sock.fileno()))
            except BpfError as e:
                raise RuntimeOpError(f"remove_socket: {e}") from None
        try:
            return libbpf.map_delete(self._fd(), _SOCK_KEY.pack(_cookie(sock)))
        except BpfError as e:
            raise RuntimeOpError(f"remove_socket: {e}") from None

    def sockets(self) -> int:
        """How many sockets the policy governs now."""
        if self._conn_fd is not None:
            raise RuntimeOpError("the lsm backend's socket storage cannot be counted")
        return len(libbpf.map_keys(self._fd(), _SOCK_KEY.size))

    def close(self) -> None:
        if self._socks_fd is not None:
            os.close(self._socks_fd)
            self._socks_fd = None
        if self._conn_fd is not None:
            os.close(self._conn_fd)
            self._conn_fd = None

    def _fd(self) -> int:
        if self._socks_fd is None:
            raise RuntimeOpError(f"policy {self.name}: handle already closed")
        return self._socks_fd

    def __enter__(self) -> LoadedPolicy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


@dataclass(frozen=True)
class PolicyStatus:
    name: str
    pin_dir: Path
    ports: list[tuple[int, int]] = field(default_factory=list)
    cgroup: str | None = None
    loaded_at: datetime | None = None
    object_path: str = ""
    object_sha256: str = ""
    program_ids: dict[str, int] = field(default_factory=dict)
    link_id: int | None = None
    map_ids: dict[str, int] = field(default_factory=dict)
    sockets: int | None = None
    metadata: PolicyMetadata | None = None
    problem: str | None = None  # set when the pins are incomplete or unreadable
    mode: str | None = None  # enforce or dry-run (None: loaded by a sockpol without modes)
    reloaded_at: datetime | None = None  # the last reload (swap or replacement), if any
    reloads: int = 0  # reloads since the first load of this name
    serial: int = 0  # the version in force (state.PolicyState.serial; 0 before serials)
    backend: str = "sockmap"  # the program that enforces it: sockmap (sk_msg) or lsm

    @property
    def since(self) -> datetime | None:
        """When the version in force was put in force (loaded, or reloaded)."""
        return self.reloaded_at or self.loaded_at


def _lsm_conn_value(sock: socket.socket, size: int) -> bytes:
    """A connection's socket storage on the lsm backend, as its sock_ops program writes it:
    the cookie, and family, addresses and ports at the offsets of struct sk_msg_md."""
    value = bytearray(size)
    struct.pack_into("<Q", value, LSM_CONN_KEY, _cookie(sock))
    md = LSM_CONN_MD
    family = sock.family
    peer, local = sock.getpeername(), sock.getsockname()
    struct.pack_into("<I", value, md + MSG_FAMILY, int(family))
    if family == socket.AF_INET:
        value[md + MSG_REMOTE_IP4 : md + MSG_REMOTE_IP4 + 4] = socket.inet_aton(peer[0])
        value[md + MSG_LOCAL_IP4 : md + MSG_LOCAL_IP4 + 4] = socket.inet_aton(local[0])
    else:
        value[md + MSG_REMOTE_IP6 : md + MSG_REMOTE_IP6 + 16] = socket.inet_pton(family, peer[0])
        value[md + MSG_LOCAL_IP6 : md + MSG_LOCAL_IP6 + 16] = socket.inet_pton(family, local[0])
    # remote_port: the port in network order in the upper half; local_port: host order.
    struct.pack_into("<I", value, md + MSG_REMOTE_PORT, socket.htons(peer[1]) << 16)
    struct.pack_into("<I", value, md + MSG_LOCAL_PORT, local[1])
    return bytes(value)


@dataclass(frozen=True)
class VerdictProgram:
    """The program that judges a policy's connections, by side: it is attached to the sockhash
    (and pinned as pins.PIN_MSG whatever the side)."""

    name: str
    prog_type: int
    attach_type: int


EGRESS_VERDICT = VerdictProgram(MSG_PROGRAM, libbpf.BPF_PROG_TYPE_SK_MSG, libbpf.BPF_SK_MSG_VERDICT)
INGRESS_VERDICT = VerdictProgram(
    SKB_PROGRAM, libbpf.BPF_PROG_TYPE_SK_SKB, libbpf.BPF_SK_SKB_STREAM_VERDICT
)


def verdict_program(meta: PolicyMetadata) -> VerdictProgram:
    return INGRESS_VERDICT if meta.side == "ingress" else EGRESS_VERDICT


def _cookie(sock: socket.socket) -> int:
    return _SOCK_KEY.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


# ---------------------------------------------------------------------------------------------
# load


def load(
    obj_path: str | os.PathLike[str],
    cgroup: str | os.PathLike[str] | None,
    *,
    name: str | None = None,
    mode: str | None = None,
    check_tls: bool = True,
    reload_of: PolicyState | None = None,
) -> LoadedPolicy:
    """Load a compiled policy object, attach it to `cgroup` (None: to no cgroup) and pin it.

    Loading a name that is already loaded replaces it without a moment of ungoverned traffic; if
    the new object fails anywhere, the old policy stays exactly as it was. `mode` (enforce or
    dry-run) overrides the mode the policy declares. `check_tls=False` loads a `tls` policy even
    where kTLS on sockhash sockets does not work: its handshake walk then meets only user-space
    TLS (tests use it to exercise that walk on kernels without kTLS; the CLI has no such switch).
    `reload_of`: the record of the version this one replaces through `sockpol reload`, whose
    history (first load, number of reloads) the new record carries on.
    """
    path = Path(obj_path)
    meta = read_metadata(path)
    name = name or meta.policy
    if not pins.valid_name(name):
        raise LoadError(
            "load", f"invalid policy name {name!r} (letters, digits, _ and -; 64 at most)"
        )
    check_privileges()
    if check_tls:
        require_tls_support(meta, name)
    cgroup_dir = resolve_cgroup(cgroup) if cgroup is not None else None
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise LoadError("open", f"{path}: {e.strerror}") from None
    try:
        root = pins.pin_root(create=True)
    except OSError as e:
        raise LoadError("pin", f"cannot create the pin root: {e}") from None
    assert root is not None
    state = PolicyState(
        name=name,
        cgroup=str(cgroup_dir) if cgroup_dir else None,
        loaded_at=time.time(),
        object_path=str(path.resolve()),
        object_sha256=digest,
        metadata=_metadata_dict(meta),
    )
    if reload_of is not None:
        state = replace(
            state,
            loaded_at=reload_of.loaded_at,
            reloaded_at=state.loaded_at,
            reloads=reload_of.reloads + 1,
        )
    with pins.locked(root):
        pins.sweep_stale(root)
        old = _Installed.open(root / name) if (root / name).exists() else None
        try:
            if meta.backend == "lsm":
                return _LsmLoad(root, path, meta, state, cgroup_dir, old, mode or meta.mode).run()
            if old is not None and old.backend == "lsm":
                raise LoadError(
                    "replace",
                    f"policy {name} runs on the lsm backend and this object on sockmap; "
                    f"unload it first (or compile with --backend lsm)",
                )
            return _Load(root, path, meta, state, cgroup_dir, old, mode or meta.mode).run()
        finally:
            if old is not None:
                old.close()


def require_tls_support(meta: PolicyMetadata, name: str, done: str = "nothing was loaded") -> None:
    """Refuse a policy with a `tls` statement (either `userspace` choice: both ask for requests to
    be judged inside kTLS) on a kernel that cannot run its program on kTLS sockets; an object of
    the LSM backend needs BPF LSM (and kTLS, for a `tls` policy) instead of kTLS on sockmap."""
    from sockpol.runtime.probe import lsm_support, lsm_tls_support, tls_policy_support

    if meta.backend == "lsm":
        lsm = lsm_support()
        if not lsm.ok:
            raise LoadError(
                "load",
                f"policy {name!r} was compiled for the lsm backend, but this kernel cannot run "
                f"BPF LSM programs: {lsm.lacks or lsm.detail}; {done} (see 'sockpol doctor')",
            )
        if meta.tls is None:
            return
        support = lsm_tls_support()
        if not support.ok:
            raise LoadError("load", support.refusal(name, done))
        return
    if meta.tls is None:
        return
    support = tls_policy_support()
    if not support.ok:
        raise LoadError("load", support.refusal(name, done))


def answers_off(meta: PolicyMetadata, name: str) -> bool:
    """Whether the program must drop the refusals it would answer: this kernel cannot redirect a
    response to the sending socket (`sockpol doctor`, "answers"). Warns when the policy asks for
    answers; decided for every policy, so a hot reload that adds answers is covered too."""
    from sockpol.runtime.probe import answer_support

    support = answer_support()
    if support.ok:
        return False
    if any(meta.answers):
        why = support.lacks or support.detail
        log.warning(
            "policy %r: this kernel cannot answer refused requests (%s): they are dropped "
            "instead, as with `answer drop` (see 'sockpol doctor')",
            name,
            why,
        )
    return True


def _metadata_dict(meta: PolicyMetadata) -> dict:
    return json.loads(meta.to_json())


class _Undo:
    """Undo actions of a load in progress, run newest first if the load does not commit."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, fn: Callable[[], None]) -> None:
        self._steps.append((what, fn))

    def rollback(self) -> None:
        while self._steps:
            what, fn = self._steps.pop()
            try:
                fn()
            except Exception as e:  # keep undoing the rest; report what could not be undone
                log.error("rollback: could not %s: %s", what, e)

    def discard(self) -> None:
        self._steps.clear()


@dataclass
class _Installed:
    """The pins of a policy already loaded under the name being (re)loaded, opened as fds."""

    pin_dir: Path
    socks_fd: int
    msg_fd: int | None
    sockops_fd: int | None
    link_fd: int | None
    state: PolicyState | None
    lsm_link_fd: int | None = None  # an LSM object's link on socket_sendmsg

    @property
    def backend(self) -> str:
        return "lsm" if (self.pin_dir / pins.PIN_LSM).exists() else "sockmap"

    @staticmethod
    def open(pin_dir: Path) -> _Installed:
        def get(pin: str) -> int | None:
            p = pin_dir / pin
            return libbpf.obj_get(str(p)) if p.exists() else None

        lsm = (pin_dir / pins.PIN_LSM).exists()
        socks = get(pins.PIN_SOCKS) if not lsm else -1
        if socks is None:
            raise LoadError(
                "replace",
                f"{pin_dir} has no {pins.PIN_SOCKS} pin; unload policy {pin_dir.name} first",
            )
        installed = _Installed(pin_dir, socks, None, None, None, None)
        try:  # every fd opened so far is the installed's, closed with it on failure
            installed.lsm_link_fd = get(pins.PIN_LSM_LINK)
            installed.msg_fd = get(pins.PIN_MSG)
            installed.sockops_fd = get(pins.PIN_SOCKOPS)
            installed.link_fd = get(pins.PIN_LINK)
            state_fd = get(pins.PIN_STATE)
            if state_fd is not None:
                try:
                    installed.state = read_state(state_fd)
                except StateError as e:
                    log.warning("replace: ignoring old state record: %s", e)
                finally:
                    os.close(state_fd)
        except BaseException:
            installed.close()
            raise
        return installed

    def close(self) -> None:
        for fd in (self.socks_fd, self.msg_fd, self.sockops_fd, self.link_fd, self.lsm_link_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.socks_fd = -1
        self.msg_fd = self.sockops_fd = self.link_fd = self.lsm_link_fd = None


class _Load:
    """One load transaction (see the module docstring for the steps)."""

    def __init__(
        self,
        root: Path,
        path: Path,
        meta: PolicyMetadata,
        state: PolicyState,
        cgroup_dir: Path | None,
        old: _Installed | None,
        mode: str = "enforce",
    ) -> None:
        self.root, self.path, self.meta, self.state = root, path, meta, state
        self.name = state.name
        self.cgroup_dir = cgroup_dir
        self.old = old
        self.mode = mode
        self.undo = _Undo()
        self.fds: list[int] = []  # fds we own, closed at the end either way
        self.kept_old_link = False  # the old cgroup link now runs the new program
        self.serial: int | None = None  # this version's number (_write_serial)
        self.reused: set[str] = set()  # maps shared with the version in force (_reuse_shared)

    def run(self) -> LoadedPolicy:
        self._check_before()
        obj: libbpf.BpfObject | None = None
        arrays: list[libbpf.ProgArrayRef] = []
        try:
            obj = self._open()
            handle, staging = self._install(obj)
            self.undo.push("close the handle", handle.close)
            self._commit(staging)
            self._retire_old(staging)
            return handle
        except BaseException:
            self.undo.rollback()
            if obj is not None:
                # Its program arrays (not those shared with the version in force, which stay
                # pinned) lose their last user reference with the object: keep one until the
                # object's programs are gone (libbpf.ProgArrayRef).
                arrays = obj.hold_prog_arrays(skip=frozenset(self.reused))
            raise
        finally:
            for fd in self.fds:
                os.close(fd)
            if obj is not None:
                obj.close()
            for array in arrays:
                array.close()

    def _check_before(self) -> None:
        """What refuses the load before anything is opened (a backend's own conditions)."""

    def _install(self, obj: libbpf.BpfObject) -> tuple[LoadedPolicy, Path]:
        """Load, pin (into a staging directory) and attach; returns the handle and the staging
        directory that _commit puts in place."""
        progs, socks = self._check_contract(obj)
        if self.old is not None:
            self._reuse_sockhash(socks)
            self._reuse_shared(obj)
        self._load(obj, progs)
        self._write_serial(obj)
        self._set_mode(obj)
        verdict = verdict_program(self.meta)
        msg_fd, sockops_fd = progs[verdict.name].fd(), progs[SOCKOPS_PROGRAM].fd()
        socks_fd = socks.fd()
        named = {pins.PIN_MSG: msg_fd, pins.PIN_SOCKOPS: sockops_fd, pins.PIN_SOCKS: socks_fd}
        staging = self._pin_all(obj, named, frozenset({SOCK_MAP}))
        self._attach_msg(msg_fd, socks_fd)
        link_fd = self._attach_cgroup(sockops_fd)
        if link_fd is not None:
            self._pin(link_fd, staging / pins.PIN_LINK)
        self._hand_over(obj, msg_fd)
        programs = {verdict.name: msg_fd, SOCKOPS_PROGRAM: sockops_fd}
        return self._handle(programs, link_fd, socks_fd, _socks_fd=os.dup(socks_fd)), staging

    def _handle(
        self, programs: dict[str, int], link_fd: int | None, map_fd: int, **fds: int | None
    ) -> LoadedPolicy:
        """The handle of the policy just installed: its programs (name: fd), the cgroup
        link, the map it is known by, and the descriptors it keeps (`fds`)."""
        return LoadedPolicy(
            name=self.name,
            pin_dir=self.root / self.name,
            metadata=self.meta,
            cgroup=self.cgroup_dir,
            program_ids={name: libbpf.prog_info(fd).id for name, fd in programs.items()},
            link_id=libbpf.link_info(link_fd).id if link_fd is not None else None,
            map_id=libbpf.map_info(map_fd).id,
            **fds,
        )

    # -- steps ---------------------------------------------------------------------------------

    def _open(self) -> libbpf.BpfObject:
        with libbpf.capture_messages() as messages:
            try:
                return libbpf.BpfObject.open_file(str(self.path), object_name=OBJECT_NAME)
            except BpfError as e:
                raise LoadError(
                    "open", f"{self.path}: {libbpf.strerror(e.errno)}", _warnings(messages)
                ) from None

    def _programs(self, obj: libbpf.BpfObject, want: dict[str, int]) -> dict[str, libbpf.Program]:
        """The object's programs named in `want` (name: program type), each of that type, their
        verifier logs captured; every other program is left unloaded (not part of the contract)."""
        progs: dict[str, libbpf.Program] = {}
        for prog in obj.programs():
            if prog.name in want:
                if prog.type != want[prog.name]:
                    raise LoadError(
                        "open", f"{self.path}: program {prog.name} has the wrong program type"
                    )
                progs[prog.name] = prog
                prog.capture_log()
            else:
                prog.set_autoload(False)
        missing = sorted(set(want) - set(progs))
        if missing:
            raise LoadError("open", f"{self.path}: no program {', '.join(missing)}")
        return progs

    def _check_contract(
        self, obj: libbpf.BpfObject
    ) -> tuple[dict[str, libbpf.Program], libbpf.Map]:
        verdict = verdict_program(self.meta)
        want = {verdict.name: verdict.prog_type, SOCKOPS_PROGRAM: libbpf.BPF_PROG_TYPE_SOCK_OPS}
        progs = self._programs(obj, want)
        socks = obj.map(SOCK_MAP)
        if socks is None or socks.type != libbpf.BPF_MAP_TYPE_SOCKHASH:
            raise LoadError("open", f"{self.path}: no sockhash map {SOCK_MAP}")
        if socks.key_size != _SOCK_KEY.size:
            raise LoadError("open", f"{self.path}: {SOCK_MAP} key must be a u64 socket cookie")
        for m in obj.maps():
            m.clear_pin_path()  # pins are ours to place; no libbpf auto-pinning anywhere
        return progs, socks

    def _reuse_sockhash(self, socks: libbpf.Map) -> None:
        assert self.old is not None
        if self.old.msg_fd is not None:
            old_type = libbpf.prog_info(self.old.msg_fd).type
            if old_type != verdict_program(self.meta).prog_type:
                raise LoadError(
                    "replace",
                    f"policy {self.name} is loaded for the other side (egress/ingress); "
                    f"unload it before loading this object",
                )
        info = libbpf.map_info(self.old.socks_fd)
        new = (socks.type, socks.key_size, socks.value_size, socks.max_entries)
        have = (info.type, info.key_size, info.value_size, info.max_entries)
        if new != have:
            # bpf_map__reuse_fd would silently adopt the old shape; say it instead.
            raise LoadError(
                "replace",
                f"{SOCK_MAP} changed shape (type/key/value/max_entries {have} -> {new}); "
                f"unload policy {self.name} before loading this object",
            )
        try:
            socks.reuse_fd(self.old.socks_fd)
        except BpfError as e:
            raise LoadError("replace", str(e)) from None

    def _reuse_shared(
        self,
        obj: libbpf.BpfObject,
        names: tuple[str, ...] = (CONN_MAP, NEXT_MAP, t.EVENTS_MAP, t.CTL_MAP),
    ) -> None:
        """Replacing: share with the version in force what makes its open connections' state
        (contract.SHARED_MAPS beyond the sockhash: their socket storage, the program array that
        hands them over), the event ring buffer (one stream for `sockpol events`) and the
        control map (mode, serial). Counters start again: their rule slots belong to the old
        rules. A map the old version lacks, or has in another shape (a policy loaded by an
        older sockpol), is not shared; its open connections then stay with the old version."""
        assert self.old is not None
        for map_name in names:
            new = obj.map(map_name)
            pin = self.old.pin_dir / pins.map_pin_name(map_name)
            if new is None or not pin.exists():
                continue
            fd = libbpf.obj_get(str(pin))
            try:
                info = libbpf.map_info(fd)
                shape = (new.type, new.key_size, new.value_size, new.max_entries)
                if shape == (info.type, info.key_size, info.value_size, info.max_entries):
                    new.reuse_fd(fd)  # libbpf dups it
                    self.reused.add(map_name)
                else:
                    log.warning(
                        "replace: %s changed shape; not shared with the old version", map_name
                    )
            except BpfError as e:
                raise LoadError("replace", f"{map_name}: {e}") from None
            finally:
                os.close(fd)

    def _write_serial(self, obj: libbpf.BpfObject) -> None:
        """Number this version (one more than the one in force) and write the number into the
        program's `.data` before anything can run it: a run compares it with the control map's
        serial to know whether it is the version in force (emit.handover)."""
        if obj.map(NEXT_MAP) is None and self.meta.backend != "lsm":
            return  # an object from before the hand-over: it never compares
        before = 0
        ctl_pin = self.old.pin_dir / pins.map_pin_name(t.CTL_MAP) if self.old else None
        if ctl_pin is not None and ctl_pin.exists():
            fd = libbpf.obj_get(str(ctl_pin))
            try:
                before = read_serial_fd(fd)
            finally:
                os.close(fd)
        serial = before % 0xFFFFFFFF + 1  # never 0, which means "no version yet"
        data = next((m for m in obj.maps() if m.is_internal and m.name.endswith(".data")), None)
        if data is None:
            raise LoadError("load", f"{self.path}: no .data map for the program's serial")
        try:
            write_data_serial(data.fd(), serial)
        except SockpolError as e:
            raise LoadError("load", str(e)) from None
        self.serial = serial
        self.state = replace(self.state, serial=serial)

    def _hand_over(self, obj: libbpf.BpfObject, msg_fd: int) -> None:
        """Put the new program in the array, then make its serial the one in force: from the
        next message on, every connection of the older versions runs it (emit.handover). In
        that order, so that a run that sees the new serial finds the new program."""
        next_map, ctl = obj.map(NEXT_MAP), obj.map(t.CTL_MAP)
        if next_map is None or ctl is None or self.serial is None:
            return
        key = _SLOT0.pack(0)
        next_fd, ctl_fd = next_map.fd(), ctl.fd()
        old_msg = self.old.msg_fd if self.old is not None else None
        try:
            libbpf.map_update(next_fd, key, _SLOT0.pack(msg_fd))
        except BpfError as e:
            raise LoadError("attach", f"{NEXT_MAP}: {libbpf.strerror(e.errno)}") from None
        if old_msg is not None:
            self.undo.push(
                f"give {NEXT_MAP} the previous program back",
                lambda: libbpf.map_update(next_fd, key, _SLOT0.pack(old_msg)),
            )
        else:
            self.undo.push(f"empty {NEXT_MAP}", lambda: libbpf.map_delete(next_fd, key))
        before = read_serial_fd(ctl_fd)
        try:
            write_serial(ctl_fd, self.serial)
        except BpfError as e:
            raise LoadError("attach", f"{t.CTL_MAP}: {libbpf.strerror(e.errno)}") from None
        self.undo.push(f"restore serial {before}", lambda: write_serial(ctl_fd, before))

    def _set_mode(self, obj: libbpf.BpfObject) -> None:
        """Write the starting mode before anything is attached (when shared with the version
        being replaced, put its mode back if this load fails)."""
        ctl = obj.map(t.CTL_MAP)
        if ctl is None:
            return
        fd = ctl.fd()
        try:
            before = read_mode_fd(fd)
            write_mode(fd, self.mode)
            write_answers_off(fd, answers_off(self.meta, self.name))
        except (BpfError, SockpolError) as e:
            raise LoadError("load", f"setting mode {self.mode}: {e}") from None
        if self.old is not None:
            self.undo.push(f"restore mode {before}", lambda: write_mode(ctl.fd(), before))

    def _load(self, obj: libbpf.BpfObject, progs: dict[str, libbpf.Program]) -> None:
        with libbpf.capture_messages() as messages:
            try:
                obj.load()
            except BpfError as e:
                raise _load_error(e, messages, progs) from None

    def _pin(self, fd: int, path: Path) -> None:
        try:
            libbpf.obj_pin(fd, str(path))
        except BpfError as e:
            raise LoadError("pin", str(e)) from None

    def _pin_all(
        self, obj: libbpf.BpfObject, named: dict[str, int], skip_maps: frozenset[str] = frozenset()
    ) -> Path:
        """Pin into a new staging directory: the `named` fds (pin name: fd), every map of the
        object but `skip_maps` (pinned by name in `named`), and a new state record."""
        staging = pins.staging_dir(self.root, self.name)
        try:
            staging.mkdir()
        except OSError as e:
            raise LoadError("pin", f"cannot create {staging}: {e.strerror}") from None
        self.undo.push(f"remove {staging}", lambda: pins.remove_pins(staging))
        for pin, fd in named.items():
            self._pin(fd, staging / pin)
        for m in obj.maps():
            if m.name not in skip_maps:
                self._pin(m.fd(), staging / pins.map_pin_name(m.name))
        try:
            state_fd = create_state_map(self.state)
        except BpfError as e:
            raise LoadError("pin", f"state record: {e}") from None
        self.fds.append(state_fd)
        self._pin(state_fd, staging / pins.PIN_STATE)
        return staging

    def _attach_msg(self, msg_fd: int, socks_fd: int) -> None:
        verdict = verdict_program(self.meta)
        attach_type = verdict.attach_type
        try:
            libbpf.prog_attach(msg_fd, socks_fd, attach_type)
        except BpfError as e:
            raise LoadError(
                "attach", f"{verdict.name} to {SOCK_MAP}: {libbpf.strerror(e.errno)}"
            ) from None
        old_msg = self.old.msg_fd if self.old is not None else None
        if old_msg is not None:
            # Replacing: give the map its previous program back (new sockets would get it).
            self.undo.push(
                f"re-attach the previous {verdict.name}",
                lambda: libbpf.prog_attach(old_msg, socks_fd, attach_type),
            )
        else:
            self.undo.push(
                f"detach {verdict.name}",
                lambda: libbpf.prog_detach(msg_fd, socks_fd, attach_type),
            )

    def _attach_cgroup(self, sockops_fd: int) -> int | None:
        """Attach sock_ops to the cgroup; returns the link fd, None when there is no cgroup."""
        if self.cgroup_dir is None:
            return None
        old = self.old
        same_cgroup = (
            old is not None
            and old.link_fd is not None
            and old.sockops_fd is not None
            and old.state is not None
            and old.state.cgroup == str(self.cgroup_dir)
        )
        if same_cgroup:
            assert old is not None and old.link_fd is not None and old.sockops_fd is not None
            link_fd, old_prog = old.link_fd, old.sockops_fd
            try:
                libbpf.link_update(link_fd, sockops_fd, old_prog_fd=old_prog)
            except BpfError as e:
                if e.errno != errno.ENOLINK:  # ENOLINK: the old link is defunct; make a new one
                    raise LoadError(
                        "attach",
                        f"{SOCKOPS_PROGRAM}: replacing the program of the cgroup link: "
                        f"{libbpf.strerror(e.errno)}",
                    ) from None
            else:
                self.undo.push(
                    f"give the cgroup link its previous {SOCKOPS_PROGRAM}",
                    lambda: libbpf.link_update(link_fd, old_prog, old_prog_fd=sockops_fd),
                )
                self.kept_old_link = True
                return link_fd
        try:
            cg_fd = os.open(self.cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise LoadError("attach", f"cgroup {self.cgroup_dir}: {e.strerror}") from None
        try:
            link_fd = libbpf.link_create(sockops_fd, cg_fd, libbpf.BPF_CGROUP_SOCK_OPS)
        except BpfError as e:
            raise LoadError(
                "attach",
                f"{SOCKOPS_PROGRAM} to cgroup {self.cgroup_dir}: {libbpf.strerror(e.errno)}",
            ) from None
        finally:
            os.close(cg_fd)
        self.fds.append(link_fd)
        self.undo.push(
            f"detach {SOCKOPS_PROGRAM} from {self.cgroup_dir}", lambda: libbpf.link_detach(link_fd)
        )
        return link_fd

    def _commit(self, staging: Path) -> None:
        final = self.root / self.name
        try:
            if self.old is not None:
                pins.exchange(staging, final)
            else:
                os.rename(staging, final)
        except OSError as e:
            raise LoadError("pin", f"cannot move {staging} to {final}: {e.strerror}") from None
        self.undo.discard()  # the new policy is in force; from here on nothing is rolled back

    def _retire_old(self, staging: Path) -> None:
        """After the commit: `staging` now holds the previous version's pins."""
        old = self.old
        if old is None:
            return
        if old.link_fd is not None and not self.kept_old_link:
            # The old version's link is on another cgroup, or the new one attaches to none.
            try:
                libbpf.link_detach(old.link_fd)
            except BpfError as e:
                if e.errno != errno.ENOLINK:
                    log.warning("replace: could not detach the previous cgroup link: %s", e)
        try:
            pins.remove_pins(staging)
        except OSError as e:
            log.warning("replace: could not remove the previous pins in %s: %s", staging, e)


class _LsmLoad(_Load):
    """A load of an LSM-backend object (codegen/lsm.py): no sockhash; the program is attached
    to the socket_sendmsg hook with a bpf_link, and sock_ops marks the connections it governs
    by giving them socket storage. Replacing: the new program is attached beside the old one,
    which steps aside once the control map's serial is the new one's (lsm.py); then the old
    link is detached. Steps as in `_Load.run`, each undone if a later one fails."""

    def _check_before(self) -> None:
        if self.old is not None and self.old.backend != "lsm":
            raise LoadError(
                "replace",
                f"policy {self.name} runs on the sockmap backend and this object on lsm; "
                "unload it first (or compile with --backend sockmap)",
            )
        if any(self.meta.answers):
            log.warning(
                "policy %r: the lsm backend cannot answer refused requests: they are dropped "
                "(send() fails with EACCES), as with `answer drop`",
                self.name,
            )

    def _install(self, obj: libbpf.BpfObject) -> tuple[LoadedPolicy, Path]:
        progs = self._check_lsm_contract(obj)
        self._write_layout(obj)
        if self.old is not None:
            self._reuse_shared(obj, (CONN_MAP, WORK_MAP, t.EVENTS_MAP, t.CTL_MAP))
        self._load(obj, progs)
        self._write_serial(obj)
        self._set_mode(obj)
        lsm_fd, sockops_fd = progs[LSM_PROGRAM].fd(), progs[SOCKOPS_PROGRAM].fd()
        staging = self._pin_all(obj, {pins.PIN_LSM: lsm_fd, pins.PIN_SOCKOPS: sockops_fd})
        lsm_link = self._attach_lsm(lsm_fd)
        self._pin(lsm_link, staging / pins.PIN_LSM_LINK)
        link_fd = self._attach_cgroup(sockops_fd)
        if link_fd is not None:
            self._pin(link_fd, staging / pins.PIN_LINK)
        self._hand_over(obj, lsm_fd)
        conn = obj.map(CONN_MAP)
        assert conn is not None
        programs = {LSM_PROGRAM: lsm_fd, SOCKOPS_PROGRAM: sockops_fd}
        fds = {"_socks_fd": None, "_conn_fd": os.dup(conn.fd())}
        return self._handle(programs, link_fd, conn.fd(), **fds), staging

    def _check_lsm_contract(self, obj: libbpf.BpfObject) -> dict[str, libbpf.Program]:
        want = {
            LSM_PROGRAM: libbpf.BPF_PROG_TYPE_LSM,
            SOCKOPS_PROGRAM: libbpf.BPF_PROG_TYPE_SOCK_OPS,
        }
        progs = self._programs(obj, want)
        for map_name in (CONN_MAP, WORK_MAP):
            if obj.map(map_name) is None:
                raise LoadError("open", f"{self.path}: no map {map_name}")
        for m in obj.maps():
            m.clear_pin_path()
        return progs

    def _write_layout(self, obj: libbpf.BpfObject) -> None:
        """The running kernel's struct offsets into `.rodata` (kernelbtf.LAYOUT_FIELDS), which
        libbpf freezes after loading it: the verifier then knows them as constants."""
        rodata = next((m for m in obj.maps() if m.is_internal and m.name.endswith(".rodata")), None)
        if rodata is None:
            raise LoadError("open", f"{self.path}: no .rodata map for the kernel's offsets")
        try:
            layout = kernelbtf.lsm_layout(kernelbtf.running_kernel())
        except kernelbtf.BtfError as e:
            raise LoadError("load", f"the kernel's BTF: {e}") from None
        data = kernelbtf.layout_bytes(layout)
        if rodata.value_size != len(data):
            raise LoadError(
                "open", f"{self.path}: .rodata is {rodata.value_size} bytes, expected {len(data)}"
            )
        try:
            rodata.set_initial_value(data)
        except BpfError as e:
            raise LoadError("load", str(e)) from None

    def _attach_lsm(self, lsm_fd: int) -> int:
        try:
            link_fd = libbpf.link_create(lsm_fd, 0, libbpf.BPF_LSM_MAC)
        except BpfError as e:
            raise LoadError(
                "attach", f"{LSM_PROGRAM} to socket_sendmsg: {libbpf.strerror(e.errno)}"
            ) from None
        self.fds.append(link_fd)
        self.undo.push(f"detach {LSM_PROGRAM}", lambda: _detach_lsm_link(link_fd))
        return link_fd

    def _hand_over(self, obj: libbpf.BpfObject, prog_fd: int) -> None:
        """The new program is attached: make its serial the one in force (the old steps
        aside from its next run on)."""
        ctl = obj.map(t.CTL_MAP)
        if ctl is None or self.serial is None:
            return
        ctl_fd = ctl.fd()
        before = read_serial_fd(ctl_fd)
        try:
            write_serial(ctl_fd, self.serial)
        except BpfError as e:
            raise LoadError("attach", f"{t.CTL_MAP}: {libbpf.strerror(e.errno)}") from None
        self.undo.push(f"restore serial {before}", lambda: write_serial(ctl_fd, before))

    def _retire_old(self, staging: Path) -> None:
        old = self.old
        if old is not None and old.lsm_link_fd is not None:
            try:
                _detach_lsm_link(old.lsm_link_fd)
            except BpfError as e:
                log.warning("replace: could not detach the previous LSM link: %s", e)
        super()._retire_old(staging)  # unpins it: its last reference goes with the old fds


def _detach_lsm_link(fd: int) -> None:
    """Detach an LSM program's link where the kernel can (BPF_LINK_DETACH); tracing links do
    not support it on some kernels (EOPNOTSUPP on 7.3): there the link goes when its last
    reference does (its pin and the fds, which the caller drops next)."""
    try:
        libbpf.link_detach(fd)
    except BpfError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOLINK, errno.EINVAL, ENOTSUPP):
            raise


def _warnings(messages: list[tuple[int, str]], limit: int = 10) -> list[str]:
    lines = [text for level, text in messages if level == libbpf.LIBBPF_WARN]
    return [line.removeprefix("libbpf: ") for line in lines[-limit:]]


_PROCESSED = re.compile(r"^processed (\d+) insns", re.MULTILINE)
_PROG_FAILED = re.compile(r"prog '([^']+)': BPF program load failed: (.*)")
_MAP_FAILED = re.compile(r"map '([^']+)'.*failed.*")


def _load_error(
    e: BpfError, messages: list[tuple[int, str]], progs: dict[str, libbpf.Program]
) -> LoadError:
    """Name what failed in bpf_object__load and quote the lines that explain it."""
    for _level, text in messages:
        m = _PROG_FAILED.search(text)
        if m is None:
            continue
        prog_name, reason = m.groups()
        prog = progs.get(prog_name)
        verifier_log = prog.log if prog is not None else ""
        if not verifier_log.strip() and e.errno == errno.EPERM:
            return LoadError(
                "load",
                f"not permitted to load {prog_name} ({reason}); needs CAP_BPF and CAP_NET_ADMIN",
            )
        said = verifier_verdict(verifier_log)
        if e.errno == errno.ENOSPC and said:
            # The log outgrew its buffer. Since 6.4 the kernel keeps the log's end (where the
            # error is) and then reports ENOSPC instead of the verifier's own error code.
            reason = "verifier log truncated, its end is shown"
        detail = f"{said} ({reason})" if said else reason
        return LoadError(
            "load",
            f"verifier rejected {prog_name} on Linux {os.uname().release}: {detail}"
            f"{processed_note(verifier_log)} "
            f"(sockpol's programs take under {VERIFIER_BUDGET:,} on the kernels listed in "
            f"{KERNELS_DOC}; please report this kernel with the lines below)",
            verifier_tail(verifier_log),
        )
    for _level, text in messages:
        if _MAP_FAILED.search(text):
            return LoadError("load", text.removeprefix("libbpf: "), _warnings(messages))
    return LoadError("load", libbpf.strerror(e.errno), _warnings(messages))


def processed_count(text: str) -> int | None:
    """The verifier's "processed N insns" from its log (it says so on refusals too)."""
    found = _PROCESSED.findall(text)
    return int(found[-1]) if found else None


def processed_note(text: str) -> str:
    """ "; processed N instructions" for a message, or nothing when the log does not say."""
    processed = processed_count(text)
    return f"; processed {processed:,} instructions" if processed is not None else ""


def verifier_verdict(text: str) -> str:
    """The verifier's own error line: the last line before its closing statistics."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    while lines and lines[-1].startswith(("processed ", "verification time", "stack depth")):
        lines.pop()
    return lines[-1] if lines else ""


def verifier_tail(text: str, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The end of a verifier log, where the verifier states the error (then its statistics)."""
    all_lines = [line.rstrip() for line in text.rstrip().splitlines()]
    return all_lines[-lines:]


# ---------------------------------------------------------------------------------------------
# unload


def unload(name: str) -> None:
    """Detach and unpin a loaded policy; its sockets become ordinary sockets again."""
    if not pins.valid_name(name):
        raise PolicyNotFound(f"unload: no policy named {name!r}")
    check_privileges()
    root = pins.pin_root(create=False)
    if root is None or not (root / name).is_dir():
        raise PolicyNotFound(f"unload: no policy named {name!r} is loaded (see sockpol status)")
    with pins.locked(root):
        pins.sweep_stale(root)
        pin_dir = root / name
        if not pin_dir.is_dir():
            raise PolicyNotFound(f"unload: no policy named {name!r} is loaded")
        # Move it out of sight first: to other processes it is either loaded or gone.
        aside = pins.unload_dir(root, name)
        os.rename(pin_dir, aside)
        problems, next_ref = _teardown(aside)
        pins.remove_pins(aside)
    if next_ref is not None:
        next_ref.close()  # after the lock: the wait is for the kernel, not for other loads
    if problems:
        raise RuntimeOpError(f"unload {name}: unpinned, but " + "; ".join(problems))


def _teardown(pin_dir: Path) -> tuple[list[str], libbpf.ProgArrayRef | None]:
    """Detach and empty what the pins in `pin_dir` hold; returns the problems met, and our
    reference to `sockpol_next`, to be closed once the pins are gone (ProgArrayRef)."""
    problems: list[str] = []

    def get(pin: str) -> int | None:
        p = pin_dir / pin
        if not p.exists():
            return None
        try:
            return libbpf.obj_get(str(p))
        except BpfError as e:
            problems.append(str(e))
            return None

    lsm_link_fd = get(pins.PIN_LSM_LINK)
    if lsm_link_fd is not None:
        try:
            _detach_lsm_link(lsm_link_fd)  # the LSM backend: (or when its pin goes, below)
        except BpfError as e:
            problems.append(f"detaching the LSM link: {e}")
        finally:
            os.close(lsm_link_fd)
    link_fd = get(pins.PIN_LINK)
    if link_fd is not None:
        try:
            libbpf.link_detach(link_fd)  # stop new connections from being inserted first
        except BpfError as e:
            if e.errno != errno.ENOLINK:  # ENOLINK: already defunct (its cgroup is gone)
                problems.append(f"detaching the cgroup link: {e}")
        finally:
            os.close(link_fd)
    socks_fd = get(pins.PIN_SOCKS)
    msg_fd = get(pins.PIN_MSG)
    if socks_fd is not None:
        try:
            for key in libbpf.map_keys(socks_fd, _SOCK_KEY.size):
                libbpf.map_delete(socks_fd, key)
        except BpfError as e:
            problems.append(f"releasing sockets: {e}")
        if msg_fd is not None:
            ingress = libbpf.prog_info(msg_fd).type == libbpf.BPF_PROG_TYPE_SK_SKB
            verdict = INGRESS_VERDICT if ingress else EGRESS_VERDICT
            try:
                libbpf.prog_detach(msg_fd, socks_fd, verdict.attach_type)
            except BpfError as e:
                if e.errno != errno.ENOENT:
                    problems.append(f"detaching {verdict.name}: {e}")
    next_fd = get(pins.MAP_PREFIX + NEXT_MAP)
    next_ref = None
    if next_fd is not None:
        # The program array holds the newest program, which holds the array: emptying it here
        # lets that program go with the sockets' psocks, not after the kernel's own emptying.
        # And the array must not outlive the last user reference to it: while it does, anyone
        # opening it by id (bpftool map show) can make the kernel leak it for good, empty
        # (libbpf.ProgArrayRef). So that last reference is ours, closed after its programs go.
        try:
            libbpf.map_delete(next_fd, struct.pack("<I", 0))
        except BpfError as e:
            problems.append(f"emptying {NEXT_MAP}: {e}")
        next_ref = libbpf.ProgArrayRef(next_fd)  # finds its programs while they are alive
    for fd in (socks_fd, msg_fd):
        if fd is not None:
            os.close(fd)
    return problems, next_ref


# ---------------------------------------------------------------------------------------------
# status


def status(name: str | None = None) -> list[PolicyStatus]:
    """Every loaded policy (or just `name`, if it is loaded), read from the pins alone (works
    from any process). Reading one policy opens only its pins."""
    root = pins.pin_root(create=False)
    if root is None:
        return []
    if name is not None:
        if not pins.valid_name(name):
            return []
        candidates = [root / name]
    else:
        candidates = sorted(root.iterdir())
    out = []
    for pin_dir in candidates:
        if pin_dir.name.startswith(pins.TEMP_PREFIX) or not pin_dir.is_dir():
            continue
        try:
            out.append(_status_of(pin_dir))
        except FileNotFoundError:
            continue  # unloaded while we looked
        except (BpfError, StateError, OSError, ValueError) as e:
            out.append(PolicyStatus(name=pin_dir.name, pin_dir=pin_dir, problem=str(e)))
    return out


def _status_of(pin_dir: Path) -> PolicyStatus:
    fds: dict[str, int] = {}
    try:
        for pin in pin_dir.iterdir():
            fds[pin.name] = libbpf.obj_get(str(pin))
        lsm = pins.PIN_LSM in fds
        required = (
            (pins.PIN_LSM, pins.PIN_LSM_LINK, pins.PIN_SOCKOPS, pins.PIN_STATE)
            if lsm
            else (pins.PIN_MSG, pins.PIN_SOCKOPS, pins.PIN_SOCKS, pins.PIN_STATE)
        )
        missing = [p for p in required if p not in fds]
        state = read_state(fds[pins.PIN_STATE]) if pins.PIN_STATE in fds else None
        meta = state.policy_metadata() if state is not None else None
        program_ids = {
            p: libbpf.prog_info(fds[p]).id
            for p in (pins.PIN_MSG, pins.PIN_LSM, pins.PIN_SOCKOPS)
            if p in fds
        }
        if meta is not None and pins.PIN_MSG in program_ids:  # named as the program is
            program_ids = {
                (verdict_program(meta).name if p == pins.PIN_MSG else p): i
                for p, i in program_ids.items()
            }
        map_ids = {
            p: libbpf.map_info(fd).id
            for p, fd in fds.items()
            if p in (pins.PIN_SOCKS, pins.PIN_STATE) or p.startswith(pins.MAP_PREFIX)
        }
        link = libbpf.link_info(fds[pins.PIN_LINK]) if pins.PIN_LINK in fds else None
        problems = [f"missing pins: {', '.join(missing)}"] if missing else []
        if state is not None and state.cgroup and link is None:
            problems.append(f"not attached to {state.cgroup} (no {pins.PIN_LINK} pin)")
        if link is not None and not link.cgroup_id:
            problems.append(f"cgroup {state.cgroup if state else ''} was removed; link is defunct")
        sockets = (
            len(libbpf.map_keys(fds[pins.PIN_SOCKS], _SOCK_KEY.size))
            if pins.PIN_SOCKS in fds
            else None
        )
        return PolicyStatus(
            name=pin_dir.name,
            pin_dir=pin_dir,
            ports=[(lo, hi) for lo, hi in meta.ports] if meta else [],
            cgroup=state.cgroup if state else None,
            loaded_at=datetime.fromtimestamp(state.loaded_at, UTC) if state else None,
            object_path=state.object_path if state else "",
            object_sha256=state.object_sha256 if state else "",
            program_ids=program_ids,
            link_id=link.id if link is not None else None,
            map_ids=map_ids,
            sockets=sockets,
            metadata=meta,
            problem="; ".join(problems) or None,
            mode=read_mode_fd(fds[CTL_PIN]) if CTL_PIN in fds else None,
            reloaded_at=(
                datetime.fromtimestamp(state.reloaded_at, UTC)
                if state is not None and state.reloaded_at
                else None
            ),
            reloads=state.reloads if state is not None else 0,
            serial=state.serial if state is not None else 0,
            backend="lsm" if lsm else "sockmap",
        )
    finally:
        for fd in fds.values():
            os.close(fd)
