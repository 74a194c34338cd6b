"""The scan's bpf_loop callbacks, compiled for this machine's CPU and driven as bpf_loop does.

`scan_step` and `path_step` are built from the same IR as in the kernel object (JudgeCore),
with `llvm.bpf.passthrough` (helpers.opaque) replaced by an identity function, and JIT-compiled
by llvmlite for the host. A test can then watch what the kernel program's scan does call by
call (how many calls a head takes, where each ends) without root or a kernel, and compare the
outcome with `codegen/simulate.py`. What this does not cover: the BPF backend's code and the
verifier (tests/kernel does, on every kernel of the matrix).
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass, field

from llvmlite import binding as llvm

from sockpol.codegen.judge import PATH_CHUNK, PENDING_LITERAL, JudgeCore
from sockpol.codegen.lower import MatcherIR
from sockpol.codegen.objbuilder import ObjectBuilder
from sockpol.codegen.tables import FACTS_OFFSET, SCALAR, Tables
from sockpol.contract import MAX_SCAN, PATH_MAX
from sockpol.telemetry import NO_RULE

llvm.initialize_native_target()
llvm.initialize_native_asmprinter()

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p)
_PASSTHROUGH = "llvm.bpf.passthrough.i64.i64"


@dataclass
class Scan:
    """One head's scan state: the work area (map memory in the kernel) and the context."""

    scratch: ctypes.Array
    keep: list = field(default_factory=list)  # buffers the context points into


@dataclass
class Walk:
    calls: int  # scan_step calls made
    budget: int  # calls JudgeCore.scan allows for the bytes
    stopped: bool  # the walk ended itself (END or a refusal), within the budget


class ScanJit:
    def __init__(self, ir_: MatcherIR, window: int = MAX_SCAN) -> None:
        ob = ObjectBuilder("scanjit")
        tables = Tables(ob, ir_)
        tables.emit()
        judge = JudgeCore(ob, tables, window)
        self.literals = judge.literals
        step = judge.scan_step(judge.scan_byte(judge.path_append()))
        path_step = judge.path_step()
        for fn in (step, path_step):
            fn.linkage = "external"
        text = str(ob.finish())
        text = text.replace('target triple = "bpf"', "")
        text = re.sub(r'target datalayout = "[^"]*"', "", text)
        text = re.sub(r"declare [^\n]*" + re.escape(_PASSTHROUGH) + r"[^\n]*", "", text)
        text = text.replace(_PASSTHROUGH, "passthrough")
        text += "\ndefine i64 @passthrough(i32 %a, i64 %b) noinline { ret i64 %b }\n"
        module = llvm.parse_assembly(text)
        machine = llvm.Target.from_default_triple().create_target_machine(opt=2)
        module.triple = llvm.get_process_triple()
        module.data_layout = str(machine.target_data)
        module.verify()
        self._engine = llvm.create_mcjit_compiler(module, machine)
        self._engine.finalize_object()
        self._scan_step = _CALLBACK(self._engine.get_function_address("sockpol_scan_step"))
        self._path_step = _CALLBACK(self._engine.get_function_address("sockpol_path_step"))
        name = next(g.name for g in module.global_variables if not g.name.startswith("llvm."))
        self._tables = self._engine.get_global_value_address(name)
        self.t = ir_.tables
        self._size = FACTS_OFFSET + 8 * tables.nw

    def begin(self) -> Scan:
        """A head's scan as JudgeCore.begin starts it."""
        s = Scan(ctypes.create_string_buffer(self._size))
        self.put(s, "state", self.t.start)
        self.put(s, "rule", NO_RULE)
        self.put(s, "pstate", self.t.path.start)
        if self.literals:
            self.put(s, "pending", PENDING_LITERAL)
        return s

    def get(self, s: Scan, name: str) -> int:
        at = SCALAR[name]
        return int.from_bytes(s.scratch.raw[at : at + 8], "little")

    def put(self, s: Scan, name: str, value: int) -> None:
        word = (value & (1 << 64) - 1).to_bytes(8, "little")
        ctypes.memmove(ctypes.addressof(s.scratch) + SCALAR[name], word, 8)

    def scan(self, s: Scan, data: bytes) -> Walk:
        """One run's walk over `data` (the bytes pulled: data_end is their end), from pos 0,
        with JudgeCore.scan's budget of calls."""
        n = len(data)
        buf = ctypes.create_string_buffer(data + bytes(64), n + 64)
        base = ctypes.addressof(buf)
        ctx = (ctypes.c_uint64 * 4)(base, base + n, ctypes.addressof(s.scratch), self._tables)
        s.keep[:] = [buf, ctx]
        self.put(s, "pos", 0)
        self.put(s, "limit", n)
        budget = 2 * n + 2
        for i in range(budget):
            if self._scan_step(i, ctypes.addressof(ctx)):
                return Walk(i + 1, budget, True)
        return Walk(budget, budget, False)

    def path_state(self, s: Scan) -> int:
        """JudgeCore.decide's walk of the path bytes the scan did not walk; the path state."""
        rest = self.get(s, "out_len") - self.get(s, "pwalked")
        for i in range((rest + PATH_CHUNK - 1) // PATH_CHUNK):
            if self._path_step(i, ctypes.addressof(s.keep[1])):
                break
        return self.get(s, "pstate")

    def path(self, s: Scan) -> bytes:
        return s.scratch.raw[: min(self.get(s, "out_len"), PATH_MAX)]
