"""ctypes bindings to the system libbpf (`libbpf.so.1`, Debian package libbpf1): only what we use.

Written against libbpf 1.1 (Debian bookworm), whose conventions are:
- functions returning `int` return a negative errno on failure (and set errno);
- functions returning a pointer return NULL and set errno (libbpf 1.x "strict" mode; the old
  `libbpf_get_error(ptr)` encoding of errors in pointers is gone).
Every failure here is raised as `BpfError` carrying the errno and the name of the operation, so the
loader can say which stage failed. Nothing here knows about policies.

libbpf's own messages (warnings such as "prog 'x': BPF program load failed") go through one print
callback installed at import; `capture_messages()` collects them for the current thread so that a
failed load can quote them, and otherwise they go to the `sockpol.libbpf` logger at debug level
instead of stderr.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_bool,
    c_char,
    c_char_p,
    c_int,
    c_size_t,
    c_uint32,
    c_uint64,
    c_void_p,
)
from dataclasses import dataclass
from typing import Any

from sockpol.contract import (  # noqa: F401 -- re-exported for the runtime
    BPF_CGROUP_SOCK_OPS,
    BPF_LSM_MAC,
    BPF_MAP_TYPE_ARRAY,
    BPF_MAP_TYPE_PROG_ARRAY,
    BPF_MAP_TYPE_SOCKHASH,
    BPF_PROG_TYPE_LSM,
    BPF_PROG_TYPE_SK_MSG,
    BPF_PROG_TYPE_SK_SKB,
    BPF_PROG_TYPE_SOCK_OPS,
    BPF_SK_MSG_VERDICT,
    BPF_SK_SKB_STREAM_VERDICT,
)
from sockpol.diagnostics import SockpolError

log = logging.getLogger("sockpol.libbpf")

# Kernel UAPI constants (include/uapi/linux/bpf.h); stable ABI values. The map types are the
# contract's (the code generator emits the same ones).
BPF_LINK_TYPE_CGROUP = 3
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_F_REPLACE = 1 << 2
BPF_F_RDONLY_PROG = 1 << 7
BPF_OBJ_NAME_LEN = 16


class LibbpfMissing(SockpolError):
    pass


class BpfError(SockpolError):
    """A failed libbpf call or bpf() syscall: `op` names it, `errno` says why."""

    def __init__(self, op: str, err: int) -> None:
        self.op = op
        self.errno = err
        super().__init__(f"{op}: {strerror(err)}")


# ---------------------------------------------------------------------------------------------
# Library loading


def _load() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError as e:
        raise LibbpfMissing(
            f"cannot load libbpf.so.1 ({e}); install the Debian package libbpf1 "
            "(apt-get install libbpf1)"
        ) from None


_lib: ctypes.CDLL | None = None
_libc = ctypes.CDLL(None, use_errno=True)


def lib() -> ctypes.CDLL:
    """The loaded library with argument types declared; loaded on first use, not at import."""
    global _lib
    if _lib is None:
        _occupy_std_fds()
        loaded = _load()
        _declare(loaded)
        loaded.libbpf_set_print(_print_cb)
        _lib = loaded
    return _lib


def _occupy_std_fds() -> None:
    """Keep fds 0-2 taken (by /dev/null when closed, as under some CI runners).

    Otherwise the first BPF object would get fd 0, which libbpf 1.1 and parts of the bpf() ABI
    read as "no fd" (libbpf 1.2 added the same guard internally).
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # lowest free fd: this one, lower ones are taken


class _OpenOpts(Structure):
    """struct bpf_object_open_opts of libbpf 1.1 (80 bytes); `sz` lets newer libbpfs accept it."""

    _fields_ = [
        ("sz", c_size_t),
        ("object_name", c_char_p),
        ("relaxed_maps", c_bool),
        ("pin_root_path", c_char_p),
        ("_attach_prog_fd_stub", c_uint32),
        ("kconfig", c_char_p),
        ("btf_custom_path", c_char_p),
        ("kernel_log_buf", c_void_p),
        ("kernel_log_size", c_size_t),
        ("kernel_log_level", c_uint32),
    ]


class _LinkUpdateOpts(Structure):
    _fields_ = [("sz", c_size_t), ("flags", c_uint32), ("old_prog_fd", c_uint32)]


