"""Row displacement ("comb") packing of the path automaton into one array of tagged slots.

The path automaton of a 10,000-route policy has ~80,000 states over ~30 byte classes, but almost
every state has one or two transitions that matter: a trie node goes to one child and otherwise
to the dead state; a `*` state loops on every segment byte and leaves on `/`. A dense table would
take 80,000 x 32 x 4 bytes; this takes about 4 bytes per transition that matters.

Every state gets an *id* (a base offset into one u32 array of slots) and stores at `id + k`:

    k = 0       its default transition, unless that is the dead state         next id
    k = c + 1   its transition on class c (c < C), unless that is its default next id
    k = C + 1   its candidate word, if paths ending in it match a rule        index into `accepts`

each slot tagged with `k + 1` in its top 8 bits (0: a free slot). Ids are unique, so a slot
tagged `k + 1` at `id + k` can only be state `id`'s; C, the number of byte classes, is a policy
constant. The dead state's id is 0 (it has no slots: every class leads back to it). One step of
the kernel, whose class map gives k = c + 1 directly:

    e = slots[(id + k) & MASK]
    if e >> 24 == k + 1:  next = e & 0xFFFFFF
    else:
        d = slots[id & MASK]
        next = d & 0xFFFFFF  if d >> 24 == 1  else  0

The default at offset 0 and the dead state at 0 keep C and the dead state's id out of the
per-byte step: two constants fewer to keep in registers (BPF has ten) or reload from the stack.
After the path, `a = slots[(id + C + 1) & MASK]`, the word is `accepts[a & 0xFFFFFF]` if
`a >> 24 == C + 2`, else 0 (no candidate). At most three loads per byte, whatever the number of
states; memory is the slot array (padded to a power of two) and one word per accepting state.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

TAG_SHIFT = 24
PAYLOAD_MASK = (1 << TAG_SHIFT) - 1
DEAD_ID = 0  # the dead state's id, what a step without a slot for the byte leads to
MAX_CLASSES = 253  # tags are k + 1 <= C + 2 in 8 bits, 0 marks a free slot


class CombTooLarge(Exception):
    pass


@dataclass(frozen=True)
class Comb:
    ids: list[int]  # automaton state -> id
    slots: list[int]  # payload | (k + 1) << 24; 0 for a free slot; 2**slot_bits entries
    accepts: list[int]  # accept index -> candidate word; index 0 unused
    n_classes: int  # C
    slot_bits: int

    def _slot(self, state_id: int, k: int) -> int | None:
        e = self.slots[(state_id + k) & ((1 << self.slot_bits) - 1)]
        return e & PAYLOAD_MASK if e >> TAG_SHIFT == k + 1 else None

    def step(self, state_id: int, cls: int) -> int:
        nxt = self._slot(state_id, cls + 1)
        if nxt is None:
            nxt = self._slot(state_id, 0)
        return DEAD_ID if nxt is None else nxt

    def word(self, state_id: int) -> int:
        index = self._slot(state_id, self.n_classes + 1)
        return 0 if index is None else self.accepts[index]


def _bits(n: int) -> int:
    return max(1, (n - 1).bit_length())


def pack_comb(
    rows: Sequence[dict[int, int]], n_classes: int, dead: int, words: Sequence[int]
) -> Comb:
    """Pack a partial transition function: `rows[state]` maps a class to the next state, a
    missing class goes to `dead`; `words[state]` is each state's candidate word (0: none)."""
    if n_classes > MAX_CLASSES:
        raise CombTooLarge(f"more than {MAX_CLASSES} byte classes")
    accepts = [0]
    entries: list[list[tuple[int, int]]] = []  # per state: (k, payload before renumbering)
    half = n_classes // 2
    for s, row in enumerate(rows):
        if len(row) <= half:  # most classes go to the dead state: it is the default
            ex = sorted((c + 1, t) for c, t in row.items())
        else:
            counts = Counter(row.values())
            if len(row) < n_classes:
                counts[dead] += n_classes - len(row)
            default = counts.most_common(1)[0][0]
            ex = [
                (c + 1, row.get(c, dead)) for c in range(n_classes) if row.get(c, dead) != default
            ]
            if default != dead:
                ex.insert(0, (0, default))
        if words[s]:
            ex.append((n_classes + 1, -len(accepts)))  # negative: not a state to renumber
            accepts.append(words[s])
        entries.append(ex)
    assert not entries[dead], "the dead state has no slots: every class leads back to it"
    ids = _place([[k for k, _ in ex] for ex in entries], n_classes + 2, zero=dead)
    top = max(ids) + n_classes + 2
    slot_bits = _bits(top)
    if top > PAYLOAD_MASK:
        raise CombTooLarge(f"more than {PAYLOAD_MASK} path automaton slots")
    slots = [0] * (1 << slot_bits)
    for s, ex in enumerate(entries):
        base = ids[s]
        for k, payload in ex:
            slots[base + k] = (-payload if payload < 0 else ids[payload]) | (k + 1) << TAG_SHIFT
    assert ids[dead] == DEAD_ID, "the kernel's step falls back to 0, the dead state"
    return Comb(ids, slots, accepts, n_classes, slot_bits)


