"""Debug metadata from which LLVM's BPF backend writes BTF.

libbpf and the kernel need BTF for two things here: BTF-defined maps (the `.maps` section, whose
struct members encode map type, size, key and value the way libbpf's `__uint`/`__type` macros do)
and `func_info` for every function, without which the verifier refuses a callback passed to
`bpf_loop` ("missing btf func_info"). The shapes below mirror what clang emits for the same C.
"""

from __future__ import annotations

from llvmlite import ir


class DebugInfo:
    def __init__(self, module: ir.Module, filename: str, producer: str) -> None:
        self.m = module
        self.file = module.add_debug_info("DIFile", {"filename": filename, "directory": ""})
        self.cu = module.add_debug_info(
            "DICompileUnit",
            {
                "language": ir.DIToken("DW_LANG_C99"),
                "file": self.file,
                "producer": producer,
                "isOptimized": True,
                "runtimeVersion": 0,
                "emissionKind": ir.DIToken("FullDebug"),
            },
            is_distinct=True,
        )
        self.globals: list[ir.DIValue] = []
        self._basic: dict[str, ir.DIValue] = {}
        self._locations: dict[str, ir.DIValue] = {}
        module.add_named_metadata("llvm.dbg.cu", self.cu)
        flags = module.add_named_metadata("llvm.module.flags")
        flags.add(module.add_metadata([ir.IntType(32)(7), "Dwarf Version", ir.IntType(32)(5)]))
        flags.add(module.add_metadata([ir.IntType(32)(2), "Debug Info Version", ir.IntType(32)(3)]))

    def basic(self, name: str, bits: int, signed: bool) -> ir.DIValue:
        if name not in self._basic:
            encoding = "DW_ATE_signed" if signed else "DW_ATE_unsigned"
            if bits == 8:
                encoding += "_char"
            self._basic[name] = self.m.add_debug_info(
                "DIBasicType", {"name": name, "size": bits, "encoding": ir.DIToken(encoding)}
            )
        return self._basic[name]

    def pointer(self, base: ir.DIValue | None) -> ir.DIValue:
        return self.m.add_debug_info(
            "DIDerivedType",
            {"tag": ir.DIToken("DW_TAG_pointer_type"), "baseType": base, "size": 64},
        )

    def array(self, base: ir.DIValue, count: int, element_bits: int) -> ir.DIValue:
        subrange = self.m.add_debug_info("DISubrange", {"count": count})
        return self.m.add_debug_info(
            "DICompositeType",
            {
                "tag": ir.DIToken("DW_TAG_array_type"),
                "baseType": base,
                "size": count * element_bits,
                "elements": self.m.add_metadata([subrange]),
            },
        )

    def _struct(self, name: str | None, members: list[tuple[str, ir.DIValue, int]]) -> ir.DIValue:
        """members: (name, type, size in bits), laid out back to back."""
        # Members carry no `scope` back to the struct: llvmlite hashes metadata by content and
        # cannot hash a cycle, and BTF does not need it.
        struct = self.m.add_debug_info(
            "DICompositeType",
            {
                "tag": ir.DIToken("DW_TAG_structure_type"),
                **({"name": name} if name else {}),
                "file": self.file,
                "size": sum(bits for _, _, bits in members),
                "elements": self.m.add_metadata([]),
            },
            is_distinct=True,
        )
        offset = 0
        elements = []
        for member_name, typ, bits in members:
            elements.append(
                self.m.add_debug_info(
                    "DIDerivedType",
                    {
                        "tag": ir.DIToken("DW_TAG_member"),
                        "name": member_name,
                        "file": self.file,
                        "baseType": typ,
                        "size": bits,
                        "offset": offset,
                    },
                )
            )
            offset += bits
        struct.operands = tuple(
            (k, self.m.add_metadata(elements) if k == "elements" else v) for k, v in struct.operands
        )
        return struct

    def global_variable(self, gv: ir.GlobalVariable, typ: ir.DIValue) -> None:
        var = self.m.add_debug_info(
            "DIGlobalVariable",
            {
                "name": gv.name,
                "scope": self.cu,
                "file": self.file,
                "type": typ,
                "isLocal": False,
                "isDefinition": True,
            },
            is_distinct=True,
        )
        expr = self.m.add_debug_info(
            "DIGlobalVariableExpression",
            {"var": var, "expr": self.m.add_debug_info("DIExpression", {})},
        )
        gv.set_metadata("dbg", expr)
        self.globals.append(expr)

    def map_type(
        self,
        map_type: int,
        max_entries: int | None,
        key: ir.DIValue | None,
        value: ir.DIValue | None,
        map_flags: int = 0,
    ) -> ir.DIValue:
        """The struct libbpf's `__uint(type, ..)`, `__uint(max_entries, ..)`, `__type(key, ..)`,
        `__type(value, ..)` produce: numbers are carried as pointers to int arrays of that size."""
        int_t = self.basic("int", 32, True)

        def number(name: str, n: int) -> tuple[str, ir.DIValue, int]:
            return (name, self.pointer(self.array(int_t, n, 32)), 64)

        members = [number("type", map_type)]
        if max_entries is not None:
            members.append(number("max_entries", max_entries))
        if map_flags:
            members.append(number("map_flags", map_flags))
        if key is not None:  # a ring buffer has neither key nor value
            members.append(("key", self.pointer(key), 64))
        if value is not None:
            members.append(("value", self.pointer(value), 64))
        return self._struct(None, members)

    def function(
        self, fn: ir.Function, ret: ir.DIValue, args: list[tuple[str, ir.DIValue]], local: bool
    ) -> None:
        """BTF FUNC for `fn`. The kernel rejects a FUNC whose parameters have no names, and the
        backend takes the names from argument variables in the subprogram's retainedNodes."""
        proto = self.m.add_debug_info(
            "DISubroutineType", {"types": self.m.add_metadata([ret, *(t for _, t in args)])}
        )
        flags = "DISPFlagDefinition | DISPFlagOptimized"
        if local:
            flags = "DISPFlagLocalToUnit | " + flags
        sp = self.m.add_debug_info(
            "DISubprogram",
            {
                "name": fn.name,
                "scope": self.file,
                "file": self.file,
                "line": 1,
                "type": proto,
                "scopeLine": 1,
                "flags": ir.DIToken("DIFlagPrototyped"),
                "spFlags": ir.DIToken(flags),
                "unit": self.cu,
            },
            is_distinct=True,
        )
        # Made before the SP gets its retainedNodes, which would make it unhashable (a cycle).
        self._locations[fn.name] = self.m.add_debug_info(
            "DILocation", {"line": 1, "column": 1, "scope": sp}
        )
        params = [
            self.m.add_debug_info(
                "DILocalVariable",
                {"name": name, "arg": i, "scope": sp, "file": self.file, "line": 1, "type": typ},
            )
            for i, (name, typ) in enumerate(args, start=1)
        ]
        # Added after the variables exist: llvmlite cannot hash the SP <-> variable cycle.
        sp.operands = tuple(sp.operands) + (("retainedNodes", self.m.add_metadata(params)),)
        fn.set_metadata("dbg", sp)

    def location(self, fn: ir.Function) -> ir.DIValue:
        """A location inside `fn` (for calls between functions that have debug info)."""
        return self._locations[fn.name]

    def finish(self) -> None:
        """Close the CU <-> globals cycle once every global is known."""
        self.cu.operands = tuple(self.cu.operands) + (
            ("globals", self.m.add_metadata(self.globals)),
        )