class _MapCreateOpts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("btf_fd", c_uint32),
        ("btf_key_type_id", c_uint32),
        ("btf_value_type_id", c_uint32),
        ("btf_vmlinux_value_type_id", c_uint32),
        ("inner_map_fd", c_uint32),
        ("map_flags", c_uint32),
        ("map_extra", c_uint64),
        ("numa_node", c_uint32),
        ("map_ifindex", c_uint32),
    ]


assert ctypes.sizeof(_OpenOpts) == 80
assert ctypes.sizeof(_LinkUpdateOpts) == 16
assert ctypes.sizeof(_MapCreateOpts) == 48

_PRINT_FN = CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)
# int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size)
RINGBUF_SAMPLE_FN = CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t)


def _declare(so: ctypes.CDLL) -> None:
    p = c_void_p
    sigs: dict[str, tuple[type | None, list[type]]] = {
        "libbpf_set_print": (p, [_PRINT_FN]),
        "libbpf_strerror": (c_int, [c_int, c_char_p, c_size_t]),
        "bpf_object__open_file": (p, [c_char_p, POINTER(_OpenOpts)]),
        "bpf_object__load": (c_int, [p]),
        "bpf_object__close": (None, [p]),
        "bpf_object__next_program": (p, [p, p]),
        "bpf_object__next_map": (p, [p, p]),
        "bpf_program__name": (c_char_p, [p]),
        "bpf_program__type": (c_int, [p]),
        "bpf_program__fd": (c_int, [p]),
        "bpf_program__set_autoload": (c_int, [p, c_bool]),
        "bpf_program__set_log_buf": (c_int, [p, p, c_size_t]),
        "bpf_map__name": (c_char_p, [p]),
        "bpf_map__type": (c_int, [p]),
        "bpf_map__key_size": (c_uint32, [p]),
        "bpf_map__value_size": (c_uint32, [p]),
        "bpf_map__max_entries": (c_uint32, [p]),
        "bpf_map__is_internal": (c_bool, [p]),
        "bpf_map__fd": (c_int, [p]),
        "bpf_map__reuse_fd": (c_int, [p, c_int]),
        "bpf_map__set_pin_path": (c_int, [p, c_char_p]),
        "bpf_map__set_initial_value": (c_int, [p, p, c_size_t]),
        "bpf_prog_attach": (c_int, [c_int, c_int, c_int, c_uint32]),
        "bpf_prog_detach2": (c_int, [c_int, c_int, c_int]),
        "bpf_link_create": (c_int, [c_int, c_int, c_int, p]),
        "bpf_link_update": (c_int, [c_int, c_int, POINTER(_LinkUpdateOpts)]),
        "bpf_link_detach": (c_int, [c_int]),
        "bpf_obj_pin": (c_int, [c_int, c_char_p]),
        "bpf_obj_get": (c_int, [c_char_p]),
        "bpf_map_create": (
            c_int,
            [c_int, c_char_p, c_uint32, c_uint32, c_uint32, POINTER(_MapCreateOpts)],
        ),
        "bpf_map_update_elem": (c_int, [c_int, p, p, c_uint64]),
        "bpf_map_lookup_elem": (c_int, [c_int, p, p]),
        "bpf_map_delete_elem": (c_int, [c_int, p]),
        "bpf_map_get_next_key": (c_int, [c_int, p, p]),
        "bpf_obj_get_info_by_fd": (c_int, [c_int, p, POINTER(c_uint32)]),
        "bpf_prog_get_next_id": (c_int, [c_uint32, POINTER(c_uint32)]),
        "bpf_map_get_next_id": (c_int, [c_uint32, POINTER(c_uint32)]),
        "bpf_prog_get_fd_by_id": (c_int, [c_uint32]),
        "bpf_map_get_fd_by_id": (c_int, [c_uint32]),  # (tests; see ProgArrayRef before using)
        "libbpf_num_possible_cpus": (c_int, []),
        "ring_buffer__new": (p, [c_int, RINGBUF_SAMPLE_FN, p, p]),
        "ring_buffer__add": (c_int, [p, c_int, RINGBUF_SAMPLE_FN, p]),
        "ring_buffer__poll": (c_int, [p, c_int]),
        "ring_buffer__free": (None, [p]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(so, name)
        fn.restype = restype
        fn.argtypes = argtypes


def strerror(err: int) -> str:
    """libbpf_strerror knows libbpf's private codes (4000+) as well as errno values."""
    if _lib is None:
        try:
            lib()
        except LibbpfMissing:
            return os.strerror(err)
    buf = ctypes.create_string_buffer(256)
    if _lib is not None and _lib.libbpf_strerror(err, buf, len(buf)) == 0:
        return buf.value.decode(errors="replace")
    return os.strerror(err)


def _check(op: str, ret: int) -> int:
    if ret < 0:
        raise BpfError(op, -ret)  # libbpf 1.x returns -errno (so -1 is EPERM, not "see errno")
    return ret


def _check_ptr(op: str, ptr: int | None) -> int:
    if not ptr:
        raise BpfError(op, ctypes.get_errno() or errno_mod.EINVAL)
    return ptr


# ---------------------------------------------------------------------------------------------
# libbpf's print callback

_capture = threading.local()  # per thread: the capture list and a format buffer
_libc.vsnprintf.argtypes = [c_char_p, c_size_t, c_char_p, c_void_p]
_libc.vsnprintf.restype = c_int
LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2


@_PRINT_FN
def _print_cb(level: int, fmt: bytes, ap: int) -> int:
    # va_list arrives as a pointer on x86-64 and arm64 (an array / an indirectly passed struct),
    # so libc's vsnprintf can format it directly.
    try:
        # ctypes releases the GIL around vsnprintf, so the buffer must not be shared by threads.
        buf = getattr(_capture, "buf", None)
        if buf is None:
            buf = _capture.buf = ctypes.create_string_buffer(1 << 16)
        n = _libc.vsnprintf(buf, len(buf), fmt, ap)
        text = buf.value.decode(errors="replace").rstrip("\n")
        sink: list[tuple[int, str]] | None = getattr(_capture, "messages", None)
        if sink is not None and level <= LIBBPF_INFO:
            sink.append((level, text))
        log.debug("libbpf[%d]: %s", level, text)
        return n
    except Exception:  # a Python exception must never unwind through C
        return 0


@contextmanager
def capture_messages() -> Iterator[list[tuple[int, str]]]:
    """Collect libbpf's warnings and info messages (level, text) issued by this thread."""
    previous = getattr(_capture, "messages", None)
    messages: list[tuple[int, str]] = []
    _capture.messages = messages
    try:
        yield messages
    finally:
        _capture.messages = previous


# ---------------------------------------------------------------------------------------------
# Objects, programs, maps


class Program:
    def __init__(self, ptr: int) -> None:
        self._ptr = ptr
        self._log: ctypes.Array[c_char] | None = None

    @property
    def name(self) -> str:
        return lib().bpf_program__name(self._ptr).decode()

    @property
    def type(self) -> int:
        return lib().bpf_program__type(self._ptr)

    def set_autoload(self, autoload: bool) -> None:
        _check("bpf_program__set_autoload", lib().bpf_program__set_autoload(self._ptr, autoload))

    def capture_log(self, size: int = 1 << 20) -> None:
        """Give the program its own verifier log buffer (used by libbpf only when a load fails)."""
        self._log = ctypes.create_string_buffer(size)
        _check(
            "bpf_program__set_log_buf",
            lib().bpf_program__set_log_buf(self._ptr, ctypes.addressof(self._log), size),
        )

    @property
    def log(self) -> str:
        return self._log.value.decode(errors="replace") if self._log is not None else ""

    def fd(self) -> int:
        return _check(f"prog '{self.name}': fd", lib().bpf_program__fd(self._ptr))


class Map:
    def __init__(self, ptr: int) -> None:
        self._ptr = ptr

    @property
    def name(self) -> str:
        return lib().bpf_map__name(self._ptr).decode()

    @property
    def type(self) -> int:
        return lib().bpf_map__type(self._ptr)

    @property
    def key_size(self) -> int:
        return lib().bpf_map__key_size(self._ptr)

    @property
    def value_size(self) -> int:
        return lib().bpf_map__value_size(self._ptr)

    @property
    def max_entries(self) -> int:
        return lib().bpf_map__max_entries(self._ptr)

    @property
    def is_internal(self) -> bool:
        return bool(lib().bpf_map__is_internal(self._ptr))

    def fd(self) -> int:
        return _check(f"map '{self.name}': fd", lib().bpf_map__fd(self._ptr))

    def reuse_fd(self, fd: int) -> None:
        """Make the object use an existing kernel map instead of creating one (libbpf dups fd)."""
        _check(f"map '{self.name}': reuse fd", lib().bpf_map__reuse_fd(self._ptr, fd))

    def set_initial_value(self, data: bytes) -> None:
        """The contents of a global-data map (`.rodata`) before the object is loaded."""
        buf = ctypes.create_string_buffer(data, len(data))
        _check(
            f"map '{self.name}': set initial value",
            lib().bpf_map__set_initial_value(self._ptr, ctypes.addressof(buf), len(data)),
        )

    def clear_pin_path(self) -> None:
        _check(f"map '{self.name}': set pin path", lib().bpf_map__set_pin_path(self._ptr, None))


class BpfObject:
    """An opened (and maybe loaded) ELF object; `close()` releases every fd libbpf holds for it."""

    def __init__(self, ptr: int) -> None:
        self._ptr: int | None = ptr

    @classmethod
    def open_file(cls, path: str, object_name: str | None = None) -> BpfObject:
        opts = _OpenOpts(sz=ctypes.sizeof(_OpenOpts))
        if object_name is not None:
            opts.object_name = object_name.encode()
        ptr = lib().bpf_object__open_file(path.encode(), ctypes.byref(opts))
        return cls(_check_ptr(f"open {path}", ptr))

    @property
    def ptr(self) -> int:
        if self._ptr is None:
            raise ValueError("BPF object already closed")
        return self._ptr

    def programs(self) -> list[Program]:
        out, cur = [], None
        while cur := lib().bpf_object__next_program(self.ptr, cur):
            out.append(Program(cur))
        return out

    def maps(self) -> list[Map]:
        out, cur = [], None
        while cur := lib().bpf_object__next_map(self.ptr, cur):
            out.append(Map(cur))
        return out

    def program(self, name: str) -> Program | None:
        return next((p for p in self.programs() if p.name == name), None)

    def map(self, name: str) -> Map | None:
        return next((m for m in self.maps() if m.name == name), None)

    def load(self) -> None:
        _check("bpf_object__load", lib().bpf_object__load(self.ptr))

    def hold_prog_arrays(self, skip: frozenset[str] = frozenset()) -> list[ProgArrayRef]:
        """A reference of our own to each program array the object created (but `skip`), taken
        while its programs are still loaded: to be closed after `close()` (see ProgArrayRef)."""
        held = []
        for m in self.maps():
            if m.type == BPF_MAP_TYPE_PROG_ARRAY and m.name not in skip:
                fd = lib().bpf_map__fd(m._ptr)  # < 0: never created, or closed by a failed load
                if fd >= 0:
                    held.append(ProgArrayRef(os.dup(fd)))
        return held

    def close(self) -> None:
        if self._ptr is not None:
            lib().bpf_object__close(self._ptr)
            self._ptr = None

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Low-level bpf() wrappers (libbpf's bpf.h)


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> None:
    _check("bpf_prog_attach", lib().bpf_prog_attach(prog_fd, target_fd, attach_type, flags))


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    _check("bpf_prog_detach", lib().bpf_prog_detach2(prog_fd, target_fd, attach_type))


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    return _check("bpf_link_create", lib().bpf_link_create(prog_fd, target_fd, attach_type, None))


def link_update(link_fd: int, new_prog_fd: int, old_prog_fd: int | None = None) -> None:
    """Swap a link's program atomically; with old_prog_fd, only if that program is still there."""
    opts = _LinkUpdateOpts(sz=ctypes.sizeof(_LinkUpdateOpts))
    if old_prog_fd is not None:
        opts.flags = BPF_F_REPLACE
        opts.old_prog_fd = old_prog_fd
    _check("bpf_link_update", lib().bpf_link_update(link_fd, new_prog_fd, ctypes.byref(opts)))


def link_detach(link_fd: int) -> None:
    """Detach a link from its target now, whoever else still holds it (BPF_LINK_DETACH)."""
    _check("bpf_link_detach", lib().bpf_link_detach(link_fd))


def obj_pin(fd: int, path: str) -> None:
    _check(f"pin {path}", lib().bpf_obj_pin(fd, path.encode()))


def obj_get(path: str) -> int:
    return _check(f"open pin {path}", lib().bpf_obj_get(path.encode()))


def map_create(
    map_type: int, name: str, key_size: int, value_size: int, max_entries: int, flags: int = 0
) -> int:
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=flags)
    return _check(
        f"create map {name}",
        lib().bpf_map_create(
            map_type, name.encode(), key_size, value_size, max_entries, ctypes.byref(opts)
        ),
    )


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    k, v = (
        ctypes.create_string_buffer(key, len(key)),
        ctypes.create_string_buffer(value, len(value)),
    )
    _check("bpf_map_update_elem", lib().bpf_map_update_elem(fd, k, v, flags))


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value_size)
    ret = lib().bpf_map_lookup_elem(fd, k, v)
    if ret == -errno_mod.ENOENT:
        return None
    _check("bpf_map_lookup_elem", ret)
    return v.raw


def num_possible_cpus() -> int:
    """How many values a per-CPU map holds per key (possible CPUs, not online ones)."""
    return _check("libbpf_num_possible_cpus", lib().libbpf_num_possible_cpus())


def map_lookup_percpu(fd: int, key: bytes, value_size: int) -> list[bytes] | None:
    """One key of a per-CPU map: each possible CPU's value (each padded to 8 bytes in the
    kernel's copy), or None when the key is absent."""
    stride = (value_size + 7) // 8 * 8
    ncpus = num_possible_cpus()
    raw = map_lookup(fd, key, stride * ncpus)
    if raw is None:
        return None
    return [raw[i * stride : i * stride + value_size] for i in range(ncpus)]


class RingBuffer:
    """libbpf's ring buffer consumer over one or more BPF_MAP_TYPE_RINGBUF maps.

    `callback(tag, data)` gets each record's bytes; `tag` says which map it came from (the value
    given to `add`). Records are delivered in the order the producers committed them, per map.
    """

    def __init__(self, callback) -> None:
        self._callback = callback
        self._tags: dict[int, object] = {}
        # Kept alive as long as libbpf may call it.
        self._sample = RINGBUF_SAMPLE_FN(self._on_sample)
        self._ptr: int | None = None
        self._error: BaseException | None = None

    def _on_sample(self, ctx: int | None, data: int, size: int) -> int:
        try:
            self._callback(self._tags[ctx or 0], ctypes.string_at(data, size))
            return 0
        except BaseException as e:  # never unwind through C; re-raised by poll()
            self._error = e
            return -1

    def add(self, map_fd: int, tag: object) -> None:
        key = len(self._tags) + 1  # the ctx pointer libbpf hands back; 0 would read as NULL
        self._tags[key] = tag
        if self._ptr is None:
            ptr = lib().ring_buffer__new(map_fd, self._sample, key, None)
            self._ptr = _check_ptr("ring_buffer__new", ptr)
        else:
            _check("ring_buffer__add", lib().ring_buffer__add(self._ptr, map_fd, self._sample, key))

    def poll(self, timeout_ms: int) -> int:
        """Wait up to timeout_ms for records and deliver them; returns how many."""
        if self._ptr is None:
            return 0
        ret = lib().ring_buffer__poll(self._ptr, timeout_ms)
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if ret == -errno_mod.EINTR:
            return 0
        return _check("ring_buffer__poll", ret)

    def close(self) -> None:
        if self._ptr is not None:
            lib().ring_buffer__free(self._ptr)
            self._ptr = None


def map_has_key(fd: int, key: bytes, value_size: int = 8) -> bool:
    """Whether a key is present, also for maps whose syscall lookup cannot return the value
    (a sockhash with a 4-byte value answers ENOSPC for a present key)."""
    k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value_size)
    ret = lib().bpf_map_lookup_elem(fd, k, v)
    if ret == -errno_mod.ENOENT:
        return False
    if ret in (0, -errno_mod.ENOSPC):
        return True
    _check("bpf_map_lookup_elem", ret)
    return True


