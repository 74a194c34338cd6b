"""The agent's HTTP endpoints: `/metrics` (Prometheus) and `/healthz`.

`/metrics` exposes every loaded policy on the node through the same collector as
`sockpol metrics` (runtime/metrics.py), plus the agent's own series (AgentCollector): what it
did, when it last completed a pass, which policies have errors. Content negotiation (text or
OpenMetrics) is prometheus-client's.

`/healthz` answers 200 while passes complete (the last one within `stale_after` seconds), 503
otherwise, with a one-line JSON body saying why: a kubelet liveness probe then restarts an agent
that is stuck, and since policies stay loaded without it, a restart costs no enforcement.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry


class AgentStats:
    """What the agent has done, for its metrics and health (updated after each pass)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.actions: dict[tuple[str, str], int] = {}
        self.passes = 0
        self.last_pass_at: float | None = None  # wall clock
        self.last_pass_monotonic: float | None = None
        self.last_pass_seconds = 0.0
        self.desired = 0
        self.owned = 0
        self.spec_errors: dict[str, int] = {}  # policy key -> errors in the last pass
        self.source_problems = 0
        self.complete = False  # the last pass saw a complete desired state
        self.last_error: str | None = None  # a pass that raised
        self.loads: dict[str, tuple[str, str, str, str]] = {}  # name -> key, ns, pod, cgroup

    def record(self, report) -> None:
        with self.lock:
            for a in report.actions:
                k = (a.action, "ok" if a.ok else "error")
                self.actions[k] = self.actions.get(k, 0) + 1
            self.passes += 1
            self.last_pass_at = time.time()
            self.last_pass_monotonic = time.monotonic()
            self.last_pass_seconds = report.seconds
            self.desired, self.owned = report.desired, report.owned
            self.spec_errors = {k: len(s.errors) for k, s in report.specs.items()}
            self.source_problems = len(report.problems)
            self.complete = report.complete
            self.last_error = None
            self.loads = {
                name: (
                    d.spec.key,
                    d.pod.namespace if d.pod else "",
                    d.pod.name if d.pod else "",
                    str(d.cgroup),
                )
                for name, d in report.loads.items()
            }


class AgentCollector(Collector):
    def __init__(self, stats: AgentStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        with s.lock:
            actions = CounterMetricFamily(
                "sockpol_agent_actions", "Actions the agent took, by kind and result.",
                labels=["action", "result"],
            )  # fmt: skip
            for (action, result), n in sorted(s.actions.items()):
                actions.add_metric([action, result], n)
            yield actions
            yield CounterMetricFamily("sockpol_agent_passes", "Reconcile passes.", value=s.passes)
            if s.last_pass_at is not None:
                yield GaugeMetricFamily(
                    "sockpol_agent_last_pass_timestamp_seconds",
                    "When the last reconcile pass ended.", value=s.last_pass_at,
                )  # fmt: skip
            yield GaugeMetricFamily(
                "sockpol_agent_last_pass_seconds", "How long the last pass took.",
                value=s.last_pass_seconds,
            )  # fmt: skip
            yield GaugeMetricFamily(
                "sockpol_agent_desired_loads", "Loads the desired state asks for on this node.",
                value=s.desired,
            )  # fmt: skip
            yield GaugeMetricFamily(
                "sockpol_agent_owned_loads", "Loads under the agent's prefix, before the pass.",
                value=s.owned,
            )  # fmt: skip
            errors = GaugeMetricFamily(
                "sockpol_agent_policy_errors",
                "Errors of each desired policy in the last pass (0: all its targets in force).",
                labels=["key"],
            )
            for key, n in sorted(s.spec_errors.items()):
                errors.add_metric([key], n)
            yield errors
            info = GaugeMetricFamily(
                "sockpol_agent_load_info",
                "A load the agent keeps (1): which policy (key) and pod it is for; join on "
                "`policy` with the sockpol_* series of the load.",
                labels=["policy", "key", "namespace", "pod", "cgroup"],
            )
            for name, (key, ns, pod, cgroup) in sorted(s.loads.items()):
                info.add_metric([name, key, ns, pod, cgroup], 1)
            yield info
            yield GaugeMetricFamily(
                "sockpol_agent_source_problems", "Desired-state objects that could not be read.",
                value=s.source_problems,
            )  # fmt: skip
            yield GaugeMetricFamily(
                "sockpol_agent_sources_synced",
                "1 when the last pass saw every source's complete list (0: e.g. the Kubernetes "
                "API has not answered yet; nothing is unloaded meanwhile).",
                value=int(s.complete),
            )


def registry(stats: AgentStats) -> CollectorRegistry:
    from sockpol.runtime.metrics import PolicyCollector

    reg = CollectorRegistry(auto_describe=False)
    reg.register(PolicyCollector())
    reg.register(AgentCollector(stats))
    return reg


def serve(
    host: str, port: int, reg: CollectorRegistry, health: Callable[[], tuple[bool, str]]
) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept"))
                self._send(200, content_type, encoder(reg))
            elif path == "/healthz":
                ok, why = health()
                body = json.dumps({"ok": ok, "detail": why}).encode() + b"\n"
                self._send(200 if ok else 503, "application/json", body)
            else:
                self._send(404, "text/plain", b"not found: /metrics or /healthz\n")

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # scrapes and probes are not actions: no log line each

    # An IPv6 address ([::] on an IPv6-only cluster, where probes and scrapes reach the pod's
    # IPv6 address) needs an IPv6 socket; [::] also accepts IPv4 where the node allows it.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("AgentHTTPServer", (ThreadingHTTPServer,), {"address_family": family})
    server = server_class((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="agent-http", daemon=True).start()
    return server
