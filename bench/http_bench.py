"""HTTP benchmark on loopback: wrk against nginx with no policy, with a hand-written minimal
sk_msg program (the floor), with sockpol policies, and through HAProxy doing the same allow/deny
with ACLs.

    sudo python3 bench/http_bench.py [--sizes 10,1000] [--duration 10] [--rounds 3]
                                     [--mix issue|policy] [--head-sizes 100,500,2000]
                                     [--configs none,floor,sockpol,haproxy]

Configurations, each run `--rounds` times round-robin (so a slow minute on a shared machine hits
all of them alike) and reported as medians and as ratios to the no-policy and the floor runs of
the same invocation:

    none            wrk -> nginx
    floor           wrk (in a cgroup the floor governs) -> nginx: bench/floor/floor.bpf.c, built
                    with clang and loaded with bpftool; one prefix check per request
    sockpol-N       wrk (in a cgroup the N-rule policy governs) -> nginx
    lsm-N           the same policy on the lsm backend (a BPF LSM program on socket_sendmsg,
                    codegen/lsm.py); needs a kernel that runs BPF LSM programs (a VM here)
    haproxy-N       wrk -> HAProxy (the N rules as http-request ACLs) -> nginx
    ingress-N       wrk -> nginx in a cgroup that the N-rule policy with `side ingress` governs
                    (the sk_skb program judges what nginx receives; a second nginx, started in
                    that cgroup on --ingress-port, with the same configuration)

For the configurations that run a BPF program (floor, sockpol-N) the kernel's own statistics
(`kernel.bpf_stats_enabled=1` for the benchmark, the old value restored after) give the
nanoseconds per run of the sk_msg program: run_time_ns / run_cnt of that program over each wrk
run (`bpftool prog show id ID --json` before and after).

Mixes (`--mix`): `issue` (the default) sends the issue's four kinds of GET of about 100 bytes
(bench/policies.py ISSUE_MIX) against the N generated rules with three rules allowing them
inserted at the front; `policy` sends `--requests` requests drawn from rules all over the
generated policy. With `--head-sizes`, every configuration runs once per size, each head padded
to about that many bytes with an `X-Pad` header, and the report gives the slope of ns/run over
head bytes. Every request is checked with sockpol's simulator first: a refused request would end
its connection, and wrk would measure reconnects. nginx answers 200 from memory. Needs root
(cgroups, BPF), wrk, nginx, haproxy, clang and bpftool (bench/run.sh installs them). Traffic
stays on 127.0.0.1.
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
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from pinroot import own_pin_root  # noqa: E402
from policies import (  # noqa: E402
    ISSUE_MIX,
    api_rules,
    haproxy_acls,
    head_bytes,
    issue_rules,
    padded,
    policy_text,
    requests,
)

FLOOR_SRC = HERE / "floor" / "floor.bpf.c"
FLOOR_MSG, FLOOR_SOCKOPS, FLOOR_SOCKS = "floor_msg", "floor_sockops", "floor_socks"
BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
KINDS = ("none", "floor", "sockpol", "lsm", "haproxy", "ingress")

Request = tuple[str, str, dict[str, str]]

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
    client_header_buffer_size 4k;
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


def wrk_script(reqs: list[Request]) -> str:
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


def _judge(rules):
    """A function telling whether the policy of `rules` allows a request (the simulator)."""
    from sockpol.codegen.lower import lower
    from sockpol.codegen.simulate import run
    from sockpol.dsl import load_source

    ir = lower(load_source(policy_text("mix", 80, rules), "mix.pol")[0].policies[0])

    def allows(req: Request, host: str = "127.0.0.1") -> bool:
        method, path, headers = req
        head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
        head += "".join(f"{h}: {v}\r\n" for h, v in headers.items()) + "\r\n"
        return run(ir, head.encode()).allow

    return allows


def allowed_mix(rules, k: int) -> list[Request]:
    """`requests()` checked against the policy itself: a refused request would end its
    connection, and wrk would measure reconnects."""
    allows = _judge(rules)
    return [req for req in requests(rules, k) if allows(req)]


def check_mix(rules, mix: list[Request], host: str) -> None:
    """Raise unless the policy of `rules` allows every request of `mix` (sent to `host`)."""
    allows = _judge(rules)
    refused = [
        f"{m} {p} ({head_bytes(m, p, h, host)} B)" for m, p, h in mix if not allows((m, p, h), host)
    ]
    if refused:
        raise RuntimeError(f"the {len(rules)}-rule policy refuses {', '.join(refused)}")


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
def process(args: list[str], port: int, log: Path, group: Path | None = None):
    """A server process (in `group`, when given: the cgroup an ingress policy governs)."""

    def enter() -> None:
        if group is not None:
            (group / "cgroup.procs").write_text("0")  # 0: the writing process itself

    # Output goes to a file: a pipe nobody reads fills up and blocks the server before it listens.
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, preexec_fn=enter)
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
def cgroup(tag: str = ""):
    from sockpol.runtime.system import cgroup2_mount

    path = cgroup2_mount() / f"sockpol-bench-{tag}{os.getpid()}"
    path.mkdir()
    try:
        yield path
    finally:
        path.rmdir()


def compile_policy(text: str, workdir: Path, name: str, backend: str = "sockmap") -> Path:
    from sockpol.compiler import compile_source

    (compiled,), _ = compile_source(text, f"{name}.pol", backend)
    obj = workdir / f"{name}-{backend}.bpf.o"
    obj.write_bytes(compiled.object_code())
    return obj


@contextmanager
def sockpol_policy(obj: Path, group: Path, name: str) -> Iterator[int]:
    """Load a compiled policy for `group`; yields the id of its judging program (sk_msg, the
    LSM program, or sk_skb for an ingress policy)."""
    from sockpol import runtime
    from sockpol.contract import LSM_PROGRAM, MSG_PROGRAM, SKB_PROGRAM

    loaded = runtime.load(obj, group, name=name)
    loaded.close()
    try:
        ids = loaded.program_ids
        yield ids.get(MSG_PROGRAM) or ids.get(LSM_PROGRAM) or ids[SKB_PROGRAM]
    finally:
        runtime.unload(name)


# ---------------------------------------------------------------------------------------------
# The floor and the kernel's BPF statistics


def bpftool(*args: object, check: bool = True) -> str:
    cmd = ["bpftool", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        message = f"{' '.join(cmd)}: {(proc.stderr or proc.stdout).strip()}"
        if check:
            raise RuntimeError(message)
        print(f"http_bench: cleanup: {message}", file=sys.stderr)
    return proc.stdout


def build_floor(workdir: Path, port: int) -> Path:
    """bench/floor/floor.bpf.c compiled with clang for `port`."""
    obj = workdir / "floor.bpf.o"
    subprocess.run(
        ["clang", "-O2", "-g", "-target", "bpf", f"-DFLOOR_PORT={port}",
         "-c", str(FLOOR_SRC), "-o", str(obj)],
        check=True,
    )  # fmt: skip
    return obj


def floor_pin_dir() -> Path:
    from sockpol.runtime.system import ensure_bpffs

    return ensure_bpffs() / f"sockpol-bench-floor-{os.getpid()}"


@contextmanager
def floor_program(obj: Path, group: Path) -> Iterator[int]:
    """Load the floor with bpftool, attach floor_msg to its sockhash and floor_sockops to
    `group`; yields the id of floor_msg. Everything is detached and unpinned on the way out,
    after an error too."""
    pin = floor_pin_dir()
    msg, sockops, socks = pin / FLOOR_MSG, pin / FLOOR_SOCKOPS, pin / "maps" / FLOOR_SOCKS
    with ExitStack() as undo:
        # Unpinning the last reference frees the programs and the map (a failed loadall may have
        # pinned some of them already).
        undo.callback(shutil.rmtree, pin, ignore_errors=True)
        bpftool("prog", "loadall", obj, pin, "pinmaps", pin / "maps")
        # The verdict program first: a socket inserted before it is attached would not run it.
        bpftool("prog", "attach", "pinned", msg, "msg_verdict", "pinned", socks)
        undo.callback(
            bpftool, "prog", "detach", "pinned", msg, "msg_verdict", "pinned", socks, check=False
        )
        bpftool("cgroup", "attach", group, "sock_ops", "pinned", sockops)
        undo.callback(
            bpftool, "cgroup", "detach", group, "sock_ops", "pinned", sockops, check=False
        )
        yield json.loads(bpftool("prog", "show", "pinned", msg, "--json"))["id"]


@contextmanager
def bpf_stats() -> Iterator[None]:
    """kernel.bpf_stats_enabled=1 for the duration, the old value restored after.

    Also holds a BPF_ENABLE_STATS fd meanwhile (the kernel counts it like the sysctl): on a
    shared machine another process may set the sysctl back to 0 halfway through."""
    import ctypes

    from sockpol.runtime import libbpf

    enable = libbpf.lib().bpf_enable_stats
    enable.argtypes, enable.restype = [ctypes.c_int], ctypes.c_int
    fd = enable(0)  # BPF_STATS_RUN_TIME
    if fd < 0:
        raise RuntimeError(f"BPF_ENABLE_STATS: {os.strerror(-fd)}")
    old = BPF_STATS.read_text().strip()
    try:
        if old != "1":
            BPF_STATS.write_text("1\n")
        yield
    finally:
        if old != "1":
            BPF_STATS.write_text(old + "\n")
        os.close(fd)


def prog_stats(prog_id: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a program; bpftool leaves both out while they are 0."""
    info = json.loads(bpftool("prog", "show", "id", prog_id, "--json"))
    return info.get("run_time_ns", 0), info.get("run_cnt", 0)


