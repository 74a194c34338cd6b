"""Read a loaded policy's counters and mode from its pins; switch its mode.

The counters are a per-CPU array (`map_sockpol_counts`, layout in sockpol/telemetry.py): each
CPU adds to its own copy without atomics, and a reader sums the copies. Slots are numbered by the
layout recorded in the policy's metadata, so this reads objects compiled by older versions too.

The mode lives in a one-entry array (`map_sockpol_ctl`) that the kernel program reads on every
run: writing it switches a loaded policy between enforce and dry-run at once, for every
connection, without loading anything.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sockpol import telemetry as t
from sockpol.contract import Reason, reason_slug
from sockpol.diagnostics import SockpolError
from sockpol.metadata import PolicyMetadata
from sockpol.runtime import libbpf, pins
from sockpol.runtime.system import check_privileges

COUNTS_PIN = pins.map_pin_name(t.COUNTS_MAP)
EVENTS_PIN = pins.map_pin_name(t.EVENTS_MAP)
CTL_PIN = pins.map_pin_name(t.CTL_MAP)
_KEY = struct.Struct("<I")


class TelemetryError(SockpolError):
    """A policy's counters, events or mode could not be read or changed."""


@dataclass(frozen=True)
class Count:
    requests: int = 0
    bytes: int = 0

    def __add__(self, other: Count) -> Count:
        return Count(self.requests + other.requests, self.bytes + other.bytes)


@dataclass(frozen=True)
class PolicyCounters:
    """A policy's counters, summed over CPUs. Bytes are what each verdict covered: a request's
    head and body (chunked bodies added chunk by chunk), or the send that was refused."""

    rules: list[Count]  # by rule index: requests the rule decided, whatever its action
    default: Count  # requests no rule matched
    refused: dict[str, Count] = field(default_factory=dict)  # by reason name
    would_refuse: dict[str, Count] = field(default_factory=dict)  # passed by dry-run or audit
    unjudged: Count = Count()  # sends passed on dry-run connections that lost their framing
    lost_events: int = 0
    # Refusals answered with a response (`answer`): requests answered; bytes discarded (the
    # refused sends and every send after them on those connections). Refused minus answered
    # were dropped.
    answered: Count = Count()

    def to_json(self) -> dict:
        def c(x: Count) -> dict:
            return {"requests": x.requests, "bytes": x.bytes}

        return {
            "rules": [c(x) for x in self.rules],
            "default": c(self.default),
            "refused": {k: c(v) for k, v in self.refused.items()},
            "would_refuse": {k: c(v) for k, v in self.would_refuse.items()},
            "unjudged": c(self.unjudged),
            "lost_events": self.lost_events,
            "answered": c(self.answered),
        }


def _layout(meta: PolicyMetadata | None) -> dict:
    recorded = meta.telemetry if meta is not None else {}
    return {**t.layout(), **recorded}


@contextmanager
def _pin(pin_dir: Path, name: str) -> Iterator[int]:
    path = pin_dir / name
    if not path.exists():
        raise TelemetryError(
            f"{pin_dir.name}: no {name} pin (loaded by a sockpol without counters and events?)"
        )
    fd = libbpf.obj_get(str(path))
    try:
        yield fd
    finally:
        os.close(fd)


def read_counters(pin_dir: Path, meta: PolicyMetadata | None) -> PolicyCounters:
    """Every counter of the policy pinned at `pin_dir` (meta: its metadata, for rules/layout)."""
    layout = _layout(meta)
    with _pin(pin_dir, COUNTS_PIN) as fd:
        info = libbpf.map_info(fd)
        slots = [_slot_total(fd, s, info.value_size) for s in range(info.max_entries)]

    def slot(i: int) -> Count:
        return slots[i] if 0 <= i < len(slots) else Count()

    nrules = len(meta.rules) if meta is not None else 0
    rule_base = layout["slot_rules"]
    refused, would = {}, {}
    for reason in Reason:
        if reason is Reason.NONE:
            continue
        r = slot(layout["slot_refused"] + reason)
        w = slot(layout["slot_would_refuse"] + reason)
        if r.requests or r.bytes:
            refused[reason_slug(reason)] = r
        if w.requests or w.bytes:
            would[reason_slug(reason)] = w
    return PolicyCounters(
        rules=[slot(rule_base + i) for i in range(nrules)],
        default=slot(layout["slot_default"]),
        refused=refused,
        would_refuse=would,
        unjudged=slot(layout["slot_unjudged"]),
        lost_events=slot(layout["slot_lost"]).requests,
        # Objects compiled before answers record no slot: nothing was answered.
        answered=slot(layout["slot_answered"]) if "slot_answered" in layout else Count(),
    )


