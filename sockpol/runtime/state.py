"""sockpol's own record of a loaded policy, kept in the kernel next to the pins it describes.

The record (cgroup, load time, object path and sha256, the object's metadata JSON) lives in a
single-entry BPF ARRAY map named `sockpol_state`, pinned as `<pin dir>/state`. Keeping it in bpffs
rather than in a file under /run means it appears, is replaced and disappears together with the
other pins (one directory rename swaps all of them), survives the process that loaded it, and needs
no second storage location to clean up. No program uses the map; BPF_F_RDONLY_PROG says so.

Value layout: u32 little-endian length, then that many bytes of UTF-8 JSON, zero padded.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass

from sockpol.diagnostics import SockpolError
from sockpol.metadata import PolicyMetadata
from sockpol.runtime import libbpf

STATE_MAP_NAME = "sockpol_state"
STATE_FORMAT = 1
_KEY0 = struct.pack("<I", 0)


class StateError(SockpolError):
    pass


@dataclass(frozen=True)
class PolicyState:
    name: str
    cgroup: str | None  # absolute cgroup v2 directory, None when attached to no cgroup
    loaded_at: float  # Unix time
    object_path: str
    object_sha256: str
    metadata: dict  # PolicyMetadata as JSON-compatible dict
    format: int = STATE_FORMAT
    reloaded_at: float | None = None  # Unix time of the last hot reload (tables swapped)
    reloads: int = 0
    # The version in force: 1 for the first load, one more for every replacement (the control
    # map's serial; older versions' programs hand their connections over to it).
    serial: int = 0

    def policy_metadata(self) -> PolicyMetadata:
        return PolicyMetadata.from_json(json.dumps(self.metadata).encode())

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @staticmethod
    def from_bytes(data: bytes) -> PolicyState:
        raw = json.loads(data.decode())
        if raw.get("format") != STATE_FORMAT:
            raise StateError(f"state: unsupported record format {raw.get('format')!r}")
        return PolicyState(**raw)


def create_state_map(state: PolicyState) -> int:
    """Create the record map holding `state` and return its fd (the caller pins and closes it)."""
    payload = state.to_bytes()
    value = struct.pack("<I", len(payload)) + payload
    value += b"\0" * (-len(value) % 8)
    fd = libbpf.map_create(
        libbpf.BPF_MAP_TYPE_ARRAY, STATE_MAP_NAME, 4, len(value), 1, libbpf.BPF_F_RDONLY_PROG
    )
    try:
        libbpf.map_update(fd, _KEY0, value)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_state(fd: int) -> PolicyState:
    info = libbpf.map_info(fd)
    if info.name != STATE_MAP_NAME or info.type != libbpf.BPF_MAP_TYPE_ARRAY:
        raise StateError(f"state: pinned map is {info.name!r}, not a sockpol state record")
    value = libbpf.map_lookup(fd, _KEY0, info.value_size)
    if value is None or len(value) < 4:
        raise StateError("state: record map is empty")
    (length,) = struct.unpack_from("<I", value)
    try:
        return PolicyState.from_bytes(value[4 : 4 + length])
    except (ValueError, TypeError) as e:
        raise StateError(f"state: unreadable record ({e})") from None
