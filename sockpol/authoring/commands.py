"""The policy authors' commands: `sockpol lint`, `fmt`, `test` and `explain`.

They run on a laptop or a CI runner: no root, no kernel support, no libbpf. Nothing here imports
`sockpol.runtime` (tests/test_authoring.py checks it), and `sockpol.cli` imports this module only
when one of these commands runs.

Exit status: 0 clean, 1 findings / failures / files that need formatting, 2 errors (a file that
does not check or cannot be read, a malformed test file).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from xml.etree import ElementTree as ET

from sockpol import __version__
from sockpol.diagnostics import CompileError, Diagnostic, SockpolError, render

EXIT_CLEAN, EXIT_FINDINGS, EXIT_ERRORS = 0, 1, 2


def _user_errors_exit_2(command: Callable[[argparse.Namespace], int]):
    """Every error a user can cause exits 2 with a readable message (not cli's exit 1)."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except SockpolError as e:
            return _errors(e)

    return run


def _errors(e: SockpolError) -> int:
    print(str(e), file=sys.stderr)
    return EXIT_ERRORS


def _policy_files(paths: list[str], suffix: str = ".pol") -> list[str]:
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            out += _find(Path(p), suffix)
        else:
            out.append(p)
    return out


def _find(folder: Path, suffix: str) -> list[str]:
    """Files ending in `suffix` below `folder`, skipping hidden directories (.git, .venv, ...)."""
    return sorted(
        str(f)
        for f in folder.rglob(f"*{suffix}")
        if not any(
            part.startswith(".") and part not in (".", "..")
            for part in f.relative_to(folder).parts[:-1]
        )
    )


# -- lint -----------------------------------------------------------------------------------------


@_user_errors_exit_2
def cmd_lint(args: argparse.Namespace) -> int:
    from sockpol.authoring.lint import lint_files
    from sockpol.dsl import load_file

    loaded, failed = [], False
    for path in _policy_files(args.files):
        try:
            loaded.append(load_file(path))
        except CompileError as e:
            failed = True
            print(str(e), file=sys.stderr)
    findings = lint_files(loaded)
    sources = {f.source.path: f.source for f, _ in loaded}
    if args.format == "json":
        print(json.dumps([_finding_json(f) for f in findings], indent=2))
    elif args.format == "sarif":
        print(json.dumps(sarif_log(findings), indent=2))
    else:
        for f in findings:
            d = f.diagnostic()
            d = Diagnostic(d.severity, d.message, d.span, f"{f.code} {f.name}", _hint(f))
            print(render(sources[f.path], d))
        if findings:
            print(f"{len(findings)} finding{'s' if len(findings) != 1 else ''}", file=sys.stderr)
    if failed:
        return EXIT_ERRORS
    return EXIT_FINDINGS if findings else EXIT_CLEAN


def _hint(f) -> str:
    silence = (
        f"silence it with '# sockpol: ignore[{f.name}]' on line {f.span.line}" if f.span else ""
    )
    return "; ".join(x for x in (f.hint, silence) if x)


def _finding_json(f) -> dict:
    span = f.span
    return {
        "file": f.path,
        "code": f.code,
        "name": f.name,
        "severity": f.severity.value,
        "message": f.message,
        "line": span.line if span else None,
        "column": span.column if span else None,
        "end_line": span.end_line if span else None,
        "end_column": span.end_column if span else None,
        "related": [{"message": m, "line": s.line, "column": s.column} for m, s in f.related],
        "hint": f.hint,
    }


def sarif_log(findings) -> dict:
    """SARIF 2.1.0, as code-scanning tools read it: one run, a rule per code, results in place."""
    from sockpol.authoring.lint import CODES

    codes = sorted({f.code for f in findings} | set(CODES))
    rules = [
        {
            "id": code,
            "name": CODES.get(code, code),
            "shortDescription": {"text": _DESCRIPTIONS.get(code, f"sockpol check {code}")},
            "defaultConfiguration": {"level": "note" if code in ("L007", "L008") else "warning"},
        }
        for code in codes
    ]
    index = {code: n for n, code in enumerate(codes)}
    results = []
    for f in findings:
        result: dict = {
            "ruleId": f.code,
            "ruleIndex": index[f.code],
            "level": {"error": "error", "warning": "warning"}.get(f.severity.value, "note"),
            "message": {"text": f.message},
            "locations": [_location(f.path, f.span)],
        }
        if f.related:
            result["relatedLocations"] = [
                {**_location(f.path, span), "id": n, "message": {"text": message}}
                for n, (message, span) in enumerate(f.related)
            ]
        results.append(result)
    return {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [
            {
                "tool": {"driver": {"name": "sockpol", "version": __version__, "rules": rules}},
                "results": results,
            }
        ],
    }


def _location(path: str, span) -> dict:
    uri = Path(path).as_posix() if not os.path.isabs(path) else Path(path).as_uri()
    physical: dict = {"artifactLocation": {"uri": uri}}
    if span is not None:
        physical["region"] = {
            "startLine": span.line,
            "startColumn": span.column,
            "endLine": span.end_line,
            "endColumn": max(span.end_column, span.column + 1),
        }
    return {"physicalLocation": physical}


_DESCRIPTIONS = {
    "L001": "A rule that earlier rules fully cover: it can never decide a request.",
    "L002": "A rule that matches exactly what an earlier rule matches.",
    "L003": "A rule after a rule that matches every request.",
    "L004": "An allow and a deny rule that overlap partly: their order decides some requests.",
    "L005": "Two policies that govern the same port.",
    "L006": "A rule that no request that is not refused can match.",
    "L007": "A policy without rules: the default decides every request.",
    "L008": "A default that never decides: the rules match every request.",
    "L009": "A policy with `tls` that governs only port 80, where clients speak plaintext HTTP.",
}


# -- fmt ------------------------------------------------------------------------------------------


@_user_errors_exit_2
def cmd_fmt(args: argparse.Namespace) -> int:
    from sockpol.authoring.fmt import diff, format_source
    from sockpol.dsl import read_source_file

    changed, failed = [], False
    for path in _policy_files(args.files):
        try:
            text = read_source_file(path)
            formatted = format_source(text, path)
        except CompileError as e:
            failed = True
            print(str(e), file=sys.stderr)
            continue
        if formatted == text:
            continue
        changed.append(path)
        if args.diff:
            sys.stdout.write(diff(text, formatted, path))
        elif args.check:
            print(f"{path}: would be reformatted", file=sys.stderr)
        else:
            from sockpol.files import write_atomically

            write_atomically(Path(path), formatted.encode("utf-8"))
            print(f"{path}: formatted", file=sys.stderr)
    if failed:
        return EXIT_ERRORS
    return EXIT_FINDINGS if changed and (args.check or args.diff) else EXIT_CLEAN


# -- test -----------------------------------------------------------------------------------------


@_user_errors_exit_2
def cmd_test(args: argparse.Namespace) -> int:
    from sockpol.authoring.testfile import TestFileError, parse_test_file, run_tests

    paths: list[str] = []
    for p in args.paths or ["."]:
        if os.path.isdir(p):
            paths += _find(Path(p), ".poltest")
        elif p.endswith(".pol"):
            paths.append(str(Path(p).with_suffix(".poltest")))
        else:
            paths.append(p)
    if not paths:
        print("sockpol test: no .poltest files found", file=sys.stderr)
        return EXIT_ERRORS
    suites, errors, failures, total = [], 0, 0, 0
    for path in paths:
        try:
            from sockpol.dsl import read_source_file

            tf = parse_test_file(read_source_file(path), path)
            policy = _policy_for(tf.policy_file, tf.policy_name, "'policy NAME' in the test file")
            outcomes = run_tests(tf, policy)
        except (TestFileError, SockpolError) as e:
            errors += 1
            print(str(e), file=sys.stderr)
            suites.append((path, None, str(e)))
            continue
        suites.append((path, outcomes, ""))
        for o in outcomes:
            total += 1
            if o.passed:
                if args.verbose:
                    print(f"PASS {path}:{o.case.line} {o.case.name}")
                continue
            failures += 1
            print(_failure(path, o))
    if args.junit:
        _write_junit(args.junit, suites)
    passed = total - failures
    print(f"{passed} passed, {failures} failed" + (f", {errors} errors" if errors else ""))
    if errors:
        return EXIT_ERRORS
    return EXIT_FINDINGS if failures else EXIT_CLEAN


def _policy_for(policy_file: str, name: str | None, how: str):
    from sockpol.dsl import load_file

    file, _ = load_file(policy_file)
    return file.choose(name, how)


def _failure(path: str, o) -> str:
    lines = [
        f"FAIL {path}:{o.case.line} {o.case.name}",
        f"  expected: {o.case.expect}",
        f"  got:      {o.actual}",
    ]
    lines += ["  " + x for x in explain_lines(o.verdict)]
    return "\n".join(lines)


def _write_junit(target: str, suites) -> None:
    root = ET.Element("testsuites", name="sockpol test")
    for path, outcomes, error in suites:
        suite = ET.SubElement(root, "testsuite", name=path)
        if outcomes is None:
            suite.set("tests", "1")
            suite.set("errors", "1")
            case = ET.SubElement(suite, "testcase", name="(test file)", classname=path)
            ET.SubElement(case, "error", message=error).text = error
            continue
        failed = [o for o in outcomes if not o.passed]
        suite.set("tests", str(len(outcomes)))
        suite.set("failures", str(len(failed)))
        suite.set("errors", "0")
        for o in outcomes:
            case = ET.SubElement(
                suite, "testcase", name=o.case.name, classname=path, line=str(o.case.line)
            )
            if not o.passed:
                message = f"expected {o.case.expect}, got {o.actual}"
                ET.SubElement(case, "failure", message=message).text = "\n".join(
                    explain_lines(o.verdict)
                )
    tree = ET.ElementTree(root)
    ET.indent(tree)
    tree.write(target, encoding="utf-8", xml_declaration=True)


# -- explain --------------------------------------------------------------------------------------


@_user_errors_exit_2
def cmd_explain(args: argparse.Namespace) -> int:
    from sockpol.dsl.ast import Mode
    from sockpol.model.interp import evaluate

    policy = _policy_for(args.file, args.policy, "--policy NAME")
    request, note = _request_from(args)
    verdict = evaluate(policy, request, Mode.ENFORCE if args.enforce else None)
    print(f"policy {policy.name} ({args.file}), mode {(policy.mode.value)}, {_side_text(policy)}")
    if note:
        print(note)
    for line in explain_lines(verdict, request, policy.side.value):
        print(line)
    return EXIT_CLEAN if verdict.allow else EXIT_FINDINGS


def _side_text(policy) -> str:
    if policy.side.value == "ingress":
        return "side ingress (requests the cgroup's servers receive)"
    return "side egress (requests the cgroup sends)"


def _request_from(args: argparse.Namespace) -> tuple[bytes, str]:
    if args.method or args.path:
        if args.request:
            raise SockpolError("explain: give a request file or --method/--path, not both")
        lines = [f"{args.method or 'GET'} {args.path or '/'} HTTP/1.1"]
        if args.host:
            lines.append(f"Host: {args.host}")
        lines += args.header or []
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), ""
    if not args.request or args.request == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            data = Path(args.request).read_bytes()
        except OSError as e:
            raise SockpolError(f"{args.request}: {e.strerror}") from None
    if b"\r" not in data and b"\n" in data and not args.raw:
        head, sep, body = data.partition(b"\n\n")
        data = head.replace(b"\n", b"\r\n") + (b"\r\n\r\n" + body if sep else b"\r\n")
        if not sep:
            data += b"\r\n"
        return data, "(line ends converted to CRLF; --raw reads the bytes as they are)"
    return data, ""


