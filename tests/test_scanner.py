"""The scanner automaton and rule table, through the Python mirror of the kernel program.

The kernel tests check that the kernel agrees with `simulate`; these check that `simulate` (that
is, the tables) says what docs/language.md promises.
"""

from __future__ import annotations

import functools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockpol.codegen.lower import lower
from sockpol.codegen.simulate import run
from sockpol.compiler import front_end
from sockpol.contract import Reason
from sockpol.dsl.pathmatch import to_regex

POLICY = """
policy shop {
    port 8080
    default deny
    allow GET /healthz
    allow GET,HEAD /api/v1/orders/*
    allow POST /api/v1/orders if header content-type = "application/json"
    allow * /static/** if host "shop.example.com"
    deny * /admin/**
    allow GET /files/*.json
    allow GET /public/** if header x-api-key
    allow GET /wild if host "*.example.org"
}
"""


@pytest.fixture(scope="module")
def shop():
    policy_file, _ = front_end(POLICY, "shop.pol")
    return lower(policy_file.policies[0])


def request(line: str, *headers: str, body: bytes = b"") -> bytes:
    return ("\r\n".join([line, *headers]) + "\r\n\r\n").encode("latin-1") + body


@pytest.mark.parametrize(
    "data, allow, rule",
    [
        (request("GET /healthz HTTP/1.1", "Host: a"), True, 0),
        (request("GET /healthz?probe=1 HTTP/1.1", "Host: a"), True, 0),
        (request("GET /healthz HTTP/1.0"), True, 0),
        (request("HEAD /healthz HTTP/1.1"), False, None),
        (request("GET /healthzz HTTP/1.1"), False, None),
        (request("get /healthz HTTP/1.1"), False, None),  # methods are case-sensitive
        (request("HEAD /api/v1/orders/17 HTTP/1.1"), True, 1),
        (request("GET /api/v1/orders/ HTTP/1.1"), False, None),  # `*` segment is non-empty
        (request("GET /api/v1/orders/1/items HTTP/1.1"), False, None),
        (request("POST /api/v1/orders HTTP/1.1", "Content-Type: application/json"), True, 2),
        (request("POST /api/v1/orders HTTP/1.1", "content-type:application/json  "), True, 2),
        (request("POST /api/v1/orders HTTP/1.1", "Content-Type: application/JSON"), False, None),
        (request("POST /api/v1/orders HTTP/1.1", "X: 1", "content-type: text/plain"), False, None),
        (request("GET /static HTTP/1.1", "Host: shop.example.com"), True, 3),
        (request("GET /static/ HTTP/1.1", "Host: shop.example.com"), True, 3),
        (request("GET /static/a/b.css HTTP/1.1", "HOST: Shop.Example.COM:8080"), True, 3),
        (request("GET /staticx HTTP/1.1", "Host: shop.example.com"), False, None),
        (request("GET /static/a HTTP/1.1", "Host: shop.example.com.evil"), False, None),
        (request("GET /admin HTTP/1.1"), False, 4),
        (request("DELETE /admin/users/1 HTTP/1.1"), False, 4),
        (request("GET /files/a.json HTTP/1.1"), True, 5),
        (request("GET /files/a/b.json HTTP/1.1"), False, None),
        (request("GET /public/x HTTP/1.1", "X-API-Key: "), True, 6),
        (request("GET /public/x HTTP/1.1", "X-API-Keys: 1"), False, None),
        (request("GET /wild HTTP/1.1", "Host: api.example.org"), True, 7),
        (request("GET /wild HTTP/1.1", "Host: a.b.example.org"), False, None),
        (request("GET /wild HTTP/1.1", "Host: example.org"), False, None),
    ],
)
def test_rule_decisions(shop, data, allow, rule):
    result = run(shop, data)
    assert (result.allow, result.rule) == (allow, rule)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"GET /a%2fb HTTP/1.1\r\n\r\n", Reason.AMBIGUOUS_PATH),
        (b"GET /a%5Cb HTTP/1.1\r\n\r\n", Reason.AMBIGUOUS_PATH),
        (b"GET /a%zz HTTP/1.1\r\n\r\n", Reason.AMBIGUOUS_PATH),
        (b"GET /a\\b HTTP/1.1\r\n\r\n", Reason.BAD_TARGET),
        (b"GET /a#frag HTTP/1.1\r\n\r\n", Reason.BAD_TARGET),
        (b"GET http://h/admin HTTP/1.1\r\n\r\n", Reason.BAD_TARGET),
        (b"GET * HTTP/1.1\r\n\r\n", Reason.BAD_TARGET),
        (b"GET  /healthz HTTP/1.1\r\n\r\n", Reason.BAD_TARGET),
        (b" GET /healthz HTTP/1.1\r\n\r\n", Reason.BAD_METHOD),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", Reason.TLS_NOT_DECLARED),
        (b"\x01\x00binary", Reason.BAD_METHOD),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Reason.BAD_TARGET),
        (b"GET /healthz HTTP/2.0\r\n\r\n", Reason.BAD_VERSION),
        (b"GET /healthz HTTP/1.1\n\n", Reason.BAD_VERSION),
        (b"GET /healthz HTTP/1.1\r\nX: a\r\n b\r\n\r\n", Reason.BAD_HEADER),
        (b"GET /healthz HTTP/1.1\r\nX : a\r\n\r\n", Reason.BAD_HEADER),
        (b"GET /healthz HTTP/1.1\r\nX: a\x00b\r\n\r\n", Reason.BAD_HEADER),
        (b"GET /healthz HTTP/1.1\r\nX: a\rb\r\n\r\n", Reason.BAD_HEADER),
        (b"GET /healthz HTTP/1.1\r\nX: a\nY: b\r\n\r\n", Reason.BAD_HEADER),
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", Reason.DUPLICATE_HEADER),
        (
            b"GET /h HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            Reason.DUPLICATE_HEADER,
        ),
        (b"GET /h HTTP/1.1\r\nContent-Length: -1\r\n\r\n", Reason.BAD_CONTENT_LENGTH),
        (b"GET /h HTTP/1.1\r\nContent-Length: 1 2\r\n\r\n", Reason.BAD_CONTENT_LENGTH),
        (b"GET /h HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n", Reason.BAD_CONTENT_LENGTH),
        (b"GET /h HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", Reason.TRANSFER_ENCODING),
        (
            b"GET /h HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            Reason.TRANSFER_ENCODING,
        ),
        (
            b"GET /h HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            Reason.TRANSFER_ENCODING,
        ),
        (
            b"GET /h HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            Reason.DUPLICATE_HEADER,
        ),
        (b"GET /h HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n", Reason.UPGRADE),
        (b"GET /h HTTP/1.1\r\nupgrade: websocket\r\n\r\n", Reason.UPGRADE),
    ],
)
def test_refusals(shop, data, reason):
    result = run(shop, data)
    assert not result.allow
    assert result.reason == reason


