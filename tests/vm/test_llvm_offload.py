"""The host's LLVM for the guests (llvm_offload.py), without booting anything: a Python process
set up as the guest's are (the runner's PYTHONPATH directory) compiles through the host's thread
and gets the bytes its own LLVM would have made; errors and a silent host are handled."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import llvm_offload
import pytest
import vmrunner

from sockpol.codegen import elf
from sockpol.compiler import compile_source

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "examples" / "orders-api.pol"

GUEST = """\
import sys
from sockpol.compiler import compile_source
from sockpol.codegen import elf
compiled, _ = compile_source(open(sys.argv[1]).read(), sys.argv[1])
open(sys.argv[2], "wb").write(compiled[0].object_code())
print(elf.object_code.__module__)
"""


def guest_env(tmp_path: Path, llvm_dir: Path) -> dict[str, str]:
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    vmrunner.write_guest_modules(plugin, host_llvm=True)
    return dict(os.environ, PYTHONPATH=str(plugin), **{llvm_offload.ENV: str(llvm_dir)})


def test_a_guest_process_gets_the_object_its_own_llvm_would_make(tmp_path: Path) -> None:
    llvm_dir = tmp_path / "llvm"
    out = tmp_path / "policy.bpf.o"
    with llvm_offload.HostLLVM(llvm_dir) as service:
        run = subprocess.run(
            [sys.executable, "-c", GUEST, str(POLICY), str(out)],
            env=guest_env(tmp_path, llvm_dir), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "sockpol_llvm_offload"  # the patched function answered
    assert service.answered == 1
    assert list(llvm_dir.iterdir()) == []  # requests and answers are consumed
    compiled, _ = compile_source(POLICY.read_text(), str(POLICY))
    assert out.read_bytes() == elf.object_code(compiled[0].module)


def test_a_second_guest_gets_the_object_made_for_the_first(tmp_path: Path) -> None:
    """The matrix's lines compile the same policies: the second request for the same IR text
    is answered with the object already made, byte for byte what LLVM makes."""
    compiled, _ = compile_source(POLICY.read_text(), str(POLICY))
    outs = []
    for i in range(2):
        llvm_dir, out = tmp_path / f"llvm{i}", tmp_path / f"o{i}"
        (tmp_path / f"g{i}").mkdir()
        with llvm_offload.HostLLVM(llvm_dir) as service:
            run = subprocess.run(
                [sys.executable, "-c", GUEST, str(POLICY), str(out)],
                env=guest_env(tmp_path / f"g{i}", llvm_dir), capture_output=True, text=True,
                timeout=120,
            )  # fmt: skip
        assert run.returncode == 0, run.stderr
        outs.append((out.read_bytes(), service.answered, service.reused))
    assert outs[1][1:] == (1, 1)
    assert outs[0][0] == outs[1][0] == elf.object_code(compiled[0].module)


def test_without_the_directory_a_process_compiles_by_itself(tmp_path: Path) -> None:
    env = guest_env(tmp_path, tmp_path / "missing")
    run = subprocess.run(
        [sys.executable, "-c", GUEST, str(POLICY), str(tmp_path / "o")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "sockpol.codegen.elf"


def test_llvm_errors_on_the_host_are_the_guests(tmp_path: Path) -> None:
    with llvm_offload.HostLLVM(tmp_path) as service:
        with pytest.raises(llvm_offload.HostLLVMError, match="expected"):
            llvm_offload.object_code_via_host(tmp_path, "this is not IR", elf.object_code_from_ir)
    assert service.answered == 1


def test_a_silent_host_means_a_local_compile_not_a_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(llvm_offload, "GUEST_WAIT", 0.2)
    called = threading.Event()

    def local(text: str) -> bytes:
        called.set()
        return b"local"

    monkeypatch.setattr(llvm_offload, "_host_silent", False)
    assert llvm_offload.object_code_via_host(tmp_path, "ir", local) == b"local"
    assert called.is_set()
    assert list(tmp_path.iterdir()) == []  # the unanswered request is withdrawn
    # Once silent, the host is not asked again: no second wait.
    started = time.monotonic()
    assert llvm_offload.object_code_via_host(tmp_path, "ir", local) == b"local"
    assert time.monotonic() - started < 0.1
    assert list(tmp_path.iterdir()) == []


def test_the_host_thread_survives_a_request_it_cannot_answer_and_stops_promptly(
    tmp_path: Path,
) -> None:
    with llvm_offload.HostLLVM(tmp_path) as service:
        (tmp_path / "gone.ll").mkdir()  # unreadable as a file: skipped, the thread goes on
        with pytest.raises(llvm_offload.HostLLVMError):
            llvm_offload.object_code_via_host(tmp_path, "not IR", elf.object_code_from_ir)
    assert not service._thread.is_alive()
