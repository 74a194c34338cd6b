"""The kernel program's decision, computed in Python from the same tables.

This mirrors `emit.py` step for step (same tables, same order of checks), so tests can compare what
the kernel did with what the tables say, and tools can explain a verdict without a kernel.
`run()` is one run of the program on one message; `TablesConnection` strings runs together the
way the kernel does for a stream of sends (model/stream.py: cork, apply_bytes, resume state).

A run also says what the program records (telemetry.py): the event it emits, if any, and the
counter slots it adds to. The mode (enforce or dry-run) is read by every run, as the kernel reads
it from the control map, so a `TablesConnection`'s mode can change between sends.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sockpol.codegen import scanner as sc
from sockpol.codegen.candidates import CAND_LENGTH_SHIFT, MAX_TABLE
from sockpol.codegen.lower import MatcherIR
from sockpol.contract import (
    ANSWERED_REASONS,
    CHUNK_MAX,
    CL_MAX,
    PATH_MAX,
    RESUME_ANSWERED,
    RESUME_CHUNK_DATA_END,
    RESUME_CHUNK_LINE,
    RESUME_REQUEST,
    RESUME_UNJUDGED,
    Reason,
    head_limit,
)
from sockpol.model import tls
from sockpol.model.stream import Judged, Stream
from sockpol.telemetry import (
    MODE_DRY_RUN,
    MODE_ENFORCE,
    RULE_ANSWER_SHIFT,
    RULE_AUDIT,
    RULE_LOG,
    RULE_PASS,
    SLOT_ANSWERED,
    SLOT_DEFAULT,
    SLOT_REFUSED,
    SLOT_RULES,
    SLOT_UNJUDGED,
    SLOT_WOULD_REFUSE,
    EventKind,
)

HEXVAL = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}
WORD_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class RunResult:
    """What one run of the sk_msg program decides for the message it sees."""

    allow: bool
    reason: Reason
    rule: int | None  # index of the deciding rule, None for the default or a refusal
    apply_bytes: int  # bytes the verdict covers (0: the whole message)
    cork_bytes: int  # >0: hold the data until this many bytes, then run again
    head_length: int
    content_length: int
    resume: int = RESUME_REQUEST  # where the next run on this connection starts
    path: bytes | None = None  # the path, when a request head was read
    # What the run records (telemetry.py). `reason` is also set for a request that passes only
    # because of dry-run mode or an audit rule: the reason it would have been refused for.
    event: EventKind | None = None
    counts: tuple[tuple[int, int, int], ...] = ()  # (slot, requests, bytes) added
    conn: int = RESUME_REQUEST  # the whole per-connection word stored for the next run
    answer: int = 0  # a refusal answered: the response's status (0: dropped)
    discard: bool = False  # the message is consumed, nothing leaves (answered, or after one)

    @property
    def would_refuse(self) -> bool:
        return self.allow and self.reason is not Reason.NONE


@dataclass(frozen=True)
class ScanResult:
    state: int  # a terminal state, or a non-terminal one when the data ran out
    facts: int  # bitmask
    pos: int  # bytes consumed
    content_length: int
    chunk_size: int
    seen: int  # singleton-header flags seen
    path: bytes | None  # the path, once it has ended
    path_state: int | None = None  # where the path automaton ended on it


def start_state(ir: MatcherIR, resume: int) -> int:
    t = ir.tables
    return {
        RESUME_REQUEST: t.start,
        RESUME_CHUNK_LINE: t.chunk_start,
        RESUME_CHUNK_DATA_END: t.chunk_data_end,
    }[resume]


def scan(ir: MatcherIR, data: bytes, resume: int = RESUME_REQUEST) -> ScanResult:
    """Walk the automaton as the kernel's scan_step does, copying the path on the way."""
    t = ir.tables
    state, facts, cl, chunk, seen, pos = start_state(ir, resume), 0, 0, 0, 0, 0
    out = bytearray()
    too_long = False
    path = path_state = None
    for i, b in enumerate(data):
        nxt = t.step(state, b)
        info = t.info[nxt]
        emit = info & sc.EMIT_MASK
        if emit:
            for f in t.factsets[emit]:
                facts |= 1 << f
        if info & sc.FLAG_CL_DIGIT:
            cl = cl * 10 + (b - 0x30)
            if cl > CL_MAX:
                nxt = Reason.BAD_CONTENT_LENGTH
            if seen & sc.FLAG_CL_LINE:
                nxt = Reason.DUPLICATE_HEADER  # digits of a second Content-Length line
        if info & sc.FLAG_HEX_DIGIT:
            chunk = chunk * 16 + HEXVAL[b]
            if chunk > CHUNK_MAX:
                nxt = Reason.BAD_CHUNK
        if info & seen & sc.SINGLETON_FLAGS:
            nxt = Reason.DUPLICATE_HEADER
        seen |= info & sc.SINGLETON_FLAGS
        if seen & sc.FLAG_CL_LINE and seen & sc.FLAG_TE_LINE:
            nxt = Reason.TRANSFER_ENCODING  # both framings: the classic smuggling setup
        if info & sc.FLAG_PATH_BYTE:
            too_long = len(out) >= PATH_MAX
            out.append(b)
        elif out and path is None:  # the first byte after the path
            path = bytes(out)
            path_state = walk_path(ir, path)
        if too_long:  # as soon as the path is too long, not only at its end
            nxt = Reason.PATH_TOO_LONG
        state, pos = nxt, i + 1
        if state < sc.TERMINAL_STATES:
            break
    return ScanResult(state, facts, pos, cl, chunk, seen, path, path_state)


