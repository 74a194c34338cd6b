"""`sockpol lint`: exact findings about what a policy's rules can and cannot do.

Every finding is decided, not guessed. A rule is a product of independent parts: a method set, a
path language, host conditions and header conditions. The finite parts (methods, hosts, headers)
are split into *cells*: the classes of requests that no condition of the rules involved tells
apart (one witness host per pattern, every combination of the header lines the conditions ask
about). Within a cell only the paths remain, and those are regular languages: the rules' globs
(`codegen.lower.glob_regex`) intersected with the language of canonical paths (the only spelling
that reaches the rules: others are refused as ambiguous-path), decided with the automaton
library (`codegen.automaton`). So "rule 5 is shadowed" means: every request rule 5 matches is
matched by an earlier rule, with a counter-example when it is not.

Codes (docs/errors.md): L001 shadowed, L002 duplicate, L003 after-catch-all, L004 order-decisive
overlap, L005 scope overlap between policies, L006 unreachable, L007 empty policy, L008 default
never used, L009 a `tls` policy on plaintext port 80 only. A finding is silenced by a comment on
the line it points at:
`# sockpol: ignore[shadowed]`, `# sockpol: ignore[L001]`, or `# sockpol: ignore` for all.
"""

from __future__ import annotations

import itertools
import re
from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from functools import cache

from sockpol.automata import http
from sockpol.automata.automaton import (
    DFA,
    Re,
    alt,
    anyof,
    by_byte,
    byteset,
    determinize,
    lit,
    seq,
    star,
)
from sockpol.codegen.lower import glob_regex
from sockpol.contract import PATH_MAX, head_limit
from sockpol.diagnostics import Diagnostic, Severity, Source, Span
from sockpol.dsl.ast import HeaderCondition, HostCondition, Policy, PolicyFile, Rule
from sockpol.dsl.patterns import upper_escapes
from sockpol.model.interp import host_matches

CODES = {
    "L001": "shadowed",
    "L002": "duplicate",
    "L003": "after-catch-all",
    "L004": "order-decisive",
    "L005": "scope-overlap",
    "L006": "unreachable",
    "L007": "empty-policy",
    "L008": "default-unused",
    "L009": "tls-port",
}
PLAINTEXT_PORTS = frozenset({80})  # where clients speak plaintext HTTP, by convention
MAX_CELLS = 20_000  # beyond this many method x host x header cells a rule is not analyzed
OTHER_METHOD = "X-SOCKPOL-OTHER"  # stands for every method no rule names


@dataclass(frozen=True)
class Finding:
    code: str
    message: str
    path: str  # the file
    span: Span | None
    severity: Severity = Severity.WARNING
    related: tuple[tuple[str, Span], ...] = ()  # (message, where) of the rules involved
    hint: str = ""

    @property
    def name(self) -> str:
        return CODES.get(self.code, self.code)

    def diagnostic(self) -> Diagnostic:
        return Diagnostic(self.severity, self.message, self.span, self.code, self.hint)


# -- path languages -------------------------------------------------------------------------------

SEG_BYTE = (http.UNRESERVED | http.SUB_DELIMS | byteset(":@")) & ~byteset("%")
_HEX = "0123456789ABCDEF"


@cache
def canonical_paths() -> Re:
    """The paths the kernel can match: '/', segments that are not empty, '.' or '..' (but may
    end with a '/'), bytes of pchar, escapes only of bytes that stay escaped, upper-case hex."""
    # An escape that stays escaped: '%', then per first hex digit the second digits allowed.
    escapes = []
    for hi in range(16):
        lows = [
            lo
            for lo in range(16)
            if not (http.UNRESERVED >> (hi * 16 + lo) & 1) and hi * 16 + lo not in (0x2F, 0x5C, 0)
        ]
        if lows:
            second = byteset("".join(_HEX[lo] for lo in lows))
            escapes.append(seq(lit(f"%{_HEX[hi]}"), anyof(second)))
    any_char = alt(anyof(SEG_BYTE), *escapes)
    not_dot = alt(anyof(SEG_BYTE & ~byteset(".")), *escapes)
    segment = alt(
        seq(not_dot, star(any_char)),
        seq(lit("."), not_dot, star(any_char)),
        seq(lit(".."), any_char, star(any_char)),
    )
    return seq(lit("/"), star(seq(segment, lit("/"))), alt(segment, seq()))


