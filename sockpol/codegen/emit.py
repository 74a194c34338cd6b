"""Emit the matcher IR as an LLVM module for the BPF target.

The generated object has:
- `sockpol_msg` (section `sk_msg`): pulls the first `max-head` bytes of each message into the data
  window, walks the scanner automaton over them with `bpf_loop` (one callback per byte, so the
  verifier checks the step once rather than once per byte), then finds the first rule whose facts
  all hold, again with `bpf_loop`. It sets `bpf_msg_apply_bytes` on every run so the verdict covers
  exactly the request head plus its Content-Length body, and corks an incomplete head.
- `sockpol_sockops` (section `sockops`): inserts client-side TCP connections to governed ports into
  the sockhash when they become established.
- `sockpol_socks`: the BTF-defined sockhash, and `sockpol_tables` in `.data`: every policy-dependent
  number the program reads, so a later reload can swap tables without touching programs.

`simulate.py` is the same algorithm in Python; keep the two in step.
"""

from __future__ import annotations

from llvmlite import ir

from sockpol import __version__
from sockpol.codegen import helpers as h
from sockpol.codegen.debuginfo import DebugInfo
from sockpol.codegen.lower import MatcherIR
from sockpol.codegen.scanner import (
    END,
    FLAG_CL_DIGIT,
    SINGLETON_FLAGS,
    TERMINAL_STATES,
    Reason,
)
from sockpol.codegen.simulate import CL_MAX, NO_RULE
from sockpol.metadata import MSG_PROGRAM, SOCK_MAP, SOCKOPS_PROGRAM

I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
PTR = ir.PointerType()
SK_DROP, SK_PASS = 0, 1
BPF_MAP_TYPE_SOCKHASH = 18
SOCK_MAP_ENTRIES = 65536
BPF_NOEXIST = 1
BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB = 4
# Largest packet offset the verifier accepts is 0xffff, and we read data[i] with data + i + 1.
MAX_SCAN = 0xFFFE
DATA_LAYOUT = "e-m:e-p:64:64-i64:64-i128:128-n32:64-S128"

# struct sk_msg_md and struct bpf_sock_ops field offsets (include/uapi/linux/bpf.h).
MSG_DATA, MSG_DATA_END, MSG_SIZE = 0, 8, 68
OPS_OP, OPS_FAMILY, OPS_REMOTE_PORT = 0, 20, 64
AF_INET, AF_INET6 = 2, 10

# Field numbers of the scan state on the stack, shared with the callbacks.
S_DATA, S_DATA_END, S_STATE, S_POS, S_CL, S_SEEN, S_RULE, S_FACTS = range(8)
# Field numbers of the tables struct.
T_CLASSMAP, T_TRANS, T_INFO, T_FACTSETS, T_NEED, T_ALLOW, T_CONFIG = range(7)
C_NRULES, C_DEFAULT_ALLOW, C_MAX_HEAD, C_START = range(4)


def gep(b: ir.IRBuilder, base: ir.Value, etype: ir.Type, indices: list[ir.Value]) -> ir.Value:
    """A GEP whose result is an opaque `ptr`, whatever llvmlite thinks the base points to."""
    inst = b.gep(base, indices, inbounds=True, source_etype=etype)
    inst.type = PTR
    return inst


def _pow2(n: int) -> int:
    return 1 << max(0, (max(n, 1) - 1).bit_length())


