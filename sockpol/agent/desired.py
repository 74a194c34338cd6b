"""What the agent is asked to enforce: policies, the workloads they govern, and the pods it sees.

Sources (dirsource.py, kube.py) produce `PolicySpec`s; the pod inventory (kube.py, or a fixed
list) produces `Pod`s. Selectors follow Kubernetes' LabelSelector semantics (matchLabels and
matchExpressions with In, NotIn, Exists, DoesNotExist), so a SockPolicy selects pods exactly as
a NetworkPolicy or a Deployment would.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from sockpol.diagnostics import SockpolError

MODES = ("enforce", "dry-run")
QOS_CLASSES = ("Guaranteed", "Burstable", "BestEffort")
MIRROR_ANNOTATION = "kubernetes.io/config.mirror"


class SpecError(SockpolError):
    """A desired-state object that cannot be understood (bad targets file, bad selector)."""


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # In, NotIn, Exists, DoesNotExist
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        if self.operator == "NotIn":
            return self.key not in labels or labels[self.key] not in self.values
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        raise SpecError(f"selector: unknown operator {self.operator!r}")


@dataclass(frozen=True)
class Selector:
    """A LabelSelector. An empty selector selects every pod of the namespace (as in Kubernetes)."""

    match_labels: tuple[tuple[str, str], ...] = ()
    expressions: tuple[Requirement, ...] = ()

    @staticmethod
    def from_dict(raw: object) -> Selector:
        """Checked as the API server checks a LabelSelector: a misspelt key or a value of the
        wrong type is an error, never a selector that silently selects more (or other) pods."""
        raw = raw or {}
        if not isinstance(raw, dict):
            raise SpecError("selector: expected an object with matchLabels/matchExpressions")
        unknown = set(raw) - {"matchLabels", "matchExpressions"}
        if unknown:
            raise SpecError(
                f"selector: unknown keys {', '.join(sorted(map(str, unknown)))} "
                "(matchLabels, matchExpressions)"
            )
        labels = raw.get("matchLabels") or {}
        if not isinstance(labels, dict):
            raise SpecError("selector: matchLabels must map label names to values")
        for k, v in labels.items():
            if not isinstance(k, str) or not k or not isinstance(v, str):
                raise SpecError(
                    f"selector: matchLabels: {k!r}: {v!r}: label names and values are "
                    "strings (quote numbers and booleans in YAML)"
                )
        exprs = raw.get("matchExpressions") or []
        if not isinstance(exprs, list):
            raise SpecError("selector: matchExpressions must be a list")
        return Selector(
            tuple(sorted(labels.items())), tuple(_requirement(i, e) for i, e in enumerate(exprs))
        )

    def matches(self, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels) and all(
            r.matches(labels) for r in self.expressions
        )


def _requirement(i: int, e: object) -> Requirement:
    where = f"selector: matchExpressions[{i}]"
    if not isinstance(e, dict):
        raise SpecError(f"{where}: expected an object with key, operator and values")
    unknown = set(e) - {"key", "operator", "values"}
    if unknown:
        raise SpecError(f"{where}: unknown keys {', '.join(sorted(map(str, unknown)))}")
    key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
    if not isinstance(key, str) or not key:
        raise SpecError(f"{where}: 'key' (a label name) is required")
    if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
        raise SpecError(f"{where}: unknown operator {op!r}")
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise SpecError(f"{where}: 'values' must be a list of strings")
    if op in ("In", "NotIn") and not values:
        raise SpecError(f"{where}: {op} needs values")
    if op in ("Exists", "DoesNotExist") and values:
        raise SpecError(f"{where}: {op} takes no values")
    return Requirement(key, op, tuple(values))


@dataclass(frozen=True)
class PodTarget:
    namespace: str
    selector: Selector


@dataclass(frozen=True)
class PolicySpec:
    """One desired policy: its text and what it governs.

    `key` names it in logs, status and load names (`namespace/name` for a SockPolicy,
    `configmap/<entry>` for the directory source); `ref` is the object to report on (kube.py).
    """

    key: str
    source: str
    source_name: str  # shown in compile errors: file name, or namespace/name
    policy: str | None = None  # which policy of the text, when it defines several
    mode: str | None = None  # enforce or dry-run; None: the policy's own `mode`
    pods: tuple[PodTarget, ...] = ()
    cgroups: tuple[str, ...] = ()  # cgroup v2 directories or glob patterns (relative to root)
    ref: dict | None = field(default=None, compare=False, hash=False)

    @property
    def source_sha256(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()


@dataclass(frozen=True)
class Pod:
    uid: str
    namespace: str
    name: str
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    qos: str = "BestEffort"  # status.qosClass
    phase: str = "Running"
    deleting: bool = False  # metadata.deletionTimestamp: kubelet may have removed its cgroup

    @property
    def active(self) -> bool:
        """Pods that can still run processes (kubelet removes the cgroups of finished ones)."""
        return self.phase not in ("Succeeded", "Failed")

    @staticmethod
    def from_dict(raw: dict) -> Pod:
        meta, status = raw.get("metadata") or {}, raw.get("status") or {}
        # A static pod (a manifest in kubelet's directory) runs under the UID kubelet made
        # from the manifest's hash; the API shows a mirror of it under another UID, with the
        # hash in this annotation (kubelet's pod/mirror_client.go, config/common.go).
        mirror_of = (meta.get("annotations") or {}).get(MIRROR_ANNOTATION)
        return Pod(
            uid=mirror_of or meta.get("uid", ""),
            namespace=meta.get("namespace", ""),
            name=meta.get("name", ""),
            labels=dict(meta.get("labels") or {}),
            qos=status.get("qosClass") or "BestEffort",
            phase=status.get("phase") or "Pending",
            deleting=bool(meta.get("deletionTimestamp")),
        )


@dataclass(frozen=True)
class Snapshot:
    """A source's view at one moment. `ready` is False until it has listed everything once:
    the reconciler never unloads on the word of a source that has not (a restarting agent
    would otherwise unload everything before its first list)."""

    specs: tuple[PolicySpec, ...]
    ready: bool = True
    problems: tuple[str, ...] = ()  # objects the source could not read (reported, skipped)
    # Keys of policies whose object could not be read: their loads are kept as they are.
    held: tuple[str, ...] = ()
