"""Fixtures for the LSM backend's kernel tests (tests/kernel/lsm).

The kTLS fixtures (tests/kernel/ktls/conftest.py) and its client tests' server and clients are
reused: that directory is put on the import path and its conftest loaded under another name.
These tests run in the VM plan's lines that need them (tests/vm/vmsession.py: a kernel that
rejects TLS on sockmap sockets), not on every kernel; on the development and CI hosts, which
refuse BPF LSM programs (EPERM), they skip loudly with the probe's reason.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from sockpol.runtime import probe

KTLS_DIR = Path(__file__).parent.parent / "ktls"
sys.path.insert(0, str(KTLS_DIR))
_spec = importlib.util.spec_from_file_location("sockpol_ktls_conftest", KTLS_DIR / "conftest.py")
assert _spec is not None and _spec.loader is not None
_ktls = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ktls)
ktls_kernel = _ktls.ktls_kernel
ktls_sockmap = _ktls.ktls_sockmap

IN_VM = os.environ.get("SOCKPOL_IN_VM") == "1"
ON_CI = os.environ.get("CI") == "true"
_loud_skips: list[str] = []


def pytest_terminal_summary(terminalreporter) -> None:
    if not _loud_skips:
        return
    terminalreporter.write_sep("!", "LSM BACKEND TESTS WERE SKIPPED", red=True, bold=True)
    for reason in _loud_skips:
        terminalreporter.write_line(f"  {reason}", red=True)


@pytest.fixture(scope="session")
def lsm_kernel(kernel_env: None) -> probe.Finding:
    finding = probe.guarded("bpf_lsm", "BPF LSM programs", probe.probe_bpf_lsm)
    if not finding.ok:
        reason = (
            f"kernel {os.uname().release} does not run BPF LSM programs here: {finding.detail} "
            "(the lsm backend's tests run in the VMs: tests/vm, docs/kernels.md)"
        )
        if IN_VM and ON_CI:
            pytest.fail(f"in the VM BPF LSM must work: {reason}", pytrace=False)
        if reason not in _loud_skips:
            _loud_skips.append(reason)
        pytest.skip(f"LSM TEST SKIPPED: {reason}")
    return finding
