"""The agent's pure parts, without root: kubelet's cgroup naming, load names, label selectors,
the directory source (a ConfigMap's `..data` swap, bad entries), back-off."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from sockpol.agent import names
from sockpol.agent.backoff import Backoff
from sockpol.agent.cgroups import PodCgroups, pod_cgroup_name, to_cgroupfs, to_systemd
from sockpol.agent.desired import Pod, Selector, SpecError
from sockpol.agent.dirsource import DirectorySource
from sockpol.runtime.pins import valid_name

UID = "1234-abcd-5678-efgh"


@pytest.fixture
def no_pins(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pin root of this test's own that does not exist: the reconciler owns nothing, and
    the tests that reach no load need no kernel."""
    monkeypatch.setenv("SOCKPOL_PIN_ROOT", f"t-agent-nothing-{os.getpid()}")


def test_kubelet_cgroup_names_for_both_drivers() -> None:
    # kubelet's own example (pkg/kubelet/cm/cgroup_manager_linux.go, CgroupName.ToSystemd).
    burstable = pod_cgroup_name(Pod(UID, "ns", "p", qos="Burstable"))
    assert burstable == ["kubepods", "burstable", f"pod{UID}"]
    assert to_systemd(burstable) == (
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_abcd_5678_efgh.slice"
    )
    assert to_cgroupfs(burstable) == f"kubepods/burstable/pod{UID}"
    guaranteed = pod_cgroup_name(Pod(UID, "ns", "p", qos="Guaranteed"))
    assert to_cgroupfs(guaranteed) == f"kubepods/pod{UID}"
    assert to_systemd(guaranteed) == "kubepods.slice/kubepods-pod1234_abcd_5678_efgh.slice"
    besteffort = pod_cgroup_name(Pod(UID, "ns", "p", qos="BestEffort"), cgroup_root="/kubelet")
    assert to_cgroupfs(besteffort) == f"kubelet/kubepods/besteffort/pod{UID}"
    assert to_systemd(besteffort) == (
        "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
        "kubelet-kubepods-besteffort-pod1234_abcd_5678_efgh.slice"
    )


def test_a_static_pod_is_found_under_the_uid_kubelet_gave_it() -> None:
    """The API shows a static pod (kube-apiserver, etcd, ...) as a mirror pod with a UID of its
    own; kubelet's cgroup is named after the manifest's hash, which the mirror carries."""
    mirror = Pod.from_dict({
        "metadata": {"name": "etcd-node1", "namespace": "kube-system", "uid": "api-made-uid",
                     "annotations": {"kubernetes.io/config.mirror": "0a1b2c3d4e5f",
                                     "kubernetes.io/config.hash": "0a1b2c3d4e5f"}},
        "status": {"phase": "Running", "qosClass": "Burstable"},
    })  # fmt: skip
    assert to_cgroupfs(pod_cgroup_name(mirror)) == "kubepods/burstable/pod0a1b2c3d4e5f"
    plain = Pod.from_dict({"metadata": {"uid": "u-1"}, "status": {"qosClass": "Guaranteed"}})
    assert to_cgroupfs(pod_cgroup_name(plain)) == "kubepods/podu-1"


def test_resolver_finds_the_layout_that_exists_and_its_containers(tmp_path: Path) -> None:
    pod = Pod(UID, "ns", "p", qos="Burstable")
    resolver = PodCgroups(tmp_path)
    assert resolver.resolve(pod) is None  # kubelet has not made it yet
    pod_dir = tmp_path / to_systemd(pod_cgroup_name(pod))
    cid = "ab" * 32
    for d in (f"cri-containerd-{cid}.scope", f"crio-{cid}.scope", f"crio-conmon-{cid}.scope"):
        (pod_dir / d).mkdir(parents=True)
    (pod_dir / "cgroup.procs").touch()
    assert resolver.resolve(pod) == pod_dir
    assert PodCgroups(tmp_path, driver="cgroupfs").resolve(pod) is None
    runtimes = sorted(c.runtime for c in PodCgroups.containers(pod_dir))
    assert runtimes == ["containerd", "cri-o"]  # conmon is not a container
    with pytest.raises(ValueError):
        PodCgroups(tmp_path, driver="openrc")


