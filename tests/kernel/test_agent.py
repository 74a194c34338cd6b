"""`sockpol agent`'s reconciler against real cgroup trees laid out as kubelet lays them out (both
cgroup drivers, containerd and CRI-O naming), loading real programs and sending real requests
from processes in the containers' cgroups.

The trees live in a test-made cgroup that stands in for the cgroup v2 mount (the reconciler's
`cgroup_base`). Loads are named with a prefix unique to this test session, so the reconciler
owns (and may unload) nothing but what these tests loaded.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from sockpol.agent.cgroups import pod_cgroup_name, to_cgroupfs, to_systemd
from sockpol.agent.desired import Pod, PodTarget, PolicySpec, Selector, Snapshot
from sockpol.agent.reconciler import AgentConfig, Reconciler

PREFIX = f"t-agent{os.getpid()}-"
ROOT = Path(__file__).resolve().parents[2]
DAEMONSET_CAPS = ("BPF", "NET_ADMIN", "PERFMON")


def policy_text(port: int, allow: str = "/ok", extra: str = "") -> str:
    return f"policy web {{\n    port {port}\n    default deny\n    allow GET {allow}\n{extra}}}\n"


def request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode()


class KubeletTree:
    """Makes pod and container cgroups under `base` as kubelet and the runtimes name them."""

    def __init__(self, base: Path) -> None:
        self.base = base

    def pod(
        self,
        labels: dict[str, str],
        *,
        namespace: str = "shop",
        qos: str = "Burstable",
        driver: str = "cgroupfs",
        runtime: str = "containerd",
        make: bool = True,
    ) -> tuple[Pod, Path]:
        uid = str(uuid.uuid4())
        pod = Pod(uid, namespace, f"pod-{uid[:8]}", labels, qos, "Running")
        name = pod_cgroup_name(pod)
        pod_dir = self.base / (to_cgroupfs(name) if driver == "cgroupfs" else to_systemd(name))
        cid = uuid.uuid4().hex + uuid.uuid4().hex
        container = {
            ("cgroupfs", "containerd"): cid,
            ("cgroupfs", "cri-o"): f"crio-{cid}",
            ("systemd", "containerd"): f"cri-containerd-{cid}.scope",
            ("systemd", "cri-o"): f"crio-{cid}.scope",
        }[(driver, runtime)]
        if make:
            self.make(pod_dir / container)
        return pod, pod_dir / container

    @staticmethod
    def make(container: Path) -> None:
        """What kubelet and the runtime do for a pod: its cgroup, then its containers'."""
        container.mkdir(parents=True)
        if container.name.startswith("crio-") and container.name.endswith(".scope"):
            cid = container.name.removeprefix("crio-").removesuffix(".scope")
            (container.parent / f"crio-conmon-{cid}.scope").mkdir()

    def kubelet_started(self) -> None:
        """kubelet makes the QoS level cgroups when it starts, under its driver's naming."""
        from sockpol.agent.cgroups import PodCgroups

        for d in PodCgroups(self.base).pod_parents():
            d.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def remove(container: Path) -> None:
        """What kubelet does when a pod is gone: its container and pod cgroups go."""
        for d in (container.parent / n for n in os.listdir(container.parent)):
            if d.is_dir():
                d.rmdir()
        container.parent.rmdir()


@pytest.fixture
def tree(cgroup: Path) -> KubeletTree:
    return KubeletTree(cgroup)


@pytest.fixture
def make_reconciler(cgroup: Path, tmp_path: Path):
    def make() -> Reconciler:
        return Reconciler(
            AgentConfig(state_dir=tmp_path / "state", prefix=PREFIX, cgroup_base=cgroup,
                        backoff_base=60.0)
        )  # fmt: skip

    return make


def web_spec(text: str, key: str = "shop/web", **labels: str) -> PolicySpec:
    return PolicySpec(
        key=key,
        source=text,
        source_name=f"{key}.pol",
        pods=(PodTarget("shop", Selector(tuple(sorted(labels.items())) or (("app", "web"),))),),
    )


def owned_status() -> dict:
    from sockpol import runtime

    return {s.name: s for s in runtime.status() if s.name.startswith(PREFIX)}


