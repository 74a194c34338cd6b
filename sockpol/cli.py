"""The `sockpol` command line.

Every error a user can cause ends as one readable message (positioned for policy files) and a
non-zero exit status; a traceback is shown only with SOCKPOL_DEBUG=1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sockpol import __version__
from sockpol.agent.options import arguments as agent_arguments
from sockpol.diagnostics import CompileError, Diagnostic, SockpolError, Source, render
from sockpol.doctor import doctor_arguments
from sockpol.metadata import describe_tls

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERNAL = 70


def _print_warnings(source_path: str, text: str, warnings: list[Diagnostic]) -> None:
    source = Source(source_path, text)
    for w in warnings:
        print(render(source, w), file=sys.stderr)


def _read_policy_file(path: str) -> str:
    from sockpol.dsl import read_source_file

    return read_source_file(path)


def _compile(path: str, backend: str = "sockmap"):
    from sockpol.compiler import compile_source

    text = _read_policy_file(path)
    compiled, warnings = compile_source(text, path, backend)
    _print_warnings(path, text, warnings)
    return text, compiled


# --- commands -----------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from sockpol.compiler import front_end

    text = _read_policy_file(args.file)
    policy_file, warnings = front_end(text, args.file)
    _print_warnings(args.file, text, warnings)
    for p in policy_file.policies:
        ports = ", ".join(str(r) for r in p.ports)
        tls = "" if p.tls is None else f", {describe_tls(p.tls.userspace.value)}"
        print(
            f"{args.file}: policy {p.name}: port {ports}, {len(p.rules)} rules, "
            f"default {p.default.value}{tls}"
        )
    return EXIT_OK


def cmd_compile(args: argparse.Namespace) -> int:
    from sockpol.compiler import select
    from sockpol.files import write_atomically

    text, compiled = _compile(args.file, args.backend)
    if args.policy is not None:
        compiled = [select(compiled, args.policy, Source(args.file, text))]
    if args.emit in ("llvm", "asm"):
        chunks = []
        for c in compiled:
            body = c.llvm_ir() if args.emit == "llvm" else c.assembly()
            header = f"; sockpol policy {c.policy.name}\n" if len(compiled) > 1 else ""
            chunks.append(header + body)
        out = "\n".join(chunks)
        if args.output and args.output != "-":
            write_atomically(Path(args.output), out.encode())
        else:
            sys.stdout.write(out)
        return EXIT_OK
    # Objects: every policy is compiled before any file is written.
    objects = [(c, c.object_code()) for c in compiled]
    targets = _object_paths(args.output, [c.policy.name for c, _ in objects])
    for (c, data), target in zip(objects, targets, strict=True):
        write_atomically(target, data)
        if args.stats:
            _print_stats(c, data)
        print(f"{target}: policy {c.policy.name}, {len(c.policy.rules)} rules", file=sys.stderr)
    return EXIT_OK


def _object_paths(output: str | None, names: list[str]) -> list[Path]:
    if output is None:
        return [Path(f"{n}.bpf.o") for n in names]
    out = Path(output)
    if out.is_dir():
        return [out / f"{n}.bpf.o" for n in names]
    if len(names) > 1:
        raise SockpolError(
            f"{output}: the file defines {len(names)} policies ({', '.join(names)}); "
            "give a directory with -o, or choose one with --policy NAME"
        )
    if not out.parent.is_dir():
        raise SockpolError(f"{output}: directory {out.parent} does not exist")
    return [out]


def _print_stats(c, data: bytes) -> None:
    """Sizes, and the verifier's instruction count when the object can be loaded here."""
    from sockpol.stats import compile_stats

    for line in compile_stats(c, data).lines():
        print(line, file=sys.stderr)