def _place(needs: list[list[int]], width: int, zero: int) -> list[int]:
    """Unique bases such that the slots `base + k` (k in needs[s]) of all states are disjoint.

    Rows with several slots go first, by first fit. Slots and bases are only ever taken, never
    freed, so a base found unfit for one set of offsets stays unfit: each set keeps a cursor
    that only moves forward; a new set starts near the top of the table rather than rescanning
    the full region below (its holes are left to single-slot rows, which fit any hole). Then
    single-slot rows fill the holes in order, and rows without slots take any free base. State
    `zero` (the dead state, which has none) takes base 0: the kernel's step falls back to 0."""
    n = len(needs)
    size = sum(len(ks) for ks in needs) + n + 2 * width + 64  # grows if needed
    used = bytearray(size)
    taken = bytearray(size)
    ids = [-1] * n
    ids[zero], taken[DEAD_ID] = DEAD_ID, 1
    cursors: dict[tuple[int, ...], int] = {}
    top = 0  # one past the highest used slot
    multi = sorted((s for s in range(n) if len(needs[s]) > 1), key=lambda s: -len(needs[s]))
    for s in multi:
        ks = tuple(needs[s])
        first, rest = ks[0], ks[1:]
        base = cursors.get(ks)
        if base is None:
            base = max(used.find(0), top - 4 * width) - first
        base = max(base, 0)
        while True:
            # Skip to where the first offset lands on a free slot (bytearray.find runs in C).
            found = used.find(0, base + first)
            if found < 0 or found + width >= len(used):
                used.extend(bytes(len(used)))
                taken.extend(bytes(len(taken)))
                continue
            base = found - first
            if not taken[base] and not any(used[base + k] for k in rest):
                break
            base += 1
        cursors[ks] = base + 1
        ids[s] = base
        taken[base] = 1
        for k in ks:
            used[base + k] = 1
        top = max(top, base + ks[-1] + 1)

    # Single-slot rows, grouped by offset; walk the free slots upwards and give each to a row
    # whose base (slot - offset) is still free.
    pending: dict[int, list[int]] = {}
    for s in range(n):
        if len(needs[s]) == 1:
            pending.setdefault(needs[s][0], []).append(s)
    slot = used.find(0)
    if slot < 0:
        slot = len(used)
        used.extend(bytes(len(used)))
        taken.extend(bytes(len(taken)))
    while pending:
        for k, rows in pending.items():
            if slot >= k and not taken[slot - k]:
                s = rows.pop()
                ids[s] = slot - k
                taken[slot - k] = used[slot] = 1
                if not rows:
                    del pending[k]
                break
        slot = used.find(0, slot + 1)
        if slot < 0 or slot + width >= len(used):
            slot = len(used) if slot < 0 else slot
            used.extend(bytes(len(used)))
            taken.extend(bytes(len(taken)))

    free = 0
    for s in range(n):
        if ids[s] < 0:
            free = taken.find(0, free)
            ids[s] = free
            taken[free] = 1
    return ids


__all__ = ["Comb", "CombTooLarge", "pack_comb"]
