"""The agent's Kubernetes API adapter, with the official `kubernetes` client talking to a local
server that speaks list/watch (fakeapi.py): SockPolicy objects and this node's pods in, status
patches and Events out. No root, no kernel."""

from __future__ import annotations

import json
import re
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


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("a string", "spec must be an object"),
        ({"policy": POLICY, "podSelector": {"matchExpressions": ["app"]}}, "matchExpressions[0]"),
        ({"policy": POLICY, "podSelector": {"matchLabel": {"app": "x"}}}, "unknown keys"),
        ({"policy": POLICY, "podSelector": {}, "policyName": 5}, "spec.policyName"),
        ({"podSelector": {}}, "spec.policy"),
    ],
)
def test_a_sockpolicy_the_schema_would_reject_is_a_spec_error(spec, expected):
    """The CRD's schema rejects these at admission; an agent must still not trip over them (a
    CRD installed without its schema, an older version of it)."""
    from sockpol.agent.desired import SpecError
    from sockpol.agent.kube import policy_spec

    obj = {"metadata": {"name": "n", "namespace": "shop"}, "spec": spec}
    with pytest.raises(SpecError, match=re.escape(expected)):
        policy_spec(obj)


def test_a_watch_whose_connection_goes_dead_is_given_up_and_listed_again(api):
    """A network partition leaves a watch's connection open and silent: the API server's
    timeoutSeconds never arrives. The client's own read timeout must end it, or the agent
    would never see a change again."""
    import threading

    config = kubernetes.client.Configuration()
    config.host = api.url
    a = KubeAdapter(kubernetes.client.ApiClient(config), "node1", watch_timeout=1,
                    request_timeout=1)  # fmt: skip
    try:
        a.start(threading.Event())
        assert wait_synced(a, 10)
        wait_for(lambda: api.count("GET", POLICIES, watch=True) >= 1, "the policy watch")
        lists = a.informers[0].lists
        api.freeze_watches()
        api.put("sockpolicies", sockpolicy("late", {"app": "late"}))
        wait_for(lambda: keys(a) == ["shop/late"], "the policy, after the dead watch", 15)
        assert a.informers[0].lists > lists
    finally:
        a.stop()
        api.end_watches()


def test_an_entry_left_from_before_a_restart_is_removed(api, adapter):
    """Its pods left this node while the agent was down: the node's entry, written by the
    agent before, goes (the agent knows it from the listed object, not from memory)."""
    a, wake = adapter
    api.put("sockpolicies", sockpolicy("web", {"app": "web"}))
    api.objects["sockpolicies"]["shop/web"]["status"] = {
        "nodes": {"node1": {"ok": True}, "node2": {"ok": True}}}  # fmt: skip
    a.start(wake)
    assert wait_synced(a, 10)
    (spec,) = a.policies.snapshot().specs
    empty = PassReport()
    empty.specs[spec.key] = SpecReport(spec.key, spec.ref, spec.source_sha256)
    a.report(empty)
    assert [body for _, _, body in api.patches] == [{"status": {"nodes": {"node1": None}}}]
    assert sorted(api.objects["sockpolicies"]["shop/web"]["status"]["nodes"]) == ["node2"]


def test_a_status_write_wakes_no_agent_but_a_spec_change_does(api, adapter):
    """Every node writes its entry in a SockPolicy's status; each write reaches every agent
    as a MODIFIED event. Only a change of the spec (its generation) is a reason for a pass."""
    a, wake = adapter
    policy = api.put("sockpolicies", sockpolicy("web", {"app": "web"}))
    calls = []
    a.informers[0].changed = lambda: calls.append(1)
    a.start(wake)
    assert wait_synced(a, 10)
    wait_for(lambda: api.count("GET", POLICIES, watch=True) >= 1, "the policy watch")
    listed = len(calls)
    policy["status"] = {"nodes": {"node2": {"ok": True}}}
    api.put("sockpolicies", policy)  # another node's status write: same generation
    policy = json.loads(json.dumps(policy))
    policy["metadata"]["generation"] = 2
    policy["spec"]["mode"] = "dry-run"
    api.put("sockpolicies", policy)  # a spec change
    wait_for(lambda: a.policies.snapshot().specs[0].mode == "dry-run", "the spec change")
    assert len(calls) == listed + 1
    assert a.informers[0].objects["shop/web"]["status"] == {"nodes": {"node2": {"ok": True}}}


def test_a_restarted_agent_rewrites_no_status_and_repeats_no_event(api, adapter):
    a, wake = adapter
    api.put("sockpolicies", sockpolicy("web", {"app": "web"}))
    a.start(wake)
    assert wait_synced(a, 10)
    (spec,) = a.policies.snapshot().specs
    failing = PassReport()
    failing.specs[spec.key] = SpecReport(spec.key, spec.ref, spec.source_sha256, 1, 0, 0,
                                         ["pod shop/w1: load failed: no"])  # fmt: skip
    a.report(failing)
    assert len(api.patches) == 1 and len(api.events) == 1
    a.stop()
    # The agent restarts (a rolling upgrade): same standing, so nothing to write or announce.
    config = kubernetes.client.Configuration()
    config.host = api.url
    again = KubeAdapter(kubernetes.client.ApiClient(config), "node1", watch_timeout=5)
    try:
        again.start(wake)
        assert wait_synced(again, 10)
        again.report(failing)
        assert len(api.patches) == 1 and len(api.events) == 1
    finally:
        again.stop()


def test_an_uninstalled_crd_is_said_with_what_to_check(api, adapter, caplog):
    import logging

    a, wake = adapter
    api.uninstalled.add("sockpolicies")
    with caplog.at_level(logging.WARNING, logger="sockpol.agent.kube"):
        a.start(wake)
        wait_for(lambda: any("CRD installed" in r.getMessage() for r in caplog.records),
                 "the warning")  # fmt: skip
    assert not a.policies.snapshot().ready  # nothing listed: nothing will be unloaded
    message = next(r.getMessage() for r in caplog.records if "CRD" in r.getMessage())
    assert message.startswith("sockpolicies: HTTP 404") and "deploy/crd.yaml" in message
