"""Syntax: a policy file's text to a `PolicyFile`, reporting every syntax error of the file.

Every line goes through the grammar (`sockpol/grammar/policy.lark`, start rule `line`) on its own,
and this module assembles the lines into `policy NAME { ... }` blocks. A statement never spans
lines, so a bad line costs exactly one error and the parse resumes cleanly on the next one; a
broken `policy ... {` line still opens a (nameless) block so its statements are not all reported
as "outside a policy".

Besides syntax, parse reports what the AST cannot hold and so the checker cannot see: a missing
or repeated `default`, a missing `port`, a repeated `max-head`, `mode` or `tls`, a port that is
not a number, a `max-head` size that is malformed or out of range, and an unknown `mode` or
`tls userspace` word, a repeated `answer` and an answer that is neither `drop` nor a status
400..599. Everything else is check.py's.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from functools import cache

from lark import Token, Tree
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from sockpol.contract import ANSWER_STATUS_MAX, ANSWER_STATUS_MIN
from sockpol.diagnostics import Diagnostic, DiagnosticBag, Severity, Source, Span
from sockpol.dsl.ast import (
    ANSWER_DROP,
    DEFAULT_MAX_HEAD,
    Action,
    Answer,
    Condition,
    HeaderCondition,
    HostCondition,
    MethodSet,
    Mode,
    PathPattern,
    Policy,
    PolicyFile,
    PortRange,
    Rule,
    Side,
    TlsSpec,
    TlsUserspace,
)
from sockpol.grammar import parser

MAX_ERRORS = 50  # past this, a file is not a policy with typos; more errors would only be noise

STATEMENTS = (
    "policy", "port", "side", "default", "max-head", "mode", "tls", "answer", "allow", "deny",
    "audit",
)  # fmt: skip
KEYWORDS = (*STATEMENTS, "if", "and", "host", "header", "log", "userspace")
MODES = {m.value: m for m in Mode}
SIDES = {s.value: s for s in Side}
TLS_USERSPACE = {u.value: u for u in TlsUserspace}

MAX_HEAD_MIN = 256
MAX_HEAD_MAX = 64 * 1024
_SIZE = re.compile(r"([0-9]+)([A-Za-z]*)")
_SIZE_UNITS = {"": 1, "B": 1, "KiB": 1024}
_PORT = re.compile(r"([0-9]+)(?:-([0-9]+))?")


def parse(source: Source) -> PolicyFile:
    """The syntax tree of `source`; raises `CompileError` with every syntax error in it."""
    file, diagnostics = parse_partial(source)
    bag = DiagnosticBag(source)
    bag.items.extend(diagnostics)
    bag.raise_if_errors()
    return file


def parse_partial(source: Source) -> tuple[PolicyFile, list[Diagnostic]]:
    """Never raises: the policies of the lines that parsed, and the diagnostics of the rest.

    `load_source` checks this partial file too, so one run reports syntax and semantic errors
    together. Lines that failed are simply absent; a policy with a failed line gets no "missing
    `default`/`port`" error, since the failed line may have been that statement.
    """
    return _FileParser(source).run()


@dataclass
class _Block:
    """A `policy` block being assembled. `name` is None for a block opened by a broken line."""

    start: Span  # the `policy` keyword
    name: str | None
    name_span: Span
    ports: list[PortRange] = field(default_factory=list)
    defaults: list[tuple[Action, Span]] = field(default_factory=list)
    max_head: tuple[int, Span] | None = None
    mode: tuple[Mode, Span] | None = None
    side: tuple[Side, Span] | None = None
    tls: TlsSpec | None = None
    answer: Answer | None = None
    rules: list[Rule] = field(default_factory=list)
    saw_port: bool = False
    broken: bool = False  # a line inside failed to parse


class _FileParser:
    def __init__(self, source: Source) -> None:
        self.source = source
        self.bag = DiagnosticBag(source)
        self.policies: list[Policy] = []
        self.block: _Block | None = None
        self.outside_reported = False  # one "outside a policy" error per run of such lines

    def run(self) -> tuple[PolicyFile, list[Diagnostic]]:
        for lineno, text in enumerate(self.source.lines, start=1):
            if len(self.bag.items) >= MAX_ERRORS and self._error_count() >= MAX_ERRORS:
                self.bag.items.append(
                    Diagnostic(
                        Severity.NOTE,
                        f"stopped at line {lineno} after {MAX_ERRORS} errors",
                        None,
                        "N001",
                    )
                )
                break
            self._line(lineno, text.removesuffix("\r"))
        else:
            self._end_of_file()
        return PolicyFile(self.source, tuple(self.policies)), self.bag.items

    def _error_count(self) -> int:
        return sum(d.severity is Severity.ERROR for d in self.bag.items)

    # -- one line ------------------------------------------------------------------------------

    def _line(self, lineno: int, text: str) -> None:
        stripped = text.strip(" \t")
        if not stripped or stripped.startswith("#"):
            return  # the common case, without a trip through lark
        try:
            tree = parser().parse(text)
        except UnexpectedInput as e:
            self.bag.items.append(_syntax_diagnostic(e, lineno, text))
            self._recover(lineno, stripped)
            return
        except LarkError as e:  # not expected from a LALR parse, but never let lark's escape
            self.bag.error(Span.point(lineno, 1), f"syntax error: {e}", "E003")
            self._recover(lineno, stripped)
            return
        if tree.children:
            node = tree.children[0]
            assert isinstance(node, Tree)
            getattr(self, f"_{node.data}")(node, lineno)

    def _recover(self, lineno: int, stripped: str) -> None:
        """Keep the block structure of a line that failed to parse, guessed from its braces."""
        span = Span.point(lineno, 1)
        if stripped.startswith("}"):
            if self.block:
                self._finish(self.block, span)
        elif re.search(r"\{[ \t]*(#.*)?$", stripped) or (
            stripped.startswith("policy") and "}" not in stripped
        ):
            if self.block:
                self._finish(self.block, None)
            self.block = _Block(span, None, span, broken=True)
        elif self.block:
            self.block.broken = True

    # -- statements (one method per grammar rule) ------------------------------------------------

    def _policy_open(self, node: Tree, lineno: int) -> None:
        keyword = _span(node.meta, lineno)
        name = _first_token(node.children[0])
        if self.block:
            if self.block.name is not None:
                self.bag.error(
                    Span(lineno, keyword.column, lineno, keyword.column + len("policy")),
                    f"policy '{self.block.name}' (line {self.block.start.line}) is not closed: "
                    "expected '}' before the next policy",
                    "E007",
                )
            self._finish(self.block, None)
        self.outside_reported = False
        self.block = _Block(keyword, name.value, _token_span(name, lineno))

    def _close(self, node: Tree, lineno: int) -> None:
        span = _span(node.meta, lineno)
        if self.block is None:
            self.bag.error(span, "unexpected '}': no policy is open", "E006")
            return
        self._finish(self.block, span)

    def _statement_block(self, node: Tree, lineno: int) -> _Block | None:
        if self.block is None and not self.outside_reported:
            self.outside_reported = True
            keyword = "allow/deny/audit" if node.data == "rule" else node.data.replace("_", "-")
            self.bag.error(
                _span(node.meta, lineno),
                f"'{keyword}' statement outside a policy block",
                "E008",
                "statements go between 'policy NAME {' and '}'",
            )
        return self.block

    def _port(self, node: Tree, lineno: int) -> None:
        block = self._statement_block(node, lineno)
        for token in node.children:
            assert isinstance(token, Token)
            span = _token_span(token, lineno)
            port = _PORT.fullmatch(token.value)
            if port is None:
                self.bag.error(
                    span,
                    "expected a port number or range like 8080 or 9000-9010, "
                    f"got '{_short(token)}'",
                    "E111",
                )
                continue
            low_text, high_text = port.group(1), port.group(2) or port.group(1)
            if max(len(low_text), len(high_text)) > 7:  # keep int() off a megabyte of digits
                self.bag.error(span, f"port '{_short(token)}' is out of range 1..65535", "E112")
                continue
            if block:
                block.ports.append(PortRange(span, int(low_text), int(high_text)))
        if block:
            block.saw_port = True

    def _default(self, node: Tree, lineno: int) -> None:
        block = self._statement_block(node, lineno)
        span = _span(node.meta, lineno)
        action = _action(node.children[-1])
        if block is None:
            return
        if block.defaults:
            first = block.defaults[0][1]
            self.bag.error(
                span,
                f"a second 'default' (the first is on line {first.line})",
                "E121",
                "a policy has exactly one default",
            )
        block.defaults.append((action, span))

    def _max_head(self, node: Tree, lineno: int) -> None:
        block = self._statement_block(node, lineno)
        token = node.children[0]
        assert isinstance(token, Token)
        span = _token_span(token, lineno)
        size = self._size(token, span)
        if block is None:
            return
        if block.max_head is not None:
            self.bag.error(
                _span(node.meta, lineno),
                f"a second 'max-head' (the first is on line {block.max_head[1].line})",
                "E132",
            )
        elif size is not None:
            block.max_head = (size, span)

    def _size(self, token: Token, span: Span) -> int | None:
        match = _SIZE.fullmatch(token.value)
        if match is None:
            self.bag.error(
                span,
                f"expected a size like 8KiB or 4096, got '{_short(token)}'",
                "E130",
            )
            return None
        digits, unit = match.groups()
        if unit not in _SIZE_UNITS:
            hint = "sizes are written 4096, 4096B or 4KiB (1 KiB = 1024 bytes)"
            if unit.lower() in ("k", "kb", "kib"):
                hint = f"write {digits}KiB for {digits} x 1024 bytes; K and KB are ambiguous"
            self.bag.error(span, f"unknown size unit '{unit}'", "E130", hint)
            return None
        # Seven digits are plenty to know a size is too big; int() of a megabyte of digits is slow.
        size = int(digits) * _SIZE_UNITS[unit] if len(digits) <= 7 else MAX_HEAD_MAX + 1
        if not MAX_HEAD_MIN <= size <= MAX_HEAD_MAX:
            self.bag.error(
                span,
                f"max-head {token.value} is out of range: it must be 256 B .. 64 KiB",
                "E131",
            )
            return None
        return size

    def _mode(self, node: Tree, lineno: int) -> None:
        block = self._statement_block(node, lineno)
        token = node.children[0]
        assert isinstance(token, Token)
        span = _token_span(token, lineno)
        mode = MODES.get(token.value)
        if mode is None:
            close = difflib.get_close_matches(token.value.lower(), list(MODES), n=1, cutoff=0.5)
            self.bag.error(
                span,
                f"unknown mode '{_short(token)}': expected enforce or dry-run",
                "E150",
                f"did you mean '{close[0]}'?" if close else "",
            )
            return
        if block is None:
            return
        if block.mode is not None:
            self.bag.error(
                _span(node.meta, lineno),
                f"a second 'mode' (the first is on line {block.mode[1].line})",
                "E151",
                "a policy has at most one mode",
            )
            return
        block.mode = (mode, _span(node.meta, lineno))

    def _side(self, node: Tree, lineno: int) -> None:
        block = self._statement_block(node, lineno)
        token = node.children[0]
        assert isinstance(token, Token)
        side = SIDES.get(token.value)
        if side is None:
            close = difflib.get_close_matches(token.value.lower(), list(SIDES), n=1, cutoff=0.5)
            self.bag.error(
                _token_span(token, lineno),
                f"unknown side '{_short(token)}': expected egress or ingress",
                "E157",
                f"did you mean '{close[0]}'?"
                if close
                else "'side egress' governs what the cgroup sends to the ports, "
                "'side ingress' what it receives on them",
            )
            return
        if block is None:
            return
        if block.side is not None:
            self.bag.error(
                _span(node.meta, lineno),
                f"a second 'side' (the first is on line {block.side[1].line})",
                "E158",
                "a policy governs one side; write a second policy for the other",
            )
            return
        block.side = (side, _span(node.meta, lineno))

    def _tls(self, node: Tree, lineno: int) -> None:
        block = self._statement_block(node, lineno)
        span = _span(node.meta, lineno)
        userspace = TlsUserspace.DENY
        if node.children:
            token = _first_token(node.children[0])
            found = TLS_USERSPACE.get(token.value)
            if found is None:
                words = list(TLS_USERSPACE)
                close = difflib.get_close_matches(token.value.lower(), words, n=1, cutoff=0.5)
                self.bag.error(
                    _token_span(token, lineno),
                    f"unknown word '{_short(token)}' after 'tls userspace': expected deny or allow",
                    "E155",
                    f"did you mean '{close[0]}'?"
                    if close
                    else "'tls userspace deny' refuses user-space TLS, 'tls userspace allow' "
                    "passes it unjudged",
                )
                return
            userspace = found
        if block is None:
            return
        if block.tls is not None:
            self.bag.error(
                span,
                f"a second 'tls' (the first is on line {block.tls.span.line})",
                "E156",
                "a policy has at most one tls statement",
            )
            return
        block.tls = TlsSpec(span, userspace)

    def _answer_word(self, node: Tree, lineno: int) -> Answer | None:
        """`drop` or a status 400..599 (the word of `answer` and of a rule's `answer`)."""
        token = node.children[0]
        assert isinstance(token, Token)
        span = _token_span(token, lineno)
        if token.value == "drop":
            return Answer(span, ANSWER_DROP)
        if token.value.isdigit() and len(token.value) == 3:
            status = int(token.value)
            if ANSWER_STATUS_MIN <= status <= ANSWER_STATUS_MAX:
                return Answer(span, status)
        self.bag.error(
            span,
            f"unknown answer '{_short(token)}': expected drop or an HTTP status 400..599",
            "E160",
            "answer 403 (the default body names the policy and the reason), answer 404, "
            "answer 429, or answer drop (the send fails, the client reads nothing)",
        )
        return None

    def _answer(self, node: Tree, lineno: int) -> None:
        block = self._statement_block(node, lineno)
        answer = self._answer_word(node, lineno)
        if block is None or answer is None:
            return
        if block.answer is not None:
            self.bag.error(
                _span(node.meta, lineno),
                f"a second 'answer' (the first is on line {block.answer.span.line})",
                "E161",
                "a policy has at most one answer; a deny rule may have its own",
            )
            return
        block.answer = answer

    def _rule(self, node: Tree, lineno: int) -> None:
        block = self._statement_block(node, lineno)
        answer = None
        children = node.children
        if children and _is_tree(children[-1], "rule_answer"):
            answer_node = children[-1]
            assert isinstance(answer_node, Tree)
            answer = self._answer_word(answer_node, lineno)
            children = children[:-1]
        log = bool(children) and _is_tree(children[-1], "log")
        children = children[:-1] if log else children
        action_node, methods_node, path_token, *condition_nodes = children
        assert isinstance(methods_node, Tree) and isinstance(path_token, Token)
        method_tokens = [t for t in methods_node.children if isinstance(t, Token)]
        texts = tuple(t.value for t in method_tokens)
        methods = MethodSet(
            _join(_token_span(method_tokens[0], lineno), _token_span(method_tokens[-1], lineno)),
            None if texts == ("*",) else texts,
        )
        path_text = path_token.value  # a REGEX stays as written: ~"..."
        if path_token.type == "STRING":
            path_text = self._unquote(path_token, lineno)
        path = PathPattern(_token_span(path_token, lineno), path_text)
        conditions = tuple(
            self._condition(c, lineno) for c in condition_nodes if isinstance(c, Tree)
        )
        if block is None:
            return
        block.rules.append(
            Rule(
                _span(node.meta, lineno),
                len(block.rules),
                _action(action_node),
                methods,
                path,
                conditions,
                log,
                answer,
            )
        )

    def _condition(self, node: Tree, lineno: int) -> Condition:
        span = _span(node.meta, lineno)
        if node.data == "host":
            token = node.children[0]
            assert isinstance(token, Token)
            return HostCondition(span, _ascii_lower(self._unquote(token, lineno)))
        name = _first_token(node.children[0])
        value = None
        if len(node.children) > 1:
            token = node.children[1]
            assert isinstance(token, Token)
            value = self._unquote(token, lineno)
        return HeaderCondition(span, _ascii_lower(name.value), value)

    def _unquote(self, token: Token, lineno: int) -> str:
        r"""The text of a STRING token; `\"` and `\\` are its only escapes."""
        raw = token.value[1:-1]
        out = []
        i = 0
        while i < len(raw):
            if raw[i] == "\\":
                escaped = raw[i + 1]  # the STRING regex guarantees one
                if escaped not in '"\\':
                    column = token.column + 1 + i
                    self.bag.error(
                        Span(lineno, column, lineno, column + 2),
                        f"unknown escape '\\{escaped}' in a string",
                        "E005",
                        'the only escapes are \\" and \\\\',
                    )
                out.append(escaped)
                i += 2
            else:
                out.append(raw[i])
                i += 1
        return "".join(out)

    # -- block ends ----------------------------------------------------------------------------

    def _finish(self, block: _Block, close: Span | None) -> None:
        self.block = None
        if block.name is None:
            return  # opened by a broken line: its name is unknown, its rules can't be checked
        if not block.broken and not block.defaults:
            self.bag.error(
                block.name_span,
                f"policy '{block.name}' has no 'default' statement",
                "E120",
                "add 'default deny' or 'default allow': it decides requests no rule matches",
            )
        if not block.broken and not block.saw_port:
            self.bag.error(
                block.name_span,
                f"policy '{block.name}' has no 'port' statement",
                "E110",
                "add e.g. 'port 8080': the TCP destination ports the policy governs",
            )
        # A missing default was reported above; DENY keeps the placeholder policy fail-closed.
        default, default_span = (
            block.defaults[0] if block.defaults else (Action.DENY, block.name_span)
        )
        max_head = block.max_head[0] if block.max_head else DEFAULT_MAX_HEAD
        mode, mode_span = block.mode if block.mode else (Mode.ENFORCE, None)
        side, side_span = block.side if block.side else (Side.EGRESS, None)
        end = close or block.name_span
        self.policies.append(
            Policy(
                Span(block.start.line, block.start.column, end.end_line, end.end_column),
                block.name,
                block.name_span,
                tuple(block.ports),
                default,
                default_span,
                max_head,
                tuple(block.rules),
                mode,
                mode_span,
                block.tls,
                block.answer,
                side,
                side_span,
            )
        )

    def _end_of_file(self) -> None:
        if self.block:
            if self.block.name is not None:
                self.bag.error(
                    self.block.name_span,
                    f"policy '{self.block.name}' is not closed: "
                    "expected '}' by the end of the file",
                    "E007",
                )
            self._finish(self.block, None)
        if not self.policies and not self.bag.has_errors:
            self.bag.error(None, "no policy in this file", "E012", "start one with 'policy NAME {'")


# -- syntax error messages ---------------------------------------------------------------------

# Examples of each syntax error, for `UnexpectedInput.match_examples`: a failing line is matched
# to the example that fails in the same parser state. The key names the message below. LALR
# states are per keyword (after `allow` is not after `deny`), so `_with_variants` adds the same
# examples for every keyword that can stand in the same place.
_EXAMPLES: dict[str, list[str]] = {
    "statement": ["x", "/x", '"x"', "if", ",", "{", "=", "host", "header"],
    "policy_name": ["policy", "policy {", "policy /x", 'policy "x"'],
    "policy_brace": ["policy a", "policy a b", "policy a }", "policy a /", "policy deny x"],
    "policy_eol": ["policy a { port", "policy a { }", "policy a { x"],
    "close_eol": ["} x", "} }", "} /"],
    "port": ["port", "port 80,", "port ,", "port 80, /x"],
    "port_sep": ["port 80 81", "port 80 /x", "port 80 {", "port 80, 81 82", "port 80, 81 {"],
    "default": ["default", "default x", "default /", "default allow, deny"],
    "size": ["max-head", "max-head /", 'max-head "8KiB"'],
    "mode": ["mode", "mode /", 'mode "dry-run"', "mode {"],
    "eol": ["max-head 8KiB KiB", "max-head 8 x", "default deny x", "default allow /"],
    "mode_eol": ["mode enforce x", "mode dry-run /", "mode enforce enforce"],
    "side": ["side", "side /", 'side "ingress"', "side {", "side ,"],
    "side_eol": ["side ingress x", "side egress /", "side ingress ingress"],
    "tls": ["tls x", "tls /", 'tls "x"', "tls {", "tls deny", "tls allow", "tls tls", "tls ,"],
    "tls_userspace": [
        "tls userspace",
        "tls userspace /",
        'tls userspace "deny"',
        "tls userspace {",
        "tls userspace ,",
        "tls userspace userspace",
    ],
    "tls_eol": [
        "tls userspace deny x",
        "tls userspace allow /",
        "tls userspace deny deny",
        "tls userspace x y",
        "tls userspace allow {",
    ],
    "answer": ["answer", "answer /", 'answer "403"', "answer {", "answer ,"],
    "answer_eol": ["answer 403 x", "answer drop /", "answer 403 403", "answer 403 {"],
    "rule_answer": ["deny GET /x answer", "deny GET /x answer /", 'deny GET /x answer "403"'],
    "after_answer": [
        "deny GET /x answer 403 x",
        "deny GET /x answer 404 log",
        "deny GET /x answer 403 answer",
        'deny GET /x if host "a" answer 403 x',
    ],
    "methods": ["allow", "allow /x", "allow ,", 'allow "GET"'],
    "method": ["allow GET,", "allow GET, /x", "allow GET,,"],
    "path": ["allow GET", "allow GET HEAD", "allow GET {", "allow GET,HEAD", "allow GET,HEAD x"],
    "after_path": [
        "allow GET /x y",
        "allow GET /x /y",
        "allow GET /x and",
        'allow GET /x "y"',
        'allow GET "/x" y',
        'allow GET "/x" ,',
        'allow GET ~"/x" y',
        'allow GET ~"/x" ,',
    ],
    "after_log": [
        "allow GET /x log x",
        "allow GET /x log log",
        "allow GET /x log if",
        'allow GET /x if host "a" log x',
        "allow GET /x if header a log x",
        'allow GET /x if header a = "b" log x',
        "allow GET /x if header a log and",
    ],
    "condition": ["allow GET /x if", "allow GET /x if x", 'allow GET /x if host "a" and'],
    "host": ["allow GET /x if host", "allow GET /x if host a", "allow GET /x if host = "],
    "header_name": [
        "allow GET /x if header",
        'allow GET /x if header "a"',
        "allow GET /x if header =",
    ],
    "header_value": ["allow GET /x if header a =", "allow GET /x if header a = b"],
    "after_condition": [
        'allow GET /x if host "a" host "b"',
        "allow GET /x if header a b",
        'allow GET /x if header a = "b" c',
        'allow GET /x if host "a" or',
    ],
}


def _with_variants(examples: dict[str, list[str]]) -> dict[str, list[str]]:
    out = {label: list(lines) for label, lines in examples.items()}
    for label, lines in examples.items():
        for action in ("deny", "audit"):
            out[label] += [
                f"{action}{line[len('allow') :]}" for line in lines if line.startswith("allow")
            ]
    for keyword in KEYWORDS:  # names spelled like keywords: `policy deny x`, `header host x`
        out["policy_brace"] += [f"policy {keyword}", f"policy {keyword} x"]
        out["after_condition"] += [f"allow GET /x if header {keyword} x"]
        out["header_value"] += [f"allow GET /x if header {keyword} ="]
    return out


_EXAMPLES = _with_variants(_EXAMPLES)

_MESSAGES = {
    "policy_name": "expected a policy name after 'policy'",
    "policy_brace": "expected '{' after the policy name",
    "policy_eol": "'policy NAME {' must end its line; put each statement on a line of its own",
    "close_eol": "'}' must be on a line of its own",
    "port": "expected a port number or range like 8080 or 9000-9010",
    "port_sep": "expected ',' between ports, or the end of the line",
    "default": "expected 'allow' or 'deny' after 'default'",
    "size": "expected a size after 'max-head', like 8KiB or 4096",
    "mode": "expected enforce or dry-run after 'mode'",
    "eol": "expected the end of the line",
    "mode_eol": "expected the end of the line after the mode",
    "side": "expected egress or ingress after 'side'",
    "side_eol": "expected the end of the line after the side",
    "tls": "expected 'userspace' or the end of the line after 'tls'",
    "tls_userspace": "expected deny or allow after 'tls userspace'",
    "tls_eol": "expected the end of the line after 'tls userspace deny|allow'",
    "answer": "expected drop or an HTTP status after 'answer', like 403",
    "answer_eol": "expected the end of the line after the answer",
    "rule_answer": "expected drop or an HTTP status after 'answer', like 404",
    "after_answer": "'answer ...' ends a rule: expected the end of the line",
    "methods": "expected methods after the action: GET, GET,HEAD or *",
    "method": "expected a method after ','",
    "path": "expected a path starting with '/'",
    "after_path": "expected 'if', 'log', 'answer' or the end of the line after the path",
    "condition": 'expected a condition: host "PATTERN" or header NAME',
    "host": 'expected a quoted host pattern, like host "api.example.com"',
    "header_name": "expected a header name after 'header'",
    "header_value": "expected a quoted value after '='",
    "after_condition": "expected 'and', 'log', 'answer' or the end of the line after a condition",
    "after_log": "after 'log' only 'answer ...' may follow: expected the end of the line",
}


def _syntax_diagnostic(e: UnexpectedInput, lineno: int, text: str) -> Diagnostic:
    if isinstance(e, UnexpectedCharacters):
        return _unexpected_character(e, lineno, text)
    if not isinstance(e, UnexpectedToken):
        return Diagnostic(Severity.ERROR, "syntax error", Span.point(lineno, 1), "E003")
    token = e.token
    at_end = token.type == "$END"
    if at_end:
        # lark's $END borrows the position of the last token: point just past it.
        span = Span.point(lineno, token.end_column or len(text) + 1)
        found = "the end of the line"
    else:
        span = _token_span(token, lineno)
        found = f"'{_short(token)}'"
    label = e.match_examples(_parse_example, _EXAMPLES, token_type_match_fallback=True)
    if label == "statement":
        return Diagnostic(
            Severity.ERROR,
            f"unknown statement {found}",
            span,
            "E004",
            _statement_hint(token.value),
        )
    message = _MESSAGES.get(label or "")
    if message is None:
        expected = ", ".join(sorted(_describe_terminal(t) for t in e.expected))
        message = f"expected one of {expected}"
    return Diagnostic(
        Severity.ERROR,
        f"{message}; found {found}",
        span,
        "E003",
        _hint(label, token),
    )


def _parse_example(text: str) -> None:
    """`parser().parse` for match_examples, remembering how each example fails: without this,
    naming one error re-parses every example (milliseconds per error)."""
    failure = _example_failure(text)
    if failure is not None:
        raise failure.with_traceback(None)


@cache
def _example_failure(text: str) -> UnexpectedInput | None:
    try:
        parser().parse(text)
    except UnexpectedInput as e:
        return e
    return None


def _unexpected_character(e: UnexpectedCharacters, lineno: int, text: str) -> Diagnostic:
    column = e.column
    char = text[column - 1] if 0 < column <= len(text) else ""
    if char == '"':
        return Diagnostic(
            Severity.ERROR,
            "unterminated string",
            Span(lineno, column, lineno, len(text) + 1),
            "E002",
            'close it with a " on the same line; write \\" for a quote inside it',
        )
    shown = f"'{char}'" if char.isprintable() else f"{char!r}"
    return Diagnostic(
        Severity.ERROR,
        f"unexpected character {shown} (U+{ord(char or chr(0)):04X})",
        Span.point(lineno, column),
        "E001",
    )


def _statement_hint(word: str) -> str:
    if word == "log":
        return "'log' goes at the end of a rule: allow GET /healthz log"
    if word.lower() in STATEMENTS:
        return f"keywords are lower-case: write '{word.lower()}'"
    close = difflib.get_close_matches(word, STATEMENTS, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return (
        "a line holds one of: policy NAME {, port, side, default, max-head, mode, tls, answer, "
        "allow, "
        "deny, audit, }"
    )


def _hint(label: str | None, token: Token) -> str:
    value = token.value
    if token.type == "STRING" and label in ("header_name", "methods", "policy_name"):
        return "names are not quoted"
    if token.type == "WORD" and label in ("host", "header_value"):
        return f'quote it: "{_short(token)}"'
    if label == "host" and value == "=":
        return "write host \"PATTERN\", without '='"
    if label == "path" and token.type == "WORD":
        return "separate methods with ',' (GET,HEAD)"
    if label == "port_sep" and token.type == "WORD":
        return "separate ports with ',' (port 80, 81)"
    if label == "eol" and token.type == "WORD":
        return "write the size without a space: 8KiB"
    if label == "tls" and value in ("allow", "deny"):
        return f"write 'tls userspace {value}'"
    if label in ("tls", "tls_userspace"):
        return "write 'tls', 'tls userspace deny' or 'tls userspace allow'"
    if label == "after_condition" and token.type in ("WORD", "HOST", "HEADER"):
        return "join conditions with 'and'"
    return ""


def _describe_terminal(name: str) -> str:
    if name == "$END":
        return "the end of the line"
    try:
        pattern = parser().get_terminal(name).pattern
    except KeyError:
        return name
    if pattern.type == "str":
        return f"'{pattern.value}'"
    return {
        "WORD": "a name",
        "PATH": "a path",
        "STRING": "a quoted string",
        "REGEX": 'a path regex ~"..."',
    }.get(name, name)


# -- small helpers ---------------------------------------------------------------------------


def _span(meta: object, lineno: int) -> Span:
    """A tree's span; each line is parsed alone, so lark's line numbers are always 1."""
    return Span(lineno, meta.column, lineno, meta.end_column)  # type: ignore[attr-defined]


def _token_span(token: Token, lineno: int) -> Span:
    column = token.column or 1
    return Span(lineno, column, lineno, token.end_column or column + 1)


def _join(first: Span, last: Span) -> Span:
    return Span(first.line, first.column, last.end_line, last.end_column)


def _is_tree(node: Tree | Token, data: str) -> bool:
    return isinstance(node, Tree) and node.data == data


def _first_token(node: Tree | Token) -> Token:
    token = node.children[0] if isinstance(node, Tree) else node
    assert isinstance(token, Token)
    return token


def _action(node: Tree | Token) -> Action:
    return Action(_first_token(node).value)


def _short(token: Token, limit: int = 40) -> str:
    text = token.value
    return text if len(text) <= limit else text[: limit - 3] + "..."


_UPPER_TO_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _ascii_lower(text: str) -> str:
    """Lower-case A-Z only: str.lower() may change the length ('İ'), and so every position."""
    return text.translate(_UPPER_TO_LOWER)
