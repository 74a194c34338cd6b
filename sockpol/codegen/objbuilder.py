"""The BPF object as libbpf wants it: an LLVM module for the `bpf` triple, its BTF (debug info),
the license, BTF-defined maps in `.maps`, and functions with the metadata the verifier needs.

Every program sockpol emits (the sk_msg backend in emit.py; a second backend the same way) is
built on one `ObjectBuilder`, so libbpf's ELF contract lives in one place (docs/design.md,
"Object contract"). The order of creation is the order in the object: callers create maps,
tables and functions in a fixed order, which is what keeps objects byte-identical build to build.
"""

from __future__ import annotations

from llvmlite import ir

from sockpol import __version__
from sockpol.codegen.debuginfo import DebugInfo
from sockpol.codegen.helpers import I8, I32, PTR

DATA_LAYOUT = "e-m:e-p:64:64-i64:64-i128:128-n32:64-S128"


class ObjectBuilder:
    def __init__(self, name: str) -> None:
        self.m = ir.Module(name=f"sockpol.{name}")
        self.m.triple = "bpf"
        self.m.data_layout = DATA_LAYOUT
        self.dbg = DebugInfo(self.m, f"{name}.pol", f"sockpol {__version__}")
        # The BTF base types every map and function declares with.
        self.u8 = self.dbg.basic("unsigned char", 8, False)
        self.u32 = self.dbg.basic("unsigned int", 32, False)
        self.u64 = self.dbg.basic("unsigned long long", 64, False)
        self.long = self.dbg.basic("long", 64, True)
        self.int = self.dbg.basic("int", 32, True)
        self.void_ptr = self.dbg.pointer(None)
        self.used: list[ir.GlobalVariable] = []

    def license(self) -> None:
        text = bytearray(b"GPL\0")
        gv = ir.GlobalVariable(self.m, ir.ArrayType(I8, len(text)), "_license")
        gv.initializer = ir.Constant(gv.value_type, text)
        gv.section = "license"
        self.dbg.global_variable(gv, self.dbg.array(self.dbg.basic("char", 8, True), len(text), 8))
        self.used.append(gv)

    def btf_map(
        self, name: str, map_type: int, entries: int | None, key, value, flags: int = 0
    ) -> ir.GlobalVariable:
        members = 1 + (entries is not None) + bool(flags) + (key is not None) + (value is not None)
        typ = ir.LiteralStructType([PTR] * members)
        gv = ir.GlobalVariable(self.m, typ, name)
        gv.initializer = ir.Constant(typ, None)
        gv.section = ".maps"
        gv.align = 8
        self.dbg.global_variable(gv, self.dbg.map_type(map_type, entries, key, value, flags))
        self.used.append(gv)
        return gv

    def function(
        self,
        name: str,
        ret: ir.Type,
        args: list[tuple[str, ir.Type]],
        section: str | None = None,
    ) -> tuple[ir.Function, ir.IRBuilder]:
        """A program (with `section`) or a static function: `nounwind`, with a DISubprogram
        whose parameters are named (the verifier refuses a bpf_loop callback without BTF
        func_info, and a BTF FUNC with unnamed parameters)."""
        fn = ir.Function(self.m, ir.FunctionType(ret, [t for _, t in args]), name)
        fn.attributes.add("nounwind")
        if section:
            fn.section = section
        else:
            fn.linkage = "internal"

        def di(t: ir.Type) -> object:
            if isinstance(t, ir.PointerType):
                return self.void_ptr
            return {32: self.u32, 64: self.long}[t.width]

        di_ret = self.int if ret == I32 else self.long
        self.dbg.function(fn, di_ret, [(n, di(t)) for n, t in args], local=section is None)
        for arg, (arg_name, _) in zip(fn.args, args, strict=True):
            arg.name = arg_name
        return fn, ir.IRBuilder(fn.append_basic_block("entry"))

    def call(self, b: ir.IRBuilder, fn: ir.Function, *args: ir.Value) -> ir.Value:
        # A call to a function with debug info needs a location, or LLVM's verifier refuses it.
        inst = b.call(fn, list(args))
        inst.set_metadata("dbg", self.dbg.location(b.function))
        return inst

    def finish(self) -> ir.Module:
        used_t = ir.ArrayType(PTR, len(self.used))
        used = ir.GlobalVariable(self.m, used_t, "llvm.compiler.used")
        used.linkage = "appending"
        used.section = "llvm.metadata"
        used.initializer = ir.Constant(used_t, self.used)
        self.dbg.finish()
        return self.m
