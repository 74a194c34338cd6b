"""The kernel matrix: which Debian kernels the VM tests boot, resolved from the package registry.

A stable update can change the verifier or the network stack under the same version line (that is
how every policy stopped loading on 6.18.44), so each line is resolved to its newest package when a
run starts, not pinned. The lines (../shared/notes/kernels.md):

- `6.1` (bookworm, bookworm-security): the oldest LTS sockpol supports (Debian 12);
- `6.1-ktls` (the same suites): the newest 6.1 without "tls: reject the combination of TLS and
  sockmap", where policy inside TLS works through sockmap;
- `6.12` (trixie): Debian 13's kernel;
- `6.18` (trixie-backports): the LTS line of the development machines;
- `7.0` (trixie-backports): the first line with the bpf_loop verifier change (when the registry
  serves no complete 7.0 kernel, the next line that it does serve, said loudly);
- `newest` (trixie-backports): whatever line is newest there (7.3 in December 2026).

The host's own apt configuration lists only bookworm; the other suites are read through a private
apt configuration (its own sources list, state and cache under CACHE/apt), built from the archive
addresses the host's sources already name, so the host's apt is never touched. When the indexes
cannot be read, the last resolution (CACHE/resolved.json) is used, and said so.

Packages are downloaded (never installed) into CACHE and extracted there; newer kernels come split
into linux-image (a stub), linux-binary (vmlinuz), linux-modules and linux-base (config), and keep
everything under /usr/lib/modules/<release>, older ones under /boot and /lib/modules.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

CACHE = Path(os.environ.get("SOCKPOL_VM_CACHE", "/var/cache/sockpol-vm"))
MODULES = Path("/usr/lib/modules")
MARKER = ".sockpol-vm"  # in /usr/lib/modules/<release>: which package was installed there
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
SUITES = ("bookworm", "bookworm-security", "trixie", "trixie-backports")
REJECTION_PATCH = "tls: reject the combination of TLS and sockmap"
# Upstream merged the rejection in the 7.2 cycle: every 7.2 or later kernel has it, whether or not
# Debian's changelog (which lists stable backports) names it.
REJECTION_UPSTREAM = (7, 2)
IMAGE = re.compile(
    r"^linux-image-(?:6\.1\.0-\d+|\d+\.\d+\.\d+\+deb\d+)-amd64(?P<unsigned>-unsigned)?$"
)
SPLIT_PARTS = re.compile(r"^linux-(?:binary|modules|base)-")


class KernelsUnavailable(Exception):
    """No kernel could be resolved or obtained (no apt, no index and no earlier resolution)."""


@dataclass(frozen=True)
class Line:
    name: str  # 6.1, 6.1-ktls, 6.12, 6.18, 7.0, newest
    series: str | None  # "6.1"; None: the newest series there is
    before_rejection: bool = False  # the newest package whose kernel allows TLS on sockmap
    # A part of the package name that says which Debian release it was built for: trixie's and
    # trixie-backports' kernels are `+deb13`, bookworm's 6.1 `6.1.0-N`, and bookworm-security
    # also serves 6.12 builds (`+deb12`), which the 6.12 line must not take for trixie's.
    build: str = ""
    # Series tried in this order when the registry serves no complete kernel of `series` (it
    # listed 7.0, 7.1 and 6.19 images in December 2026 but no modules for any of them).
    fallback: tuple[str, ...] = ()


LINES: tuple[Line, ...] = (
    Line("6.1", "6.1", build="6.1.0-"),  # bookworm, bookworm-security
    Line("6.1-ktls", "6.1", build="6.1.0-", before_rejection=True),
    Line("6.12", "6.12", build="+deb13"),  # trixie
    Line("6.18", "6.18", build="+deb13"),  # trixie-backports
    Line("7.0", "7.0", build="+deb13", fallback=("7.1", "7.2")),  # trixie-backports
    Line("newest", None, build="+deb13"),  # trixie-backports
)


@dataclass(frozen=True)
class Package:
    name: str
    version: str  # Debian version: 6.1.192-1, 7.3.4-1~bpo13+1
    parts: tuple[str, ...]  # packages to download with it (the split image's binary and modules)
    missing: tuple[str, ...] = ()  # parts it needs that the registry does not serve

    @property
    def upstream(self) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", self.version.split("-")[0])[:3])

    @property
    def newness(self) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
        """Orders packages of a line: the upstream version, then the ABI (6.1.0-57: several
        ABIs share 6.1.192), then the Debian revision."""
        abi = re.match(r"linux-image-\d+\.\d+\.\d+-(\d+)-", self.name)
        revision = self.version.split("-", 1)[1] if "-" in self.version else ""
        return (
            self.upstream,
            int(abi.group(1)) if abi else 0,
            tuple(int(x) for x in re.findall(r"\d+", revision)),
        )


@dataclass(frozen=True)
class Kernel:
    line: str
    package: str
    version: str
    release: str  # uname -r: 6.1.0-57-amd64, 7.3.4+deb13-amd64
    tree: Path  # the extracted packages in the cache
    rejects_tls_sockmap: bool
    parts: tuple[str, ...] = ()  # the packages downloaded with the image (Package.parts)

    @property
    def debs(self) -> tuple[str, ...]:
        """The file-name prefixes of its packages in the cache (apt spells an epoch %3a)."""
        version = self.version.replace(":", "%3a")
        return tuple(f"{name}_{version}_" for name in (self.package, *self.parts))

    @property
    def vmlinuz(self) -> Path:
        return MODULES / self.release / "vmlinuz"

    @property
    def upstream(self) -> str:
        return self.version.split("-")[0]

    def describe(self) -> str:
        tls = "rejects TLS on sockmap sockets" if self.rejects_tls_sockmap else "kTLS+sockmap ok"
        return f"{self.line}: {self.release} (Debian {self.version}; {tls})"


def _run(argv: Sequence[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)


# ---------------------------------------------------------------------------------------------
# A private apt configuration


def _host_archives() -> dict[str, str]:
    """{"main": uri, "security": uri} from the host's own apt sources."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    return archives_from(
        [
            p.read_text(errors="replace")
            for p in files
            if p.is_file() and p.suffix in ("", ".list", ".sources")
        ]
    )


