"""The kernel program's scan as BPF machine code (tests/bpfemu.py): what it decides, and how many
instructions it executes for the benchmark's heads (no root, no kernel).

The emulator runs the object's own `sockpol_scan_step` and `sockpol_path_step`, the code that
the kernel verifies and JIT-compiles; tests/scanjit.py runs the same IR compiled for this
machine's CPU instead. The budgets below are counts, not times: the benchmark (bench/README.md)
measures what a head costs, with about 15 ns of noise a measurement, and this test keeps a
change from adding instructions per head or per byte unnoticed. Where a change lowers the counts
for good, lower the budgets with it (docs/design.md, "The cost of a request", has their history).
The counts are LLVM's code (llvmlite 0.50 here): a newer LLVM that emits more for the same IR
fails this too, which is worth knowing before the benchmark shows it.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from sockpol.codegen import simulate
from sockpol.codegen.scanner import END
from sockpol.compiler import compile_source
from sockpol.contract import PATH_MAX

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent / "bench"))
from bpfemu import ScanEmu  # noqa: E402
from policies import ISSUE_MIX, head_bytes, issue_rules, policy_text  # noqa: E402
from test_scan_jit import POLICIES, random_head  # noqa: E402

HOST = "127.0.0.1:18080"  # the benchmark's (bench/http_bench.py --port)

# Instructions of scan_step, path_step and memo_end per head of the issue's mix (four heads of
# 84 to 99 bytes), on average: on a connection that sends them one after the other, as wrk does
# (the header section remembered: judge.JudgeCore.memo_section), and as a connection's first
# head; and the cost of one more byte of each kind, the extra calls included: measured 917,
# 2,297, 47.4 and 23.8 (before the seventh round of issue 19: 2,591 every head, 57.4 and 24.2;
# before the eighth: 2,396 every head; before the ninth's path words: 1,241 and 2,621). And
# decide's walk of a long path's last bytes (path_step): 35.5 a byte.
MIX_BUDGET = 1_000
FIRST_HEAD_BUDGET = 2_450
PATH_BYTE_BUDGET = 49
HEADER_BYTE_BUDGET = 25
PATH_STEP_BYTE_BUDGET = 37


def compiled(text: str, name: str):
    return compile_source(text, name)[0][0]


@pytest.fixture(scope="module")
def bench_policy():
    c = compiled(policy_text("issue", 18080, issue_rules(10)), "issue-10.pol")
    return c, ScanEmu(c)


def mix_head(method: str, path: str, headers: dict[str, str], extra: str = "") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_the_bpf_scan_agrees_with_simulate(name) -> None:
    c = compiled(POLICIES[name], name)
    emu = ScanEmu(c)
    rng = random.Random(23)
    for _ in range(120):
        head = random_head(rng)
        expected = simulate.scan(c.matcher, head)
        walk = emu.walk(head)
        assert walk.state == expected.state, head[:120]
        if expected.state == END:
            assert walk.facts == expected.facts, head[:120]
            assert walk.path == expected.path, head[:120]
            assert walk.pstate == expected.path_state, head[:120]


def test_the_mix_stays_within_its_instruction_budget(bench_policy) -> None:
    c, emu = bench_policy
    conn = emu.connection()
    firsts, counts = [], []
    for rounds in range(2):
        for method, path, headers in ISSUE_MIX:
            head = mix_head(method, path, headers)
            assert len(head) == head_bytes(method, path, headers, HOST)  # the benchmark's head
            first = emu.walk(head)  # a connection's first head: nothing remembered
            walk = emu.walk(head, conn=conn)
            expected = simulate.scan(c.matcher, head)
            for w in (first, walk):
                assert (w.state, w.path, w.facts) == (END, expected.path, expected.facts)
            if rounds:
                assert walk.memo_taken
                counts.append(walk.insns)
                firsts.append(first.insns)
    average, first = sum(counts) / len(counts), sum(firsts) / len(firsts)
    print(f"instructions per head of the mix: {counts}, average {average:.0f}; as a first head")
    print(f"  {firsts}, average {first:.0f}")
    assert average <= MIX_BUDGET, counts
    assert first <= FIRST_HEAD_BUDGET, firsts


def test_a_path_byte_and_a_header_byte_stay_within_their_budgets(bench_policy) -> None:
    _, emu = bench_policy
    method, path, headers = ISSUE_MIX[3]  # /static/css/a.css: every longer path is allowed too

    def insns(path: str, extra: str = "") -> int:
        walk = emu.walk(mix_head(method, path, headers, extra))
        assert walk.state == END
        return walk.insns

    longer = path.replace("/a.css", "/" + "b" * 40 + "/a.css")
    per_path_byte = (insns(longer) - insns(path)) / 41
    # A header name no condition reads: plain bytes of the general chunk.
    name, short = "X-" + "n" * 60, "X-n"
    more = insns(path, f"{name}: v\r\n") - insns(path, f"{short}: v\r\n")
    per_header_byte = more / (len(name) - len(short))
    print(f"per path byte {per_path_byte:.1f}, per header byte {per_header_byte:.1f}")
    assert per_path_byte <= PATH_BYTE_BUDGET
    assert per_header_byte <= HEADER_BYTE_BUDGET


def test_decides_walk_of_a_long_paths_last_bytes_stays_within_its_budget(bench_policy) -> None:
    """The path chunk takes a path's first PATH_MAX - SCAN_CHUNK bytes; the slow path copies
    the rest, which `decide` walks with path_step (judge.py): its cost per byte."""
    _, emu = bench_policy
    method, path, headers = ISSUE_MIX[3]

    def walk(length: int):
        long_path = "/static/" + "b" * (length - len("/static/") - len("/a.css")) + "/a.css"
        walk = emu.walk(mix_head(method, long_path, headers))
        assert walk.state == END and len(walk.path) == length
        return walk

    short, long = walk(PATH_MAX - 18), walk(PATH_MAX - 1)
    assert short.path_insns > 0  # path_step ran: the budget below measures something
    per_byte = (long.path_insns - short.path_insns) / 17
    print(f"path_step per path byte {per_byte:.1f}")
    assert per_byte <= PATH_STEP_BYTE_BUDGET
