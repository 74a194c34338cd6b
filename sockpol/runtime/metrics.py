"""Prometheus metrics of every loaded policy, read from the pins at each scrape.

Uses the official client library (`prometheus-client`): it owns the text exposition format
(escaping, `# HELP`/`# TYPE`, `_total` suffixes, content negotiation, OpenMetrics), which is
easy to get subtly wrong by hand, and its HTTP server. sockpol only supplies a custom collector,
so a scrape reads the kernel's counters at that moment and nothing is cached in between: the
exporter can start, stop and restart at any time without losing counts, which live in the
kernel.

Metrics (label `policy` on all):
    sockpol_policy_info{cgroup,object_sha256,default,mode,tls}     1 (tls: none, deny, allow)
    sockpol_policy_dry_run                                         1 in dry-run mode, else 0
    sockpol_policy_loaded_timestamp_seconds                        program load (or replacement)
    sockpol_policy_reloaded_timestamp_seconds                      last hot reload (absent: none)
    sockpol_policy_reloads_total                                   hot reloads since the load
    sockpol_policy_sockets                                         connections governed now
    sockpol_rule_requests_total{rule,line,action}                  requests each rule decided
    sockpol_rule_bytes_total{rule,line,action}
    sockpol_default_requests_total{action}, sockpol_default_bytes_total{action}
    sockpol_refused_requests_total{reason}, sockpol_refused_bytes_total{reason}
    sockpol_would_refuse_requests_total{reason}, ..._bytes_total    passed by dry-run or audit
    sockpol_unjudged_sends_total, sockpol_unjudged_bytes_total     dry-run, framing lost
    sockpol_answered_requests_total, sockpol_answered_bytes_total   refusals answered (`answer`)
    sockpol_events_lost_total                                      ring buffer was full
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from sockpol.runtime.counters import TelemetryError, read_counters
from sockpol.runtime.libbpf import BpfError
from sockpol.runtime.loader import PolicyStatus, status

log = logging.getLogger("sockpol.metrics")


class PolicyCollector(Collector):
    """Collects every loaded policy on each scrape (a policy that cannot be read is skipped and
    counted in sockpol_scrape_errors_total)."""

    def __init__(self) -> None:
        self.errors = 0
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        with self._lock:  # the HTTP server is threaded; reads are cheap, keep them ordered
            yield from self._collect()

    def _collect(self) -> Iterator[Metric]:
        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["policy", *labels])

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=["policy", *labels])

        info = gauge(
            "sockpol_policy_info",
            "A loaded policy (value 1) and what it is.",
            (
                "cgroup",
                "object_sha256",
                "default",
                "mode",
                "tls",
                "version",
                "source_sha256",
                "side",
            ),
        )
        dry_run = gauge("sockpol_policy_dry_run", "1 when the policy records instead of refusing.")
        loaded = gauge(
            "sockpol_policy_loaded_timestamp_seconds", "When the policy's programs were loaded."
        )
        reloaded = gauge(
            "sockpol_policy_reloaded_timestamp_seconds",
            "When another version was last put in force (sockpol reload).",
        )
        reloads = counter("sockpol_policy_reloads", "Reloads since the first load of its name.")
        sockets = gauge("sockpol_policy_sockets", "Connections the policy governs now.")
        rule_labels = ("rule", "line", "action")
        rule_req = counter("sockpol_rule_requests", "Requests the rule decided.", rule_labels)
        rule_bytes = counter(
            "sockpol_rule_bytes", "Bytes of requests the rule decided.", rule_labels
        )
        default_req = counter(
            "sockpol_default_requests",
            "Requests no rule matched (the default decided).",
            ("action",),
        )
        default_bytes = counter(
            "sockpol_default_bytes", "Bytes of requests the default decided.", ("action",)
        )
        refused_req = counter(
            "sockpol_refused_requests", "Requests refused, by reason.", ("reason",)
        )
        refused_bytes = counter("sockpol_refused_bytes", "Bytes refused, by reason.", ("reason",))
        would_req = counter(
            "sockpol_would_refuse_requests",
            "Requests passed only because of dry-run mode or an audit rule, by the reason they "
            "would have been refused for.",
            ("reason",),
        )
        would_bytes = counter("sockpol_would_refuse_bytes", "Bytes of those requests.", ("reason",))
        unjudged_req = counter(
            "sockpol_unjudged_sends",
            "Sends passed unjudged on dry-run connections whose HTTP framing was lost.",
        )
        unjudged_bytes = counter("sockpol_unjudged_bytes", "Bytes of those sends.")
        lost = counter("sockpol_events_lost", "Events dropped because the ring buffer was full.")
        answered_req = counter(
            "sockpol_answered_requests",
            "Refusals answered with a response (answer STATUS); the other refusals were dropped.",
        )
        answered_bytes = counter(
            "sockpol_answered_bytes",
            "Bytes discarded on answered connections (the refused sends and all sends after).",
        )
        errors = CounterMetricFamily(
            "sockpol_scrape_errors", "Policies that could not be read during scrapes."
        )

        families = {
            "info": info, "dry_run": dry_run, "loaded": loaded, "reloaded": reloaded,
            "reloads": reloads, "sockets": sockets, "rule_req": rule_req,
            "rule_bytes": rule_bytes, "default_req": default_req, "default_bytes": default_bytes,
            "refused_req": refused_req, "refused_bytes": refused_bytes, "would_req": would_req,
            "would_bytes": would_bytes, "unjudged_req": unjudged_req,
            "unjudged_bytes": unjudged_bytes, "lost": lost, "answered_req": answered_req,
            "answered_bytes": answered_bytes,
        }  # fmt: skip
        for s in status():
            try:
                self._policy(s, families)
            except (TelemetryError, BpfError, OSError) as e:
                self.errors += 1
                log.warning("metrics: policy %s: %s", s.name, e)
        errors.add_metric([], self.errors)
        yield from families.values()
        yield errors

    @staticmethod
    def _policy(s: PolicyStatus, m: dict[str, GaugeMetricFamily | CounterMetricFamily]) -> None:
        meta = s.metadata
        if meta is None:
            raise TelemetryError(s.problem or "no metadata")
        p = s.name
        m["info"].add_metric(
            [
                p,
                s.cgroup or "",
                s.object_sha256,
                meta.default,
                s.mode or "enforce",
                meta.tls or "none",
                str(s.serial),
                meta.source_sha256,
                meta.side,
            ],
            1,  # fmt: skip
        )
        m["dry_run"].add_metric([p], 1 if s.mode == "dry-run" else 0)
        if s.loaded_at is not None:
            m["loaded"].add_metric([p], s.loaded_at.timestamp())
        if s.reloaded_at is not None:
            m["reloaded"].add_metric([p], s.reloaded_at.timestamp())
        m["reloads"].add_metric([p], s.reloads)
        if s.sockets is not None:
            m["sockets"].add_metric([p], s.sockets)
        c = read_counters(s.pin_dir, meta)
        for rule, count in zip(meta.rules, c.rules, strict=True):
            labels = [p, str(rule.index), str(rule.line), rule.action]
            m["rule_req"].add_metric(labels, count.requests)
            m["rule_bytes"].add_metric(labels, count.bytes)
        m["default_req"].add_metric([p, meta.default], c.default.requests)
        m["default_bytes"].add_metric([p, meta.default], c.default.bytes)
        for reason, count in c.refused.items():
            m["refused_req"].add_metric([p, reason], count.requests)
            m["refused_bytes"].add_metric([p, reason], count.bytes)
        for reason, count in c.would_refuse.items():
            m["would_req"].add_metric([p, reason], count.requests)
            m["would_bytes"].add_metric([p, reason], count.bytes)
        m["unjudged_req"].add_metric([p], c.unjudged.requests)
        m["unjudged_bytes"].add_metric([p], c.unjudged.bytes)
        m["lost"].add_metric([p], c.lost_events)
        m["answered_req"].add_metric([p], c.answered.requests)
        m["answered_bytes"].add_metric([p], c.answered.bytes)


def registry() -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(PolicyCollector())
    return reg


def serve(host: str, port: int) -> tuple[object, threading.Thread]:
    """Start the exporter's HTTP server in a thread; returns (server, thread)."""
    from prometheus_client import start_http_server

    return start_http_server(port, addr=host, registry=registry())


def parse_listen(text: str) -> tuple[str, int]:
    """ADDR:PORT, [v6]:PORT or :PORT (all addresses)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected ADDR:PORT, got {text!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)
