"""Reload: put another policy in force for a loaded name, on every connection, at any time.

Two ways, chosen by what the loaded program can take (`_swappable`):

**Tables swap** (same table shape and layout, and ports: the program's code has the shape's
masks and offsets, sock_ops has the ports). The program's `.data` map (pinned as `map_sockpol_data`)
holds two table slots, a generation word and the program's serial (tables.Tables). Every run
reads the generation once and uses that slot throughout. A swap:

1. waits for an RCU grace period (membarrier(MEMBARRIER_CMD_GLOBAL) runs synchronize_rcu()): the
   sk_msg program runs inside rcu_read_lock(), so after it no run that started before the previous
   flip can still be reading the idle slot;
2. writes the new tables into the idle slot through a shared mapping of the map (BPF_F_MMAPABLE,
   which libbpf sets on `.data`);
3. makes those stores visible everywhere before the next (`_store_barrier`: on arm64 they could
   otherwise be seen after the flip);
4. flips the generation with one aligned 32-bit store.

**Replacement** (anything else: more rules than the shape holds, larger automata, other ports):
`loader.load` loads the new object beside the old, sharing the connections' storage, and hands
every open connection over (emit.handover: older programs tail-call the newest once the control
map's serial names it). The old version stays in force if anything fails.

Either way a request is judged by the old policy or the new one, never a mix (a run reads the
generation, or the serial, once), established connections get the new policy from their next
request, and no socket is touched. The `tls` statement and the mode are table or control data.
A policy with `tls` is refused, before anything is touched, on a kernel that cannot run policies
on kTLS sockets (as `load` does).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from sockpol.contract import (
    MEMBARRIER_CMD_GLOBAL,
    MEMBARRIER_CMD_GLOBAL_EXPEDITED,
    TABLES_SYMBOL,
    sys_membarrier,
)
from sockpol.diagnostics import SockpolError
from sockpol.metadata import PolicyMetadata, read_metadata
from sockpol.runtime import libbpf, pins
from sockpol.runtime.counters import COUNTS_PIN, CTL_PIN, read_mode, reset_counters, write_mode_at
from sockpol.runtime.datamap import data_region
from sockpol.runtime.state import PolicyState, create_state_map, read_state
from sockpol.runtime.system import check_privileges

DATA_MAP_PIN = pins.MAP_PREFIX + "sockpol_data"
GEN_SIZE = 8  # the u32 generation, padded to the tables' 8-byte alignment


class ReloadError(SockpolError):
    pass


@dataclass(frozen=True)
class ReloadResult:
    name: str
    generation: int | None  # the tables slot now in use (a swap), None for a replacement
    rules: int
    seconds: float
    serial: int  # the version in force (state.PolicyState.serial)
    replaced: bool = False  # programs replaced, connections handed over (not a tables swap)


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


def _membarrier(cmd: int) -> None:
    number = sys_membarrier()
    if number is None:  # fail safe: no flip without knowing the old tables are unread
        raise ReloadError(f"reload: no membarrier system call number for {os.uname().machine}")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(number, cmd, 0, 0) != 0:
        err = ctypes.get_errno()
        raise ReloadError(f"reload: membarrier failed: {os.strerror(err)}")


def _grace_period() -> None:
    """No run that started before the previous flip still reads the idle slot after this."""
    _membarrier(MEMBARRIER_CMD_GLOBAL)


def _store_barrier() -> None:
    """The stores made so far reach every CPU before the stores made after (a full barrier).
    Python has no fence, and on a weakly ordered CPU (arm64) the flip's store could otherwise
    become visible before some of the slot's: the kernel's membarrier runs smp_mb() on the
    calling CPU at the entry and the exit of every expedited command (kernel/sched/membarrier.c);
    with no process registered for it, that is all this one does (microseconds, no grace
    period). The readers need nothing: a run computes the slot's address from the generation it
    loaded, and dependent loads are ordered on every CPU Linux runs BPF on."""
    _membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED)


def _swappable(old: PolicyMetadata, new: PolicyMetadata) -> bool:
    """Can the loaded program take the new tables as they are? Its code has the table shape
    (masks, offsets) and the sock_ops program the ports; anything else is table data. The side
    is the program itself (sk_msg or sk_skb): a reload across sides is refused (loader)."""
    # Never on the lsm backend: its program is sleepable, and runs under rcu_read_lock_trace(),
    # whose grace period user space cannot wait for; a replacement needs none (each version
    # reads its own tables, the old steps aside once the new serial is in force: lsm.py).
    if new.backend == "lsm" or old.backend == "lsm":
        return False
    # An object of another sockpol version may lay the same shape out otherwise (the layout
    # of `trans` changed in issue 19): then the program is replaced instead.
    same_code = new.shape == old.shape and new.table_layout == old.table_layout
    return same_code and new.ports == old.ports and new.side == old.side


def swap_tables(pin_dir: Path, tables: bytes) -> int:
    """Write `tables` into the idle slot and make it current; returns the new generation."""
    fd = libbpf.obj_get(str(pin_dir / DATA_MAP_PIN))
    try:
        with data_region(fd) as (region, size):
            if size != 2 * len(tables) + GEN_SIZE:
                raise ReloadError(
                    f"reload: table size {len(tables)} does not fit the loaded program's "
                    f"({(size - GEN_SIZE) // 2})"
                )
            gen_word = ctypes.c_uint32.from_buffer(region, 2 * len(tables))
            current = gen_word.value & 1
            idle = current ^ 1
            _grace_period()
            region[idle * len(tables) : (idle + 1) * len(tables)] = tables
            _store_barrier()  # the slot is complete, on every CPU, before the flip
            gen_word.value = idle
            del gen_word  # release the buffer export before closing the mapping
        return idle
    finally:
        os.close(fd)


def reload(name: str, obj_path: str | os.PathLike[str], check_tls: bool = True) -> ReloadResult:
    """Put the policy of the compiled object `obj_path` in force for loaded policy `name`, on
    every connection from its next message on. When the loaded program can take its tables
    (same table shape, same ports), they are swapped in place; otherwise the programs are
    replaced and every open connection handed over to the new one (loader.load). Either way
    nothing changes if anything fails. The mode: the new policy's when it declares another than
    the loaded one did, else the one in force (`sockpol mode` switches are kept).
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
    with pins.locked(root):
        state = _read_state(root / name)
        old_meta = state.policy_metadata()
        if new_meta.mode != old_meta.mode or not (root / name / CTL_PIN).exists():
            mode = new_meta.mode
        else:
            mode = read_mode(root / name)
        if _swappable(old_meta, new_meta):
            generation = _swap(root / name, state, obj, new_meta, mode)
            return ReloadResult(
                name, generation, len(new_meta.rules), time.monotonic() - started, state.serial
            )
    from sockpol.runtime.loader import LoadError, load

    try:
        loaded = load(obj, state.cgroup, name=name, mode=mode, check_tls=False, reload_of=state)
    except LoadError as e:
        raise ReloadError(f"reload: {e}; the policy in force is unchanged") from None
    loaded.close()
    serial = _read_state(root / name).serial
    return ReloadResult(
        name, None, len(new_meta.rules), time.monotonic() - started, serial, replaced=True
    )


