"""Refusal benchmark: what a refused request costs against an allowed one (issue "403 answer").

    sudo python3 bench/answer_bench.py [--duration 10] [--rounds 3]

One policy (the issue's 10-rule policy plus `deny * /admin/**`) loaded three times: with
`answer 403` (the kernel answers each refusal with a response the client reads), with `answer
drop` (send() fails, the connection ends), and for the allowed mix. wrk (16 connections) sends
either only allowed requests (the issue's mix) or only refused ones (`GET /admin/users`), in the
same run, round-robin; requests judged per second (program runs: with `drop` wrk sees no
response to count), responses per second, and ns per program run. A refused request ends its
connection either way (the answer says `Connection: close`; a drop fails every later send), so
wrk reconnects for each: the refused rate includes a TCP connection per request. wrk counts the
403s as non-2xx responses; with `drop` it counts socket errors (reads after the failed send).

Needs root, wrk and nginx. Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import http_bench as hb  # noqa: E402
from pinroot import own_pin_root  # noqa: E402
from policies import ISSUE_MIX, issue_rules, policy_text  # noqa: E402

REFUSED = [("GET", "/admin/users", {"User-Agent": "wrk/4.1.0", "Accept": "*/*"})]


def policy(port: int, answer: str) -> str:
    text = policy_text("answers", port, issue_rules(10))
    head, rest = text.split("    default deny\n", 1)
    return f"{head}    default deny\n    answer {answer}\n    deny * /admin/**\n{rest}"


def main(argv: list[str] | None = None) -> int:
    with own_pin_root("bench-answer"):
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--port", type=int, default=18096)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    configs = [("allowed", "403", ISSUE_MIX), ("refused-403", "403", REFUSED),
               ("refused-drop", "drop", REFUSED)]  # fmt: skip
    results: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sockpol-answer-")))
        (work / "nginx.conf").write_text(hb.NGINX_CONF.format(dir=work, port=args.port))
        stack.enter_context(
            hb.process(["nginx", "-c", str(work / "nginx.conf")], args.port, work / "nginx.log")
        )
        objects = {
            a: hb.compile_policy(policy(args.port, a), work, f"a{a}") for a in ("403", "drop")
        }
        scripts = {}
        for name, _, reqs in configs:
            scripts[name] = work / f"{name}.lua"
            scripts[name].write_text(hb.wrk_script(reqs))
        stack.enter_context(hb.bpf_stats())
        for round_ in range(args.rounds):
            for name, answer, _ in configs:
                with (
                    hb.cgroup() as group,
                    hb.sockpol_policy(objects[answer], group, "bench-answer") as prog,
                ):
                    res = hb.run_wrk(args, args.port, scripts[name], group, prog)
                results[name].append(res)
                print(f"round {round_ + 1} {name}: {json.dumps(res)}", file=sys.stderr)
    rows = []
    for name, runs in results.items():
        rows.append(
            {
                "config": name,
                "rps": statistics.median(r["rps"] for r in runs),
                "ns_per_run": statistics.median(r["ns_per_run"] or 0 for r in runs),
                # Program runs per second: with `drop` wrk counts no response, only failed writes.
                "runs_per_s": statistics.median(r["prog_run_cnt"] / args.duration for r in runs),
                "errors": sorted({r["errors"] for r in runs if r["errors"]}),
            }
        )
    base = rows[0]["runs_per_s"]
    print("| requests | judged/s | vs allowed | responses/s (wrk) | ns/run | wrk's errors |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['runs_per_s']:,.0f} | {r['runs_per_s'] / base:.2f} "
            f"| {r['rps']:,.0f} | {r['ns_per_run']:,.0f} | {'; '.join(r['errors']) or '-'} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
