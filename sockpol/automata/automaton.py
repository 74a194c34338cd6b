"""Byte-level regular expressions, position automata, subset construction and minimization.

The request scanner in the kernel is one deterministic automaton over bytes. Its pieces (method
token, path, header line) are written here as small regular expressions over byte sets, each with
a *tag* (which pattern matched), and determinized together. Byte sets are Python ints used as
256-bit masks, so set algebra is a single operation.

Why a position (Glushkov) automaton rather than Thompson's: it has no epsilon edges, so a DFA state
is just the set of byte positions that may come next, and a policy's thousands of literal route
prefixes become a trie-shaped DFA at a cost linear in their length. Subset construction works on
*byte classes* (bytes no pattern tells apart), never on single bytes, and Hopcroft's partition
refinement then merges states no future input tells apart. Both work on partial automata: a
missing transition is an implicit dead state that is never materialized, so a DFA of 100,000
trie states with two live edges each costs 200,000 edges, not 100,000 x classes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass

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
    """Marks the states reached by consuming `inner`'s last byte with `mark` (see DFA.marks)."""

    inner: Set
    mark: Hashable


@dataclass(frozen=True)
class Str(Re):
    """A literal byte string: what a `Seq` of one-byte `Set`s means, without an object per byte
    (policies have hundreds of thousands of literal path bytes)."""

    data: bytes


EMPTY = Seq(())


def lit(text: bytes | str) -> Re:
    if isinstance(text, str):
        text = text.encode("latin-1")
    return Str(text)


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


# --- position automaton ---------------------------------------------------------------------


class _Positions:
    """The Glushkov automaton of a set of tagged regexes.

    Position 0 is the start; every other position is one `Set` node of some regex, i.e. "the byte
    just consumed matched this set here". `follow[p]` holds the positions that may come next.
    """

    def __init__(self) -> None:
        self.mask: list[int] = [0]
        self.mark: list[Hashable | None] = [None]
        self.follow: list[set[int]] = [set()]
        self.tags: list[set[Hashable]] = [set()]
        # The pattern that first needed each position: what a state-limit error blames.
        self.owner: list[Hashable] = [None]
        self._owner: Hashable = None

    def add_all(self, patterns: Iterable[tuple[Re, Hashable]]) -> None:
        """Add every pattern, sharing common leading atoms (bytes, wildcards) in a trie.

        The union of thousands of routes then has one position per distinct prefix rather than
        one per pattern byte, so the DFA states along shared prefixes are single positions."""
        root: _TrieNode = ({}, [], None)
        for regex, tag in patterns:
            node = root
            for atom in _atoms(regex):
                child = node[0].get(atom)
                if child is None:
                    child = node[0][atom] = ({}, [], tag)
                node = child
            node[1].append(tag)
        stack: list[tuple[_TrieNode, list[int]]] = [(root, [0])]
        while stack:
            (children, tags, _), preds = stack.pop()
            for tag in tags:
                for p in preds:
                    self.tags[p].add(tag)
            for atom, child in children.items():
                self._owner = child[2]
                if isinstance(atom, int):
                    q = self._position(1 << atom, None)
                    for p in preds:
                        self.follow[p].add(q)
                    stack.append((child, [q]))
                else:
                    nullable, first, last = self._build(atom)
                    for p in preds:
                        self.follow[p].update(first)
                    stack.append((child, last + preds if nullable else last))

    def _position(self, mask: int, mark: Hashable | None) -> int:
        self.mask.append(mask)
        self.mark.append(mark)
        self.follow.append(set())
        self.tags.append(set())
        self.owner.append(self._owner)
        return len(self.mask) - 1

    def _build(self, r: Re) -> tuple[bool, list[int], list[int]]:
        """(nullable, first positions, last positions) of `r`, adding its follow edges."""
        if isinstance(r, Set):
            p = self._position(r.mask, None)
            return False, [p], [p]
        if isinstance(r, Mark):
            p = self._position(r.inner.mask, r.mark)
            return False, [p], [p]
        if isinstance(r, Str):
            if not r.data:
                return True, [], []
            ps = [self._position(1 << b, None) for b in r.data]
            for p, q in zip(ps, ps[1:]):  # noqa: B905 -- consecutive pairs
                self.follow[p].add(q)
            return False, ps[:1], ps[-1:]
        if isinstance(r, Seq):
            nullable, first, last = True, [], []
            for part in r.parts:
                n, f, lst = self._build(part)
                for p in last:
                    self.follow[p].update(f)
                if nullable:
                    first = first + f
                last = last + lst if n else lst
                nullable = nullable and n
            return nullable, first, last
        if isinstance(r, Alt):
            nullable, first, last = False, [], []
            for option in r.options:
                n, f, lst = self._build(option)
                nullable, first, last = nullable or n, first + f, last + lst
            return nullable, first, last
        if isinstance(r, Star):
            _, first, last = self._build(r.inner)
            for p in last:
                self.follow[p].update(first)
            return True, first, last
        raise TypeError(f"not a regex node: {r!r}")


