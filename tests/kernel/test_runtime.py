"""The runtime API against the real kernel: load, attach, replace, status, unload.

Objects come from the real compiler (`compiled_policy`); every check of enforcement looks at what
the server received, not only at what send() returned (see shared notes on sk_msg).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sockpol.runtime import (
    LoadError,
    PolicyNotFound,
    RuntimeOpError,
    load,
    pins,
    status,
    unload,
)
from sockpol.runtime import libbpf as bpf

REPO = Path(__file__).resolve().parents[2]

# The only policy shape these tests need: one governed port, pass by default, refuse one subtree.
POLICY = """\
policy {name} {{
    port {port}
    default allow
    deny * /{denied}/**
}}
"""


def request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()


def send(sock: socket.socket, path: str) -> int | None:
    """Send one request on a connection; the errno if send() failed, else None (and read reply)."""
    try:
        sock.send(request(path))
    except OSError as e:
        return e.errno
    sock.settimeout(2)
    try:
        sock.recv(65536)
    except OSError:
        pass
    return None


def cgroup_show(cgroup: Path) -> str:
    """What bpftool says is attached to exactly this cgroup (JSON text)."""
    return subprocess.run(
        ["bpftool", "--json", "cgroup", "show", str(cgroup)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def status_of(name: str):
    found = [s for s in status() if s.name == name]
    assert found, f"status() does not list {name}: {[s.name for s in status()]}"
    return found[0]


@pytest.fixture
def policy(compiled_policy, http_server):
    """policy(name, denied="admin") -> object path, governing the test server's port."""

    def make(name: str, denied: str = "admin") -> Path:
        return compiled_policy(POLICY.format(name=name, port=http_server.port, denied=denied))

    return make


def test_load_attach_unload_leaves_nothing(
    policy, cgroup, http_server, http_client, assert_nothing_left
):
    obj = policy("rt-cycle")
    handle = load(obj, cgroup)
    assert handle.name == "rt-cycle"
    assert handle.pin_dir == pins.pin_root(create=False) / "rt-cycle"
    assert {p.name for p in handle.pin_dir.iterdir()} >= {
        "sockpol_msg",
        "sockpol_sockops",
        "sockpol_socks",
        "cgroup_link",
        "state",
    }
    assert "sockpol_sockops" in cgroup_show(cgroup)

    ok, denied = http_client(cgroup, http_server.port, [[request("/ok")], [request("/admin/x")]])
    assert ok.received.startswith(b"HTTP/1.1 200")
    assert denied.sends[0].errno == errno.EACCES
    http_server.settle()
    assert http_server.request_lines() == [b"GET /ok HTTP/1.1"]

    handle.close()
    unload("rt-cycle")
    assert_nothing_left("rt-cycle", cgroup)

    # Unloaded means unenforced: the same request now reaches the server.
    (after,) = http_client(cgroup, http_server.port, [[request("/admin/x")]])
    assert after.sends[0].errno is None
    assert http_server.wait_for_requests(2)[-1].startswith(b"GET /admin/x")


def test_load_without_cgroup_and_add_socket_by_hand(policy, http_server, assert_nothing_left):
    with load(policy("rt-byhand"), None) as handle:
        assert not (handle.pin_dir / "cgroup_link").exists()
        assert status_of("rt-byhand").cgroup is None

        governed = socket.create_connection(("127.0.0.1", http_server.port))
        released = socket.create_connection(("127.0.0.1", http_server.port))
        with governed, released:
            assert handle.add_socket(governed) is True
            assert handle.add_socket(governed) is False  # already in
            assert handle.add_socket(released) is True
            assert status_of("rt-byhand").sockets == 2
            assert handle.remove_socket(released) is True
            assert handle.remove_socket(released) is False

            assert send(governed, "/admin/x") == errno.EACCES
            assert send(released, "/admin/y") is None
            http_server.settle()
            assert http_server.request_lines() == [b"GET /admin/y HTTP/1.1"]
    unload("rt-byhand")
    assert_nothing_left("rt-byhand")


def test_add_socket_rejects_an_unconnected_socket(policy):
    # The kernel takes only established (or listening) TCP sockets; a fresh one is refused.
    with load(policy("rt-badsock"), None) as handle, socket.socket() as fresh:
        with pytest.raises(RuntimeOpError, match="add_socket"):
            handle.add_socket(fresh)
    unload("rt-badsock")


def test_replace_keeps_existing_connections_governed(
    policy, cgroup, http_server, connect_in_cgroup, assert_nothing_left
):
    first = load(policy("rt-replace", denied="admin"), cgroup)
    before = status_of("rt-replace")
    old_conn = connect_in_cgroup(cgroup, http_server.port)
    assert status_of("rt-replace").sockets == 1

    second = load(policy("rt-replace", denied="secret"), cgroup)
    after = status_of("rt-replace")
    assert after.program_ids != before.program_ids
    assert after.link_id == before.link_id  # same link, program swapped in place
    assert after.map_ids["sockpol_socks"] == before.map_ids["sockpol_socks"]
    assert after.sockets == 1  # the existing connection is still in the sockhash
    new_conn = connect_in_cgroup(cgroup, http_server.port)

    # The old connection was handed over to the new program (emit.handover): both connections
    # are judged by the new policy.
    assert after.serial == before.serial + 1
    assert send(old_conn, "/admin/1") is None
    assert send(old_conn, "/secret/1") == errno.EACCES
    assert send(new_conn, "/admin/2") is None
    assert send(new_conn, "/secret/2") == errno.EACCES
    http_server.settle()
    assert sorted(http_server.request_lines()) == [
        b"GET /admin/1 HTTP/1.1",
        b"GET /admin/2 HTTP/1.1",
    ]
    first.close()
    second.close()
    old_conn.close()
    new_conn.close()
    unload("rt-replace")
    assert_nothing_left("rt-replace", cgroup)


def test_replace_moves_to_another_cgroup(policy, cgroup, assert_nothing_left):
    a, b = cgroup / "a", cgroup / "b"
    a.mkdir()
    b.mkdir()
    load(policy("rt-move"), a).close()
    load(policy("rt-move"), b).close()
    assert status_of("rt-move").cgroup == str(b)
    show = {c: cgroup_show(c) for c in (a, b)}
    assert "sockpol_sockops" not in show[a]
    assert "sockpol_sockops" in show[b]

    # Replacing with no cgroup detaches the old link: sockets are then only added by hand.
    load(policy("rt-move"), None).close()
    assert status_of("rt-move").cgroup is None
    assert status_of("rt-move").link_id is None
    assert "sockpol_sockops" not in cgroup_show(b)
    unload("rt-move")
    assert_nothing_left("rt-move", a)


def test_two_policies_share_a_cgroup(
    policy, compiled_policy, free_port, cgroup, http_server, http_client, assert_nothing_left
):
    # cgroup links are multi-attach: a second policy (another port) coexists with the first.
    load(policy("rt-multi-a"), cgroup).close()
    other = POLICY.format(name="rt-multi-b", port=free_port, denied="other")
    load(compiled_policy(other), cgroup).close()
    assert cgroup_show(cgroup).count("sockpol_sockops") == 2
    unload("rt-multi-b")
    (conn,) = http_client(cgroup, http_server.port, [[request("/admin/x")]])
    assert conn.refused  # the first policy is untouched
    unload("rt-multi-a")
    assert_nothing_left("rt-multi-a", cgroup)
    assert_nothing_left("rt-multi-b", cgroup)


def test_failed_replace_leaves_old_policy_in_force(
    policy, unverifiable_copy, cgroup, http_server, connect_in_cgroup, assert_nothing_left
):
    load(policy("rt-keep"), cgroup).close()
    old_conn = connect_in_cgroup(cgroup, http_server.port)
    before = status_of("rt-keep")
    assert before.sockets == 1
    pins_before = sorted(p.name for p in before.pin_dir.iterdir())

    broken = unverifiable_copy(policy("rt-keep", denied="secret"))
    with pytest.raises(LoadError) as info:
        load(broken, cgroup)
    assert info.value.stage == "load"
    assert "verifier rejected sockpol_msg" in str(info.value)
    assert info.value.log_lines, "the verifier's explanation is quoted"

    after = status_of("rt-keep")
    assert after == before
    assert sorted(p.name for p in after.pin_dir.iterdir()) == pins_before
    assert not [p for p in after.pin_dir.parent.iterdir() if p.name.startswith("_")]

    # Old and new connections are still governed by the old policy.
    new_conn = connect_in_cgroup(cgroup, http_server.port)
    assert send(new_conn, "/secret/ok") is None
    assert send(old_conn, "/admin/1") == errno.EACCES
    assert send(new_conn, "/admin/2") == errno.EACCES
    http_server.settle()
    assert http_server.request_lines() == [b"GET /secret/ok HTTP/1.1"]
    old_conn.close()
    new_conn.close()
    unload("rt-keep")
    assert_nothing_left("rt-keep", cgroup)


def test_verifier_rejection_of_a_fresh_load_leaves_nothing(
    policy, unverifiable_copy, cgroup, assert_nothing_left
):
    with pytest.raises(LoadError) as info:
        load(unverifiable_copy(policy("rt-reject")), cgroup)
    message = str(info.value)
    assert message.startswith(f"load: verifier rejected sockpol_msg on Linux {os.uname().release}:")
    assert "processed " in message and "docs/kernels.md" in message
    assert "Traceback" not in message
    assert len(info.value.log_lines) <= 20
    assert "rt-reject" not in [s.name for s in status()]
    assert_nothing_left("rt-reject", cgroup)


def test_failure_after_attach_rolls_back(
    policy, cgroup, monkeypatch, assert_nothing_left, http_server, http_client
):
    def refuse(*args, **kwargs):
        raise bpf.BpfError("bpf_link_create", errno.EPERM)

    monkeypatch.setattr(bpf, "link_create", refuse)
    with pytest.raises(LoadError, match="attach: sockpol_sockops to cgroup"):
        load(policy("rt-rollback"), cgroup)
    assert_nothing_left("rt-rollback", cgroup)

    # Replacing onto another cgroup fails the same way: the old version stays attached.
    monkeypatch.undo()
    load(policy("rt-rollback"), cgroup).close()
    before = status_of("rt-rollback")
    other = cgroup / "other"
    other.mkdir()
    monkeypatch.setattr(bpf, "link_create", refuse)
    with pytest.raises(LoadError):
        load(policy("rt-rollback", denied="secret"), other)
    assert status_of("rt-rollback") == before
    (conn,) = http_client(cgroup, http_server.port, [[request("/admin/x")]])
    assert conn.refused
    monkeypatch.undo()
    unload("rt-rollback")
    assert_nothing_left("rt-rollback", cgroup)


def test_status_from_a_fresh_process(policy, cgroup):
    handle = load(policy("rt-status"), cgroup)
    handle.close()
    script = (
        "import json\n"
        "from sockpol.runtime import status\n"
        "print(json.dumps([dict(name=s.name, ports=s.ports, cgroup=s.cgroup,"
        " sha=s.object_sha256, progs=s.program_ids, link=s.link_id, problem=s.problem,"
        " loaded=s.loaded_at.isoformat()) for s in status()]))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    ).stdout
    (record,) = [r for r in json.loads(out) if r["name"] == "rt-status"]
    mine = status_of("rt-status")
    assert record["ports"] == [list(p) for p in mine.ports] and mine.ports
    assert record["cgroup"] == str(cgroup)
    assert record["progs"] == mine.program_ids == handle.program_ids
    assert record["link"] == handle.link_id is not None
    assert record["problem"] is None
    assert len(record["sha"]) == 64
    unload("rt-status")


def test_unload_unknown_name_is_a_clear_error():
    with pytest.raises(PolicyNotFound, match="no-such-policy"):
        unload("no-such-policy")


def test_load_into_a_missing_cgroup_is_a_clear_error(policy, cgroup, assert_nothing_left):
    with pytest.raises(Exception, match="not a cgroup v2 directory"):
        load(policy("rt-nocg"), cgroup / "does-not-exist")
    assert_nothing_left("rt-nocg")


CRASH_DURING_LOAD = """\
import os, sys
from sockpol.runtime import loader
loader._Load._commit = lambda self, staging: os._exit(9)  # die after attaching, before commit
loader.load(sys.argv[1], sys.argv[2])
"""


def test_a_load_that_died_midway_is_swept_by_the_next(policy, cgroup, assert_nothing_left):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    obj = policy("rt-crash")
    died = subprocess.run([sys.executable, "-c", CRASH_DURING_LOAD, str(obj), str(cgroup)], env=env)
    assert died.returncode == 9
    root = pins.pin_root(create=False)
    assert [p.name for p in root.iterdir() if p.name.startswith("_staging-rt-crash-")]
    assert "rt-crash" not in [s.name for s in status()]  # never committed, so not loaded

    load(obj, cgroup).close()  # sweeps the leftovers under the lock
    assert not [p for p in root.iterdir() if p.name.startswith("_")]
    unload("rt-crash")
    assert_nothing_left("rt-crash", cgroup)


def test_cgroup_argument_forms(cgroup, cgroup2_root):
    from sockpol.runtime.system import SystemSetupError, resolve_cgroup

    relative = cgroup.relative_to(cgroup2_root)
    assert resolve_cgroup(cgroup) == cgroup
    assert resolve_cgroup(str(relative)) == cgroup
    assert resolve_cgroup(f"/{relative}") == cgroup  # as printed by /proc/PID/cgroup
    with pytest.raises(SystemSetupError, match="not a cgroup v2 directory"):
        resolve_cgroup("/tmp")
    with pytest.raises(SystemSetupError, match="not inside the cgroup v2 mount"):
        resolve_cgroup("../../etc")
