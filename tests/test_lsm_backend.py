"""The LSM backend's object and the kernel layout it is loaded with, checked without a kernel
(loading and enforcing: tests/kernel/test_lsm.py and tests/kernel/ktls/test_ktls_lsm.py, in the
VMs)."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from sockpol import kernelbtf
from sockpol.compiler import compile_to_file
from sockpol.contract import LSM_PROGRAM, LSM_SECTION, SOCK_MAP, WORK_MAP
from sockpol.metadata import read_metadata
from sockpol.runtime import libbpf

POLICY = """\
policy t-lsm-unit {
    port 8080
    default deny
    tls
    allow GET /ok
}
"""


@pytest.fixture(scope="module")
def lsm_object(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lsm") / "lsm.o"
    return compile_to_file(POLICY, out, "lsm.pol", backend="lsm")


def test_the_object_has_a_sleepable_lsm_program_and_no_sockhash(lsm_object: Path) -> None:
    assert read_metadata(lsm_object).backend == "lsm"
    try:
        obj = libbpf.BpfObject.open_file(str(lsm_object), object_name="sockpol")
    except libbpf.LibbpfMissing as e:
        pytest.skip(f"libbpf.so.1 is not installed: {e}")
    with obj:
        progs = {p.name: p.type for p in obj.programs()}
        assert progs[LSM_PROGRAM] == libbpf.BPF_PROG_TYPE_LSM
        maps = {m.name: m for m in obj.maps()}
        assert SOCK_MAP not in maps and WORK_MAP in maps
        rodata = next(m for m in maps.values() if m.name.endswith(".rodata"))
        assert rodata.value_size == 4 * len(kernelbtf.LAYOUT_FIELDS)
    sections = subprocess.run(
        [sys.executable, "-c", "import sys; from elftools.elf.elffile import ELFFile;"
         "print([s.name for s in ELFFile(open(sys.argv[1], 'rb')).iter_sections()])",
         str(lsm_object)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert LSM_SECTION in sections


def test_a_sockmap_object_says_so(tmp_path: Path) -> None:
    obj = compile_to_file(POLICY, tmp_path / "s.o", "s.pol")
    assert read_metadata(obj).backend == "sockmap"


def test_the_layout_of_the_running_kernel() -> None:
    try:
        btf = kernelbtf.running_kernel()
    except kernelbtf.BtfError as e:
        pytest.skip(f"no kernel BTF here: {e}")
    layout = kernelbtf.lsm_layout(btf)
    assert set(layout) == set(kernelbtf.LAYOUT_FIELDS)
    assert layout["socket_sk"] > 0 and layout["msghdr_iter"] > 0
    assert layout["iter_ubuf"] != layout["iter_iovec"]
    assert len(kernelbtf.layout_bytes(layout)) == 4 * len(kernelbtf.LAYOUT_FIELDS)
    # struct iovec is {void *iov_base; size_t iov_len}: what the program reads per segment.
    assert btf.size("iovec") == 16 and btf.offset("iovec", "iov_len") == 8


def _btf(types: bytes, strings: bytes) -> bytes:
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + types + strings


def test_members_inside_anonymous_unions_and_enums_are_found() -> None:
    # struct s { int a; union { long b; long c; }; }; enum e { X = 5 };
    strings = b"\0int\0long\0s\0a\0b\0c\0e\0X\0"

    def off(name: bytes) -> int:
        return strings.index(name + b"\0")

    types = b"".join([
        struct.pack("<III", off(b"int"), 1 << 24, 4) + struct.pack("<I", 32),  # 1: int
        struct.pack("<III", off(b"long"), 1 << 24, 8) + struct.pack("<I", 64),  # 2: long
        struct.pack("<III", 0, 5 << 24 | 2, 8)  # 3: union { b; c }
        + struct.pack("<III", off(b"b"), 2, 0) + struct.pack("<III", off(b"c"), 2, 0),
        struct.pack("<III", off(b"s"), 4 << 24 | 2, 16)  # 4: struct s
        + struct.pack("<III", off(b"a"), 1, 0) + struct.pack("<III", 0, 3, 64),
        struct.pack("<III", off(b"e"), 6 << 24 | 1, 4) + struct.pack("<Ii", off(b"X"), 5),
    ])  # fmt: skip
    btf = kernelbtf.KernelBtf(_btf(types, strings))
    assert btf.offset("s", "a") == 0
    assert btf.offset("s", "c") == 8
    assert btf.offset("s", "missing", "b") == 8
    assert btf.offset("s", "missing") is None
    assert btf.enum_value("e", "X") == 5
    with pytest.raises(kernelbtf.BtfError):
        kernelbtf.KernelBtf(b"\0" * 24)


def test_cli_compiles_for_the_lsm_backend_and_inspect_says_so(tmp_path: Path) -> None:
    src = tmp_path / "p.pol"
    src.write_text(POLICY)
    out = tmp_path / "p.o"
    cli = [sys.executable, "-m", "sockpol.cli"]
    done = subprocess.run(
        [*cli, "compile", str(src), "-o", str(out), "--backend", "lsm"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    shown = subprocess.run([*cli, "inspect", str(out)], capture_output=True, text=True)
    assert "backend lsm" in shown.stdout, shown.stdout
