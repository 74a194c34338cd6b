"""From an llvmlite module to BPF assembly text or an ELF object, through LLVM's BPF backend."""

from __future__ import annotations

import functools

from llvmlite import binding as llvm
from llvmlite import ir

from sockpol.metadata import SECTION

I8 = ir.IntType(8)


def add_metadata_section(module: ir.Module, payload: bytes) -> None:
    """Embed the policy record in `.sockpol.meta`. The program never reads it, so it is kept by
    `llvm.compiler.used`-style retention through a non-internal constant; libbpf skips sections it
    does not know."""
    data = bytearray(payload + b"\0")
    gv = ir.GlobalVariable(module, ir.ArrayType(I8, len(data)), "sockpol_meta")
    gv.initializer = ir.Constant(gv.value_type, data)
    gv.global_constant = True
    gv.section = SECTION
    gv.align = 1
    used = module.globals.get("llvm.compiler.used")
    if used is not None:  # extend the list emit.py made
        elements = [*used.initializer.constant, gv]
        used.value_type = ir.ArrayType(used.value_type.element, len(elements))
        used.initializer = ir.Constant(used.value_type, elements)


@functools.cache
def _target_machine() -> llvm.TargetMachine:
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    target = llvm.Target.from_triple("bpf")
    return target.create_target_machine(opt=2, reloc="static", codemodel="default")


def _optimized(ir_text: str) -> llvm.ModuleRef:
    ref = llvm.parse_assembly(ir_text)
    ref.verify()
    tm = _target_machine()
    tuning = llvm.create_pipeline_tuning_options(speed_level=2)
    builder = llvm.create_pass_builder(tm, tuning)
    builder.getModulePassManager().run(ref, builder)
    ref.verify()
    return ref


def llvm_ir(module: ir.Module) -> str:
    return str(module)


def assembly(module: ir.Module) -> str:
    return _target_machine().emit_assembly(_optimized(str(module)))


def object_code(module: ir.Module) -> bytes:
    return object_code_from_ir(str(module))


def object_code_from_ir(ir_text: str) -> bytes:
    """The object of a module's LLVM IR text: what LLVM does, from text alone (so the VM tests
    can have it done by the host's LLVM: tests/vm/llvm_offload.py)."""
    return _target_machine().emit_object(_optimized(ir_text))
