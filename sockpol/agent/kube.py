"""The Kubernetes API adapter: SockPolicy objects and this node's pods in, status and Events out.

Kept thin on purpose: it turns API objects into desired.PolicySpec / desired.Pod and pass
reports into status patches and Events; every decision is the reconciler's. It uses the official
`kubernetes` client (pip install 'sockpol[agent]') the way an informer does:

- list, then watch from the list's resourceVersion (with bookmarks); a watch that ends (its
  timeoutSeconds) is resumed from the last resourceVersion seen; `410 Gone` (the version was
  compacted away; an ERROR event or the response's status) makes it list again;
- pods are listed with `fieldSelector=spec.nodeName=<node>`: the agent sees only its node's;
- a source is `ready` once its first list has completed (the reconciler unloads nothing before).

Status: each node writes its own entry, `status.nodes.<node>`, with a JSON merge patch on the
status subresource, so the agents of a cluster never overwrite each other's (the way Cilium's
agents report on a CiliumNetworkPolicy). A policy that fails on a node (it does not compile,
the kernel refuses it) also gets a Warning Event naming the node and the reason; recovery gets
a Normal one. No API server can run on the machines that test sockpol: this adapter is tested
against a small local server speaking the same list/watch protocol (tests/agent/fakeapi.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from sockpol.agent.desired import (
    MODES,
    Pod,
    PodTarget,
    PolicySpec,
    Selector,
    Snapshot,
    SpecError,
)

log = logging.getLogger("sockpol.agent.kube")

GROUP, VERSION, PLURAL, KIND = "sockpol.io", "v1alpha1", "sockpolicies", "SockPolicy"
API_VERSION = f"{GROUP}/{VERSION}"
COMPONENT = "sockpol-agent"
WATCH_TIMEOUT = 300  # seconds a watch request lasts before it is resumed
# Seconds any other request may take, and a watch beyond its timeoutSeconds (the client's own
# read timeout): a connection that a network partition left open and silent is given up and
# the resource listed again, rather than waited on forever with a stale view.
REQUEST_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0
RETRY_MAX = 30.0


def _client():
    try:
        import kubernetes
    except ImportError:  # pragma: no cover - the agent extra installs it
        from sockpol.diagnostics import SockpolError

        raise SockpolError(
            "agent: --kubernetes needs the kubernetes client: pip install 'sockpol[agent]'"
        ) from None
    return kubernetes


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Informer:
    """One resource's objects, kept current by list + watch in a thread; calls `changed` after
    every change."""

    def __init__(
        self,
        what: str,
        list_fn: Callable[..., object],
        changed: Callable[[], None],
        watch_timeout: int = WATCH_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
        status_only_is_no_change: bool = False,
    ) -> None:
        self.what, self.list_fn, self.changed = what, list_fn, changed
        # SockPolicies: every node's agent writes its entry in the status, and each write is
        # a MODIFIED event to every agent; waking for those would make each status write a
        # pass on every node. metadata.generation changes with the spec, not the status.
        self.status_only_is_no_change = status_only_is_no_change
        self.watch_timeout, self.request_timeout = watch_timeout, request_timeout
        self.objects: dict[str, dict] = {}
        self.synced = False
        self.lists = 0  # how many times it listed (a relist after 410 is one more)
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._watch = None
        self.thread = threading.Thread(target=self._run, name=f"watch-{what}", daemon=True)

    @staticmethod
    def key(obj: dict) -> str:
        meta = obj.get("metadata") or {}
        return f"{meta.get('namespace', '')}/{meta.get('name', '')}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()

    def items(self) -> tuple[list[dict], bool]:
        with self.lock:
            return list(self.objects.values()), self.synced

    def _run(self) -> None:
        kubernetes = _client()
        failures = 0
        while not self._stop.is_set():
            try:
                version = self._list()
                failures = 0
                while not self._stop.is_set():
                    version = self._watch_from(kubernetes, version)
            except kubernetes.client.ApiException as e:
                if e.status == 410:
                    log.info(f"{self.what}: watch expired (410 Gone); listing again",
                             extra={"action": "relist", "resource": self.what})  # fmt: skip
                    continue
                failures += 1
                self._retry(failures, f"HTTP {e.status} {e.reason}{_hint(self.what, e.status)}")
            except Exception as e:  # connection refused, reset, timeouts: retry with back-off
                failures += 1
                self._retry(failures, f"{type(e).__name__}: {e}")

    def _retry(self, failures: int, why: str) -> None:
        wait = min(RETRY_MAX, 0.5 * 2 ** (failures - 1))
        fields = {"action": "watch", "resource": self.what, "result": "error"}
        log.warning(f"{self.what}: {why}; again in {wait:.1f} s", extra=fields)
        self._stop.wait(wait)

    def _list(self) -> str:
        timeout = (min(CONNECT_TIMEOUT, self.request_timeout), self.request_timeout)
        resp = self.list_fn(_preload_content=False, _request_timeout=timeout)
        body = json.loads(resp.data)
        with self.lock:
            self.objects = {self.key(o): o for o in body.get("items") or []}
            self.synced = True
            self.lists += 1
        self.changed()
        return (body.get("metadata") or {}).get("resourceVersion", "")

    def _watch_from(self, kubernetes, version: str) -> str:
        """Follow changes from `version` until the watch request ends; the last version seen."""
        w = kubernetes.watch.Watch()
        self._watch = w
        read = self.watch_timeout + self.request_timeout  # the server ends it before
        for event in w.stream(
            self.list_fn, resource_version=version, timeout_seconds=self.watch_timeout,
            allow_watch_bookmarks=True,
            _request_timeout=(min(CONNECT_TIMEOUT, self.request_timeout), read),
        ):  # fmt: skip
            obj = event.get("raw_object") or {}
            version = (obj.get("metadata") or {}).get("resourceVersion", version)
            kind = event.get("type")
            if kind == "BOOKMARK":
                continue
            with self.lock:
                if kind == "DELETED":
                    before = self.objects.pop(self.key(obj), None)
                else:  # ADDED, MODIFIED
                    before = self.objects.get(self.key(obj))
                    self.objects[self.key(obj)] = obj
            if not (
                self.status_only_is_no_change and kind == "MODIFIED" and _same_spec(before, obj)
            ):
                self.changed()
            if self._stop.is_set():
                break
        return version


def _hint(what: str, status: int | None) -> str:
    """What an operator checks first, for the answers a misinstalled agent gets."""
    if status in (401, 403):
        return " (the agent's ServiceAccount and ClusterRole: deploy/rbac.yaml)"
    if status == 404 and what == "sockpolicies":
        return " (is the SockPolicy CRD installed? deploy/crd.yaml)"
    return ""


def _same_spec(before: dict | None, after: dict) -> bool:
    def generation(obj: dict | None) -> object:
        return ((obj or {}).get("metadata") or {}).get("generation")

    return (
        before is not None
        and generation(before) is not None
        and (generation(before) == generation(after))
    )


def policy_spec(obj: dict) -> PolicySpec:
    """A SockPolicy object as the reconciler's PolicySpec (SpecError: it cannot be used; the
    CRD's schema rejects most such objects before they are stored)."""
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    ns, name = meta.get("namespace") or "default", meta.get("name") or ""
    if not isinstance(spec, dict):
        raise SpecError("spec must be an object with policy and podSelector")
    text = spec.get("policy")
    if not isinstance(text, str) or not text.strip():
        raise SpecError("spec.policy (the policy text) is required")
    mode = spec.get("mode")
    if mode is not None and mode not in MODES:
        raise SpecError(f"spec.mode must be enforce or dry-run, not {mode!r}")
    if not isinstance(spec.get("policyName") or "", str):
        raise SpecError("spec.policyName must be the name of a policy in spec.policy")
    selector = Selector.from_dict(spec.get("podSelector"))
    return PolicySpec(
        key=f"{ns}/{name}",
        source=text,
        source_name=f"sockpolicy/{ns}/{name}",
        policy=spec.get("policyName"),
        mode=mode,
        pods=(PodTarget(ns, selector),),
        ref=_ref(obj),
    )