# ---------------------------------------------------------------------------------------------
# wrk


def run_wrk(
    args: argparse.Namespace, port: int, script: Path, group: Path | None, prog: int | None = None
) -> dict:
    """One wrk run; with `prog`, the program's runs and time over it from the kernel's stats."""
    cmd = [
        "wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s",
        "--latency", "-s", str(script), f"http://127.0.0.1:{port}/",
    ]  # fmt: skip

    def enter() -> None:
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    before = prog_stats(prog) if prog is not None else None
    out = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=enter, check=True).stdout
    res = parse_wrk(out)
    if before is not None:
        ns, runs = (a - b for a, b in zip(prog_stats(prog), before, strict=True))
        res["prog_run_time_ns"], res["prog_run_cnt"] = ns, runs
        res["ns_per_run"] = ns / runs if runs else None
        res["runs_per_request"] = runs / res["requests"] if res["requests"] else None
        if not runs:
            print(f"http_bench: program {prog} ran 0 times (statistics off?)", file=sys.stderr)
    return res


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_wrk(out: str) -> dict:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = re.search(r"^\s*(\d+) requests in", out, re.M)
    lat = {
        p: float(v) * UNITS[u]
        for p, v, u in re.findall(r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    }
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "requests": int(total.group(1)) if total else None,
        "p50_ms": lat.get("50"),
        "p90_ms": lat.get("90"),
        "p99_ms": lat.get("99"),
        "errors": (errors.group(1) if errors else "")
        + (f" non2xx {non2xx.group(1)}" if non2xx else ""),
    }