def refused(http_client, container: Path, port: int, path: str) -> bool:
    conn = http_client(container, port, [[request(path)]])[0]
    if conn.refused:
        return True
    assert conn.received.startswith(b"HTTP/1.1 200"), conn
    return False


def actions(report) -> list[tuple[str, bool]]:
    return sorted((a.action, a.ok) for a in report.actions)


def test_governs_selected_pods_follows_changes_and_removals(
    tree, make_reconciler, http_server, http_client, connect_in_cgroup, assert_nothing_left
):
    port = http_server.port
    a, a_ctr = tree.pod({"app": "web"}, qos="Burstable", driver="cgroupfs")
    b, b_ctr = tree.pod({"app": "web"}, qos="Guaranteed", driver="systemd", runtime="cri-o")
    c, c_ctr = tree.pod({"app": "other"}, qos="BestEffort", driver="systemd")
    d, d_ctr = tree.pod({"app": "web"}, namespace="elsewhere")
    pods = [a, b, c, d]
    rec = make_reconciler()
    spec = web_spec(policy_text(port))

    report = rec.reconcile(Snapshot((spec,)), pods)
    assert actions(report) == [("load", True), ("load", True)], report
    assert report.specs["shop/web"].ok and report.specs["shop/web"].current == 2
    loaded = owned_status()
    assert sorted(s.cgroup for s in loaded.values()) == sorted(
        [str(a_ctr.parent), str(b_ctr.parent)]
    )
    for ctr in (a_ctr, b_ctr):  # governed: the policy's rules decide
        assert not refused(http_client, ctr, port, "/ok")
        assert refused(http_client, ctr, port, "/no")
    for ctr in (c_ctr, d_ctr):  # other labels, other namespace: not governed
        assert not refused(http_client, ctr, port, "/no")

    # The policy changes: every load is reloaded (tables swapped), open connections kept.
    kept = connect_in_cgroup(a_ctr, port)
    kept.sendall(request("/ok"))
    assert kept.recv(4096).startswith(b"HTTP/1.1 200")
    before = owned_status()
    spec2 = web_spec(policy_text(port, allow="/new"))
    report = rec.reconcile(Snapshot((spec2,)), pods)
    assert actions(report) == [("reload", True), ("reload", True)], report
    after = owned_status()
    for name, st in after.items():
        assert st.metadata.source_sha256 == spec2.source_sha256
        assert st.program_ids == before[name].program_ids  # swapped in place, not replaced
        assert st.reloads == 1
    assert after[next(n for n, s in after.items() if s.cgroup == str(a_ctr.parent))].sockets == 1
    kept.sendall(request("/new"))  # the connection opened before the change: new rules
    assert kept.recv(4096).startswith(b"HTTP/1.1 200")
    with pytest.raises(OSError) as refusal:
        kept.sendall(request("/ok"))
    assert refusal.value.errno == errno.EACCES
    assert refused(http_client, b_ctr, port, "/ok") and not refused(
        http_client, b_ctr, port, "/new"
    )

    # A new pod is governed when it appears; nothing else is touched.
    e, e_ctr = tree.pod({"app": "web"}, qos="BestEffort", driver="systemd")
    pods.append(e)
    report = rec.reconcile(Snapshot((spec2,)), pods)
    assert actions(report) == [("load", True)], report
    assert refused(http_client, e_ctr, port, "/ok")

    # A pod goes away: its load is unloaded, the others stay.
    gone = next(n for n, s in owned_status().items() if s.cgroup == str(a_ctr.parent))
    pods.remove(a)
    tree.remove(a_ctr)
    report = rec.reconcile(Snapshot((spec2,)), pods)
    assert actions(report) == [("unload", True)], report
    assert gone not in owned_status() and len(owned_status()) == 2
    assert_nothing_left(gone)

    # A source that has not listed yet is never a reason to unload.
    report = rec.reconcile(Snapshot((), ready=False), pods)
    assert report.actions == [] and len(owned_status()) == 2

    # Nor is a policy the source could not read (its loads are kept as they are).
    report = rec.reconcile(Snapshot((), held=("shop/web",)), pods)
    assert report.actions == [] and len(owned_status()) == 2

    # The policy is removed: every load goes, nothing is left behind.
    names = set(owned_status())
    report = rec.reconcile(Snapshot(()), pods)
    assert actions(report) == [("unload", True), ("unload", True)], report
    assert not owned_status()
    for name in names:
        assert_nothing_left(name)


