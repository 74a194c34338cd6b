"""The arguments of `sockpol agent` (kept apart so that building the CLI's parser imports no
runtime; the command itself is sockpol.agent.main:cmd_agent)."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_PREFIX = "spa-"
DEFAULT_STATE_DIR = Path("/var/lib/sockpol-agent")


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source-dir", type=Path, metavar="DIR",
                   help="desired state from a directory (a mounted ConfigMap): targets.yaml and "
                        "policy files")
    p.add_argument("--kubernetes", action="store_true",
                   help="desired state from SockPolicy objects, pods from the Kubernetes API")
    p.add_argument("--node", help="this node's name (default: $NODE_NAME, then the host name)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster configuration)")
    p.add_argument("--listen", default="0.0.0.0:9464", metavar="ADDR:PORT",
                   help="serve /metrics and /healthz here (default 0.0.0.0:9464)")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                   help="where compiled objects are kept (default /var/lib/sockpol-agent)")
    p.add_argument("--prefix", default=DEFAULT_PREFIX,
                   help="name prefix of the policies the agent owns (default spa-)")
    p.add_argument("--interval", type=float, default=10.0,
                   help="seconds between passes without events (drift repair; default 10)")
    p.add_argument("--cgroup-driver", choices=["auto", "cgroupfs", "systemd"], default="auto",
                   help="kubelet's cgroup driver (default: whichever layout exists)")
    p.add_argument("--cgroup-root", default="/", help="kubelet's --cgroup-root (default /)")
    p.add_argument("--cgroup-base", type=Path,
                   help="the cgroup v2 mount (default: found in /proc/self/mountinfo)")
    p.add_argument("--backoff-max", type=float, default=300.0,
                   help="longest wait between retries of a failing load (default 300 s)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--once", action="store_true", help="run one pass and exit")
    p.add_argument("--unload-all", action="store_true",
                   help="unload every policy under the prefix and exit (uninstalling)")  # fmt: skip
