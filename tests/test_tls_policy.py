"""The `tls` statement without a kernel: syntax and diagnostics, fmt and lint, the metadata it
leaves in an object, and how load, reload, doctor and status treat it (the probe faked).

tests/kernel/test_tls_policy_load.py loads `tls` policies for real.
"""

from __future__ import annotations

import importlib
import io
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from policygen import policies

from sockpol import doctor
from sockpol.authoring.fmt import format_source
from sockpol.authoring.lint import lint_file
from sockpol.cli import build_parser, run
from sockpol.compiler import compile_source
from sockpol.diagnostics import CompileError, Severity, Span
from sockpol.dsl import load_source
from sockpol.dsl.ast import TlsUserspace
from sockpol.metadata import PolicyMetadata, describe_tls
from sockpol.runtime import loader, probe
from sockpol.runtime.loader import PolicyStatus
from sockpol.runtime.probe import Finding, Status, TlsSupport
from sockpol.statusview import policies as status_table
from sockpol.statusview import policy as status_detail

reload_mod = importlib.import_module("sockpol.runtime.reload")  # the package exports a function


def wrap(*lines: str, port: str = "443") -> str:
    body = "".join(f"    {x}\n" for x in lines)
    return f"policy p {{\n    port {port}\n    default deny\n{body}}}\n"


def tls_of(text: str):
    file, _ = load_source(text, "t.pol")
    (policy,) = file.policies
    return policy.tls


def diagnostics(text: str):
    with pytest.raises(CompileError) as info:
        load_source(text, "t.pol")
    return [d for d in info.value.diagnostics if d.severity is Severity.ERROR]


# -- syntax ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "userspace", "end"),
    [
        ("tls", TlsUserspace.DENY, 8),
        ("tls userspace deny", TlsUserspace.DENY, 23),
        ("tls userspace allow", TlsUserspace.ALLOW, 24),
        ("tls   userspace\tallow   # why", TlsUserspace.ALLOW, 26),
    ],
)
def test_tls_statements(line, userspace, end):
    tls = tls_of(wrap(line))
    assert tls.userspace is userspace
    assert tls.span == Span(4, 5, 4, end)


def test_no_tls_statement_means_plaintext_and_order_is_free():
    assert tls_of(wrap("allow GET /x")) is None
    text = (
        "policy p {\n    tls userspace allow\n    allow GET /x\n    port 443\n    default deny\n}\n"
    )
    assert tls_of(text).userspace is TlsUserspace.ALLOW


def test_names_may_be_spelled_tls_and_userspace():
    text = (
        "policy tls {\n port 1\n default deny\n tls\n"
        ' allow GET /x if header tls and header userspace = "a"\n}\n'
        "policy userspace {\n port 2\n default deny\n}\n"
    )
    file, _ = load_source(text, "t.pol")
    first, second = file.policies
    assert (first.name, second.name) == ("tls", "userspace")
    assert first.tls is not None and second.tls is None
    assert [c.name for c in first.rules[0].conditions] == ["tls", "userspace"]


@pytest.mark.parametrize(
    ("lines", "code", "column", "message", "hint"),
    [
        (
            ["tls userspace maybe"],
            "E155",
            19,
            "unknown word 'maybe' after 'tls userspace': expected deny or allow",
            "'tls userspace deny' refuses user-space TLS",
        ),
        (["tls userspace Allow"], "E155", 19, "unknown word 'Allow'", "did you mean 'allow'?"),
        (["tls", "tls userspace allow"], "E156", 5, "a second 'tls' (the first is on line 4)", ""),
        (
            ["tls deny"],
            "E003",
            9,
            "expected 'userspace' or the end of the line",
            "tls userspace deny",
        ),
        (["tls x"], "E003", 9, "expected 'userspace' or the end of the line after 'tls'", ""),
        (["tls userspace"], "E003", 18, "expected deny or allow after 'tls userspace'", ""),
        (['tls userspace "deny"'], "E003", 19, "expected deny or allow after 'tls userspace'", ""),
        (["tls userspace deny x"], "E003", 24, "expected the end of the line", ""),
        (["userspace deny"], "E004", 5, "unknown statement 'userspace'", ""),
        (["Tls"], "E004", 5, "unknown statement 'Tls'", "write 'tls'"),
    ],
)
def test_tls_diagnostics(lines, code, column, message, hint):
    (d,) = diagnostics(wrap(*lines))
    line = 4 + (len(lines) - 1)
    assert (d.code, d.span.line, d.span.column) == (code, line, column), d
    assert message in d.message
    assert hint in d.hint