_TrieNode = tuple[dict[object, "_TrieNode"], list[Hashable], Hashable]  # children, tags, owner


def _atoms(r: Re) -> Iterable[int | Re]:
    """`r` as a sequence of trie keys: a literal byte as an int, anything else as itself."""
    if isinstance(r, Seq):
        for part in r.parts:
            yield from _atoms(part)
    elif isinstance(r, Str):
        yield from r.data
    elif isinstance(r, Set) and r.mask and r.mask & (r.mask - 1) == 0:
        yield r.mask.bit_length() - 1
    else:
        yield r


# --- DFA ----------------------------------------------------------------------------------------


class StateLimitExceeded(Exception):
    """More than `limit` states. `blame` ranks the patterns (by tag) whose positions occur in
    the most of the states built so far: the wildcards that multiply states are in nearly all of
    them, a literal route in a handful."""

    def __init__(self, limit: int, blame: list[tuple[Hashable, int]], states: int) -> None:
        super().__init__(limit)
        self.limit = limit
        self.blame = blame
        self.states = states


@dataclass
class DFA:
    """A partial DFA over byte classes: `delta[s]` maps a class to the next state; a class
    missing from it has no transition (the caller decides what that means: refuse, or "no rule
    can match any more")."""

    classmap: bytes  # byte -> class
    delta: list[dict[int, int]]
    tags: list[frozenset[Hashable]]
    marks: list[frozenset[Hashable]]
    start: int = 0

    @property
    def n_classes(self) -> int:
        return max(self.classmap) + 1

    def next(self, state: int, byte: int) -> int | None:
        return self.delta[state].get(self.classmap[byte])

    def run(self, data: bytes, state: int | None = None) -> int | None:
        s: int | None = self.start if state is None else state
        for b in data:
            s = self.delta[s].get(self.classmap[b])
            if s is None:
                return None
        return s

    def row(self, state: int, missing: int, ids: Sequence[int] | None = None) -> list[int]:
        """The 256 successors of `state` (renumbered through `ids`), `missing` where there is
        no transition."""
        per_class = [missing] * self.n_classes
        for c, t in self.delta[state].items():
            per_class[c] = t if ids is None else ids[t]
        return [per_class[c] for c in self.classmap]


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


