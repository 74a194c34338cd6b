"""Byte-level regular expressions, Thompson NFAs and subset construction.

The request scanner in the kernel is one deterministic automaton over bytes. Its pieces (method
token, path, header line) are written here as small regular expressions over byte sets, turned into
NFAs whose accepting states carry *tags* (which pattern matched), and determinized. Byte sets are
Python ints used as 256-bit masks, so set algebra is a single operation.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

ALL_BYTES = (1 << 256) - 1


def byteset(chars: bytes | str | Iterable[int]) -> int:
    if isinstance(chars, str):
        chars = chars.encode("latin-1")
    mask = 0
    for c in chars:
        mask |= 1 << c
    return mask


def byte_range(low: str, high: str) -> int:
    return byteset(range(ord(low), ord(high) + 1))


def members(mask: int) -> list[int]:
    return [b for b in range(256) if mask >> b & 1]


# --- regular expressions over bytes -------------------------------------------------------------


@dataclass(frozen=True)
class Re:
    pass


@dataclass(frozen=True)
class Set(Re):
    mask: int


@dataclass(frozen=True)
class Seq(Re):
    parts: tuple[Re, ...]


@dataclass(frozen=True)
class Alt(Re):
    options: tuple[Re, ...]


@dataclass(frozen=True)
class Star(Re):
    inner: Re


@dataclass(frozen=True)
class Mark(Re):
    """Marks the states reached by consuming `inner`'s last byte with `mark` (see NFA.marks)."""

    inner: Set
    mark: Hashable


EMPTY = Seq(())


def lit(text: bytes | str) -> Re:
    if isinstance(text, str):
        text = text.encode("latin-1")
    return Seq(tuple(Set(1 << b) for b in text))


def lit_ci(text: bytes | str) -> Re:
    """Literal matched ASCII-case-insensitively."""
    if isinstance(text, str):
        text = text.encode("latin-1")
    return Seq(tuple(Set(byteset(bytes([b]).lower() + bytes([b]).upper())) for b in text))


def seq(*parts: Re) -> Re:
    return Seq(tuple(parts))


def alt(*options: Re) -> Re:
    return Alt(tuple(options))


def star(inner: Re) -> Re:
    return Star(inner)


def plus(inner: Re) -> Re:
    return seq(inner, star(inner))


def opt(inner: Re) -> Re:
    return alt(inner, EMPTY)


def anyof(mask: int) -> Re:
    return Set(mask)


# --- NFA ----------------------------------------------------------------------------------------


@dataclass
class NFA:
    edges: list[list[tuple[int, int]]] = field(default_factory=list)  # (byte mask, target)
    eps: list[list[int]] = field(default_factory=list)
    tags: list[set[Hashable]] = field(default_factory=list)  # tags of accepting states
    marks: list[set[Hashable]] = field(default_factory=list)

    def state(self) -> int:
        self.edges.append([])
        self.eps.append([])
        self.tags.append(set())
        self.marks.append(set())
        return len(self.edges) - 1

    def add(self, regex: Re, tag: Hashable, start: int) -> None:
        """Add `regex` from `start`; its accepting state gets `tag`."""
        end = self._build(regex, start)
        self.tags[end].add(tag)

    def _build(self, r: Re, start: int) -> int:
        if isinstance(r, Set):
            end = self.state()
            self.edges[start].append((r.mask, end))
            return end
        if isinstance(r, Mark):
            end = self._build(r.inner, start)
            self.marks[end].add(r.mark)
            return end
        if isinstance(r, Seq):
            cur = start
            for part in r.parts:
                cur = self._build(part, cur)
            return cur
        if isinstance(r, Alt):
            end = self.state()
            for option in r.options:
                s = self.state()
                self.eps[start].append(s)
                self.eps[self._build(option, s)].append(end)
            return end
        if isinstance(r, Star):
            loop = self.state()
            self.eps[start].append(loop)
            self.eps[self._build(r.inner, loop)].append(loop)
            end = self.state()
            self.eps[loop].append(end)
            return end
        raise TypeError(f"not a regex node: {r!r}")

    def closure(self, states: Iterable[int]) -> frozenset[int]:
        seen = set(states)
        todo = list(seen)
        while todo:
            s = todo.pop()
            for t in self.eps[s]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(seen)


# --- DFA ----------------------------------------------------------------------------------------


class StateLimitExceeded(Exception):
    pass


@dataclass
class DFA:
    """`delta[s]` maps a byte to the next state (missing: no transition)."""

    delta: list[dict[int, int]]
    tags: list[frozenset[Hashable]]
    marks: list[frozenset[Hashable]]
    start: int = 0

    def run(self, data: bytes, state: int | None = None) -> int | None:
        s = self.start if state is None else state
        for b in data:
            nxt = self.delta[s].get(b)
            if nxt is None:
                return None
            s = nxt
        return s


def byte_classes(masks: Iterable[int]) -> list[int]:
    """Partition 0..255 into classes no mask distinguishes (refinement of all masks)."""
    classes = [ALL_BYTES]
    for m in set(masks):
        refined = []
        for c in classes:
            inside, outside = c & m, c & ~m
            refined.extend(x for x in (inside, outside) if x)
        classes = refined
    return classes


def determinize(nfa: NFA, start: int, limit: int = 50_000) -> DFA:
    """Subset construction over byte classes; raises StateLimitExceeded past `limit` states."""
    classes = byte_classes(m for edges in nfa.edges for m, _ in edges)
    class_members = [members(c) for c in classes]
    closures = _closures(nfa)
    # For every NFA state, the closed target set per byte class, computed once.
    moves: list[dict[int, frozenset[int]]] = []
    for edges in nfa.edges:
        per_class: dict[int, set[int]] = {}
        for mask, target in edges:
            for ci, c in enumerate(classes):
                if c & mask:
                    per_class.setdefault(ci, set()).update(closures[target])
        moves.append({ci: frozenset(ts) for ci, ts in per_class.items()})
    first = closures[start]
    index = {first: 0}
    order = [first]
    delta: list[dict[int, int]] = []
    i = 0
    while i < len(order):
        step: dict[int, set[int]] = {}
        for s in order[i]:
            for ci, targets in moves[s].items():
                acc = step.get(ci)
                if acc is None:
                    step[ci] = set(targets)
                else:
                    acc |= targets
        row: dict[int, int] = {}
        for ci, targets in step.items():
            nxt = frozenset(targets)
            j = index.get(nxt)
            if j is None:
                if len(order) >= limit:
                    raise StateLimitExceeded(limit)
                j = index[nxt] = len(order)
                order.append(nxt)
            for b in class_members[ci]:
                row[b] = j
        delta.append(row)
        i += 1
    tags = [frozenset(t for s in st for t in nfa.tags[s]) for st in order]
    marks = [frozenset(m for s in st for m in nfa.marks[s]) for st in order]
    return DFA(delta, tags, marks)


def _closures(nfa: NFA) -> list[frozenset[int]]:
    """Epsilon closure of every state (NFAs here are small enough to precompute all)."""
    return [nfa.closure([s]) for s in range(len(nfa.edges))]
