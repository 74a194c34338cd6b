"""The kernel probe against the running kernel (root): what it finds must match what is there.

On the development and CI hosts (6.18, no CONFIG_TLS) kTLS must be reported missing, naming
CONFIG_TLS; in the VMs (Debian kernels, CONFIG_TLS=m) it must be found. Whether TLS works on a
socket in a sockhash is checked against real sockets by tests/ktls; here only its consistency.
"""

from __future__ import annotations

import io
import json
import subprocess
import time

import pytest

from sockpol import doctor
from sockpol.cli import build_parser
from sockpol.contract import VERIFIER_BUDGET
from sockpol.runtime import probe
from sockpol.runtime.probe import Status


def bpftool_json(*args: str) -> list[dict]:
    out = subprocess.run(["bpftool", "--json", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout or "[]")


KEYS = ["kernel", "privileges", "sk_msg", "sockhash", "btf", "cgroup2", "bpffs", "bpf_loop"]


@pytest.fixture(scope="module")
def findings(kernel_env: None) -> dict[str, probe.Finding]:
    return {f.key: f for f in probe.probe()}


def test_every_capability_is_reported_in_order(findings) -> None:
    assert list(findings) == [*KEYS, "ktls", "ktls_sockmap", "bpf_lsm", "answer"]
    assert findings["kernel"].detail.startswith("Linux ")


def test_answers_are_probed_for_real(findings) -> None:
    # Every kernel of the matrix redirects a message into its sender's receive queue: where
    # one does not, `answer` policies fall back to dropping (tests/kernel/test_answer.py).
    assert findings["answer"].ok, findings["answer"].detail


def test_what_the_kernel_tests_use_is_found(findings) -> None:
    # These tests load policies, so everything plaintext policies need is here.
    missing = {k: f.detail for k, f in findings.items() if k in probe.CORE and not f.ok}
    assert not missing
    assert probe.summary(list(findings.values()))["plaintext"] is True


def test_ktls_finding_matches_the_kernel_config(findings) -> None:
    config = probe.kernel_config("TLS")
    found = findings["ktls"]
    if config == "n":
        assert found.verdict is Status.MISSING
        assert "CONFIG_TLS is not set" in found.detail
        assert findings["ktls_sockmap"].verdict is Status.MISSING
        assert "not tried" in findings["ktls_sockmap"].detail
        assert probe.summary(list(findings.values()))["ktls"] is False
    elif config in ("y", "m"):
        assert found.verdict is Status.OK, found.detail
        assert findings["ktls_sockmap"].verdict in (Status.OK, Status.MISSING)
    else:
        pytest.skip(f"kernel config not readable (CONFIG_TLS={config!r}): nothing to compare")


def test_probe_leaves_no_probe_objects(findings) -> None:
    # The kernel frees a program attached to a sockhash after the map, the sockets and their
    # psocks are gone (deferred work: the answer probe's lingers for a moment), hence the wait.
    deadline = time.monotonic() + 5
    while True:
        progs = [p for p in bpftool_json("prog", "show") if p.get("name") == "sockpol_probe"]
        maps = [m for m in bpftool_json("map", "show") if m.get("name") == "sockpol_probe"]
        if not (progs or maps) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not progs and not maps


def test_doctor_reports_the_live_kernel(findings) -> None:
    args = build_parser().parse_args(["doctor", "--json"])
    out = io.StringIO()
    assert doctor.cmd_doctor(args, out=out) == doctor.EXIT_OK
    report = json.loads(out.getvalue())
    assert [f["key"] for f in report["findings"]] == [*findings, "program", "ingress_program"]
    ingress = report["findings"][-1]
    assert ingress["verdict"] == "ok" and "sockpol_skb" in ingress["title"], ingress
    assert report["works"]["ingress"] is True
    # The real program was compiled, loaded and counted against the budget.
    program = report["program"]
    assert program["loaded"] and program["within_budget"], program
    assert 0 < program["processed"] <= VERIFIER_BUDGET == program["budget"]
    assert report["findings"][-1]["verdict"] == "ok"
