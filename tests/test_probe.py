"""The kernel probe's pure parts: reading the kernel config, and how `sockpol doctor` reports."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from sockpol import doctor, selfcheck
from sockpol.cli import build_parser
from sockpol.runtime import ktls, probe
from sockpol.runtime.probe import Finding, Status
from sockpol.selfcheck import ProgramCheck


def test_kernel_config_reads_plain_and_gzip(tmp_path: Path) -> None:
    text = "CONFIG_TLS=m\n# CONFIG_TLS_TOE is not set\nCONFIG_BPF=y\n"
    plain = tmp_path / "config"
    plain.write_text(text)
    packed = tmp_path / "config.gz"
    packed.write_bytes(gzip.compress(text.encode()))
    for source in (plain, packed):
        assert probe.kernel_config("TLS", [source]) == "m"
        assert probe.kernel_config("TLS_TOE", [source]) == "n"
        assert probe.kernel_config("BPF", [source]) == "y"
        assert probe.kernel_config("NOT_MENTIONED", [source]) == "n"
    assert probe.kernel_config("TLS", [tmp_path / "missing"]) is None
    assert probe.kernel_config("TLS", [tmp_path / "missing", plain]) == "m"


@pytest.mark.parametrize("cipher", [ktls.AES_GCM_128, ktls.AES_GCM_256])
@pytest.mark.parametrize("version", [ktls.TLS_1_2_VERSION, ktls.TLS_1_3_VERSION])
def test_crypto_info_layout(cipher: ktls.Cipher, version: int) -> None:
    # struct tls12_crypto_info_aes_gcm_{128,256}: 4-byte header, iv, key, salt, rec_seq.
    info = ktls.StaticKeys.fixed(version, cipher).crypto_info()
    assert len(info) == 4 + 8 + cipher.key_size + 4 + 8
    assert int.from_bytes(info[:2], "little") == version
    assert int.from_bytes(info[2:4], "little") == cipher.type
    with pytest.raises(ValueError, match="key material"):
        ktls.StaticKeys(version, cipher, b"short", b"", b"").crypto_info()


def _findings(ktls_ok: bool) -> list[Finding]:
    ok = [Finding(k, k, Status.OK, "fine") for k in probe.CORE]
    tls = Status.OK if ktls_ok else Status.MISSING
    return [
        Finding("kernel", "kernel", Status.OK, "Linux 9.9 (x86_64)"),
        *ok,
        Finding("ktls", "kernel TLS (kTLS)", tls, "tried", "no TLS here", "" if ktls_ok else "TLS"),
        Finding("ktls_sockmap", "kTLS on sockets in a sockhash", tls, "tried", "no TLS here"),
    ]


VERIFIED = ProgramCheck(True, 11_922)


def _doctor(
    monkeypatch: pytest.MonkeyPatch,
    findings: list[Finding],
    *argv: str,
    program: ProgramCheck | Callable[[], ProgramCheck] = VERIFIED,
):
    """Run doctor on these findings; `program` is the check's result, or the check itself."""
    check = program if callable(program) else lambda side="egress": program
    monkeypatch.setattr(probe, "probe", lambda: list(findings))  # doctor imports it when it runs
    monkeypatch.setattr(selfcheck, "check_program", check)
    args = build_parser().parse_args(["doctor", *argv])
    out = io.StringIO()
    return doctor.cmd_doctor(args, out=out), out.getvalue()


def test_doctor_without_ktls(monkeypatch: pytest.MonkeyPatch) -> None:
    status, text = _doctor(monkeypatch, _findings(ktls_ok=False))
    assert status == doctor.EXIT_OK  # plaintext policies work: not an error by default
    assert "sockpol doctor: Linux 9.9 (x86_64)" in text
    assert "MISSING  kernel TLS (kTLS)" in text
    assert "-> no TLS here" in text
    assert "plaintext HTTP policies:  yes" in text
    assert "policy inside TLS (kTLS): no (kernel TLS (kTLS): missing)" in text
    assert "policies with `tls`:      no, sockpol load refuses them: it lacks TLS" in text
    status, _ = _doctor(monkeypatch, _findings(ktls_ok=False), "--require-ktls")
    assert status == doctor.EXIT_MISSING


def test_doctor_with_ktls_and_json(monkeypatch: pytest.MonkeyPatch) -> None:
    status, text = _doctor(monkeypatch, _findings(ktls_ok=True), "--require-ktls", "--json")
    assert status == doctor.EXIT_OK
    report = json.loads(text)
    assert report["works"] == {
        "plaintext": True, "ktls": True, "tls_policies": True, "ingress": True,
        "ktls_sockmap": True, "lsm": False, "ktls_lsm": False,  # no bpf_lsm finding given
    }  # fmt: skip
    assert [f["key"] for f in report["findings"]][:2] == ["kernel", "privileges"]
    assert {f["verdict"] for f in report["findings"]} == {"ok"}


