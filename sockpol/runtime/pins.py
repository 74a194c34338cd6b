"""The pin directory layout and the filesystem moves that make loads and unloads atomic.

    /sys/fs/bpf/sockpol/                 pin root (bpffs; $SOCKPOL_PIN_ROOT names another directory
                                         there); flock()ed by every load/unload
        <name>/                          one directory per loaded policy
            sockpol_msg                  the sk_msg program (attached to sockpol_socks)
            sockpol_sockops              the sock_ops program
            sockpol_socks                the sockhash (kept across replacements)
            cgroup_link                  bpf_link of sockpol_sockops on the cgroup (if any)
            sockpol_lsm, lsm_link        the LSM backend's program and its bpf_link (an LSM
                                         object has these instead of sockpol_msg, sockpol_socks)
            state                        sockpol's record, see state.py
            map_<map name>               every other map of the object, dots made underscores
                                         (e.g. map_sockpol_rodata for libbpf's sockpol.rodata)
        _staging-<name>-<pid>/           a load being assembled (or an old one being torn down)
        _unload-<name>-<pid>/            an unload in progress

bpffs refuses names containing a dot (reserved "for future extensions"), hence the underscores;
policy names cannot start with one, so the two kinds of directories never collide.

A load pins everything into a staging directory and only then swaps it with `<name>/` in one
renameat2(RENAME_EXCHANGE), so another process sees either the old pin set or the new one, never a
mix. Underscore directories found while holding the lock were left by a crashed process and are
swept: unpinning them is enough, because a pinned link that nobody else holds detaches when its
last pin goes away.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sockpol.contract import LSM_PROGRAM, MSG_PROGRAM, SOCK_MAP, SOCKOPS_PROGRAM
from sockpol.runtime.system import BPFFS_DEFAULT, SystemSetupError, ensure_bpffs, find_bpffs

log = logging.getLogger("sockpol.runtime")

ROOT_NAME = "sockpol"
# Another pin root under the same bpffs (a directory name, like ROOT_NAME): an independent set of
# policies with its own lock, names and status, e.g. one per test session, so that two test runs
# on one host cannot unload or replace each other's policies.
ROOT_ENV = "SOCKPOL_PIN_ROOT"
PIN_MSG = MSG_PROGRAM
PIN_SOCKOPS = SOCKOPS_PROGRAM
PIN_SOCKS = SOCK_MAP
PIN_LINK = "cgroup_link"
PIN_LSM = LSM_PROGRAM  # the LSM backend's program (instead of sockpol_msg and the sockhash)
PIN_LSM_LINK = "lsm_link"  # its bpf_link on the socket_sendmsg hook
PIN_STATE = "state"
MAP_PREFIX = "map_"
TEMP_PREFIX = "_"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_RENAME_EXCHANGE = 2


def valid_name(name: str) -> bool:
    """Policy names become bpffs directory names: no slash, no dot, no leading underscore."""
    return _NAME.fullmatch(name) is not None


def root_name() -> str:
    """The pin root's directory name: $SOCKPOL_PIN_ROOT if set, else `sockpol`."""
    name = os.environ.get(ROOT_ENV) or ROOT_NAME
    if not valid_name(name):
        raise SystemSetupError(
            f"{ROOT_ENV}={name!r}: a pin root is one directory name under the bpffs "
            "(letters, digits, '-' and '_', not starting with '_')"
        )
    return name


def pin_root(*, create: bool) -> Path | None:
    """The pin root; with create, mounts bpffs and makes the directory as needed."""
    name = root_name()
    if create:
        root = ensure_bpffs() / name
        root.mkdir(exist_ok=True)
        return root
    bpffs = find_bpffs(BPFFS_DEFAULT)
    if bpffs is None or not (bpffs / name).is_dir():
        return None
    return bpffs / name


def remove_root() -> str | None:
    """Remove the pin root where nothing is pinned under it any more (a demo's, a benchmark's,
    a test session's own); None if it is gone, else why it stays."""
    root = pin_root(create=False)
    if root is None:
        return None
    try:
        root.rmdir()
    except OSError as e:  # a policy is still pinned there
        return f"{root}: {e.strerror}"
    return None


@contextmanager
def locked(root: Path) -> Iterator[None]:
    """Serialize loads and unloads of all policies on this host."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def staging_dir(root: Path, name: str) -> Path:
    return root / f"{TEMP_PREFIX}staging-{name}-{os.getpid()}"


def unload_dir(root: Path, name: str) -> Path:
    return root / f"{TEMP_PREFIX}unload-{name}-{os.getpid()}"


def remove_pins(directory: Path) -> None:
    """Unpin everything in a pin directory and remove it; a missing directory is fine."""
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_dir():
            remove_pins(entry)
        else:
            entry.unlink(missing_ok=True)
    directory.rmdir()


def sweep_stale(root: Path) -> None:
    """Remove temporary directories left by a process that died mid-load (hold the lock)."""
    for entry in root.iterdir():
        if entry.name.startswith(TEMP_PREFIX) and entry.is_dir():
            log.warning("removing stale pin directory %s", entry)
            remove_pins(entry)


_libc = ctypes.CDLL(None, use_errno=True)


def exchange(a: Path, b: Path) -> None:
    """Atomically swap two directories (renameat2 RENAME_EXCHANGE, supported by bpffs).

    Falls back to two renames when the kernel or libc lacks it; the only cost is a moment in which
    neither name exists, which readers (status) tolerate.
    """
    fn = getattr(_libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        at_fdcwd = -100
        if fn(at_fdcwd, str(a).encode(), at_fdcwd, str(b).encode(), _RENAME_EXCHANGE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), str(a))
    aside = a.with_name(a.name + "-old")
    os.rename(b, aside)
    try:
        os.rename(a, b)
    except OSError:
        os.rename(aside, b)
        raise
    os.rename(aside, a)


def map_pin_name(map_name: str) -> str:
    return MAP_PREFIX + map_name.replace(".", "_")
