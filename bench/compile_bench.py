"""Compile-side benchmark: time, object size, table memory and verifier count per policy size.

    python3 bench/compile_bench.py [--sizes 10,100,1000,10000] [--out results.json]

For each size it writes a generated policy (bench/policies.py), times `sockpol compile` in a fresh
process (so imports count, as they do for a user), and reads the sizes and, as root, the
verifier's processed-instruction count (sockpol/stats.py) from the object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from policies import api_rules, policy_text  # noqa: E402

from sockpol.compiler import compile_source  # noqa: E402
from sockpol.diagnostics import CompileError  # noqa: E402
from sockpol.stats import compile_stats  # noqa: E402


def bench_size(n: int, workdir: Path, repeat: int) -> dict:
    source = workdir / f"api{n}.pol"
    source.write_text(policy_text(f"api{n}", 8080, api_rules(n)))
    out = workdir / f"api{n}.bpf.o"
    walls, cpus = [], []
    error = ""
    for _ in range(repeat):
        start = time.perf_counter()
        before = os.times()
        proc = subprocess.run(
            [sys.executable, "-m", "sockpol.cli", "compile", str(source), "-o", str(out)],
            capture_output=True,
            text=True,
            cwd=HERE.parent,
        )
        after = os.times()
        walls.append(time.perf_counter() - start)
        cpus.append(after.children_user - before.children_user)
        if proc.returncode != 0:
            error = proc.stderr.strip().splitlines()[0] if proc.stderr.strip() else "failed"
            break
    row: dict = {"rules": n, "compile_s": min(walls), "compile_cpu_s": min(cpus)}
    if error:
        row["error"] = error
        return row
    try:
        (c,), _ = compile_source(source.read_text(), str(source))
    except CompileError as e:  # pragma: no cover - the subprocess compiled it
        row["error"] = str(e)
        return row
    s = compile_stats(c, out.read_bytes())
    row.update(
        object_bytes=s.object_bytes,
        table_bytes=s.data_bytes,
        path_states=s.path_states,
        path_slots=s.path_slots,
        scanner_states=s.scanner_states,
        rule_classes=s.rule_classes,
        longest_candidates=s.longest_candidates,
        verified_insns=s.verified_insns.get("sockpol_msg"),
        verifier_note=s.verifier_note,
    )
    return row


def markdown(rows: list[dict]) -> str:
    head = (
        "| rules | compile (wall) | compile (CPU) | object | tables (.data) | path states | "
        "candidates/request | verifier insns |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['rules']} | {r['compile_s']:.2f} s | | | | | | {r['error']} |")
            continue
        insns = r["verified_insns"] if r["verified_insns"] is not None else r["verifier_note"]
        lines.append(
            f"| {r['rules']} | {r['compile_s']:.2f} s | {r['compile_cpu_s']:.2f} s | "
            f"{r['object_bytes'] / 1024:.0f} KiB | {r['table_bytes'] / 1024:.0f} KiB | "
            f"{r['path_states']} | {r['longest_candidates']} | {insns} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,100,1000,10000")
    ap.add_argument("--repeat", type=int, default=3, help="compiles per size (best is kept)")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sockpol-bench-") as tmp:
        for n in (int(x) for x in args.sizes.split(",")):
            rows.append(bench_size(n, Path(tmp), args.repeat))
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(markdown(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
