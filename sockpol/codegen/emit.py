"""Emit the matcher IR as an LLVM module for the BPF target.

The generated object has:
- `sockpol_msg` (section `sk_msg`): pulls the first `max-head` bytes of each message into the data
  window, walks the scanner automaton over them with `bpf_loop` (one callback per byte, so the
  verifier checks the step once rather than once per byte) while normalizing the path into the
  connection's work area, walks the path automaton over the normalized path, then finds the first
  rule whose facts all hold. It sets `bpf_msg_apply_bytes` on every run so the verdict covers
  exactly the request head plus its Content-Length body, and corks an incomplete head.
- `sockpol_sockops` (section `sockops`): inserts client-side TCP connections to governed ports into
  the sockhash when they become established.
- `sockpol_socks`: the BTF-defined sockhash; `sockpol_conn`: socket storage holding the stream
  state between runs and each run's work area (normalized path, scan state); `sockpol_tables` in
  `.data`: every policy-dependent number the program reads, so a later reload can swap tables
  without touching programs.

`simulate.py` (with `normalize.py`) is the same algorithm in Python; keep them in step.
"""

from __future__ import annotations

from llvmlite import binding as llvm
from llvmlite import ir

from sockpol import __version__
from sockpol.codegen import helpers as h
from sockpol.codegen.candidates import CAND_LENGTH_SHIFT
from sockpol.codegen.comb import PAYLOAD_MASK, TAG_SHIFT
from sockpol.codegen.debuginfo import DebugInfo
from sockpol.codegen.helpers import I1, I8, I16, I32, I64, PTR, gep
from sockpol.codegen.irconst import int_array, word_rows
from sockpol.codegen.lower import MatcherIR
from sockpol.codegen.normalize import (
    HEX_DIGITS,
    MAX_DEPTH,
    NOT_DOTS,
    PATH_MAX,
    PCT_HEX1,
    PCT_LEADING_SLASH,
    PCT_NONE,
    PCT_PERCENT,
    UNRESERVED,
)
from sockpol.codegen.record import RecordingMixin
from sockpol.codegen.scanner import (
    BODY_END,
    CHUNK_LINE,
    END,
    FLAG_CL_DIGIT,
    FLAG_CL_LINE,
    FLAG_HEX_DIGIT,
    FLAG_PATH_BYTE,
    FLAG_PATH_END,
    FLAG_TE_LINE,
    RESUME_CHUNK_DATA_END,
    RESUME_CHUNK_LINE,
    RESUME_REQUEST,
    SINGLETON_FLAGS,
    TERMINAL_STATES,
    Reason,
)
from sockpol.contract import (
    AF_INET,
    AF_INET6,
    BPF_F_NO_PREALLOC,
    BPF_MAP_TYPE_SK_STORAGE,
    BPF_MAP_TYPE_SOCKHASH,
    BPF_NOEXIST,
    BPF_SK_STORAGE_GET_F_CREATE,
    BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
    CHUNK_MAX,
    CL_MAX,
    CONN_MAP,
    MAX_SCAN,
    MSG_DATA,
    MSG_DATA_END,
    MSG_PROGRAM,
    MSG_SIZE,
    MSG_SK,
    OPS_FAMILY,
    OPS_OP,
    OPS_REMOTE_PORT,
    RESUME_UNJUDGED,
    SK_DROP,
    SK_PASS,
    SOCK_MAP,
    SOCK_MAP_ENTRIES,
    SOCKOPS_PROGRAM,
    TABLES_SYMBOL,
)
from sockpol.model import tls
from sockpol.telemetry import (
    NO_RULE,
    SLOT_DEFAULT,
    SLOT_REFUSED,
    SLOT_RULES,
    SLOT_UNJUDGED,
    SLOT_WOULD_REFUSE,
)

DATA_LAYOUT = "e-m:e-p:64:64-i64:64-i128:128-n32:64-S128"
TABLES_GLOBAL = TABLES_SYMBOL

# The connection's socket storage (`sockpol_conn`): the connection's word and the bytes of a body
# or TLS record still to come (kept between runs), then the run's work area ("scratch"): the
# normalized path, the stack of segment starts (u16 each), the scan's scalars and its fact words
# (rewritten by every run).
CONN_WORD, CONN_LEFT, CONN_SCRATCH = 0, 8, 16
STACK_OFFSET = PATH_MAX
SCALARS_OFFSET = PATH_MAX + 2 * MAX_DEPTH
assert PATH_MAX & (PATH_MAX - 1) == 0 and MAX_DEPTH & (MAX_DEPTH - 1) == 0

# Why the scan state lives in map memory and not on the stack: bpf_loop callbacks share state with
# their caller through a context on the caller's stack, and kernels with upstream f597664454bd
# (6.19.y, 7.0, later 6.18.y builds) re-verify a callback until the caller's state at its entry
# converges. Scalars carried there from iteration to iteration (the automaton state, the path
# normalizer's counters) become precise, and the normalizer's branches keep distinct value ranges
# apart until the verifier gives up at a million instructions. The verifier tracks no values in
# map memory (every load is just "a scalar", and every index drawn from one is masked before use),
# so with the scalars there each callback's entry state is the same at every iteration and the
# walk converges at once. On the stack stay only the pointers the callbacks need: map memory cannot
# hold a pointer the verifier still knows as one.
# Socket storage rather than a per-CPU buffer: the socket is locked while its sendmsg runs the
# program, whereas a program run can be preempted (preempt=full or lazy) and another run on the
# same CPU would then overwrite a shared per-CPU buffer in the middle of the first one's scan.
SCAN_POINTERS = ["data", "data_end", "scratch", "tables"]
SCAN_SCALARS = [
    "state", "pos", "cl", "chunk", "seen", "rule",  # head scanner
    "out_len", "seg_start", "seg_dots", "depth", "pct", "hex1", "norm_error", "pstate",  # path
    "cand_off",  # where the path state's candidate rules start in cand_table
]  # fmt: skip
POINTER_FIELDS = set(SCAN_POINTERS)
S = {name: i for i, name in enumerate(SCAN_POINTERS)}
SCALAR = {name: SCALARS_OFFSET + 8 * i for i, name in enumerate(SCAN_SCALARS)}
FACTS_OFFSET = SCALARS_OFFSET + 8 * len(SCAN_SCALARS)


def conn_value_size(fact_words: int) -> int:
    """Bytes of a connection's socket storage for a program with `fact_words` fact words."""
    return CONN_SCRATCH + FACTS_OFFSET + 8 * fact_words


