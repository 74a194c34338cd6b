"""Semantics: is every policy of a parsed file meaningful, and could every rule ever match?

One pass over the tree, collecting every diagnostic before deciding; `check` raises `CompileError`
with all errors (and the warnings alongside), or returns the warnings. Each diagnostic points at the
offending token: a bad method inside `GET,get`, the `//` inside a path, the `:8080` inside a host.
The tree only records whole nodes, so inner positions are found again in the source line; if a
node's span does not match its source (a hand-built tree), the whole node is blamed instead.

What parse.py already reported (statement counts, malformed numbers and sizes) is not repeated.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from sockpol.contract import MAX_ANSWERS
from sockpol.diagnostics import Diagnostic, DiagnosticBag, Severity, Source, Span, position
from sockpol.dsl import patterns, regex
from sockpol.dsl.ast import (
    Action,
    HeaderCondition,
    HostCondition,
    Policy,
    PolicyFile,
    PortRange,
    Rule,
    Side,
)

NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
NAME_MAX = 32  # policy names become bpffs pin paths
METHOD = re.compile(r"[A-Z][A-Z0-9_-]*")
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.")


def check(file: PolicyFile) -> tuple[PolicyFile, list[Diagnostic]]:
    """The file unchanged, and its warnings; raises `CompileError` if anything is an error."""
    bag = DiagnosticBag(file.source)
    bag.items.extend(diagnose(file))
    bag.raise_if_errors()
    return file, [d for d in bag.items if d.severity is not Severity.ERROR]


def diagnose(file: PolicyFile) -> list[Diagnostic]:
    """Every error and warning of the file, in source order; never raises."""
    checker = _Checker(file.source)
    checker.file(file)
    return sorted(checker.bag.items, key=position)


@dataclass(frozen=True)
class _Piece:
    """Part of a node's source text: where it is, and its text with string escapes resolved."""

    span: Span
    text: str
    columns: tuple[int, ...]  # source column of each character of `text`, and one past the end

    def sub(self, offset: int, length: int) -> Span:
        offset = min(offset, len(self.text))
        end = min(offset + max(length, 1), len(self.text))
        if end == offset:  # an empty text: point at the piece itself
            return self.span
        return Span(self.span.line, self.columns[offset], self.span.line, self.columns[end])


