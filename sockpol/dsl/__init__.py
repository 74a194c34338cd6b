"""The front end: policy text to a checked `PolicyFile`.

    parse   text -> PolicyFile          (parse.py: syntax, one line at a time)
    check   PolicyFile -> warnings      (check.py: semantics)

Both stages collect diagnostics; `load_source` reports the errors of both in one `CompileError`,
so a file with a typo on line 3 and a bad path on line 10 shows both at once.
"""

from __future__ import annotations

import os

from sockpol.diagnostics import (
    CompileError,
    Diagnostic,
    DiagnosticBag,
    Severity,
    Source,
    Span,
)
from sockpol.dsl.ast import PolicyFile
from sockpol.dsl.check import diagnose
from sockpol.dsl.parse import parse_partial

__all__ = ["load_file", "load_source", "read_source_file"]


def load_source(text: str, path: str) -> tuple[PolicyFile, list[Diagnostic]]:
    """The checked policies of `text` and their warnings; raises `CompileError` on any error."""
    source = Source(path, text)
    # Semantic checks run on the partial file too: lines that failed to parse are absent from
    # it, and nothing the checker says depends on a statement being present.
    file, diagnostics = parse_partial(source)
    bag = DiagnosticBag(source)
    bag.items.extend(diagnostics)
    bag.items.extend(diagnose(file))
    bag.raise_if_errors()
    return file, [d for d in bag.items if d.severity is not Severity.ERROR]


def load_file(path: str | os.PathLike[str]) -> tuple[PolicyFile, list[Diagnostic]]:
    """`load_source` of a file; a file that can't be read or decoded raises `CompileError` (a
    `SockpolError`) naming the path, positioned on the first bad byte if it isn't UTF-8."""
    name = os.fspath(path)
    return load_source(read_source_file(name), name)


def read_source_file(path: str | os.PathLike[str]) -> str:
    """The text of a policy file, which must be UTF-8 (a leading byte-order mark is dropped)."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = f.read()
    except OSError as e:
        diagnostic = Diagnostic(Severity.ERROR, f"cannot read: {e.strerror or e}", None, "E010")
        raise CompileError(Source(name, ""), [diagnostic]) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _not_utf8(name, e) from None


def _not_utf8(name: str, e: UnicodeDecodeError) -> CompileError:
    """A positioned error for the first byte that isn't UTF-8, shown in a decoded copy."""
    data = bytes(e.object)  # without the byte-order mark, which utf-8-sig has already dropped
    before = data[: e.start]
    line = before.count(b"\n") + 1
    column = len(before[before.rfind(b"\n") + 1 :].decode("utf-8", "replace")) + 1
    diagnostic = Diagnostic(
        Severity.ERROR,
        f"the file is not UTF-8: byte 0x{data[e.start]:02X} at line {line}, column {column}",
        Span.point(line, column),
        "E011",
        "policy files are UTF-8 text",
    )
    return CompileError(Source(name, data.decode("utf-8", "replace")), [diagnostic])
