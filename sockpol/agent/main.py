"""`sockpol agent`: the loop, its sources, its HTTP server, and a clean exit on SIGTERM.

The loop runs a reconcile pass when a source says something changed (a watch event) and at
least every `--interval` seconds (to repair drift: a policy unloaded or reloaded by hand, and to
read the directory source). On SIGTERM or SIGINT it ends the pass in progress after the action
in progress (a load is never cut in half) and exits 0, leaving every policy loaded:
enforcement lives in the kernel and does not depend on the agent.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time

from sockpol.agent import logs, names
from sockpol.agent.desired import Pod, Snapshot
from sockpol.agent.reconciler import AgentConfig, PassReport, Reconciler
from sockpol.agent.server import AgentStats, registry, serve
from sockpol.diagnostics import SockpolError

log = logging.getLogger("sockpol.agent")
ONCE_SYNC_TIMEOUT = 60.0  # --once --kubernetes: how long the first lists may take


class Agent:
    """The reconciler fed by its sources; `wake` makes the loop run a pass now."""

    def __init__(
        self,
        reconciler: Reconciler,
        sources: list,
        pods=None,
        reporter=None,
        interval: float = 10.0,
        watch_cgroups: bool = False,
    ) -> None:
        self.reconciler, self.sources, self.pods, self.reporter = (
            reconciler, sources, pods, reporter,
        )  # fmt: skip
        self.interval = interval
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.stats = AgentStats()
        self._problems: set[str] = set()
        self.watcher = None
        directories = [s.directory for s in sources if getattr(s, "directory", None)]
        if watch_cgroups or directories:
            from sockpol.agent.cgwatch import CgroupWatcher

            parents = reconciler.cgroups.pod_parents() if watch_cgroups else []
            self.watcher = CgroupWatcher(parents, self.wake, sources=directories)

    def snapshot(self) -> Snapshot:
        specs, problems, held, ready = [], [], [], True
        for source in self.sources:
            s = source.snapshot()
            specs += s.specs
            problems += s.problems
            held += s.held
            ready = ready and s.ready
        if self.pods is None and any(spec.pods for spec in specs):
            problems.append("policies select pods, but the agent has no pod inventory "
                            "(run it with --kubernetes)")  # fmt: skip
        # Keys name loads and reports: two sources giving one key (a SockPolicy `x` in a
        # namespace called `configmap`, and targets.yaml's entry `x`) would fight over the
        # same loads. Neither is acted on; both keep what is loaded.
        keys = [spec.key for spec in specs]
        for key in sorted({k for k in keys if keys.count(k) > 1}):
            problems.append(f"two sources give the policy {key}: rename one")
            held.append(key)
        specs = [spec for spec in specs if spec.key not in held]
        return Snapshot(tuple(specs), ready, tuple(problems), tuple(held))

    def run_once(self) -> PassReport:
        if self.watcher is not None:
            self.watcher.refresh()
        snapshot = self.snapshot()
        pods: list[Pod] = []
        pods_ready = True
        if self.pods is not None:
            pods, pods_ready = self.pods.pods()
        report = self.reconciler.reconcile(snapshot, pods, pods_ready, self.stop.is_set)
        for problem in sorted(set(report.problems) - self._problems):  # once, not every pass
            log.warning(problem, extra={"action": "read", "result": "error"})
        self._problems = set(report.problems)
        self.stats.record(report)
        if self.reporter is not None and not report.interrupted:  # partial counts: not a status
            self.reporter.report(report)
        return report

    def run(self) -> None:
        if self.watcher is not None:
            self.watcher.start()
        try:
            self._loop()
        finally:
            if self.watcher is not None:
                self.watcher.stop()

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.wake.clear()
            try:
                self.run_once()
            except Exception as e:  # a bug or a kernel surprise: say it, keep the loop alive
                log.exception("reconcile pass failed", extra={"action": "pass", "result": "error"})
                self.stats.last_error = f"{type(e).__name__}: {e}"
            self.wake.wait(self.interval)
            if not self.stop.is_set():
                # Let a burst of watch events arrive together; short, since a new pod's cgroup
                # wakes the loop too, and its policy should be in before its sandbox is up.
                time.sleep(0.02)

    def health(self) -> tuple[bool, str]:
        s = self.stats
        with s.lock:
            if s.last_pass_monotonic is None:
                return False, "no reconcile pass has completed yet"
            age = time.monotonic() - s.last_pass_monotonic
            if age > 3 * self.interval + 30:
                return False, f"last completed pass {age:.0f} s ago"
            if s.last_error:
                return True, f"last pass failed: {s.last_error}"
            waiting = "" if s.complete else "; waiting for a complete list from every source"
            return True, f"last pass {age:.1f} s ago, {s.desired} loads desired{waiting}"

    def shutdown(self) -> None:
        self.stop.set()
        self.wake.set()


def _require_host_bpffs() -> None:
    """Pins must live in the host's bpffs: a bpffs mounted inside the agent's container would
    vanish with it, and every policy with it. So the agent mounts none."""
    from sockpol.runtime.system import BPFFS_DEFAULT, find_bpffs

    if find_bpffs(BPFFS_DEFAULT) is None:
        raise SockpolError(
            f"agent: no bpf filesystem at {BPFFS_DEFAULT}; mount the host's there (the "
            "DaemonSet's hostPath volume; on the host: mount -t bpf bpf /sys/fs/bpf)"
        )


def unload_all(prefix: str) -> int:
    """Uninstalling: unload every policy the agent (with this prefix) loaded on this node."""
    from sockpol import runtime
    from sockpol.runtime import pins

    if not names.valid_prefix(prefix):
        raise SockpolError(f"agent: invalid --prefix {prefix!r}")
    root = pins.pin_root(create=False)
    failed = 0
    for entry in sorted(root.iterdir()) if root is not None else []:
        if not (names.owned(prefix, entry.name) and pins.valid_name(entry.name)):
            continue
        try:
            runtime.unload(entry.name)
        except runtime.PolicyNotFound:
            continue
        except (SockpolError, OSError) as e:
            failed += 1
            fields = {"action": "unload", "load": entry.name, "result": "error"}
            log.error(f"unload {entry.name}: {e}", extra=fields)
            continue
        log.info(f"unload {entry.name}: ok",
                 extra={"action": "unload", "load": entry.name, "result": "ok"})  # fmt: skip
    return 1 if failed else 0


def listen_address(text: str) -> tuple[str, int]:
    """--listen ADDR:PORT as (host, port); port 0 (any free port, said in the start line) is
    allowed here, for tests."""
    from sockpol.runtime import metrics

    try:
        if text.endswith(":0"):
            return metrics.parse_listen(text[:-1] + "1")[0], 0
        return metrics.parse_listen(text)
    except ValueError as e:
        raise SockpolError(f"agent: --listen: {e}") from None


def _check_paths(args: argparse.Namespace) -> None:
    """Paths given wrong would otherwise make an agent that runs and governs nothing."""
    if args.cgroup_base is not None and not (args.cgroup_base / "cgroup.controllers").is_file():
        raise SockpolError(
            f"agent: --cgroup-base {args.cgroup_base}: not a cgroup v2 directory (no "
            "cgroup.controllers); give the cgroup v2 mount, or leave it out to find it"
        )
    if args.source_dir is not None and not args.source_dir.is_dir():
        raise SockpolError(f"agent: --source-dir {args.source_dir}: no such directory")
    try:
        args.state_dir.mkdir(parents=True, exist_ok=True)
        probe = args.state_dir / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise SockpolError(
            f"agent: --state-dir {args.state_dir}: cannot write there ({e.strerror})"
        ) from None


def cmd_agent(args: argparse.Namespace) -> int:
    import socket

    from sockpol.runtime.system import check_privileges

    logs.setup(args.log_level)
    if args.unload_all:
        return unload_all(args.prefix)
    if not args.source_dir and not args.kubernetes:
        raise SockpolError("agent: give --source-dir DIR, --kubernetes, or both")
    if not names.valid_prefix(args.prefix):
        raise SockpolError(f"agent: invalid --prefix {args.prefix!r} (letters, digits, _ and -)")
    check_privileges()
    _require_host_bpffs()
    host, port = listen_address(args.listen)
    _check_paths(args)
    config = AgentConfig(
        state_dir=args.state_dir, prefix=args.prefix, cgroup_base=args.cgroup_base,
        cgroup_driver=args.cgroup_driver, cgroup_root=args.cgroup_root,
        backoff_max=args.backoff_max,
    )  # fmt: skip
    reconciler = Reconciler(config)
    sources: list = []
    pods = reporter = None
    if args.source_dir:
        from sockpol.agent.dirsource import DirectorySource

        sources.append(DirectorySource(args.source_dir))
    kube = None
    if args.kubernetes:
        from sockpol.agent.kube import KubeAdapter, wait_synced

        node = args.node or os.environ.get("NODE_NAME") or socket.gethostname()
        kube = KubeAdapter.connect(node, kubeconfig=args.kubeconfig)
        sources.append(kube.policies)
        pods, reporter = kube.pods, kube
    watch = pods is not None  # pods to govern: wake when kubelet makes their cgroups
    agent = Agent(reconciler, sources, pods, reporter, args.interval, watch_cgroups=watch)
    try:
        server = serve(host, port, registry(agent.stats), agent.health)
    except OSError as e:
        raise SockpolError(f"agent: cannot listen on {args.listen}: {e.strerror}") from None
    if kube is not None:
        kube.start(agent.wake)
    bound = server.server_address
    listening = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
    signal.signal(signal.SIGTERM, lambda *_: agent.shutdown())
    signal.signal(signal.SIGINT, lambda *_: agent.shutdown())
    log.info(
        f"agent started: serving http://{listening}/metrics and /healthz",
        extra={"action": "start", "prefix": args.prefix, "listen": listening,
               "sources": [type(s).__name__ for s in sources]},
    )  # fmt: skip
    try:
        if args.once:
            # One pass on a complete view, or none: before the first list it would do nothing.
            if kube is not None and not wait_synced(kube, ONCE_SYNC_TIMEOUT):
                raise SockpolError(
                    f"agent --once: no complete list of SockPolicies and pods from the "
                    f"Kubernetes API within {ONCE_SYNC_TIMEOUT:.0f} s (see the log); nothing done"
                )
            agent.run_once()
        else:
            agent.run()
    finally:
        if kube is not None:
            kube.stop()
        server.shutdown()
    log.info("agent stopped; loaded policies stay in force", extra={"action": "stop"})
    return 0