@dataclass(frozen=True)
class PathResult:
    covered: bool
    example: str | None  # a canonical path the rule matches and the others don't


@cache
def _dfa(glob: str | None) -> DFA:
    """The DFA of a glob, or of the canonical paths (None), over single bytes; each
    determinized once. glob_regex takes path regexes (~"...") too."""
    regex = canonical_paths() if glob is None else glob_regex(glob)
    return by_byte(determinize([(regex, "A")], 200_000))


def _search(musts: tuple[str, ...], others: tuple[str, ...]):
    """The shortest path that reaches the rules (canonical) that every glob of `musts` matches
    and none of `others` (breadth-first over the product of their DFAs). Returns (path, length)
    or None."""
    norm = _dfa(None)
    must = [_dfa(g) for g in musts]
    avoid = [_dfa(g) for g in others]
    start = (norm.start, tuple(d.start for d in must), tuple(d.start for d in avoid))
    parent: dict[tuple, tuple[tuple, int] | None] = {start: None}
    cost = {start: 0}
    todo: deque[tuple] = deque([start])
    done: set[tuple] = set()
    while todo:
        state = todo.popleft()
        if state in done:
            continue
        done.add(state)
        n, ms, es = state
        if (
            norm.tags[n]
            and all(d.tags[m] for d, m in zip(must, ms, strict=True))
            and not any(e is not None and d.tags[e] for d, e in zip(avoid, es, strict=True))
        ):
            out = bytearray()
            at = state
            while parent[at] is not None:
                at, b = parent[at]  # type: ignore[misc]
                out.append(b)
            return bytes(reversed(out)).decode("latin-1"), cost[state]
        for b in sorted(norm.delta[n], key=lambda b: (not chr(b).isalnum(), b)):
            nms = tuple(d.delta[m].get(b) for d, m in zip(must, ms, strict=True))
            if None in nms:
                continue  # a glob that must match can no longer
            nes = tuple(
                None if e is None else d.delta[e].get(b) for d, e in zip(avoid, es, strict=True)
            )
            nxt = (norm.delta[n][b], nms, nes)
            if nxt not in cost or cost[state] + 1 < cost[nxt]:
                cost[nxt] = cost[state] + 1
                parent[nxt] = (state, b)
                todo.append(nxt)
    return None


@cache
def path_covered(path: str, others: frozenset[str]) -> PathResult:
    """Does every canonical path `path` matches also match one of `others`?"""
    found = _search((path,), tuple(sorted(others)))
    return PathResult(found is None, found[0] if found else None)


@cache
def path_overlap(a: str, b: str) -> str | None:
    """A canonical path both globs match, or None."""
    found = _search((a, b), ())
    return found[0] if found else None


@cache
def path_reach(path: str) -> int | None:
    """The fewest bytes of a path reaching the rules that the glob matches (None: none)."""
    shortest = _search((path,), ())
    return None if shortest is None else len(shortest[0])


# -- cells: the finite parts of requests ----------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    method: str
    host: str | None
    headers: tuple[tuple[str, frozenset[str]], ...]  # present names, with the values they carry

    def request(self, path: str) -> bytes:
        """A request of this cell for `path`: what the counter-examples stand for."""
        lines = [f"{self.method} {path} HTTP/1.1"]
        if self.host is not None:
            lines.append(f"Host: {self.host}")
        for name, values in self.headers:
            lines += [f"{name}: {v}" for v in sorted(values) or ["x-sockpol-other"]]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def describe(self, path: str) -> str:
        parts = [f"{self.method} {path}"]
        if self.host is not None:
            parts.append(f"Host: {self.host}")
        for name, values in self.headers:
            for v in sorted(values) or ["x-sockpol-other"]:
                parts.append(f"{name}: {v}")
        return ", ".join(parts)


def holds(rule: Rule, cell: Cell) -> bool:
    """Do the method and every condition of `rule` hold for the requests of `cell`?"""
    if rule.methods.methods is not None and cell.method not in rule.methods.methods:
        return False
    headers = dict(cell.headers)
    for cond in rule.conditions:
        if isinstance(cond, HostCondition):
            if cell.host is None or not host_matches(cond.pattern, cell.host.encode()):
                return False
        elif cond.name not in headers:
            return False
        elif cond.value is not None and cond.value not in headers[cond.name]:
            return False
    return True


