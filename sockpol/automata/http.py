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
HOST_NAME_BYTE = HOST_LABEL | byteset("_")  # what a Host name's labels may hold
# quoted-string text (RFC 9110 5.6.4): HTAB, SP, VCHAR but DQUOTE and backslash, obs-text.
QDTEXT = FIELD_BYTE & ~byteset('"\\')

# A request path is accepted only in its one canonical spelling (docs/language.md, "Normalization
# and refusals"): servers disagree on every other spelling, so sockpol refuses them rather than
# guess which reading the server will make (tests/servers holds this to real servers).
#
# Escapes: only of a byte that may not appear raw in a path, with upper-case hex digits. An
# escaped unreserved character, sub-delim, ':' or '@' has a raw spelling that decoding servers
# (nginx, Apache, Tomcat) take for the same path and raw-matching ones (HAProxy path ACLs, Node's
# req.url) do not; an encoded `/` or `\` changes where segments end depending on who decodes it,
# and NUL ends strings in C servers.
FORBIDDEN_ESCAPES = sorted(set(contract.UNRESERVED) | set(b"!$&'()*+,;=:@/\\") | {0})
AMBIGUOUS_ENCODED = [ord("/"), ord("\\"), 0]  # the ones that are not merely a second spelling
UPPER_HEXDIG = DIGIT | byteset("ABCDEF")
LOWER_HEX = byteset("abcdef")


def percent_encoded(byte: int) -> Re:
    hi, lo = f"{byte:02X}"
    return seq(lit("%"), lit_ci(hi), lit_ci(lo))


def ambiguous_path_now() -> Re:
    """Raw path prefixes that are refused as soon as they are seen: a malformed escape, an escape
    with a lower-case hex digit or of a byte that has a raw spelling (FORBIDDEN_ESCAPES), a `;`
    (path parameters: servlet containers strip them from a segment, other servers do not), an
    empty segment (`//`: nginx merges slashes unless `merge_slashes off`, HAProxy never does) and
    a `.` or `..` segment followed by `/` (removed by normalizing servers, routed as they are
    by raw-matching ones)."""
    anything = star(anyof(PATH_BYTE))
    not_hex = ~HEXDIG & ((1 << 256) - 1)
    bad = alt(
        seq(lit("%"), anyof(not_hex)),  # malformed escapes
        seq(lit("%"), anyof(HEXDIG), anyof(not_hex)),
        seq(lit("%"), anyof(LOWER_HEX)),  # lower-case hex digits
        seq(lit("%"), anyof(UPPER_HEXDIG), anyof(LOWER_HEX)),
        Alt(tuple(seq(lit("%"), lit(f"{b:02X}")) for b in FORBIDDEN_ESCAPES)),
        lit(";"),
        lit("//"),
        lit("/./"),
        lit("/../"),
    )
    return seq(anything, bad)


def ambiguous_path_at_end() -> Re:
    """Raw paths refused only if they end here (at the SP or `?` after the path): a cut-off `%`
    escape, or a last segment `.` or `..`."""
    anything = star(anyof(PATH_BYTE))
    return alt(
        seq(anything, lit("%"), opt(anyof(HEXDIG))),
        seq(anything, lit("/.")),
        seq(anything, lit("/..")),
    )


def valid_path() -> Re:
    return seq(lit("/"), star(anyof(PATH_BYTE)))


def field_line(name: Re) -> Re:
    """`name: value` for any value (the CRLF is handled by the scanner)."""
    return seq(name, lit(":"), star(anyof(FIELD_BYTE)))


def field_with_value(name: str, value: Re) -> Re:
    return seq(lit_ci(name), lit(":"), star(anyof(WS)), value, star(anyof(WS)))


def host_value(pattern: str) -> Re:
    """A Host value matching `pattern` (lower-case, optional leading `*.`), any case, and an
    optional `:port`."""
    if pattern.startswith("*."):
        core = seq(plus(anyof(HOST_LABEL)), lit_ci(pattern[1:]))
    else:
        core = lit_ci(pattern)
    return seq(core, opt(seq(lit(":"), star(anyof(DIGIT)))))


def host_field() -> Re:
    """A Host line whose value is empty, or a host name or an IP literal with an optional
    `:port`, and nothing else: no trailing dot, no empty label, no userinfo, no second colon,
    no trailing whitespace, no list. Servers read any other Host differently (nginx and HAProxy
    cut it at the first colon, Node's URL parser at `/`, `?`, `#` or after `@`, HAProxy splits
    it at commas, some strip a trailing dot and others do not), so it is refused."""
    label = plus(anyof(HOST_NAME_BYTE))
    name = seq(label, star(seq(lit("."), label)))
    literal = seq(lit("["), plus(anyof(HEXDIG | byteset(":."))), lit("]"))
    value = seq(alt(name, literal), opt(seq(lit(":"), star(anyof(DIGIT)))))
    return seq(lit_ci("host"), lit(":"), star(anyof(WS)), opt(value))


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
    "host_field",
    "host_value",
    "valid_path",
]
