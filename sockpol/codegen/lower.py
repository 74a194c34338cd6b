"""Lower a checked policy to the matcher IR: a scanner automaton plus a rule table over facts.

A *fact* is one boolean the scanner establishes about a request head: "the method is in {GET,
HEAD}", "the path matches `/api/*`", "a `content-type` line equals `application/json`". Each rule
is the conjunction of its facts; the first rule (in source order) whose facts all hold decides.
Facts are shared between rules that ask the same question, which keeps the automaton small.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, fields, replace

from sockpol.automata import http
from sockpol.automata.automaton import Re, anyof, lit, lit_ci, opt, plus, seq, star
from sockpol.codegen.candidates import LookupBuilder, LookupTooLarge, RuleLookup, Unreachable
from sockpol.codegen.scanner import (
    PATH_STATE_LIMIT,
    ScannerSpec,
    ScannerTables,
    StateLimit,
    build_path_matcher,
    build_scanner,
    pack,
    refit,
)
from sockpol.dsl import patterns, regex
from sockpol.dsl.ast import Action, HeaderCondition, HostCondition, Mode, Policy
from sockpol.dsl.patterns import parse_pattern
from sockpol.telemetry import (
    MODE_DRY_RUN,
    MODE_ENFORCE,
    RULE_ANSWER_SHIFT,
    RULE_AUDIT,
    RULE_LOG,
    RULE_PASS,
)

MAX_FACT_WORDS = 8  # 512 distinct facts (the fact words are part of the connection's work area)
SEGMENT_BYTE = http.PATH_BYTE & ~(1 << ord("/"))


class LoweringError(Exception):
    """A policy that is valid but too large for this code generator; names the rule (and, for
    an automaton past its state limit, every rule responsible: `rules`)."""

    def __init__(
        self,
        message: str,
        rule_index: int | None = None,
        rules: tuple[int, ...] = (),
        code: str = "E900",
    ) -> None:
        super().__init__(message)
        self.rule_index = rule_index if rule_index is not None or not rules else rules[0]
        self.rules = rules or ((rule_index,) if rule_index is not None else ())
        self.code = code


@dataclass(frozen=True)
class RuleEntry:
    index: int
    allow: bool  # the request passes: an allow or an audit rule
    log: bool = False  # record an event when the rule passes a request (`log`)
    audit: bool = False  # record the request as one a deny rule would refuse (`audit`)
    answer: int = 0  # how its refusals are answered: an index into Policy.answers()

    @property
    def flags(self) -> int:
        """The rule's word in the kernel's rule table (telemetry.RULE_*)."""
        return (
            (RULE_PASS if self.allow else 0)
            | (RULE_LOG if self.log else 0)
            | (RULE_AUDIT if self.audit else 0)
            | self.answer << RULE_ANSWER_SHIFT
        )


def _bits(n: int) -> int:
    return max(0, (max(n, 1) - 1).bit_length())


@dataclass(frozen=True)
class TableShape:
    """The dimensions of a program's tables, as powers of two. The program's code (masks,
    shifts, offsets) depends on them and on nothing else of the policy, so any policy whose
    tables fit a loaded program's shape can be swapped in without touching the program."""

    state_bits: int  # the head scanner: states, byte classes
    class_bits: int
    factset_bits: int
    rule_bits: int
    fact_words: int
    # The rule lookup (candidates.py, comb.py): slots of the packed path automaton, words of its
    # accepting states, candidate entries, rule classes.
    slot_bits: int
    accept_bits: int
    cand_bits: int
    rclass_bits: int

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
# that is already loaded (512 head states, 128 byte classes, 256 fact sets, 64 rules, 128 facts,
# 4096 path slots, 64 accepting path states, 64 candidate entries, 16 rule classes). The head
# scanner of every policy has more than 64 byte classes: refusing every non-canonical escape
# (`%2A` but not `%2B`...) tells most hex digits apart.
DEFAULT_SHAPE = TableShape(9, 7, 8, 6, 2, 12, 6, 6, 4)


@dataclass(frozen=True)
class MatcherIR:
    policy: Policy
    tables: ScannerTables
    rules: tuple[RuleEntry, ...]
    fact_words: int
    fact_names: tuple[str, ...]
    # The rule lookup (candidates.py): path state -> candidate rules -> class check.
    lookup: RuleLookup
    shape: TableShape | None = None  # set by with_shape(); None means the minimal shape
    unreachable: tuple[Unreachable, ...] = ()  # rules that never decide a request

    def needed_shape(self) -> TableShape:
        t = self.tables
        return TableShape(
            state_bits=_bits(t.n_states),
            class_bits=_bits(max(t.classmap) + 1),
            factset_bits=_bits(len(t.factsets)),
            rule_bits=_bits(len(self.rules)),
            fact_words=self.fact_words,
            slot_bits=t.path.comb.slot_bits,
            accept_bits=_bits(len(t.path.comb.accepts)),
            cand_bits=_bits(len(self.lookup.table)),
            rclass_bits=_bits(len(self.lookup.classes)),
        )

    def with_shape(self, shape: TableShape) -> MatcherIR:
        """These tables laid out in `shape`, which must cover what they need."""
        assert shape.covers(self.needed_shape()), shape.shortfall(self.needed_shape())
        t = refit(self.tables, shape.class_bits, shape.state_bits)
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
    """The regex of a path glob (see docs/language.md and the token list in dsl/patterns.py):
    `*` is a run of non-`/` bytes (non-empty as a whole segment), a whole-segment `**` is zero
    or more segments, a trailing `**` inside a segment is any bytes. It is matched against the
    path as sent (canonical: the scanner refuses other spellings), whose escapes have upper-case
    hex digits, as
    the tokens' literals do. A path regex `~"..."` is accepted too (dsl/regex.py)."""
    if regex.is_regex(pattern):
        return regex.to_re(pattern)
    parts: list[Re] = []
    for token in parse_pattern(pattern).tokens:
        match token:
            case patterns.Literal(text):
                parts.append(lit(text))
            case patterns.Star(whole_segment):
                parts.append((plus if whole_segment else star)(anyof(SEGMENT_BYTE)))
            case patterns.AnySegments():
                parts.append(star(seq(lit("/"), plus(anyof(SEGMENT_BYTE)))))
            case patterns.AnySubpath():
                parts.append(opt(seq(lit("/"), star(anyof(http.PATH_BYTE)))))
            case patterns.AnyRest():
                parts.append(star(anyof(http.PATH_BYTE)))
    return seq(*parts)