def test_repairs_drift_adopts_after_restart_and_leaves_others_alone(
    tree, make_reconciler, http_server, http_client, compiled_policy
):
    from sockpol import runtime
    from sockpol.runtime.counters import read_mode, set_mode

    port = http_server.port
    pod, ctr = tree.pod({"app": "web"}, driver="systemd")
    spec = web_spec(policy_text(port))
    rec = make_reconciler()
    assert actions(rec.reconcile(Snapshot((spec,)), [pod])) == [("load", True)]
    (name,) = owned_status()

    # Unloaded by hand: loaded again.
    runtime.unload(name)
    assert actions(rec.reconcile(Snapshot((spec,)), [pod])) == [("load", True)]
    assert refused(http_client, ctr, port, "/no")

    # Reloaded by hand with another policy: the desired one is put back (a reload).
    runtime.reload(name, compiled_policy(policy_text(port, allow="/no")))
    assert not refused(http_client, ctr, port, "/no")
    assert actions(rec.reconcile(Snapshot((spec,)), [pod])) == [("reload", True)]
    assert owned_status()[name].metadata.source_sha256 == spec.source_sha256
    assert refused(http_client, ctr, port, "/no")

    # Switched to dry-run by hand: the mode is restored, nothing reloaded.
    set_mode(name, "dry-run")
    reloads = owned_status()[name].reloads
    assert actions(rec.reconcile(Snapshot((spec,)), [pod])) == [("mode", True)]
    st = owned_status()[name]
    assert read_mode(st.pin_dir) == "enforce" and st.reloads == reloads

    # Its cgroup link unpinned by hand (the programs detached): loaded again, same name.
    (Path(st.pin_dir) / "cgroup_link").unlink()
    assert not refused(http_client, ctr, port, "/no")
    assert actions(rec.reconcile(Snapshot((spec,)), [pod])) == [("replace", True)]
    assert owned_status()[name].problem is None
    assert refused(http_client, ctr, port, "/no")

    # A policy an operator loaded by hand, in the same pod: never the agent's to touch.
    hand = f"t-hand{os.getpid()}"
    runtime.load(compiled_policy(policy_text(port + 1)), ctr.parent, name=hand).close()
    try:
        # The agent restarts: it adopts what is loaded (no load, no reload, same programs).
        before = owned_status()[name]
        rec2 = make_reconciler()
        report = rec2.reconcile(Snapshot((spec,)), [pod])
        assert actions(report) == [("adopt", True)], report
        after = owned_status()[name]
        assert after.program_ids == before.program_ids and after.reloads == before.reloads
        assert after.loaded_at == before.loaded_at
        assert actions(rec2.reconcile(Snapshot((spec,)), [pod])) == []  # adopted once
        assert refused(http_client, ctr, port, "/no")

        # The sweep of compiled objects keeps the one the loaded version came from.
        objects = rec2.objects.directory
        (objects / "stale.bpf.o").write_bytes(b"x")
        rec2.config.collect_every = 0
        assert actions(rec2.reconcile(Snapshot((spec,)), [pod])) == []
        assert Path(owned_status()[name].object_path).exists()
        assert not (objects / "stale.bpf.o").exists()

        # Everything desired is removed: the agent's loads go, the operator's stays.
        assert actions(rec2.reconcile(Snapshot(()), [pod])) == [("unload", True)]
        assert [s.name for s in runtime.status(hand)] == [hand]
    finally:
        runtime.unload(hand)


