"""Requests for the server oracle, generated from the servers' routes and spelled as an attacker
(or a sloppy client) would: dot segments, percent-escapes of every byte in both cases, doubled
slashes, `;` parameters, backslashes, overlong UTF-8 forms, absolute-form; Host variants; and
streams of pipelined requests whose bodies are framed by every Content-Length and
Transfer-Encoding spelling, with a denied request hidden where a server might read one.

Deterministic: the same list every run (a failure prints the case's name and bytes to replay).
"""

from __future__ import annotations

from dataclasses import dataclass

BASES = [
    "/admin/x", "/admin/users", "/public/x", "/public/users", "/api/v1/users/7", "/api/v1/orders",
    "/static/a.css", "/healthz", "/api/v1/jobs:run", "/internal/x", "/admin", "/public",
]  # fmt: skip
UNRESERVED = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~"


@dataclass(frozen=True)
class Case:
    kind: str  # "path", "host" or "framing"
    name: str
    data: bytes

    def replay(self) -> str:
        return f"{self.kind} case {self.name!r}: {self.data!r}"


def request(
    path: str, method: str = "GET", host: str | None = "www.example.com", extra: str = ""
) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\n"
    if host is not None:
        head += f"Host: {host}\r\n"
    if method == "POST":
        head += "Content-Type: application/json\r\nContent-Length: 0\r\n"
    return (head + extra + "\r\n").encode("latin-1")


def _method_for(path: str) -> str:
    return "POST" if path in ("/api/v1/orders", "/api/v1/jobs:run") else "GET"


def _host_for(path: str) -> str:
    return "internal.example.com" if path.startswith("/internal") else "www.example.com"


def _escape(c: str, lower: bool = False) -> str:
    text = "".join(f"%{b:02X}" for b in c.encode("latin-1"))
    return text.lower() if lower else text


def path_spellings(base: str) -> list[tuple[str, str]]:
    """(name, path): respellings of `base`."""
    out: list[tuple[str, str]] = [("as is", base)]
    segs = base.split("/")[1:]
    # Each byte percent-encoded, hex upper and lower case.
    for i, c in enumerate(base):
        if c == "/" and i == 0:
            continue
        for lower in (False, True):
            if lower and not any(x in "abcdef" for x in _escape(c, True)):
                continue
            out.append((f"escape byte {i} ({c!r}){' lower' if lower else ''}",
                        base[:i] + _escape(c, lower) + base[i + 1 :]))  # fmt: skip
    # Doubled slashes at each slash, and trailing.
    for i, c in enumerate(base):
        if c == "/":
            out.append((f"doubled slash at {i}", base[:i] + "/" + base[i:]))
    out.append(("trailing slash", base + "/"))
    out.append(("trailing doubled slash", base + "//"))
    # Dot segments, raw and encoded.
    for dot in (".", "%2e", "%2E"):
        out.append((f"{dot} segment first", "/" + dot + base))
        out.append((f"{dot} segment last", base + "/" + dot))
        out.append((f"{dot}{dot} back from a sibling", f"/zz/{dot}{dot}" + base))
        out.append((f"{dot}{dot} trailing", base + f"/x/{dot}{dot}"))
    for other in ("/public/x", "/admin/x", "/api/v1/users/7"):
        if not base.startswith(other.rsplit("/", 1)[0] + "/"):
            out.append((f"escape from {other}", other + "/.." + "/.." * (other.count("/") - 1)
                        + base))  # fmt: skip
            out.append((f"..; from {other}", other.rsplit("/", 1)[0] + "/..;" + base))
    # Path parameters: on each segment, raw and encoded.
    for i in range(len(segs)):
        for semi in (";", "%3b", "%3B"):
            params = [*segs]
            params[i] = params[i] + semi + "x=1"
            out.append((f"{semi} param on segment {i}", "/" + "/".join(params)))
            params[i] = segs[i] + semi
            out.append((f"empty {semi} on segment {i}", "/" + "/".join(params)))
    # Backslashes, overlong and other encodings of '/' and '.'.
    out.append(("backslashes", base.replace("/", "\\")))
    out.append(("%5c separators", base.replace("/", "%5c")))
    out.append(("%2f separators", "/" + base[1:].replace("/", "%2f")))
    for enc in ("%c0%af", "%e0%80%af", "%c0%ae%c0%ae", "%25%32%65", "%252e%252e"):
        out.append((f"overlong/double {enc}", f"/zz/{enc}" + base))
    # Case, trailing bytes, queries, fragments, NUL.
    out.append(("upper case", base.upper()))
    out.append(("query", base + "?a=1"))
    out.append(("query with a path", base + "?/../../admin/x"))
    out.append(("fragment", base + "#f"))
    out.append(("NUL", base + "%00"))
    out.append(("trailing dot", base + "."))
    out.append(("trailing %20", base + "%20"))
    out.append(("trailing tab", base + "\t"))
    out.append(("absolute-form", "http://www.example.com" + base))
    out.append(("absolute-form internal", "http://internal.example.com" + base))
    return out


