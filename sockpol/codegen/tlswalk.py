"""The TLS handshake as the kernel program walks it, one record per run, before any HTTP:
model/tls.py's decision (`step`), step for step, for a program that judges a message whose
first bytes may be a TLS record (the sk_msg backend; docs/ktls.md). `phase` falls through when
the message is to be read as HTTP, and otherwise ends the run through the program's own
`verdict`, `refuse` and `covering` (how that program passes, refuses and covers bytes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llvmlite import ir

from sockpol.codegen.helpers import I8, I32, I64
from sockpol.codegen.record import Recorder
from sockpol.codegen.tables import Fn
from sockpol.contract import RESUME_REQUEST, SK_DROP, SK_PASS, Reason
from sockpol.model import tls
from sockpol.telemetry import SLOT_WOULD_REFUSE


@dataclass(frozen=True)
class RunEnd:
    """How the calling program ends a run: `verdict(value, apply=None, cork=None)` returns
    with both byte counts set, `refuse(reason)` refuses before any rule (counted and recorded),
    `covering(total)` is the apply_bytes for a verdict on `total` bytes from the message start
    (what lies beyond is counted down by later runs)."""

    verdict: Callable[..., None]
    refuse: Callable[..., None]
    covering: Callable[[ir.Value], ir.Value]


@dataclass(frozen=True)
class Window:
    """The message's first bytes as the walk reads them: every `byte(i)` under a `has(i + 1)`."""

    b: ir.IRBuilder
    data: ir.Value
    data_end: ir.Value

    def has(self, k: int) -> ir.Value:  # data[0..k) is in the window
        b = self.b
        return b.icmp_unsigned("<=", b.gep(self.data, [I64(k)], source_etype=I8), self.data_end)

    def byte(self, i: int) -> ir.Value:
        b = self.b
        return b.zext(b.load(b.gep(self.data, [I64(i)], source_etype=I8), typ=I8), I64)

    def eq(self, a: ir.Value, v: int) -> ir.Value:
        return self.b.icmp_unsigned("==", a, I64(v))


class TlsWalk:
    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    def alert_plaintext(self, fx: Fn, kind: ir.Value, size: ir.Value, end: RunEnd) -> None:
        """A kTLS socket's alert (the close_notify of SSL_shutdown, sent with a record-type cmsg)
        reaches the program as 2 plaintext bytes, which the scanner refuses as a method: on a
        `tls` policy they pass, at a request boundary (tls.is_alert_plaintext). Checked only on
        that refusal: a check before the scan made the verifier walk the scan twice."""
        b = fx.b
        data, data_end = fx.get("data"), fx.get("data_end")
        at_request = b.icmp_unsigned("==", kind, I64(RESUME_REQUEST))
        declared = b.icmp_unsigned("!=", fx.config("tls"), I64(tls.TLS_NONE))
        two = b.icmp_unsigned("==", size, I64(2))
        with b.if_then(b.and_(at_request, b.and_(declared, two))):
            past = b.gep(data, [I64(2)], source_etype=I8)
            with b.if_then(b.icmp_unsigned("<=", past, data_end)):
                first = b.zext(b.load(data, typ=I8), I64)
                with b.if_then(b.icmp_unsigned("<=", b.sub(first, I64(1)), I64(1))):
                    end.verdict(SK_PASS)

    def phase(
        self,
        fx: Fn,
        conn: ir.Value,
        resume: ir.Value,
        kind: ir.Value,
        size: ir.Value,
        end: RunEnd,
    ) -> None:
        """The TLS handshake, one record per run, until the connection's bytes are HTTP: tls.py
        step for step. Returns (falls through) when this message is to be read as HTTP."""
        b = fx.b
        at_request = b.icmp_unsigned("==", kind, I64(RESUME_REQUEST))
        tls_mode = fx.config("tls")
        w = Window(b, fx.get("data"), fx.get("data_end"))
        has, byte, eq = w.has, w.byte, w.eq

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
                        self._record(w, conn, resume, size, end, tls_mode, kind_byte)

    def _record(
        self,
        w: Window,
        conn: ir.Value,
        resume: ir.Value,
        size: ir.Value,
        end: RunEnd,
        tls_mode: ir.Value,
        t: ir.Value,
    ) -> None:
        """A message starting with TLS record type `t`: pass it, cork it, or refuse it."""
        b, has, byte, eq = w.b, w.has, w.byte, w.eq
        verdict, refuse, covering = end.verdict, end.refuse, end.covering
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
            self.rec.count(b, SLOT_WOULD_REFUSE + Reason.TLS_USERSPACE, 1, size)
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
