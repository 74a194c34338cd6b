"""Make what is loaded on this node match the desired state, one pass at a time.

A pass:
  1. desired loads: for every policy, every cgroup it governs (each selected pod's cgroup,
     cgroups.py; each cgroup the directory source names) -> one load, named names.load_name;
  2. loaded: the policies pinned under the agent's prefix (runtime.status), nothing else;
  3. for every desired load:
       - not loaded (new pod, new policy, or unloaded by hand) -> runtime.load;
       - loaded, same source (sha256) and policy, same cgroup, healthy -> nothing; the mode
         is restored with one map write if it drifted (no reload). A restarted agent finds
         its loads this way and adopts them: no reload, no gap;
       - loaded from another source (the policy changed, or someone reloaded it by hand) ->
         runtime.reload, compiled for the loaded program's table shape so that the tables are
         swapped in place when they fit (otherwise the programs are replaced and every
         connection handed over); no connection is touched either way;
       - loaded but unhealthy (a pin missing, its cgroup link gone) -> runtime.load under the
         same name, which replaces it;
  4. owned loads nobody wants any more (policy removed, pod gone) -> runtime.unload, but only
     when every source has listed everything at least once (Snapshot.ready), and never for a
     policy whose object could not be read (Snapshot.held).

A policy whose text does not compile keeps the version that is loaded; pods that appear while
it is broken get its last good version (the object a loaded copy came from). A load or reload
that fails is reported, retried with back-off (backoff.py), and affects no other load.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path

from sockpol.agent import names
from sockpol.agent.backoff import Backoff
from sockpol.agent.cgroups import PodCgroups
from sockpol.agent.desired import Pod, PolicySpec, Snapshot
from sockpol.agent.objects import Compiled, CompileFailure, ObjectStore
from sockpol.diagnostics import SockpolError

log = logging.getLogger("sockpol.agent")


@dataclass(frozen=True)
class DesiredLoad:
    name: str
    spec: PolicySpec
    cgroup: Path
    pod: Pod | None = None

    @property
    def target(self) -> str:
        return f"pod {self.pod.namespace}/{self.pod.name}" if self.pod else f"cgroup {self.cgroup}"


@dataclass(frozen=True)
class Action:
    action: str  # load, reload, replace, unload, mode, adopt
    name: str
    key: str | None
    target: str
    ok: bool
    error: str | None = None
    ms: float = 0.0


@dataclass
class SpecReport:
    """How one desired policy stands on this node after a pass (kube.py puts it on the
    object's status; an error also becomes an Event)."""

    key: str
    ref: dict | None
    source_sha256: str
    targets: int = 0  # pods (and cgroups) it governs here
    loaded: int = 0  # of them, governed by a loaded version now
    current: int = 0  # of them, governed by the current version of its text
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def message(self) -> str:
        if self.errors:
            more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
            return self.errors[0] + more
        return f"enforced on {self.current} of {self.targets} targets on this node"


@dataclass
class PassReport:
    actions: list[Action] = field(default_factory=list)
    specs: dict[str, SpecReport] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    loads: dict[str, DesiredLoad] = field(default_factory=dict)  # desired, by load name
    desired: int = 0
    owned: int = 0
    seconds: float = 0.0
    complete: bool = True  # every source (and the pod list) had listed everything
    interrupted: bool = False  # ended early (the agent is stopping): its counts are partial


@dataclass
class AgentConfig:
    state_dir: Path
    prefix: str = names.DEFAULT_PREFIX
    cgroup_base: Path | None = None  # the cgroup v2 mount (default: found in mountinfo)
    cgroup_driver: str = "auto"
    cgroup_root: str = "/"  # kubelet's --cgroup-root
    backoff_base: float = 1.0
    backoff_max: float = 300.0
    collect_every: float = 3600.0  # seconds between sweeps of unused compiled objects


def _runtime():
    from sockpol import runtime

    return runtime


class Reconciler:
    def __init__(self, config: AgentConfig, clock: Callable[[], float] = time.monotonic) -> None:
        if not names.valid_prefix(config.prefix):
            raise SockpolError(f"agent: invalid name prefix {config.prefix!r}")
        self.config = config
        if config.cgroup_base is None:
            from sockpol.runtime.system import cgroup2_mount

            config.cgroup_base = cgroup2_mount()
        self.cgroups = PodCgroups(config.cgroup_base, config.cgroup_driver, config.cgroup_root)
        self.objects = ObjectStore(config.state_dir / "objects")
        self.backoff = Backoff(config.backoff_base, config.backoff_max)
        self.clock = clock
        self._key_of: dict[str, str] = {}  # load name -> policy key, as learned
        self._last_good: dict[str, Compiled] = {}  # policy key -> its last good object
        self._compile_errors: dict[str, str] = {}  # policy key -> its error, as last logged
        self._noted: set[str] = set()  # errors of the last pass that are no action's, logged
        self._adopted = False
        self._collected_at = clock()

    # -- the desired loads ---------------------------------------------------------------------

    def desired(
        self, specs: Iterable[PolicySpec], pods: Iterable[Pod]
    ) -> tuple[list[DesiredLoad], list[tuple[PolicySpec, Pod]]]:
        """The desired loads, and the selected pods that should have a cgroup by now (they
        run) but have none where kubelet's layout says: governed by nothing, so reported."""
        pods = [p for p in pods if p.active and p.uid]
        out: dict[str, DesiredLoad] = {}
        unresolved: list[tuple[PolicySpec, Pod]] = []
        for spec in specs:
            for target in spec.pods:
                for pod in pods:
                    if pod.namespace != target.namespace or not target.selector.matches(pod.labels):
                        continue
                    cgroup = self.cgroups.resolve(pod)
                    if cgroup is not None:
                        self._add(out, spec, cgroup, pod)
                    elif pod.phase == "Running" and not pod.deleting:
                        unresolved.append((spec, pod))
            for pattern in spec.cgroups:
                for cgroup in self._cgroups_matching(pattern):
                    self._add(out, spec, cgroup, None)
        return list(out.values()), unresolved

    def _add(self, out: dict[str, DesiredLoad], spec: PolicySpec, cgroup: Path, pod: Pod | None):
        rel = str(cgroup.relative_to(self.config.cgroup_base))
        name = names.load_name(self.config.prefix, spec.key, rel)
        out.setdefault(name, DesiredLoad(name, spec, cgroup, pod))
        self._key_of[name] = spec.key

    def _cgroups_matching(self, pattern: str) -> list[Path]:
        base = self.config.cgroup_base
        assert base is not None
        rel = pattern.removeprefix(str(base)).lstrip("/")
        found = sorted(glob(str(base / rel))) if rel else [str(base)]
        return [Path(p) for p in found if os.path.isfile(os.path.join(p, "cgroup.procs"))]

    # -- a pass --------------------------------------------------------------------------------

    def reconcile(
        self,
        snapshot: Snapshot,
        pods: Iterable[Pod] = (),
        pods_ready: bool = True,
        stopping: Callable[[], bool] = lambda: False,
    ) -> PassReport:
        """One pass. `stopping` is asked between actions: a pass of many loads (a node's first,
        ~85 ms each) ends early on SIGTERM, inside the pod's grace period, not after it."""
        started = time.monotonic()
        report = PassReport(problems=list(snapshot.problems))
        report.complete = snapshot.ready and pods_ready
        want, unresolved = self.desired(snapshot.specs, pods)
        report.desired = len(want)
        for spec in snapshot.specs:
            report.specs[spec.key] = SpecReport(spec.key, spec.ref, spec.source_sha256)
        noted: set[str] = set()
        for spec, pod in unresolved:
            looked = ", ".join(str(p) for p in self.cgroups.candidates(pod))
            report.specs[spec.key].targets += 1
            self._note(
                report.specs[spec.key], noted, "resolve",
                f"pod {pod.namespace}/{pod.name}: not governed: it runs, but its cgroup is not "
                f"where kubelet's layout puts it ({looked}); check the agent's --cgroup-driver "
                "and --cgroup-root against kubelet's, and that the node uses cgroup v2",
            )  # fmt: skip
        loaded = self._owned()
        report.owned = len(loaded)
        self._learn_last_good(snapshot.specs, want, loaded)
        clashing = self._clashes(want, loaded, report, noted)
        self._noted = noted
        want = [d for d in want if d.name not in clashing]
        report.loads = {d.name: d for d in want}
        for d in want:
            if stopping():
                report.interrupted = True
                break
            self._one(d, loaded.get(d.name), report)
        if snapshot.ready and pods_ready and not report.interrupted:
            for name in sorted(set(loaded) - {d.name for d in want}):
                if stopping():
                    report.interrupted = True
                    break
                key = self._key_of.get(name)
                if key in snapshot.held or (key is None and snapshot.held):
                    continue
                self._unload(name, key, loaded[name], report)
        self.backoff.forget_except({d.name for d in want})
        if not report.interrupted:  # names of loads gone for good (pods that left) are forgotten
            known = {d.name for d in want} | set(loaded)
            self._key_of = {n: k for n, k in self._key_of.items() if n in known}
        for key in set(self._compile_errors) - {spec.key for spec in snapshot.specs}:
            del self._compile_errors[key]
        if self.clock() - self._collected_at >= self.config.collect_every:
            self._collected_at = self.clock()
            keep = {Path(st.object_path) for st in self._owned().values() if st.object_path}
            keep |= {c.path for c in self._last_good.values()}
            self.objects.collect(keep, min_age=self.config.collect_every)
        self._adopted = True
        report.seconds = time.monotonic() - started
        return report

    def _owned(self) -> dict:
        from sockpol.runtime import pins

        root = pins.pin_root(create=False)
        if root is None:
            return {}
        out = {}
        for entry in sorted(root.iterdir()):
            if names.owned(self.config.prefix, entry.name) and pins.valid_name(entry.name):
                for st in _runtime().status(entry.name):
                    out[st.name] = st
        return out

    def _learn_last_good(self, specs, want: list[DesiredLoad], loaded: dict) -> None:
        """A loaded copy of a policy in its current text is its last good version; so is the
        object of any loaded copy, for a policy that has no good version in memory (after a
        restart)."""
        by_key: dict[str, list] = {}
        for d in want:
            if d.name in loaded:
                by_key.setdefault(d.spec.key, []).append(loaded[d.name])
        for spec in specs:
            if spec.key in self._last_good:
                continue
            for st in by_key.get(spec.key, []):
                found = self.objects.existing(st.object_path) if st.object_path else None
                if found is not None:
                    self._last_good[spec.key] = found
                    break

    def _note(self, spec_report: SpecReport, noted: set[str], action: str, message: str) -> None:
        """An error that is no action's (those have their own log line): on the policy's report,
        and one log line when it first appears, not one per pass."""
        spec_report.errors.append(message)
        noted.add(message)
        if message not in self._noted:
            fields = {"action": action, "policy": spec_report.key, "result": "error"}
            log.warning(message, extra=fields)

    def _clashes(
        self, want: list[DesiredLoad], loaded: dict, report: PassReport, noted: set[str]
    ) -> set[str]:
        """Loads that would share a cgroup and a port with another policy's: a connection can
        be in one policy's sockhash only, so the second would silently govern nothing there.
        The one already loaded keeps the pod (then the smaller key); the other is reported and
        not loaded (unloaded, if it was)."""
        by_cgroup: dict[Path, list[DesiredLoad]] = {}
        for d in want:
            by_cgroup.setdefault(d.cgroup, []).append(d)
        out: set[str] = set()
        for group in by_cgroup.values():
            if len(group) < 2:
                continue
            group.sort(key=lambda d: (d.name not in loaded, d.spec.key))
            taken: list[tuple[str, str, list]] = []
            for d in group:
                ports = self._ports(d.spec)
                if ports is None:
                    continue
                # An egress and an ingress policy judge different connections (those the pod
                # opens, those it accepts): only policies of one side can clash.
                side = self._side(d.spec)
                clash = next((k for k, s, p in taken if s == side and _overlap(p, ports)), None)
                if clash is None:
                    taken.append((d.spec.key, side, ports))
                    continue
                out.add(d.name)
                report.specs[d.spec.key].targets += 1
                self._note(
                    report.specs[d.spec.key], noted, "clash",
                    f"{d.target}: not loaded: its ports overlap those of policy {clash}, which "
                    "governs it already (a connection can be judged by one policy only)",
                )  # fmt: skip
        return out

    def _side(self, spec: PolicySpec) -> str:
        try:
            return self.objects.compile(spec).meta.side
        except Exception:  # reported by _object, for this policy alone
            good = self._last_good.get(spec.key)
            return good.meta.side if good is not None else "egress"

    def _ports(self, spec: PolicySpec) -> list | None:
        try:
            return self.objects.compile(spec).meta.ports
        except Exception:  # reported by _object, for this policy alone
            good = self._last_good.get(spec.key)
            return good.meta.ports if good is not None else None

    def _object(self, spec: PolicySpec, shape: dict | None, report: SpecReport) -> Compiled | None:
        """The object to load for `spec`: its current text compiled, or, when that text does
        not compile, its last good version (reported either way)."""
        try:
            compiled = self.objects.compile(spec, shape)
        except CompileFailure as e:
            return self._compile_failed(spec, report, "policy does not compile", str(e))
        except Exception as e:
            if shape is not None:  # ShapeMismatch: the caller compiles for the policy's own shape
                raise
            # The state directory cannot be written, or the compiler failed on this text: this
            # policy's problem, reported on it, never a pass that fails for every policy.
            why = f"{type(e).__name__}: {e}"
            return self._compile_failed(spec, report, "policy could not be compiled here", why)
        if shape is None:
            self._last_good[spec.key] = compiled
            if self._compile_errors.pop(spec.key, None) is not None:
                fields = {"action": "compile", "policy": spec.key, "result": "ok"}
                log.info(f"compile {spec.key}: ok", extra=fields)
        return compiled

    def _compile_failed(self, spec: PolicySpec, report: SpecReport, what: str, why: str):
        good = self._last_good.get(spec.key)
        then = "the last good version stays in force" if good else "nothing is loaded for it"
        message = f"{what}; {then}: {why}"
        if message not in report.errors:
            report.errors.append(message)
        if self._compile_errors.get(spec.key) != message:  # one log line, not one per pass
            self._compile_errors[spec.key] = message
            fields = {"action": "compile", "policy": spec.key, "result": "error", "error": why}
            log.error(f"compile {spec.key}: {what}; {then}: {why.splitlines()[0]}", extra=fields)
        return good

    def _one(self, d: DesiredLoad, st, report: PassReport) -> None:
        spec_report = report.specs[d.spec.key]
        spec_report.targets += 1
        compiled = self._object(d.spec, None, spec_report)
        if compiled is None:
            if st is not None:
                spec_report.loaded += 1
            return
        mode = d.spec.mode or compiled.meta.mode
        current = compiled.meta.source_sha256 == d.spec.source_sha256
        healthy = st is not None and st.problem is None and st.metadata is not None
        in_sync = (
            healthy
            and st.metadata.source_sha256 == compiled.meta.source_sha256
            and st.metadata.policy == compiled.meta.policy
            # An upgraded agent reloads (in place) what an older compiler made.
            and st.metadata.compiler_version == compiled.meta.compiler_version
            and st.cgroup == str(d.cgroup)
        )
        if in_sync:
            spec_report.loaded += 1
            spec_report.current += int(current)
            if not self._adopted:
                self._record(report, Action("adopt", d.name, d.spec.key, d.target, True))
            if st.mode is not None and st.mode != mode:
                self._act(report, spec_report, d, "mode", mode, lambda: self._set_mode(d, mode))
            return
        if healthy and st.cgroup == str(d.cgroup):
            action, fingerprint = "reload", f"{compiled.sha256}:{mode}"

            def do() -> None:
                obj = self._reload_object(d.spec, st.metadata.shape, spec_report) or compiled
                _runtime().reload(d.name, obj.path)
                if _runtime_mode(d.name) != mode:
                    self._set_mode(d, mode)
        else:
            action = "load" if st is None else "replace"
            fingerprint = f"{compiled.sha256}:{d.cgroup}:{mode}"

            def do() -> None:
                _runtime().load(compiled.path, d.cgroup, name=d.name, mode=mode).close()

        if self._act(report, spec_report, d, action, fingerprint, do):
            spec_report.loaded += 1
            spec_report.current += int(current)
        elif st is not None:
            spec_report.loaded += 1  # the version loaded before stays in force

    def _reload_object(self, spec: PolicySpec, shape: dict, spec_report: SpecReport):
        """The policy compiled for the loaded program's table shape, so the reload swaps
        tables in place; None when it does not fit (the reload then replaces the programs)."""
        if not shape:
            return None
        try:
            return self._object(spec, shape, spec_report)
        except Exception:  # does not fit, an older shape format, or cannot be stored
            return None

    def _set_mode(self, d: DesiredLoad, mode: str) -> None:
        from sockpol.runtime.counters import set_mode

        set_mode(d.name, mode)

    def _act(self, report, spec_report, d: DesiredLoad, action, fingerprint, do) -> bool:
        now = self.clock()
        held = self.backoff.blocked(d.name, fingerprint, now)
        if held is not None:
            # The same words as when it failed: a message that changed every pass (a countdown)
            # would rewrite the status and raise a new Event on every pass, on every node. When
            # the next try is due is in the log line of the failure (retry_in_s).
            spec_report.errors.append(f"{d.target}: {action} failed: {held.error}")
            return False
        started = time.monotonic()
        try:
            do()
        except Exception as e:  # this load's failure, whatever it is: never the pass's
            error = str(e).splitlines()[0] if str(e) else type(e).__name__
            if not isinstance(e, (SockpolError, OSError)):
                error = f"{type(e).__name__}: {error}"
            wait = self.backoff.failed(d.name, fingerprint, now, error)
            spec_report.errors.append(f"{d.target}: {action} failed: {error}")
            self._record(
                report,
                Action(action, d.name, d.spec.key, d.target, False, error,
                       (time.monotonic() - started) * 1000),
                retry_in=wait,
            )  # fmt: skip
            return False
        self.backoff.succeeded(d.name)
        self._record(
            report,
            Action(action, d.name, d.spec.key, d.target, True,
                   ms=(time.monotonic() - started) * 1000),
        )  # fmt: skip
        return True

    def _unload(self, name: str, key: str | None, st, report: PassReport) -> None:
        from sockpol.runtime import PolicyNotFound

        started = time.monotonic()
        target = f"cgroup {st.cgroup}" if st.cgroup else "no cgroup"
        try:
            _runtime().unload(name)
        except PolicyNotFound:
            return
        except (SockpolError, OSError) as e:
            self._record(report, Action("unload", name, key, target, False, str(e)))
            return
        self._key_of.pop(name, None)
        self._record(
            report,
            Action("unload", name, key, target, True, ms=(time.monotonic() - started) * 1000),
        )

    @staticmethod
    def _record(report: PassReport, a: Action, retry_in: float | None = None) -> None:
        report.actions.append(a)
        fields = {
            "action": a.action,
            "policy": a.key,
            "load": a.name,
            "target": a.target,
            "result": "ok" if a.ok else "error",
            "ms": round(a.ms, 1),
        }
        if a.error:
            fields["error"] = a.error
        if retry_in is not None:
            fields["retry_in_s"] = round(retry_in, 1)
        level = logging.INFO if a.ok else logging.ERROR
        log.log(level, f"{a.action} {a.name}: {'ok' if a.ok else a.error}", extra=fields)


def _overlap(a: list, b: list) -> bool:
    return any(lo1 <= hi2 and lo2 <= hi1 for lo1, hi1 in a for lo2, hi2 in b)


def _runtime_mode(name: str) -> str | None:
    from sockpol.runtime.counters import TelemetryError, policy_dir, read_mode

    try:
        return read_mode(policy_dir(name))
    except (TelemetryError, OSError):
        return None
