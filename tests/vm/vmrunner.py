"""Run pytest inside a VM booted with one of Debian's kernels, and bring the results back.

Why a VM: the development and CI hosts run one kernel (6.18 without CONFIG_TLS), and sockpol must
load and enforce on every kernel line users run (vmkernels.py lists the matrix and resolves it).
virtme-ng boots a kernel with the host's root file system (9p, behind a writable overlay), so the
guest runs the project's own .venv python on the project's own checkout; only the kernel differs.

Recipe (../shared/notes/ktls-vm.md, verified on these machines):
- host packages qemu-system-x86, busybox-static, kmod; virtme-ng from PyPI in the project's venv
  (the `vm` extra) with the venv's bin on PATH (vng runs virtme-run);
- the kernel's packages downloaded and extracted into a cache, never installed as packages; their
  modules, vmlinuz and config go to /usr/lib/modules/<release> and `depmod` runs there
  (vmkernels.install); the guest then uses the host's /lib/modules (virtme_root_mods=1);
- qemu under TCG (`--disable-kvm`: nested KVM hangs here), `--verbose` or the guest's console is
  lost, and `vng` exits 255 even when the guest script succeeded, so the guest writes its own
  exit status, and a pytest plugin in the guest (guest_plugin.py) streams one JSON line per test
  phase into a directory shared read-write (`--rwdir`).

Run by hand:  sudo .venv/bin/python tests/vm/vmrunner.py [--kernel LINE] [pytest args]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import llvm_offload
from vmkernels import CACHE, LINES, Kernel, install, resolve

REPO = Path(__file__).resolve().parents[2]
# Host packages the VM itself needs, and those the guest's tests use (it sees the host's root).
VM_PACKAGES = ("qemu-system-x86", "busybox-static", "kmod")
GUEST_PACKAGES = ("nginx", "openssl", "curl")

BOOT_TIMEOUT = 120.0  # of a run's time limit, kept for booting and shutting down the guest
EXIT_LINE = "SOCKPOL-VM-EXIT:"
START_LINE = "SOCKPOL-VM-START:"


class VMUnavailable(Exception):
    """The VM cannot be run here at all (not root, not x86-64 Linux, tools not obtainable)."""


class VMError(Exception):
    """The VM was set up but did not produce results (boot failure, timeout, guest crash)."""


# ---------------------------------------------------------------------------------------------
# Host preparation


def _run(argv: Sequence[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)


def check_host() -> None:
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        raise VMUnavailable(f"the VM runner boots x86-64 Debian kernels; this is {os.uname()}")
    if os.geteuid() != 0:
        raise VMUnavailable("not root: installing the guest kernel's modules needs root")
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise VMUnavailable("not a Debian-like host (apt-get/dpkg-deb missing)")


def missing_packages(packages: Sequence[str]) -> list[str]:
    missing = []
    for pkg in packages:
        out = _run(["dpkg-query", "-W", "-f=${Status}", pkg])
        if "install ok installed" not in out.stdout:
            missing.append(pkg)
    return missing


def ensure_packages(packages: Sequence[str]) -> None:
    """apt-get install what is missing (no recommends: qemu's would pull in a desktop)."""
    missing = missing_packages(packages)
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "update", "-qq"], env=env)
    out = _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)
    if out.returncode != 0:
        raise VMUnavailable(f"apt-get install {' '.join(missing)} failed: {out.stderr[-500:]}")


def venv_bin() -> Path:
    return Path(sys.executable).parent


def ensure_vng() -> Path:
    """virtme-ng in this interpreter's environment (the project's .venv, `vm` extra)."""
    vng = venv_bin() / "vng"
    if not vng.exists():
        out = _run(
            [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
             "virtme-ng>=1.30"]
        )  # fmt: skip
        if out.returncode != 0 or not vng.exists():
            raise VMUnavailable(f"pip install virtme-ng failed: {out.stderr[-500:]}")
    return vng


# ---------------------------------------------------------------------------------------------
# Booting and collecting results


@dataclass
class TestResult:
    nodeid: str
    outcome: str  # passed, failed, error, skipped, xfailed, unfinished
    message: str = ""
    details: str = ""
    seconds: float = 0.0


@dataclass
class VMRun:
    kernel: Kernel
    pytest_args: list[str]
    status: int | None  # the guest pytest's exit status, None if it never finished
    seconds: float  # wall time of the whole vng run
    guest_release: str | None
    console: str
    pytest_log: str
    results: dict[str, TestResult] = field(default_factory=dict)
    verifier: list[dict] = field(default_factory=list)  # test_verifier_budget's records
    # Objects the host's LLVM answered the guest with, seconds, and how many of them had been
    # made for another line's guest (llvm_offload._MADE).
    host_llvm: tuple[int, float, int] = (0, 0.0, 0)

    def tail(self, lines: int = 40) -> str:
        text = self.pytest_log or self.console
        return "\n".join(text.splitlines()[-lines:])


