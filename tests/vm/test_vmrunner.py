"""The VM runner's own logic, without booting anything: how guest results are read back."""

from __future__ import annotations

import json

import vmrunner


def lines(*records: dict) -> str:
    return "\n".join(json.dumps(r) for r in records) + "\n"


def phase(nodeid: str, when: str, outcome: str, **kw) -> dict:
    return {"nodeid": nodeid, "when": when, "outcome": outcome, "seconds": 0.5, "message": "",
            "details": "", "xfail": None, **kw}  # fmt: skip


def test_every_outcome_is_read_back() -> None:
    stream = lines(
        phase("t.py::ok", "setup", "passed"),
        phase("t.py::ok", "call", "passed"),
        phase("t.py::ok", "teardown", "passed"),
        phase("t.py::bad", "setup", "passed"),
        phase("t.py::bad", "call", "failed", message="assert 1 == 2", details="tb"),
        phase("t.py::bad", "teardown", "passed"),
        phase("t.py::skip", "setup", "skipped", message="no TLS"),
        phase("t.py::skip", "teardown", "passed"),
        phase("t.py::xf", "setup", "passed"),
        phase("t.py::xf", "call", "skipped", xfail="kernel does X"),
        phase("t.py::xf", "teardown", "passed"),
        phase("t.py::err", "setup", "passed"),
        phase("t.py::err", "call", "passed"),
        phase("t.py::err", "teardown", "failed", message="left behind"),
        {"nodeid": "t.py::hung", "when": "start"},
        phase("t.py::hung", "setup", "passed"),
    )
    got = {k: (r.outcome, r.message) for k, r in vmrunner.parse_results(stream).items()}
    assert got == {
        "t.py::ok": ("passed", ""),
        "t.py::bad": ("failed", "assert 1 == 2"),
        "t.py::skip": ("skipped", "no TLS"),
        "t.py::xf": ("xfailed", "kernel does X"),
        "t.py::err": ("error", "left behind"),
        "t.py::hung": ("unfinished", "still running when the guest's time limit ended it"),
    }


def test_a_line_cut_by_the_kill_is_ignored() -> None:
    stream = lines(phase("t.py::ok", "call", "passed"), phase("t.py::ok", "teardown", "passed"))
    results = vmrunner.parse_results(stream + '{"nodeid": "t.py::x", "wh')
    assert list(results) == ["t.py::ok"]


def test_guest_script_exports_what_the_guest_tests_need() -> None:
    script = vmrunner.GUEST_SCRIPT
    for needed in ("SOCKPOL_IN_VM=1", "CI={ci}", "mount -t bpf", "-p sockpol_vm_guest", "timeout"):
        assert needed in script