def cells(rules: Iterable[Rule]) -> Iterable[Cell] | None:
    """Every class of requests the rules' methods and conditions can tell apart (None: too many).

    Hosts: one witness per exact pattern, one per wildcard (a label no exact pattern uses), and
    none at all. A host matches at most one wildcard that it does not also match as an exact
    pattern, so these witnesses give every combination that can occur. Headers: for each name a
    condition asks about, absent, or present with any subset of the values conditions name (a
    header may come on several lines, each with its value; one more line stands for the others).
    """
    rules = list(rules)
    methods: set[str] = set()
    any_method = False
    hosts: set[str] = set()
    values: dict[str, set[str]] = {}
    for rule in rules:
        if rule.methods.methods is None:
            any_method = True
        else:
            methods.update(rule.methods.methods)
        for cond in rule.conditions:
            if isinstance(cond, HostCondition):
                hosts.add(cond.pattern)
            elif isinstance(cond, HeaderCondition):
                values.setdefault(cond.name, set())
                if cond.value is not None:
                    values[cond.name].add(cond.value)
    if any_method or not methods:
        methods.add(OTHER_METHOD)
    exact = {h for h in hosts if not h.startswith("*.")}
    witnesses: list[str | None] = [None, *sorted(exact)]
    for h in sorted(hosts - exact):
        label = next(f"zz{i}" for i in itertools.count() if f"zz{i}{h[1:]}" not in exact)
        witnesses.append(f"{label}{h[1:]}")
    per_name = []
    for name in sorted(values):
        vals = sorted(values[name])
        states: list[tuple[str, frozenset[str]] | None] = [None]
        for k in range(len(vals) + 1):
            states += [(name, frozenset(c)) for c in itertools.combinations(vals, k)]
        per_name.append(states)
    total = len(methods) * len(witnesses)
    for states in per_name:
        total *= len(states)
    if total > MAX_CELLS:
        return None
    return (
        Cell(m, h, tuple(s for s in combo if s is not None))
        for m in sorted(methods)
        for h in witnesses
        for combo in itertools.product(*per_name)
    )


@dataclass(frozen=True)
class Coverage:
    covered: bool
    example: str | None = None  # a request the rule matches and the others don't, described
    analyzed: bool = True
    request: bytes | None = None  # ... and as sent


def covered_by(rule: Rule, others: list[Rule]) -> Coverage:
    """Is every request `rule` matches matched by at least one of `others`?"""
    universe = cells([rule, *others])
    if universe is None:
        return Coverage(False, analyzed=False)
    for cell in universe:
        if not holds(rule, cell):
            continue
        active = frozenset(o.path.text for o in others if holds(o, cell))
        result = path_covered(rule.path.text, active)
        if not result.covered:
            path = result.example or "/"
            return Coverage(False, cell.describe(path), request=cell.request(path))
    return Coverage(True)


def overlap(a: Rule, b: Rule) -> str | None:
    """A request both rules match, described, or None."""
    universe = cells([a, b])
    if universe is None:
        return None
    for cell in universe:
        if holds(a, cell) and holds(b, cell):
            path = path_overlap(a.path.text, b.path.text)
            return cell.describe(path) if path is not None else None
    return None


# -- the findings ---------------------------------------------------------------------------------


def _rule_ref(rule: Rule) -> str:
    return f"rule {rule.index} (line {rule.span.line})"


def _identity(rule: Rule) -> tuple[Hashable, ...]:
    methods = None if rule.methods.methods is None else frozenset(rule.methods.methods)
    path = upper_escapes(rule.path.text)
    return (methods, path, frozenset(str(c) for c in rule.conditions))


def _catch_all(rule: Rule) -> bool:
    return (
        rule.methods.methods is None
        and not rule.conditions
        and path_covered("/**", frozenset([rule.path.text])).covered
    )


def _passes(rule: Rule) -> bool:
    return rule.action.value == "allow"


