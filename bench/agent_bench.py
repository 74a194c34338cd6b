"""Agent benchmark: what a reconcile pass of `sockpol agent` costs with N pods on a node.

    sudo python3 bench/agent_bench.py [--pods 10,50,200] [--out results/agent.json]

For each N: N pod cgroups laid out as kubelet's systemd driver lays them out (Burstable), in a
cgroup made for the run, and one policy selecting them all. Wall time of
`Reconciler.reconcile` for:

  first    N loads (compile once, then one verification and attachment per pod)
  steady   nothing to do: reading the N loads' pins (what every periodic pass costs)
  change   the policy's text changes: N reloads (tables swapped in place)
  restart  a new reconciler (an agent restart): N adoptions, nothing loaded
  remove   the policy goes: N unloads

and, once, the time from the `mkdir` of a new pod's cgroup to its policy being loaded by a
running agent (`Agent` with its cgroup watcher, the periodic pass an hour away): the window in
which a new pod's connections could escape it.

Policies are pinned under a pin root of the run's own ($SOCKPOL_PIN_ROOT, unless set), so
nothing else on the machine is touched; the pin root is removed at the end. Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from pinroot import own_pin_root  # noqa: E402

POLICY = """policy web {{
    port 18080
    default deny
    allow GET /api/v1/orders/*
    allow GET {extra}
}}
"""


def make_pods(base: Path, n: int):
    from sockpol.agent.cgroups import pod_cgroup_name, to_systemd
    from sockpol.agent.desired import Pod

    pods = []
    for _ in range(n):
        uid = str(uuid.uuid4())
        pod = Pod(uid, "shop", f"p-{uid[:8]}", {"app": "web"}, "Burstable", "Running")
        d = base / to_systemd(pod_cgroup_name(pod)) / f"cri-containerd-{uuid.uuid4().hex * 2}.scope"
        d.mkdir(parents=True)
        pods.append(pod)
    return pods


def spec(extra: str):
    from sockpol.agent.desired import PodTarget, PolicySpec, Selector

    return PolicySpec(
        "shop/web", POLICY.format(extra=extra), "web.pol",
        pods=(PodTarget("shop", Selector((("app", "web"),))),),
    )  # fmt: skip


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def run_size(base: Path, n: int, state: Path) -> dict:
    from sockpol.agent.desired import Snapshot
    from sockpol.agent.reconciler import AgentConfig, Reconciler

    group = base / f"n{n}"
    group.mkdir()
    pods = make_pods(group, n)

    def reconciler() -> Reconciler:
        return Reconciler(AgentConfig(state_dir=state, prefix="bench-agent-", cgroup_base=group))

    rec = reconciler()
    a, b = Snapshot((spec("/a"),)), Snapshot((spec("/b"),))
    out: dict = {"pods": n}
    for label, fn in (
        ("first", lambda: rec.reconcile(a, pods)),
        ("steady", lambda: rec.reconcile(a, pods)),
        ("change", lambda: rec.reconcile(b, pods)),
        ("restart", lambda: reconciler().reconcile(b, pods)),
        ("remove", lambda: rec.reconcile(Snapshot(()), pods)),
    ):
        seconds, report = timed(fn)
        kinds: dict[str, int] = {}
        for action in report.actions:
            key = action.action + ("" if action.ok else "-failed")
            kinds[key] = kinds.get(key, 0) + 1
        out[label] = {"seconds": round(seconds, 4), "actions": kinds}
        print(f"  {n:>4} pods  {label:<8} {seconds * 1000:9.1f} ms  {kinds}", flush=True)
    return out


def new_pod_latency(base: Path, state: Path, repeat: int) -> list[float]:
    from sockpol import runtime
    from sockpol.agent.cgroups import PodCgroups, pod_cgroup_name, to_systemd
    from sockpol.agent.desired import Pod, Snapshot
    from sockpol.agent.main import Agent
    from sockpol.agent.reconciler import AgentConfig, Reconciler

    group = base / "latency"
    group.mkdir()
    for d in PodCgroups(group).pod_parents():  # what kubelet makes at its start
        d.mkdir(parents=True, exist_ok=True)
    pods: list[Pod] = []

    class Source:
        def snapshot(self):
            return Snapshot((spec("/a"),))

    class Inventory:
        def pods(self):
            return list(pods), True

    rec = Reconciler(AgentConfig(state_dir=state, prefix="bench-agent-", cgroup_base=group))
    agent = Agent(rec, [Source()], Inventory(), None, interval=3600, watch_cgroups=True)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    from sockpol.runtime import pins

    root = pins.pin_root(create=True)
    latencies: list[float] = []
    try:
        for _ in range(repeat):
            uid = str(uuid.uuid4())
            pod = Pod(uid, "shop", f"p-{uid[:8]}", {"app": "web"}, "Burstable", "Running")
            pods.append(pod)  # the pod is known (bound) before kubelet makes its cgroup
            time.sleep(0.2)
            pod_dir = group / to_systemd(pod_cgroup_name(pod))
            started = time.perf_counter()
            pod_dir.mkdir()
            # The pin directory appears at the load's commit point (pins.py): cheap to poll.
            while len(os.listdir(root)) <= len(latencies):
                if time.perf_counter() - started > 10:
                    raise SystemExit("the new pod was not loaded within 10 s")
                time.sleep(0.001)
            latencies.append(time.perf_counter() - started)
    finally:
        agent.shutdown()
        thread.join(10)
        for s in runtime.status():
            if s.name.startswith("bench-agent-"):
                runtime.unload(s.name)
    return latencies


def main(argv: list[str] | None = None) -> int:
    with own_pin_root("bench-agent"):
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", default="10,50,200")
    parser.add_argument("--latency-repeat", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from sockpol.runtime.system import cgroup2_mount

    base = cgroup2_mount() / f"sockpol-bench-agent-{os.getpid()}"
    base.mkdir()
    results: dict = {"sizes": [], "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release}}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for n in [int(x) for x in args.pods.split(",")]:
                results["sizes"].append(run_size(base, n, Path(tmp)))
            lat = new_pod_latency(base, Path(tmp), args.latency_repeat)
        results["new_pod_ms"] = {
            "median": round(statistics.median(lat) * 1000, 1),
            "max": round(max(lat) * 1000, 1),
            "runs": len(lat),
        }
        print(f"  new pod: mkdir -> loaded, median {results['new_pod_ms']['median']} ms, "
              f"max {results['new_pod_ms']['max']} ms ({len(lat)} runs)")  # fmt: skip
    finally:
        _remove(base)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _remove(d: Path) -> None:
    for child in d.iterdir():
        if child.is_dir():
            _remove(child)
    d.rmdir()


if __name__ == "__main__":
    sys.exit(main())