def map_delete(fd: int, key: bytes) -> bool:
    """Delete a key; False when it was not there."""
    ret = lib().bpf_map_delete_elem(fd, ctypes.create_string_buffer(key, len(key)))
    if ret == -errno_mod.ENOENT:
        return False
    _check("bpf_map_delete_elem", ret)
    return True


def map_keys(fd: int, key_size: int) -> list[bytes]:
    """All keys of a hash-like map, read before returning so callers may delete while walking."""
    keys: list[bytes] = []
    cur, nxt = None, ctypes.create_string_buffer(key_size)
    while True:
        ret = lib().bpf_map_get_next_key(fd, cur, nxt)
        if ret == -errno_mod.ENOENT:
            return keys
        _check("bpf_map_get_next_key", ret)
        keys.append(nxt.raw)
        cur = ctypes.create_string_buffer(nxt.raw, key_size)


# ---------------------------------------------------------------------------------------------
# Object info (struct bpf_prog_info / bpf_map_info / bpf_link_info, leading fields only: the kernel
# accepts a shorter struct and fills what fits).


class _ProgInfo(Structure):
    """Up to `verified_insns` (Linux 5.16+; older kernels leave it 0)."""

    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("tag", c_char * 8),
        ("jited_prog_len", c_uint32),
        ("xlated_prog_len", c_uint32),
        ("jited_prog_insns", c_uint64),
        ("xlated_prog_insns", c_uint64),
        ("load_time", c_uint64),
        ("created_by_uid", c_uint32),
        ("nr_map_ids", c_uint32),
        ("map_ids", c_uint64),
        ("name", c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", c_uint32),
        ("gpl_compatible", c_uint32),
        ("netns_dev", c_uint64),
        ("netns_ino", c_uint64),
        ("nr_jited_ksyms", c_uint32),
        ("nr_jited_func_lens", c_uint32),
        ("jited_ksyms", c_uint64),
        ("jited_func_lens", c_uint64),
        ("btf_id", c_uint32),
        ("func_info_rec_size", c_uint32),
        ("func_info", c_uint64),
        ("nr_func_info", c_uint32),
        ("nr_line_info", c_uint32),
        ("line_info", c_uint64),
        ("jited_line_info", c_uint64),
        ("nr_jited_line_info", c_uint32),
        ("line_info_rec_size", c_uint32),
        ("jited_line_info_rec_size", c_uint32),
        ("nr_prog_tags", c_uint32),
        ("prog_tags", c_uint64),
        ("run_time_ns", c_uint64),
        ("run_cnt", c_uint64),
        ("recursion_misses", c_uint64),
        ("verified_insns", c_uint32),
    ]