def _ref(obj: dict) -> dict:
    meta = obj.get("metadata") or {}
    return {
        "apiVersion": obj.get("apiVersion", API_VERSION),
        "kind": obj.get("kind", KIND),
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
        "uid": meta.get("uid"),
        "resourceVersion": meta.get("resourceVersion"),
        "generation": meta.get("generation"),
    }


class PolicySource:
    def __init__(self, informer: Informer) -> None:
        self.informer = informer
        self.invalid: dict[str, tuple[dict, str]] = {}  # key -> (ref, why), for the reporter

    def snapshot(self) -> Snapshot:
        objects, synced = self.informer.items()
        specs, problems, held, invalid = [], [], [], {}
        for obj in objects:
            try:
                specs.append(policy_spec(obj))
            except SpecError as e:
                key = Informer.key(obj)
                problems.append(f"SockPolicy {key}: {e}")
                held.append(key)
                invalid[key] = (_ref(obj), str(e))
        self.invalid = invalid
        return Snapshot(tuple(specs), synced, tuple(problems), tuple(held))


class PodInventory:
    def __init__(self, informer: Informer) -> None:
        self.informer = informer

    def pods(self) -> tuple[list[Pod], bool]:
        objects, synced = self.informer.items()
        return [Pod.from_dict(o) for o in objects], synced


