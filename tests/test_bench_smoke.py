"""The benchmark scripts run (tiny sizes, no timing assertions): bench/README.md has the numbers.

The floor (bench/floor/floor.bpf.c) and the reading of the kernel's BPF statistics need root,
clang and bpftool: without them those tests skip loudly (a warning and a SKIPPED reason), and
with CI=true they fail instead (scripts/test.sh installs clang and bpftool). The full HTTP run also
needs wrk, nginx and haproxy (bench/run.sh installs them) and skips without them.
"""

from __future__ import annotations

import json
import os
import shutil
import socketserver
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import answer_bench  # noqa: E402
import compile_bench  # noqa: E402
import http_bench  # noqa: E402
import reload_bench  # noqa: E402
from pinroot import own_pin_root  # noqa: E402
from policies import (  # noqa: E402
    ISSUE_MIX,
    PAD_HEADER,
    api_rules,
    haproxy_acls,
    head_bytes,
    issue_rules,
    padded,
    policy_text,
    requests,
)

from sockpol.codegen.lower import lower  # noqa: E402
from sockpol.codegen.simulate import run  # noqa: E402
from sockpol.dsl import load_source  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _pin_root_of_our_own():
    """The benchmarks' policies pinned under a root of this module's, removed after it (as the
    benchmarks' own runs do): never beside the machine's policies, no directory left."""
    with own_pin_root("sockpol-test-bench"):
        yield


@pytest.mark.parametrize("n", [4, 10, 57])
def test_generated_policies_are_valid_and_allow_their_requests(n):
    rules = api_rules(n)
    assert len(rules) == n
    policy_file, warnings = load_source(policy_text("p", 8080, rules), "p.pol")
    ir = lower(policy_file.policies[0])
    mix = http_bench.allowed_mix(rules, 20)
    assert mix and len(mix) >= len(requests(rules, 20)) // 2
    for method, path, headers in mix:
        head = f"{method} {path} HTTP/1.1\r\nHost: h\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        assert run(ir, head.encode()).allow
    acls = haproxy_acls(rules)
    assert len(acls) == n + 1 and acls[-1].strip() == "http-request deny"


@pytest.mark.parametrize("n", [4, 10, 1000])
def test_issue_mix_is_allowed_at_every_head_size(n):
    rules = issue_rules(n)
    assert len(rules) == n + 3 and rules[0].path == "/healthz"
    assert [r.path for r in rules[1:4]] == [
        "/api/v1/orders/*",
        "/api/v1/orders/*/items",
        "/static/**",
    ]
    host = "127.0.0.1:18180"
    assert {p for _, p, _ in ISSUE_MIX} == {
        "/api/v1/orders/17",
        "/api/v1/orders/17/items",
        "/healthz",
        "/static/css/a.css",
    }
    assert all(80 <= head_bytes(*r, host) <= 110 for r in ISSUE_MIX)
    for size in (100, 500, 2000):
        mix = padded(ISSUE_MIX, size, host)
        lengths = [head_bytes(*r, host) for r in mix]
        assert all(size - 10 < length <= size for length in lengths), (size, lengths)
        if size > 200:
            assert all(PAD_HEADER in h for _, _, h in mix)
        http_bench.check_mix(rules, mix, host)  # raises if the simulator refuses one
    with pytest.raises(RuntimeError, match="refuses GET /admin"):
        http_bench.check_mix(rules, [("GET", "/admin", {})], host)
    assert len(haproxy_acls(rules)) == n + 4


