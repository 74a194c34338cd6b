"""Assemble the request-head scanner: one DFA over the bytes of an HTTP/1.x request head.

The kernel program walks this automaton one byte at a time. Its phases follow the request:

    method SP path [? query] SP HTTP/1.x CRLF  (field-name: value CRLF)*  CRLF

Each phase is determinized from tagged regular expressions (`sockpol/automata`). Where a phase ends
(the SP after the method or path, the CR of a header line) the scanner enters a *commit state* that
records which facts the phase established ("method is GET", "header x-api-key present"); path bytes
are copied out (the path automaton decides on the path after the head; the scanner accepts a path
only in its canonical spelling, so it needs no normalizing). The kernel ORs the commit state's fact
set into the request's facts; rules are conjunctions of facts. Terminal states END and one per
refusal reason stop the walk; any byte without a transition leads to the refusal state of its phase,
so the scanner accepts only well-formed, unambiguous request heads.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace

from sockpol.automata import http
from sockpol.automata.automaton import (
    DFA,
    Mark,
    Re,
    Set,
    StateLimitExceeded,
    anyof,
    determinize,
    lit,
    lit_ci,
    minimize,
    plus,
    trim,
)
from sockpol.codegen.comb import Comb, CombTooLarge, pack_comb
from sockpol.contract import Reason

# Terminal states that are not refusals: where a run of the program ends with a pass.
END = 0  # a request head is complete
CHUNK_LINE = 1  # a chunk-size line (of a non-zero chunk) is complete
BODY_END = 2  # the last chunk and the trailer section are complete
TERMINAL_STATES = Reason.BAD_CHUNK + 1  # states below stop the walk


# State flags (bits 16.. of a state's info word; bits 0..15 index its fact set).
FLAG_CL_DIGIT = 1 << 16  # the byte just consumed is a digit of a Content-Length value
FLAG_HOST_LINE = 1 << 17  # a complete Host header line
FLAG_CL_LINE = 1 << 18  # a complete Content-Length header line
FLAG_PATH_BYTE = 1 << 19  # the byte just consumed belongs to the path: append it
FLAG_TE_LINE = 1 << 21  # a complete `Transfer-Encoding: chunked` line
FLAG_HEX_DIGIT = 1 << 22  # the byte just consumed is a digit of a chunk size
SINGLETON_FLAGS = FLAG_HOST_LINE | FLAG_CL_LINE | FLAG_TE_LINE
EMIT_MASK = 0xFFFF


# Documented limits (docs/language.md, "Limits"): states of one automaton while it is built,
# before minimization. They bound compile time and memory (about 2 s of subset construction for
# the path automaton); a policy past them gets an error naming the rules responsible.
PATH_STATE_LIMIT = 250_000
HEAD_STATE_LIMIT = 50_000  # per phase of the head scanner (method, raw path, header line)


class StateLimit(Exception):
    """An automaton grew past its state limit. `phase` says which ("path", "header", ...);
    `blame` lists the tags of the patterns found in the most states, most first."""

    def __init__(self, message: str, phase: str, blame: Sequence[Hashable] = ()) -> None:
        super().__init__(message)
        self.phase = phase
        self.blame = list(blame)


def _blamed(e: StateLimitExceeded) -> list[Hashable]:
    """The patterns in at least a tenth of the states built, at least the first. Those are the
    ones multiplying states: with n overlapping wildcards each is in about half of the 2**n
    states (less in the breadth-first part built before the limit), a literal route in few."""
    return [tag for i, (tag, n) in enumerate(e.blame) if i == 0 or 10 * n >= e.states]


@dataclass(frozen=True)
class ScannerSpec:
    method_facts: dict[str, frozenset[int]]  # method token -> facts it establishes
    header_patterns: list[tuple[Re, int]]  # (regex over a whole header line, fact)
    state_limit: int = HEAD_STATE_LIMIT


@dataclass
class Scanner:
    """The assembled automaton, before packing into tables."""

    delta: list[list[int]] = field(default_factory=list)  # per state, 256 next states
    emits: list[frozenset[int]] = field(default_factory=list)
    flags: list[int] = field(default_factory=list)
    start: int = 0
    chunk_start: int = 0  # a chunk-size line
    chunk_data_end: int = 0  # the CRLF after chunk data, then a chunk-size line

    def new_state(self, emit: frozenset[int] = frozenset(), flags: int = 0) -> int:
        self.delta.append([-1] * 256)
        self.emits.append(emit)
        self.flags.append(flags)
        return len(self.delta) - 1


@dataclass(frozen=True)
class ScannerTables:
    """The automaton packed for the kernel: class map, transitions, per-state info, fact sets."""

    classmap: bytes  # byte -> class
    class_bits: int
    state_bits: int
    trans: list[int]  # index (state << class_bits) | class
    info: list[int]  # per state: fact-set index | flags
    factsets: list[frozenset[int]]  # index 0 is the empty set
    start: int
    n_states: int  # states in use (before padding)
    path: PathTables
    chunk_start: int
    chunk_data_end: int

    def step(self, state: int, byte: int) -> int:
        return self.trans[(state << self.class_bits) | self.classmap[byte]]


class _Builder:
    def __init__(self, spec: ScannerSpec) -> None:
        self.spec = spec
        self.sc = Scanner()
        for _ in range(TERMINAL_STATES):
            self.sc.new_state()
        # Commit states copy the transitions of the phase start they lead into; those are only
        # complete at the end, so copies are resolved last.
        self.copies: list[tuple[int, int]] = []
        self._commit_cache: dict[tuple[frozenset[int], int, int], int] = {}

    def commit(self, emit: frozenset[int], like: int, flags: int = 0) -> int:
        key = (emit, like, flags)
        if key not in self._commit_cache:
            s = self.sc.new_state(emit, flags)
            self.copies.append((s, like))
            self._commit_cache[key] = s
        return self._commit_cache[key]

    def determinize(self, phase: str, patterns: list[tuple[Re, Hashable]]) -> DFA:
        """The phase's minimal DFA. Everything the phase reads of a state (its tags, which
        decide the commit at the phase's end, its marks, and being the start) keys the
        minimization, so merged states behave the same in the assembled scanner."""
        try:
            dfa = determinize(patterns, self.spec.state_limit)
        except StateLimitExceeded as e:
            raise StateLimit(
                f"the {phase} automaton needs more than {e.limit:,} states", phase, _blamed(e)
            ) from None
        dfa, _ = minimize(dfa, lambda s: (dfa.tags[s], dfa.marks[s], s == dfa.start))
        return dfa

    def place(self, dfa: DFA) -> list[int]:
        return [self.sc.new_state() for _ in dfa.delta]

    def build(self) -> Scanner:
        sc = self.sc
        header_start = self.headers()
        version = self.version(header_start)
        query = self.query(version)
        path_start = self.path(version, query)
        sc.start = self.method(path_start)
        sc.chunk_start, sc.chunk_data_end = self.chunks()
        for s, like in self.copies:
            sc.delta[s] = list(sc.delta[like])
        for s in range(TERMINAL_STATES):
            sc.delta[s] = [s] * 256
        assert all(t >= 0 for row in sc.delta for t in row)
        return sc

    # Phases are built back to front so each knows the state that follows it.

    def method(self, path_start: int) -> int:
        patterns: list[tuple[Re, Hashable]] = [(http.any_token(), "token")]
        patterns += [(lit(m), ("method", m)) for m in self.spec.method_facts]
        dfa = self.determinize("method", patterns)
        ids = self.place(dfa)
        for d in range(len(dfa.delta)):
            out = self.sc.delta[ids[d]] = dfa.row(d, Reason.BAD_METHOD, ids)
            if "token" in dfa.tags[d]:
                facts = frozenset().union(
                    *(self.spec.method_facts[t[1]] for t in dfa.tags[d] if t != "token")
                )
                out[http.SP] = self.commit(facts, like=path_start)
        # Empty lines (CRLF) before the request line are skipped, as RFC 9112 2.2 asks of
        # servers (nginx, Apache, Tomcat, Node do): they pass with the request they precede. A
        # bare CR or LF there is still refused.
        start = ids[dfa.start]
        lead_cr = self.sc.new_state()
        self.sc.delta[lead_cr] = [Reason.BAD_METHOD] * 256
        self.sc.delta[lead_cr][http.LF] = start
        self.sc.delta[start][http.CR] = lead_cr
        return start

    def path(self, version: int, query: int) -> int:
        """The raw path: syntax and the spellings refused outright. Which rules' paths match is
        decided later, by `path_matcher`, on the path the kernel copies from the bytes
        consumed here (states flagged FLAG_PATH_BYTE): as this automaton refuses every spelling
        but the canonical one, the raw path is the one rules match."""
        patterns: list[tuple[Re, Hashable]] = [
            (http.valid_path(), "valid"),
            (http.ambiguous_path_now(), "ambiguous"),
            (http.ambiguous_path_at_end(), "ambiguous-at-end"),
        ]
        dfa = self.determinize("raw path", patterns)
        # Every path starts with "/" and then stays a valid path; a state outside that (only
        # reachable when the target does not start with "/") is a bad target, whatever else
        # the ambiguity patterns would say about it.
        ids: list[int] = []
        for d, tags in enumerate(dfa.tags):
            if d != dfa.start and "valid" not in tags:
                ids.append(Reason.BAD_TARGET)
            elif "ambiguous" in tags:
                ids.append(Reason.AMBIGUOUS_PATH)
            else:
                ids.append(self.sc.new_state(flags=FLAG_PATH_BYTE if d != dfa.start else 0))
        for d in range(len(dfa.delta)):
            if ids[d] < TERMINAL_STATES:
                continue
            out = self.sc.delta[ids[d]] = dfa.row(d, Reason.BAD_TARGET, ids)
            tags = dfa.tags[d]
            if "valid" in tags:
                if "ambiguous-at-end" in tags:
                    out[http.SP] = out[ord("?")] = Reason.AMBIGUOUS_PATH
                else:
                    out[http.SP], out[ord("?")] = version, query
        return ids[dfa.start]

    def query(self, version: int) -> int:
        q = self.sc.new_state()
        out = self.sc.delta[q]
        for b in range(256):
            out[b] = q if http.QUERY_BYTE >> b & 1 else Reason.BAD_TARGET
        out[http.SP] = version
        return q

    def version(self, header_start: int) -> int:
        expected = [b"H", b"T", b"T", b"P", b"/", b"1", b".", b"01", b"\r", b"\n"]
        chain = [self.sc.new_state() for _ in expected]
        for i, (s, allowed) in enumerate(zip(chain, expected, strict=True)):
            nxt = chain[i + 1] if i + 1 < len(chain) else header_start
            self.sc.delta[s] = [nxt if b in allowed else Reason.BAD_VERSION for b in range(256)]
        return chain[0]

    def headers(self) -> int:
        cl_digits = plus(Mark(Set(http.DIGIT), "cl-digit"))
        patterns: list[tuple[Re, Hashable]] = [
            (http.field_line(plus(anyof(http.TCHAR))), "line"),
            (http.field_line(lit_ci("host")), "host-line"),
            (http.host_field(), "host-valid"),
            (http.field_line(lit_ci("content-length")), "cl-line"),
            (http.field_with_value("content-length", cl_digits), "cl-valid"),
            (http.field_line(lit_ci("transfer-encoding")), "te-line"),
            (http.field_with_value("transfer-encoding", lit_ci("chunked")), "te-chunked"),
            (http.field_line(lit_ci("upgrade")), "upgrade-line"),
        ]
        patterns += [(regex, ("fact", fact)) for regex, fact in self.spec.header_patterns]
        dfa = self.determinize("header", patterns)
        ids = self.place(dfa)
        line_start = ids[dfa.start]
        head_cr = self.sc.new_state()
        self.sc.delta[head_cr] = [Reason.BAD_HEADER] * 256
        self.sc.delta[head_cr][http.LF] = END
        for d in range(len(dfa.delta)):
            sid = ids[d]
            out = self.sc.delta[sid] = dfa.row(d, Reason.BAD_HEADER, ids)
            if "cl-digit" in dfa.marks[d]:
                self.sc.flags[sid] |= FLAG_CL_DIGIT
            tags = dfa.tags[d]
            if d == dfa.start:
                out[http.CR] = head_cr
            elif "te-line" in tags and "te-chunked" not in tags:
                out[http.CR] = Reason.TRANSFER_ENCODING
            elif "upgrade-line" in tags:
                out[http.CR] = Reason.UPGRADE
            elif "cl-line" in tags and "cl-valid" not in tags:
                out[http.CR] = Reason.BAD_CONTENT_LENGTH
            elif "host-line" in tags and "host-valid" not in tags:
                out[http.CR] = Reason.BAD_HEADER  # not a host name or address and a port
            elif "line" in tags:
                flags = (
                    (FLAG_HOST_LINE if "host-line" in tags else 0)
                    | (FLAG_CL_LINE if "cl-line" in tags else 0)
                    | (FLAG_TE_LINE if "te-chunked" in tags else 0)
                )
                facts = frozenset(t[1] for t in tags if isinstance(t, tuple))
                # The commit state consumes the CR and must see LF next.
                out[http.CR] = self.commit(facts, like=self._line_feed(line_start), flags=flags)
        return line_start

    def chunks(self) -> tuple[int, int]:
        """Chunked body framing (RFC 9112 7.1), built by hand: the program runs it on each
        chunk-size line, skips the chunk data with apply_bytes, then runs it on the CRLF that
        ends the data and the next size line; after the last chunk, on the trailer section."""
        new = self.sc.new_state

        def row(default: int = Reason.BAD_CHUNK) -> list[int]:
            return [default] * 256

        size_start, zeros, size = new(), new(flags=FLAG_HEX_DIGIT), new(flags=FLAG_HEX_DIGIT)
        cr, cr_last = new(), new()
        trailer_start, trailer, trailer_cr, trailer_lf, end_cr = new(), new(), new(), new(), new()
        trailer_name = new()
        data_cr, data_lf = new(), new()
        for s in (size_start, zeros, size, cr, cr_last, trailer_start, trailer):
            self.sc.delta[s] = row()
        for s in (trailer_cr, trailer_lf, end_cr, data_cr, data_lf, trailer_name):
            self.sc.delta[s] = row()
        hexdig = [b for b in range(256) if http.HEXDIG >> b & 1]
        for b in hexdig:
            self.sc.delta[size_start][b] = zeros if b == ord("0") else size
            self.sc.delta[zeros][b] = zeros if b == ord("0") else size
            self.sc.delta[size][b] = size
        for s, c in ((zeros, cr_last), (size, cr)):
            self.sc.delta[s][ord(";")] = self._chunk_extensions(c)
            self.sc.delta[s][http.CR] = c
        self.sc.delta[cr][http.LF] = CHUNK_LINE
        self.sc.delta[cr_last][http.LF] = trailer_start
        # Trailer fields: `name: value` lines as in a head (not judged), then an empty line. A
        # line without a colon is refused: a lax server might take it for a request line.
        for b in range(256):
            if http.TCHAR >> b & 1:
                self.sc.delta[trailer_start][b] = trailer_name
                self.sc.delta[trailer_name][b] = trailer_name
            if http.FIELD_BYTE >> b & 1:
                self.sc.delta[trailer][b] = trailer
        self.sc.delta[trailer_name][ord(":")] = trailer
        self.sc.delta[trailer_start][http.CR] = end_cr
        self.sc.delta[trailer][http.CR] = trailer_cr
        self.sc.delta[trailer_cr][http.LF] = trailer_lf
        self.sc.delta[trailer_lf] = list(self.sc.delta[trailer_start])
        self.sc.delta[end_cr][http.LF] = BODY_END
        self.sc.delta[data_cr][http.CR] = data_lf
        self.sc.delta[data_lf][http.LF] = size_start
        return size_start, data_cr

    def _chunk_extensions(self, cr: int) -> int:
        """After a chunk size's `;`: `token [= (token / quoted-string)]`, more of them after
        `;`, then the CR (state `cr`) ending the size line (RFC 9112 7.1.1, without the BWS
        that senders must not generate). Anything else is refused: chunk extensions that
        servers parse differently are a known smuggling vector."""
        new = self.sc.new_state
        name, eq, token, qstr, qpair, qend = new(), new(), new(), new(), new(), new()
        semi = new()
        for s in (semi, name, eq, token, qstr, qpair, qend):
            self.sc.delta[s] = [Reason.BAD_CHUNK] * 256
        for b in range(256):
            if http.TCHAR >> b & 1:
                for s, nxt in ((semi, name), (name, name), (eq, token), (token, token)):
                    self.sc.delta[s][b] = nxt
            if http.QDTEXT >> b & 1:
                self.sc.delta[qstr][b] = qstr
            if http.FIELD_BYTE >> b & 1:  # quoted-pair: HTAB, SP, VCHAR, obs-text
                self.sc.delta[qpair][b] = qstr
        self.sc.delta[name][ord("=")] = eq
        self.sc.delta[eq][ord('"')] = qstr
        self.sc.delta[qstr][ord("\\")] = qpair
        self.sc.delta[qstr][ord('"')] = qend
        for s in (name, token, qend):
            self.sc.delta[s][ord(";")] = semi
            self.sc.delta[s][http.CR] = cr
        return semi

    def _line_feed(self, line_start: int) -> int:
        if not hasattr(self, "_lf"):
            self._lf = self.sc.new_state()
            self.sc.delta[self._lf] = [Reason.BAD_HEADER] * 256
            self.sc.delta[self._lf][http.LF] = line_start
        return self._lf


def build_scanner(spec: ScannerSpec) -> Scanner:
    return _Builder(spec).build()


@dataclass
class PathMatcher:
    """The minimal DFA over (canonical) paths, over its byte classes.

    `outputs[s]` is what a path ending in state s decides, as an index the caller defined (0:
    no rule's path matches). A class missing from `delta[s]` goes to the dead state, the last
    one: no rule's path can match any more, whatever follows.
    """

    classmap: bytes
    delta: list[dict[int, int]]
    outputs: list[int]
    start: int
    n_classes: int

    @property
    def dead(self) -> int:
        return len(self.delta) - 1


def build_path_matcher(
    patterns: Sequence[tuple[Re, int]],
    outcome: Callable[[frozenset[int]], int],
    limit: int,
) -> PathMatcher:
    """One DFA for every rule's path: `patterns` are (regex, pattern id), `outcome` maps the set
    of pattern ids a path matches to an output index (0: nothing; the caller folds rule order and
    conditions into it, so that minimization merges every state that decides the same)."""
    try:
        dfa = determinize(patterns, limit)
    except StateLimitExceeded as e:
        raise StateLimit(
            f"the path automaton needs more than {e.limit:,} states", "path", _blamed(e)
        ) from None
    memo: dict[frozenset[Hashable], int] = {}
    outputs = []
    for tags in dfa.tags:
        out = memo.get(tags)
        if out is None:
            out = memo[tags] = outcome(frozenset(int(t) for t in tags))  # type: ignore[arg-type]
        outputs.append(out)
    # States that can no longer reach a match are the dead state; then merge equivalent ones.
    dfa, kept = trim(dfa, lambda s: outputs[s] != 0)
    outputs = [o for o, k in zip(outputs, kept, strict=True) if k >= 0]
    small, mapping = minimize(dfa, lambda s: outputs[s])
    new_outputs = [0] * (len(small.delta) + 1)
    for s, m in enumerate(mapping):
        if m >= 0:
            new_outputs[m] = outputs[s]
    return PathMatcher(small.classmap, [*small.delta, {}], new_outputs, small.start, dfa.n_classes)


def _pow2_bits(n: int) -> int:
    return max(1, (n - 1).bit_length())


def _columns(rows: list[list[int]]) -> tuple[bytearray, list[int]]:
    """Classes of identical columns: the column -> class map, and one column of each class.
    Columns are compared with zip(*rows), which runs in C, not once per state and byte here."""
    columns: dict[tuple[int, ...], int] = {}
    classmap = bytearray(len(rows[0]))
    first_of_class: list[int] = []
    for b, col in enumerate(zip(*rows, strict=True)):
        cls = columns.setdefault(col, len(columns))
        if cls == len(first_of_class):
            first_of_class.append(b)
        classmap[b] = cls
    return classmap, first_of_class


def _compress(rows: list[list[int]], padding: int) -> tuple[bytes, int, int, list[int]]:
    """Classes of identical columns and a transition table padded to powers of two in both
    dimensions, so the kernel can bound every index with a mask. `rows` are indexed by byte, or
    by an earlier class (then the returned map is over those classes; compose it)."""
    classmap, first_of_class = _columns(rows)
    class_bits = _pow2_bits(len(first_of_class))
    state_bits = _pow2_bits(len(rows))
    pad_row = [padding] * ((1 << class_bits) - len(first_of_class))
    trans: list[int] = []
    for row in rows:
        trans += [row[b] for b in first_of_class]
        trans += pad_row
    trans += [padding] * (((1 << state_bits) - len(rows)) << class_bits)
    return bytes(classmap), class_bits, state_bits, trans


@dataclass(frozen=True)
class PathTables:
    """The path automaton packed by row displacement (comb.py; state numbers are comb ids),
    with the candidate word of each accepting state (where its candidate rules are)."""

    classmap: bytes  # byte -> class
    comb: Comb
    start: int  # comb id of the start state

    def step(self, state: int, byte: int) -> int:
        return self.comb.step(state, self.classmap[byte])


def pack(sc: Scanner, pm: PathMatcher, path_cands: Sequence[int]) -> ScannerTables:
    """Tables for the kernel. The path automaton's outputs index `path_cands` (where the
    candidate rules of a path ending there are)."""
    factsets: dict[frozenset[int], int] = {frozenset(): 0}

    def factset(facts: frozenset[int]) -> int:
        idx = factsets.setdefault(facts, len(factsets))
        if idx > EMIT_MASK:
            raise StateLimit("more than 65535 distinct fact sets", "facts")
        return idx

    # Padding (never reachable: indices are masked) refuses rather than reading as END.
    classmap, class_bits, state_bits, trans = _compress(sc.delta, int(Reason.BAD_HEADER))
    info = [0] * (1 << state_bits)
    for s in range(len(sc.delta)):
        info[s] = factset(sc.emits[s]) | sc.flags[s]
    words = [path_cands[out] if out else 0 for out in pm.outputs]
    try:
        comb = pack_comb(pm.delta, pm.n_classes, pm.dead, words)
    except CombTooLarge as e:
        raise StateLimit(f"the path automaton is too large to pack: {e}", "path") from None
    path = PathTables(pm.classmap, comb, comb.ids[pm.start])
    return ScannerTables(
        classmap=classmap,
        class_bits=class_bits,
        state_bits=state_bits,
        trans=trans,
        info=info,
        factsets=list(factsets),
        start=sc.start,
        n_states=len(sc.delta),
        path=path,
        chunk_start=sc.chunk_start,
        chunk_data_end=sc.chunk_data_end,
    )


def _relayout(trans: list[int], old_cb: int, old_sb: int, cb: int, sb: int, pad: int) -> list[int]:
    out = [pad] * ((1 << sb) << cb)
    for s in range(1 << old_sb):
        for c in range(1 << old_cb):
            out[(s << cb) | c] = trans[(s << old_cb) | c]
    return out


def refit(t: ScannerTables, class_bits: int, state_bits: int) -> ScannerTables:
    """The same automata laid out in larger tables (a loaded program's fixed shape). The path
    automaton's packed form is padded by the emitter."""
    assert class_bits >= t.class_bits and state_bits >= t.state_bits
    return replace(
        t,
        class_bits=class_bits,
        state_bits=state_bits,
        trans=_relayout(
            t.trans, t.class_bits, t.state_bits, class_bits, state_bits, int(Reason.BAD_HEADER)
        ),
        info=t.info + [0] * ((1 << state_bits) - len(t.info)),
    )