def test_load_names_are_stable_unique_owned_and_valid() -> None:
    a = names.load_name("spa-", "shop/orders-api", "kubepods/burstable/podA")
    assert a == names.load_name("spa-", "shop/orders-api", "kubepods/burstable/podA")
    assert a != names.load_name("spa-", "shop/orders-api", "kubepods/burstable/podB")
    assert a.startswith("spa-shop-orders-api-") and names.owned("spa-", a)
    long = names.load_name("spa-", "a-very-long-namespace-name/" + "x" * 250, "/" + "y" * 400)
    assert valid_name(long) and len(long) <= 64
    assert not names.owned("spa-", "orders-api") and not names.valid_prefix("bad/")


def test_label_selectors_mean_what_kubernetes_says() -> None:
    sel = Selector.from_dict({
        "matchLabels": {"app": "web"},
        "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["front", "edge"]},
            {"key": "env", "operator": "NotIn", "values": ["dev"]},
            {"key": "canary", "operator": "DoesNotExist"},
            {"key": "team", "operator": "Exists"},
        ],
    })  # fmt: skip
    ok = {"app": "web", "tier": "edge", "team": "x"}
    assert sel.matches(ok)
    assert sel.matches({**ok, "env": "prod"})
    for bad in ({**ok, "env": "dev"}, {**ok, "canary": "1"}, {**ok, "tier": "back"},
                {k: v for k, v in ok.items() if k != "team"}, {**ok, "app": "api"}):  # fmt: skip
        assert not sel.matches(bad), bad
    assert Selector.from_dict({}).matches({}) and Selector.from_dict(None).matches({"a": "b"})
    for raw in ({"matchExpressions": [{"key": "a", "operator": "In"}]},
                {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]},
                {"matchExpressions": [{"key": "a", "operator": "Near", "values": ["x"]}]},
                {"matchLabels": ["a"]}):  # fmt: skip
        with pytest.raises(SpecError):
            Selector.from_dict(raw)


POLICY = "policy web {\n    port 8080\n    default deny\n    allow GET /ok\n}\n"


def swap(directory: Path, files: dict[str, str], n: int) -> None:
    """kubelet's update of a mounted ConfigMap: a new directory, one rename of `..data`."""
    new = directory / f"..2026_12_05_{n}"
    new.mkdir()
    for name, text in files.items():
        (new / name).write_text(text)
    (directory / "..data_tmp").symlink_to(new.name)
    os.replace(directory / "..data_tmp", directory / "..data")
    for name in files:
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")


def test_directory_source_reads_a_configmap_through_one_data_resolution(tmp_path: Path) -> None:
    targets = ("policies:\n  - name: web\n    file: web.pol\n    mode: dry-run\n"
               "    pods: [{namespace: shop, selector: {matchLabels: {app: web}}}]\n"
               "    cgroups: [system.slice/x.service]\n")  # fmt: skip
    swap(tmp_path, {"targets.yaml": targets, "web.pol": POLICY}, 1)
    source = DirectorySource(tmp_path)
    (spec,) = source.snapshot().specs
    assert (spec.key, spec.mode, spec.cgroups) == ("configmap/web", "dry-run",
                                                   ("system.slice/x.service",))  # fmt: skip
    assert spec.pods[0].namespace == "shop" and spec.pods[0].selector.matches({"app": "web"})
    swap(tmp_path, {"targets.yaml": targets, "web.pol": POLICY.replace("/ok", "/new")}, 2)
    (spec2,) = source.snapshot().specs
    assert "/new" in spec2.source and spec2.source_sha256 != spec.source_sha256


def test_directory_source_problems_never_unload(tmp_path: Path) -> None:
    source = DirectorySource(tmp_path)
    snap = source.snapshot()
    assert not snap.ready and "no targets.yaml" in snap.problems[0]
    (tmp_path / "targets.yaml").write_text("policies: [unclosed\n")
    snap = source.snapshot()
    assert not snap.ready and "line" in snap.problems[0]  # YAML's own position
    (tmp_path / "web.pol").write_text(POLICY)
    (tmp_path / "targets.yaml").write_text(
        "policies:\n"
        "  - {name: good, file: web.pol, cgroups: [a]}\n"
        "  - {name: missing, file: nope.pol, cgroups: [a]}\n"
        "  - {name: aimless, file: web.pol}\n"
        "  - {name: moody, file: web.pol, mode: audit, cgroups: [a]}\n"
        "  - {name: good, file: web.pol, cgroups: [b]}\n"
    )
    snap = source.snapshot()
    assert snap.ready and [s.key for s in snap.specs] == ["configmap/good"]
    assert snap.held == ("configmap/missing", "configmap/aimless", "configmap/moody",
                         "configmap/good")  # fmt: skip
    text = "\n".join(snap.problems)
    for expected in ("nope.pol", "nothing to govern", "'mode' must be", "used twice"):
        assert expected in text, text


