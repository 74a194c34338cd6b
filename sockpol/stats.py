"""`sockpol compile --stats`: the sizes of a compiled policy, and what the verifier thinks of it.

The sizes come from the matcher IR and the object itself (the `.data` section is where the tables
live: two slots for hot reload, see emit.py). The verifier's count is the number of instructions
it processed to accept each program (`bpf_prog_info.verified_insns`, the "processed N insns" of
its log), read back after loading the object with libbpf, without attaching anything. It needs
root (CAP_BPF and CAP_NET_ADMIN) and a kernel that can load the object; otherwise the stats say why
it is missing. The point of reporting it: the program walks tables with bounded loops, so the
count must not grow with the number of rules (bench/README.md shows it does not).
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from elftools.elf.elffile import ELFFile

if TYPE_CHECKING:
    from sockpol.compiler import CompiledPolicy


@dataclass(frozen=True)
class Stats:
    policy: str
    rules: int
    rule_classes: int  # distinct (method set, conditions) combinations
    facts: int  # method sets and conditions the head scanner establishes
    scanner_states: int
    scanner_classes: int
    path_states: int  # states of the (minimal) path automaton
    path_classes: int
    path_slots: int  # used slots of its packed form (comb.py)
    longest_candidates: int  # most candidate rules looked at for one request
    data_bytes: int  # the object's .data: every table, both slots
    object_bytes: int
    verified_insns: dict[str, int] = field(default_factory=dict)  # program -> count
    verifier_note: str = ""  # why there is no count, if there is none

    def lines(self) -> list[str]:
        out = [
            f"{self.policy}: {self.rules} rules in {self.rule_classes} classes, "
            f"{self.facts} scanner facts",
            f"  head scanner: {self.scanner_states} states x {self.scanner_classes} byte classes",
            f"  path automaton: {self.path_states} states x {self.path_classes} byte classes, "
            f"{self.path_slots} packed slots; at most {self.longest_candidates} candidate "
            "rules per request",
            f"  tables: {self.data_bytes} bytes (.data, two slots); "
            f"object: {self.object_bytes} bytes",
        ]
        if self.verified_insns:
            counts = ", ".join(f"{p} {n}" for p, n in sorted(self.verified_insns.items()))
            out.append(f"  verifier: processed instructions: {counts}")
        else:
            out.append(f"  verifier: not loaded ({self.verifier_note})")
        return out


def compile_stats(c: CompiledPolicy, obj: bytes, verify: bool = True) -> Stats:
    t, m = c.matcher.tables, c.matcher
    comb = t.path.comb
    lookup = m.lookup
    elf = ELFFile(io.BytesIO(obj))
    data = elf.get_section_by_name(".data")
    counts: dict[str, int] = {}
    note = ""
    if verify:
        counts, note = verifier_counts(obj)
    return Stats(
        policy=c.policy.name,
        rules=len(m.rules),
        rule_classes=len(lookup.classes),
        facts=len(m.fact_names),
        scanner_states=t.n_states,
        scanner_classes=max(t.classmap) + 1,
        path_states=len(comb.ids),
        path_classes=comb.n_classes,
        path_slots=sum(1 for s in comb.slots if s),
        longest_candidates=lookup.longest,
        data_bytes=data.data_size if data is not None else 0,
        object_bytes=len(obj),
        verified_insns=counts,
        verifier_note=note,
    )


@dataclass(frozen=True)
class Verification:
    counts: dict[str, int]  # program -> verified instructions; empty when it did not load
    note: str = ""  # why it did not load
    processed: int | None = None  # the instructions it processed before it gave up
    log_tail: tuple[str, ...] = ()  # the verifier's last lines, where it says why


def verify(obj: bytes) -> Verification:
    """Load the object (programs and maps, nothing attached, nothing pinned) and read each
    program's verified-instruction count, or why the kernel refused it."""
    # (Importing it does not load libbpf.so: a missing library is reported as a load failure.)
    from sockpol.diagnostics import SockpolError
    from sockpol.runtime import libbpf
    from sockpol.runtime.loader import processed_count, processed_note, verifier_tail
    from sockpol.runtime.system import check_privileges

    try:
        check_privileges()
    except SockpolError:
        return Verification({}, "needs CAP_BPF and CAP_NET_ADMIN (root)")

    with tempfile.NamedTemporaryFile(suffix=".bpf.o") as f, libbpf.capture_messages():
        f.write(obj)
        f.flush()
        programs = []
        arrays: list[libbpf.ProgArrayRef] = []
        try:
            with libbpf.BpfObject.open_file(f.name) as o:
                programs = o.programs()
                for prog in programs:
                    prog.capture_log()
                _kernel_layout(o)
                o.load()
                # Closed after the object (in `finally`), once its programs are gone: a
                # program array must not outlive its last user reference (ProgArrayRef).
                arrays = o.hold_prog_arrays()
                return Verification(
                    {p.name: libbpf.prog_info(p.fd()).verified_insns for p in programs}
                )
        except Exception as e:  # noqa: BLE001 -- any load failure is reported, not raised
            refused = next((p for p in programs if p.log.strip()), None)
            if refused is None:
                return Verification({}, f"the kernel did not load it: {e}")
            return Verification(
                {},
                f"the kernel did not load it: {e}{processed_note(refused.log)}",
                processed_count(refused.log),
                tuple(verifier_tail(refused.log, 8)),
            )
        finally:
            for array in arrays:
                array.close()


def _kernel_layout(o) -> None:
    """An LSM-backend object gets this kernel's struct offsets, as the loader gives it."""
    from sockpol import kernelbtf
    from sockpol.contract import LSM_PROGRAM

    if o.program(LSM_PROGRAM) is None:
        return
    rodata = next((m for m in o.maps() if m.name.endswith(".rodata")), None)
    if rodata is not None:
        rodata.set_initial_value(
            kernelbtf.layout_bytes(kernelbtf.lsm_layout(kernelbtf.running_kernel()))
        )


def verifier_counts(obj: bytes) -> tuple[dict[str, int], str]:
    """verify(), as ({program: count}, "") or ({}, why not)."""
    v = verify(obj)
    return v.counts, v.note


__all__ = ["Stats", "Verification", "compile_stats", "verifier_counts", "verify"]
