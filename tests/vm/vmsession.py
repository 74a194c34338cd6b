"""One VM session per pytest session: the kernel matrix, each kernel booted lazily, at most once.

Every line of vmkernels.LINES runs CORE: loading and replacing policies, enforcement of every
example, the probe, the verifier budget (every example, 10 and 10,000 rules, a policy using every
feature: compiled once on the host), loading `tls` policies, the TLS handshake walk, and the kTLS
tests, which check that sockpol fails closed where the kernel refuses TLS on sockmap sockets and
enforce for real where it allows it. `6.1-ktls` (the newest 6.1 that allows it) runs only what
concerns TLS and the budget. Not in the VMs: test_differential, test_operating, test_reload,
test_scale (minutes on the host already, and timed by traffic under TCG), which the host runs.

Two kernels boot at a time, one vCPU each (the machines have two cores).
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import vmrunner
from vmkernels import CACHE, Kernel, install

sys.path.insert(0, str(vmrunner.REPO / "tests" / "kernel"))
from budget_policies import compile_all  # noqa: E402

CORE = [
    "tests/kernel/test_runtime.py",
    "tests/kernel/test_enforcement.py",
    "tests/kernel/test_kernel_probe.py",
    "tests/kernel/test_verifier_budget.py",
    "tests/kernel/test_tls_policy_load.py",
    "tests/kernel/test_tls_handshake.py",
    "tests/kernel/ktls",
]
TLS_ONLY = [
    "tests/kernel/ktls",
    "tests/kernel/test_kernel_probe.py",
    "tests/kernel/test_verifier_budget.py",
    "tests/kernel/test_tls_policy_load.py",
    "tests/kernel/test_tls_handshake.py",
]
PLAN: dict[str, list[str]] = {
    "6.1": CORE,
    "6.1-ktls": TLS_ONLY,
    "6.12": CORE,
    "6.18": CORE,
    "7.0": CORE,
    "newest": CORE,
}
TIMEOUT = float(os.environ.get("SOCKPOL_VM_TIMEOUT", "1200"))  # per boot, seconds
PARALLEL = 2


@dataclass
class VMSession:
    kernels: dict[str, Kernel]  # by line
    notes: list[str] = field(default_factory=list)  # what the resolution could not do as asked
    runs: dict[str, vmrunner.VMRun] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    _futures: dict[str, Future] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _objects: tempfile.TemporaryDirectory | None = None

    def lines(self) -> list[str]:
        return [line for line in PLAN if line in self.kernels]

    def start(self) -> None:
        with self._lock:
            if self._futures:
                return
            self._objects = tempfile.TemporaryDirectory(prefix="sockpol-budget-")
            objects = Path(self._objects.name)
            compile_all(objects)
            for line in self.lines():
                install(self.kernels[line])  # here, not in parallel: depmod, copies
            pool = ThreadPoolExecutor(PARALLEL, thread_name_prefix="vm")
            for line in self.lines():
                self._futures[line] = pool.submit(self._boot, line, objects)
            pool.shutdown(wait=False)

    def _boot(self, line: str, objects: Path) -> None:
        kernel = self.kernels[line]
        try:
            self.runs[line] = vmrunner.run(
                kernel, PLAN[line], timeout=TIMEOUT, cpus=1, objects=objects
            )
        except Exception as e:  # reported by every test of this kernel
            self.failures[line] = f"VM {kernel.describe()}: {e}"

    def run(self, line: str) -> vmrunner.VMRun:
        """The results of `line`'s kernel, once its boot has finished (a failure fails)."""
        if line not in self.kernels:
            pytest.fail(
                f"no kernel was resolved for {line}: {'; '.join(self.notes)}", pytrace=False
            )
        self.start()
        self._futures[line].result()
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
            msg = sorted({rec.get("sockpol_msg", 0) for rec in r.verifier})
            insns = (
                f"; sockpol_msg verified in {'/'.join(f'{n:,}' for n in msg)} insns" if msg else ""
            )
            out.append(
                f"{r.kernel.describe()}: guest pytest exit {r.status}, {r.seconds:.0f} s wall; "
                f"{tally}{insns}"
            )
        return out

    def write_matrix(self, path: Path = CACHE / "logs" / "matrix.txt") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(self.summary()) + "\n")
