"""Literal runs: the bytes almost every request head has in the same place (` HTTP/1.1\\r\\n`
after the target, `User-Agent: ` and `Accept: ` at the start of a line), taken eight and
sixteen bytes at a time instead of byte by byte.

Byte by byte, each byte of the head is a dependent load (the next state's row) and, for a head
the program has not seen for a while, a cache line of its own (docs/design.md, "The cost of a
request"). A literal is a string that, from a scanner state, moves only through plain states
(no facts, no flags, not the path, not terminal): then taking it whole is exactly taking its
bytes one by one, and the program can compare it as two words against the head and jump to
the state at its end.

The table: `LITERAL_SLOTS` entries of eight words, found by a multiplicative hash of the state
and the first eight bytes at the position (so a literal is eight bytes at least; a method,
four: below): `[w1, m1, w2, m2, state, target, length, facts]`; a hit when the head's two words
masked with m1 and m2 are w1 and w2 and the entry's state is the current one. An empty entry's
state is all ones (no state). The multiplier is the policy's (the table `lit_mul`): the first of
`MULTIPLIERS` under which no two literals share an entry, else the one that keeps the most
methods and versions, then the most literals (a literal that collides is left out, the later
in the order of `literal_table`: it is only ever an optimization).

Where the program tries them (judge.scan_step): where the chunk moves into a state that has
literals (its `trans` entry carries tables.LITERAL_BIT), it looks up the bytes after: a miss goes
on with the chunk, a hit stores the literal's end and ends the call, and the next call tries
another from there first (` HTTP/1.1\\r\\n`, then a header name). The path chunk ends at the
SP after the path, and the next call tries the version. Which states have literals is the
compiler's choice, from `CORPUS`: the states after a request target's SP and the states at the
start of a typical head's header lines (`starting_states`); a state where no literal of the
corpus fits is not marked, and costs nothing.

Path words: the call that took a method tries one more literal from the state after its SP, and
there the table holds the first eight bytes of the request targets the policy's rules spell
(`/api/v1/`, `/healthz`, `/static/`: `_path_words`). A path word moves the scanner through path
states only, and the path automaton along its own transitions, so taking it whole is taking its
bytes one by one in the path chunk: its entry carries the path automaton's state after it (word
7, above PATH_STATE_SHIFT, with PATH_WORD), and a hit also copies the eight bytes to the path.
Since the section memo (step 19 in docs/design.md) the path is most of what a kept-alive
connection's head costs, and most paths start with a prefix that every rule of an API repeats.

Methods: the first call of a run tries the literals of the head's start state, the request
methods with their SP (`GET `). Their last byte leads to a state with facts (the method's), so
an entry carries the fact set of its end (word 7, 0 for the others: the empty set), which a hit
adds. They are keyed by their first four bytes (standard methods differ there; `GET ` has no
more), so the start state's key is the first word masked to four bytes: `key_word`. The chunk
never tries them: the bit that tells it a state has literals is left off the start state.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from sockpol.codegen.scanner import EMIT_MASK, TERMINAL_STATES, ScannerTables
from sockpol.dsl import regex
from sockpol.dsl.patterns import Literal as GlobLiteral
from sockpol.dsl.patterns import PatternError, parse_pattern

LITERAL_BYTES = 16  # two words
LITERAL_MIN = 8  # the hash reads the first word whole
LITERAL_BITS = 8
LITERAL_SLOTS = 1 << LITERAL_BITS
ENTRY_WORDS = 8
NO_STATE = (1 << 64) - 1
# Word 7 of a version's entry that ends the request line (` HTTP/1.1\r\n` whole): the header
# section starts there, where the sk_msg program looks up the connection's remembered section
# (judge.JudgeCore.memo_section). Above any fact set's index: Fn.or_factset masks it off.
SECTION_MARK = 1 << 31
# Word 7 of a path word's entry: PATH_WORD, and the path automaton's state after the word (a comb
# id, 24 bits) from PATH_STATE_SHIFT on. Below SECTION_MARK and above any fact set's index.
PATH_WORD = 1 << 30
PATH_STATE_SHIFT = 32
PATH_WORD_BYTES = 8
PATH_WORDS_PER_STATE = 16  # per method's state: a policy of many first segments keeps the first
MASK64 = (1 << 64) - 1
STATE_MIX = 0x9E3779B97F4A7C15  # spreads the state over the key's bits


def _multipliers(n: int) -> tuple[int, ...]:
    """n odd 64-bit multipliers, the same on every machine (splitmix64's sequence): the hash's
    candidates, tried in order."""
    out, x = [], 0
    for _ in range(n):
        x = (x + 0x9E3779B97F4A7C15) & MASK64
        z = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & MASK64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & MASK64
        out.append((z ^ (z >> 31)) | 1)
    return tuple(out)


# 64 candidates: with the path words, a table of 50 to 60 literals in 256 entries rarely has a
# multiplier without a collision among eight.
MULTIPLIERS = _multipliers(64)

# After a request target's SP, the version and the line's end.
REQUEST_TAILS = ("HTTP/1.1\r\n", "HTTP/1.0\r\n")
# At the start of a header line: the names clients send most, as browsers, curl, wrk, Go,
# Python and Java spell them, then lower-case as Node's fetch and HTTP/2 gateways do. A name is
# tried with ": " after it; only the bytes up to the first state that is not plain count.
HEADER_NAMES = (
    "User-Agent", "Accept", "Accept-Encoding", "Accept-Language", "Connection",
    "Content-Type", "Content-Length", "Cookie", "Referer", "Origin", "Authorization",
    "Cache-Control", "Upgrade-Insecure-Requests", "If-None-Match", "If-Modified-Since",
    "X-Forwarded-For", "X-Forwarded-Proto", "X-Request-Id", "Sec-Fetch-Site", "Sec-Fetch-Mode",
    "Sec-Fetch-Dest", "Sec-Fetch-User", "Pragma", "Priority", "Keep-Alive",
    "user-agent", "accept", "accept-encoding", "accept-language", "connection",
    "content-type", "content-length", "authorization",
)  # fmt: skip
# At a head's start: the methods, with the SP after them (a method's literal ends in the state
# that carries its facts).
METHODS = ("GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS")
METHOD_KEY_BYTES = 4
METHOD_MIN = 4  # `GET `, `PUT `
CORPUS = {
    "methods": tuple(f"{m} " for m in METHODS),
    "tails": REQUEST_TAILS,
    "lines": tuple(f"{n}: " for n in HEADER_NAMES),
}


@dataclass(frozen=True)
class Literal:
    state: int
    text: bytes  # LITERAL_MIN to LITERAL_BYTES bytes (a method's: METHOD_MIN)
    target: int
    facts: int = 0  # the fact set (its index) of the target: a method's
    section: bool = False  # a version with its CRLF: the header section starts at `target`
    path_to: int | None = None  # a path word: the path automaton's state (comb id) after it

    @property
    def mark(self) -> int:
        """Word 7 of its entry: the fact set, and what the program does besides."""
        word = self.facts | (SECTION_MARK if self.section else 0)
        if self.path_to is not None:
            word |= PATH_WORD | self.path_to << PATH_STATE_SHIFT
        return word

    def words(self) -> tuple[int, int, int, int]:
        """(w1, m1, w2, m2): the literal's two little-endian words and their masks."""
        padded = self.text.ljust(LITERAL_BYTES, b"\0")
        mask = bytes([0xFF] * len(self.text)).ljust(LITERAL_BYTES, b"\0")
        w = [int.from_bytes(padded[i : i + 8], "little") for i in (0, 8)]
        m = [int.from_bytes(mask[i : i + 8], "little") for i in (0, 8)]
        return w[0], m[0], w[1], m[1]


def slot_of(state: int, first_word: int, mul: int) -> int:
    """The entry of (state, the head's next eight bytes, or its key_word): judge.scan_step
    computes the same."""
    key = (first_word + state * STATE_MIX) & MASK64
    return ((key * mul) & MASK64) >> (64 - LITERAL_BITS)


def key_word(state: int, first_word: int, start: int) -> int:
    """The part of the head's first word that the hash reads: four bytes from the start
    state (methods), all eight elsewhere."""
    return first_word & ((1 << 8 * METHOD_KEY_BYTES) - 1) if state == start else first_word


@dataclass(frozen=True)
class LiteralTable:
    mul: int
    literals: tuple[Literal, ...]
    start: int  # the head's start state: its literals (methods) are keyed by four bytes

    @property
    def states(self) -> frozenset[int]:
        return frozenset(lit.state for lit in self.literals)

    @property
    def chunk_states(self) -> frozenset[int]:
        """The states whose `trans` entries tell the chunk to try literals: not the start
        state (its literals are tried by a run's first call, keyed otherwise), nor the states
        after a method's SP (they carry facts: the chunk does not take them; their path words
        are tried by the call that took the method)."""
        plain = frozenset(lit.state for lit in self.literals if lit.path_to is None)
        return plain - {self.start}

    def slot(self, lit: Literal) -> int:
        return slot_of(lit.state, key_word(lit.state, lit.words()[0], self.start), self.mul)

    def rows(self) -> list[int]:
        """The table's words, LITERAL_SLOTS entries of ENTRY_WORDS."""
        out = [0, 0, 0, 0, NO_STATE, 0, 0, 0] * LITERAL_SLOTS
        for lit in self.literals:
            w1, m1, w2, m2 = lit.words()
            at = self.slot(lit) * ENTRY_WORDS
            out[at : at + ENTRY_WORDS] = [
                w1, m1, w2, m2, lit.state, lit.target, len(lit.text), lit.mark,
            ]  # fmt: skip
        return out

    def take(self, state: int, head: bytes) -> tuple[int, int, int]:
        """(state, bytes taken, fact set added) after the literal at the start of `head`, as
        the program does one attempt: (state, 0, 0) when there is none."""
        if len(head) < LITERAL_BYTES:
            return state, 0, 0
        w1 = int.from_bytes(head[:8], "little")
        for lit in self.literals:
            if lit.state == state and head.startswith(lit.text):
                assert slot_of(state, key_word(state, w1, self.start), self.mul) == self.slot(lit)
                return lit.target, len(lit.text), lit.facts
        return state, 0, 0


def _walk(t: ScannerTables, plain: frozenset[int], state: int, text: bytes) -> Literal | None:
    """The longest prefix of `text` (LITERAL_BYTES at most) that moves through plain states only,
    if it is long enough to be a literal."""
    s, taken = state, 0
    for byte in text[:LITERAL_BYTES]:
        n = t.step(s, byte)
        if n not in plain:
            break
        s, taken = n, taken + 1
    return Literal(state, text[:taken], s) if taken >= LITERAL_MIN else None


def _walk_method(
    t: ScannerTables, plain: frozenset[int], state: int, text: bytes
) -> Literal | None:
    """A method and its SP, if every byte but the SP moves through plain states and the SP
    leads to a state whose only work is facts (the slow path would add them and do nothing
    else)."""
    s = state
    for byte in text[:-1]:
        s = t.step(s, byte)
        if s not in plain:
            return None
    s = t.step(s, text[-1])
    info = t.info[s]
    if s < TERMINAL_STATES or info & ~EMIT_MASK or not METHOD_MIN <= len(text) <= 8:
        return None
    return Literal(state, text, s, info & EMIT_MASK)


def target_prefixes(globs: Iterable[str]) -> list[bytes]:
    """The bytes every path a rule's glob matches starts with (up to its first wildcard), in
    rule order; a regex's are not looked for."""
    out: list[bytes] = []
    for text in globs:
        if regex.is_regex(text):
            continue
        try:
            tokens = parse_pattern(text).tokens
        except PatternError:
            continue
        if tokens and isinstance(tokens[0], GlobLiteral) and tokens[0].text.isascii():
            out.append(tokens[0].text.encode())
    return out


def _path_words(
    t: ScannerTables, path: frozenset[int], state: int, prefixes: Sequence[bytes]
) -> list[Literal]:
    """From `state` (after a method's SP), the first PATH_WORD_BYTES bytes of the rules' target
    prefixes, where the scanner moves through path states only; PATH_WORDS_PER_STATE at most,
    in rule order. Which words is only a guess at what clients send (the rules name it);
    whatever they are, taking one is exactly taking its bytes one by one."""
    found: list[Literal] = []
    for text in dict.fromkeys(p[:PATH_WORD_BYTES] for p in prefixes):
        if len(found) == PATH_WORDS_PER_STATE:
            break
        if len(text) < PATH_WORD_BYTES:
            continue
        s, pid = state, t.path.start
        for byte in text:
            s = t.step(s, byte)
            pid = t.path.step(pid, byte)
            if s not in path:
                break
        else:
            found.append(Literal(state, text, s, path_to=pid))
    return found


# A head as clients send them: the states at the start of its header lines are where header
# names are tried. (Other states after a LF, such as a chunked body's trailer lines or a request
# line after a stray CRLF, would take entries that ordinary heads never use.)
TYPICAL_HEAD = (
    b"GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: x\r\nAccept: */*\r\nConnection: close\r\n"
    b"Content-Type: a\r\nContent-Length: 0\r\nCookie: a=b\r\nX-A: b\r\n\r\n"
)


def starting_states(
    t: ScannerTables, plain: frozenset[int], path: frozenset[int]
) -> dict[str, list[int]]:
    """The states literals of each part of CORPUS are tried from, most useful first: the
    head's start, after the SP that ends a request target (from a path state), and at the
    starts of TYPICAL_HEAD's header lines."""
    tails: list[int] = []
    for s in sorted(path):
        n = t.step(s, ord(" "))
        if n in plain and n not in tails:
            tails.append(n)
    lines: list[int] = []
    s = t.start
    for byte in TYPICAL_HEAD[:-2]:  # not the blank line's CRLF: it ends the head
        s = t.step(s, byte)
        if s < TERMINAL_STATES:
            break
        if byte == ord("\n") and s in plain and s not in lines:
            lines.append(s)
    return {"methods": [t.start], "tails": tails, "lines": lines}


def literal_table(
    t: ScannerTables,
    plain: frozenset[int],
    path: frozenset[int],
    prefixes: Sequence[bytes] = (),
) -> LiteralTable:
    """The scanner's literals (CORPUS where it fits, and path words of `prefixes`:
    target_prefixes) and a multiplier that gives each its own entry. `plain`: the states a byte
    may lead to and do nothing else (tables.state_kinds: PLAIN, not PATH); `path`: the path's
    states."""
    found: list[Literal] = []
    # One literal per state and key: the hash reads only the first word (four bytes of it from
    # the start state), so of `Content-Type: ` and `Content-Length`, the first in CORPUS has
    # the entry.
    seen: set[tuple[int, bytes]] = set()
    every_head: set[int] = set()  # which of `found` are methods and tails (every request has both)

    def add(lit: Literal, every: bool) -> None:
        key = lit.text[: METHOD_KEY_BYTES if lit.state == t.start else 8]
        if (lit.state, key) not in seen:
            seen.add((lit.state, key))
            if every:
                every_head.add(len(found))
            found.append(lit)

    starting = starting_states(t, plain, path)
    for part in ("methods", "tails"):
        walk = _walk_method if part == "methods" else _walk
        for state in starting[part]:
            for text in CORPUS[part]:
                lit = walk(t, plain, state, text.encode())
                if lit is not None and part == "tails" and lit.text == text.encode():
                    lit = replace(lit, section=True)  # the whole line's end: CRLF included
                if lit is not None:
                    add(lit, every=True)
    # Path words before header names: since the section memo, a kept-alive connection walks
    # its header lines once, and its request targets every time.
    for state in dict.fromkeys(lit.target for lit in found if lit.state == t.start):
        for lit in _path_words(t, path, state, prefixes):
            add(lit, every=False)
    for state in starting["lines"]:
        for text in CORPUS["lines"]:
            lit = _walk(t, plain, state, text.encode())
            if lit is not None:
                add(lit, every=False)
    # The multiplier that keeps the most methods and tails, then the most literals: a method
    # or version that collides is walked byte by byte in every request; a header name, only
    # where a client sends it.
    best: LiteralTable | None = None
    best_score = (-1, -1)
    for mul in MULTIPLIERS:
        kept: list[Literal] = []
        used: set[int] = set()
        kept_every_head = 0
        for i, lit in enumerate(found):  # the more useful first: methods, tails, line states
            slot = LiteralTable(mul, (), t.start).slot(lit)
            if slot not in used:
                used.add(slot)
                kept.append(lit)
                kept_every_head += i in every_head
        score = (kept_every_head, len(kept))
        if score > best_score:
            best, best_score = LiteralTable(mul, tuple(kept), t.start), score
        if len(kept) == len(found):
            break
    assert best is not None
    return best
