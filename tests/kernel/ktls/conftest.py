"""Fixtures for policy inside TLS: kTLS sockets with static keys, and real TLS servers/clients.

These tests need a kernel with CONFIG_TLS. The development and CI hosts (6.18) have none, so here
they skip, loudly, naming CONFIG_TLS; they run for real inside the VM matrix (tests/vm,
docs/kernels.md), where a kernel without working kTLS is a failure (SOCKPOL_IN_VM=1 with CI=true).

Kernels that carry "tls: reject the combination of TLS and sockmap" refuse TLS_TX on a socket in
a sockhash. The VM runner knows from the kernel's changelog which kind it booted and says so in
SOCKPOL_EXPECT_KTLS_SOCKMAP (1: must work, 0: must be refused); a probe that disagrees fails.

Fixtures (on top of tests/kernel/conftest.py):
    ktls_kernel             session: the tls module is loaded and TLS_TX works on loopback
    ktls_sockmap            session: the probe's finding for TLS on a socket in a sockhash
    require_ktls_sockmap    skip (loudly) where the kernel rejects TLS on sockhash sockets
    require_rejection       skip where it does not (tests of the fail-closed behaviour)
"""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest

from sockpol.runtime import ktls, probe

IN_VM = os.environ.get("SOCKPOL_IN_VM") == "1"
ON_CI = os.environ.get("CI") == "true"
EXPECT = os.environ.get("SOCKPOL_EXPECT_KTLS_SOCKMAP")  # "1", "0" or unset (not in the VM)

_loud_skips: list[str] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here + os.sep):
            item.add_marker(pytest.mark.ktls)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _loud_skips:
        return
    terminalreporter.write_sep("!", "kTLS TESTS WERE SKIPPED", red=True, bold=True)
    for reason in _loud_skips:
        terminalreporter.write_line(f"  {reason}", red=True)


def _skip(reason: str) -> None:
    if reason not in _loud_skips:
        _loud_skips.append(reason)
    pytest.skip(f"kTLS TEST SKIPPED: {reason}")


@pytest.fixture(scope="session")
def ktls_kernel(kernel_env: None) -> probe.Finding:
    finding = probe.guarded("ktls", "kernel TLS", probe.probe_ktls)
    if not finding.ok:
        reason = (
            f"kernel {os.uname().release} has no usable kTLS: {finding.detail}. "
            "These tests need CONFIG_TLS; they run in the VMs (tests/vm; docs/kernels.md)"
        )
        if IN_VM and ON_CI:
            pytest.fail(f"in the VM kTLS must work: {reason}", pytrace=False)
        _skip(reason)
    _warm_up()
    return finding


@pytest.fixture(scope="session")
def ktls_sockmap(ktls_kernel: probe.Finding) -> probe.Finding:
    finding = probe.guarded("ktls_sockmap", "kTLS on sockhash sockets", probe.probe_ktls_sockmap)
    if EXPECT is not None and finding.ok != (EXPECT == "1"):
        pytest.fail(
            f"the VM runner expected TLS on sockhash sockets to "
            f"{'work' if EXPECT == '1' else 'be rejected'} on {os.uname().release} "
            f"(from the kernel's changelog), but the probe says: {finding.detail}",
            pytrace=False,
        )
    return finding


@pytest.fixture
def require_ktls_sockmap(ktls_sockmap: probe.Finding) -> probe.Finding:
    if not ktls_sockmap.ok:
        _skip(
            f"kernel {os.uname().release} refuses TLS on sockets in a sockhash "
            f"({ktls_sockmap.detail}); policy inside TLS is impossible there"
        )
    return ktls_sockmap


@pytest.fixture
def require_rejection(ktls_sockmap: probe.Finding) -> probe.Finding:
    if ktls_sockmap.ok:
        pytest.skip(f"kernel {os.uname().release} allows TLS on sockhash sockets")
    return ktls_sockmap


# ---------------------------------------------------------------------------------------------
# Static-key kTLS connections


def ktls_pair(
    port: int, listener: socket.socket, keys: ktls.StaticKeys
) -> tuple[socket.socket, socket.socket]:
    """A connected loopback pair; neither side has TLS yet (the caller decides the order)."""
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    server, _ = listener.accept()
    server.settimeout(5)
    return client, server


def _warm_up() -> None:
    """One throw-away static-key exchange per cipher and version, outside any sockhash.

    In a freshly booted VM the first kTLS socket lost its first record (the crypto modules load
    on first use); a warm-up makes the real tests independent of their order.
    """
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        for version in (ktls.TLS_1_2_VERSION, ktls.TLS_1_3_VERSION):
            for cipher in ktls.CIPHERS.values():
                keys = ktls.StaticKeys.fixed(version, cipher)
                client, server = ktls_pair(listener.getsockname()[1], listener, keys)
                with client, server:
                    try:
                        ktls.enable_tx(client, keys)
                        ktls.enable_rx(server, keys)
                        client.sendall(b"warm-up")
                        server.recv(64)
                    except OSError:
                        pass  # the real tests report what does not work
