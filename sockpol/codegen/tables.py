"""The policy's tables in the object, the scan state in the connection's storage, and the
explicit context every generated function works in (`Fn`): the data side of the kernel program,
shared by every backend that judges requests with the same tables.

- `Tables`: every policy-dependent number the program reads, one struct in `.data` with two
  slots and a generation (a reload writes the idle slot, then flips the generation; a run reads
  the generation once and uses one slot throughout); `CONFIG` names its scalar settings.
- The scan state (`SCAN_POINTERS` on the caller's stack, `SCAN_SCALARS` and the fact words in the
  connection's socket storage): why it lives there is below.
- `Fn`: a builder, the tables pointer of the current function, and the scan context: the state
  that the emitter used to keep in `self.base`, now passed explicitly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from llvmlite import binding as llvm
from llvmlite import ir

from sockpol.codegen import helpers as h
from sockpol.codegen.helpers import I8, I32, I64, PTR, gep
from sockpol.codegen.irconst import int_array, word_rows
from sockpol.codegen.literals import LiteralTable, literal_table, target_prefixes
from sockpol.codegen.lower import MAX_FACT_WORDS, MatcherIR
from sockpol.codegen.objbuilder import DATA_LAYOUT, ObjectBuilder
from sockpol.codegen.scanner import END, FLAG_PATH_BYTE, TERMINAL_STATES, ScannerTables
from sockpol.contract import (
    ANSWER_BYTES,
    ANSWER_ROWS,
    ANSWERED_REASONS,
    MAX_ANSWERS,
    PATH_MAX,
    TABLE_LAYOUT,
    TABLES_SYMBOL,
    Reason,
    answer_response,
    head_limit,
)
from sockpol.model import tls

# The connection's socket storage (`sockpol_conn`): the connection's word and the bytes of a body
# or TLS record still to come (kept between runs), its key in the sockhash (the socket cookie,
# written by the sock_ops program: sk_msg programs cannot read a cookie, and an answer is
# redirected to the socket's own entry), then the run's work area ("scratch"): the path, 128
# spare bytes, the scan's scalars and its fact words (rewritten by every run). The spare bytes and
# scalars were the path normalizer's (its segment stack, counters): every version's storage has
# the same size, because a replacement shares the map with the connections that are open. The
# spare bytes also hold the path chunk's stores as the verifier sees them: it knows the path's
# length only as below PATH_MAX, and the chunk stores up to PATH_SCAN_CHUNK - 1 bytes past it
# (judge.py asserts the room).
CONN_WORD, CONN_LEFT, CONN_KEY, CONN_SCRATCH = 0, 8, 16, 24
SCALARS_OFFSET = PATH_MAX + 128
assert PATH_MAX & (PATH_MAX - 1) == 0

# Why the scan state lives in map memory and not on the stack: bpf_loop callbacks share state with
# their caller through a context on the caller's stack, and kernels with upstream f597664454bd
# (6.19.y, 7.0, later 6.18.y builds) re-verify a callback until the caller's state at its entry
# converges. Scalars carried there from iteration to iteration (the automaton state, the path's
# length, the counters of an earlier path normalizer) become precise, and branches on them keep
# distinct value ranges apart until the verifier gives up at a million instructions. The verifier
# tracks no values in map memory (every load is just "a scalar", and every index drawn from one is
# masked before use), so with the scalars there each callback's entry state is the same at every
# iteration and the walk converges at once. On the stack stay only the pointers the callbacks need:
# map memory cannot hold a pointer the verifier still knows as one.
# Socket storage rather than a per-CPU buffer: the socket is locked while its sendmsg runs the
# program, whereas a program run can be preempted (preempt=full or lazy) and another run on the
# same CPU would then overwrite a shared per-CPU buffer in the middle of the first one's scan.
SCAN_POINTERS = ["data", "data_end", "scratch", "tables"]
SCAN_SCALARS = [
    "state", "pos", "cl", "chunk", "seen", "rule",  # head scanner
    "out_len", "pwalked", "memo_at", "memo_mark", "memo_from", "serial", "path_too_long",
    "pstate",  # path, and a header section being remembered (MEMO_*)
    "cand_off",  # where the path state's candidate rules start in cand_table
    "limit",  # bytes of the head the scan may read (the bytes pulled)
    "pending",  # the next call starts with the slow path (1) or literals (2): scan_step
]  # fmt: skip
POINTER_FIELDS = set(SCAN_POINTERS)
S = {name: i for i, name in enumerate(SCAN_POINTERS)}
SCALAR = {name: SCALARS_OFFSET + 8 * i for i, name in enumerate(SCAN_SCALARS)}
FACTS_OFFSET = SCALARS_OFFSET + 8 * len(SCAN_SCALARS)


# The connection's remembered header section (the sk_msg program; judge.JudgeCore.memo_section,
# docs/design.md, "The cost of a request", step 19). A client on a kept-alive connection sends
# the same header lines with every request; what the scan makes of them depends on nothing but
# the scanner (the tables), the state the request line ended in, and their bytes: the facts
# they add, the Content-Length, the singleton flags, the head's end. So the run that scanned a
# section remembers it whole (at most MEMO_MAX bytes) with that outcome, and a later run whose
# request line ends in the same state compares the next bytes with it, eight at a time: equal,
# it takes the outcome instead of walking them. The description sits in the spare bytes after
# the path (MEMO_TAG: the tables' `memo_tag`, a digest of everything the scan reads, so
# another policy or a reload never takes a section remembered under the old tables; MEMO_LEN;
# MEMO_FROM, the state it starts in; the singleton flags and Content-Length at its end; the
# facts it adds), the bytes at the end of the path's room, with the request line's facts
# (MEMO_F0) while a run scans a section it will remember. The tag is the digest XOR'd with the
# program's serial (the `serial` scalar, written before the scan), so a section is taken only by
# the program that remembered it, or by one it swapped tables into: a replacement by another
# version (an older one knows nothing of the section and may write over its bytes with a long
# path) forgets it. A path longer than MEMO_PATH_MAX (a
# path chunk stores up to 32 bytes past the path) may have written over them: such a run
# forgets the section (memo_end).
MEMO_MAX = 512
MEMO_TAG, MEMO_LEN, MEMO_FROM, MEMO_SEEN, MEMO_CL, MEMO_FACTS = (PATH_MAX + 8 * i for i in range(6))
assert MEMO_FACTS + 8 * MAX_FACT_WORDS <= SCALARS_OFFSET
MEMO_F0 = PATH_MAX - 8 * MAX_FACT_WORDS
MEMO_BYTES = MEMO_F0 - MEMO_MAX
MEMO_PATH_MAX = MEMO_BYTES - 32
# Bumped when what a remembered section means changes (its description, what the scan keeps).
MEMO_FORMAT = 1


def conn_value_size(fact_words: int = MAX_FACT_WORDS) -> int:
    """Bytes of a connection's socket storage. Every program uses the size for the most fact
    words, whatever its own policy needs: a replacement shares the storage of the connections
    that are open (`contract.SHARED_MAPS`), so its layout cannot depend on the policy."""
    return CONN_SCRATCH + FACTS_OFFSET + 8 * fact_words


# What the scan's fast path may do with a byte leading to a state (`state_kind`): move on
# (STATE_PLAIN), walk a path byte (STATE_PATH: the path chunk; the lsm program's general chunk
# appends it and moves on), skip words of visible ASCII
# (STATE_VALUE_LOOP, `skip_words`); a state with none of them (facts, flags, terminal) takes the
# slow path. STATE_PATH_NEXT: some byte leads from the state to a path state (the path chunk of
# `scan_step` starts there: after the method's SP, and in the path).
STATE_PLAIN, STATE_PATH, STATE_VALUE_LOOP, STATE_PATH_NEXT = 1, 2, 4, 8
# `trans` entries: the next state's row as a byte offset into `trans` (state << (class_bits +
# 2): entries are four bytes), and above it the next state's PLAIN and PATH bits. The fast path
# adds the byte's class (times four) to the entry it loaded and masks: the mask (which the
# verifier needs anyway) drops the kind bits, and the chain every byte waits on is an add, an
# AND and a load; the kind is tested on the entry itself, with no load of its own. Rows take at
# most 16 + 8 bits of state and class, plus 2, so bits 28 and up are free.
TRANS_KIND_SHIFT = 28
# And bit 30: the next state has literals (codegen/literals.py): the chunk that enters it
# tries one there (judge.scan_step). Such a state is plain, and keeps its PLAIN bit, so a
# program that does not try literals (the lsm backend's) walks through it as through any.
LITERAL_BIT = 1 << 30


def state_kinds(t: ScannerTables) -> list[int]:
    """Per state (padding included): STATE_PLAIN, STATE_PATH, and STATE_VALUE_LOOP for a plain
    state that every byte from 0x20 to 0x7E leads back to (the value of a header no condition
    looks at): the fast path skips such bytes eight at a time."""
    visible = range(0x20, 0x7F)

    def kind(state: int, info: int) -> int:
        if state < TERMINAL_STATES:
            return 0
        if info == FLAG_PATH_BYTE:
            return STATE_PATH
        if info != 0:
            return 0
        loops = state < t.n_states and all(t.step(state, c) == state for c in visible)
        return STATE_PLAIN | (STATE_VALUE_LOOP if loops else 0)

    kinds = [kind(s, i) for s, i in enumerate(t.info)]
    path = {s for s, k in enumerate(kinds) if k & STATE_PATH}
    row = 1 << t.class_bits
    for s in range(TERMINAL_STATES, t.n_states):
        if not path.isdisjoint(t.trans[s * row : (s + 1) * row]):
            kinds[s] |= STATE_PATH_NEXT
    return kinds


def plain_and_path_states(kinds: list[int]) -> tuple[frozenset[int], frozenset[int]]:
    """(the states that are PLAIN and not PATH, the PATH states): what codegen/literals.py
    walks through and starts after."""
    fast = STATE_PLAIN | STATE_PATH
    plain = frozenset(s for s, k in enumerate(kinds) if k & fast == STATE_PLAIN)
    return plain, frozenset(s for s, k in enumerate(kinds) if k & STATE_PATH)


def trans_entries(
    t: ScannerTables, kinds: list[int], literal_states: frozenset[int] = frozenset()
) -> list[int]:
    """`trans` as the kernel reads it (TRANS_KIND_SHIFT): per entry, the next state's row as a
    byte offset, with its PLAIN and PATH bits above, and LITERAL_BIT for a state with literals."""
    fast = STATE_PLAIN | STATE_PATH
    return [
        (s << (t.class_bits + 2))
        | ((kinds[s] & fast) << TRANS_KIND_SHIFT)
        | (LITERAL_BIT if s in literal_states else 0)
        for s in t.trans
    ]


def port_bitmap(ports) -> list[int]:
    """One bit per TCP port (8,192 bytes), set for the ports `ports` (PortRange list) cover."""
    bits = bytearray(65536 // 8)
    for r in ports:
        for port in range(r.low, r.high + 1):
            bits[port >> 3] |= 1 << (port & 7)
    return list(bits)


CONFIG = [
    "nrules", "default_allow", "max_head", "start", "path_start", "zero",
    "chunk_start", "chunk_data_end", "path_classes", "tls",
]  # fmt: skip


ANSWER_WORDS = ANSWER_BYTES // 8
ANSWER_ROW_T = ir.ArrayType(I64, ANSWER_WORDS)


def answer_rows(policy: str, statuses: tuple[int, ...]) -> ir.Constant:
    """Every response the program may write, as rows of little-endian words."""
    blank = bytes(ANSWER_BYTES)
    rows = [blank] * (MAX_ANSWERS * ANSWER_ROWS)
    for a, status in enumerate(statuses):
        for reason in ANSWERED_REASONS:
            if status:
                text = answer_response(policy, status, Reason(reason).slug)
                rows[a * ANSWER_ROWS + (reason & (ANSWER_ROWS - 1))] = text
    table = ir.ArrayType(ANSWER_ROW_T, len(rows))
    return ir.Constant(
        table,
        [
            ir.Constant(
                ANSWER_ROW_T,
                [I64(int.from_bytes(r[8 * k : 8 * k + 8], "little")) for k in range(ANSWER_WORDS)],
            )
            for r in rows
        ],
    )


def memo_tag(
    t: ScannerTables,
    literals: LiteralTable,
    kinds: list[int],
    config: dict[str, int],
    factsets: list[list[int]],
) -> int:
    """A digest of what the head scanner's walk reads (never 0, the tag of no section): two
    objects or slots with the same digest make the same of every header section."""
    digest = hashlib.blake2b(digest_size=8, person=b"sockpol-memo")
    for part in (
        MEMO_FORMAT, TABLE_LAYOUT, MEMO_MAX, list(t.classmap), list(t.trans), list(t.info),
        factsets, kinds, literals.rows(), literals.mul, sorted(config.items()),
    ):  # fmt: skip
        digest.update(repr(part).encode())
        digest.update(b"\0")
    return int.from_bytes(digest.digest(), "little") | 1


class Tables:
    """The tables global (built from a matcher IR and its table shape) and how to reach it."""

    def __init__(self, ob: ObjectBuilder, ir_: MatcherIR) -> None:
        self.ir = ir_
        self.nw = ir_.fact_words
        self.words_t = ir.ArrayType(I64, self.nw)
        shape = ir_.shape or ir_.needed_shape()
        assert shape.covers(ir_.needed_shape())
        self.n_factsets = 1 << shape.factset_bits
        self.n_rules = 1 << shape.rule_bits
        self.shape = shape
        self.ob = ob
        t = ir_.tables
        self.row_shift = t.class_bits + 2  # a state's row in `trans`, in bytes
        self.trans_mask = ((1 << (t.state_bits + t.class_bits)) - 1) << 2
        assert self.trans_mask < 1 << TRANS_KIND_SHIFT

    def emit(self) -> None:
        """The global in `.data`, created here: after the maps, as the object lays them out."""
        ob = self.ob
        ir_, t = self.ir, self.ir.tables
        p = t.path
        comb, lookup, shape = p.comb, ir_.lookup, self.shape
        factsets = [ir_.words(fs) for fs in t.factsets]
        factsets += [[0] * self.nw] * (self.n_factsets - len(factsets))
        # Per rule class: the facts it needs (method set, conditions); per rule: its flags.
        need = [ir_.words(c) for c in lookup.classes]
        need += [[0] * self.nw] * ((1 << shape.rclass_bits) - len(need))
        # Per rule: pass, log and audit bits (telemetry.RULE_*).
        rule_flags = [r.flags for r in ir_.rules] + [0] * (self.n_rules - len(ir_.rules))
        slots = comb.slots + [0] * ((1 << shape.slot_bits) - len(comb.slots))
        accepts = comb.accepts + [0] * ((1 << shape.accept_bits) - len(comb.accepts))
        cands = list(lookup.table) + [0] * ((1 << shape.cand_bits) - len(lookup.table))
        config = {
            "nrules": len(ir_.rules),
            "default_allow": int(ir_.policy.default.value == "allow"),
            "max_head": head_limit(ir_.policy.max_head),
            "start": t.start,
            "path_start": p.start,
            "zero": 0,
            "chunk_start": t.chunk_start,
            "chunk_data_end": t.chunk_data_end,
            "path_classes": comb.n_classes,
            "tls": tls.policy_mode(ir_.policy),
        }
        statuses = ir_.policy.answers()
        kinds = state_kinds(t)
        # The chunk ends the walk at END itself, doing nothing else there (judge.scan_step).
        assert t.info[END] == 0, "the head's end has no facts or flags"
        prefixes = target_prefixes(r.path.text for r in ir_.policy.rules)
        self.literals = literal_table(t, *plain_and_path_states(kinds), prefixes)
        hexval = [int(chr(c), 16) if chr(c) in "0123456789abcdefABCDEF" else 0 for c in range(256)]

        def words(rows: list[list[int]]) -> ir.Constant:
            return word_rows(self.words_t, rows)

        def array(typ: ir.IntType, values: list[int]) -> ir.Constant:
            return int_array(typ, values)

        fields = {
            # The tables of the scan's fast path (judge.scan_step) come first, so that their
            # offsets fit in a BPF load's 16-bit displacement and one register reaches them all.
            "classmap": array(I8, list(t.classmap)),
            # The literals (codegen/literals.py) and their hash's multiplier: read once per
            # call that tries them, before `trans` so that its offset stays a displacement.
            "literals": array(I64, self.literals.rows()),
            "lit_mul": array(I64, [self.literals.mul]),
            # The path automaton's class map, read per path byte by the path chunk; it gives
            # the class's slot offset in the comb, class + 1 (comb.py).
            "path_classmap": array(I8, [c + 1 for c in p.classmap]),
            "trans": array(I32, trans_entries(t, kinds, self.literals.chunk_states)),
            # Per state: STATE_PLAIN, STATE_PATH, STATE_VALUE_LOOP bits, else 0.
            "state_kind": array(I8, kinds),
            "info": array(I32, t.info),
            "factsets": words(factsets),
            "class_need": words(need),
            "rule_flags": array(I32, rule_flags),
            "path_slots": array(I32, slots),
            "cand_words": array(I32, accepts),
            "cand_table": array(I32, cands),
            "hexval": array(I8, hexval),
            "small": array(I8, list(range(256))),
            # The governed ports, one bit each: a connection whose port a reload stopped
            # governing passes unjudged (ports are table data; sock_ops has them as constants
            # too, for new connections).
            "ports": array(I8, port_bitmap(ir_.policy.ports)),
            "config": array(I32, [config[k] for k in CONFIG]),
            # The scanner's identity for the connection's remembered header section (MEMO_TAG).
            "memo_tag": array(I64, [memo_tag(t, self.literals, kinds, config, factsets)]),
            # Answers (contract.answer_response): the status of each of the policy's answers
            # (0: drop), and the response of each answer and refusal reason, row
            # answer * ANSWER_ROWS + (reason & 15), as ANSWER_BYTES / 8 words.
            "answer_status": array(I32, list(statuses) + [0] * (MAX_ANSWERS - len(statuses))),
            "answers": answer_rows(ir_.policy.name, statuses),
        }
        self.t_index = {name: i for i, name in enumerate(fields)}
        self.t_len = {name: len(c.type) for name, c in fields.items()}
        typ = ir.LiteralStructType([c.type for c in fields.values()])
        # Byte offsets of the tables in a slot (the BPF data layout), for Fn.load_flat.
        td = llvm.create_target_data(DATA_LAYOUT)
        self.t_offset = {name: typ.get_element_offset(td, i) for i, name in enumerate(fields)}
        # The fast path's tables are reached by a load's 16-bit signed displacement (load_flat).
        assert self.t_offset["trans"] < 1 << 15, "the tables before `trans` outgrew a displacement"
        self.t_elem = {
            name: c.type.element.width // 8
            for name, c in fields.items()
            if isinstance(c.type.element, ir.IntType)
        }
        # Two slots and a generation: a reload writes the idle slot, then flips `gen`; a run
        # reads `gen` once and uses one slot throughout, so no run sees half a table. Both
        # slots start equal, so any loader gets a working policy whatever `gen` it starts with.
        # Then the program's serial, which the loader writes before attaching it (a run of an
        # older version whose serial is not the control map's hands over to the newest).
        slots = ir.ArrayType(typ, 2)
        self.data_t = ir.LiteralStructType([slots, I32, I32])
        gv = ir.GlobalVariable(ob.m, self.data_t, TABLES_SYMBOL)
        initial = ir.Constant(typ, list(fields.values()))
        gv.initializer = ir.Constant(
            self.data_t, [ir.Constant(slots, [initial, initial]), I32(0), I32(0)]
        )
        gv.section = ".data"
        gv.align = 8
        # BTF for the variable: libbpf makes `.data` mmap-able only when its DATASEC has a
        # global variable, and hot reload writes the idle slot through that mapping.
        size = self.data_t.get_abi_size(td)
        ob.dbg.global_variable(gv, ob.dbg.array(ob.u8, size, 8))
        self.gv = gv
        self.typ = typ
        ob.used.append(gv)

    def serial(self, b: ir.IRBuilder) -> ir.Value:
        """The program's serial (written by the loader before it attaches the program)."""
        return b.load(gep(b, self.gv, self.data_t, [I32(0), I32(2)]), typ=I32)

    def select(self, b: ir.IRBuilder) -> ir.Value:
        """Pointer to the slot of the current generation: the `base` of a run."""
        gen = b.load(gep(b, self.gv, self.data_t, [I32(0), I32(1)]), typ=I32)
        slot = b.and_(b.zext(gen, I64), I64(1))
        return gep(b, self.gv, self.data_t, [I32(0), I32(0), slot])


