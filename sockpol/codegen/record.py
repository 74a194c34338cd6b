"""What the kernel program records: counters, events, and the mode it reads (telemetry.py).

`Recorder`, built on the object (objbuilder.py) and the tables (tables.py): the maps, and small
BPF functions that a program calls at its decision points, so that the decisions themselves
stay readable (emit.py's `msg_program`; a second backend would call the same):

- `sockpol_mode()`: the policy's current mode from the control map (enforce when unreadable);
- `sockpol_answers_on()`: whether refusals may be answered (the control map's second word is 0;
  the loader sets it where the kernel cannot answer, `sockpol doctor`);
- `sockpol_count(slot, requests, bytes)`: add to a per-CPU counter slot;
- `sockpol_judged(...)`: a head was judged by a rule or the default: count it, apply audit,
  dry-run and log, and say whether the request passes;
- `sockpol_unframed(...)`: the scanner refused a head (or it outgrew max-head): count, record,
  and in dry-run let the connection go on unjudged;
- `sockpol_unjudged(...)`: a later send on such a connection;
- `sockpol_event(...)`: assemble an event in the per-CPU buffer and copy it to the ring buffer;
  a full ring buffer costs the event (counted as lost), never the request.

The maps are made by `maps()` and the functions by `functions()`, both before the program
that calls them: their order is the order in the object.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from llvmlite import ir

from sockpol.codegen import helpers as h
from sockpol.codegen.helpers import I8, I16, I32, I64, PTR, gep
from sockpol.codegen.objbuilder import ObjectBuilder
from sockpol.codegen.tables import Fn, Tables
from sockpol.contract import (
    ANSWER_ROWS,
    BPF_MAP_TYPE_ARRAY,
    BPF_MAP_TYPE_PERCPU_ARRAY,
    BPF_MAP_TYPE_RINGBUF,
    MAX_SCAN,
    MSG_FAMILY,
    MSG_LOCAL_IP4,
    MSG_LOCAL_IP6,
    MSG_LOCAL_PORT,
    MSG_REMOTE_IP4,
    MSG_REMOTE_IP6,
    MSG_REMOTE_PORT,
    MSG_SIZE,
    RESUME_REQUEST,
    RESUME_UNJUDGED,
    SKB_FAMILY,
    SKB_LEN,
    SKB_LOCAL_IP4,
    SKB_LOCAL_IP6,
    SKB_LOCAL_PORT,
    SKB_REMOTE_IP4,
    SKB_REMOTE_IP6,
    SKB_REMOTE_PORT,
    Reason,
)
from sockpol.telemetry import (
    COUNTS_MAP,
    CTL_ANSWERS_OFF,
    CTL_MAP,
    EVBUF_MAP,
    EVENT,
    EVENT_FIELDS,
    EVENT_OFFSETS,
    EVENTS_BYTES,
    EVENTS_MAP,
    HOST_BYTES,
    METHOD_BYTES,
    MODE_DRY_RUN,
    NO_RULE,
    PATH_BYTES,
    RULE_ANSWER_SHIFT,
    RULE_AUDIT,
    RULE_LOG,
    RULE_PASS,
    SLOT_LOST,
    SLOT_REFUSED,
    SLOT_RULES,
    SLOT_UNJUDGED,
    SLOT_WOULD_REFUSE,
    EventKind,
    counter_slots,
)

# What the copiers (bpf_loop callbacks over the judged head) share, on sockpol_event's stack.
COPIER_FIELDS = ["data", "data_end", "ev", "host_at", "at"]  # at: where the request starts
C = {name: i for i, name in enumerate(COPIER_FIELDS)}
HOST_PREFIX = b"host:"
END_OF_HEAD = b"\r\n\r\n"

# `what` arguments pack small values into one register (a BPF function has at most 5 arguments).
WHAT_SHIFT = 8


def _byte(b: ir.IRBuilder, base: ir.Value, offset: ir.Value | int) -> ir.Value:
    return gep(b, base, I8, [offset if isinstance(offset, ir.Value) else I64(offset)])


def _is_null(b: ir.IRBuilder, p: ir.Value) -> ir.Value:
    return b.icmp_unsigned("==", b.ptrtoint(p, I64), I64(0))


def _field(b: ir.IRBuilder, what: ir.Value, index: int) -> ir.Value:
    return b.and_(b.lshr(what, I64(WHAT_SHIFT * index)), I64(0xFF))


def pack(b: ir.IRBuilder, *values: ir.Value | int) -> ir.Value:
    """Bytes into one i64 `what` argument, first value lowest."""
    out: ir.Value = I64(0)
    for i, v in enumerate(values):
        v = I64(v) if isinstance(v, int) else v
        out = b.or_(out, b.shl(b.and_(v, I64(0xFF)), I64(WHAT_SHIFT * i)))
    return out


@dataclass(frozen=True)
class CtxLayout:
    """Where a program's context holds what an event records: `struct sk_msg_md` for the sk_msg
    program, `struct __sk_buff` for the sk_skb one (the same formats: ports as in sk_msg_md,
    addresses in network order)."""

    size: int
    family: int
    remote_ip4: int
    local_ip4: int
    remote_ip6: int
    local_ip6: int
    remote_port: int
    local_port: int
    # The program runs in the sending task (sk_msg): its pid and cgroup mean something. An sk_skb
    # program runs in the receive path, whatever task it interrupted, and 6.1 refuses
    # bpf_get_current_pid_tgid there ("unknown func"): the event says 0.
    in_task: bool = True


MSG_CTX = CtxLayout(
    MSG_SIZE, MSG_FAMILY, MSG_REMOTE_IP4, MSG_LOCAL_IP4, MSG_REMOTE_IP6, MSG_LOCAL_IP6,
    MSG_REMOTE_PORT, MSG_LOCAL_PORT,
)  # fmt: skip
SKB_CTX = CtxLayout(
    SKB_LEN, SKB_FAMILY, SKB_REMOTE_IP4, SKB_LOCAL_IP4, SKB_REMOTE_IP6, SKB_LOCAL_IP6,
    SKB_REMOTE_PORT, SKB_LOCAL_PORT, in_task=False,
)  # fmt: skip


class Recorder:
    """The telemetry of one object: counters, events, mode."""

    def __init__(
        self, ob: ObjectBuilder, tables: Tables, ctx: CtxLayout = MSG_CTX, window: int = MAX_SCAN
    ) -> None:
        self.ob = ob
        self.tables = tables
        self.ctx = ctx
        self.window = window  # the furthest head byte the copiers may read (judge.JudgeCore)

    # --- maps -------------------------------------------------------------------------------

    def maps(self) -> None:
        counter_t = self.ob.dbg.array(self.ob.u64, 2, 64)  # requests, bytes
        self.counts_map = self.ob.btf_map(
            COUNTS_MAP,
            BPF_MAP_TYPE_PERCPU_ARRAY,
            counter_slots(self.tables.n_rules),  # sized by the shape: a hot reload may add rules
            self.ob.u32,
            counter_t,
        )
        self.events_map = self.ob.btf_map(
            EVENTS_MAP, BPF_MAP_TYPE_RINGBUF, EVENTS_BYTES, None, None
        )
        self.evbuf_map = self.ob.btf_map(
            EVBUF_MAP,
            BPF_MAP_TYPE_PERCPU_ARRAY,
            1,
            self.ob.u32,
            self.ob.dbg.array(self.ob.u8, EVENT.size, 8),
        )
        self.ctl_map = self.ob.btf_map(
            CTL_MAP, BPF_MAP_TYPE_ARRAY, 1, self.ob.u32, self.ob.dbg.array(self.ob.u32, 3, 32)
        )

    def functions(self) -> None:
        self.fn_mode = self._mode_fn()
        self.fn_answers_on = self._answers_on_fn()
        self.fn_count = self._count_fn()
        self.copier_t = ir.LiteralStructType([PTR, PTR, PTR, I64, I64])
        self.fn_copy_method = self._copy_method_fn()
        self.fn_find_host = self._find_host_fn()
        self.fn_copy_host = self._copy_host_fn()
        self.fn_event = self._event_fn()
        self.fn_judged = self._judged_fn()
        self.fn_unframed = self._unframed_fn()
        self.fn_unjudged = self._unjudged_fn()

    # --- calls from msg_program -------------------------------------------------------------
    #
    # judged, unframed and unjudged count what happened and return an *outcome*:
    #     bit 0 pass | verdict << 8 | reason << 16 | head << 24 | rule << 32
    # msg_program ends every such run in one block that calls record_event(outcome) and then
    # returns the verdict. One call site of sockpol_event, not one per decision: the verifier
    # walks the event's bpf_loop once for every call site (and state) that reaches it.

    def read_mode(self, b: ir.IRBuilder) -> ir.Value:
        return self.ob.call(b, self.fn_mode)

    def count(self, b: ir.IRBuilder, slot: ir.Value | int, requests: int, nbytes: ir.Value) -> None:
        slot = I64(slot) if isinstance(slot, int) else slot
        self.ob.call(b, self.fn_count, slot, I64(requests), nbytes)

    def judged(self, b, msg, flags, reason, mode, slot, covered) -> ir.Value:
        """A head judged by a rule (slot SLOT_RULES + rule) or the default (SLOT_DEFAULT)."""
        return self.ob.call(b, self.fn_judged, pack(b, flags, reason, mode), slot, covered)

    def unframed(self, b, msg, reason, mode, head, conn) -> ir.Value:
        """Refused before any rule (scanner, max-head); in dry-run the connection goes on."""
        return self.ob.call(b, self.fn_unframed, msg, pack(b, reason, mode, head), conn)

    def unjudged(self, b, msg, resume, mode) -> ir.Value:
        """A send on a connection that a dry-run pass left without framing."""
        return self.ob.call(b, self.fn_unjudged, msg, resume, mode)

    def answers_on(self, b: ir.IRBuilder) -> ir.Value:
        return self.ob.call(b, self.fn_answers_on)

    def answer_for(
        self, fx: Fn, outcome: ir.Value, passed: ir.Value, kind: ir.Value, eligible: ir.Value
    ) -> tuple[ir.Value, ir.Value]:
        """(status, row): how a refusal is answered (status 0: dropped) and with which response
        (`answers` table row). Answered: a request head (not a chunk) refused by a rule, the
        default or the scanner (contract.ANSWERED_REASONS: 3..14, 16, 17), when the deciding
        rule or the policy says a status, the backend's own condition `eligible` holds and the
        loader left answers on (read only then: one map lookup, off the common path)."""
        b = fx.b
        reason = b.and_(b.lshr(outcome, I64(16)), I64(0xFF))
        rule = b.lshr(outcome, I64(32))
        head = b.and_(b.icmp_unsigned("==", kind, I64(RESUME_REQUEST)), b.not_(passed))
        known = b.and_(
            b.icmp_unsigned(">=", reason, I64(Reason.BAD_METHOD)),
            b.icmp_unsigned("<=", reason, I64(Reason.DEFAULT)),
        )
        known = b.and_(known, b.icmp_unsigned("!=", reason, I64(Reason.PULL_FAILED)))
        by_rule = b.icmp_unsigned("!=", rule, I64(NO_RULE))
        flags = fx.load_table("rule_flags", b.select(by_rule, rule, I64(0)), I32)
        index = b.select(by_rule, b.lshr(flags, I64(RULE_ANSWER_SHIFT)), I64(0))
        index = b.and_(index, I64(3))
        status = fx.load_table("answer_status", index, I32)
        answer = b.select(b.and_(head, b.and_(known, eligible)), status, I64(0))
        before = b.block
        with b.if_then(b.icmp_unsigned("!=", answer, I64(0)), likely=False):
            on, asked = self.answers_on(b), b.block
        answers_on = b.phi(I64, "answers_on")
        answers_on.add_incoming(I64(0), before)
        answers_on.add_incoming(on, asked)
        answer = b.select(b.icmp_unsigned("!=", answers_on, I64(0)), answer, I64(0))
        row = b.add(b.mul(index, I64(ANSWER_ROWS)), b.and_(reason, I64(ANSWER_ROWS - 1)))
        return answer, row

    def record_event(
        self,
        b: ir.IRBuilder,
        msg: ir.Value,
        scan: ir.Value,
        outcome: ir.Value,
        answer: ir.Value,
        at: ir.Value | None = None,
    ) -> None:
        """`answer`: the status the refusal is answered with, 0 when dropped (or passed); `at`:
        where the request starts in the packet (sk_skb: after the requests before it)."""
        at = at if at is not None else I64(0)
        with b.if_then(b.icmp_unsigned("!=", _field(b, outcome, 1), I64(0))):
            self.ob.call(b, self.fn_event, msg, scan, outcome, answer, at)

    @staticmethod
    def passes(b: ir.IRBuilder, outcome: ir.Value) -> ir.Value:
        return b.and_(outcome, I64(1))

    # --- the functions ----------------------------------------------------------------------

    def _mode_fn(self) -> ir.Function:
        fn, b = self.ob.function("sockpol_mode", I64, [])
        key = b.alloca(I32, name="key")
        b.store(I32(0), key)
        ctl = h.call(b, h.MAP_LOOKUP_ELEM, self.ctl_map, key)
        with b.if_then(_is_null(b, ctl), likely=False):
            b.ret(I64(0))  # enforce
        b.ret(b.zext(b.load(ctl, typ=I32), I64))
        return fn

    def _answers_on_fn(self) -> ir.Function:
        fn, b = self.ob.function("sockpol_answers_on", I64, [])
        key = b.alloca(I32, name="key")
        b.store(I32(0), key)
        ctl = h.call(b, h.MAP_LOOKUP_ELEM, self.ctl_map, key)
        with b.if_then(_is_null(b, ctl), likely=False):
            b.ret(I64(0))  # unreadable: drop, as before answers
        off = b.load(_byte(b, ctl, CTL_ANSWERS_OFF), typ=I32)
        b.ret(b.zext(b.icmp_unsigned("==", off, I32(0)), I64))
        return fn

    def _count_fn(self) -> ir.Function:
        fn, b = self.ob.function(
            "sockpol_count", I64, [("slot", I64), ("requests", I64), ("bytes", I64)]
        )
        slot, requests, nbytes = fn.args
        key = b.alloca(I32, name="key")
        b.store(b.trunc(slot, I32), key)
        counter = h.call(b, h.MAP_LOOKUP_ELEM, self.counts_map, key)
        with b.if_then(_is_null(b, counter), likely=False):
            b.ret(I64(0))  # a slot past the map: nothing to count
        for offset, add in ((0, requests), (8, nbytes)):
            p = _byte(b, counter, offset)
            b.store(b.add(b.load(p, typ=I64), add), p)
        b.ret(I64(0))
        return fn

    def _judged_fn(self) -> ir.Function:
        fn, b = self.ob.function(
            "sockpol_judged", I64, [("what", I64), ("slot", I64), ("covered", I64)]
        )
        what, slot, covered = fn.args
        flags, reason, mode = (_field(b, what, i) for i in range(3))
        self.ob.call(b, self.fn_count, slot, I64(1), covered)
        rule = b.select(
            b.icmp_unsigned(">=", slot, I64(SLOT_RULES)), b.sub(slot, I64(SLOT_RULES)), I64(NO_RULE)
        )

        def outcome(passed: int, verdict: int, why: ir.Value | int) -> ir.Value:
            return b.or_(pack(b, passed, verdict, why, 1), b.shl(rule, I64(32)))

        with b.if_then(b.icmp_unsigned("!=", b.and_(flags, I64(RULE_AUDIT)), I64(0))):
            self.ob.call(b, self.fn_count, b.add(reason, I64(SLOT_WOULD_REFUSE)), I64(1), covered)
            b.ret(outcome(1, EventKind.AUDIT, reason))
        with b.if_then(b.icmp_unsigned("==", b.and_(flags, I64(RULE_PASS)), I64(0))):
            with b.if_then(b.icmp_unsigned("==", mode, I64(MODE_DRY_RUN))):
                self.ob.call(
                    b, self.fn_count, b.add(reason, I64(SLOT_WOULD_REFUSE)), I64(1), covered
                )
                b.ret(outcome(1, EventKind.DRY_RUN, reason))
            self.ob.call(b, self.fn_count, b.add(reason, I64(SLOT_REFUSED)), I64(1), covered)
            b.ret(outcome(0, EventKind.REFUSED, reason))
        logged = b.icmp_unsigned("!=", b.and_(flags, I64(RULE_LOG)), I64(0))
        b.ret(outcome(1, b.select(logged, I64(EventKind.LOGGED), I64(0)), Reason.NONE))
        return fn

    def _unframed_fn(self) -> ir.Function:
        fn, b = self.ob.function(
            "sockpol_unframed", I64, [("msg", PTR), ("what", I64), ("conn", PTR)]
        )
        msg, what, conn = fn.args
        reason, mode, head = (_field(b, what, i) for i in range(3))
        size = b.zext(b.load(_byte(b, msg, self.ctx.size), typ=I32), I64)
        no_rule = b.shl(I64(NO_RULE), I64(32))
        with b.if_then(b.icmp_unsigned("==", mode, I64(MODE_DRY_RUN))):
            self.ob.call(b, self.fn_count, b.add(reason, I64(SLOT_WOULD_REFUSE)), I64(1), size)
            # Where the next request starts is unknown: the rest of the connection is unjudged.
            b.store(b.or_(I64(RESUME_UNJUDGED), b.shl(reason, I64(8))), conn)
            b.ret(b.or_(pack(b, 1, EventKind.DRY_RUN, reason, head), no_rule))
        self.ob.call(b, self.fn_count, b.add(reason, I64(SLOT_REFUSED)), I64(1), size)
        b.ret(b.or_(pack(b, 0, EventKind.REFUSED, reason, head), no_rule))
        return fn

    def _unjudged_fn(self) -> ir.Function:
        fn, b = self.ob.function(
            "sockpol_unjudged", I64, [("msg", PTR), ("resume", I64), ("mode", I64)]
        )
        msg, resume, mode = fn.args
        size = b.zext(b.load(_byte(b, msg, self.ctx.size), typ=I32), I64)
        with b.if_then(b.icmp_unsigned("==", mode, I64(MODE_DRY_RUN))):
            self.ob.call(b, self.fn_count, I64(SLOT_UNJUDGED), I64(1), size)
            b.ret(I64(1))  # passes, no event: the dry-run event was recorded when framing was lost
        # Enforcing again: the connection would have been refused when it lost its framing.
        reason = _field(b, resume, 1)
        self.ob.call(b, self.fn_count, b.add(reason, I64(SLOT_REFUSED)), I64(1), size)
        b.ret(b.or_(pack(b, 0, EventKind.REFUSED, reason, 0), b.shl(I64(NO_RULE), I64(32))))
        return fn

    # --- events -----------------------------------------------------------------------------

    def _event_fn(self) -> ir.Function:
        """Fill the per-CPU event buffer from the ctx, the scan and the head, then output it.

        `outcome` as returned by judged/unframed/unjudged; its head bit says the run started at
        a request head, so its first bytes are the method and its lines may hold a Host header.
        The head's bytes are copied by three bpf_loops whose callbacks keep no state between
        iterations, so the verifier checks each callback once (a copier that tracked lengths
        and match progress byte by byte made it walk thousands of states per call)."""
        fn, b = self.ob.function(
            "sockpol_event",
            I64,
            [("msg", PTR), ("scan", PTR), ("outcome", I64), ("answer", I64), ("at", I64)],
        )
        msg, scan, outcome, answer, at = fn.args
        fx = Fn.of_scan(b, self.tables, scan)
        verdict, reason, head = (_field(b, outcome, i) for i in range(1, 4))
        rule = b.lshr(outcome, I64(32))
        key = b.alloca(I32, name="key")
        st = b.alloca(self.copier_t, name="copier")
        b.store(I32(0), key)
        ev = h.call(b, h.MAP_LOOKUP_ELEM, self.evbuf_map, key)
        with b.if_then(_is_null(b, ev), likely=False):
            self.ob.call(b, self.fn_count, I64(SLOT_LOST), I64(1), I64(0))
            b.ret(I64(0))

        def put(field: str, value: ir.Value) -> None:
            typ = {1: I8, 2: I16, 4: I32, 8: I64}[_size(field)]
            if value.type != typ:
                value = b.trunc(value, typ) if value.type.width > typ.width else b.zext(value, typ)
            b.store(value, _byte(b, ev, EVENT_OFFSETS[field]))

        def ctx32(offset: int) -> ir.Value:
            return b.load(_byte(b, msg, offset), typ=I32)

        put("time_ns", h.call(b, h.KTIME_GET_NS))
        in_task = self.ctx.in_task
        put("pid_tgid", h.call(b, h.GET_CURRENT_PID_TGID) if in_task else I64(0))
        put("cgroup_id", h.call(b, h.GET_CURRENT_CGROUP_ID) if in_task else I64(0))
        put("rule", rule)
        put("size", ctx32(self.ctx.size))
        put("verdict", verdict)
        put("reason", reason)
        put("answer", answer)
        put("family", ctx32(self.ctx.family))
        put("remote_port", ctx32(self.ctx.remote_port))
        put("local_port", ctx32(self.ctx.local_port))
        # Addresses keep their network byte order: a u32 loaded and stored back is the same bytes.
        b.store(ctx32(self.ctx.remote_ip4), _byte(b, ev, EVENT_OFFSETS["remote_ip4"]))
        b.store(ctx32(self.ctx.local_ip4), _byte(b, ev, EVENT_OFFSETS["local_ip4"]))
        ip6 = (("remote_ip6", self.ctx.remote_ip6), ("local_ip6", self.ctx.local_ip6))
        for i in range(4):
            for side, ctx_offset in ip6:
                word = ctx32(ctx_offset + 4 * i)
                b.store(word, _byte(b, ev, EVENT_OFFSETS[side] + 4 * i))

        # The canonical path: its length, and its first PATH_BYTES bytes (both buffers are map
        # values of known size, so fixed-size 8-byte copies need no bounds checks).
        put("path_len", fx.get("out_len"))
        scratch = fx.get("scratch")
        for off in range(0, PATH_BYTES, 8):
            word = b.load(_byte(b, scratch, off), typ=I64)
            b.store(word, _byte(b, ev, EVENT_OFFSETS["path"] + off))

        def st_slot(field: str) -> ir.Value:
            return gep(b, st, self.copier_t, [I32(0), I32(C[field])])

        b.store(fx.get("data"), st_slot("data"))
        b.store(fx.get("data_end"), st_slot("data_end"))
        b.store(ev, st_slot("ev"))
        b.store(at, st_slot("at"))
        # Loaded, not a constant: the verifier then knows it as a range that the value stored
        # by the search (an offset) lies within, and the search loop's walk converges at once.
        b.store(fx.config("zero"), st_slot("host_at"))
        is_head = b.icmp_unsigned("!=", head, I64(0))
        # The search runs to the end of the head or of the window, not to the scan's `pos`:
        # reading pos here makes the verifier track it precisely in the scan loop too, and
        # that loop then no longer converges.
        scanned = I64(self.window)

        def loop(n: ir.Value, callback: ir.Function) -> ir.Value:
            return h.call(
                b, h.LOOP, b.trunc(b.select(is_head, n, I64(0)), I32), callback, st, I64(0)
            )

        # bpf_loop returns the iterations run, the stopping one included: a method of L bytes
        # stops at index L (its blank) and returns L + 1; one longer than METHOD_BYTES runs all
        # METHOD_BYTES + 2 and so reads as METHOD_BYTES + 1, "cut".
        ran = loop(I64(METHOD_BYTES + 2), self.fn_copy_method)
        put("method_len", b.select(is_head, b.sub(ran, I64(1)), I64(0)))
        host_len = I64(0)
        put("host_len", host_len)
        loop(scanned, self.fn_find_host)
        host_at = b.load(gep(b, st, self.copier_t, [I32(0), I32(C["host_at"])]), typ=I64)
        with b.if_then(b.and_(is_head, b.icmp_unsigned("!=", host_at, I64(0)))):
            ran = loop(I64(HOST_BYTES + 2), self.fn_copy_host)
            put("host_len", b.sub(ran, I64(1)))

        ret = h.call(b, h.RINGBUF_OUTPUT, self.events_map, ev, I64(EVENT.size), I64(0))
        with b.if_then(b.icmp_signed("<", ret, I64(0)), likely=False):
            self.ob.call(b, self.fn_count, I64(SLOT_LOST), I64(1), I64(0))  # full: lose the event
        b.ret(I64(0))
        return fn

    def _copier_fn(self, name: str):
        """A bpf_loop callback over the head: (builder, state, index, byte at data[index + at])
        where `at` is where it starts; out-of-window bytes end the loop."""
        # The index is declared u64 (as the helper passes it): with an i32, LLVM compares its
        # 32-bit half and indexes with a 64-bit copy made earlier, whose bounds the verifier
        # then does not know.
        fn, b = self.ob.function(name, I64, [("index", I64), ("ctx", PTR)])
        index, st = fn.args
        return fn, b, index, st

    def _window(
        self, fn: ir.Function, b: ir.IRBuilder, st: ir.Value, i: ir.Value, n: int = 1
    ) -> ir.Value:
        """Pointer to data[i], returning 1 (stop) from the callback unless data[i .. i+n-1] are
        all in the window. The check is made on that same pointer plus a constant (as in
        emit.scan_step), which is what lets the verifier grant the loads below it."""
        stop = fn.append_basic_block("stop")
        bounded = fn.append_basic_block("bounded")
        body = fn.append_basic_block("in_window")
        b.cbranch(b.icmp_unsigned(">", i, I64(self.window + 1 - n)), stop, bounded)
        b.position_at_end(bounded)
        data = b.load(gep(b, st, self.copier_t, [I32(0), I32(C["data"])]), typ=PTR)
        data_end = b.load(gep(b, st, self.copier_t, [I32(0), I32(C["data_end"])]), typ=PTR)
        # Not inbounds: data + i + n may point past the window; that is what the check tests.
        p = b.gep(data, [i], source_etype=I8)
        b.cbranch(b.icmp_unsigned(">", b.gep(p, [I64(n)], source_etype=I8), data_end), stop, body)
        b.position_at_end(stop)
        b.ret(I64(1))
        b.position_at_end(body)
        return p

    def _byte_at(self, fn: ir.Function, b: ir.IRBuilder, st: ir.Value, i: ir.Value) -> ir.Value:
        """data[i] as i64, returning 1 (stop) from the callback when i is outside the window."""
        return b.zext(b.load(self._window(fn, b, st, i), typ=I8), I64)

    def _at(self, b: ir.IRBuilder, st: ir.Value) -> ir.Value:
        return b.load(gep(b, st, self.copier_t, [I32(0), I32(C["at"])]), typ=I64)

    def _ev(self, b: ir.IRBuilder, st: ir.Value) -> ir.Value:
        return b.load(gep(b, st, self.copier_t, [I32(0), I32(C["ev"])]), typ=PTR)

    def _copy_method_fn(self) -> ir.Function:
        """Byte `index` of the request line, until the first blank: into `method`."""
        fn, b, index, st = self._copier_fn("sockpol_copy_method")
        i = index
        c = self._byte_at(fn, b, st, b.add(self._at(b, st), i))
        with b.if_then(_blank_or_eol(b, c)):
            b.ret(I64(1))
        with b.if_then(b.icmp_unsigned("<", i, I64(METHOD_BYTES))):
            at = b.add(b.and_(i, I64(METHOD_BYTES - 1)), I64(EVENT_OFFSETS["method"]))
            b.store(b.trunc(c, I8), _byte(b, self._ev(b, st), at))
        b.ret(I64(0))
        return fn

    def _find_host_fn(self) -> ir.Function:
        """Is byte `index` a LF followed by `host:` (any case)? Then note where the value starts
        and stop. Looks at those six bytes alone: no state across iterations."""
        fn, b, index, st = self._copier_fn("sockpol_find_host")
        pattern = b"\n" + HOST_PREFIX
        # One window for both tests: LLVM merges the loads of two, and the verifier then sees
        # loads through a pointer checked for fewer bytes. Less than six bytes left: stop.
        index = b.add(self._at(b, st), index)  # from where the request starts
        p = self._window(fn, b, st, index, len(pattern))
        at_end = ir.Constant(ir.IntType(1), 1)
        for k, want in enumerate(END_OF_HEAD):
            c = b.zext(b.load(gep(b, p, I8, [I64(k)]), typ=I8), I64)
            at_end = b.and_(at_end, b.icmp_unsigned("==", c, I64(want)))
        with b.if_then(at_end):
            b.ret(I64(1))  # the blank line: no Host header in this head
        miss = ir.Constant(ir.IntType(1), 0)
        for k, want in enumerate(pattern):
            c = b.zext(b.load(gep(b, p, I8, [I64(k)]), typ=I8), I64)
            if want != ord("\n"):
                c = b.or_(c, I64(0x20))  # ASCII lower case; ':' is unchanged
            miss = b.or_(miss, b.icmp_unsigned("!=", c, I64(want)))
        with b.if_then(miss):
            b.ret(I64(0))
        host_at = b.add(index, I64(len(pattern)))
        b.store(host_at, gep(b, st, self.copier_t, [I32(0), I32(C["host_at"])]))
        b.ret(I64(1))
        return fn

    def _copy_host_fn(self) -> ir.Function:
        """Byte `index` of the Host line's value (blanks after the colon included), until CR."""
        fn, b, index, st = self._copier_fn("sockpol_copy_host")
        i = index
        host_at = b.load(gep(b, st, self.copier_t, [I32(0), I32(C["host_at"])]), typ=I64)
        c = self._byte_at(fn, b, st, b.add(host_at, i))
        cr = b.icmp_unsigned("==", c, I64(0x0D))
        with b.if_then(b.or_(cr, b.icmp_unsigned("==", c, I64(0x0A)))):
            b.ret(I64(1))
        with b.if_then(b.icmp_unsigned("<", i, I64(HOST_BYTES))):
            at = b.add(b.and_(i, I64(HOST_BYTES - 1)), I64(EVENT_OFFSETS["host"]))
            b.store(b.trunc(c, I8), _byte(b, self._ev(b, st), at))
        b.ret(I64(0))
        return fn


def _blank_or_eol(b: ir.IRBuilder, c: ir.Value) -> ir.Value:
    out = b.icmp_unsigned("==", c, I64(0x20))
    for other in (0x09, 0x0D, 0x0A):
        out = b.or_(out, b.icmp_unsigned("==", c, I64(other)))
    return out


def _size(field: str) -> int:
    return struct.calcsize("<" + dict(EVENT_FIELDS)[field])
