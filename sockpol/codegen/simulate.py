"""The kernel program's decision, computed in Python from the same tables.

This mirrors `emit.py` step for step (same tables, same order of checks), so tests can compare what
the kernel did with what the tables say, and tools can explain a verdict without a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

from sockpol.codegen.lower import MatcherIR
from sockpol.codegen.scanner import (
    EMIT_MASK,
    END,
    FLAG_CL_DIGIT,
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


def scan(ir: MatcherIR, data: bytes) -> tuple[int, int, int, int]:
    """Walk the automaton; returns (state, facts bitmask, bytes consumed, content length)."""
    t = ir.tables
    state, facts, cl, seen, pos = t.start, 0, 0, 0, 0
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
        if info & seen & SINGLETON_FLAGS:
            nxt = Reason.DUPLICATE_HEADER
        seen |= info & SINGLETON_FLAGS
        state, pos = nxt, i + 1
        if state < TERMINAL_STATES:
            break
    return state, facts, pos, cl


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
    state, facts, pos, cl = scan(ir, message[:n])
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
