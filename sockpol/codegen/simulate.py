"""The kernel program's decision, computed in Python from the same tables.

This mirrors `emit.py` step for step (same tables, same order of checks), so tests can compare what
the kernel did with what the tables say, and tools can explain a verdict without a kernel.
`run()` is one run of the program on one message; `Connection` strings runs together the way the
kernel does for a stream of sends (cork, apply_bytes, per-connection resume state).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class ScanResult:
    state: int  # a terminal state, or a non-terminal one when the data ran out
    facts: int  # bitmask
    pos: int  # bytes consumed
    content_length: int
    chunk_size: int
    seen: int  # singleton-header flags seen
    path: bytes | None  # the normalized path, once the path has ended


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
    path = None
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
                facts |= path_facts(ir, path)
        state, pos = nxt, i + 1
        if state < TERMINAL_STATES:
            break
    return ScanResult(state, facts, pos, cl, chunk, seen, path)


def path_facts(ir: MatcherIR, path: bytes) -> int:
    p = ir.tables.path
    state = p.start
    for b in path:
        state = p.step(state, b)
    return sum(1 << f for f in ir.tables.factsets[p.accept[state]])


def decide(ir: MatcherIR, facts: int) -> int | None:
    for entry in ir.rules:
        need = sum(1 << f for f in entry.facts)
        if facts & need == need:
            return entry.index
    return None


def run(ir: MatcherIR, message: bytes, resume: int = RESUME_REQUEST) -> RunResult:
    size = len(message)
    if size == 0:
        return RunResult(True, Reason.NONE, None, 0, 0, 0, 0, resume)
    n = min(size, ir.policy.max_head)
    s = scan(ir, message[:n], resume)
    if s.state == END:
        rule = decide(ir, s.facts)
        if rule is None:
            allow = ir.policy.default.value == "allow"
            reason = Reason.NONE if allow else Reason.DEFAULT
        else:
            allow = ir.rules[rule].allow
            reason = Reason.NONE if allow else Reason.RULE
        if s.seen & FLAG_TE_LINE:
            covered, nxt = s.pos, RESUME_CHUNK_LINE
        else:
            covered, nxt = s.pos + s.content_length, RESUME_REQUEST
        return RunResult(allow, reason, rule, covered, 0, s.pos, s.content_length, nxt, s.path)
    if s.state == CHUNK_LINE:
        return RunResult(
            True, Reason.NONE, None, s.pos + s.chunk_size, 0, s.pos, 0, RESUME_CHUNK_DATA_END
        )
    if s.state == BODY_END:
        return RunResult(True, Reason.NONE, None, s.pos, 0, s.pos, 0, RESUME_REQUEST)
    if s.state < TERMINAL_STATES:
        return RunResult(False, Reason(s.state), None, 0, 0, s.pos, s.content_length, resume)
    if size >= ir.policy.max_head:
        return RunResult(False, Reason.HEAD_TOO_LARGE, None, 0, 0, s.pos, 0, resume)
    return RunResult(True, Reason.NONE, None, 0, size + 1, s.pos, 0, resume)


@dataclass
class Connection:
    """A client connection as the kernel handles it: feed it sends, see what gets delivered.

    Models tcp_bpf's sendmsg path: corked bytes wait for more, a verdict covers `apply_bytes`
    (possibly beyond this send), the program re-runs on what follows, and after a refusal
    nothing more is sent on the connection.
    """

    ir: MatcherIR
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
            result = run(self.ir, bytes(self._pending), self._resume)
            self.verdicts.append(result)
            if not result.allow:
                self.refused = True
                self._pending.clear()
                return False
            if result.cork_bytes:
                self._cork = result.cork_bytes
                return True
            self._resume = result.resume
            self._skip = result.apply_bytes or len(self._pending)
        return True