def test_duplicate_tls_points_at_the_second_statement_with_a_caret():
    with pytest.raises(CompileError) as info:
        load_source(wrap("tls userspace allow", "allow GET /x", "tls"), "t.pol")
    assert str(info.value).splitlines()[:3] == [
        "t.pol:6:5: error: a second 'tls' (the first is on line 4) [E156]",
        "        tls",
        "        ^~~",
    ]


def test_tls_outside_a_policy():
    (d,) = diagnostics("tls\npolicy p {\n port 1\n default deny\n}\n")
    assert (d.code, d.span.line, d.message) == (
        "E008",
        1,
        "'tls' statement outside a policy block",
    )


def test_a_bad_tls_line_reports_once_and_the_rest_is_checked():
    errors = diagnostics(wrap("tls userspace sometimes", "allow get /x"))
    assert [d.code for d in errors] == ["E155", "E141"]


# -- fmt and lint -------------------------------------------------------------------------------


def test_fmt_places_tls_after_mode_and_keeps_its_spelling():
    text = (
        "policy p {\n  allow GET /x\n  tls   userspace   deny # why\n"
        "  mode dry-run\n  port 443\n  default deny\n}\n"
        "policy q {\n tls\n port 8443\n default allow\n}\n"
        "policy r {\n tls userspace allow\n port 9443\n max-head 4096\n default allow\n}\n"
    )
    assert format_source(text, "f.pol") == (
        "policy p {\n    port 443\n    default deny\n    mode dry-run\n"
        "    tls userspace deny  # why\n\n    allow GET /x\n}\n\n"
        "policy q {\n    port 8443\n    default allow\n    tls\n}\n\n"
        "policy r {\n    port 9443\n    default allow\n    max-head 4KiB\n"
        "    tls userspace allow\n}\n"
    )


def _meaning(text: str):
    file, _ = load_source(text, "m.pol")
    return [
        (p.name, p.tls.userspace if p.tls else None, p.mode, [r.describe() for r in p.rules])
        for p in file.policies
    ]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies(max_rules=3, tls=True))
def test_fmt_round_trip_with_tls(spec):
    text = spec.render(8443)
    formatted = format_source(text, "g.pol")
    assert _meaning(formatted) == _meaning(text)
    assert format_source(formatted, "g.pol") == formatted
    if spec.tls is not None:
        assert f"\n    {spec.tls}\n" in formatted


def lint_codes(text: str) -> list[tuple[int, str]]:
    file, warnings = load_source(text, "l.pol")
    return [(f.span.line, f.code) for f in lint_file(file, warnings) if f.code != "L007"]


def test_lint_tls_on_port_80_only():
    assert lint_codes(wrap("tls", port="80")) == [(4, "L009")]
    assert lint_codes(wrap("tls userspace allow", port="80")) == [(4, "L009")]
    assert lint_codes(wrap("tls", port="80, 443")) == []
    assert lint_codes(wrap("tls", port="443")) == []
    assert lint_codes(wrap("tls", port="79-81")) == []
    assert lint_codes(wrap(port="80")) == []
    assert lint_codes(wrap("tls  # sockpol: ignore[tls-port]", port="80")) == []