def _object_for(args: argparse.Namespace, tmpdir: str) -> Path:
    """A loadable object: the given .o as is, or a policy file compiled into `tmpdir` for the
    backend asked for (`--backend`), by default the one this kernel can run it with."""
    path = Path(args.file)
    backend = getattr(args, "backend", "auto")
    if path.suffix == ".o" or _is_elf(path):
        if backend != "auto":
            from sockpol.metadata import read_metadata

            have = read_metadata(path).backend
            if have != backend:
                raise SockpolError(
                    f"{path}: compiled for the {have} backend, not {backend} "
                    f"(compile it with --backend {backend})"
                )
        return path
    from sockpol.compiler import compile_policy, front_end

    text = _read_policy_file(args.file)
    policy_file, warnings = front_end(text, args.file)
    _print_warnings(args.file, text, warnings)
    chosen = policy_file.choose(args.policy)
    if backend == "auto":
        from sockpol.runtime.probe import choose_backend

        choice = choose_backend(chosen.tls is not None)
        backend = choice.backend
        if backend == "lsm":  # not the default: say why
            print(f"policy {chosen.name}: {backend} backend ({choice.reason})", file=sys.stderr)
    compiled = compile_policy(chosen, policy_file.source, backend=backend)
    target = Path(tmpdir) / f"{chosen.name}.bpf.o"
    target.write_bytes(compiled.object_code())
    return target


def _is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def cmd_load(args: argparse.Namespace) -> int:
    from sockpol import runtime

    with tempfile.TemporaryDirectory(prefix="sockpol-") as tmp:
        obj = _object_for(args, tmp)
        loaded = runtime.load(obj, args.cgroup, name=args.name, mode=args.mode)
        where = f"cgroup {args.cgroup}" if args.cgroup else "no cgroup (add sockets by hand)"
        if loaded.metadata.side == "ingress":
            where += " (ingress: the requests its processes receive on connections they accept)"
        print(
            f"loaded policy {loaded.name} ({loaded.backend} backend): {where}; "
            f"pinned at {loaded.pin_dir}"
        )
        loaded.close()
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    from sockpol import runtime

    with tempfile.TemporaryDirectory(prefix="sockpol-") as tmp:
        obj = _object_for_reload(args, tmp)
        result = runtime.reload(args.name, obj)
    how = (
        f"programs replaced, version {result.serial}; open connections handed over"
        if result.replaced
        else f"tables swapped in place, generation {result.generation}"
    )
    print(
        f"reloaded policy {result.name}: {result.rules} rules now in force on every "
        f"connection ({how}; {result.seconds * 1000:.0f} ms)"
    )
    return EXIT_OK


def _object_for_reload(args: argparse.Namespace, tmpdir: str) -> Path:
    """A .o as is; a policy file compiled for the loaded program's table shape, so that its
    tables can be swapped in place, or, when they do not fit that shape, for its own (the
    reload then replaces the programs)."""
    path = Path(args.file)
    if path.suffix == ".o" or _is_elf(path):
        return path
    from sockpol import runtime
    from sockpol.codegen.lower import TableShape
    from sockpol.compiler import ShapeMismatch, compile_policy, front_end

    loaded = next(iter(runtime.status(args.name)), None)
    if loaded is None or loaded.metadata is None:
        raise SockpolError(f"reload: no policy named '{args.name}' is loaded (see sockpol status)")
    text = _read_policy_file(args.file)
    policy_file, warnings = front_end(text, args.file)
    _print_warnings(args.file, text, warnings)
    # By default the policy of the loaded one's name, when the file has it.
    name = args.policy or (
        loaded.metadata.policy if policy_file.policy(loaded.metadata.policy) else None
    )
    chosen = policy_file.choose(name)
    shape = TableShape(**loaded.metadata.shape) if loaded.metadata.shape else None
    backend = loaded.backend  # a reload keeps the backend of the policy in force
    try:
        compiled = compile_policy(chosen, policy_file.source, shape, backend=backend)
    except ShapeMismatch:
        compiled = compile_policy(chosen, policy_file.source, backend=backend)
    target = Path(tmpdir) / f"{chosen.name}.bpf.o"
    target.write_bytes(compiled.object_code())
    return target