class _MapInfo(Structure):
    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("key_size", c_uint32),
        ("value_size", c_uint32),
        ("max_entries", c_uint32),
        ("map_flags", c_uint32),
        ("name", c_char * BPF_OBJ_NAME_LEN),
    ]


class _LinkInfo(Structure):
    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("prog_id", c_uint32),
        ("_pad", c_uint32),
        ("cgroup_id", c_uint64),
        ("attach_type", c_uint32),
    ]


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    name: str
    tag: str
    map_ids: tuple[int, ...]
    verified_insns: int  # what the verifier processed (0 before Linux 5.16)


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    name: str
    key_size: int
    value_size: int
    max_entries: int
    flags: int


@dataclass(frozen=True)
class LinkInfo:
    id: int
    type: int
    prog_id: int
    cgroup_id: int | None  # only for cgroup links
    attach_type: int | None


def _info(fd: int, info: Structure, what: str) -> None:
    size = c_uint32(ctypes.sizeof(info))
    _check(
        f"{what} info", lib().bpf_obj_get_info_by_fd(fd, ctypes.addressof(info), ctypes.byref(size))
    )


def prog_info(fd: int) -> ProgInfo:
    info = _ProgInfo()
    _info(fd, info, "program")
    ids = (c_uint32 * info.nr_map_ids)()
    if info.nr_map_ids:
        # Second call asks for the map ids; everything else must be zero again on input.
        again = _ProgInfo(nr_map_ids=info.nr_map_ids, map_ids=ctypes.addressof(ids))
        _info(fd, again, "program")
    return ProgInfo(
        id=info.id,
        type=info.type,
        name=info.name.decode(errors="replace"),
        tag=bytes(info.tag).hex(),
        map_ids=tuple(ids),
        verified_insns=info.verified_insns,
    )


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    _info(fd, info, "map")
    return MapInfo(
        id=info.id,
        type=info.type,
        name=info.name.decode(errors="replace"),
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
        flags=info.map_flags,
    )


