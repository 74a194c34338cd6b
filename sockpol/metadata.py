"""The self-description carried inside every compiled object.

A compiled `.o` has a non-allocated ELF section `.sockpol.meta` holding this record as JSON, so a
prebuilt object can be loaded, inspected and reported on without its source. Codegen writes it;
the runtime and `sockpol inspect` read it back with pyelftools.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from sockpol.diagnostics import SockpolError

SECTION = ".sockpol.meta"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class RuleInfo:
    index: int
    action: str
    line: int
    column: int
    text: str
    log: bool = False  # `log`: the rule records an event when it passes a request


@dataclass(frozen=True)
class PolicyMetadata:
    policy: str
    ports: list[list[int]]  # inclusive [low, high] ranges
    default: str
    max_head: int
    rules: list[RuleInfo]
    source_path: str
    source_sha256: str
    compiler_version: str
    format: int = FORMAT_VERSION
    reasons: dict[str, str] = field(default_factory=dict)  # refusal reason code -> meaning
    shape: dict[str, int] = field(default_factory=dict)  # table dimensions (lower.TableShape)
    mode: str = "enforce"  # the mode the policy starts in: enforce or dry-run
    telemetry: dict = field(default_factory=dict)  # counter/event layouts (telemetry.layout())
    # `tls`: the ports carry TLS, and what happens to user-space TLS: "deny" or "allow"; None
    # for a plaintext policy (and for objects from before `tls`, which lack the key).
    tls: str | None = None
    # `answer`: the statuses refusals are answered with, the policy's own first (0: drop); []
    # for objects from before answers (they drop every refusal).
    answers: list[int] = field(default_factory=list)
    # `side`: "egress" (sk_msg on the connections the cgroup opens) or "ingress" (sk_skb on the
    # connections it accepts); objects from before `side` lack the key and are egress.
    side: str = "egress"
    # The program that enforces it: "sockmap" (sk_msg on a sockhash; objects from before the
    # LSM backend lack the key) or "lsm" (a BPF LSM program on socket_sendmsg).
    backend: str = "sockmap"
    # How the tables are laid out for the program's code (contract.TABLE_LAYOUT); objects from
    # before the field have layout 1.
    table_layout: int = 1

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @staticmethod
    def from_json(data: bytes) -> PolicyMetadata:
        raw = json.loads(data.decode())
        if raw.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported metadata format {raw.get('format')!r}")
        # Fields this version does not know (written by a newer compiler) are left out, so an
        # older CLI can still report on a newer object.
        raw["rules"] = [RuleInfo(**_known(RuleInfo, r)) for r in raw["rules"]]
        return PolicyMetadata(**_known(PolicyMetadata, raw))


def describe_tls(tls: str | None) -> str:
    """How a policy's `tls` statement reads in listings (`PolicyMetadata.tls`)."""
    if tls is None:
        return "no tls (plaintext HTTP)"
    if tls == "allow":
        return "tls (kTLS judged; user-space TLS passes unjudged)"
    return "tls (kTLS judged; user-space TLS refused)"


def _known(cls: type, raw: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in raw.items() if k in names}


class ObjectFileError(SockpolError):
    pass


def read_metadata(path: str | Path) -> PolicyMetadata:
    """Read the policy record from a compiled object, with a clear error for anything else."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    path = Path(path)
    try:
        with path.open("rb") as f:
            elf = ELFFile(f)
            if elf["e_machine"] != "EM_BPF":
                raise ObjectFileError(f"{path}: not a BPF object (machine {elf['e_machine']})")
            section = elf.get_section_by_name(SECTION)
            if section is None:
                raise ObjectFileError(f"{path}: no {SECTION} section; not compiled by sockpol")
            data = section.data()
    except OSError as e:
        raise ObjectFileError(f"{path}: {e.strerror}") from None
    except ELFError as e:
        raise ObjectFileError(f"{path}: not an ELF object ({e})") from None
    try:
        return PolicyMetadata.from_json(data.rstrip(b"\0"))
    except (ValueError, TypeError, KeyError) as e:
        raise ObjectFileError(f"{path}: unreadable {SECTION} section ({e})") from None
