"""Names of the loads the agent owns.

The runtime attaches a load to one cgroup, so a policy that governs several pods is loaded once
per pod, under a name derived from the policy's key and the pod's cgroup:

    <prefix><slug>-<hash>      e.g. spa-shop-orders-3f9c0a1b2c

`prefix` (default `spa-`, "sockpol agent") marks the agent's ownership: the agent lists, adopts,
reloads and unloads only names with its prefix, and never touches a policy an operator loaded by
hand under another name. `slug` is the key made readable (letters, digits, `-`), cut short;
`hash` (10 hex digits of sha256 over the full key and the cgroup) makes the name unique and
stable across agent restarts, so a restarted agent finds its loads under the same names and
adopts them. Names fit the runtime's limit (64 characters, pins.valid_name).
"""

from __future__ import annotations

import hashlib
import re

from sockpol.agent.options import DEFAULT_PREFIX
from sockpol.runtime.pins import valid_name

__all__ = ["DEFAULT_PREFIX", "load_name", "owned", "valid_prefix"]
HASH_LEN = 10
MAX_NAME = 64
_NOT_SLUG = re.compile(r"[^A-Za-z0-9]+")


def valid_prefix(prefix: str) -> bool:
    return valid_name(prefix + "x" * (HASH_LEN + 2)) and len(prefix) <= 24


def load_name(prefix: str, key: str, cgroup: str) -> str:
    digest = hashlib.sha256(f"{key}\0{cgroup}".encode()).hexdigest()[:HASH_LEN]
    room = MAX_NAME - len(prefix) - HASH_LEN - 1
    slug = _NOT_SLUG.sub("-", key).strip("-")[: min(room, 32)].strip("-") or "policy"
    name = f"{prefix}{slug}-{digest}"
    assert valid_name(name), name
    return name


def owned(prefix: str, name: str) -> bool:
    return name.startswith(prefix)
