"""BPF helper functions used by the generated programs: ids and signatures in one place.

Ids are from include/uapi/linux/bpf.h (checked against Linux 6.1 and 6.18); all of these exist for
BPF_PROG_TYPE_SK_MSG or BPF_PROG_TYPE_SOCK_OPS on both.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from llvmlite import ir

from sockpol.contract import BPF_FUNC_LOOP
from sockpol.dsl.ast import PortRange

I1, I8, I16, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
PTR = ir.PointerType()


def gep(b: ir.IRBuilder, base: ir.Value, etype: ir.Type, indices: list[ir.Value]) -> ir.Value:
    """A GEP whose result is an opaque `ptr`, whatever llvmlite thinks the base points to."""
    inst = b.gep(base, indices, inbounds=True, source_etype=etype)
    inst.type = PTR
    return inst


@dataclass(frozen=True)
class Helper:
    name: str
    id: int
    ret: ir.Type
    args: tuple[ir.Type, ...]

    @property
    def function_type(self) -> ir.FunctionType:
        return ir.FunctionType(self.ret, self.args)


MAP_LOOKUP_ELEM = Helper("map_lookup_elem", 1, PTR, (PTR, PTR))
TAIL_CALL = Helper("tail_call", 12, I64, (PTR, PTR, I32))
KTIME_GET_NS = Helper("ktime_get_ns", 5, I64, ())
GET_CURRENT_PID_TGID = Helper("get_current_pid_tgid", 14, I64, ())
MAP_UPDATE_ELEM = Helper("map_update_elem", 2, I64, (PTR, PTR, PTR, I64))
MAP_DELETE_ELEM = Helper("map_delete_elem", 3, I64, (PTR, PTR))
SKB_STORE_BYTES = Helper("skb_store_bytes", 9, I64, (PTR, I32, PTR, I32, I64))
SKB_CHANGE_TAIL = Helper("skb_change_tail", 38, I64, (PTR, I32, I64))
SKB_PULL_DATA = Helper("skb_pull_data", 39, I64, (PTR, I32))
GET_SOCKET_COOKIE = Helper("get_socket_cookie", 46, I64, (PTR,))
SOCK_OPS_CB_FLAGS_SET = Helper("sock_ops_cb_flags_set", 59, I64, (PTR, I32))
SK_REDIRECT_HASH = Helper("sk_redirect_hash", 72, I64, (PTR, PTR, PTR, I64))
MSG_APPLY_BYTES = Helper("msg_apply_bytes", 61, I64, (PTR, I32))
MSG_CORK_BYTES = Helper("msg_cork_bytes", 62, I64, (PTR, I32))
MSG_PULL_DATA = Helper("msg_pull_data", 63, I64, (PTR, I32, I32, I64))
MSG_REDIRECT_HASH = Helper("msg_redirect_hash", 71, I64, (PTR, PTR, PTR, I64))
SOCK_HASH_UPDATE = Helper("sock_hash_update", 70, I64, (PTR, PTR, PTR, I64))
GET_CURRENT_CGROUP_ID = Helper("get_current_cgroup_id", 80, I64, ())
MSG_PUSH_DATA = Helper("msg_push_data", 90, I64, (PTR, I32, I32, I64))
MSG_POP_DATA = Helper("msg_pop_data", 91, I64, (PTR, I32, I32, I64))
SK_STORAGE_GET = Helper("sk_storage_get", 107, PTR, (PTR, PTR, PTR, I64))
RINGBUF_OUTPUT = Helper("ringbuf_output", 130, I64, (PTR, PTR, I64, I64))
LOOP = Helper("loop", BPF_FUNC_LOOP, I64, (I32, PTR, PTR, I64))


def in_ports(b: ir.IRBuilder, port: ir.Value, ports: Iterable[PortRange]) -> ir.Value:
    """An i1: is the i32 `port` in one of the policy's port ranges (what sock_ops programs
    check before governing a connection)."""
    governed: ir.Value = ir.Constant(I1, 0)
    for r in ports:
        if r.low == r.high:
            hit = b.icmp_unsigned("==", port, ir.Constant(I32, r.low))
        else:
            hit = b.and_(
                b.icmp_unsigned(">=", port, ir.Constant(I32, r.low)),
                b.icmp_unsigned("<=", port, ir.Constant(I32, r.high)),
            )
        governed = b.or_(governed, hit)
    return governed


def call(builder: ir.IRBuilder, helper: Helper, *args: ir.Value) -> ir.Value:
    """Call a helper the way clang does: through its id cast to a function pointer."""
    target = ir.Constant(I64, helper.id).inttoptr(PTR)
    target.function_type = helper.function_type  # llvmlite needs it for opaque pointers
    return builder.call(target, list(args), name=helper.name)


def memory_barrier(builder: ir.IRBuilder) -> None:
    """An empty asm statement that clobbers memory: LLVM reads memory afresh after it (the value
    a load then yields is what the verifier knows of map memory: nothing)."""
    asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), "", "~{memory}", side_effect=True)
    builder.call(asm, [])


def opaque(builder: ir.IRBuilder, value: ir.Value) -> ir.Value:
    """`value`, with what LLVM knows of it forgotten (llvm.bpf.passthrough, which the BPF
    backend drops after optimizing): a mask applied to the result stays in the code even where
    an earlier comparison makes it redundant for LLVM. The verifier may still need it: 6.1's
    forgets the bounds of a scalar spilled before the comparison (it keeps only bounded ones)."""
    module = builder.module
    name = f"llvm.bpf.passthrough.{value.type}.{value.type}"
    fn = module.globals.get(name)
    if fn is None:
        fn = ir.Function(module, ir.FunctionType(value.type, [I32, value.type]), name)
    return builder.call(fn, [I32(0), value])
