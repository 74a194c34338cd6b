"""The judging core: the byte-level work of judging a request head against the tables, as BPF
functions that any backend calls through bpf_loop.

- `sockpol_path_append`: a byte of the path into the connection's work area (the path rules
  match is the raw path: the scanner accepts a path only in its canonical spelling, so there is
  nothing to normalize, docs/design.md);
- `sockpol_scan_step`: the head through the scanner automaton, with its facts, the
  Content-Length and chunk-size digits, the singleton headers and the path's bytes (through
  the path automaton too, where its path chunk takes them);
- `sockpol_path_step`: the path bytes the scan did not walk through the packed path automaton;
- `sockpol_cand_step`: one candidate rule of the path's final state: does its class hold?

They share the scan state through the context `tables.Fn` describes (pointers on the caller's
stack, scalars and fact words in the connection's storage). The sk_msg backend (emit.py) calls
them on the message it pulled, the sk_skb one (skb.py) on the skb, the LSM one (lsm.py) on its
copy of the caller's buffer, all with the same tables; `scan`, `start_state`, `begin` and
`decide` are the steps around them every backend takes. The Python mirror is
codegen/simulate.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llvmlite import ir

from sockpol.codegen import helpers as h
from sockpol.codegen.candidates import CAND_LENGTH_SHIFT
from sockpol.codegen.comb import DEAD_ID, PAYLOAD_MASK, TAG_SHIFT
from sockpol.codegen.helpers import I1, I8, I32, I64, PTR, gep
from sockpol.codegen.literals import (
    ENTRY_WORDS,
    LITERAL_BITS,
    LITERAL_BYTES,
    METHOD_KEY_BYTES,
    PATH_STATE_SHIFT,
    PATH_WORD,
    PATH_WORD_BYTES,
    SECTION_MARK,
    STATE_MIX,
)
from sockpol.codegen.objbuilder import ObjectBuilder
from sockpol.codegen.scanner import (
    END,
    FLAG_CL_DIGIT,
    FLAG_CL_LINE,
    FLAG_HEX_DIGIT,
    FLAG_PATH_BYTE,
    FLAG_TE_LINE,
    SINGLETON_FLAGS,
    TERMINAL_STATES,
)
from sockpol.codegen.tables import (
    LITERAL_BIT,
    MEMO_BYTES,
    MEMO_CL,
    MEMO_F0,
    MEMO_FACTS,
    MEMO_FROM,
    MEMO_LEN,
    MEMO_MAX,
    MEMO_PATH_MAX,
    MEMO_SEEN,
    MEMO_TAG,
    SCALARS_OFFSET,
    SCAN_SCALARS,
    STATE_PATH,
    STATE_PATH_NEXT,
    STATE_PLAIN,
    STATE_VALUE_LOOP,
    TRANS_KIND_SHIFT,
    Fn,
    Tables,
)
from sockpol.contract import (
    CHUNK_MAX,
    CL_MAX,
    CONN_HTTP,
    MAX_SCAN,
    PATH_MAX,
    RESUME_CHUNK_DATA_END,
    RESUME_CHUNK_LINE,
    RESUME_REQUEST,
    Reason,
)
from sockpol.telemetry import NO_RULE, SLOT_DEFAULT, SLOT_RULES

# The state flags handled in scan_byte's counting block (digits, singleton headers).
COUNTED_FLAGS = FLAG_CL_DIGIT | FLAG_HEX_DIGIT | SINGLETON_FLAGS
# Bytes of the head per call of the scan's bpf_loop callback, at most (scan_step).
SCAN_CHUNK = 32
# Bytes per call of its path chunk. 16 was first (a chunk of 32 took the verifier a third more
# instructions then); once a call boundary was found to cost about 14 ns, 32 measured 16 ns
# faster on the mix, whose paths are 8 to 23 bytes (541 -> 525 ns, A/B), for 3,300
# verifier instructions more (27,494 -> 30,821 on 6.18.44; docs/design.md).
PATH_SCAN_CHUNK = 32
# The fast paths append path bytes unchecked while the path has room for SCAN_CHUNK more.
assert PATH_SCAN_CHUNK <= SCAN_CHUNK
# The path chunk stores byte j at scratch + len0 + j, len0 known to the verifier only as below
# PATH_MAX: its last store must still fall before the scan's scalars (tables.py).
assert PATH_MAX - 1 + PATH_SCAN_CHUNK <= SCALARS_OFFSET
# Words of eight bytes that scan_step skips at most per call in a state looping on them.
SKIP_WORDS = 4
SPACES, ONES, TOPS = (int.from_bytes(bytes([c]) * 8, "little") for c in (0x20, 0x01, 0x80))


def visible_word(word: int) -> bool:
    """skip_words' test of a little-endian word of eight bytes, in Python: all in 0x20..0x7E?"""
    mask = (1 << 64) - 1
    return ((word - SPACES) & mask | (word + ONES) & mask) & TOPS == 0


# Bytes past `pos` that one call may read: its packet offsets must stay below 64 KiB, or the
# verifier does not grant the loads. A program that tries literals reads LITERAL_BYTES more: one
# may be tried from the byte after the chunk's last (JudgeCore.read_ahead).
READ_AHEAD = max(SCAN_CHUNK, 8 * SKIP_WORDS)
# Bytes of the path per call of path_step.
PATH_CHUNK = 16
# `pending`, what the next call starts with: the byte at `pos` through the slow path; or the
# literals of the state at `pos` (a literal ended there, or the path chunk stopped there); or
# the path byte at `pos` that the general chunk stopped at, through the path chunk where it can
# take it, else the slow path.
PENDING_SLOW, PENDING_LITERAL, PENDING_PATH = 1, 2, 3
# Or the header section that starts at `pos`, compared with the connection's remembered one
# (JudgeCore.memo_section; sk_msg only).
PENDING_MEMO = 4
# A path chunk's stores stay below the remembered section's bytes where the path is no longer
# than MEMO_PATH_MAX (tables.py).
assert MEMO_PATH_MAX + PATH_SCAN_CHUNK <= MEMO_BYTES
# scan_step's exit at the head's end yields END as a mask of the state (slow_out).
assert END == 0
# Literals tried in a row by a call that starts with PENDING_LITERAL (` HTTP/1.1\r\n`, then a
# header name; a method, then a path word: take_path_word).
LITERAL_TRIES = 2
# A method's facts are added on a hit of the first try, which goes on to the next (take_literals).
assert LITERAL_TRIES >= 2


@dataclass(frozen=True)
class Decision:
    """What a complete head decided (JudgeCore.decide): the deciding rule's flags (or the
    default's), its counter slot and reason, where the verdict's bytes end (after the head and a
    Content-Length body; after the head for a chunked body, followed chunk by chunk), and the
    connection's word for the next run (which resumes at a request or a chunk-size line, with
    the body's counter slot in bits 32..63)."""

    flags: ir.Value
    counter: ir.Value
    reason: ir.Value
    end: ir.Value
    word: ir.Value


def exit_block(
    fx: Fn,
    fn: ir.Function,
    name: str,
    scanned: Callable[[], dict[str, ir.Value]],
    pending: int,
) -> ir.Block:
    """A block of scan_step that stores what the call scanned (the fields `scanned()` computes
    in the block, in order, then `pending`: 0, or what the next call starts with: the byte at
    the stored position through the slow path, or literals) and ends the call; the builder
    stays where it was. A block of its own per byte of a chunk: with one shared exit, LLVM
    spilled the exit values to the stack on every byte."""
    b = fx.b
    here = b.block
    out = fn.append_basic_block(name)
    b.position_at_end(out)
    for field, value in scanned().items():
        fx.put(field, value)
    fx.put("pending", pending)
    b.ret(I64(0))
    b.position_at_end(here)
    return out


