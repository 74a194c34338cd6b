"""The policy AST: what the parser builds and the checker validates.

Every node carries the `Span` it came from, so any later stage (checker, lint, codegen) can point at
the exact token. Nodes are frozen: stages hand them on, never patch them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from sockpol.diagnostics import CompileError, DiagnosticBag, Source, Span


class Action(Enum):
    ALLOW = "allow"
    DENY = "deny"
    AUDIT = "audit"  # a deny that only records: the request passes, an event says it matched


class Mode(Enum):
    """How a loaded policy treats what it would refuse. Only the starting value: `sockpol mode`
    switches a loaded policy without reloading it."""

    ENFORCE = "enforce"
    DRY_RUN = "dry-run"  # refuse nothing; record every refusal as an event instead


class Side(Enum):
    """Which requests a policy governs. `egress`: what processes of the cgroup send to the
    policy's ports (a sk_msg program on their connections). `ingress`: what they receive on
    connections they accept on the policy's (local) ports, whoever the client is (a sk_skb
    verdict program on the accepted sockets; docs/design.md, "The receiving side")."""

    EGRESS = "egress"
    INGRESS = "ingress"


# The answer of an ingress policy without an `answer` statement: the kernel cannot reset a
# connection from a sk_skb program, so a dropped request would leave the client waiting.
INGRESS_DEFAULT_ANSWER = 403


class TlsUserspace(Enum):
    """What a `tls` policy does with a connection whose TLS is done in user space: after the
    handshake the program sees only ciphertext, so no request on it can be judged."""

    DENY = "deny"  # refuse its first application data record (reason TLS_USERSPACE)
    ALLOW = "allow"  # pass the connection unjudged (counted and logged as such)


@dataclass(frozen=True)
class TlsSpec:
    """`tls [userspace deny|allow]`: the policy's ports carry TLS. Handshake records pass;
    requests are judged on the plaintext kTLS shows the program (docs/ktls.md)."""

    span: Span
    userspace: TlsUserspace = TlsUserspace.DENY


ANSWER_DROP = 0  # `answer drop`: the send fails (EACCES), the client reads nothing


@dataclass(frozen=True)
class Answer:
    """`answer drop` or `answer STATUS` (400..599): how the kernel answers a request the policy
    refuses; on a policy (its refusals, the default's and those before any rule) or on a deny
    rule (that rule's). contract.answer_response() is the response."""

    span: Span
    status: int  # ANSWER_DROP, or an HTTP status 400..599

    def __str__(self) -> str:
        return "drop" if self.status == ANSWER_DROP else str(self.status)


@dataclass(frozen=True)
class PortRange:
    span: Span
    low: int
    high: int  # inclusive; equal to `low` for a single port

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


@dataclass(frozen=True)
class MethodSet:
    span: Span
    methods: tuple[str, ...] | None  # None means any method (`*`)

    def __str__(self) -> str:
        return "*" if self.methods is None else ",".join(self.methods)


@dataclass(frozen=True)
class PathPattern:
    """A path glob as written: `/exact`, `/one/*/segment`, `/any/depth/**`; or a path regex,
    kept as written with its marker: `~"/v[0-9]+/.*"` (see dsl/regex.py)."""

    span: Span
    text: str


@dataclass(frozen=True)
class HostCondition:
    """`host "shop.example.com"` or `host "*.example.com"`; stored lower-case."""

    span: Span
    pattern: str

    def __str__(self) -> str:
        return f'host "{self.pattern}"'


@dataclass(frozen=True)
class HeaderCondition:
    """`header x-api-key` (present) or `header content-type = "application/json"` (exact value)."""

    span: Span
    name: str  # lower-case
    value: str | None

    def __str__(self) -> str:
        if self.value is None:
            return f"header {self.name}"
        return f'header {self.name} = "{self.value}"'


Condition = HostCondition | HeaderCondition


@dataclass(frozen=True)
class Rule:
    span: Span
    index: int  # 0-based position in its policy; the rule's identity in counters and metadata
    action: Action
    methods: MethodSet
    path: PathPattern
    conditions: tuple[Condition, ...]
    log: bool = False  # `log`: record an event whenever this rule decides a request
    answer: Answer | None = None  # `answer ...`: how this rule's refusals are answered

    def describe(self) -> str:
        text = f"{self.action.value} {self.methods} {self.path.text}"
        if self.conditions:
            text += " if " + " and ".join(str(c) for c in self.conditions)
        if self.log:
            text += " log"
        if self.answer is not None:
            text += f" answer {self.answer}"
        return text


DEFAULT_MAX_HEAD = 8192


@dataclass(frozen=True)
class Policy:
    span: Span
    name: str
    name_span: Span
    ports: tuple[PortRange, ...]
    default: Action
    default_span: Span
    max_head: int
    rules: tuple[Rule, ...]
    mode: Mode = Mode.ENFORCE
    mode_span: Span | None = None  # the `mode` statement, None when the policy has none
    tls: TlsSpec | None = None  # None: the ports carry plaintext HTTP
    answer: Answer | None = None  # None: refusals are dropped (`answer drop`); ingress: 403
    side: Side = Side.EGRESS
    side_span: Span | None = None  # the `side` statement, None when the policy has none

    def governs(self, port: int) -> bool:
        return any(r.low <= port <= r.high for r in self.ports)

    @property
    def answer_status(self) -> int:
        """How the policy answers its refusals: ANSWER_DROP or an HTTP status."""
        if self.answer is not None:
            return self.answer.status
        return INGRESS_DEFAULT_ANSWER if self.side is Side.INGRESS else ANSWER_DROP

    def rule_answer(self, rule: Rule | None) -> int:
        """How a refusal by `rule` (None: the default, or before any rule) is answered."""
        if rule is not None and rule.answer is not None:
            return rule.answer.status
        return self.answer_status

    def answers(self) -> tuple[int, ...]:
        """The distinct answers of the policy, its own first: the kernel's answer table."""
        out = [self.answer_status]
        for rule in self.rules:
            if rule.answer is not None and rule.answer.status not in out:
                out.append(rule.answer.status)
        return tuple(out)


@dataclass(frozen=True)
class PolicyFile:
    source: Source
    policies: tuple[Policy, ...]

    def policy(self, name: str) -> Policy | None:
        return next((p for p in self.policies if p.name == name), None)

    def choose(self, name: str | None, how: str = "--policy NAME") -> Policy:
        """The one policy a command acts on: the one named, or the file's only one. Every
        command picks its policy here, so the errors read the same everywhere (E902, E903);
        `how` says how this command names one."""
        names = ", ".join(p.name for p in self.policies) or "none"
        if name is not None:
            found = self.policy(name)
            if found is not None:
                return found
            message, code = f"no policy named '{name}' (the file defines: {names})", "E902"
        elif len(self.policies) == 1:
            return self.policies[0]
        else:
            message, code = f"the file defines {len(self.policies)} policies ({names})", "E903"
        bag = DiagnosticBag(self.source)
        bag.error(None, message, code=code, hint=f"choose one with {how}")
        raise CompileError(self.source, bag.items)
