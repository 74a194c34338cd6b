"""Generated API policies for the benchmarks, and the same allow/deny as HAProxy ACLs.

A policy of N rules looks like a real API surface: services with resources, each resource with
its collection and item routes (GET/HEAD, POST with a JSON content type, PUT/PATCH with an API
key, DELETE denied), a few regex routes, an admin area denied per service, static files, and a
final catch-all deny. Routes overlap (an item route and a service-wide deny match the same
paths; a regex and a glob overlap), so the candidate lists are not trivially one rule long.

`requests(policy, k)` gives k request lines the policy allows (what the HTTP benchmark sends:
an allowed request keeps the connection; a refused one would end it), spread over the policy, the
last rules included (`--mix policy`).

The issue's mix (`--mix issue`, the default): `ISSUE_MIX`, four kinds of GET of about 100 bytes
each, sent against `issue_rules(n)`, the N generated rules with three rules allowing them inserted
right after `/healthz`. `padded(mix, size, host)` lengthens every head to about `size` bytes with
an `X-Pad` header, to measure what a program run costs per head byte.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from sockpol.dsl.pathmatch import to_regex

WORDS = (
    "orders users carts items invoices payments refunds shipments products reviews tags "
    "accounts sessions tokens files images videos comments likes follows messages threads "
    "reports metrics alerts events logs jobs tasks queues topics"
).split()


@dataclass(frozen=True)
class Rule:
    action: str  # allow | deny
    methods: tuple[str, ...] | None  # None: any
    path: str  # a glob, or ~"regex"
    header: tuple[str, str | None] | None = None  # (name, value or None for presence)
    sample: str = ""  # a request path the rule matches (for allowed requests)

    def text(self) -> str:
        methods = "*" if self.methods is None else ",".join(self.methods)
        line = f"{self.action} {methods} {self.path}"
        if self.header:
            name, value = self.header
            line += f" if header {name}" + (f' = "{value}"' if value is not None else "")
        return line


def api_rules(n: int, seed: int = 4) -> list[Rule]:
    """n rules (n >= 4) in the shape described above, deterministic for a seed."""
    rnd = random.Random(seed)
    rules: list[Rule] = [Rule("allow", ("GET",), "/healthz", sample="/healthz")]
    services = max(1, n // 40)
    per_route = [
        lambda b: Rule("allow", ("GET", "HEAD"), b, sample=b),
        lambda b: Rule("allow", ("GET", "HEAD"), b + "/*", sample=b + "/42"),
        lambda b: Rule("allow", ("POST",), b, ("content-type", "application/json"), b),
        lambda b: Rule("allow", ("PUT", "PATCH"), b + "/*", ("x-api-key", None), b + "/7"),
        lambda b: Rule("deny", ("DELETE",), b + "/*"),
        lambda b: Rule(
            "allow", ("GET",), f'~"{b}/[0-9]+/history(/[a-z]+)?"', sample=b + "/9/history"
        ),
    ]
    i = 0
    while len(rules) < n - 1:
        svc = f"svc{i % services}"
        if i < services:  # each service's admin area is denied before its routes
            rules.append(Rule("deny", None, f"/api/v1/{svc}/admin/**"))
            i += 1
            continue
        word = f"{WORDS[i % len(WORDS)]}{i // len(WORDS)}"
        base = f"/api/v{1 + i % 2}/{svc}/{word}"
        for make in per_route:
            if len(rules) < n - 2:
                rules.append(make(base))
        if i % 9 == 0 and len(rules) < n - 1:
            rules.append(
                Rule(
                    "allow",
                    ("GET",),
                    f"/static/{svc}/{word}/**",
                    sample=f"/static/{svc}/{word}/a.css",
                )
            )
        i += 1
    rnd.shuffle(rules[1 + services :])  # routes in no particular order, as real files grow
    rules.append(Rule("deny", None, "/**"))
    return rules[:n]


def policy_text(name: str, port: int, rules: list[Rule]) -> str:
    body = "".join(f"    {r.text()}\n" for r in rules)
    return f"policy {name} {{\n    port {port}\n    default deny\n{body}}}\n"


def requests(rules: list[Rule], k: int, seed: int = 1) -> list[tuple[str, str, dict[str, str]]]:
    """k (method, path, headers) requests that the first matching rule allows."""
    rnd = random.Random(seed)
    allowed = [r for r in rules if r.action == "allow" and r.sample]
    # Every request must be decided by the rule it was drawn from: skip samples an earlier rule
    # decides (e.g. a route under a denied admin area).
    out = []
    for r in rnd.sample(allowed, min(k, len(allowed))) + allowed[-2:]:
        method = r.methods[0] if r.methods else "GET"
        headers = {}
        if r.header:
            headers[r.header[0]] = r.header[1] if r.header[1] is not None else "k"
        out.append((method, r.sample, headers))
    return out[:k] if len(out) > k else out


# The issue's request mix: four kinds, one Host header (wrk adds it), a client's usual two more.
ISSUE_MIX: list[tuple[str, str, dict[str, str]]] = [
    ("GET", path, {"User-Agent": "wrk/4.1.0", "Accept": "*/*"})
    for path in ("/api/v1/orders/17", "/api/v1/orders/17/items", "/healthz", "/static/css/a.css")
]
ISSUE_RULES = [
    Rule("allow", ("GET",), "/api/v1/orders/*", sample="/api/v1/orders/17"),
    Rule("allow", ("GET",), "/api/v1/orders/*/items", sample="/api/v1/orders/17/items"),
    Rule("allow", ("GET",), "/static/**", sample="/static/css/a.css"),
]
PAD_HEADER = "X-Pad"


def issue_rules(n: int, seed: int = 4) -> list[Rule]:
    """`api_rules(n)` plus `ISSUE_RULES` right after its first rule (`allow GET /healthz`): n + 3
    rules, the four kinds of `ISSUE_MIX` decided by the first four."""
    rules = api_rules(n, seed)
    assert rules[0].path == "/healthz"
    return rules[:1] + ISSUE_RULES + rules[1:]


def head_bytes(method: str, path: str, headers: dict[str, str], host: str) -> int:
    """The length of the head wrk sends for a request (wrk.format: request line, Host, the
    headers, an empty line; no Content-Length without a body)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return len("\r\n".join(lines)) + 4


