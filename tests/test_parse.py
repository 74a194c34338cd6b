"""The parser: the tree it builds, the syntax errors it names, and that nothing else escapes."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sockpol.diagnostics import CompileError, Severity, SockpolError, Source, Span
from sockpol.dsl import load_file, load_source
from sockpol.dsl.ast import Action, HeaderCondition, HostCondition, PolicyFile
from sockpol.dsl.parse import MAX_ERRORS, parse, parse_partial

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.pol"))

ORDERS = """\
# orders-api.pol
policy orders-api {
    port 8080, 8443, 9000-9010      # governed ports
    default deny
    max-head 8KiB

    allow GET /healthz
    allow GET /api/v1/orders/*
    allow GET,HEAD /static/** if host "Shop.Example.com"
    allow POST /api/v1/orders if header Content-Type = "application/json"
    allow * /public/** if header x-api-key and host "*.example.com"
    deny  * /admin/**
}
policy metrics {
    port 9100
    default allow
}
"""


def parsed(text: str) -> PolicyFile:
    return parse(Source("t.pol", text))


def errors(text: str) -> list[tuple[str, int, int]]:
    """(code, line, column) of every error `parse` reports for `text`."""
    with pytest.raises(CompileError) as info:
        parse(Source("t.pol", text))
    return [
        (d.code, d.span.line if d.span else 0, d.span.column if d.span else 0)
        for d in info.value.diagnostics
        if d.severity is Severity.ERROR
    ]


def only_error(text: str):
    with pytest.raises(CompileError) as info:
        parse(Source("t.pol", text))
    found = [d for d in info.value.diagnostics if d.severity is Severity.ERROR]
    assert len(found) == 1, found
    return found[0]


def policy(*lines: str) -> str:
    return (
        "policy p {\n    port 80\n    default deny\n" + "".join(f"    {x}\n" for x in lines) + "}\n"
    )


# -- the tree ------------------------------------------------------------------------------------


def test_tree_of_a_file():
    file = parsed(ORDERS)
    orders, metrics = file.policies
    assert orders.name == "orders-api"
    assert orders.name_span == Span(2, 8, 2, 18)
    assert orders.span.line == 2 and orders.span.end_line == 13
    assert [(r.low, r.high) for r in orders.ports] == [(8080, 8080), (8443, 8443), (9000, 9010)]
    assert orders.ports[2].span == Span(3, 22, 3, 31)
    assert orders.default is Action.DENY and orders.default_span.line == 4
    assert orders.max_head == 8192
    assert [r.describe() for r in orders.rules] == [
        "allow GET /healthz",
        "allow GET /api/v1/orders/*",
        'allow GET,HEAD /static/** if host "shop.example.com"',
        'allow POST /api/v1/orders if header content-type = "application/json"',
        'allow * /public/** if header x-api-key and host "*.example.com"',
        "deny * /admin/**",
    ]
    assert [r.index for r in orders.rules] == list(range(6))
    assert orders.rules[1].span == Span(8, 5, 8, 31)
    assert orders.rules[1].path.span == Span(8, 15, 8, 31)
    assert orders.rules[2].methods.span == Span(9, 11, 9, 19)
    assert orders.rules[4].methods.methods is None
    assert metrics.default is Action.ALLOW and metrics.max_head == 8192 and metrics.rules == ()
    assert file.policy("metrics") is metrics


def test_conditions_are_normalized():
    rule = parsed(ORDERS).policies[0].rules[3]
    (header,) = rule.conditions
    assert isinstance(header, HeaderCondition)
    assert (header.name, header.value) == ("content-type", "application/json")
    host = parsed(ORDERS).policies[0].rules[2].conditions[0]
    assert isinstance(host, HostCondition) and host.pattern == "shop.example.com"
    assert host.span == Span(9, 34, 9, 57)


def test_strings_and_quoted_paths():
    rule = parsed(policy(r'allow GET "/a\"b\\c" if header x = "say \"hi\""')).policies[0].rules[0]
    assert rule.path.text == '/a"b\\c'
    assert rule.conditions[0].value == 'say "hi"'


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("4096B", 4096), ("8KiB", 8192), ("256", 256), ("64KiB", 65536)],
)
def test_max_head_forms(text, size):
    assert parsed(policy(f"max-head {text}")).policies[0].max_head == size


def test_comments_and_blank_lines():
    text = "# head\n\npolicy p {   # open\n  port 80 # a comment\n\n  default deny\n}\n"
    assert parsed(text).policies[0].ports[0].low == 80


def test_hash_inside_a_path_is_not_a_comment():
    # `/a#b` must reach the checker as written, not be silently cut to `/a`.
    assert parsed(policy("allow GET /a#b")).policies[0].rules[0].path.text == "/a#b"


def test_keywords_are_whole_words():
    assert errors("policyfoo {\n}\n")[0][0] == "E004"


def test_names_may_be_keywords():
    rule = parsed(policy("allow GET /x if header host")).policies[0].rules[0]
    assert rule.conditions[0].name == "host"  # the checker refuses it, with a hint
    assert parsed("policy deny {\n port 1\n default deny\n}\n").policies[0].name == "deny"


def test_crlf_line_endings():
    file = parsed(ORDERS.replace("\n", "\r\n"))
    assert len(file.policies[0].rules) == 6
    assert file.policies[0].rules[0].span == Span(7, 5, 7, 23)


def test_tabs_between_tokens():
    assert parsed("policy\tp\t{\n\tport\t80\n\tdefault\tdeny\n}\n").policies[0].ports[0].low == 80


def test_statement_order_within_a_policy_is_free():
    file = parsed("policy p {\n allow GET /\n default allow\n port 80\n}\n")
    assert file.policies[0].default is Action.ALLOW


# -- syntax errors: named, positioned, all of them ------------------------------------------------


@pytest.mark.parametrize(
    ("line", "column", "message", "hint"),
    [
        ("alow GET /", 5, "unknown statement 'alow'", "did you mean 'allow'?"),
        ("Allow GET /", 5, "unknown statement 'Allow'", "keywords are lower-case: write 'allow'"),
        ("allow", 10, "expected methods after the action", ""),
        ("allow GET", 14, "expected a path starting with '/'", ""),
        ("allow GET HEAD /", 15, "expected a path starting with '/'", "separate methods with ','"),
        ("allow GET, /x", 16, "expected a method after ','", ""),
        ("allow GET /x y", 18, "expected 'if', 'log', 'answer' or the end of the line", ""),
        ("allow GET /x if", 20, "expected a condition", ""),
        ("allow GET /x if host a.com", 26, "expected a quoted host pattern", 'quote it: "a.com"'),
        ('allow GET /x if host = "a"', 26, "expected a quoted host pattern", "without '='"),
        ('allow GET /x if header "a"', 28, "expected a header name", "names are not quoted"),
        ("allow GET /x if header a = b", 32, "expected a quoted value after '='", "quote it"),
        ('allow GET /x if host "a" host "b"', 30, "expected 'and'", "join conditions with 'and'"),
        ("port 80 81", 13, "expected ',' between ports", "separate ports with ','"),
        ("port", 9, "expected a port number or range", ""),
        ("default", 12, "expected 'allow' or 'deny' after 'default'", ""),
        ("max-head 8 KiB", 16, "expected the end of the line", "without a space: 8KiB"),
    ],
)
def test_named_syntax_errors(line, column, message, hint):
    d = only_error(policy(line))
    assert d.span.line == 4 and d.span.column == column, d
    assert message in d.message
    assert hint in d.hint
    assert d.code in ("E003", "E004")


def test_unterminated_string():
    d = only_error(policy('allow GET /x if host "abc'))
    assert (d.code, d.message, d.span.column) == ("E002", "unterminated string", 26)


def test_unknown_escape():
    d = only_error(policy(r'allow GET /x if host "a\nb"'))
    assert (d.code, d.span.column, d.span.end_column) == ("E005", 28, 30)


def test_unexpected_character():
    d = only_error(policy("allow GET /x \x00"))
    assert d.code == "E001" and "U+0000" in d.message and d.span.column == 18


@pytest.mark.parametrize(
    ("line", "code", "column"),
    [
        ("port x", "E111", 10),
        ("port 80-x", "E111", 10),
        ("port 99999999999", "E112", 10),
        ("max-head 8K", "E130", 14),
        ("max-head 8kb", "E130", 14),
        ("max-head lots", "E130", 14),
        ("max-head 100", "E131", 14),
        ("max-head 65537", "E131", 14),
        ("max-head 1000000000000KiB", "E131", 14),
        ("default allow", "E121", 5),
        ("max-head 4KiB\n    max-head 8KiB", "E132", 5),
    ],
)
def test_value_errors(line, code, column):
    found = errors(policy(line))
    assert found[-1] == (code, 4 if code != "E132" else 5, column)


def test_max_head_k_hint():
    d = only_error(policy("max-head 8K"))
    assert "8KiB" in d.hint and "ambiguous" in d.hint


def test_several_syntax_errors_are_all_reported():
    text = policy(
        "alow GET /", "allow GET", "allow GET /x if host a", "port 80 81", "allow GET /ok"
    )
    assert [(code, line) for code, line, _ in errors(text)] == [
        ("E004", 4),
        ("E003", 5),
        ("E003", 6),
        ("E003", 7),
    ]


def test_rendering_with_caret():
    with pytest.raises(CompileError) as info:
        load_source(policy("allow GET HEAD /x", "alow GET /"), "orders.pol")
    text = str(info.value)
    assert text.splitlines() == [
        "orders.pol:4:15: error: expected a path starting with '/'; found 'HEAD' [E003]",
        "        allow GET HEAD /x",
        "                  ^~~~",
        "  hint: separate methods with ',' (GET,HEAD)",
        "orders.pol:5:5: error: unknown statement 'alow' [E004]",
        "        alow GET /",
        "        ^~~~",
        "  hint: did you mean 'allow'?",
    ]


# -- block structure --------------------------------------------------------------------------


def test_missing_default_and_port_point_at_the_name():
    assert errors("policy p {\n}\n") == [("E120", 1, 8), ("E110", 1, 8)]


def test_broken_line_suppresses_missing_statement_errors():
    # the broken line may have been the `default`: don't guess
    assert errors("policy p {\n port 80\n default dney\n}\n") == [("E003", 3, 10)]


def test_unclosed_policy_at_end_of_file():
    assert errors("policy p {\n port 80\n default deny\n") == [("E007", 1, 8)]


def test_unclosed_policy_before_the_next():
    text = "policy a {\n port 80\n default deny\npolicy b {\n port 81\n default deny\n}\n"
    assert errors(text) == [("E007", 4, 1)]


def test_stray_close_and_statement_outside():
    text = "policy a {\n port 80\n default deny\n}\n}\n allow GET /\n allow GET /x\n"
    assert errors(text) == [("E006", 5, 1), ("E008", 6, 2)]  # one E008 per run of lines


def test_broken_policy_line_still_opens_a_block():
    # Without recovery, every statement below would be "outside a policy".
    text = "policy 1 2 {\n port 80\n default deny\n allow GET /\n}\n"
    assert errors(text) == [("E003", 1, 10)]


def test_close_with_trailing_junk_still_closes():
    d = only_error("policy p {\n port 80\n default deny\n} x\n")
    assert (d.span.line, d.span.column) == (4, 3)
    assert "'}' must be on a line of its own" in d.message


def test_one_line_policy():
    d = only_error("policy p { port 80 }\n")
    assert "on a line of its own" in d.message


def test_empty_file():
    d = only_error("")
    assert d.code == "E012" and d.span is None
    assert only_error("# nothing but a comment\n\n").code == "E012"


def test_too_many_errors_stop_with_a_note():
    with pytest.raises(CompileError) as info:
        parse(Source("t.pol", "junk\n" * 500))
    found = info.value.diagnostics
    assert sum(d.severity is Severity.ERROR for d in found) == MAX_ERRORS
    assert any(d.severity is Severity.NOTE and d.code == "N001" for d in found)


# -- files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load(path):
    file, warnings = load_file(path)
    assert file.policies and warnings == []


def test_examples_cover_the_brief():
    names = {p.name for p in EXAMPLES}
    assert {"orders-api.pol", "metrics-readonly.pol", "admin-denied.pol"} <= names
    assert any(len(load_file(p)[0].policies) > 1 for p in EXAMPLES)


def test_missing_file(tmp_path):
    with pytest.raises(SockpolError) as info:
        load_file(tmp_path / "nope.pol")
    assert "nope.pol" in str(info.value) and "cannot read" in str(info.value)


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(SockpolError):
        load_file(tmp_path)


def test_non_utf8_file_is_positioned(tmp_path):
    path = tmp_path / "bad.pol"
    path.write_bytes(b"policy p {\n  port 80\n  allow GET /caf\xe9\n}\n")
    with pytest.raises(CompileError) as info:
        load_file(path)
    (d,) = info.value.diagnostics
    assert d.code == "E011" and (d.span.line, d.span.column) == (3, 17)
    assert str(path) in str(info.value) and "0xE9" in d.message


def test_byte_order_mark_is_dropped(tmp_path):
    path = tmp_path / "bom.pol"
    path.write_bytes(b"\xef\xbb\xbf" + ORDERS.encode())
    file, _ = load_file(path)
    assert file.policies[0].name_span == Span(2, 8, 2, 18)


# -- robustness: any input is a PolicyFile or a CompileError ---------------------------------------


def survives(text: str) -> None:
    try:
        file, warnings = load_source(text, "fuzz.pol")
    except CompileError as e:
        assert any(d.severity is Severity.ERROR for d in e.diagnostics)
        str(e)  # rendering must not fail either
        return
    assert isinstance(file, PolicyFile) and file.policies
    partial, _ = parse_partial(Source("fuzz.pol", text))
    assert partial.policies


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_random_text(text):
    survives(text)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_from_a_file(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "f.pol"
    path.write_bytes(data)
    try:
        load_file(path)
    except SockpolError as e:
        str(e)


TOKENS = [
    "policy", "p", "{", "}", "port", "80", ",", "9000-9010", "default", "allow", "deny",
    "max-head", "8KiB", "GET", "GET,HEAD", "*", "/", "/a/**", "/a/*/b", '"/q"', "if", "and",
    "host", '"*.example.com"', "header", "x-api-key", "=", '"v"', "#", "\n", "\n", "\n", "\t",
    '"', "\\", "\x00", "é", "\r", "\x0c", "\u2028",
]  # fmt: skip


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(TOKENS), max_size=60))
def test_random_token_soup(tokens):
    survives(" ".join(tokens))


