"""The judging core: the byte-level work of judging a request head against the tables, as BPF
functions that any backend calls through bpf_loop.

- the path normalizer (normalize.py, step for step): `sockpol_path_append/pop/char/feed/finish`;
- `sockpol_scan_step`: one byte of the head through the scanner automaton, its facts, the
  Content-Length and chunk-size digits, the singleton headers, the normalizer;
- `sockpol_path_step`: one byte of the normalized path through the packed path automaton;
- `sockpol_cand_step`: one candidate rule of the path's final state: does its class hold?

They share the scan state through the context `tables.Fn` describes (pointers on the caller's
stack, scalars and fact words in the connection's storage). The sk_msg backend (emit.py) calls
them on the message it pulled; a second backend (an LSM program reading the caller's buffer)
would call the same functions on its own copy of the head, with the same tables. The Python
mirror is codegen/simulate.py.
"""

from __future__ import annotations

from llvmlite import ir

from sockpol.codegen.comb import PAYLOAD_MASK, TAG_SHIFT
from sockpol.codegen.helpers import I1, I8, I16, I32, I64, PTR, gep
from sockpol.codegen.normalize import NOT_DOTS, PCT_HEX1, PCT_LEADING_SLASH, PCT_NONE, PCT_PERCENT
from sockpol.codegen.objbuilder import ObjectBuilder
from sockpol.codegen.scanner import (
    FLAG_CL_DIGIT,
    FLAG_CL_LINE,
    FLAG_HEX_DIGIT,
    FLAG_PATH_BYTE,
    FLAG_PATH_END,
    FLAG_TE_LINE,
    SINGLETON_FLAGS,
    TERMINAL_STATES,
)
from sockpol.codegen.tables import STACK_OFFSET, Fn, Tables
from sockpol.contract import CHUNK_MAX, CL_MAX, MAX_DEPTH, MAX_SCAN, PATH_MAX, Reason


