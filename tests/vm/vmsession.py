"""One VM session per pytest session: the kernel matrix, each kernel booted lazily, at most once.

Every line of vmkernels.LINES runs CORE: loading and replacing policies, enforcement of every
example, answered refusals (real clients, a load run; not on 6.18 and 7.0, see CORE), ingress
policies (a subset), the probe,
the verifier budget (every example, 10 and 10,000 rules, a policy using every feature, and its
ingress variants: compiled once on the host), loading
`tls` policies, the TLS handshake walk, and the kTLS tests, which check that sockpol fails closed
where the kernel refuses TLS on sockmap sockets and enforce for real where it allows it.
`6.1-ktls` (the newest 6.1 that allows it) runs only what concerns TLS and the budget. Not in the
VMs: test_differential, test_operating, test_reload, test_scale (minutes on the host already, and
timed by traffic under TCG), which the host runs.

Two kernels boot at a time, one vCPU each (the machines have two cores), the longest first.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, SimpleQueue

import pytest
import vmrunner
from vmkernels import CACHE, Kernel, install

sys.path.insert(0, str(vmrunner.REPO / "tests" / "kernel"))
from budget_policies import compile_all  # noqa: E402

# What the `6.1-ktls` kernel is there for: TLS, and the budget and probe on every kernel.
TLS_ONLY = [
    "tests/kernel/test_kernel_probe.py",
    "tests/kernel/test_verifier_budget.py",
    "tests/kernel/test_tls_policy_load.py",
    "tests/kernel/test_tls_handshake.py",
    "tests/kernel/ktls",
]
# The receiving side (issue 17): the sk_skb program on every kernel, in a few tests that cover
# what kernels could do differently (answers redirected to egress, skbs split and pipelined,
# bodies, the model's predictions); the whole file runs on the host (6.5 minutes under TCG).
INGRESS = [
    f"tests/kernel/test_ingress.py::{name}"
    for name in (
        "test_allowed_requests_reach_the_server_refused_ones_are_answered",
        "test_a_head_split_over_segments_is_judged_whole",
        "test_pipelined_requests_in_one_segment_are_each_judged",
        "test_chunked_bodies_are_followed_chunk_by_chunk",
        "test_the_server_receives_what_the_model_of_the_receiving_side_predicts",
        "test_unload_leaves_nothing_and_connections_go_ungoverned",
    )
]
CORE_LIGHT = [
    "tests/kernel/test_runtime.py",
    "tests/kernel/test_enforcement.py",
    *INGRESS,
    *TLS_ONLY,
]
# Answered refusals (issue 13) with real clients and a load run: on the oldest line, the LTS
# and the newest, where a redirect's behaviour could differ; the 6.18 and 7.0 lines run what
# the others run but these (CI's time: the matrix grew by the ingress and lsm tests).
CORE = [*CORE_LIGHT, "tests/kernel/test_answer.py"]
# The lsm backend (issue 12): where the kernel rejects TLS on sockmap sockets, policy inside TLS
# runs through it. All its tests on the newest kernel; on the newest 6.1 (which rejects too, and
# has the oldest verifier) kTLS clients with TLS 1.2 and 1.3 and the verifier budget: about 5.5
# and 2 minutes of guest time, not on every line, to keep the matrix's time in bounds.
LSM = ["tests/kernel/lsm"]
LSM_61 = [
    "tests/kernel/lsm/test_ktls_lsm.py::test_python_ssl_ktls_through_lsm_matches_plaintext[tls12-aes128]",
    "tests/kernel/lsm/test_ktls_lsm.py::test_python_ssl_ktls_through_lsm_matches_plaintext[tls13-aes256]",
    "tests/kernel/lsm/test_ktls_lsm.py::test_openssl_s_client_ktls_through_lsm[tls13-aes128]",
    "tests/kernel/lsm/test_lsm.py::test_the_lsm_program_verifies_within_the_budget",
]
PLAN: dict[str, list[str]] = {
    "6.1": CORE + LSM_61,
    "6.1-ktls": TLS_ONLY,
    "6.12": CORE,
    "6.18": CORE_LIGHT,
    "7.0": CORE_LIGHT,
    "newest": CORE + LSM,
}
# Per boot, seconds: the longest line took 1,086 s of guest time in a run of 2026-12-05 (its
# guest limit was 1,080: compiles grew with issue 19's second chunk); 1,160 s alone in a later run.
TIMEOUT = float(os.environ.get("SOCKPOL_VM_TIMEOUT", "1800"))
PARALLEL = 2
# Guest seconds per line in a full CI run (2026-12-05, late morning: two VMs at a time on two
# cores, LLVM's part of the guests' compiles done by the host), to start the longest first:
# booted in PLAN's order, the last long line started when the other slot was nearly done, and
# the matrix took about 5 minutes longer than the work split evenly.
EXPECTED_SECONDS = {
    "newest": 810, "6.1": 673, "6.12": 586, "6.18": 462, "7.0": 451, "6.1-ktls": 213,
}  # fmt: skip


@dataclass
class VMSession:
    kernels: dict[str, Kernel]  # by line
    notes: list[str] = field(default_factory=list)  # what the resolution could not do as asked
    runs: dict[str, vmrunner.VMRun] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    _done: dict[str, threading.Event] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _objects: tempfile.TemporaryDirectory | None = None

    def lines(self) -> list[str]:
        return [line for line in PLAN if line in self.kernels]

    def boots(self) -> dict[str, list[str]]:
        """{line that boots: the lines it runs for}: two lines that resolved to one kernel (the
        newest 6.1 allowing kTLS on sockmap again, say) boot it once, with both plans."""
        by_release: dict[str, list[str]] = {}
        for line in self.lines():
            by_release.setdefault(self.kernels[line].release, []).append(line)
        return {group[0]: group for group in by_release.values()}

    def boot_order(self) -> list[str]:
        """The lines that boot, the longest expected first (a boot runs the plans of every
        line in its group; a line unknown to EXPECTED_SECONDS counts as long): the greedy order
        that keeps both slots busy to the end."""
        longest = max(EXPECTED_SECONDS.values())
        cost = {
            line: sum(EXPECTED_SECONDS.get(g, longest) for g in group)
            for line, group in self.boots().items()
        }
        return sorted(cost, key=lambda line: -cost[line])

    def start(self) -> None:
        """Compile the budget objects, install the kernels and start the boots, once. PARALLEL
        daemon threads take the boots in `boot_order`, so an interrupted session does not wait
        for the queued ones; a failure here is every line's failure, reported once per test."""
        with self._lock:
            if self._done:
                return
            self._done = {line: threading.Event() for line in self.lines()}
            try:
                self._objects = tempfile.TemporaryDirectory(prefix="sockpol-budget-")
                objects = Path(self._objects.name)
                compile_all(objects)
                for line in self.boots():
                    install(self.kernels[line])  # here, not in parallel: depmod, copies
            except Exception as e:  # noqa: BLE001 -- reported by every test, not raised again
                for line, done in self._done.items():
                    self.failures[line] = f"preparing the VMs failed: {e}"
                    done.set()
                return
            queue: SimpleQueue[str] = SimpleQueue()
            for line in self.boot_order():
                queue.put(line)
            for _ in range(PARALLEL):
                threading.Thread(target=self._boot_all, args=(queue, objects), daemon=True).start()

    def _boot_all(self, queue: SimpleQueue[str], objects: Path) -> None:
        while True:
            try:
                line = queue.get_nowait()
            except Empty:
                return
            self._boot(line, self.boots()[line], objects)

    def _boot(self, line: str, group: list[str], objects: Path) -> None:
        kernel = self.kernels[line]
        paths = sorted({p for g in group for p in PLAN[g]})
        try:
            run = vmrunner.run(kernel, paths, timeout=TIMEOUT, cpus=1, objects=objects)
            for g in group:
                self.runs[g] = run
        except Exception as e:  # noqa: BLE001 -- reported by every test of this kernel
            for g in group:
                self.failures[g] = f"VM {kernel.describe()}: {e}"
        for g in group:
            self._done[g].set()

    def run(self, line: str) -> vmrunner.VMRun:
        """The results of `line`'s kernel, once its boot has finished (a failure fails)."""
        if line not in self.kernels:
            pytest.fail(
                f"no kernel was resolved for {line}: {'; '.join(self.notes)}", pytrace=False
            )
        self.start()
        self._done[line].wait()
        if line in self.failures:
            pytest.fail(self.failures[line], pytrace=False)
        return self.runs[line]

    def summary(self) -> list[str]:
        out = list(self.notes)
        if all(k.rejects_tls_sockmap for k in self.kernels.values()):
            out.append(
                "WARNING: no kernel without the TLS+sockmap rejection was found: kTLS "
                "enforcement was not tested, only that sockpol fails closed"
            )
        for line in self.lines():
            r = self.runs.get(line)
            if r is None:
                out.append(f"{line}: {self.failures.get(line, 'not run')}")
                continue
            counts: dict[str, int] = {}
            for res in r.results.values():
                counts[res.outcome] = counts.get(res.outcome, 0) + 1
            tally = ", ".join(f"{n} {o}" for o, n in sorted(counts.items()))
            insns = ""
            for program in ("sockpol_msg", "sockpol_lsm"):  # the lsm backend's: tests/kernel/lsm
                got = sorted({rec[program] for rec in r.verifier if program in rec})
                if got:
                    insns += f"; {program} verified in {'/'.join(f'{n:,}' for n in got)} insns"
            objects, llvm_seconds, reused = r.host_llvm
            offload = (
                f"; host LLVM: {objects} objects ({reused} made before), {llvm_seconds:.0f} s"
                if objects
                else ""
            )
            out.append(
                f"{r.kernel.describe()}: guest pytest exit {r.status}, {r.seconds:.0f} s wall; "
                f"{tally}{insns}{offload}"
            )
        return out

    def write_matrix(self, path: Path = CACHE / "logs" / "matrix.txt") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(self.summary()) + "\n")
