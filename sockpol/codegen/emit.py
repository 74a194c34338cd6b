"""Emit the matcher IR as an LLVM module for the BPF target: the sk_msg backend.

The generated object has:
- `sockpol_msg` (section `sk_msg`): pulls the first `max-head` bytes of each message into the data
  window, walks the scanner automaton over them with `bpf_loop` (a callback walks up to 32
  bytes, so the verifier checks the step once rather than once per chunk) while copying the path
  into the connection's work area and walking the path automaton over it, then finds the first
  rule whose facts all hold. It sets `bpf_msg_apply_bytes` on every run so the verdict covers
  exactly the request head plus its Content-Length body, and corks an incomplete head.
- `sockpol_sockops` (section `sockops`): inserts client-side TCP connections to governed ports into
  the sockhash when they become established.
- `sockpol_socks`: the BTF-defined sockhash; `sockpol_conn`: socket storage holding the stream
  state between runs and each run's work area (the path, scan state); `sockpol_tables` in
  `.data`: every policy-dependent number the program reads, so a later reload can swap tables
  without touching programs.

The parts it is built from, each in its own module and shared by any other backend (an LSM
program judging the same tables would be a class like `SkMsgBackend` built from the same parts):
objbuilder.py (libbpf's object contract), tables.py (the tables, the scan state, the explicit
per-function context `Fn`), judge.py (the byte-level judging core: scanner step, path step,
candidate step), tlswalk.py (the TLS handshake walk), record.py (counters, events, mode).
`simulate.py` is the same algorithm in Python; keep them in step.
"""

from __future__ import annotations

from llvmlite import ir

from sockpol.codegen import helpers as h
from sockpol.codegen.helpers import I8, I32, I64, PTR, gep
from sockpol.codegen.judge import JudgeCore
from sockpol.codegen.lower import MatcherIR
from sockpol.codegen.objbuilder import ObjectBuilder
from sockpol.codegen.record import Recorder
from sockpol.codegen.scanner import (
    BODY_END,
    CHUNK_LINE,
    END,
    TERMINAL_STATES,
)
from sockpol.codegen.tables import (
    ANSWER_WORDS,
    CONN_KEY,
    CONN_LEFT,
    CONN_SCRATCH,
    SCAN_T,
    Fn,
    Tables,
    conn_value_size,
)
from sockpol.codegen.tlswalk import RunEnd, TlsWalk
from sockpol.contract import (
    AF_INET,
    AF_INET6,
    ANSWER_BYTES,
    BPF_F_INGRESS,
    BPF_F_NO_PREALLOC,
    BPF_MAP_TYPE_PROG_ARRAY,
    BPF_MAP_TYPE_SK_STORAGE,
    BPF_MAP_TYPE_SOCKHASH,
    BPF_NOEXIST,
    BPF_SK_STORAGE_GET_F_CREATE,
    BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
    CONN_MAP,
    MSG_DATA,
    MSG_DATA_END,
    MSG_PROGRAM,
    MSG_REMOTE_PORT,
    MSG_SIZE,
    MSG_SK,
    NEXT_MAP,
    OPS_FAMILY,
    OPS_OP,
    OPS_REMOTE_PORT,
    OPS_SK,
    RESUME_ANSWERED,
    RESUME_CHUNK_DATA_END,
    RESUME_REQUEST,
    RESUME_UNJUDGED,
    SK_DROP,
    SK_PASS,
    SOCK_MAP,
    SOCK_MAP_ENTRIES,
    SOCKOPS_PROGRAM,
    Reason,
)
from sockpol.model import tls
from sockpol.telemetry import (
    CTL_SERIAL,
    SLOT_ANSWERED,
    SLOT_REFUSED,
    SLOT_UNJUDGED,
)


