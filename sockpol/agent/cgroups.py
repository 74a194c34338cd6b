"""Where kubelet puts a pod's processes: its cgroup v2 directory, from its UID and QoS class.

kubelet names a pod's cgroup `[<cgroup-root>, "kubepods", <qos>, "pod<uid>"]`, where `<qos>` is
`burstable` or `besteffort` and is absent for Guaranteed pods (pkg/kubelet/cm:
qos_container_manager_linux.go, pod_container_manager_linux.go, `podCgroupNamePrefix = "pod"`),
and turns that name into a directory by its cgroup driver (cgroup_manager_linux.go):

- cgroupfs: the components joined by `/`: `kubepods/burstable/pod<uid>`;
- systemd (`CgroupName.ToSystemd`): each component's `-` escaped as `_`, and one slice per
  level whose name repeats its ancestors' (systemd's ExpandSlice):
  `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with _>.slice`.

Inside the pod's cgroup the container runtime makes one cgroup per container: containerd
`<id>` under cgroupfs and `cri-containerd-<id>.scope` under systemd (its CRI plugin's
getCgroupsPath gives runc `<slice>:cri-containerd:<id>`); CRI-O `crio-<id>` / `crio-<id>.scope`
(internal/config/cgmgr, `scopePrefix = "crio"`), plus `crio-conmon-<id>.scope` for its monitor;
Docker (cri-dockerd) `docker-<id>.scope`.

The agent attaches a pod's policy to the pod's cgroup, not to a container's: cgroup BPF
programs apply to every descendant, so every container of the pod is governed, including a
container restarted under a new ID and one that starts later, with no work by the agent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sockpol.agent.desired import Pod

DRIVERS = ("cgroupfs", "systemd")
_CONTAINER = re.compile(
    r"^(?:(?P<runtime>cri-containerd|crio|docker)-)?(?P<id>[0-9a-f]{64})(?:\.scope)?$"
)


@dataclass(frozen=True)
class Container:
    runtime: str  # containerd, cri-o, docker, or "unknown" (a bare ID under cgroupfs)
    id: str
    path: Path


def qos_component(qos: str) -> str | None:
    """The QoS level's cgroup name component; Guaranteed pods sit right under kubepods."""
    if qos == "Guaranteed":
        return None
    if qos in ("Burstable", "BestEffort"):
        return qos.lower()
    return "besteffort"  # kubelet's own default for a pod without a class yet


def pod_cgroup_name(pod: Pod, cgroup_root: str = "/") -> list[str]:
    root = [c for c in cgroup_root.strip("/").split("/") if c]
    qos = qos_component(pod.qos)
    return [*root, "kubepods", *([qos] if qos else []), f"pod{pod.uid}"]


def to_cgroupfs(name: list[str]) -> str:
    return "/".join(name)


def to_systemd(name: list[str]) -> str:
    escaped = [part.replace("-", "_") for part in name]
    return "/".join("-".join(escaped[: i + 1]) + ".slice" for i in range(len(escaped)))


class PodCgroups:
    """Resolves pods to cgroup directories under `base` (the cgroup v2 mount, or in tests a
    directory standing in for it) for kubelet's `cgroup_root` and `driver` (`auto`: whichever
    layout exists)."""

    def __init__(self, base: Path, driver: str = "auto", cgroup_root: str = "/") -> None:
        if driver not in (*DRIVERS, "auto"):
            raise ValueError(f"unknown cgroup driver {driver!r} (cgroupfs, systemd or auto)")
        self.base, self.driver, self.cgroup_root = base, driver, cgroup_root

    def candidates(self, pod: Pod) -> list[Path]:
        name = pod_cgroup_name(pod, self.cgroup_root)
        out = []
        if self.driver in ("cgroupfs", "auto"):
            out.append(self.base / to_cgroupfs(name))
        if self.driver in ("systemd", "auto"):
            out.append(self.base / to_systemd(name))
        return out

    def pod_parents(self) -> list[Path]:
        """The directories kubelet makes pod cgroups in (one per QoS class and driver)."""
        root = [c for c in self.cgroup_root.strip("/").split("/") if c]
        out = []
        for qos in ([], ["burstable"], ["besteffort"]):
            name = [*root, "kubepods", *qos]
            if self.driver in ("cgroupfs", "auto"):
                out.append(self.base / to_cgroupfs(name))
            if self.driver in ("systemd", "auto"):
                out.append(self.base / to_systemd(name))
        return out

    def resolve(self, pod: Pod) -> Path | None:
        """The pod's cgroup directory, or None while kubelet has not made it (or has removed
        it)."""
        for path in self.candidates(pod):
            if (path / "cgroup.procs").exists():
                return path
        return None

    @staticmethod
    def containers(pod_dir: Path) -> list[Container]:
        """The containers' cgroups inside a pod's (the runtimes' naming above); conmon and
        anything else unknown are left out."""
        out = []
        try:
            entries = sorted(pod_dir.iterdir())
        except OSError:
            return []
        for entry in entries:
            m = _CONTAINER.match(entry.name)
            if m is None or not entry.is_dir():
                continue
            runtime = {"cri-containerd": "containerd", "crio": "cri-o", "docker": "docker"}.get(
                m["runtime"] or "", "unknown"
            )
            out.append(Container(runtime, m["id"], entry))
        return out