def padded(
    mix: list[tuple[str, str, dict[str, str]]], size: int, host: str
) -> list[tuple[str, str, dict[str, str]]]:
    """`mix` with an `X-Pad: aaa...` header making each head `size` bytes long; heads already
    within a header's length (9 bytes) of `size`, or longer, are left as they are."""
    out = []
    for method, path, headers in mix:
        pad = size - head_bytes(method, path, headers, host) - len(f"{PAD_HEADER}: \r\n")
        if pad > 0:
            headers = {**headers, PAD_HEADER: "a" * pad}
        out.append((method, path, headers))
    return out


def haproxy_acls(rules: list[Rule]) -> list[str]:
    """`http-request` lines doing the same first-match allow/deny (default deny) in HAProxy.

    Paths use the same reference regexes as sockpol's interpreter (pathmatch.to_regex, PCRE
    compatible). HAProxy does not normalize paths the way sockpol does; the benchmark's requests
    are already normalized, so both judge them alike."""
    out = []
    for r in rules:
        conds = []
        if r.methods is not None:
            conds.append("{ method " + " ".join(r.methods) + " }")
        regex = to_regex(r.path).replace("\\", "\\\\")
        conds.append(f'{{ path_reg -- "{regex}" }}')
        if r.header:
            name, value = r.header
            if value is None:
                conds.append(f"{{ req.hdr_cnt({name}) gt 0 }}")
            else:
                conds.append(f'{{ req.hdr({name}) -m str "{value}" }}')
        verb = "allow" if r.action == "allow" else "deny"
        out.append(f"    http-request {verb} if " + " ".join(conds))
    out.append("    http-request deny")
    return out


__all__ = [
    "ISSUE_MIX",
    "ISSUE_RULES",
    "PAD_HEADER",
    "Rule",
    "api_rules",
    "haproxy_acls",
    "head_bytes",
    "issue_rules",
    "padded",
    "policy_text",
    "requests",
]
