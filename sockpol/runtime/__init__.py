"""The kernel side of sockpol: load compiled policies, attach them, report on them, unload them."""

from sockpol.runtime.loader import (
    LoadedPolicy,
    LoadError,
    PolicyNotFound,
    PolicyStatus,
    RuntimeOpError,
    load,
    status,
    unload,
)

__all__ = [
    "LoadError",
    "LoadedPolicy",
    "PolicyNotFound",
    "PolicyStatus",
    "RuntimeOpError",
    "load",
    "status",
    "unload",
]
