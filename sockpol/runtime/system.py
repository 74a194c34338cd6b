"""What the runtime needs from the host: a bpffs to pin into, the cgroup v2 tree, and privileges.

Mount points are found by parsing /proc/self/mountinfo, never assumed: distributions mount cgroup2
at /sys/fs/cgroup or /sys/fs/cgroup/unified, and bpffs is often not mounted at all (then we mount it
at /sys/fs/bpf, as systemd would).
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass
from pathlib import Path

from sockpol.diagnostics import SockpolError

BPFFS_DEFAULT = Path("/sys/fs/bpf")
MOUNTINFO = Path("/proc/self/mountinfo")

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_BPF = 39


class SystemSetupError(SockpolError):
    """The host lacks something the runtime needs (privileges, bpffs, cgroup v2)."""


@dataclass(frozen=True)
class Mount:
    mount_point: Path
    fstype: str
    source: str
    root: str  # the path inside the filesystem that is mounted here


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts(mountinfo: Path = MOUNTINFO) -> list[Mount]:
    """Every mount of this process's mount namespace, in mount order (later ones are on top)."""
    out = []
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        try:
            sep = fields.index("-", 6)  # optional fields end with a lone "-"
        except ValueError:
            continue
        out.append(
            Mount(
                mount_point=Path(_unescape(fields[4])),
                fstype=fields[sep + 1],
                source=_unescape(fields[sep + 2]) if len(fields) > sep + 2 else "",
                root=_unescape(fields[3]),
            )
        )
    return out


def _top_mount(path: Path, all_mounts: list[Mount]) -> Mount | None:
    """The mount visible at exactly `path` (the last one mounted there), if any."""
    here = [m for m in all_mounts if m.mount_point == path]
    return here[-1] if here else None


def find_bpffs(path: Path = BPFFS_DEFAULT) -> Path | None:
    m = _top_mount(path, mounts())
    return path if m is not None and m.fstype == "bpf" else None


def ensure_bpffs(path: Path = BPFFS_DEFAULT) -> Path:
    """Return `path` once a bpffs is mounted there, mounting one if needed."""
    if find_bpffs(path) is not None:
        return path
    path.mkdir(parents=True, exist_ok=True)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 4 + [ctypes.c_ulong, ctypes.c_void_p]
    if libc.mount(b"bpf", str(path).encode(), b"bpf", None, 0, None) != 0:
        err = ctypes.get_errno()
        raise SystemSetupError(
            f"bpffs: cannot mount a bpf filesystem at {path}: {os.strerror(err)} "
            f"(as root: mount -t bpf bpf {path})"
        )
    if find_bpffs(path) is None:
        raise SystemSetupError(f"bpffs: mounted bpf at {path} but it does not show in mountinfo")
    return path


def cgroup2_mount() -> Path:
    """The mount point of the cgroup v2 hierarchy (its root, not a bind-mounted subtree if any)."""
    candidates = [m for m in mounts() if m.fstype == "cgroup2"]
    if not candidates:
        raise SystemSetupError(
            "cgroup: no cgroup v2 filesystem is mounted (mount -t cgroup2 none /sys/fs/cgroup)"
        )
    roots = [m for m in candidates if m.root == "/"]
    return (roots or candidates)[0].mount_point


def resolve_cgroup(arg: str | os.PathLike[str]) -> Path:
    """Turn a `--cgroup` argument into an existing cgroup v2 directory.

    Accepts a directory inside the cgroup2 mount (`/sys/fs/cgroup/unified/web`), or a path
    relative to the mount, with or without a leading slash (`web`, `/system.slice/nginx.service`,
    as printed by /proc/PID/cgroup).
    """
    root = cgroup2_mount()
    raw = Path(arg)
    if raw.is_absolute() and (raw == root or root in raw.parents):
        path = raw
    else:
        path = root / str(raw).lstrip("/")
    path = Path(os.path.realpath(path))
    if not (path == root or root in path.parents):
        raise SystemSetupError(f"cgroup: {arg} is not inside the cgroup v2 mount {root}")
    if not path.is_dir() or not (path / "cgroup.procs").exists():
        raise SystemSetupError(f"cgroup: {path} is not a cgroup v2 directory")
    return path


def effective_capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_privileges() -> None:
    """Loading sk_msg and attaching to cgroups needs CAP_BPF (or CAP_SYS_ADMIN) + CAP_NET_ADMIN."""
    caps = effective_capabilities()

    def has(cap: int) -> bool:
        return bool(caps >> cap & 1)

    missing = []
    if not (has(CAP_BPF) or has(CAP_SYS_ADMIN)):
        missing.append("CAP_BPF")
    if not has(CAP_NET_ADMIN):
        missing.append("CAP_NET_ADMIN")
    if missing:
        who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
        raise SystemSetupError(
            f"permissions: loading policies needs {' and '.join(missing)}, which this process "
            f"({who}) lacks; run sockpol as root (sudo)"
        )
