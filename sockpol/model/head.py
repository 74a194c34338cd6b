"""The reference model's first layer: reading one HTTP/1.x request head (or chunk-size line), from
docs/language.md and RFC 9110, 9112 and 3986.

`read_head(data)` gives a `Head`, a `Refusal` (with the reasons' slugs, contract.Reason), or
None when `data` ends first; the first problem in byte order decides the reason, as in a
left-to-right scan. A path is accepted only in its canonical spelling (no `//`, no dot segments,
escapes only where a byte has no raw spelling, upper-case hex), so the path rules match is the
raw path, up to contract.PATH_MAX bytes. It never looks at the code generator's automata:
agreeing with them is what the tests check.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from sockpol.contract import CHUNK_MAX, CL_MAX, PATH_MAX, UNRESERVED

# -- HTTP/1.x lexical sets (RFC 9110, 9112, 3986) -------------------------------------------------

_ALNUM = (string.ascii_letters + string.digits).encode()
TCHAR = frozenset(_ALNUM + b"!#$%&'*+-.^_`|~")
PCHAR = UNRESERVED | frozenset(b"!$&'()*+,;=:@%")  # '%' checked separately as an escape
PATH_BYTE = PCHAR | frozenset(b"/")
QUERY_BYTE = PATH_BYTE | frozenset(b"?")
FIELD_BYTE = frozenset(range(0x20, 0x7F)) | frozenset(range(0x80, 0x100)) | {0x09}
QDTEXT = FIELD_BYTE - frozenset(b'"\\')  # quoted-string text (RFC 9110 5.6.4)
HEX = frozenset(b"0123456789abcdefABCDEF")
DIGITS = frozenset(b"0123456789")
WS = b" \t"
SP, CR, LF, QMARK, PERCENT = 0x20, 0x0D, 0x0A, 0x3F, 0x25

# -- limits (docs/language.md, "Normalization and refusals") -------------------------------------

# PATH_MAX: bytes of a path; CL_MAX, CHUNK_MAX: the largest Content-Length and chunk size accepted
# (all from the contract: the kernel program enforces the same).
AMBIGUOUS_ESCAPES = frozenset({0x2F, 0x5C, 0x00})  # %2F, %5C, %00
# Bytes with a raw spelling in a path: their escapes are refused (the raw byte is the one spelling).
RAW_SPELLED = PCHAR - {PERCENT}
LOWER_HEX = frozenset(b"abcdef")

# -- what a head is -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    name: str  # lower-case
    value: bytes  # with surrounding spaces and tabs trimmed
    offset: int  # where its line starts in the message


@dataclass(frozen=True)
class Head:
    """A well-formed request head, as the policy sees it."""

    method: str
    target: str  # as sent (path and query)
    raw_path: str  # the path as sent, without the query
    path: str  # what rules match (the canonical path as sent)
    version: str
    headers: tuple[Header, ...]
    length: int  # bytes, up to and including the blank line
    content_length: int
    chunked: bool = False  # the body is framed by Transfer-Encoding: chunked

    @property
    def host(self) -> bytes | None:
        return next((h.value for h in self.headers if h.name == "host"), None)

    def values(self, name: str) -> list[bytes]:
        return [h.value for h in self.headers if h.name == name]


@dataclass(frozen=True)
class Refusal:
    reason: str  # one of REFUSALS
    offset: int  # the byte at which it became certain
    detail: str

    def __str__(self) -> str:
        return f"{self.reason} at byte {self.offset}: {self.detail}"


# -- reading a head -------------------------------------------------------------------------------


class _Refuse(Exception):
    def __init__(self, reason: str, offset: int, detail: str) -> None:
        self.refusal = Refusal(reason, offset, detail)


class _NeedMore(Exception):
    pass


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def next(self) -> int:
        if self.pos >= len(self.data):
            raise _NeedMore
        b = self.data[self.pos]
        self.pos += 1
        return b

    def refuse(self, reason: str, detail: str) -> _Refuse:
        return _Refuse(reason, self.pos - 1, detail)


def read_head(data: bytes) -> Head | Refusal | None:
    """The request head at the start of `data`, its refusal, or None if `data` ends first."""
    r = _Reader(data)
    try:
        return _head(r)
    except _Refuse as e:
        return e.refusal
    except _NeedMore:
        return None


def _head(r: _Reader) -> Head:
    method = _method(r)
    target_start = r.pos
    raw_path, ended_by = _path(r)
    path = checked_path(raw_path)
    if path is None:
        raise r.refuse("path-too-long", f"path '{show(raw_path)}' is longer than {PATH_MAX} bytes")
    if ended_by == QMARK:
        while (b := r.next()) != SP:
            if b not in QUERY_BYTE:
                raise r.refuse("bad-target", f"byte {_byte(b)} in the query")
    target = r.data[target_start : r.pos - 1].decode("latin-1")
    version = _version(r)
    headers, content_length, chunked = _fields(r)
    return Head(
        method,
        target,
        raw_path.decode("latin-1"),
        path.decode("latin-1"),
        version,
        headers,
        r.pos,
        content_length,
        chunked,
    )


def _method(r: _Reader) -> str:
    """The method, after any empty lines (CRLF) before the request line: RFC 9112 2.2 asks a
    server to ignore at least one, and servers skip any number."""
    start = 0
    while True:
        b = r.next()
        if b == CR and r.pos - 1 == start:
            if r.next() != LF:
                raise r.refuse("bad-method", "CR not followed by LF before the request line")
            start = r.pos
            continue
        if b == SP and r.pos - 1 > start:
            return r.data[start : r.pos - 1].decode("ascii")
        if b not in TCHAR:
            raise r.refuse("bad-method", f"byte {_byte(b)} in or instead of the method")


def _path(r: _Reader) -> tuple[bytes, int]:
    """The raw path up to the SP or '?' that ends it, with its spelling checked. A path whose
    bytes so far are already too long is refused before it ends (the kernel counts as the bytes
    go by)."""
    start = r.pos
    try:
        return _path_bytes(r, start)
    except _Refuse as e:
        # The kernel counts the bytes as they go by: a path already too long before the byte
        # that makes it ambiguous was refused as too long first.
        so_far = r.data[start : e.refusal.offset]
        if e.refusal.reason == "ambiguous-path" and checked_path(so_far) is None:
            raise r.refuse("path-too-long", f"the path is longer than {PATH_MAX} bytes") from None
        raise
    except _NeedMore:
        if checked_path(r.data[start:]) is None:
            raise r.refuse(
                "path-too-long", f"the path so far is longer than {PATH_MAX} bytes"
            ) from None
        raise


def _path_bytes(r: _Reader, start: int) -> tuple[bytes, int]:
    """The raw path, accepted only in its canonical spelling (docs/language.md): any other
    spelling of a path is one that servers read differently, and is refused as ambiguous-path
    at the byte that makes it so."""
    b = r.next()
    if b != ord("/"):
        raise r.refuse("bad-target", "the target does not start with '/' (origin-form)")
    pending = 0  # hex digits still owed to a '%'
    hi = 0
    segment = b""  # the current segment so far (raw)
    while True:
        b = r.next()
        if b in (SP, QMARK):
            if pending:
                raise r.refuse("ambiguous-path", "the path ends inside a %-escape")
            if segment in (b".", b".."):
                raise r.refuse("ambiguous-path", f"a '{segment.decode()}' segment (dot segment)")
            return r.data[start : r.pos - 1], b
        if b not in PATH_BYTE:
            raise r.refuse("bad-target", f"byte {_byte(b)} in the path")
        if pending:
            if b not in HEX:
                raise r.refuse("ambiguous-path", "'%' not followed by two hex digits")
            if b in LOWER_HEX:
                raise r.refuse("ambiguous-path", "a %-escape with a lower-case hex digit")
            if pending == 2:
                hi, pending = b, 1
                continue
            pending = 0
            value = int(chr(hi) + chr(b), 16)
            if value in AMBIGUOUS_ESCAPES:
                raise r.refuse("ambiguous-path", f"%{value:02X} (an encoded '/', '\\' or NUL)")
            if value in RAW_SPELLED:
                what = f"%{value:02X} encodes {chr(value)!r}, which has a raw spelling"
                raise r.refuse("ambiguous-path", what)
            segment = b"%"  # not a dot segment
        elif b == PERCENT:
            pending = 2
        elif b == ord(";"):
            raise r.refuse("ambiguous-path", "';' (path parameters)")
        elif b == ord("/"):
            if r.data[r.pos - 2] == ord("/"):
                raise r.refuse("ambiguous-path", "an empty segment ('//')")
            if segment in (b".", b".."):
                raise r.refuse("ambiguous-path", f"a '{segment.decode()}' segment (dot segment)")
            segment = b""
        else:
            segment = (segment + bytes([b]))[-3:]


def _version(r: _Reader) -> str:
    start = r.pos
    for expected in (b"H", b"T", b"T", b"P", b"/", b"1", b".", b"01", b"\r", b"\n"):
        if r.next() not in expected:
            raise r.refuse("bad-version", "expected HTTP/1.0 or HTTP/1.1 and CRLF")
    return r.data[start : r.pos - 2].decode("ascii")


def _fields(r: _Reader) -> tuple[tuple[Header, ...], int, bool]:
    headers: list[Header] = []
    seen: set[str] = set()
    content_length = 0
    while True:
        line_start = r.pos
        if _end_of_fields(r, "bad-header"):
            return tuple(headers), content_length, "transfer-encoding" in seen
        name, value, cl = _field_line(r, line_start, "bad-header", frozenset(seen))
        # The line is complete at its CR: these are decided before the LF is seen.
        if name == "transfer-encoding" and value.lower() != b"chunked":
            raise r.refuse("transfer-encoding", "a Transfer-Encoding other than 'chunked'")
        if name == "upgrade":
            raise r.refuse("upgrade", "Upgrade header")
        if cl is not None and not cl.valid:
            raise r.refuse("bad-content-length", "Content-Length is not one decimal number")
        if name == "host" and not HOST_VALUE.fullmatch(r.data[line_start + 5 : r.pos - 1]):
            raise r.refuse("bad-header", "a Host that is not a host name or address and a port")
        framing = name in ("content-length", "transfer-encoding")
        if framing and seen & {"content-length", "transfer-encoding"} - {name}:
            raise r.refuse("transfer-encoding", "both Content-Length and Transfer-Encoding")
        if name in ("host", "content-length", "transfer-encoding"):
            if name in seen:
                raise r.refuse("duplicate-header", f"a second {name} header")
            seen.add(name)
        if cl is not None:
            content_length = cl.value
        if r.next() != LF:
            raise r.refuse("bad-header", "CR not followed by LF")
        headers.append(Header(name, value, line_start))


def _end_of_fields(r: _Reader, reason: str) -> bool:
    """At the start of a line: True (and past it) if it is the empty line ending a section."""
    if r.data[r.pos : r.pos + 1] != b"\r":
        return False
    r.next()
    if r.next() != LF:
        raise r.refuse(reason, "CR not followed by LF")
    return True


def _field_line(
    r: _Reader, line_start: int, reason: str, seen: frozenset[str] = frozenset()
) -> tuple[str, bytes, _ContentLength | None]:
    """`name: value` up to and including its CR; the value trimmed of spaces and tabs. `seen`:
    the framing headers already read (a second Content-Length is refused at its first digit)."""
    b = r.next()
    if b not in TCHAR:
        what = "a continuation line (obs-fold)" if b in WS else f"byte {_byte(b)}"
        raise r.refuse(reason, f"{what} where a field name starts")
    while (b := r.next()) != ord(":"):
        if b not in TCHAR:
            raise r.refuse(reason, f"byte {_byte(b)} in a field name")
    name = r.data[line_start : r.pos - 1].decode("ascii").lower()
    value_start = r.pos
    cl = _ContentLength() if name == "content-length" and reason == "bad-header" else None
    while (b := r.next()) != CR:
        if b not in FIELD_BYTE:
            raise r.refuse(reason, f"byte {_byte(b)} in the value of {name}")
        if cl is not None and cl.feed(b):
            if "content-length" in seen:
                raise r.refuse("duplicate-header", "a second content-length header")
            if cl.value > CL_MAX:
                raise r.refuse("bad-content-length", f"Content-Length above {CL_MAX}")
    return name, r.data[value_start : r.pos - 1].strip(WS), cl


@dataclass(frozen=True)
class ChunkLine:
    """A chunk-size line (after the CRLF ending the previous chunk's data, if any) or, for the
    last chunk, the size line with the trailer section and the empty line that ends the body."""

    size: int
    length: int  # bytes read

    @property
    def last(self) -> bool:
        return self.size == 0


def read_chunk(data: bytes, after_data: bool) -> ChunkLine | Refusal | None:
    """The chunk framing at the start of `data` (RFC 9112 7.1), its refusal, or None if `data`
    ends first. `after_data`: `data` starts with the CRLF that must end the previous chunk."""
    r = _Reader(data)
    try:
        if after_data and (r.next() != CR or r.next() != LF):
            raise r.refuse("bad-chunk", "chunk data not followed by CRLF")
        size = _chunk_size(r)
        if size:
            return ChunkLine(size, r.pos)
        while True:  # the trailer section: field lines (never judged), then an empty line
            line_start = r.pos
            if _end_of_fields(r, "bad-chunk"):
                return ChunkLine(0, r.pos)
            _field_line(r, line_start, "bad-chunk")
            if r.next() != LF:
                raise r.refuse("bad-chunk", "CR not followed by LF in the trailer")
    except _Refuse as e:
        return e.refusal
    except _NeedMore:
        return None


def _chunk_size(r: _Reader) -> int:
    size = 0
    b = r.next()
    if b not in HEX:
        raise r.refuse("bad-chunk", "a chunk size must start with a hex digit")
    while b in HEX:
        size = size * 16 + int(chr(b), 16)
        if size > CHUNK_MAX:
            raise r.refuse("bad-chunk", f"chunk size above {CHUNK_MAX}")
        b = r.next()
    while b == ord(";"):  # chunk extensions: checked, not judged
        b = _chunk_extension(r)
    if b != CR or r.next() != LF:
        raise r.refuse("bad-chunk", "a chunk-size line must end with CRLF")
    return size


def _chunk_extension(r: _Reader) -> int:
    """One chunk extension after its `;` (RFC 9112 7.1.1, without the BWS senders must not
    generate): `token [= (token / quoted-string)]`. Returns the byte after it."""
    b = r.next()
    if b not in TCHAR:
        raise r.refuse("bad-chunk", f"byte {_byte(b)} where a chunk extension's name starts")
    while (b := r.next()) in TCHAR:
        pass
    if b != ord("="):
        return b
    b = r.next()
    if b in TCHAR:
        while (b := r.next()) in TCHAR:
            pass
        return b
    if b != ord('"'):
        raise r.refuse("bad-chunk", f"byte {_byte(b)} where a chunk extension's value starts")
    while (b := r.next()) != ord('"'):
        if b == ord("\\"):
            b = r.next()
            if b not in FIELD_BYTE:
                raise r.refuse("bad-chunk", f"byte {_byte(b)} escaped in a quoted string")
        elif b not in QDTEXT:
            raise r.refuse("bad-chunk", f"byte {_byte(b)} in a quoted chunk extension value")
    return r.next()


# A Host value servers all read alike: empty, or a name or IP literal and an optional port.
HOST_VALUE = re.compile(
    rb"[ \t]*(?:(?:[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?)?"
)


@dataclass
class _ContentLength:
    """A Content-Length value read byte by byte: spaces, digits, spaces."""

    phase: int = 0  # 0 leading spaces, 1 digits, 2 trailing spaces, 3 invalid
    value: int = 0

    def feed(self, b: int) -> bool:
        """Take one byte; True when it is a digit of the value."""
        if b in DIGITS and self.phase <= 1:
            self.phase = 1
            self.value = self.value * 10 + b - 0x30
            return True
        if b in WS and self.phase != 3:
            self.phase = 0 if self.phase == 0 else 2
        else:
            self.phase = 3
        return False

    @property
    def valid(self) -> bool:
        return self.phase in (1, 2)


# -- the path rules match -------------------------------------------------------------------------


def checked_path(raw: bytes) -> bytes | None:
    """The path rules match: the raw path (accepted only in its canonical spelling, there is
    nothing to normalize), or None when it is longer than PATH_MAX bytes."""
    return raw if len(raw) <= PATH_MAX else None


# -- small helpers --------------------------------------------------------------------------------


def _byte(b: int) -> str:
    return repr(chr(b)) if 0x20 <= b < 0x7F else f"0x{b:02X}"


def show(data: bytes | str, limit: int = 60) -> str:
    """Bytes as a short, printable excerpt for messages."""
    text = data.decode("latin-1") if isinstance(data, bytes) else data
    text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."
