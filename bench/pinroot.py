"""A pin root of the benchmark's own: the policies a run loads are pinned under
/sys/fs/bpf/NAME-PID ($SOCKPOL_PIN_ROOT, unless the caller set it), so a benchmark never replaces
or unloads a policy the machine runs, and the directory goes with the run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from sockpol.runtime import pins


@contextmanager
def own_pin_root(name: str) -> Iterator[None]:
    if pins.ROOT_ENV in os.environ:  # the caller's choice (bench/README.md's A/B runs)
        yield
        return
    os.environ[pins.ROOT_ENV] = f"{name}-{os.getpid()}"
    try:
        yield
    finally:
        kept = pins.remove_root()
        del os.environ[pins.ROOT_ENV]
        if kept:
            print(f"pin root left, something is still pinned: {kept}")