def test_broken_policy_keeps_last_good_and_others_are_unaffected(
    tree, make_reconciler, http_server, http_client
):
    from sockpol.runtime.probe import tls_policy_support

    port = http_server.port
    a, a_ctr = tree.pod({"app": "a"})
    b, b_ctr = tree.pod({"app": "b"}, driver="systemd")
    good = web_spec(policy_text(port), key="shop/a", app="a")
    other = web_spec(policy_text(port, allow="/b"), key="shop/b", app="b")
    rec = make_reconciler()
    assert actions(rec.reconcile(Snapshot((good, other)), [a, b])) == [("load", True)] * 2
    b_name = next(n for n, s in owned_status().items() if s.cgroup == str(b_ctr.parent))

    # shop/b's text breaks: its loaded version stays, shop/a is unaffected.
    broken = replace(other, source=policy_text(port, allow="api/v1"))
    report = rec.reconcile(Snapshot((good, broken)), [a, b])
    assert report.actions == [], report
    assert report.specs["shop/a"].ok
    rb = report.specs["shop/b"]
    assert not rb.ok and "does not compile" in rb.message and "E003" in rb.message, rb.message
    assert (rb.loaded, rb.current) == (1, 0)
    assert owned_status()[b_name].metadata.source_sha256 == other.source_sha256
    assert refused(http_client, b_ctr, port, "/no") and not refused(http_client, b_ctr, port, "/b")

    # A pod selected by the broken policy appears: it gets the last good version...
    b2, b2_ctr = tree.pod({"app": "b"}, qos="Guaranteed")
    report = rec.reconcile(Snapshot((good, broken)), [a, b, b2])
    assert actions(report) == [("load", True)], report
    assert refused(http_client, b2_ctr, port, "/no") and not refused(
        http_client, b2_ctr, port, "/b"
    )
    # ... also from an agent restarted meanwhile (the object its loaded copies came from).
    b3, b3_ctr = tree.pod({"app": "b"}, driver="systemd", runtime="cri-o")
    rec2 = make_reconciler()
    report = rec2.reconcile(Snapshot((good, broken)), [a, b, b2, b3])
    assert sorted(a.action for a in report.actions if a.action != "adopt") == ["load"], report
    assert not refused(http_client, b3_ctr, port, "/b")

    # A policy this kernel cannot run (a `tls` policy without kTLS on sockhash sockets):
    # reported with the kernel's reason, retried only after back-off, the others untouched.
    support = tls_policy_support()
    if support.ok:
        return  # this kernel runs tls policies; the VM matrix has kernels that do not
    c, c_ctr = tree.pod({"app": "c"})
    tls = web_spec(policy_text(port, extra="    tls\n"), key="shop/c", app="c")
    pods = [a, b, b2, b3, c]
    report = rec2.reconcile(Snapshot((good, broken, tls)), pods)
    failed = [x for x in report.actions if not x.ok]
    assert [(x.action, x.key) for x in failed] == [("load", "shop/c")], report
    failing = report.specs["shop/c"].message
    assert "cannot judge requests inside TLS" in failing
    assert report.specs["shop/a"].ok
    # Held back (backoff_base is 60 s): not tried again, and reported in the same words (a
    # message that changed every pass would mean a status write and an Event every pass).
    report = rec2.reconcile(Snapshot((good, broken, tls)), pods)
    assert report.actions == [] and report.specs["shop/c"].message == failing
    assert not refused(http_client, c_ctr, port, "/no")  # never half-loaded


def pod_object(pod: Pod, node: str = "node1") -> dict:
    """The API's object of a running pod bound to `node`."""
    return {
        "metadata": {"name": pod.name, "namespace": pod.namespace, "uid": pod.uid,
                     "labels": pod.labels},
        "spec": {"nodeName": node},
        "status": {"phase": "Running", "qosClass": pod.qos},
    }  # fmt: skip


def write_kubeconfig(path: Path, server: str) -> Path:
    """A kubeconfig for the list/watch test server (no credentials: it asks for none)."""
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "t", "cluster": {"server": server}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}],
        "users": [{"name": "t", "user": {}}],
    }))  # fmt: skip
    return path


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _capabilities(pid: int) -> set[str]:
    names = {21: "SYS_ADMIN", 12: "NET_ADMIN", 38: "PERFMON", 39: "BPF", 0: "CHOWN"}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            eff = int(line.split()[1], 16)
            return {names.get(i, str(i)) for i in range(64) if eff >> i & 1}
    return set()


