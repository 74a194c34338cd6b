"""The reference interpreter: what a policy does to a stream of HTTP/1.x requests, from the AST.

This is the oracle that the compiled program is checked against (tests/kernel/test_differential.py),
and what `sockpol test` and `sockpol explain` run. It is written from docs/language.md, not from the
code generator: it reads the request head with a plain hand-written parser, normalizes the path
with its own RFC 3986 `remove_dot_segments`, and tries the rules one by one. It never looks at the
automaton, the tables or `codegen/normalize.py`; agreeing with them is what the tests check.

Three layers:

* `read_head(data)` reads one request head: a `Head`, a `Refusal` (with the same reason names as
  `sockpol.codegen.scanner.Reason`, lower-case with dashes), or None when `data` ends first. The
  first problem in byte order decides the reason, as in a left-to-right scan.
* `judge(policy, message)` is one run of the kernel program on one message: allow or refuse the
  request at its start, and how many bytes the verdict covers (head + Content-Length body), or
  that the head is incomplete and must be held (corked) until more arrives.
* `Connection` strings runs together the way Linux's tcp_bpf does for a sequence of `send()`s
  (cork, apply_bytes, a verdict that outlives a message, refusal ending the connection), so it can
  predict what the server receives and what each send returns.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache

from sockpol.contract import BEFORE_RULES, CHUNK_MAX, CL_MAX, MAX_DEPTH, PATH_MAX, UNRESERVED
from sockpol.dsl.ast import Action, HeaderCondition, HostCondition, Mode, Policy, Rule
from sockpol.dsl.pathmatch import to_regex
from sockpol.model import tls
from sockpol.model.stream import Judged, Send, Stream

# -- HTTP/1.x lexical sets (RFC 9110, 9112, 3986) -------------------------------------------------

_ALNUM = (string.ascii_letters + string.digits).encode()
TCHAR = frozenset(_ALNUM + b"!#$%&'*+-.^_`|~")
PCHAR = UNRESERVED | frozenset(b"!$&'()*+,;=:@%")  # '%' checked separately as an escape
PATH_BYTE = PCHAR | frozenset(b"/")
QUERY_BYTE = PATH_BYTE | frozenset(b"?")
FIELD_BYTE = frozenset(range(0x20, 0x7F)) | frozenset(range(0x80, 0x100)) | {0x09}
HEX = frozenset(b"0123456789abcdefABCDEF")
DIGITS = frozenset(b"0123456789")
WS = b" \t"
SP, CR, LF, QMARK, PERCENT = 0x20, 0x0D, 0x0A, 0x3F, 0x25

# -- limits (docs/language.md, "Normalization and refusals") -------------------------------------

# PATH_MAX: bytes of a normalized path, at every step of normalizing it; MAX_DEPTH: completed
# segments (each followed by '/') on the way; CL_MAX, CHUNK_MAX: the largest Content-Length and
# chunk size accepted (all from the contract: the kernel program enforces the same).
AMBIGUOUS_ESCAPES = frozenset({0x2F, 0x5C, 0x00})  # %2F, %5C, %00

# Refusal reasons before any rule, by slug (contract.Reason: BAD_METHOD -> "bad-method").
REFUSALS = tuple(r.slug for r in BEFORE_RULES)
ALLOWED, DENY_RULE, DENY_DEFAULT = "none", "rule", "default"
# A head that never completes is not refused: the kernel holds (corks) its bytes until the rest
# arrives, so nothing reaches the server; only at max-head bytes is it refused (head-too-large).
HELD = "held"
# Events the program records (sockpol.telemetry.EventKind, lower-case): a refusal, a request that
# passed only because the policy runs in dry-run mode or an audit rule matched it, and a request
# that a rule marked `log` passed.
REFUSED, DRY_RUN, AUDIT, LOGGED = "refused", "dry-run", "audit", "logged"


# -- results --------------------------------------------------------------------------------------


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
    path: str  # normalized: what rules match
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


@dataclass(frozen=True)
class RuleCheck:
    """Whether one rule matched a head, and if not, the first part that did not."""

    rule: Rule
    matched: bool
    why: str


@dataclass(frozen=True)
class Verdict:
    """The decision on one request: allowed, denied by a rule or the default, or refused.

    `allow` says whether its bytes pass; `reason` is ALLOWED for a plain allow, else why it is (or,
    under an audit rule or in dry-run mode, would be) refused: DENY_RULE, DENY_DEFAULT or a refusal.
    """

    allow: bool
    reason: str  # ALLOWED, DENY_RULE, DENY_DEFAULT, HELD or one of REFUSALS
    rule: Rule | None = None  # the deciding rule
    head: Head | None = None
    refusal: Refusal | None = None
    checks: tuple[RuleCheck, ...] = ()  # the rules tried, in order, up to the deciding one
    event: str | None = None  # REFUSED, DRY_RUN, AUDIT, LOGGED, or None: nothing recorded

    @property
    def would_refuse(self) -> bool:
        """Passed, but only because of an audit rule or dry-run mode."""
        return self.allow and self.reason != ALLOWED

    @property
    def decided_by(self) -> str:
        if self.refusal is not None:
            return f"refusal {self.reason}"
        if self.rule is not None:
            return f"rule {self.rule.index} (line {self.rule.span.line})"
        return "default"


@dataclass(frozen=True)
class Run:
    """One run of the kernel program on one message: the bytes from where the last verdict ended,
    a request head or (in a chunked body) a chunk-size line."""

    allow: bool
    # Bytes of this message the verdict covers (head + body, size line + data, up to the end of
    # the message); 0 = the whole message.
    covers: int
    cork: int = 0  # > 0: hold the message until it is this long, then run again
    resume: str = "request"  # where the next run starts: see RESUME
    verdict: Verdict | None = None  # set when the run judged a head or refused something
    # Bytes of the body (or chunk data) still to come in later messages, which the next runs
    # pass without a look. The program counts them itself rather than leaving them to
    # apply_bytes: under kTLS, apply_bytes ends with the TLS record.
    left: int = 0
    tls: int = 0  # the connection's TLS phase after this run: tls.CONN_* flags


def _covering(allow: bool, total: int, message: bytes, **kw) -> Run:
    """A verdict on `total` bytes from the start of `message`, which may end sooner."""
    covers = min(total, len(message))
    return Run(allow, covers, left=total - covers, **kw)


# Where a run starts: at a request head, at a chunk-size line, at the CRLF ending chunk data, or
# nowhere: a dry-run pass of a refused head left the connection without framing ("unjudged"),
# or `tls userspace allow` let a connection's user-space TLS pass ("tls-pass").
RESUME = ("request", "chunk-size", "chunk-end", "unjudged", "tls-pass")


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
    path = normalize_path(raw_path)
    if path is None:
        raise r.refuse("path-too-long", f"path '{_show(raw_path)}' normalizes beyond the limits")
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
    while True:
        b = r.next()
        if b == SP and r.pos > 1:
            return r.data[: r.pos - 1].decode("ascii")
        if b not in TCHAR:
            raise r.refuse("bad-method", f"byte {_byte(b)} in or instead of the method")


def _path(r: _Reader) -> tuple[bytes, int]:
    """The raw path up to the SP or '?' that ends it, with its escapes checked. A path whose
    bytes so far already normalize beyond the limits is refused before it ends (the kernel
    normalizes as the bytes go by)."""
    start = r.pos
    try:
        return _path_bytes(r, start)
    except _NeedMore:
        so_far = re.sub(rb"%[0-9A-Fa-f]?$", b"", r.data[start:])  # an escape not yet whole
        if so_far and normalize_path(so_far) is None:
            raise r.refuse(
                "path-too-long", "the path so far normalizes beyond the limits"
            ) from None
        raise


def _path_bytes(r: _Reader, start: int) -> tuple[bytes, int]:
    b = r.next()
    if b != ord("/"):
        raise r.refuse("bad-target", "the target does not start with '/' (origin-form)")
    pending = 0  # hex digits still owed to a '%'
    hi = 0
    while True:
        b = r.next()
        if b in (SP, QMARK):
            if pending:
                raise r.refuse("ambiguous-path", "the path ends inside a %-escape")
            return r.data[start : r.pos - 1], b
        if b not in PATH_BYTE:
            raise r.refuse("bad-target", f"byte {_byte(b)} in the path")
        if pending:
            if b not in HEX:
                raise r.refuse("ambiguous-path", "'%' not followed by two hex digits")
            if pending == 2:
                hi, pending = b, 1
                continue
            pending = 0
            value = int(chr(hi) + chr(b), 16)
            if value in AMBIGUOUS_ESCAPES:
                raise r.refuse("ambiguous-path", f"%{value:02X} (an encoded '/', '\\' or NUL)")
        elif b == PERCENT:
            pending = 2


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
    if b == ord(";"):  # chunk extensions: passed, not judged
        while (b := r.next()) != CR:
            if b not in FIELD_BYTE:
                raise r.refuse("bad-chunk", f"byte {_byte(b)} in a chunk extension")
    if b != CR or r.next() != LF:
        raise r.refuse("bad-chunk", "a chunk-size line must end with CRLF")
    return size


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


# -- normalization --------------------------------------------------------------------------------


def normalize_path(raw: bytes) -> bytes | None:
    """The path rules match: unreserved escapes decoded, other escapes upper-cased, `//` merged,
    dot segments removed (RFC 3986 5.2.4, never above the root). None when it is too long or too
    deep at any step, as the kernel, which normalizes as the bytes go by, checks it."""
    segments = [_decode(s) for s in raw[1:].split(b"/")]
    stack: list[bytes] = []
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        # While a segment is read it is in the output, even one that is then dropped ("..").
        if _length(stack) + len(seg) > PATH_MAX:
            return None
        if seg == b"" or seg == b".":
            continue
        if seg == b"..":
            if stack:
                stack.pop()
            continue
        if last:
            return b"/" + b"".join(s + b"/" for s in stack) + seg
        if len(stack) >= MAX_DEPTH or _length(stack) + len(seg) + 1 > PATH_MAX:
            return None
        stack.append(seg)
    return b"/" + b"".join(s + b"/" for s in stack)


def _length(stack: list[bytes]) -> int:
    return 1 + sum(len(s) + 1 for s in stack)


def _decode(segment: bytes) -> bytes:
    def one(m: re.Match[bytes]) -> bytes:
        value = int(m.group(1), 16)
        return bytes([value]) if value in UNRESERVED else b"%" + m.group(1).upper()

    return re.sub(rb"%([0-9A-Fa-f]{2})", one, segment)


# -- rules ----------------------------------------------------------------------------------------


@cache
def _path_regex(pattern: str) -> re.Pattern[str]:
    return re.compile(to_regex(pattern))


@cache
def _host_regex(pattern: str) -> re.Pattern[bytes]:
    if pattern.startswith("*."):
        core = rb"[A-Za-z0-9-]+" + re.escape(pattern[1:].encode())
    else:
        core = re.escape(pattern.encode())
    # A trailing dot and any ':port' (digits, maybe none) are ignored; case never matters.
    return re.compile(core + rb"\.?(?::[0-9]*)?", re.IGNORECASE)


def host_matches(pattern: str, host: bytes | None) -> bool:
    return host is not None and _host_regex(pattern).fullmatch(host) is not None


def check_rule(rule: Rule, head: Head) -> RuleCheck:
    methods = rule.methods.methods
    if methods is not None and head.method not in methods:
        return RuleCheck(rule, False, f"method {head.method} is not {','.join(methods)}")
    if not _path_regex(rule.path.text).match(head.path):
        return RuleCheck(rule, False, f"path {head.path} does not match {rule.path.text}")
    for cond in rule.conditions:
        if isinstance(cond, HostCondition):
            if not host_matches(cond.pattern, head.host):
                shown = "no Host header" if head.host is None else f"Host is {_show(head.host)}"
                return RuleCheck(rule, False, f'{shown}, not "{cond.pattern}"')
        else:
            failure = _header_failure(cond, head)
            if failure:
                return RuleCheck(rule, False, failure)
    return RuleCheck(rule, True, "method, path and every condition match")


def _header_failure(cond: HeaderCondition, head: Head) -> str:
    values = head.values(cond.name)
    if not values:
        return f"no {cond.name} header"
    if cond.value is not None and cond.value.encode("latin-1") not in values:
        shown = ", ".join(f'"{_show(v)}"' for v in values)
        return f'{cond.name} is {shown}, not "{cond.value}"'
    return ""


def decide(policy: Policy, head: Head, mode: Mode | None = None) -> Verdict:
    """First match: the first rule whose method, path and conditions hold, else the default.
    An audit rule decides like a deny rule but passes the request; in dry-run mode (`mode`, else
    the policy's own) a deny passes too. Both are recorded as would-be refusals."""
    dry_run = (mode or policy.mode) is Mode.DRY_RUN
    checks: list[RuleCheck] = []
    rule = None
    for candidate in policy.rules:
        checks.append(check_rule(candidate, head))
        if checks[-1].matched:
            rule = candidate
            break
    action = rule.action if rule is not None else policy.default
    if action is Action.ALLOW:
        event = LOGGED if rule is not None and rule.log else None
        return Verdict(True, ALLOWED, rule, head, None, tuple(checks), event)
    reason = DENY_RULE if rule is not None else DENY_DEFAULT
    if action is Action.AUDIT:
        return Verdict(True, reason, rule, head, None, tuple(checks), AUDIT)
    if dry_run:
        return Verdict(True, reason, rule, head, None, tuple(checks), DRY_RUN)
    return Verdict(False, reason, rule, head, None, tuple(checks), REFUSED)


def judge(
    policy: Policy,
    message: bytes,
    resume: str = "request",
    mode: Mode | None = None,
    lost: str = "",
    left: int = 0,
    phase: int = 0,
) -> Run:
    """One run of the kernel program on `message`, which starts where `resume` says. `mode` is
    the mode in force (default: the policy's); `lost` is the refusal that left an "unjudged"
    connection without framing; `left` and `phase` are `Run.left` and `Run.tls` of the run
    before (a body still to come; where the connection is in its TLS handshake, tls.py)."""
    dry_run = (mode or policy.mode) is Mode.DRY_RUN
    if not message:
        return Run(True, 0, resume=resume, left=left, tls=phase)
    if left:
        return _covering(True, left, message, resume=resume, tls=phase)
    if resume == "tls-pass":  # counted as unjudged, not recorded as events
        return Run(True, 0, resume=resume, tls=phase)
    window = message[: policy.max_head]
    tls_mode = tls.policy_mode(policy)
    if resume == "request" and tls_mode and tls.is_alert_plaintext(window, len(message)):
        # Never a record, so past the handshake from here (what the kernel's walk concludes
        # before its scanner refuses the bytes as a method and its alert check passes them).
        return Run(True, 0, resume=resume, tls=phase | tls.CONN_HTTP)
    if resume == "request" and not phase & tls.CONN_HTTP:
        step = tls.step(window, len(message), phase, tls_mode)
        if step.action != tls.StepKind.HTTP:
            return _tls_run(step, message, dry_run, phase)
        phase |= tls.CONN_HTTP
    return replace(_judge_http(policy, message, window, resume, mode, dry_run, lost), tls=phase)


def _tls_run(step: tls.Step, message: bytes, dry_run: bool, phase: int) -> Run:
    """A run that met a TLS record instead of HTTP (tls.step)."""
    if step.action == tls.StepKind.CORK:
        return Run(True, 0, cork=step.covered, tls=phase)
    if step.action == tls.StepKind.REFUSE:
        refusal = Refusal(step.reason, 0, tls.DETAIL[step.reason])
        if dry_run:
            return Run(True, 0, resume="unjudged", verdict=_refused(refusal, True), tls=phase)
        return Run(False, 0, verdict=_refused(refusal, False), tls=phase)
    if step.action == tls.StepKind.USERSPACE_ALLOW:
        return Run(True, 0, resume="tls-pass", tls=step.flags)
    return _covering(True, step.covered, message, tls=step.flags)


def _judge_http(
    policy: Policy,
    message: bytes,
    window: bytes,  # the message's first max-head bytes: what the program pulls
    resume: str,
    mode: Mode | None,
    dry_run: bool,
    lost: str,
) -> Run:
    if resume == "unjudged":
        # Where requests start is unknown: pass everything while in dry-run, else refuse.
        refusal = Refusal(lost, 0, "the connection lost its framing in dry-run mode")
        if dry_run:  # passed unjudged: recorded in a counter, not as an event
            return Run(True, 0, resume=resume, verdict=Verdict(True, lost, refusal=refusal))
        return Run(False, 0, resume=resume, verdict=_refused(refusal, False))
    found: Head | ChunkLine | Refusal | None
    if resume == "request":
        found = read_head(window)
        if isinstance(found, Head):
            verdict = decide(policy, found, mode)
            if found.chunked:
                return Run(verdict.allow, found.length, resume="chunk-size", verdict=verdict)
            total = found.length + found.content_length
            return _covering(verdict.allow, total, message, verdict=verdict)
    else:
        found = read_chunk(window, after_data=resume == "chunk-end")
        if isinstance(found, ChunkLine):
            if found.last:
                return Run(True, found.length, resume="request")
            return _covering(True, found.length + found.size, message, resume="chunk-end")
    if isinstance(found, Refusal):
        refusal = found
    elif len(message) >= policy.max_head:
        what = "head" if resume == "request" else "chunk-size line"
        refusal = Refusal(
            "head-too-large", policy.max_head, f"no end of {what} within {policy.max_head} bytes"
        )
    else:
        return Run(True, 0, cork=len(message) + 1, resume=resume)
    if dry_run:  # passes, and the rest of the connection with it: its framing is lost
        return Run(True, 0, resume="unjudged", verdict=_refused(refusal, True))
    return Run(False, 0, resume=resume, verdict=_refused(refusal, False))


def _refused(refusal: Refusal, dry_run: bool) -> Verdict:
    return Verdict(dry_run, refusal.reason, refusal=refusal, event=DRY_RUN if dry_run else REFUSED)


def evaluate(policy: Policy, request: bytes, mode: Mode | None = None) -> Verdict:
    """The verdict on the request at the start of `request`, sent whole: the head's, unless its
    chunked body is then refused; HELD when the head never completes (the kernel holds it)."""
    conn = Connection(policy, mode=mode)
    conn.send(request)
    if not conn.verdicts:
        return Verdict(False, HELD)
    first = conn.verdicts[0]
    later = next((v for v in conn.verdicts[1:] if v.reason == "bad-chunk"), None)
    if first.allow and later is not None and first.head is not None and first.head.chunked:
        return Verdict(
            later.allow, later.reason, first.rule, first.head, later.refusal, first.checks,
            later.event,
        )  # fmt: skip
    return first


# -- a connection: the kernel's send path (model/stream.py) with this interpreter judging ---------


@dataclass(frozen=True)
class ConnState:
    """What the program keeps per connection between runs, as this interpreter names it."""

    resume: str = "request"  # where the next run starts: see RESUME
    left: int = 0  # body bytes still to come (Run.left)
    tls: int = 0  # where the connection is in its TLS handshake (Run.tls)
    lost: str = ""  # the refusal that left the connection "unjudged"


class Connection(Stream[ConnState, Verdict]):
    """A governed TCP connection, send by send, judged by this interpreter (stream.py models
    the kernel's send path around it). `policy` None: the port is not governed, all passes.
    `mode`: the mode in force (None: the policy's); it may change between sends. `observe` is
    called with (message, resume, run) after every run: lets tests hold another model to it."""

    def __init__(
        self,
        policy: Policy | None,
        mode: Mode | None = None,
        observe: Callable[[bytes, str, Run], None] | None = None,
    ) -> None:
        super().__init__(ConnState())
        self.policy = policy
        self.mode = mode
        self.observe = observe

    @property
    def verdicts(self) -> list[Verdict]:
        """Heads judged and refusals, in order."""
        return self.records

    def governed(self) -> bool:
        return self.policy is not None

    def judge_run(self, message: bytes) -> Judged[ConnState, Verdict]:
        assert self.policy is not None
        st = self.state
        run = judge(self.policy, message, st.resume, self.mode, st.lost, st.left, st.tls)
        if self.observe is not None:
            self.observe(message, st.resume, run)
        if run.cork:
            return Judged(run.allow, run.covers, run.cork, None, run.verdict)
        lost, resume = st.lost, st.resume
        if run.allow:
            if run.resume == "unjudged" and st.resume != "unjudged":
                assert run.verdict is not None
                lost = run.verdict.reason
            resume = run.resume
        state = ConnState(resume, run.left, run.tls, lost)
        return Judged(run.allow, run.covers, 0, state, run.verdict)


def simulate_sends(policy: Policy | None, sends: list[bytes]) -> Connection:
    conn = Connection(policy)
    for data in sends:
        conn.send(data)
    return conn


# -- small helpers --------------------------------------------------------------------------------


def _byte(b: int) -> str:
    return repr(chr(b)) if 0x20 <= b < 0x7F else f"0x{b:02X}"


def _show(data: bytes | str, limit: int = 60) -> str:
    text = data.decode("latin-1") if isinstance(data, bytes) else data
    text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "ALLOWED",
    "AUDIT",
    "DRY_RUN",
    "LOGGED",
    "REFUSED",
    "DENY_DEFAULT",
    "DENY_RULE",
    "REFUSALS",
    "Connection",
    "Head",
    "Refusal",
    "RuleCheck",
    "ChunkLine",
    "Run",
    "Send",
    "Verdict",
    "check_rule",
    "decide",
    "evaluate",
    "judge",
    "normalize_path",
    "read_chunk",
    "read_head",
    "simulate_sends",
]
