"""Positioned diagnostics shared by every stage of the compiler.

Stages never print; they collect `Diagnostic`s and raise `CompileError` with all of them, so a user
sees every problem of a file at once. One renderer draws `file:line:col: error: message`, the source
line and a caret, the way compilers do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property


@dataclass(frozen=True)
class Span:
    """A region of a source file. Lines and columns are 1-based; `end_*` is exclusive."""

    line: int
    column: int
    end_line: int
    end_column: int

    @staticmethod
    def point(line: int, column: int) -> Span:
        return Span(line, column, line, column + 1)


class Severity(Enum):
    ERROR = "error"
    WARNING = "warning"
    NOTE = "note"


@dataclass(frozen=True)
class Diagnostic:
    severity: Severity
    message: str
    span: Span | None
    code: str = ""
    hint: str = ""


@dataclass
class Source:
    """A policy file's text and the name to print for it."""

    path: str
    text: str

    @cached_property
    def lines(self) -> list[str]:
        """The lines as the parser numbers them: only "\n" ends one (splitlines() would also
        split on \x0c and others). Split once: every diagnostic rendered reads a line."""
        return self.text.split("\n")

    def line_text(self, line: int) -> str:
        return self.lines[line - 1].rstrip("\r") if 0 < line <= len(self.lines) else ""


class SockpolError(Exception):
    """Base of every error sockpol shows to a user (never as a traceback)."""


@dataclass
class CompileError(SockpolError):
    source: Source
    diagnostics: list[Diagnostic] = field(default_factory=list)

    def __str__(self) -> str:
        return render_all(self.source, self.diagnostics)


class DiagnosticBag:
    """Collects diagnostics for one source; `raise_if_errors` ends the stage if any is an error."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.items: list[Diagnostic] = []

    def error(self, span: Span | None, message: str, code: str = "", hint: str = "") -> None:
        self.items.append(Diagnostic(Severity.ERROR, message, span, code, hint))

    def warning(self, span: Span | None, message: str, code: str = "", hint: str = "") -> None:
        self.items.append(Diagnostic(Severity.WARNING, message, span, code, hint))

    @property
    def has_errors(self) -> bool:
        return any(d.severity is Severity.ERROR for d in self.items)

    def raise_if_errors(self) -> None:
        if self.has_errors:
            raise CompileError(self.source, sorted(self.items, key=position))


def position(d: Diagnostic) -> tuple[int, int]:
    """The order diagnostics are shown in: by line and column, file-wide ones first."""
    return (d.span.line, d.span.column) if d.span else (0, 0)


def render(source: Source, d: Diagnostic) -> str:
    if d.span is None:
        head = f"{source.path}: {d.severity.value}: {d.message}"
        return head + (f"\n  hint: {d.hint}" if d.hint else "")
    code = f" [{d.code}]" if d.code else ""
    head = f"{source.path}:{d.span.line}:{d.span.column}: {d.severity.value}: {d.message}{code}"
    text = source.line_text(d.span.line).expandtabs(1)
    width = 1
    if d.span.end_line == d.span.line:
        width = max(1, d.span.end_column - d.span.column)
    width = max(1, min(width, len(text) - d.span.column + 1))
    caret = " " * (d.span.column - 1) + "^" + "~" * (width - 1)
    out = f"{head}\n    {text}\n    {caret}"
    if d.hint:
        out += f"\n  hint: {d.hint}"
    return out


def render_all(source: Source, diagnostics: list[Diagnostic]) -> str:
    return "\n".join(render(source, d) for d in diagnostics)