def lost_events(pin_dir: Path, meta: PolicyMetadata | None) -> int:
    """Just the lost-events counter (what `sockpol events` polls)."""
    slot = _layout(meta)["slot_lost"]
    with _pin(pin_dir, COUNTS_PIN) as fd:
        return _slot_total(fd, slot, libbpf.map_info(fd).value_size).requests


def _slot_total(fd: int, slot: int, value_size: int) -> Count:
    """One counter slot, summed over the CPUs."""
    total = Count()
    for value in libbpf.map_lookup_percpu(fd, _KEY.pack(slot), value_size) or []:
        total += Count(*t.COUNTER.unpack_from(value))
    return total


def reset_counters(pin_dir: Path) -> None:
    """Zero every counter (e.g. when a reload gives the rule slots new meanings)."""
    with _pin(pin_dir, COUNTS_PIN) as fd:
        info = libbpf.map_info(fd)
        zero = bytes((info.value_size + 7) // 8 * 8 * libbpf.num_possible_cpus())
        for slot in range(info.max_entries):
            libbpf.map_update(fd, _KEY.pack(slot), zero)


# ---------------------------------------------------------------------------------------------
# mode


def read_mode(pin_dir: Path) -> str:
    with _pin(pin_dir, CTL_PIN) as fd:
        return read_mode_fd(fd)


def read_mode_fd(fd: int) -> str:
    value = libbpf.map_lookup(fd, _KEY.pack(0), t.CTL.size)
    mode = t.CTL.unpack(value)[0] if value is not None else t.MODE_ENFORCE
    return t.MODE_NAMES.get(mode, f"mode-{mode}")


def _read_ctl(fd: int) -> tuple[int, int, int]:
    """(mode, serial, answers_off) of an open control map. Writers keep the fields they do not
    set, and hold the pin root's lock (load, reload, `sockpol mode`)."""
    value = libbpf.map_lookup(fd, _KEY.pack(0), t.CTL.size)
    return t.CTL.unpack(value) if value is not None else (t.MODE_ENFORCE, 0, 0)


def write_mode(fd: int, mode: str) -> None:
    """Set the mode in an open control map (the loader uses this before attaching). The serial
    beside it is kept: callers hold the pin root's lock, the only other writer's."""
    if mode not in t.MODES:
        raise TelemetryError(f"unknown mode {mode!r}: expected enforce or dry-run")
    _, serial, answers_off = _read_ctl(fd)
    libbpf.map_update(fd, _KEY.pack(0), t.CTL.pack(t.MODES[mode], serial, answers_off))


def write_mode_at(pin_dir: Path, mode: str) -> None:
    """Set the mode of the policy pinned at `pin_dir`; the caller holds the pin root's lock
    (reload does; `set_mode` takes it)."""
    with _pin(pin_dir, CTL_PIN) as fd:
        write_mode(fd, mode)


def read_serial_fd(fd: int) -> int:
    """The serial of the version in force (0: none yet, or a policy from before serials)."""
    return _read_ctl(fd)[1]


def write_serial(fd: int, serial: int) -> None:
    """Make version `serial` the one in force: runs of older versions hand over to the program
    in the program array (emit.handover). The mode and answers_off beside it are kept."""
    mode, _, answers_off = _read_ctl(fd)
    libbpf.map_update(fd, _KEY.pack(0), t.CTL.pack(mode, serial, answers_off))


def write_answers_off(fd: int, off: bool) -> None:
    """Turn answers off (the kernel cannot redirect a response to the sender: refusals are then
    dropped) or on, in an open control map; the mode and the serial are kept."""
    mode, serial, _ = _read_ctl(fd)
    libbpf.map_update(fd, _KEY.pack(0), t.CTL.pack(mode, serial, int(off)))


def read_answers_off(pin_dir: Path) -> bool:
    with _pin(pin_dir, CTL_PIN) as fd:
        return bool(_read_ctl(fd)[2])


def set_mode(name: str, mode: str) -> str:
    """Switch loaded policy `name` to `mode`; returns the mode it had. Takes effect with the
    next message on every connection; nothing is reloaded."""
    if mode not in t.MODES:
        raise TelemetryError(f"unknown mode {mode!r}: expected enforce or dry-run")
    check_privileges()
    pin_dir = policy_dir(name)
    with pins.locked(pin_dir.parent), _pin(pin_dir, CTL_PIN) as fd:
        before = read_mode_fd(fd)
        write_mode(fd, mode)
    return before


def policy_dir(name: str) -> Path:
    root = pins.pin_root(create=False)
    if not pins.valid_name(name) or root is None or not (root / name).is_dir():
        raise TelemetryError(f"no policy named {name!r} is loaded (see sockpol status)")
    return root / name
