"""`sockpol doctor`: probe the running kernel and say plainly what works here.

cli.py registers it like every command (`doctor_arguments`, `cmd_doctor`). Importing this module
does not import the runtime (the probe is imported when the command runs): the authoring
commands (lint, fmt, test, explain) share cli.py and must never need libbpf.

Last, doctor compiles and loads sockpol's own program (selfcheck.py) and prints the verifier's
count against the budget: probing features one by one cannot tell whether the verifier accepts
the program sockpol emits.

Exit status: 0 when plaintext HTTP policies can be enforced here (and, with --require-ktls, policy
inside TLS too), 1 otherwise, so scripts can gate on it. The report also says whether policies
with a `tls` statement can be loaded here: `sockpol load` decides that from the same two probes
(`probe.tls_support_from`), and refuses them where they cannot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING, TextIO

from sockpol.contract import KERNELS_DOC, MSG_PROGRAM, SKB_PROGRAM, VERIFIER_BUDGET, VERIFIER_LIMIT

if TYPE_CHECKING:
    from sockpol.runtime.probe import Finding, TlsSupport
    from sockpol.selfcheck import ProgramCheck

EXIT_OK = 0
EXIT_MISSING = 1

_LABEL = {"ok": "ok", "missing": "MISSING", "unknown": "unknown"}  # by probe.Status value


def doctor_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="findings as JSON")
    p.add_argument(
        "--require-ktls",
        action="store_true",
        help="exit 1 unless policy inside TLS (kTLS on sockhash sockets) works here",
    )


def cmd_doctor(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from sockpol.runtime.probe import probe, summary, tls_support_from

    out = out or sys.stdout
    findings = probe()
    works = summary(findings)
    check = None
    if works["plaintext"]:  # every feature is there: does the real program verify?
        from sockpol.selfcheck import ProgramCheck, check_program

        try:
            check = check_program()
        except Exception as e:  # noqa: BLE001 -- reported like a probe that failed, not a crash
            check = ProgramCheck(False, None, f"the check itself failed: {e}", unknown=True)
    findings.append(program_finding(check))
    works["plaintext"] = works["plaintext"] and findings[-1].ok
    # The receiving side's program (`side ingress`): informative, not part of the exit status.
    ingress = None
    if works["plaintext"]:
        from sockpol.selfcheck import ProgramCheck, check_program

        try:
            ingress = check_program("ingress")
        except Exception as e:  # noqa: BLE001 -- reported, not a crash
            ingress = ProgramCheck(False, None, f"the check itself failed: {e}", unknown=True)
    findings.append(program_finding(ingress, SKB_PROGRAM, "ingress_program"))
    works["ingress"] = works["plaintext"] and findings[-1].ok
    for key in ("ktls", "ktls_sockmap", "lsm", "ktls_lsm"):  # nothing works without the program
        if key in works:
            works[key] = works[key] and works["plaintext"]
    tls = tls_support_from(findings)
    works["tls_policies"] = works["plaintext"] and (tls.ok or works.get("ktls_lsm", False))
    if args.json:
        records = [dict(asdict(f), verdict=f.verdict.value) for f in findings]
        program = None
        if check is not None:
            program = dict(asdict(check), budget=VERIFIER_BUDGET, within_budget=check.within_budget)
        print(
            json.dumps({"findings": records, "program": program, "works": works}, indent=2),
            file=out,
        )
    else:
        render(findings, works, tls, out, check)
    if not works["plaintext"] or (args.require_ktls and not works["ktls"]):
        return EXIT_MISSING
    return EXIT_OK


def program_finding(
    check: ProgramCheck | None, program: str = MSG_PROGRAM, key: str = "program"
) -> Finding:
    from sockpol.runtime.probe import Finding, Status

    title = f"sockpol's program ({program})"
    which = "no policy loads"
    if key != "program":
        title = f"sockpol's ingress program ({program})"
        which = "no ingress policy (`side ingress`) loads"
    if check is None:
        return Finding(key, title, Status.UNKNOWN, "not tried: a feature above is missing")
    release = os.uname().release
    if check.unknown:
        return Finding(key, title, Status.UNKNOWN, check.note)
    if not check.loaded and not check.log_tail:  # not the verifier: libbpf, a map, privileges
        return Finding(
            key,
            title,
            Status.MISSING,
            f"could not be loaded on Linux {release}: {check.note}",
            f"{which} here; see the findings above",
            "a way to load sockpol's program",
        )
    if not check.loaded:
        count = f" after {check.processed:,} instructions" if check.processed is not None else ""
        return Finding(
            key,
            title,
            Status.MISSING,
            f"the verifier of Linux {release} refused it{count}: {check.note}",
            f"{which} on this kernel; see {KERNELS_DOC} and report it",
            "a verifier that accepts sockpol's program",
        )
    within = "within" if check.within_budget else "OVER"
    detail = f"verified in {check.processed:,} instructions ({within} the budget of "
    detail += f"{VERIFIER_BUDGET:,}; the verifier's limit is {VERIFIER_LIMIT:,})"
    return Finding(key, title, Status.OK, detail)


def render(
    findings: list[Finding],
    works: dict[str, bool],
    tls: TlsSupport,
    out: TextIO,
    check: ProgramCheck | None = None,
) -> None:
    from sockpol.runtime.probe import CORE, TLS

    by_key = {f.key: f for f in findings}
    kernel = by_key.get("kernel")
    print(f"sockpol doctor: {kernel.detail if kernel else 'unknown kernel'}", file=out)
    width = max(len(f.title) for f in findings)
    for f in findings:
        if f.key == "kernel":
            continue
        print(f"  {_LABEL[f.verdict.value]:<8} {f.title:<{width}}  {f.detail}", file=out)
        if f.meaning and not f.ok:
            print(f"  {'':<8} {'':<{width}}  -> {f.meaning}", file=out)
        if f.key == "program" and check is not None and check.log_tail:
            for line in check.log_tail:
                print(f"  {'':<8} {'':<{width}}  | {line}", file=out)
    print("what works here:", file=out)
    core = (*CORE, "program")
    print(f"  plaintext HTTP policies:  {_answer(works['plaintext'], core, by_key)}", file=out)
    ktls_sockmap = works.get("ktls_sockmap", works["ktls"])
    ktls_lsm = works.get("ktls_lsm", False)
    if ktls_sockmap:
        inside = "yes (sockmap backend: kTLS on sockets in a sockhash works)"
    elif ktls_lsm:
        inside = "yes, through the lsm backend (this kernel rejects TLS on sockmap sockets)"
    else:
        inside = _answer(False, core + TLS, by_key)
        if "bpf_lsm" in by_key and not by_key["bpf_lsm"].ok:
            inside += f"; lsm backend: {by_key['bpf_lsm'].lacks or by_key['bpf_lsm'].detail}"
    print(f"  policy inside TLS (kTLS): {inside}", file=out)
    lsm = by_key.get("bpf_lsm")
    if lsm is not None:
        backend = "available (--backend lsm)" if works.get("lsm") else f"no ({lsm.detail})"
        print(f"  lsm backend:              {backend}", file=out)
    if not works["plaintext"]:
        loadable = "no (no policy loads here)"
    elif tls.ok or ktls_lsm:
        loadable = "yes" if tls.ok else "yes, on the lsm backend (sockpol load picks it)"
    else:
        loadable = f"no, sockpol load refuses them: {tls.reason}"
    print(f"  policies with `tls`:      {loadable}", file=out)
    ingress = by_key.get("ingress_program")
    if ingress is not None:
        said = "yes" if works.get("ingress") else f"no ({ingress.title}: {ingress.verdict.value})"
        print(f"  ingress policies:         {said}", file=out)
    answer = by_key.get("answer")
    if answer is None:
        answers = "not probed"
    elif answer.ok and works["plaintext"]:
        answers = "yes (`answer STATUS`: the client reads the response)"
    else:
        answers = "no: refusals are dropped whatever `answer` says (sockpol load warns)"
    print(f"  answered refusals:        {answers}", file=out)


def _answer(ok: bool, keys: tuple[str, ...], by_key: dict[str, Finding]) -> str:
    if ok:
        return "yes"
    first = next((by_key[k] for k in keys if k in by_key and not by_key[k].ok), None)
    return f"no ({first.title}: {first.verdict.value})" if first else "no"
