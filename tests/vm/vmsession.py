"""One VM session per pytest session: which kernel runs what, booted lazily, at most once."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import pytest
import vmrunner

# What each kernel runs, bounded so that both boots fit in about ten minutes under TCG.
# `latest` (the newest 6.1) runs the core kernel tests, i.e. the runtime's load/replace/unload
# and enforcement of every example, plus the kTLS tests, which there check that sockpol fails
# closed; `ktls` (the newest 6.1 without the TLS+sockmap rejection) runs the kTLS tests for real.
# Not in the VM: test_differential, test_operating, test_reload (minutes on the host already;
# traffic-timed under TCG), which the host runs on 6.18.
PLAN: dict[str, list[str]] = {
    "latest": [
        "tests/kernel/test_runtime.py",
        "tests/kernel/test_enforcement.py",
        "tests/kernel/test_kernel_probe.py",
        "tests/kernel/test_tls_policy_load.py",
        "tests/kernel/test_tls_handshake.py",
        "tests/kernel/ktls",
    ],
    "ktls": [
        "tests/kernel/ktls",
        "tests/kernel/test_kernel_probe.py",
        "tests/kernel/test_tls_policy_load.py",
        "tests/kernel/test_tls_handshake.py",
    ],
}
TIMEOUT = float(os.environ.get("SOCKPOL_VM_TIMEOUT", "900"))  # per boot, seconds


@dataclass
class VMSession:
    """Both kernels boot at once, one vCPU each (two host cores), in threads started by the
    first test that needs a result; each test then waits for its kernel's run."""

    kernels: dict[str, vmrunner.Kernel]
    runs: dict[str, vmrunner.VMRun] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    _threads: dict[str, threading.Thread] = field(default_factory=dict)

    def roles(self) -> list[str]:
        """The roles that need a boot of their own (one kernel may serve both)."""
        if self.kernels["ktls"] == self.kernels["latest"]:
            return ["latest"]
        return list(PLAN)

    def start(self) -> None:
        if self._threads:
            return
        for role in self.roles():
            vmrunner.install(self.kernels[role])  # here, not in parallel: depmod, copies
        for role in self.roles():
            t = threading.Thread(target=self._boot, args=(role,), daemon=True)
            self._threads[role] = t
            t.start()

    def _boot(self, role: str) -> None:
        kernel = self.kernels[role]
        paths = (
            PLAN[role] if len(self.roles()) > 1 else sorted({p for ps in PLAN.values() for p in ps})
        )
        try:
            self.runs[role] = vmrunner.run(kernel, paths, timeout=TIMEOUT, cpus=1)
        except Exception as e:  # reported by every test of this kernel
            self.failures[role] = f"VM {kernel.describe()}: {e}"

    def run(self, role: str) -> vmrunner.VMRun:
        """The results of `role`'s kernel, once its boot has finished (a failure fails)."""
        if role not in self.roles():
            role = "latest"  # one kernel does both
        self.start()
        self._threads[role].join()
        if role in self.failures:
            pytest.fail(self.failures[role], pytrace=False)
        return self.runs[role]

    def summary(self) -> list[str]:
        out = []
        if self.kernels["ktls"].rejects_tls_sockmap:
            out.append(
                "WARNING: apt offers no 6.1 kernel without the TLS+sockmap rejection: kTLS "
                "enforcement was not tested, only that sockpol fails closed"
            )
        for role, r in self.runs.items():
            counts: dict[str, int] = {}
            for res in r.results.values():
                counts[res.outcome] = counts.get(res.outcome, 0) + 1
            tally = ", ".join(f"{n} {o}" for o, n in sorted(counts.items()))
            out.append(
                f"{role}: {r.kernel.describe()}: guest pytest exit {r.status}, "
                f"{r.seconds:.0f} s wall; {tally}"
            )
        return out