def test_compile_bench_runs(tmp_path, capsys):
    out = tmp_path / "compile.json"
    assert compile_bench.main(["--sizes", "10,20", "--repeat", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["rules"] for r in rows] == [10, 20]
    assert all("error" not in r and r["object_bytes"] > 0 for r in rows), rows
    assert "| rules |" in capsys.readouterr().out


def test_wrk_output_is_parsed():
    out = """Running 1s test @ http://127.0.0.1:18180/
  Latency Distribution
     50%  196.00us
     90%    1.63ms
     99%    1.20s
  49658 requests in 1.00s, 7.00MB read
  Non-2xx or 3xx responses: 3
Requests/sec:  49658.31
"""
    got = http_bench.parse_wrk(out)
    assert (got["rps"], got["p50_ms"], got["p90_ms"], got["p99_ms"]) == (
        49658.31,
        0.196,
        1.63,
        1200,
    )
    assert "non2xx 3" in got["errors"] and got["requests"] == 49658
    script = http_bench.wrk_script([("GET", "/a", {}), ("POST", "/b", {"x": "1"})])
    assert 'wrk.format("POST", "/b", {["x"] = "1"})' in script and "function init" in script


# ---------------------------------------------------------------------------------------------
# The floor and the kernel's statistics (root, clang, bpftool)


def _bpf_problem() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "not running as root (loading BPF programs and cgroups need it)"
    missing = [t for t in ("clang", "bpftool") if shutil.which(t) is None]
    if missing:
        return (
            f"{' and '.join(missing)} not installed (scripts/test.sh and bench/run.sh install "
            "clang and bpftool: apt-get install clang bpftool)"
        )
    return None


def _require_bpf() -> None:
    """Skip loudly without root, clang or bpftool; fail instead under CI=true."""
    problem = _bpf_problem()
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(
            f"the benchmark's floor and BPF stats cannot be tested: {problem}", pytrace=False
        )
    warnings.warn(f"BENCH BPF TEST SKIPPED: {problem}", stacklevel=2)
    pytest.skip(f"BENCH BPF TEST SKIPPED: {problem} (with CI=true this fails instead)")


class _Responder(socketserver.StreamRequestHandler):
    """Answers every request head on the connection with an empty 200."""

    def handle(self) -> None:
        while True:
            line = self.rfile.readline()
            if not line:
                return
            while line not in (b"\r\n", b""):
                line = self.rfile.readline()
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


# The first request after the floor was attached has come back EAGAIN here, twice in a few dozen
# full runs (not reproduced alone). A blocking recv() on a socket in a sockhash can fail so:
# tcp_bpf's recvmsg returns -EAGAIN when its wait ends with nothing in its queue. So the client
# tries recv() again, a bounded number of times; an EAGAIN from connect or send still shows.
CLIENT = """
import errno, json, socket, sys, time
port, heads = int(sys.argv[1]), json.loads(sys.argv[2])
out = []
for head in heads:  # one connection each: a refused request ends its connection
    s = socket.create_connection(("127.0.0.1", port))
    try:
        s.sendall(head.encode())
        data, again = b"", 0
        while b"\\r\\n\\r\\n" not in data:
            try:
                chunk = s.recv(4096)
            except BlockingIOError:
                again += 1
                if again > 100:
                    raise
                time.sleep(0.01)
                continue
            if not chunk:
                break
            data += chunk
        out.append(data.split(b" ")[1].decode() if data else "closed")
    except OSError as e:
        out.append(errno.errorcode[e.errno])
    finally:
        s.close()
print(json.dumps(out))
"""


def _send_from(group: Path, port: int, heads: list[str]) -> list[str]:
    """Send each head on its own connection from a process in `group`: the status, or errno."""

    def enter() -> None:
        (group / "cgroup.procs").write_text(str(os.getpid()))

    proc = subprocess.run(
        [sys.executable, "-c", CLIENT, str(port), json.dumps(heads)],
        capture_output=True,
        text=True,
        preexec_fn=enter,
        timeout=60,
        check=True,
    )
    return json.loads(proc.stdout)


def _gone(prog_id: int) -> bool:
    """The program was freed (that happens shortly after its last reference goes)."""
    for _ in range(50):
        if subprocess.run(
            ["bpftool", "prog", "show", "id", str(prog_id)], capture_output=True
        ).returncode:
            return True
        time.sleep(0.1)
    return False


def test_floor_and_bpf_stats(tmp_path):
    """The floor loads, governs the cgroup's connections to its port (refusing /admin, passing
    the rest), and the kernel's statistics count its runs; the same for a sockpol policy; then
    nothing is left: no pins, no programs, the stats sysctl as it was."""
    _require_bpf()
    port = 18182
    host = f"127.0.0.1:{port}"
    mix = ISSUE_MIX + padded(ISSUE_MIX, 2000, host)
    heads = [
        f"{m} {p} HTTP/1.1\r\nHost: {host}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in h.items())
        + "\r\n"
        for m, p, h in mix
    ]
    heads.append(f"GET /admin/users HTTP/1.1\r\nHost: {host}\r\n\r\n")
    expected = ["200"] * len(mix) + ["EACCES"]
    sysctl = http_bench.BPF_STATS.read_text()
    rules = issue_rules(4)
    obj = http_bench.compile_policy(policy_text("benchsmoke", port, rules), tmp_path, "benchsmoke")
    server = _Server(("127.0.0.1", port), _Responder)
    with server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            floor = http_bench.build_floor(tmp_path, port)
            measured = {}
            with http_bench.bpf_stats():
                assert http_bench.BPF_STATS.read_text().strip() == "1"
                for name in ("floor", "sockpol"):
                    with http_bench.cgroup() as group:
                        if name == "floor":
                            program = http_bench.floor_program(floor, group)
                        else:
                            program = http_bench.sockpol_policy(obj, group, "benchsmoke")
                        with program as prog:
                            before = http_bench.prog_stats(prog)
                            got = _send_from(group, port, heads)
                            after = http_bench.prog_stats(prog)
                    assert got == expected, (name, got)
                    ns, runs = after[0] - before[0], after[1] - before[1]
                    assert runs >= len(heads) and ns > 0, (name, before, after)
                    measured[name] = (prog, ns / runs)
        finally:
            server.shutdown()
    print(f"ns/run: {measured}")
    assert http_bench.BPF_STATS.read_text() == sysctl
    assert not http_bench.floor_pin_dir().exists()
    assert all(_gone(prog) for prog, _ in measured.values()), measured


@pytest.mark.skipif(
    os.geteuid() != 0 or any(shutil.which(t) is None for t in ("wrk", "nginx", "haproxy")),
    reason="needs root, wrk, nginx and haproxy (bench/run.sh installs them)",
)
def test_http_bench_runs(tmp_path):
    _require_bpf()
    out = tmp_path / "http.json"
    ports = ["--port", "18180", "--proxy-port", "18181", "--ingress-port", "18182"]
    args = ["--sizes", "4", "--duration", "1", "--rounds", "1", *ports, "--out", str(out)]
    assert http_bench.main([*args, "--mix", "policy", "--requests", "4"]) == 0
    rows = {r["config"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"none", "floor", "sockpol-4", "haproxy-4", "ingress-4"}
    assert all(r["rps"] > 0 and not r["errors"] for r in rows.values()), rows
    for name in ("floor", "sockpol-4", "ingress-4"):
        assert rows[name]["ns_per_run"] > 0 and rows[name]["runs_per_request"] > 0.9, rows[name]
    assert rows["none"]["ns_per_run"] is None and rows["floor"]["rps_vs_floor"] == 1
    # Round by round against the floor and the HAProxy of the same policy.
    assert rows["sockpol-4"]["rps_vs_floor_paired"] > 0
    assert rows["sockpol-4"]["rps_vs_haproxy_paired"] > 0
    assert rows["floor"]["rps_vs_floor_paired"] is None

    # The issue's mix at two head sizes: the slope of ns/run over head bytes.
    assert http_bench.main([*args, "--configs", "floor,sockpol", "--head-sizes", "100,600"]) == 0
    rows = json.loads(out.read_text())
    assert {(r["config"], r["pad_to"]) for r in rows} == {
        (c, p) for c in ("floor", "sockpol-4") for p in (100, 600)
    }
    assert all(r["ns_per_run"] > 0 and r["ns_per_head_byte"] is not None for r in rows), rows
    assert all(r["rps_vs_none"] is None for r in rows)


needs_wrk_and_nginx = pytest.mark.skipif(
    os.geteuid() != 0 or any(shutil.which(t) is None for t in ("wrk", "nginx")),
    reason="needs root, wrk and nginx (bench/run.sh installs them)",
)


@needs_wrk_and_nginx
def test_reload_bench_runs(tmp_path):
    _require_bpf()
    out = tmp_path / "reload.json"
    args = ["--sizes", "4,40", "--repeat", "1", "--duration", "1", "--every", "0.3"]
    assert reload_bench.main([*args, "--port", "18183", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["rules"] for r in result["latency"]] == [4, 40]
    assert all(r["swap_ms"] > 0 and r["replace_ms"] > 0 for r in result["latency"])
    storm = result["storm"]
    assert storm["reloads"] >= 1 and storm["rps_storm"] > 0
    assert not storm["errors_storm"], storm  # no request lost or refused across the reloads


@needs_wrk_and_nginx
def test_answer_bench_runs(tmp_path):
    _require_bpf()
    out = tmp_path / "answer.json"
    assert answer_bench.main(["--rounds", "1", "--duration", "1", "--out", str(out)]) == 0
    rows = {r["config"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"allowed", "refused-403", "refused-drop"}
    assert rows["allowed"]["rps"] > 0 and not rows["allowed"]["errors"]
    assert rows["refused-403"]["rps"] > 0 and "non2xx" in rows["refused-403"]["errors"][0]
    assert rows["refused-drop"]["runs_per_s"] > 0 and rows["refused-drop"]["rps"] == 0


@pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true", reason="needs root")
def test_agent_bench_runs(tmp_path):
    """The node agent's benchmark at a tiny size, in a process of its own (its own pin root)."""
    out = tmp_path / "agent.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / "agent_bench.py"), "--pods", "2", "--latency-repeat", "1",
         "--out", str(out)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(BENCH.parent)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    (size,) = result["sizes"]
    assert size["first"]["actions"] == {"load": 2} and size["change"]["actions"] == {"reload": 2}
    assert size["restart"]["actions"] == {"adopt": 2} and size["remove"]["actions"] == {"unload": 2}
    assert result["new_pod_ms"]["runs"] == 1