@dataclass
class _Linter:
    path: str
    findings: list[Finding] = field(default_factory=list)

    def add(self, code: str, span: Span | None, message: str, **kw) -> None:
        self.findings.append(Finding(code, message, self.path, span, **kw))

    def policy(self, policy: Policy) -> None:
        self.tls_port(policy)
        if not policy.rules:
            self.add(
                "L007",
                policy.name_span,
                f"policy '{policy.name}' has no rules: every request gets the default "
                f"({policy.default.value})",
                severity=Severity.NOTE,
            )
            return
        earlier: list[Rule] = []
        catch_all: Rule | None = None
        for rule in policy.rules:
            self.rule(policy, rule, earlier, catch_all)
            if catch_all is None and _catch_all(rule):
                catch_all = rule
            earlier.append(rule)
        everything = Rule(policy.span, -1, policy.default, _any_methods(policy), _all(), ())
        if catch_all is not None or covered_by(everything, list(policy.rules)).covered:
            self.add(
                "L008",
                policy.default_span,
                f"the default ({policy.default.value}) never decides: the rules together "
                "match every request",
                severity=Severity.NOTE,
            )

    def tls_port(self, policy: Policy) -> None:
        """`tls` on a policy whose only port is plaintext HTTP's: most likely the wrong port, and
        `tls` makes the policy unloadable on kernels without kTLS for nothing."""
        if policy.tls is None or not policy.ports:
            return
        if not all(r.low == r.high and r.low in PLAINTEXT_PORTS for r in policy.ports):
            return
        self.add(
            "L009",
            policy.tls.span,
            f"policy '{policy.name}' says tls, but governs only port 80, where clients speak "
            "plaintext HTTP; tls makes it unloadable on kernels without kTLS",
            hint="govern the port TLS is served on (443), or remove 'tls'",
        )

    def rule(self, policy: Policy, rule: Rule, earlier: list[Rule], catch_all: Rule | None):
        reach = self.unreachable(policy, rule)
        if reach:
            self.add("L006", rule.path.span, reach)
            return
        if catch_all is not None:
            self.add(
                "L003",
                rule.span,
                f"{_rule_ref(rule)} can never match: {_rule_ref(catch_all)} before it "
                "matches every request",
                related=((f"the catch-all, {_rule_ref(catch_all)}", catch_all.span),),
                hint="move it above the catch-all, or delete it",
            )
            return
        twin = next((e for e in earlier if _identity(e) == _identity(rule)), None)
        if twin is not None:
            self.add(
                "L002",
                rule.span,
                f"{_rule_ref(rule)} matches exactly what {_rule_ref(twin)} matches, so it never "
                "decides",
                related=((f"the same rule, {_rule_ref(twin)}", twin.span),),
                hint="delete one of them",
            )
            return
        # Each earlier rule that overlaps this one, with a request both match.
        overlapping = [(e, ex) for e in earlier if (ex := overlap(e, rule)) is not None]
        candidates = [e for e, _ in overlapping]
        if candidates:
            coverage = covered_by(rule, candidates)
            if coverage.covered:
                # The fewest earlier rules that still cover it, to name in the message.
                needed = list(candidates)
                for e in candidates:
                    trial = [x for x in needed if x is not e]
                    if trial and covered_by(rule, trial).covered:
                        needed = trial
                names = " and ".join(_rule_ref(e) for e in needed)
                self.add(
                    "L001",
                    rule.span,
                    f"{_rule_ref(rule)} is shadowed: {names} already "
                    f"{'match' if len(needed) > 1 else 'matches'} every request it matches "
                    "(first match wins)",
                    related=tuple((f"covers it: {_rule_ref(e)}", e.span) for e in needed),
                    hint="delete it, or move it above the rules that cover it",
                )
                return
        for e, example in overlapping:
            if _passes(e) == _passes(rule):
                continue
            if covered_by(e, [rule]).covered:
                continue  # a carve-out above a broader rule: the documented idiom
            self.add(
                "L004",
                rule.span,
                f"{_rule_ref(rule)} ({rule.action.value}) and {_rule_ref(e)} "
                f"({e.action.value}) both match some requests, e.g. {example}; the earlier "
                "one decides them",
                related=((f"overlaps: {_rule_ref(e)}", e.span),),
                hint="narrow one of them so they no longer overlap, or silence this if the "
                "order is what you mean",
            )

    def unreachable(self, policy: Policy, rule: Rule) -> str:
        length = path_reach(rule.path.text)
        if length is None:
            return (
                f"{_rule_ref(rule)} can never match: no canonical path matches "
                f"{rule.path.text} (other spellings are refused before any rule)"
            )
        if length > PATH_MAX:
            return (
                f"{_rule_ref(rule)} can never match: every path it matches is longer than "
                f"{PATH_MAX} bytes, and such requests are refused"
            )
        head = _min_head(rule, length)
        max_head = head_limit(policy.max_head)
        if head > max_head:
            return (
                f"{_rule_ref(rule)} can never match: its shortest request head is {head} "
                f"bytes, more than max-head ({max_head})"
            )
        return ""

    def scopes(self, policies: list[tuple[str, Policy]]) -> None:
        """Policies of different files that govern the same port (one file: E115)."""
        for (path_a, a), (path_b, b) in itertools.combinations(policies, 2):
            if path_a == path_b or a.side is not b.side:
                continue  # (an egress and an ingress policy may share a port: one side each)
            for rb in b.ports:
                for ra in a.ports:
                    if ra.low <= rb.high and rb.low <= ra.high:
                        low, high = max(ra.low, rb.low), min(ra.high, rb.high)
                        ports = str(low) if low == high else f"{low}-{high}"
                        self.findings.append(
                            Finding(
                                "L005",
                                f"policy '{b.name}' governs port {ports}, which policy "
                                f"'{a.name}' ({path_a}) governs too: a connection is governed "
                                "by whichever was loaded for its cgroup",
                                path_b,
                                rb.span,
                                related=((f"policy '{a.name}'", ra.span),),
                            )
                        )
                        break