def walk_path(ir: MatcherIR, path: bytes) -> int:
    """The path automaton's (packed) state id after the path."""
    p = ir.tables.path
    state = p.start
    for b in path:
        state = p.step(state, b)
    return state


def first_matching_rule(ir: MatcherIR, facts: int, path_state: int) -> int | None:
    """The first rule that holds: the candidates of the path state, in order, each checked
    against the facts of its class (the kernel's cand_step)."""
    lookup = ir.lookup
    word = ir.tables.path.comb.word(path_state)
    offset, length = word & (MAX_TABLE - 1), word >> CAND_LENGTH_SHIFT
    for entry in lookup.table[offset : offset + length]:
        need = sum(1 << f for f in lookup.classes[entry >> 16])
        if facts & need == need:
            return entry & 0xFFFF
    return None


def run(
    ir: MatcherIR,
    message: bytes,
    resume: int = RESUME_REQUEST,
    mode: int = MODE_ENFORCE,
    answers: bool = True,
) -> RunResult:
    """One run on `message`. `resume` is the connection's state from the previous run
    (`RunResult.conn`), the two u64 of its socket storage as one number: the word (the resume
    point in bits 0..7, the reason an unjudged connection lost its framing in bits 8..15, TLS
    flags in 16..23 (tls.py), the counter slot of the request whose body follows in 32..63) and,
    from bit 64 on, how many bytes of an earlier verdict's body or TLS record are still to come.
    `answers` False: the loader turned answers off (the kernel cannot answer): all are dropped."""
    size = len(message)
    word, left = resume & WORD_MASK, resume >> 64
    kind = word & 0xFF
    if size == 0:
        return RunResult(True, Reason.NONE, None, 0, 0, 0, 0, kind, conn=resume)
    if kind == RESUME_ANSWERED:  # after an answered refusal: everything is discarded
        counts = ((SLOT_ANSWERED, 0, size),)
        return RunResult(False, Reason.NONE, None, 0, 0, 0, 0, kind, None, None, counts, resume,
                         discard=True)  # fmt: skip
    r = _run(ir, message, word, left, mode)
    if answers and kind == RESUME_REQUEST and not word & tls.CONN_TLS_FLAGS:
        r = _answered(ir, r, size)
    return r


def _answered(ir: MatcherIR, r: RunResult, size: int) -> RunResult:
    """A refused head answered (emit.answer_for): the response replaces the message."""
    if r.allow or r.reason not in ANSWERED_REASONS:
        return r
    index = ir.rules[r.rule].flags >> RULE_ANSWER_SHIFT & 3 if r.rule is not None else 0
    statuses = ir.policy.answers()
    status = statuses[index] if index < len(statuses) else 0
    if not status:
        return r
    counts = (*r.counts, (SLOT_ANSWERED, 1, size))
    conn = RESUME_ANSWERED | tls.CONN_HTTP
    return replace(r, apply_bytes=0, answer=status, discard=True, counts=counts, conn=conn)