def link_info(fd: int) -> LinkInfo:
    info = _LinkInfo()
    _info(fd, info, "link")
    is_cgroup = info.type == BPF_LINK_TYPE_CGROUP
    return LinkInfo(
        id=info.id,
        type=info.type,
        prog_id=info.prog_id,
        cgroup_id=info.cgroup_id if is_cgroup else None,
        attach_type=info.attach_type if is_cgroup else None,
    )


# ---------------------------------------------------------------------------------------------
# Ids, and the last reference to a program array


def _walk_ids(next_id: Callable[[int, Any], int]) -> list[int]:
    out, cur, nxt = [], 0, c_uint32()
    while next_id(cur, ctypes.byref(nxt)) == 0:
        cur = nxt.value
        out.append(cur)
    return out


def map_ids() -> set[int]:
    """The id of every map in the kernel. Walks the id space only: opens no map (opening a
    program array by id is what ProgArrayRef is about)."""
    return set(_walk_ids(lib().bpf_map_get_next_id))


def map_exists(map_id: int) -> bool:
    """Whether map `map_id` is still in the kernel (one step of the id walk: opens nothing)."""
    nxt = c_uint32()
    return lib().bpf_map_get_next_id(map_id - 1, ctypes.byref(nxt)) == 0 and nxt.value == map_id


