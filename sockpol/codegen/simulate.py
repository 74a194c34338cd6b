"""The kernel program's decision, computed in Python from the same tables.

This mirrors `emit.py` step for step (same tables, same order of checks), so tests can compare what
the kernel did with what the tables say, and tools can explain a verdict without a kernel.
`run()` is one run of the program on one message; `Connection` strings runs together the way the
kernel does for a stream of sends (cork, apply_bytes, per-connection resume state).

A run also says what the program records (telemetry.py): the event it emits, if any, and the
counter slots it adds to. The mode (enforce or dry-run) is read by every run, as the kernel reads
it from the control map, so a `Connection`'s mode can change between sends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sockpol.codegen.candidates import CAND_LENGTH_SHIFT, MAX_TABLE
from sockpol.codegen.lower import MatcherIR
from sockpol.codegen.normalize import Normalizer
from sockpol.codegen.scanner import (
    BODY_END,
    CHUNK_LINE,
    EMIT_MASK,
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
from sockpol.telemetry import (
    MODE_DRY_RUN,
    MODE_ENFORCE,
    RESUME_UNJUDGED,
    RULE_AUDIT,
    RULE_LOG,
    RULE_PASS,
    SLOT_DEFAULT,
    SLOT_REFUSED,
    SLOT_RULES,
    SLOT_UNJUDGED,
    SLOT_WOULD_REFUSE,
    Verdict,
)

CL_MAX = 0xFFFF0000  # Content-Length values above this are refused (apply_bytes takes a u32)
CHUNK_MAX = 0xFFFF0000  # likewise chunk sizes
NO_RULE = 0xFFFFFFFF
HEXVAL = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}


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
    path: bytes | None = None  # the normalized path, when a request head was read
    # What the run records (telemetry.py). `reason` is also set for a request that passes only
    # because of dry-run mode or an audit rule: the reason it would have been refused for.
    event: Verdict | None = None
    counts: tuple[tuple[int, int, int], ...] = ()  # (slot, requests, bytes) added
    conn: int = RESUME_REQUEST  # the whole per-connection word stored for the next run

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
    path: bytes | None  # the normalized path, once the path has ended
    path_state: int | None = None  # where the path automaton ended on it


def start_state(ir: MatcherIR, resume: int) -> int:
    t = ir.tables
    return {
        RESUME_REQUEST: t.start,
        RESUME_CHUNK_LINE: t.chunk_start,
        RESUME_CHUNK_DATA_END: t.chunk_data_end,
    }[resume]


def scan(ir: MatcherIR, data: bytes, resume: int = RESUME_REQUEST) -> ScanResult:
    """Walk the automaton as the kernel's scan_step does, normalizing the path on the way."""
    t = ir.tables
    state, facts, cl, chunk, seen, pos = start_state(ir, resume), 0, 0, 0, 0, 0
    norm = Normalizer()
    path = path_state = None
    for i, b in enumerate(data):
        nxt = t.step(state, b)
        info = t.info[nxt]
        emit = info & EMIT_MASK
        if emit:
            for f in t.factsets[emit]:
                facts |= 1 << f
        if info & FLAG_CL_DIGIT:
            cl = cl * 10 + (b - 0x30)
            if cl > CL_MAX:
                nxt = Reason.BAD_CONTENT_LENGTH
            if seen & FLAG_CL_LINE:
                nxt = Reason.DUPLICATE_HEADER  # digits of a second Content-Length line
        if info & FLAG_HEX_DIGIT:
            chunk = chunk * 16 + HEXVAL[b]
            if chunk > CHUNK_MAX:
                nxt = Reason.BAD_CHUNK
        if info & seen & SINGLETON_FLAGS:
            nxt = Reason.DUPLICATE_HEADER
        seen |= info & SINGLETON_FLAGS
        if seen & FLAG_CL_LINE and seen & FLAG_TE_LINE:
            nxt = Reason.TRANSFER_ENCODING  # both framings: the classic smuggling setup
        if info & FLAG_PATH_BYTE:
            norm.feed(b)
        if info & FLAG_PATH_END:
            norm.finish()
            if norm.error:
                nxt = Reason.PATH_TOO_LONG
            else:
                path = bytes(norm.out)
                path_state = walk_path(ir, path)
        state, pos = nxt, i + 1
        if state < TERMINAL_STATES:
            break
    return ScanResult(state, facts, pos, cl, chunk, seen, path, path_state)


def walk_path(ir: MatcherIR, path: bytes) -> int:
    """The path automaton's (packed) state id after the normalized path."""
    p = ir.tables.path
    state = p.start
    for b in path:
        state = p.step(state, b)
    return state