def determinize(patterns: Iterable[tuple[Re, Hashable]], limit: int = 50_000) -> DFA:
    """Subset construction of the union of tagged regexes over byte classes.

    A DFA state's tags are the tags of every regex that matches the bytes leading to it; its marks
    those of the `Mark` positions just consumed. Raises StateLimitExceeded past `limit` states.
    """
    pos = _Positions()
    pos.add_all(patterns)
    classes = sorted(byte_classes(set(pos.mask[1:])), key=lambda c: (c & -c).bit_length())
    classmap = bytearray(256)
    for ci, c in enumerate(classes):
        for b in members(c):
            classmap[b] = ci
    mask_classes = {m: tuple(ci for ci, c in enumerate(classes) if c & m) for m in set(pos.mask)}
    # Each position's successors grouped by their byte set: a DFA state then unions a few
    # frozensets per distinct set instead of looking at every successor for every class.
    grouped: list[list[tuple[int, frozenset[int]]]] = []
    for follow in pos.follow:
        by_mask: dict[int, set[int]] = {}
        for q in follow:
            by_mask.setdefault(pos.mask[q], set()).add(q)
        grouped.append([(m, frozenset(qs)) for m, qs in by_mask.items()])

    first = frozenset([0])
    index: dict[frozenset[int], int] = {first: 0}
    order = [first]
    delta: list[dict[int, int]] = []
    i = 0
    while i < len(order):
        state = order[i]
        if len(state) == 1:
            (p,) = state
            moves = grouped[p]
        else:
            acc: dict[int, set[int]] = {}
            for p in state:
                for m, qs in grouped[p]:
                    got = acc.get(m)
                    if got is None:
                        acc[m] = set(qs)
                    else:
                        got |= qs
            moves = list(acc.items())
        row: dict[int, int] = {}
        if len(moves) == 1:
            ((m, qs),) = moves
            target = frozenset(qs)
            j = index.get(target)
            if j is None:
                j = index[target] = len(order)
                order.append(target)
            for ci in mask_classes[m]:
                row[ci] = j
        elif moves:
            # Classes reached through the same byte sets reach the same positions.
            per_class: dict[int, list[int]] = {}
            for k, (m, _) in enumerate(moves):
                for ci in mask_classes[m]:
                    per_class.setdefault(ci, []).append(k)
            targets: dict[tuple[int, ...], int] = {}
            for ci, ks in per_class.items():
                key = tuple(ks)
                j = targets.get(key)
                if j is None:
                    if len(ks) == 1:
                        target = frozenset(moves[ks[0]][1])
                    else:
                        target = frozenset().union(*(moves[k][1] for k in ks))
                    j = index.get(target)
                    if j is None:
                        j = index[target] = len(order)
                        order.append(target)
                    targets[key] = j
                row[ci] = j
        if len(order) > limit:
            raise StateLimitExceeded(limit, _blame(pos, order), len(order))
        delta.append(row)
        i += 1
    tags = [_union(pos.tags, st) for st in order]
    marks = [frozenset(m for p in st if (m := pos.mark[p]) is not None) for st in order]
    return DFA(bytes(classmap), delta, tags, marks)


def _blame(pos: _Positions, states: list[frozenset[int]]) -> list[tuple[Hashable, int]]:
    counts: Counter[Hashable] = Counter()
    for st in states:
        counts.update({pos.owner[p] for p in st} - {None})
    return counts.most_common()


def by_byte(dfa: DFA) -> DFA:
    """The same DFA with one class per byte."""
    members_of = [[b for b in range(256) if dfa.classmap[b] == c] for c in range(dfa.n_classes)]
    delta = [{b: t for c, t in row.items() for b in members_of[c]} for row in dfa.delta]
    return DFA(bytes(range(256)), delta, dfa.tags, dfa.marks, dfa.start)


def _union(sets: list[set[Hashable]], members_: frozenset[int]) -> frozenset[Hashable]:
    found = [sets[p] for p in members_ if sets[p]]
    if not found:
        return frozenset()
    return frozenset(found[0]) if len(found) == 1 else frozenset().union(*found)


# --- minimization -------------------------------------------------------------------------------


