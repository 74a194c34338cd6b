"""The kernel program's decision, computed in Python from the same tables.

This mirrors `emit.py` step for step (same tables, same order of checks), so tests can compare what
the kernel did with what the tables say, and tools can explain a verdict without a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

from sockpol.codegen.lower import MatcherIR
from sockpol.codegen.normalize import Normalizer
from sockpol.codegen.scanner import (
    EMIT_MASK,
    END,
    FLAG_CL_DIGIT,
    FLAG_PATH_BYTE,
    FLAG_PATH_END,
    SINGLETON_FLAGS,
    TERMINAL_STATES,
    Reason,
)

CL_MAX = 0xFFFF0000  # Content-Length values above this are refused (apply_bytes takes a u32)
NO_RULE = 0xFFFFFFFF


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


@dataclass(frozen=True)
class ScanResult:
    state: int  # END, a refusal reason, or a non-terminal state when the data ran out
    facts: int  # bitmask
    pos: int  # bytes consumed
    content_length: int
    path: bytes | None  # the normalized path, once the path has ended


def scan(ir: MatcherIR, data: bytes) -> ScanResult:
    """Walk the automaton as the kernel's scan_step does, normalizing the path on the way."""
    t = ir.tables
    state, facts, cl, seen, pos = t.start, 0, 0, 0, 0
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
                cl, nxt = CL_MAX + 1, Reason.BAD_CONTENT_LENGTH
        if info & seen & SINGLETON_FLAGS:
            nxt = Reason.DUPLICATE_HEADER
        seen |= info & SINGLETON_FLAGS
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
    return ScanResult(state, facts, pos, cl, path)


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


def run(ir: MatcherIR, message: bytes) -> RunResult:
    size = len(message)
    if size == 0:
        return RunResult(True, Reason.NONE, None, 0, 0, 0, 0)
    n = min(size, ir.policy.max_head)
    scanned = scan(ir, message[:n])
    state, facts, pos, cl = scanned.state, scanned.facts, scanned.pos, scanned.content_length
    if state == END:
        rule = decide(ir, facts)
        if rule is None:
            allow = ir.policy.default.value == "allow"
            reason = Reason.NONE if allow else Reason.DEFAULT
        else:
            allow = ir.rules[rule].allow
            reason = Reason.NONE if allow else Reason.RULE
        return RunResult(allow, reason, rule, pos + cl, 0, pos, cl)
    if state < TERMINAL_STATES:
        return RunResult(False, Reason(state), None, 0, 0, pos, cl)
    if size >= ir.policy.max_head:
        return RunResult(False, Reason.HEAD_TOO_LARGE, None, 0, 0, pos, cl)
    return RunResult(True, Reason.NONE, None, 0, size + 1, pos, cl)