def _run(ir: MatcherIR, message: bytes, word: int, left: int, mode: int) -> RunResult:
    size = len(message)
    kind, saved_reason, body_slot = word & 0xFF, (word >> 8) & 0xFF, (word >> 32) & 0xFFFFFFFF
    resume = word | left << 64
    if left:
        # The rest of a body (or record) an earlier verdict covered: passed without a look.
        n = min(left, size)
        return RunResult(True, Reason.NONE, None, n, 0, 0, 0, kind, conn=word | (left - n) << 64)
    if kind == RESUME_UNJUDGED:
        reason = Reason(saved_reason)
        if mode == MODE_DRY_RUN:
            counts = ((SLOT_UNJUDGED, 1, size),)
            return RunResult(True, reason, None, 0, 0, 0, 0, kind, counts=counts, conn=resume)
        counts = ((SLOT_REFUSED + reason, 1, size),)
        return RunResult(
            False, reason, None, 0, 0, 0, 0, kind, None, EventKind.REFUSED, counts, resume
        )
    if kind == tls.RESUME_TLS_PASS:
        counts = ((SLOT_UNJUDGED, 1, size),)
        return RunResult(True, Reason.NONE, None, 0, 0, 0, 0, kind, counts=counts, conn=resume)
    max_head = head_limit(ir.policy.max_head)
    n = min(size, max_head)
    tls_mode = tls.policy_mode(ir.policy)
    if kind == RESUME_REQUEST and not word & tls.CONN_HTTP:
        step = tls.step(message[:n], size, word, tls_mode)
        if step.action != tls.StepKind.HTTP:
            return _tls_record(step, word, size, mode)
        word |= tls.CONN_HTTP
    s = scan(ir, message[:n], kind)
    if s.state == sc.END:
        return _judged(ir, s, mode, size)
    if s.state == sc.CHUNK_LINE:
        covered = s.pos + s.chunk_size
        nxt = RESUME_CHUNK_DATA_END | tls.CONN_HTTP | body_slot << 32
        apply = min(covered, size)
        return RunResult(
            True, Reason.NONE, None, apply, 0, s.pos, 0, RESUME_CHUNK_DATA_END,
            counts=((body_slot, 0, covered),), conn=nxt | (covered - apply) << 64,
        )  # fmt: skip
    if s.state == sc.BODY_END:
        return RunResult(
            True, Reason.NONE, None, s.pos, 0, s.pos, 0, RESUME_REQUEST,
            counts=((body_slot, 0, s.pos),), conn=RESUME_REQUEST | tls.CONN_HTTP,
        )  # fmt: skip
    if s.state == Reason.BAD_METHOD and kind == RESUME_REQUEST and tls_mode:
        if tls.is_alert_plaintext(message[:n], size):  # checked on this refusal only: emit.py
            return RunResult(True, Reason.NONE, None, 0, 0, 0, 0, kind, conn=word)
    if s.state < sc.TERMINAL_STATES:
        return _unframed(Reason(s.state), s, size, mode, word)
    if size >= max_head:
        return _unframed(Reason.HEAD_TOO_LARGE, s, size, mode, word)
    return RunResult(True, Reason.NONE, None, 0, size + 1, s.pos, 0, kind, conn=word)


def _tls_record(step: tls.Step, word: int, size: int, mode: int) -> RunResult:
    """A run that met a TLS record (tls.step) instead of HTTP."""
    kind = word & 0xFF
    if step.action == tls.StepKind.CORK:
        return RunResult(True, Reason.NONE, None, 0, step.covered, 0, 0, kind, conn=word)
    if step.action == tls.StepKind.REFUSE:
        reason = Reason[step.reason.upper().replace("-", "_")]
        return _unframed(reason, ScanResult(0, 0, 0, 0, 0, 0, None), size, mode, word)
    if step.action == tls.StepKind.USERSPACE_ALLOW:
        counts = ((SLOT_WOULD_REFUSE + Reason.TLS_USERSPACE, 1, size),)
        nxt = tls.RESUME_TLS_PASS | step.flags
        return RunResult(True, Reason.NONE, None, 0, 0, 0, 0, tls.RESUME_TLS_PASS, None, None,
                         counts, nxt)  # fmt: skip
    apply = min(step.covered, size)
    nxt = (word & ~tls.CONN_TLS_FLAGS) | step.flags
    return RunResult(
        True, Reason.NONE, None, apply, 0, 0, 0, kind, conn=nxt | (step.covered - apply) << 64
    )


