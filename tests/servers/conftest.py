"""The real servers for the server oracle (tests/servers/servers.py), started once per session.

scripts/test.sh installs them (nginx, haproxy, apache2, tomcat10, nodejs; Python is there). A
server that is missing or does not start is skipped LOUDLY (a banner at the end of the run);
under CI=true that fails the tests instead, so CI cannot pass on fewer servers than it claims.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from servers import Endpoint, start_servers  # noqa: E402

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
    workdir = Path(tempfile.mkdtemp(prefix="sockpol-servers-"))
    workdir.chmod(0o755)  # Apache's workers (www-data) read a file in it
    started, problems = start_servers(workdir)
    _problems.extend(problems)
    try:
        if problems and os.environ.get("CI") == "true":
            pytest.fail("server oracle on CI without every server: " + "; ".join(problems))
        if len(started) < 4:
            pytest.skip(f"SERVER ORACLE SKIPPED: fewer than four servers ({'; '.join(problems)})")
        yield [ep for s in started for ep in s.endpoints]
    finally:
        for s in started:
            s.stop()
        shutil.rmtree(workdir, ignore_errors=True)