def _first_line(proc: subprocess.Popen, timeout: float) -> str:
    """The process's first line on stderr (its start line), waited for `timeout` at most."""
    import select

    ready, _, _ = select.select([proc.stderr], [], [], timeout)
    assert ready, f"no line from the agent within {timeout} s"
    return proc.stderr.readline()


def _swap_configmap(directory: Path, files: dict[str, str], n: int) -> None:
    """Update a directory the way kubelet updates a mounted ConfigMap: a new timestamped
    directory, then one rename of the `..data` symlink; the visible names point through it."""
    new = directory / f"..2026_12_05_{n:02d}"
    new.mkdir()
    for name, text in files.items():
        (new / name).write_text(text)
    tmp = directory / "..data_tmp"
    tmp.symlink_to(new.name)
    os.replace(tmp, directory / "..data")
    for name in files:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")


def test_agent_process_serves_follows_a_configmap_and_leaves_policies_on_sigterm(
    cgroup, tmp_path, http_server, http_client
):
    from sockpol import runtime

    port = http_server.port
    ctr = cgroup / "app"
    ctr.mkdir()
    source = tmp_path / "configmap"
    source.mkdir()
    targets = f"policies:\n  - name: web\n    file: web.pol\n    cgroups: ['{cgroup.name}/app']\n"
    _swap_configmap(source, {"targets.yaml": targets, "web.pol": policy_text(port)}, 1)
    from sockpol.runtime.system import cgroup2_mount

    assert cgroup.parent == cgroup2_mount()  # targets.yaml names cgroups from the mount
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # With the DaemonSet's capabilities and no others (deploy/daemonset.yaml): nothing more is
    # needed to load, reload and serve.
    caps = "-all," + ",".join(f"+{c.lower()}" for c in DAEMONSET_CAPS)
    proc = subprocess.Popen(
        ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--",
         sys.executable, "-m", "sockpol.cli", "agent", "--source-dir", str(source),
         "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"),
         "--prefix", PREFIX, "--interval", "0.3"],
        stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    lines: list[dict] = []
    try:
        assert proc.stderr is not None
        start = json.loads(_first_line(proc, 30))
        assert start["action"] == "start", start
        caps = _capabilities(proc.pid)
        assert caps == set(DAEMONSET_CAPS), caps
        base = f"http://{start['listen']}"
        name = _wait(lambda: next(iter(owned_status()), None), 20, "the agent's load")
        assert refused(http_client, ctr, port, "/no")
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
            assert r.status == 200 and json.loads(r.read())["ok"] is True
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        assert f'sockpol_policy_info{{cgroup="{ctr}"' in metrics
        assert 'sockpol_agent_actions_total{action="load",result="ok"} 1.0' in metrics
        assert "sockpol_agent_sources_synced 1.0" in metrics
        assert (f'sockpol_agent_load_info{{cgroup="{ctr}",key="configmap/web",namespace="",'
                f'pod="",policy="{name}"}} 1.0') in metrics  # fmt: skip

        # The ConfigMap changes (a ..data swap): the policy is reloaded in place.
        _swap_configmap(
            source, {"targets.yaml": targets, "web.pol": policy_text(port, allow="/no")}, 2
        )
        _wait(lambda: owned_status()[name].reloads == 1, 20, "the reload")
        assert not refused(http_client, ctr, port, "/no")

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        lines = [json.loads(line) for line in proc.stderr.read().splitlines() if line.strip()]
        assert lines[-1]["action"] == "stop", lines[-1]
        assert [x["action"] for x in lines if x.get("result") == "ok"] == ["load", "reload"]
        assert all({"time", "level", "msg", "load", "target", "ms"} <= set(x) for x in lines[:2])
        # Enforcement does not depend on the agent: still loaded, still judging.
        assert name in owned_status()
        assert refused(http_client, ctr, port, "/ok")

        # Uninstalling: every load under the prefix goes, and only those.
        done = subprocess.run(
            [sys.executable, "-m", "sockpol.cli", "agent", "--unload-all", "--prefix", PREFIX],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=30,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert not owned_status()
        assert not refused(http_client, ctr, port, "/ok")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for leftover in owned_status():
            runtime.unload(leftover)


def test_sockpolicies_from_the_api_govern_this_nodes_pods_as_they_appear(
    tree, make_reconciler, http_server, http_client
):
    """The whole agent in one process: SockPolicy objects and pods from a list/watch server
    (tests/agent/fakeapi.py; no API server can run here) through the real kubernetes client,
    loads into the kernel, status and Events back to the server."""
    import threading

    import kubernetes

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent"))
    from fakeapi import FakeAPI

    from sockpol.agent.kube import KubeAdapter
    from sockpol.agent.main import Agent
    from sockpol.runtime.probe import tls_policy_support

    port = http_server.port

    def sockpolicy(name: str, text: str, app: str) -> dict:
        return {
            "apiVersion": "sockpol.io/v1alpha1", "kind": "SockPolicy",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"policy": text, "podSelector": {"matchLabels": {"app": app}}},
        }  # fmt: skip

    api = FakeAPI()
    config = kubernetes.client.Configuration()
    config.host = api.url
    kube = KubeAdapter(kubernetes.client.ApiClient(config), "node1", watch_timeout=5)
    tree.kubelet_started()
    # A long interval: every pass in this test is caused by a watch event or a new cgroup.
    agent = Agent(make_reconciler(), [kube.policies], kube.pods, kube, interval=60,
                  watch_cgroups=True)  # fmt: skip
    thread = threading.Thread(target=agent.run, daemon=True)
    try:
        a, a_ctr = tree.pod({"app": "web"}, driver="systemd")
        api.put("pods", pod_object(a))
        api.put("sockpolicies", sockpolicy("web", policy_text(port), "web"))
        kube.start(agent.wake)
        thread.start()
        _wait(lambda: len(owned_status()) == 1, 20, "the SockPolicy's load")
        assert refused(http_client, a_ctr, port, "/no")
        status = lambda: api.objects["sockpolicies"]["shop/web"].get("status", {})  # noqa: E731
        _wait(lambda: status().get("nodes", {}).get("node1", {}).get("ok"), 10, "status")
        assert status()["nodes"]["node1"]["current"] == 1

        # A new pod of this node: the watch reports it when it is bound, before kubelet makes
        # its cgroup; the agent loads its policy as soon as the cgroup appears (inotify), not
        # at the next pass. Another node's pod is none of this agent's business.
        b, b_ctr = tree.pod({"app": "web"}, qos="Guaranteed", runtime="cri-o", make=False)
        api.put("pods", pod_object(b))
        time.sleep(0.5)
        assert len(owned_status()) == 1  # no cgroup yet
        tree.make(b_ctr)
        _wait(lambda: len(owned_status()) == 2, 5, "the new pod's load, on its cgroup's mkdir")
        other, other_ctr = tree.pod({"app": "web"}, qos="BestEffort")
        api.put("pods", pod_object(other, node="node2"))
        assert refused(http_client, b_ctr, port, "/no")
        assert not refused(http_client, other_ctr, port, "/no")

        # The SockPolicy is deleted: its loads go.
        api.delete("sockpolicies", "shop", "web")
        _wait(lambda: not owned_status(), 20, "the unloads")

        if not tls_policy_support().ok:
            # A policy this node's kernel cannot run: on the object's status and as an Event.
            api.put("sockpolicies", sockpolicy("tls", policy_text(port, extra="    tls\n"), "web"))

            def node1() -> dict:
                status = api.objects["sockpolicies"]["shop/tls"].get("status", {})
                return status.get("nodes", {}).get("node1", {})

            _wait(lambda: node1().get("ok") is False, 20, "the failure on the status")
            assert "cannot judge requests inside TLS" in node1()["message"]
            # The Event is posted after the status patch: wait for it too (both bounded).
            tls_events = lambda: [e for e in api.events if e["involvedObject"]["name"] == "tls"]  # noqa: E731
            _wait(tls_events, 10, "the Warning event")
            (event,) = tls_events()
            assert event["type"] == "Warning" and "node node1:" in event["message"]
            assert not owned_status()
            # More passes while the load is held back by back-off: nothing new to say, so no
            # status write and no Event (not one per pass, on every node).
            patches = len([p for p in api.patches if "/sockpolicies/tls/" in p[0]])
            for _ in range(2):
                passes = agent.stats.passes
                agent.wake.set()
                _wait(lambda: agent.stats.passes > passes, 10, "a pass")  # noqa: B023
            assert len(tls_events()) == 1
            assert len([p for p in api.patches if "/sockpolicies/tls/" in p[0]]) == patches
    finally:
        agent.shutdown()
        thread.join(10)
        kube.stop()
        api.close()


