"""Policy test files (`*.poltest`): requests and the verdicts a policy must give them.

    # orders-api.poltest -- next to orders-api.pol, which it tests unless `file` names another
    policy orders-api                 # which policy of the file (needed when it has several)

    test "health probe"
    GET /healthz
    Host: shop.example.com
    expect allow rule 0

    test "JSON order"
    POST /api/v1/orders HTTP/1.1
    Content-Type: application/json
    X-Api-Key: k

    {"item": 1}
    expect allow

    test "an encoded slash" raw
    GET /api/v1/orders/1%2f..%2fadmin HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n
    expect refuse ambiguous-path

    test "a head that never ends" raw
    GET /healthz HTTP/1.1\\r\\nHost: shop.example.com\\r\\n
    expect held

A test is `test NAME` (quoted, or the rest of the line; `raw` after a quoted name), the request,
and an `expect` line. The request is written as text: a request line (`HTTP/1.1` is added when
the version is left out), header lines, and after a blank line the body (a `Content-Length` is
added for it unless the request has one, or a `Transfer-Encoding`). Lines are joined with CRLF.
In a `raw` test the lines are joined with nothing, so every byte is written out. Everywhere the
escapes `\\r \\n \\t \\\\ \\xHH` stand for those bytes.

`expect` takes a verdict, optionally followed by what decides it:

    expect allow [rule N | default]     the request passes (an allow rule, or the default)
    expect deny  [rule N | default]     refused by a deny rule or the default
    expect audit [rule N]               passed by an audit rule, recorded as a would-be refusal
    expect refuse [REASON]              refused before any rule: bad-method, ambiguous-path, ...
    expect held                         the head never completes: the kernel holds its bytes

`deny` and `refuse` may end with `answer STATUS` or `answer drop`: how the client is answered.

Rules are numbered from 0 in policy order, as `sockpol inspect` and `sockpol explain` show them.
Tests see the policy enforcing, whatever its `mode`. Lines starting with `#` outside a request are
comments; inside a request they are part of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from sockpol.diagnostics import SockpolError
from sockpol.dsl.ast import Mode, Policy
from sockpol.model.interp import HELD, REFUSALS, Verdict, evaluate

VERDICTS = ("allow", "deny", "audit", "refuse", "held")


class TestFileError(SockpolError):
    def __init__(self, path: str, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path, self.line, self.message = path, line, message


@dataclass(frozen=True)
class Expectation:
    verdict: str  # one of VERDICTS
    rule: int | None = None
    default: bool = False
    reason: str | None = None  # for refuse
    answer: int | None = None  # deny and refuse: the status answered (0: drop); None: any

    def __str__(self) -> str:
        out = self.verdict
        if self.rule is not None:
            out += f" rule {self.rule}"
        elif self.default:
            out += " default"
        elif self.reason:
            out += f" {self.reason}"
        if self.answer is not None:
            out += f" answer {self.answer or 'drop'}"
        return out


@dataclass(frozen=True)
class TestCase:
    name: str
    line: int
    request: bytes
    expect: Expectation


@dataclass
class TestFile:
    path: str
    policy_file: str
    policy_name: str | None
    cases: list[TestCase] = field(default_factory=list)


@dataclass(frozen=True)
class Outcome:
    case: TestCase
    verdict: Verdict
    passed: bool
    actual: str  # the verdict in `expect` form


_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|[rnt\\])")


def unescape(text: str) -> bytes:
    def one(m: re.Match[str]) -> str:
        e = m.group(1)
        return chr(int(e[1:], 16)) if e[0] == "x" else {"r": "\r", "n": "\n", "t": "\t"}.get(e, e)

    return _ESCAPE.sub(one, text).encode("latin-1", "replace")


def parse_test_file(text: str, path: str) -> TestFile:
    default_policy = str(Path(path).with_suffix(".pol"))
    tf = TestFile(path, default_policy, None)
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i].rstrip("\r")
        stripped = line.strip()
        i += 1
        if not stripped or stripped.startswith("#"):
            continue
        word, _, rest = stripped.partition(" ")
        # `policy` and `file` lines may end in a comment, as language.md's example shows.
        rest = re.sub(r"\s+#.*$", "", rest).strip()
        if word == "file" and not tf.cases:
            tf.policy_file = str(Path(path).parent / rest)
        elif word == "policy" and not tf.cases:
            tf.policy_name = rest
        elif word == "test":
            i = _case(tf, lines, i, rest)
        else:
            raise TestFileError(
                path, i, f"expected 'test NAME', 'policy NAME' or 'file PATH'; got {stripped!r}"
            )
    if not tf.cases:
        raise TestFileError(path, 1, "no tests in this file")
    return tf


def _case(tf: TestFile, lines: list[str], i: int, header: str) -> int:
    start = i
    raw = False
    match = re.fullmatch(r'"((?:[^"\\]|\\.)*)"\s*(raw)?', header)
    if match:
        name, raw = match.group(1).replace('\\"', '"'), bool(match.group(2))
    elif header:
        name = header
    else:
        raise TestFileError(tf.path, start, 'a test needs a name: test "NAME"')
    body: list[str] = []
    while i < len(lines):
        line = lines[i].rstrip("\r")
        i += 1
        if line.startswith("expect ") or line.strip() == "expect":
            request = _request(body, raw)
            if not request:
                raise TestFileError(tf.path, start, f"test {name!r} has no request")
            tf.cases.append(TestCase(name, start, request, _expectation(tf.path, i, line)))
            return i
        if line.startswith("test ") and body:
            break
        body.append(line)
    raise TestFileError(tf.path, start, f"test {name!r} has no 'expect' line")


def _expectation(path: str, line: int, text: str) -> Expectation:
    words = text.split()[1:]
    if not words or words[0] not in VERDICTS:
        raise TestFileError(path, line, f"expect {' | '.join(VERDICTS)}; got {text!r}")
    verdict, rest = words[0], words[1:]
    if len(rest) >= 2 and rest[-2] == "answer":
        word = rest[-1]
        if verdict not in ("deny", "refuse") or not (word == "drop" or word.isdigit()):
            raise TestFileError(
                path, line, f"'answer {word}': only deny and refuse take answer STATUS|drop"
            )
        answer = 0 if word == "drop" else int(word)
        inner = _expectation(path, line, " ".join(["expect", verdict, *rest[:-2]]))
        return replace(inner, answer=answer)
    if not rest:
        return Expectation(verdict)
    if verdict == "refuse":
        if len(rest) != 1 or rest[0] not in REFUSALS:
            raise TestFileError(
                path, line, f"unknown refusal {' '.join(rest)!r}: one of {', '.join(REFUSALS)}"
            )
        return Expectation(verdict, reason=rest[0])
    if rest == ["default"] and verdict in ("allow", "deny"):
        return Expectation(verdict, default=True)
    if len(rest) == 2 and rest[0] == "rule" and rest[1].isdigit():
        return Expectation(verdict, rule=int(rest[1]))
    raise TestFileError(
        path, line, f"after '{verdict}' expected 'rule N' or 'default'; got {' '.join(rest)!r}"
    )


def _request(body: list[str], raw: bool) -> bytes:
    while body and not body[0].strip():
        body.pop(0)
    while body and not body[-1].strip():
        body.pop()
    if raw:
        return b"".join(unescape(line) for line in body)
    if not body:
        return b""
    blank = next((n for n, line in enumerate(body) if not line.strip()), len(body))
    head, payload = body[:blank], body[blank + 1 :]
    request_line = head[0].strip()
    if len(request_line.split(" ")) == 2:
        request_line += " HTTP/1.1"
    fields = [line for line in head[1:]]
    data = b"\r\n".join(unescape(x) for x in payload) if payload else b""
    names = {f.split(":", 1)[0].strip().lower() for f in fields}
    if data and not names & {"content-length", "transfer-encoding"}:
        fields.append(f"Content-Length: {len(data)}")
    out = b"".join(unescape(x) + b"\r\n" for x in [request_line, *fields]) + b"\r\n"
    return out + data


def describe(verdict: Verdict, answer: bool = True) -> str:
    """A verdict in `expect` form (with how a refusal is answered, unless `answer` is False)."""
    text = _describe(verdict)
    if answer and not verdict.allow and verdict.reason != HELD:
        text += f" answer {verdict.answer}" if verdict.answer else " answer drop"
    return text


def _describe(verdict: Verdict) -> str:
    if verdict.reason == HELD:
        return "held"
    if verdict.refusal is not None:  # the head, or a chunked body after its head was judged
        return f"refuse {verdict.reason}"
    what = f"rule {verdict.rule.index}" if verdict.rule is not None else "default"
    if verdict.event == "audit":
        return f"audit {what}"
    return f"{'allow' if verdict.allow else 'deny'} {what}"


def matches(expect: Expectation, verdict: Verdict) -> bool:
    actual = describe(verdict, answer=False).split()
    if actual[0] != expect.verdict:
        return False
    if expect.answer is not None and verdict.answer != expect.answer:
        return False
    if expect.rule is not None:
        return actual[1:] == ["rule", str(expect.rule)]
    if expect.default:
        return actual[1:] == ["default"]
    if expect.reason is not None:
        return actual[1:] == [expect.reason]
    return True


def run_tests(tf: TestFile, policy: Policy) -> list[Outcome]:
    outcomes = []
    for case in tf.cases:
        verdict = evaluate(policy, case.request, Mode.ENFORCE)
        outcomes.append(Outcome(case, verdict, matches(case.expect, verdict), describe(verdict)))
    return outcomes