CONFIG = [
    "nrules", "default_allow", "max_head", "start", "path_start", "zero", "one", "leading",
    "chunk_start", "chunk_data_end", "path_classes", "path_dead", "tls",
]  # fmt: skip


class _Emitter(RecordingMixin):
    def __init__(self, ir_: MatcherIR) -> None:
        self.ir = ir_
        self.m = ir.Module(name=f"sockpol.{ir_.policy.name}")
        self.m.triple = "bpf"
        self.m.data_layout = DATA_LAYOUT
        self.dbg = DebugInfo(self.m, f"{ir_.policy.name}.pol", f"sockpol {__version__}")
        self.nw = ir_.fact_words
        self.words_t = ir.ArrayType(I64, self.nw)
        self.scan_t = ir.LiteralStructType([PTR] * len(SCAN_POINTERS))
        shape = ir_.shape or ir_.needed_shape()
        assert shape.covers(ir_.needed_shape())
        self.n_factsets = 1 << shape.factset_bits
        self.n_rules = 1 << shape.rule_bits
        self.shape = shape
        self.u8 = self.dbg.basic("unsigned char", 8, False)
        self.u32 = self.dbg.basic("unsigned int", 32, False)
        self.u64 = self.dbg.basic("unsigned long long", 64, False)
        self.long = self.dbg.basic("long", 64, True)
        self.int = self.dbg.basic("int", 32, True)
        self.void_ptr = self.dbg.pointer(None)
        self.used: list[ir.GlobalVariable] = []

    # --- globals ----------------------------------------------------------------------------

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

    def maps(self) -> None:
        self.socks = self.btf_map(
            SOCK_MAP, BPF_MAP_TYPE_SOCKHASH, SOCK_MAP_ENTRIES, self.u64, self.u32
        )
        # Per connection: the word (where the next run starts: a request, a chunk-size line,
        # ...; TLS flags; a counter slot), the bytes of a body or TLS record still to come, and
        # the work area of a run (CONN_SCRATCH above).
        self.conn_map = self.btf_map(
            CONN_MAP,
            BPF_MAP_TYPE_SK_STORAGE,
            None,
            self.int,
            self.dbg.array(self.u64, conn_value_size(self.nw) // 8, 64),
            BPF_F_NO_PREALLOC,
        )
        self.record_maps()  # counters, events, mode (record.py)

    def tables(self) -> None:
        ir_, t = self.ir, self.ir.tables
        p = t.path
        comb, lookup, shape = p.comb, ir_.lookup, self.shape
        factsets = [ir_.words(fs) for fs in t.factsets]
        factsets += [[0] * self.nw] * (self.n_factsets - len(factsets))
        # Per rule class: the facts it needs (method set, conditions); per rule: its flags.
        need = [ir_.words(c) for c in lookup.classes]
        need += [[0] * self.nw] * ((1 << shape.rclass_bits) - len(need))
        # Per rule: pass, log and audit bits (telemetry.RULE_*).
        rule_flags = [r.flags for r in ir_.rules] + [0] * (self.n_rules - len(ir_.rules))
        slots = comb.slots + [0] * ((1 << shape.slot_bits) - len(comb.slots))
        accepts = comb.accepts + [0] * ((1 << shape.accept_bits) - len(comb.accepts))
        cands = list(lookup.table) + [0] * ((1 << shape.cand_bits) - len(lookup.table))
        config = {
            "nrules": len(ir_.rules),
            "default_allow": int(ir_.policy.default.value == "allow"),
            "max_head": min(ir_.policy.max_head, MAX_SCAN),
            "start": t.start,
            "path_start": p.start,
            "zero": 0,
            "one": 1,
            "leading": PCT_LEADING_SLASH,
            "chunk_start": t.chunk_start,
            "chunk_data_end": t.chunk_data_end,
            "path_classes": comb.n_classes,
            "path_dead": comb.dead_id,
            "tls": tls.policy_mode(ir_.policy),
        }
        hexval = [int(chr(c), 16) if chr(c) in "0123456789abcdefABCDEF" else 0 for c in range(256)]

        def words(rows: list[list[int]]) -> ir.Constant:
            return word_rows(self.words_t, rows)

        def array(typ: ir.IntType, values: list[int]) -> ir.Constant:
            return int_array(typ, values)

        fields = {
            "classmap": array(I8, list(t.classmap)),
            "trans": array(I16, t.trans),
            "info": array(I32, t.info),
            "factsets": words(factsets),
            "class_need": words(need),
            "rule_flags": array(I32, rule_flags),
            "path_classmap": array(I8, list(p.classmap)),
            "path_slots": array(I32, slots),
            "cand_words": array(I32, accepts),
            "cand_table": array(I32, cands),
            "hexval": array(I8, hexval),
            "unreserved": array(I8, [int(c in UNRESERVED) for c in range(256)]),
            "hexdigit": array(I8, list(HEX_DIGITS)),
            "small": array(I8, list(range(256))),
            "config": array(I32, [config[k] for k in CONFIG]),
        }
        self.t_index = {name: i for i, name in enumerate(fields)}
        self.t_len = {name: len(c.type) for name, c in fields.items()}
        typ = ir.LiteralStructType([c.type for c in fields.values()])
        # Two slots and a generation: a reload writes the idle slot, then flips `gen`; a run
        # reads `gen` once and uses one slot throughout, so no run sees half a table. Both
        # slots start equal, so any loader gets a working policy whatever `gen` it starts with.
        slots = ir.ArrayType(typ, 2)
        self.data_t = ir.LiteralStructType([slots, I32])
        gv = ir.GlobalVariable(self.m, self.data_t, TABLES_GLOBAL)
        initial = ir.Constant(typ, list(fields.values()))
        gv.initializer = ir.Constant(self.data_t, [ir.Constant(slots, [initial, initial]), I32(0)])
        gv.section = ".data"
        gv.align = 8
        # BTF for the variable: libbpf makes `.data` mmap-able only when its DATASEC has a
        # global variable, and hot reload writes the idle slot through that mapping.
        size = self.data_t.get_abi_size(llvm.create_target_data(DATA_LAYOUT))
        self.dbg.global_variable(gv, self.dbg.array(self.u8, size, 8))
        self.tables_gv = gv
        self.tables_t = typ
        self.used.append(gv)

    def select_tables(self, b: ir.IRBuilder) -> ir.Value:
        """Pointer to the slot of the current generation."""
        gen = b.load(gep(b, self.tables_gv, self.data_t, [I32(0), I32(1)]), typ=I32)
        slot = b.and_(b.zext(gen, I64), I64(1))
        return gep(b, self.tables_gv, self.data_t, [I32(0), I32(0), slot])

    def table(self, b: ir.IRBuilder, name: str, index: ir.Value, *rest: ir.Value) -> ir.Value:
        """Pointer to an element of a table; `index` is masked to the table's (power-of-two)
        length, which is what lets the verifier prove the access in bounds."""
        n = self.t_len[name]
        assert n & (n - 1) == 0, name
        index = b.and_(index, I64(n - 1))
        return gep(b, self.base, self.tables_t, [I32(0), I32(self.t_index[name]), index, *rest])

    def load_table(self, b: ir.IRBuilder, name: str, index: ir.Value, typ: ir.IntType) -> ir.Value:
        return b.zext(b.load(self.table(b, name, index), typ=typ), I64)

    def config(self, b: ir.IRBuilder, name: str) -> ir.Value:
        ptr = gep(
            b,
            self.base,
            self.tables_t,
            [I32(0), I32(self.t_index["config"]), I64(CONFIG.index(name))],
        )
        return b.zext(b.load(ptr, typ=I32), I64)

    # --- the scan struct --------------------------------------------------------------------

    def slot(self, b: ir.IRBuilder, scan: ir.Value, name: str) -> ir.Value:
        if name in POINTER_FIELDS:
            return gep(b, scan, self.scan_t, [I32(0), I32(S[name])])
        return gep(b, self.get(b, scan, "scratch"), I8, [I64(SCALAR[name])])

    def get(self, b: ir.IRBuilder, scan: ir.Value, name: str) -> ir.Value:
        return b.load(self.slot(b, scan, name), typ=PTR if name in POINTER_FIELDS else I64)

    def put(self, b: ir.IRBuilder, scan: ir.Value, name: str, value: ir.Value | int) -> None:
        if isinstance(value, int):
            value = self.small(b, value)
        b.store(value, self.slot(b, scan, name))

    def small(self, b: ir.IRBuilder, value: int) -> ir.Value:
        """A small constant the verifier cannot see through (read from the `small` table).

        The callbacks run once per byte; the verifier walks them until the state at their entry
        stops changing. Exact constants stored on some paths (pct = 1, seg_dots = 0, state =
        a refusal) multiply the states it must tell apart until it gives up; a value read from
        a map is just "a byte", and the walk converges."""
        assert 0 <= value < 256, value
        return self.load_table(b, "small", I64(value), I8)

    def fact_word(self, b: ir.IRBuilder, scan: ir.Value, w: int) -> ir.Value:
        return gep(b, self.get(b, scan, "scratch"), I8, [I64(FACTS_OFFSET + 8 * w)])

    def or_factset(self, b: ir.IRBuilder, scan: ir.Value, index: ir.Value) -> None:
        row = b.and_(index, I64(self.n_factsets - 1))
        for w in range(self.nw):
            src = b.load(self.table(b, "factsets", row, I64(w)), typ=I64)
            dst = self.fact_word(b, scan, w)
            b.store(b.or_(b.load(dst, typ=I64), src), dst)

    # --- functions --------------------------------------------------------------------------

    def function(
        self,
        name: str,
        ret: ir.Type,
        args: list[tuple[str, ir.Type]],
        section: str | None = None,
    ) -> tuple[ir.Function, ir.IRBuilder]:
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

    # --- path normalization (normalize.py, step for step) -----------------------------------

    def path_append(self) -> ir.Function:
        fn, b = self.function("sockpol_path_append", I64, [("scan", PTR), ("c", I64)])
        scan, c = fn.args
        self.base = self.get(b, scan, "tables")
        length = self.get(b, scan, "out_len")
        with b.if_else(b.icmp_unsigned(">=", length, I64(PATH_MAX))) as (full, room):
            with full:
                self.put(b, scan, "norm_error", 1)
            with room:
                index = b.and_(length, I64(PATH_MAX - 1))
                b.store(b.trunc(c, I8), gep(b, self.get(b, scan, "scratch"), I8, [index]))
                self.put(b, scan, "out_len", b.add(length, I64(1)))
        b.ret(I64(0))
        return fn

    def path_pop(self) -> ir.Function:
        fn, b = self.function("sockpol_path_pop", I64, [("scan", PTR)])
        (scan,) = fn.args
        self.base = self.get(b, scan, "tables")
        depth = self.get(b, scan, "depth")
        with b.if_then(b.icmp_unsigned(">", depth, I64(0))):
            d = b.sub(depth, I64(1))
            self.put(b, scan, "depth", d)
            at = b.add(b.shl(b.and_(d, I64(MAX_DEPTH - 1)), I64(1)), I64(STACK_OFFSET))
            start = b.load(gep(b, self.get(b, scan, "scratch"), I8, [at]), typ=I16)
            self.put(b, scan, "seg_start", b.zext(start, I64))
        self.put(b, scan, "out_len", self.get(b, scan, "seg_start"))
        self.put(b, scan, "seg_dots", 0)
        b.ret(I64(0))
        return fn

    def path_char(self, append: ir.Function, pop: ir.Function) -> ir.Function:
        fn, b = self.function("sockpol_path_char", I64, [("scan", PTR), ("c", I64)])
        scan, c = fn.args
        self.base = self.get(b, scan, "tables")
        done = fn.append_basic_block("done")
        length = self.get(b, scan, "out_len")
        seg_start = self.get(b, scan, "seg_start")
        seg_len = b.sub(length, seg_start)
        dots = self.get(b, scan, "seg_dots")
        is_slash = b.icmp_unsigned("==", c, I64(ord("/")))
        with b.if_then(b.not_(is_slash)):
            still_dots = b.and_(
                b.icmp_unsigned("==", c, I64(ord("."))), b.icmp_unsigned("==", dots, seg_len)
            )
            more = b.add(dots, I64(1))
            more = b.select(b.icmp_unsigned(">", more, I64(NOT_DOTS)), I64(NOT_DOTS), more)
            self.put(b, scan, "seg_dots", b.select(still_dots, more, self.small(b, NOT_DOTS)))
            self.call(b, append, scan, c)
            b.branch(done)
        # A slash: merge "//", drop "/./", climb on "/../", else close the segment.
        with b.if_then(b.icmp_unsigned("==", seg_len, I64(0))):
            b.branch(done)
        one_dot = b.and_(
            b.icmp_unsigned("==", seg_len, I64(1)), b.icmp_unsigned("==", dots, I64(1))
        )
        with b.if_then(one_dot):
            self.put(b, scan, "out_len", seg_start)
            self.put(b, scan, "seg_dots", 0)
            b.branch(done)
        two_dots = b.and_(
            b.icmp_unsigned("==", seg_len, I64(2)), b.icmp_unsigned("==", dots, I64(2))
        )
        with b.if_then(two_dots):
            self.call(b, pop, scan)
            b.branch(done)
        depth = self.get(b, scan, "depth")
        with b.if_then(b.icmp_unsigned(">=", depth, I64(MAX_DEPTH))):
            self.put(b, scan, "norm_error", 1)
            b.branch(done)
        at = b.add(b.shl(b.and_(depth, I64(MAX_DEPTH - 1)), I64(1)), I64(STACK_OFFSET))
        b.store(b.trunc(seg_start, I16), gep(b, self.get(b, scan, "scratch"), I8, [at]))
        self.put(b, scan, "depth", b.add(depth, I64(1)))
        self.call(b, append, scan, c)
        self.put(b, scan, "seg_start", self.get(b, scan, "out_len"))
        self.put(b, scan, "seg_dots", 0)
        b.branch(done)
        b.position_at_end(done)
        b.ret(I64(0))
        return fn

    def path_feed(self, char: ir.Function, append: ir.Function) -> ir.Function:
        fn, b = self.function("sockpol_path_feed", I64, [("scan", PTR), ("c", I64)])
        scan, c = fn.args
        self.base = self.get(b, scan, "tables")
        done = fn.append_basic_block("done")
        pct = self.get(b, scan, "pct")
        none, percent, hex1 = (fn.append_basic_block(n) for n in ("none", "percent", "hex1"))
        leading = fn.append_basic_block("leading_slash")
        switch = b.switch(pct, none)
        switch.add_case(I64(PCT_PERCENT), percent)
        switch.add_case(I64(PCT_HEX1), hex1)
        switch.add_case(I64(PCT_LEADING_SLASH), leading)

        b.position_at_end(leading)  # the leading "/" is already in the output
        self.put(b, scan, "pct", PCT_NONE)
        b.branch(done)

        b.position_at_end(percent)
        self.put(b, scan, "hex1", c)
        self.put(b, scan, "pct", PCT_HEX1)
        b.branch(done)

        b.position_at_end(hex1)
        self.put(b, scan, "pct", PCT_NONE)
        high = self.load_table(b, "hexval", self.get(b, scan, "hex1"), I8)
        # add, not or: kernels before 6.4 lose all bounds on `or` with a register operand, and
        # these values index tables (the bits never overlap, so the sum is the same number).
        value = b.add(b.shl(high, I64(4)), self.load_table(b, "hexval", c, I8))
        unreserved = self.load_table(b, "unreserved", value, I8)
        with b.if_else(b.icmp_unsigned("!=", unreserved, I64(0))) as (decode, keep):
            with decode:
                self.call(b, char, scan, value)
            with keep:
                self.call(b, append, scan, I64(ord("%")))
                self.call(
                    b, append, scan, self.load_table(b, "hexdigit", b.lshr(value, I64(4)), I8)
                )
                self.call(b, append, scan, self.load_table(b, "hexdigit", value, I8))
                self.put(b, scan, "seg_dots", NOT_DOTS)
        b.branch(done)

        b.position_at_end(none)
        with b.if_else(b.icmp_unsigned("==", c, I64(ord("%")))) as (escape, plain):
            with escape:
                self.put(b, scan, "pct", PCT_PERCENT)
            with plain:
                self.call(b, char, scan, c)
        b.branch(done)

        b.position_at_end(done)
        b.ret(I64(0))
        return fn

    def path_finish(self, pop: ir.Function) -> ir.Function:
        fn, b = self.function("sockpol_path_finish", I64, [("scan", PTR)])
        (scan,) = fn.args
        self.base = self.get(b, scan, "tables")
        seg_start = self.get(b, scan, "seg_start")
        seg_len = b.sub(self.get(b, scan, "out_len"), seg_start)
        dots = self.get(b, scan, "seg_dots")
        one_dot = b.and_(
            b.icmp_unsigned("==", seg_len, I64(1)), b.icmp_unsigned("==", dots, I64(1))
        )
        two_dots = b.and_(
            b.icmp_unsigned("==", seg_len, I64(2)), b.icmp_unsigned("==", dots, I64(2))
        )
        with b.if_then(one_dot):
            self.put(b, scan, "out_len", seg_start)
        with b.if_then(two_dots):
            self.call(b, pop, scan)
        b.ret(I64(0))
        return fn

    # --- bpf_loop callbacks -----------------------------------------------------------------

    def scan_step(self, feed: ir.Function, finish: ir.Function) -> ir.Function:
        """One byte of the head: the transition, its facts, Content-Length digits, singleton
        headers, and the path normalizer."""
        fn, b = self.function("sockpol_scan_step", I64, [("index", I32), ("ctx", PTR)])
        index, scan = fn.args
        self.base = self.get(b, scan, "tables")
        stop = fn.append_basic_block("stop")
        bounded = fn.append_basic_block("bounded")
        body = fn.append_basic_block("in_window")
        i = b.zext(index, I64)
        # Bounds the variable packet offset for the verifier; unreachable for real heads.
        b.cbranch(b.icmp_unsigned(">", i, I64(MAX_SCAN)), stop, bounded)
        b.position_at_end(bounded)
        # Not inbounds: data + i + 1 may point past the window; that is what the check tests.
        p = b.gep(self.get(b, scan, "data"), [i], source_etype=I8)
        p_next = b.gep(p, [I64(1)], source_etype=I8)
        b.cbranch(b.icmp_unsigned(">", p_next, self.get(b, scan, "data_end")), stop, body)

        b.position_at_end(stop)
        b.ret(I64(1))

        b.position_at_end(body)
        t = self.ir.tables
        byte = b.zext(b.load(p, typ=I8), I64)
        cls = self.load_table(b, "classmap", byte, I8)
        nxt = self.load_table(
            b, "trans", b.add(b.shl(self.get(b, scan, "state"), I64(t.class_bits)), cls), I16
        )
        info = self.load_table(b, "info", nxt, I32)

        emit = b.and_(info, I64(0xFFFF))
        with b.if_then(b.icmp_unsigned("!=", emit, I64(0))):
            self.or_factset(b, scan, emit)

        # Content-Length digits accumulate; an oversized value refuses the request.
        is_digit = b.icmp_unsigned("!=", b.and_(info, I64(FLAG_CL_DIGIT)), I64(0))
        cl_old = self.get(b, scan, "cl")
        cl_new = b.select(is_digit, b.sub(b.add(b.mul(cl_old, I64(10)), byte), I64(0x30)), cl_old)
        self.put(b, scan, "cl", cl_new)
        too_big = b.icmp_unsigned(">", cl_new, I64(CL_MAX))
        nxt = b.select(too_big, self.small(b, Reason.BAD_CONTENT_LENGTH), nxt)
        # Digits of a second Content-Length line: a duplicate, whatever its value.
        cl_seen = b.and_(self.get(b, scan, "seen"), I64(FLAG_CL_LINE))
        second = b.and_(is_digit, b.icmp_unsigned("!=", cl_seen, I64(0)))
        nxt = b.select(second, self.small(b, Reason.DUPLICATE_HEADER), nxt)

        # Chunk-size hex digits likewise.
        is_hex = b.icmp_unsigned("!=", b.and_(info, I64(FLAG_HEX_DIGIT)), I64(0))
        chunk_old = self.get(b, scan, "chunk")
        digit = self.load_table(b, "hexval", byte, I8)
        chunk_new = b.select(is_hex, b.add(b.shl(chunk_old, I64(4)), digit), chunk_old)
        self.put(b, scan, "chunk", chunk_new)
        chunk_big = b.icmp_unsigned(">", chunk_new, I64(CHUNK_MAX))
        nxt = b.select(chunk_big, self.small(b, Reason.BAD_CHUNK), nxt)

        # Host, Content-Length and Transfer-Encoding may appear once; Content-Length and
        # Transfer-Encoding not together (the classic request-smuggling setup).
        seen = self.get(b, scan, "seen")
        singles = b.and_(info, I64(SINGLETON_FLAGS))
        dup = b.icmp_unsigned("!=", b.and_(singles, seen), I64(0))
        nxt = b.select(dup, self.small(b, Reason.DUPLICATE_HEADER), nxt)
        seen = b.or_(seen, singles)
        self.put(b, scan, "seen", seen)
        both = I64(FLAG_CL_LINE | FLAG_TE_LINE)
        smuggling = b.icmp_unsigned("==", b.and_(seen, both), both)
        nxt = b.select(smuggling, self.small(b, Reason.TRANSFER_ENCODING), nxt)

        with b.if_then(b.icmp_unsigned("!=", b.and_(info, I64(FLAG_PATH_BYTE)), I64(0))):
            self.call(b, feed, scan, byte)
        with b.if_then(b.icmp_unsigned("!=", b.and_(info, I64(FLAG_PATH_END)), I64(0))):
            self.call(b, finish, scan)
        failed = b.icmp_unsigned("!=", self.get(b, scan, "norm_error"), I64(0))
        nxt = b.select(failed, self.small(b, Reason.PATH_TOO_LONG), nxt)

        self.put(b, scan, "state", nxt)
        self.put(b, scan, "pos", b.add(i, I64(1)))
        b.ret(b.zext(b.icmp_unsigned("<", nxt, I64(TERMINAL_STATES)), I64))
        return fn

    def comb_slot(self, b: ir.IRBuilder, state: ir.Value, k: ir.Value) -> tuple[ir.Value, ir.Value]:
        """(found, payload) of the slot at `state + k` tagged `k + 1` (comb.py)."""
        e = self.load_table(b, "path_slots", b.add(state, k), I32)
        found = b.icmp_unsigned("==", b.lshr(e, I64(TAG_SHIFT)), b.add(k, I64(1)))
        return found, b.and_(e, I64(PAYLOAD_MASK))

    def path_step(self) -> ir.Function:
        """One byte of the normalized path through the packed path automaton (comb.py): the
        state's slot for the byte's class, else its default slot, else the dead state."""
        fn, b = self.function("sockpol_path_step", I64, [("index", I32), ("ctx", PTR)])
        index, scan = fn.args
        self.base = self.get(b, scan, "tables")
        i = b.and_(b.zext(index, I64), I64(PATH_MAX - 1))
        c = b.zext(b.load(gep(b, self.get(b, scan, "scratch"), I8, [i]), typ=I8), I64)
        cls = self.load_table(b, "path_classmap", c, I8)
        state = self.get(b, scan, "pstate")
        hit, nxt = self.comb_slot(b, state, cls)
        dflt_hit, dflt = self.comb_slot(b, state, self.config(b, "path_classes"))
        dead = self.config(b, "path_dead")
        self.put(b, scan, "pstate", b.select(hit, nxt, b.select(dflt_hit, dflt, dead)))
        b.ret(I64(0))
        return fn

    def cand_step(self) -> ir.Function:
        """Candidate `index` of the path state: does its class hold? The first that does is
        the first matching rule and ends the loop (candidates.py)."""
        fn, b = self.function("sockpol_cand_step", I64, [("index", I32), ("ctx", PTR)])
        index, scan = fn.args
        self.base = self.get(b, scan, "tables")
        entry = self.load_table(
            b, "cand_table", b.add(self.get(b, scan, "cand_off"), b.zext(index, I64)), I32
        )
        cls = b.lshr(entry, I64(16))
        ok = ir.Constant(I1, 1)
        for w in range(self.nw):
            need = b.load(self.table(b, "class_need", cls, I64(w)), typ=I64)
            have = b.load(self.fact_word(b, scan, w), typ=I64)
            ok = b.and_(ok, b.icmp_unsigned("==", b.and_(have, need), need))
        with b.if_then(ok):
            self.put(b, scan, "rule", b.and_(entry, I64(0xFFFF)))
        b.ret(b.zext(ok, I64))
        return fn

    # --- sk_msg program ---------------------------------------------------------------------

    def msg_program(
        self, scan_step: ir.Function, path_step: ir.Function, rule_step: ir.Function
    ) -> None:
        fn, b = self.function(MSG_PROGRAM, I32, [("msg", PTR)], section="sk_msg")
        msg = fn.args[0]
        scan = b.alloca(self.scan_t, name="scan")
        self.base = self.select_tables(b)

        def ctx_load(offset: int, typ: ir.Type) -> ir.Value:
            return b.load(gep(b, msg, I8, [I64(offset)]), typ=typ)

        def verdict(
            value: int, apply: ir.Value | None = None, cork: ir.Value | None = None
        ) -> None:
            # Every run sets both apply_bytes and cork_bytes: the kernel keeps them in the
            # message between runs, so a stale value from an earlier run would cut this message
            # at the wrong place, or cork the rest of a message already judged.
            h.call(b, h.MSG_APPLY_BYTES, msg, apply if apply is not None else I32(0))
            h.call(b, h.MSG_CORK_BYTES, msg, cork if cork is not None else I32(0))
            b.ret(I32(value) if isinstance(value, int) else value)

        # Runs that judged something end in one block, which records the event (record.py).
        record = fn.append_basic_block("record")
        recorded: list[tuple[ir.Value, ir.Value, ir.Block]] = []

        def finish(outcome: ir.Value, apply: ir.Value) -> None:
            recorded.append((outcome, apply, b.block))
            b.branch(record)

        def refuse_unseen() -> None:
            # Nothing of the message could be looked at: refused even in dry-run, and counted.
            self.count(b, SLOT_REFUSED + Reason.PULL_FAILED, 1, size)
            verdict(SK_DROP)

        size = b.zext(ctx_load(MSG_SIZE, I32), I64)
        with b.if_then(b.icmp_unsigned("==", size, I64(0)), likely=False):
            verdict(SK_PASS)
        sk = ctx_load(MSG_SK, PTR)
        conn = h.call(
            b,
            h.SK_STORAGE_GET,
            self.conn_map,
            sk,
            ir.Constant(PTR, None),
            I64(BPF_SK_STORAGE_GET_F_CREATE),
        )
        with b.if_then(b.icmp_unsigned("==", b.ptrtoint(conn, I64), I64(0)), likely=False):
            refuse_unseen()  # no per-connection state: cannot follow the stream, refuse
        # The rest of a body (or TLS record) that an earlier verdict covered: pass it without a
        # look (and without pulling it). Counted here, not left to apply_bytes: under kTLS
        # apply_bytes ends with the record, and the next record runs the program again.
        left_ptr = gep(b, conn, I8, [I64(CONN_LEFT)])

        def covering(total: ir.Value) -> ir.Value:
            """apply_bytes for a verdict on `total` bytes from the start of this message; what
            lies beyond it is counted down by the next runs."""
            part = b.select(b.icmp_unsigned("<", total, size), total, size)
            b.store(b.sub(total, part), left_ptr)
            return b.trunc(part, I32)

        left = b.load(left_ptr, typ=I64)
        with b.if_then(b.icmp_unsigned("!=", left, I64(0))):
            verdict(SK_PASS, covering(left))

        max_head = self.config(b, "max_head")
        n = b.select(b.icmp_unsigned("<", size, max_head), size, max_head)
        pulled = h.call(b, h.MSG_PULL_DATA, msg, I32(0), b.trunc(n, I32), I64(0))
        with b.if_then(b.icmp_unsigned("!=", pulled, I64(0)), likely=False):
            refuse_unseen()
        scratch = gep(b, conn, I8, [I64(CONN_SCRATCH)])
        # The connection's word: where this run starts in bits 0..7 (the rest: record.py, tls.py).
        resume = b.load(conn, typ=I64)
        kind = b.and_(resume, I64(0xFF))
        mode = self.read_mode(b)  # every run: `sockpol mode` switches without a reload
        start = b.select(
            b.icmp_unsigned("==", kind, I64(RESUME_CHUNK_LINE)),
            self.config(b, "chunk_start"),
            b.select(
                b.icmp_unsigned("==", kind, I64(RESUME_CHUNK_DATA_END)),
                self.config(b, "chunk_data_end"),
                self.config(b, "start"),
            ),
        )

        # Packet pointers are valid only now, after the pull.
        self.put(b, scan, "data", ctx_load(MSG_DATA, PTR))
        self.put(b, scan, "data_end", ctx_load(MSG_DATA_END, PTR))
        self.put(b, scan, "scratch", scratch)
        self.put(b, scan, "tables", self.base)
        # Initial values come from the tables, not constants: the verifier then knows them only
        # as ranges, so its walk over the bpf_loop callbacks converges after an iteration or two
        # instead of following exact values (out_len 1, 2, 3, ...) byte by byte until it gives up
        # ("the sequence of 8193 jumps is too complex").
        zero, one = self.config(b, "zero"), self.config(b, "one")
        for name in SCAN_SCALARS:
            self.put(b, scan, name, zero)
        self.put(b, scan, "state", start)
        self.put(b, scan, "rule", I64(NO_RULE))
        self.put(b, scan, "out_len", one)  # the normalized path starts as "/"
        self.put(b, scan, "seg_start", one)
        self.put(b, scan, "pct", self.config(b, "leading"))
        self.put(b, scan, "pstate", self.config(b, "path_start"))
        b.store(I8(ord("/")), scratch)
        for w in range(self.nw):
            b.store(zero, self.fact_word(b, scan, w))
        with b.if_then(b.icmp_unsigned("==", kind, I64(RESUME_UNJUDGED)), likely=False):
            finish(self.unjudged(b, msg, resume, mode), I32(0))  # dry-run left it so
        with b.if_then(b.icmp_unsigned("==", kind, I64(tls.RESUME_TLS_PASS)), likely=False):
            self.count(b, SLOT_UNJUDGED, 1, size)  # `tls userspace allow`: ciphertext passes
            verdict(SK_PASS)

        def refuse(reason: ir.Value, head: ir.Value | None = None) -> None:
            """Refused before any rule (scanner, max-head, TLS walk): record.unframed."""
            head = head if head is not None else I64(0)
            finish(self.unframed(b, msg, reason, mode, head, conn), I32(0))

        self.tls_phase(b, scan, conn, resume, kind, size, verdict, refuse, covering)
        h.call(b, h.LOOP, b.trunc(n, I32), scan_step, scan, I64(0))

        state = self.get(b, scan, "state")
        complete = fn.append_basic_block("head_complete")
        not_complete = fn.append_basic_block("head_not_complete")
        b.cbranch(b.icmp_unsigned("==", state, I64(END)), complete, not_complete)

        b.position_at_end(complete)
        out_len = b.trunc(self.get(b, scan, "out_len"), I32)
        h.call(b, h.LOOP, out_len, path_step, scan, I64(0))
        # The final state's candidate word: where its candidate rules are, and how many.
        accepting, index = self.comb_slot(
            b, self.get(b, scan, "pstate"), b.add(self.config(b, "path_classes"), I64(1))
        )
        word = b.select(accepting, self.load_table(b, "cand_words", index, I32), I64(0))
        self.put(b, scan, "cand_off", b.and_(word, I64((1 << CAND_LENGTH_SHIFT) - 1)))
        count = b.trunc(b.lshr(word, I64(CAND_LENGTH_SHIFT)), I32)
        h.call(b, h.LOOP, count, rule_step, scan, I64(0))
        rule = self.get(b, scan, "rule")
        matched = b.icmp_unsigned("!=", rule, I64(NO_RULE))
        flags = b.select(
            matched, self.load_table(b, "rule_flags", rule, I32), self.config(b, "default_allow")
        )
        counter = b.select(matched, b.add(rule, I64(SLOT_RULES)), I64(SLOT_DEFAULT))
        reason = b.select(matched, I64(Reason.RULE), I64(Reason.DEFAULT))
        # The verdict covers the head and its body; later bytes are the next request. A chunked
        # body is followed chunk by chunk from the next run on.
        pos = self.get(b, scan, "pos")
        chunked = b.icmp_unsigned(
            "!=", b.and_(self.get(b, scan, "seen"), I64(FLAG_TE_LINE)), I64(0)
        )
        covered = b.select(chunked, pos, b.add(pos, self.get(b, scan, "cl")))
        # Bits 32..63: the counter slot that the chunks of this body are added to.
        nxt = b.select(chunked, I64(RESUME_CHUNK_LINE), I64(RESUME_REQUEST))
        b.store(b.or_(b.or_(nxt, I64(tls.CONN_HTTP)), b.shl(counter, I64(32))), conn)
        outcome = self.judged(b, msg, flags, reason, mode, counter, covered)
        finish(outcome, covering(covered))

        b.position_at_end(not_complete)
        body_counter = b.lshr(resume, I64(32))
        with b.if_then(b.icmp_unsigned("==", state, I64(CHUNK_LINE))):
            # Pass the size line and the chunk's data; the CRLF after the data comes next.
            keep = b.and_(resume, I64(0xFFFFFFFF00000000))
            b.store(b.or_(keep, I64(RESUME_CHUNK_DATA_END | tls.CONN_HTTP)), conn)
            data_end = b.add(self.get(b, scan, "pos"), self.get(b, scan, "chunk"))
            self.count(b, body_counter, 0, data_end)
            verdict(SK_PASS, covering(data_end))
        with b.if_then(b.icmp_unsigned("==", state, I64(BODY_END))):
            b.store(I64(RESUME_REQUEST | tls.CONN_HTTP), conn)
            self.count(b, body_counter, 0, self.get(b, scan, "pos"))
            verdict(SK_PASS, b.trunc(self.get(b, scan, "pos"), I32))
        # The scanner refused the head, or no end of head came within max-head bytes (in
        # dry-run: passed, and the rest of the connection goes unjudged).
        refused = b.icmp_unsigned("<", state, I64(TERMINAL_STATES))
        with b.if_then(b.icmp_unsigned("==", state, I64(Reason.BAD_METHOD)), likely=False):
            self.alert_plaintext(b, scan, kind, size, verdict)
        with b.if_then(b.or_(refused, b.icmp_unsigned(">=", size, max_head))):
            reason = b.select(refused, state, I64(Reason.HEAD_TOO_LARGE))
            refuse(reason, b.zext(b.icmp_unsigned("==", kind, I64(RESUME_REQUEST)), I64))
        # The head continues in a later send: hold these bytes and judge the whole head then.
        # DROP, not PASS: plain TCP re-runs the program when the cork fills and ignores this
        # verdict, but under kTLS (6.1) the verdict returned with the cork is applied to all the
        # held bytes: PASS let the first bytes of a denied, record-split head reach the peer.
        verdict(SK_DROP, cork=b.trunc(b.add(size, I64(1)), I32))

        b.position_at_end(record)
        outcome, apply = b.phi(I64, "outcome"), b.phi(I32, "apply")
        for value, nbytes, block in recorded:
            outcome.add_incoming(value, block)
            apply.add_incoming(nbytes, block)
        self.record_event(b, msg, scan, outcome)
        passed = b.icmp_unsigned("!=", self.passes(b, outcome), I64(0))
        verdict(b.select(passed, I32(SK_PASS), I32(SK_DROP)), apply)

    def alert_plaintext(self, b, scan, kind, size, verdict) -> None:
        """A kTLS socket's alert (the close_notify of SSL_shutdown, sent with a record-type cmsg)
        reaches the program as 2 plaintext bytes, which the scanner refuses as a method: on a
        `tls` policy they pass, at a request boundary (tls.is_alert_plaintext). Checked only on
        that refusal: a check before the scan made the verifier walk the scan twice."""
        data, data_end = self.get(b, scan, "data"), self.get(b, scan, "data_end")
        at_request = b.icmp_unsigned("==", kind, I64(RESUME_REQUEST))
        declared = b.icmp_unsigned("!=", self.config(b, "tls"), I64(tls.TLS_NONE))
        two = b.icmp_unsigned("==", size, I64(2))
        with b.if_then(b.and_(at_request, b.and_(declared, two))):
            end = b.gep(data, [I64(2)], source_etype=I8)
            with b.if_then(b.icmp_unsigned("<=", end, data_end)):
                first = b.zext(b.load(data, typ=I8), I64)
                with b.if_then(b.icmp_unsigned("<=", b.sub(first, I64(1)), I64(1))):
                    verdict(SK_PASS)

    def tls_phase(self, b, scan, conn, resume, kind, size, verdict, refuse, covering):
        """The TLS handshake, one record per run, until the connection's bytes are HTTP: tls.py
        step for step. Returns (falls through) when this message is to be read as HTTP."""
        at_request = b.icmp_unsigned("==", kind, I64(RESUME_REQUEST))
        tls_mode = self.config(b, "tls")
        data, data_end = self.get(b, scan, "data"), self.get(b, scan, "data_end")

        def has(k: int) -> ir.Value:  # data[0..k) is in the window
            return b.icmp_unsigned("<=", b.gep(data, [I64(k)], source_etype=I8), data_end)

        def byte(i: int) -> ir.Value:
            return b.zext(b.load(b.gep(data, [I64(i)], source_etype=I8), typ=I8), I64)

        def eq(a: ir.Value, v: int) -> ir.Value:
            return b.icmp_unsigned("==", a, I64(v))

        handshake = b.and_(at_request, eq(b.and_(resume, I64(tls.CONN_HTTP)), 0))
        with b.if_then(handshake, likely=False):
            with b.if_then(has(1)):
                kind_byte = byte(0)
                record = b.icmp_unsigned(
                    "<=", b.sub(kind_byte, I64(tls.ContentType.CHANGE_CIPHER_SPEC)), I64(3)
                )
                with b.if_else(record) as (is_record, is_http):
                    with is_http:
                        b.store(b.or_(resume, I64(tls.CONN_HTTP)), conn)
                    with is_record:
                        self._tls_record(
                            b, conn, resume, size, verdict, refuse, covering,
                            tls_mode, kind_byte, has, byte, eq,
                        )  # fmt: skip

    def _tls_record(
        self, b, conn, resume, size, verdict, refuse, covering, tls_mode, t, has, byte, eq
    ) -> None:
        is_hs = eq(t, tls.ContentType.HANDSHAKE)
        need = b.select(is_hs, I64(tls.HELLO_HEADER), I64(tls.HEADER))

        def short() -> None:
            with b.if_then(b.icmp_unsigned("<", size, need)):
                verdict(SK_DROP, cork=b.trunc(need, I32))  # tcp_bpf runs again when it fills
            refuse(I64(Reason.TLS_BAD_RECORD))

        with b.if_then(b.not_(has(tls.HEADER)), likely=False):
            short()
        hello = b.alloca(I64, name="hello")
        b.store(I64(0), hello)
        with b.if_then(is_hs):
            with b.if_then(b.not_(has(tls.HELLO_HEADER)), likely=False):
                short()
            length = b.add(b.shl(byte(3), I64(8)), byte(4))
            hs_len = b.add(b.add(b.shl(byte(6), I64(16)), b.shl(byte(7), I64(8))), byte(8))
            whole = eq(b.sub(length, b.add(hs_len, I64(4))), 0)
            b.store(b.zext(b.and_(eq(byte(5), tls.CLIENT_HELLO), whole), I64), hello)
        is_hello = b.icmp_unsigned("!=", b.load(hello, typ=I64), I64(0))
        length = b.add(b.shl(byte(3), I64(8)), byte(4))
        valid = b.and_(
            b.and_(eq(byte(1), 3), b.icmp_unsigned("<=", byte(2), I64(4))),
            b.icmp_unsigned("<=", b.sub(length, I64(1)), I64(tls.MAX_RECORD - 1)),
        )
        flags = b.and_(resume, I64(tls.CONN_TLS_FLAGS))

        def bit(v: int) -> ir.Value:
            return b.icmp_unsigned("!=", b.and_(flags, I64(v)), I64(0))

        seen_hello, done, ccs = bit(tls.CONN_HELLO), bit(tls.CONN_DONE), bit(tls.CONN_CCS)
        # The TLS 1.2 Finished of a client that turned kTLS on with its ChangeCipherSpec: the
        # plaintext of a handshake message, not a record (tls.is_ktls_finished).
        header = [eq(byte(i), v) for i, v in enumerate((tls.FINISHED, 0, 0, tls.VERIFY_DATA))]
        ktls_finished = b.and_(
            b.and_(b.and_(header[0], header[1]), b.and_(header[2], header[3])),
            b.and_(b.and_(ccs, b.not_(done)), eq(size, 4 + tls.VERIFY_DATA)),
        )
        with b.if_then(ktls_finished, likely=False):
            b.store(b.or_(resume, I64(tls.CONN_TLS12_DONE)), conn)
            verdict(SK_PASS, covering(I64(4 + tls.VERIFY_DATA)))
        is_ccs = eq(t, tls.ContentType.CHANGE_CIPHER_SPEC)
        is_alert = eq(t, tls.ContentType.ALERT)
        is_app = eq(t, tls.ContentType.APPLICATION_DATA)
        long_alert = b.icmp_unsigned(">", length, I64(tls.MAX_ALERT_AFTER_HANDSHAKE))
        bad = b.or_(
            b.and_(b.not_(seen_hello), b.not_(is_hello)),
            b.and_(
                b.and_(seen_hello, done),
                b.or_(b.or_(is_ccs, is_hs), b.and_(is_alert, long_alert)),
            ),
        )
        userspace = b.and_(b.and_(seen_hello, done), is_app)
        undeclared = eq(tls_mode, tls.TLS_NONE)
        allow_userspace = eq(tls_mode, tls.TLS_USERSPACE_ALLOW)
        refused = b.or_(
            b.or_(b.not_(valid), undeclared),
            b.or_(bad, b.and_(userspace, b.not_(allow_userspace))),
        )
        reason = b.select(
            b.not_(valid),
            I64(Reason.TLS_BAD_RECORD),
            b.select(
                undeclared,
                I64(Reason.TLS_NOT_DECLARED),
                b.select(bad, I64(Reason.TLS_BAD_RECORD), I64(Reason.TLS_USERSPACE)),
            ),
        )
        with b.if_then(refused, likely=False):
            refuse(reason)
        with b.if_then(userspace, likely=False):  # `tls userspace allow`
            self.count(b, SLOT_WOULD_REFUSE + Reason.TLS_USERSPACE, 1, size)
            b.store(b.or_(flags, I64(tls.RESUME_TLS_PASS)), conn)
            verdict(SK_PASS)
        tls12 = b.and_(b.and_(is_hs, ccs), b.not_(is_hello))
        add = b.select(
            b.not_(seen_hello),
            I64(tls.CONN_HELLO),
            b.select(
                is_ccs,
                I64(tls.CONN_CCS),
                b.select(
                    tls12,
                    I64(tls.CONN_TLS12_DONE),
                    b.select(is_app, I64(tls.CONN_TLS13_DONE), I64(0)),
                ),
            ),
        )
        word = b.or_(b.and_(resume, I64(~tls.CONN_TLS_FLAGS & (2**64 - 1))), b.or_(flags, add))
        b.store(word, conn)
        verdict(SK_PASS, covering(b.add(length, I64(tls.HEADER))))

    # --- sock_ops program -------------------------------------------------------------------

    def sockops_program(self) -> None:
        fn, b = self.function(SOCKOPS_PROGRAM, I32, [("ops", PTR)], section="sockops")
        ops = fn.args[0]
        done = fn.append_basic_block("done")
        key = b.alloca(I64, name="cookie")

        def ctx_load(offset: int) -> ir.Value:
            return b.load(gep(b, ops, I8, [I64(offset)]), typ=I32)

        op = ctx_load(OPS_OP)
        check_family = fn.append_basic_block("check_family")
        established = b.icmp_unsigned("==", op, I32(BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB))
        b.cbranch(established, check_family, done)
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
        bswap = self.m.declare_intrinsic("llvm.bswap", [I32])
        port = b.call(bswap, [ctx_load(OPS_REMOTE_PORT)])
        governed = ir.Constant(I1, 0)
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
        self.maps()
        self.tables()
        append, pop = self.path_append(), self.path_pop()
        char = self.path_char(append, pop)
        feed, finish = self.path_feed(char, append), self.path_finish(pop)
        self.record_functions()  # before msg_program: each function resets self.base
        self.msg_program(self.scan_step(feed, finish), self.path_step(), self.cand_step())
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