def test_two_policies_on_one_pod_and_port_is_reported_not_silently_half_done(
    tree, make_reconciler, http_server, http_client, caplog
):
    port = http_server.port
    pod, ctr = tree.pod({"app": "web", "tier": "front"})
    first = web_spec(policy_text(port), key="shop/z-first", app="web")
    rec = make_reconciler()
    assert actions(rec.reconcile(Snapshot((first,)), [pod])) == [("load", True)]
    # A second policy for the same pod and port (a smaller key, but the first is loaded).
    second = web_spec(policy_text(port, allow="/no"), key="shop/a-second", tier="front")
    other_port = web_spec(policy_text(port + 1), key="shop/b-other", tier="front")
    with caplog.at_level(logging.WARNING, logger="sockpol.agent"):
        report = rec.reconcile(Snapshot((first, second, other_port)), [pod])
        assert actions(report) == [("load", True)], report  # only the one on another port
        assert rec.reconcile(Snapshot((first, second, other_port)), [pod]).actions == []
    (line,) = [r for r in caplog.records if getattr(r, "action", None) == "clash"]
    assert line.policy == "shop/a-second"  # logged once (the directory source has no status)
    assert report.specs["shop/z-first"].ok and report.specs["shop/b-other"].ok
    clash = report.specs["shop/a-second"]
    assert not clash.ok and "overlap those of policy shop/z-first" in clash.message
    assert refused(http_client, ctr, port, "/no")  # the first one's rules, as before