class KubeAdapter:
    def __init__(
        self,
        api_client,
        node: str,
        watch_timeout: int = WATCH_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        kubernetes = _client()
        self.node = node
        self.timeout = (min(CONNECT_TIMEOUT, request_timeout), request_timeout)
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self._wake: threading.Event | None = None
        policies = Informer(
            "sockpolicies",
            lambda **kw: self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, **kw),
            self._changed,
            watch_timeout,
            request_timeout,
            status_only_is_no_change=True,
        )
        pods = Informer(
            "pods",
            lambda **kw: self.core.list_pod_for_all_namespaces(
                field_selector=f"spec.nodeName={node}", **kw
            ),
            self._changed,
            watch_timeout,
            request_timeout,
        )
        self.informers = (policies, pods)
        self.policies = PolicySource(policies)
        self.pods = PodInventory(pods)
        self._reported: dict[str, dict] = {}  # key -> the node status entry last written

    @staticmethod
    def connect(node: str, kubeconfig: str | None = None) -> KubeAdapter:
        from sockpol.diagnostics import SockpolError

        kubernetes = _client()
        try:
            if kubeconfig:
                kubernetes.config.load_kube_config(config_file=kubeconfig)
            else:
                kubernetes.config.load_incluster_config()
        except (kubernetes.config.ConfigException, OSError, ValueError) as e:
            where = kubeconfig or "the in-cluster service account (run in a pod, or --kubeconfig)"
            message = f"agent: cannot configure the Kubernetes client from {where}: {e}"
            raise SockpolError(message) from None
        return KubeAdapter(kubernetes.client.ApiClient(), node)

    def _changed(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def start(self, wake: threading.Event) -> None:
        self._wake = wake
        for informer in self.informers:
            informer.start()

    def stop(self) -> None:
        for informer in self.informers:
            informer.stop()

    # -- reporting -----------------------------------------------------------------------------

    def report(self, report) -> None:
        """Write each policy's standing on this node into its status (only when it changed),
        and an Event when it starts failing, fails differently, or recovers."""
        entries: list[tuple[dict, dict]] = []
        for spec_report in report.specs.values():
            if spec_report.ref is None:
                continue  # from the directory source
            if spec_report.targets == 0 and spec_report.ok:
                self._drop_entry(spec_report.ref)  # none of its pods here (any more)
                continue
            entry = {
                "ok": spec_report.ok,
                "message": spec_report.message[:1024],
                "targets": spec_report.targets,
                "loaded": spec_report.loaded,
                "current": spec_report.current,
                "sourceSha256": spec_report.source_sha256,
                "observedGeneration": spec_report.ref.get("generation"),
            }
            entries.append((spec_report.ref, entry))
        for ref, why in self.policies.invalid.values():
            entries.append((ref, {"ok": False, "message": f"not usable: {why}"[:1024],
                                  "targets": 0, "loaded": 0, "current": 0,
                                  "observedGeneration": ref.get("generation")}))  # fmt: skip
        for ref, entry in entries:
            key = f"{ref['namespace']}/{ref['name']}"
            before = self._reported.get(key)
            if before is None:  # after a restart: what this node wrote before, if anything
                listed = self._listed_entry(key)
                if isinstance(listed, dict):
                    before = {k: v for k, v in listed.items() if k != "lastUpdateTime"}
            if before == entry:
                self._reported[key] = entry
                continue
            try:
                self._patch_status(ref, {**entry, "lastUpdateTime": _now()})
                if not entry["ok"] and (before is None or before["message"] != entry["message"]):
                    self._event(ref, "Warning", "PolicyFailed", entry["message"])
                elif entry["ok"] and before is not None and not before["ok"]:
                    self._event(ref, "Normal", "PolicyEnforced", entry["message"])
            except Exception as e:  # the API is down or refuses: try again next pass
                fields = {"action": "status", "policy": key, "result": "error"}
                log.warning(f"status of SockPolicy {key}: {e}", extra=fields)
                continue
            self._reported[key] = entry
        known = {f"{s.ref['namespace']}/{s.ref['name']}" for s in report.specs.values() if s.ref}
        known |= {f"{r['namespace']}/{r['name']}" for r, _ in entries}
        for key in set(self._reported) - known:
            del self._reported[key]  # deleted objects: nothing to write

    def _drop_entry(self, ref: dict) -> None:
        """A node lists a policy only while it has pods of it: a null in a merge patch removes
        the node's entry."""
        key = f"{ref['namespace']}/{ref['name']}"
        # Also an entry written before this agent started (its pods left meanwhile).
        if key not in self._reported and self._listed_entry(key) is None:
            return
        try:
            self._patch_status(ref, None)
        except Exception as e:
            fields = {"action": "status", "policy": key, "result": "error"}
            log.warning(f"status of SockPolicy {key}: {e}", extra=fields)
            return
        self._reported.pop(key, None)

    def _listed_entry(self, key: str) -> dict | None:
        """This node's entry in the status of SockPolicy `key`, as last listed or watched."""
        informer = self.policies.informer
        with informer.lock:
            obj = informer.objects.get(key) or {}
        nodes = (obj.get("status") or {}).get("nodes") or {}
        return nodes.get(self.node) if isinstance(nodes, dict) else None

    def _patch_status(self, ref: dict, entry: dict | None) -> None:
        body = {"status": {"nodes": {self.node: entry}}}
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, ref["namespace"], PLURAL, ref["name"], body,
            _content_type="application/merge-patch+json", _request_timeout=self.timeout,
        )  # fmt: skip

    def _event(self, ref: dict, kind: str, reason: str, message: str) -> None:
        now = _now()
        involved = {k: ref[k] for k in ("apiVersion", "kind", "name", "namespace", "uid")}
        involved["resourceVersion"] = ref.get("resourceVersion")
        body = {
            "metadata": {"generateName": f"{ref['name']}.", "namespace": ref["namespace"]},
            "involvedObject": involved,
            "type": kind,
            "reason": reason,
            "message": f"node {self.node}: {message}"[:1024],
            "source": {"component": COMPONENT, "host": self.node},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.node,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self.core.create_namespaced_event(ref["namespace"], body, _request_timeout=self.timeout)
        log.info(f"event {reason} on SockPolicy {ref['namespace']}/{ref['name']}",
                 extra={"action": "event", "reason": reason, "type": kind})  # fmt: skip


def wait_synced(adapter: KubeAdapter, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(i.items()[1] for i in adapter.informers):
            return True
        time.sleep(0.05)
    return False