MALFORMED_ENTRIES = {
    "matchExpressions[0]: expected an object": "{matchExpressions: [app]}",
    "matchExpressions must be a list": "{matchExpressions: {app: web}}",
    "'values' must be a list": "{matchExpressions: [{key: a, operator: In, values: ab}]}",
    "'key' (a label name) is required": "{matchExpressions: [{operator: Exists}]}",
    "label names and values are strings": "{matchLabels: {version: 2}}",
    # A misspelt key must not leave an empty selector, which selects every pod.
    "unknown keys matchLabel": "{matchLabel: {app: web}}",
}


@pytest.mark.parametrize("expected,selector", MALFORMED_ENTRIES.items())
def test_a_malformed_selector_is_a_problem_of_its_entry_not_a_traceback(
    tmp_path: Path, expected: str, selector: str
) -> None:
    (tmp_path / "web.pol").write_text(POLICY)
    (tmp_path / "targets.yaml").write_text(
        "policies:\n"
        f"  - {{name: bad, file: web.pol, pods: [{{namespace: shop, selector: {selector}}}]}}\n"
        "  - {name: good, file: web.pol, cgroups: [a]}\n"
    )
    snap = DirectorySource(tmp_path).snapshot()
    assert snap.ready and [s.key for s in snap.specs] == ["configmap/good"]
    assert snap.held == ("configmap/bad",)
    assert expected in snap.problems[0], snap.problems


def test_a_malformed_pods_entry_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "web.pol").write_text(POLICY)
    (tmp_path / "targets.yaml").write_text(
        "policies:\n"
        "  - {name: a, file: web.pol, pods: {namespace: shop}}\n"
        "  - {name: b, file: web.pol, pods: [{namespace: shop, selectr: {}}]}\n"
        "  - {name: c, file: web.pol, policy: [x], cgroups: [a]}\n"
        "  - {name: 5, file: web.pol, cgroups: [a]}\n"
        "  - {name: e, file: web.pol, cgroups: [a/../../b]}\n"
    )
    snap = DirectorySource(tmp_path).snapshot()
    assert snap.ready and snap.specs == () and len(snap.problems) == 5
    text = "\n".join(snap.problems)
    for expected in ("'pods' must be a list", "unknown keys selectr", "'policy' must be",
                     "'name' (a string)", "'..' is not allowed"):  # fmt: skip
        assert expected in text, text


