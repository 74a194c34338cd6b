"""What the running kernel can do for sockpol, found by trying it (not by reading version numbers).

`probe()` returns one `Finding` per capability, in dependency order:

    kernel        release and architecture (informational)
    privileges    CAP_BPF/CAP_SYS_ADMIN + CAP_NET_ADMIN
    sk_msg        BPF_PROG_TYPE_SK_MSG and BPF_PROG_TYPE_SOCK_OPS load
    sockhash      a BPF_MAP_TYPE_SOCKHASH can be created
    btf           the kernel accepts BTF (sockpol's objects carry BTF maps and func_info)
    cgroup2       a cgroup v2 hierarchy is mounted (the sock_ops program attaches there)
    bpffs         a bpf filesystem is mounted (policies are pinned there)
    bpf_loop      the bpf_loop helper is allowed in sk_msg programs (the scanner uses it)
    ktls          the tls ULP: `setsockopt(TCP_ULP, "tls")` and TLS_TX on a loopback socket
    ktls_sockmap  TLS on a socket that is already in a sockhash, with a program that must run
    answer        an sk_msg program redirects a message into the sending socket's own receive
                  queue (how a refusal is answered, `answer 403`), and the helpers it uses exist

Why the last one is tried for real: upstream stable kernels gained "tls: reject the combination of
TLS and sockmap" (Debian 6.1.190, 6.12.111, ...). There TLS_TX on a socket in a sockhash fails
with EINVAL and policy inside TLS is impossible, whatever the version number says. The probe loads
a program that drops everything, so "works" means a kTLS send was actually refused by it (a
program that silently stopped running would fail open).

Every probe cleans up after itself and uses only loopback sockets; without root the BPF probes
report UNKNOWN instead of guessing.

`tls_policy_support()` answers the loader's one question, "can policies with a `tls` statement be
loaded here?", from the last two probes alone (a few milliseconds, once per process); `sockpol
load` and `reload` refuse such a policy where the answer is no, before anything is loaded.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import functools
import gzip
import os
import platform
import socket
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from sockpol.contract import BPF_FUNC_LOOP
from sockpol.diagnostics import SockpolError
from sockpol.runtime import ktls
from sockpol.runtime import libbpf as bpf

BTF_VMLINUX = Path("/sys/kernel/btf/vmlinux")
REJECTION_PATCH = "tls: reject the combination of TLS and sockmap"


class Status(enum.Enum):
    OK = "ok"
    MISSING = "missing"  # tried, and it does not work on this kernel/host
    UNKNOWN = "unknown"  # could not be tried (e.g. no privileges, or a prerequisite is missing)


@dataclass(frozen=True)
class Finding:
    key: str
    title: str
    verdict: Status
    detail: str  # what was observed
    meaning: str = ""  # what this means for sockpol, or what to do
    lacks: str = ""  # when missing: what the kernel lacks, one short phrase for one-line messages

    @property
    def ok(self) -> bool:
        return self.verdict is Status.OK


# What plaintext HTTP policies need; kTLS is an extra.
CORE = ("privileges", "sk_msg", "sockhash", "btf", "cgroup2", "bpffs", "bpf_loop")
ANSWER_HELPERS = {  # bpf helper ids: what an answer needs, by program type
    "msg_redirect_hash": (bpf.BPF_PROG_TYPE_SK_MSG, 71),
    "msg_push_data": (bpf.BPF_PROG_TYPE_SK_MSG, 90),
    "msg_pop_data": (bpf.BPF_PROG_TYPE_SK_MSG, 91),
    "sk_storage_get in sock_ops": (bpf.BPF_PROG_TYPE_SOCK_OPS, 107),
}
TLS = ("ktls", "ktls_sockmap")
LSM_TLS = ("ktls", "bpf_lsm")  # policy inside TLS on the lsm backend
SECURITYFS_LSM = Path("/sys/kernel/security/lsm")
BPF_F_SLEEPABLE = 1 << 4


# ---------------------------------------------------------------------------------------------
# Kernel configuration (informational: explains a missing feature, never decides)


def kernel_config(option: str, sources: list[Path] | None = None) -> str | None:
    """The value of CONFIG_<option> ('y', 'm', 'n' for "is not set"), or None if unknown.

    Read from /proc/config.gz, /boot/config-<release> (Debian) or /lib/modules/<release>/config
    (Fedora; the VM runner puts the guest kernel's there), the first that exists.
    """
    name = f"CONFIG_{option}"
    if sources is None:
        release = platform.release()
        sources = [
            Path("/proc/config.gz"),
            Path(f"/boot/config-{release}"),
            Path(f"/lib/modules/{release}/config"),
        ]
    for path in sources:
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode(errors="replace")
        for line in text.splitlines():
            if line.startswith(f"{name}="):
                return line.split("=", 1)[1]
            if line == f"# {name} is not set":
                return "n"
        return "n"  # a config that does not mention it does not have it
    return None


# ---------------------------------------------------------------------------------------------
# libbpf's feature probes and a minimal program loader (declared here: only the probe uses them)

_BPF_INSN = ctypes.c_uint64  # struct bpf_insn is 8 bytes


def _libbpf() -> ctypes.CDLL:
    so = bpf.lib()
    if not getattr(so, "_sockpol_probe_declared", False):
        p = ctypes.c_void_p
        for name, restype, argtypes in (
            ("libbpf_probe_bpf_prog_type", ctypes.c_int, [ctypes.c_int, p]),
            ("libbpf_probe_bpf_map_type", ctypes.c_int, [ctypes.c_int, p]),
            ("libbpf_probe_bpf_helper", ctypes.c_int, [ctypes.c_int, ctypes.c_int, p]),
            (
                "bpf_prog_load",
                ctypes.c_int,
                [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, p, ctypes.c_size_t, p],
            ),
            ("btf__new_empty", p, []),
            ("btf__add_int", ctypes.c_int, [p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]),
            ("btf__load_into_kernel", ctypes.c_int, [p]),
            ("btf__fd", ctypes.c_int, [p]),
            ("btf__free", None, [p]),
        ):
            fn = getattr(so, name)
            fn.restype, fn.argtypes = restype, argtypes
        so._sockpol_probe_declared = True
    return so


def _drop_all_program() -> int:
    """Load `r0 = 0 (SK_DROP); exit` as an sk_msg program; its fd."""
    mov_r0_0 = 0xB7  # BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm 0
    exit_ = 0x95  # BPF_JMP | BPF_EXIT
    insns = (_BPF_INSN * 2)(mov_r0_0, exit_)
    fd = _libbpf().bpf_prog_load(bpf.BPF_PROG_TYPE_SK_MSG, b"sockpol_probe", b"GPL", insns, 2, None)
    if fd < 0:
        raise bpf.BpfError("load probe sk_msg program", -fd)
    return fd


def _feature(fn: Callable[[], int]) -> tuple[bool | None, int | None]:
    """libbpf probe result: (True/False, None), or (None, errno) when the probe itself failed."""
    ret = fn()
    if ret < 0:
        return None, -ret
    return ret == 1, None


# ---------------------------------------------------------------------------------------------
# The probes


def _kernel() -> Finding:
    u = os.uname()
    return Finding("kernel", "kernel", Status.OK, f"Linux {u.release} ({u.machine})")


def _privileges() -> Finding:
    from sockpol.runtime.system import check_privileges

    try:
        check_privileges()
    except SockpolError as e:
        return Finding("privileges", "privileges", Status.MISSING, str(e))
    return Finding(
        "privileges", "privileges", Status.OK, "CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN"
    )


def _unprivileged(key: str, title: str) -> Finding:
    return Finding(key, title, Status.UNKNOWN, "not tried: needs root", "rerun as root")


def _sk_msg() -> Finding:
    title = "sk_msg and sock_ops programs"
    results = {}
    for name, prog_type in (
        ("sk_msg", bpf.BPF_PROG_TYPE_SK_MSG),
        ("sock_ops", bpf.BPF_PROG_TYPE_SOCK_OPS),
    ):
        results[name] = _feature(lambda t=prog_type: _libbpf().libbpf_probe_bpf_prog_type(t, None))
    missing = [n for n, (ok, _) in results.items() if ok is False]
    failed = [f"{n}: {bpf.strerror(e)}" for n, (ok, e) in results.items() if ok is None]
    if missing:
        return Finding(
            "sk_msg",
            title,
            Status.MISSING,
            f"the kernel does not load {' or '.join(missing)} programs",
            "needs CONFIG_BPF_SYSCALL, CONFIG_NET_SOCK_MSG and CONFIG_CGROUP_BPF",
        )
    if failed:
        return Finding("sk_msg", title, Status.UNKNOWN, "; ".join(failed))
    return Finding("sk_msg", title, Status.OK, "both program types load")


def _sockhash() -> Finding:
    title = "sockhash maps"
    try:
        fd = bpf.map_create(bpf.BPF_MAP_TYPE_SOCKHASH, "sockpol_probe", 8, 8, 1)
    except bpf.BpfError as e:
        return Finding(
            "sockhash",
            title,
            Status.MISSING,
            f"creating a BPF_MAP_TYPE_SOCKHASH failed: {e}",
            "needs CONFIG_BPF_STREAM_PARSER / CONFIG_NET_SOCK_MSG",
        )
    os.close(fd)
    return Finding("sockhash", title, Status.OK, "a BPF_MAP_TYPE_SOCKHASH was created")


def _btf() -> Finding:
    title = "BTF"
    so = _libbpf()
    btf = so.btf__new_empty()
    if not btf:
        return Finding("btf", title, Status.UNKNOWN, "libbpf could not create a BTF object")
    try:
        so.btf__add_int(btf, b"int", 4, 1)  # BTF_INT_SIGNED
        ret = so.btf__load_into_kernel(btf)
    finally:
        so.btf__free(btf)  # closes the kernel fd too
    vmlinux = "kernel BTF at /sys/kernel/btf/vmlinux" if BTF_VMLINUX.exists() else "no vmlinux BTF"
    if ret < 0:
        return Finding(
            "btf",
            title,
            Status.MISSING,
            f"the kernel refused a minimal BTF blob: {bpf.strerror(-ret)}; {vmlinux}",
            "sockpol's objects carry BTF-defined maps and func_info; libbpf cannot load them",
        )
    return Finding("btf", title, Status.OK, f"the kernel loads BTF; {vmlinux}")


def _cgroup2() -> Finding:
    from sockpol.runtime.system import cgroup2_mount

    try:
        where = cgroup2_mount()
    except SockpolError as e:
        return Finding("cgroup2", "cgroup v2", Status.MISSING, str(e), "only sockets added by hand")
    return Finding("cgroup2", "cgroup v2", Status.OK, f"mounted at {where}")


def _bpffs() -> Finding:
    from sockpol.runtime.system import BPFFS_DEFAULT, find_bpffs

    if find_bpffs() is None:
        # Not an error: `sockpol load` mounts it; the probe itself changes nothing.
        return Finding(
            "bpffs",
            "bpffs",
            Status.OK,
            f"not mounted at {BPFFS_DEFAULT}; sockpol load mounts it",
        )
    return Finding("bpffs", "bpffs", Status.OK, f"mounted at {BPFFS_DEFAULT}")


def _bpf_loop() -> Finding:
    title = "bpf_loop helper"
    ok, err = _feature(
        lambda: _libbpf().libbpf_probe_bpf_helper(bpf.BPF_PROG_TYPE_SK_MSG, BPF_FUNC_LOOP, None)
    )
    if ok is None:
        return Finding("bpf_loop", title, Status.UNKNOWN, f"probe failed: {bpf.strerror(err)}")
    if not ok:
        return Finding(
            "bpf_loop",
            title,
            Status.MISSING,
            "sk_msg programs may not call bpf_loop (it appeared in Linux 5.17)",
            "sockpol's scanner needs it: no policy loads on this kernel",
        )
    return Finding("bpf_loop", title, Status.OK, "allowed in sk_msg programs")


def _loopback_pair(stack: ExitStack) -> tuple[socket.socket, socket.socket]:
    listener = stack.enter_context(socket.socket())
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = stack.enter_context(socket.create_connection(listener.getsockname(), timeout=5))
    server, _ = listener.accept()
    stack.enter_context(server)
    return client, server


def probe_ktls() -> Finding:
    """The tls ULP and TLS_TX on a plain loopback socket (no sockhash)."""
    title = "kernel TLS (kTLS)"
    ktls.load_module()
    config = kernel_config("TLS")
    with ExitStack() as stack:
        client, _ = _loopback_pair(stack)
        try:
            ktls.set_ulp(client)
        except OSError as e:
            why = {
                "n": "the kernel was built without it (CONFIG_TLS is not set)",
                "m": "CONFIG_TLS=m but the tls module did not load (modprobe tls)",
            }.get(config or "", "the tls ULP is not available (CONFIG_TLS?)")
            lacks = {
                "n": "kernel TLS (CONFIG_TLS is not set)",
                "m": "kernel TLS (CONFIG_TLS=m, but the tls module does not load)",
            }.get(config or "", "kernel TLS (the tls ULP is not available)")
            return Finding(
                "ktls",
                title,
                Status.MISSING,
                f'setsockopt(TCP_ULP, "tls") failed: {ktls.describe_errno(e.errno)}: {why}',
                "policy inside TLS is impossible here; TLS connections on governed ports are "
                "refused (the program sees only ciphertext)",
                lacks,
            )
        try:
            ktls.enable(client, ktls.StaticKeys.fixed(), ktls.TLS_TX)
        except OSError as e:
            return Finding(
                "ktls",
                title,
                Status.MISSING,
                f"the tls ULP is there but TLS_TX (AES-128-GCM) failed: "
                f"{ktls.describe_errno(e.errno)} (gcm(aes) crypto missing?)",
                "policy inside TLS is impossible here",
                f"kernel TLS with AES-128-GCM (TLS_TX failed: {_errname(e.errno)})",
            )
    return Finding("ktls", title, Status.OK, "TCP_ULP tls and TLS_TX (AES-128-GCM) work")


def probe_ktls_sockmap() -> Finding:
    """TLS_TX on a socket in a sockhash whose drop-all sk_msg program must then run."""
    title = "kTLS on sockets in a sockhash"
    with ExitStack() as stack:
        prog_fd = _drop_all_program()
        stack.callback(os.close, prog_fd)
        map_fd = bpf.map_create(bpf.BPF_MAP_TYPE_SOCKHASH, "sockpol_probe", 4, 4, 1)
        stack.callback(os.close, map_fd)
        # The order that works where anything does: attach, connect, insert, ULP, TLS_TX.
        bpf.prog_attach(prog_fd, map_fd, bpf.BPF_SK_MSG_VERDICT)
        client, server = _loopback_pair(stack)
        bpf.map_update(map_fd, (0).to_bytes(4, "little"), client.fileno().to_bytes(4, "little"))
        for step, action in (
            ('setsockopt(TCP_ULP, "tls")', lambda: ktls.set_ulp(client)),
            (
                "setsockopt(SOL_TLS, TLS_TX)",
                lambda: ktls.enable(client, ktls.StaticKeys.fixed(), ktls.TLS_TX),
            ),
        ):
            try:
                action()
            except OSError as e:
                detail = f"{step} on a socket in a sockhash failed: {ktls.describe_errno(e.errno)}"
                lacks = f"kTLS on sockets in a sockhash ({step} fails: {_errname(e.errno)})"
                if e.errno == errno.EINVAL:
                    detail += f'; this kernel carries "{REJECTION_PATCH}"'
                    lacks = (
                        f"kTLS on sockets in a sockhash ({step} fails with EINVAL: the kernel "
                        f'carries "{REJECTION_PATCH}")'
                    )
                return Finding(
                    "ktls_sockmap",
                    title,
                    Status.MISSING,
                    detail,
                    "policy inside TLS is impossible here: a TLS library's attempt to use kTLS on "
                    "a governed socket fails, it falls back to user-space TLS, and sockpol "
                    "refuses the ciphertext it cannot read (fails closed)",
                    lacks,
                )
        try:
            client.send(b"GET /probe HTTP/1.1\r\n\r\n")
        except OSError as e:
            if e.errno == errno.EACCES:
                return Finding(
                    "ktls_sockmap",
                    title,
                    Status.OK,
                    "TLS_TX set on a socket in a sockhash, and the sk_msg program judged its "
                    "plaintext (a drop-all program refused the send)",
                    "the kernel runs policies on the plaintext of kTLS sockets "
                    "(what sockpol covers there: docs/ktls.md)",
                )
            return Finding(
                "ktls_sockmap",
                title,
                Status.UNKNOWN,
                f"kTLS send failed unexpectedly: {ktls.describe_errno(e.errno)}",
            )
        return Finding(
            "ktls_sockmap",
            title,
            Status.MISSING,
            "TLS_TX was accepted but the sk_msg program did not run on the send (fails open)",
            "policy inside TLS would be bypassed on this kernel: do not rely on it",
            "kTLS on sockets in a sockhash (the sk_msg program does not run on kTLS sends)",
        )


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> int:
    return code | dst << 8 | src << 12 | (off & 0xFFFF) << 16 | (imm & 0xFFFFFFFF) << 32


def _redirect_to_self_program(map_fd: int) -> int:
    """An sk_msg program that redirects every message into its own socket's receive queue:
    `bpf_msg_redirect_hash(msg, map, &key 0, BPF_F_INGRESS)`; its fd."""
    insns = [
        _insn(0xBF, 6, 1),  # r6 = r1
        _insn(0x7A, 10, 0, -8, 0),  # *(u64 *)(r10 - 8) = 0
        _insn(0x18, 2, 1, 0, map_fd),  # r2 = map (BPF_PSEUDO_MAP_FD)
        0,
        _insn(0xBF, 3, 10),  # r3 = r10
        _insn(0x07, 3, 0, 0, -8),  # r3 += -8
        _insn(0xB7, 4, 0, 0, 1),  # r4 = BPF_F_INGRESS
        _insn(0xBF, 1, 6),  # r1 = r6
        _insn(0x85, 0, 0, 0, 71),  # call bpf_msg_redirect_hash
        _insn(0x95),  # exit
    ]
    arr = (_BPF_INSN * len(insns))(*insns)
    fd = _libbpf().bpf_prog_load(
        bpf.BPF_PROG_TYPE_SK_MSG, b"sockpol_probe", b"GPL", arr, len(insns), None
    )
    if fd < 0:
        raise bpf.BpfError("load probe sk_msg program (bpf_msg_redirect_hash)", -fd)
    return fd


def probe_answer() -> Finding:
    """Can a refusal be answered here? The helpers exist, and a message redirected with
    BPF_F_INGRESS to the sending socket's own entry is read back by that socket (not sent)."""
    title = "answers (a response redirected to the sender)"
    for name, (prog_type, helper) in ANSWER_HELPERS.items():
        ok, err = _feature(
            lambda t=prog_type, h=helper: _libbpf().libbpf_probe_bpf_helper(t, h, None)
        )
        if ok is None:
            return Finding("answer", title, Status.UNKNOWN, f"probe of {name} failed: {err}")
        if not ok:
            return Finding(
                "answer",
                title,
                Status.MISSING,
                f"the helper {name} is not allowed",
                "refusals are dropped (the send fails with EACCES) whatever `answer` says",
                f"the {name} helper",
            )
    with ExitStack() as stack:
        map_fd = bpf.map_create(bpf.BPF_MAP_TYPE_SOCKHASH, "sockpol_probe", 8, 4, 1)
        stack.callback(os.close, map_fd)
        prog_fd = _redirect_to_self_program(map_fd)
        stack.callback(os.close, prog_fd)
        bpf.prog_attach(prog_fd, map_fd, bpf.BPF_SK_MSG_VERDICT)
        client, server = _loopback_pair(stack)
        bpf.map_update(map_fd, bytes(8), client.fileno().to_bytes(4, "little"))
        probe = b"sockpol answer probe"
        client.send(probe)
        client.settimeout(2)
        try:
            back = client.recv(len(probe))
        except OSError as e:
            back = f"nothing ({ktls.describe_errno(e.errno) if e.errno else e})".encode()
        server.setblocking(False)
        try:
            leaked = server.recv(64)
        except BlockingIOError:
            leaked = b""
    if back == probe and not leaked:
        return Finding(
            "answer",
            title,
            Status.OK,
            "a message redirected with BPF_F_INGRESS to the sender's own entry came back to it, "
            "and the peer received nothing",
            "policies with `answer STATUS` answer refused requests with that response",
        )
    return Finding(
        "answer",
        title,
        Status.MISSING,
        f"redirected to itself, the sender read {back[:40]!r}; the peer received {leaked[:40]!r}",
        "refusals are dropped (the send fails with EACCES) whatever `answer` says",
        "a working redirect of a message into the sender's own receive queue",
    )


@functools.cache
def answer_support() -> Finding:
    """`probe_answer()`, once per process (the loader asks it for every policy with answers)."""
    return guarded("answer", "answers (a response redirected to the sender)", probe_answer)


def probe() -> list[Finding]:
    """Probe the running kernel; never raises for a missing feature, only reports it."""
    findings = [_kernel(), _privileges()]
    privileged = findings[-1].ok
    bpf_probes: list[tuple[str, str, Callable[[], Finding]]] = [
        ("sk_msg", "sk_msg and sock_ops programs", _sk_msg),
        ("sockhash", "sockhash maps", _sockhash),
        ("btf", "BTF", _btf),
    ]
    for key, title, fn in bpf_probes:
        findings.append(guarded(key, title, fn) if privileged else _unprivileged(key, title))
    findings += [_cgroup2(), _bpffs()]
    findings.append(
        guarded("bpf_loop", "bpf_loop helper", _bpf_loop)
        if privileged
        else _unprivileged("bpf_loop", "bpf_loop helper")
    )
    findings.append(guarded("ktls", "kernel TLS (kTLS)", probe_ktls))
    by_key = {f.key: f for f in findings}
    title = "kTLS on sockets in a sockhash"
    if not privileged:
        findings.append(_unprivileged("ktls_sockmap", title))
    elif not (by_key["ktls"].ok and by_key["sk_msg"].ok and by_key["sockhash"].ok):
        findings.append(
            Finding(
                "ktls_sockmap",
                title,
                Status.MISSING,
                "not tried: needs kTLS, sk_msg programs and sockhash maps",
                "policy inside TLS is impossible here",
            )
        )
    else:
        findings.append(guarded("ktls_sockmap", title, probe_ktls_sockmap))
    if not privileged:
        findings.append(_unprivileged("bpf_lsm", "BPF LSM programs (the lsm backend)"))
    else:
        findings.append(guarded("bpf_lsm", "BPF LSM programs (the lsm backend)", probe_bpf_lsm))
    answer_title = "answers (a response redirected to the sender)"
    if not privileged:
        findings.append(_unprivileged("answer", answer_title))
    else:
        findings.append(guarded("answer", answer_title, probe_answer))
    return findings


# ---------------------------------------------------------------------------------------------
# The lsm backend: a sleepable BPF LSM program on socket_sendmsg (codegen/lsm.py)


class _ProgLoadOpts(ctypes.Structure):
    """The start of libbpf's struct bpf_prog_load_opts (its `sz` says how much is given)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("attempts", ctypes.c_int),
        ("expected_attach_type", ctypes.c_int),
        ("prog_btf_fd", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_ifindex", ctypes.c_uint32),
        ("kern_version", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("attach_prog_fd", ctypes.c_uint32),
        ("attach_btf_obj_fd", ctypes.c_uint32),
    ]


def active_lsms() -> list[str] | None:
    """The kernel's active LSMs (securityfs), None where that cannot be read."""
    try:
        return SECURITYFS_LSM.read_text().strip().split(",")
    except OSError:
        return None


def probe_bpf_lsm() -> Finding:
    """Load a sleepable `return 0` LSM program on socket_sendmsg and attach it for a moment:
    what the lsm backend needs. BPF LSM must be in the active LSM list (boot parameter `lsm=`,
    docs/kernels.md), and the host may still refuse (EPERM, as on the development machines)."""
    from sockpol import kernelbtf

    key, title = "bpf_lsm", "BPF LSM programs (the lsm backend)"
    lsms = active_lsms()
    if lsms is not None and "bpf" not in lsms:
        return Finding(
            key, title, Status.MISSING,
            f"bpf is not among the active LSMs ({','.join(lsms)})",
            lacks="BPF LSM (boot with lsm=" + ",".join([*lsms, "bpf"]) + ")",
        )  # fmt: skip
    try:
        btf = kernelbtf.running_kernel()
    except kernelbtf.BtfError as e:
        return Finding(key, title, Status.MISSING, str(e), lacks="kernel BTF")
    hook = btf.by_name.get((12, "bpf_lsm_socket_sendmsg"))  # BTF_KIND_FUNC
    if hook is None:
        return Finding(key, title, Status.MISSING, "no bpf_lsm_socket_sendmsg in the kernel's BTF",
                       lacks="CONFIG_BPF_LSM")  # fmt: skip
    mov_r0_0, exit_ = 0xB7, 0x95
    insns = (_BPF_INSN * 2)(mov_r0_0, exit_)
    opts = _ProgLoadOpts(
        sz=ctypes.sizeof(_ProgLoadOpts),
        expected_attach_type=bpf.BPF_LSM_MAC,
        prog_flags=BPF_F_SLEEPABLE,
        attach_btf_id=hook,
    )
    fd = _libbpf().bpf_prog_load(
        bpf.BPF_PROG_TYPE_LSM, b"sockpol_probe", b"GPL", insns, 2, ctypes.byref(opts)
    )
    if fd < 0:
        err = -fd
        active = "" if lsms is None else f" (active LSMs: {','.join(lsms)})"
        return Finding(
            key, title, Status.MISSING,
            f"loading an LSM program failed: {_errname(err)} ({os.strerror(err)}){active}",
            lacks="permission to load BPF LSM programs" if err == errno.EPERM else "BPF LSM",
        )  # fmt: skip
    try:
        try:
            link = bpf.link_create(fd, 0, bpf.BPF_LSM_MAC)
        except bpf.BpfError as e:
            return Finding(key, title, Status.MISSING,
                           f"attaching an LSM program failed: {_errname(e.errno)}",
                           lacks="BPF LSM attachment")  # fmt: skip
        os.close(link)  # the link's only reference: closing it detaches the program
    finally:
        os.close(fd)
    where = "" if lsms is None else f" (active LSMs: {','.join(lsms)})"
    return Finding(key, title, Status.OK, f"a sleepable program on socket_sendmsg loads{where}")


@functools.cache
def lsm_support() -> Finding:
    return guarded("bpf_lsm", "BPF LSM programs (the lsm backend)", probe_bpf_lsm)


@dataclass(frozen=True)
class BackendChoice:
    backend: str  # sockmap or lsm
    reason: str


def choose_backend(tls_policy: bool) -> BackendChoice:
    """The backend a policy gets when none is forced: sockmap (sk_msg on a sockhash: it holds a
    split head back, answers refusals) wherever it can do the job; for a `tls` policy on a
    kernel that rejects TLS on sockmap sockets, lsm where BPF LSM works."""
    if not tls_policy:
        return BackendChoice("sockmap", "plaintext policy: sk_msg on a sockhash (the default)")
    sockmap = tls_policy_support()
    if sockmap.ok:
        return BackendChoice("sockmap", "kTLS on sockets in a sockhash works here")
    lsm = lsm_tls_support()
    if lsm.ok:
        return BackendChoice(
            "lsm",
            f"kTLS on sockets in a sockhash does not work here ({sockmap.reason}); BPF LSM does",
        )
    return BackendChoice("sockmap", f"neither works here: {sockmap.reason}; lsm: {lsm.reason}")


def guarded(key: str, title: str, fn: Callable[[], Finding]) -> Finding:
    """A probe that failed in an unforeseen way reports UNKNOWN with the reason, not a crash."""
    try:
        return fn()
    except (OSError, SockpolError) as e:
        return Finding(key, title, Status.UNKNOWN, f"probe failed: {e}")


def _errname(err: int | None) -> str:
    return errno.errorcode.get(err or 0, str(err))


# ---------------------------------------------------------------------------------------------
# Can policies with a `tls` statement be loaded here?


@dataclass(frozen=True)
class TlsSupport:
    """Whether this kernel runs sk_msg programs on the plaintext of kTLS sockets in a sockhash,
    which a policy with a `tls` statement needs (`tls userspace allow` too)."""

    ok: bool
    reason: str  # when not ok: why, one phrase ("it lacks kernel TLS (CONFIG_TLS is not set)")
    findings: tuple[Finding, ...]  # the "ktls" and "ktls_sockmap" findings it was decided on

    def refusal(self, policy: str, done: str = "nothing was loaded") -> str:
        """The one-line message of a refused load (or reload) of `policy`."""
        return (
            f"policy {policy!r} has a tls statement, but this kernel cannot judge requests "
            f"inside TLS: {self.reason}; {done} (see 'sockpol doctor' and docs/ktls.md)"
        )


def tls_support_from(findings: list[Finding], keys: tuple[str, ...] = TLS) -> TlsSupport:
    """The answer for a list of findings (`probe()`'s, or the two probes' alone)."""
    by_key = {f.key: f for f in findings}
    used = tuple(by_key[k] for k in keys if k in by_key)
    for key in keys:
        f = by_key.get(key)
        if f is None:
            return TlsSupport(False, f"{key} was not probed", used)
        if f.ok:
            continue
        if f.verdict is Status.MISSING and f.lacks:
            return TlsSupport(False, f"it lacks {f.lacks}", used)
        if f.verdict is Status.MISSING:
            return TlsSupport(False, f"{f.title} is missing ({f.detail})", used)
        return TlsSupport(False, f"{f.title} could not be verified ({f.detail})", used)
    return TlsSupport(True, "", used)


@functools.cache
def tls_policy_support() -> TlsSupport:
    """Can policies with a `tls` statement be loaded on this kernel? Tried for real (the kTLS
    probe, then kTLS on a socket in a sockhash with a drop-all program that must run), once per
    process: a few milliseconds, nothing left behind. Needs the privileges loading needs;
    without them the answer is no ("could not be verified")."""
    ktls_finding = guarded("ktls", "kernel TLS (kTLS)", probe_ktls)
    if not ktls_finding.ok:
        return tls_support_from([ktls_finding])
    sockmap = guarded("ktls_sockmap", "kTLS on sockets in a sockhash", probe_ktls_sockmap)
    return tls_support_from([ktls_finding, sockmap])


@functools.cache
def lsm_tls_support() -> TlsSupport:
    """The same question for the lsm backend: kTLS and BPF LSM (the LSM hook sees kTLS
    plaintext without sockmap)."""
    ktls_finding = guarded("ktls", "kernel TLS (kTLS)", probe_ktls)
    if not ktls_finding.ok:
        return tls_support_from([ktls_finding])
    return tls_support_from([ktls_finding, lsm_support()], LSM_TLS)


def summary(findings: list[Finding]) -> dict[str, bool]:
    """What works here: plaintext HTTP policies, and policy inside TLS (kTLS)."""
    by_key = {f.key: f for f in findings}
    plain = all(by_key[k].ok for k in CORE if k in by_key)
    ktls = plain and all(by_key[k].ok for k in TLS if k in by_key)
    lsm = plain and "bpf_lsm" in by_key and by_key["bpf_lsm"].ok
    ktls_lsm = lsm and "ktls" in by_key and by_key["ktls"].ok
    return {"plaintext": plain, "ktls": ktls or ktls_lsm, "ktls_sockmap": ktls,
            "lsm": lsm, "ktls_lsm": ktls_lsm}  # fmt: skip
