"""Does sockpol's own program verify on this kernel? (`sockpol doctor`'s last question)

Probing features one by one (runtime/probe.py) says what the kernel offers; it cannot say whether
the verifier accepts the program sockpol actually emits. A stable update once changed the verifier
under the same version line, and every policy stopped loading while every probe still said yes.
So doctor compiles a policy that switches on every part of sockpol_msg (TLS walk, hosts, headers
with and without values, regex paths, audit and log rules, dry-run) and has the most fact words a
policy can have (the one part of the code that grows with the policy: the fact-set loops are
unrolled per 64-bit word), loads it without attaching anything, and reports the verifier's count
against the budget (contract.VERIFIER_BUDGET). Every other policy's program is this one or
smaller; tests/kernel/test_verifier_budget.py checks that on every kernel of the matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

from sockpol.contract import MSG_PROGRAM, SKB_PROGRAM, VERIFIER_BUDGET

# Distinct header conditions that take the fact set to its eight words (with the method sets and
# conditions of the rules above them: over 448 facts).
WIDE_RULES = 460

REFERENCE_POLICY = (
    """\
policy everything {
    port 8443, 9000-9010
    tls userspace allow
    mode dry-run
    max-head 16KiB
    default deny

    allow GET,HEAD /api/v1/orders/* if host "shop.example" and header x-api-key
    allow POST /api/v1/orders if header content-type = "application/json"
    audit DELETE /api/v1/orders/*
    allow GET ~"/api/v[0-9]+/items/[0-9]+" log
    deny * /admin/**
    allow * /static/** if host "*.cdn.example"
"""
    + "".join(f"    allow GET /wide/{i}/** if header x-wide-{i}\n" for i in range(WIDE_RULES))
    + "}\n"
)


# The same policy on the receiving side (`side ingress`: the sk_skb program), without `tls`, which
# ingress policies cannot have (E159).
INGRESS_REFERENCE_POLICY = REFERENCE_POLICY.replace(
    "policy everything {", "policy everything-ingress {\n    side ingress"
).replace("    tls userspace allow\n", "")


@dataclass(frozen=True)
class ProgramCheck:
    loaded: bool
    processed: int | None  # sockpol_msg's verified (or, when refused, processed) instructions
    note: str = ""  # why it did not load
    log_tail: tuple[str, ...] = ()  # the verifier's last lines, when it refused
    unknown: bool = False  # the check itself could not be made (compiling it failed)

    @property
    def within_budget(self) -> bool:
        return self.loaded and self.processed is not None and self.processed <= VERIFIER_BUDGET


def check_program(side: str = "egress") -> ProgramCheck:
    """Compile REFERENCE_POLICY (INGRESS_REFERENCE_POLICY for side "ingress"), load it (nothing
    attached, nothing pinned), read the count of its judging program."""
    from sockpol.compiler import compile_source
    from sockpol.stats import verify

    ingress = side == "ingress"
    text = INGRESS_REFERENCE_POLICY if ingress else REFERENCE_POLICY
    (compiled,), _ = compile_source(text, "<doctor>")
    v = verify(compiled.object_code())
    if not v.counts:
        return ProgramCheck(False, v.processed, v.note, v.log_tail)
    return ProgramCheck(True, v.counts.get(SKB_PROGRAM if ingress else MSG_PROGRAM))
