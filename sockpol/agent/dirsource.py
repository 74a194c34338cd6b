"""Desired state from a directory: what a ConfigMap mounted as a volume gives.

    <dir>/targets.yaml        which policy file governs which workloads (below)
    <dir>/*.pol               the policy files it names

    policies:
      - name: orders                 # unique; the policy's key is configmap/<name>
        file: orders-api.pol         # a policy file in the same directory
        policy: orders-api           # optional: which policy, when the file has several
        mode: dry-run                # optional: enforce or dry-run (default: the policy's)
        pods:                        # optional: pods on this node (needs the Kubernetes API)
          - namespace: shop
            selector: {matchLabels: {app: orders}}
        cgroups:                     # optional: cgroup v2 directories, relative to the
          - system.slice/nginx.service   #   cgroup v2 mount; glob patterns allowed

kubelet updates a mounted ConfigMap by writing a new timestamped directory and swapping the
`..data` symlink to it in one rename; the visible names are symlinks through `..data`. Reading
every file through one resolution of `..data` gives a consistent snapshot: never the new
targets file with an old policy file. The directory is read on every pass (it is small); a
change in it wakes the loop for one (cgwatch.py).

A targets file that cannot be read makes the snapshot not ready (nothing is unloaded on its
word); an entry that cannot be understood is reported and its loads are kept as they are.
"""

from __future__ import annotations

from pathlib import Path

from sockpol.agent.desired import MODES, PodTarget, PolicySpec, Selector, Snapshot, SpecError

TARGETS_FILE = "targets.yaml"
KEY_PREFIX = "configmap/"


def _yaml():
    try:
        import yaml
    except ImportError:  # pragma: no cover - the agent extra installs it
        raise SpecError("the agent needs PyYAML: pip install 'sockpol[agent]'") from None
    return yaml


class DirectorySource:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def snapshot(self) -> Snapshot:
        data = self.directory / "..data"
        base = data.resolve() if data.exists() else self.directory
        targets = base / TARGETS_FILE
        try:
            raw = _yaml().safe_load(targets.read_text())
        except FileNotFoundError:
            return Snapshot((), ready=False, problems=(f"{self.directory}: no {TARGETS_FILE}",))
        except (OSError, UnicodeDecodeError) as e:
            return Snapshot((), ready=False, problems=(f"{targets}: {e}",))
        except Exception as e:  # yaml.YAMLError: its message has the line and column
            return Snapshot((), ready=False, problems=(f"{targets}: {e}",))
        if raw is None:
            raw = {"policies": []}
        if not isinstance(raw, dict) or not isinstance(raw.get("policies", []), list):
            return Snapshot(
                (), ready=False, problems=(f"{targets}: expected 'policies:' with a list",)
            )
        specs, problems, held, seen = [], [], [], set()
        for i, entry in enumerate(raw.get("policies") or []):
            name = entry.get("name") if isinstance(entry, dict) else None
            where = f"{targets}: policies[{i}]" + (f" ({name})" if name else "")
            try:
                spec = self._spec(base, entry)
            except SpecError as e:
                problems.append(f"{where}: {e}")
                if name:
                    held.append(KEY_PREFIX + str(name))
                continue
            if spec.key in seen:
                problems.append(f"{where}: the name {name!r} is used twice")
                held.append(spec.key)
                continue
            seen.add(spec.key)
            specs.append(spec)
        return Snapshot(tuple(specs), ready=True, problems=tuple(problems), held=tuple(held))

    @staticmethod
    def _spec(base: Path, entry: object) -> PolicySpec:
        if not isinstance(entry, dict):
            raise SpecError("expected an object with name and file")
        unknown = set(entry) - {"name", "file", "policy", "mode", "pods", "cgroups"}
        if unknown:
            raise SpecError(f"unknown keys {', '.join(sorted(unknown))}")
        name, file = entry.get("name"), entry.get("file")
        if not isinstance(name, str) or not name:
            raise SpecError("'name' (a string) is required")
        if not isinstance(file, str) or not file or "/" in file:
            raise SpecError("'file' must name a policy file in the same directory")
        mode = entry.get("mode")
        if mode is not None and mode not in MODES:
            raise SpecError(f"'mode' must be enforce or dry-run, not {mode!r}")
        try:
            text = (base / file).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise SpecError(f"{file}: {getattr(e, 'strerror', None) or e}") from None
        pods = []
        if not isinstance(entry.get("pods") or [], list):
            raise SpecError("'pods' must be a list of {namespace, selector}")
        for p in entry.get("pods") or []:
            if not isinstance(p, dict) or not isinstance(p.get("namespace"), str):
                raise SpecError("each 'pods' entry needs a namespace")
            if set(p) - {"namespace", "selector"}:  # a misspelt selector would select all
                unknown = ", ".join(sorted(map(str, set(p) - {"namespace", "selector"})))
                raise SpecError(f"'pods': unknown keys {unknown} (namespace, selector)")
            pods.append(PodTarget(p["namespace"], Selector.from_dict(p.get("selector"))))
        cgroups = entry.get("cgroups") or []
        if not isinstance(cgroups, list) or not all(isinstance(c, str) for c in cgroups):
            raise SpecError("'cgroups' must be a list of paths")
        for c in cgroups:
            if ".." in c.split("/"):  # it would leave the cgroup v2 mount
                raise SpecError(f"'cgroups': {c!r}: '..' is not allowed")
        if not pods and not cgroups:
            raise SpecError("nothing to govern: give 'pods' or 'cgroups'")
        policy = entry.get("policy")
        if policy is not None and not isinstance(policy, str):
            raise SpecError("'policy' must be the name of a policy in the file")
        return PolicySpec(
            key=KEY_PREFIX + name,
            source=text,
            source_name=file,
            policy=policy,
            mode=mode,
            pods=tuple(pods),
            cgroups=tuple(cgroups),
        )
