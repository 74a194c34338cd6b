"""Hot reload: swap a loaded policy's tables without touching programs, maps or connections.

The program's `.data` map (pinned as `map_sockpol_data`) holds two table slots and a generation
word (see codegen/emit.py). Every run of the program reads the generation once and uses that slot
throughout. A reload:

1. waits for an RCU grace period (membarrier(MEMBARRIER_CMD_GLOBAL) runs synchronize_rcu()): the
   sk_msg program runs inside rcu_read_lock(), so after it no run that started before the previous
   flip can still be reading the idle slot;
2. writes the new tables into the idle slot through a shared mapping of the map (BPF_F_MMAPABLE,
   which libbpf sets on `.data`);
3. flips the generation with one aligned 32-bit store.

A run sees either the old tables or the new ones, never a mix; established connections get the
new policy from their next request; no socket is touched. The new policy must fit the loaded
program's table shape (its code has the masks and offsets baked in), govern the same ports
(the sock_ops program has them as constants); otherwise `sockpol load` must replace the
program. The `tls` statement is a table value and may change: connections past their handshake
stay HTTP, new ones follow the new statement. A policy with `tls` is refused, before anything
is touched, on a kernel that cannot run policies on kTLS sockets (as `load` does).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from sockpol.contract import MEMBARRIER_CMD_GLOBAL, TABLES_SYMBOL, sys_membarrier
from sockpol.diagnostics import SockpolError
from sockpol.metadata import PolicyMetadata, read_metadata
from sockpol.runtime import libbpf, pins
from sockpol.runtime.counters import COUNTS_PIN, reset_counters
from sockpol.runtime.state import create_state_map, read_state
from sockpol.runtime.system import check_privileges

DATA_MAP_PIN = pins.MAP_PREFIX + "sockpol_data"
GEN_SIZE = 8  # the u32 generation, padded to the tables' 8-byte alignment


class ReloadError(SockpolError):
    pass


@dataclass(frozen=True)
class ReloadResult:
    name: str
    generation: int
    rules: int
    seconds: float


def _initial_tables(obj: Path) -> bytes:
    """Slot 0 of the object's `sockpol_tables` (both slots start equal)."""
    from elftools.elf.elffile import ELFFile  # only reload needs it, not every runtime command

    with obj.open("rb") as f:
        elf = ELFFile(f)
        symtab = elf.get_section_by_name(".symtab")
        sym = symtab.get_symbol_by_name(TABLES_SYMBOL) if symtab else None
        if not sym:
            raise ReloadError(f"reload: {obj}: no {TABLES_SYMBOL}; not a sockpol object")
        section = elf.get_section(sym[0]["st_shndx"])
        data = section.data()[sym[0]["st_value"] : sym[0]["st_value"] + sym[0]["st_size"]]
    slot = (len(data) - GEN_SIZE) // 2
    return data[:slot]


def _grace_period() -> None:
    number = sys_membarrier()
    if number is None:  # fail safe: no flip without knowing the old tables are unread
        raise ReloadError(f"reload: no membarrier system call number for {os.uname().machine}")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(number, MEMBARRIER_CMD_GLOBAL, 0, 0) != 0:
        err = ctypes.get_errno()
        raise ReloadError(f"reload: membarrier failed: {os.strerror(err)}")


def _check_compatible(old: PolicyMetadata, new: PolicyMetadata) -> None:
    if new.shape != old.shape:
        raise ReloadError(
            "reload: the new object's table shape differs from the loaded program's; "
            "compile it for this program (sockpol reload NAME FILE.pol does) or replace the "
            "program with sockpol load"
        )
    if new.ports != old.ports:
        raise ReloadError(
            f"reload: the governed ports changed ({old.ports} -> {new.ports}); ports are part "
            "of the sock_ops program, replace it with sockpol load"
        )


def swap_tables(pin_dir: Path, tables: bytes) -> int:
    """Write `tables` into the idle slot and make it current; returns the new generation."""
    fd = libbpf.obj_get(str(pin_dir / DATA_MAP_PIN))
    try:
        info = libbpf.map_info(fd)
        if info.value_size != 2 * len(tables) + GEN_SIZE:
            raise ReloadError(
                f"reload: table size {len(tables)} does not fit the loaded program's "
                f"({(info.value_size - GEN_SIZE) // 2})"
            )
        length = (info.value_size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            region = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise ReloadError(f"reload: cannot map the tables ({e.strerror})") from None
        try:
            gen_word = ctypes.c_uint32.from_buffer(region, 2 * len(tables))
            current = gen_word.value & 1
            idle = current ^ 1
            _grace_period()
            region[idle * len(tables) : (idle + 1) * len(tables)] = tables
            # x86 keeps stores in order: the slot is complete before the flip is visible.
            gen_word.value = idle
            del gen_word  # release the buffer export before closing the mapping
        finally:
            region.close()
        return idle
    finally:
        os.close(fd)


def reload(name: str, obj_path: str | os.PathLike[str], check_tls: bool = True) -> ReloadResult:
    """Swap the tables of loaded policy `name` for those of the compiled object `obj_path`.
    `check_tls`: as for `load`."""
    started = time.monotonic()
    check_privileges()
    root = pins.pin_root(create=False)
    if root is None or not (root / name).is_dir():
        raise ReloadError(f"reload: no policy named {name!r} is loaded (see sockpol status)")
    obj = Path(obj_path)
    new_meta = read_metadata(obj)
    if check_tls:
        from sockpol.runtime.loader import LoadError, require_tls_support

        try:
            require_tls_support(new_meta, name, "nothing was changed")
        except LoadError as e:
            raise ReloadError("reload: " + e.message) from None
    tables = _initial_tables(obj)
    with pins.locked(root):
        pin_dir = root / name
        state_fd = libbpf.obj_get(str(pin_dir / pins.PIN_STATE))
        try:
            state = read_state(state_fd)
        finally:
            os.close(state_fd)
        _check_compatible(state.policy_metadata(), new_meta)
        new_state = replace(
            state,
            object_path=str(obj.resolve()),
            object_sha256=hashlib.sha256(obj.read_bytes()).hexdigest(),
            metadata=json.loads(new_meta.to_json()),
            reloaded_at=time.time(),
            reloads=state.reloads + 1,
        )
        # The new record exists before the tables flip, so a failure to make it changes nothing.
        state_fd = create_state_map(new_state)
        try:
            generation = swap_tables(pin_dir, tables)
            # Counter slots are per rule index; after a reload the indexes name other rules, so
            # the counts start again (the mode, a runtime switch, is kept as it is).
            if (pin_dir / COUNTS_PIN).exists():
                reset_counters(pin_dir)
            _replace_state(pin_dir, state_fd)
        finally:
            os.close(state_fd)
    return ReloadResult(name, generation, len(new_meta.rules), time.monotonic() - started)


def _replace_state(pin_dir: Path, fd: int) -> None:
    """Pin the new record (map `fd`) beside the old one, then rename it over (bpffs renames
    atomically); a failure leaves no staged pin behind."""
    staged = pin_dir / (pins.PIN_STATE + "-new")
    if staged.exists():
        staged.unlink()
    libbpf.obj_pin(fd, str(staged))
    try:
        os.rename(staged, pin_dir / pins.PIN_STATE)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
