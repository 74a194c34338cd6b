"""Compiled objects of the desired policies, kept on disk for loads and reloads.

An object is compiled once per (source text, policy, table shape) and stored as
`<state dir>/objects/<digest>.bpf.o`; the runtime's state record keeps that path, so after a
restart the agent still has the object a loaded version came from (its last good version, when
the policy's text has since become invalid). A text that does not compile is remembered with its
error, so a broken policy is compiled once, not on every pass.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sockpol.agent.desired import PolicySpec
from sockpol.diagnostics import CompileError, SockpolError
from sockpol.files import write_atomically
from sockpol.metadata import PolicyMetadata, read_metadata


class CompileFailure(SockpolError):
    pass


@dataclass(frozen=True)
class Compiled:
    path: Path
    meta: PolicyMetadata
    sha256: str  # of the object file


class ObjectStore:
    def __init__(self, directory: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self.clock = clock
        self._errors: dict[tuple[str, str | None], str] = {}
        self._done: dict[str, Compiled] = {}
        self._used: dict[str, float] = {}  # digest -> when compile() last returned it

    def compile(self, spec: PolicySpec, shape: dict | None = None) -> Compiled:
        """The object of `spec`'s policy (for a loaded program's table `shape`, when given);
        CompileFailure with the compiler's positioned messages when the text is invalid,
        ShapeMismatch when the policy does not fit `shape`."""
        ident = (spec.source_sha256, spec.policy)
        if ident in self._errors:
            raise CompileFailure(self._errors[ident])
        digest = hashlib.sha256(
            json.dumps([spec.source_sha256, spec.policy, shape], sort_keys=True).encode()
        ).hexdigest()[:32]
        self._used[digest] = self.clock()
        if digest in self._done:
            return self._done[digest]
        path = self.directory / f"{digest}.bpf.o"
        if not path.exists():
            try:
                data = self._object_code(spec, shape)
            except CompileError as e:
                self._errors[ident] = str(e)
                raise CompileFailure(str(e)) from None
            self.directory.mkdir(parents=True, exist_ok=True)
            write_atomically(path, data)
        digest_of_object = hashlib.sha256(path.read_bytes()).hexdigest()
        compiled = Compiled(path, read_metadata(path), digest_of_object)
        self._done[digest] = compiled
        return compiled

    @staticmethod
    def _object_code(spec: PolicySpec, shape: dict | None) -> bytes:
        from sockpol.codegen.lower import TableShape
        from sockpol.compiler import compile_policy, front_end

        policy_file, _warnings = front_end(spec.source, spec.source_name)
        chosen = policy_file.choose(spec.policy)
        return compile_policy(
            chosen, policy_file.source, TableShape(**shape) if shape else None
        ).object_code()

    def collect(self, keep: set[Path], min_age: float = 3600.0) -> list[Path]:
        """Remove the objects that no loaded version came from (`keep`) and that were neither
        written nor asked for in the last `min_age` seconds (the state directory lives on the
        host: without this it would grow with every edit of every policy, ~400 KB an object,
        two per edit). The objects of the desired policies are asked for on every pass, so they
        stay; a superseded version goes an hour after its last use. Returns what was
        removed."""
        now, now_wall = self.clock(), time.time()
        recent = {
            c.path.resolve()
            for digest, c in self._done.items()
            if now - self._used.get(digest, now) < min_age
        }
        keep = {p.resolve() for p in keep} | recent
        removed = []
        for path in self.directory.glob("*.bpf.o"):
            try:
                if path.resolve() in keep or now_wall - path.stat().st_mtime < min_age:
                    continue
                path.unlink()
            except OSError:
                continue
            removed.append(path)
        gone = {p.resolve() for p in removed}
        for digest in [d for d, c in self._done.items() if c.path.resolve() in gone]:
            del self._done[digest]  # compiled again if it is ever asked for
            self._used.pop(digest, None)
        return removed

    @staticmethod
    def existing(path: str) -> Compiled | None:
        """An object a loaded version came from, if it is still there (its last good)."""
        p = Path(path)
        try:
            return Compiled(p, read_metadata(p), hashlib.sha256(p.read_bytes()).hexdigest())
        except (SockpolError, OSError):
            return None