@pytest.mark.parametrize(
    "path",
    [
        "/a/../admin", "/./admin/x", "//admin", "/%61dmin", "/%41dmin", "/admin/..",
        "/api/v1/%6Frders/17", "/api//v1/orders/./17", "/api/v1/orders/17/..", "/x/../healthz",
        "/../../healthz", "/healthz/.", "/files/%2e%2e/admin", "/files/%2e.json",
        "/admin;x=1/users", "/admin%3bx/users", "/admin%3Bx", "/public/..;/admin",
        "/files/a%3a.json", "/files/a%3A.json", "/files/%c3%a9.json", "/healthz;",
    ],
)  # fmt: skip
def test_paths_in_any_but_their_canonical_spelling_are_refused(shop, path):
    # docs/language.md: servers disagree on every other spelling (tests/servers), so the
    # program never normalizes one into a path a rule matches; it refuses it.
    result = run(shop, request(f"GET {path} HTTP/1.1", "Host: shop.example.com"))
    assert (result.allow, result.reason) == (False, Reason.AMBIGUOUS_PATH)


@pytest.mark.parametrize(
    "path, allow, rule",
    [
        ("/healthz", True, 0),
        ("/files/..json", True, 5),  # "..json" is a name, not a dot segment
        ("/files/...", False, None),
        ("/files/%C3%A9.json", True, 5),  # an escape of a byte with no raw spelling
        ("/files/%25.json", True, 5),
        ("/admin/.x", False, 4),
    ],
)
def test_canonical_paths_are_matched_as_they_are(shop, path, allow, rule):
    result = run(shop, request(f"GET {path} HTTP/1.1", "Host: shop.example.com"))
    assert (result.allow, result.rule) == (allow, rule)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"GET /a%2fb HTTP/1.1\r\n\r\n", Reason.AMBIGUOUS_PATH),
        (b"GET /" + b"a" * 2100 + b" HTTP/1.1\r\n\r\n", Reason.PATH_TOO_LONG),
    ],
)
def test_more_refusals(shop, data, reason):
    assert run(shop, data).reason == reason