def path_cases() -> list[Case]:
    cases = []
    for base in BASES:
        for name, path in path_spellings(base):
            data = request(path, _method_for(base), _host_for(base))
            cases.append(Case("path", f"{base}: {name}", data))
    return cases


HOSTS = [
    "internal.example.com", "INTERNAL.Example.COM", "internal.example.com.",
    "internal.example.com:80", "internal.example.com:8080", "internal.example.com:",
    "internal.example.com.:80", "internal.example.com:80:90", "internal.example.com:x",
    " internal.example.com", "internal.example.com ", "\tinternal.example.com",
    "internal.example.com,www.example.com", "www.example.com,internal.example.com",
    "user@internal.example.com", "internal.example.com@www.example.com",
    "internal.example.com..", "internal..example.com", ".internal.example.com",
    "internal.example.com/x", "internal.example.com\\x", "internal.example.com?x",
    "internal.example.com#x", "internal%2eexample.com", "internal.example.com%00",
    "internal.example.com\x80", "[::1]", "127.0.0.1", "www.example.com", "", "*",
    "internal.example.com internal.example.com",
]  # fmt: skip


def host_cases() -> list[Case]:
    cases = []
    for path in ("/internal/x", "/admin/x", "/public/x"):
        for host in HOSTS:
            cases.append(Case("host", f"{path} Host {host!r}", request(path, host=host)))
        for a, b in (("internal.example.com", "www.example.com"),
                     ("www.example.com", "internal.example.com")):  # fmt: skip
            data = f"GET {path} HTTP/1.1\r\nHost: {a}\r\nHost: {b}\r\n\r\n".encode()
            cases.append(Case("host", f"{path} two Hosts {a}, {b}", data))
        cases.append(Case("host", f"{path} no Host", request(path, host=None)))
        cases.append(Case("host", f"{path} HTTP/1.0 no Host",
                          f"GET {path} HTTP/1.0\r\n\r\n".encode()))  # fmt: skip
        for form in ("http://internal.example.com", "http://INTERNAL.example.com:80",
                     "http://www.example.com"):  # fmt: skip
            for host in ("www.example.com", "internal.example.com"):
                data = request(form + path, host=host)
                cases.append(Case("host", f"absolute-form {form}{path} Host {host}", data))
        for name, line in (("host with space before colon", "Host : internal.example.com"),
                           ("obs-fold host", "Host:\r\n internal.example.com"),
                           ("HOST upper name", "HOST: internal.example.com")):  # fmt: skip
            data = f"GET {path} HTTP/1.1\r\n{line}\r\n\r\n".encode()
            cases.append(Case("host", f"{path} {name}", data))
    return cases


SMUGGLED = b"GET /admin/x HTTP/1.1\r\nHost: www.example.com\r\n\r\n"
PROBE = b"GET /public/x HTTP/1.1\r\nHost: www.example.com\r\n\r\n"
HEAD1 = (
    b"POST /api/v1/orders HTTP/1.1\r\nHost: www.example.com\r\nContent-Type: application/json\r\n"
)


def _chunked(size_line: bytes, data: bytes, after: bytes = b"\r\n0\r\n\r\n") -> bytes:
    return size_line + b"\r\n" + data + after


