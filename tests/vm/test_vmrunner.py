"""The VM runner's own logic, without booting anything: how guest results are read back."""

from __future__ import annotations

import json

import vmkernels
import vmrunner


def lines(*records: dict) -> str:
    return "\n".join(json.dumps(r) for r in records) + "\n"


def phase(nodeid: str, when: str, outcome: str, **kw) -> dict:
    return {"nodeid": nodeid, "when": when, "outcome": outcome, "seconds": 0.5, "message": "",
            "details": "", "xfail": None, **kw}  # fmt: skip


def test_every_outcome_is_read_back() -> None:
    stream = lines(
        phase("t.py::ok", "setup", "passed"),
        phase("t.py::ok", "call", "passed"),
        phase("t.py::ok", "teardown", "passed"),
        phase("t.py::bad", "setup", "passed"),
        phase("t.py::bad", "call", "failed", message="assert 1 == 2", details="tb"),
        phase("t.py::bad", "teardown", "passed"),
        phase("t.py::skip", "setup", "skipped", message="no TLS"),
        phase("t.py::skip", "teardown", "passed"),
        phase("t.py::xf", "setup", "passed"),
        phase("t.py::xf", "call", "skipped", xfail="kernel does X"),
        phase("t.py::xf", "teardown", "passed"),
        phase("t.py::err", "setup", "passed"),
        phase("t.py::err", "call", "passed"),
        phase("t.py::err", "teardown", "failed", message="left behind"),
        {"nodeid": "t.py::hung", "when": "start"},
        phase("t.py::hung", "setup", "passed"),
    )
    got = {k: (r.outcome, r.message) for k, r in vmrunner.parse_results(stream).items()}
    assert got == {
        "t.py::ok": ("passed", ""),
        "t.py::bad": ("failed", "assert 1 == 2"),
        "t.py::skip": ("skipped", "no TLS"),
        "t.py::xf": ("xfailed", "kernel does X"),
        "t.py::err": ("error", "left behind"),
        "t.py::hung": ("unfinished", "still running when the guest's time limit ended it"),
    }


def test_a_line_cut_by_the_kill_is_ignored() -> None:
    stream = lines(phase("t.py::ok", "call", "passed"), phase("t.py::ok", "teardown", "passed"))
    results = vmrunner.parse_results(stream + '{"nodeid": "t.py::x", "wh')
    assert list(results) == ["t.py::ok"]


def test_guest_script_exports_what_the_guest_tests_need() -> None:
    script = vmrunner.GUEST_SCRIPT
    for needed in ("SOCKPOL_IN_VM=1", "CI={ci}", "mount -t bpf", "-p sockpol_vm_guest", "timeout"):
        assert needed in script


# --- the kernel matrix (vmkernels.py), without the registry ------------------------------------


def pkg(name: str, version: str, missing: tuple[str, ...] = ()) -> vmkernels.Package:
    return vmkernels.Package(name, version, (), missing)


def test_packages_of_one_line_are_ordered_by_version_abi_and_revision() -> None:
    pkgs = [
        pkg("linux-image-6.1.0-55-amd64-unsigned", "6.1.192-1"),
        pkg("linux-image-6.1.0-57-amd64-unsigned", "6.1.192-3"),
        pkg("linux-image-6.1.0-53-amd64-unsigned", "6.1.187-1"),
        pkg("linux-image-6.1.0-56-amd64-unsigned", "6.1.192-2"),
    ]
    newest = sorted(pkgs, key=lambda p: p.newness, reverse=True)
    assert [p.name.split("-")[3] for p in newest] == ["57", "56", "55", "53"]
    assert pkg("x", "7.3.4-1~bpo13+1").upstream == (7, 3, 4)


def test_a_line_whose_modules_are_not_served_falls_back_loudly() -> None:
    series = {
        "7.0": [pkg("linux-image-7.0.13+deb13-amd64", "7.0.13-1~bpo13+1", ("linux-modules-7.0",))],
        "7.2": [pkg("linux-image-7.2.12+deb13-amd64", "7.2.12-1~bpo13+1")],
        "7.3": [pkg("linux-image-7.3.4+deb13-amd64", "7.3.4-1~bpo13+1")],
    }
    line = next(line for line in vmkernels.LINES if line.name == "7.0")
    notes: list[str] = []
    chosen = vmkernels._choose(None, line, series, notes)
    assert chosen is not None and chosen.version == "7.2.12-1~bpo13+1"
    assert any("skipped 1 newer" in n for n in notes)
    assert any("no complete 7.0 kernel; testing linux-image-7.2.12" in n for n in notes)


def test_the_newest_line_is_the_newest_complete_kernel() -> None:
    series = {
        "7.3": [pkg("linux-image-7.3.4+deb13-amd64", "7.3.4-1", ("linux-modules-7.3.4",))],
        "7.2": [pkg("linux-image-7.2.12+deb13-amd64", "7.2.12-1")],
        "6.12": [pkg("linux-image-6.12.117+deb13-amd64-unsigned", "6.12.117-1")],
    }
    newest = next(line for line in vmkernels.LINES if line.name == "newest")
    assert vmkernels._choose(None, newest, series, []).version == "7.2.12-1"


def test_the_6_12_line_takes_trixies_build_not_bookwormsecuritys() -> None:
    series = {
        "6.12": [
            pkg("linux-image-6.12.118+deb12-amd64-unsigned", "6.12.118-1~deb12u1"),
            pkg("linux-image-6.12.117+deb13-amd64-unsigned", "6.12.117-1"),
        ]
    }
    line = next(line for line in vmkernels.LINES if line.name == "6.12")
    assert vmkernels._choose(None, line, series, []).name.endswith("+deb13-amd64-unsigned")


def test_archives_are_read_from_deb822_and_one_line_sources() -> None:
    deb822 = (
        "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://mirror.invalid/debian-security/\n"
        "Suites: bookworm-security\nComponents: main\n"
    )
    assert vmkernels.archives_from([deb822]) == {
        "main": "http://mirror.invalid/debian",
        "security": "http://mirror.invalid/debian-security",
    }
    one_line = "deb [arch=amd64] http://other.invalid/debian trixie main\n"
    assert vmkernels.archives_from([one_line]) == {"main": "http://other.invalid/debian"}


def kernel(line: str, release: str) -> vmkernels.Kernel:
    return vmkernels.Kernel(line, "linux-image", "1", release, vmkernels.CACHE, False)


def test_the_longest_lines_boot_first_and_a_shared_kernel_boots_once() -> None:
    import vmsession

    releases = {"6.1": "a", "6.1-ktls": "a", "6.12": "b", "6.18": "c", "7.0": "d", "newest": "e"}
    session = vmsession.VMSession({line: kernel(line, r) for line, r in releases.items()})
    order = session.boot_order()
    assert order == ["6.1", "newest", "6.12", "6.18", "7.0"]  # 6.1 boots for 6.1-ktls too
    assert session.boots()["6.1"] == ["6.1", "6.1-ktls"]
