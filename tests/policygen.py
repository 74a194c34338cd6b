"""Hypothesis strategies: random valid policies, and requests aimed at them.

Shared by the differential tests (interpreter vs tables, interpreter vs kernel), the formatter's
round-trip test and the linter's tests. A generated policy is a `PolicySpec` that renders to text
for any port, so a kernel test can point it at its own server. The generator covers every construct
of the language: port lists and ranges on several lines, both defaults, max-head in each spelling,
method lists and `*`, exact, `*`, `**` and partial `**` paths (quoted or not, with escapes), host
patterns exact and wildcard, header conditions with and without values, and comments.

Requests are built from the policy's own vocabulary (so rules match often) and then spelled
adversarially: dot segments, repeated slashes, escapes of unreserved characters, lower-case hex,
path parameters, queries, malformed escapes, duplicate and malformed headers, Content-Length
games, and bytes that are not HTTP at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from hypothesis import strategies as st

from sockpol.dsl import load_source
from sockpol.dsl.ast import Policy

METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND", "X-CUSTOM_1"]
WORDS = ["a", "b", "api", "v1", "admin", "static", "x.json", "img", "%5B", "a%20b", "~u", "ad"]
HOSTS = ["shop.example.com", "example.com", "api.example.org", "a-b.example.com"]
HEADER_NAMES = ["x-api-key", "content-type", "accept", "x-csrf-token", "authorization"]
_SKIP_CASES = [
    (7, "\x01"), (8, "\x7f"), (9, "\xe9"), (15, "\t"), (16, "\x1f"), (23, "\x00"),
    (24, "\x80"), (31, "\r"), (40, "\n"),
]  # fmt: skip
# Headers as clients send them (name, ": ", value), whose names the kernel takes as literals
# (codegen/literals.py), and near misses of those literals.
CLIENT_HEADERS = [
    "User-Agent: curl/8.5.0", "User-Agent: Mozilla/5.0 (X11; Linux x86_64)", "Accept: */*",
    "Accept-Encoding: gzip, deflate", "Accept-Language: en", "Connection: keep-alive",
    "Cookie: a=b", "Referer: http://x/", "Upgrade-Insecure-Requests: 1", "user-agent: node",
    "accept: */*", "Content-Type: text/html", "X-Forwarded-For: 10.0.0.1",
    "User-Agent:curl", "User-Agent : x", "User-Agenx: x", "Accept:*/*", "Accept-Encodinh: x",
    "Sec-Fetch-Mode: cors", "Content-Typ: x", "Cookie:", "Accept-Encoding:",
]  # fmt: skip
HEADER_VALUES = ["application/json", "text/html", "1", "a b", 'say "hi"', "back\\slash", ""]


@dataclass(frozen=True)
class RuleSpec:
    action: str
    methods: tuple[str, ...] | None
    path: str
    quoted: bool
    conditions: tuple[tuple[str, str, str | None], ...]  # ("host", pattern, None) | ("header", ..)
    comment: str = ""
    log: bool = False
    answer: str | None = None  # a deny rule's own `answer` ("404", "drop", ...)

    def text(self) -> str:
        methods = "*" if self.methods is None else ",".join(self.methods)
        path = _quote(self.path) if self.quoted and not self.path.startswith('~"') else self.path
        line = f"{self.action} {methods} {path}"
        conds = []
        for kind, name, value in self.conditions:
            if kind == "host":
                conds.append(f"host {_quote(name)}")
            elif value is None:
                conds.append(f"header {name}")
            else:
                conds.append(f"header {name} = {_quote(value)}")
        if conds:
            line += " if " + " and ".join(conds)
        if self.log:
            line += " log"
        if self.answer is not None:
            line += f" answer {self.answer}"
        return line + (f"  # {self.comment}" if self.comment else "")


@dataclass(frozen=True)
class PolicySpec:
    name: str
    port_lines: tuple[tuple[str, ...], ...]  # each line's items; "{PORT}" or "{RANGE}" marks ours
    default: str
    max_head: str | None
    rules: tuple[RuleSpec, ...]
    governed: bool = True
    header_comment: bool = False
    statements_first: bool = True  # port/default/max-head before the rules, or after
    mode: str | None = None  # "enforce", "dry-run" or no `mode` statement
    tls: str | None = None  # the `tls` line as written ("tls userspace allow"), or none
    answer: str | None = None  # the policy's `answer` ("403", "drop", ...), or none

    def render(self, port: int) -> str:
        lines = ["# generated policy"] if self.header_comment else []
        lines.append(f"policy {self.name} {{")
        head = []
        for items in self.port_lines:
            rendered = [_port_item(i, port) for i in items]
            head.append("    port " + ", ".join(rendered))
        head.append(f"    default {self.default}")
        if self.max_head is not None:
            head.append(f"    max-head {self.max_head}")
        if self.mode is not None:
            head.append(f"    mode {self.mode}")
        if self.tls is not None:
            head.append(f"    {self.tls}")
        if self.answer is not None:
            head.append(f"    answer {self.answer}")
        body = ["    " + r.text() for r in self.rules]
        lines += head + [""] + body if self.statements_first else body + head
        lines.append("}")
        return "\n".join(lines) + "\n"

    def policy(self, port: int) -> Policy:
        file, _ = load_source(self.render(port), "generated.pol")
        (policy,) = file.policies
        return policy


def _port_item(item: str, port: int) -> str:
    if item == "{PORT}":
        return str(port)
    if item == "{RANGE}":
        return f"{max(1, port - 3)}-{min(65535, port + 2)}"
    return item


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- policies -------------------------------------------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9_-]{0,12}", fullmatch=True)
other_ports = st.sampled_from(["1", "80", "443", "8080", "9000-9010", "65535", "1000-1999"])


# Path regexes (`~"..."`) with paths they match, used once the language has them.
REGEXES = {
    '~"/v[0-9]+/.*"': ["/v1/a", "/v22/", "/v3/x/y"],
    '~"/a/(b|c)"': ["/a/b", "/a/c"],
    '~"/[^/]+\\.json"': ["/x.json", "/%5B.json"],
    '~"/api/\\d{1,3}/items"': ["/api/7/items", "/api/123/items"],
    '~"/ad.*"': ["/ad", "/admin/x"],
    '~"/(static|img)/[a-z]+"': ["/static/css", "/img/x"],
}


@cache
@st.composite
def path_patterns(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 7)) == 0:
        return draw(st.sampled_from(sorted(REGEXES)))
    n = draw(st.integers(0, 4))
    segments: list[str] = []
    for i in range(n):
        last = i == n - 1
        choice = draw(st.integers(0, 9))
        if choice <= 4:
            seg = draw(st.sampled_from(WORDS))
        elif choice == 5:
            seg = "*"
        elif choice == 6:
            if segments and segments[-1] == "**":
                seg = "*"
            else:
                seg = "**"
        elif choice == 7:
            seg = draw(st.sampled_from(["*.json", "a*", "*b", "x*y", "v*.%5B"]))
        elif choice == 8 and last:
            seg = draw(st.sampled_from(["ad**", "a**", "x.j**"]))
        else:
            seg = draw(st.sampled_from(WORDS))
        segments.append(seg)
    path = "/" + "/".join(segments)
    if segments and "**" not in segments[-1] and draw(st.integers(0, 9)) == 0:
        path += "/"  # a trailing slash is a pattern of its own
    return path


@st.composite
def conditions(draw: st.DrawFn) -> tuple[tuple[str, str, str | None], ...]:
    out = []
    for _ in range(draw(st.integers(0, 2))):
        if draw(st.booleans()):
            host = draw(st.sampled_from(HOSTS))
            if draw(st.booleans()):
                host = "*." + host.split(".", 1)[1] if host.count(".") > 1 else "*." + host
            out.append(("host", draw(st.sampled_from([host, host.upper()])), None))
        else:
            name = draw(st.sampled_from(HEADER_NAMES + ["X-Api-Key", "Accept"]))
            value = draw(st.one_of(st.none(), st.sampled_from(HEADER_VALUES)))
            out.append(("header", name, value))
    return tuple(out)


@st.composite
def rules(draw: st.DrawFn) -> RuleSpec:
    methods = draw(st.one_of(st.none(), st.lists(st.sampled_from(METHODS), min_size=1, max_size=3)))
    action = draw(st.sampled_from(["allow", "allow", "deny", "deny", "audit"]))
    return RuleSpec(
        action=action,
        log=action == "allow" and draw(st.integers(0, 3)) == 0,
        answer=draw(st.sampled_from([None, None, None, "404", "drop", "429"]))
        if action == "deny"
        else None,
        methods=None if methods is None else tuple(dict.fromkeys(methods)),
        path=draw(path_patterns()),
        quoted=draw(st.integers(0, 4)) == 0,
        conditions=draw(conditions()),
        comment=draw(st.sampled_from(["", "", "", "why: {x}", "#"])),
    )


@st.composite
def policies(
    draw: st.DrawFn,
    max_rules: int = 8,
    governed: bool | None = None,
    modes: bool = True,
    tls: bool = False,
) -> PolicySpec:
    """A valid policy; `modes`: may have a `mode` statement (dry-run included); `tls`: may have
    a `tls` statement (such a policy loads only where kTLS works, so kernel tests leave it off)."""
    ours = draw(st.sampled_from(["{PORT}", "{RANGE}"]))
    items = draw(st.lists(other_ports, max_size=3, unique=True))
    position = draw(st.integers(0, len(items)))
    items.insert(position, ours)
    is_governed = draw(st.integers(0, 19)) != 0 if governed is None else governed
    if not is_governed:
        items = [i for i in items if i not in ("{PORT}", "{RANGE}")] or ["1"]
    # Split the items over one or two `port` lines; ranges in other_ports never overlap ours
    # in practice (tests use ephemeral ports), and an overlap would only be a warning.
    cut = draw(st.integers(1, len(items)))
    port_lines = tuple(x for x in (tuple(items[:cut]), tuple(items[cut:])) if x)
    max_head = draw(
        st.one_of(
            st.none(),
            st.sampled_from(["256", "256B", "300", "512", "1KiB", "2KiB", "4096", "8KiB"]),
        )
    )
    return PolicySpec(
        name=draw(names),
        port_lines=port_lines,
        default=draw(st.sampled_from(["allow", "deny"])),
        max_head=max_head,
        rules=tuple(draw(st.lists(rules(), max_size=max_rules))),
        governed=is_governed,
        header_comment=draw(st.booleans()),
        statements_first=draw(st.integers(0, 4)) != 0,
        mode=draw(st.sampled_from([None, None, "enforce", "dry-run"])) if modes else None,
        tls=draw(st.sampled_from([None, "tls", "tls userspace deny", "tls userspace allow"]))
        if tls
        else None,
        answer=draw(st.sampled_from([None, None, "403", "403", "drop", "451"])),
    )


# -- requests -------------------------------------------------------------------------------------

SEGMENT_CHARS = "abxyz019-._~!$&'()+,;=:@"


@st.composite
def filler(draw: st.DrawFn, slash: bool = False, min_size: int = 0) -> str:
    alphabet = SEGMENT_CHARS + ("/" if slash else "")
    return draw(st.text(alphabet, min_size=min_size, max_size=6))


@st.composite
def path_for(draw: st.DrawFn, pattern: str) -> str:
    """A path the glob matches (before adversarial respelling)."""
    out = []
    for seg in pattern[1:].split("/"):
        if seg == "**":
            out += [draw(filler(min_size=1)) for _ in range(draw(st.integers(0, 2)))]
            continue
        if seg == "*":
            out.append(draw(filler(min_size=1)))
            continue
        text = ""
        i = 0
        while i < len(seg):
            if seg.startswith("**", i):
                text += draw(filler(slash=True))
                i += 2
            elif seg[i] == "*":
                text += draw(filler())
                i += 1
            else:
                text += seg[i]
                i += 1
        out.append(text)
    return "/" + "/".join(out)


def _unreserved_escape(c: str, upper: bool) -> str:
    code = f"%{ord(c):02X}"
    return code if upper else code.lower()


@st.composite
def respell(draw: st.DrawFn, path: str) -> str:
    """The same path after normalization, spelled differently (or broken on purpose)."""
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.integers(0, 12))
        slashes = [i for i, c in enumerate(path) if c == "/"]
        at = draw(st.sampled_from(slashes)) if slashes else 0
        if kind == 0:
            path = path[:at] + "/" + path[at:]  # a repeated slash
        elif kind == 1:
            path = path[:at] + "/." + path[at:]
        elif kind == 2:
            path = path[:at] + "/zz/.." + path[at:]
        elif kind == 3:
            path = path[:at] + draw(st.sampled_from(["/%2e", "/%2E%2e/x", "/.%2E"])) + path[at:]
        elif kind == 4:
            letters = [i for i, c in enumerate(path) if c.isalnum() or c in "-._~"]
            if letters:
                i = draw(st.sampled_from(letters))
                path = path[:i] + _unreserved_escape(path[i], draw(st.booleans())) + path[i + 1 :]
        elif kind == 5:
            path = path.replace("%5B", "%5b")
        elif kind == 6:
            path += "?" + draw(st.sampled_from(["q=1", "a=/x/../y", "%zz", "x?y", "a b"]))
        elif kind == 7:
            bad = ["%2F", "%2f", "%5C", "%00", "%", "%4", "%zz", "%%41", "%4g"]
            path = path[:at] + "/" + draw(st.sampled_from(bad)) + path[at:]
        elif kind == 8:
            path = (
                path[:at] + draw(st.sampled_from(["\\", "#f", '"', "\x7f", "\t", "é"])) + path[at:]
            )
        elif kind == 9:
            path = "/.." + path
        elif kind == 10:
            path = draw(st.sampled_from(["*", "http://h/x", "x", ""])) + path
        elif kind == 11:  # path parameters, escapes of bytes with a raw spelling
            extra = [";", ";x=1", "%3B", "%3b", "%3A", "%40", "%2A", "..;", "%5b", "%C3%A9"]
            path = path[:at] + "/a" + draw(st.sampled_from(extra)) + path[at:]
        else:
            path = path.rstrip("/") + "/" + draw(st.sampled_from([".", "..", ""]))
    return path


@dataclass(frozen=True)
class RequestSpec:
    method: str
    target: str
    version: str
    headers: tuple[str, ...]
    body: bytes
    raw: bytes | None = None  # when set, sent as is
    lead: bytes = b""  # before the request line: empty lines (skipped) or broken ones

    def data(self) -> bytes:
        if self.raw is not None:
            return self.lead + self.raw
        head = f"{self.method} {self.target} {self.version}\r\n" + "".join(
            h + "\r\n" for h in self.headers
        )
        return self.lead + head.encode("utf-8") + b"\r\n" + self.body


@st.composite
def host_headers(draw: st.DrawFn, policy: PolicySpec) -> list[str]:
    patterns = [n for r in policy.rules for k, n, _ in r.conditions if k == "host"]
    base = draw(st.sampled_from(patterns + HOSTS)) if patterns else draw(st.sampled_from(HOSTS))
    base = base.lower().replace("*.", draw(st.sampled_from(["www.", "a-1.", "", "a.b.", "*."])))
    host = draw(
        st.sampled_from(
            [
                base,
                base.upper(),
                base + ".",
                base + ":8080",
                base + ".:1",
                base + ":",
                base + ":x",
                " " + base + "\t",
            ]
        )
    )
    n = draw(st.sampled_from([0, 1, 1, 1, 1, 2]))
    name = draw(st.sampled_from(["Host", "host", "HOST"]))
    return [f"{name}:{draw(st.sampled_from([' ', '', '  ']))}{host}" for _ in range(n)]


@st.composite
def other_headers(draw: st.DrawFn, policy: PolicySpec) -> list[str]:
    wanted = [(n, v) for r in policy.rules for k, n, v in r.conditions if k == "header"]
    out = []
    for _ in range(draw(st.integers(0, 3))):
        if wanted and draw(st.booleans()):
            name, value = draw(st.sampled_from(wanted))
            value = "x" if value is None else value
        else:
            name = draw(st.sampled_from(HEADER_NAMES))
            value = draw(st.sampled_from(HEADER_VALUES))
        name = draw(st.sampled_from([name, name.upper(), name.title()]))
        value = draw(st.sampled_from([value, f" {value} ", f"\t{value}", value.upper()]))
        out.append(f"{name}:{value}")
    if draw(st.integers(0, 2)) == 0:
        out += draw(st.lists(st.sampled_from(CLIENT_HEADERS), max_size=4))
    weird = [
        "X-Bad",  # no colon
        "X-Bad : 1",  # space before the colon
        " folded",  # obs-fold
        "X: a\x01b",  # control byte
        "X: \x7f",
        "X: caf\xe9",  # obs-text (sent as UTF-8 by data(), still >= 0x80)
        ": empty-name",
        "Transfer-Encoding: chunked",
        "Upgrade: h2c",
        "Content-Length: abc",
        "Content-Length: 1 2",
        "Content-Length: 99999999999",
        "Content-Length: 4294901761",
        "X-Long: " + "y" * 300,
        # Long values with one byte outside visible ASCII after 7 to 40 others: the kernel
        # skips such values eight bytes at a time and must stop at the word holding it.
        *(f"X-Skip: {'v' * k}{odd}tail" for k, odd in _SKIP_CASES),
    ]
    if draw(st.integers(0, 5)) == 0:
        out.insert(draw(st.integers(0, len(out))), draw(st.sampled_from(weird)))
    return out


@st.composite
def requests(draw: st.DrawFn, policy: PolicySpec) -> RequestSpec:
    if draw(st.integers(0, 24)) == 0:
        raw = draw(
            st.sampled_from(
                [
                    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",  # TLS ClientHello
                    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                    b"GET / HTTP/1.1\n\n",
                    b"\r\n",
                    b" GET / HTTP/1.1\r\n\r\n",
                ]
            )
        )
        return RequestSpec("", "", "", (), b"", raw)
    rule = draw(st.sampled_from(policy.rules)) if policy.rules else None
    methods = list(rule.methods) if rule and rule.methods else []
    method = draw(st.sampled_from(methods + METHODS + ["get", "G@T", "GET\t"]))
    if rule and rule.path in REGEXES and draw(st.integers(0, 4)):
        path = draw(st.sampled_from(REGEXES[rule.path]))
    elif rule and rule.path not in REGEXES and draw(st.integers(0, 4)):
        path = draw(path_for(rule.path))
    else:
        path = draw(path_for("/**"))
    if draw(st.integers(0, 2)) == 0:
        path = draw(respell(path))
    if draw(st.integers(0, 30)) == 0:  # near the normalizer's limits (depth 64, 2048 bytes)
        path = draw(
            st.sampled_from(
                ["/" + "/".join(["s"] * n) + end for n in (64, 65, 66) for end in ("", "/")]
                + ["/" + "a" * n for n in (2046, 2047, 2048)]
                + ["/" + "a" * 2040 + "/../b", "/" + "a/" * 70 + "../" * 10]
            )
        )
    version = draw(
        st.sampled_from(
            ["HTTP/1.1"] * 6 + ["HTTP/1.0", "HTTP/2.0", "http/1.1", "HTTP/1.1 ", "HTTP/1.2"]
        )
    )
    headers = draw(host_headers(policy)) + draw(other_headers(policy))
    draw(st.randoms()).shuffle(headers)
    body = b""
    framing = draw(st.integers(0, 7))
    if framing == 0:
        body = draw(chunked_bodies())
        te = draw(st.sampled_from(["chunked", " Chunked ", "CHUNKED", "gzip, chunked", "chunked"]))
        headers.append(f"Transfer-Encoding:{te}")
        if draw(st.integers(0, 5)) == 0:
            headers.append(
                draw(st.sampled_from(["Content-Length: 5", "transfer-encoding: chunked"]))
            )
    elif framing <= 2:
        body = draw(st.binary(max_size=40))
        spelled = draw(st.sampled_from([str(len(body)), f" {len(body)} ", f"0{len(body)}"]))
        headers.append(f"Content-Length:{spelled}")
        if draw(st.integers(0, 3)) == 0:
            headers.append(f"content-length: {len(body)}0")  # a duplicate
    lead = b""
    if draw(st.integers(0, 9)) == 0:
        lead = draw(st.sampled_from([b"\r\n", b"\r\n\r\n", b"\n", b"\r", b"\r\n\r"]))
    return RequestSpec(method, path, version, tuple(headers), body, lead=lead)


@dataclass(frozen=True)
class ConnectionSpec:
    requests: tuple[RequestSpec, ...]
    cuts: tuple[int, ...]  # where the stream is cut into sends

    def sends(self) -> list[bytes]:
        data = b"".join(r.data() for r in self.requests)
        points = [0, *sorted(c for c in self.cuts if 0 < c < len(data)), len(data)]
        return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


@st.composite
def connections(draw: st.DrawFn, policy: PolicySpec, max_requests: int = 3) -> ConnectionSpec:
    reqs = tuple(draw(st.lists(requests(policy), min_size=1, max_size=max_requests)))
    total = sum(len(r.data()) for r in reqs)
    how = draw(st.integers(0, 3))
    if how == 0:
        cuts: list[int] = []  # everything in one send
    elif how == 1:  # at request boundaries
        cuts, at = [], 0
        for r in reqs:
            at += len(r.data())
            cuts.append(at)
    else:
        cuts = draw(st.lists(st.integers(1, max(1, total - 1)), max_size=6, unique=True))
    return ConnectionSpec(reqs, tuple(sorted(set(cuts))))


@st.composite
def chunked_bodies(draw: st.DrawFn) -> bytes:
    """A chunked body: chunks, the last chunk, trailers; sometimes with broken framing."""
    out = b""
    for _ in range(draw(st.integers(0, 3))):
        data = draw(st.binary(min_size=1, max_size=20))
        size = draw(
            st.sampled_from(
                ["{:x}", "{:X}", "0{:x}", "{:x};ext=1", "{:x} ", "{:x};", '{:x};a="b;c\\""']
                + ['{:x};a="b', "{:x};a=b c", "{:x};a;b=c", "{:x};=", '{:x};a=""']
            )
        )
        end = draw(st.sampled_from([b"\r\n"] * 6 + [b"\n", b"", b"xx"]))
        out += size.format(len(data)).encode() + b"\r\n" + data + end
    last = draw(st.sampled_from([b"0\r\n", b"000\r\n", b"0;x\r\n", b"0\n", b"g\r\n"]))
    trailers = draw(
        st.lists(
            st.sampled_from(
                [
                    *(b"X-T: 1\r\n", b"X-Empty:\r\n", b"x:\ty\r\n", b" x: y\r\n", b"X y: z\r\n"),
                    b"GET /admin HTTP/1.1\r\n",  # colon-less: refused (bad-chunk)
                ]
            ),
            max_size=2,
        )
    )
    if draw(st.integers(0, 9)) == 0:
        return out + b"fffffffff1\r\n"  # larger than any chunk may be
    return out + last + b"".join(trailers) + b"\r\n"
