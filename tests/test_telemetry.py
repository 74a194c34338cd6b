"""Operating features without a kernel: the `audit`/`log`/`mode` syntax, what the program records
(through its Python mirror), the metadata and map layouts, event decoding, status tables and the
metrics listener address."""

from __future__ import annotations

import io
import socket
import struct

import pytest
from elftools.elf.elffile import ELFFile

from sockpol import telemetry as t
from sockpol.codegen.simulate import TablesConnection, run
from sockpol.compiler import compile_source
from sockpol.contract import RESUME_UNJUDGED, Reason
from sockpol.diagnostics import CompileError
from sockpol.dsl import load_source
from sockpol.dsl.ast import Action, Mode
from sockpol.metadata import PolicyMetadata
from sockpol.runtime.events import decode
from sockpol.runtime.metrics import parse_listen
from sockpol.statusview import table

POLICY = """\
policy p {
    port 8080
    default deny
    mode dry-run
    allow GET /ok log
    allow GET /quiet
    audit * /audit/**
    deny  * /admin/**
}
"""


def codes(text: str) -> list[str]:
    try:
        _, warnings = load_source(text, "t.pol")
    except CompileError as e:
        return [d.code for d in e.diagnostics]
    return [d.code for d in warnings]


def wrap(*lines: str) -> str:
    return (
        "policy p {\n    port 80\n    default deny\n" + "".join(f"    {x}\n" for x in lines) + "}\n"
    )


def matcher(text: str = POLICY):
    (compiled,), _ = compile_source(text, "t.pol")
    return compiled


