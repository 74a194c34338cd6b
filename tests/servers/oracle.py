"""The server oracle: what sockpol decides about a byte stream, what each real server did with
the bytes sockpol let through, and whether they agree.

A request that sockpol passes must reach, on every server, a route the policy allows for that
request: the server's route (its representative canonical path, on the virtual host it picked) is
put in place of the request's path and Host, and the policy asked again. After every request
sockpol passes, each server must read the next request where sockpol does: the i-th response a
server routes must come from sockpol's i-th passed request head. A request sockpol refuses before
any rule is safe; when every server routed it alike, it is counted as a false refusal (a
legitimate request sockpol costs its users).
"""

from __future__ import annotations

import re
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tables_observer

from servers import DEFAULT_HOST, INTERNAL_HOST, ROUTES, Endpoint  # noqa: E402
from tables_observer import held_to_tables  # noqa: E402

from sockpol.codegen.lower import lower  # noqa: E402
from sockpol.dsl import load_source  # noqa: E402
from sockpol.dsl.ast import Mode, Policy  # noqa: E402
from sockpol.model.interp import Connection, Head, Header, Verdict, decide  # noqa: E402
from sockpol.telemetry import MODE_DRY_RUN, MODE_ENFORCE  # noqa: E402

# Two policies over the servers' routes: an allow-list (default deny) and a deny-list (default
# allow), so that both directions of a disagreement matter: a spelling that a server reads as a
# denied route, and one that it reads as anything but the allowed route sockpol saw.
POLICY_TEXTS = {
    "allow-list": """
policy oracle-allow {{
    port {ports}
    default deny
    deny  * /admin/**
    allow GET /public/**
    allow GET /api/v1/users/*
    allow POST /api/v1/orders if header content-type = "application/json"
    allow GET /static/*.css
    allow GET /healthz
    allow POST /api/v1/jobs:run
    allow GET,POST /internal/** if host "internal.example.com"
}}
""",
    "deny-list": """
policy oracle-deny {{
    port {ports}
    default allow
    deny * /admin/**
    deny * /api/v1/users/*
    deny * /api/v1/jobs:run
    deny * /internal/** if host "internal.example.com"
}}
""",
}


def policy_text(name: str, ports: list[int]) -> str:
    return POLICY_TEXTS[name].format(ports=", ".join(str(p) for p in ports))


def load_policy(name: str, ports: list[int] | None = None) -> Policy:
    return load_source(policy_text(name, ports or [8080]), f"{name}.pol")[0].policies[0]


# -- what the servers' routes are on canonical paths (every server agrees on these) ------------

_ROUTE_RES = [
    ("admin", r"/admin(/.*)?"), ("public", r"/public(/.*)?"), ("user", r"/api/v1/users/[^/]+"),
    ("orders", r"/api/v1/orders"), ("css", r"/static/[^/]*\.css"), ("health", r"/healthz"),
    ("rpc", r"/api/v1/jobs:run"),
]  # fmt: skip


def route_of(path: str, vhost: str) -> str:
    """The route a canonical path takes on the servers."""
    if vhost == "internal" and path.startswith("/internal/"):
        return "internal"
    return next((name for name, r in _ROUTE_RES if re.fullmatch(r, path)), "other")


def vhost_of(host: bytes | None) -> str:
    """The virtual host a plain Host value (no trailing dot, any case, any port) selects."""
    if host is None:
        return "default"
    name = host.split(b":")[0].lower()
    return "internal" if name == INTERNAL_HOST.encode() else "default"


# -- what a server did ------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    route: str | None  # a route name, or for a file server "path=/..." (None: nothing routed)
    vhost: str | None

    @property
    def served(self) -> bool:
        return 200 <= self.status < 300 and self.route is not None

    def key(self) -> str:
        """The resource it served, comparable across servers: a route name (a file server's
        path is mapped to the route of that path), with the virtual host."""
        route = self.route or "-"
        if route.startswith("path="):
            route = route_of(route[5:], self.vhost or "default")
        return f"{route}@{self.vhost}" if self.served else f"status {self.status}"


@dataclass
class Exchange:
    endpoint: str
    sent: bytes
    responses: list[Response] = field(default_factory=list)
    raw: bytes = b""
    error: str = ""


def exchange(ep: Endpoint, data: bytes, timeout: float = 5.0, fin_after: float = 0.0) -> Exchange:
    """Send `data` on a new connection, half-close (`fin_after` seconds later), read until the
    server closes."""
    ex = Exchange(ep.label, data)
    if not data:
        return ex
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection(("127.0.0.1", ep.port), timeout=timeout) as s:
            s.sendall(data)
            if fin_after:
                time.sleep(fin_after)
            s.shutdown(socket.SHUT_WR)
            chunks = []
            while time.monotonic() < deadline:
                s.settimeout(max(0.05, deadline - time.monotonic()))
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    ex.error = "timed out waiting for the server to close"
                    break
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            ex.raw = b"".join(chunks)
    except OSError as e:
        ex.error = f"{type(e).__name__}: {e}"
    ex.responses = parse_responses(ex.raw)
    return ex


