"""Count the BPF instructions the kernel program's scan executes for a head, without a kernel.

`sockpol compile` builds the object; this runs its `sockpol_scan_step` and `sockpol_path_step`
(the `bpf_loop` callbacks, which call no helper) instruction by instruction on the object's own
`.data` tables, driven call by call as `JudgeCore.scan` and `decide` drive them. The count is
exact for the code that the kernel verifies and JIT-compiles (each BPF instruction becomes one to
three x86 instructions), where the kernel's own statistics are a time with about 15 ns of noise
per measurement on this machine: a change to the scan's code can be weighed here first, and
`tests/test_insn_budget.py` keeps the counts of the benchmark's mix from growing unnoticed. A
`Connection` keeps the work area from head to head, as the socket storage does (the remembered
header section, with `sockpol_memo_end` run after each scan: tests/test_section_memo.py).

Not covered: the program itself (`sockpol_msg`: entry, socket storage, pull, decide's candidate
loop, counters, verdict), which calls helpers; and cache misses, branch mispredictions and the
JIT's own choices, which the count cannot see.
"""

from __future__ import annotations

import io
import struct
from collections import Counter
from dataclasses import dataclass, field

from elftools.elf.elffile import ELFFile

from sockpol.codegen.judge import PATH_CHUNK, PENDING_LITERAL
from sockpol.codegen.tables import FACTS_OFFSET, SCALAR, SCAN_POINTERS
from sockpol.compiler import CompiledPolicy
from sockpol.contract import PATH_MAX
from sockpol.dsl.ast import Side
from sockpol.telemetry import NO_RULE

MASK64 = (1 << 64) - 1
REGION_SHIFT = 28  # an address's top bits name its region
CTX, STACK, DATA, SCRATCH, TABLES = 1, 2, 3, 4, 5
STACK_SIZE = 512
MAX_INSNS = 1_000_000  # per call: a jump gone wrong fails the test instead of hanging it


class EmuError(Exception):
    pass


