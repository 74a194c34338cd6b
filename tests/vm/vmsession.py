"""One VM session per pytest session: which kernel runs what, booted lazily, at most once."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import vmrunner

# What each kernel runs. `latest` runs everything (kernel tests on the newest 6.1, and the kTLS
# tests, which there check that sockpol fails closed); `ktls` runs the kTLS tests where the
# kernel still allows TLS on sockhash sockets, plus the probe.
PLAN: dict[str, list[str]] = {
    "latest": ["tests/kernel"],
    "ktls": ["tests/kernel/ktls", "tests/kernel/test_kernel_probe.py"],
}
TIMEOUT = float(os.environ.get("SOCKPOL_VM_TIMEOUT", "600"))  # per boot, seconds


@dataclass
class VMSession:
    kernels: dict[str, vmrunner.Kernel]
    runs: dict[str, vmrunner.VMRun] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    def run(self, role: str) -> vmrunner.VMRun:
        """Boot the kernel of `role` once and return its results (a boot failure fails)."""
        kernel = self.kernels[role]
        if role == "ktls" and kernel == self.kernels["latest"]:
            role = "latest"  # one kernel does both; tests/kernel includes tests/kernel/ktls
        if role in self.failures:
            pytest.fail(self.failures[role], pytrace=False)
        if role not in self.runs:
            try:
                self.runs[role] = vmrunner.run(kernel, PLAN[role], timeout=TIMEOUT)
            except vmrunner.VMError as e:
                self.failures[role] = f"VM {kernel.describe()}: {e}"
                pytest.fail(self.failures[role], pytrace=False)
        return self.runs[role]

    def summary(self) -> list[str]:
        out = []
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
