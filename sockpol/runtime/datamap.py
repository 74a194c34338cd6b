"""The program's `.data` map, mapped into this process: the table slots, the generation and the
program's serial (codegen/tables.py `Tables`: two slots, then a u32 generation, then a u32 serial).

Hot reload writes the idle slot and flips the generation through this mapping (reload.py); the
loader writes a new program's serial through it before attaching the program (loader.py).
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from contextlib import contextmanager

from sockpol.diagnostics import SockpolError
from sockpol.runtime import libbpf


class DataMapError(SockpolError):
    pass


@contextmanager
def data_region(fd: int) -> Iterator[tuple[mmap.mmap, int]]:
    """The `.data` map `fd` mapped shared and writable (libbpf creates it BPF_F_MMAPABLE), and
    its value size."""
    info = libbpf.map_info(fd)
    length = (info.value_size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
    try:
        region = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as e:
        raise DataMapError(f"cannot map the program's tables ({e.strerror})") from None
    try:
        yield region, info.value_size
    finally:
        region.close()


def write_data_serial(fd: int, serial: int) -> None:
    """Write a loaded, not yet attached program's serial: the last u32 of its `.data`."""
    with data_region(fd) as (region, size):
        region[size - 4 : size] = serial.to_bytes(4, "little")
