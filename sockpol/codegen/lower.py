"""Lower a checked policy to the matcher IR: a scanner automaton plus a rule table over facts.

A *fact* is one boolean the scanner establishes about a request head: "the method is in {GET,
HEAD}", "the path matches `/api/*`", "a `content-type` line equals `application/json`". Each rule
is the conjunction of its facts; the first rule (in source order) whose facts all hold decides.
Facts are shared between rules that ask the same question, which keeps the automaton small.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from sockpol.codegen import http
from sockpol.codegen.automaton import EMPTY, Re, anyof, lit, lit_ci, opt, plus, seq, star
from sockpol.codegen.scanner import (
    ScannerSpec,
    ScannerTables,
    build_path_matcher,
    build_scanner,
    pack,
    refit,
)
from sockpol.dsl.ast import Action, HeaderCondition, HostCondition, Mode, Policy
from sockpol.telemetry import MODE_DRY_RUN, MODE_ENFORCE, RULE_AUDIT, RULE_LOG, RULE_PASS

MAX_FACT_WORDS = 8  # 512 distinct facts; the fact set lives on the BPF stack
SEGMENT_BYTE = http.PATH_BYTE & ~(1 << ord("/"))


class LoweringError(Exception):
    """A policy that is valid but too large for this code generator; names the rule."""

    def __init__(self, message: str, rule_index: int | None = None) -> None:
        super().__init__(message)
        self.rule_index = rule_index


@dataclass(frozen=True)
class RuleEntry:
    index: int
    allow: bool  # the request passes: an allow or an audit rule
    facts: frozenset[int]
    log: bool = False  # record an event when the rule passes a request (`log`)
    audit: bool = False  # record the request as one a deny rule would refuse (`audit`)

    @property
    def flags(self) -> int:
        """The rule's word in the kernel's rule table (telemetry.RULE_*)."""
        return (
            (RULE_PASS if self.allow else 0)
            | (RULE_LOG if self.log else 0)
            | (RULE_AUDIT if self.audit else 0)
        )


def _bits(n: int) -> int:
    return max(0, (max(n, 1) - 1).bit_length())


@dataclass(frozen=True)
class TableShape:
    """The dimensions of a program's tables, as powers of two. The program's code (masks,
    shifts, offsets) depends on them and on nothing else of the policy, so any policy whose
    tables fit a loaded program's shape can be swapped in without touching the program."""

    state_bits: int
    class_bits: int
    path_state_bits: int
    path_class_bits: int
    factset_bits: int
    rule_bits: int
    fact_words: int

    def covers(self, other: TableShape) -> bool:
        return all(getattr(self, f.name) >= getattr(other, f.name) for f in fields(self))

    def union(self, other: TableShape) -> TableShape:
        return TableShape(
            **{f.name: max(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)}
        )

    def shortfall(self, needed: TableShape) -> list[str]:
        return [
            f"{f.name} {getattr(needed, f.name)} > {getattr(self, f.name)}"
            for f in fields(self)
            if getattr(needed, f.name) > getattr(self, f.name)
        ]


# Room to grow by default, so that most edits of a policy can be hot-reloaded into the program
# that is already loaded (512 head states, 64 byte classes, 64 rules, 256 fact sets, 128 facts).
DEFAULT_SHAPE = TableShape(9, 6, 9, 6, 8, 6, 2)


