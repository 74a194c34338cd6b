"""The sk_skb backend: an ingress policy (`side ingress`) judges the requests a server receives.

The generated object has:
- `sockpol_sockops` (section `sockops`, attached to the server's cgroup): on
  PASSIVE_ESTABLISHED of a connection accepted on a governed local port, creates the
  connection's state (`sockpol_conn`, a hash map keyed by socket cookie: sk_skb programs cannot
  use socket storage, "program of this type cannot use helper bpf_sk_storage_get"), asks for
  state callbacks and puts the socket in the sockhash; on its TCP_CLOSE, deletes the state.
- `sockpol_skb` (section `sk_skb/stream_verdict`, attached to the sockhash; no stream parser):
  runs once for every skb the connection receives, in order, before the server can read it.
  It judges with the same tables and the same judging core (judge.py) as the sk_msg program.

How an skb is judged (docs/design.md, "The receiving side"):
- A run judges one unit from `at` (the request head, or the bytes of a body the earlier verdict
  covers); when the unit passes and bytes follow in the skb (pipelining), it stores the unit's
  end at IN_AT and tail-calls the newest version's program (slot 0 of `sockpol_next`, which the
  loader fills at every load) to judge the next one. A fresh skb starts at IN_AT = 0.
- A head cut by the end of the skb is not held (no verdict program can hold bytes): its bytes
  pass to the server's receive queue, the scan state stays in the connection's work area (all
  its scalars live there, judge.py), and the next skb goes on from that state. A server never
  acts on half a head; if the completed head is refused, its end never arrives.
- A refusal ends the connection for the server: the word becomes RESUME_ANSWERED and every
  later skb is dropped. With an answer (the default for ingress: 403), the refused skb is
  rewritten into the response and redirected to the socket's own egress
  (bpf_sk_redirect_hash without BPF_F_INGRESS): the client reads it from the server's address.
  Allowed requests before the refused one in the same skb are then not delivered (the skb is
  one verdict); with `answer drop` they are (the skb is cut before the refused request).
"""

from __future__ import annotations

from llvmlite import ir

from sockpol.codegen import helpers as h
from sockpol.codegen.helpers import I8, I32, I64, PTR, gep
from sockpol.codegen.judge import JudgeCore
from sockpol.codegen.lower import MatcherIR
from sockpol.codegen.objbuilder import ObjectBuilder
from sockpol.codegen.record import SKB_CTX, Recorder
from sockpol.codegen.scanner import BODY_END, CHUNK_LINE, END, TERMINAL_STATES
from sockpol.codegen.tables import (
    CONN_KEY,
    CONN_LEFT,
    CONN_SCRATCH,
    SCAN_T,
    Fn,
    Tables,
    conn_value_size,
)
from sockpol.contract import (
    AF_INET,
    AF_INET6,
    ANSWER_BYTES,
    BPF_ANY,
    BPF_F_NO_PREALLOC,
    BPF_MAP_TYPE_ARRAY,
    BPF_MAP_TYPE_HASH,
    BPF_MAP_TYPE_PROG_ARRAY,
    BPF_MAP_TYPE_SOCKHASH,
    BPF_NOEXIST,
    BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
    BPF_SOCK_OPS_STATE_CB,
    BPF_SOCK_OPS_STATE_CB_FLAG,
    CONN_HTTP,
    CONN_MAP,
    NEXT_MAP,
    OPS_ARGS,
    OPS_FAMILY,
    OPS_LOCAL_PORT,
    OPS_OP,
    RESUME_ANSWERED,
    RESUME_CHUNK_DATA_END,
    RESUME_REQUEST,
    RESUME_UNJUDGED,
    SK_DROP,
    SK_PASS,
    SKB_DATA,
    SKB_DATA_END,
    SKB_LEN,
    SKB_LOCAL_PORT,
    SKB_PROGRAM,
    SOCK_MAP,
    SOCK_MAP_ENTRIES,
    SOCKOPS_PROGRAM,
    TCP_CLOSE,
    Reason,
)
from sockpol.telemetry import (
    CTL_SERIAL,
    SLOT_ANSWERED,
    SLOT_REFUSED,
)