GUEST_SCRIPT = """\
#!/bin/sh
# Generated by tests/vm/vmrunner.py; runs as root inside the VM.
export PATH={path} HOME=/root SOCKPOL_IN_VM=1 CI={ci} PYTHONDONTWRITEBYTECODE=1
{extra_env}
echo "{start} $(uname -r) $(cut -d' ' -f1 /proc/uptime)"
mount | grep -q ' /sys/fs/bpf type bpf' || mount -t bpf bpf /sys/fs/bpf
cd {repo} || exit 1
PYTHONPATH={plugin_dir} SOCKPOL_VM_RESULTS={results}/results.jsonl \\
    timeout -k 10 {guest_timeout} {python} -m pytest -p no:cacheprovider -p sockpol_vm_guest \\
    -ra --durations=15 {args} > {results}/pytest.log 2>&1
status=$?
echo "$status" > {results}/status
echo "{exit} $status"
"""

GUEST_SITECUSTOMIZE = """\
# Generated by tests/vm/vmrunner.py: LLVM's part of the guest's compiles goes to the host.
import sockpol_llvm_offload

sockpol_llvm_offload.install_guest_hook()
"""


def write_guest_modules(plugin_dir: Path, host_llvm: bool) -> None:
    """The guest's PYTHONPATH directory: the pytest plugin and, with `host_llvm`, the
    sitecustomize that sends LLVM's work to the host (every Python process of the guest runs
    it, the `sockpol` CLI the tests start too)."""
    here = Path(__file__).parent
    shutil.copy(here / "guest_plugin.py", plugin_dir / "sockpol_vm_guest.py")
    if host_llvm:
        shutil.copy(here / "llvm_offload.py", plugin_dir / "sockpol_llvm_offload.py")
        (plugin_dir / "sitecustomize.py").write_text(GUEST_SITECUSTOMIZE)


def run(
    kernel: Kernel,
    pytest_args: Sequence[str],
    timeout: float = 600,
    env: dict[str, str] | None = None,
    memory: str = "2G",
    cpus: int = 2,
    objects: Path | None = None,
    host_llvm: bool = os.environ.get("SOCKPOL_VM_LOCAL_LLVM") != "1",
) -> VMRun:
    """Boot `kernel`, run pytest with `pytest_args` in the guest (cwd = the repo), collect.

    `objects`: compiled policies for test_verifier_budget, handed to the guest (Python under TCG
    is slow, so they are compiled on the host); its counts come back in VMRun.verifier.
    `host_llvm`: LLVM's part of the guest's compiles is done by the host (llvm_offload.py; off
    with SOCKPOL_VM_LOCAL_LLVM=1)."""
    vng = ensure_vng()
    install(kernel)
    with tempfile.TemporaryDirectory(prefix="sockpol-vm-") as tmp:
        shared = Path(tmp)
        results = shared / "results"
        results.mkdir()
        plugin_dir = shared / "plugin"
        plugin_dir.mkdir()
        write_guest_modules(plugin_dir, host_llvm)
        llvm_dir = results / "llvm"
        script = shared / "guest.sh"
        # The guest's kTLS tests check the kernel against what its changelog says.
        env = {
            "SOCKPOL_EXPECT_KTLS_SOCKMAP": "0" if kernel.rejects_tls_sockmap else "1",
            "SOCKPOL_VERIFIER_REPORT": str(results / "verifier.jsonl"),
            **(env or {}),
        }
        if host_llvm:
            env[llvm_offload.ENV] = str(llvm_dir)
        if objects is not None:  # the shared directory is the one the guest can see
            shutil.copytree(objects, results / "budget-objects")
            env["SOCKPOL_BUDGET_OBJECTS"] = str(results / "budget-objects")
        extra = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())
        script.write_text(
            GUEST_SCRIPT.format(
                path=shlex.quote(f"{venv_bin()}:/usr/sbin:/usr/bin:/sbin:/bin"),
                ci=shlex.quote(os.environ.get("CI", "")),
                extra_env=extra,
                start=START_LINE,
                exit=EXIT_LINE,
                repo=shlex.quote(str(REPO)),
                guest_timeout=int(max(timeout - BOOT_TIMEOUT, 60)),
                python=shlex.quote(sys.executable),
                results=shlex.quote(str(results)),
                plugin_dir=shlex.quote(str(plugin_dir)),
                args=" ".join(shlex.quote(a) for a in pytest_args),
            )
        )
        script.chmod(0o755)
        argv = [
            str(vng), "--run", str(kernel.vmlinuz), "--disable-kvm",
            "--memory", memory, "--cpus", str(cpus), "--verbose",
            "--rwdir", str(results), "--exec", str(script),
        ]  # fmt: skip
        started = time.monotonic()
        with llvm_offload.HostLLVM(llvm_dir) if host_llvm else nullcontext() as service:
            console = _boot(argv, timeout)
        seconds = time.monotonic() - started
        status_file = results / "status"
        status = int(status_file.read_text()) if status_file.exists() else None
        log_file = results / "pytest.log"
        run_ = VMRun(
            kernel,
            list(pytest_args),
            status,
            seconds,
            _guest_release(console),
            console,
            log_file.read_text(errors="replace") if log_file.exists() else "",
        )
        stream = results / "results.jsonl"
        if stream.exists():
            run_.results = parse_results(stream.read_text())
        report = results / "verifier.jsonl"
        if report.exists():
            run_.verifier = [json.loads(line) for line in report.read_text().splitlines() if line]
        if service is not None:
            run_.host_llvm = (service.answered, service.seconds, service.reused)
        _keep_log(kernel, run_)
    return run_


