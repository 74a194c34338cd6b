"""The agent's pure parts, without root: kubelet's cgroup naming, load names, label selectors,
the directory source (a ConfigMap's `..data` swap, bad entries), back-off."""

from __future__ import annotations

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

    store = ObjectStore(tmp_path)
    spec = PolicySpec("k", POLICY, "k.pol")
    current = store.compile(spec).path
    old_loaded, old_unused, young = (tmp_path / f"{n}.bpf.o" for n in ("a", "b", "c"))
    for p in (old_loaded, old_unused, young):
        p.write_bytes(b"x")
    for p in (current, old_loaded, old_unused):
        os.utime(p, (0, 0))
    assert store.collect({old_loaded}, min_age=60) == [old_unused]
    assert current.exists() and old_loaded.exists() and young.exists()