def test_an_egress_and_an_ingress_policy_on_one_pod_and_port_do_not_clash(
    tree, make_reconciler, http_server, http_client
):
    """They judge different connections (those the pod opens, those it accepts): both load."""
    port = http_server.port
    pod, ctr = tree.pod({"app": "web"})
    egress = web_spec(policy_text(port), key="shop/egress", app="web")
    ingress_text = policy_text(port).replace(f"port {port}\n", f"port {port}\n    side ingress\n")
    ingress = web_spec(ingress_text, key="shop/ingress", app="web")
    rec = make_reconciler()
    report = rec.reconcile(Snapshot((egress, ingress)), [pod])
    assert actions(report) == [("load", True), ("load", True)], report
    assert report.specs["shop/egress"].ok and report.specs["shop/ingress"].ok
    assert refused(http_client, ctr, port, "/no")  # the egress policy governs the pod's clients


def test_agent_command_with_kubernetes_follows_sockpolicies(
    tree, tmp_path, http_server, http_client
):
    """`sockpol agent --kubernetes`, as the DaemonSet runs it, with a kubeconfig pointing at the
    list/watch server: the command's wiring (client, informers, cgroup watcher, reporter)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent"))
    from fakeapi import FakeAPI

    port = http_server.port
    api = FakeAPI()
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api.url)
    tree.kubelet_started()
    pod, ctr = tree.pod({"app": "web"}, qos="BestEffort", driver="systemd")
    api.put("pods", pod_object(pod))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sockpol.cli", "agent", "--kubernetes", "--kubeconfig",
         str(kubeconfig), "--node", "node1", "--listen", "127.0.0.1:0",
         "--state-dir", str(tmp_path / "state"), "--prefix", PREFIX, "--interval", "60",
         "--cgroup-base", str(tree.base)],
        stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    try:
        api.put("sockpolicies", {
            "apiVersion": "sockpol.io/v1alpha1", "kind": "SockPolicy",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"policy": policy_text(port), "podSelector": {"matchLabels": {"app": "web"}}},
        })  # fmt: skip
        _wait(lambda: len(owned_status()) == 1, 20, "the SockPolicy's load")
        assert refused(http_client, ctr, port, "/no")

        def nodes() -> dict:
            return api.objects["sockpolicies"]["shop/web"].get("status", {}).get("nodes", {})

        _wait(lambda: nodes().get("node1", {}).get("current") == 1, 10, "the status")
        assert api.count("GET", "/api/v1/pods?fieldSelector=spec.nodeName%3Dnode1") >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert len(owned_status()) == 1  # left loaded
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        api.close()
        from sockpol import runtime

        for leftover in owned_status():
            runtime.unload(leftover)


def _agent_command(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "sockpol.cli", "agent", "--listen", "127.0.0.1:0",
         "--prefix", PREFIX, *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout,
    )  # fmt: skip


def test_agent_command_refuses_paths_that_would_make_it_govern_nothing(kernel_env, tmp_path):
    source = tmp_path / "configmap"
    source.mkdir()
    state = ["--state-dir", str(tmp_path / "state")]
    for args, expected in [
        (["--source-dir", str(source), "--cgroup-base", str(tmp_path), *state],
         "not a cgroup v2 directory"),
        (["--source-dir", str(tmp_path / "nope"), *state], "no such directory"),
        (["--source-dir", str(source), "--state-dir", "/dev/null/state"], "cannot write there"),
    ]:  # fmt: skip
        done = _agent_command(*args, "--once")
        assert done.returncode == 1, done.stderr
        (last,) = done.stderr.strip().splitlines()[-1:]
        assert last.startswith("sockpol: agent: ") and expected in last, done.stderr


def test_agent_once_with_kubernetes_waits_for_the_first_lists(
    tree, tmp_path, http_server, http_client
):
    """`--once --kubernetes` acts on a complete view (it used to pass before the first list,
    doing nothing, and exit 0)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent"))
    from fakeapi import FakeAPI

    from sockpol import runtime

    port = http_server.port
    api = FakeAPI()
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api.url)
    pod, ctr = tree.pod({"app": "web"}, qos="Guaranteed", driver="cgroupfs", runtime="cri-o")
    api.put("pods", pod_object(pod))
    api.put("sockpolicies", {
        "apiVersion": "sockpol.io/v1alpha1", "kind": "SockPolicy",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"policy": policy_text(port), "podSelector": {"matchLabels": {"app": "web"}}},
    })  # fmt: skip
    try:
        done = _agent_command(
            "--kubernetes",
            "--kubeconfig",
            str(kubeconfig),
            "--node",
            "node1",
            "--once",
            "--state-dir",
            str(tmp_path / "state"),
            "--cgroup-base",
            str(tree.base),
        )
        assert done.returncode == 0, done.stderr
        assert len(owned_status()) == 1
        assert refused(http_client, ctr, port, "/no")
    finally:
        api.close()
        for leftover in owned_status():
            runtime.unload(leftover)


def test_a_pass_ends_between_actions_when_the_agent_is_stopping(tree, make_reconciler):
    """SIGTERM during a long pass (a node's first: one load per pod) ends it at the next action,
    within the pod's grace period; what is loaded stays, and an interrupted pass unloads
    nothing."""
    pods = [tree.pod({"app": "web"}, driver="systemd")[0] for _ in range(3)]
    spec = web_spec(policy_text(18993))
    rec = make_reconciler()
    report = rec.reconcile(Snapshot((spec,)), pods, stopping=lambda: len(owned_status()) >= 1)
    assert report.interrupted and actions(report) == [("load", True)], report
    report = rec.reconcile(Snapshot((spec,)), pods)
    assert not report.interrupted and actions(report) == [("load", True)] * 2, report
    report = rec.reconcile(Snapshot(()), pods, stopping=lambda: True)
    assert report.interrupted and report.actions == [] and len(owned_status()) == 3
    report = rec.reconcile(Snapshot(()), pods)
    assert actions(report) == [("unload", True)] * 3 and not owned_status()