def test_verdict_covers_head_and_body(shop):
    head = request(
        "POST /api/v1/orders HTTP/1.1", "Content-Type: application/json", "Content-Length: 5"
    )
    result = run(shop, head + b"hello" + b"GET /admin HTTP/1.1\r\n\r\n")
    assert result.allow and result.apply_bytes == len(head) + 5


def test_incomplete_head_is_corked_until_max_head(shop):
    partial = b"GET /healthz HTTP/1.1\r\nHost: a\r\n"
    result = run(shop, partial)
    assert result.allow and result.cork_bytes == len(partial) + 1
    huge = b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 9000
    result = run(shop, huge)
    assert not result.allow and result.reason == Reason.HEAD_TOO_LARGE


def test_default_allow_and_deny_rule():
    policy_file, _ = front_end(
        "policy p {\n port 80\n default allow\n deny * /admin/**\n}\n", "p.pol"
    )
    ir = lower(policy_file.policies[0])
    assert run(ir, request("GET /anything HTTP/1.1")).allow
    denied = run(ir, request("GET /admin/x HTTP/1.1"))
    assert (denied.allow, denied.rule, denied.reason) == (False, 0, Reason.RULE)
    # A malformed request is refused even with default allow.
    assert not run(ir, b"GET /a/../admin HTTP/1.1\r\n\r\n").allow


GLOBS = ["/", "/a", "/a/", "/a/*", "/a/*/b", "/a/**", "/a/**/b", "/ad**", "/f/*.json", "/**"]


def canonical(path: str) -> bool:
    """The canonical spelling (docs/language.md), for paths of PATH_ALPHABET: no escape of a byte
    with a raw spelling, no empty segment, no dot segment."""
    segments = path[1:].split("/")
    return "%61" not in path and "//" not in path and not {".", ".."} & set(segments)


PATH_ALPHABET = st.sampled_from(["/", "a", "b", "f", ".json", "x", "ad", "min", ".", "..", "%61"])


@functools.cache
def single_rule(pattern: str):
    text = f"policy g {{\n port 80\n default deny\n allow GET {pattern}\n}}\n"
    return lower(front_end(text, "g.pol")[0].policies[0])


@settings(max_examples=300, deadline=None)
@given(pattern=st.sampled_from(GLOBS), parts=st.lists(PATH_ALPHABET, max_size=6))
def test_glob_automaton_agrees_with_reference_regex(pattern, parts):
    path = "/" + "".join(parts)
    verdict = run(single_rule(pattern), f"GET {path} HTTP/1.1\r\n\r\n".encode())
    if not canonical(path):  # refused
        assert verdict.reason == Reason.AMBIGUOUS_PATH, path
        return
    assert verdict.allow == bool(re.fullmatch(to_regex(pattern), path)), (pattern, path)


CHUNKED = (
    b"POST /api/v1/orders HTTP/1.1\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n18;name=value\r\n" + b"GET /admin HTTP/1.1\r\n\r\n.\r\n"
    b"0\r\nX-Trailer: 1\r\n\r\n"
)


@pytest.mark.parametrize("cut", [1, 7, 64, len(CHUNKED)])
def test_chunked_body_is_followed_to_the_next_request(shop, cut):
    from sockpol.codegen.simulate import TablesConnection

    conn = TablesConnection(shop)
    stream = CHUNKED + request("GET /healthz HTTP/1.1") + request("GET /admin HTTP/1.1")
    for i in range(0, len(stream), cut):
        conn.send(stream[i : i + cut])
    # The body (which contains a request-looking line) passes as data; the next request is
    # judged and allowed; the one after it is refused and never delivered.
    assert conn.refused
    assert bytes(conn.delivered) == CHUNKED + request("GET /healthz HTTP/1.1")


@pytest.mark.parametrize(
    "body",
    [b"g\r\n", b"5\r\nhelloXX", b"5 \r\nhello\r\n", b"0\r\nbad trailer\r\n\r\n", b"\r\n"],
)
def test_malformed_chunks_are_refused(shop, body):
    from sockpol.codegen.simulate import TablesConnection

    conn = TablesConnection(shop)
    head = CHUNKED[: CHUNKED.index(b"\r\n\r\n") + 4]
    conn.send(head + body + b"\r\n\r\n")
    assert conn.refused and bytes(conn.delivered).startswith(head)
