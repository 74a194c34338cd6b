"""The VM runner as pytest fixtures: every test here is marked `vm`, and none runs in a guest.

`vm` (session) prepares the host once (packages, the kernel matrix from the package registry,
virtme-ng) and boots each kernel lazily, at most once per session (vmsession.py says which kernel
runs which tests). Where
the VM cannot be run at all (not root, not an x86-64 Debian host, packages not obtainable) the
tests skip with a loud banner; with CI=true they fail instead. A VM that was set up but did not
boot or did not finish is always a failure.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import vmrunner
from vmkernels import KernelsUnavailable, resolve
from vmsession import VMSession

HERE = Path(__file__).parent
ON_CI = os.environ.get("CI") == "true"

_loud_skips: list[str] = []
_session_vm: VMSession | None = None  # for the terminal summary


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:  # the runner's own unit tests (test_vmrunner.py) boot nothing
        if Path(str(item.fspath)) == HERE / "test_in_vm.py":
            item.add_marker(pytest.mark.vm)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _loud_skips:
        terminalreporter.write_sep("!", "VM TESTS WERE SKIPPED", red=True, bold=True)
        for reason in _loud_skips:
            terminalreporter.write_line(f"  {reason}", red=True)
    if _session_vm is not None and (_session_vm.runs or _session_vm.failures):
        terminalreporter.write_sep("-", "VM runs (the kernel matrix)")
        for line in _session_vm.summary():
            terminalreporter.write_line(f"  {line}")
        _session_vm.write_matrix()


@pytest.fixture(scope="session")
def vm() -> VMSession:
    global _session_vm
    if os.environ.get("SOCKPOL_IN_VM") == "1":
        pytest.skip("already inside the VM")
    try:
        vmrunner.check_host()
        vmrunner.ensure_packages(vmrunner.VM_PACKAGES + vmrunner.GUEST_PACKAGES)
        vmrunner.ensure_vng()
        kernels, notes = resolve()
    except (vmrunner.VMUnavailable, KernelsUnavailable) as e:
        reason = f"the VM matrix cannot run here: {e}"
        if ON_CI:
            pytest.fail(f"{reason} (CI=true: this is a failure)", pytrace=False)
        if reason not in _loud_skips:
            _loud_skips.append(reason)
        pytest.skip(f"VM TEST SKIPPED: {reason}")
    except vmrunner.VMError as e:
        pytest.fail(f"preparing the VMs failed: {e}", pytrace=False)
    _session_vm = VMSession(kernels, notes)
    return _session_vm