class JudgeCore:
    def __init__(self, ob: ObjectBuilder, tables: Tables) -> None:
        self.ob = ob
        self.tables = tables

    def normalizer(self) -> tuple[ir.Function, ir.Function]:
        """The path normalizer's functions, in object order; (feed, finish) for scan_step."""
        append, pop = self.path_append(), self.path_pop()
        char = self.path_char(append, pop)
        return self.path_feed(char, append), self.path_finish(pop)

    def path_append(self) -> ir.Function:
        fn, b = self.ob.function("sockpol_path_append", I64, [("scan", PTR), ("c", I64)])
        scan, c = fn.args
        fx = Fn.of_scan(b, self.tables, scan)
        length = fx.get("out_len")
        with b.if_else(b.icmp_unsigned(">=", length, I64(PATH_MAX))) as (full, room):
            with full:
                fx.put("norm_error", 1)
            with room:
                index = b.and_(length, I64(PATH_MAX - 1))
                b.store(b.trunc(c, I8), gep(b, fx.get("scratch"), I8, [index]))
                fx.put("out_len", b.add(length, I64(1)))
        b.ret(I64(0))
        return fn

    def path_pop(self) -> ir.Function:
        fn, b = self.ob.function("sockpol_path_pop", I64, [("scan", PTR)])
        (scan,) = fn.args
        fx = Fn.of_scan(b, self.tables, scan)
        depth = fx.get("depth")
        with b.if_then(b.icmp_unsigned(">", depth, I64(0))):
            d = b.sub(depth, I64(1))
            fx.put("depth", d)
            at = b.add(b.shl(b.and_(d, I64(MAX_DEPTH - 1)), I64(1)), I64(STACK_OFFSET))
            start = b.load(gep(b, fx.get("scratch"), I8, [at]), typ=I16)
            fx.put("seg_start", b.zext(start, I64))
        fx.put("out_len", fx.get("seg_start"))
        fx.put("seg_dots", 0)
        b.ret(I64(0))
        return fn

    def path_char(self, append: ir.Function, pop: ir.Function) -> ir.Function:
        fn, b = self.ob.function("sockpol_path_char", I64, [("scan", PTR), ("c", I64)])
        scan, c = fn.args
        fx = Fn.of_scan(b, self.tables, scan)
        done = fn.append_basic_block("done")
        length = fx.get("out_len")
        seg_start = fx.get("seg_start")
        seg_len = b.sub(length, seg_start)
        dots = fx.get("seg_dots")
        is_slash = b.icmp_unsigned("==", c, I64(ord("/")))
        with b.if_then(b.not_(is_slash)):
            still_dots = b.and_(
                b.icmp_unsigned("==", c, I64(ord("."))), b.icmp_unsigned("==", dots, seg_len)
            )
            more = b.add(dots, I64(1))
            more = b.select(b.icmp_unsigned(">", more, I64(NOT_DOTS)), I64(NOT_DOTS), more)
            fx.put("seg_dots", b.select(still_dots, more, fx.small(NOT_DOTS)))
            self.ob.call(b, append, scan, c)
            b.branch(done)
        # A slash: merge "//", drop "/./", climb on "/../", else close the segment.
        with b.if_then(b.icmp_unsigned("==", seg_len, I64(0))):
            b.branch(done)
        one_dot = b.and_(
            b.icmp_unsigned("==", seg_len, I64(1)), b.icmp_unsigned("==", dots, I64(1))
        )
        with b.if_then(one_dot):
            fx.put("out_len", seg_start)
            fx.put("seg_dots", 0)
            b.branch(done)
        two_dots = b.and_(
            b.icmp_unsigned("==", seg_len, I64(2)), b.icmp_unsigned("==", dots, I64(2))
        )
        with b.if_then(two_dots):
            self.ob.call(b, pop, scan)
            b.branch(done)
        depth = fx.get("depth")
        with b.if_then(b.icmp_unsigned(">=", depth, I64(MAX_DEPTH))):
            fx.put("norm_error", 1)
            b.branch(done)
        at = b.add(b.shl(b.and_(depth, I64(MAX_DEPTH - 1)), I64(1)), I64(STACK_OFFSET))
        b.store(b.trunc(seg_start, I16), gep(b, fx.get("scratch"), I8, [at]))
        fx.put("depth", b.add(depth, I64(1)))
        self.ob.call(b, append, scan, c)
        fx.put("seg_start", fx.get("out_len"))
        fx.put("seg_dots", 0)
        b.branch(done)
        b.position_at_end(done)
        b.ret(I64(0))
        return fn

    def path_feed(self, char: ir.Function, append: ir.Function) -> ir.Function:
        fn, b = self.ob.function("sockpol_path_feed", I64, [("scan", PTR), ("c", I64)])
        scan, c = fn.args
        fx = Fn.of_scan(b, self.tables, scan)
        done = fn.append_basic_block("done")
        pct = fx.get("pct")
        none, percent, hex1 = (fn.append_basic_block(n) for n in ("none", "percent", "hex1"))
        leading = fn.append_basic_block("leading_slash")
        switch = b.switch(pct, none)
        switch.add_case(I64(PCT_PERCENT), percent)
        switch.add_case(I64(PCT_HEX1), hex1)
        switch.add_case(I64(PCT_LEADING_SLASH), leading)

        b.position_at_end(leading)  # the leading "/" is already in the output
        fx.put("pct", PCT_NONE)
        b.branch(done)

        b.position_at_end(percent)
        fx.put("hex1", c)
        fx.put("pct", PCT_HEX1)
        b.branch(done)

        b.position_at_end(hex1)
        fx.put("pct", PCT_NONE)
        high = fx.load_table("hexval", fx.get("hex1"), I8)
        # add, not or: kernels before 6.4 lose all bounds on `or` with a register operand, and
        # these values index tables (the bits never overlap, so the sum is the same number).
        value = b.add(b.shl(high, I64(4)), fx.load_table("hexval", c, I8))
        unreserved = fx.load_table("unreserved", value, I8)
        with b.if_else(b.icmp_unsigned("!=", unreserved, I64(0))) as (decode, keep):
            with decode:
                self.ob.call(b, char, scan, value)
            with keep:
                self.ob.call(b, append, scan, I64(ord("%")))
                self.ob.call(b, append, scan, fx.load_table("hexdigit", b.lshr(value, I64(4)), I8))
                self.ob.call(b, append, scan, fx.load_table("hexdigit", value, I8))
                fx.put("seg_dots", NOT_DOTS)
        b.branch(done)

        b.position_at_end(none)
        with b.if_else(b.icmp_unsigned("==", c, I64(ord("%")))) as (escape, plain):
            with escape:
                fx.put("pct", PCT_PERCENT)
            with plain:
                self.ob.call(b, char, scan, c)
        b.branch(done)

        b.position_at_end(done)
        b.ret(I64(0))
        return fn

    def path_finish(self, pop: ir.Function) -> ir.Function:
        fn, b = self.ob.function("sockpol_path_finish", I64, [("scan", PTR)])
        (scan,) = fn.args
        fx = Fn.of_scan(b, self.tables, scan)
        seg_start = fx.get("seg_start")
        seg_len = b.sub(fx.get("out_len"), seg_start)
        dots = fx.get("seg_dots")
        one_dot = b.and_(
            b.icmp_unsigned("==", seg_len, I64(1)), b.icmp_unsigned("==", dots, I64(1))
        )
        two_dots = b.and_(
            b.icmp_unsigned("==", seg_len, I64(2)), b.icmp_unsigned("==", dots, I64(2))
        )
        with b.if_then(one_dot):
            fx.put("out_len", seg_start)
        with b.if_then(two_dots):
            self.ob.call(b, pop, scan)
        b.ret(I64(0))
        return fn

    # --- bpf_loop callbacks -----------------------------------------------------------------

    def scan_step(self, feed: ir.Function, finish: ir.Function) -> ir.Function:
        """One byte of the head: the transition, its facts, Content-Length digits, singleton
        headers, and the path normalizer."""
        fn, b = self.ob.function("sockpol_scan_step", I64, [("index", I32), ("ctx", PTR)])
        index, scan = fn.args
        fx = Fn.of_scan(b, self.tables, scan)
        stop = fn.append_basic_block("stop")
        bounded = fn.append_basic_block("bounded")
        body = fn.append_basic_block("in_window")
        i = b.zext(index, I64)
        # Bounds the variable packet offset for the verifier; unreachable for real heads.
        b.cbranch(b.icmp_unsigned(">", i, I64(MAX_SCAN)), stop, bounded)
        b.position_at_end(bounded)
        # Not inbounds: data + i + 1 may point past the window; that is what the check tests.
        p = b.gep(fx.get("data"), [i], source_etype=I8)
        p_next = b.gep(p, [I64(1)], source_etype=I8)
        b.cbranch(b.icmp_unsigned(">", p_next, fx.get("data_end")), stop, body)

        b.position_at_end(stop)
        b.ret(I64(1))

        b.position_at_end(body)
        t = self.tables.ir.tables
        byte = b.zext(b.load(p, typ=I8), I64)
        cls = fx.load_table("classmap", byte, I8)
        nxt = fx.load_table("trans", b.add(b.shl(fx.get("state"), I64(t.class_bits)), cls), I16)
        info = fx.load_table("info", nxt, I32)

        emit = b.and_(info, I64(0xFFFF))
        with b.if_then(b.icmp_unsigned("!=", emit, I64(0))):
            fx.or_factset(emit)

        # Content-Length digits accumulate; an oversized value refuses the request.
        is_digit = b.icmp_unsigned("!=", b.and_(info, I64(FLAG_CL_DIGIT)), I64(0))
        cl_old = fx.get("cl")
        cl_new = b.select(is_digit, b.sub(b.add(b.mul(cl_old, I64(10)), byte), I64(0x30)), cl_old)
        fx.put("cl", cl_new)
        too_big = b.icmp_unsigned(">", cl_new, I64(CL_MAX))
        nxt = b.select(too_big, fx.small(Reason.BAD_CONTENT_LENGTH), nxt)
        # Digits of a second Content-Length line: a duplicate, whatever its value.
        cl_seen = b.and_(fx.get("seen"), I64(FLAG_CL_LINE))
        second = b.and_(is_digit, b.icmp_unsigned("!=", cl_seen, I64(0)))
        nxt = b.select(second, fx.small(Reason.DUPLICATE_HEADER), nxt)

        # Chunk-size hex digits likewise.
        is_hex = b.icmp_unsigned("!=", b.and_(info, I64(FLAG_HEX_DIGIT)), I64(0))
        chunk_old = fx.get("chunk")
        digit = fx.load_table("hexval", byte, I8)
        chunk_new = b.select(is_hex, b.add(b.shl(chunk_old, I64(4)), digit), chunk_old)
        fx.put("chunk", chunk_new)
        chunk_big = b.icmp_unsigned(">", chunk_new, I64(CHUNK_MAX))
        nxt = b.select(chunk_big, fx.small(Reason.BAD_CHUNK), nxt)

        # Host, Content-Length and Transfer-Encoding may appear once; Content-Length and
        # Transfer-Encoding not together (the classic request-smuggling setup).
        seen = fx.get("seen")
        singles = b.and_(info, I64(SINGLETON_FLAGS))
        dup = b.icmp_unsigned("!=", b.and_(singles, seen), I64(0))
        nxt = b.select(dup, fx.small(Reason.DUPLICATE_HEADER), nxt)
        seen = b.or_(seen, singles)
        fx.put("seen", seen)
        both = I64(FLAG_CL_LINE | FLAG_TE_LINE)
        smuggling = b.icmp_unsigned("==", b.and_(seen, both), both)
        nxt = b.select(smuggling, fx.small(Reason.TRANSFER_ENCODING), nxt)

        with b.if_then(b.icmp_unsigned("!=", b.and_(info, I64(FLAG_PATH_BYTE)), I64(0))):
            self.ob.call(b, feed, scan, byte)
        with b.if_then(b.icmp_unsigned("!=", b.and_(info, I64(FLAG_PATH_END)), I64(0))):
            self.ob.call(b, finish, scan)
        failed = b.icmp_unsigned("!=", fx.get("norm_error"), I64(0))
        nxt = b.select(failed, fx.small(Reason.PATH_TOO_LONG), nxt)

        fx.put("state", nxt)
        fx.put("pos", b.add(i, I64(1)))
        b.ret(b.zext(b.icmp_unsigned("<", nxt, I64(TERMINAL_STATES)), I64))
        return fn

    @staticmethod
    def comb_slot(fx: Fn, state: ir.Value, k: ir.Value) -> tuple[ir.Value, ir.Value]:
        """(found, payload) of the slot at `state + k` tagged `k + 1` (comb.py)."""
        b = fx.b
        e = fx.load_table("path_slots", b.add(state, k), I32)
        found = b.icmp_unsigned("==", b.lshr(e, I64(TAG_SHIFT)), b.add(k, I64(1)))
        return found, b.and_(e, I64(PAYLOAD_MASK))

    def path_step(self) -> ir.Function:
        """One byte of the normalized path through the packed path automaton (comb.py): the
        state's slot for the byte's class, else its default slot, else the dead state."""
        fn, b = self.ob.function("sockpol_path_step", I64, [("index", I32), ("ctx", PTR)])
        index, scan = fn.args
        fx = Fn.of_scan(b, self.tables, scan)
        i = b.and_(b.zext(index, I64), I64(PATH_MAX - 1))
        c = b.zext(b.load(gep(b, fx.get("scratch"), I8, [i]), typ=I8), I64)
        cls = fx.load_table("path_classmap", c, I8)
        state = fx.get("pstate")
        hit, nxt = self.comb_slot(fx, state, cls)
        dflt_hit, dflt = self.comb_slot(fx, state, fx.config("path_classes"))
        dead = fx.config("path_dead")
        fx.put("pstate", b.select(hit, nxt, b.select(dflt_hit, dflt, dead)))
        b.ret(I64(0))
        return fn

    def cand_step(self) -> ir.Function:
        """Candidate `index` of the path state: does its class hold? The first that does is
        the first matching rule and ends the loop (candidates.py)."""
        fn, b = self.ob.function("sockpol_cand_step", I64, [("index", I32), ("ctx", PTR)])
        index, scan = fn.args
        fx = Fn.of_scan(b, self.tables, scan)
        entry = fx.load_table("cand_table", b.add(fx.get("cand_off"), b.zext(index, I64)), I32)
        cls = b.lshr(entry, I64(16))
        ok = ir.Constant(I1, 1)
        for w in range(self.tables.nw):
            need = b.load(fx.table("class_need", cls, I64(w)), typ=I64)
            have = b.load(fx.fact_word(w), typ=I64)
            ok = b.and_(ok, b.icmp_unsigned("==", b.and_(have, need), need))
        with b.if_then(ok):
            fx.put("rule", b.and_(entry, I64(0xFFFF)))
        b.ret(b.zext(ok, I64))
        return fn