def archives_from(texts: Sequence[str]) -> dict[str, str]:
    """The Debian archive and security archive named by apt sources (one-line or deb822)."""
    found: dict[str, str] = {}
    for text in texts:
        pairs: list[tuple[str, list[str]]] = []
        for stanza in re.split(r"\n\s*\n", text):  # deb822
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.MULTILINE)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.MULTILINE)
            if uris and suites:
                pairs.append((uris.group(1), suites.group(1).split()))
        for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", text, re.MULTILINE):
            pairs.append((m.group(1), [m.group(2)]))
        for uri, suites in pairs:
            for suite in suites:
                if not suite.startswith(("bookworm", "trixie")):
                    continue
                kind = "security" if suite.endswith("-security") else "main"
                found.setdefault(kind, uri.rstrip("/"))
    return found


class Apt:
    """apt-get/apt-cache with their own sources, state and cache under CACHE/apt."""

    def __init__(self, root: Path = CACHE / "apt") -> None:
        self.root = root
        for sub in ("state/lists/partial", "cache/archives/partial"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.sources = root / "sources.list"

    def options(self) -> list[str]:
        return [
            "-o", f"Dir::Etc::SourceList={self.sources}", "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State={self.root / 'state'}", "-o", f"Dir::Cache={self.root / 'cache'}",
            "-o", "APT::Architecture=amd64", "-o", "Acquire::Retries=2",
        ]  # fmt: skip

    def update(self) -> str | None:
        """Write the sources and read the indexes; the error text if that failed."""
        archives = _host_archives()
        if "main" not in archives:
            return "the host's apt sources name no Debian archive"
        lines = []
        for suite in SUITES:
            uri = archives.get("security") if suite.endswith("-security") else archives["main"]
            if uri:
                lines.append(f"deb [signed-by={KEYRING}] {uri} {suite} main")
        self.sources.write_text("\n".join(lines) + "\n")
        out = _run(["apt-get", *self.options(), "update", "-q"], timeout=300)
        # apt-get update exits 0 when an index could not be fetched ("Err:1 ...", "W: Failed to
        # fetch"): such a run would resolve from stale or missing indexes without saying so.
        failed = re.search(r"^(E:|Err:\d+|W: Failed to fetch)", out.stdout + out.stderr, re.M)
        if out.returncode != 0 or failed:
            return (out.stdout + out.stderr)[-800:]
        return None

    def images(self) -> dict[str, list[Package]]:
        """{series: packages newest first} of every amd64 kernel image package in the indexes."""
        out = _run(["apt-cache", *self.options(), "search", "--names-only", "^linux-image-"])
        names = [
            n for n in (ln.split(" ", 1)[0] for ln in out.stdout.splitlines()) if IMAGE.match(n)
        ]
        if not names:
            return {}
        shown = _run(["apt-cache", *self.options(), "show", "--no-all-versions", *names])
        listed_names = set(
            _run(["apt-cache", *self.options(), "pkgnames", "linux-"]).stdout.split()
        )
        series: dict[str, list[Package]] = {}
        for stanza in shown.stdout.split("\n\n"):
            name = re.search(r"^Package: (\S+)", stanza, re.MULTILINE)
            version = re.search(r"^Version: (\S+)", stanza, re.MULTILINE)
            if not (name and version):
                continue
            depends = re.search(r"^Depends: (.+)$", stanza, re.MULTILINE)
            split = [
                d.split()[0]
                for d in (depends.group(1).split(",") if depends else [])
                if SPLIT_PARTS.match(d.strip())
            ]
            # The registry may list an image whose modules it does not serve (7.0.13 in
            # December 2026): such a kernel cannot be booted with its modules; linux-base only
            # carries the config, which the tests merely read.
            absent = tuple(p for p in split if p not in listed_names)
            pkg = Package(
                name.group(1),
                version.group(1),
                tuple(p for p in split if p in listed_names),
                tuple(p for p in absent if not p.startswith("linux-base-")),
            )
            key = ".".join(str(x) for x in pkg.upstream[:2])
            series.setdefault(key, []).append(pkg)
        for pkgs in series.values():
            # Newest first; of two packages of one version, the unsigned one (same kernel).
            pkgs.sort(key=lambda p: (p.newness, "unsigned" in p.name), reverse=True)
        return series

    def download(self, pkg: Package, into: Path) -> list[Path]:
        into.mkdir(parents=True, exist_ok=True)
        # The split parts carry the image's version (its Depends say `(= version)`).
        names = [pkg.name, *pkg.parts]
        version = pkg.version.replace(":", "%3a")  # how apt spells an epoch in a file name

        def deb(name: str) -> Path | None:
            found = sorted(into.glob(f"{name}_{version}_*.deb"))
            return found[0] if found else None

        missing = [f"{n}={pkg.version}" for n in names if deb(n) is None]
        if missing:
            # apt downloads into the current directory; _apt cannot write to a root-only cache.
            out = _run(
                ["apt-get", *self.options(), "download", "-q", *missing], cwd=into, timeout=1200
            )
            if out.returncode != 0:
                raise KernelsUnavailable(
                    f"apt-get download {' '.join(missing)}: {out.stderr[-500:]}"
                )
        debs = [deb(n) for n in names]
        absent = [n for n, d in zip(names, debs, strict=True) if d is None]
        if absent:
            raise KernelsUnavailable(f"apt-get download left no {', '.join(absent)} in {into}")
        return [d for d in debs if d is not None]


# ---------------------------------------------------------------------------------------------
# Resolving the lines


RESOLVED = CACHE / "resolved.json"
VERDICTS = CACHE / "rejects-tls-sockmap.json"


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def resolve(lines: Sequence[Line] = LINES) -> tuple[dict[str, Kernel], list[str]]:
    """The kernel of every line, fetched and extracted, and notes on what was not as asked."""
    apt = Apt()
    notes: list[str] = []
    error = apt.update()
    series = {} if error else apt.images()
    if error or not series:
        notes.append(f"the package indexes could not be read ({error or 'no kernels listed'}); "
                     "using the kernels resolved last time")  # fmt: skip
    previous = _load_json(RESOLVED)
    chosen: dict[str, Kernel] = {}
    for line in lines:
        pkg = _choose(apt, line, series, notes) if series else None
        if pkg is None and line.name in previous:
            last = previous[line.name]
            pkg = Package(last["name"], last["version"], tuple(last["parts"]))
            if series:
                notes.append(f"{line.name}: nothing matches in the indexes; using {pkg.name}")
        if pkg is None:
            notes.append(f"{line.name}: no package found, and none resolved before")
            continue
        try:
            chosen[line.name] = fetch(apt, line.name, pkg)
        except KernelsUnavailable as e:  # one line's failure is that line's, not the matrix's
            notes.append(f"{line.name}: {pkg.name} {pkg.version} could not be had: {e}")
    if not chosen:
        raise KernelsUnavailable("; ".join(notes) or "no kernel resolved")
    # Merged, so that resolving one line (vmrunner.py --kernel X) keeps the others' fallbacks.
    resolved = {
        **previous,
        **{n: asdict(Package(k.package, k.version, k.parts)) for n, k in chosen.items()},
    }
    RESOLVED.write_text(json.dumps(resolved, indent=1))
    if {line.name for line in lines} == {line.name for line in LINES}:
        prune(list(chosen.values()))  # only a whole matrix knows what is no longer needed
    return chosen, notes


def _choose(
    apt: Apt, line: Line, series: dict[str, list[Package]], notes: list[str]
) -> Package | None:
    pkg = _choose_in(apt, line, series, notes)
    for other in line.fallback:
        if pkg is not None:
            break
        pkg = _choose_in(apt, replace(line, series=other), series, notes)
        if pkg is not None:
            notes.append(
                f"{line.name}: the registry serves no complete {line.series} kernel; "
                f"testing {pkg.name} {pkg.version} in its place"
            )
    return pkg


def _choose_in(
    apt: Apt, line: Line, series: dict[str, list[Package]], notes: list[str]
) -> Package | None:
    if line.series is None:  # every series, newest first
        order = sorted(series, key=lambda s: tuple(int(x) for x in s.split(".")), reverse=True)
        candidates = [p for s in order for p in series[s]]
    else:
        candidates = series.get(line.series, [])
    candidates = [p for p in candidates if line.build in p.name]
    complete = [p for p in candidates if not p.missing]
    newer = candidates[: candidates.index(complete[0])] if complete else candidates
    if newer:
        shown = ", ".join(p.version for p in newer[:4]) + (", ..." if len(newer) > 4 else "")
        notes.append(
            f"{line.name}: skipped {len(newer)} newer package(s) whose modules the registry "
            f"does not serve ({shown})"
        )
    candidates = complete
    if not line.before_rejection:
        return candidates[0] if candidates else None
    verdicts = _load_json(VERDICTS)
    tried: set[str] = set()
    for pkg in candidates:
        if pkg.version in tried:  # the signed and unsigned builds of one kernel
            continue
        tried.add(pkg.version)
        key = f"{pkg.name}_{pkg.version}"
        if key not in verdicts:
            verdicts[key] = fetch(apt, line.name, pkg).rejects_tls_sockmap
            VERDICTS.write_text(json.dumps(verdicts, indent=1, sort_keys=True))
        if not verdicts[key]:
            return pkg
    return None


def fetch(apt: Apt, line: str, pkg: Package) -> Kernel:
    """Download (once) and extract (once) a kernel's packages into the cache."""
    debs = apt.download(pkg, CACHE / "debs")
    tree = CACHE / "trees" / f"{pkg.name}_{pkg.version}"
    if not (tree / ".extracted").exists():
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir(parents=True)
        for deb in debs:
            out = _run(["dpkg-deb", "-x", str(deb), str(tree)])
            if out.returncode != 0:
                raise KernelsUnavailable(f"dpkg-deb -x {deb}: {out.stderr[-500:]}")
        (tree / ".extracted").touch()
    moddir = _modules_dir(tree)
    rejects = _changelog_has(tree, REJECTION_PATCH) or pkg.upstream[:2] >= REJECTION_UPSTREAM
    return Kernel(line, pkg.name, pkg.version, moddir.name, tree, rejects, pkg.parts)


def _modules_dir(tree: Path) -> Path:
    dirs = [d for base in ("lib/modules", "usr/lib/modules") for d in (tree / base).glob("*")]
    dirs = [d for d in dirs if d.is_dir()]
    found = next((d for d in dirs if (d / "kernel").is_dir()), None)
    if len({d.name for d in dirs}) != 1 or found is None:
        raise KernelsUnavailable(f"{tree}: expected one module tree with its modules, found {dirs}")
    return found


def _boot_file(tree: Path, release: str, name: str) -> Path | None:
    for path in (tree / "boot" / f"{name}-{release}", _modules_dir(tree) / name):
        if path.is_file():
            return path
    return None


def _changelog_has(tree: Path, text: str) -> bool:
    for log in tree.glob("usr/share/doc/*/changelog.Debian.gz"):
        if log.is_file() and text in gzip.decompress(log.read_bytes()).decode(errors="replace"):
            return True
    return False


def install(kernel: Kernel) -> None:
    """Put the kernel's modules, image and config under /usr/lib/modules/<release>; depmod.

    The guest uses the host's root file system, so it finds its modules there (virtme mounts
    tmpfs over /var/cache in the guest, so a tree in the cache would be invisible to it). Only a
    directory this runner made (it has MARKER) is ever replaced: a host that really runs one of
    these kernels has it installed as a package, and that is left alone.
    """
    target = MODULES / kernel.release
    marker = target / MARKER
    if marker.exists() and marker.read_text().strip() == kernel.version:
        return
    if target.exists() and not marker.exists():
        raise KernelsUnavailable(
            f"{target} exists and was not made by the VM runner (an installed kernel?); "
            "not touching it"
        )
    shutil.rmtree(target, ignore_errors=True)
    MODULES.mkdir(parents=True, exist_ok=True)
    source = _modules_dir(kernel.tree)
    # Hard links when the cache is on the same file system: 400 MB copied for nothing otherwise.
    if _run(["cp", "-al", str(source), str(target)]).returncode != 0:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target, symlinks=True)
    for name in ("vmlinuz", "config"):  # the config: the guest has no /proc/config.gz
        src = _boot_file(kernel.tree, kernel.release, name)
        if src is None:
            if name == "vmlinuz":
                raise KernelsUnavailable(f"{kernel.tree}: no vmlinuz for {kernel.release}")
            continue  # only informational (probe.kernel_config)
        if src.resolve() != (target / name).resolve():
            (target / name).unlink(missing_ok=True)
            shutil.copy2(src, target / name)
    out = _run(["depmod", kernel.release])
    if out.returncode != 0:
        raise KernelsUnavailable(f"depmod {kernel.release} failed: {out.stderr[-500:]}")
    marker.write_text(kernel.version + "\n")


def prune(keep: Sequence[Kernel]) -> None:
    """Drop cached packages and module trees of kernels no longer chosen (newer ones appear)."""
    trees = {k.tree.name for k in keep}
    prefixes = tuple(prefix for k in keep for prefix in k.debs)
    for tree in (CACHE / "trees").glob("*"):
        if tree.name not in trees:
            shutil.rmtree(tree, ignore_errors=True)
    for deb in (CACHE / "debs").glob("*.deb"):
        if not deb.name.startswith(prefixes):
            deb.unlink(missing_ok=True)
    releases = {k.release for k in keep}
    if MODULES.is_dir():
        for tree in MODULES.iterdir():
            if tree.name not in releases and (tree / MARKER).exists():
                shutil.rmtree(tree, ignore_errors=True)
