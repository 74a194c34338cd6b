"""`sockpol status` as readable tables: all loaded policies, or one policy rule by rule.

Plain aligned text (no terminal library): the output is read in terminals, pasted into tickets
and grepped, and must look the same everywhere. Scripts use `--json` instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from sockpol.metadata import describe_tls
from sockpol.runtime.counters import Count, PolicyCounters
from sockpol.runtime.loader import PolicyStatus


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: set[int]) -> str:
    """Columns padded to their widest cell; `right` are the indexes of right-aligned columns.
    The last column is never padded (it holds free text such as a rule)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = []
        for i, cell in enumerate(row):
            if i == len(row) - 1 and i not in right:
                parts.append(cell)
            elif i in right:
                parts.append(cell.rjust(widths[i]))
            else:
                parts.append(cell.ljust(widths[i]))
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def ports_text(ports: Sequence[Sequence[int]]) -> str:
    return ", ".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in ports) or "?"


def tls_cell(s: PolicyStatus) -> str:
    """The TLS column: '-' (plaintext), 'tls' (user-space TLS refused), 'tls+userspace'
    (user-space TLS passes unjudged), '?' (no metadata)."""
    if s.metadata is None:
        return "?"
    return {None: "-", "deny": "tls"}.get(s.metadata.tls, "tls+userspace")


def _version(s: PolicyStatus) -> str:
    return f"{s.serial}" if s.serial else "- (loaded by a sockpol without versions)"


def tls_support_line(ok: bool, reason: str) -> str:
    """Whether policies with a `tls` statement can be loaded on this kernel, in one line."""
    if ok:
        return "tls policies: can be loaded on this kernel (kTLS on sockets in a sockhash works)"
    return f"tls policies: cannot be loaded on this kernel: {reason} (see sockpol doctor)"


def _when(s: PolicyStatus) -> str:
    """When the version in force was put in force (its first load, or its reload)."""
    return s.since.strftime("%Y-%m-%d %H:%M:%S") if s.since else "?"


def _source_sha(s: PolicyStatus) -> str:
    return (s.metadata.source_sha256[:12] if s.metadata else "") or s.object_sha256[:12] or "-"


def policies(
    statuses: Sequence[PolicyStatus],
    counts: dict[str, PolicyCounters],
    footer: Sequence[str] = (),
) -> str:
    """One line per loaded policy; then problems, then `footer` lines."""
    rows = []
    for s in statuses:
        c = counts.get(s.name)
        decided = sum((x.requests for x in c.rules), c.default.requests) if c else None
        refused = sum(x.requests for x in c.refused.values()) if c else None
        rows.append(
            [
                s.name,
                s.mode or "-",
                ports_text(s.ports),
                tls_cell(s),
                s.cgroup or "-",
                _when(s),
                _source_sha(s),
                len(s.metadata.rules) if s.metadata else "?",
                "?" if s.sockets is None else s.sockets,
                "-" if decided is None else decided,
                "-" if refused is None else refused,
            ]
        )
    text = table(
        ["NAME", "MODE", "PORTS", "TLS", "CGROUP", "SINCE (UTC)", "SOURCE", "RULES", "SOCKETS",
         "REQUESTS", "REFUSED"],
        rows,
        right={7, 8, 9, 10},
    )  # fmt: skip
    problems = [f"{s.name}: {s.problem}" for s in statuses if s.problem]
    return "\n".join([text, *problems, *footer])


def _side(side: str) -> str:
    if side == "ingress":
        return "ingress (requests the cgroup's servers receive on these ports; sk_skb)"
    return "egress (requests the cgroup sends to these ports; sk_msg)"


def policy(s: PolicyStatus, c: PolicyCounters | None) -> str:
    """One policy: where it is, then each rule with its source line and counts."""
    meta = s.metadata
    lines = [
        f"policy {s.name}: mode {s.mode or '?'}, default {meta.default if meta else '?'}, "
        f"port {ports_text(s.ports)}",
        f"  side     {_side(meta.side) if meta else '?'}",
        f"  tls      {describe_tls(meta.tls) if meta else '?'}",
        f"  backend  {s.backend}"
        + (" (BPF LSM on socket_sendmsg)" if s.backend == "lsm" else " (sk_msg on a sockhash)"),
        f"  cgroup   {s.cgroup or '- (no cgroup; sockets added by hand)'}",
        f"  version  {_version(s)}",
        f"  source   {meta.source_path if meta else '?'} "
        f"(sha256 {meta.source_sha256[:16] if meta else '?'}; "
        f"object {s.object_sha256[:16] or '?'})",
        f"  in force since {_when(s)} UTC"
        + (
            f" (reload {s.reloads}; first loaded {s.loaded_at.strftime('%Y-%m-%d %H:%M:%S')} UTC)"
            if s.reloads and s.loaded_at
            else ""
        )
        + "; the counts below are this version's",
        f"  programs {', '.join(f'{k} {v}' for k, v in s.program_ids.items()) or '-'}; "
        f"sockets governed {'?' if s.sockets is None else s.sockets}",
    ]
    if s.problem:
        lines.append(f"  problem  {s.problem}")
    if meta is None:
        return "\n".join(lines)
    if c is None:
        lines.append("  (no counters: loaded by a sockpol without them)")
    rows = []
    for i, rule in enumerate(meta.rules):
        count = c.rules[i] if c is not None and i < len(c.rules) else Count()
        rows.append([rule.index, rule.line, count.requests, count.bytes, rule.text])
    default = c.default if c is not None else Count()
    rows.append(["-", "-", default.requests, default.bytes, f"default {meta.default}"])
    lines += ["", _indent(table(["RULE", "LINE", "REQUESTS", "BYTES", "TEXT"], rows, {0, 1, 2, 3}))]
    if c is None:
        return "\n".join(lines)
    for title, counts in (
        ("refused", c.refused),
        ("would be refused (passed by dry-run or an audit rule)", c.would_refuse),
    ):
        if counts:
            rows = [[reason, n.requests, n.bytes] for reason, n in sorted(counts.items())]
            lines += [
                "",
                f"  {title}:",
                _indent(table(["REASON", "REQUESTS", "BYTES"], rows, {1, 2}), 4),
            ]
    lines += [
        "",
        f"  events lost (ring buffer full): {c.lost_events}; "
        f"unjudged dry-run sends: {c.unjudged.requests} ({c.unjudged.bytes} bytes)",
        f"  refusals answered with a response: {c.answered.requests}, dropped: "
        f"{max(0, sum(x.requests for x in c.refused.values()) - c.answered.requests)}; "
        f"bytes discarded after answers: {c.answered.bytes}",
    ]
    return "\n".join(lines)


def _indent(text: str, n: int = 2) -> str:
    return "\n".join(" " * n + line if line else line for line in text.splitlines())