# ---------------------------------------------------------------------------------------------
# Report


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x."""
    if len({x for x, _ in points}) < 2:
        return None
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def summarize(
    results: dict[tuple[str, int | None], list[dict]],
    head_bytes: dict[tuple[str, int | None], float],
) -> list[dict]:
    """One row per (configuration, head size): medians, ratios to `none` and `floor` at the
    same head size, and per configuration the slope of ns/run over head bytes (`head_bytes`:
    the mean length of the heads each sent)."""
    rows = []
    for (name, head), runs in results.items():
        rps = statistics.median(r["rps"] for r in runs)
        rows.append(
            {
                "config": name,
                "pad_to": head,
                "head_bytes": head_bytes[name, head],
                "rps": rps,
                "p50_ms": _median([r["p50_ms"] for r in runs]),
                "p99_ms": _median([r["p99_ms"] for r in runs]),
                "ns_per_run": _median([r.get("ns_per_run") for r in runs]),
                "runs_per_request": _median([r.get("runs_per_request") for r in runs]),
                # The program's time per request: what ns/run hides when a program also runs
                # for other sends (the lsm backend's runs for every sendmsg on the machine,
                # nginx's responses included, most of them a short exit).
                "ns_per_request": _median(
                    [
                        r["prog_run_time_ns"] / r["requests"]
                        for r in runs
                        if r.get("prog_run_time_ns") is not None and r.get("requests")
                    ]
                ),
                "runs": [round(r["rps"]) for r in runs],
                "ns_per_run_runs": [
                    round(r["ns_per_run"]) for r in runs if r.get("ns_per_run") is not None
                ],
                "errors": sorted({r["errors"] for r in runs if r["errors"]}),
            }
        )
    for row in rows:
        same = {r["config"]: r for r in rows if r["pad_to"] == row["pad_to"]}
        for ref in ("none", "floor"):
            row[f"rps_vs_{ref}"] = row["rps"] / same[ref]["rps"] if ref in same else None
        # The same ratios round by round (the configurations of a round run one after the
        # other, so they share the machine's state of the moment), then their median: on a
        # machine whose throughput drifts from round to round by more than the programs
        # differ, the ratio of medians mixes rounds, this does not.
        proxy = "haproxy-" + row["config"].split("-", 1)[1] if "-" in row["config"] else None
        for key, ref in (("floor", "floor"), ("haproxy", proxy)):
            other = same.get(ref) if ref and ref != row["config"] else None
            paired = None
            if other is not None and len(other["runs"]) == len(row["runs"]):
                pairs = zip(row["runs"], other["runs"], strict=True)
                paired = statistics.median(a / b for a, b in pairs)
            row[f"rps_vs_{key}_paired"] = paired
        points = [
            (r["head_bytes"], r["ns_per_run"])
            for r in rows
            if r["config"] == row["config"] and r["ns_per_run"] is not None
        ]
        row["ns_per_head_byte"] = _slope(points)
    return rows


def _num(value: float | None, fmt: str, unit: str = "") -> str:
    return "–" if value is None else f"{value:{fmt}}{unit}"


def markdown(rows: list[dict]) -> str:
    out = (
        "| configuration | head | requests/s (median) | vs none | vs floor | vs floor, paired "
        "| vs HAProxy, paired | ns/run (median) "
        "| ns/run (runs) | runs/request | program ns/request | p50 latency | p99 latency "
        "| runs (req/s) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|\n"
    )
    for r in rows:
        ns_runs = " · ".join(f"{v:,}" for v in r["ns_per_run_runs"]) or "–"
        out += (
            f"| {r['config']} | {r['head_bytes']:.0f} B | {r['rps']:,.0f} "
            f"| {_num(r['rps_vs_none'], '.2f')} | {_num(r['rps_vs_floor'], '.2f')} "
            f"| {_num(r['rps_vs_floor_paired'], '.2f')} "
            f"| {_num(r['rps_vs_haproxy_paired'], '.2f')} "
            f"| {_num(r['ns_per_run'], ',.0f')} | {ns_runs} "
            f"| {_num(r['runs_per_request'], '.2f')} | {_num(r['ns_per_request'], ',.0f')} "
            f"| {_num(r['p50_ms'], '.3f', ' ms')} "
            f"| {_num(r['p99_ms'], '.3f', ' ms')} | {' · '.join(f'{v:,}' for v in r['runs'])} |\n"
        )
    pads = sorted({r["pad_to"] for r in rows if r["pad_to"] is not None})
    slopes = {r["config"]: r for r in rows if r["ns_per_head_byte"] is not None}
    if len(pads) > 1 and slopes:
        out += (
            "\n| configuration | "
            + " | ".join(f"ns/run, heads of ~{p} B" for p in pads)
            + " | ns per extra head byte |\n|---|"
            + "---:|" * (len(pads) + 1)
            + "\n"
        )
        for name, slope_row in slopes.items():
            at = {r["pad_to"]: r for r in rows if r["config"] == name}
            cells = " | ".join(
                f"{_num(at[p]['ns_per_run'], ',.0f')} ({at[p]['head_bytes']:.0f} B)" for p in pads
            )
            out += f"| {name} | {cells} | {slope_row['ns_per_head_byte']:.2f} |\n"
    return out


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    with own_pin_root("bench-http"):
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,1000", help="rule counts of the generated policies")
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--port", type=int, default=18080)
    ap.add_argument("--proxy-port", type=int, default=18081)
    ap.add_argument("--ingress-port", type=int, default=18082, help="the nginx of ingress-N")
    ap.add_argument(
        "--mix",
        choices=("issue", "policy"),
        default="issue",
        help="issue: the four request kinds of bench/policies.py ISSUE_MIX (default); "
        "policy: --requests requests drawn from the generated policy",
    )
    ap.add_argument("--requests", type=int, default=64, help="distinct requests (--mix policy)")
    ap.add_argument(
        "--head-sizes",
        help="comma-separated head lengths in bytes (e.g. 100,500,2000): run every "
        "configuration once per size, each head padded with an X-Pad header",
    )
    ap.add_argument(
        "--configs",
        default=",".join(k for k in KINDS if k != "lsm"),
        help=f"which kinds of configuration to run, of {','.join(KINDS)} (default: all but "
        "lsm, which needs a kernel that runs BPF LSM programs)",
    )
    ap.add_argument(
        "--bpf-stats",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="kernel.bpf_stats_enabled=1 for the run, ns/run of the sk_msg programs (default)",
    )
    ap.add_argument("--out", help="write the summary as JSON here")
    args = ap.parse_args(argv)
    kinds = [k for k in args.configs.split(",") if k]
    if unknown := set(kinds) - set(KINDS):
        ap.error(f"--configs: unknown {', '.join(sorted(unknown))} (of {', '.join(KINDS)})")
    tools = ["wrk", "nginx"] + ["haproxy"] * ("haproxy" in kinds) + ["clang"] * ("floor" in kinds)
    if "floor" in kinds or ({"sockpol", "lsm", "ingress"} & set(kinds) and args.bpf_stats):
        tools.append("bpftool")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing or os.geteuid() != 0:
        print(f"http_bench: needs root and {', '.join(missing) or 'nothing else'}", file=sys.stderr)
        return 2
    sizes = [int(x) for x in args.sizes.split(",")]
    heads: list[int | None] = (
        [int(x) for x in args.head_sizes.split(",")] if args.head_sizes else [None]
    )
    host = f"127.0.0.1:{args.port}"
    rules = {n: issue_rules(n) if args.mix == "issue" else api_rules(n) for n in sizes}

    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sockpol-http-")))
        # The requests per (policy size, head size); None: the mix of the configurations without
        # a policy of their own (in the issue mix, the same requests as every policy's).
        if args.mix == "issue":
            base: dict[int | None, list[Request]] = {n: ISSUE_MIX for n in [None, *sizes]}
        else:
            # Each policy gets requests drawn from its own allowed rules, spread over the whole
            # policy (HAProxy's ACLs are evaluated in order, so where a request matches matters
            # to it); the others send the largest policy's mix.
            base = {n: allowed_mix(rules[n], args.requests) for n in sizes}
            base[None] = base[max(sizes)]
        scripts: dict[tuple[int | None, int | None], Path] = {}
        head_len: dict[tuple[int | None, int | None], float] = {}  # mean bytes per head
        for n, mix in base.items():
            sent_by_n = []
            for head in heads:
                reqs = mix if head is None else padded(mix, head, host)
                scripts[n, head] = work / f"mix{n}-{head}.lua"
                scripts[n, head].write_text(wrk_script(reqs))
                head_len[n, head] = statistics.fmean(head_bytes(*r, host) for r in reqs)
                sent_by_n += reqs
            if n is not None:
                check_mix(rules[n], sent_by_n, host)

        (work / "nginx.conf").write_text(NGINX_CONF.format(dir=work, port=args.port))
        nginx = shutil.which("nginx")
        stack.enter_context(
            process([nginx, "-c", str(work / "nginx.conf")], args.port, work / "nginx.log")
        )
        if "ingress" in kinds:  # the same nginx, in the cgroup the ingress policies govern
            ingress_group = stack.enter_context(cgroup("in-"))
            (work / "in").mkdir()
            (work / "in" / "nginx.conf").write_text(
                NGINX_CONF.format(dir=work / "in", port=args.ingress_port)
            )
            conf = str(work / "in" / "nginx.conf")
            stack.enter_context(
                process([nginx, "-c", conf], args.ingress_port, work / "in.log", ingress_group)
            )
        configs: list[tuple[str, str, int | None]] = []
        for kind in (k for k in KINDS if k in kinds):
            if kind in ("none", "floor"):
                configs.append((kind, kind, None))
            else:
                configs += [(f"{kind}-{n}", kind, n) for n in sizes]
        # Built once (not per run: compiling 10,000 rules takes seconds).
        objects: dict[str, Path] = {}
        for name, kind, n in configs:
            if kind == "floor":
                objects[name] = build_floor(work, args.port)
            elif kind in ("sockpol", "lsm"):
                text = policy_text(f"bench{n}", args.port, rules[n])
                backend = "lsm" if kind == "lsm" else "sockmap"
                objects[name] = compile_policy(text, work, f"bench{n}", backend)
            elif kind == "ingress":
                text = policy_text(f"benchin{n}", args.ingress_port, rules[n]).replace(
                    f"port {args.ingress_port}\n",
                    f"port {args.ingress_port}\n    side ingress\n",
                    1,
                )
                objects[name] = compile_policy(text, work, f"benchin{n}")
            elif kind == "haproxy":
                acls = "\n".join(haproxy_acls(rules[n]))
                objects[name] = work / f"haproxy{n}.cfg"
                objects[name].write_text(
                    HAPROXY_CONF.format(proxy_port=args.proxy_port, port=args.port, acls=acls)
                )
        stats = args.bpf_stats and bool({"floor", "sockpol", "lsm", "ingress"} & set(kinds))
        if stats:
            stack.enter_context(bpf_stats())

        def run_config(name: str, kind: str, n: int | None, script: Path) -> dict:
            if kind == "none":
                return run_wrk(args, args.port, script, None)
            if kind == "haproxy":
                haproxy = ["haproxy", "-f", str(objects[name]), "-db"]
                with process(haproxy, args.proxy_port, work / "haproxy.log"):
                    return run_wrk(args, args.proxy_port, script, None)
            if kind == "ingress":
                with sockpol_policy(objects[name], ingress_group, f"benchin{n}") as prog:
                    return run_wrk(args, args.ingress_port, script, None, prog if stats else None)
            with ExitStack() as run_stack:
                group = run_stack.enter_context(cgroup())
                if kind == "floor":
                    prog = run_stack.enter_context(floor_program(objects[name], group))
                else:
                    prog = run_stack.enter_context(
                        sockpol_policy(objects[name], group, f"bench{n}")
                    )
                return run_wrk(args, args.port, script, group, prog if stats else None)

        def mix_of(kind: str, n: int | None, head: int | None) -> tuple[int | None, int | None]:
            return (n if kind in ("sockpol", "lsm", "haproxy", "ingress") else None), head

        results: dict[tuple[str, int | None], list[dict]] = {
            (name, head): [] for head in heads for name, _, _ in configs
        }
        sent = {(name, h): head_len[mix_of(kind, n, h)] for h in heads for name, kind, n in configs}
        for round_ in range(args.rounds):
            for head in heads:
                for name, kind, n in configs:
                    res = run_config(name, kind, n, scripts[mix_of(kind, n, head)])
                    results[name, head].append(res)
                    label = name if head is None else f"{name} head {head}"
                    print(f"round {round_ + 1} {label}: {json.dumps(res)}", file=sys.stderr)
    rows = summarize(results, sent)
    print(markdown(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