def test_doctor_fails_when_core_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    findings = _findings(ktls_ok=True)
    findings[2] = Finding("sk_msg", "sk_msg programs", Status.MISSING, "no", "rebuild")
    status, text = _doctor(monkeypatch, findings)
    assert status == doctor.EXIT_MISSING
    assert "plaintext HTTP policies:  no (sk_msg programs: missing)" in text
    assert "not tried: a feature above is missing" in text


def test_doctor_reports_the_program_count_against_the_budget(monkeypatch) -> None:
    status, text = _doctor(monkeypatch, _findings(ktls_ok=False))
    assert "ok       sockpol's program (sockpol_msg)" in text
    assert "verified in 11,922 instructions (within the budget of 100,000" in text
    over = ProgramCheck(True, 250_000)
    status, text = _doctor(monkeypatch, _findings(ktls_ok=False), program=over)
    assert status == doctor.EXIT_OK  # it loads: a warning, not a failure
    assert "verified in 250,000 instructions (OVER the budget of 100,000" in text


def test_doctor_fails_when_the_verifier_refuses_the_program(monkeypatch) -> None:
    refused = ProgramCheck(
        False,
        1_000_001,
        "the kernel did not load it: Argument list too long; processed 1,000,001 instructions",
        ("BPF program is too large. Processed 1000001 insn", "processed 1000001 insns"),
    )
    status, text = _doctor(monkeypatch, _findings(ktls_ok=True), program=refused)
    assert status == doctor.EXIT_MISSING
    assert "MISSING  sockpol's program (sockpol_msg)" in text
    assert "refused it after 1,000,001 instructions" in text
    assert "| BPF program is too large. Processed 1000001 insn" in text
    assert "see docs/kernels.md" in text
    assert "plaintext HTTP policies:  no (sockpol's program (sockpol_msg): missing)" in text
    assert "policy inside TLS (kTLS): no" in text
    status, text = _doctor(monkeypatch, _findings(ktls_ok=True), "--json", program=refused)
    report = json.loads(text)
    assert report["works"] == {
        "plaintext": False, "ktls": False, "tls_policies": False, "ingress": False,
        "ktls_sockmap": False, "lsm": False, "ktls_lsm": False,
    }  # fmt: skip
    assert report["program"]["processed"] == 1_000_001
    assert report["program"]["within_budget"] is False


def test_doctor_does_not_blame_the_verifier_for_other_load_failures(monkeypatch) -> None:
    no_map = ProgramCheck(False, None, "the kernel did not load it: map 'sockpol_conn': EPERM")
    status, text = _doctor(monkeypatch, _findings(ktls_ok=False), program=no_map)
    assert status == doctor.EXIT_MISSING
    assert "could not be loaded on Linux" in text and "EPERM" in text
    assert "verifier" not in text.split("sockpol's program")[1].splitlines()[0]


def test_doctor_survives_a_check_that_crashes(monkeypatch) -> None:
    def boom() -> ProgramCheck:
        raise RuntimeError("llvmlite exploded")

    status, text = _doctor(monkeypatch, _findings(ktls_ok=False), program=boom)
    assert "unknown  sockpol's program (sockpol_msg)" in text
    assert "the check itself failed: llvmlite exploded" in text
    assert status == doctor.EXIT_MISSING  # unverified: plaintext policies are not promised


def test_doctor_on_a_kernel_that_rejects_ktls_on_sockmap_but_runs_bpf_lsm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """kTLS works, TLS on sockmap sockets is rejected, BPF LSM works: policy inside TLS through
    the lsm backend (sockpol load picks it)."""
    findings = [
        f if f.key != "ktls_sockmap" else Finding(f.key, f.title, Status.MISSING, "EINVAL", "",
                                                  "TLS on sockmap sockets (rejected)")
        for f in _findings(ktls_ok=True)
    ] + [Finding("bpf_lsm", "BPF LSM programs (the lsm backend)", Status.OK, "loads")]  # fmt: skip
    status, text = _doctor(monkeypatch, findings, "--require-ktls")
    assert status == doctor.EXIT_OK, text
    assert "policy inside TLS (kTLS): yes, through the lsm backend" in text
    assert "lsm backend:              available (--backend lsm)" in text
    assert "policies with `tls`:      yes, on the lsm backend" in text