class _Checker:
    def __init__(self, source: Source) -> None:
        self.source = source
        self.bag = DiagnosticBag(source)
        self.lines = [line.removesuffix("\r") for line in source.lines]

    # -- file and policies -----------------------------------------------------------------------

    def file(self, file: PolicyFile) -> None:
        seen: dict[str, Policy] = {}
        for policy in file.policies:
            first = seen.setdefault(policy.name, policy)
            if first is not policy:
                self.bag.error(
                    policy.name_span,
                    f"a second policy named '{policy.name}' (the first is on line "
                    f"{first.name_span.line})",
                    "E103",
                )
            self.policy(policy)
        self.shared_ports(file.policies)

    def policy(self, policy: Policy) -> None:
        self.name(policy)
        self.ports(policy)
        rules_seen: dict[tuple[object, ...], Rule] = {}
        for rule in policy.rules:
            self.rule(rule)
            self.repeated_rule(rule, rules_seen)
        self.answers(policy)
        self.side(policy)

    def side(self, policy: Policy) -> None:
        """What the receiving side cannot do yet: judge inside TLS (docs/ktls.md)."""
        if policy.side is Side.INGRESS and policy.tls is not None:
            self.bag.error(
                policy.tls.span,
                "'tls' is not supported with 'side ingress'",
                "E159",
                "on the receiving side the program sees TLS records before any TLS layer "
                "decrypts them, kTLS receive included (docs/ktls.md); without 'tls' a TLS "
                "handshake is refused (bad-method)",
            )

    def answers(self, policy: Policy) -> None:
        """At most MAX_ANSWERS distinct answers (the kernel's answer table); `answer` on a rule
        that never refuses (allow, audit) says nothing."""
        seen = [policy.answer_status]
        for rule in policy.rules:
            if rule.answer is None:
                continue
            if rule.action is not Action.DENY:
                self.bag.warning(
                    rule.answer.span,
                    f"'answer {rule.answer}' on {_article(rule.action.value)} rule changes "
                    "nothing: the requests it matches pass",
                    "W195",
                    "'answer' on a deny rule says how its refusals are answered",
                )
            if rule.answer.status not in seen:
                seen.append(rule.answer.status)
                if len(seen) == MAX_ANSWERS + 1:
                    self.bag.error(
                        rule.answer.span,
                        f"more than {MAX_ANSWERS} distinct answers in one policy "
                        f"({', '.join('drop' if a == 0 else str(a) for a in seen)})",
                        "E162",
                        "the policy's own answer counts as one; use fewer statuses",
                    )

    def name(self, policy: Policy) -> None:
        name = policy.name
        hint = "policy names are used in pin paths: a letter, then letters, digits, '-' or '_'"
        if not re.fullmatch(r"[A-Za-z]", name[:1]):
            self.bag.error(
                policy.name_span, f"policy name '{name}' must start with a letter", "E101", hint
            )
        elif not NAME.fullmatch(name):
            bad = NAME.match(name).end()  # type: ignore[union-attr]  # the first letter matched
            self.bag.error(
                _sub_span(policy.name_span, bad, 1),
                f"policy name '{name}' has a character {_show(name[bad])} that is not allowed",
                "E101",
                hint,
            )
        elif len(name) > NAME_MAX:
            self.bag.error(
                policy.name_span,
                f"policy name '{name}' is {len(name)} characters long; at most {NAME_MAX} are "
                "allowed",
                "E102",
            )

    def ports(self, policy: Policy) -> None:
        valid = []
        for r in policy.ports:
            if not (1 <= r.low <= 65535 and 1 <= r.high <= 65535):
                self.bag.error(r.span, f"port {r} is out of range 1..65535", "E112")
            elif r.low > r.high:
                self.bag.error(
                    r.span,
                    f"port range {r} is empty: {r.low} is above {r.high}",
                    "E113",
                    f"write {r.high}-{r.low}",
                )
            else:
                valid.append(r)
        for later, earlier in _overlaps([(r, None) for r in valid]):
            what = (
                "repeats" if (earlier.low, earlier.high) == (later.low, later.high) else "overlaps"
            )
            self.bag.warning(
                later.span,
                f"port {later} {what} port {earlier} (line {earlier.span.line})",
                "W114",
            )

    def shared_ports(self, policies: tuple[Policy, ...]) -> None:
        """Two policies governing one port would leave it unclear which one decides."""
        owner = {}
        ranges = []
        for policy in policies:
            for r in policy.ports:
                if 1 <= r.low <= r.high <= 65535:
                    owner[id(r)] = policy
                    ranges.append((r, policy))
        for later, earlier in _overlaps(ranges):
            other = owner[id(earlier)]
            if other.side is not owner[id(later)].side:
                continue  # a port may be governed on each side (the sender's and the receiver's)
            self.bag.error(
                later.span,
                f"port {later} is also governed by policy '{other.name}' "
                f"(line {other.name_span.line})",
                "E115",
                "a port belongs to one policy; merge the rules or split the ports",
            )

    # -- rules -----------------------------------------------------------------------------------

    def rule(self, rule: Rule) -> None:
        self.methods(rule)
        self.path(rule)
        seen: set[object] = set()
        for condition in rule.conditions:
            if isinstance(condition, HostCondition):
                self.host(condition)
            else:
                self.header(condition)
            key = _condition_key(condition)
            if key in seen:
                self.bag.warning(condition.span, f"condition {condition} is repeated", "W191")
            seen.add(key)
        self.conflicting_hosts(rule)
        self.redundant_log(rule)

    def redundant_log(self, rule: Rule) -> None:
        """Refused and audited requests always make an event; `log` adds one only to allows."""
        if not rule.log or rule.action is Action.ALLOW:
            return
        raw = self._raw(rule.span) or ""
        end = len(raw.rstrip(" \t"))
        span = _sub_span(rule.span, end - 3, 3) if raw[:end].endswith("log") else rule.span
        self.bag.warning(
            span,
            f"'log' on {'a deny' if rule.action is Action.DENY else 'an audit'} rule changes "
            "nothing: every request it matches is recorded anyway",
            "W193",
            "'log' records the requests an allow rule passes",
        )

    def conflicting_hosts(self, rule: Rule) -> None:
        """A request has one host, so two host conditions no host satisfies kill the rule."""
        hosts = [c for c in rule.conditions if isinstance(c, HostCondition)]
        for i, later in enumerate(hosts):
            earlier = next(
                (h for h in hosts[:i] if not _hosts_meet(h.pattern, later.pattern)), None
            )
            if earlier is not None:
                self.bag.warning(
                    later.span,
                    f"no host matches both {earlier} and {later}; the rule can never match",
                    "W192",
                )
                return

    def methods(self, rule: Rule) -> None:
        methods = rule.methods.methods
        if methods is None:
            return
        pieces = list(self._split_methods(rule))
        if len(pieces) != len(methods):  # a hand-built tree: blame the whole method list
            pieces = [_whole(rule.methods.span, m) for m in methods]
        seen: set[str] = set()
        for method, piece in zip(methods, pieces, strict=True):
            if method == "*":
                self.bag.error(
                    piece.span,
                    "'*' means any method and cannot be combined with other methods",
                    "E143",
                )
            elif not METHOD.fullmatch(method):
                if METHOD.fullmatch(method.upper()):
                    self.bag.error(
                        piece.span,
                        f"method '{method}' is not upper-case",
                        "E141",
                        f"methods are case-sensitive; write {method.upper()}",
                    )
                else:
                    self.bag.error(
                        piece.span,
                        f"'{method}' is not a method: expected upper-case letters, digits, "
                        "'-' or '_'",
                        "E140",
                    )
            elif method in seen:
                self.bag.warning(piece.span, f"method {method} is listed twice", "W142")
            seen.add(method)

    def path(self, rule: Rule) -> None:
        raw = self._raw(rule.path.span)
        piece = self._piece(rule.path.span, rule.path.text, quoted=(raw or "").startswith('"'))
        text = rule.path.text
        found = regex.problems(text) if regex.is_regex(text) else patterns.problems(text)
        for problem in found:
            self.bag.error(
                piece.sub(problem.offset, problem.length),
                problem.message,
                problem.code,
                problem.hint,
            )

    def host(self, condition: HostCondition) -> None:
        piece = self._quoted_part(condition.span, r"host[ \t]+", condition.pattern)
        for offset, length, code, message, hint in _host_problems(condition.pattern):
            self.bag.error(piece.sub(offset, length), message, code, hint)

    def header(self, condition: HeaderCondition) -> None:
        name = condition.name
        raw = self._raw(condition.span) or ""
        match = re.match(r"header[ \t]+([^ \t=]+)", raw)
        name_span = condition.span
        if match and match.group(1).lower() == name:
            name_span = _sub_span(condition.span, match.start(1), len(match.group(1)))
        if name == "host":
            self.bag.error(
                name_span,
                "'header host' is not allowed",
                "E181",
                'use host "PATTERN": it ignores case, a trailing dot and the port',
            )
        elif not HEADER_NAME.fullmatch(name):
            bad = next(i for i, c in enumerate(name + " ") if not HEADER_NAME.fullmatch(c))
            self.bag.error(
                _sub_span(name_span, bad, 1) if name_span is not condition.span else name_span,
                f"header name '{name}' has a character {_show(name[bad : bad + 1])} that is not "
                "allowed in a header name",
                "E180",
            )
        if condition.value is not None:
            piece = self._quoted_part(
                condition.span, r"header[ \t]+[^ \t=]+[ \t]*=[ \t]*", condition.value
            )
            for offset, length, code, message, hint in _value_problems(condition.value):
                self.bag.error(piece.sub(offset, length), message, code, hint)

    def repeated_rule(self, rule: Rule, seen: dict[tuple[object, ...], Rule]) -> None:
        methods = None if rule.methods.methods is None else frozenset(rule.methods.methods)
        key = (methods, rule.path.text, frozenset(_condition_key(c) for c in rule.conditions))
        first = seen.setdefault(key, rule)
        if first is rule:
            return
        same = "repeats" if first.action is rule.action else "has the same match as"
        self.bag.warning(
            rule.span,
            f"this rule {same} the rule on line {first.span.line}; it can never match",
            "W190",
            "the first matching rule decides",
        )

    # -- finding positions inside a node ---------------------------------------------------------

    def _raw(self, span: Span) -> str | None:
        if span.line != span.end_line:
            return None
        line = self.lines[span.line - 1] if 0 < span.line <= len(self.lines) else ""
        if not 0 < span.column <= span.end_column <= len(line) + 1:
            return None
        return line[span.column - 1 : span.end_column - 1]

    def _split_methods(self, rule: Rule) -> Iterator[_Piece]:
        raw = self._raw(rule.methods.span)
        if raw is None:
            return
        for m in re.finditer(r"[^,\s]+", raw):
            yield _whole(_sub_span(rule.methods.span, m.start(), len(m.group())), m.group())

    def _piece(self, span: Span, text: str, quoted: bool) -> _Piece:
        if not quoted:
            raw = self._raw(span)
            if raw is not None and len(raw) == len(text):
                return _whole(span, text)
            return _Piece(span, text, tuple([span.column] * (len(text) + 1)))
        return self._string_piece(span, self._raw(span), text)

    def _quoted_part(self, span: Span, prefix: str, text: str) -> _Piece:
        raw = self._raw(span) or ""
        match = re.match(prefix, raw)
        if match is None or not raw[match.end() :].startswith('"'):
            return _Piece(span, text, tuple([span.column] * (len(text) + 1)))
        string_span = Span(span.line, span.column + match.end(), span.line, span.end_column)
        return self._string_piece(string_span, raw[match.end() :], text)

    def _string_piece(self, span: Span, raw: str | None, text: str) -> _Piece:
        """Map each character of a decoded string back to its column in `"..."`."""
        columns = []
        i = 1
        while raw and i < len(raw) - 1 and len(columns) < len(text):
            columns.append(span.column + i)
            i += 2 if raw[i] == "\\" else 1
        if len(columns) != len(text):
            return _Piece(span, text, tuple([span.column] * (len(text) + 1)))
        columns.append(span.column + i)
        return _Piece(span, text, tuple(columns))