def _keep_log(kernel: Kernel, run_: VMRun) -> None:
    """The last guest log per kernel stays in the cache, for a look after a failed CI run."""
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (logs / f"{kernel.line}.pytest.log").write_text(run_.pytest_log)
    (logs / f"{kernel.line}.console.log").write_text(run_.console)


def _boot(argv: list[str], timeout: float) -> str:
    """Run vng with a hard timeout; its own process group, so qemu dies with it."""
    env = dict(os.environ, PATH=f"{venv_bin()}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise VMError(
            f"the VM did not finish within {timeout:.0f} s; console tail:\n"
            + "\n".join(out.decode(errors="replace").splitlines()[-30:])
        ) from None
    return out.decode(errors="replace")


def _guest_release(console: str) -> str | None:
    m = re.search(rf"^{START_LINE} (\S+)", console, re.MULTILINE)
    return m.group(1) if m else None


def parse_results(stream: str) -> dict[str, TestResult]:
    """The guest plugin's JSON lines -> {node id: result}, one outcome per test.

    A test with a failed phase failed (call) or errored (setup/teardown); a skipped setup is a
    skip, or an xfail when pytest says so; a test that started but never finished was running
    when the guest's time ran out.
    """
    phases: dict[str, dict[str, dict]] = {}
    for line in stream.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill
        phases.setdefault(rec["nodeid"], {})[rec["when"]] = rec
    results = {}
    for nodeid, by_when in phases.items():
        seconds = sum(r.get("seconds", 0) for r in by_when.values())
        failed = [r for w, r in by_when.items() if r.get("outcome") == "failed"]
        if failed:
            r = failed[0]
            outcome = "failed" if r["when"] == "call" else "error"
            results[nodeid] = TestResult(nodeid, outcome, r["message"], r["details"], seconds)
            continue
        done = [by_when[w] for w in ("setup", "call") if w in by_when]
        skipped = [r for r in done if r["outcome"] == "skipped"]
        if skipped:
            r = skipped[0]
            outcome = "xfailed" if r.get("xfail") is not None else "skipped"
            message = r["xfail"] if r.get("xfail") else r["message"]
            results[nodeid] = TestResult(nodeid, outcome, message, "", seconds)
        elif "teardown" in by_when:
            results[nodeid] = TestResult(nodeid, "passed", "", "", seconds)
        else:
            results[nodeid] = TestResult(
                nodeid, "unfinished", "still running when the guest's time limit ended it"
            )
    return results


def collect(paths: Sequence[str]) -> list[str]:
    """The node ids pytest collects for `paths` here on the host (same code as the guest)."""
    out = _run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q", *paths],
        cwd=REPO,
        env=dict(os.environ, SOCKPOL_COLLECT_ONLY="1"),
        timeout=300,
    )
    ids = [line for line in out.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    if not ids:
        raise VMError(f"collecting {paths} found nothing:\n{out.stdout[-2000:]}{out.stderr}")
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--kernel", default="newest", help="a line of vmkernels.LINES")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("pytest_args", nargs="*", default=["tests/kernel"])
    args = parser.parse_args(argv)
    check_host()
    ensure_packages(VM_PACKAGES + GUEST_PACKAGES)
    kernels, notes = resolve([line for line in LINES if line.name == args.kernel])
    for note in notes:
        print(f"note: {note}")
    kernel = kernels[args.kernel]
    print(f"booting {kernel.describe()} ...", flush=True)
    result = run(kernel, args.pytest_args, timeout=args.timeout)
    print(result.pytest_log or result.console[-5000:])
    for record in result.verifier:  # the verifier budget's counts, where it ran
        print(f"verifier: {record}")
    print(f"guest {result.guest_release}: pytest exit {result.status}, {result.seconds:.0f} s")
    return 1 if result.status is None else result.status


if __name__ == "__main__":
    sys.exit(main())
