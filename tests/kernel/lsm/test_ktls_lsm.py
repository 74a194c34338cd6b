"""Policy inside TLS through the LSM backend: real kTLS clients (Python `ssl` with kTLS and
`openssl s_client` with `Options = KTLS`, TLS 1.2 and 1.3) against nginx, on every kernel with
kTLS and BPF LSM, those that reject TLS on sockmap sockets included (that is what the backend
is for). The same requests in plaintext to the same policy give the verdicts to match; nginx's
access log says what reached the server. Clients, nginx and the TLS cases come from
test_ktls_clients.py; policies here are named t-lsm-*.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_ktls_clients import (  # the same server, clients and cases as the sockmap tests
    ALLOWED,
    CASES,
    DENIED,
    Nginx,
    check_s_client,
    curl,
    nginx,  # noqa: F401 -- a fixture
    outcome,
    python_client,
)

from sockpol.compiler import compile_to_file
from sockpol.runtime import counters as rc
from sockpol.runtime import load, probe, status, unload

NAME = "t-lsm-ktls"
POLICY = """\
policy t-lsm-ktls {{
    port {ports}
    default deny
    {tls}
    allow GET /ok
    allow GET /public/**
}}
"""


def lsm_object(nginx: Nginx, tmp: Path, tls: str) -> Path:  # noqa: F811
    ports = ", ".join(str(p) for p in [*nginx.ports.values(), nginx.plain_port])
    text = POLICY.format(ports=ports, tls=tls)
    return compile_to_file(text, tmp / f"lsm-{tls.replace(' ', '-')}.o", "l.pol", backend="lsm")


@pytest.fixture
def governed(lsm_kernel, nginx: Nginx, cgroup: Path, tmp_path: Path) -> Iterator[Path]:  # noqa: F811
    load(lsm_object(nginx, tmp_path, "tls"), cgroup).close()
    yield cgroup
    unload(NAME)


def counters() -> rc.PolicyCounters:
    s = next(s for s in status() if s.name == NAME)
    return rc.read_counters(s.pin_dir, s.metadata)


def test_auto_backend_choice_for_a_tls_policy(lsm_kernel, ktls_sockmap) -> None:
    choice = probe.choose_backend(tls_policy=True)
    assert choice.backend == ("sockmap" if ktls_sockmap.ok else "lsm"), choice


@pytest.mark.parametrize("case", CASES)
def test_python_ssl_ktls_through_lsm_matches_plaintext(
    case: str,
    nginx: Nginx,  # noqa: F811
    governed: Path,
    run_in_cgroup,
) -> None:
    paths = ALLOWED + DENIED
    mark = nginx.mark()
    plain = run_in_cgroup(governed, python_client, nginx.plain_port, paths, None, None)
    port = nginx.ports[case]
    tls = run_in_cgroup(governed, python_client, port, paths, str(nginx.cert), CASES[case][2].value)
    assert [outcome(r) for r in plain] == ["served"] * len(ALLOWED) + ["refused"] * len(DENIED)
    assert [outcome(r) for r in tls] == [outcome(r) for r in plain], (tls, counters())
    assert all("cipher" in r for r in tls), tls
    # kTLS was on for every connection that got an answer (the refused ones may fail first).
    assert all(r.get("ktls_tx") for r in tls if "error" not in r), tls
    assert nginx.paths_on(port, mark) == ALLOWED, "denied requests must never reach nginx"
    c = counters()
    assert c.rules[0].requests == 2 and c.rules[1].requests == 2, c
    assert sum(n.requests for n in c.refused.values()) == 2 * len(DENIED), c
    assert set(c.refused) <= {"default", "ambiguous-path"}, c
    assert c.default.requests == 2, c


@pytest.mark.parametrize("case", ["tls12-aes256", "tls13-aes128"])
def test_openssl_s_client_ktls_through_lsm(
    case: str,
    nginx: Nginx,  # noqa: F811
    governed: Path,
    run_in_cgroup,
    tmp_path: Path,
) -> None:
    check_s_client(case, nginx, governed, run_in_cgroup, tmp_path, counters)


def test_userspace_tls_through_lsm_is_refused_as_the_policy_says(
    nginx: Nginx,  # noqa: F811
    governed: Path,
    run_in_cgroup,
) -> None:
    """curl encrypts in user space: the LSM program sees its records, walks the handshake, and
    refuses the first application-data record (tls-userspace), as the sockmap backend does."""
    port, mark = nginx.ports["tls13-aes128"], nginx.mark()
    status_, out = run_in_cgroup(governed, curl, f"https://localhost:{port}/ok", str(nginx.cert))
    assert status_ != 0, out
    assert nginx.paths_on(port, mark) == []
    assert counters().refused["tls-userspace"].requests == 1
