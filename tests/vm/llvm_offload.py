"""LLVM's part of every compile in a guest, done by the host: the guests' tests compile policies
all the time, and under TCG the CPU-bound part of a compile runs about 15 times slower.

Measured on the host (2026-12-05), the CORE plan's files compiled 92 policies: 9.8 s in
compile_policy (parsing, automata, building the IR) and 23.6 s in LLVM (optimizing and emitting
the object), out of 38 s of CPU for the whole run. In a guest that was most of its time.

What moves: only `sockpol.codegen.elf.object_code`, a pure function from the module's IR text to
the object's bytes (the guest runs the host's checkout and .venv, so the same sockpol and the same
llvmlite). The guest still parses, checks and lowers every policy and builds its IR; it writes the
IR text into the directory it shares with the host and waits for the object. The host's thread
(`HostLLVM`) answers it with `elf.object_code_from_ir`. If no answer comes within
`GUEST_WAIT` seconds (the host thread died, say), the guest process compiles by itself from
then on, and says so on stderr: slower, never wrong, never hanging.

The protocol: `<id>.ll` (the IR text, renamed into place once written), answered by `<id>.o`
(the object) or `<id>.err` (LLVM's error, which the guest raises as its own compile would);
both renamed into place, so that a reader never sees half a file.

Guest side: `install_guest_hook()`, run from the `sitecustomize.py` that the runner puts next to
the pytest plugin (PYTHONPATH), so that `sockpol` subprocesses the tests start (the CLI) use it
too. It patches `sockpol.codegen.elf` only when something imports it: a Python process that
compiles nothing pays nothing. SOCKPOL_VM_LLVM (the directory) switches it on.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.util
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from types import ModuleType

ENV = "SOCKPOL_VM_LLVM"
# Objects already made, by their IR text's digest, for every guest of this process: the matrix's
# lines compile the same policies into the same IR (an lsm object's kernel layout aside), and
# LLVM's time on the host is time the two guests' CPUs do not get. A pure function of the text,
# so an answer from here is the answer LLVM would make.
_MADE: dict[str, bytes] = {}
_MADE_LOCK = threading.Lock()
GUEST_WAIT = 120.0  # seconds; a compile on the host takes about a second at most
POLL = 0.02


def _publish(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the whole file or none."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --- the host ---------------------------------------------------------------------------------


class HostLLVM:
    """A thread answering the guest's `.ll` requests in `directory` until stopped."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.answered = 0
        self.reused = 0  # of them, objects another guest's request had made
        self.seconds = 0.0  # host time spent in LLVM for the guest
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="host-llvm", daemon=True)

    def __enter__(self) -> HostLLVM:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _serve(self) -> None:
        from sockpol.codegen.elf import object_code_from_ir

        while not self._stop.is_set():
            try:
                requests = sorted(
                    p for p in self.directory.glob("*.ll") if not p.name.startswith(".")
                )
            except OSError:  # the directory is going away with the run
                return
            before = self.answered
            for request in requests:
                if self._stop.is_set():
                    return
                started = time.monotonic()
                try:
                    text = request.read_text()
                except OSError:  # withdrawn by a guest that gave up
                    continue
                digest = hashlib.sha256(text.encode()).hexdigest()
                with _MADE_LOCK:
                    made = _MADE.get(digest)
                try:
                    answer, data = ".o", made if made is not None else object_code_from_ir(text)
                except Exception as e:  # LLVM's error goes to the guest, which raises it
                    answer, data = ".err", f"{type(e).__name__}: {e}".encode()
                if answer == ".o" and made is None:
                    with _MADE_LOCK:
                        _MADE[digest] = data
                self.reused += made is not None
                try:
                    _publish(request.with_suffix(answer), data)
                    request.unlink(missing_ok=True)
                except OSError:  # nobody to answer: the guest will compile by itself
                    continue
                self.answered += 1
                self.seconds += time.monotonic() - started
            if self.answered == before:  # nothing (or nothing answerable) came: wait a little
                self._stop.wait(POLL)


# --- the guest --------------------------------------------------------------------------------


class HostLLVMError(RuntimeError):
    """LLVM on the host refused the module (it would have refused it in the guest too)."""


# Set once the host has not answered in time: this process then compiles by itself, rather
# than waiting GUEST_WAIT on every compile of a run whose host thread is gone.
_host_silent = False


def object_code_via_host(directory: Path, ir_text: str, local) -> bytes:
    """The object of `ir_text`, from the host; `local(ir_text)` if the host does not answer."""
    global _host_silent
    if _host_silent:
        return local(ir_text)
    # Not the pid alone: pids wrap in a long guest run, and a name could meet an answer left
    # for a process that was killed while it waited.
    name = f"{os.getpid()}-{uuid.uuid4().hex}"
    request = directory / f"{name}.ll"
    _publish(request, ir_text.encode())
    deadline = time.monotonic() + GUEST_WAIT
    while time.monotonic() < deadline:
        for suffix in (".o", ".err"):
            answer = request.with_suffix(suffix)
            if answer.exists():
                data = answer.read_bytes()
                answer.unlink(missing_ok=True)
                if suffix == ".err":
                    raise HostLLVMError(data.decode(errors="replace"))
                return data
        time.sleep(POLL)
    request.unlink(missing_ok=True)
    _host_silent = True
    print(f"llvm_offload: no answer from the host in {GUEST_WAIT:.0f} s; compiling here "
          "from now on", file=sys.stderr)  # fmt: skip
    return local(ir_text)


def _patch(elf: ModuleType, directory: Path) -> None:
    local = elf.object_code_from_ir

    def object_code(module) -> bytes:
        return object_code_via_host(directory, str(module), local)

    elf.object_code = object_code


class _ElfImportHook(importlib.abc.MetaPathFinder):
    """Patches `sockpol.codegen.elf` right after it is first imported."""

    NAME = "sockpol.codegen.elf"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def find_spec(self, fullname, path, target=None):
        if fullname != self.NAME:
            return None
        sys.meta_path.remove(self)  # find the real spec without finding ourselves
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module
        directory = self.directory

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            _patch(module, directory)

        spec.loader.exec_module = exec_and_patch
        return spec


def install_guest_hook() -> None:
    directory = os.environ.get(ENV)
    if not directory or not Path(directory).is_dir():
        return
    elf = sys.modules.get(_ElfImportHook.NAME)
    if elf is not None:
        _patch(elf, Path(directory))
    else:
        sys.meta_path.insert(0, _ElfImportHook(Path(directory)))