def prog_ids() -> set[int]:
    return set(_walk_ids(lib().bpf_prog_get_next_id))


def prog_map_ids(prog_id: int) -> tuple[int, ...] | None:
    """The maps a live program uses, None once it is gone. (Opening a program by id is
    harmless: programs have nothing like a map's last-user-reference work.)"""
    fd = lib().bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return None
    try:
        return prog_info(fd).map_ids
    except BpfError:
        return None
    finally:
        os.close(fd)


def programs_using(map_id: int) -> dict[int, set[int]]:
    """Live programs that use map `map_id`: program id -> the other maps it uses."""
    out = {}
    for prog_id in prog_ids():
        used = prog_map_ids(prog_id)
        if used is not None and map_id in used:
            out[prog_id] = set(used) - {map_id}
    return out


PROG_ARRAY_RELEASE_TIMEOUT = 2.0


class ProgArrayRef:
    """An fd meant to be the last user reference to a program array, closed by `close()` only
    once no program holds the array any more.

    Why (kernel/bpf/arraymap.c, 6.18 and current sources alike): when a program array
    loses its last user reference (fd or pin), prog_array_map_clear() takes a reference on the
    map and schedule_work()s the emptying of the array, whose end drops that reference. It does
    not check what schedule_work() returns: if the work is still queued from a previous last
    reference, the reference just taken is never dropped, and the (emptied) array stays in the
    kernel for good, held by nobody: the orphaned `sockpol_next` maps. A "previous last
    reference" is what anyone makes who opens the array by id and closes it again; `bpftool map
    show` does, for every map. Opening by id works for as long as the array exists, which is as
    long as a program that uses it exists (the sk_msg programs go with the sockets' psocks, in
    RCU callbacks and deferred work, about 20 ms after an unload here; longer with traffic or
    on a busy machine). Two such openings within one work's delay, or one within the delay of
    ours, and the array leaks. Holding this fd until those programs and their references to the
    array are gone shrinks that time to the delay of the one work our close queues.
    """

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd
        try:
            self.id = map_info(fd).id
            # The programs that use it, with the other maps each uses: found now, while they
            # are alive (a program leaves the id space before it drops its maps).
            self._users = programs_using(self.id)
        except BpfError as e:
            log.debug("program array fd %d: %s", fd, e)
            self.id, self._users = 0, {}

    def _held_by_programs(self) -> bool:
        """Whether a program may still hold the array: one is still in the id space, or gone
        but none of its other maps has gone yet (it drops them, and the array, in one loop of
        its deferred free; a map that only it held leaves the id space there)."""
        if programs_using(self.id):
            return True
        return any(others and all(map_exists(i) for i in others) for others in self._users.values())

    def close(self, timeout: float = PROG_ARRAY_RELEASE_TIMEOUT) -> bool:
        """Wait (at most `timeout`) until no program holds the array, close the fd, and wait
        (within the same bound) for the array to leave the kernel. True if it did."""
        if self.fd is None:
            return True
        deadline = time.monotonic() + timeout
        try:
            while self.id and self._held_by_programs():
                if time.monotonic() > deadline:
                    log.debug("program array %d: still held by a program; closing anyway", self.id)
                    break
                time.sleep(0.005)
        finally:
            os.close(self.fd)
            self.fd = None
            # That close queued the kernel's emptying work: until it has run, an opening by
            # id still leaks the array. Let it have this CPU now, not after our time slice.
            os.sched_yield()
        while map_exists(self.id):  # never opened again: only the id space is read
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def __del__(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