def _overlaps(ranges: list[tuple[PortRange, object]]) -> list[tuple[PortRange, PortRange]]:
    """Pairs (later, earlier) in source order of overlapping ranges whose groups differ (all
    groups differ when every group is None). Every range that overlaps another shows up in at
    least one pair, each range at most once as `later`; one sweep in port order, not n².
    """

    def differ(a: object, b: object) -> bool:
        return a is None or a is not b

    best: tuple[PortRange, object] | None = None  # highest `high` so far
    best_other: tuple[PortRange, object] | None = None  # highest among groups other than best's
    previous: tuple[PortRange, object] | None = None  # the neighbour: a repeated port is next
    pairs: dict[int, tuple[PortRange, PortRange]] = {}
    for item in sorted(ranges, key=lambda x: (x[0].low, x[0].high, _where(x[0]))):
        r, group = item
        far = best if best is not None and differ(best[1], group) else best_other
        for partner in (previous, far):
            if partner is not None and differ(partner[1], group) and partner[0].high >= r.low:
                later, earlier = sorted((r, partner[0]), key=_where, reverse=True)
                pairs.setdefault(id(later), (later, earlier))
        if best is None or r.high > best[0].high:
            if best is not None and differ(best[1], group):
                best_other = best
            best = item
        elif differ(best[1], group) and (best_other is None or r.high > best_other[0].high):
            best_other = item
        previous = item
    return sorted(pairs.values(), key=lambda pair: _where(pair[0]))


