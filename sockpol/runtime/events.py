"""Read loaded policies' events from their pinned ring buffers (`sockpol events`).

The kernel program writes one record (`telemetry.EVENT`) per refused request, per request it
would refuse (dry-run, audit rules) and per request passed by a rule marked `log`. It never waits
for room: when the ring buffer is full the event is dropped and the policy's lost-events counter
goes up, so a slow or absent reader can never slow or block traffic. `EventStream` follows any
number of policies, notices policies loaded, replaced or unloaded while it runs, and reports lost
events as they are counted.

One reader per policy at a time: a ring buffer has one consumer position, so two readers would
each see part of the events.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from sockpol import telemetry as t
from sockpol.contract import reason_slug
from sockpol.metadata import PolicyMetadata
from sockpol.runtime import libbpf, pins
from sockpol.runtime.counters import (
    EVENTS_PIN,
    TelemetryError,
    lost_events,
    policy_dir,
)
from sockpol.runtime.state import StateError, read_state


@dataclass(frozen=True)
class Event:
    """One event, decoded. `src` is the sending (client) side, `dst` the server, on either side
    of a policy (egress: `src` is governed; ingress: `dst` is). For an ingress policy `pid`,
    `tid` and `cgroup_id` are the task the receive path interrupted, not the server."""

    policy: str
    time: datetime  # wall clock (UTC), converted from the kernel's CLOCK_MONOTONIC stamp
    verdict: str  # refused, dry-run, audit, logged
    reason: str | None  # why it was (or would have been) refused; None for logged
    rule: int | None  # the deciding rule's index, None for the default or a refusal before rules
    line: int | None  # that rule's line in the policy source
    pid: int  # process (thread group) id of the sender
    tid: int  # its thread id
    cgroup_id: int
    src: str
    sport: int
    dst: str
    dport: int
    method: str
    method_cut: bool  # longer than telemetry.METHOD_BYTES; `method` is its start
    host: str | None  # the Host header's value, None when the head had none (or was no head)
    host_cut: bool
    path: str  # the canonical path's first telemetry.PATH_BYTES bytes
    path_len: int  # the whole canonical path's length
    size: int  # bytes in the message the program judged
    time_ns: int  # the kernel's stamp (CLOCK_MONOTONIC), for ordering
    # A refusal answered with a response (`answer`): its HTTP status; None: dropped (the send
    # failed), or not a refusal.
    answer: int | None = None

    @property
    def path_cut(self) -> bool:
        return self.path_len > t.PATH_BYTES

    def to_json(self) -> dict:
        out = asdict(self)
        out["type"] = "event"
        out["time"] = self.time.isoformat(timespec="microseconds").replace("+00:00", "Z")
        out["path_cut"] = self.path_cut
        return out

    def text(self) -> str:
        when = self.time.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if self.rule is not None:  # a rule decided (deny, audit, log)
            cause = f"rule {self.rule}" + (f" (line {self.line})" if self.line else "")
        else:  # the default, or a refusal before any rule: its reason
            cause = self.reason or "-"
        if self.answer:
            cause += f", answered {self.answer}"
        cut = "..."
        method = self.method + (cut if self.method_cut else "")
        host = (self.host or "-") + (cut if self.host_cut else "")
        path = self.path + (cut if self.path_cut else "")
        return (
            f"{when} {self.policy} {self.verdict} {cause}: {method} {host} {path} "
            f"[{_endpoint(self.src, self.sport)} -> {_endpoint(self.dst, self.dport)} "
            f"pid {self.pid} cgroup {self.cgroup_id}]"
        )


@dataclass(frozen=True)
class Lost:
    """Events the kernel had to drop (ring buffer full) since the last report."""

    policy: str
    count: int
    total: int

    def to_json(self) -> dict:
        return {"type": "lost", "policy": self.policy, "count": self.count, "total": self.total}

    def text(self) -> str:
        return f"{self.policy}: lost {self.count} events (ring buffer full; {self.total} in all)"


def _endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _port(raw: int) -> int:
    """sk_msg_md.remote_port: the network-order port, in the upper 16 bits on little-endian
    kernels (the same ctx rewrite as sock_ops), else in the lower."""
    be = raw >> 16 if raw >> 16 else raw & 0xFFFF
    return socket.ntohs(be)


def _text(raw: bytes, length: int, room: int) -> tuple[str, bool]:
    """A copied field: its bytes (control and non-ASCII bytes as \\xNN, so a hostile request
    cannot write escape sequences to an operator's terminal), and whether it was cut."""
    data = raw[: min(length, room)]
    text = "".join(chr(c) if 0x20 <= c < 0x7F and c != 0x5C else f"\\x{c:02x}" for c in data)
    return text, length > room


def decode(policy: str, data: bytes, meta: PolicyMetadata | None, clock_offset_ns: int) -> Event:
    """One ring buffer record of `policy` (meta: its metadata, for rule lines)."""
    data = bytes(data).ljust(t.EVENT.size, b"\0")  # a shorter record (older objects): no answer
    f = dict(zip((n for n, _ in t.EVENT_FIELDS), t.EVENT.unpack_from(data), strict=True))
    if f["family"] == socket.AF_INET6:
        src = str(ipaddress.IPv6Address(f["local_ip6"]))
        dst = str(ipaddress.IPv6Address(f["remote_ip6"]))
        # A v4 peer on a dual-stack socket: show it as the v4 address it is.
        src = src.removeprefix("::ffff:") if src.startswith("::ffff:") and "." in src else src
        dst = dst.removeprefix("::ffff:") if dst.startswith("::ffff:") and "." in dst else dst
    else:
        src = str(ipaddress.IPv4Address(f["local_ip4"]))
        dst = str(ipaddress.IPv4Address(f["remote_ip4"]))
    sport, dport = f["local_port"], _port(f["remote_port"])
    if meta is not None and meta.side == "ingress":
        # The program ran on the server's socket: the sender (src) is its peer, the client.
        src, dst, sport, dport = dst, src, dport, sport
    rule = None if f["rule"] == t.NO_RULE else f["rule"]
    line = None
    if rule is not None and meta is not None and rule < len(meta.rules):
        line = meta.rules[rule].line
    method, method_cut = _text(f["method"], f["method_len"], t.METHOD_BYTES)
    host, host_cut = _text(f["host"], f["host_len"], t.HOST_BYTES)
    path, _ = _text(f["path"], f["path_len"], t.PATH_BYTES)
    verdict = t.VERDICT_NAMES.get(t.EventKind(f["verdict"]), str(f["verdict"]))
    return Event(
        policy=policy,
        time=datetime.fromtimestamp((f["time_ns"] + clock_offset_ns) / 1e9, UTC),
        verdict=verdict,
        reason=reason_slug(f["reason"]) if f["reason"] else None,
        rule=rule,
        line=line,
        pid=f["pid_tgid"] >> 32,
        tid=f["pid_tgid"] & 0xFFFFFFFF,
        cgroup_id=f["cgroup_id"],
        src=src,
        sport=sport,
        dst=dst,
        dport=dport,
        method=method,
        method_cut=method_cut,
        host=host.strip(" \t") if f["host_len"] else None,
        host_cut=host_cut,
        path=path,
        path_len=f["path_len"],
        size=f["size"],
        time_ns=f["time_ns"],
        answer=f["answer"] or None,
    )


# ---------------------------------------------------------------------------------------------
# Following ring buffers


@dataclass
class _Source:
    name: str
    pin_dir: Path
    map_id: int
    fd: int
    meta: PolicyMetadata | None
    lost: int  # the counter's value when last reported


class EventStream:
    """Events of the named policies (all loaded ones when `names` is empty), as they come.

    Iterate `follow()`; it yields `Event`s in the order each policy's program recorded them, and
    `Lost` whenever a policy's lost-events counter has grown. Policies loaded later are picked up
    (within `rescan` seconds); a named policy that is not loaded is an error at the start only.
    """

    def __init__(self, names: list[str] | None = None, rescan: float = 1.0) -> None:
        self.names = list(names or [])
        self.rescan = rescan
        self._sources: dict[str, _Source] = {}
        self._ring: libbpf.RingBuffer | None = None
        self._pending: list[Event] = []
        self._offset = time.time_ns() - time.monotonic_ns()
        for name in self.names:
            policy_dir(name)  # raises for a policy that is not loaded
        try:
            self._refresh()
        except BaseException:
            self.close()  # the ring and the maps opened so far
            raise

    # -- sources ---------------------------------------------------------------------------

    def _wanted(self) -> dict[str, Path]:
        root = pins.pin_root(create=False)
        if root is None:
            return {}
        found = {}
        for entry in root.iterdir():
            if not pins.valid_name(entry.name) or not entry.is_dir():
                continue
            if self.names and entry.name not in self.names:
                continue
            found[entry.name] = entry
        return found

    def _refresh(self) -> list[Lost]:
        """Pick up new, replaced and unloaded policies; report lost events."""
        changed = False
        wanted = self._wanted()
        for name in list(self._sources):
            if name not in wanted:
                self._drop(name)
                changed = True
        for name, pin_dir in wanted.items():
            try:
                fd = libbpf.obj_get(str(pin_dir / EVENTS_PIN))
            except (libbpf.BpfError, FileNotFoundError):
                continue  # loaded by a sockpol without events, or being unloaded
            try:
                map_id = libbpf.map_info(fd).id
            except BaseException:
                os.close(fd)
                raise
            meta = _metadata(pin_dir)
            known = self._sources.get(name)
            if known is not None and known.map_id == map_id:
                os.close(fd)
                known.meta = meta or known.meta  # a hot reload changes the rules
                continue
            if known is not None:
                self._drop(name)
            lost = _lost(pin_dir, meta)
            self._sources[name] = _Source(name, pin_dir, map_id, fd, meta, lost)
            changed = True
        if changed:
            self._rebuild()
        return self._check_lost()

    def _drop(self, name: str) -> None:
        source = self._sources.pop(name)
        if self._ring is not None:  # libbpf cannot remove one map: rebuild without it
            self._ring.close()
            self._ring = None
        os.close(source.fd)

    def _rebuild(self) -> None:
        if self._ring is not None:
            self._ring.close()
        self._ring = libbpf.RingBuffer(self._on_record)
        for source in self._sources.values():
            self._ring.add(source.fd, source.name)

    def _on_record(self, name: object, data: bytes) -> None:
        source = self._sources.get(str(name))
        meta = source.meta if source is not None else None
        self._pending.append(decode(str(name), data, meta, self._offset))

    def _check_lost(self) -> list[Lost]:
        out = []
        for source in self._sources.values():
            total = _lost(source.pin_dir, source.meta)
            if total > source.lost:
                out.append(Lost(source.name, total - source.lost, total))
            source.lost = total
        return out

    # -- reading ---------------------------------------------------------------------------

    def poll(self, timeout: float) -> list[Event | Lost]:
        """What arrived within `timeout` seconds (possibly nothing)."""
        if self._ring is None:
            time.sleep(timeout)
        else:
            self._ring.poll(int(timeout * 1000))
        events, self._pending = self._pending, []
        return list(events)

    def follow(
        self, stop: Callable[[], bool] = lambda: False, tick: float = 0.2
    ) -> Iterator[Event | Lost]:
        next_scan = time.monotonic() + self.rescan
        while not stop():
            yield from self.poll(tick)
            if time.monotonic() >= next_scan:
                yield from self._refresh()
                next_scan = time.monotonic() + self.rescan

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        for source in self._sources.values():
            os.close(source.fd)
        self._sources.clear()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _metadata(pin_dir: Path) -> PolicyMetadata | None:
    try:
        fd = libbpf.obj_get(str(pin_dir / pins.PIN_STATE))
    except (libbpf.BpfError, FileNotFoundError):
        return None
    try:
        return read_state(fd).policy_metadata()
    except (StateError, ValueError):
        return None
    finally:
        os.close(fd)


def _lost(pin_dir: Path, meta: PolicyMetadata | None) -> int:
    try:
        return lost_events(pin_dir, meta)
    except (TelemetryError, libbpf.BpfError, FileNotFoundError):
        return 0


def format_json(item: Event | Lost) -> str:
    return json.dumps(item.to_json(), sort_keys=True)


__all__ = ["Event", "EventStream", "Lost", "decode", "format_json"]