# After the connection's usual value (word, left, key, work area): where the next run starts in
# the current skb (0: a new skb), and the bytes of a head begun in earlier skbs plus one (0: no
# head in progress: the next bytes start a unit afresh).
IN_AT = conn_value_size()
IN_HEAD = IN_AT + 8
IN_VALUE_SIZE = IN_HEAD + 8
ZERO_MAP = "sockpol_zero"  # one zeroed value: what a new connection's state starts from


class SkSkbBackend:
    """The ingress backend: the same tables, judging core and recorder as the sk_msg backend,
    a verdict program over skbs and a sock_ops program for accepted connections."""

    def __init__(self, ir_: MatcherIR) -> None:
        self.ir = ir_
        self.ob = ObjectBuilder(ir_.policy.name)
        self.tables = Tables(self.ob, ir_)
        self.rec = Recorder(self.ob, self.tables, SKB_CTX)
        self.judge = JudgeCore(self.ob, self.tables)

    def maps(self) -> None:
        ob = self.ob
        self.socks = ob.btf_map(SOCK_MAP, BPF_MAP_TYPE_SOCKHASH, SOCK_MAP_ENTRIES, ob.u64, ob.u32)
        value_t = ob.dbg.array(ob.u64, IN_VALUE_SIZE // 8, 64)
        self.conn_map = ob.btf_map(
            CONN_MAP, BPF_MAP_TYPE_HASH, SOCK_MAP_ENTRIES, ob.u64, value_t, BPF_F_NO_PREALLOC
        )
        self.zero_map = ob.btf_map(ZERO_MAP, BPF_MAP_TYPE_ARRAY, 1, ob.u32, value_t)
        self.next_map = ob.btf_map(NEXT_MAP, BPF_MAP_TYPE_PROG_ARRAY, 1, ob.u32, ob.u32)
        self.rec.maps()

    # --- sk_skb program ---------------------------------------------------------------------

    def skb_program(
        self, scan_step: ir.Function, path_step: ir.Function, rule_step: ir.Function
    ) -> None:
        fn, b = self.ob.function(SKB_PROGRAM, I32, [("skb", PTR)], section="sk_skb/stream_verdict")
        skb = fn.args[0]
        scan = b.alloca(SCAN_T, name="scan")
        key = b.alloca(I64, name="cookie")
        self.handover(b, skb)
        fx = Fn(b, self.tables, base=self.tables.select(b), scan=scan)

        def ctx32(offset: int) -> ir.Value:
            return b.load(gep(b, skb, I8, [I64(offset)]), typ=I32)

        def ctx_ptr(offset: int) -> ir.Value:
            return b.inttoptr(b.zext(ctx32(offset), I64), PTR)

        size = b.zext(ctx32(SKB_LEN), I64)
        with b.if_then(b.icmp_unsigned("==", size, I64(0)), likely=False):
            b.ret(I32(SK_PASS))
        # A port the policy in force does not govern (a reload changed the ports): passed.
        port = b.zext(ctx32(SKB_LOCAL_PORT), I64)
        bits = fx.load_table("ports", b.lshr(b.and_(port, I64(0xFFFF)), I64(3)), I8)
        governed = b.and_(b.lshr(bits, b.and_(port, I64(7))), I64(1))
        with b.if_then(b.icmp_unsigned("==", governed, I64(0)), likely=False):
            b.ret(I32(SK_PASS))
        b.store(h.call(b, h.GET_SOCKET_COOKIE, skb), key)
        conn = h.call(b, h.MAP_LOOKUP_ELEM, self.conn_map, key)
        with b.if_then(b.icmp_unsigned("==", b.ptrtoint(conn, I64), I64(0)), likely=False):
            # No state (the table was full when it was accepted): cannot follow the stream.
            self.rec.count(b, SLOT_REFUSED + Reason.PULL_FAILED, 1, size)
            b.ret(I32(SK_DROP))

        def field(offset: int) -> ir.Value:
            return gep(b, conn, I8, [I64(offset)])

        at = b.load(field(IN_AT), typ=I64)
        b.store(I64(0), field(IN_AT))  # every run that does not go on ends the skb
        resume = b.load(conn, typ=I64)
        kind = b.and_(resume, I64(0xFF))
        with b.if_then(b.icmp_unsigned("==", kind, I64(RESUME_ANSWERED)), likely=False):
            # A request on this connection was refused: nothing after it reaches the server.
            self.rec.count(b, SLOT_ANSWERED, 0, size)
            b.ret(I32(SK_DROP))
        rest = b.sub(size, b.select(b.icmp_unsigned("<", at, size), at, size))
        left_ptr = field(CONN_LEFT)

        def go_on(end: ir.Value) -> None:
            """The unit ending at `end` passed: judge what follows it in this skb (the next
            run, by a tail call), or pass the skb when nothing does."""
            with b.if_then(b.icmp_unsigned(">=", end, size)):
                b.ret(I32(SK_PASS))
            b.store(end, field(IN_AT))
            h.call(b, h.TAIL_CALL, skb, self.next_map, I32(0))
            # No more tail calls (33 per skb) or no program: what follows is not judged, so it
            # does not reach the server; the connection ends as after a refusal.
            b.store(I64(0), field(IN_AT))
            b.store(I64(RESUME_ANSWERED | CONN_HTTP), conn)
            self.rec.count(b, SLOT_REFUSED + Reason.PULL_FAILED, 1, b.sub(size, end))
            cut = h.call(b, h.SKB_CHANGE_TAIL, skb, b.trunc(end, I32), I64(0))
            b.ret(b.select(b.icmp_unsigned("==", cut, I64(0)), I32(SK_PASS), I32(SK_DROP)))

        # The rest of a body that an earlier verdict covered: passed without a look.
        left = b.load(left_ptr, typ=I64)
        with b.if_then(b.icmp_unsigned("!=", left, I64(0))):
            part = b.select(b.icmp_unsigned("<", left, rest), left, rest)
            b.store(b.sub(left, part), left_ptr)
            go_on(b.add(at, part))

        mode = self.rec.read_mode(b)
        with b.if_then(b.icmp_unsigned("==", kind, I64(RESUME_UNJUDGED)), likely=False):
            outcome = self.rec.unjudged(b, skb, resume, mode)  # dry-run lost the framing
            with b.if_then(b.icmp_unsigned("!=", self.rec.passes(b, outcome), I64(0))):
                b.ret(I32(SK_PASS))
            b.store(I64(RESUME_ANSWERED | CONN_HTTP), conn)
            b.ret(I32(SK_DROP))

        # The bytes of this unit the scan may read: up to max-head of a head, counting the part
        # of it earlier skbs brought.
        max_head = fx.config("max_head")
        head_in = b.load(field(IN_HEAD), typ=I64)
        # The event shows method and Host only for a head read whole in this skb.
        whole = b.zext(
            b.and_(
                b.icmp_unsigned("==", kind, I64(RESUME_REQUEST)),
                b.icmp_unsigned("==", head_in, I64(0)),
            ),
            I64,
        )
        earlier = b.select(b.icmp_unsigned("!=", head_in, I64(0)), b.sub(head_in, I64(1)), I64(0))
        budget = b.select(b.icmp_unsigned("<", earlier, max_head), b.sub(max_head, earlier), I64(0))
        span = b.select(b.icmp_unsigned("<", rest, budget), rest, budget)
        limit = b.add(at, span)
        pulled = h.call(b, h.SKB_PULL_DATA, skb, b.trunc(limit, I32))
        scratch = gep(b, conn, I8, [I64(CONN_SCRATCH)])
        fx.put("data", ctx_ptr(SKB_DATA))
        fx.put("data_end", ctx_ptr(SKB_DATA_END))
        fx.put("scratch", scratch)
        fx.put("tables", fx.base)

        record = fn.append_basic_block("record")
        recorded: list[tuple[ir.Value, ir.Value, ir.Block]] = []

        def finish(outcome: ir.Value, end: ir.Value) -> None:
            recorded.append((outcome, end, b.block))
            b.branch(record)

        def refuse(reason: ir.Value, head: ir.Value) -> None:
            finish(self.rec.unframed(b, skb, reason, mode, head, conn), at)

        with b.if_then(b.icmp_unsigned("!=", pulled, I64(0)), likely=False):
            refuse(I64(Reason.PULL_FAILED), I64(0))

        # A unit that starts afresh gets the scan's initial values (as in the sk_msg program);
        # a head begun in an earlier skb goes on from the state it left.
        fresh = fn.append_basic_block("fresh")
        going_on = fn.append_basic_block("going_on")
        scan_it = fn.append_basic_block("scan")
        b.cbranch(b.icmp_unsigned("==", head_in, I64(0)), fresh, going_on)
        b.position_at_end(fresh)
        zero = fx.config("zero")
        # (Its first call tries the start state's literals, a request's method: `begin`.)
        JudgeCore.begin(fx, JudgeCore.start_state(fx, kind), zero, literals=self.judge.literals)
        b.branch(scan_it)
        b.position_at_end(going_on)
        fx.put("pending", I64(0))
        b.branch(scan_it)
        b.position_at_end(scan_it)
        fx.put("pos", at)
        fx.put("limit", limit)
        JudgeCore.scan(fx, span, scan_step)

        # The scan reads up to the end of the linear data (the judging core checks the window,
        # which for sk_msg ends where the bytes pulled end); an skb's linear part may go on past
        # `limit`, the end of what max-head allows: a unit that needed bytes past it is too large,
        # whatever the scan made of them.
        with b.if_then(b.icmp_unsigned(">", fx.get("pos"), limit), likely=False):
            b.store(I64(0), field(IN_HEAD))
            refuse(I64(Reason.HEAD_TOO_LARGE), whole)
        state = fx.get("state")
        complete = fn.append_basic_block("head_complete")
        not_complete = fn.append_basic_block("head_not_complete")
        b.cbranch(b.icmp_unsigned("==", state, I64(END)), complete, not_complete)

        b.position_at_end(complete)
        b.store(I64(0), field(IN_HEAD))
        d = JudgeCore.decide(fx, path_step, rule_step)
        end = d.end
        b.store(d.word, conn)
        outcome = self.rec.judged(b, skb, d.flags, d.reason, mode, d.counter, b.sub(end, at))
        # The body beyond this skb is covered by the next runs (left).
        beyond = b.icmp_unsigned(">", end, size)
        b.store(b.select(beyond, b.sub(end, size), I64(0)), left_ptr)
        finish(outcome, b.select(beyond, size, end))

        b.position_at_end(not_complete)
        body_counter = b.lshr(resume, I64(32))
        with b.if_then(b.icmp_unsigned("==", state, I64(CHUNK_LINE))):
            b.store(I64(0), field(IN_HEAD))
            keep = b.and_(resume, I64(0xFFFFFFFF00000000))
            b.store(b.or_(keep, I64(RESUME_CHUNK_DATA_END | CONN_HTTP)), conn)
            data_end = b.add(fx.get("pos"), fx.get("chunk"))
            self.rec.count(b, body_counter, 0, b.sub(data_end, at))
            over = b.icmp_unsigned(">", data_end, size)
            b.store(b.select(over, b.sub(data_end, size), I64(0)), left_ptr)
            go_on(b.select(over, size, data_end))
        with b.if_then(b.icmp_unsigned("==", state, I64(BODY_END))):
            b.store(I64(0), field(IN_HEAD))
            b.store(I64(RESUME_REQUEST | CONN_HTTP), conn)
            self.rec.count(b, body_counter, 0, b.sub(fx.get("pos"), at))
            go_on(fx.get("pos"))
        refused = b.icmp_unsigned("<", state, I64(TERMINAL_STATES))
        with b.if_then(refused):
            b.store(I64(0), field(IN_HEAD))
            refuse(state, whole)
        # Not complete. Every byte of the skb read and max-head not reached: the head goes on
        # in the next skb; these bytes pass (a server acts on no half head). Otherwise (max-head
        # reached, or bytes the scan could not read: past 64 KiB of an skb) refused.
        scanned_all = b.icmp_unsigned("==", fx.get("pos"), size)
        total = b.add(earlier, span)
        room = b.icmp_unsigned("<", total, max_head)
        with b.if_then(b.and_(scanned_all, room)):
            b.store(b.add(total, I64(1)), field(IN_HEAD))
            b.ret(I32(SK_PASS))
        b.store(I64(0), field(IN_HEAD))
        short = b.icmp_unsigned("<", fx.get("pos"), limit)  # the scan could not read on
        refuse(b.select(short, I64(Reason.PULL_FAILED), I64(Reason.HEAD_TOO_LARGE)), whole)

        b.position_at_end(record)
        outcome, end = b.phi(I64, "outcome"), b.phi(I64, "end")
        for value, nbytes, block in recorded:
            outcome.add_incoming(value, block)
            end.add_incoming(nbytes, block)
        passed = b.icmp_unsigned("!=", self.rec.passes(b, outcome), I64(0))
        answer, row = self.answer_for(fx, outcome, passed, kind)
        # A head begun in an earlier skb: its method and Host are not in this one; an offset past
        # the window makes the event's copiers stop at once.
        event_at = b.select(b.icmp_unsigned("!=", whole, I64(0)), at, I64(0x10000))
        self.rec.record_event(b, skb, scan, outcome, answer, event_at)
        with b.if_then(passed):
            go_on(end)
        # Refused: nothing of this request, nor anything after it, reaches the server.
        b.store(I64(RESUME_ANSWERED | CONN_HTTP), conn)
        b.store(I64(0), left_ptr)
        with b.if_then(b.icmp_unsigned("!=", answer, I64(0)), likely=False):
            self.answer(fx, skb, row, key, size)
        with b.if_then(b.icmp_unsigned("!=", at, I64(0))):
            # `answer drop`: the requests before the refused one in this skb pass.
            # Cut failing: nothing of the skb passes (the refused request must not).
            cut = h.call(b, h.SKB_CHANGE_TAIL, skb, b.trunc(at, I32), I64(0))
            b.ret(b.select(b.icmp_unsigned("==", cut, I64(0)), I32(SK_PASS), I32(SK_DROP)))
        b.ret(I32(SK_DROP))

    def handover(self, b: ir.IRBuilder, skb: ir.Value) -> None:
        """As the sk_msg program's (emit.SkMsgBackend.handover): a run of a version that is not
        the one in force tail-calls the newest version's program."""
        key = b.alloca(I32, name="ctl_key")
        b.store(I32(0), key)
        ctl = h.call(b, h.MAP_LOOKUP_ELEM, self.rec.ctl_map, key)
        with b.if_then(b.icmp_unsigned("!=", b.ptrtoint(ctl, I64), I64(0))):
            current = b.load(gep(b, ctl, I8, [I64(CTL_SERIAL)]), typ=I32)
            other = b.icmp_unsigned("!=", current, self.tables.serial(b))
            with b.if_then(b.and_(other, b.icmp_unsigned("!=", current, I32(0))), likely=False):
                h.call(b, h.TAIL_CALL, skb, self.next_map, I32(0))

    def answer_for(
        self, fx: Fn, outcome: ir.Value, passed: ir.Value, kind: ir.Value
    ) -> tuple[ir.Value, ir.Value]:
        """(status, row) as in the sk_msg backend: a refused request head (not a chunk) by a
        rule, the default or the scanner, answered when the policy or the rule says a status
        and the loader left answers on."""
        return self.rec.answer_for(fx, outcome, passed, kind, ir.Constant(ir.IntType(1), 1))

    def answer(self, fx: Fn, skb: ir.Value, row: ir.Value, key: ir.Value, size: ir.Value) -> None:
        """The skb becomes the response of `row` (ANSWER_BYTES long) and goes out of the
        socket itself, to the client. Any helper failing drops it instead."""
        b = fx.b
        fx.put("cand_off", row)  # through map memory, for the 6.1 verifier (emit.answer)

        def check(ret: ir.Value) -> None:
            with b.if_then(b.icmp_unsigned("!=", ret, I64(0)), likely=False):
                b.ret(I32(SK_DROP))

        check(h.call(b, h.SKB_CHANGE_TAIL, skb, I32(ANSWER_BYTES), I64(0)))
        src = fx.table("answers", fx.get("cand_off"), I32(0))
        check(h.call(b, h.SKB_STORE_BYTES, skb, I32(0), src, I32(ANSWER_BYTES), I64(0)))
        self.rec.count(b, SLOT_ANSWERED, 1, size)
        ret = h.call(b, h.SK_REDIRECT_HASH, skb, self.socks, key, I64(0))
        b.ret(b.trunc(ret, I32))

    # --- sock_ops program -------------------------------------------------------------------

    def sockops_program(self) -> None:
        fn, b = self.ob.function(SOCKOPS_PROGRAM, I32, [("ops", PTR)], section="sockops")
        ops = fn.args[0]
        key = b.alloca(I64, name="cookie")
        zkey = b.alloca(I32, name="zero_key")

        def ctx_load(offset: int) -> ir.Value:
            return b.load(gep(b, ops, I8, [I64(offset)]), typ=I32)

        op = ctx_load(OPS_OP)
        with b.if_then(b.icmp_unsigned("==", op, I32(BPF_SOCK_OPS_STATE_CB))):
            # args[1]: the new state. A closed connection's state goes with it.
            with b.if_then(b.icmp_unsigned("==", ctx_load(OPS_ARGS + 4), I32(TCP_CLOSE))):
                b.store(h.call(b, h.GET_SOCKET_COOKIE, ops), key)
                h.call(b, h.MAP_DELETE_ELEM, self.conn_map, key)
            b.ret(I32(1))
        with b.if_then(b.icmp_unsigned("!=", op, I32(BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB))):
            b.ret(I32(1))
        family = ctx_load(OPS_FAMILY)
        inet = b.or_(
            b.icmp_unsigned("==", family, I32(AF_INET)),
            b.icmp_unsigned("==", family, I32(AF_INET6)),
        )
        with b.if_then(b.not_(inet)):
            b.ret(I32(1))
        port = ctx_load(OPS_LOCAL_PORT)  # host order
        governed = h.in_ports(b, port, self.ir.policy.ports)
        with b.if_then(b.not_(governed)):
            b.ret(I32(1))
        cookie = h.call(b, h.GET_SOCKET_COOKIE, ops)
        b.store(cookie, key)
        b.store(I32(0), zkey)
        zero = h.call(b, h.MAP_LOOKUP_ELEM, self.zero_map, zkey)
        with b.if_then(b.icmp_unsigned("==", b.ptrtoint(zero, I64), I64(0))):
            b.ret(I32(1))
        # Without its state the verdict program refuses every byte of the connection: a full
        # table fails closed.
        h.call(b, h.MAP_UPDATE_ELEM, self.conn_map, key, zero, I64(BPF_ANY))
        conn = h.call(b, h.MAP_LOOKUP_ELEM, self.conn_map, key)
        with b.if_then(b.icmp_unsigned("!=", b.ptrtoint(conn, I64), I64(0))):
            b.store(cookie, gep(b, conn, I8, [I64(CONN_KEY)]))
        h.call(b, h.SOCK_OPS_CB_FLAGS_SET, ops, I32(BPF_SOCK_OPS_STATE_CB_FLAG))
        h.call(b, h.SOCK_HASH_UPDATE, ops, self.socks, key, I64(BPF_NOEXIST))
        b.ret(I32(1))

    def build(self) -> ir.Module:
        self.ob.license()
        self.maps()
        self.tables.emit()
        append = self.judge.path_append()
        self.rec.functions()
        j = self.judge
        self.skb_program(j.scan_step(j.scan_byte(append)), j.path_step(), j.cand_step())
        self.sockops_program()
        return self.ob.finish()


def emit_module(matcher: MatcherIR) -> ir.Module:
    return SkSkbBackend(matcher).build()
