"""The whole compiler in one place: policy text to BPF object.

    parse        text -> PolicyFile (syntax; every node keeps its span)
    check        PolicyFile -> PolicyFile + warnings (semantics; all errors at once)
    lower        Policy -> MatcherIR (facts, one scanner automaton, rule table)
    emit         MatcherIR -> LLVM module (sk_msg + sockops programs, BTF maps, tables)
    metadata     + the `.sockpol.meta` record, so the object describes itself
    object       LLVM module -> BPF ELF through LLVM's BPF backend

Each stage raises `CompileError` with positioned diagnostics; nothing is written until the whole
pipeline has succeeded, and then atomically.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

from llvmlite import ir

from sockpol import __version__, kernelbtf, telemetry
from sockpol.codegen import elf, emit, skb
from sockpol.codegen.lower import (
    DEFAULT_SHAPE,
    LoweringError,
    MatcherIR,
    TableShape,
    lower,
)
from sockpol.codegen.lsm import emit_lsm_module
from sockpol.codegen.scanner import StateLimit
from sockpol.contract import BACKENDS, REASON_TEXT, TABLE_LAYOUT
from sockpol.diagnostics import (
    CompileError,
    Diagnostic,
    DiagnosticBag,
    Severity,
    SockpolError,
    Source,
)
from sockpol.dsl import load_source
from sockpol.dsl.ast import Policy, PolicyFile, Side
from sockpol.files import write_atomically
from sockpol.metadata import PolicyMetadata, RuleInfo


@dataclass(frozen=True)
class CompiledPolicy:
    policy: Policy
    matcher: MatcherIR
    module: ir.Module
    metadata: PolicyMetadata

    def llvm_ir(self) -> str:
        return elf.llvm_ir(self.module)

    def assembly(self) -> str:
        return elf.assembly(self.module)

    def object_code(self) -> bytes:
        return elf.object_code(self.module)


def front_end(text: str, path: str) -> tuple[PolicyFile, list[Diagnostic]]:
    """Parse and check; raises CompileError with every error of the file."""
    return load_source(text, path)


def metadata_for(
    policy: Policy, source: Source, shape: TableShape | None = None, backend: str = "sockmap"
) -> PolicyMetadata:
    return PolicyMetadata(
        backend=backend,
        table_layout=TABLE_LAYOUT,
        shape=asdict(shape) if shape else {},
        policy=policy.name,
        ports=[[r.low, r.high] for r in policy.ports],
        default=policy.default.value,
        max_head=policy.max_head,
        rules=[
            RuleInfo(r.index, r.action.value, r.span.line, r.span.column, r.describe(), r.log)
            for r in policy.rules
        ],
        mode=policy.mode.value,
        tls=policy.tls.userspace.value if policy.tls is not None else None,
        answers=list(policy.answers()),
        side=policy.side.value,
        telemetry=telemetry.layout(),
        source_path=source.path,
        source_sha256=hashlib.sha256(source.text.encode()).hexdigest(),
        compiler_version=__version__,
        reasons={reason.slug: text for reason, text in REASON_TEXT.items()},
    )


class ShapeMismatch(SockpolError):
    """The policy's tables do not fit a given (loaded program's) table shape."""


def compile_policy(
    policy: Policy, source: Source, shape: TableShape | None = None, backend: str = "sockmap"
) -> CompiledPolicy:
    """Compile one policy. `shape` fixes the table dimensions (to swap tables into a loaded
    program); by default they leave room to grow (DEFAULT_SHAPE). `backend`: "sockmap" (the
    sk_msg program, emit.py) or "lsm" (the BPF LSM program, lsm.py; docs/design.md)."""
    if backend not in BACKENDS:
        raise SockpolError(f"unknown backend {backend!r} (one of {', '.join(BACKENDS)})")
    try:
        matcher = lower(policy)
    except LoweringError as e:
        bag = DiagnosticBag(source)
        span = policy.rules[e.rule_index].span if e.rule_index is not None else policy.name_span
        message, hint = str(e), ""
        if e.code == "E901":
            message, hint = _too_complex(policy, e)
            span = policy.rules[e.rule_index].path.span if e.rule_index is not None else span
        bag.error(span, message, code=e.code, hint=hint)
        raise CompileError(source, bag.items) from None
    except StateLimit as e:
        bag = DiagnosticBag(source)
        bag.error(policy.name_span, f"policy '{policy.name}' is too complex: {e}", code="E901")
        raise CompileError(source, bag.items) from None
    needed = matcher.needed_shape()
    if shape is not None and not shape.covers(needed):
        raise ShapeMismatch(
            f"policy '{policy.name}' needs larger tables than the loaded program has "
            f"({', '.join(shape.shortfall(needed))})"
        )
    matcher = matcher.with_shape(shape or DEFAULT_SHAPE.union(needed))
    if backend == "lsm":
        if policy.side is Side.INGRESS:
            raise SockpolError(
                f"policy '{policy.name}': the lsm backend judges what a process sends; an "
                "ingress policy runs on sk_skb (compile it without --backend lsm)"
            )
        module = emit_lsm_module(matcher, _kernel_layout())
    else:
        generator = skb if policy.side is Side.INGRESS else emit  # sk_skb or sk_msg
        module = generator.emit_module(matcher)
    metadata = metadata_for(policy, source, matcher.shape, backend)
    elf.add_metadata_section(module, metadata.to_json())
    return CompiledPolicy(policy, matcher, module, metadata)


def _kernel_layout() -> dict[str, int] | None:
    """The struct offsets of the kernel this runs on, as the object's defaults (the loader
    writes the loading kernel's own before every load): None where its BTF cannot be read."""
    try:
        return kernelbtf.lsm_layout(kernelbtf.running_kernel())
    except kernelbtf.BtfError:
        return None