def decide(ir: MatcherIR, facts: int, path_state: int) -> int | None:
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
    ir: MatcherIR, message: bytes, resume: int = RESUME_REQUEST, mode: int = MODE_ENFORCE
) -> RunResult:
    """One run on `message`. `resume` is the connection's word from the previous run
    (`RunResult.conn`): the resume point in bits 0..7, the reason an unjudged connection lost its
    framing in bits 8..15, the counter slot of the request whose chunked body follows in 32..63."""
    size = len(message)
    kind, saved_reason, body_slot = resume & 0xFF, (resume >> 8) & 0xFF, resume >> 32
    if size == 0:
        return RunResult(True, Reason.NONE, None, 0, 0, 0, 0, kind, conn=resume)
    if kind == RESUME_UNJUDGED:
        reason = Reason(saved_reason)
        if mode == MODE_DRY_RUN:
            counts = ((SLOT_UNJUDGED, 1, size),)
            return RunResult(True, reason, None, 0, 0, 0, 0, kind, counts=counts, conn=resume)
        counts = ((SLOT_REFUSED + reason, 1, size),)
        return RunResult(
            False, reason, None, 0, 0, 0, 0, kind, None, Verdict.REFUSED, counts, resume
        )
    n = min(size, ir.policy.max_head)
    s = scan(ir, message[:n], kind)
    if s.state == END:
        return _judged(ir, s, mode)
    if s.state == CHUNK_LINE:
        covered = s.pos + s.chunk_size
        nxt = RESUME_CHUNK_DATA_END | body_slot << 32
        return RunResult(
            True, Reason.NONE, None, covered, 0, s.pos, 0, RESUME_CHUNK_DATA_END,
            counts=((body_slot, 0, covered),), conn=nxt,
        )  # fmt: skip
    if s.state == BODY_END:
        return RunResult(
            True, Reason.NONE, None, s.pos, 0, s.pos, 0, RESUME_REQUEST,
            counts=((body_slot, 0, s.pos),), conn=RESUME_REQUEST,
        )  # fmt: skip
    if s.state < TERMINAL_STATES:
        return _unframed(Reason(s.state), s, size, mode, resume)
    if size >= ir.policy.max_head:
        return _unframed(Reason.HEAD_TOO_LARGE, s, size, mode, resume)
    return RunResult(True, Reason.NONE, None, 0, size + 1, s.pos, 0, kind, conn=resume)


def _judged(ir: MatcherIR, s: ScanResult, mode: int) -> RunResult:
    """A complete head: the first matching rule or the default decides, and is counted."""
    rule = decide(ir, s.facts, s.path_state)
    if rule is None:
        flags = RULE_PASS if ir.policy.default.value == "allow" else 0
        slot, reason = SLOT_DEFAULT, Reason.DEFAULT
    else:
        flags = ir.rules[rule].flags
        slot, reason = SLOT_RULES + rule, Reason.RULE
    if s.seen & FLAG_TE_LINE:
        covered, nxt = s.pos, RESUME_CHUNK_LINE
    else:
        covered, nxt = s.pos + s.content_length, RESUME_REQUEST
    counts = [(slot, 1, covered)]
    event = None
    allow = bool(flags & RULE_PASS)
    if flags & RULE_AUDIT:
        event = Verdict.AUDIT
        counts.append((SLOT_WOULD_REFUSE + reason, 1, covered))
    elif not allow and mode == MODE_DRY_RUN:
        allow, event = True, Verdict.DRY_RUN
        counts.append((SLOT_WOULD_REFUSE + reason, 1, covered))
    elif not allow:
        event = Verdict.REFUSED
        counts.append((SLOT_REFUSED + reason, 1, covered))
    else:
        reason = Reason.NONE
        if flags & RULE_LOG:
            event = Verdict.LOGGED
    return RunResult(
        allow, reason, rule, covered, 0, s.pos, s.content_length, nxt, s.path,
        event, tuple(counts), nxt | slot << 32,
    )  # fmt: skip


def _unframed(reason: Reason, s: ScanResult, size: int, mode: int, resume: int) -> RunResult:
    """Refused before any rule: in dry-run the send passes and the connection goes unjudged."""
    if mode == MODE_DRY_RUN:
        conn = RESUME_UNJUDGED | reason << 8
        return RunResult(
            True, reason, None, 0, 0, s.pos, s.content_length, RESUME_UNJUDGED, s.path,
            Verdict.DRY_RUN, ((SLOT_WOULD_REFUSE + reason, 1, size),), conn,
        )  # fmt: skip
    return RunResult(
        False, reason, None, 0, 0, s.pos, s.content_length, resume & 0xFF, s.path,
        Verdict.REFUSED, ((SLOT_REFUSED + reason, 1, size),), resume,
    )  # fmt: skip


@dataclass
class Connection:
    """A client connection as the kernel handles it: feed it sends, see what gets delivered.

    Models tcp_bpf's sendmsg path: corked bytes wait for more, a verdict covers `apply_bytes`
    (possibly beyond this send), the program re-runs on what follows, and after a refusal
    nothing more is sent on the connection.
    """

    ir: MatcherIR
    mode: int = MODE_ENFORCE  # may be changed between sends, as `sockpol mode` does
    delivered: bytearray = field(default_factory=bytearray)
    verdicts: list[RunResult] = field(default_factory=list)
    refused: bool = False
    _pending: bytearray = field(default_factory=bytearray)  # corked bytes
    _cork: int = 0
    _skip: int = 0  # bytes still covered by an earlier pass verdict
    _resume: int = RESUME_REQUEST

    def send(self, data: bytes) -> bool:
        """One send(); False when the kernel refuses (EACCES, or a short count)."""
        if self.refused:
            return False
        self._pending += data
        if self._cork and len(self._pending) < self._cork:
            return True
        self._cork = 0
        while self._pending:
            if self._skip:
                take = min(self._skip, len(self._pending))
                self.delivered += self._pending[:take]
                del self._pending[:take]
                self._skip -= take
                continue
            result = run(self.ir, bytes(self._pending), self._resume, self.mode)
            self.verdicts.append(result)
            if not result.allow:
                self.refused = True
                self._pending.clear()
                return False
            if result.cork_bytes:
                self._cork = result.cork_bytes
                return True
            self._resume = result.conn
            self._skip = result.apply_bytes or len(self._pending)
        return True
