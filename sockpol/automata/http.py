"""HTTP/1.x lexical facts, as byte sets and regular expressions, from RFC 9110/9112/3986.

These define what the scanner accepts at all; anything outside them is refused (fail closed).
"""

from __future__ import annotations

from sockpol import contract
from sockpol.automata.automaton import (
    Alt,
    Re,
    alt,
    anyof,
    byte_range,
    byteset,
    lit,
    lit_ci,
    opt,
    plus,
    seq,
    star,
)

DIGIT = byte_range("0", "9")
ALPHA = byte_range("a", "z") | byte_range("A", "Z")
HEXDIG = DIGIT | byteset("abcdefABCDEF")
UNRESERVED = byteset(contract.UNRESERVED)
SUB_DELIMS = byteset("!$&'()*+,;=")
# pchar without pct-encoded; '%' is allowed and its two hex digits are checked separately.
PCHAR = UNRESERVED | SUB_DELIMS | byteset(":@%")
PATH_BYTE = PCHAR | byteset("/")
QUERY_BYTE = PCHAR | byteset("/?")
TCHAR = ALPHA | DIGIT | byteset("!#$%&'*+-.^_`|~")
SP = ord(" ")
CR = ord("\r")
LF = ord("\n")
WS = byteset(" \t")
# field-value bytes: VCHAR, obs-text, SP, HTAB. No CTLs (NUL, bare CR/LF, DEL...).
FIELD_BYTE = byte_range(" ", "~") | byte_range("\x80", "\xff") | byteset("\t")
HOST_LABEL = ALPHA | DIGIT | byteset("-")

# Percent-encodings refused outright: an encoded `/` or `\\` changes where segments end depending
# on who decodes it, and NUL ends strings in C servers. (Unreserved characters are decoded by the
# normalizer instead; other escapes stay escaped.)
AMBIGUOUS_ENCODED = [ord("/"), ord("\\"), 0]


def percent_encoded(byte: int) -> Re:
    hi, lo = f"{byte:02X}"
    return seq(lit("%"), lit_ci(hi), lit_ci(lo))


def ambiguous_path_now() -> Re:
    """Raw path prefixes that are refused as soon as they are seen."""
    anything = star(anyof(PATH_BYTE))
    not_hex = ~HEXDIG & ((1 << 256) - 1)
    bad = alt(
        seq(lit("%"), anyof(not_hex)),  # malformed escapes
        seq(lit("%"), anyof(HEXDIG), anyof(not_hex)),
        Alt(tuple(percent_encoded(b) for b in AMBIGUOUS_ENCODED)),
    )
    return seq(anything, bad)


def ambiguous_path_at_end() -> Re:
    """Raw paths refused only if they end here: a cut-off `%` escape."""
    return seq(star(anyof(PATH_BYTE)), lit("%"), opt(anyof(HEXDIG)))


def valid_path() -> Re:
    return seq(lit("/"), star(anyof(PATH_BYTE)))


def field_line(name: Re) -> Re:
    """`name: value` for any value (the CRLF is handled by the scanner)."""
    return seq(name, lit(":"), star(anyof(FIELD_BYTE)))


def field_with_value(name: str, value: Re) -> Re:
    return seq(lit_ci(name), lit(":"), star(anyof(WS)), value, star(anyof(WS)))


def host_value(pattern: str) -> Re:
    """A Host value matching `pattern` (lower-case, optional leading `*.`), any case, an optional
    trailing dot and an optional `:port`."""
    if pattern.startswith("*."):
        core = seq(plus(anyof(HOST_LABEL)), lit_ci(pattern[1:]))
    else:
        core = lit_ci(pattern)
    return seq(core, opt(lit(".")), opt(seq(lit(":"), star(anyof(DIGIT)))))


def any_token() -> Re:
    return plus(anyof(TCHAR))


__all__ = [
    "CR",
    "DIGIT",
    "FIELD_BYTE",
    "LF",
    "PATH_BYTE",
    "QUERY_BYTE",
    "SP",
    "TCHAR",
    "WS",
    "ambiguous_path_at_end",
    "ambiguous_path_now",
    "any_token",
    "field_line",
    "field_with_value",
    "host_value",
    "valid_path",
]
