"""`sockpol fmt`: one canonical layout for policy files, comments kept.

The layout, so every file reads the same:

* comment lines and blank lines outside policies are kept (runs of blank lines become one);
* `policy NAME {` and `}` at the start of their lines, one blank line between policies;
* inside a policy, indented by four spaces: the `port` lines (in their order), `default`,
  `max-head`, `mode`, `tls`, `answer`, then one blank line, then the rules in their order
  (order is meaning).
  A comment block directly above a statement moves with it; blank lines between rules are kept
  (at most one), since they group rules; comments before `}` stay last;
* tokens separated by one space; methods joined by `,`; ports by `, `; paths unquoted with
  upper-case escapes; host patterns and header names lower-case; strings re-quoted; `max-head`
  in KiB when it is a whole number of KiB; `tls userspace deny` stays as written (it means
  what plain `tls` means, and says so); trailing comments two spaces after the statement.

A file is formatted only if it checks without errors: the layout is derived from its syntax tree,
one statement per line, so nothing is lost and `fmt(fmt(x)) == fmt(x)`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from sockpol.dsl import load_source, regex
from sockpol.dsl.ast import (
    HeaderCondition,
    HostCondition,
    Policy,
    PolicyFile,
    Rule,
    TlsSpec,
    TlsUserspace,
)
from sockpol.dsl.patterns import upper_escapes

INDENT = "    "
HEAD_ORDER = ("port", "side", "default", "max-head", "mode", "tls", "answer")


def split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of a source line: a `#` starts a comment where a new token could start,
    that is outside a string and after a blank, the line start or one of `, { } " =`."""
    in_string = False
    i = 0
    while i < len(line):
        c = line[i]
        if in_string:
            if c == "\\":
                i += 2
                continue
            if c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c == "#" and (i == 0 or line[i - 1] in ' \t,{}"='):
            return line[:i].rstrip(" \t"), line[i:].rstrip(" \t")
        i += 1
    return line.rstrip(" \t"), ""


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_size(size: int) -> str:
    return f"{size // 1024}KiB" if size % 1024 == 0 else str(size)


def format_path(text: str) -> str:
    if regex.is_regex(text):
        return text  # a path regex is kept exactly as written: its escapes are regex syntax
    return upper_escapes(text)


def format_rule(rule: Rule) -> str:
    methods = "*" if rule.methods.methods is None else ",".join(rule.methods.methods)
    out = f"{rule.action.value} {methods} {format_path(rule.path.text)}"
    conditions = []
    for cond in rule.conditions:
        if isinstance(cond, HostCondition):
            conditions.append(f"host {quote(cond.pattern)}")
        elif isinstance(cond, HeaderCondition):
            value = "" if cond.value is None else f" = {quote(cond.value)}"
            conditions.append(f"header {cond.name}{value}")
    if conditions:
        out += " if " + " and ".join(conditions)
    out += " log" if rule.log else ""
    return out + (f" answer {rule.answer}" if rule.answer is not None else "")


@dataclass
class _Item:
    """A statement with the comment lines above it and its trailing comment."""

    text: str
    comment: str = ""
    above: list[str] = field(default_factory=list)  # comment lines; "" marks a blank line
    blank_before: bool = False

    def lines(self) -> list[str]:
        out = [INDENT + c if c else "" for c in self.above]
        line = INDENT + self.text
        return out + [line + ("  " + self.comment if self.comment else "")]


def format_source(text: str, path: str = "<policy>") -> str:
    """The canonical layout of `text`; raises CompileError if it has errors."""
    file, _ = load_source(text, path)
    return _Formatter(file).run()


