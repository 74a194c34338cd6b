"""The LSM backend: the same tables and judging core as the sk_msg backend (emit.py), run from a
sleepable BPF LSM program on `socket_sendmsg`, which sees what a process sends before the
protocol does: the plaintext of a kTLS socket (no sockmap needed: kernels that reject TLS on
sockmap sockets still run it), or plain TCP. docs/design.md, "The LSM backend", says why each
choice below was made; docs/ktls.md what a user sees.

The object has:
- `sockpol_lsm` (section `lsm.s/socket_sendmsg`): for a socket the policy governs (its socket
  storage exists: the sock_ops program made it), reads the caller's bytes through the msghdr's
  iov_iter with `bpf_copy_from_user`, judges every request (and TLS record) the send holds, one
  per call of a bpf_loop callback (`sockpol_lsm_unit`), and returns -EACCES when any is refused:
  the kernel then queues none of the send's bytes. A refusal ends the connection for sending
  (every later send fails, as it does with sk_msg).
- `sockpol_sockops` (section `sockops`): gives each client connection to a governed port its
  socket storage, with the connection's addresses and ports laid out like `struct sk_msg_md`, so
  the telemetry code (record.py) reads them as it reads an sk_msg context.
- `sockpol_conn`: socket storage (the connection's word, the body bytes still to come, its
  identity, and the scan state of a head split across sends); `sockpol_work`: task storage (a
  run's work area and its copy of the head: per task, because a sleepable program can be
  preempted, and two threads may send on one socket at once); the tables in `.data`; the
  kernel's struct offsets in `.rodata`, written by the loader from the running kernel's BTF
  (sockpol/kernelbtf.py).

Semantics that differ from the sk_msg backend (it cannot hold bytes back, nor pass part of a send):
- A head split across sends: the sends before the one that completes it pass (the bytes are on
  the wire, the head unfinished); the send that completes it is judged with the whole head (the
  scan resumes from its saved state) and refused if the head is; the connection then refuses
  every later send. So a refused request never reaches the server whole.
- A send holding several requests is passed or refused as a whole: refused when any is.
- Refusals are never answered (no redirect without sockmap): answers become drops.
"""

from __future__ import annotations

from llvmlite import ir

from sockpol import kernelbtf
from sockpol.codegen import helpers as h
from sockpol.codegen.helpers import I8, I32, I64, PTR, gep
from sockpol.codegen.judge import JudgeCore
from sockpol.codegen.lower import MAX_FACT_WORDS, MatcherIR
from sockpol.codegen.objbuilder import ObjectBuilder
from sockpol.codegen.record import Recorder
from sockpol.codegen.scanner import BODY_END, CHUNK_LINE, END, TERMINAL_STATES
from sockpol.codegen.tables import FACTS_OFFSET, SCAN_T, Fn, Tables
from sockpol.codegen.tlswalk import RunEnd, TlsWalk
from sockpol.contract import (
    AF_INET,
    AF_INET6,
    BPF_F_NO_PREALLOC,
    BPF_MAP_TYPE_SK_STORAGE,
    BPF_MAP_TYPE_TASK_STORAGE,
    BPF_SK_STORAGE_GET_F_CREATE,
    BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
    CONN_HEAD_PART,
    CONN_MAP,
    EACCES,
    LSM_CONN_KEY,
    LSM_CONN_MD,
    LSM_PROGRAM,
    LSM_SECTION,
    LSM_WINDOW,
    MSG_FAMILY,
    MSG_LOCAL_IP4,
    MSG_LOCAL_IP6,
    MSG_LOCAL_PORT,
    MSG_REMOTE_IP4,
    MSG_REMOTE_IP6,
    MSG_REMOTE_PORT,
    MSG_SIZE,
    OPS_OP,
    OPS_REMOTE_PORT,
    OPS_SK,
    RESUME_CHUNK_DATA_END,
    RESUME_REFUSED,
    RESUME_REQUEST,
    RESUME_UNJUDGED,
    SK_DROP,
    SK_PASS,
    SOCKOPS_PROGRAM,
    WORK_MAP,
    Reason,
)
from sockpol.model import tls
from sockpol.telemetry import (
    CTL_SERIAL,
    SLOT_REFUSED,
    SLOT_UNJUDGED,
)

