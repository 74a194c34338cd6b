"""`side ingress`: the language, the checker, fmt, explain, poltest, the object, and the model of
the receiving side (no kernel; tests/kernel/test_ingress.py holds the kernel to them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from sockpol.authoring.fmt import format_source
from sockpol.compiler import compile_source
from sockpol.contract import SKB_PROGRAM, SOCKOPS_PROGRAM
from sockpol.diagnostics import CompileError
from sockpol.dsl import load_source
from sockpol.dsl.ast import Side
from sockpol.model.interp import evaluate
from sockpol.model.receive import receive_segments

REPO = Path(__file__).resolve().parents[1]

POLICY = """\
policy api {
    port 8080
    side ingress
    default deny

    deny * /drop/** answer drop
    allow GET /ok/**
    allow POST /upload
}
"""


def policy(text: str = POLICY):
    return load_source(text, "api.pol")[0].policies[0]


def test_side_parses_and_defaults_to_egress():
    assert policy().side is Side.INGRESS and policy().side_span.line == 3
    egress = policy(POLICY.replace("    side ingress\n", ""))
    assert egress.side is Side.EGRESS and egress.side_span is None
    assert policy(POLICY.replace("side ingress", "side egress")).side is Side.EGRESS


def test_ingress_refusals_are_answered_403_unless_the_policy_says_otherwise():
    assert policy().answer_status == 403
    assert (
        policy(
            POLICY.replace("    default deny\n", "    default deny\n    answer drop\n")
        ).answer_status
        == 0
    )
    assert policy(POLICY.replace("side ingress", "side egress")).answer_status == 0
    assert evaluate(policy(), b"GET /admin HTTP/1.1\r\n\r\n").answer == 403
    assert evaluate(policy(), b"GET /drop/x HTTP/1.1\r\n\r\n").answer == 0


@pytest.mark.parametrize(
    ("replacement", "code"),
    [
        ("side ingres", "E157"),
        ("side server", "E157"),
        ("side ingress\n    side egress", "E158"),
        ("side", "E003"),
        ("side ingress x", "E003"),
        ("side ingress\n    tls", "E159"),
    ],
)
def test_bad_sides_are_errors_with_positions(replacement, code):
    with pytest.raises(CompileError) as e:
        load_source(POLICY.replace("side ingress", replacement), "api.pol")
    found = {d.code: d for d in e.value.diagnostics}
    assert code in found and found[code].span is not None and found[code].span.line >= 3


def test_a_port_may_be_governed_on_each_side_but_not_twice_on_one():
    both = POLICY + POLICY.replace("policy api", "policy client").replace(
        "side ingress", "side egress"
    )
    assert len(load_source(both, "p.pol")[0].policies) == 2
    twice = POLICY + POLICY.replace("policy api", "policy other")
    with pytest.raises(CompileError) as e:
        load_source(twice, "p.pol")
    assert "E115" in {d.code for d in e.value.diagnostics}


def test_fmt_puts_side_after_port():
    text = "policy a {\n default deny\n  side   ingress # receiving\n port 80\n allow GET /x\n}\n"
    out = format_source(text)
    assert out == (
        "policy a {\n    port 80\n    side ingress  # receiving\n    default deny\n\n"
        "    allow GET /x\n}\n"
    )
    assert format_source(out) == out


def test_an_ingress_policy_compiles_to_an_sk_skb_program_and_says_so():
    compiled, _ = compile_source(POLICY, "api.pol")
    c = compiled[0]
    assert c.metadata.side == "ingress" and c.metadata.answers[0] == 403
    import io

    elf = ELFFile(io.BytesIO(c.object_code()))
    sections = {s.name for s in elf.iter_sections()}
    assert "sk_skb/stream_verdict" in sections and "sockops" in sections
    symbols = {s.name for s in elf.get_section_by_name(".symtab").iter_symbols()}
    assert {SKB_PROGRAM, SOCKOPS_PROGRAM} <= symbols and "sockpol_msg" not in symbols


def _cli(*args: str, input_text: str | None = None) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "sockpol.cli", *args],
        capture_output=True, text=True, env=env, timeout=60, input=input_text,
    )  # fmt: skip


def test_explain_and_poltest_cover_the_receiving_side(tmp_path: Path):
    pol = tmp_path / "api.pol"
    pol.write_text(POLICY)
    out = _cli("explain", str(pol), "--method", "GET", "--path", "/admin")
    assert "side ingress" in out.stdout and "ANSWERED 403" in out.stdout
    out = _cli("explain", str(pol), "--method", "GET", "--path", "/drop/x")
    assert "DROPPED: the server never receives it" in out.stdout
    (tmp_path / "api.poltest").write_text(
        'test "allowed"\nGET /ok/a\nexpect allow rule 1\n\n'
        'test "refused, answered"\nGET /admin\nexpect deny default answer 403\n\n'
        'test "dropped"\nGET /drop/a\nexpect deny rule 0 answer drop\n'
    )
    out = _cli("test", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    lint = _cli("lint", str(pol))
    assert lint.returncode == 0, lint.stdout


# --- the receiving side's model ------------------------------------------------------------------


def req(path: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: a\r\n{extra}\r\n".encode()


def test_a_cut_head_passes_until_its_end_is_refused():
    p = policy()
    denied = req("/admin")
    r = receive_segments(p, [req("/ok/1"), denied[:7], denied[7:], req("/ok/2")])
    assert bytes(r.delivered) == req("/ok/1") + denied[:7]  # never the whole refused head
    assert r.answer == 403 and r.closed
    allowed = req("/ok/split")
    r = receive_segments(p, [allowed[:5], allowed[5:]])
    assert bytes(r.delivered) == allowed and not r.closed


def test_a_refusal_in_a_pipelined_segment():
    p = policy()
    # answered: the segment becomes the response; nothing of it reaches the server
    r = receive_segments(p, [req("/ok/1") + req("/admin") + req("/ok/2")])
    assert bytes(r.delivered) == b"" and r.answer == 403
    # dropped: the requests before the refused one pass
    r = receive_segments(p, [req("/ok/1") + req("/drop/x") + req("/ok/2")])
    assert bytes(r.delivered) == req("/ok/1") and r.answer == 0 and r.closed


def test_bodies_are_delivered_and_requests_after_them_judged():
    p = policy()
    body = req("/admin") * 2
    post = req("/upload", "POST", f"Content-Length: {len(body)}\r\n") + body
    r = receive_segments(p, [post[:30], post[30:], req("/ok/1"), req("/admin")])
    assert bytes(r.delivered) == post + req("/ok/1") and r.answer == 403