def test_backoff_doubles_and_a_new_version_is_tried_at_once() -> None:
    b = Backoff(base=1.0, limit=8.0)
    assert [b.failed("x", "v1", 0.0, "e") for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert b.blocked("x", "v1", 7.9) is not None and b.blocked("x", "v1", 8.0) is None
    assert b.blocked("x", "v2", 1.0) is None  # the desired state changed
    b.succeeded("x")
    assert b.blocked("x", "v1", 0.0) is None


def test_unused_objects_are_swept_and_used_ones_kept(tmp_path: Path) -> None:
    from sockpol.agent.desired import PolicySpec
    from sockpol.agent.objects import ObjectStore

    now = [1000.0]
    store = ObjectStore(tmp_path, clock=lambda: now[0])
    spec = PolicySpec("k", POLICY, "k.pol")
    superseded = store.compile(PolicySpec("k", POLICY.replace("/ok", "/old"), "k.pol")).path
    now[0] += 3000
    current = store.compile(spec).path  # asked for on every pass
    old_loaded, old_unused, young = (tmp_path / f"{n}.bpf.o" for n in ("a", "b", "c"))
    for p in (old_loaded, old_unused, young):
        p.write_bytes(b"x")
    for p in (current, superseded, old_loaded, old_unused):
        os.utime(p, (0, 0))
    now[0] += 1000
    assert sorted(store.collect({old_loaded}, min_age=3600)) == sorted([old_unused, superseded])
    assert current.exists() and old_loaded.exists() and young.exists()
    # Asked for again after its file went: compiled again, not a path that is gone.
    again = store.compile(PolicySpec("k", POLICY.replace("/ok", "/old"), "k.pol")).path
    assert again == superseded and again.exists()


def test_listen_addresses() -> None:
    from sockpol.agent.main import listen_address
    from sockpol.diagnostics import SockpolError

    assert listen_address("0.0.0.0:9464") == ("0.0.0.0", 9464)  # the DaemonSet's
    assert listen_address("127.0.0.1:0") == ("127.0.0.1", 0)  # any free port (tests)
    assert listen_address(":9464") == ("0.0.0.0", 9464)
    assert listen_address("[::1]:9464") == ("::1", 9464)
    for bad in ("9464", "host:", "host:70000", "host:x"):
        with pytest.raises(SockpolError, match="--listen"):
            listen_address(bad)


def test_a_policy_that_cannot_be_compiled_is_its_own_problem_logged_once(
    tmp_path: Path, no_pins: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Compile failures come before any load: no kernel needed. A pin root of its own (absent:
    nothing owned). The text is invalid, or the state directory cannot be written: either is
    that policy's error (on its report, one log line however many passes), never a pass that
    fails for every policy."""
    import logging

    from sockpol.agent.desired import PolicySpec, Snapshot
    from sockpol.agent.reconciler import AgentConfig, Reconciler

    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "cgroup.procs").touch()  # what the reconciler recognizes a cgroup by
    broken = PolicySpec("configmap/broken", POLICY.replace("/ok", "ok"), "broken.pol",
                        cgroups=("app",))  # fmt: skip
    rec = Reconciler(AgentConfig(state_dir=tmp_path / "state", cgroup_base=tmp_path))
    stuck = Reconciler(
        AgentConfig(state_dir=tmp_path / "app" / "cgroup.procs", cgroup_base=tmp_path)
    )
    with caplog.at_level(logging.INFO, logger="sockpol.agent"):
        for _ in range(2):  # two passes, one log line each
            report = rec.reconcile(Snapshot((broken,)))
            assert report.actions == [] and report.specs["configmap/broken"].targets == 1
            (error,) = report.specs["configmap/broken"].errors
            assert error.startswith("policy does not compile; nothing is loaded for it: ")
            assert "broken.pol:4:" in error and "E003" in error
            good = PolicySpec("configmap/good", POLICY, "good.pol", cgroups=("app",))
            report = stuck.reconcile(Snapshot((good,)))
            (error,) = report.specs["configmap/good"].errors
            assert error.startswith("policy could not be compiled here; nothing is loaded")
            assert "NotADirectoryError" in error
    lines = [r for r in caplog.records if getattr(r, "action", None) == "compile"]
    assert [(r.policy, r.result) for r in lines] == [
        ("configmap/broken", "error"), ("configmap/good", "error")]  # fmt: skip


def test_a_running_pod_whose_cgroup_is_not_where_kubelet_puts_it_is_reported(
    tmp_path: Path, no_pins: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A layout the agent does not expect (another --cgroup-root, a cgroup v1 node) must not
    leave the selected pods silently ungoverned. Pods that do not run yet, or are being
    deleted, have no cgroup for good reasons: nothing to report."""
    from sockpol.agent.desired import PodTarget, PolicySpec, Snapshot
    from sockpol.agent.reconciler import AgentConfig, Reconciler

    spec = PolicySpec("shop/web", POLICY, "web.pol",
                      pods=(PodTarget("shop", Selector((("app", "web"),))),))  # fmt: skip
    running = Pod("u-1", "shop", "web-1", {"app": "web"}, "Burstable", "Running")
    pods = [
        running,
        Pod("u-2", "shop", "web-2", {"app": "web"}, "Burstable", "Pending"),
        Pod("u-3", "shop", "web-3", {"app": "web"}, "Burstable", "Running", deleting=True),
        Pod("u-4", "shop", "other", {"app": "other"}, "Burstable", "Running"),
    ]
    rec = Reconciler(AgentConfig(state_dir=tmp_path / "state", cgroup_base=tmp_path))
    with caplog.at_level(logging.WARNING, logger="sockpol.agent"):
        report = rec.reconcile(Snapshot((spec,)), pods)
        rec.reconcile(Snapshot((spec,)), pods)  # said once in the log, not once a pass
    (line,) = [r for r in caplog.records if getattr(r, "action", None) == "resolve"]
    assert line.policy == "shop/web" and line.getMessage().startswith("pod shop/web-1: ")
    web = report.specs["shop/web"]
    assert report.actions == [] and (web.targets, web.loaded) == (1, 0)
    (error,) = web.errors
    assert error.startswith("pod shop/web-1: not governed: it runs, but its cgroup is not")
    assert str(tmp_path / "kubepods/burstable/podu-1") in error
    assert "kubepods-burstable-podu_1.slice" in error
    assert Pod.from_dict({"metadata": {"deletionTimestamp": "2026-12-05T00:00:00Z"}}).deleting


def test_metrics_and_health_say_when_a_source_has_not_listed_yet(
    tmp_path: Path, no_pins: None
) -> None:
    from prometheus_client import generate_latest

    from sockpol.agent.main import Agent
    from sockpol.agent.reconciler import AgentConfig, Reconciler
    from sockpol.agent.server import registry

    source = tmp_path / "configmap"
    source.mkdir()
    rec = Reconciler(AgentConfig(state_dir=tmp_path / "state", cgroup_base=tmp_path))
    agent = Agent(rec, [DirectorySource(source)])
    agent.run_once()  # no targets.yaml yet
    assert b"sockpol_agent_sources_synced 0.0" in generate_latest(registry(agent.stats))
    ok, detail = agent.health()
    assert ok and "waiting for a complete list" in detail
    (source / "targets.yaml").write_text("policies: []\n")
    agent.run_once()
    assert b"sockpol_agent_sources_synced 1.0" in generate_latest(registry(agent.stats))
    assert "waiting" not in agent.health()[1]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_the_agents_endpoints_listen_on_ipv4_and_ipv6(host: str) -> None:
    """An IPv6-only cluster probes and scrapes the pod's IPv6 address: `--listen [::]:9464`."""
    import json
    import urllib.request

    from prometheus_client import CollectorRegistry

    from sockpol.agent.server import serve

    server = serve(host, 0, CollectorRegistry(), lambda: (True, "fine"))
    try:
        port = server.server_address[1]
        url = f"http://[{host}]:{port}/healthz" if ":" in host else f"http://{host}:{port}/healthz"
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.status == 200 and json.loads(r.read()) == {"ok": True, "detail": "fine"}
    finally:
        server.shutdown()
        server.server_close()


def test_two_sources_giving_one_policy_key_are_held_not_mixed(
    tmp_path: Path, no_pins: None
) -> None:
    """A SockPolicy `web` in a namespace called `configmap` and targets.yaml's entry `web`
    both have the key configmap/web, which names their loads: neither is acted on."""
    from sockpol.agent.main import Agent
    from sockpol.agent.reconciler import AgentConfig, Reconciler

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "cgroup.procs").touch()
    sources = []
    for n in (1, 2):
        d = tmp_path / f"source{n}"
        d.mkdir()
        (d / "web.pol").write_text(POLICY)
        (d / "targets.yaml").write_text("policies: [{name: web, file: web.pol, cgroups: [a]}]\n")
        sources.append(DirectorySource(d))
    rec = Reconciler(AgentConfig(state_dir=tmp_path / "state", cgroup_base=tmp_path))
    report = Agent(rec, sources).run_once()
    assert report.desired == 0 and report.actions == [] and report.specs == {}
    assert report.problems == ["two sources give the policy configmap/web: rename one"]


def test_a_configmap_update_wakes_a_pass_at_once(tmp_path: Path, no_pins: None) -> None:
    """kubelet's `..data` swap is read when it happens, not at the next periodic pass (an hour
    away here)."""
    import threading
    import time

    from sockpol.agent.main import Agent
    from sockpol.agent.reconciler import AgentConfig, Reconciler

    source = tmp_path / "configmap"
    source.mkdir()
    swap(source, {"targets.yaml": "policies: []\n"}, 1)
    rec = Reconciler(AgentConfig(state_dir=tmp_path / "state", cgroup_base=tmp_path))
    agent = Agent(rec, [DirectorySource(source)], interval=3600)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:

        def passes_reach(n: int) -> None:
            deadline = time.monotonic() + 10
            while agent.stats.passes < n:
                assert time.monotonic() < deadline, f"{agent.stats.passes} passes, not {n}"
                time.sleep(0.02)

        passes_reach(1)
        time.sleep(0.2)  # no pass is due
        assert agent.stats.passes == 1
        targets = "policies: [{name: web, file: web.pol, cgroups: [nothing/here]}]\n"
        swap(source, {"targets.yaml": targets, "web.pol": POLICY}, 2)
        passes_reach(2)
        assert agent.stats.desired == 0 and not agent.stats.source_problems
    finally:
        agent.shutdown()
        thread.join(10)
    assert not thread.is_alive()
