"""Path regular expressions: `~"..."` path patterns, a documented regular subset.

A regex pattern is written `~"REGEX"` and matched against the **whole canonical path** (as globs
are: after the query is cut off, unreserved escapes decoded, slashes merged, dot segments
removed), byte for byte. The content between the quotes is the regex verbatim: backslashes are
regex escapes, there are no string escapes (a `"` is not a path character anyway). The subset:

* literal characters: letters, digits, `- _ ~ ! & ' , ; = : @ /`, and `%XX` escapes written as in
  globs (hex digits in either case; they match the upper-case form, the only one that reaches
  the rules);
* `\\` followed by one of `. * + ? ( ) [ ] { } | $ / -` for that character; `\\d` (`[0-9]`),
  `\\w` (`[A-Za-z0-9_]`) and their complements `\\D`, `\\W` (within path bytes);
* `.` — **any byte of a canonical path, `/` included** (as in Envoy, Cilium and Istio path
  regexes; `deny ~"/admin/.*"` must not let `/admin/a/b` through). Use `[^/]` for "within one
  segment";
* classes `[...]` and `[^...]` with ranges (`[a-z0-9]`), escapes, `\\d`, `\\w`; a negated class is
  taken within path bytes (`[^/]` is a segment byte). `%` in a class is the byte `%` (a
  percent-escape is three bytes to a regex, `%3A`);
* groups `(...)` and `(?:...)` (nothing is captured), alternation `|`;
* quantifiers `*`, `+`, `?`, `{m}`, `{m,}`, `{m,n}` with bounds up to MAX_REPEAT;
* `^` at the very start and `$` at the very end are accepted and mean nothing (the match is
  always of the whole path).

Not supported (each a positioned error): backreferences, lookaround, lazy or possessive
quantifiers, inline flags, named groups, `\\b` and other anchors, characters that never occur in
a canonical path (space, `"`, `\\`, `#`, `?`, non-ASCII...), escapes that never occur in one
(`%41` is decoded to `A` before matching; `%2F`, `%5C`, `%00` are refused), and a regex that
cannot match a path starting with `/`.

`to_re` builds the automaton (`codegen.automaton.Re`); `to_python` is the reference semantics as a
Python regex over canonical paths (what `pathmatch.to_regex` returns for a regex pattern, and
what the tests and the interpreter use).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from sockpol.automata import http
from sockpol.automata.automaton import EMPTY, Alt, Re, Set, Star, Str, opt, seq
from sockpol.dsl.patterns import RAW_SPELLED, SEMICOLON, UNRESERVED, Problem, raw_spelled_message

MAX_REPEAT = 32  # largest bound of `{m,n}`; a bound copies its operand, so it stays small
MAX_DEPTH = 32  # nesting of groups
PREFIX = '~"'

PATH = http.PATH_BYTE & ~http.byteset(";")  # a ';' in a path is refused (ambiguous-path)
DIGITS = frozenset(string.digits)
WORD = frozenset(string.ascii_letters + string.digits + "_")
LITERAL = frozenset(string.ascii_letters + string.digits + "-_~!&',=:@/")
ESCAPABLE = frozenset(".*+?()[]{}|$/-")
HEX = frozenset(string.hexdigits)


def is_regex(text: str) -> bool:
    return text.startswith(PREFIX)


def _mask(chars: frozenset[str] | str) -> int:
    mask = 0
    for c in chars:
        mask |= 1 << ord(c)
    return mask


@dataclass
class _Node:
    """A parsed piece: its automaton regex, its Python regex, and the bytes it may start with
    (to check that the whole can start with `/`)."""

    re: Re
    py: str
    nullable: bool
    first: int


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.src = text[len(PREFIX) : -1] if text.endswith('"') else text[len(PREFIX) :]
        self.base = len(PREFIX)  # offset of src in text
        self.i = 0
        self.problems: list[Problem] = []
        self.depth = 0

    # -- helpers -----------------------------------------------------------------------------

    def error(self, at: int, length: int, code: str, message: str, hint: str = "") -> None:
        self.problems.append(Problem(self.base + at, max(1, length), code, message, hint))

    def peek(self, k: int = 0) -> str:
        j = self.i + k
        return self.src[j] if j < len(self.src) else ""

    # -- grammar -----------------------------------------------------------------------------

    def parse(self) -> _Node:
        if not self.text.startswith(PREFIX) or not self.text.endswith('"') or len(self.text) < 3:
            self.problems.append(
                Problem(0, len(self.text), "E200", 'a regex pattern is written ~"REGEX"')
            )
            return _Node(EMPTY, "", True, 0)
        if self.peek() == "^":
            self.i += 1
        node = self.alternation()
        if self.peek() == "$" and self.i == len(self.src) - 1:
            self.i += 1
        while self.i < len(self.src):  # only a stray `)` or `$` gets here
            c = self.peek()
            if c == ")":
                self.error(self.i, 1, "E201", "unbalanced ')'", "remove it or add a '('")
            else:
                self.error(self.i, 1, "E205", f"'{c}' is only allowed at the end of the regex")
            self.i += 1
            if self.i < len(self.src):
                more = self.alternation()
                node = _Node(EMPTY, node.py, node.nullable, node.first | more.first)
        return node

    def alternation(self) -> _Node:
        options = [self.concat()]
        while self.peek() == "|":
            self.i += 1
            options.append(self.concat())
        if len(options) == 1:
            return options[0]
        return _Node(
            Alt(tuple(o.re for o in options)),
            "(?:" + "|".join(o.py for o in options) + ")",
            any(o.nullable for o in options),
            _or(o.first for o in options),
        )

    def concat(self) -> _Node:
        parts: list[_Node] = []
        while self.peek() and self.peek() not in "|)":
            if self.peek() == "$" and self.i == len(self.src) - 1:
                break
            parts.append(self.repeat())
        first, nullable = 0, True
        for p in parts:
            if nullable:
                first |= p.first
            nullable = nullable and p.nullable
        return _Node(
            seq(*(p.re for p in parts)),
            "".join(p.py for p in parts),  # atoms are single units; alternations are grouped
            nullable,
            first,
        )

    def repeat(self) -> _Node:
        node = self.atom()
        while self.peek() in ("*", "+", "?", "{"):
            c = self.peek()
            at = self.i
            if c == "{":
                bounds = self.bounds()
                if bounds is None:
                    break
                low, high = bounds
            else:
                self.i += 1
                low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            if self.peek() in ("?", "+"):
                kind = "lazy" if self.peek() == "?" else "possessive"
                self.error(
                    self.i,
                    1,
                    "E203",
                    f"{kind} quantifiers are not supported: a path either matches or not",
                    f"remove the '{self.peek()}' after '{self.src[at : self.i]}'",
                )
                self.i += 1
            node = _repeat(node, low, high)
        return node

    def bounds(self) -> tuple[int, int | None] | None:
        """`{m}`, `{m,}`, `{m,n}` at self.i; None (and an error) if malformed."""
        at = self.i
        m = re.match(r"\{(\d*)(,?)(\d*)\}", self.src[at:])
        if m is None or not m.group(1):
            self.error(
                at,
                1,
                "E204",
                "'{' must start a bound {m}, {m,} or {m,n}",
                "write '\\{' for a literal brace (braces are not path characters anyway)",
            )
            self.i += 1
            return None
        self.i += len(m.group())
        low = int(m.group(1))
        high = None if m.group(2) and not m.group(3) else int(m.group(3) or m.group(1))
        if low > MAX_REPEAT or (high is not None and high > MAX_REPEAT):
            self.error(at, len(m.group()), "E204", f"repetition bounds are limited to {MAX_REPEAT}")
            return None
        if high is not None and high < low:
            self.error(at, len(m.group()), "E204", f"bound {m.group()} has max below min")
            return None
        return low, high

    def atom(self) -> _Node:
        at = self.i
        c = self.peek()
        if c == "(":
            return self.group()
        if c == "[":
            return self.char_class()
        if c == ".":
            self.i += 1
            return _set(PATH)
        if c == "\\":
            return _set(self.escape())
        if c == "%":
            return self.percent()
        self.i += 1
        if c in "*+?{":
            self.error(at, 1, "E203", f"'{c}' has nothing to repeat", f"write '\\{c}' for itself")
            return _set(0, nothing=True)
        if c == "^" or c == "$":
            self.error(
                at, 1, "E205", f"'{c}' is only allowed at the {'start' if c == '^' else 'end'}"
            )
            return _set(0, nothing=True)
        if c == "]" or c == "}":
            self.error(at, 1, "E202", f"unbalanced '{c}'", f"write '\\{c}' for itself")
            return _set(0, nothing=True)
        if c not in LITERAL:
            self._bad_character(at, c)
            return _set(0, nothing=True)
        return _Node(Str(c.encode()), re.escape(c), False, 1 << ord(c))

    def group(self) -> _Node:
        at = self.i
        self.i += 1
        if self.peek() == "?":
            if self.peek(1) == ":":
                self.i += 2
            else:
                self.error(
                    at,
                    2 + bool(self.peek(1)),
                    "E206",
                    "lookaround, named groups and inline flags are not supported",
                    "use (...) or (?:...) to group",
                )
                self.i += 1
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.error(at, 1, "E206", f"groups nest deeper than {MAX_DEPTH}")
            self.i = len(self.src)
            return _set(0, nothing=True)
        inner = self.alternation()
        self.depth -= 1
        if self.peek() != ")":
            self.error(at, 1, "E201", "unbalanced '('", "add the ')'")
        else:
            self.i += 1
        return _Node(inner.re, f"(?:{inner.py})", inner.nullable, inner.first)

    def char_class(self) -> _Node:
        at = self.i
        self.i += 1
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        errors = len(self.problems)
        mask = 0
        first = True
        while True:
            c = self.peek()
            if not c:
                self.error(at, 1, "E202", "unbalanced '['", "add the ']'")
                break
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            low_at = self.i
            low = self.class_item()
            if low is None:
                continue
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.i += 1
                high = self.class_item()
                if high is None:
                    continue
                if not _single(low) or not _single(high):
                    self.error(
                        low_at, self.i - low_at, "E202", "a range needs a character at each end"
                    )
                    continue
                lo, hi = low.bit_length() - 1, high.bit_length() - 1
                if hi < lo:
                    self.error(low_at, self.i - low_at, "E202", "range out of order")
                    continue
                span = ((1 << (hi + 1)) - 1) & ~((1 << lo) - 1)
                if span & ~PATH:
                    self.error(
                        low_at,
                        self.i - low_at,
                        "E207",
                        "the range includes characters that never occur in a canonical path",
                        "list the path characters you mean",
                    )
                    span &= PATH
                mask |= span
            else:
                mask |= low
        if negate:
            mask = PATH & ~mask
        if not mask and errors == len(self.problems):
            self.error(at, self.i - at, "E207", "this class matches no path byte")
        return _set(mask, nothing=not mask)

    def class_item(self) -> int | None:
        """One character (or `\\d`-like escape) of a class, as a byte mask; None after an
        error."""
        at = self.i
        c = self.peek()
        if c == "\\":
            return self.escape() or None
        self.i += 1
        if c == "%" or _mask(c) & PATH:
            return _mask(c)
        if c == "[":
            self.error(at, 1, "E202", "'[' inside a class", "write '\\[' for itself")
        else:
            self._bad_character(at, c)
        return None

    def escape(self) -> int:
        """`\\x` at self.i, as a byte mask (0 after an error)."""
        at = self.i
        c = self.peek(1)
        self.i += 2 if c else 1
        if c in ("d", "D", "w", "W"):
            mask = _mask(DIGITS if c in "dD" else WORD)
            return PATH & ~mask if c.isupper() else mask
        if c and (c in ESCAPABLE or c in "^\\"):
            if _mask(c) & PATH:
                return _mask(c)
            self.error(
                at, 2, "E207", f"'\\{c}' matches '{c}', which never occurs in a canonical path"
            )
        elif c.isdigit():
            self.error(at, 2, "E206", "backreferences are not supported")
        elif c:
            self.error(
                at,
                2,
                "E206",
                f"'\\{c}' is not supported",
                "escapes are \\d \\w \\D \\W, and a backslash before . * + ? ( ) [ ] { } | $ / -",
            )
        else:
            self.error(at, 1, "E206", "a '\\' at the end of the regex")
        return 0

    def percent(self) -> _Node:
        """`%XX`: a percent-escape as a canonical path spells it (upper-case hex)."""
        at = self.i
        digits = self.src[at + 1 : at + 3]
        if len(digits) < 2 or not all(h in HEX for h in digits):
            self.error(
                at,
                1 + len(digits),
                "E163",
                "'%' must be followed by two hex digits",
                "write '%25' for a literal '%'",
            )
            self.i += 1
            return _set(0, nothing=True)
        self.i += 3
        byte = chr(int(digits, 16))
        if byte in UNRESERVED:
            self.error(
                at,
                3,
                "E164",
                f"'%{digits}' encodes '{byte}'; requests are matched after such escapes are "
                "decoded, so it could never match",
                f"write '{byte}' instead",
            )
            return _set(0, nothing=True)
        if byte in "/\\\x00":
            self.error(
                at,
                3,
                "E164",
                f"'%{digits}' encodes a slash, backslash or NUL; requests with one are refused "
                "before matching, so it could never match",
            )
            return _set(0, nothing=True)
        if byte in RAW_SPELLED:
            self.error(at, 3, "E164", *raw_spelled_message(digits, byte))
            return _set(0, nothing=True)
        text = "%" + digits.upper()
        return _Node(Str(text.encode()), re.escape(text), False, 1 << ord("%"))

    def _bad_character(self, at: int, c: str) -> None:
        if c == ";":
            self.error(at, 1, "E207", SEMICOLON)
            return
        if c.isprintable() and c.isascii():
            hint = f"percent-encode it as '%{ord(c):02X}'" if c not in "?#" else ""
            what = f"'{c}'"
        else:
            encoded = "".join(f"%{b:02X}" for b in c.encode("utf-8", "replace"))
            hint = f"percent-encode its UTF-8 bytes: '{encoded}'"
            what = f"{c!r} (U+{ord(c):04X})"
        self.error(at, 1, "E207", f"character {what} never occurs in a canonical path", hint)


def _or(masks) -> int:
    out = 0
    for m in masks:
        out |= m
    return out


def _single(mask: int) -> bool:
    return mask != 0 and mask & (mask - 1) == 0


def _set(mask: int, nothing: bool = False) -> _Node:
    """A byte set as a node (a placeholder that matches nothing after an error)."""
    if nothing or not mask:
        return _Node(Set(0), "(?!)", False, 0)
    chars = "".join(re.escape(chr(b)) for b in range(256) if mask >> b & 1)
    return _Node(Set(mask), f"[{chars}]", False, mask)


def _repeat(node: _Node, low: int, high: int | None) -> _Node:
    """`node{low,high}` (high None: unbounded) by copying: bounds are small."""
    parts = [node.re] * low
    if high is None:
        parts.append(Star(node.re))
        py = f"(?:{node.py}){{{low},}}"
    else:
        optional = EMPTY
        for _ in range(high - low):  # nested options: a{0,3} = (a(a(a)?)?)?
            optional = opt(seq(node.re, optional))
        parts.append(optional)
        py = f"(?:{node.py}){{{low},{high}}}"
    return _Node(seq(*parts), py, node.nullable or low == 0, node.first)


def _parse(text: str) -> tuple[_Node, list[Problem]]:
    parser = _Parser(text)
    node = parser.parse()
    found = parser.problems
    if not found and not node.first >> ord("/") & 1:
        found.append(
            Problem(
                0,
                len(text),
                "E208",
                "this regex cannot match a path: a canonical path always starts with '/', and "
                "the regex is matched against the whole path",
                "start it with '/' (or with '.*' to match anywhere: ~\".*\\.json\")",
            )
        )
    return node, sorted(found, key=lambda p: p.offset)


def problems(text: str) -> list[Problem]:
    """Every problem of `text` (as written, `~"..."`); offsets index `text`."""
    return _parse(text)[1]


def to_re(text: str) -> Re:
    node, found = _parse(text)
    if found:
        raise ValueError(f"invalid regex pattern {text}: {found[0].message}")
    return node.re


def to_python(text: str) -> str:
    """The reference semantics: a Python regex (flags embedded, anchored) matching exactly the
    canonical paths the pattern matches."""
    node, found = _parse(text)
    if found:
        raise ValueError(f"invalid regex pattern {text}: {found[0].message}")
    return r"(?s)\A(?:" + node.py + r")\Z"


def example(text: str) -> str:
    """A short path the regex matches, for sample requests: breadth-first over its DFA,
    preferring letters and digits, starting with `/` and avoiding `//` (which normalization
    would merge) where the regex allows."""
    from collections import deque

    from sockpol.automata.automaton import determinize

    dfa = determinize([(to_re(text), "match")], 20_000)
    order = sorted(range(256), key=lambda b: (not chr(b).isalnum(), chr(b) != "/", b))
    for strict in (True, False):
        seen = {dfa.start: b""}
        todo = deque([dfa.start])
        while todo:
            state = todo.popleft()
            path = seen[state]
            if dfa.tags[state]:
                return path.decode("latin-1")
            for b in order:
                if strict and (b != 47 if not path else b == 47 and path.endswith(b"/")):
                    continue
                nxt = dfa.next(state, b)
                if nxt is not None and nxt not in seen and PATH >> b & 1:
                    seen[nxt] = path + bytes([b])
                    todo.append(nxt)
    raise ValueError(f"{text} matches no path")


__all__ = ["MAX_REPEAT", "example", "is_regex", "problems", "to_python", "to_re"]
