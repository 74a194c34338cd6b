"""The real servers for the server oracle (tests/servers/servers.py), started once per session.

scripts/test.sh installs them (nginx, haproxy, apache2, tomcat10, nodejs; Python is there). A
server that is missing or does not start is skipped LOUDLY (a banner at the end of the run);
under CI=true that fails the tests instead, so CI cannot pass on fewer servers than it claims.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from servers import Endpoint, running_endpoints  # noqa: E402

_problems: list[str] = []
SUMMARY: list[str] = []  # lines for the end of the run (test_servers.py adds its totals)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if SUMMARY:
        terminalreporter.write_sep("=", "server oracle (tests/servers)")
        for line in SUMMARY:
            terminalreporter.write_line(line)
    if _problems:
        terminalreporter.write_sep("!", "SERVERS OF THE SERVER ORACLE WERE SKIPPED", red=True)
        for p in _problems:
            terminalreporter.write_line(f"  {p}", red=True)


@pytest.fixture(scope="session")
def endpoints() -> Iterator[list[Endpoint]]:
    with running_endpoints("sockpol-servers-", _problems) as eps:
        yield eps