def _read_state(pin_dir: Path) -> PolicyState:
    state_fd = libbpf.obj_get(str(pin_dir / pins.PIN_STATE))
    try:
        return read_state(state_fd)
    finally:
        os.close(state_fd)


def _swap(pin_dir: Path, state: PolicyState, obj: Path, meta: PolicyMetadata, mode: str) -> int:
    """The tables of `obj` into the loaded program (the caller holds the pin root's lock)."""
    tables = _initial_tables(obj)
    new_state = replace(
        state,
        object_path=str(obj.resolve()),
        object_sha256=hashlib.sha256(obj.read_bytes()).hexdigest(),
        metadata=json.loads(meta.to_json()),
        reloaded_at=time.time(),
        reloads=state.reloads + 1,
    )
    # The new record exists before the tables flip, so a failure to make it changes nothing.
    state_fd = create_state_map(new_state)
    try:
        generation = swap_tables(pin_dir, tables)
        # Counter slots are per rule index; after a reload the indexes name other rules, so
        # the counts start again with the version (status says since when).
        if (pin_dir / COUNTS_PIN).exists():
            reset_counters(pin_dir)
        if (pin_dir / CTL_PIN).exists() and read_mode(pin_dir) != mode:
            write_mode_at(pin_dir, mode)
        _replace_state(pin_dir, state_fd)
    finally:
        os.close(state_fd)
    return generation


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