def test_lint_tls_port_message(tmp_path: Path, capsys):
    path = tmp_path / "l.pol"
    path.write_text(wrap("tls", "allow GET /x", port="80"))
    assert run(["lint", str(path)]) == 1
    out = capsys.readouterr().out
    assert "l.pol:4:5: warning: policy 'p' says tls, but governs only port 80" in out
    assert "[L009 tls-port]" in out


# -- metadata, inspect, check ---------------------------------------------------------------------


def compiled(text: str):
    (c,), _ = compile_source(text, "t.pol")
    return c


@pytest.mark.parametrize(
    ("lines", "tls"),
    [
        ([], None),
        (["tls"], "deny"),
        (["tls userspace deny"], "deny"),
        (["tls userspace allow"], "allow"),
    ],
)
def test_metadata_carries_tls(lines, tls):
    meta = compiled(wrap(*lines, "allow GET /x")).metadata
    assert meta.tls == tls
    assert json.loads(meta.to_json())["tls"] == tls
    assert PolicyMetadata.from_json(meta.to_json()) == meta


def test_metadata_of_older_objects_has_no_tls():
    meta = compiled(wrap("tls", "allow GET /x")).metadata
    raw = json.loads(meta.to_json())
    del raw["tls"]
    assert PolicyMetadata.from_json(json.dumps(raw).encode()).tls is None