class JudgeCore:
    def __init__(
        self,
        ob: ObjectBuilder,
        tables: Tables,
        window: int = MAX_SCAN,
        path_chunks: bool = True,
        literals: bool = True,
        fewer_calls: bool = True,
        memo: bool = False,
    ) -> None:
        self.ob = ob
        self.tables = tables
        # The furthest byte of the head the scan may read: the sk_msg backend's packet window
        # (MAX_SCAN); the LSM backend's copy of the head in map memory is smaller (lsm.py).
        self.window = window
        # Walk the path automaton during the scan, in step with the scanner (scan_step's path
        # chunk), rather than over the copied path afterwards. The lsm backend does not: its
        # program verifies closest to the budget, and the path chunk costs instructions.
        self.path_chunks = path_chunks
        # Take literal runs (codegen/literals.py) as two words; the lsm backend does not (its
        # margin again): it walks through states with literals as through any plain state.
        self.literals = literals
        # End the walk in the chunk at the head's end, and go on with the chunk after skipped
        # words, rather than in one more call each (a call costs about 14 ns, docs/design.md);
        # the lsm backend does not (its margin once more).
        self.fewer_calls = fewer_calls
        # Remember a connection's header section and take it whole when the next request
        # repeats it (memo_section, memo_end; tables.MEMO_*): the sk_msg program's, whose
        # connection storage has the room; it needs the literals (a version's literal marks
        # where a section starts).
        self.memo = memo and literals
        self.read_ahead = max(READ_AHEAD, SCAN_CHUNK + LITERAL_BYTES) if literals else READ_AHEAD

    @staticmethod
    def scan(fx: Fn, n: ir.Value, scan_step: ir.Function) -> None:
        """Walk `n` bytes of the head with scan_step. The loop is sized in calls, not bytes: a
        call consumes a byte at least, except one that starts without the slow path and meets
        a byte for it at once (or misses its literals, then meets one): that happens only
        after a call that consumed a byte at least, and at the first call. So two calls take a
        byte at least."""
        b = fx.b
        calls = b.add(b.shl(n, I64(1)), I64(2))
        h.call(b, h.LOOP, b.trunc(calls, I32), scan_step, fx.scan, I64(0))

    @staticmethod
    def start_state(fx: Fn, kind: ir.Value) -> ir.Value:
        """The scanner state a run starts in for the connection's resume kind: a request, a
        chunk-size line, or the CRLF after chunk data."""
        b = fx.b
        return b.select(
            b.icmp_unsigned("==", kind, I64(RESUME_CHUNK_LINE)),
            fx.config("chunk_start"),
            b.select(
                b.icmp_unsigned("==", kind, I64(RESUME_CHUNK_DATA_END)),
                fx.config("chunk_data_end"),
                fx.config("start"),
            ),
        )

    @staticmethod
    def begin(fx: Fn, start: ir.Value, zero: ir.Value, literals: bool = False) -> None:
        """The scan's initial values for a head (or chunk line) read afresh. `zero` comes from
        the tables, not a constant (emit.py says why). With `literals`, the first call of a
        request's head tries the start state's (the methods: codegen/literals.py); a chunk-size
        line's state has none, and its first call does not look."""
        for name in SCAN_SCALARS:
            fx.put(name, zero)
        if literals:
            head = fx.b.icmp_unsigned("==", start, fx.config("start"))
            fx.put("pending", fx.b.select(head, I64(PENDING_LITERAL), zero))
        fx.put("state", start)
        fx.put("rule", I64(NO_RULE))
        fx.put("pstate", fx.config("path_start"))
        for w in range(fx.tables.nw):
            fx.b.store(zero, fx.fact_word(w))

    @staticmethod
    def decide(fx: Fn, path_step: ir.Function, rule_step: ir.Function) -> Decision:
        """After a complete head: the path through the path automaton, then the first candidate
        rule of its final state whose class holds (else the default)."""
        b = fx.b
        # The path bytes the scan's path chunks walked already are not walked again.
        rest = b.sub(fx.get("out_len"), fx.get("pwalked"))
        chunks = b.lshr(b.add(rest, I64(PATH_CHUNK - 1)), I64(PATH_CHUNK.bit_length() - 1))
        h.call(b, h.LOOP, b.trunc(chunks, I32), path_step, fx.scan, I64(0))
        # The final state's candidate word: where its candidate rules are, and how many.
        accepting, index = JudgeCore.comb_slot(
            fx, fx.get("pstate"), b.add(fx.config("path_classes"), I64(1))
        )
        word = b.select(accepting, fx.load_table("cand_words", index, I32), I64(0))
        fx.put("cand_off", b.and_(word, I64((1 << CAND_LENGTH_SHIFT) - 1)))
        count = b.trunc(b.lshr(word, I64(CAND_LENGTH_SHIFT)), I32)
        h.call(b, h.LOOP, count, rule_step, fx.scan, I64(0))
        rule = fx.get("rule")
        matched = b.icmp_unsigned("!=", rule, I64(NO_RULE))
        flags = b.select(
            matched, fx.load_table("rule_flags", rule, I32), fx.config("default_allow")
        )
        counter = b.select(matched, b.add(rule, I64(SLOT_RULES)), I64(SLOT_DEFAULT))
        reason = b.select(matched, I64(Reason.RULE), I64(Reason.DEFAULT))
        pos = fx.get("pos")
        chunked = b.icmp_unsigned("!=", b.and_(fx.get("seen"), I64(FLAG_TE_LINE)), I64(0))
        end = b.select(chunked, pos, b.add(pos, fx.get("cl")))
        nxt = b.select(chunked, I64(RESUME_CHUNK_LINE), I64(RESUME_REQUEST))
        resume = b.or_(b.or_(nxt, I64(CONN_HTTP)), b.shl(counter, I64(32)))
        return Decision(flags, counter, reason, end, resume)

    def path_append(self) -> ir.Function:
        """The slow path's way to add a path byte (scan_step's fast path appends its own while
        the path has room for a whole chunk): past PATH_MAX bytes, the path is too long."""
        fn, b = self.ob.function("sockpol_path_append", I64, [("scan", PTR), ("c", I64)])
        scan, c = fn.args
        fx = Fn.of_scan(b, self.tables, scan)
        length = fx.get("out_len")
        with b.if_else(b.icmp_unsigned(">=", length, I64(PATH_MAX))) as (full, room):
            with full:
                fx.put("path_too_long", 1)
            with room:
                index = b.and_(length, I64(PATH_MAX - 1))
                b.store(b.trunc(c, I8), gep(b, fx.get("scratch"), I8, [index]))
                fx.put("out_len", b.add(length, I64(1)))
        b.ret(I64(0))
        fn.attributes.add("alwaysinline")
        return fn

    # --- bpf_loop callbacks -----------------------------------------------------------------

    def scan_byte(self, append: ir.Function) -> ir.Function:
        """One byte of the head that does more than move the automaton on (the slow path of
        `scan_step`): its facts, Content-Length and chunk-size digits, singleton headers, a path
        byte when the path is near its limit, a terminal state. Takes the byte's index, the
        byte and the state it leads to; stores the state and the position; returns 1 to stop
        the walk."""
        fn, b = self.ob.function(
            "sockpol_scan_byte", I64, [("scan", PTR), ("i", I64), ("byte", I64), ("next", I64)]
        )
        scan, i, byte, nxt = fn.args
        fx = Fn.of_scan(b, self.tables, scan)
        info = fx.load_table("info", nxt, I32)
        nxt_in = nxt

        emit = b.and_(info, I64(0xFFFF))
        with b.if_then(b.icmp_unsigned("!=", emit, I64(0))):
            fx.or_factset(emit)

        # Digits and singleton headers concern a few states; the others skip this block.
        counting = b.append_basic_block("counting")
        counted = b.append_basic_block("counted")
        before = b.block
        b.cbranch(
            b.icmp_unsigned("!=", b.and_(info, I64(COUNTED_FLAGS)), I64(0)), counting, counted
        )
        b.position_at_end(counting)
        # Content-Length digits accumulate; an oversized value refuses the request.
        is_digit = b.icmp_unsigned("!=", b.and_(info, I64(FLAG_CL_DIGIT)), I64(0))
        cl_old = fx.get("cl")
        cl_new = b.select(is_digit, b.sub(b.add(b.mul(cl_old, I64(10)), byte), I64(0x30)), cl_old)
        fx.put("cl", cl_new)
        too_big = b.icmp_unsigned(">", cl_new, I64(CL_MAX))
        nxt = b.select(too_big, fx.small(Reason.BAD_CONTENT_LENGTH), nxt)
        # Digits of a second Content-Length line: a duplicate, whatever its value.
        cl_seen = b.and_(fx.get("seen"), I64(FLAG_CL_LINE))
        second = b.and_(is_digit, b.icmp_unsigned("!=", cl_seen, I64(0)))
        nxt = b.select(second, fx.small(Reason.DUPLICATE_HEADER), nxt)

        # Chunk-size hex digits likewise.
        is_hex = b.icmp_unsigned("!=", b.and_(info, I64(FLAG_HEX_DIGIT)), I64(0))
        chunk_old = fx.get("chunk")
        digit = fx.load_table("hexval", byte, I8)
        chunk_new = b.select(is_hex, b.add(b.shl(chunk_old, I64(4)), digit), chunk_old)
        fx.put("chunk", chunk_new)
        chunk_big = b.icmp_unsigned(">", chunk_new, I64(CHUNK_MAX))
        nxt = b.select(chunk_big, fx.small(Reason.BAD_CHUNK), nxt)

        # Host, Content-Length and Transfer-Encoding may appear once; Content-Length and
        # Transfer-Encoding not together (the classic request-smuggling setup).
        seen = fx.get("seen")
        singles = b.and_(info, I64(SINGLETON_FLAGS))
        dup = b.icmp_unsigned("!=", b.and_(singles, seen), I64(0))
        nxt = b.select(dup, fx.small(Reason.DUPLICATE_HEADER), nxt)
        seen = b.or_(seen, singles)
        fx.put("seen", seen)
        both = I64(FLAG_CL_LINE | FLAG_TE_LINE)
        smuggling = b.icmp_unsigned("==", b.and_(seen, both), both)
        nxt = b.select(smuggling, fx.small(Reason.TRANSFER_ENCODING), nxt)
        after_counting = b.block
        b.branch(counted)
        b.position_at_end(counted)
        merged = b.phi(I64, "next")
        merged.add_incoming(nxt, after_counting)
        merged.add_incoming(nxt_in, before)
        nxt = merged

        with b.if_then(b.icmp_unsigned("!=", b.and_(info, I64(FLAG_PATH_BYTE)), I64(0))):
            self.ob.call(b, append, scan, byte)
        failed = b.icmp_unsigned("!=", fx.get("path_too_long"), I64(0))
        nxt = b.select(failed, fx.small(Reason.PATH_TOO_LONG), nxt)

        fx.put("state", nxt)
        fx.put("pos", b.add(i, I64(1)))
        b.ret(b.zext(b.icmp_unsigned("<", nxt, I64(TERMINAL_STATES)), I64))
        return fn

    def scan_step(self, byte_fn: ir.Function) -> ir.Function:
        """The bpf_loop callback of the scan: up to SCAN_CHUNK bytes of the head from `pos`.

        The fast path keeps the automaton state in registers and does per byte only the
        transition: a byte that leads to a plain state (no facts, no flags) moves on. Path
        bytes are the path chunk's (below), which walks them through the path automaton too;
        the general chunk stops at one (in the lsm program, which has no path chunk, it
        appends it to the path, while the path has room for the whole chunk, and moves on).
        It tells bytes apart by the kind bits of the `trans` entry, with one branch per byte
        besides the window's bounds: in BPF every comparison is a branch, and every branch two
        paths for the verifier. A byte that needs more ends the fast path with `pending` set;
        the next call starts with it in `scan_byte`, the slow path (its one call site, so the
        verifier walks it once), then goes on fast. In a state that loops on all visible ASCII (an
        uninteresting header's value), the call skips words of eight such bytes instead
        (`skip_words`). Two calls consume a byte at least (`scan` sizes the loop so); every
        call starts from memory, so the verifier's walk over the callback converges at once.
        Where a byte leads to a state that has literals (codegen/literals.py), the chunk looks
        the next sixteen bytes up: a hit ends the call at the literal's end, a miss goes on
        (`take_literals`, `literal_lookup`).
        Measurements and what was tried: docs/design.md, "The cost of a request"."""
        fn, b = self.ob.function("sockpol_scan_step", I64, [("index", I32), ("ctx", PTR)])
        _, scan = fn.args
        fx = Fn.of_scan(b, self.tables, scan)
        stop = fn.append_basic_block("stop")
        b.position_at_end(stop)
        b.ret(I64(1))
        data_end = fx.get("data_end")

        tables = self.tables
        kind_bits = I64(TRANS_KIND_SHIFT)

        def transition(row: ir.Value, q: ir.Value) -> tuple[ir.Value, ir.Value]:
            """(byte, the trans entry) for the byte at q from the state whose row (a byte
            offset into `trans`, kind bits above it: tables.TRANS_KIND_SHIFT) is `row`. The
            class's shift is off the chain: it waits on the byte, not on the previous entry."""
            byte = b.zext(b.load(q, typ=I8), I64)
            cls = b.shl(fx.load_flat("classmap", byte, I8), I64(2))
            column = gep(b, fx.base, I8, [b.add(cls, I64(tables.t_offset["trans"]))])
            at = gep(b, column, I8, [b.and_(row, I64(tables.trans_mask))])
            return byte, b.zext(b.load(at, typ=I32), I64)

        def row_of(state: ir.Value) -> ir.Value:
            return b.shl(state, I64(tables.row_shift))

        def state_of(entry: ir.Value) -> ir.Value:
            return b.lshr(b.and_(entry, I64(tables.trans_mask)), I64(tables.row_shift))

        def window(pos: ir.Value, slack: int) -> ir.Value:
            """data + pos, with pos bounded for the verifier (packet offsets, `slack` bytes
            past pos included, must stay below 64 KiB)."""
            bounded = fn.append_basic_block("bounded")
            b.cbranch(b.icmp_unsigned(">", pos, I64(self.window - slack)), stop, bounded)
            b.position_at_end(bounded)
            # Not inbounds: data + pos + j + 1 may point past the window; that is the test.
            return b.gep(fx.get("data"), [pos], source_etype=I8)

        b.position_at_end(fn.blocks[0])
        if self.memo:
            # A call that starts where the request line ended, at its header section.
            memo = fn.append_basic_block("memo")
            not_memo = fn.append_basic_block("not_memo")
            at_section = b.icmp_unsigned("==", fx.get("pending"), I64(PENDING_MEMO))
            b.cbranch(at_section, memo, not_memo)
            b.position_at_end(memo)
            self.memo_section(fx, fn)
            b.position_at_end(not_memo)
        if self.literals:
            # A call that starts where a literal ended (a state that has literals of its own:
            # ` HTTP/1.1\r\n` leads to a header line's start) tries those first.
            trying = fn.append_basic_block("literals")
            tried = fn.append_basic_block("literals_tried")
            first = b.icmp_unsigned("==", fx.get("pending"), I64(PENDING_LITERAL))
            b.cbranch(first, trying, tried)
            b.position_at_end(trying)
            self.take_literals(fx, fn)
            b.branch(tried)
            b.position_at_end(tried)
        # A byte the previous call left to the slow path comes first; so does every byte of the
        # last read_ahead before the window's end, one per call (the fast path reads ahead).
        near_end = I64(self.window - self.read_ahead)
        slow = fn.append_basic_block("slow")
        fast = fn.append_basic_block("fast")
        # So does every byte once the path has less room than a chunk, where the general chunk
        # appends path bytes unchecked (the lsm program; only paths of more than PATH_MAX -
        # SCAN_CHUNK bytes get here). Where the path chunk takes them, only it is kept out
        # (below), and the bytes after such a path still go fast.
        pending = b.icmp_unsigned("!=", fx.get("pending"), I64(0))
        near = b.icmp_unsigned(">", fx.get("pos"), near_end)
        full = b.icmp_unsigned(">=", fx.get("out_len"), I64(PATH_MAX - SCAN_CHUNK))
        if self.path_chunks:
            # A path byte the general chunk stopped at (path_out): the fast path's path chunk
            # takes it where it can (every path byte so far walked, room for a chunk), else the
            # slow path does.
            at_path = b.icmp_unsigned("==", fx.get("pending"), I64(PENDING_PATH))
            walked_all = b.icmp_unsigned("==", fx.get("pwalked"), fx.get("out_len"))
            chunk_takes = b.and_(at_path, b.and_(walked_all, b.not_(full)))
            to_slow = b.or_(b.and_(pending, b.not_(chunk_takes)), near)
        else:
            to_slow = b.or_(b.or_(pending, near), full)
        b.cbranch(to_slow, slow, fast)
        b.position_at_end(slow)
        fx.put("pending", I64(0))
        pos = fx.get("pos")
        p = window(pos, 1)
        in_window = fn.append_basic_block("slow_in_window")
        beyond = b.icmp_unsigned(">", b.gep(p, [I64(1)], source_etype=I8), data_end)
        pulled = b.icmp_unsigned(">=", pos, fx.get("limit"))  # the fast path leaves it here
        b.cbranch(b.or_(beyond, pulled), stop, in_window)
        b.position_at_end(in_window)
        byte, entry = transition(row_of(fx.get("state")), p)
        done = self.ob.call(b, byte_fn, scan, pos, byte, state_of(entry))
        go_on = fn.append_basic_block("go_on")
        b.cbranch(b.icmp_unsigned("!=", done, I64(0)), stop, go_on)
        b.position_at_end(go_on)
        next_call = fn.append_basic_block("next_call")
        far = b.icmp_unsigned(">", fx.get("pos"), near_end)
        if not self.path_chunks:
            full = b.icmp_unsigned(">=", fx.get("out_len"), I64(PATH_MAX - SCAN_CHUNK))
            far = b.or_(far, full)
        b.cbranch(far, next_call, fast)
        b.position_at_end(next_call)
        b.ret(I64(0))

        # Then the fast path, from memory (scan_byte stored its state and position).
        b.position_at_end(fast)
        pos = fx.get("pos")
        p = window(pos, self.read_ahead)
        limit = fx.get("limit")

        def reenter() -> tuple[ir.Value, ir.Value]:
            """The position stored, read back behind a barrier for a chunk that goes on in
            the same call; a position within the last read_ahead bytes of the window is the
            next call's (its slow path's), as at a call's start (a chunk from there would stop
            the walk at the window's test: tests/kernel/test_differential.py, heads that end
            in the window's last bytes)."""
            h.memory_barrier(b)
            at = fx.get("pos")
            on = fn.append_basic_block("reentered")
            b.cbranch(b.icmp_unsigned(">", at, near_end), next_call, on)
            b.position_at_end(on)
            return at, window(at, self.read_ahead)

        skipped = self.skip_words(fx, fn, pos, p, limit, data_end)
        if skipped is not None:
            # After skipped words, the chunk goes on from there in the same call. Its position
            # is read back from memory behind a barrier (LLVM would reuse the sum it stored):
            # then the verifier sees the same unknown, bounded by the same test, on both ways
            # into the chunk, and walks the chunk once for both (a chunk that went on from the
            # sum cost it 67,000 instructions; this, 1,400, and 5,500 more for the call's end
            # after four words, skip_words).
            bytewise = b.block
            join = fn.append_basic_block("skip_join")
            b.branch(join)
            b.position_at_end(skipped)
            pos2, p2 = reenter()
            from_skip = b.block
            b.branch(join)
            b.position_at_end(join)
            pos_phi = b.phi(I64, "pos_after_skip")
            pos_phi.add_incoming(pos, bytewise)
            pos_phi.add_incoming(pos2, from_skip)
            p_phi = b.phi(PTR, "p_after_skip")
            p_phi.add_incoming(p, bytewise)
            p_phi.add_incoming(p2, from_skip)
            pos, p = pos_phi, p_phi
        scratch = fx.get("scratch")
        # The path's length bounded where the verifier sees it: LLVM knows it below PATH_MAX -
        # SCAN_CHUNK from the test above and would drop the mask, and 6.1's verifier loses that
        # bound when the register is spilled before the test (helpers.opaque).
        len0 = b.and_(h.opaque(b, fx.get("out_len")), I64(PATH_MAX - 1))
        # Where the path chunk takes path bytes, a full path gets here too (the tests above
        # let the general chunk take the bytes after it): then len0 is not the path's length
        # (PATH_MAX wraps to 0), so the general chunk stores no length (it appends nothing),
        # and whether the path has room for the path chunk is a bit of the length, computed
        # where the verifier does not follow it (a comparison would split what it knows of the
        # length where the chunks begin, and it walked the chunks once for each part: the
        # every-feature policy went from 35,270 to 59,754 instructions on 6.18.44).
        appends = not (self.path_chunks and self.literals)

        def below(limit: int, value: ir.Value) -> ir.Value:
            """1 where value < limit, else 0 (the difference wraps: its top bit)."""
            return b.lshr(h.opaque(b, b.sub(value, I64(limit))), I64(63))

        room = below(PATH_MAX - SCAN_CHUNK, fx.get("out_len"))
        state0 = fx.get("state")
        if self.path_chunks:
            # In or before the path, with every path byte so far walked: the path chunk.
            general = fn.append_basic_block("general")
            in_path = fn.append_basic_block("path_chunk")
            kind0 = fx.load_flat("state_kind", state0, I8)
            path_state = b.icmp_unsigned("!=", b.and_(kind0, I64(STATE_PATH_NEXT)), I64(0))
            walked = b.icmp_unsigned("==", fx.get("pwalked"), len0)
            # It appends path bytes unchecked: not where the path has less room than a chunk.
            has_room = b.icmp_unsigned("!=", room, I64(0))
            b.cbranch(b.and_(b.and_(path_state, walked), has_room), in_path, general)
            b.position_at_end(in_path)
            self.path_chunk(
                fx, fn, pos, p, data_end, scratch, len0, row_of(state0), state_of, transition
            )
            b.position_at_end(general)

        def leave(row: ir.Value, j: int, out_len: ir.Value) -> ir.Block:
            def scanned() -> dict[str, ir.Value]:
                moved = {"state": state_of(row), "pos": b.add(pos, I64(j))}
                return moved | ({"out_len": out_len} if appends else {})

            return exit_block(fx, fn, f"out{j}", scanned, PENDING_SLOW if j < SCAN_CHUNK else 0)

        def slow_out(j: int, out_len: ir.Value, entry: ir.Value) -> ir.Block:
            """The exit for byte j, which leads to a state that the fast path does not take:
            left to the next call's slow path, or, for the head's end (END is state 0 and has
            no facts or flags, so its `trans` entry is 0), the walk's end: state END, `pos`
            past the byte, and 1 returned. Without a branch (`entry - 1` has its top bit set
            only for 0): a branch here cost the verifier 8,000 instructions more, the
            arithmetic 3,000 (orders-api, 6.18.44)."""
            here = b.block
            blk = fn.append_basic_block(f"slow_out{j}")
            b.position_at_end(blk)
            end = b.lshr(h.opaque(b, b.sub(entry, I64(1))), I64(63))
            fx.put("state", b.and_(state_of(row), b.sub(end, I64(1))))
            fx.put("pos", b.add(pos, b.add(I64(j), end)))
            if appends:
                fx.put("out_len", out_len)
            fx.put("pending", I64(PENDING_SLOW))
            b.ret(end)
            b.position_at_end(here)
            return blk

        def leave_after_literal(
            target: ir.Value, j: int, length: ir.Value, out_len: ir.Value
        ) -> ir.Block:
            def scanned() -> dict[str, ir.Value]:
                at = b.add(b.add(pos, I64(j)), length)
                return {"state": target, "pos": at} | ({"out_len": out_len} if appends else {})

            # The next call tries the literals of the literal's end first. (Where it has none,
            # that lookup misses; telling it from the entry, stored there, cost the verifier
            # 4,500 instructions more on 6.18.44, so it is not.)
            return exit_block(fx, fn, f"lit_out{j}", scanned, PENDING_LITERAL)

        def path_out(row: ir.Value, j: int) -> ir.Block:
            """The exit for byte j, a path byte, where the path chunk takes them: PENDING_PATH.
            The next call starts at the byte with the path chunk, or, where the path chunk
            cannot take it, with the slow path (one call a byte for the rest of the path):
            where the path has less room than a chunk (paths of PATH_MAX - SCAN_CHUNK bytes and
            more; the bytes after the path go fast again), and where some path byte was not
            walked (only the sk_skb program: a head whose earlier skb left path bytes of its
            window's last read_ahead bytes to the slow path, resumed in the next skb). Decided
            there, where those values are read anyway: computed here, they were live across the
            whole chunk, and the verifier's count rose by 4,000 to 8,000. Either way the next
            call takes the byte, so two calls still take a byte at least."""
            here = b.block
            blk = fn.append_basic_block(f"path_byte_out{j}")
            b.position_at_end(blk)
            fx.put("state", state_of(row))
            fx.put("pos", b.add(pos, I64(j)))
            fx.put("pending", I64(PENDING_PATH))
            b.ret(I64(0))
            b.position_at_end(here)
            return blk

        # SCAN_CHUNK bytes unrolled, each checked against the window. The window ends where the
        # bytes pulled end: bpf_msg_pull_data(msg, 0, n) leaves data_end at data + n (net/core/
        # filter.c, every kernel), so one check (the verifier needs it for the load) is both;
        # the slow path checks `limit` as well. An exit leaves the byte pending: the next
        # call's slow path takes it, or stops at the window or the limit.
        # (Checking a whole chunk once, with a second unrolled copy for a head's last chunk,
        # measured no faster and cost the verifier half as much again.)
        row, out_len = row_of(state0), len0
        for j in range(SCAN_CHUNK):
            inside = fn.append_basic_block(f"in{j}")
            q_end = b.gep(p, [I64(j + 1)], source_etype=I8)
            out = leave(row, j, out_len)
            # The next byte is the likely way (as in the path chunk): laid out after the test.
            b.cbranch(b.icmp_unsigned(">", q_end, data_end), out, inside).set_weights([1, 64])
            b.position_at_end(inside)
            byte, entry = transition(row, b.gep(p, [I64(j)], source_etype=I8))
            kind = b.lshr(entry, kind_bits)  # the next state's PLAIN, PATH and LITERAL bits
            moves = fn.append_basic_block(f"moves{j}")
            if appends:
                # 1 for PATH, 0 for PLAIN (5 too); computed before the branches, so that `kind`
                # is dead where a missed literal rejoins (the verifier then prunes it there).
                path_byte = b.and_(b.lshr(kind, I64(1)), I64(1))
            if self.literals:
                # PLAIN (1) moves on; slow (0) and PLAIN with literals (5) stop; PATH (2) moves
                # on where there is no path chunk, and stops where there is one: this chunk then
                # does not append the bytes it takes (header bytes, mostly) to the path.
                stops = fn.append_basic_block(f"stops{j}")
                if appends:
                    moving = b.icmp_unsigned("<", b.sub(kind, I64(1)), I64(2))
                else:
                    moving = b.icmp_unsigned("==", kind, I64(STATE_PLAIN))
                b.cbranch(moving, moves, stops)
                b.position_at_end(stops)
                trying = fn.append_basic_block(f"lit_try{j}")
                looking = fn.append_basic_block(f"lit_look{j}")
                slow = slow_out(j, out_len, entry) if self.fewer_calls else out
                if not appends:
                    not_slow = fn.append_basic_block(f"not_slow{j}")
                    b.cbranch(b.icmp_unsigned("==", kind, I64(0)), slow, not_slow)
                    b.position_at_end(not_slow)
                    path = b.icmp_unsigned("==", kind, I64(STATE_PATH))
                    b.cbranch(path, path_out(row, j), trying)
                else:
                    b.cbranch(b.icmp_unsigned("==", kind, I64(0)), slow, trying)
                # A state with literals: one tried here, from the byte after; a miss goes on
                # with the chunk, a hit ends the call (the next tries another from there).
                b.position_at_end(trying)
                # A pointer of its own (the offset hidden from LLVM, which would fold it into
                # p + j + 1): its bounds check must not widen what the verifier knows of p, or
                # the path of a miss never matches the chunk's own where they meet again.
                q = b.gep(fx.get("data"), [h.opaque(b, b.add(pos, I64(j + 1)))], source_etype=I8)
                short = b.icmp_unsigned(
                    ">", b.gep(q, [I64(LITERAL_BYTES)], source_etype=I8), data_end
                )
                b.cbranch(short, moves, looking)
                b.position_at_end(looking)
                mul = fx.load_flat("lit_mul", I64(0), I64)
                hit, target, length, _ = self.literal_lookup(fx, q, state_of(entry), mul)
                b.cbranch(hit, leave_after_literal(target, j + 1, length, out_len), moves)
            else:
                b.cbranch(b.icmp_unsigned("==", kind, I64(0)), out, moves)
            b.position_at_end(moves)
            if appends:
                # Stored whether or not it is a path byte: past the path's end, a byte that is
                # not one is overwritten or ignored (the path is the first out_len bytes).
                at_len = gep(b, scratch, I8, [b.and_(out_len, I64(PATH_MAX - 1))])
                b.store(b.trunc(byte, I8), at_len)
                out_len = b.add(out_len, path_byte)
            row = entry
        b.branch(leave(row, SCAN_CHUNK, out_len))  # the next call goes on
        return fn

    def path_chunk(
        self, fx: Fn, fn: ir.Function, pos, p, data_end, scratch, len0, row, state_of, transition
    ) -> None:
        """scan_step's fast path for a call that starts in the path: up to PATH_SCAN_CHUNK path
        bytes, each through the scanner and the path automaton at once. The two chains of
        dependent loads are independent, so the CPU overlaps them, where the path walk after
        the scan (path_step) costs as much again per path byte. The first byte that is not a
        path byte ends the call (pending: the next call's slow path takes it). `pwalked` says
        how many path bytes the path automaton has seen: path bytes taken by the slow path
        (the last bytes before PATH_MAX, and those of an sk_skb window's last bytes) are not
        walked here, and `decide` walks what is left."""
        b = fx.b

        def leave(
            row: ir.Value, j: int, walked: int, pstate: ir.Value, literals: bool = False
        ) -> ir.Block:
            """End the call before byte j, in the state of `row`, after `walked` path bytes:
            with byte j left to the slow path (j < PATH_SCAN_CHUNK) or, with `literals`, the
            state's literals first. The path's length is computed in the exit (len0 + walked),
            not carried along the chunk: LLVM kept each byte's sum live for its exits, a reload
            and an add per byte."""

            def scanned() -> dict[str, ir.Value]:
                out_len = b.add(len0, I64(walked))
                return {
                    "state": state_of(row),
                    "pos": b.add(pos, I64(j)),
                    "out_len": out_len,
                    "pwalked": out_len,
                    "pstate": pstate,
                }

            if literals:
                return exit_block(fx, fn, f"path_lit_out{j}", scanned, PENDING_LITERAL)
            return exit_block(
                fx, fn, f"path_out{j}", scanned, PENDING_SLOW if j < PATH_SCAN_CHUNK else 0
            )

        pstate = fx.get("pstate")
        # Byte j goes to `at + j`: one address for the chunk, each byte's store a displacement
        # from it. len0 is below PATH_MAX - SCAN_CHUNK here (the call's start tested the
        # path's room), so no byte of the chunk wraps as `(len0 + j) & (PATH_MAX - 1)` would.
        at = gep(b, scratch, I8, [len0])
        # The comb's slots through a pointer of their own: their offset in the tables is past
        # a load's 16-bit displacement, and LLVM added it to every slot's address.
        slots = fx.flat_base("path_slots")
        for j in range(PATH_SCAN_CHUNK):
            inside = fn.append_basic_block(f"path_in{j}")
            q_end = b.gep(p, [I64(j + 1)], source_etype=I8)
            out = leave(row, j, j, pstate)
            # Weights: the next byte is the likely way, so LLVM lays it out after the test
            # instead of the exit, and each test needs no jump of its own to go on.
            b.cbranch(b.icmp_unsigned(">", q_end, data_end), out, inside).set_weights([1, 64])
            b.position_at_end(inside)
            byte, entry = transition(row, b.gep(p, [I64(j)], source_etype=I8))
            moves = fn.append_basic_block(f"path_moves{j}")
            kind = b.lshr(entry, I64(TRANS_KIND_SHIFT))
            if self.literals:  # the SP after the path leads to ` HTTP/1.1\r\n`'s state
                stops = fn.append_basic_block(f"path_stops{j}")
                b.cbranch(b.icmp_unsigned("==", kind, I64(STATE_PATH)), moves, stops)
                b.position_at_end(stops)
                literal = b.icmp_unsigned("!=", b.and_(entry, I64(LITERAL_BIT)), I64(0))
                b.cbranch(literal, leave(entry, j + 1, j, pstate, literals=True), out)
            else:
                b.cbranch(b.icmp_unsigned("!=", kind, I64(STATE_PATH)), out, moves)
            b.position_at_end(moves)
            b.store(b.trunc(byte, I8), gep(b, at, I8, [I64(j)]))
            pstate = self.path_transition(fx, pstate, byte, slots)
            row = entry
        b.branch(leave(row, PATH_SCAN_CHUNK, PATH_SCAN_CHUNK, pstate))

    def take_literals(self, fx: Fn, fn: ir.Function) -> None:
        """scan_step's start when the state at `pos` has literals (codegen/literals.py): up to
        LITERAL_TRIES in a row, each two words of the head compared with the entry that the
        state and the first word hash to; a hit moves the state to the literal's end and `pos`
        past it. Stores the state and position and clears `pending`; the builder is left in
        the block after (the call goes on as any other, from memory)."""
        b = fx.b
        data, data_end = fx.get("data"), fx.get("data_end")
        mul = fx.load_flat("lit_mul", I64(0), I64)
        state, pos = fx.get("state"), fx.get("pos")
        here = b.block
        done = fn.append_basic_block("literals_done")
        b.position_at_end(done)
        end_state, end_pos = b.phi(I64, "lit_state"), b.phi(I64, "lit_pos")
        b.position_at_end(here)
        # The start state's key is four bytes (methods, literals.key_word): the mask without a
        # branch (`state ^ start` is 0 only there, and below 2**32).
        is_start = b.lshr(h.opaque(b, b.sub(b.xor(state, fx.config("start")), I64(1))), I64(63))
        short_key = I64(((1 << 64) - 1) ^ ((1 << 8 * METHOD_KEY_BYTES) - 1))
        key_mask = b.xor(b.mul(is_start, short_key), I64((1 << 64) - 1))
        for k in range(LITERAL_TRIES):
            bounded = fn.append_basic_block(f"lit{k}_bounded")
            inside = fn.append_basic_block(f"lit{k}")
            end_state.add_incoming(state, b.block)
            end_pos.add_incoming(pos, b.block)
            b.cbranch(b.icmp_unsigned(">", pos, I64(self.window - LITERAL_BYTES)), done, bounded)
            b.position_at_end(bounded)
            p = b.gep(data, [pos], source_etype=I8)
            end_state.add_incoming(state, b.block)
            end_pos.add_incoming(pos, b.block)
            beyond = b.icmp_unsigned(">", b.gep(p, [I64(LITERAL_BYTES)], source_etype=I8), data_end)
            b.cbranch(beyond, done, inside)
            b.position_at_end(inside)
            # Only the first try can be from the start state (no literal ends there).
            hit, e_target, e_len, e_facts = self.literal_lookup(
                fx, p, state, mul, key_mask if k == 0 else None
            )
            if k + 1 < LITERAL_TRIES:
                go_on = fn.append_basic_block(f"lit{k}_hit")
                end_state.add_incoming(state, b.block)
                end_pos.add_incoming(pos, b.block)
                b.cbranch(hit, go_on, done)
                b.position_at_end(go_on)
                if k == 0:  # a method's facts, as the slow path adds them at its SP (else 0)
                    fx.or_factset(e_facts)
                if k == 0 and self.memo:
                    # The request line's end (a version with its CRLF): the header section
                    # starts here; the next call compares it with the remembered one.
                    section = fn.append_basic_block("section_starts")
                    on = fn.append_basic_block("lit0_on")
                    marked = b.and_(e_facts, I64(SECTION_MARK))
                    b.cbranch(b.icmp_unsigned("!=", marked, I64(0)), section, on)
                    b.position_at_end(section)
                    fx.put("state", e_target)
                    fx.put("pos", b.add(pos, e_len))
                    fx.put("pending", PENDING_MEMO)
                    b.ret(I64(0))
                    b.position_at_end(on)
                state, pos = e_target, b.add(pos, e_len)
            else:
                if self.path_chunks:
                    hit = self.take_path_word(fx, p, hit, e_facts)
                state = b.select(hit, e_target, state)
                pos = b.select(hit, b.add(pos, e_len), pos)
        end_state.add_incoming(state, b.block)
        end_pos.add_incoming(pos, b.block)
        b.branch(done)
        b.position_at_end(done)
        fx.put("state", end_state)
        fx.put("pos", end_pos)
        fx.put("pending", I64(0))

    @staticmethod
    def take_path_word(fx: Fn, p: ir.Value, hit: ir.Value, mark: ir.Value) -> ir.Value:
        """A literal after a method's SP may be a path word (literals.PATH_WORD in `mark`, its
        entry's word 7): the first eight bytes of the request target, which the path chunk
        would walk one by one through the scanner and the path automaton. Taking it, the path
        is those eight bytes, all walked, and the path automaton's state is the entry's. Only
        on an empty path (it is: a method starts the head; the test keeps it so whatever
        calls this). Without a branch: the word's bytes, the path's length and the path
        automaton's state are written either way, with their old values on a miss (a branch
        here would join before the rest of scan_step, and the verifier walk it twice).
        Returns whether the literal, path word or not, is taken."""
        b = fx.b
        out_len = fx.get("out_len")
        is_word = b.icmp_unsigned("!=", b.and_(mark, I64(PATH_WORD)), I64(0))
        empty = b.icmp_unsigned("==", out_len, I64(0))
        word_hit = b.and_(hit, b.and_(is_word, empty))
        at = fx.get("scratch")
        old = b.load(at, typ=I64, align=8)
        b.store(b.select(word_hit, b.load(p, typ=I64, align=8), old), at, align=8)
        walked = b.select(word_hit, I64(PATH_WORD_BYTES), out_len)
        fx.put("out_len", walked)
        fx.put("pwalked", b.select(word_hit, walked, fx.get("pwalked")))
        pstate = b.and_(b.lshr(mark, I64(PATH_STATE_SHIFT)), I64(PAYLOAD_MASK))
        fx.put("pstate", b.select(word_hit, pstate, fx.get("pstate")))
        return b.and_(hit, b.or_(b.not_(is_word), empty))

    def memo_section(self, fx: Fn, fn: ir.Function) -> None:
        """scan_step's start at a header section (PENDING_MEMO, tables.MEMO_*): where the
        connection remembers a section under these tables, from this state, compare it with
        the next bytes, eight at a time and without a branch on the bytes (XOR'd, OR'd), then
        take its outcome or mark this one to be remembered (memo_finish). The words' tests
        join in one block, and the verifier walks what follows once per word (it compares
        its states inside the callback's loop exactly, registers that are dead included):
        memo_finish is short and branch-free, and the join is behind a barrier."""
        b = fx.b
        at = fx.work

        def leave(name: str, forget: bool = False) -> ir.Block:
            """An end of the call that neither takes nor remembers the section."""
            block = fn.append_basic_block(name)
            here = b.block
            b.position_at_end(block)
            if forget:
                b.store(I64(0), at(MEMO_TAG))
            fx.put("pending", PENDING_LITERAL)
            b.ret(I64(0))
            b.position_at_end(here)
            return block

        pos, state = fx.get("pos"), fx.get("state")
        # A path long enough to reach the remembered bytes may have written over them.
        short = fn.append_basic_block("memo_short_path")
        too_long = b.icmp_unsigned(">", fx.get("out_len"), I64(MEMO_PATH_MAX))
        b.cbranch(too_long, leave("memo_forget", forget=True), short)
        b.position_at_end(short)
        # The request line sets no singleton flag and no Content-Length: a section's outcome
        # starts from none (checked all the same: then it is neither taken nor remembered).
        unmarked = leave("memo_unmarked")
        clean = b.icmp_unsigned("==", b.or_(fx.get("seen"), fx.get("cl")), I64(0))
        is_clean = fn.append_basic_block("memo_clean")
        bounded = fn.append_basic_block("memo_bounded")
        b.cbranch(clean, is_clean, unmarked)
        b.position_at_end(is_clean)
        near = b.icmp_unsigned(">", pos, I64(self.window - MEMO_MAX - 8))
        b.cbranch(near, unmarked, bounded)  # a branch of its own: the verifier's bound on pos
        b.position_at_end(bounded)

        compared = fn.append_basic_block("memo_compared")
        b.position_at_end(compared)
        diff = b.phi(I64, "memo_diff")
        h.memory_barrier(b)
        self.memo_finish(fx, diff)

        b.position_at_end(bounded)
        tag = self.memo_key(fx)
        same = b.and_(
            b.icmp_unsigned("==", b.load(at(MEMO_TAG), typ=I64), tag),
            b.icmp_unsigned("==", b.load(at(MEMO_FROM), typ=I64), state),
        )
        compare = fn.append_basic_block("memo_compare")
        diff.add_incoming(I64(1), b.block)  # nothing remembered here: a difference
        b.cbranch(same, compare, compared)
        b.position_at_end(compare)
        acc = I64(0)

        def compare_word(head: ir.Value, offset: ir.Value) -> None:
            nonlocal acc
            remembered = b.load(at(b.add(offset, I64(MEMO_BYTES))), typ=I64, align=8)
            acc = b.or_(acc, b.xor(b.load(head, typ=I64, align=8), remembered))

        def ends() -> None:
            diff.add_incoming(acc, b.block)

        diff.add_incoming(I64(1), b.block)  # the head is shorter than the section: it differs
        length = b.load(at(MEMO_LEN), typ=I64)
        self.section_words(
            fx, fn, pos, length, compare_word, ends, done=compared, short=compared, outside=unmarked
        )
        b.branch(compared)

    def section_words(
        self,
        fx: Fn,
        fn: ir.Function,
        start: ir.Value,
        length: ir.Value,
        visit: Callable[[ir.Value, ir.Value], None],
        leaving: Callable[[], None],
        done: ir.Block,
        short: ir.Block,
        outside: ir.Block | None = None,
    ) -> None:
        """The words of the `length` bytes (8 to MEMO_MAX) of the head at `start` (below
        window - MEMO_MAX - 8: the caller's test), for memo_section's compare and memo_end's
        copy: `visit(pointer, offset)` on the last eight bytes first (they overlap the last
        whole word where the length is not a multiple of eight), then on every whole word,
        unrolled; `leaving()` before each way to `done` (once the words are done: the caller
        branches there after the last). A head shorter than `length` goes to `short`; the
        words' own tests, within the last eight bytes' bound and so never taken, which the
        verifier needs, to `outside` (`short` where None)."""
        b = fx.b
        data, data_end = fx.get("data"), fx.get("data_end")
        # Opaque: LLVM would rebuild the pointers from other sums, which the verifier refuses;
        # each is bounded by its own test (the verifier grants loads only through the pointer
        # it tested, and LLVM would fold the test's + 8 into the offset).
        p = b.gep(data, [h.opaque(b, start)], source_etype=I8)
        tail = b.and_(b.sub(length, I64(8)), I64(MEMO_MAX - 1))
        q = b.gep(data, [h.opaque(b, b.add(start, tail))], source_etype=I8)
        tail_in = fn.append_basic_block("section_tail")
        b.cbranch(
            b.icmp_unsigned(">", b.gep(q, [I64(8)], source_etype=I8), data_end), short, tail_in
        )
        b.position_at_end(tail_in)
        visit(q, tail)
        words = b.lshr(length, I64(3))
        for k in range(MEMO_MAX // 8):
            more = fn.append_basic_block(f"section_w{k}")
            leaving()
            b.cbranch(b.icmp_unsigned("<=", words, I64(k)), done, more)
            b.position_at_end(more)
            inside = fn.append_basic_block(f"section_w{k}_in")
            end_k = b.gep(p, [I64(8 * k + 8)], source_etype=I8)
            b.cbranch(b.icmp_unsigned(">", end_k, data_end), outside or short, inside)
            b.position_at_end(inside)
            visit(b.gep(p, [I64(8 * k)], source_etype=I8), I64(8 * k))
        leaving()

    def memo_finish(self, fx: Fn, diff: ir.Value) -> None:
        """The end of memo_section's call: `diff` 0, and the remembered outcome is taken (the
        section's facts added, its singleton flags and Content-Length, the head's end; the
        walk ends); else this run's section is marked to be remembered (the request line's
        facts set aside, so that the fact words gather the section's alone: memo_end), and
        the next call tries the state's literals, as after any literal. Without a branch:
        `taken` is all ones or zero."""
        b = fx.b
        at = fx.work
        # All ones where diff is 0: (diff | -diff) has its top bit set for any other value.
        taken = b.sub(b.lshr(b.or_(diff, b.neg(diff)), I64(63)), I64(1))
        kept = b.not_(taken)
        for w in range(fx.tables.nw):
            line = b.load(fx.fact_word(w), typ=I64)
            b.store(line, at(MEMO_F0 + 8 * w))
            added = b.and_(b.load(at(MEMO_FACTS + 8 * w), typ=I64), taken)
            b.store(b.and_(b.or_(line, added), taken), fx.fact_word(w))
        # seen and cl are 0 here (memo_section).
        fx.put("seen", b.and_(b.load(at(MEMO_SEEN), typ=I64), taken))
        fx.put("cl", b.and_(b.load(at(MEMO_CL), typ=I64), taken))
        pos, state = fx.get("pos"), fx.get("state")
        fx.put("memo_at", pos)
        fx.put("memo_from", state)
        fx.put("memo_mark", b.and_(kept, I64(1)))
        fx.put("pos", b.add(pos, b.and_(b.load(at(MEMO_LEN), typ=I64), taken)))
        assert END == 0
        fx.put("state", b.and_(state, kept))
        fx.put("pending", b.and_(fx.small(PENDING_LITERAL), kept))
        b.ret(b.and_(taken, I64(1)))

    @staticmethod
    def memo_key(fx: Fn) -> ir.Value:
        """The tag of a section this program remembers under these tables (tables.MEMO_TAG):
        their digest and the program's serial."""
        return fx.b.xor(fx.load_flat("memo_tag", I64(0), I64), fx.get("serial"))

    def memo_end(self) -> ir.Function:
        """After the scan (sockpol_msg): a run that marked its header section (memo_section)
        and ended the head remembers it, with what it added (the fact words then hold the
        section's facts alone), then puts the request line's facts back. Any run whose path
        may have reached the remembered bytes forgets them. A function of its own, called
        once: tests/bpfemu.py runs it as the kernel does."""
        fn, b = self.ob.function("sockpol_memo_end", I64, [("ctx", PTR)])
        fn.attributes.add("noinline")
        (ctx,) = fn.args
        fx = Fn.of_scan(b, self.tables, ctx)
        at = fx.work
        with b.if_then(b.icmp_unsigned(">", fx.get("out_len"), I64(MEMO_PATH_MAX))):
            b.store(I64(0), at(MEMO_TAG))
        marked = fn.append_basic_block("marked")
        done = fn.append_basic_block("done")
        b.cbranch(b.icmp_unsigned("!=", fx.get("memo_mark"), I64(0)), marked, done)
        b.position_at_end(done)
        b.ret(I64(0))

        restore = fn.append_basic_block("restore")
        b.position_at_end(restore)
        for w in range(fx.tables.nw):
            line = b.load(at(MEMO_F0 + 8 * w), typ=I64)
            b.store(b.or_(b.load(fx.fact_word(w), typ=I64), line), fx.fact_word(w))
        b.ret(I64(0))

        b.position_at_end(marked)
        start = fx.get("memo_at")
        length = b.sub(fx.get("pos"), start)
        ended = b.icmp_unsigned("==", fx.get("state"), I64(END))
        fits = b.icmp_unsigned("<=", b.sub(length, I64(8)), I64(MEMO_MAX - 8))
        near = b.icmp_unsigned(">", start, I64(self.window - MEMO_MAX - 8))
        copy = fn.append_basic_block("copy")
        near_ok = fn.append_basic_block("copy_bounded")
        b.store(I64(0), at(MEMO_TAG))  # rewritten below, or no section remembered
        b.cbranch(b.and_(ended, fits), near_ok, restore)
        b.position_at_end(near_ok)
        b.cbranch(near, restore, copy)  # a branch of its own: the verifier's bound on start
        b.position_at_end(copy)
        copied = fn.append_basic_block("copied")

        def copy_word(head: ir.Value, offset: ir.Value) -> None:
            word = b.load(head, typ=I64, align=8)
            b.store(word, at(b.add(offset, I64(MEMO_BYTES))), align=8)

        # The length's mask must stay: LLVM knows its range from the test above, the verifier
        # does not (it is pos - start), hence opaque.
        self.section_words(
            fx, fn, start, h.opaque(b, length), copy_word, lambda: None, done=copied, short=restore
        )
        b.branch(copied)
        b.position_at_end(copied)
        h.memory_barrier(b)  # as in memo_section: the length is read back, not carried
        for w in range(fx.tables.nw):
            b.store(b.load(fx.fact_word(w), typ=I64), at(MEMO_FACTS + 8 * w))
        b.store(fx.get("seen"), at(MEMO_SEEN))
        b.store(fx.get("cl"), at(MEMO_CL))
        b.store(b.sub(fx.get("pos"), fx.get("memo_at")), at(MEMO_LEN))
        b.store(fx.get("memo_from"), at(MEMO_FROM))
        b.store(self.memo_key(fx), at(MEMO_TAG))
        b.branch(restore)
        return fn

    @staticmethod
    def literal_lookup(
        fx: Fn, p: ir.Value, state: ir.Value, mul: ir.Value, key_mask: ir.Value | None = None
    ) -> tuple[ir.Value, ir.Value, ir.Value, ir.Value]:
        """(hit, the literal's end state, its length, its fact set) for the head at `p`
        (LITERAL_BYTES readable: the caller checked) from `state`: two words compared, masked,
        with the entry that the state and the first word (masked with `key_mask`:
        literals.key_word) hash to (literals.slot_of)."""
        b = fx.b
        # Eight-byte loads, as in skip_words (align 8: BPF has no unaligned type).
        w1 = b.load(p, typ=I64, align=8)
        w2 = b.load(b.gep(p, [I64(8)], source_etype=I8), typ=I64, align=8)
        key_part = w1 if key_mask is None else b.and_(w1, key_mask)
        key = b.add(key_part, b.mul(state, I64(STATE_MIX)))
        slot = b.lshr(b.mul(key, mul), I64(64 - LITERAL_BITS))

        def word(i: int) -> ir.Value:
            first = b.mul(slot, I64(ENTRY_WORDS))  # a shift: ENTRY_WORDS is a power of two
            return fx.load_flat("literals", b.add(first, I64(i)), I64)

        e_w1, e_m1, e_w2, e_m2, e_state, e_target, e_len = (word(i) for i in range(7))
        hit = b.and_(
            b.and_(
                b.icmp_unsigned("==", b.and_(w1, e_m1), e_w1),
                b.icmp_unsigned("==", b.and_(w2, e_m2), e_w2),
            ),
            b.icmp_unsigned("==", e_state, state),
        )
        return hit, e_target, e_len, word(7)

    def skip_words(self, fx: Fn, fn: ir.Function, pos, p, limit, data_end) -> ir.Block | None:
        """In a state that loops on every byte from 0x20 to 0x7E (a header value no condition
        looks at: User-Agent, Cookie...), skip such bytes eight at a time: a word is all
        visible ASCII or space iff no byte is below 0x20 or above 0x7E, which two word
        operations tell at once (`visible_word`, its Python twin, is tested). Up to SKIP_WORDS
        words, then `pos` is stored (the state is unchanged) and the call ends; with
        `fewer_calls`, where fewer than SKIP_WORDS words were skipped (the value ended, or the
        bytes did), the block after that store is returned, unterminated, for the chunk to go
        on from. A
        state that does not loop, or a first word that does not qualify, goes on to the
        byte-wise chunk where the builder is left."""
        b = fx.b
        kind = fx.load_table("state_kind", fx.get("state"), I8)
        skipping = fn.append_basic_block("skip")
        bytewise = fn.append_basic_block("bytewise")
        loops = b.icmp_unsigned("!=", b.and_(kind, I64(STATE_VALUE_LOOP)), I64(0))
        b.cbranch(loops, skipping, bytewise)
        b.position_at_end(skipping)
        done = fn.append_basic_block("skipped")
        b.position_at_end(done)
        skipped = b.phi(I64, "skipped")
        fx.put("pos", b.add(pos, skipped))
        if not self.fewer_calls:
            b.ret(I64(0))
        b.position_at_end(skipping)
        ones, spaces, tops = I64(ONES), I64(SPACES), I64(TOPS)
        for k in range(SKIP_WORDS):
            stop_here = bytewise if k == 0 else done
            end = 8 * (k + 1)
            fits = fn.append_basic_block(f"word{k}_fits")
            inside = fn.append_basic_block(f"word{k}")
            if k:
                skipped.add_incoming(I64(8 * k), b.block)
            b.cbranch(b.icmp_unsigned(">", b.add(pos, I64(end)), limit), stop_here, fits)
            b.position_at_end(fits)
            if k:
                skipped.add_incoming(I64(8 * k), b.block)
            beyond = b.icmp_unsigned(">", b.gep(p, [I64(end)], source_etype=I8), data_end)
            b.cbranch(beyond, stop_here, inside)
            b.position_at_end(inside)
            # One 8-byte load (the kernel allows unaligned packet loads where the CPU does;
            # align 8 keeps LLVM from splitting it into bytes: BPF has no unaligned type).
            word = b.load(b.gep(p, [I64(8 * k)], source_etype=I8), typ=I64, align=8)
            # A byte below 0x20 borrows into its top bit when 0x20 is taken away, one above
            # 0x7E carries into it when 1 is added (0xFF wraps, but then 0xDF has it); carries
            # and borrows cross into other bytes only from such a byte.
            bad = b.and_(b.or_(b.sub(word, spaces), b.add(word, ones)), tops)
            nxt = fn.append_basic_block(f"word{k}_ok")
            if k:
                skipped.add_incoming(I64(8 * k), b.block)
            b.cbranch(b.icmp_unsigned("!=", bad, I64(0)), stop_here, nxt)
            b.position_at_end(nxt)
        if self.fewer_calls:
            # Every word skipped: the value likely goes on, and the next call skips on (the
            # chunk would walk it byte by byte: 1.2 ns a byte of a long value against 0.5).
            fx.put("pos", b.add(pos, I64(8 * SKIP_WORDS)))
            b.ret(I64(0))
        else:
            skipped.add_incoming(I64(8 * SKIP_WORDS), b.block)
            b.branch(done)
        b.position_at_end(bytewise)
        return done if self.fewer_calls else None

    @staticmethod
    def comb_slot(
        fx: Fn, state: ir.Value, k: ir.Value, slots: ir.Value | None = None
    ) -> tuple[ir.Value, ir.Value]:
        """(found, payload) of the slot at `state + k` tagged `k + 1` (comb.py); through
        `slots` (Fn.flat_base) where given."""
        b = fx.b
        if slots is None:
            e = fx.load_flat("path_slots", b.add(state, k), I32)
        else:
            e = fx.load_from(slots, "path_slots", b.add(state, k), I32)
        found = b.icmp_unsigned("==", b.lshr(e, I64(TAG_SHIFT)), b.add(k, I64(1)))
        return found, b.and_(e, I64(PAYLOAD_MASK))

    def path_transition(self, fx: Fn, state, byte, slots: ir.Value | None = None) -> ir.Value:
        """The path automaton's next state: the state's slot for the byte's class, else its
        default slot (offset 0), else the dead state (0; comb.py)."""
        b = fx.b
        k = fx.load_flat("path_classmap", byte, I8)  # class + 1
        hit, nxt = self.comb_slot(fx, state, k, slots)
        dflt_hit, dflt = self.comb_slot(fx, state, I64(0), slots)
        return b.select(hit, nxt, b.select(dflt_hit, dflt, I64(DEAD_ID)))

    def path_step(self) -> ir.Function:
        """Bytes `index * PATH_CHUNK` on of the path through the packed path
        automaton (comb.py), up to PATH_CHUNK per call with the state in a register: per byte,
        the state's slot for the byte's class, else its default slot, else the dead state."""
        fn, b = self.ob.function("sockpol_path_step", I64, [("index", I32), ("ctx", PTR)])
        index, scan = fn.args
        fx = Fn.of_scan(b, self.tables, scan)
        first = b.add(fx.get("pwalked"), b.mul(b.zext(index, I64), I64(PATH_CHUNK)))
        out_len = fx.get("out_len")
        scratch = fx.get("scratch")
        done = fn.append_basic_block("done")
        b.position_at_end(done)
        end_state = b.phi(I64, "end_state")
        stopped = b.phi(I64, "stopped")
        b.position_at_end(fn.blocks[0])
        state = fx.get("pstate")
        for j in range(PATH_CHUNK):
            i = b.add(first, I64(j))
            end_state.add_incoming(state, b.block)
            stopped.add_incoming(I64(1), b.block)
            step = fn.append_basic_block(f"byte{j}")
            b.cbranch(b.icmp_unsigned(">=", i, out_len), done, step)
            b.position_at_end(step)
            c = b.zext(b.load(gep(b, scratch, I8, [b.and_(i, I64(PATH_MAX - 1))]), typ=I8), I64)
            state = self.path_transition(fx, state, c)
        end_state.add_incoming(state, b.block)
        stopped.add_incoming(I64(0), b.block)
        b.branch(done)
        b.position_at_end(done)
        fx.put("pstate", end_state)
        b.ret(stopped)
        return fn

    def cand_step(self) -> ir.Function:
        """Candidate `index` of the path state: does its class hold? The first that does is
        the first matching rule and ends the loop (candidates.py)."""
        fn, b = self.ob.function("sockpol_cand_step", I64, [("index", I32), ("ctx", PTR)])
        index, scan = fn.args
        fx = Fn.of_scan(b, self.tables, scan)
        entry = fx.load_table("cand_table", b.add(fx.get("cand_off"), b.zext(index, I64)), I32)
        cls = b.lshr(entry, I64(16))
        ok = ir.Constant(I1, 1)
        for w in range(self.tables.nw):
            need = b.load(fx.table("class_need", cls, I64(w)), typ=I64)
            have = b.load(fx.fact_word(w), typ=I64)
            ok = b.and_(ok, b.icmp_unsigned("==", b.and_(have, need), need))
        with b.if_then(ok):
            fx.put("rule", b.and_(entry, I64(0xFFFF)))
        b.ret(b.zext(ok, I64))
        return fn