# Helpers only this backend calls (ids: include/uapi/linux/bpf.h; all exist on 6.1).
PROBE_READ_KERNEL = h.Helper("probe_read_kernel", 113, I64, (PTR, I32, PTR))
COPY_FROM_USER = h.Helper("copy_from_user", 148, I64, (PTR, I32, PTR))
TASK_STORAGE_GET = h.Helper("task_storage_get", 156, PTR, (PTR, PTR, PTR, I64))
GET_CURRENT_TASK_BTF = h.Helper("get_current_task_btf", 158, PTR, ())

# struct bpf_sock_ops: the connection's identity, copied into its storage as sk_msg_md has it.
OPS_IDENTITY = (
    (20, MSG_FAMILY), (24, MSG_REMOTE_IP4), (28, MSG_LOCAL_IP4),
    *((32 + 4 * i, MSG_REMOTE_IP6 + 4 * i) for i in range(4)),
    *((48 + 4 * i, MSG_LOCAL_IP6 + 4 * i) for i in range(4)),
    (64, MSG_REMOTE_PORT), (68, MSG_LOCAL_PORT),
)  # fmt: skip

# The connection's socket storage: word, left, key (the cookie: "governed"), then the identity
# (an sk_msg_md image: record.py reads family, addresses, ports and size from it), then the scan
# state saved when a head continues in the next send.
CONN_WORD, CONN_LEFT, CONN_KEY, CONN_MD = 0, 8, LSM_CONN_KEY, LSM_CONN_MD
MD_BYTES = 80
CONN_SAVE = CONN_MD + MD_BYTES
WORK_BYTES = FACTS_OFFSET + 8 * MAX_FACT_WORDS  # the judge's work area (tables.py)
CONN_BASE = CONN_SAVE + WORK_BYTES  # bytes of the head in progress before the saved scan's
CONN_BYTES = CONN_BASE + 8

# The task's storage: the run's scalars (map memory, not the stack: the verifier then does not
# track them across bpf_loop iterations), the iov_iter and an iovec copied from the kernel, the
# work area, then the copy of (a chunk of) the head. Local storage elements must stay under about
# 4 KiB: on 7.3.4 `bpf_task_storage_get(F_CREATE)` failed for an 11 KB value and worked for 3.7 KB
# (elements come from bpf_mem_alloc), so the head is copied and scanned LSM_WINDOW bytes at a
# time, the scan resuming chunk after chunk as it does from one send to the next.
A = {
    name: 8 * i
    for i, name in enumerate(
        ["off", "size", "refused", "want", "dst", "skip", "segs", "fault", "mode", "ptr",
         "ubuf_len", "iov_offset", "base"]
    )
}  # fmt: skip
A_ITER = 128
A_IOVEC = A_ITER + kernelbtf.ITER_BYTES
WORK_OFF = A_IOVEC + 16
BUF_OFF = WORK_OFF + WORK_BYTES
BUF_BYTES = 2 * LSM_WINDOW + 64  # copies at [dst < W, dst + W): the verifier sees no less
AREA_BYTES = BUF_OFF + BUF_BYTES
assert A_IOVEC + 16 <= WORK_OFF and LSM_WINDOW & (LSM_WINDOW - 1) == 0
assert AREA_BYTES <= 3720 and CONN_BYTES <= 3720  # (local storage: see above; 3,720 worked)

MAX_UNITS = 64  # requests, bodies and TLS records in one send; more: refused (pull-failed)
MAX_SEGMENTS = 64  # iovecs a send's head may span
MODE_NONE, MODE_UBUF, MODE_IOVEC = 0, 1, 2
# The ctx of the unit callback: pointers on the program's stack.
UNIT_T = ir.LiteralStructType([PTR, PTR])  # conn, area


def _byte(b: ir.IRBuilder, base: ir.Value, offset: int | ir.Value) -> ir.Value:
    return gep(b, base, I8, [offset if isinstance(offset, ir.Value) else I64(offset)])


def _null(b: ir.IRBuilder, p: ir.Value) -> ir.Value:
    return b.icmp_unsigned("==", b.ptrtoint(p, I64), I64(0))


