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
from sockpol.runtime.reload import ReloadError, ReloadResult, reload

__all__ = [
    "LoadError",
    "LoadedPolicy",
    "PolicyNotFound",
    "PolicyStatus",
    "RuntimeOpError",
    "ReloadError",
    "ReloadResult",
    "load",
    "reload",
    "status",
    "unload",
]