def framing_cases() -> list[Case]:
    cases: list[Case] = []

    def add(name: str, data: bytes) -> None:
        cases.append(Case("framing", name, data))

    body = b'{"a":1}'
    n = str(len(body)).encode()
    # Content-Length spellings, a hidden request after the body.
    for label, cl in (
        ("plain", b"Content-Length: " + n), ("leading zeros", b"Content-Length: 0" + n),
        ("plus", b"Content-Length: +" + n), ("space inside", b"Content-Length: " + n + b" 0"),
        ("trailing space", b"Content-Length: " + n + b" "), ("tab", b"Content-Length:\t" + n),
        ("comma list", b"Content-Length: " + n + b", " + n), ("hex", b"Content-Length: 0x7"),
        ("negative", b"Content-Length: -7"), ("empty", b"Content-Length: "),
        ("upper name", b"CONTENT-LENGTH: " + n), ("space before colon", b"Content-Length : " + n),
        ("two equal", b"Content-Length: " + n + b"\r\nContent-Length: " + n),
        ("two different", b"Content-Length: " + n + b"\r\nContent-Length: 0"),
        ("huge", b"Content-Length: 99999999999999999999"), ("zero", b"Content-Length: 0"),
        ("obs-fold", b"Content-Length:\r\n " + n),
    ):  # fmt: skip
        add(f"Content-Length {label}", HEAD1 + cl + b"\r\n\r\n" + body + SMUGGLED + PROBE)
        add(f"Content-Length {label}, request in the body",
            HEAD1 + cl + b"\r\n\r\n" + SMUGGLED[:7] + PROBE)  # fmt: skip
    # Transfer-Encoding spellings.
    chunk = _chunked(b"7", body)
    for label, te in (
        ("plain", b"Transfer-Encoding: chunked"), ("upper", b"Transfer-Encoding: CHUNKED"),
        ("mixed case", b"Transfer-Encoding: Chunked"), ("tab", b"Transfer-Encoding:\tchunked"),
        ("trailing space", b"Transfer-Encoding: chunked "),
        ("list", b"Transfer-Encoding: gzip, chunked"),
        ("twice", b"Transfer-Encoding: chunked, chunked"),
        ("identity", b"Transfer-Encoding: identity"), ("xchunked", b"Transfer-Encoding: xchunked"),
        ("two lines", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked"),
        ("space before colon", b"Transfer-Encoding : chunked"),
        ("with Content-Length", b"Transfer-Encoding: chunked\r\nContent-Length: 3"),
        ("Content-Length first", b"Content-Length: 3\r\nTransfer-Encoding: chunked"),
        ("obs-fold", b"Transfer-Encoding:\r\n chunked"),
        ("vertical tab", b"Transfer-Encoding:\x0bchunked"),
    ):  # fmt: skip
        add(f"Transfer-Encoding {label}", HEAD1 + te + b"\r\n\r\n" + chunk + SMUGGLED + PROBE)
    te = HEAD1 + b"Transfer-Encoding: chunked\r\n\r\n"
    # Chunk-size lines and extensions.
    for label, size_line in (
        ("upper hex", b"7"), ("leading zeros", b"0007"), ("0x", b"0x7"), ("space after", b"7 "),
        ("space before", b" 7"), ("tab after", b"7\t"), ("extension", b"7;a=b"),
        ("extension quoted", b'7;a="b c"'), ("extension quoted escape", b'7;a="b\\"c"'),
        ("extension no name", b"7;"), ("extension no value", b"7;a="),
        ("extension name only", b"7;a"), ("two extensions", b"7;a=b;c"),
        ("extension space before ;", b"7 ;a=b"), ("extension space after ;", b"7; a=b"),
        ("extension unbalanced quote", b'7;a="b'), ("extension bad token", b"7;a=b c"),
        ("extension quote in token", b'7;a=b"'), ("extension = only", b"7;=b"),
        ("extension LF inside", b"7;a\nb"), ("negative", b"-7"), ("plus", b"+7"),
        ("overflow", b"1" + b"0" * 16 + b"7"), ("bare LF", b"7\n"),
    ):  # fmt: skip
        add(f"chunk size {label}", te + _chunked(size_line, body) + SMUGGLED + PROBE)
    for label, rest in (
        ("no CRLF after data", body + b"0\r\n\r\n"), ("LF after data", body + b"\n0\r\n\r\n"),
        ("trailer", body + b"\r\n0\r\nX-T: 1\r\n\r\n"),
        ("trailer without colon", body + b"\r\n0\r\nX-T\r\n\r\n"),
        ("last chunk with extension", body + b"\r\n0;a=b\r\n\r\n"),
        ("last chunk 000", body + b"\r\n000\r\n\r\n"),
        ("last chunk bare LF end", body + b"\r\n0\r\n\n"),
        ("data longer than size", body + b"xx\r\n0\r\n\r\n"),
    ):  # fmt: skip
        add(f"chunk framing {label}", te + b"7\r\n" + rest + SMUGGLED + PROBE)
    # A GET with a body (some servers ignore Content-Length on GET), bodies that hold requests.
    add("GET with a body", b"GET /public/x HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: "
        + str(len(SMUGGLED)).encode() + b"\r\n\r\n" + SMUGGLED + PROBE)  # fmt: skip
    add("GET with a chunked body", b"GET /public/x HTTP/1.1\r\nHost: www.example.com\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(f"{len(SMUGGLED):x}".encode(), SMUGGLED)
        + PROBE)  # fmt: skip
    # Blank lines before a request line (RFC 9112 2.2: a server should ignore at least one).
    for label, lead in (("CRLF", b"\r\n"), ("two CRLF", b"\r\n\r\n"), ("LF", b"\n"),
                        ("CR", b"\r"), ("space", b" "), ("tab", b"\t")):  # fmt: skip
        add(f"{label} before the first request", lead + PROBE + PROBE)
        add(f"{label} between requests", PROBE + lead + PROBE)
        add(f"{label} after a body", HEAD1 + b"Content-Length: 7\r\n\r\n" + body + lead + PROBE)
    # Line ends and versions.
    add("bare LF line ends", PROBE.replace(b"\r\n", b"\n") + PROBE)
    add("HTTP/1.0 keep-alive", b"GET /public/x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" + PROBE)
    add("pipelined", PROBE + PROBE + PROBE)
    return cases
