"""The agent's Kubernetes API adapter, with the official `kubernetes` client talking to a local
server that speaks list/watch (fakeapi.py): SockPolicy objects and this node's pods in, status
patches and Events out. No root, no kernel."""

from __future__ import annotations

import time

import kubernetes  # the agent extra (pip install 'sockpol[agent]'); scripts/test.sh has it
import pytest
from fakeapi import PODS, POLICIES, FakeAPI

from sockpol.agent.kube import KubeAdapter, wait_synced
from sockpol.agent.reconciler import PassReport, SpecReport

POLICY = "policy web {\n    port 8080\n    default deny\n    allow GET /ok\n}\n"


def sockpolicy(name: str, labels: dict[str, str], ns: str = "shop", **spec) -> dict:
    return {
        "apiVersion": "sockpol.io/v1alpha1",
        "kind": "SockPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"policy": POLICY, "podSelector": {"matchLabels": labels}, **spec},
    }


def pod(name: str, node: str, labels: dict[str, str], qos: str = "Burstable") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": f"uid-{name}", "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "qosClass": qos},
    }


def wait_for(predicate, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def api():
    server = FakeAPI()
    yield server
    server.close()


@pytest.fixture
def adapter(api):
    import threading

    config = kubernetes.client.Configuration()
    config.host = api.url
    client = kubernetes.client.ApiClient(config)
    a = KubeAdapter(client, "node1", watch_timeout=5)
    wake = threading.Event()
    yield a, wake
    a.stop()
    api.end_watches()


def keys(adapter) -> list[str]:
    return sorted(s.key for s in adapter.policies.snapshot().specs)


def test_lists_then_follows_watches_and_relists_after_410(api, adapter):
    a, wake = adapter
    api.put("sockpolicies", sockpolicy("web", {"app": "web"}, mode="dry-run"))
    api.put("pods", pod("w1", "node1", {"app": "web"}, qos="Guaranteed"))
    api.put("pods", pod("elsewhere", "node2", {"app": "web"}))
    assert not a.policies.snapshot().ready  # nothing listed yet: the reconciler unloads nothing
    a.start(wake)
    assert wait_synced(a, 10)
    assert wake.is_set()
    (spec,) = a.policies.snapshot().specs
    assert (spec.key, spec.mode, spec.source) == ("shop/web", "dry-run", POLICY)
    assert spec.pods[0].namespace == "shop" and spec.pods[0].selector.matches({"app": "web"})
    assert spec.ref["uid"] == "uid-web" and spec.ref["kind"] == "SockPolicy"
    pods, ready = a.pods.pods()
    assert ready and [(p.name, p.qos, p.uid) for p in pods] == [("w1", "Guaranteed", "uid-w1")]
    assert api.count("GET", PODS + "?fieldSelector=spec.nodeName%3Dnode1", watch=False) == 1

    # Changes arrive through the watches.
    wait_for(lambda: api.count("GET", POLICIES, watch=True) >= 1, "the policy watch")
    wait_for(lambda: api.count("GET", PODS, watch=True) >= 1, "the pod watch")
    api.put("sockpolicies", sockpolicy("api", {"app": "api"}))
    api.put("pods", pod("w2", "node1", {"app": "api"}))
    api.put("pods", pod("n2", "node2", {"app": "api"}))  # another node's: never seen
    wait_for(lambda: keys(a) == ["shop/api", "shop/web"], "the added policy")
    wait_for(lambda: sorted(p.name for p in a.pods.pods()[0]) == ["w1", "w2"], "the added pod")
    api.delete("sockpolicies", "shop", "web")
    wait_for(lambda: keys(a) == ["shop/api"], "the deleted policy")

    # The history is compacted while the watches are down: resuming gets 410 Gone, and the
    # adapter lists again, then sees what happened meanwhile.
    lists = a.informers[0].lists
    api.hold = True
    api.put("sockpolicies", sockpolicy("late", {"app": "late"}))
    api.compact()
    api.hold = False
    api.end_watches()
    wait_for(lambda: a.informers[0].lists > lists, "a relist after 410")
    wait_for(lambda: keys(a) == ["shop/api", "shop/late"], "the policy added during the gap")


def test_a_policy_the_agent_cannot_use_is_held_and_reported(api, adapter):
    a, wake = adapter
    bad = sockpolicy("bad", {})
    bad["spec"]["podSelector"] = {"matchExpressions": [{"key": "app", "operator": "Near"}]}
    api.put("sockpolicies", bad)
    a.start(wake)
    assert wait_synced(a, 10)
    snap = a.policies.snapshot()
    assert snap.specs == () and snap.held == ("shop/bad",) and "Near" in snap.problems[0]
    a.report(PassReport())
    ((path, content_type, body),) = api.patches
    assert path.endswith("/namespaces/shop/sockpolicies/bad/status")
    entry = body["status"]["nodes"]["node1"]
    assert entry["ok"] is False and "unknown operator" in entry["message"]
    assert api.events[0]["reason"] == "PolicyFailed"


def test_status_per_node_by_merge_patch_and_events_on_transitions(api, adapter):
    a, wake = adapter
    api.put("sockpolicies", sockpolicy("web", {"app": "web"}))
    api.objects["sockpolicies"]["shop/web"]["status"] = {"nodes": {"node2": {"ok": True}}}
    a.start(wake)
    assert wait_synced(a, 10)
    (spec,) = a.policies.snapshot().specs

    def report(errors: list[str], loaded: int = 1) -> PassReport:
        r = PassReport()
        r.specs[spec.key] = SpecReport(spec.key, spec.ref, spec.source_sha256, 1, loaded,
                                       loaded, list(errors))  # fmt: skip
        return r

    failing = "pod shop/w1: load failed: load: policy 'x' has a tls statement, but this kernel ..."
    a.report(report([failing], loaded=0))
    ((path, content_type, body),) = api.patches
    assert content_type == "application/merge-patch+json"
    entry = body["status"]["nodes"]["node1"]
    assert entry["ok"] is False and entry["message"] == failing
    assert entry["sourceSha256"] == spec.source_sha256 and entry["observedGeneration"] == 1
    # Merged: the other node's entry is still there.
    status = api.objects["sockpolicies"]["shop/web"]["status"]["nodes"]
    assert sorted(status) == ["node1", "node2"]
    (event,) = api.events
    assert (event["type"], event["reason"]) == ("Warning", "PolicyFailed")
    assert event["involvedObject"]["uid"] == "uid-web" and event["involvedObject"]["kind"] == (
        "SockPolicy"
    )
    assert event["message"].startswith("node node1: pod shop/w1: load failed")
    assert event["source"] == {"component": "sockpol-agent", "host": "node1"}

    a.report(report([failing], loaded=0))  # nothing changed: nothing written
    assert len(api.patches) == 1 and len(api.events) == 1

    a.report(report([]))  # recovered
    assert len(api.patches) == 2 and api.patches[1][2]["status"]["nodes"]["node1"]["ok"] is True
    assert [e["reason"] for e in api.events] == ["PolicyFailed", "PolicyEnforced"]

    # Its last pod leaves the node: the node's entry goes (a null in the merge patch).
    empty = PassReport()
    empty.specs[spec.key] = SpecReport(spec.key, spec.ref, spec.source_sha256)
    a.report(empty)
    assert api.patches[2][2] == {"status": {"nodes": {"node1": None}}}
    assert sorted(api.objects["sockpolicies"]["shop/web"]["status"]["nodes"]) == ["node2"]
    a.report(empty)
    assert len(api.patches) == 3