class _Formatter:
    def __init__(self, file: PolicyFile) -> None:
        self.file = file
        self.lines = [line.removesuffix("\r") for line in file.source.lines]
        self.statements: dict[int, str] = {}  # line -> canonical statement text
        self.kinds: dict[int, str] = {}
        for policy in file.policies:
            self._index(policy)

    def _index(self, policy: Policy) -> None:
        for r in policy.ports:
            self.kinds.setdefault(r.span.line, "port")
        for line in {r.span.line for r in policy.ports}:
            ports = [r for r in policy.ports if r.span.line == line]
            self.statements[line] = "port " + ", ".join(str(r) for r in ports)
        self.statements[policy.default_span.line] = f"default {policy.default.value}"
        self.kinds[policy.default_span.line] = "default"
        if policy.side_span is not None:
            self.statements[policy.side_span.line] = f"side {policy.side.value}"
            self.kinds[policy.side_span.line] = "side"
        if policy.mode_span is not None:
            self.statements[policy.mode_span.line] = f"mode {policy.mode.value}"
            self.kinds[policy.mode_span.line] = "mode"
        if policy.tls is not None:
            self.statements[policy.tls.span.line] = self._tls_text(policy.tls)
            self.kinds[policy.tls.span.line] = "tls"
        if policy.answer is not None:
            self.statements[policy.answer.span.line] = f"answer {policy.answer}"
            self.kinds[policy.answer.span.line] = "answer"
        for rule in policy.rules:
            self.statements[rule.span.line] = format_rule(rule)
            self.kinds[rule.span.line] = "rule"

    def _tls_text(self, tls: TlsSpec) -> str:
        """`tls`, or `tls userspace allow`; an explicit `tls userspace deny` is kept."""
        code, _ = split_comment(self.lines[tls.span.line - 1])
        if tls.userspace is TlsUserspace.DENY and len(code.split()) == 1:
            return "tls"
        return f"tls userspace {tls.userspace.value}"

    def run(self) -> str:
        out: list[str] = []
        policies = iter(self.file.policies)
        pending: list[str] = []  # comment lines outside policies; "" marks a blank line
        i = 0
        while i < len(self.lines):
            code, comment = split_comment(self.lines[i])
            if code.strip().startswith("policy"):
                self._outside(out, pending, before_policy=True)
                pending = []
                i = self._policy(next(policies), i, comment, out)
                continue
            pending.append(comment)
            i += 1
        self._outside(out, pending, before_policy=False)
        return "\n".join(out) + "\n"

    @staticmethod
    def _outside(out: list[str], pending: list[str], before_policy: bool) -> None:
        """Comments between policies, with single blank lines; one blank line between blocks."""
        block: list[str] = []
        for c in pending:
            if c or (block and block[-1]):
                block.append(c)
        attached = not block or block[-1] != ""  # no blank line between them and the policy
        while block and not block[-1]:
            block.pop()
        if out and (block or before_policy):
            out.append("")
        out += block
        if block and before_policy and not attached:
            out.append("")

    def _policy(self, policy: Policy, i: int, comment: str, out: list[str]) -> int:
        out.append(f"policy {policy.name} {{" + (f"  {comment}" if comment else ""))
        head: dict[str, list[_Item]] = {k: [] for k in HEAD_ORDER}
        rules: list[_Item] = []
        above: list[str] = []  # comment lines since the last statement; "" for blank lines
        saw_blank = False
        i += 1
        while i < len(self.lines):
            code, comment = split_comment(self.lines[i])
            stripped = code.strip()
            if stripped == "}":
                out += self._body(head, rules, [c for c in above if c])
                out.append("}" + (f"  {comment}" if comment else ""))
                return i + 1
            if not stripped:
                if comment:
                    above.append(comment)
                else:
                    saw_blank = True
                    if above and above[-1]:
                        above.append("")
                i += 1
                continue
            kind = self.kinds.get(i + 1) or stripped.split()[0]
            if kind == "max-head":
                text = f"max-head {format_size(policy.max_head)}"
            else:
                text = self.statements[i + 1]
            while above and not above[-1]:
                above.pop()
            item = _Item(text, comment, above, saw_blank)
            (rules if kind == "rule" else head[kind]).append(item)
            above, saw_blank = [], False
            i += 1
        raise AssertionError("unterminated policy in a checked file")

    @staticmethod
    def _body(head: dict[str, list[_Item]], rules: list[_Item], tail: list[str]) -> list[str]:
        out: list[str] = []
        for kind in HEAD_ORDER:
            for item in head[kind]:
                out += item.lines()
        for n, item in enumerate(rules):
            if n == 0 or item.blank_before:
                out.append("")
            out += item.lines()
        if tail:
            out.append("")
            out += [INDENT + c for c in tail]
        return out


def diff(old: str, new: str, path: str) -> str:
    return "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True),
            new.splitlines(keepends=True),
            fromfile=f"{path} (original)",
            tofile=f"{path} (formatted)",
        )
    )


__all__ = ["diff", "format_rule", "format_source", "split_comment"]