def test_inspect_and_check_show_tls(tmp_path: Path, capsys):
    source = tmp_path / "p.pol"
    source.write_text(wrap("tls userspace allow", "allow GET /x"))
    obj = tmp_path / "p.o"
    assert run(["compile", str(source), "-o", str(obj)]) == 0
    capsys.readouterr()
    assert run(["inspect", str(obj)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.endswith("; tls (kTLS judged; user-space TLS passes unjudged)")
    assert run(["inspect", "--json", str(obj)]) == 0
    assert json.loads(capsys.readouterr().out)["tls"] == "allow"
    assert run(["check", str(source)]) == 0
    assert "default deny, tls (kTLS judged; user-space TLS passes unjudged)" in (
        capsys.readouterr().out
    )


def test_describe_tls():
    assert describe_tls(None) == "no tls (plaintext HTTP)"
    assert describe_tls("deny") == "tls (kTLS judged; user-space TLS refused)"
    assert "passes unjudged" in describe_tls("allow")


# -- the decision: can this kernel load tls policies? ---------------------------------------------


def _finding(key: str, verdict: Status, detail: str = "d", lacks: str = "") -> Finding:
    return Finding(key, key.replace("_", " "), verdict, detail, "", lacks)


def test_tls_support_from_findings():
    ok = probe.tls_support_from([_finding("ktls", Status.OK), _finding("ktls_sockmap", Status.OK)])
    assert ok.ok and ok.reason == ""
    no_config = probe.tls_support_from(
        [
            _finding("ktls", Status.MISSING, lacks="kernel TLS (CONFIG_TLS is not set)"),
            _finding("ktls_sockmap", Status.MISSING, "not tried"),
        ]
    )
    assert not no_config.ok
    assert no_config.reason == "it lacks kernel TLS (CONFIG_TLS is not set)"
    rejecting = probe.tls_support_from(
        [
            _finding("ktls", Status.OK),
            _finding("ktls_sockmap", Status.MISSING, lacks="kTLS on sockets in a sockhash (x)"),
        ]
    )
    assert rejecting.reason == "it lacks kTLS on sockets in a sockhash (x)"
    unknown = probe.tls_support_from(
        [_finding("ktls", Status.OK), _finding("ktls_sockmap", Status.UNKNOWN, "needs root")]
    )
    assert not unknown.ok and unknown.reason == "ktls sockmap could not be verified (needs root)"
    assert not probe.tls_support_from([_finding("ktls", Status.OK)]).ok


def test_refusal_is_one_line_naming_doctor_and_the_docs():
    support = TlsSupport(False, "it lacks kernel TLS (CONFIG_TLS is not set)", ())
    text = support.refusal("web")
    assert "\n" not in text
    assert text == (
        "policy 'web' has a tls statement, but this kernel cannot judge requests inside TLS: "
        "it lacks kernel TLS (CONFIG_TLS is not set); nothing was loaded "
        "(see 'sockpol doctor' and docs/ktls.md)"
    )


def test_tls_policy_support_is_cached_per_process(monkeypatch):
    calls = []

    def fake_ktls():
        calls.append(1)
        return _finding("ktls", Status.MISSING, lacks="kernel TLS (CONFIG_TLS is not set)")

    monkeypatch.setattr(probe, "probe_ktls", fake_ktls)
    probe.tls_policy_support.cache_clear()
    try:
        first = probe.tls_policy_support()
        assert probe.tls_policy_support() is first and calls == [1]
        assert first.reason == "it lacks kernel TLS (CONFIG_TLS is not set)"
    finally:
        probe.tls_policy_support.cache_clear()


# -- load and reload refuse before touching anything ---------------------------------------------

NO_TLS = TlsSupport(False, "it lacks kernel TLS (CONFIG_TLS is not set)", ())


@pytest.fixture
def no_kernel(monkeypatch):
    """The loader up to its first kernel step, without root: privileges pass, the probe says
    `support`, and touching the pin root fails the test."""

    def untouchable(*a, **kw):
        raise AssertionError("the loader touched the pin root")

    def use(support: TlsSupport) -> None:
        monkeypatch.setattr(probe, "tls_policy_support", lambda: support)

    monkeypatch.setattr(loader, "check_privileges", lambda: None)
    monkeypatch.setattr(loader.pins, "pin_root", untouchable)
    use(NO_TLS)
    return use


def write_object(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "p.o"
    path.write_bytes(compiled(wrap(*lines, "allow GET /x")).object_code())
    return path


@pytest.mark.parametrize("line", ["tls", "tls userspace deny", "tls userspace allow"])
def test_load_refuses_tls_policies_where_the_kernel_cannot(no_kernel, tmp_path, line):
    obj = write_object(tmp_path, line)
    with pytest.raises(loader.LoadError) as info:
        loader.load(obj, None, name="web")
    assert str(info.value) == "load: " + NO_TLS.refusal("web")


def test_load_of_a_plaintext_policy_never_asks(no_kernel, tmp_path, monkeypatch):
    monkeypatch.setattr(probe, "tls_policy_support", lambda: pytest.fail("asked"))
    obj = write_object(tmp_path)
    with pytest.raises(AssertionError, match="touched the pin root"):
        loader.load(obj, None, name="web")


def test_load_of_a_tls_policy_goes_on_where_the_kernel_can(no_kernel, tmp_path):
    no_kernel(TlsSupport(True, "", ()))
    obj = write_object(tmp_path, "tls")
    with pytest.raises(AssertionError, match="touched the pin root"):
        loader.load(obj, None, name="web")


def test_cli_load_refusal_is_one_line_and_exit_1(no_kernel, tmp_path):
    source = tmp_path / "web.pol"
    source.write_text(wrap("tls", "allow GET /x").replace("policy p", "policy web"))
    messages: list[str] = []
    assert run(["load", str(source)], on_error=messages.append) == 1
    assert messages == ["sockpol: load: " + NO_TLS.refusal("web")]


def test_reload_refuses_tls_policies_where_the_kernel_cannot(monkeypatch, tmp_path):
    monkeypatch.setattr(reload_mod, "check_privileges", lambda: None)
    monkeypatch.setattr(reload_mod.pins, "pin_root", lambda create=False: tmp_path)
    (tmp_path / "web").mkdir()
    monkeypatch.setattr(probe, "tls_policy_support", lambda: NO_TLS)
    monkeypatch.setattr(reload_mod.pins, "locked", lambda root: pytest.fail("locked the pins"))
    obj = write_object(tmp_path, "tls userspace allow")
    with pytest.raises(reload_mod.ReloadError) as info:
        reload_mod.reload("web", obj)
    assert str(info.value) == "reload: " + NO_TLS.refusal("web", "nothing was changed")


def test_reload_may_change_tls():
    # The statement is a value in the tables (emit.py's config "tls"), not code.
    plain = compiled(wrap("allow GET /x")).metadata
    tls = compiled(wrap("tls", "allow GET /x")).metadata
    allow = compiled(wrap("tls userspace allow", "allow GET /x")).metadata
    for old, new in ((tls, tls), (plain, tls), (tls, plain), (tls, allow)):
        assert reload_mod._swappable(old, new)  # a tables swap, no program replaced


# -- doctor and status say whether tls policies load here ----------------------------------------


def _doctor_text(monkeypatch, findings: list[Finding], *argv: str) -> str:
    monkeypatch.setattr(probe, "probe", lambda: findings)  # doctor imports it when it runs
    args = build_parser().parse_args(["doctor", *argv])
    out = io.StringIO()
    doctor.cmd_doctor(args, out=out)
    return out.getvalue()


def _all_findings(sockmap: Finding) -> list[Finding]:
    return [
        _finding("kernel", Status.OK, "Linux 6.1.0-56-amd64 (x86_64)"),
        *[_finding(k, Status.OK) for k in probe.CORE],
        _finding("ktls", Status.OK),
        sockmap,
    ]


def test_doctor_on_a_rejecting_kernel(monkeypatch):
    lacks = 'kTLS on sockets in a sockhash (the kernel carries "tls: reject ...")'
    findings = _all_findings(_finding("ktls_sockmap", Status.MISSING, "EINVAL", lacks))
    text = _doctor_text(monkeypatch, findings)
    assert f"policies with `tls`:      no, sockpol load refuses them: it lacks {lacks}" in text
    report = json.loads(_doctor_text(monkeypatch, findings, "--json"))
    assert report["works"]["tls_policies"] is False
    ok = _all_findings(_finding("ktls_sockmap", Status.OK))
    assert "policies with `tls`:      yes" in _doctor_text(monkeypatch, ok)


def _status(name: str, tls: str | None, mode: str = "enforce") -> PolicyStatus:
    meta = compiled(wrap("allow GET /x")).metadata
    meta = PolicyMetadata.from_json(
        meta.to_json().replace(b'"tls": null', json.dumps({"tls": tls})[1:-1].encode())
    )
    return PolicyStatus(
        name=name, pin_dir=Path("/x") / name, ports=[(443, 443)], metadata=meta, mode=mode
    )


def test_status_shows_tls_per_policy_and_whether_tls_policies_load():
    rows = [_status("a", None), _status("b", "deny"), _status("c", "allow")]
    text = status_table(rows, {}, ["tls policies: cannot be loaded on this kernel: x"])
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["NAME", "MODE", "PORTS", "TLS"]
    assert [line.split()[3] for line in lines[1:4]] == ["-", "tls", "tls+userspace"]
    assert lines[-1] == "tls policies: cannot be loaded on this kernel: x"
    detail = status_detail(rows[2], None)
    assert "  tls      tls (kTLS judged; user-space TLS passes unjudged)" in detail.splitlines()


def test_status_listing_says_whether_tls_policies_load(monkeypatch, capsys):
    from sockpol import runtime

    monkeypatch.setattr(runtime, "status", lambda name=None: [])
    monkeypatch.setattr(probe, "tls_policy_support", lambda: NO_TLS)
    assert run(["status"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "no sockpol policies loaded",
        "tls policies: cannot be loaded on this kernel: it lacks kernel TLS "
        "(CONFIG_TLS is not set) (see sockpol doctor)",
    ]