class _Emitter:
    def __init__(self, ir_: MatcherIR) -> None:
        self.ir = ir_
        self.m = ir.Module(name=f"sockpol.{ir_.policy.name}")
        self.m.triple = "bpf"
        self.m.data_layout = DATA_LAYOUT
        self.dbg = DebugInfo(self.m, f"{ir_.policy.name}.pol", f"sockpol {__version__}")
        self.nw = ir_.fact_words
        self.words_t = ir.ArrayType(I64, self.nw)
        self.scan_t = ir.LiteralStructType([PTR, PTR, I64, I64, I64, I64, I64, self.words_t])
        t = ir_.tables
        self.n_trans = len(t.trans)
        self.n_states = len(t.info)
        self.n_factsets = _pow2(len(t.factsets))
        self.n_rules = _pow2(len(ir_.rules))
        self.u32 = self.dbg.basic("unsigned int", 32, False)
        self.u64 = self.dbg.basic("unsigned long long", 64, False)
        self.long = self.dbg.basic("long", 64, True)
        self.int = self.dbg.basic("int", 32, True)
        self.void_ptr = self.dbg.pointer(None)

    # --- globals ---

    def license(self) -> None:
        text = bytearray(b"GPL\0")
        gv = ir.GlobalVariable(self.m, ir.ArrayType(I8, len(text)), "_license")
        gv.initializer = ir.Constant(gv.value_type, text)
        gv.section = "license"
        self.dbg.global_variable(gv, self.dbg.array(self.dbg.basic("char", 8, True), len(text), 8))
        self.used = [gv]

    def sock_map(self) -> None:
        typ = ir.LiteralStructType([PTR, PTR, PTR, PTR])
        gv = ir.GlobalVariable(self.m, typ, SOCK_MAP)
        gv.initializer = ir.Constant(typ, None)
        gv.section = ".maps"
        gv.align = 8
        self.dbg.global_variable(
            gv, self.dbg.map_type(BPF_MAP_TYPE_SOCKHASH, SOCK_MAP_ENTRIES, self.u64, self.u32)
        )
        self.socks = gv
        self.used.append(gv)

    def tables(self) -> None:
        ir_, t = self.ir, self.ir.tables
        factsets = [ir_.words(fs) for fs in t.factsets]
        factsets += [[0] * self.nw] * (self.n_factsets - len(factsets))
        need = [ir_.words(r.facts) for r in ir_.rules]
        need += [[0] * self.nw] * (self.n_rules - len(need))
        allow = [int(r.allow) for r in ir_.rules] + [0] * (self.n_rules - len(ir_.rules))
        config = [0] * 4
        config[C_NRULES] = len(ir_.rules)
        config[C_DEFAULT_ALLOW] = int(ir_.policy.default.value == "allow")
        config[C_MAX_HEAD] = min(ir_.policy.max_head, MAX_SCAN)
        config[C_START] = t.start

        def words(rows: list[list[int]]) -> ir.Constant:
            return ir.Constant(
                ir.ArrayType(self.words_t, len(rows)),
                [ir.Constant(self.words_t, row) for row in rows],
            )

        fields = [
            ir.Constant(ir.ArrayType(I8, 256), bytearray(t.classmap)),
            ir.Constant(ir.ArrayType(I16, self.n_trans), t.trans),
            ir.Constant(ir.ArrayType(I32, self.n_states), t.info),
            words(factsets),
            words(need),
            ir.Constant(ir.ArrayType(I32, self.n_rules), allow),
            ir.Constant(ir.ArrayType(I32, 4), config),
        ]
        typ = ir.LiteralStructType([f.type for f in fields])
        gv = ir.GlobalVariable(self.m, typ, "sockpol_tables")
        gv.initializer = ir.Constant(typ, fields)
        gv.section = ".data"
        gv.align = 8
        self.tables_gv = gv
        self.tables_t = typ
        self.used.append(gv)

    def table_ptr(self, b: ir.IRBuilder, field: int, *index: ir.Value) -> ir.Value:
        return gep(b, self.tables_gv, self.tables_t, [I32(0), I32(field), *index])

    def config(self, b: ir.IRBuilder, which: int) -> ir.Value:
        return b.zext(b.load(self.table_ptr(b, T_CONFIG, I64(which)), typ=I32), I64)

    # --- helpers for the scan struct ---

    def field(self, b: ir.IRBuilder, scan: ir.Value, index: int, *rest: ir.Value) -> ir.Value:
        return gep(b, scan, self.scan_t, [I32(0), I32(index), *rest])

    def load_field(self, b: ir.IRBuilder, scan: ir.Value, index: int) -> ir.Value:
        typ = PTR if index in (S_DATA, S_DATA_END) else I64
        return b.load(self.field(b, scan, index), typ=typ)

    def function(self, name: str, fnty: ir.FunctionType, section: str | None) -> ir.Function:
        fn = ir.Function(self.m, fnty, name)
        fn.attributes.add("nounwind")
        if section:
            fn.section = section
        else:
            fn.linkage = "internal"
        return fn

    # --- the per-byte scanner step: bpf_loop callback ---

    def scan_step(self) -> ir.Function:
        fn = self.function("sockpol_scan_step", ir.FunctionType(I64, [I32, PTR]), None)
        self.dbg.function(fn, self.long, [("index", self.u32), ("ctx", self.void_ptr)], local=True)
        index, scan = fn.args
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        stop = fn.append_basic_block("stop")
        body = fn.append_basic_block("in_window")
        i = b.zext(index, I64)
        # Bounds the variable packet offset for the verifier; unreachable for real heads.
        b.cbranch(b.icmp_unsigned(">", i, I64(MAX_SCAN)), stop, fn.append_basic_block("bounded"))
        b.position_at_end(fn.blocks[-1])
        data = self.load_field(b, scan, S_DATA)
        data_end = self.load_field(b, scan, S_DATA_END)
        # Not inbounds: data + i + 1 may point past the window; that is what the check tests.
        p = b.gep(data, [i], source_etype=I8)
        p_next = b.gep(p, [I64(1)], source_etype=I8)
        b.cbranch(b.icmp_unsigned(">", p_next, data_end), stop, body)

        b.position_at_end(stop)
        b.ret(I64(1))

        b.position_at_end(body)
        t = self.ir.tables
        byte = b.zext(b.load(p, typ=I8), I64)
        state = b.and_(self.load_field(b, scan, S_STATE), I64(self.n_states - 1))
        cls = b.zext(b.load(self.table_ptr(b, T_CLASSMAP, byte), typ=I8), I64)
        tindex = b.and_(b.or_(b.shl(state, I64(t.class_bits)), cls), I64(self.n_trans - 1))
        nxt = b.zext(b.load(self.table_ptr(b, T_TRANS, tindex), typ=I16), I64)
        info_index = b.and_(nxt, I64(self.n_states - 1))
        info = b.zext(b.load(self.table_ptr(b, T_INFO, info_index), typ=I32), I64)

        emit = b.and_(info, I64(0xFFFF))
        with b.if_then(b.icmp_unsigned("!=", emit, I64(0))):
            row = b.and_(emit, I64(self.n_factsets - 1))
            for w in range(self.nw):
                src = b.load(self.table_ptr(b, T_FACTSETS, row, I64(w)), typ=I64)
                dst = self.field(b, scan, S_FACTS, I64(w))
                b.store(b.or_(b.load(dst, typ=I64), src), dst)

        # Content-Length digits accumulate; an oversized value refuses the request.
        cl_slot = self.field(b, scan, S_CL)
        is_digit = b.icmp_unsigned("!=", b.and_(info, I64(FLAG_CL_DIGIT)), I64(0))
        cl_old = b.load(cl_slot, typ=I64)
        cl_new = b.select(is_digit, b.sub(b.add(b.mul(cl_old, I64(10)), byte), I64(0x30)), cl_old)
        b.store(cl_new, cl_slot)
        too_big = b.icmp_unsigned(">", cl_new, I64(CL_MAX))
        nxt = b.select(too_big, I64(Reason.BAD_CONTENT_LENGTH), nxt)

        # Host and Content-Length may appear once: a second line refuses the request.
        seen_slot = self.field(b, scan, S_SEEN)
        seen = b.load(seen_slot, typ=I64)
        singles = b.and_(info, I64(SINGLETON_FLAGS))
        dup = b.icmp_unsigned("!=", b.and_(singles, seen), I64(0))
        nxt = b.select(dup, I64(Reason.DUPLICATE_HEADER), nxt)
        b.store(b.or_(seen, singles), seen_slot)

        b.store(nxt, self.field(b, scan, S_STATE))
        b.store(b.add(i, I64(1)), self.field(b, scan, S_POS))
        b.ret(b.zext(b.icmp_unsigned("<", nxt, I64(TERMINAL_STATES)), I64))
        return fn

    # --- first matching rule: bpf_loop callback ---

    def rule_step(self) -> ir.Function:
        fn = self.function("sockpol_rule_step", ir.FunctionType(I64, [I32, PTR]), None)
        self.dbg.function(fn, self.long, [("index", self.u32), ("ctx", self.void_ptr)], local=True)
        index, scan = fn.args
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        r = b.and_(b.zext(index, I64), I64(self.n_rules - 1))
        ok = ir.Constant(ir.IntType(1), 1)
        for w in range(self.nw):
            need = b.load(self.table_ptr(b, T_NEED, r, I64(w)), typ=I64)
            have = b.load(self.field(b, scan, S_FACTS, I64(w)), typ=I64)
            ok = b.and_(ok, b.icmp_unsigned("==", b.and_(have, need), need))
        with b.if_then(ok):
            b.store(b.zext(index, I64), self.field(b, scan, S_RULE))
        b.ret(b.zext(ok, I64))
        return fn

    # --- sk_msg program ---

    def msg_program(self, scan_step: ir.Function, rule_step: ir.Function) -> None:
        fn = self.function(MSG_PROGRAM, ir.FunctionType(I32, [PTR]), "sk_msg")
        self.dbg.function(fn, self.int, [("msg", self.void_ptr)], local=False)
        msg = fn.args[0]
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        scan = b.alloca(self.scan_t, name="scan")

        def ctx_load(offset: int, typ: ir.Type) -> ir.Value:
            return b.load(gep(b, msg, I8, [I64(offset)]), typ=typ)

        def verdict(value: int, apply: ir.Value | None = None) -> None:
            # Every run sets apply_bytes: a stale value from an earlier run would otherwise cut
            # this message at the wrong place.
            h.call(b, h.MSG_APPLY_BYTES, msg, apply if apply is not None else I32(0))
            b.ret(I32(value))

        size = b.zext(ctx_load(MSG_SIZE, I32), I64)
        with b.if_then(b.icmp_unsigned("==", size, I64(0)), likely=False):
            verdict(SK_PASS)
        max_head = self.config(b, C_MAX_HEAD)
        n = b.select(b.icmp_unsigned("<", size, max_head), size, max_head)
        pulled = h.call(b, h.MSG_PULL_DATA, msg, I32(0), b.trunc(n, I32), I64(0))
        with b.if_then(b.icmp_unsigned("!=", pulled, I64(0)), likely=False):
            verdict(SK_DROP)

        # Packet pointers are valid only now, after the pull.
        b.store(ctx_load(MSG_DATA, PTR), self.field(b, scan, S_DATA))
        b.store(ctx_load(MSG_DATA_END, PTR), self.field(b, scan, S_DATA_END))
        b.store(self.config(b, C_START), self.field(b, scan, S_STATE))
        for slot in (S_POS, S_CL, S_SEEN):
            b.store(I64(0), self.field(b, scan, slot))
        b.store(I64(NO_RULE), self.field(b, scan, S_RULE))
        for w in range(self.nw):
            b.store(I64(0), self.field(b, scan, S_FACTS, I64(w)))
        h.call(b, h.LOOP, b.trunc(n, I32), scan_step, scan, I64(0))

        state = self.load_field(b, scan, S_STATE)
        complete = fn.append_basic_block("head_complete")
        not_complete = fn.append_basic_block("head_not_complete")
        b.cbranch(b.icmp_unsigned("==", state, I64(END)), complete, not_complete)

        b.position_at_end(complete)
        h.call(b, h.LOOP, b.trunc(self.config(b, C_NRULES), I32), rule_step, scan, I64(0))
        rule = self.load_field(b, scan, S_RULE)
        matched = b.icmp_unsigned("!=", rule, I64(NO_RULE))
        rule_index = b.and_(rule, I64(self.n_rules - 1))
        rule_allow = b.zext(b.load(self.table_ptr(b, T_ALLOW, rule_index), typ=I32), I64)
        allow = b.select(matched, rule_allow, self.config(b, C_DEFAULT_ALLOW))
        # The verdict covers the head and its body; later bytes are the next request.
        covered = b.add(self.load_field(b, scan, S_POS), self.load_field(b, scan, S_CL))
        h.call(b, h.MSG_APPLY_BYTES, msg, b.trunc(covered, I32))
        b.ret(b.select(b.icmp_unsigned("!=", allow, I64(0)), I32(SK_PASS), I32(SK_DROP)))

        b.position_at_end(not_complete)
        with b.if_then(b.icmp_unsigned("<", state, I64(TERMINAL_STATES))):
            verdict(SK_DROP)  # the scanner refused the head
        with b.if_then(b.icmp_unsigned(">=", size, max_head)):
            verdict(SK_DROP)  # no end of head within max-head bytes
        # The head continues in a later send: hold these bytes and judge the whole head then.
        h.call(b, h.MSG_CORK_BYTES, msg, b.trunc(b.add(size, I64(1)), I32))
        verdict(SK_PASS)

    # --- sock_ops program ---

    def sockops_program(self) -> None:
        fn = self.function(SOCKOPS_PROGRAM, ir.FunctionType(I32, [PTR]), "sockops")
        self.dbg.function(fn, self.int, [("ops", self.void_ptr)], local=False)
        ops = fn.args[0]
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        done = fn.append_basic_block("done")
        key = b.alloca(I64, name="cookie")

        def ctx_load(offset: int) -> ir.Value:
            return b.load(gep(b, ops, I8, [I64(offset)]), typ=I32)

        op = ctx_load(OPS_OP)
        check_family = fn.append_basic_block("check_family")
        b.cbranch(
            b.icmp_unsigned("==", op, I32(BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)), check_family, done
        )
        b.position_at_end(check_family)
        family = ctx_load(OPS_FAMILY)
        inet = b.or_(
            b.icmp_unsigned("==", family, I32(AF_INET)),
            b.icmp_unsigned("==", family, I32(AF_INET6)),
        )
        check_port = fn.append_basic_block("check_port")
        b.cbranch(inet, check_port, done)
        b.position_at_end(check_port)
        # remote_port holds the port in network order in its upper 16 bits (kernel ctx rewrite).
        raw = ctx_load(OPS_REMOTE_PORT)
        bswap = self.m.declare_intrinsic("llvm.bswap", [I32])
        port = b.call(bswap, [raw])
        governed = ir.Constant(ir.IntType(1), 0)
        for r in self.ir.policy.ports:
            if r.low == r.high:
                hit = b.icmp_unsigned("==", port, I32(r.low))
            else:
                hit = b.and_(
                    b.icmp_unsigned(">=", port, I32(r.low)),
                    b.icmp_unsigned("<=", port, I32(r.high)),
                )
            governed = b.or_(governed, hit)
        insert = fn.append_basic_block("insert")
        b.cbranch(governed, insert, done)
        b.position_at_end(insert)
        b.store(h.call(b, h.GET_SOCKET_COOKIE, ops), key)
        h.call(b, h.SOCK_HASH_UPDATE, ops, self.socks, key, I64(BPF_NOEXIST))
        b.branch(done)
        b.position_at_end(done)
        b.ret(I32(1))

    def build(self) -> ir.Module:
        self.license()
        self.sock_map()
        self.tables()
        self.msg_program(self.scan_step(), self.rule_step())
        self.sockops_program()
        used_t = ir.ArrayType(PTR, len(self.used))
        used = ir.GlobalVariable(self.m, used_t, "llvm.compiler.used")
        used.linkage = "appending"
        used.section = "llvm.metadata"
        used.initializer = ir.Constant(used_t, self.used)
        self.dbg.finish()
        return self.m


def emit_module(matcher: MatcherIR) -> ir.Module:
    return _Emitter(matcher).build()
