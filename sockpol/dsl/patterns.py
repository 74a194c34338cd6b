"""Path patterns: the checker's validation and the code generator's token list, in one place.

A pattern is matched against the request path as sent (see docs/language.md, "Normalization
and refusals"): the query string is cut off, and a request whose path has an
empty segment (`//`), a `.` or `..` segment, an encoded `/`, `\\` or NUL (`%2F`, `%5C`, `%00`) or
an encoded unreserved character (`%41` for `A`) is refused before any rule is looked at. Matching is
byte-exact and case-sensitive, except that a percent-escape's hex digits match in either case
(`%2a` = `%2A`): escapes are compared in their encoded form, never decoded.

Semantics, exactly (`glob_to_regex` is the executable form of this list):

* a literal character matches itself;
* `*` matches any run of bytes other than `/`; when it is a whole segment (`/a/*/b`) the run must
  be non-empty, inside a segment (`/a*.json`) it may be empty;
* `**` as a whole segment matches zero or more whole segments: `/static/**` matches `/static`,
  `/static/` and everything under `/static/`; `/a/**/b` matches `/a/b`, `/a/x/b`, `/a/x/y/b`.
  Precisely: a final `/**` is "nothing, or `/` followed by any bytes"; a `/**` followed by more
  pattern is "zero or more groups of `/` and a non-empty run of non-`/` bytes";
* `**` ending a partial segment (`/ad**`) matches any bytes, `/` included: a plain string prefix;
* anything else with `**` (`/a**/b`, `/a/**x`), any `***`, and a `**` segment right after
  another (`/a/**/**`, which would mean the same as `/a/**`) are errors.

Characters allowed in a pattern: unreserved `A-Z a-z 0-9 - . _ ~`, sub-delims `! $ & ' ( ) + , =`,
`:`, `@`, `/`, `*`, and `%XX` escapes of bytes that a path cannot spell raw (an escape of an
unreserved character, a sub-delim, `:`, `@`, `/`, `\\` or NUL, and a `;`, are refused on the wire
as ambiguous-path, so a pattern holding one could never match).

The tokens the code generator consumes (`Pattern.tokens`) are a flat sequence whose regexes
concatenate:

    Literal(text)   the exact bytes `text` (escapes kept encoded, hex digits upper-cased)
    Star(whole)     `[^/]+` if whole (the `*` is a whole segment) else `[^/]*`
    AnySegments()   `(?:/[^/]+)*`  a whole-segment `**` with more pattern after it, together with
                                   the `/` before it; always followed by a Literal starting '/'
    AnySubpath()    `(?:/.*)?`     a whole-segment `**` ending the pattern, with the `/` before it
    AnyRest()       `.*`           `**` ending a partial segment (`/ad**`)

    /api/v1/orders/*   ->  Literal('/api/v1/orders/'), Star(True)
    /static/**         ->  Literal('/static'), AnySubpath()
    /a/**/b            ->  Literal('/a'), AnySegments(), Literal('/b')
    /**                ->  AnySubpath()
    /ad**              ->  Literal('/ad'), AnyRest()
    /*.json            ->  Literal('/'), Star(False), Literal('.json')
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from sockpol import contract

UNRESERVED = frozenset(chr(b) for b in contract.UNRESERVED)  # as characters
SUB_DELIMS = frozenset("!$&'()+,;=")  # `*` is a sub-delim too, but here it is the wildcard
ALLOWED = (UNRESERVED | SUB_DELIMS | frozenset(":@/*%")) - {";"}
# Bytes a request path spells raw: an escape of one is refused (ambiguous-path), so a pattern
# holding one could never match.
RAW_SPELLED = SUB_DELIMS | frozenset(":@*")
SEMICOLON = (
    "';' starts path parameters, which servers read differently (servlet containers strip them "
    "from the segment, other servers do not); a request with ';' (or '%3B') in its path is "
    "refused (ambiguous-path), so the rule could never match"
)


def raw_spelled_message(digits: str, byte: str) -> tuple[str, str]:
    """The message and hint for an escape of a byte that requests must spell raw."""
    if byte == ";":
        return SEMICOLON, ""
    hint = (
        "a literal '*' can only be matched by a path regex (~\"...\\*...\")"
        if byte == "*"
        else f"write '{byte}' instead"
    )
    return (
        f"'%{digits}' encodes '{byte}'; a request must spell it raw (servers that decode "
        "escapes and servers that match raw bytes read the escape differently, so it is "
        "refused as ambiguous-path), so the rule could never match",
        hint,
    )


HEX = frozenset(string.hexdigits)


@dataclass(frozen=True)
class Literal:
    text: str


@dataclass(frozen=True)
class Star:
    whole_segment: bool


@dataclass(frozen=True)
class AnySegments:
    pass


@dataclass(frozen=True)
class AnySubpath:
    pass


@dataclass(frozen=True)
class AnyRest:
    pass


PathToken = Literal | Star | AnySegments | AnySubpath | AnyRest


@dataclass(frozen=True)
class Pattern:
    text: str  # as written
    tokens: tuple[PathToken, ...]

    @property
    def is_exact(self) -> bool:
        """True when the pattern has no wildcard: it matches one path only."""
        return all(isinstance(t, Literal) for t in self.tokens)

    @property
    def literal_prefix(self) -> str:
        """The bytes every matching path starts with (maybe empty, for `/**`)."""
        first = self.tokens[0] if self.tokens else None
        return first.text if isinstance(first, Literal) else ""


@dataclass(frozen=True)
class Problem:
    """Why a pattern is invalid; `offset`/`length` index the pattern text."""

    offset: int
    length: int
    code: str
    message: str
    hint: str = ""


class PatternError(ValueError):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(p.message for p in problems))
        self.problems = problems


def problems(text: str) -> list[Problem]:
    """Every problem of `text` as a path pattern, in text order (empty when it is valid)."""
    if not text.startswith("/"):
        return [Problem(0, max(1, len(text)), "E160", "expected a path starting with '/'")]
    found = _character_problems(text)
    # A query or fragment already got its error; its text has no segments to complain about.
    found += _segment_problems(re.split(r"[?#]", text, maxsplit=1)[0])
    return sorted(found, key=lambda p: p.offset)


def parse_pattern(text: str) -> Pattern:
    """The token sequence of a valid pattern; raises `PatternError` listing every problem."""
    found = problems(text)
    if found:
        raise PatternError(found)
    return Pattern(text, tuple(_tokens(text)))


def glob_to_regex(pattern: str | Pattern) -> str:
    """The reference semantics of a glob: a Python regex matching exactly the paths it matches.

    Anchored at both ends with flags embedded; use it with `re.match` or `re.fullmatch`. For any
    path pattern, glob or `~"regex"`, use `pathmatch.to_regex`.
    """
    if isinstance(pattern, str):
        pattern = parse_pattern(pattern)
    parts = []
    for token in pattern.tokens:
        match token:
            case Literal(text):
                parts.append(_literal_regex(text))
            case Star(whole_segment):
                parts.append("[^/]+" if whole_segment else "[^/]*")
            case AnySegments():
                parts.append("(?:/[^/]+)*")
            case AnySubpath():
                parts.append("(?:/.*)?")
            case AnyRest():
                parts.append(".*")
    return r"(?s)\A" + "".join(parts) + r"\Z"


def _literal_regex(text: str) -> str:
    out = []
    for piece in re.split(r"(%[0-9A-F]{2})", text):
        if piece.startswith("%") and len(piece) == 3:
            out.append("%" + "".join(f"[{h}{h.lower()}]" if h.isalpha() else h for h in piece[1:]))
        else:
            out.append(re.escape(piece))
    return "".join(out)


def _character_problems(text: str) -> list[Problem]:
    found: list[Problem] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c in "?#":
            # Everything after it is query or fragment: one error, not one per character.
            what = "query string" if c == "?" else "fragment"
            found.append(
                Problem(
                    i,
                    len(text) - i,
                    "E162",
                    "query strings and fragments are not part of path matching",
                    f"rules see the path without its query string; remove the {what}",
                )
            )
            break
        if c == "%":
            found += _escape_problems(text, i)
            i += 3 if text[i + 1 : i + 3] and all(h in HEX for h in text[i + 1 : i + 3]) else 1
            continue
        if c not in ALLOWED:
            found.append(_bad_character(c, i))
        i += 1
    return found


def _escape_problems(text: str, i: int) -> list[Problem]:
    digits = text[i + 1 : i + 3]
    if len(digits) < 2 or not all(h in HEX for h in digits):
        return [
            Problem(
                i,
                1 + len(digits),
                "E163",
                "'%' must be followed by two hex digits",
                "write '%25' for a literal '%'",
            )
        ]
    byte = chr(int(digits, 16))
    if byte in UNRESERVED:
        return [
            Problem(
                i,
                3,
                "E164",
                f"'%{digits}' encodes '{byte}'; requests are matched after such escapes are "
                "decoded, so the rule could never match",
                f"write '{byte}' instead",
            )
        ]
    if byte in RAW_SPELLED:
        return [Problem(i, 3, "E164", *raw_spelled_message(digits, byte))]
    if byte in "/\\\x00":
        what = "NUL" if byte == "\x00" else f"'{byte}'"
        return [
            Problem(
                i,
                3,
                "E164",
                f"'%{digits}' encodes {what}; requests with an encoded slash, backslash or NUL "
                "are refused before matching, so the rule could never match",
            )
        ]
    return []


def _bad_character(c: str, i: int) -> Problem:
    if c == ";":
        return Problem(i, 1, "E161", SEMICOLON)
    if c.isprintable() and c.isascii():
        shown = f"'{c}'"
        hint = f"percent-encode it as '%{ord(c):02X}'"
    else:
        shown = f"{c!r} (U+{ord(c):04X})"
        encoded = "".join(f"%{b:02X}" for b in c.encode("utf-8", "replace"))
        hint = f"percent-encode its UTF-8 bytes: '{encoded}'"
    return Problem(i, 1, "E161", f"character {shown} is not allowed in a path pattern", hint)


def _segments(text: str) -> list[tuple[int, str]]:
    """(offset, text) of each segment after the leading `/`."""
    out = []
    offset = 1
    for segment in text[1:].split("/"):
        out.append((offset, segment))
        offset += len(segment) + 1
    return out


def _segment_problems(text: str) -> list[Problem]:
    found: list[Problem] = []
    segments = _segments(text)
    for n, (offset, segment) in enumerate(segments):
        last = n == len(segments) - 1
        if segment == "" and not last:
            found.append(
                Problem(
                    offset - 1,
                    2,
                    "E165",
                    "empty path segment '//': requests are matched after repeated slashes are "
                    "merged, so the rule could never match",
                )
            )
        elif segment in (".", ".."):
            found.append(
                Problem(
                    offset,
                    len(segment),
                    "E166",
                    f"'{segment}' segment: requests are matched after dot segments are "
                    "removed, so the rule could never match",
                )
            )
        elif segment == "**" and n > 0 and segments[n - 1][1] == "**":
            # `/**/**` means what `/**` means; refusing it keeps every `**` token next to a
            # literal or `*`, which is all the code generator has to handle.
            found.append(
                Problem(
                    offset - 1,
                    3,
                    "E169",
                    "repeated '**' segment: '/**/**' matches the same paths as '/**'",
                    "write '**' once",
                )
            )
        found += _star_problems(segment, offset, last)
    return found


def _star_problems(segment: str, offset: int, last: bool) -> list[Problem]:
    found = []
    for run in re.finditer(r"\*+", segment):
        at = offset + run.start()
        if len(run.group()) > 2:
            found.append(
                Problem(
                    at,
                    len(run.group()),
                    "E167",
                    f"'{run.group()}' is not a wildcard; use '*' (within a segment) or '**'",
                )
            )
        elif run.group() == "**" and segment != "**" and not (last and run.end() == len(segment)):
            found.append(
                Problem(
                    at,
                    2,
                    "E168",
                    "'**' must be a whole segment ('/a/**/b') or end the pattern ('/a**')",
                    "use '*' to match within one segment",
                )
            )
    return found


def _tokens(text: str) -> list[PathToken]:
    tokens: list[PathToken] = []
    literal = ""

    def flush() -> None:
        nonlocal literal
        if literal:
            tokens.append(Literal(literal))
            literal = ""

    segments = _segments(text)
    for n, (_, segment) in enumerate(segments):
        if segment == "**":
            flush()
            # The token absorbs the `/` before it: `/static/**` must match `/static` too.
            tokens.append(AnySubpath() if n == len(segments) - 1 else AnySegments())
            continue
        literal += "/"
        whole_star = segment == "*"
        for part in re.split(r"(\*\*|\*)", segment):
            if part == "**":
                flush()
                tokens.append(AnyRest())
            elif part == "*":
                flush()
                tokens.append(Star(whole_star))
            else:
                literal += upper_escapes(part)
    flush()
    return tokens


def upper_escapes(text: str) -> str:
    """%-escapes with upper-case hex digits, as canonical paths have them."""
    return re.sub(r"%[0-9a-fA-F]{2}", lambda m: m.group().upper(), text)
