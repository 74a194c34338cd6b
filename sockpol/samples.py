"""Sample requests for a policy: one that each rule's conditions accept, and a few refused ones.

Used by `sockpol demo` to drive live traffic, and by tests to exercise every rule of every example.
A sample matches its rule's own conditions; an earlier rule may still decide it (that is the point
of first-match semantics), so callers compare against the simulator rather than assume the rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from sockpol.dsl import regex
from sockpol.dsl.ast import HeaderCondition, HostCondition, Policy, Rule


@dataclass(frozen=True)
class Sample:
    label: str
    data: bytes

    @property
    def request_line(self) -> str:
        return self.data.split(b"\r\n", 1)[0].decode("latin-1")


def sample_path(pattern: str) -> str:
    if regex.is_regex(pattern):
        return regex.example(pattern)
    segments = []
    for seg in pattern[1:].split("/"):
        if seg == "**":
            segments.append("deep/path")
        elif seg == "*":
            segments.append("item1")
        else:
            segments.append(seg.replace("**", "more/bytes").replace("*", "x"))
    return "/" + "/".join(segments)


def sample_for_rule(rule: Rule) -> Sample:
    method = rule.methods.methods[0] if rule.methods.methods else "GET"
    host = "localhost"
    headers: list[str] = []
    for cond in rule.conditions:
        if isinstance(cond, HostCondition):
            host = cond.pattern.replace("*.", "www.", 1)
        elif isinstance(cond, HeaderCondition):
            headers.append(f"{cond.name}: {cond.value if cond.value is not None else '1'}")
    body = b'{"demo": true}' if method in ("POST", "PUT", "PATCH") else b""
    lines = [f"{method} {sample_path(rule.path.text)} HTTP/1.1", f"Host: {host}", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    head = "\r\n".join(lines) + "\r\n\r\n"
    return Sample(f"rule {rule.index} (line {rule.span.line})", head.encode("latin-1") + body)


def extra_samples() -> list[Sample]:
    return [
        Sample("no rule", b"GET /not/in/any/rule HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        Sample("dot segments", b"GET /public/../admin HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        Sample("not HTTP", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
    ]


def samples(policy: Policy) -> list[Sample]:
    return [sample_for_rule(r) for r in policy.rules] + extra_samples()