@dataclass(frozen=True)
class MatcherIR:
    policy: Policy
    tables: ScannerTables
    rules: tuple[RuleEntry, ...]
    fact_words: int
    fact_names: tuple[str, ...]
    shape: TableShape | None = None  # set by with_shape(); None means the minimal shape

    def needed_shape(self) -> TableShape:
        t = self.tables
        return TableShape(
            state_bits=_bits(t.n_states),
            class_bits=_bits(max(t.classmap) + 1),
            path_state_bits=_bits(t.path.n_states),
            path_class_bits=_bits(max(t.path.classmap) + 1),
            factset_bits=_bits(len(t.factsets)),
            rule_bits=_bits(len(self.rules)),
            fact_words=self.fact_words,
        )

    def with_shape(self, shape: TableShape) -> MatcherIR:
        """These tables laid out in `shape`, which must cover what they need."""
        assert shape.covers(self.needed_shape()), shape.shortfall(self.needed_shape())
        t = refit(
            self.tables, shape.class_bits, shape.state_bits,
            shape.path_class_bits, shape.path_state_bits,
        )  # fmt: skip
        return replace(self, tables=t, fact_words=shape.fact_words, shape=shape)

    @property
    def initial_mode(self) -> int:
        """The value the loader puts in the control map (telemetry.MODE_*)."""
        return MODE_DRY_RUN if self.policy.mode is Mode.DRY_RUN else MODE_ENFORCE

    def words(self, facts: frozenset[int]) -> list[int]:
        out = [0] * self.fact_words
        for f in facts:
            out[f // 64] |= 1 << (f % 64)
        return out


def glob_regex(pattern: str) -> Re:
    """The regex of a path glob (see docs/language.md): `*` is a run of non-`/` bytes (non-empty
    as a whole segment), a whole-segment `**` is zero or more segments, a trailing `**` inside a
    segment is any bytes. It is matched against the *normalized* path (normalize.py), where
    remaining escapes have upper-case hex digits."""
    assert pattern.startswith("/")
    segments = pattern[1:].split("/")
    parts: list[Re] = []
    pending_slash = True  # the "/" before the current segment is still to be emitted
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == "**":
            if last:
                parts.append(opt(seq(lit("/"), star(anyof(http.PATH_BYTE)))))
            else:
                # "/**/" : a slash, then any number of "segment/" groups.
                parts.append(seq(lit("/"), star(seq(plus(anyof(SEGMENT_BYTE)), lit("/")))))
                pending_slash = False
            continue
        if pending_slash:
            parts.append(lit("/"))
        pending_slash = True
        parts.append(_segment_regex(seg, last))
    return seq(*parts)


def _segment_regex(seg: str, last: bool) -> Re:
    if seg == "*":
        return plus(anyof(SEGMENT_BYTE))
    parts: list[Re] = []
    i = 0
    while i < len(seg):
        c = seg[i]
        if seg.startswith("**", i):
            assert last and i + 2 == len(seg), "checker allows `**` only at the end"
            parts.append(star(anyof(http.PATH_BYTE)))
            i += 2
        elif c == "*":
            parts.append(star(anyof(SEGMENT_BYTE)))
            i += 1
        elif c == "%":
            parts.append(lit("%" + seg[i + 1 : i + 3].upper()))
            i += 3
        else:
            parts.append(lit(c))
            i += 1
    return seq(*parts) if parts else EMPTY


def _condition_regex(cond: HostCondition | HeaderCondition) -> Re:
    if isinstance(cond, HostCondition):
        return http.field_with_value("host", http.host_value(cond.pattern))
    if cond.value is None:
        return http.field_line(lit_ci(cond.name))
    return http.field_with_value(cond.name, lit(cond.value.encode("latin-1")))


def lower(policy: Policy) -> MatcherIR:
    facts: dict[tuple, int] = {}
    names: list[str] = []

    def fact(key: tuple, name: str) -> int:
        if key not in facts:
            facts[key] = len(facts)
            names.append(name)
        return facts[key]

    entries = []
    method_sets: dict[frozenset[str], int] = {}
    path_patterns: dict[str, int] = {}
    conditions: dict[tuple, tuple[int, Re]] = {}
    for rule in policy.rules:
        needed = set()
        if rule.methods.methods is not None:
            ms = frozenset(rule.methods.methods)
            f = fact(("method", ms), f"method in {{{','.join(sorted(ms))}}}")
            method_sets[ms] = f
            needed.add(f)
        f = fact(("path", rule.path.text), f"path matches {rule.path.text}")
        path_patterns[rule.path.text] = f
        needed.add(f)
        for cond in rule.conditions:
            key = ("cond", str(cond))
            f = fact(key, str(cond))
            if key not in conditions:
                conditions[key] = (f, _condition_regex(cond))
            needed.add(f)
        entries.append(
            RuleEntry(
                rule.index,
                rule.action is not Action.DENY,
                frozenset(needed),
                log=rule.log,
                audit=rule.action is Action.AUDIT,
            )
        )
        if len(facts) > MAX_FACT_WORDS * 64:
            raise LoweringError(
                f"policy needs more than {MAX_FACT_WORDS * 64} distinct facts", rule.index
            )

    method_facts: dict[str, set[int]] = {}
    for ms, f in method_sets.items():
        for m in ms:
            method_facts.setdefault(m, set()).add(f)
    spec = ScannerSpec(
        method_facts={m: frozenset(fs) for m, fs in method_facts.items()},
        path_patterns=[(glob_regex(text), f) for text, f in path_patterns.items()],
        header_patterns=[(regex, f) for f, regex in conditions.values()],
    )
    tables = pack(build_scanner(spec), build_path_matcher(spec))
    return MatcherIR(
        policy=policy,
        tables=tables,
        rules=tuple(entries),
        fact_words=max(1, (len(facts) + 63) // 64),
        fact_names=tuple(names),
    )


__all__ = ["LoweringError", "MatcherIR", "RuleEntry", "glob_regex", "lower"]