LINE_TOKENS = [
    *"policy p { } port 80 , default allow deny max-head 8KiB".split(),
    *"GET * /a if and host header x =".split(),
    '"s"',
    "#c",
]


@settings(max_examples=500)
@given(st.lists(st.sampled_from(LINE_TOKENS), min_size=1, max_size=8))
def test_every_syntax_error_is_named(tokens):
    """No parser state falls through to lark's raw "expected one of ..." list."""
    text = policy(" ".join(tokens))
    try:
        load_source(text, "t.pol")
    except CompileError as e:
        for d in e.diagnostics:
            assert not d.message.startswith("expected one of"), (text, d.message)


@st.composite
def mutated_policies(draw):
    """Valid files with a few characters inserted, deleted or duplicated."""
    text = list(draw(st.sampled_from([ORDERS, *(p.read_text() for p in EXAMPLES)])))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "copy"]))
        if op == "insert":
            text.insert(at, draw(st.sampled_from([*'{}",=*/#\\\n\t %:.?', "**", "\x00", "A"])))
        elif op == "delete" and text:
            del text[min(at, len(text) - 1)]
        else:
            text[at:at] = text[draw(st.integers(0, len(text))) :][:12]
    return "".join(text)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_policies())
def test_near_valid_policies(text):
    survives(text)


@pytest.mark.parametrize(
    "text",
    [
        "a" * 200_000,
        '"\\' * 50_000,
        "{" * 100_000,
        "}\n" * 10_000,
        "\x00" * 1000,
        "policy p {\n port " + "9" * 100_000 + "\n}\n",
        "policy p {\n port 80\n default deny\n allow GET /" + "*" * 100_000 + "\n}\n",
        "\n" * 100_000,
    ],
    ids=["long-word", "quotes", "braces", "closes", "nul", "digits", "stars", "newlines"],
)
def test_pathological_inputs(text):
    survives(text)