def _any_methods(policy: Policy):
    from sockpol.dsl.ast import MethodSet

    return MethodSet(policy.span, None)


def _all():
    from sockpol.dsl.ast import PathPattern

    return PathPattern(Span.point(1, 1), "/**")


def _min_head(rule: Rule, path_length: int) -> int:
    """The bytes of the shortest request head the rule can match."""
    methods = rule.methods.methods
    size = (min(len(m) for m in methods) if methods else 1) + 1 + path_length
    size += len(" HTTP/1.1\r\n") + len("\r\n")
    hosts = [c.pattern for c in rule.conditions if isinstance(c, HostCondition)]
    if hosts:  # one Host line; a wildcard's label takes at least the one byte its '*' takes
        size += len("host:") + len(hosts[0]) + 2
    values: dict[str, set[str]] = {}
    for cond in rule.conditions:
        if isinstance(cond, HeaderCondition):
            named = values.setdefault(cond.name, set())
            if cond.value is not None:
                named.add(cond.value)
    for name, vals in values.items():  # a line per value asked for, or one line at all
        size += sum(len(name) + 1 + len(v) + 2 for v in vals) if vals else len(name) + 3
    return size


# -- suppressions ---------------------------------------------------------------------------------

_IGNORE = re.compile(r"#.*?\bsockpol:\s*ignore(?:\[([^\]]*)\])?")


def suppressed(source: Source, finding: Finding) -> bool:
    """A `# sockpol: ignore[...]` comment on the finding's line silences it."""
    if finding.span is None:
        return False
    match = _IGNORE.search(source.line_text(finding.span.line))
    if match is None:
        return False
    if match.group(1) is None:
        return True
    wanted = {w.strip() for w in match.group(1).split(",")}
    return finding.code in wanted or finding.name in wanted


# -- entry points ---------------------------------------------------------------------------------


def lint_file(file: PolicyFile, warnings: list[Diagnostic] | None = None) -> list[Finding]:
    """The findings of one checked file (checker warnings included, W190 replaced by L002)."""
    linter = _Linter(file.source.path)
    for w in warnings or []:
        if w.code != "W190":
            linter.findings.append(
                Finding(w.code, w.message, file.source.path, w.span, w.severity, hint=w.hint)
            )
    for policy in file.policies:
        linter.policy(policy)
    return [f for f in linter.findings if not suppressed(file.source, f)]


def lint_files(files: list[tuple[PolicyFile, list[Diagnostic]]]) -> list[Finding]:
    findings = []
    for file, warnings in files:
        findings += lint_file(file, warnings)
    linter = _Linter("")
    linter.scopes([(f.source.path, p) for f, _ in files for p in f.policies])
    sources = {f.source.path: f.source for f, _ in files}
    findings += [f for f in linter.findings if not suppressed(sources[f.path], f)]
    return sorted(findings, key=lambda f: (f.path, f.span.line if f.span else 0))
