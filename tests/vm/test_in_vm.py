"""Kernel and kTLS tests run inside each kernel of the matrix, reported here test by test.

Each guest test becomes one host test, `test_in_guest[<kernel line>::<node id>]`, whose outcome is
the guest's (pass, fail with the guest's message, skip or xfail with its reason). The node ids are
collected on the host from the same checkout the guest runs, so a guest test that did not report
at all (a crash, a timeout) fails here instead of vanishing.
"""

from __future__ import annotations

import os

import pytest
import vmrunner
from vmsession import PLAN, VMSession

_collected: dict[str, list[str]] = {}


def _guest_tests() -> list[tuple[str, str]]:
    if os.environ.get("SOCKPOL_IN_VM") == "1" or os.environ.get("SOCKPOL_COLLECT_ONLY") == "1":
        return []  # never nest VMs, nor collect recursively
    if not _collected:
        # One collection of everything the plan names, split per kernel by path prefix.
        paths = sorted({p for ps in PLAN.values() for p in ps})
        try:
            everything = vmrunner.collect(paths)
        except vmrunner.VMError as e:
            everything = [f"<collection failed: {e}>"]
        for line, prefixes in PLAN.items():
            _collected[line] = [
                n for n in everything if n.startswith("<") or n.startswith(tuple(prefixes))
            ]
    return [(line, nodeid) for line, ids in _collected.items() for nodeid in ids]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "guest_test" in metafunc.fixturenames:
        cases = _guest_tests()
        metafunc.parametrize(
            "guest_test", cases, ids=[f"{line}::{nodeid}" for line, nodeid in cases]
        )


# A test waits for its kernel's whole guest run (the first one also for the boots before it).
WAIT = pytest.mark.timeout(3 * 3600)


@WAIT
def test_vm_boots_the_chosen_kernel(vm: VMSession) -> None:
    for line in vm.lines():
        run = vm.run(line)
        assert run.guest_release == run.kernel.release, run.console[-3000:]
        assert run.status is not None, f"the guest's pytest did not finish:\n{run.tail()}"
        assert run.results, f"no results came back from the guest:\n{run.tail()}"


@WAIT
def test_in_guest(vm: VMSession, guest_test: tuple[str, str]) -> None:
    line, nodeid = guest_test
    if nodeid.startswith("<collection failed"):
        pytest.fail(nodeid, pytrace=False)
    run = vm.run(line)
    where = f"in the VM ({run.kernel.describe()})"
    result = run.results.get(nodeid)
    if result is None:
        pytest.fail(
            f"{nodeid} did not report {where}; guest pytest exit {run.status}:\n{run.tail()}",
            pytrace=False,
        )
    if result.outcome == "passed":
        return
    if result.outcome == "xfailed":
        pytest.xfail(f"{where}: {result.message}")
    if result.outcome == "skipped":
        pytest.skip(f"{where}: {result.message}")
    pytest.fail(f"{result.outcome} {where}: {result.message}\n{result.details}", pytrace=False)
