"""`answer`: the language, the responses, and the models (no kernel; tests/kernel/test_answer.py
holds the kernel to them)."""

from __future__ import annotations

import pytest

from sockpol.authoring.fmt import format_source
from sockpol.authoring.testfile import describe
from sockpol.codegen import simulate
from sockpol.codegen.lower import lower
from sockpol.contract import (
    ANSWER_BYTES,
    ANSWER_HEADER,
    ANSWERED_REASONS,
    STATUS_PHRASES,
    Reason,
    answer_response,
)
from sockpol.diagnostics import CompileError
from sockpol.dsl import load_source
from sockpol.model.interp import Connection, evaluate

POLICY = """\
policy shop {
    port 8080
    default deny
    answer 403

    allow GET /ok
    deny * /hidden/** answer 404
    deny * /quiet/** answer drop
}
"""


def policy(text: str = POLICY):
    return load_source(text, "shop.pol")[0].policies[0]


def test_policy_and_rule_answers_parse():
    p = policy()
    assert p.answer_status == 403
    assert [r.answer.status if r.answer else None for r in p.rules] == [None, 404, 0]
    assert p.answers() == (403, 404, 0)
    assert p.rule_answer(None) == 403 and p.rule_answer(p.rules[1]) == 404
    assert policy(POLICY.replace("    answer 403\n", "")).answer_status == 0  # default: drop


@pytest.mark.parametrize(
    ("line", "code"),
    [
        ("    answer 99", "E160"),
        ("    answer 600", "E160"),
        ("    answer forbidden", "E160"),
        ("    answer 403\n    answer 404", "E161"),
        ("    deny * /x answer 40x", "E160"),
        ("    deny * /a answer 410\n    deny * /b answer 411\n    deny * /c answer 412", "E162"),
    ],
)
def test_bad_answers_are_errors(line, code):
    text = POLICY.replace("    allow GET /ok\n", line + "\n")
    with pytest.raises(CompileError) as e:
        load_source(text, "shop.pol")
    assert code in {d.code for d in e.value.diagnostics}


def test_answer_on_an_allow_rule_is_a_warning():
    _, warnings = load_source(POLICY.replace("allow GET /ok", "allow GET /ok answer 404"), "p")
    assert [w.code for w in warnings] == ["W195"]


def test_fmt_puts_answer_after_the_head_statements_and_keeps_rule_answers():
    text = "policy a {\n  answer   404\n port 80\n default deny\n deny * /x   answer  drop # c\n}\n"
    out = format_source(text)
    assert out == (
        "policy a {\n    port 80\n    default deny\n    answer 404\n\n"
        "    deny * /x answer drop  # c\n}\n"
    )
    assert format_source(out) == out


def test_every_response_is_fixed_size_marked_and_free_of_request_bytes():
    for name in ("a", "x" * 32):
        for status in (400, 403, 404, 429, 451, 499, 511, 599):
            for reason in ANSWERED_REASONS:
                slug = Reason(reason).slug
                r = answer_response(name, status, slug)
                assert len(r) == ANSWER_BYTES
                head, _, body = r.partition(b"\r\n\r\n")
                assert int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]) == len(body)
                phrase = STATUS_PHRASES.get(status, "Refused")
                assert head.startswith(f"HTTP/1.1 {status} {phrase}\r\n".encode())
                assert f"{ANSWER_HEADER}: policy={name}; reason={slug}".encode() in head
                assert b"Connection: close" in head and body.endswith(b"\n")


def test_the_interpreter_and_the_tables_answer_alike():
    p = policy()
    ir = lower(p)
    cases = [
        (b"GET /nowhere HTTP/1.1\r\n\r\n", 403),
        (b"GET /hidden/a HTTP/1.1\r\n\r\n", 404),
        (b"GET /quiet/a HTTP/1.1\r\n\r\n", 0),
        (b"\x00GET / HTTP/1.1\r\n\r\n", 403),
        (b"GET /ok HTTP/1.1\r\n\r\n", 0),
    ]
    for data, status in cases:
        assert evaluate(p, data).answer == status, data
        assert simulate.run(ir, data).answer == status, data


def test_after_an_answer_the_connection_discards_everything():
    conn = Connection(policy())
    sends = [b"GET /ok HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\n\r\nGET /ok HTTP/1.1\r\n\r\n",
             b"GET /ok HTTP/1.1\r\n\r\n"]  # fmt: skip
    results = [conn.send(d).returned for d in sends]
    assert results == [len(sends[0]), len(sends[1])]  # nothing fails
    assert bytes(conn.delivered) == b"GET /ok HTTP/1.1\r\n\r\n"  # only the first request
    assert conn.answered and conn.state.resume == "answered"
    # dry-run: no answer, everything passes
    dry = Connection(policy(POLICY.replace("answer 403", "answer 403\n    mode dry-run")))
    dry.send(b"GET /nope HTTP/1.1\r\n\r\n")
    assert not dry.answered and dry.verdicts[0].answer == 0


def test_poltest_form_says_how_a_refusal_is_answered():
    p = policy()
    assert describe(evaluate(p, b"GET /hidden/a HTTP/1.1\r\n\r\n")) == "deny rule 1 answer 404"
    assert describe(evaluate(p, b"GET /quiet/a HTTP/1.1\r\n\r\n")) == "deny rule 2 answer drop"
    assert describe(evaluate(p, b"\x00 HTTP/1.1\r\n\r\n")) == "refuse bad-method answer 403"
    assert describe(evaluate(p, b"GET /ok HTTP/1.1\r\n\r\n")) == "allow rule 0"