def explain_lines(verdict, request: bytes | None = None, side: str = "egress") -> list[str]:
    """How the request was read, and what decided it (shared by explain and test failures).
    `side`: the policy's; what a hold and a drop do differs (docs/design.md)."""
    from sockpol.model.interp import HELD

    out: list[str] = []
    head = verdict.head
    if head is not None:
        out.append(f"request: {head.method} {head.target} {head.version}")
        path = head.path if head.raw_path == head.path else f"{head.raw_path} -> {head.path}"
        out.append(f"  path: {path}")
        host = head.host
        out.append(f"  host: {host.decode('latin-1') if host is not None else '(no Host header)'}")
        # The headers the rules tried ask about come first, marked; the others are listed too.
        asked = {
            c.name for check in verdict.checks for c in check.rule.conditions if hasattr(c, "name")
        }
        for h in sorted(head.headers, key=lambda h: h.name not in asked):
            if h.name != "host":
                value = h.value.decode("latin-1")
                value = value if len(value) <= 100 else f"{value[:97]}... ({len(value)} bytes)"
                mark = "  (a condition asks about it)" if h.name in asked else ""
                out.append(f"  header {h.name}: {value}{mark}")
        if head.chunked:
            out.append("  body: chunked")
        elif head.content_length:
            out.append(f"  body: {head.content_length} bytes (Content-Length)")
    if verdict.reason == HELD and side == "ingress":
        out.append(
            f"INCOMPLETE: the head is incomplete ({len(request or b'')} bytes, no blank line "
            "yet): on the receiving side these bytes pass to the server, which acts on no half "
            "head; the head is judged when its end arrives, and if refused its end never does; "
            "a head still incomplete at max-head bytes is refused (head-too-large)"
        )
        return out
    if verdict.reason == HELD:
        out.append(
            f"HELD: the head is incomplete ({len(request or b'')} bytes, no blank line yet): the "
            "kernel holds these bytes until the rest arrives, and nothing reaches the server; "
            "a head still incomplete at max-head bytes is refused (head-too-large)"
        )
        return out
    if verdict.refusal is not None and (head is None or verdict.reason == "bad-chunk"):
        r = verdict.refusal
        out.append(f"REFUSED before any rule: {r.reason} (at byte {r.offset}): {r.detail}")
        if request is not None and head is None:
            out += _pointer(request, r.offset)
        if not verdict.allow:
            out.append(_answered(verdict, side))
        return out
    for check in verdict.checks:
        rule = check.rule
        mark = "MATCH" if check.matched else "no   "
        out.append(f"  {mark} rule {rule.index} (line {rule.span.line}): {rule.describe()}")
        if not check.matched:
            out.append(f"        {check.why}")
    if verdict.rule is not None:
        rule = verdict.rule
        what = {"allow": "ALLOWED", "deny": "DENIED", "audit": "PASSED (audit)"}[rule.action.value]
        decided = f"{what} by rule {rule.index} (line {rule.span.line}): {rule.describe()}"
    else:
        decided = f"{'ALLOWED' if verdict.allow else 'DENIED'} by the default (no rule matched)"
    if verdict.event == "dry-run":
        decided += " -- passed: the policy runs in dry-run mode"
    out.append(decided)
    if not verdict.allow:
        out.append(_answered(verdict, side))
    return out


def _answered(verdict, side: str = "egress") -> str:
    if verdict.answer:
        return (
            f"ANSWERED {verdict.answer}: the client reads a {verdict.answer} response from "
            "sockpol (Connection: close); the server sees nothing"
        )
    if side == "ingress":
        return (
            "DROPPED: the server never receives it, nor anything after it on the connection; "
            "the client reads nothing until its own timeout (answer drop)"
        )
    return "DROPPED: the send fails (EACCES); the client reads nothing (answer drop)"


def _pointer(request: bytes, offset: int) -> list[str]:
    start = request.rfind(b"\n", 0, offset) + 1
    end = request.find(b"\n", offset)
    line = request[start : end if end >= 0 else len(request)]
    shown = line.decode("latin-1").encode("unicode_escape").decode("ascii")
    before = request[start:offset].decode("latin-1").encode("unicode_escape").decode("ascii")
    return [f"    {shown}", f"    {' ' * len(before)}^"]


__all__ = [
    "cmd_explain",
    "cmd_fmt",
    "cmd_lint",
    "cmd_test",
    "explain_lines",
    "sarif_log",
]