@dataclass
class Fn:
    """The context of one generated function: its builder, the tables slot it reads (`base`),
    and, for the scanner's functions, the scan context pointer (`scan`, on a caller's stack)."""

    b: ir.IRBuilder
    tables: Tables
    base: ir.Value | None = None
    scan: ir.Value | None = None
    pointers: dict[str, ir.Value] | None = None  # the scan's pointers, loaded once

    @classmethod
    def of_scan(cls, b: ir.IRBuilder, tables: Tables, scan: ir.Value) -> Fn:
        """The context of a function handed the scan context: its tables slot is the one the
        program selected, read from there. The pointers are loaded once, at the function's
        entry: no one changes them during the scan, and LLVM cannot know that (every store
        through one of them might alias the context), so loads on demand were repeated."""
        fx = cls(b, tables, scan=scan)
        fx.pointers = {name: fx.get(name) for name in SCAN_POINTERS}
        fx.base = fx.get("tables")
        return fx

    def _masked(self, name: str, index: ir.Value) -> ir.Value:
        """`index` masked to the table's (power-of-two) length, which is what lets the verifier
        prove the access in bounds."""
        n = self.tables.t_len[name]
        assert n & (n - 1) == 0, name
        return self.b.and_(index, I64(n - 1))

    def table(self, name: str, index: ir.Value, *rest: ir.Value) -> ir.Value:
        """Pointer to an element of a table (the index masked: _masked)."""
        index = self._masked(name, index)
        return gep(
            self.b,
            self.base,
            self.tables.typ,
            [I32(0), I32(self.tables.t_index[name]), index, *rest],
        )

    def load_table(self, name: str, index: ir.Value, typ: ir.IntType) -> ir.Value:
        return self.b.zext(self.b.load(self.table(name, index), typ=typ), I64)

    def load_at(self, name: str, offset: ir.Value, typ: ir.IntType) -> ir.Value:
        """The element of a table at a byte `offset` the caller has bounded to the table (the
        table's offset in the slot becomes the load's displacement, as in load_flat)."""
        at = self.b.add(offset, I64(self.tables.t_offset[name]))
        return self.b.zext(self.b.load(gep(self.b, self.base, I8, [at]), typ=typ), I64)

    def _scaled(self, name: str, index: ir.Value) -> ir.Value:
        """`index` masked (_masked) and turned into a byte offset within the table."""
        index = self._masked(name, index)
        size = self.tables.t_elem[name]
        return self.b.shl(index, I64(size.bit_length() - 1)) if size > 1 else index

    def load_flat(self, name: str, index: ir.Value, typ: ir.IntType) -> ir.Value:
        """load_table for unrolled hot code: the address is the slot's base plus one byte
        offset computed where it is used, so the table's constant offset becomes the load's
        displacement. (With a GEP into the struct, LLVM computes each table's start once and
        keeps it live across every block of an unrolled chunk: a register each, spilled to the
        stack and reloaded per byte, since BPF has ten.)"""
        return self.load_at(name, self._scaled(name, index), typ)

    def flat_base(self, name: str) -> ir.Value:
        """The start of a table as a pointer of its own (hidden from LLVM, which would fold
        the offset back into every address): for a table past a load's displacement that
        unrolled code reads often (load_from)."""
        at = h.opaque(self.b, I64(self.tables.t_offset[name]))
        return gep(self.b, self.base, I8, [at])

    def load_from(self, start: ir.Value, name: str, index: ir.Value, typ: ir.IntType) -> ir.Value:
        """load_flat through a table's own start (flat_base)."""
        b = self.b
        return b.zext(b.load(gep(b, start, I8, [self._scaled(name, index)]), typ=typ), I64)

    def config(self, name: str) -> ir.Value:
        t, b = self.tables, self.b
        ptr = gep(b, self.base, t.typ, [I32(0), I32(t.t_index["config"]), I64(CONFIG.index(name))])
        return b.zext(b.load(ptr, typ=I32), I64)

    # --- the scan state ------------------------------------------------------------------------

    def slot(self, name: str) -> ir.Value:
        if name in POINTER_FIELDS:
            return gep(self.b, self.scan, SCAN_T, [I32(0), I32(S[name])])
        return gep(self.b, self.get("scratch"), I8, [I64(SCALAR[name])])

    def get(self, name: str) -> ir.Value:
        if self.pointers is not None and name in self.pointers:
            return self.pointers[name]
        return self.b.load(self.slot(name), typ=PTR if name in POINTER_FIELDS else I64)

    def put(self, name: str, value: ir.Value | int) -> None:
        if isinstance(value, int):
            value = self.small(value)
        self.b.store(value, self.slot(name))

    def small(self, value: int) -> ir.Value:
        """A small constant the verifier cannot see through (read from the `small` table).

        The callbacks run once per byte; the verifier walks them until the state at their entry
        stops changing. Exact constants stored on some paths (pct = 1, seg_dots = 0, state =
        a refusal) multiply the states it must tell apart until it gives up; a value read from
        a map is just "a byte", and the walk converges."""
        assert 0 <= value < 256, value
        return self.load_table("small", I64(value), I8)

    def work(self, offset: int | ir.Value) -> ir.Value:
        """A pointer `offset` bytes into the run's work area (the connection's scratch)."""
        at = offset if isinstance(offset, ir.Value) else I64(offset)
        return gep(self.b, self.get("scratch"), I8, [at])

    def fact_word(self, w: int) -> ir.Value:
        return self.work(FACTS_OFFSET + 8 * w)

    def or_factset(self, index: ir.Value) -> None:
        b = self.b
        row = b.and_(index, I64(self.tables.n_factsets - 1))
        for w in range(self.tables.nw):
            src = b.load(self.table("factsets", row, I64(w)), typ=I64)
            dst = self.fact_word(w)
            b.store(b.or_(b.load(dst, typ=I64), src), dst)


SCAN_T = ir.LiteralStructType([PTR] * len(SCAN_POINTERS))