class SkMsgBackend:
    """The sk_msg backend: a sockhash of the governed connections, the sk_msg program that
    judges every message with the judging core (judge.py) over the tables (tables.py), and the
    sock_ops program that fills the sockhash. A second backend (an LSM program, say) builds its
    own program the same way: an ObjectBuilder, the Tables, a Recorder and the judging core."""

    def __init__(self, ir_: MatcherIR) -> None:
        self.ir = ir_
        self.ob = ObjectBuilder(ir_.policy.name)
        self.tables = Tables(self.ob, ir_)
        self.rec = Recorder(self.ob, self.tables)
        self.judge = JudgeCore(self.ob, self.tables, memo=True)
        self.tls = TlsWalk(self.rec)

    def maps(self) -> None:
        self.socks = self.ob.btf_map(
            SOCK_MAP, BPF_MAP_TYPE_SOCKHASH, SOCK_MAP_ENTRIES, self.ob.u64, self.ob.u32
        )
        # Per connection: the word (where the next run starts: a request, a chunk-size line,
        # ...; TLS flags; a counter slot), the bytes of a body or TLS record still to come, and
        # the work area of a run (CONN_SCRATCH above).
        self.conn_map = self.ob.btf_map(
            CONN_MAP,
            BPF_MAP_TYPE_SK_STORAGE,
            None,
            self.ob.int,
            self.ob.dbg.array(self.ob.u64, conn_value_size() // 8, 64),
            BPF_F_NO_PREALLOC,
        )
        # The newest version's sk_msg program, for runs of this one once a replacement is in
        # force (`handover` below).
        self.next_map = self.ob.btf_map(
            NEXT_MAP, BPF_MAP_TYPE_PROG_ARRAY, 1, self.ob.u32, self.ob.u32
        )
        self.rec.maps()  # counters, events, mode (record.py)

    # --- sk_msg program ---------------------------------------------------------------------

    def msg_program(
        self, scan_step: ir.Function, path_step: ir.Function, rule_step: ir.Function
    ) -> None:
        fn, b = self.ob.function(MSG_PROGRAM, I32, [("msg", PTR)], section="sk_msg")
        msg = fn.args[0]
        scan = b.alloca(SCAN_T, name="scan")
        self.own_key = b.alloca(I64, name="own_key")  # in the entry block: a static slot
        self.handover(b, msg)
        fx = Fn(b, self.tables, base=self.tables.select(b), scan=scan)

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
            self.rec.count(b, SLOT_REFUSED + Reason.PULL_FAILED, 1, size)
            verdict(SK_DROP)

        size = b.zext(ctx_load(MSG_SIZE, I32), I64)
        with b.if_then(b.icmp_unsigned("==", size, I64(0)), likely=False):
            verdict(SK_PASS)
        # A port the policy in force does not govern (a reload changed the ports after this
        # connection was put in the sockhash): passed unjudged.
        bswap = self.ob.m.declare_intrinsic("llvm.bswap", [I32])
        port = b.zext(b.call(bswap, [ctx_load(MSG_REMOTE_PORT, I32)]), I64)
        bits = fx.load_table("ports", b.lshr(b.and_(port, I64(0xFFFF)), I64(3)), I8)
        governed = b.and_(b.lshr(bits, b.and_(port, I64(7))), I64(1))
        with b.if_then(b.icmp_unsigned("==", governed, I64(0)), likely=False):
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
        # The connection's word: where this run starts in bits 0..7 (the rest: record.py, tls.py).
        resume = b.load(conn, typ=I64)
        kind = b.and_(resume, I64(0xFF))
        with b.if_then(b.icmp_unsigned("==", kind, I64(RESUME_ANSWERED)), likely=False):
            # A refusal on this connection was answered: whatever the client sends now (the
            # rest of a body, the next request) is discarded, and send() reports it sent.
            h.call(b, h.MSG_POP_DATA, msg, I32(0), b.trunc(size, I32), I64(0))
            self.rec.count(b, SLOT_ANSWERED, 0, size)
            verdict(SK_PASS)
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

        max_head = fx.config("max_head")
        n = b.select(b.icmp_unsigned("<", size, max_head), size, max_head)
        pulled = h.call(b, h.MSG_PULL_DATA, msg, I32(0), b.trunc(n, I32), I64(0))
        with b.if_then(b.icmp_unsigned("!=", pulled, I64(0)), likely=False):
            refuse_unseen()
        scratch = gep(b, conn, I8, [I64(CONN_SCRATCH)])
        mode = self.rec.read_mode(b)  # every run: `sockpol mode` switches without a reload
        start = JudgeCore.start_state(fx, kind)

        # Packet pointers are valid only now, after the pull.
        fx.put("data", ctx_load(MSG_DATA, PTR))
        fx.put("data_end", ctx_load(MSG_DATA_END, PTR))
        fx.put("scratch", scratch)
        fx.put("tables", fx.base)
        # Initial values come from the tables, not constants: the verifier then knows them only
        # as ranges, so its walk over the bpf_loop callbacks converges after an iteration or two
        # instead of following exact values (out_len 1, 2, 3, ...) byte by byte until it gives up
        # ("the sequence of 8193 jumps is too complex").
        zero = fx.config("zero")
        JudgeCore.begin(fx, start, zero, literals=self.judge.literals)
        fx.put("serial", b.zext(self.tables.serial(b), I64))  # the remembered section's tag
        with b.if_then(b.icmp_unsigned("==", kind, I64(RESUME_UNJUDGED)), likely=False):
            finish(self.rec.unjudged(b, msg, resume, mode), I32(0))  # dry-run left it so
        with b.if_then(b.icmp_unsigned("==", kind, I64(tls.RESUME_TLS_PASS)), likely=False):
            self.rec.count(b, SLOT_UNJUDGED, 1, size)  # `tls userspace allow`: ciphertext passes
            verdict(SK_PASS)

        def refuse(reason: ir.Value, head: ir.Value | None = None) -> None:
            """Refused before any rule (scanner, max-head, TLS walk): record.unframed."""
            head = head if head is not None else I64(0)
            finish(self.rec.unframed(b, msg, reason, mode, head, conn), I32(0))

        self.tls.phase(fx, conn, resume, kind, size, RunEnd(verdict, refuse, covering))
        fx.put("limit", n)
        JudgeCore.scan(fx, n, scan_step)
        self.ob.call(b, self.memo_end, scan)  # the header section, remembered (judge.py)

        state = fx.get("state")
        complete = fn.append_basic_block("head_complete")
        not_complete = fn.append_basic_block("head_not_complete")
        b.cbranch(b.icmp_unsigned("==", state, I64(END)), complete, not_complete)

        b.position_at_end(complete)
        # The verdict covers the head and its body; later bytes are the next request. A chunked
        # body is followed chunk by chunk from the next run on.
        d = JudgeCore.decide(fx, path_step, rule_step)
        b.store(d.word, conn)
        outcome = self.rec.judged(b, msg, d.flags, d.reason, mode, d.counter, d.end)
        finish(outcome, covering(d.end))

        b.position_at_end(not_complete)
        body_counter = b.lshr(resume, I64(32))
        with b.if_then(b.icmp_unsigned("==", state, I64(CHUNK_LINE))):
            # Pass the size line and the chunk's data; the CRLF after the data comes next.
            keep = b.and_(resume, I64(0xFFFFFFFF00000000))
            b.store(b.or_(keep, I64(RESUME_CHUNK_DATA_END | tls.CONN_HTTP)), conn)
            data_end = b.add(fx.get("pos"), fx.get("chunk"))
            self.rec.count(b, body_counter, 0, data_end)
            verdict(SK_PASS, covering(data_end))
        with b.if_then(b.icmp_unsigned("==", state, I64(BODY_END))):
            b.store(I64(RESUME_REQUEST | tls.CONN_HTTP), conn)
            self.rec.count(b, body_counter, 0, fx.get("pos"))
            verdict(SK_PASS, b.trunc(fx.get("pos"), I32))
        # The scanner refused the head, or no end of head came within max-head bytes (in
        # dry-run: passed, and the rest of the connection goes unjudged).
        refused = b.icmp_unsigned("<", state, I64(TERMINAL_STATES))
        with b.if_then(b.icmp_unsigned("==", state, I64(Reason.BAD_METHOD)), likely=False):
            self.tls.alert_plaintext(fx, kind, size, RunEnd(verdict, refuse, covering))
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
        passed = b.icmp_unsigned("!=", self.rec.passes(b, outcome), I64(0))
        answer, row = self.answer_for(fx, outcome, passed, resume, kind, conn)
        self.rec.record_event(b, msg, scan, outcome, answer)
        with b.if_then(b.icmp_unsigned("!=", answer, I64(0)), likely=False):
            self.answer(fx, msg, conn, row, size, verdict)
        verdict(b.select(passed, I32(SK_PASS), I32(SK_DROP)), apply)

    def handover(self, b: ir.IRBuilder, msg: ir.Value) -> None:
        """Connections keep the program they were put in the sockhash with; a replacement
        (`sockpol reload` of another shape, ports or features) takes them over here: when the
        control map's serial is not this program's own, a run tail-calls the newest version's
        program (slot 0 of `sockpol_next`, written before the serial). Should the call fail
        (no program there), this version judges, as it did before the replacement."""
        key = b.alloca(I32, name="ctl_key")
        b.store(I32(0), key)
        ctl = h.call(b, h.MAP_LOOKUP_ELEM, self.rec.ctl_map, key)
        with b.if_then(b.icmp_unsigned("!=", b.ptrtoint(ctl, I64), I64(0))):
            current = b.load(gep(b, ctl, I8, [I64(CTL_SERIAL)]), typ=I32)
            other = b.icmp_unsigned("!=", current, self.tables.serial(b))
            with b.if_then(b.and_(other, b.icmp_unsigned("!=", current, I32(0))), likely=False):
                h.call(b, h.TAIL_CALL, msg, self.next_map, I32(0))

    # --- answers ----------------------------------------------------------------------------

    def answer_for(
        self,
        fx: Fn,
        outcome: ir.Value,
        passed: ir.Value,
        resume: ir.Value,
        kind: ir.Value,
        conn: ir.Value,
    ) -> tuple[ir.Value, ir.Value]:
        """(status, row): how a refusal is answered (status 0: dropped) and which response.

        Answered: a request head refused (by a rule, the default or before any rule) on a
        connection that is not inside TLS, when the policy (or the deciding deny rule) says a
        status, the sock_ops program gave the connection its key, and the loader left answers
        on. A refusal in a body, a TLS record and a kTLS connection are dropped."""
        b = fx.b
        plain = b.icmp_unsigned("==", b.and_(resume, I64(tls.CONN_TLS_FLAGS)), I64(0))
        key = b.load(gep(b, conn, I8, [I64(CONN_KEY)]), typ=I64)
        keyed = b.icmp_unsigned("!=", key, I64(0))
        return self.rec.answer_for(fx, outcome, passed, kind, b.and_(plain, keyed))

    def answer(self, fx: Fn, msg: ir.Value, conn: ir.Value, row: ir.Value, size, verdict) -> None:
        """Rewrite the message into the response of `row` and redirect it into the sending
        socket's own receive queue: the client reads the answer, nothing of the request (nor
        anything after it in this message) leaves, and send() reports the bytes sent. The
        connection then discards whatever it sends (RESUME_ANSWERED). Any helper failing
        drops the message instead (its bytes never leave either way)."""
        b = fx.b
        want = I64(ANSWER_BYTES)
        # The row goes through map memory (the scan's cand_off, unused by now) and is read back
        # after the helpers below, which may write any memory: LLVM then cannot know the row is
        # below 64, keeps the table's mask, and the verifier sees an AND. Computed in registers,
        # LLVM drops the mask and joins the row's two parts with an OR, whose bounds the 6.1
        # verifier does not track ("math between map_value pointer and register with
        # unbounded min value is not allowed").
        fx.put("cand_off", row)

        def check(ret: ir.Value) -> None:
            with b.if_then(b.icmp_unsigned("!=", ret, I64(0)), likely=False):
                verdict(SK_DROP)

        with b.if_then(b.icmp_unsigned(">", size, want)):
            cut = b.trunc(b.sub(size, want), I32)
            check(h.call(b, h.MSG_POP_DATA, msg, I32(ANSWER_BYTES), cut, I64(0)))
        with b.if_then(b.icmp_unsigned("<", size, want)):
            grow = b.trunc(b.sub(want, size), I32)
            check(h.call(b, h.MSG_PUSH_DATA, msg, b.trunc(size, I32), grow, I64(0)))
        check(h.call(b, h.MSG_PULL_DATA, msg, I32(0), I32(ANSWER_BYTES), I64(0)))
        data = b.load(gep(b, msg, I8, [I64(MSG_DATA)]), typ=PTR)
        data_end = b.load(gep(b, msg, I8, [I64(MSG_DATA_END)]), typ=PTR)
        # Not inbounds: data + ANSWER_BYTES may lie past the window; that is what is checked.
        end = b.gep(data, [I64(ANSWER_BYTES)], source_etype=I8)
        with b.if_then(b.icmp_unsigned(">", end, data_end), likely=False):
            verdict(SK_DROP)
        row = fx.get("cand_off")  # (stored before the helper calls: see below)
        for k in range(ANSWER_WORDS):
            word = b.load(fx.table("answers", row, I32(k)), typ=I64)
            b.store(word, gep(b, data, I8, [I64(8 * k)]))
        b.store(I64(RESUME_ANSWERED | tls.CONN_HTTP), conn)
        b.store(I64(0), gep(b, conn, I8, [I64(CONN_LEFT)]))
        self.rec.count(b, SLOT_ANSWERED, 1, size)
        key = self.own_key
        b.store(b.load(gep(b, conn, I8, [I64(CONN_KEY)]), typ=I64), key)
        ret = h.call(b, h.MSG_REDIRECT_HASH, msg, self.socks, key, I64(BPF_F_INGRESS))
        verdict(b.trunc(ret, I32))

    # --- sock_ops program -------------------------------------------------------------------

    def sockops_program(self) -> None:
        fn, b = self.ob.function(SOCKOPS_PROGRAM, I32, [("ops", PTR)], section="sockops")
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
        bswap = self.ob.m.declare_intrinsic("llvm.bswap", [I32])
        port = b.call(bswap, [ctx_load(OPS_REMOTE_PORT)])
        governed = h.in_ports(b, port, self.ir.policy.ports)
        insert = fn.append_basic_block("insert")
        b.cbranch(governed, insert, done)
        b.position_at_end(insert)
        b.store(h.call(b, h.GET_SOCKET_COOKIE, ops), key)
        # The cookie in the connection's storage too: the key of the socket's own entry, to
        # which an answer is redirected (sk_msg programs have no helper to read a cookie).
        sk = b.load(gep(b, ops, I8, [I64(OPS_SK)]), typ=PTR)
        with b.if_then(b.icmp_unsigned("!=", b.ptrtoint(sk, I64), I64(0))):
            flags = I64(BPF_SK_STORAGE_GET_F_CREATE)
            conn = h.call(b, h.SK_STORAGE_GET, self.conn_map, sk, ir.Constant(PTR, None), flags)
            with b.if_then(b.icmp_unsigned("!=", b.ptrtoint(conn, I64), I64(0))):
                b.store(b.load(key, typ=I64), gep(b, conn, I8, [I64(CONN_KEY)]))
        h.call(b, h.SOCK_HASH_UPDATE, ops, self.socks, key, I64(BPF_NOEXIST))
        b.branch(done)
        b.position_at_end(done)
        b.ret(I32(1))

    def build(self) -> ir.Module:
        self.ob.license()
        self.maps()
        self.tables.emit()
        append = self.judge.path_append()
        self.rec.functions()  # before msg_program, which calls them
        j = self.judge
        self.memo_end = j.memo_end()
        self.msg_program(j.scan_step(j.scan_byte(append)), j.path_step(), j.cand_step())
        self.sockops_program()
        return self.ob.finish()


def emit_module(matcher: MatcherIR) -> ir.Module:
    return SkMsgBackend(matcher).build()