def _min(b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> ir.Value:
    return b.select(b.icmp_unsigned("<", x, y), x, y)


class LsmBackend:
    def __init__(self, ir_: MatcherIR, layout: dict[str, int] | None = None) -> None:
        self.ir = ir_
        self.ob = ObjectBuilder(ir_.policy.name)
        self.tables = Tables(self.ob, ir_)
        self.rec = Recorder(self.ob, self.tables, window=LSM_WINDOW)
        self.judge = JudgeCore(
            self.ob,
            self.tables,
            window=LSM_WINDOW,
            path_chunks=False,
            literals=False,
            fewer_calls=False,
        )
        self.tls = TlsWalk(self.rec)
        self.layout = layout or {f: 0 for f in kernelbtf.LAYOUT_FIELDS}

    # --- maps and the kernel's layout -------------------------------------------------------

    def maps(self) -> None:
        ob = self.ob
        self.conn_map = ob.btf_map(
            CONN_MAP,
            BPF_MAP_TYPE_SK_STORAGE,
            None,
            ob.int,
            ob.dbg.array(ob.u64, CONN_BYTES // 8, 64),
            BPF_F_NO_PREALLOC,
        )
        self.work_map = ob.btf_map(
            WORK_MAP,
            BPF_MAP_TYPE_TASK_STORAGE,
            None,
            ob.int,
            ob.dbg.array(ob.u64, (AREA_BYTES + 7) // 8, 64),
            BPF_F_NO_PREALLOC,
        )
        self.rec.maps()

    def kernel_layout(self) -> None:
        """`.rodata`: the kernel's offsets (kernelbtf.LAYOUT_FIELDS). The loader writes them
        before the verifier sees the program; libbpf freezes the map, so the verifier knows them
        as constants (a load through a kernel pointer needs a constant offset). Not a constant
        for LLVM: it must load them, not fold in the values compiled here."""
        n = len(kernelbtf.LAYOUT_FIELDS)
        typ = ir.ArrayType(I32, n)
        gv = ir.GlobalVariable(self.ob.m, typ, "sockpol_kernel")
        gv.initializer = ir.Constant(typ, [self.layout[f] for f in kernelbtf.LAYOUT_FIELDS])
        gv.section = ".rodata"
        gv.align = 4
        self.ob.dbg.global_variable(gv, self.ob.dbg.array(self.ob.u32, n, 32))
        self.ob.used.append(gv)
        self.kernel = gv

    def k(self, b: ir.IRBuilder, name: str) -> ir.Value:
        index = kernelbtf.LAYOUT_FIELDS.index(name)
        ptr = gep(b, self.kernel, self.kernel.value_type, [I32(0), I32(index)])
        return b.zext(b.load(ptr, typ=I32), I64)

    # --- sock_ops: which connections are governed -------------------------------------------

    def sockops_program(self) -> None:
        fn, b = self.ob.function(SOCKOPS_PROGRAM, I32, [("ops", PTR)], section="sockops")
        ops = fn.args[0]

        def ctx32(offset: int) -> ir.Value:
            return b.load(_byte(b, ops, offset), typ=I32)

        done = fn.append_basic_block("done")
        go = fn.append_basic_block("established")
        b.cbranch(
            b.icmp_unsigned("==", ctx32(OPS_OP), I32(BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)), go, done
        )
        b.position_at_end(go)
        family = ctx32(20)
        inet = b.or_(
            b.icmp_unsigned("==", family, I32(AF_INET)),
            b.icmp_unsigned("==", family, I32(AF_INET6)),
        )
        bswap = self.ob.m.declare_intrinsic("llvm.bswap", [I32])
        port = b.call(bswap, [ctx32(OPS_REMOTE_PORT)])
        governed = h.in_ports(b, port, self.ir.policy.ports)
        mark = fn.append_basic_block("mark")
        b.cbranch(b.and_(inet, governed), mark, done)
        b.position_at_end(mark)
        sk = b.load(_byte(b, ops, OPS_SK), typ=PTR)
        with b.if_then(b.icmp_unsigned("!=", b.ptrtoint(sk, I64), I64(0))):
            flags = I64(BPF_SK_STORAGE_GET_F_CREATE)
            conn = h.call(b, h.SK_STORAGE_GET, self.conn_map, sk, ir.Constant(PTR, None), flags)
            with b.if_then(b.icmp_unsigned("!=", b.ptrtoint(conn, I64), I64(0))):
                cookie = h.call(b, h.GET_SOCKET_COOKIE, ops)
                b.store(cookie, _byte(b, conn, CONN_KEY))
                for src, dst in OPS_IDENTITY:
                    b.store(ctx32(src), _byte(b, conn, CONN_MD + dst))
        b.branch(done)
        b.position_at_end(done)
        b.ret(I32(1))

    # --- the LSM program ----------------------------------------------------------------------

    def lsm_program(self, unit: ir.Function) -> None:
        fn, b = self.ob.function(LSM_PROGRAM, I64, [("ctx", PTR)], section=LSM_SECTION)
        ctx = fn.args[0]
        uctx = b.alloca(UNIT_T, name="unit")
        key = b.alloca(I32, name="ctl_key")

        def arg(i: int, typ: ir.Type) -> ir.Value:
            return b.load(_byte(b, ctx, 8 * i), typ=typ)

        def allow() -> None:
            b.ret(I64(0))

        sock, msghdr = arg(0, PTR), arg(1, PTR)
        size = b.and_(arg(2, I64), I64(0x7FFFFFFF))  # int size: the bytes the send holds
        with b.if_then(b.icmp_unsigned("==", size, I64(0)), likely=False):
            allow()
        sk = b.load(gep(b, sock, I8, [self.k(b, "socket_sk")]), typ=PTR)
        # Newer verifiers know `sock->sk` as trusted-or-NULL, and the helper wants it checked.
        with b.if_then(_null(b, sk), likely=False):
            allow()
        conn = h.call(b, h.SK_STORAGE_GET, self.conn_map, sk, ir.Constant(PTR, None), I64(0))
        with b.if_then(_null(b, conn)):
            allow()  # not a connection this policy governs
        # A newer version of the policy is in force (both are attached during a replacement):
        # it judges, this one steps aside.
        b.store(I32(0), key)
        ctl = h.call(b, h.MAP_LOOKUP_ELEM, self.rec.ctl_map, key)
        with b.if_then(b.icmp_unsigned("!=", b.ptrtoint(ctl, I64), I64(0))):
            current = b.load(_byte(b, ctl, CTL_SERIAL), typ=I32)
            other = b.icmp_unsigned("!=", current, self.tables.serial(b))
            with b.if_then(b.and_(other, b.icmp_unsigned("!=", current, I32(0))), likely=False):
                allow()
        word = b.load(conn, typ=I64)
        with b.if_then(
            b.icmp_unsigned("==", b.and_(word, I64(0xFF)), I64(RESUME_REFUSED)), likely=False
        ):
            b.ret(I64(-EACCES))  # a refusal ended this connection for sending
        # A port the policy in force does not govern (a reload changed the ports): unjudged.
        fx = Fn(b, self.tables, base=self.tables.select(b))
        bswap = self.ob.m.declare_intrinsic("llvm.bswap", [I32])
        md = _byte(b, conn, CONN_MD)
        port = b.zext(b.call(bswap, [b.load(_byte(b, md, MSG_REMOTE_PORT), typ=I32)]), I64)
        bits = fx.load_table("ports", b.lshr(b.and_(port, I64(0xFFFF)), I64(3)), I8)
        with b.if_then(
            b.icmp_unsigned("==", b.and_(b.lshr(bits, b.and_(port, I64(7))), I64(1)), I64(0)),
            likely=False,
        ):
            allow()
        task = h.call(b, GET_CURRENT_TASK_BTF)
        flags = I64(BPF_SK_STORAGE_GET_F_CREATE)
        area = h.call(b, TASK_STORAGE_GET, self.work_map, task, ir.Constant(PTR, None), flags)
        with b.if_then(_null(b, area), likely=False):
            self.rec.count(b, SLOT_REFUSED + Reason.PULL_FAILED, 1, size)
            b.ret(I64(-EACCES))

        def put(name: str, value: ir.Value) -> None:
            b.store(value, _byte(b, area, A[name]))

        # The iov_iter, as one copy (its fields are read from map memory below).
        iter_at = gep(b, msghdr, I8, [self.k(b, "msghdr_iter")])
        h.call(b, PROBE_READ_KERNEL, _byte(b, area, A_ITER), I32(kernelbtf.ITER_BYTES), iter_at)

        def iter_field(name: str, typ: ir.Type) -> ir.Value:
            at = b.and_(self.k(b, name), I64(kernelbtf.ITER_BYTES - 8))
            if typ == I8:  # iter_type: a byte at any offset
                at = b.and_(self.k(b, name), I64(kernelbtf.ITER_BYTES - 1))
            value = b.load(_byte(b, _byte(b, area, A_ITER), at), typ=typ)
            return b.zext(value, I64) if typ != I64 else value

        itype = iter_field("iter_type", I8)
        ubuf = b.icmp_unsigned("==", itype, self.k(b, "iter_ubuf"))
        iovec = b.icmp_unsigned("==", itype, self.k(b, "iter_iovec"))
        offset = iter_field("iter_offset", I64)
        put(
            "mode", b.select(ubuf, I64(MODE_UBUF), b.select(iovec, I64(MODE_IOVEC), I64(MODE_NONE)))
        )
        put(
            "segs", b.select(ubuf, I64(1), b.select(iovec, iter_field("iter_nr_segs", I64), I64(0)))
        )
        put("ptr", iter_field("iter_ptr", I64))
        put("ubuf_len", b.add(offset, iter_field("iter_count", I64)))
        put("iov_offset", offset)
        put("off", I64(0))
        put("size", size)
        put("refused", I64(0))
        b.store(conn, gep(b, uctx, UNIT_T, [I32(0), I32(0)]))
        b.store(area, gep(b, uctx, UNIT_T, [I32(0), I32(1)]))
        h.call(b, h.LOOP, I32(MAX_UNITS), unit, uctx, I64(0))
        refused = b.load(_byte(b, area, A["refused"]), typ=I64)
        with b.if_then(b.icmp_unsigned("!=", refused, I64(0))):
            b.ret(I64(-EACCES))
        done = b.load(_byte(b, area, A["off"]), typ=I64)
        with b.if_then(b.icmp_unsigned("<", done, size), likely=False):
            # More requests or records in one send than the program follows: refused whole.
            self.rec.count(b, SLOT_REFUSED + Reason.PULL_FAILED, 1, size)
            b.ret(I64(-EACCES))
        allow()

    def copy_step(self) -> ir.Function:
        """bpf_loop callback: iovec `index` of the send; copies the part of it between the
        bytes to skip and the bytes wanted into the head buffer. Stops when all are copied,
        past the last segment, or when a read fails (`fault`)."""
        fn, b = self.ob.function("sockpol_lsm_copy", I64, [("index", I64), ("ctx", PTR)])
        index, cctx = fn.args
        area = b.load(cctx, typ=PTR)

        def get(name: str) -> ir.Value:
            return b.load(_byte(b, area, A[name]), typ=I64)

        def put(name: str, value: ir.Value) -> None:
            b.store(value, _byte(b, area, A[name]))

        want = get("want")
        with b.if_then(b.icmp_unsigned("==", want, I64(0))):
            b.ret(I64(1))
        with b.if_then(b.icmp_unsigned(">=", index, get("segs"))):
            b.ret(I64(1))
        is_ubuf = b.icmp_unsigned("==", get("mode"), I64(MODE_UBUF))
        with b.if_then(b.not_(is_ubuf)):
            at = b.inttoptr(b.add(get("ptr"), b.mul(index, I64(16))), PTR)
            got = h.call(b, PROBE_READ_KERNEL, _byte(b, area, A_IOVEC), I32(16), at)
            with b.if_then(b.icmp_unsigned("!=", got, I64(0)), likely=False):
                put("fault", I64(1))
                b.ret(I64(1))
        base = b.select(is_ubuf, get("ptr"), b.load(_byte(b, area, A_IOVEC), typ=I64))
        length = b.select(is_ubuf, get("ubuf_len"), b.load(_byte(b, area, A_IOVEC + 8), typ=I64))
        skip = get("skip")
        with b.if_then(b.icmp_unsigned(">=", skip, length)):
            put("skip", b.sub(skip, length))
            b.ret(I64(0))
        take = _min(b, _min(b, b.sub(length, skip), want), I64(LSM_WINDOW))
        dst = b.and_(get("dst"), I64(LSM_WINDOW - 1))
        got = h.call(
            b,
            COPY_FROM_USER,
            _byte(b, area, b.add(dst, I64(BUF_OFF))),
            b.trunc(take, I32),
            b.inttoptr(b.add(base, skip), PTR),
        )
        with b.if_then(b.icmp_unsigned("!=", got, I64(0)), likely=False):
            put("fault", I64(1))
            b.ret(I64(1))
        put("dst", b.add(dst, take))
        put("want", b.sub(want, take))
        put("skip", I64(0))
        b.ret(I64(0))
        return fn

    def unit_step(
        self,
        copy: ir.Function,
        scan_step: ir.Function,
        path_step: ir.Function,
        rule_step: ir.Function,
    ) -> ir.Function:
        """bpf_loop callback: the next unit of the send from `off` (the rest of a body or
        record, a request, a TLS record); returns 1 when the send is decided."""
        fn, b = self.ob.function("sockpol_lsm_unit", I64, [("index", I64), ("ctx", PTR)])
        _, uctx = fn.args
        conn = b.load(gep(b, uctx, UNIT_T, [I32(0), I32(0)]), typ=PTR)
        area = b.load(gep(b, uctx, UNIT_T, [I32(0), I32(1)]), typ=PTR)
        scan = b.alloca(SCAN_T, name="scan")
        cctx = b.alloca(PTR, name="copy_ctx")  # in the entry block: a static stack slot

        def aget(name: str) -> ir.Value:
            return b.load(_byte(b, area, A[name]), typ=I64)

        def aput(name: str, value: ir.Value) -> None:
            b.store(value, _byte(b, area, A[name]))

        off, size = aget("off"), aget("size")
        rest = b.sub(size, off)
        with b.if_then(b.icmp_unsigned("==", rest, I64(0))):
            b.ret(I64(1))
        fx = Fn(b, self.tables, base=self.tables.select(b), scan=scan)
        md = _byte(b, conn, CONN_MD)
        b.store(b.trunc(rest, I32), _byte(b, md, MSG_SIZE))
        resume = b.load(conn, typ=I64)
        kind = b.and_(resume, I64(0xFF))
        left_ptr = _byte(b, conn, CONN_LEFT)

        def mark_refused() -> None:
            word = b.load(conn, typ=I64)
            b.store(b.or_(b.and_(word, I64(~0xFF & (2**64 - 1))), I64(RESUME_REFUSED)), conn)
            aput("refused", I64(1))

        def verdict(value, apply: ir.Value | None = None, cork: ir.Value | None = None) -> None:
            """How emit.py's verdicts end a unit here: PASS moves `off` on by `apply` bytes
            (none: the rest of the send passes); DROP refuses the send. A cork (a TLS record
            header cut by the end of the send) cannot be held: refused (tls-bad-record, or
            tls-not-declared on a policy without `tls`, the reason the whole record gets)."""
            if cork is not None:  # on a policy without `tls`, any record is undeclared
                undeclared = b.icmp_unsigned("==", fx.config("tls"), I64(tls.TLS_NONE))
                why = b.select(undeclared, I64(Reason.TLS_NOT_DECLARED), I64(Reason.TLS_BAD_RECORD))
                refuse(why)
                return
            if value == SK_DROP:
                mark_refused()
                b.ret(I64(1))
                return
            assert value == SK_PASS
            if apply is None:
                aput("off", size)
                b.ret(I64(1))
            else:
                aput("off", b.add(off, b.zext(apply, I64)))
                b.ret(I64(0))

        def covering(total: ir.Value) -> ir.Value:
            part = _min(b, total, rest)
            b.store(b.sub(total, part), left_ptr)
            return b.trunc(part, I32)

        left = b.load(left_ptr, typ=I64)
        with b.if_then(b.icmp_unsigned("!=", left, I64(0))):
            verdict(SK_PASS, covering(left))
        with b.if_then(b.icmp_unsigned("==", kind, I64(tls.RESUME_TLS_PASS)), likely=False):
            self.rec.count(b, SLOT_UNJUDGED, 1, rest)  # `tls userspace allow`: passes unjudged
            verdict(SK_PASS)

        record = fn.append_basic_block("record")
        recorded: list[tuple[ir.Value, ir.Value, ir.Block]] = []

        def finish(outcome: ir.Value, apply: ir.Value) -> None:
            recorded.append((outcome, apply, b.block))
            b.branch(record)

        def refuse_unseen() -> None:
            self.rec.count(b, SLOT_REFUSED + Reason.PULL_FAILED, 1, rest)
            verdict(SK_DROP)

        # The head in progress began in an earlier chunk or send: its scan state comes back,
        # and positions start again at this chunk (`base`: the head's bytes before it).
        partial = b.icmp_unsigned("!=", b.and_(resume, I64(CONN_HEAD_PART)), I64(0))
        scratch = _byte(b, area, WORK_OFF)
        fx.put("scratch", scratch)
        with b.if_then(partial):
            h.call(b, PROBE_READ_KERNEL, scratch, I32(WORK_BYTES), _byte(b, conn, CONN_SAVE))
        saved = b.add(b.load(_byte(b, conn, CONN_BASE), typ=I64), fx.get("pos"))
        aput("base", b.select(partial, saved, I64(0)))
        base = aget("base")
        max_head = fx.config("max_head")
        room = b.sub(max_head, _min(b, base, max_head))
        n = _min(b, _min(b, rest, room), I64(LSM_WINDOW))
        aput("want", n)
        aput("dst", I64(0))
        aput("skip", b.add(aget("iov_offset"), off))
        aput("fault", I64(0))
        b.store(area, cctx)  # bpf_loop's context must be on the stack
        h.call(b, h.LOOP, I32(MAX_SEGMENTS), copy, cctx, I64(0))
        with b.if_then(
            b.or_(
                b.icmp_unsigned("!=", aget("fault"), I64(0)),
                b.icmp_unsigned("!=", aget("want"), I64(0)),
            ),
            likely=False,
        ):
            refuse_unseen()  # the caller's bytes could not be read
        limit = b.and_(n, I64(2 * LSM_WINDOW - 1))  # n <= LSM_WINDOW: for the verifier
        data = _byte(b, area, BUF_OFF)
        fx.put("data", data)
        fx.put("data_end", gep(b, data, I8, [limit]))
        fx.put("tables", fx.base)
        zero = fx.config("zero")
        start = JudgeCore.start_state(fx, kind)
        fx.put("pos", zero)  # a resumed scan goes on at this chunk's first byte
        fresh = fn.append_basic_block("fresh")
        ready = fn.append_basic_block("ready")
        b.cbranch(partial, ready, fresh)
        b.position_at_end(fresh)
        JudgeCore.begin(fx, start, zero)
        b.branch(ready)
        b.position_at_end(ready)
        mode = self.rec.read_mode(b)
        with b.if_then(b.icmp_unsigned("==", kind, I64(RESUME_UNJUDGED)), likely=False):
            finish(self.rec.unjudged(b, md, resume, mode), I32(0))
        head_start = b.and_(b.icmp_unsigned("==", kind, I64(RESUME_REQUEST)), b.not_(partial))
        fx.put("limit", limit)

        def refuse(reason: ir.Value, head: ir.Value | None = None) -> None:
            head = head if head is not None else I64(0)
            finish(self.rec.unframed(b, md, reason, mode, head, conn), I32(0))

        self.tls.phase(fx, conn, resume, kind, rest, RunEnd(verdict, refuse, covering))
        JudgeCore.scan(fx, n, scan_step)
        state = fx.get("state")
        base = aget("base")
        complete = fn.append_basic_block("head_complete")
        not_complete = fn.append_basic_block("head_not_complete")
        b.cbranch(b.icmp_unsigned("==", state, I64(END)), complete, not_complete)

        b.position_at_end(complete)
        d = JudgeCore.decide(fx, path_step, rule_step)
        b.store(d.word, conn)
        outcome = self.rec.judged(b, md, d.flags, d.reason, mode, d.counter, b.add(base, d.end))
        finish(outcome, covering(d.end))

        b.position_at_end(not_complete)
        body_counter = b.lshr(resume, I64(32))
        with b.if_then(b.icmp_unsigned("==", state, I64(CHUNK_LINE))):
            keep = b.and_(resume, I64(0xFFFFFFFF00000000))
            b.store(b.or_(keep, I64(RESUME_CHUNK_DATA_END | tls.CONN_HTTP)), conn)
            data_end = b.add(fx.get("pos"), fx.get("chunk"))
            self.rec.count(b, body_counter, 0, b.add(base, data_end))
            verdict(SK_PASS, covering(data_end))
        with b.if_then(b.icmp_unsigned("==", state, I64(BODY_END))):
            b.store(I64(RESUME_REQUEST | tls.CONN_HTTP), conn)
            ended = fx.get("pos")
            self.rec.count(b, body_counter, 0, b.add(base, ended))
            verdict(SK_PASS, b.trunc(ended, I32))
        refused = b.icmp_unsigned("<", state, I64(TERMINAL_STATES))
        with b.if_then(b.icmp_unsigned("==", state, I64(Reason.BAD_METHOD)), likely=False):
            self.tls.alert_plaintext(fx, kind, rest, RunEnd(verdict, refuse, covering))
        too_large = b.icmp_unsigned(">=", b.add(base, n), max_head)
        stalled = b.icmp_unsigned("!=", fx.get("pos"), n)  # every byte is scanned, or refused
        with b.if_then(b.or_(refused, b.or_(too_large, stalled))):
            reason = b.select(refused, state, I64(Reason.HEAD_TOO_LARGE))
            refuse(reason, b.zext(head_start, I64))
        # The head goes on in the next chunk, or the next send: the scan's state is kept (with
        # the head's bytes so far) for the unit that goes on with it. Bytes of this send pass
        # only if the whole send does; those of an earlier send have passed (they do not make a
        # request the server can act on).
        h.call(b, PROBE_READ_KERNEL, _byte(b, conn, CONN_SAVE), I32(WORK_BYTES), scratch)
        b.store(base, _byte(b, conn, CONN_BASE))
        b.store(b.or_(b.load(conn, typ=I64), I64(CONN_HEAD_PART)), conn)
        verdict(SK_PASS, b.trunc(n, I32))

        b.position_at_end(record)
        outcome, apply = b.phi(I64, "outcome"), b.phi(I32, "apply")
        for value, nbytes, block in recorded:
            outcome.add_incoming(value, block)
            apply.add_incoming(nbytes, block)
        passed = b.icmp_unsigned("!=", self.rec.passes(b, outcome), I64(0))
        # A head that began in an earlier send is no longer in the buffer: its event carries
        # the path (kept in the work area) but not the method and Host.
        head_here = b.icmp_unsigned("==", aget("base"), I64(0))
        shown = b.select(head_here, outcome, b.and_(outcome, I64(~(1 << 24) & (2**64 - 1))))
        self.rec.record_event(b, md, scan, shown, I64(0))
        with b.if_then(b.not_(passed)):
            verdict(SK_DROP)
        with b.if_then(b.icmp_unsigned("==", apply, I32(0))):
            verdict(SK_PASS)
        verdict(SK_PASS, apply)
        return fn

    def build(self) -> ir.Module:
        self.ob.license()
        self.maps()
        self.tables.emit()
        self.kernel_layout()
        append = self.judge.path_append()
        self.rec.functions()
        j = self.judge
        scan_step = j.scan_step(j.scan_byte(append))
        unit = self.unit_step(self.copy_step(), scan_step, j.path_step(), j.cand_step())
        self.lsm_program(unit)
        self.sockops_program()
        return self.ob.finish()


def emit_lsm_module(matcher: MatcherIR, layout: dict[str, int] | None = None) -> ir.Module:
    return LsmBackend(matcher, layout).build()