def req(method: str, path: str, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: h\r\n"
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body


# -- syntax --------------------------------------------------------------------------------------


def test_mode_audit_and_log_parse():
    file, warnings = load_source(POLICY, "t.pol")
    (policy,) = file.policies
    assert warnings == []
    assert policy.mode is Mode.DRY_RUN and policy.mode_span.line == 4
    assert [(r.action, r.log) for r in policy.rules] == [
        (Action.ALLOW, True), (Action.ALLOW, False), (Action.AUDIT, False), (Action.DENY, False)
    ]  # fmt: skip
    assert policy.rules[0].describe() == "allow GET /ok log"


def test_mode_defaults_to_enforce_and_names_may_be_the_new_keywords():
    file, _ = load_source(wrap("allow GET /x if header log log"), "t.pol")
    (policy,) = file.policies
    assert policy.mode is Mode.ENFORCE and policy.mode_span is None
    (rule,) = policy.rules
    assert rule.conditions[0].name == "log" and rule.log


@pytest.mark.parametrize(
    ("lines", "code"),
    [
        (["mode strict"], "E150"),
        (["mode enforce", "mode dry-run"], "E151"),
        (["mode"], "E003"),
        (["deny * /x log"], "W193"),
        (["audit * /x log"], "W193"),
        (["allow GET /x log extra"], "E003"),
        (["log allow GET /x"], "E004"),
    ],
)
def test_mode_and_log_diagnostics(lines, code):
    assert code in codes(wrap(*lines))


# -- what a run records (the mirror of the kernel program) ----------------------------------------


def test_enforce_mode_records_refusals_audits_and_logs():
    ir = matcher().matcher
    ok = run(ir, req("GET", "/ok"))
    assert ok.allow and ok.event is t.EventKind.LOGGED and ok.reason is Reason.NONE
    assert ok.counts == ((t.SLOT_RULES + 0, 1, len(req("GET", "/ok"))),)
    quiet = run(ir, req("GET", "/quiet"))
    assert quiet.allow and quiet.event is None
    audit = run(ir, req("POST", "/audit/x", b"abc"))
    size = len(req("POST", "/audit/x", b"abc"))
    assert audit.allow and audit.would_refuse and audit.event is t.EventKind.AUDIT
    assert audit.counts == (
        (t.SLOT_RULES + 2, 1, size),
        (t.SLOT_WOULD_REFUSE + Reason.RULE, 1, size),
    )
    denied = run(ir, req("GET", "/admin/a"))
    assert not denied.allow and denied.event is t.EventKind.REFUSED and denied.rule == 3
    default = run(ir, req("GET", "/other"))
    assert not default.allow and default.reason is Reason.DEFAULT
    assert default.counts[0][0] == t.SLOT_DEFAULT
    garbage = run(ir, b"\x00\x01\x02\x03")
    assert not garbage.allow and garbage.event is t.EventKind.REFUSED
    assert garbage.counts == ((t.SLOT_REFUSED + Reason.BAD_METHOD, 1, 4),)


def test_dry_run_passes_what_enforce_refuses():
    ir = matcher().matcher
    for data in (req("GET", "/admin/a"), req("GET", "/other")):
        result = run(ir, data, mode=t.MODE_DRY_RUN)
        assert result.allow and result.would_refuse and result.event is t.EventKind.DRY_RUN
        assert result.counts[-1][0] == t.SLOT_WOULD_REFUSE + result.reason


def test_dry_run_connection_without_framing_is_unjudged_until_enforced():
    conn = TablesConnection(matcher().matcher, mode=t.MODE_DRY_RUN)
    assert conn.send(b"NOT HTTP\r\n\r\n").returned == 12
    assert conn.verdicts[-1].resume == RESUME_UNJUDGED
    assert conn.send(b"anything at all").returned == 15
    assert conn.verdicts[-1].counts == ((t.SLOT_UNJUDGED, 1, 15),)
    conn.mode = t.MODE_ENFORCE
    assert conn.send(req("GET", "/quiet")).failed
    last = conn.verdicts[-1]
    assert last.reason is Reason.BAD_TARGET and last.event is t.EventKind.REFUSED


def test_chunked_body_bytes_go_to_the_rule_that_passed_the_head():
    text = POLICY.replace("allow GET /quiet", "allow POST /up")
    conn = TablesConnection(matcher(text).matcher)
    head = b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert not conn.send(head + b"3\r\nabc\r\n0\r\n\r\n").failed
    slots = {slot for r in conn.verdicts for slot, _, _ in r.counts}
    assert slots == {t.SLOT_RULES + 1}
    assert sum(b for r in conn.verdicts for _, _, b in r.counts) == len(head) + 13


# -- objects, metadata, layouts -------------------------------------------------------------------


def test_object_has_the_telemetry_maps_and_records_the_layout():
    compiled = matcher()
    meta = compiled.metadata
    assert meta.mode == "dry-run" and [r.log for r in meta.rules] == [True, False, False, False]
    assert [r.action for r in meta.rules] == ["allow", "allow", "audit", "deny"]
    assert meta.telemetry == t.layout()
    elf = ELFFile(io.BytesIO(compiled.object_code()))
    maps_index = next(i for i, s in enumerate(elf.iter_sections()) if s.name == ".maps")
    symbols = {
        s.name
        for s in elf.get_section_by_name(".symtab").iter_symbols()
        if s["st_shndx"] == maps_index
    }
    assert {t.COUNTS_MAP, t.EVENTS_MAP, t.EVBUF_MAP, t.CTL_MAP} <= symbols
    assert all(len(name) < 16 for name in symbols)  # BPF_OBJ_NAME_LEN: names stay whole


def test_metadata_reads_records_with_unknown_and_missing_fields():
    meta = matcher().metadata
    raw = meta.to_json().replace(b'"mode"', b'"from_the_future": 1, "mode"')
    assert PolicyMetadata.from_json(raw) == meta
    old = json_without(meta.to_json(), "mode", "telemetry")
    read = PolicyMetadata.from_json(old)
    assert read.mode == "enforce" and read.telemetry == {}


def json_without(data: bytes, *keys: str) -> bytes:
    import json

    raw = json.loads(data)
    for key in keys:
        raw.pop(key)
    for rule in raw["rules"]:
        rule.pop("log")
    return json.dumps(raw).encode()


def test_layouts_are_consistent():
    assert max(Reason) < t.REASON_SLOTS
    assert t.SLOT_RULES == t.SLOT_WOULD_REFUSE + t.REASON_SLOTS
    assert t.EVENT.size % 8 == 0 and t.EVENTS_BYTES & (t.EVENTS_BYTES - 1) == 0
    assert t.EVENTS_BYTES % 4096 == 0
    offsets = t.EVENT_OFFSETS
    assert offsets["path"] + t.PATH_BYTES == offsets["answer"]
    assert offsets["path"] % 8 == 0  # copied in 8-byte words
    assert offsets["reserved"] + 6 == t.EVENT.size


# -- event records ------------------------------------------------------------------------------


def record(**fields) -> bytes:
    values = {
        "time_ns": 5_000_000_000, "pid_tgid": (1234 << 32) | 1240, "cgroup_id": 99,
        "rule": 3, "size": 80, "verdict": t.EventKind.REFUSED, "reason": Reason.RULE,
        "method_len": 6, "host_len": 5, "path_len": 9, "family": socket.AF_INET,
        "remote_port": socket.htons(8080) << 16, "local_port": 40000,
        "remote_ip4": bytes([10, 0, 0, 2]), "local_ip4": bytes([10, 0, 0, 1]),
        "remote_ip6": bytes(16), "local_ip6": bytes(16),
        "method": b"DELETE", "host": b" a.b ", "path": b"/admin/\x1bx",
        "answer": 0, "reserved": b"",
    }  # fmt: skip
    values.update(fields)
    return t.EVENT.pack(*(values[name] for name, _ in t.EVENT_FIELDS))


def test_event_record_decodes():
    meta = matcher().metadata
    e = decode("p", record(), meta, clock_offset_ns=1_700_000_000_000_000_000)
    assert (e.policy, e.verdict, e.reason, e.rule, e.line) == ("p", "refused", "rule", 3, 8)
    assert (e.pid, e.tid, e.cgroup_id) == (1234, 1240, 99)
    assert (e.src, e.sport, e.dst, e.dport) == ("10.0.0.1", 40000, "10.0.0.2", 8080)
    assert (e.method, e.host, e.path) == ("DELETE", "a.b", "/admin/\\x1bx")  # control byte shown
    assert not (e.method_cut or e.host_cut or e.path_cut)
    assert e.time.timestamp() == pytest.approx(1_700_000_005)
    assert "refused rule 3 (line 8): DELETE a.b /admin/\\x1bx" in e.text()
    assert e.to_json()["type"] == "event"


def test_event_record_cut_fields_v6_and_no_host():
    v6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    e = decode(
        "p",
        record(
            family=socket.AF_INET6, local_ip6=v6, remote_ip6=v6, method_len=t.METHOD_BYTES + 1,
            method=b"M" * 16, host_len=0, path_len=3000, path=b"/" + b"a" * 127, rule=0xFFFFFFFF,
            reason=Reason.BAD_METHOD,
        ),
        None,
        0,
    )  # fmt: skip
    assert e.src == "2001:db8::1" and e.method_cut and e.host is None
    assert e.path_cut and e.path_len == 3000 and e.rule is None and e.line is None
    assert "refused bad-method:" in e.text()


# -- status tables and the metrics address ------------------------------------------------------


def test_table_aligns_columns():
    text = table(["A", "NUMBER", "TEXT"], [["x", 1, "free text"], ["long", 12345, "t"]], {1})
    assert text.splitlines() == [
        "A     NUMBER  TEXT",
        "x          1  free text",
        "long   12345  t",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        (":9464", ("0.0.0.0", 9464)),
        ("[::1]:9464", ("::1", 9464)),
    ],
)
def test_metrics_listen_address(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["9464", "host:", "host:0", "host:99999", "host:x"])
def test_metrics_listen_address_errors(text):
    with pytest.raises(ValueError):
        parse_listen(text)


def test_struct_sizes_match_the_kernel_maps():
    assert t.COUNTER.size == 16 and t.CTL.size == 12
    assert struct.calcsize("<" + "".join(f for _, f in t.EVENT_FIELDS)) == t.EVENT.size
