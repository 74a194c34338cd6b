"""HTTP benchmark on loopback: wrk against nginx with no policy, with sockpol policies, and
through HAProxy doing the same allow/deny with ACLs.

    sudo python3 bench/http_bench.py [--sizes 10,1000] [--duration 10] [--rounds 3]

Configurations, each run `--rounds` times round-robin (so a slow minute on a shared machine hits
all of them alike) and reported as medians and as ratios to the no-policy run of the same
invocation:

    none            wrk -> nginx
    sockpol-N       wrk (in a cgroup the N-rule policy governs) -> nginx
    haproxy-N       wrk -> HAProxy (the N rules as http-request ACLs) -> nginx

wrk sends a fixed mix of requests the policy allows (bench/policies.py), one connection each
kept alive; nginx answers 200 from memory. Needs root (cgroups, BPF), and wrk, nginx, haproxy
(bench/run.sh installs them). Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from policies import api_rules, haproxy_acls, policy_text, requests  # noqa: E402

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx.err warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir};
    proxy_temp_path {dir};
    fastcgi_temp_path {dir};
    uwsgi_temp_path {dir};
    scgi_temp_path {dir};
    keepalive_requests 100000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""

HAPROXY_CONF = """\
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
frontend bench
    bind 127.0.0.1:{proxy_port}
{acls}
    default_backend nginx
backend nginx
    http-reuse always
    server nginx 127.0.0.1:{port}