def cmd_unload(args: argparse.Namespace) -> int:
    from sockpol import runtime

    runtime.unload(args.name)
    print(f"unloaded policy {args.name}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from sockpol import runtime, statusview

    statuses = runtime.status(args.name or None)
    if args.name:
        if not statuses:
            raise SockpolError(f"no policy named '{args.name}' is loaded")
    counts = {s.name: c for s in statuses if (c := _counters(s)) is not None}
    if args.json:
        out = [_status_json(s, counts.get(s.name)) for s in statuses]
        print(json.dumps(out, indent=2, default=str))
        return EXIT_OK
    if args.name:  # one policy: the kernel's kTLS support is not part of its view
        print(statusview.policy(statuses[0], counts.get(args.name)))
    elif not statuses:
        print("no sockpol policies loaded")
        print(_tls_support_line())
    else:
        print(statusview.policies(statuses, counts, [_tls_support_line()]))
    return EXIT_OK


def _tls_support_line() -> str:
    from sockpol.runtime.probe import tls_policy_support
    from sockpol.statusview import tls_support_line

    support = tls_policy_support()
    return tls_support_line(support.ok, support.reason)


def _counters(s):
    """A policy's counters, or None when it has none (loaded by an older sockpol) or they
    cannot be read right now (unloaded meanwhile)."""
    from sockpol.runtime.counters import TelemetryError, read_counters
    from sockpol.runtime.libbpf import BpfError

    if s.metadata is None:
        return None
    try:
        return read_counters(s.pin_dir, s.metadata)
    except (TelemetryError, BpfError, OSError):
        return None


def _status_json(s, counters=None) -> dict:
    from dataclasses import asdict

    d = asdict(s)
    d["pin_dir"] = str(s.pin_dir)
    d["loaded_at"] = s.loaded_at.isoformat() if s.loaded_at else None
    d["reloaded_at"] = s.reloaded_at.isoformat() if s.reloaded_at else None
    # The version in force: its source, and since when it (and its counters) count.
    meta = s.metadata
    d["version"] = {
        "serial": s.serial,
        "source": meta.source_path if meta else None,
        "source_sha256": meta.source_sha256 if meta else None,
        "object_sha256": s.object_sha256 or None,
        "since": s.since.isoformat() if s.since else None,
    }
    d["counters"] = counters.to_json() if counters is not None else None
    return d


def cmd_mode(args: argparse.Namespace) -> int:
    from sockpol.runtime import counters

    if args.mode is None:
        print(f"{args.name}: {counters.read_mode(counters.policy_dir(args.name))}")
        return EXIT_OK
    before = counters.set_mode(args.name, args.mode)
    change = "unchanged" if before == args.mode else f"was {before}"
    print(f"{args.name}: mode {args.mode} ({change}); applies from the next message on")
    return EXIT_OK


def cmd_events(args: argparse.Namespace) -> int:
    import time

    from sockpol.runtime.events import Event, EventStream, format_json

    deadline = time.monotonic() + args.duration if args.duration is not None else None
    seen = 0

    def stop() -> bool:
        return (args.count is not None and seen >= args.count) or (
            deadline is not None and time.monotonic() >= deadline
        )

    with EventStream(args.names) as stream:
        for item in stream.follow(stop):
            print(format_json(item) if args.json else item.text(), flush=True)
            if isinstance(item, Event):
                seen += 1
                if stop():
                    break
    return EXIT_OK


def cmd_metrics(args: argparse.Namespace) -> int:
    import signal
    import threading

    from sockpol.runtime import metrics

    try:
        host, port = metrics.parse_listen(args.listen)
    except ValueError as e:
        raise SockpolError(f"metrics: {e}") from None
    try:
        server, _ = metrics.serve(host, port)
    except OSError as e:
        raise SockpolError(f"metrics: cannot listen on {args.listen}: {e.strerror}") from None
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    bound = server.server_address  # type: ignore[attr-defined]
    print(f"serving sockpol metrics on http://{bound[0]}:{bound[1]}/metrics", flush=True)
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    server.shutdown()  # type: ignore[attr-defined]
    return EXIT_OK


BACKEND_TEXT = {
    "sockmap": "sk_msg on a sockhash of the governed connections",
    "lsm": "BPF LSM program on socket_sendmsg; needs BPF LSM, works with kTLS on every kernel",
}


def cmd_inspect(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from sockpol.metadata import read_metadata

    meta = read_metadata(args.object)
    if args.json:
        print(json.dumps(asdict(meta), indent=2))
        return EXIT_OK
    ports = ", ".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in meta.ports)
    print(
        f"policy {meta.policy}: port {ports}; default {meta.default}; max-head {meta.max_head}; "
        f"{describe_tls(meta.tls)}"
    )
    print(f"backend {meta.backend} ({BACKEND_TEXT.get(meta.backend, '?')})")
    print(
        f"source {meta.source_path} sha256 {meta.source_sha256[:16]}; "
        f"sockpol {meta.compiler_version}"
    )
    for r in meta.rules:
        print(f"  rule {r.index:>3}  line {r.line:>4}  {r.text}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from sockpol.demo import run_demo

    return run_demo(args.file, policy=args.policy, cgroup_parent=args.cgroup_parent)


# --- argument parsing ---------------------------------------------------------------------------


# --- the commands: one table, one way to register -----------------------------------------------


@dataclass(frozen=True)
class Command:
    """A subcommand: its arguments, and where its code lives ("module:function"), imported only
    when it runs: the authors' commands must not load the runtime (libbpf), and the runtime's
    must not load the compiler (lark, llvmlite), so that each starts fast and runs where the
    other cannot (tests/test_authoring.py checks the first)."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    target: str

    def run(self, args: argparse.Namespace) -> int:
        module, _, function = self.target.partition(":")
        return getattr(importlib.import_module(module), function)(args)


def _file(p: argparse.ArgumentParser) -> None:
    p.add_argument("file")


def _compile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file")
    p.add_argument("-o", "--output", help="output file, or directory for several policies")
    p.add_argument("--policy", help="the policy to compile when the file has several")
    p.add_argument("--emit", choices=["obj", "llvm", "asm"], default="obj")
    p.add_argument(
        "--backend",
        choices=["sockmap", "lsm"],
        default="sockmap",
        help="sockmap: sk_msg on a sockhash (default); lsm: a BPF LSM program on socket_sendmsg "
        "(kernels that reject TLS on sockmap sockets; docs/ktls.md)",
    )
    p.add_argument(
        "--stats",
        action="store_true",
        help="print automaton and table sizes, and (as root) the verifier's instruction count",
    )


def _load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file")
    p.add_argument("--cgroup", help="cgroup v2 directory whose TCP connections are governed")
    p.add_argument("--policy", help="the policy to load when the file has several")
    p.add_argument("--name", help="name to load under (default: the policy's name)")
    p.add_argument(
        "--mode", choices=["enforce", "dry-run"], help="start in this mode, not the policy's"
    )
    p.add_argument(
        "--backend",
        choices=["auto", "sockmap", "lsm"],
        default="auto",
        help="the program that enforces it; auto: sockmap, or lsm for a tls policy where the "
        "kernel rejects TLS on sockmap sockets and BPF LSM works (see sockpol doctor)",
    )


def _reload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    p.add_argument("file", help="policy file (.pol) or compiled object (.o)")
    p.add_argument("--policy", help="the policy to use when the file has several")


def _name(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")


def _status_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true")


def _mode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    p.add_argument("mode", nargs="?", choices=["enforce", "dry-run"])


def _events_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", metavar="NAME", help="policies to follow (default: all)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--count", type=int, help="stop after this many events")
    p.add_argument("--duration", type=float, help="stop after this many seconds")


def _metrics_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--listen", required=True, metavar="ADDR:PORT", help="e.g. 127.0.0.1:9464 or :9464"
    )


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("object")
    p.add_argument("--json", action="store_true")


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", default=None)
    p.add_argument("--policy")
    p.add_argument("--cgroup-parent", help="cgroup v2 directory to create the demo cgroup in")


def _lint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", help="policy files or directories")
    p.add_argument("--format", choices=["text", "json", "sarif"], default="text")


def _fmt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", help="policy files or directories")
    p.add_argument("--check", action="store_true", help="only report files that would change")
    p.add_argument("--diff", action="store_true", help="print the changes, write nothing")


def _test_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", help=".poltest or .pol files, or directories (default: .)")
    p.add_argument("--junit", metavar="FILE", help="also write a JUnit XML report")
    p.add_argument("-v", "--verbose", action="store_true", help="list passing tests too")


def _explain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="policy file")
    p.add_argument("request", nargs="?", help="raw request file, or - for stdin (the default)")
    p.add_argument("--policy", help="the policy to use when the file has several")
    p.add_argument("--method")
    p.add_argument("--path")
    p.add_argument("--host")
    p.add_argument("--header", action="append", metavar="'NAME: VALUE'")
    p.add_argument("--raw", action="store_true", help="do not turn LF line ends into CRLF")
    p.add_argument("--enforce", action="store_true", help="judge as enforcing, whatever the mode")


AUTHORING = "sockpol.authoring.commands"
COMMANDS: tuple[Command, ...] = (
    Command("check", "parse and check a policy file", _file, "sockpol.cli:cmd_check"),
    Command("compile", "compile a policy file to a BPF object", _compile_args,
            "sockpol.cli:cmd_compile"),
    Command("load", "load a policy (.pol or compiled .o) and attach it", _load_args,
            "sockpol.cli:cmd_load"),
    Command("reload", "put another policy in force for a loaded name, on every connection",
            _reload_args, "sockpol.cli:cmd_reload"),
    Command("unload", "detach and remove a loaded policy", _name, "sockpol.cli:cmd_unload"),
    Command("status", "list loaded policies; with a name, its rules and their counters",
            _status_args, "sockpol.cli:cmd_status"),
    Command("mode", "show or switch a loaded policy's mode (enforce, dry-run) without reloading",
            _mode_args, "sockpol.cli:cmd_mode"),
    Command("events", "stream refused, dry-run, audit and logged requests as they happen",
            _events_args, "sockpol.cli:cmd_events"),
    Command("metrics", "serve Prometheus metrics of all loaded policies", _metrics_args,
            "sockpol.cli:cmd_metrics"),
    Command("inspect", "show the policy record inside a compiled object", _inspect_args,
            "sockpol.cli:cmd_inspect"),
    Command("demo", "enforce a policy on live loopback traffic from a temporary cgroup",
            _demo_args, "sockpol.cli:cmd_demo"),
    Command("lint", "exact findings: shadowed, duplicate, unreachable rules, ...", _lint_args,
            f"{AUTHORING}:cmd_lint"),
    Command("fmt", "rewrite policy files in the canonical layout", _fmt_args,
            f"{AUTHORING}:cmd_fmt"),
    Command("test", "run policy test files (*.poltest) against the policies", _test_args,
            f"{AUTHORING}:cmd_test"),
    Command("explain", "how a request is read and which rule decides it", _explain_args,
            f"{AUTHORING}:cmd_explain"),
    Command("doctor", "probe the running kernel: what sockpol can enforce here (incl. kTLS)",
            doctor_arguments, "sockpol.doctor:cmd_doctor"),
    Command("agent", "keep this node's policies equal to a desired state (directory, Kubernetes)",
            agent_arguments, "sockpol.agent.main:cmd_agent"),
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sockpol",
        description="Compile HTTP access policies to BPF and enforce them in the kernel.",
    )
    parser.add_argument("--version", action="version", version=f"sockpol {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help)
        command.arguments(p)
        p.set_defaults(func=command.run)
    return parser


def run(argv: list[str] | None = None, on_error: Callable[[str], None] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    report = on_error or (lambda text: print(text, file=sys.stderr))
    try:
        return args.func(args)
    except CompileError as e:
        report(str(e))
        n = sum(1 for d in e.diagnostics if d.severity.value == "error")
        report(f"{n} error{'s' if n != 1 else ''}; nothing written")
        return EXIT_ERROR
    except SockpolError as e:
        report(f"sockpol: {e}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as e:  # a bug: say so plainly, show the traceback only on request
        if os.environ.get("SOCKPOL_DEBUG"):
            raise
        report(
            f"sockpol: internal error: {type(e).__name__}: {e}\n"
            "  this is a bug in sockpol; rerun with SOCKPOL_DEBUG=1 for details"
        )
        return EXIT_INTERNAL


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
