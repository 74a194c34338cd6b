"""The reference interpreter: what a policy does to a stream of HTTP/1.x requests, from the AST.

This is the oracle that the compiled program is checked against (tests/kernel/test_differential.py),
and what `sockpol test` and `sockpol explain` run. It is written from docs/language.md, not from the
code generator: it reads the request head with a plain hand-written parser (which accepts a path
only in its canonical spelling, so the path rules match is the path as sent), and tries the rules
one by one. It never looks at the automaton or the tables; agreeing with them is what the tests
check.

Three layers, each its own module:

* `head.py`, `read_head(data)`: one request head, a `Head`, a `Refusal` (the slugs of
  contract.Reason), or None when `data` ends first.
* this module, `judge(policy, message)`: one run of the kernel program on one message: the rules
  tried in order, allow or refuse the request at its start, and how many bytes the verdict
  covers (head + Content-Length body), or that the head is incomplete and must be held (corked)
  until more arrives; `evaluate` for one request.
* `stream.py`: the kernel's send path (tcp_bpf) around the runs, for a sequence of `send()`s
  (cork, apply_bytes, a verdict that outlives a message, refusal ending the connection);
  `Connection` is that model with this module judging, so it predicts what the server receives
  and what each send returns. The tables' mirror (codegen/simulate.py) uses the same model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache

from sockpol.contract import ANSWERED_REASONS, BEFORE_RULES, Reason, head_limit
from sockpol.dsl.ast import Action, HeaderCondition, HostCondition, Mode, Policy, Rule
from sockpol.dsl.pathmatch import to_regex
from sockpol.model import tls
from sockpol.model.head import (  # noqa: F401 -- the first layer, re-exported for its users
    ChunkLine,
    Head,
    Header,
    Refusal,
    checked_path,
    read_chunk,
    read_head,
    show,
)
from sockpol.model.stream import Judged, Send, Stream

# Refusal reasons before any rule, by slug (contract.Reason: BAD_METHOD -> "bad-method").
REFUSALS = tuple(r.slug for r in BEFORE_RULES)
ALLOWED, DENY_RULE, DENY_DEFAULT = "none", "rule", "default"
# A head that never completes is not refused: the kernel holds (corks) its bytes until the rest
# arrives, so nothing reaches the server; only at max-head bytes is it refused (head-too-large).
HELD = "held"
# Events the program records (sockpol.telemetry.EventKind, lower-case): a refusal, a request that
# passed only because the policy runs in dry-run mode or an audit rule matched it, and a request
# that a rule marked `log` passed.
REFUSED, DRY_RUN, AUDIT, LOGGED = "refused", "dry-run", "audit", "logged"


# -- results --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleCheck:
    """Whether one rule matched a head, and if not, the first part that did not."""

    rule: Rule
    matched: bool
    why: str


@dataclass(frozen=True)
class Verdict:
    """The decision on one request: allowed, denied by a rule or the default, or refused.

    `allow` says whether its bytes pass; `reason` is ALLOWED for a plain allow, else why it is (or,
    under an audit rule or in dry-run mode, would be) refused: DENY_RULE, DENY_DEFAULT or a refusal.
    """

    allow: bool
    reason: str  # ALLOWED, DENY_RULE, DENY_DEFAULT, HELD or one of REFUSALS
    rule: Rule | None = None  # the deciding rule
    head: Head | None = None
    refusal: Refusal | None = None
    checks: tuple[RuleCheck, ...] = ()  # the rules tried, in order, up to the deciding one
    event: str | None = None  # REFUSED, DRY_RUN, AUDIT, LOGGED, or None: nothing recorded
    # A refusal answered: the status of the response the client reads (0: dropped, or passed).
    answer: int = 0

    @property
    def would_refuse(self) -> bool:
        """Passed, but only because of an audit rule or dry-run mode."""
        return self.allow and self.reason != ALLOWED

    @property
    def decided_by(self) -> str:
        if self.refusal is not None:
            return f"refusal {self.reason}"
        if self.rule is not None:
            return f"rule {self.rule.index} (line {self.rule.span.line})"
        return "default"


@dataclass(frozen=True)
class Run:
    """One run of the kernel program on one message: the bytes from where the last verdict ended,
    a request head or (in a chunked body) a chunk-size line."""

    allow: bool
    # Bytes of this message the verdict covers (head + body, size line + data, up to the end of
    # the message); 0 = the whole message.
    covers: int
    cork: int = 0  # > 0: hold the message until it is this long, then run again
    resume: str = "request"  # where the next run starts: see RESUME
    verdict: Verdict | None = None  # set when the run judged a head or refused something
    # Bytes of the body (or chunk data) still to come in later messages, which the next runs
    # pass without a look. The program counts them itself rather than leaving them to
    # apply_bytes: under kTLS, apply_bytes ends with the TLS record.
    left: int = 0
    tls: int = 0  # the connection's TLS phase after this run: tls.CONN_* flags
    # The message is consumed without a byte leaving: the refusal was answered (the client
    # reads the response) or an earlier one was (the connection discards what it sends).
    discard: bool = False


def _covering(allow: bool, total: int, message: bytes, **kw) -> Run:
    """A verdict on `total` bytes from the start of `message`, which may end sooner."""
    covers = min(total, len(message))
    return Run(allow, covers, left=total - covers, **kw)


# Where a run starts: at a request head, at a chunk-size line, at the CRLF ending chunk data, or
# nowhere: a dry-run pass of a refused head left the connection without framing ("unjudged"),
# or `tls userspace allow` let a connection's user-space TLS pass ("tls-pass").
# A refusal that was answered leaves the connection "answered": every later byte is discarded.
RESUME = ("request", "chunk-size", "chunk-end", "unjudged", "tls-pass", "answered")
ANSWERED_SLUGS = frozenset(Reason(r).slug for r in ANSWERED_REASONS)


# -- rules ----------------------------------------------------------------------------------------


@cache
def _path_regex(pattern: str) -> re.Pattern[str]:
    return re.compile(to_regex(pattern))


@cache
def _host_regex(pattern: str) -> re.Pattern[bytes]:
    if pattern.startswith("*."):
        core = rb"[A-Za-z0-9-]+" + re.escape(pattern[1:].encode())
    else:
        core = re.escape(pattern.encode())
    # Any ':port' (digits, maybe none) is ignored; case never matters. (A trailing dot is
    # refused with the head: servers disagree on whether it names the same host.)
    return re.compile(core + rb"(?::[0-9]*)?", re.IGNORECASE)


def host_matches(pattern: str, host: bytes | None) -> bool:
    return host is not None and _host_regex(pattern).fullmatch(host) is not None


def check_rule(rule: Rule, head: Head) -> RuleCheck:
    methods = rule.methods.methods
    if methods is not None and head.method not in methods:
        return RuleCheck(rule, False, f"method {head.method} is not {','.join(methods)}")
    if not _path_regex(rule.path.text).match(head.path):
        return RuleCheck(rule, False, f"path {head.path} does not match {rule.path.text}")
    for cond in rule.conditions:
        if isinstance(cond, HostCondition):
            if not host_matches(cond.pattern, head.host):
                shown = "no Host header" if head.host is None else f"Host is {show(head.host)}"
                return RuleCheck(rule, False, f'{shown}, not "{cond.pattern}"')
        else:
            failure = _header_failure(cond, head)
            if failure:
                return RuleCheck(rule, False, failure)
    return RuleCheck(rule, True, "method, path and every condition match")


def _header_failure(cond: HeaderCondition, head: Head) -> str:
    values = head.values(cond.name)
    if not values:
        return f"no {cond.name} header"
    if cond.value is not None and cond.value.encode("latin-1") not in values:
        shown = ", ".join(f'"{show(v)}"' for v in values)
        return f'{cond.name} is {shown}, not "{cond.value}"'
    return ""


def decide(policy: Policy, head: Head, mode: Mode | None = None) -> Verdict:
    """First match: the first rule whose method, path and conditions hold, else the default.
    An audit rule decides like a deny rule but passes the request; in dry-run mode (`mode`, else
    the policy's own) a deny passes too. Both are recorded as would-be refusals."""
    dry_run = (mode or policy.mode) is Mode.DRY_RUN
    checks: list[RuleCheck] = []
    rule = None
    for candidate in policy.rules:
        checks.append(check_rule(candidate, head))
        if checks[-1].matched:
            rule = candidate
            break
    action = rule.action if rule is not None else policy.default
    if action is Action.ALLOW:
        event = LOGGED if rule is not None and rule.log else None
        return Verdict(True, ALLOWED, rule, head, None, tuple(checks), event)
    reason = DENY_RULE if rule is not None else DENY_DEFAULT
    if action is Action.AUDIT:
        return Verdict(True, reason, rule, head, None, tuple(checks), AUDIT)
    if dry_run:
        return Verdict(True, reason, rule, head, None, tuple(checks), DRY_RUN)
    return Verdict(False, reason, rule, head, None, tuple(checks), REFUSED)


def judge(
    policy: Policy,
    message: bytes,
    resume: str = "request",
    mode: Mode | None = None,
    lost: str = "",
    left: int = 0,
    phase: int = 0,
    answers: bool = True,
) -> Run:
    """One run of the kernel program on `message`, which starts where `resume` says. `mode` is
    the mode in force (default: the policy's); `lost` is the refusal that left an "unjudged"
    connection without framing; `left` and `phase` are `Run.left` and `Run.tls` of the run
    before (a body still to come; where the connection is in its TLS handshake, tls.py).
    `answers` False: the kernel cannot answer (`sockpol doctor`), every refusal is dropped."""
    dry_run = (mode or policy.mode) is Mode.DRY_RUN
    if not message:
        return Run(True, 0, resume=resume, left=left, tls=phase)
    if resume == "answered":  # after an answered refusal: discarded, whatever it is
        return Run(False, 0, resume=resume, tls=phase, discard=True)
    if left:
        return _covering(True, left, message, resume=resume, tls=phase)
    if resume == "tls-pass":  # counted as unjudged, not recorded as events
        return Run(True, 0, resume=resume, tls=phase)
    window = message[: head_limit(policy.max_head)]
    tls_mode = tls.policy_mode(policy)
    if resume == "request" and tls_mode and tls.is_alert_plaintext(window, len(message)):
        # Never a record, so past the handshake from here (what the kernel's walk concludes
        # before its scanner refuses the bytes as a method and its alert check passes them).
        return Run(True, 0, resume=resume, tls=phase | tls.CONN_HTTP)
    if resume == "request" and not phase & tls.CONN_HTTP:
        step = tls.step(window, len(message), phase, tls_mode)
        if step.action != tls.StepKind.HTTP:
            return _tls_run(step, message, dry_run, phase)
        phase |= tls.CONN_HTTP
    run = replace(_judge_http(policy, message, window, resume, mode, dry_run, lost), tls=phase)
    if answers and resume == "request" and not phase & tls.CONN_TLS_FLAGS:
        run = answered(policy, run)
    return run


def answered(policy: Policy, run: Run) -> Run:
    """A refused request head answered as the policy (or its deny rule) says: the message is
    replaced by the response, and the connection discards what follows. Not answered: a refusal
    in a body (part of the request has reached the server), TLS, or on a kTLS connection (the
    response would be encrypted by the client's own TLS)."""
    v = run.verdict
    if run.allow or v is None or v.reason not in ANSWERED_SLUGS:  # "rule", "default" included
        return run
    status = policy.rule_answer(v.rule)
    if not status:
        return run
    answer = replace(v, answer=status)
    return replace(run, covers=0, resume="answered", left=0, discard=True, verdict=answer)


def _tls_run(step: tls.Step, message: bytes, dry_run: bool, phase: int) -> Run:
    """A run that met a TLS record instead of HTTP (tls.step)."""
    if step.action == tls.StepKind.CORK:
        return Run(True, 0, cork=step.covered, tls=phase)
    if step.action == tls.StepKind.REFUSE:
        refusal = Refusal(step.reason, 0, tls.DETAIL[step.reason])
        if dry_run:
            return Run(True, 0, resume="unjudged", verdict=_refused(refusal, True), tls=phase)
        return Run(False, 0, verdict=_refused(refusal, False), tls=phase)
    if step.action == tls.StepKind.USERSPACE_ALLOW:
        return Run(True, 0, resume="tls-pass", tls=step.flags)
    return _covering(True, step.covered, message, tls=step.flags)


def _judge_http(
    policy: Policy,
    message: bytes,
    window: bytes,  # the message's first max-head bytes: what the program pulls
    resume: str,
    mode: Mode | None,
    dry_run: bool,
    lost: str,
) -> Run:
    if resume == "unjudged":
        # Where requests start is unknown: pass everything while in dry-run, else refuse.
        refusal = Refusal(lost, 0, "the connection lost its framing in dry-run mode")
        if dry_run:  # passed unjudged: recorded in a counter, not as an event
            return Run(True, 0, resume=resume, verdict=Verdict(True, lost, refusal=refusal))
        return Run(False, 0, resume=resume, verdict=_refused(refusal, False))
    found: Head | ChunkLine | Refusal | None
    if resume == "request":
        found = read_head(window)
        if isinstance(found, Head):
            verdict = decide(policy, found, mode)
            if found.chunked:
                return Run(verdict.allow, found.length, resume="chunk-size", verdict=verdict)
            total = found.length + found.content_length
            return _covering(verdict.allow, total, message, verdict=verdict)
    else:
        found = read_chunk(window, after_data=resume == "chunk-end")
        if isinstance(found, ChunkLine):
            if found.last:
                return Run(True, found.length, resume="request")
            return _covering(True, found.length + found.size, message, resume="chunk-end")
    if isinstance(found, Refusal):
        refusal = found
    elif len(message) >= (max_head := head_limit(policy.max_head)):  # as `judge` cut it
        what = "head" if resume == "request" else "chunk-size line"
        refusal = Refusal("head-too-large", max_head, f"no end of {what} within {max_head} bytes")
    else:
        return Run(True, 0, cork=len(message) + 1, resume=resume)
    if dry_run:  # passes, and the rest of the connection with it: its framing is lost
        return Run(True, 0, resume="unjudged", verdict=_refused(refusal, True))
    return Run(False, 0, resume=resume, verdict=_refused(refusal, False))


def _refused(refusal: Refusal, dry_run: bool) -> Verdict:
    return Verdict(dry_run, refusal.reason, refusal=refusal, event=DRY_RUN if dry_run else REFUSED)


def evaluate(policy: Policy, request: bytes, mode: Mode | None = None) -> Verdict:
    """The verdict on the request at the start of `request`, sent whole: the head's, unless its
    chunked body is then refused; HELD when the head never completes (the kernel holds it)."""
    conn = Connection(policy, mode=mode)
    conn.send(request)
    if not conn.verdicts:
        return Verdict(False, HELD)
    first = conn.verdicts[0]
    later = next((v for v in conn.verdicts[1:] if v.reason == "bad-chunk"), None)
    if first.allow and later is not None and first.head is not None and first.head.chunked:
        return Verdict(
            later.allow, later.reason, first.rule, first.head, later.refusal, first.checks,
            later.event,
        )  # fmt: skip
    return first


# -- a connection: the kernel's send path (model/stream.py) with this interpreter judging ---------


@dataclass(frozen=True)
class ConnState:
    """What the program keeps per connection between runs, as this interpreter names it."""

    resume: str = "request"  # where the next run starts: see RESUME
    left: int = 0  # body bytes still to come (Run.left)
    tls: int = 0  # where the connection is in its TLS handshake (Run.tls)
    lost: str = ""  # the refusal that left the connection "unjudged"


class Connection(Stream[ConnState, Verdict]):
    """A governed TCP connection, send by send, judged by this interpreter (stream.py models
    the kernel's send path around it). `policy` None: the port is not governed, all passes.
    `mode`: the mode in force (None: the policy's); it may change between sends. `observe` is
    called with (message, resume, run) after every run: lets tests hold another model to it."""

    def __init__(
        self,
        policy: Policy | None,
        mode: Mode | None = None,
        observe: Callable[[bytes, str, Run], None] | None = None,
    ) -> None:
        super().__init__(ConnState())
        self.policy = policy
        self.mode = mode
        self.observe = observe
        self.answers = True  # False: the kernel cannot answer, refusals are dropped

    @property
    def verdicts(self) -> list[Verdict]:
        """Heads judged and refusals, in order."""
        return self.records

    def governed(self) -> bool:
        return self.policy is not None

    def judge_run(self, message: bytes) -> Judged[ConnState, Verdict]:
        assert self.policy is not None
        st = self.state
        run = judge(
            self.policy, message, st.resume, self.mode, st.lost, st.left, st.tls, self.answers
        )
        if self.observe is not None:
            self.observe(message, st.resume, run)
        if run.cork:
            return Judged(run.allow, run.covers, run.cork, None, run.verdict)
        lost, resume = st.lost, st.resume
        if run.discard:
            state = ConnState("answered", 0, run.tls, lost)
            return Judged(run.allow, 0, 0, state, run.verdict, discard=True)
        if run.allow:
            if run.resume == "unjudged" and st.resume != "unjudged":
                assert run.verdict is not None
                lost = run.verdict.reason
            resume = run.resume
        state = ConnState(resume, run.left, run.tls, lost)
        return Judged(run.allow, run.covers, 0, state, run.verdict)


def simulate_sends(policy: Policy | None, sends: list[bytes]) -> Connection:
    conn = Connection(policy)
    for data in sends:
        conn.send(data)
    return conn


__all__ = [
    "ALLOWED",
    "AUDIT",
    "DRY_RUN",
    "LOGGED",
    "REFUSED",
    "DENY_DEFAULT",
    "DENY_RULE",
    "REFUSALS",
    "Connection",
    "Head",
    "Refusal",
    "RuleCheck",
    "ChunkLine",
    "Run",
    "Send",
    "Verdict",
    "check_rule",
    "checked_path",
    "decide",
    "evaluate",
    "judge",
    "read_chunk",
    "read_head",
    "simulate_sends",
]