"""


def wrk_script(reqs: list[tuple[str, str, dict[str, str]]]) -> str:
    """A wrk script cycling through `reqs`. They are formatted in init(): at the script's top
    level wrk has not set its Host header yet, and requests without one get 400s."""
    lines = ["local reqs = {}", "function init(args)", "  reqs = {"]
    for method, path, headers in reqs:
        hs = ", ".join(f'["{k}"] = "{v}"' for k, v in headers.items())
        lines.append(f'    wrk.format("{method}", "{path}", {{{hs}}}),')
    lines += [
        "  }",
        "end",
        "local i = 0",
        "request = function()",
        "  i = i % #reqs + 1",
        "  return reqs[i]",
        "end",
    ]
    return "\n".join(lines) + "\n"


def allowed_mix(rules, k: int) -> list[tuple[str, str, dict[str, str]]]:
    """`requests()` checked against the policy itself: a refused request would end its
    connection, and wrk would measure reconnects."""
    from sockpol.codegen.lower import lower
    from sockpol.codegen.simulate import run
    from sockpol.dsl import load_source

    ir = lower(load_source(policy_text("mix", 80, rules), "mix.pol")[0].policies[0])
    out = []
    for method, path, headers in requests(rules, k):
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        head += "".join(f"{h}: {v}\r\n" for h, v in headers.items()) + "\r\n"
        if run(ir, head.encode()).allow:
            out.append((method, path, headers))
    return out


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


@contextmanager
def process(args: list[str], port: int, log: Path):
    # Output goes to a file: a pipe nobody reads fills up and blocks the server before it listens.
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_port(port)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def cgroup():
    from sockpol.runtime.system import cgroup2_mount

    path = cgroup2_mount() / f"sockpol-bench-{os.getpid()}"
    path.mkdir()
    try:
        yield path
    finally:
        path.rmdir()


@contextmanager
def sockpol_policy(text: str, workdir: Path, group: Path, name: str):
    from sockpol import runtime
    from sockpol.compiler import compile_source

    (compiled,), _ = compile_source(text, f"{name}.pol")
    obj = workdir / f"{name}.bpf.o"
    obj.write_bytes(compiled.object_code())
    loaded = runtime.load(obj, group, name=name)
    loaded.close()
    try:
        yield
    finally:
        runtime.unload(name)


def run_wrk(args: argparse.Namespace, port: int, script: Path, group: Path | None) -> dict:
    cmd = [
        "wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s",
        "--latency", "-s", str(script), f"http://127.0.0.1:{port}/",
    ]  # fmt: skip

    def enter() -> None:
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    out = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=enter, check=True).stdout
    return parse_wrk(out)


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_wrk(out: str) -> dict:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {
        p: float(v) * UNITS[u]
        for p, v, u in re.findall(r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    }
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": lat.get("50"),
        "p90_ms": lat.get("90"),
        "p99_ms": lat.get("99"),
        "errors": (errors.group(1) if errors else "")
        + (f" non2xx {non2xx.group(1)}" if non2xx else ""),
    }


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    base = statistics.median(r["rps"] for r in results["none"])
    base_p50 = statistics.median(r["p50_ms"] for r in results["none"])
    rows = []
    for name, runs in results.items():
        rps = statistics.median(r["rps"] for r in runs)
        p50 = statistics.median(r["p50_ms"] for r in runs)
        p99 = statistics.median(r["p99_ms"] for r in runs)
        rows.append(
            {
                "config": name,
                "rps": rps,
                "rps_ratio": rps / base,
                "p50_ms": p50,
                "p50_ratio": p50 / base_p50,
                "p99_ms": p99,
                "runs": [round(r["rps"]) for r in runs],
                "errors": sorted({r["errors"] for r in runs if r["errors"]}),
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    out = (
        "| configuration | requests/s (median) | vs none | p50 latency | vs none | p99 latency "
        "| runs (req/s) |\n|---|---:|---:|---:|---:|---:|---|\n"
    )
    for r in rows:
        out += (
            f"| {r['config']} | {r['rps']:.0f} | {r['rps_ratio']:.2f} | {r['p50_ms']:.3f} ms | "
            f"{r['p50_ratio']:.2f} | {r['p99_ms']:.3f} ms | {r['runs']} |\n"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,1000")
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--port", type=int, default=18080)
    ap.add_argument("--proxy-port", type=int, default=18081)
    ap.add_argument("--requests", type=int, default=64, help="distinct requests in the mix")
    ap.add_argument("--out", help="write the summary as JSON here")
    args = ap.parse_args(argv)
    missing = [t for t in ("wrk", "nginx", "haproxy") if shutil.which(t) is None]
    if missing or os.geteuid() != 0:
        print(f"http_bench: needs root and {', '.join(missing) or 'nothing else'}", file=sys.stderr)
        return 2
    sizes = [int(x) for x in args.sizes.split(",")]
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sockpol-http-")))
        (work / "nginx.conf").write_text(NGINX_CONF.format(dir=work, port=args.port))
        nginx = shutil.which("nginx")
        stack.enter_context(
            process([nginx, "-c", str(work / "nginx.conf")], args.port, work / "nginx.log")
        )
        # Each policy gets requests drawn from its own allowed rules, spread over the whole
        # policy (HAProxy's ACLs are evaluated in order, so where a request matches matters to
        # it); the no-policy run sends the largest policy's mix.
        scripts = {}
        for n in sizes:
            scripts[n] = work / f"mix{n}.lua"
            scripts[n].write_text(wrk_script(allowed_mix(api_rules(n), args.requests)))
        scripts[None] = scripts[max(sizes)]
        configs: list[tuple[str, object]] = [("none", None)]
        for n in sizes:
            configs.append((f"sockpol-{n}", n))
        for n in sizes:
            configs.append((f"haproxy-{n}", n))
        results: dict[str, list[dict]] = {name: [] for name, _ in configs}
        for round_ in range(args.rounds):
            for name, n in configs:
                script = scripts[n]
                if name == "none":
                    res = run_wrk(args, args.port, script, None)
                elif name.startswith("sockpol"):
                    text = policy_text(f"bench{n}", args.port, api_rules(n))
                    with cgroup() as group, sockpol_policy(text, work, group, f"bench{n}"):
                        res = run_wrk(args, args.port, script, group)
                else:
                    cfg = work / f"haproxy{n}.cfg"
                    acls = "\n".join(haproxy_acls(api_rules(n)))
                    cfg.write_text(
                        HAPROXY_CONF.format(proxy_port=args.proxy_port, port=args.port, acls=acls)
                    )
                    haproxy = ["haproxy", "-f", str(cfg), "-db"]
                    with process(haproxy, args.proxy_port, work / "haproxy.log"):
                        res = run_wrk(args, args.proxy_port, script, None)
                results[name].append(res)
                print(f"round {round_ + 1} {name}: {json.dumps(res)}", file=sys.stderr)
    rows = summarize(results)
    print(markdown(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
