"""First-match rule lookup whose cost does not grow with the number of rules.

A rule holds when its path matches and its *class* holds: the conjunction of its other facts
(method set, host and header conditions). Policies have thousands of routes but few classes:
`GET,HEAD`, `POST if header content-type = "application/json"`, `*`, ...

The path automaton is one DFA for every rule's path. Each of its states knows the set T of path
patterns a path ending there matches, hence the rules whose path matches, in source order. Of
those only a few can ever be the first match: a rule whose class needs a superset of what an
earlier candidate's class needs is shadowed by it (whenever it holds, the earlier one holds), and
nothing after a rule of the empty class (no condition, any method) is ever reached. What remains
is the state's *candidate list*: at most one rule per class, ending at the first unconditional
one. The kernel walks the list of the state the path ended in and takes the first candidate whose
class holds; the walk is bounded by the number of classes, not of rules.

Candidate lists are also the state's output for minimization, so two states whose matched
pattern sets differ but that decide alike are merged.

Table layout (what the kernel reads):

    cands[state]  u32  offset | length << CAND_LENGTH_SHIFT   (into `table`; 0 for no candidate)
    table[k]      u32  rule | class << 16
    need[class]   fact words: the facts the class needs (method set, conditions)

A rule that is in no candidate list can never decide a request: either its path matches no
(canonical) path at all, or earlier rules decide every request it would match. `unreachable`
says which, with the earlier rules responsible.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

CAND_LENGTH_SHIFT = 20
MAX_TABLE = 1 << CAND_LENGTH_SHIFT  # entries of the flat candidate table
MAX_LIST = (1 << (32 - CAND_LENGTH_SHIFT)) - 1  # candidates in one list
MAX_RULES = 1 << 16  # a rule index takes 16 bits of a table entry
MAX_CLASSES = 1 << 16


class LookupTooLarge(Exception):
    pass


@dataclass(frozen=True)
class Unreachable:
    """A rule that never decides: `by` lists earlier rules that decide its requests (empty when
    its path matches no request path)."""

    rule: int
    by: tuple[int, ...]


@dataclass(frozen=True)
class RuleLookup:
    classes: tuple[frozenset[int], ...]  # class -> facts it needs
    lists: tuple[tuple[int, ...], ...]  # output index -> candidate rules (0: none)
    offsets: tuple[int, ...]  # output index -> offset of its list in `table`
    table: tuple[int, ...]  # rule | class << 16

    def cand_word(self, output: int) -> int:
        """The per-state word for a path state with this output."""
        if output == 0:
            return 0
        return self.offsets[output] | len(self.lists[output]) << CAND_LENGTH_SHIFT

    @property
    def longest(self) -> int:
        """Most candidates the kernel may look at for one request."""
        return max((len(x) for x in self.lists), default=0)


class LookupBuilder:
    """Turns matched-pattern sets into candidate lists while the path DFA is built."""

    def __init__(self, rule_patterns: Sequence[int], rule_needs: Sequence[frozenset[int]]) -> None:
        if len(rule_patterns) > MAX_RULES:
            raise LookupTooLarge(f"more than {MAX_RULES} rules")
        self.rule_patterns = list(rule_patterns)
        self.classes: list[frozenset[int]] = []
        index: dict[frozenset[int], int] = {}
        self.rule_class: list[int] = []
        for need in rule_needs:
            self.rule_class.append(index.setdefault(need, len(index)))
            if len(index) > len(self.classes):
                self.classes.append(need)
        if len(self.classes) > MAX_CLASSES:
            raise LookupTooLarge(f"more than {MAX_CLASSES} distinct rule classes")
        self.rules_of: dict[int, list[int]] = {}
        for rule, pattern in enumerate(self.rule_patterns):
            self.rules_of.setdefault(pattern, []).append(rule)
        self.lists: list[tuple[int, ...]] = [()]
        self._list_index: dict[tuple[int, ...], int] = {(): 0}
        self.pattern_sets: list[frozenset[int]] = []  # every matched-pattern set seen

    def candidates(self, patterns: frozenset[int]) -> tuple[int, ...]:
        rules = heapq.merge(*(self.rules_of[p] for p in patterns))
        kept: list[int] = []
        needs: list[frozenset[int]] = []
        for rule in rules:
            need = self.classes[self.rule_class[rule]]
            if any(earlier <= need for earlier in needs):
                continue
            kept.append(rule)
            needs.append(need)
            if not need:
                break
        return tuple(kept)

    def outcome(self, patterns: frozenset[int]) -> int:
        """The output index of a path DFA state whose paths match `patterns`."""
        if not patterns:
            return 0
        self.pattern_sets.append(patterns)
        found = self.candidates(patterns)
        out = self._list_index.get(found)
        if out is None:
            out = self._list_index[found] = len(self.lists)
            self.lists.append(found)
            if len(found) > MAX_LIST:
                raise LookupTooLarge(f"a path has more than {MAX_LIST} candidate rules")
        return out

    def finish(self) -> RuleLookup:
        offsets, table = [0], []
        for found in self.lists[1:]:
            offsets.append(len(table))
            table += [rule | self.rule_class[rule] << 16 for rule in found]
        if len(table) > MAX_TABLE:
            raise LookupTooLarge(f"more than {MAX_TABLE} candidate entries")
        return RuleLookup(
            tuple(self.classes),
            tuple(self.lists),
            tuple(offsets),
            tuple(table),
        )

    def unreachable(self) -> list[Unreachable]:
        """Rules in no candidate list, each with the earlier rules that decide its requests
        (in every state where its path matches, the first candidate whose class it implies)."""
        listed = {rule for found in self.lists for rule in found}
        if len(listed) == len(self.rule_patterns):
            return []
        # Each pattern's sets, and each set's candidates, once: a rule after a catch-all is in
        # every set, and walking all sets for each of thousands of such rules was quadratic.
        sets_with: dict[int, list[frozenset[int]]] = {}
        for patterns in self.pattern_sets:
            for p in patterns:
                sets_with.setdefault(p, []).append(patterns)
        found_in: dict[frozenset[int], tuple[int, ...]] = {}
        out = []
        for rule, pattern in enumerate(self.rule_patterns):
            if rule in listed:
                continue
            need = self.classes[self.rule_class[rule]]
            by: set[int] = set()
            for patterns in sets_with.get(pattern, ()):
                if patterns not in found_in:
                    found_in[patterns] = self.candidates(patterns)
                by.add(
                    next(k for k in found_in[patterns] if self.classes[self.rule_class[k]] <= need)
                )
            out.append(Unreachable(rule, tuple(sorted(by))))
        return out


__all__ = [
    "CAND_LENGTH_SHIFT",
    "LookupBuilder",
    "LookupTooLarge",
    "RuleLookup",
    "Unreachable",
]
