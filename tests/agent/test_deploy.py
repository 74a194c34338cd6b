"""deploy/: the manifests are valid Kubernetes objects (kubernetes-validate's bundled schemas,
strict: unknown fields are errors), the CRD's schema accepts the examples and rejects malformed
SockPolicies, the examples' policies compile, and the DaemonSet and RBAC ask for no more than
docs/kubernetes.md says the agent needs."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from sockpol.agent.dirsource import DirectorySource
from sockpol.agent.kube import policy_spec
from sockpol.agent.main import listen_address
from sockpol.cli import build_parser
from sockpol.compiler import compile_source

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANIFESTS = ["crd.yaml", "namespace.yaml", "rbac.yaml", "daemonset.yaml", "configmap-example.yaml"]
# The oldest Kubernetes the CRD's x-kubernetes-validations rules are GA in, and the newest
# schemas kubernetes-validate has.
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def by_kind(kind: str) -> dict:
    return next(d for name in MANIFESTS for d in docs(name) if d["kind"] == kind)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", MANIFESTS)
def test_manifests_are_valid_kubernetes_objects(name: str, version: str) -> None:
    for doc in docs(name):
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_rejects_what_kubernetes_would() -> None:
    """A check that could not fail would prove nothing: a misspelt field and a wrong type."""
    ds = copy.deepcopy(by_kind("DaemonSet"))
    ds["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, VERSIONS[-1], strict=True)
    crd = copy.deepcopy(by_kind("CustomResourceDefinition"))
    crd["spec"]["versions"][0]["served"] = "yes"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(crd, VERSIONS[-1], strict=True)


def sockpolicy_schema() -> dict:
    crd = by_kind("CustomResourceDefinition")
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def examples() -> list[dict]:
    files = sorted((DEPLOY / "examples").glob("*.yaml"))
    return [d for f in files for d in docs(f"examples/{f.name}")]


def test_examples_match_the_crd_and_their_policies_compile() -> None:
    schema = sockpolicy_schema()
    found = examples()
    assert len(found) >= 2
    for obj in found:
        jsonschema.validate(obj, schema)
        spec = policy_spec(obj)  # what the agent makes of it
        compiled, _ = compile_source(spec.source, spec.source_name)
        assert compiled
        if spec.policy:
            assert spec.policy in {c.policy.name for c in compiled}


MALFORMED = [
    ("no spec", lambda o: o.pop("spec")),
    ("no policy text", lambda o: o["spec"].pop("policy")),
    ("empty policy text", lambda o: o["spec"].update(policy="")),
    ("no podSelector", lambda o: o["spec"].pop("podSelector")),
    ("unknown mode", lambda o: o["spec"].update(mode="audit")),
    ("unknown spec field", lambda o: o["spec"].update(selector={})),
    ("policyName not a policy name", lambda o: o["spec"].update(policyName="a.b")),
    ("label value not a string", lambda o: o["spec"]["podSelector"]["matchLabels"].update(x=1)),
    ("unknown operator", lambda o: o["spec"]["podSelector"].update(
        matchExpressions=[{"key": "app", "operator": "Near", "values": ["x"]}])),
    ("expression without key", lambda o: o["spec"]["podSelector"].update(
        matchExpressions=[{"operator": "Exists"}])),
    ("policy text too large", lambda o: o["spec"].update(policy="#" * 300_000)),
]  # fmt: skip


@pytest.mark.parametrize("why,change", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_the_crd_schema_rejects_malformed_sockpolicies(why, change) -> None:
    obj = copy.deepcopy(next(e for e in examples() if e["metadata"]["name"] == "orders-api"))
    jsonschema.validate(obj, sockpolicy_schema())
    change(obj)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(obj, sockpolicy_schema())


def test_configmap_example_is_a_directory_source_the_agent_reads(tmp_path: Path) -> None:
    cm = by_kind("ConfigMap")
    for name, text in cm["data"].items():
        (tmp_path / name).write_text(text)
    snap = DirectorySource(tmp_path).snapshot()
    assert snap.ready and not snap.problems, snap.problems
    assert [s.key for s in snap.specs] == ["configmap/orders", "configmap/node-exporter"]
    for spec in snap.specs:
        compiled, _ = compile_source(spec.source, spec.source_name)
        assert len(compiled) == 1


def test_daemonset_asks_for_no_more_than_it_needs() -> None:
    pod = by_kind("DaemonSet")["spec"]["template"]["spec"]
    assert not pod.get("hostPID") and not pod.get("hostNetwork") and not pod.get("hostIPC")
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["BPF", "NET_ADMIN", "PERFMON"]}
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    host_paths = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host_paths == {"/sys/fs/bpf", "/sys/fs/cgroup", "/var/lib/sockpol-agent"}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["cgroup"].get("readOnly") is True  # attached through a directory fd
    # Its arguments are the agent's: the CLI parses them.
    args = build_parser().parse_args(container["args"])
    assert args.kubernetes and listen_address(args.listen) == ("0.0.0.0", 9464)
    probe_port = container["livenessProbe"]["httpGet"]["port"]
    assert probe_port in {p["name"] for p in container["ports"]}


def test_rbac_grants_only_what_the_agent_uses() -> None:
    rules = by_kind("ClusterRole")["rules"]
    granted = {
        (group, resource, verb)
        for r in rules
        for group in r["apiGroups"]
        for resource in r["resources"]
        for verb in r["verbs"]
    }
    assert granted == {
        ("sockpol.io", "sockpolicies", "list"),
        ("sockpol.io", "sockpolicies", "watch"),
        ("sockpol.io", "sockpolicies/status", "patch"),
        ("", "pods", "list"),
        ("", "pods", "watch"),
        ("", "events", "create"),
    }


def test_kustomization_installs_the_agent_with_the_image_it_sets() -> None:
    """`kubectl apply -k deploy/` (docs/kubernetes.md#install): the CRD, namespace, RBAC and
    DaemonSet, and its `images:` entry names the DaemonSet's image (else it changes nothing)."""
    (kustomization,) = docs("kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(
        ["crd.yaml", "namespace.yaml", "rbac.yaml", "daemonset.yaml"]
    )
    (container,) = by_kind("DaemonSet")["spec"]["template"]["spec"]["containers"]
    (image,) = kustomization["images"]
    assert image["name"] == container["image"].rpartition(":")[0]