def _where(r: PortRange) -> tuple[int, int]:
    return (r.span.line, r.span.column)


def _whole(span: Span, text: str) -> _Piece:
    return _Piece(span, text, tuple(span.column + i for i in range(len(text) + 1)))


def _sub_span(span: Span, offset: int, length: int) -> Span:
    column = span.column + offset
    return Span(span.line, column, span.line, column + max(length, 1))


def _condition_key(condition: HostCondition | HeaderCondition) -> tuple[object, ...]:
    if isinstance(condition, HostCondition):
        return ("host", condition.pattern)
    return ("header", condition.name, condition.value)


def _hosts_meet(a: str, b: str) -> bool:
    """Can one host match both patterns? (`*.` stands for exactly one label.)"""
    if a == b:
        return True
    if a.startswith("*.") and b.startswith("*."):
        return False
    if b.startswith("*."):
        a, b = b, a
    if not a.startswith("*."):
        return False
    label, dot, rest = b.partition(".")
    return bool(label) and bool(dot) and rest == a[2:]


def _show(c: str) -> str:
    return f"'{c}'" if c.isprintable() and c != "" else f"{c!r} (U+{ord(c or chr(0)):04X})"


TextProblem = tuple[int, int, str, str, str]  # offset, length, code, message, hint


def _host_problems(pattern: str) -> list[TextProblem]:
    """Problems of a (lower-cased) host pattern: `api.example.com` or `*.example.com`."""
    if pattern == "":
        return [(0, 0, "E170", "empty host pattern", "leave out the condition to allow any host")]
    if pattern == "*":
        return [
            (
                0,
                1,
                "E174",
                "'*' alone is not a host pattern",
                "leave out the condition to allow any host",
            )
        ]
    colon = pattern.find(":")
    if colon >= 0 and "[" not in pattern:
        return [
            (
                colon,
                len(pattern) - colon,
                "E171",
                "a host pattern cannot hold a port",
                f'host patterns match any port: write "{pattern[:colon]}"',
            )
        ]
    found: list[TextProblem] = []
    body, base = (pattern[2:], 2) if pattern.startswith("*.") else (pattern, 0)
    for i, c in enumerate(body):
        if c == "*":
            message = "'*' is only allowed as the whole first label, as in '*.example.com'"
            found.append((base + i, 1, "E174", message, ""))
        elif c not in HOST_CHARS:
            found.append(
                (
                    base + i,
                    1,
                    "E170",
                    f"character {_show(c)} is not allowed in a host pattern",
                    "host patterns hold letters, digits, '-' and '.'",
                )
            )
            break  # one is enough: `[::1]` is one mistake, not four
    if body.endswith(".") and body != ".":
        found.append(
            (
                base + len(body) - 1,
                1,
                "E172",
                "a host pattern cannot end with '.'",
                f'write "{pattern[:-1]}": a trailing dot in a request\'s host is ignored',
            )
        )
        body = body[:-1]
    offset = base
    for label in body.split("."):
        if label == "":
            found.append((max(offset - 1, 0), 1, "E173", "empty label in a host pattern", ""))
        elif len(label) > 63:
            found.append(
                (
                    offset,
                    len(label),
                    "E175",
                    f"host label is {len(label)} characters long; at most 63 are allowed",
                    "",
                )
            )
        offset += len(label) + 1
    if len(pattern) > 253:
        found.append(
            (
                0,
                len(pattern),
                "E175",
                f"host pattern is {len(pattern)} characters long; at most 253 are allowed",
                "",
            )
        )
    return found


def _value_problems(value: str) -> list[TextProblem]:
    """A header value is matched exactly after trimming, so it must be trimmed printable ASCII."""
    found: list[TextProblem] = []
    for i, c in enumerate(value):
        if not (c == " " or "!" <= c <= "~"):
            found.append(
                (
                    i,
                    1,
                    "E182",
                    f"character {_show(c)} is not allowed in a header value",
                    "header values are printable ASCII; spaces only inside",
                )
            )
            break  # one is enough: the rest are usually the same mistake
    if value != value.strip(" \t"):
        at = 0 if value[:1] in (" ", "\t") else len(value.rstrip(" \t"))
        found.append(
            (
                at,
                1,
                "E183",
                "a header value cannot start or end with a space",
                "request header values are compared after trimming surrounding spaces, so "
                "this could never match",
            )
        )
    return found


def _article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"
