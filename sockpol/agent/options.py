"""The arguments of `sockpol agent` (kept apart so that building the CLI's parser imports no
runtime; the command itself is sockpol.agent.main:cmd_agent)."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_PREFIX = "spa-"
DEFAULT_STATE_DIR = Path("/var/lib/sockpol-agent")

DESCRIPTION = """\
Keep the policies loaded on this node equal to a desired state, until stopped: compile and load
what is wanted, reload in place what changed (no connection touched), unload what is no longer
wanted, and put back what was unloaded or changed by hand. A policy that does not compile or
load is reported and keeps its last good version. Serves /metrics and /healthz, logs one JSON
line per action. On SIGTERM it exits leaving every policy loaded; a restarted agent adopts them.

Needs root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON), the host's bpffs at /sys/fs/bpf and cgroup v2.
It owns only policies whose names start with --prefix."""

EPILOG = """\
examples:
  sockpol agent --source-dir /etc/sockpol/policies     # targets.yaml + *.pol (a ConfigMap)
  sockpol agent --kubernetes                           # in a pod (deploy/daemonset.yaml)
  sockpol agent --kubernetes --kubeconfig ~/.kube/config --node "$(hostname)"
  sockpol agent --unload-all                           # uninstalling: unload the agent's loads

targets.yaml, SockPolicy, deploy/: docs/kubernetes.md"""


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected more than 0 seconds, got {text!r}")
    return value


def arguments(p: argparse.ArgumentParser) -> None:
    p.description, p.epilog = DESCRIPTION, EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    want = p.add_argument_group("desired state (one or both)")
    want.add_argument(
        "--source-dir",
        type=Path,
        metavar="DIR",
        help="a directory (a mounted ConfigMap): targets.yaml and the policy files it names",
    )
    want.add_argument(
        "--kubernetes",
        action="store_true",
        help="SockPolicy objects and this node's pods from the Kubernetes API",
    )
    kube = p.add_argument_group("Kubernetes")
    kube.add_argument("--node", help="this node's name (default: $NODE_NAME, then the host name)")
    kube.add_argument(
        "--kubeconfig",
        metavar="FILE",
        help="kubeconfig file (default: the in-cluster service account)",
    )
    layout = p.add_argument_group("kubelet's cgroup layout (how pods are found)")
    layout.add_argument(
        "--cgroup-driver",
        choices=["auto", "cgroupfs", "systemd"],
        default="auto",
        help="kubelet's cgroup driver (default auto: whichever layout exists)",
    )
    layout.add_argument(
        "--cgroup-root", default="/", metavar="PATH", help="kubelet's --cgroup-root (default /)"
    )
    layout.add_argument(
        "--cgroup-base",
        type=Path,
        metavar="DIR",
        help="the cgroup v2 mount (default: found in /proc/self/mountinfo)",
    )
    run = p.add_argument_group("running")
    run.add_argument(
        "--listen",
        default="0.0.0.0:9464",
        metavar="ADDR:PORT",
        help="serve /metrics and /healthz here (default 0.0.0.0:9464)",
    )
    run.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help="where compiled objects are kept (default /var/lib/sockpol-agent)",
    )
    run.add_argument(
        "--prefix",
        default=DEFAULT_PREFIX,
        help="name prefix of the policies the agent owns (default spa-)",
    )
    run.add_argument(
        "--interval",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="longest time between passes (drift repair, the directory source; default 10)",
    )
    run.add_argument(
        "--backoff-max",
        type=_positive,
        default=300.0,
        metavar="SECONDS",
        help="longest wait between retries of a failing load (default 300)",
    )
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--once", action="store_true", help="run one pass and exit")
    run.add_argument(
        "--unload-all",
        action="store_true",
        help="unload every policy under --prefix and exit (uninstalling)",
    )
