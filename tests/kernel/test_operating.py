"""Operating sockpol on the real kernel: counters, events, dry-run and audit, the hot mode switch,
metrics, several policies at once, and a flood of events that must never slow or refuse traffic.

Every expectation is computed from what the test sent: counters and events are compared with the
Python mirror of the kernel program (`codegen/simulate.py`) run over the same sends, and with
explicit numbers where they are easy to state. status, events and metrics are also read from new
processes (the CLI), since everything they need is pinned.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from sockpol import runtime
from sockpol.codegen.simulate import TablesConnection
from sockpol.compiler import compile_source
from sockpol.contract import reason_slug
from sockpol.runtime import counters as rc
from sockpol.runtime.events import Event, EventStream, Lost
from sockpol.telemetry import EVENT, EVENTS_BYTES

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]

POLICY = """\
policy {name} {{
    port {port}
    default deny
    {mode}
    allow GET /ok log
    allow GET,HEAD /quiet
    allow POST /upload
    audit * /audit/**
    deny  * /admin/**
}}
"""
LINES = {0: 5, 1: 6, 2: 7, 3: 8, 4: 9}  # rule index -> source line in POLICY


def _read_response(sock: socket.socket, timeout: float) -> bytes:
    """One response (head and Content-Length body), or what arrives before the timeout. (Not
    imported from conftest: with tests/kernel/ktls collected too, `conftest` is ambiguous.)"""
    sock.settimeout(timeout)
    buf = b""
    try:
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                length = 0
                for line in buf[:end].split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip() or 0)
                if len(buf) >= end + 4 + length:
                    return buf
            chunk = sock.recv(65536)
            if not chunk:
                return buf
            buf += chunk
    except OSError:
        return buf


def req(method: str, path: str, host: str = "shop.example.com", body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body


# The traffic most tests send: one connection per inner list, one send per item. A refusal ends
# its connection, so each refused request has a connection of its own.
TRAFFIC = [
    [
        req("GET", "/ok"),
        req("GET", "/quiet", host="a.example"),
        req("POST", "/upload", body=b"x" * 100),
        req("PUT", "/audit/x", host="Audit.Example:8080", body=b"abc"),
        req("GET", "/ok", host="b"),
    ],
    [req("DELETE", "/admin/users")],
    [req("GET", "/nowhere")],
    [b"\x01\x03\x01\x00\xa5\x01\x00"],  # binary, not a TLS record either: bad-method
    [req("GET", "/admin/x")],  # rule 4 again (a dot-segment spelling is ambiguous-path now)
]


def session(port: int, connections: list[list[bytes]]) -> dict:
    """Client side (runs in the cgroup): like conftest.http_session, and says who it was."""
    out = []
    for sends in connections:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        results = []
        for data in sends:
            try:
                results.append((s.send(data), None))
            except OSError as e:
                results.append((None, e.errno))
                continue
            if b"\r\n\r\n" in data:
                _read_response(s, 1.0)
        out.append({"sport": s.getsockname()[1], "results": results})
        s.close()
    return {"pid": os.getpid(), "connections": out}


def simulated(text: str, connections: list[list[bytes]], mode: int = 0):
    """What the kernel program should do with this traffic: the runs, in order."""
    (compiled,), _ = compile_source(text, "test.pol")
    runs = []
    for sends in connections:
        conn = TablesConnection(compiled.matcher, mode=mode)
        for data in sends:
            if conn.send(data).failed or conn.refused:
                break
        runs += conn.verdicts
    return runs


def expected_counts(runs) -> Counter:
    slots: Counter = Counter()
    for r in runs:
        for slot, requests, nbytes in r.counts:
            slots[slot, "requests"] += requests
            slots[slot, "bytes"] += nbytes
    return slots


def kernel_counts(name: str) -> Counter:
    """The kernel's counters by slot, summed over CPUs (read the way the runtime reads them)."""
    (s,) = [s for s in runtime.status() if s.name == name]
    c = rc.read_counters(s.pin_dir, s.metadata)
    layout = s.metadata.telemetry
    slots: Counter = Counter()

    def put(slot: int, count: rc.Count) -> None:
        if count.requests or count.bytes:
            slots[slot, "requests"] += count.requests
            slots[slot, "bytes"] += count.bytes

    for i, count in enumerate(c.rules):
        put(layout["slot_rules"] + i, count)
    put(layout["slot_default"], c.default)
    put(layout["slot_unjudged"], c.unjudged)
    from sockpol.contract import Reason

    for reason in Reason:
        name_ = reason_slug(reason)
        if name_ in c.refused:
            put(layout["slot_refused"] + reason, c.refused[name_])
        if name_ in c.would_refuse:
            put(layout["slot_would_refuse"] + reason, c.would_refuse[name_])
    return slots


def drain(stream: EventStream, n: int, timeout: float = 5.0) -> list[Event]:
    out: list[Event] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += [e for e in stream.poll(0.1) if isinstance(e, Event)]
    return out


def sockpol(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """The CLI in a new process."""
    return subprocess.run(
        [sys.executable, "-m", "sockpol.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.fixture
def policy(compiled_policy, cgroup, http_server):
    """policy(name, mode="") -> (loaded name, policy text); unloaded afterwards."""
    names = []

    def make(name: str, mode: str = "") -> str:
        text = POLICY.format(name=name, port=http_server.port, mode=mode)
        obj = compiled_policy(text, f"{name}.pol")
        runtime.load(obj, cgroup).close()
        names.append(name)
        return text

    yield make
    for name in names:
        try:
            runtime.unload(name)
        except runtime.PolicyNotFound:
            pass


# ---------------------------------------------------------------------------------------------
# Counters and events


def test_counters_and_events_match_the_traffic(policy, cgroup, http_server, run_in_cgroup):
    text = policy("t-ops")
    with EventStream(["t-ops"]) as stream:
        client = run_in_cgroup(cgroup, session, http_server.port, TRAFFIC)
        events = drain(stream, 7)
        time.sleep(0.3)
        events += [e for e in stream.poll(0.3) if isinstance(e, Event)]

    # Traffic: what passed arrived, what was refused did not.
    results = [r for c in client["connections"] for r in c["results"]]
    assert [e for _, e in results] == [None] * 5 + [errno.EACCES] * 4
    assert [line.split(b" ")[1] for line in http_server.request_lines()] == [
        b"/ok", b"/quiet", b"/upload", b"/audit/x", b"/ok"
    ]  # fmt: skip

    # Counters: exactly what the mirror of the program says, slot by slot.
    runs = simulated(text, TRAFFIC)
    assert kernel_counts("t-ops") == expected_counts(runs)
    (s,) = [s for s in runtime.status() if s.name == "t-ops"]
    c = rc.read_counters(s.pin_dir, s.metadata)
    ok_bytes = len(TRAFFIC[0][0]) + len(TRAFFIC[0][4])
    assert c.rules[0] == rc.Count(2, ok_bytes)  # GET /ok twice, head only
    assert c.rules[2] == rc.Count(1, len(TRAFFIC[0][2]))  # POST: head and its 100-byte body
    assert c.rules[3].requests == 1 and c.rules[4].requests == 2
    assert c.default.requests == 1
    assert {k: v.requests for k, v in c.refused.items()} == {
        "rule": 2, "default": 1, "bad-method": 1
    }  # fmt: skip
    assert {k: v.requests for k, v in c.would_refuse.items()} == {"rule": 1}  # the audit rule
    assert c.lost_events == 0

    # Events: one per refused, audited or logged request, in the order they were sent.
    assert len(events) == 7, events
    summary = [(e.verdict, e.reason, e.rule, e.method, e.host, e.path) for e in events]
    assert summary == [
        ("logged", None, 0, "GET", "shop.example.com", "/ok"),
        ("audit", "rule", 3, "PUT", "Audit.Example:8080", "/audit/x"),
        ("logged", None, 0, "GET", "b", "/ok"),
        ("refused", "rule", 4, "DELETE", "shop.example.com", "/admin/users"),
        ("refused", "default", None, "GET", "shop.example.com", "/nowhere"),
        ("refused", "bad-method", None, "\\x01\\x03\\x01\\x00\\xa5\\x01\\x00", None, ""),
        ("refused", "rule", 4, "GET", "shop.example.com", "/admin/x"),
    ]
    assert [e.line for e in events] == [LINES[0], LINES[3], LINES[0], LINES[4], None, None, 9]
    sim_events = [(r.event.name.lower().replace("_", "-"), r.rule) for r in runs if r.event]
    assert [(e.verdict, e.rule) for e in events] == sim_events
    sports = [c["sport"] for c in client["connections"]]
    assert [e.sport for e in events] == [sports[0]] * 3 + sports[1:]
    cgroup_id = os.stat(cgroup).st_ino
    for e in events:
        assert (e.src, e.dst, e.dport) == ("127.0.0.1", "127.0.0.1", http_server.port)
        assert e.pid == client["pid"] and e.cgroup_id == cgroup_id
        assert e.policy == "t-ops"
    assert [e.size for e in events[:3]] == [len(TRAFFIC[0][i]) for i in (0, 3, 4)]
    times = [e.time_ns for e in events]
    assert times == sorted(times)
    assert abs(events[0].time.timestamp() - time.time()) < 60


def test_event_fields_are_bounded_and_say_when_they_were_cut(
    policy, cgroup, http_server, run_in_cgroup
):
    policy("t-ops-cut")
    long_path = "/admin/" + "a" * 300
    long_host = "h" * 100 + ".example"
    sends = [
        [req("DELETE", long_path, host=long_host)],
        [req("VERYLONGMETHODNAMEX", "/nowhere")],
        [b"GET /nowhere HTTP/1.1\r\nX-Other: 1\r\n\r\n"],  # no Host header
    ]
    with EventStream(["t-ops-cut"]) as stream:
        run_in_cgroup(cgroup, session, http_server.port, sends)
        events = drain(stream, 3)
    first, second, third = events
    assert first.path == long_path[:128] and first.path_len == len(long_path) and first.path_cut
    # The copy starts right after the colon, so the blank before the value takes one byte.
    assert first.host == long_host[:63] and first.host_cut
    assert second.method == "VERYLONGMETHODNA" and second.method_cut
    assert third.host is None and not third.method_cut and third.path == "/nowhere"


def test_chunked_body_bytes_count_for_the_rule_that_passed_the_head(
    policy, cgroup, http_server, run_in_cgroup
):
    policy("t-ops-chunk")
    body = b"5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n"
    head = b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    sends = [[head, body[:10], body[10:], req("GET", "/quiet")]]
    run_in_cgroup(cgroup, session, http_server.port, sends)
    (s,) = [s for s in runtime.status() if s.name == "t-ops-chunk"]
    c = rc.read_counters(s.pin_dir, s.metadata)
    assert c.rules[2] == rc.Count(1, len(head) + len(body))
    assert c.rules[1] == rc.Count(1, len(sends[0][3]))


# ---------------------------------------------------------------------------------------------
# Dry-run, audit, and the hot mode switch


def test_dry_run_passes_and_records_what_enforce_refuses(
    policy, cgroup, http_server, run_in_cgroup
):
    text = policy("t-ops-dry", mode="mode dry-run")
    (before,) = [s for s in runtime.status() if s.name == "t-ops-dry"]
    assert before.mode == "dry-run"
    with EventStream(["t-ops-dry"]) as stream:
        client = run_in_cgroup(cgroup, session, http_server.port, TRAFFIC)
        events = drain(stream, 7)
    # Everything arrived, nothing was refused...
    assert all(e is None for c in client["connections"] for _, e in c["results"])
    http_server.wait_for_requests(8)
    assert len(http_server.request_lines()) == 8  # all but the ClientHello, which isn't HTTP
    # ...and what enforce would have refused is recorded as such.
    assert [(e.verdict, e.reason) for e in events] == [
        ("logged", None), ("audit", "rule"), ("logged", None), ("dry-run", "rule"),
        ("dry-run", "default"), ("dry-run", "bad-method"), ("dry-run", "rule"),
    ]  # fmt: skip
    assert kernel_counts("t-ops-dry") == expected_counts(simulated(text, TRAFFIC, mode=1))
    c = rc.read_counters(before.pin_dir, before.metadata)
    assert c.refused == {}
    assert {k: v.requests for k, v in c.would_refuse.items()} == {
        "rule": 3, "default": 1, "bad-method": 1
    }  # fmt: skip

    # Switch to enforce from another process: a map write, not a reload.
    out = sockpol("mode", "t-ops-dry", "enforce")
    assert out.returncode == 0, out.stderr
    assert "was dry-run" in out.stdout
    (after,) = [s for s in runtime.status() if s.name == "t-ops-dry"]
    assert after.mode == "enforce"
    assert after.program_ids == before.program_ids and after.map_ids == before.map_ids
    client = run_in_cgroup(cgroup, session, http_server.port, TRAFFIC[1:3])
    assert [c["results"][0][1] for c in client["connections"]] == [errno.EACCES] * 2

    # And back: the same requests pass again.
    assert sockpol("mode", "t-ops-dry", "dry-run").returncode == 0
    assert sockpol("mode", "t-ops-dry").stdout.strip() == "t-ops-dry: dry-run"
    client = run_in_cgroup(cgroup, session, http_server.port, TRAFFIC[1:3])
    assert [c["results"][0][1] for c in client["connections"]] == [None, None]


def test_mode_switch_reaches_established_connections(
    policy, cgroup, http_server, connect_in_cgroup
):
    policy("t-ops-live", mode="mode dry-run")
    sock = connect_in_cgroup(cgroup, http_server.port)
    sock.send(req("DELETE", "/admin/a"))  # passes: dry-run
    assert _read_response(sock, 2).startswith(b"HTTP/1.1 200")
    rc.set_mode("t-ops-live", "enforce")
    with pytest.raises(OSError) as refused:
        sock.send(req("DELETE", "/admin/b"))
    assert refused.value.errno == errno.EACCES
    http_server.settle()
    assert [line.split(b" ")[1] for line in http_server.request_lines()] == [b"/admin/a"]


def test_dry_run_connection_without_framing_goes_unjudged_until_enforced(
    policy, cgroup, http_server, connect_in_cgroup
):
    policy("t-ops-unframed", mode="mode dry-run")
    sock = connect_in_cgroup(cgroup, http_server.port)
    sock.send(b"NOT HTTP AT ALL\r\n\r\n")  # refused by the scanner: passed, framing lost
    sock.send(b"more bytes")
    time.sleep(0.2)
    (s,) = [s for s in runtime.status() if s.name == "t-ops-unframed"]
    c = rc.read_counters(s.pin_dir, s.metadata)
    assert c.would_refuse["bad-target"].requests == 1
    assert c.unjudged == rc.Count(1, len(b"more bytes"))
    rc.set_mode("t-ops-unframed", "enforce")
    with pytest.raises(OSError) as refused:
        sock.send(req("GET", "/ok"))
    assert refused.value.errno == errno.EACCES
    c = rc.read_counters(s.pin_dir, s.metadata)
    assert c.refused["bad-target"].requests == 1  # refused for the reason framing was lost


def test_audit_rule_in_enforce_mode_passes_and_records(policy, cgroup, http_server, run_in_cgroup):
    policy("t-ops-audit")
    with EventStream(["t-ops-audit"]) as stream:
        client = run_in_cgroup(cgroup, session, http_server.port, [[req("POST", "/audit/a/b")]])
        (event,) = drain(stream, 1)
    assert client["connections"][0]["results"][0][1] is None
    assert http_server.wait_for_requests(1)
    assert (event.verdict, event.reason, event.rule, event.line) == ("audit", "rule", 3, 8)


# ---------------------------------------------------------------------------------------------
# From new processes: status, events, metrics


def test_status_and_events_from_new_processes(policy, cgroup, http_server, run_in_cgroup):
    policy("t-ops-cli")
    follower = subprocess.Popen(
        [sys.executable, "-m", "sockpol.cli", "events", "t-ops-cli", "--json", "--count", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        time.sleep(1.5)  # the follower opens the ring buffer
        run_in_cgroup(cgroup, session, http_server.port, [TRAFFIC[0], TRAFFIC[1]])
        out, err = follower.communicate(timeout=20)
    finally:
        follower.kill()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(x["type"], x["verdict"], x["rule"]) for x in lines] == [
        ("event", "logged", 0), ("event", "audit", 3), ("event", "logged", 0)
    ], err  # fmt: skip

    listing = sockpol("status")
    assert listing.returncode == 0
    row = next(line for line in listing.stdout.splitlines() if line.startswith("t-ops-cli "))
    assert str(http_server.port) in row and str(cgroup) in row and "enforce" in row

    detail = sockpol("status", "t-ops-cli")
    assert "allow GET /ok log" in detail.stdout and "RULE  LINE  REQUESTS" in detail.stdout

    (doc,) = json.loads(sockpol("status", "t-ops-cli", "--json").stdout)
    assert doc["name"] == "t-ops-cli" and doc["mode"] == "enforce"
    assert doc["counters"]["rules"][0]["requests"] == 2
    assert doc["counters"]["refused"]["rule"]["requests"] == 1
    assert doc["object_sha256"] and doc["loaded_at"]


def test_metrics_scraped_match_the_traffic(policy, cgroup, http_server, run_in_cgroup, free_port):
    from prometheus_client.parser import text_string_to_metric_families

    policy("t-ops-metrics")
    run_in_cgroup(cgroup, session, http_server.port, TRAFFIC)
    exporter = subprocess.Popen(
        [sys.executable, "-m", "sockpol.cli", "metrics", "--listen", f"127.0.0.1:{free_port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert "serving sockpol metrics" in exporter.stdout.readline()
        with urllib.request.urlopen(f"http://127.0.0.1:{free_port}/metrics", timeout=10) as r:
            text = r.read().decode()
    finally:
        exporter.terminate()
        assert exporter.wait(10) == 0
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            if labels.get("policy") == "t-ops-metrics":
                labels.pop("policy")
                samples[sample.name, tuple(sorted(labels.items()))] = sample.value

    def rule(n: int, what: str = "requests") -> float:
        action = ["allow", "allow", "allow", "audit", "deny"][n]
        labels = (("action", action), ("line", str(LINES[n])), ("rule", str(n)))
        return samples[f"sockpol_rule_{what}_total", labels]

    assert [rule(n) for n in range(5)] == [2, 1, 1, 1, 2]
    assert rule(2, "bytes") == len(TRAFFIC[0][2])
    assert samples["sockpol_default_requests_total", (("action", "deny"),)] == 1
    assert samples["sockpol_refused_requests_total", (("reason", "rule"),)] == 2
    assert samples["sockpol_refused_requests_total", (("reason", "default"),)] == 1
    assert samples["sockpol_refused_requests_total", (("reason", "bad-method"),)] == 1
    assert samples["sockpol_would_refuse_requests_total", (("reason", "rule"),)] == 1
    assert samples["sockpol_events_lost_total", ()] == 0
    assert samples["sockpol_policy_dry_run", ()] == 0
    loaded = samples["sockpol_policy_loaded_timestamp_seconds", ()]
    assert abs(loaded - time.time()) < 120
    (info,) = [k for k in samples if k[0] == "sockpol_policy_info"]
    assert dict(info[1])["cgroup"] == str(cgroup) and dict(info[1])["mode"] == "enforce"
    assert dict(info[1])["tls"] == "none"


# ---------------------------------------------------------------------------------------------
# Several policies


def test_several_policies_on_different_cgroups_and_ports(
    compiled_policy, cgroup, http_server, run_in_cgroup
):
    # Two servers (the fixture's, and one more of its kind) and two cgroups inside the fixture's.
    servers = [http_server, type(http_server)()]
    groups = [cgroup / "one", cgroup / "two"]
    names = ["t-ops-one", "t-ops-two"]
    try:
        for name, group, server in zip(names, groups, servers, strict=True):
            group.mkdir()
            text = POLICY.format(name=name, port=server.port, mode="")
            runtime.load(compiled_policy(text, f"{name}.pol"), group).close()
        with EventStream(names) as stream:
            for group, server in zip(groups, servers, strict=True):
                run_in_cgroup(group, session, server.port, [[req("GET", "/ok")], TRAFFIC[1]])
            events = drain(stream, 4)
        assert sorted((e.policy, e.verdict) for e in events) == [
            ("t-ops-one", "logged"), ("t-ops-one", "refused"),
            ("t-ops-two", "logged"), ("t-ops-two", "refused"),
        ]  # fmt: skip
        for e in events:
            i = names.index(e.policy)
            assert e.dport == servers[i].port and e.cgroup_id == os.stat(groups[i]).st_ino

        listed = {s.name: s for s in runtime.status()}
        assert {n: listed[n].ports for n in names} == {
            n: [(s.port, s.port)] for n, s in zip(names, servers, strict=True)
        }
        assert {n: listed[n].cgroup for n in names} == {
            n: str(g) for n, g in zip(names, groups, strict=True)
        }
        runtime.unload(names[0])
        assert names[0] not in {s.name for s in runtime.status()}
        # The other one still enforces and counts.
        traffic = [[req("GET", "/quiet")], TRAFFIC[1]]
        out = run_in_cgroup(groups[1], session, servers[1].port, traffic)
        assert [c["results"][0][1] for c in out["connections"]] == [None, errno.EACCES]
        (s,) = [s for s in runtime.status() if s.name == names[1]]
        c = rc.read_counters(s.pin_dir, s.metadata)
        assert c.rules[1].requests == 1 and c.refused["rule"].requests == 2
        # Traffic of the first policy's cgroup is no longer judged.
        out = run_in_cgroup(groups[0], session, servers[0].port, [TRAFFIC[1]])
        assert out["connections"][0]["results"][0][1] is None
    finally:
        for name in names:
            try:
                runtime.unload(name)
            except runtime.PolicyNotFound:
                pass
        servers[1].stop()


def test_replacement_keeps_the_event_stream_and_takes_the_new_mode(
    policy, compiled_policy, cgroup, http_server, run_in_cgroup
):
    policy("t-ops-replace")
    (before,) = [s for s in runtime.status() if s.name == "t-ops-replace"]
    with EventStream(["t-ops-replace"]) as stream:
        text = POLICY.format(name="t-ops-replace", port=http_server.port, mode="mode dry-run")
        runtime.load(compiled_policy(text, "replace.pol"), cgroup).close()
        (after,) = [s for s in runtime.status() if s.name == "t-ops-replace"]
        events_pin = rc.EVENTS_PIN
        assert after.map_ids[events_pin] == before.map_ids[events_pin]  # the same ring buffer
        assert after.map_ids[rc.COUNTS_PIN] != before.map_ids[rc.COUNTS_PIN]  # counters restart
        assert after.mode == "dry-run"
        run_in_cgroup(cgroup, session, http_server.port, [TRAFFIC[1]])
        (event,) = drain(stream, 1)
    assert event.verdict == "dry-run"


# ---------------------------------------------------------------------------------------------
# A flood of events


FLOOD_POLICY = """\
policy {name} {{
    port {port}
    default deny
    allow GET /logged log
    allow GET /quiet
}}
"""
RESPONSE_LINE = b"HTTP/1.1 200"


def flood(port: int, path: str, requests: int, per_send: int) -> dict:
    """Client side: `requests` pipelined GETs of `path` in sends of `per_send`, on one
    connection, reading the responses as they come; how long it took, and what failed."""
    request = f"GET {path} HTTP/1.1\r\nHost: h\r\n\r\n".encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    got = bytearray()

    def reader() -> None:
        while got.count(RESPONSE_LINE) < requests:
            chunk = s.recv(1 << 16)
            if not chunk:
                return
            got.extend(chunk)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    errors = []
    started = time.monotonic()
    for sent in range(0, requests, per_send):
        try:
            s.sendall(request * min(per_send, requests - sent))
        except OSError as e:
            errors.append(e.errno)
            break
    t.join(30)
    elapsed = time.monotonic() - started
    s.close()
    return {"elapsed": elapsed, "errors": errors, "responses": got.count(RESPONSE_LINE)}


def test_a_flood_of_events_never_slows_or_refuses_traffic(
    compiled_policy, cgroup, http_server, run_in_cgroup
):
    capacity = EVENTS_BYTES // (EVENT.size + 8)  # records that fit in the ring buffer
    n = capacity * 8
    text = FLOOD_POLICY.format(name="t-ops-flood", port=http_server.port)
    runtime.load(compiled_policy(text, "flood.pol"), cgroup).close()
    try:
        (s,) = [s for s in runtime.status() if s.name == "t-ops-flood"]
        # Baseline: the same traffic through a rule that records nothing.
        quiet = run_in_cgroup(cgroup, flood, http_server.port, "/quiet", n, 50, timeout=60)
        assert quiet["errors"] == [] and quiet["responses"] == n
        # Nobody reads the events: the ring buffer fills after `capacity` of them...
        filling = run_in_cgroup(cgroup, flood, http_server.port, "/logged", n, 50, timeout=60)
        # ...and this run finds it full from its first request to its last. A reader that
        # starts now sees what the buffer holds, then a report of what was lost meanwhile.
        with EventStream(["t-ops-flood"], rescan=0.5) as stream:
            full = run_in_cgroup(cgroup, flood, http_server.port, "/logged", n, 50, timeout=60)
            until = time.monotonic() + 3
            seen = list(stream.follow(lambda: time.monotonic() > until))
        for run in (filling, full):
            assert run["errors"] == [] and run["responses"] == n  # nothing refused
        http_server.wait_for_requests(3 * n, timeout=30)
        assert len(http_server.requests()) == 3 * n  # every request arrived
        c = rc.read_counters(s.pin_dir, s.metadata)
        assert (c.rules[0].requests, c.rules[1].requests) == (2 * n, n)  # and was counted

        buffered = [e for e in seen if isinstance(e, Event)]
        reports = [e for e in seen if isinstance(e, Lost)]
        assert 0 < len(buffered) <= capacity
        assert all(e.path == "/logged" and e.verdict == "logged" for e in buffered)
        assert sum(r.count for r in reports) == n  # every event of the full run
        assert reports[-1].total == c.lost_events
        # What the buffer held plus what was lost is exactly what was recorded.
        assert len(buffered) + c.lost_events == 2 * n
        # Not slower for it (a generous bound: the machine may be busy with other tests).
        assert full["elapsed"] < 3 * quiet["elapsed"] + 1.0, (full, quiet)
    finally:
        runtime.unload("t-ops-flood")