@dataclass
class Memory:
    regions: dict[int, bytearray] = field(default_factory=dict)

    def map(self, region: int, data: bytearray) -> int:
        self.regions[region] = data
        return region << REGION_SHIFT

    def _at(self, addr: int, size: int) -> tuple[bytearray, int]:
        region, off = addr >> REGION_SHIFT, addr & ((1 << REGION_SHIFT) - 1)
        buf = self.regions.get(region)
        if buf is None or off + size > len(buf):
            raise EmuError(f"access of {size} bytes at {addr:#x} outside every region")
        return buf, off

    def load(self, addr: int, size: int) -> int:
        buf, off = self._at(addr, size)
        return int.from_bytes(buf[off : off + size], "little")

    def store(self, addr: int, size: int, value: int) -> None:
        buf, off = self._at(addr, size)
        buf[off : off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


def _s64(v: int) -> int:
    v &= MASK64
    return v - (1 << 64) if v >> 63 else v


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >> 31 else v


_SIZES = {0x00: 4, 0x08: 2, 0x10: 1, 0x18: 8}


class Function:
    """One BPF function of the object, decoded: (opcode, dst, src, off, imm) per slot."""

    def __init__(self, code: bytes) -> None:
        self.insns: list[tuple[int, int, int, int, int]] = []
        for i in range(0, len(code), 8):
            op, regs, off, imm = struct.unpack_from("<BBhi", code, i)
            self.insns.append((op, regs & 0xF, regs >> 4, off, imm))

    def run(
        self, mem: Memory, r1: int, r2: int, stack_top: int, hist: Counter | None = None
    ) -> tuple[int, int]:
        """Run from the first instruction with r1, r2 as arguments: (r0, instructions)."""
        r = [0] * 11
        r[1], r[2], r[10] = r1, r2, stack_top
        pc, count, insns = 0, 0, self.insns
        while True:
            op, dst, src, off, imm = insns[pc]
            count += 1
            if count > MAX_INSNS:
                raise EmuError(f"more than {MAX_INSNS} instructions in one call")
            if hist is not None:
                hist[pc] += 1
            cls = op & 7
            if cls in (4, 7):  # ALU, ALU64
                if off:  # cpu v4's signed division and sign-extending moves
                    raise EmuError(f"ALU opcode {op:#x} with offset {off} at {pc}")
                wide = cls == 7
                code = op & 0xF0
                b = r[src] if op & 8 else (imm & MASK64)
                a = r[dst]
                if not wide:
                    a &= 0xFFFFFFFF
                    b &= 0xFFFFFFFF
                bits = 64 if wide else 32
                mask = (1 << bits) - 1
                if code == 0x00:
                    v = a + b
                elif code == 0x10:
                    v = a - b
                elif code == 0x20:
                    v = a * b
                elif code == 0x30:
                    v = a // b if b else 0
                elif code == 0x40:
                    v = a | b
                elif code == 0x50:
                    v = a & b
                elif code == 0x60:
                    v = a << (b & (bits - 1))
                elif code == 0x70:
                    v = (a & mask) >> (b & (bits - 1))
                elif code == 0x80:
                    v = -a
                elif code == 0x90:
                    v = a % b if b else a
                elif code == 0xA0:
                    v = a ^ b
                elif code == 0xB0:
                    v = b
                elif code == 0xC0:
                    sa = _s64(a) if wide else _s32(a)
                    v = sa >> (b & (bits - 1))
                else:
                    raise EmuError(f"ALU opcode {op:#x} at {pc}")
                r[dst] = v & mask
                pc += 1
            elif cls in (5, 6):  # JMP, JMP32
                code = op & 0xF0
                if code == 0x90:  # exit
                    return r[0], count
                if code == 0x80:
                    raise EmuError(f"call at {pc}: the scan's callbacks call nothing")
                if code == 0x00:
                    pc += 1 + (off if cls == 5 else imm)
                    continue
                a = r[dst]
                b = r[src] if op & 8 else (imm & MASK64)
                if cls == 6:
                    a &= 0xFFFFFFFF
                    b &= 0xFFFFFFFF
                    sa, sb = _s32(a), _s32(b)
                else:
                    sa, sb = _s64(a), _s64(b)
                taken = {
                    0x10: a == b, 0x20: a > b, 0x30: a >= b, 0x40: bool(a & b), 0x50: a != b,
                    0x60: sa > sb, 0x70: sa >= sb, 0xA0: a < b, 0xB0: a <= b,
                    0xC0: sa < sb, 0xD0: sa <= sb,
                }.get(code)  # fmt: skip
                if taken is None:
                    raise EmuError(f"jump opcode {op:#x} at {pc}")
                pc += 1 + off if taken else 1
            elif cls == 1:  # LDX
                if op & 0xE0 != 0x60:
                    raise EmuError(f"load opcode {op:#x} at {pc}")
                r[dst] = mem.load((r[src] + off) & MASK64, _SIZES[op & 0x18])
                pc += 1
            elif cls == 3:  # STX
                if op & 0xE0 != 0x60:
                    raise EmuError(f"store opcode {op:#x} at {pc}")
                mem.store((r[dst] + off) & MASK64, _SIZES[op & 0x18], r[src])
                pc += 1
            elif cls == 2:  # ST
                if op & 0xE0 != 0x60:
                    raise EmuError(f"store opcode {op:#x} at {pc}")
                mem.store((r[dst] + off) & MASK64, _SIZES[op & 0x18], imm & MASK64)
                pc += 1
            elif op == 0x18 and src == 0:  # LD imm64: two slots, counted as one instruction
                hi = insns[pc + 1][4]
                r[dst] = ((hi & 0xFFFFFFFF) << 32) | (imm & 0xFFFFFFFF)
                pc += 2
            else:
                raise EmuError(f"opcode {op:#x} at {pc}")


@dataclass
class Walk:
    per_call: list[int]  # instructions of each sockpol_scan_step call
    path_insns: int  # sockpol_path_step's: decide's walk of the path bytes the scan left
    path_calls: int
    state: int  # the scanner's state at the end (END: a complete head)
    path: bytes  # the path as the scan copied it
    pstate: int  # the path automaton's state after the path
    facts: int  # the fact words, word w at bit 64 * w
    pos: int = 0  # where the scan stopped (after the head where it ended)
    cl: int = 0  # the Content-Length
    seen: int = 0  # the singleton headers' flags
    memo_insns: int = 0  # sockpol_memo_end's, after the scan
    memo_taken: bool = False  # the connection's remembered header section was taken

    @property
    def calls(self) -> int:
        return len(self.per_call)

    @property
    def insns(self) -> int:
        return sum(self.per_call) + self.path_insns + self.memo_insns


class Connection:
    """A connection's work area, kept from head to head as its socket storage is (the header
    section it remembers: judge.JudgeCore.memo_section)."""

    def __init__(self, fact_words: int) -> None:
        self.scratch = bytearray(FACTS_OFFSET + 8 * fact_words)


class ScanEmu:
    """The scan of one compiled policy's object, on slot 0 of its tables."""

    def __init__(self, compiled: CompiledPolicy) -> None:
        # The sk_msg program's scan: its runs start with the methods' literals (walk), where
        # the lsm program's do not, and sk_skb's resume in later windows.
        if compiled.metadata.backend != "sockmap" or compiled.policy.side is not Side.EGRESS:
            raise EmuError("only the sk_msg program's scan is emulated")
        t = compiled.matcher.tables
        self.start, self.path_start = t.start, t.path.start
        self.nw = compiled.matcher.fact_words
        with io.BytesIO(compiled.object_code()) as f:
            elf = ELFFile(f)
            text_index = elf.get_section_index(".text")
            code = elf.get_section(text_index).data()
            self.data = bytes(elf.get_section_by_name(".data").data())
            funcs: dict[str, tuple[int, int]] = {}
            tables_at = 0
            for s in elf.get_section_by_name(".symtab").iter_symbols():
                if s["st_info"]["type"] == "STT_FUNC" and s["st_shndx"] == text_index:
                    funcs[s.name] = (s["st_value"], s["st_size"])
                elif s.name == "sockpol_tables":
                    tables_at = s["st_value"]
        self.tables_at = tables_at

        def fn(name: str) -> Function:
            start, size = funcs[name]
            return Function(code[start : start + size])

        self.scan_step = fn("sockpol_scan_step")
        self.path_step = fn("sockpol_path_step")
        self.memo_end = fn("sockpol_memo_end")

    def connection(self) -> Connection:
        return Connection(self.nw)

    def walk(
        self,
        head: bytes,
        hist: Counter | None = None,
        conn: Connection | None = None,
        serial: int = 0,
    ) -> Walk:
        """The scan of a request's head that one run pulled whole (data_end is its end), as
        JudgeCore.begin, scan and decide's path walk run it; `hist` counts executions per
        instruction of scan_step; `conn` keeps the work area from run to run; `serial` is the
        program's (the loader's number for the version)."""
        mem = Memory()
        n = len(head)
        data = mem.map(DATA, bytearray(head))
        conn = conn if conn is not None else self.connection()
        scratch = mem.map(SCRATCH, conn.scratch)
        tables = mem.map(TABLES, bytearray(self.data)) + self.tables_at
        pointers = {"data": data, "data_end": data + n, "scratch": scratch, "tables": tables}
        ctx = mem.map(CTX, bytearray(struct.pack("<4Q", *(pointers[p] for p in SCAN_POINTERS))))
        stack_top = mem.map(STACK, bytearray(STACK_SIZE)) + STACK_SIZE

        def put(name: str, value: int) -> None:
            mem.store(scratch + SCALAR[name], 8, value)

        for name in SCALAR:  # JudgeCore.begin
            put(name, 0)
        for w in range(self.nw):
            mem.store(scratch + FACTS_OFFSET + 8 * w, 8, 0)
        put("serial", serial)  # the program's, as sockpol_msg puts it after begin
        put("state", self.start)
        put("rule", NO_RULE)
        put("pstate", self.path_start)
        put("pending", PENDING_LITERAL)  # every sk_msg program tries the methods first
        put("limit", n)
        per_call: list[int] = []
        for i in range(2 * n + 2):  # JudgeCore.scan's budget of calls
            ret, count = self.scan_step.run(mem, i, ctx, stack_top, hist)
            per_call.append(count)
            if ret:
                break
        memo_insns = self.memo_end.run(mem, ctx, 0, stack_top)[1]
        scalars = {name: mem.load(scratch + at, 8) for name, at in SCALAR.items()}
        path_insns = path_calls = 0
        rest = scalars["out_len"] - scalars["pwalked"]
        for i in range(max(0, (rest + PATH_CHUNK - 1) // PATH_CHUNK)):
            ret, count = self.path_step.run(mem, i, ctx, stack_top)
            path_insns += count
            path_calls += 1
            if ret:
                break
        path = bytes(mem.regions[SCRATCH][: min(scalars["out_len"], PATH_MAX)])
        pstate = mem.load(scratch + SCALAR["pstate"], 8)
        facts = sum(mem.load(scratch + FACTS_OFFSET + 8 * w, 8) << 64 * w for w in range(self.nw))
        return Walk(
            per_call, path_insns, path_calls, scalars["state"], path, pstate, facts,
            scalars["pos"], scalars["cl"], scalars["seen"], memo_insns,
            # memo_finish ran (it sets memo_from) and marked nothing: the section was taken.
            scalars["memo_from"] != 0 and scalars["memo_mark"] == 0,
        )  # fmt: skip
