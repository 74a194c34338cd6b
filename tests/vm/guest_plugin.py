"""Loaded into the guest's pytest (`-p sockpol_vm_guest`): one JSON line per test phase, at once.

Why not JUnit XML: pytest writes that when the session ends, so a guest run killed by the time
limit would report nothing at all. With a line per phase, every test that finished before a kill
is reported, and the one that was running is named.
"""

from __future__ import annotations

import json
import os
from typing import Any

RESULTS = os.environ.get("SOCKPOL_VM_RESULTS", "")


def _message(report: Any) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])  # (file, line, reason)
    crash = getattr(report.longrepr, "reprcrash", None)
    return crash.message if crash is not None else ""


def pytest_runtest_logreport(report: Any) -> None:
    if not RESULTS:
        return
    record = {
        "nodeid": report.nodeid,
        "when": report.when,
        "outcome": report.outcome,
        "seconds": round(report.duration, 3),
        "message": _message(report),
        "details": report.longreprtext if report.failed else "",
        "xfail": getattr(report, "wasxfail", None),
    }
    with open(RESULTS, "a") as f:
        f.write(json.dumps(record) + "\n")


def pytest_runtest_logstart(nodeid: str, location: Any) -> None:
    if RESULTS:
        with open(RESULTS, "a") as f:
            f.write(json.dumps({"nodeid": nodeid, "when": "start"}) + "\n")