def _judged(ir: MatcherIR, s: ScanResult, mode: int, size: int) -> RunResult:
    """A complete head: the first matching rule or the default decides, and is counted."""
    rule = first_matching_rule(ir, s.facts, s.path_state)
    if rule is None:
        flags = RULE_PASS if ir.policy.default.value == "allow" else 0
        slot, reason = SLOT_DEFAULT, Reason.DEFAULT
    else:
        flags = ir.rules[rule].flags
        slot, reason = SLOT_RULES + rule, Reason.RULE
    if s.seen & sc.FLAG_TE_LINE:
        covered, nxt = s.pos, RESUME_CHUNK_LINE
    else:
        covered, nxt = s.pos + s.content_length, RESUME_REQUEST
    counts = [(slot, 1, covered)]
    event = None
    allow = bool(flags & RULE_PASS)
    if flags & RULE_AUDIT:
        event = EventKind.AUDIT
        counts.append((SLOT_WOULD_REFUSE + reason, 1, covered))
    elif not allow and mode == MODE_DRY_RUN:
        allow, event = True, EventKind.DRY_RUN
        counts.append((SLOT_WOULD_REFUSE + reason, 1, covered))
    elif not allow:
        event = EventKind.REFUSED
        counts.append((SLOT_REFUSED + reason, 1, covered))
    else:
        reason = Reason.NONE
        if flags & RULE_LOG:
            event = EventKind.LOGGED
    # The verdict covers this message up to the end of the body; the rest of the body, in later
    # messages, is counted down in the socket storage (under kTLS apply_bytes ends with the
    # record, so it cannot be left to cover them).
    apply = min(covered, size)
    conn = nxt | tls.CONN_HTTP | slot << 32 | (covered - apply) << 64
    return RunResult(
        allow, reason, rule, apply, 0, s.pos, s.content_length, nxt, s.path,
        event, tuple(counts), conn,
    )  # fmt: skip


def _unframed(reason: Reason, s: ScanResult, size: int, mode: int, word: int) -> RunResult:
    """Refused before any rule: in dry-run the send passes and the connection goes unjudged."""
    if mode == MODE_DRY_RUN:
        conn = RESUME_UNJUDGED | reason << 8
        return RunResult(
            True, reason, None, 0, 0, s.pos, s.content_length, RESUME_UNJUDGED, s.path,
            EventKind.DRY_RUN, ((SLOT_WOULD_REFUSE + reason, 1, size),), conn,
        )  # fmt: skip
    return RunResult(
        False, reason, None, 0, 0, s.pos, s.content_length, word & 0xFF, s.path,
        EventKind.REFUSED, ((SLOT_REFUSED + reason, 1, size),), word,
    )  # fmt: skip


class TablesConnection(Stream[int, RunResult]):
    """A client connection as the kernel handles it, each run judged by the tables (`run`):
    model/stream.py is the kernel's send path, the same for the reference interpreter. The
    state between runs is the program's socket storage (the word, and the bytes still to come
    above bit 64). `mode` may be changed between sends, as `sockpol mode` does."""

    def __init__(self, ir: MatcherIR, mode: int = MODE_ENFORCE) -> None:
        super().__init__(RESUME_REQUEST)
        self.ir = ir
        self.mode = mode
        self.answers = True  # False: the loader turned answers off

    @property
    def verdicts(self) -> list[RunResult]:
        return self.records

    def judge_run(self, message: bytes) -> Judged[int, RunResult]:
        r = run(self.ir, message, self.state, self.mode, self.answers)
        state = None if r.cork_bytes else r.conn
        return Judged(r.allow, r.apply_bytes, r.cork_bytes, state, r, discard=r.discard)
