"""The reference interpreter held to the code generator's tables, run by run.

`held_to_tables(ir, mode)` is an observer for `sockpol.model.interp.Connection`: every run of the
interpreter must equal `codegen.simulate.run` on the same message (verdict, reason, bytes
covered, cork, event, deciding rule), with the tables' own per-connection storage (word and the
bytes still to come) carried from run to run. Used by tests/test_interp.py and
tests/test_tls_walk.py.
"""

from __future__ import annotations

from collections.abc import Callable

from sockpol.codegen import simulate
from sockpol.codegen.lower import MatcherIR
from sockpol.contract import (
    RESUME_ANSWERED,
    RESUME_CHUNK_DATA_END,
    RESUME_CHUNK_LINE,
    RESUME_REQUEST,
    RESUME_UNJUDGED,
)
from sockpol.model import interp, tls
from sockpol.telemetry import VERDICT_NAMES

# The interpreter's resume points, as the tables number them.
RESUME = {
    "request": RESUME_REQUEST,
    "chunk-size": RESUME_CHUNK_LINE,
    "chunk-end": RESUME_CHUNK_DATA_END,
    "unjudged": RESUME_UNJUDGED,
    "tls-pass": tls.RESUME_TLS_PASS,
    "answered": RESUME_ANSWERED,
}
PHASE = 0xFF << 16  # the TLS bits of the word


def held_to_tables(
    ir: MatcherIR, mode: int | list[int], tls_state: bool = False
) -> Callable[[bytes, str, interp.Run], None]:
    """`mode`: the mode in force, or a one-item list the test may change between sends (as
    `sockpol mode` does: every run reads the mode afresh). `tls_state`: also compare the TLS
    phase and the bytes still to come (the handshake walk's own state)."""
    modes = mode if isinstance(mode, list) else [mode]
    conn = RESUME_REQUEST

    def observe(message: bytes, resume: str, run: interp.Run) -> None:
        nonlocal conn
        context = f"resume={resume} conn={conn:#x} message={message[:300]!r}"
        assert RESUME[resume] == conn & 0xFF, context
        want = simulate.run(ir, message, conn, modes[0])
        reason = run.verdict.reason if run.verdict is not None else "none"
        event = run.verdict.event if run.verdict is not None else None
        answer = run.verdict.answer if run.verdict is not None else 0
        got = (run.allow, reason, run.covers, run.cork, event, answer, run.discard)
        expected = (
            want.allow, want.reason.slug, want.apply_bytes, want.cork_bytes,
            VERDICT_NAMES.get(want.event) if want.event is not None else None, want.answer,
            want.discard,
        )  # fmt: skip
        assert got == expected, f"interpreter {got} != tables {expected}; {context}"
        if run.verdict is not None and run.verdict.head is not None:
            rule = run.verdict.rule.index if run.verdict.rule is not None else None
            assert rule == want.rule, context
        if run.cork:
            return  # the kernel keeps the storage as it was
        if tls_state:
            phase = want.conn & PHASE
            if phase & tls.CONN_HTTP:  # (the tables keep only this bit once the bytes are HTTP)
                assert run.tls & tls.CONN_HTTP, context
            else:
                assert run.tls & PHASE == phase, context
            assert run.left == want.conn >> 64, context
        conn = want.conn

    return observe
