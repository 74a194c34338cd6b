"""Code generation: the LLVM IR, the assembly and the ELF object's contract with libbpf."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from sockpol.compiler import compile_source, compile_to_file
from sockpol.contract import MSG_PROGRAM, SOCK_MAP, SOCKOPS_PROGRAM
from sockpol.metadata import SECTION, read_metadata

POLICY = """\
policy orders {
    port 8080, 9000-9010
    default deny
    allow GET /healthz
    allow POST /orders if header content-type = "application/json"
    deny * /admin/**
}
"""


@pytest.fixture(scope="module")
def compiled():
    policies, _ = compile_source(POLICY, "orders.pol")
    return policies[0]


@pytest.fixture(scope="module")
def elf(compiled):
    return ELFFile(io.BytesIO(compiled.object_code()))


def test_llvm_ir_targets_bpf(compiled):
    text = compiled.llvm_ir()
    assert 'target triple = "bpf"' in text
    assert "e-m:e-p:64:64-i64:64-i128:128-n32:64-S128" in text
    assert 'section "sk_msg"' in text and 'section "sockops"' in text
    # Helpers are called by id: pull_data 63, apply_bytes 61, cork_bytes 62, loop 181.
    for helper_id in (63, 61, 62, 181):
        assert f"inttoptr (i64 {helper_id} to ptr)" in text


def test_assembly_is_bpf(compiled):
    asm = compiled.assembly()
    assert "sockpol_msg:" in asm and "sockpol_sockops:" in asm
    assert "call 63" in asm  # bpf_msg_pull_data before reading


def test_object_sections(elf):
    assert elf["e_machine"] == "EM_BPF"
    names = {s.name for s in elf.iter_sections()}
    assert {"sk_msg", "sockops", ".maps", "license", ".data", ".BTF", ".BTF.ext", SECTION} <= names
    assert ".eh_frame" not in names
    assert elf.get_section_by_name("license").data() == b"GPL\0"
    symbols = {s.name for s in elf.get_section_by_name(".symtab").iter_symbols()}
    assert {MSG_PROGRAM, SOCKOPS_PROGRAM, SOCK_MAP} <= symbols


def test_metadata_round_trip(compiled, tmp_path):
    path = compile_to_file(POLICY, tmp_path / "orders.bpf.o", source_name="orders.pol")
    meta = read_metadata(path)
    assert meta.policy == "orders"
    assert meta.ports == [[8080, 8080], [9000, 9010]]
    assert meta.default == "deny"
    assert [(r.index, r.action, r.line) for r in meta.rules] == [
        (0, "allow", 4),
        (1, "allow", 5),
        (2, "deny", 6),
    ]
    assert meta.rules[1].text == 'allow POST /orders if header content-type = "application/json"'
    assert len(meta.source_sha256) == 64
    assert json.loads(meta.to_json())["policy"] == "orders"


@pytest.mark.skipif(shutil.which("bpftool") is None, reason="bpftool is not installed")
def test_btf_describes_sockhash_and_functions(tmp_path):
    path = compile_to_file(POLICY, tmp_path / "o.bpf.o", source_name="orders.pol")
    out = subprocess.run(
        ["bpftool", "btf", "dump", "file", str(path)], capture_output=True, text=True, check=True
    ).stdout
    assert f"VAR '{SOCK_MAP}'" in out
    assert "DATASEC '.maps'" in out
    assert "nr_elems=18" in out  # BPF_MAP_TYPE_SOCKHASH, libbpf's __uint encoding
    for fn in (
        MSG_PROGRAM,
        SOCKOPS_PROGRAM,
        "sockpol_scan_step",
        "sockpol_path_step",
        "sockpol_cand_step",
    ):
        assert f"FUNC '{fn}'" in out
    assert "FUNC 'sockpol_scan_step' type_id" in out and "linkage=static" in out


def test_failed_compile_writes_nothing(tmp_path):
    from sockpol.diagnostics import CompileError

    out = tmp_path / "bad.bpf.o"
    with pytest.raises(CompileError):
        compile_to_file("policy p {\n port 80\n allow GET nopath\n}\n", out, "bad.pol")
    assert not out.exists()
    assert list(Path(tmp_path).iterdir()) == []


def test_the_word_skipping_test_finds_every_byte_outside_visible_ascii():
    """judge.skip_words skips eight header-value bytes at once when `visible_word` holds: it must
    hold exactly when no byte is below 0x20 or above 0x7E, wherever the odd byte is and
    whatever its neighbours (borrows and carries between bytes must not hide one)."""
    import random

    from sockpol.codegen.judge import visible_word

    def expected(bs: bytes) -> bool:
        return all(0x20 <= c <= 0x7E for c in bs)

    cases = []
    for pos in range(8):
        for value in range(256):
            for fill in (0x20, 0x61, 0x7E):
                bs = bytearray([fill] * 8)
                bs[pos] = value
                cases.append(bytes(bs))
    for a in range(256):
        for b in range(0, 256, 3):
            cases.append(bytes([a, b]) + b"aaaaaa")
            cases.append(b"aaaaaa" + bytes([a, b]))
    rnd = random.Random(7)
    edges = [0x00, 0x1F, 0x20, 0x7E, 0x7F, 0x80, 0xFF]
    for _ in range(20_000):
        cases.append(bytes(rnd.choice([rnd.randrange(256), rnd.choice(edges)]) for _ in range(8)))
    for bs in cases:
        assert visible_word(int.from_bytes(bs, "little")) == expected(bs), bs
