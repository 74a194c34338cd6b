"""Loading policies with a `tls` statement, against the running kernel (root).

A `tls` policy (`tls userspace allow` too) needs the kernel to run its sk_msg program on the
plaintext of kTLS sockets in a sockhash. Where it cannot (the 6.18 development and CI hosts: no
CONFIG_TLS; kernels carrying "tls: reject the combination of TLS and sockmap"), `sockpol load` and
`reload` must refuse the policy with one line naming what the kernel lacks, before anything is
loaded: no pins, no programs, no cgroup attachment. Where it can (the VMs with kTLS on sockmap),
the policy loads.

Every test asserts one branch or the other, chosen by `probe.tls_policy_support()`; none skips.
The answer itself is held to the kernel's CONFIG_TLS and, in the VM (tests/vm sets
SOCKPOL_EXPECT_KTLS_SOCKMAP from the kernel's changelog), to whether the kernel rejects TLS on
sockmap sockets.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sockpol.runtime import LoadError, ReloadError, load, pins, probe, reload, status, unload

REPO = Path(__file__).resolve().parents[2]

POLICY = """\
policy {name} {{
    port {port}
    default allow
{tls}
    deny * /admin/**
}}
"""


def policy_text(name: str, port: int, tls: str | None) -> str:
    return POLICY.format(name=name, port=port, tls=f"    {tls}" if tls else "")


def status_of(name: str):
    found = [s for s in status() if s.name == name]
    assert found, f"status() does not list {name} (did another session's safety net unload it?)"
    return found[0]


def sockpol(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("SOCKPOL_DEBUG", None)  # tracebacks would be shown on purpose with it
    return subprocess.run(
        [sys.executable, "-m", "sockpol.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
    )


@pytest.fixture(scope="module")
def support(kernel_env: None) -> probe.TlsSupport:
    """The loader's answer on this kernel, fresh (not a cached one from an earlier test)."""
    probe.tls_policy_support.cache_clear()
    return probe.tls_policy_support()


def test_the_answer_matches_the_kernel(support: probe.TlsSupport) -> None:
    config = probe.kernel_config("TLS")
    if config == "n":  # the 6.18 hosts
        assert not support.ok
        assert support.reason == "it lacks kernel TLS (CONFIG_TLS is not set)"
    elif config in ("y", "m"):  # the VM kernels: kTLS is there; the sockhash case decides
        ktls = next(f for f in support.findings if f.key == "ktls")
        assert ktls.ok, ktls.detail
    else:
        assert config is None  # no config to compare with: the probe alone decides
    expected = os.environ.get("SOCKPOL_EXPECT_KTLS_SOCKMAP")  # set by tests/vm for its kernels
    if expected in ("0", "1"):
        assert support.ok is (expected == "1"), support.reason
        if expected == "0":
            assert "tls: reject the combination of TLS and sockmap" in support.reason
    # doctor decides from its own full probe, and must say the same
    assert probe.tls_support_from(probe.probe()).ok is support.ok
    assert support.ok or ("\n" not in support.reason and support.reason)


@pytest.mark.parametrize("tls", ["tls", "tls userspace allow"], ids=["deny", "allow"])
def test_load_of_a_tls_policy(
    support, tls, compiled_policy, cgroup, free_port, assert_nothing_left
) -> None:
    name = f"t-tls-load-{tls.split()[-1]}"
    obj = compiled_policy(policy_text(name, free_port, tls))
    if not support.ok:
        with pytest.raises(LoadError) as info:
            load(obj, cgroup, name=name)
        assert str(info.value) == "load: " + support.refusal(name)
        assert_nothing_left(name, cgroup)
        return
    loaded = load(obj, cgroup, name=name)
    try:
        assert loaded.metadata.tls == ("allow" if tls.endswith("allow") else "deny")
        st = status_of(name)
        assert st.metadata is not None and st.metadata.tls == loaded.metadata.tls
        assert st.problem is None
    finally:
        loaded.close()
        unload(name)
    assert_nothing_left(name, cgroup)


def test_cli_load_of_a_tls_policy(
    support, tmp_path, cgroup, free_port, assert_nothing_left
) -> None:
    name = "t-tls-cli"
    source = tmp_path / f"{name}.pol"
    source.write_text(policy_text(name, free_port, "tls"))
    done = sockpol("load", str(source), "--cgroup", str(cgroup))
    if not support.ok and probe.choose_backend(tls_policy=True).backend == "lsm":
        # Where the kernel rejects kTLS on sockmap sockets and BPF LSM works (6.1.192, 7.3.4),
        # `sockpol load` takes the lsm backend (tests/kernel/lsm judges its traffic).
        assert done.returncode == 0, done.stderr
        try:
            listing = sockpol("status")
            row = next(line for line in listing.stdout.splitlines() if line.startswith(f"{name} "))
            assert "tls" in row.split(), row
            detail = sockpol("status", name)
            assert "backend  lsm" in detail.stdout, detail.stdout
        finally:
            assert sockpol("unload", name).returncode == 0
        assert_nothing_left(name, cgroup)
        return
    if not support.ok:
        assert done.returncode == 1, done
        assert done.stdout == ""
        assert done.stderr.splitlines() == ["sockpol: load: " + support.refusal(name)]
        assert "sockpol doctor" in done.stderr and "docs/ktls.md" in done.stderr
        root = pins.pin_root(create=False)
        assert root is None or not (root / name).exists()
        assert_nothing_left(name, cgroup)
        listing = sockpol("status")
        assert listing.returncode == 0
        assert f"tls policies: cannot be loaded on this kernel: {support.reason}" in listing.stdout
        return
    assert done.returncode == 0, done.stderr
    try:
        listing = sockpol("status")
        row = next(line for line in listing.stdout.splitlines() if line.startswith(f"{name} "))
        assert row.split()[3] == "tls", row
        assert "tls policies: can be loaded on this kernel" in listing.stdout
    finally:
        assert sockpol("unload", name).returncode == 0
    assert_nothing_left(name, cgroup)


def test_plaintext_policies_are_unaffected(compiled_policy, cgroup, free_port, assert_nothing_left):
    name = "t-tls-plain"
    obj = compiled_policy(policy_text(name, free_port, None))
    loaded = load(obj, cgroup, name=name)
    try:
        assert status_of(name).metadata.tls is None
    finally:
        loaded.close()
        unload(name)
    assert_nothing_left(name, cgroup)


def test_reload_into_tls(support, compiled_policy, cgroup, free_port) -> None:
    """A loaded plaintext policy is reloaded with a `tls` one only where the kernel can do kTLS
    on sockhash sockets; elsewhere the reload says why and changes nothing."""
    name = "t-tls-reload"
    plain = compiled_policy(policy_text(name, free_port, None))
    with_tls = compiled_policy(policy_text(name, free_port, "tls"))
    loaded = load(plain, cgroup, name=name)
    try:
        if not support.ok:
            with pytest.raises(ReloadError) as info:
                reload(name, with_tls)
            assert str(info.value) == "reload: " + support.refusal(name, "nothing was changed")
            st = status_of(name)
            assert st.metadata.tls is None and st.reloads == 0
        else:
            reload(name, with_tls)
            st = status_of(name)
            assert st.metadata.tls == "deny" and st.reloads == 1
    finally:
        loaded.close()
        unload(name)
