"""Reload benchmark: how long `sockpol reload` takes, and what a reload storm costs traffic.

    sudo python3 bench/reload_bench.py [--sizes 10,1000,10000] [--duration 10] [--every 0.5]

1. Latency: for each size N, the policy of N generated rules (bench/policies.py) is loaded, then
   reloaded `--repeat` times with the same shape (a tables swap) and reloaded from and to another
   size (a replacement: new programs, every open connection handed over). Wall time of
   `sockpol.runtime.reload` (what `sockpol reload NAME FILE.o` spends after compiling), median.
2. Storm: wrk on keep-alive connections against nginx through the policy, `--duration` seconds,
   once without reloads and once with a reload every `--every` seconds alternating between the
   smallest and the largest size (every one a replacement), side by side; requests per second,
   and every non-2xx response or socket error wrk saw (a lost request shows there).

Needs root, wrk and nginx (bench/run.sh installs them). Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import http_bench as hb  # noqa: E402
from pinroot import own_pin_root  # noqa: E402
from policies import ISSUE_MIX, issue_rules, policy_text  # noqa: E402

NAME = "bench-reload"


def timed_reload(obj: Path) -> tuple[float, bool]:
    from sockpol import runtime

    t0 = time.monotonic()
    result = runtime.reload(NAME, obj)
    return time.monotonic() - t0, result.replaced


def latency(objects: dict[int, Path], group: Path, repeat: int) -> list[dict]:
    from sockpol import runtime

    rows = []
    sizes = sorted(objects)
    for n in sizes:
        other = sizes[0] if n != sizes[0] else sizes[-1]
        runtime.load(objects[n], group, name=NAME).close()
        try:
            swaps = [timed_reload(objects[n]) for _ in range(repeat)]
            assert not any(replaced for _, replaced in swaps), "same shape: expected swaps"
            replaces = []
            for _ in range(repeat):
                replaces.append(timed_reload(objects[other])[0])  # away ...
                seconds, replaced = timed_reload(objects[n])  # ... and back: the one measured
                assert replaced, "other shape: expected a replacement"
                replaces.append(seconds)
        finally:
            runtime.unload(NAME)
        rows.append(
            {
                "rules": n,
                "swap_ms": 1000 * statistics.median(s for s, _ in swaps),
                "replace_ms": 1000 * statistics.median(replaces[1::2]),
            }
        )
        print(f"latency {n}: {json.dumps(rows[-1])}", file=sys.stderr)
    return rows


def storm(args, objects: dict[int, Path], group: Path, port: int, script: Path) -> dict:
    from sockpol import runtime

    small, large = objects[min(objects)], objects[max(objects)]
    runtime.load(small, group, name=NAME).close()
    try:
        quiet = hb.run_wrk(args, port, script, group)
        stop = threading.Event()
        reloads: list[float] = []

        def reloader() -> None:
            which = large
            while not stop.wait(args.every):
                reloads.append(timed_reload(which)[0])
                which = small if which == large else large

        thread = threading.Thread(target=reloader)
        thread.start()
        try:
            stormy = hb.run_wrk(args, port, script, group)
        finally:
            stop.set()
            thread.join(timeout=120)
    finally:
        runtime.unload(NAME)
    out = {
        "rps_quiet": quiet["rps"],
        "rps_storm": stormy["rps"],
        "ratio": stormy["rps"] / quiet["rps"],
        "reloads": len(reloads),
        "reload_ms_median": 1000 * statistics.median(reloads) if reloads else None,
        "errors_quiet": quiet["errors"],
        "errors_storm": stormy["errors"],
        "p99_ms_quiet": quiet["p99_ms"],
        "p99_ms_storm": stormy["p99_ms"],
    }
    print(f"storm: {json.dumps(out)}", file=sys.stderr)
    return out


def markdown(lat: list[dict], st: dict) -> str:
    out = "| rules | tables swap (same shape) | replacement (programs, hand-over) |\n"
    out += "|---:|---:|---:|\n"
    for r in lat:
        out += f"| {r['rules']:,} | {r['swap_ms']:.0f} ms | {r['replace_ms']:.0f} ms |\n"
    out += (
        f"\nStorm: {st['reloads']} reloads in {st['duration']} s (median "
        f"{st['reload_ms_median']:.0f} ms each): {st['rps_storm']:,.0f} requests/s against "
        f"{st['rps_quiet']:,.0f} without reloads ({st['ratio']:.2f}); p99 "
        f"{st['p99_ms_storm']:.3f} against {st['p99_ms_quiet']:.3f} ms; errors and non-2xx: "
        f"{st['errors_storm'] or 'none'} (without reloads: {st['errors_quiet'] or 'none'})\n"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    with own_pin_root("bench-reload"):
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,1000,10000")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--every", type=float, default=0.5, help="seconds between storm reloads")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--port", type=int, default=18090)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sockpol-reload-")))
        objects = {
            n: hb.compile_policy(policy_text("reload", args.port, issue_rules(n)), work, f"r{n}")
            for n in sizes
        }
        group = stack.enter_context(hb.cgroup())
        lat = latency(objects, group, args.repeat)
        (work / "nginx.conf").write_text(hb.NGINX_CONF.format(dir=work, port=args.port))
        stack.enter_context(
            hb.process(["nginx", "-c", str(work / "nginx.conf")], args.port, work / "nginx.log")
        )
        script = work / "mix.lua"
        script.write_text(hb.wrk_script(ISSUE_MIX))
        st = storm(args, objects, group, args.port, script)
        st["duration"] = args.duration
    print(markdown(lat, st))
    if args.out:
        Path(args.out).write_text(json.dumps({"latency": lat, "storm": st}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
