"""The server oracle (tests/servers) through the real kernel program, for a sample of its cases.

Both oracle policies are compiled for the ports of every real server, loaded for a cgroup, and a
process in that cgroup sends each sampled case (one send() per case) to every server. What each
send() returned must be what the interpreter predicts, and no server may serve, from what the
kernel let through, a route the policy denies for that request, or read a request where the
kernel did not judge one (the oracle of tests/servers/oracle.py). That the kernel delivers
exactly the bytes the interpreter predicts is the kernel differential test's business; servers
answer a cut-off stream with timing-dependent responses, so they are not compared here.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import socket
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

SERVERS = Path(__file__).resolve().parents[1] / "servers"
sys.path.insert(0, str(SERVERS))
sys.path.insert(0, str(SERVERS.parent))

_spec = importlib.util.spec_from_file_location(
    "sockpol_kernel_conftest_oracle", Path(__file__).with_name("conftest.py")
)
_kernel_conftest = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _kernel_conftest
_spec.loader.exec_module(_kernel_conftest)
_remove_cgroup, run_in_cgroup = _kernel_conftest._remove_cgroup, _kernel_conftest.run_in_cgroup

from cases import framing_cases, host_cases, path_cases  # noqa: E402
from oracle import (  # noqa: E402
    POLICY_TEXTS,
    Exchange,
    check,
    judge_stream,
    parse_responses,
    policy_text,
    report,
)
from servers import Endpoint, running_endpoints  # noqa: E402

from sockpol import runtime  # noqa: E402
from sockpol.compiler import compile_source  # noqa: E402
from sockpol.model.interp import Connection  # noqa: E402

pytestmark = pytest.mark.kernel

# Every how-many-th case of each kind is sampled (SOCKPOL_ORACLE_KERNEL_EVERY=1: all of them).
EVERY = int(os.environ.get("SOCKPOL_ORACLE_KERNEL_EVERY", "0")) or 12


def sample() -> list:
    picked = []
    for cases in (path_cases(), host_cases(), framing_cases()):
        picked += cases[::EVERY]
    # The findings of issue 14, always: path parameters, chunk extensions, empty lines.
    wanted = (";", "%3b", "chunk size extension", "before the first request", "after a body")
    picked += [c for c in path_cases() + framing_cases() if any(w in c.name for w in wanted)]
    return list(dict.fromkeys(picked))


@pytest.fixture(scope="module")
def endpoints(kernel_env) -> Iterator[list[Endpoint]]:
    with running_endpoints("sockpol-kservers-", []) as eps:
        yield eps


def send_each(plan: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """In the child (in the cgroup): per (port, data) one connection, one send(), a half-close,
    and everything the server answers until it closes: (send result or -errno, answer)."""

    def one(item: tuple[int, bytes]) -> tuple[int, bytes]:
        port, data = item
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            try:
                sent = s.send(data)
            except OSError as e:
                sent = -(e.errno or 1)
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            chunks, deadline = [], time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    chunk = s.recv(65536)
                except OSError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            return sent, b"".join(chunks)

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, plan))


@pytest.mark.parametrize("policy_name", sorted(POLICY_TEXTS))
def test_the_kernel_agrees_with_every_server(endpoints, cgroup2_root, tmp_path, policy_name):
    cases = sample()
    text = policy_text(policy_name, [ep.port for ep in endpoints])
    (compiled,), _ = compile_source(text, f"{policy_name}.pol")
    obj = tmp_path / "oracle.bpf.o"
    obj.write_bytes(compiled.object_code())
    # Names of our own, not the conftest's test prefixes: a concurrent test session's clean-up
    # removes those (as in test_differential.py), which would unload the policy mid-test.
    name = f"oracle-{os.getpid()}-{policy_name}"
    cgroup = cgroup2_root / f"sockpol-{name}"
    cgroup.mkdir()
    plan = [(ep.port, c.data) for c in cases for ep in endpoints]
    try:
        runtime.load(obj, cgroup, name=name).close()
        try:
            results = run_in_cgroup(cgroup, send_each, plan)
        finally:
            runtime.unload(name)
    finally:
        _remove_cgroup(cgroup, cgroup2_root)
    policy = compiled.policy
    failures = []
    by_case = {}
    for (port, data), (sent, answer) in zip(plan, results, strict=True):
        by_case.setdefault(data, {})[port] = (sent, answer)
    for case in cases:
        judged = judge_stream(policy, case.data)
        model = Connection(policy)
        model.send(case.data)
        predicted = model.sends[0].returned
        predicted = -errno.EACCES if predicted is None else predicted
        via_kernel = {}
        for ep in endpoints:
            sent, answer = by_case[case.data][ep.port]
            ex = Exchange(ep.label, case.data, parse_responses(answer), answer)
            via_kernel[ep.label] = ex
            if sent != predicted:
                failures.append(
                    f"{case.replay()}\n  {ep.label}: send() returned {sent}, the interpreter "
                    f"predicts {predicted}"
                )
        outcome = check(policy_name, policy, case, via_kernel, None, judged, case.kind == "framing")
        if outcome.failures:
            failures.append(report(outcome, via_kernel))
    print(
        f"\nserver oracle through the kernel [{policy_name}]: {len(cases)} cases x "
        f"{len(endpoints)} servers, {len(failures)} failures",
        file=sys.stderr,
    )
    assert not failures, f"{len(failures)} failures:\n\n" + "\n\n".join(failures[:40])
