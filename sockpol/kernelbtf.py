"""The running kernel's own type information (`/sys/kernel/btf/vmlinux`): struct member offsets
and enum values, for the LSM backend (codegen/lsm.py), whose program reads kernel structs
(`struct socket`, `struct msghdr`, `struct iov_iter`) whose layout changes between versions.

The loader resolves the few offsets the program needs here and writes them into the object's
`.rodata` before the kernel verifies it (runtime/loader.py); the compiler uses the same when it
runs on the kernel it compiles for, so the object's defaults fit there. Why not CO-RE
relocations: docs/design.md, "The LSM backend". A reader of the BTF format (kernel
Documentation/bpf/btf.rst) of about a hundred lines: structs, unions, enums, typedefs; nothing
else of sockpol, so every layer may use it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")
_MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")
_TYPE = struct.Struct("<III")
# kinds
_INT, _PTR, _ARRAY, _STRUCT, _UNION, _ENUM, _FWD, _TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
_VOLATILE, _CONST, _RESTRICT, _FUNC, _FUNC_PROTO, _VAR, _DATASEC = 9, 10, 11, 12, 13, 14, 15
_FLOAT, _DECL_TAG, _TYPE_TAG, _ENUM64 = 16, 17, 18, 19
_MODIFIERS = (_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG)


class BtfError(Exception):
    pass


@dataclass(frozen=True)
class _Type:
    kind: int
    name: str
    size_or_type: int
    kind_flag: bool
    members: tuple[tuple[str, int, int], ...]  # struct/union: (name, type id, bit offset)
    values: tuple[tuple[str, int], ...]  # enum: (name, value)


class KernelBtf:
    def __init__(self, data: bytes) -> None:
        if len(data) < _HEADER.size:
            raise BtfError("BTF too short")
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = (
            _HEADER.unpack_from(data)
        )
        if magic != _MAGIC:
            raise BtfError(f"not BTF (magic {magic:#x})")
        strings = data[hdr_len + str_off : hdr_len + str_off + str_len]

        def name(off: int) -> str:
            end = strings.index(b"\0", off)
            return strings[off:end].decode()

        self.types: list[_Type | None] = [None]  # type id 0 is void
        self.by_name: dict[tuple[int, str], int] = {}
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        while pos < end:
            name_off, info, size_or_type = _TYPE.unpack_from(data, pos)
            pos += _TYPE.size
            kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, bool(info >> 31)
            members: tuple = ()
            values: tuple = ()
            if kind in (_STRUCT, _UNION):
                members = tuple(
                    (name(n), t, o)
                    for n, t, o in (
                        struct.unpack_from("<III", data, pos + 12 * i) for i in range(vlen)
                    )
                )
                pos += 12 * vlen
            elif kind == _ENUM:
                values = tuple(
                    (name(n), v)
                    for n, v in (struct.unpack_from("<Ii", data, pos + 8 * i) for i in range(vlen))
                )
                pos += 8 * vlen
            elif kind == _ENUM64:
                values = tuple(
                    (name(n), lo | hi << 32)
                    for n, lo, hi in (
                        struct.unpack_from("<III", data, pos + 12 * i) for i in range(vlen)
                    )
                )
                pos += 12 * vlen
            elif kind in (_INT, _VAR, _DECL_TAG):
                pos += 4
            elif kind == _ARRAY:
                pos += 12
            elif kind == _FUNC_PROTO:
                pos += 8 * vlen
            elif kind == _DATASEC:
                pos += 12 * vlen
            elif kind not in (_PTR, _FWD, *_MODIFIERS, _FUNC, _FLOAT):
                raise BtfError(f"unknown BTF kind {kind}")
            t = _Type(kind, name(name_off), size_or_type, kflag, members, values)
            self.by_name.setdefault((kind, t.name), len(self.types))
            self.types.append(t)

    def _resolve(self, type_id: int) -> _Type | None:
        t = self.types[type_id]
        while t is not None and t.kind in _MODIFIERS:
            t = self.types[t.size_or_type]
        return t

    def struct(self, name: str) -> int:
        for kind in (_STRUCT, _UNION):
            if (kind, name) in self.by_name:
                return self.by_name[(kind, name)]
        raise BtfError(f"no struct {name} in the kernel's BTF")

    def size(self, name: str) -> int:
        t = self.types[self.struct(name)]
        assert t is not None
        return t.size_or_type

    def offset(self, struct_name: str, *members: str) -> int | None:
        """Byte offset of the first of `members` that `struct_name` has (looking inside its
        anonymous structs and unions), None when it has none of them."""
        for member in members:
            found = self._find(self.struct(struct_name), member)
            if found is not None:
                return found // 8
        return None

    def _find(self, type_id: int, member: str) -> int | None:
        t = self._resolve(type_id)
        if t is None or t.kind not in (_STRUCT, _UNION):
            return None
        for name, mtype, off in t.members:
            bits = off & 0xFFFFFF if t.kind_flag else off
            if name == member:
                return bits
            if not name:
                inner = self._find(mtype, member)
                if inner is not None:
                    return bits + inner
        return None

    def enum_value(self, enum: str, name: str) -> int | None:
        for kind in (_ENUM, _ENUM64):
            type_id = self.by_name.get((kind, enum))
            if type_id is not None:
                t = self.types[type_id]
                assert t is not None
                return dict(t.values).get(name)
        return None


@cache
def running_kernel() -> KernelBtf:
    try:
        return KernelBtf(VMLINUX.read_bytes())
    except OSError as e:
        raise BtfError(f"cannot read {VMLINUX}: {e.strerror}") from None


# What the LSM program reads of the kernel's structs: the `.rodata` of an LSM object is these
# u32 values, in this order (codegen/lsm.py reads them, the loader writes them).
LAYOUT_FIELDS = (
    "socket_sk",  # struct socket: sk
    "msghdr_iter",  # struct msghdr: msg_iter (an embedded struct iov_iter)
    "iter_type",  # struct iov_iter: iter_type (u8)
    "iter_offset",  # iov_offset
    "iter_count",  # count
    "iter_ptr",  # ubuf / __iov (6.4+), iov (6.0..6.3): one union
    "iter_nr_segs",  # nr_segs
    "iter_ubuf",  # enum iter_type: ITER_UBUF (255 when the kernel has none)
    "iter_iovec",  # ITER_IOVEC
)
ITER_BYTES = 64  # bytes of struct iov_iter the program copies (it is 40 to 48 bytes)


def lsm_layout(btf: KernelBtf) -> dict[str, int]:
    """The offsets and values of LAYOUT_FIELDS for the kernel `btf` describes."""

    def need(value: int | None, what: str) -> int:
        if value is None:
            raise BtfError(f"the kernel's BTF has no {what}")
        return value

    out = {
        "socket_sk": need(btf.offset("socket", "sk"), "socket.sk"),
        "msghdr_iter": need(btf.offset("msghdr", "msg_iter"), "msghdr.msg_iter"),
        "iter_type": need(btf.offset("iov_iter", "iter_type"), "iov_iter.iter_type"),
        "iter_offset": need(btf.offset("iov_iter", "iov_offset"), "iov_iter.iov_offset"),
        "iter_count": need(btf.offset("iov_iter", "count"), "iov_iter.count"),
        "iter_ptr": need(btf.offset("iov_iter", "__iov", "iov", "ubuf"), "iov_iter.__iov"),
        "iter_nr_segs": need(btf.offset("iov_iter", "nr_segs"), "iov_iter.nr_segs"),
        "iter_ubuf": btf.enum_value("iter_type", "ITER_UBUF"),
        "iter_iovec": need(btf.enum_value("iter_type", "ITER_IOVEC"), "ITER_IOVEC"),
    }
    if out["iter_ubuf"] is None:
        out["iter_ubuf"] = 255
    for name in ("iter_type", "iter_offset", "iter_count", "iter_ptr", "iter_nr_segs"):
        if out[name] + 8 > ITER_BYTES:
            raise BtfError(f"iov_iter.{name} at {out[name]}: beyond the {ITER_BYTES} bytes read")
    return out


def layout_bytes(layout: dict[str, int]) -> bytes:
    return struct.pack(f"<{len(LAYOUT_FIELDS)}I", *(layout[f] for f in LAYOUT_FIELDS))