def trim(dfa: DFA, live: Callable[[int], bool]) -> tuple[DFA, list[int]]:
    """Drop every state from which no `live` state can be reached (they mean what a missing
    transition means). The start state is kept even if it is dead. Returns the trimmed DFA and
    old state -> new (-1: dropped)."""
    preds: list[list[int]] = [[] for _ in dfa.delta]
    for s, row in enumerate(dfa.delta):
        for t in set(row.values()):
            preds[t].append(s)
    keep = [False] * len(dfa.delta)
    todo = [s for s in range(len(dfa.delta)) if live(s)]
    for s in todo:
        keep[s] = True
    while todo:
        t = todo.pop()
        for s in preds[t]:
            if not keep[s]:
                keep[s] = True
                todo.append(s)
    keep[dfa.start] = True
    new_id: list[int] = []
    n = 0
    for k in keep:
        new_id.append(n if k else -1)
        n += k
    delta = [
        {c: new_id[t] for c, t in row.items() if keep[t]}
        for s, row in enumerate(dfa.delta)
        if keep[s]
    ]
    tags = [t for s, t in enumerate(dfa.tags) if keep[s]]
    marks = [m for s, m in enumerate(dfa.marks) if keep[s]]
    return DFA(dfa.classmap, delta, tags, marks, new_id[dfa.start]), new_id


def minimize(dfa: DFA, key: Callable[[int], Hashable]) -> tuple[DFA, list[int]]:
    """Hopcroft's partition refinement: merge the states that `key` (everything the caller reads
    of a state) and every future input agree on. Returns the minimal DFA and old state -> new.

    Missing transitions go to an implicit dead state that stays a block of its own and is never
    used as a splitter, which is Hopcroft's "all blocks but one" rule with the dead block as the
    one left out; so only real edges are ever walked. This is sound only if no real state means
    what the dead state means: `trim` the DFA first when that can happen.
    """
    n = len(dfa.delta)
    blocks: list[set[int]] = []
    block_of = [0] * n
    first_block: dict[Hashable, int] = {}
    for s in range(n):
        b = first_block.setdefault(key(s), len(blocks))
        if b == len(blocks):
            blocks.append(set())
        blocks[b].add(s)
        block_of[s] = b
    inverse: list[dict[int, list[int]]] = [{} for _ in range(n)]
    for s, row in enumerate(dfa.delta):
        for c, t in row.items():
            inverse[t].setdefault(c, []).append(s)

    pending = list(range(len(blocks)))
    while pending:
        a = pending.pop()
        by_class: dict[int, list[int]] = {}
        for t in list(blocks[a]):
            for c, sources in inverse[t].items():
                got = by_class.get(c)
                if got is None:
                    by_class[c] = list(sources)
                else:
                    got.extend(sources)
        for sources in by_class.values():
            hit: dict[int, list[int]] = {}
            for s in sources:
                b = block_of[s]
                got = hit.get(b)
                if got is None:
                    hit[b] = [s]
                else:
                    got.append(s)
            for b, inside in hit.items():
                whole = blocks[b]
                if len(inside) == len(whole):
                    continue
                # The smaller half moves to a new block; it alone needs queueing unless the
                # old block is queued anyway (then both halves are).
                if 2 * len(inside) <= len(whole):
                    moved = set(inside)
                    whole -= moved
                else:
                    moved = whole.difference(inside)
                    blocks[b] = set(inside)
                new = len(blocks)
                blocks.append(moved)
                for s in moved:
                    block_of[s] = new
                pending.append(new)

    # Renumber blocks in first-visit order from the start so the start is state 0.
    order: dict[int, int] = {}
    todo = [block_of[dfa.start]]
    order[todo[0]] = 0
    while todo:
        b = todo.pop()
        rep = next(iter(blocks[b]))
        for t in dfa.delta[rep].values():
            if block_of[t] not in order:
                order[block_of[t]] = len(order)
                todo.append(block_of[t])
    reps = [0] * len(order)
    for b, new in order.items():
        reps[new] = next(iter(blocks[b]))
    delta = [{c: order[block_of[t]] for c, t in dfa.delta[r].items()} for r in reps]
    mapping = [order.get(block_of[s], -1) for s in range(n)]
    tags = [dfa.tags[r] for r in reps]
    marks = [dfa.marks[r] for r in reps]
    return DFA(dfa.classmap, delta, tags, marks, 0), mapping