def _condition_regex(cond: HostCondition | HeaderCondition) -> Re:
    if isinstance(cond, HostCondition):
        return http.field_with_value("host", http.host_value(cond.pattern))
    if cond.value is None:
        return http.field_line(lit_ci(cond.name))
    return http.field_with_value(cond.name, lit(cond.value.encode("latin-1")))


def lower(policy: Policy) -> MatcherIR:
    # Lowering allocates millions of small objects (position sets, DFA rows) and frees almost
    # none until it is done; the cyclic collector would walk them all again and again, which
    # doubles the time of a 10,000-rule policy.
    paused = gc.isenabled()
    gc.disable()
    try:
        return _lower(policy)
    finally:
        if paused:
            gc.enable()


def _lower(policy: Policy) -> MatcherIR:
    facts: dict[tuple, int] = {}
    names: list[str] = []

    def fact(key: tuple, name: str) -> int:
        if key not in facts:
            facts[key] = len(facts)
            names.append(name)
        return facts[key]

    # Facts the head scanner establishes (method sets, conditions), and each rule's class: the
    # facts it needs besides its path. Paths are matched by the path automaton (candidates.py).
    method_sets: dict[frozenset[str], int] = {}
    conditions: dict[tuple, tuple[int, Re]] = {}
    pattern_ids: dict[str, int] = {}
    rule_patterns: list[int] = []
    rule_needs: list[frozenset[int]] = []
    for rule in policy.rules:
        needed = set()
        if rule.methods.methods is not None:
            ms = frozenset(rule.methods.methods)
            f = fact(("method", ms), f"method in {{{','.join(sorted(ms))}}}")
            method_sets[ms] = f
            needed.add(f)
        for cond in rule.conditions:
            key = ("cond", str(cond))
            f = fact(key, str(cond))
            if key not in conditions:
                conditions[key] = (f, _condition_regex(cond))
            needed.add(f)
        if len(facts) > MAX_FACT_WORDS * 64:
            raise LoweringError(
                f"policy needs more than {MAX_FACT_WORDS * 64} distinct method sets and conditions",
                rule.index,
            )
        rule_patterns.append(pattern_ids.setdefault(rule.path.text, len(pattern_ids)))
        rule_needs.append(frozenset(needed))

    method_facts: dict[str, set[int]] = {}
    for ms, f in method_sets.items():
        for m in ms:
            method_facts.setdefault(m, set()).add(f)
    spec = ScannerSpec(
        method_facts={m: frozenset(fs) for m, fs in method_facts.items()},
        header_patterns=[(regex, f) for f, regex in conditions.values()],
    )
    path_patterns = [(glob_regex(text), pid) for text, pid in pattern_ids.items()]
    try:
        builder = LookupBuilder(rule_patterns, rule_needs)
        matcher = build_path_matcher(path_patterns, builder.outcome, PATH_STATE_LIMIT)
        lookup = builder.finish()
        scanner = build_scanner(spec)
    except LookupTooLarge as e:
        raise LoweringError(str(e)) from None
    except StateLimit as e:
        # Name the rules whose patterns (paths, or conditions for the header automaton) are in
        # most of the states: removing or narrowing them is what brings the count down.
        culprits: list[int] = []
        for tag in e.blame:
            if e.phase == "path":
                found = [i for i, pid in enumerate(rule_patterns) if pid == tag]
            elif isinstance(tag, tuple) and tag[0] == "fact":
                found = [i for i, need in enumerate(rule_needs) if tag[1] in need]
            else:
                found = []
            culprits += [i for i in found[:1] if i not in culprits]
        raise LoweringError(str(e), rules=tuple(culprits), code="E901") from None
    path_cands = [lookup.cand_word(out) for out in range(len(lookup.lists))]
    tables = pack(scanner, matcher, path_cands)
    entries = tuple(
        RuleEntry(
            rule.index,
            rule.action is not Action.DENY,
            log=rule.log,
            audit=rule.action is Action.AUDIT,
            answer=policy.answers().index(policy.rule_answer(rule)),
        )
        for rule in policy.rules
    )
    return MatcherIR(
        policy=policy,
        tables=tables,
        rules=entries,
        fact_words=max(1, (len(facts) + 63) // 64),
        fact_names=tuple(names),
        lookup=lookup,
        unreachable=tuple(builder.unreachable()),
    )


__all__ = ["LoweringError", "MatcherIR", "RuleEntry", "glob_regex", "lower"]