def parse_responses(data: bytes) -> list[Response]:
    out: list[Response] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            break
        lines = data[pos:end].split(b"\r\n")
        m = re.match(rb"HTTP/1\.[01] (\d{3})", lines[0])
        if not m:
            break
        status = int(m.group(1))
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        pos = end + 4
        if b"transfer-encoding" in headers:
            body = bytearray()
            while True:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    pos = len(data)
                    break
                size = int(data[pos:eol].split(b";")[0] or b"0", 16)
                pos = eol + 2
                if size == 0:
                    eot = data.find(b"\r\n\r\n", pos - 2)
                    pos = len(data) if eot < 0 else eot + 4
                    break
                body += data[pos : pos + size]
                pos += size + 2
            body = bytes(body)
        elif b"content-length" in headers:
            n = int(headers[b"content-length"])
            body, pos = data[pos : pos + n], pos + n
        elif status in (204, 304) or status < 200:
            body = b""
        else:
            body, pos = data[pos:], len(data)
        route = headers.get(b"x-route")
        vhost = headers.get(b"x-vhost")
        text = body.decode("latin-1")
        if route is None and (fm := re.match(r"path=(\S+) vhost=(\w+)", text)):
            route, vhost = f"path={fm.group(1)}".encode(), fm.group(2).encode()
        out.append(
            Response(
                status,
                route.decode("latin-1") if route is not None else None,
                vhost.decode("latin-1") if vhost is not None else None,
            )
        )
    return out


# -- what sockpol does --------------------------------------------------------------------------


@dataclass
class Judged:
    delivered: bytes
    verdicts: list[Verdict]

    @property
    def passed_heads(self) -> list[Head]:
        return [v.head for v in self.verdicts if v.allow and v.head is not None]

    @property
    def refusal(self) -> Verdict | None:
        return next((v for v in self.verdicts if not v.allow), None)


def judge_stream(policy: Policy, data: bytes, sends: list[bytes] | None = None) -> Judged:
    """The interpreter on `data` (one send, or `sends`), held run by run to the compiled tables
    (what the kernel program runs): what reaches the server, and every verdict."""
    ir = _lowered(policy)
    mode = MODE_DRY_RUN if policy.mode is Mode.DRY_RUN else MODE_ENFORCE
    conn = Connection(policy, observe=held_to_tables(ir, mode))
    for chunk in sends or [data]:
        conn.send(chunk)
    return Judged(bytes(conn.delivered), list(conn.verdicts))


_LOWERED: dict[int, object] = {}


def _lowered(policy: Policy):
    key = id(policy)
    if key not in _LOWERED:
        _LOWERED[key] = (policy, lower(policy))
    return _LOWERED[key][1]


def route_verdict(policy: Policy, head: Head, response: Response) -> Verdict:
    """The policy's verdict on `head` as the server read it: the path of the route it served,
    and the Host of the virtual host it picked."""
    route = response.route or "other"
    path = route[5:] if route.startswith("path=") else ROUTES[route]
    host = INTERNAL_HOST if response.vhost == "internal" else DEFAULT_HOST
    headers = tuple(h for h in head.headers if h.name != "host") + (
        Header("host", host.encode(), 0),
    )
    return decide(policy, replace(head, path=path, raw_path=path, headers=headers))


def expected_key(head: Head) -> str:
    """The resource every server serves for a head sockpol passed, when it reads it as sockpol
    does: the route of its (canonical) path on the virtual host of its Host."""
    vhost = vhost_of(head.host)
    return f"{route_of(head.path, vhost)}@{vhost}"


# -- one case against every server --------------------------------------------------------------


@dataclass
class Outcome:
    case: object  # cases.Case
    policy: str
    sockpol: str  # what sockpol did, in words
    failures: list[str] = field(default_factory=list)
    false_refusal: bool = False  # refused before any rule, and every server agreed on it
    differs: list[str] = field(default_factory=list)  # endpoints that read it otherwise, allowed


def describe(judged: Judged) -> str:
    parts = []
    for v in judged.verdicts:
        if v.head is not None:
            parts.append(f"{'pass' if v.allow else 'deny'} {v.head.method} {v.head.path}")
        else:
            parts.append(f"{'pass' if v.allow else 'refuse'} {v.reason}")
    return "; ".join(parts) or "held"


def check(
    policy_name: str,
    policy: Policy,
    case,  # cases.Case
    sent: dict[str, Exchange],  # endpoint label -> exchange of case.data
    delivered: dict[str, Exchange] | None,  # of what sockpol delivered, when that differs
    judged: Judged,
    strict_order: bool,
) -> Outcome:
    out = Outcome(case, policy_name, describe(judged))
    heads = judged.passed_heads
    for label, ex in (delivered if delivered is not None else sent).items():
        if not judged.delivered:
            break
        for i, resp in enumerate(ex.responses):
            if not resp.served:
                continue
            where = f"{label} response {i + 1} ({resp.key()})"
            if i >= len(heads):
                out.failures.append(f"{where}: a request sockpol never judged")
                continue
            verdict = route_verdict(policy, heads[i], resp)
            if not verdict.allow:
                out.failures.append(
                    f"{where}: the policy {verdict.reason}s that route ({verdict.decided_by}) "
                    f"but sockpol passed {heads[i].method} {heads[i].target}"
                )
            elif resp.key() != expected_key(heads[i]):
                if strict_order:
                    out.failures.append(
                        f"{where}: sockpol's request {i + 1} was {heads[i].method} "
                        f"{heads[i].target} ({expected_key(heads[i])}): they disagree on where "
                        "a request starts"
                    )
                else:
                    out.differs.append(where)
    refusal = judged.refusal
    if refusal is not None and refusal.refusal is not None:
        keys = {tuple(r.key() for r in ex.responses) for ex in sent.values()}
        if len(keys) == 1 and all(ex.responses and ex.responses[0].served for ex in sent.values()):
            out.false_refusal = True
    return out


def report(outcome: Outcome, sent: dict[str, Exchange]) -> str:
    lines = [
        f"[{outcome.policy}] {outcome.case.replay()}",
        f"  sockpol: {outcome.sockpol}",
        *(f"  FAIL {f}" for f in outcome.failures),
        "  servers: "
        + ", ".join(
            f"{k}: {' '.join(r.key() for r in ex.responses) or ex.error or 'nothing'}"
            for k, ex in sent.items()
        ),  # fmt: skip
    ]
    return "\n".join(lines)