def _too_complex(policy: Policy, e: LoweringError) -> tuple[str, str]:
    """The message and hint of an automaton past its state limit, naming the rules."""
    lines = [policy.rules[i].span.line for i in e.rules]
    shown = ", ".join(str(n) for n in lines[:8])
    more = f" and {len(lines) - 8} more" if len(lines) > 8 else ""
    who = f"rule on line {shown}" if len(lines) == 1 else f"rules on lines {shown}{more}"
    return (
        f"policy '{policy.name}' is too complex: {e}; the {who} "
        f"{'has the pattern' if len(lines) == 1 else 'have the patterns'} found in most of them",
        "wildcards ('**', regex '.*' and repetitions) that can overlap multiply states; "
        "narrow them, merge rules, or split the policy",
    )


def compile_source(
    text: str, path: str, backend: str = "sockmap"
) -> tuple[list[CompiledPolicy], list[Diagnostic]]:
    policy_file, warnings = front_end(text, path)
    compiled = [
        compile_policy(p, policy_file.source, backend=backend) for p in policy_file.policies
    ]
    for c in compiled:
        warnings += unreachable_warnings(c.matcher, warnings)
    return compiled, warnings


def unreachable_warnings(matcher: MatcherIR, earlier: list[Diagnostic]) -> list[Diagnostic]:
    """Rules the path automaton shows can never decide a request (W910, W911). A rule the
    checker already reported as a repetition (W190) is not reported again."""
    repeated = {(d.span.line, d.span.column) for d in earlier if d.code == "W190" and d.span}
    out = []
    for u in matcher.unreachable:
        rule = matcher.policy.rules[u.rule]
        if (rule.span.line, rule.span.column) in repeated:
            continue
        if not u.by:
            out.append(
                Diagnostic(
                    Severity.WARNING,
                    f"the path {rule.path.text} matches no request path, so the rule never "
                    "decides a request",
                    rule.path.span,
                    "W911",
                )
            )
            continue
        lines = [matcher.policy.rules[k].span.line for k in u.by]
        shown = ", ".join(str(n) for n in lines[:5])
        if len(lines) == 1:
            who = f"the rule on line {shown} decides"
        else:
            more = f" and {len(lines) - 5} more" if len(lines) > 5 else ""
            who = f"the rules on lines {shown}{more} decide"
        out.append(
            Diagnostic(
                Severity.WARNING,
                f"this rule never decides a request: {who} every request it matches",
                rule.span,
                "W910",
                "the first matching rule decides; move this rule up, or remove it",
            )
        )
    return out


def select(compiled: list[CompiledPolicy], name: str | None, source: Source) -> CompiledPolicy:
    """The one policy a command acts on: the only one in the file, or the one named."""
    chosen = PolicyFile(source, tuple(c.policy for c in compiled)).choose(name)
    return next(c for c in compiled if c.policy is chosen)


def compile_to_file(
    source_text: str,
    out_path: str | Path,
    source_name: str = "<policy>",
    policy: str | None = None,
    backend: str = "sockmap",
) -> Path:
    """Compile one policy of `source_text` into a BPF object at `out_path` (for tests/embedding)."""
    compiled, _ = compile_source(source_text, source_name, backend)
    chosen = select(compiled, policy, Source(source_name, source_text))
    write_atomically(Path(out_path), chosen.object_code())
    return Path(out_path)


__all__ = [
    "CompileError",
    "CompiledPolicy",
    "compile_policy",
    "compile_source",
    "compile_to_file",
    "front_end",
    "select",
    "write_atomically",
]
