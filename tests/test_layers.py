"""Packages import in one direction (docs/design.md, "Layers"): each module may import only from
its own layer or the layers below it, and no two modules import each other, directly or not.

Every import counts, the ones inside functions too (they are how a command avoids loading what
it does not need, not a way around the layering).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "sockpol"

# Lowest first. A module is placed by its longest listed prefix.
LAYERS: list[tuple[str, set[str]]] = [
    (
        "contract and foundation",
        {"sockpol", "sockpol.contract", "sockpol.diagnostics", "sockpol.files",
         "sockpol.telemetry", "sockpol.metadata"},
    ),
    ("automata", {"sockpol.automata"}),
    ("language", {"sockpol.grammar", "sockpol.dsl"}),
    ("reference model", {"sockpol.model"}),
    ("code generation", {"sockpol.codegen"}),
    ("compiler", {"sockpol.compiler", "sockpol.samples"}),
    ("runtime", {"sockpol.runtime"}),
    (
        "commands",
        {"sockpol.cli", "sockpol.authoring", "sockpol.doctor", "sockpol.selfcheck",
         "sockpol.stats", "sockpol.statusview", "sockpol.demo", "sockpol.agent"},
    ),
]  # fmt: skip


# The runtime loads objects; it never makes them. It reads what it needs of the compiler's output
# from the contract and the object's own metadata, so that a runtime command does not import
# lark, llvmlite or the automata, and a second backend's loader needs no code generator.
RUNTIME_NEVER_IMPORTS = ("sockpol.automata", "sockpol.dsl", "sockpol.grammar", "sockpol.model",
                         "sockpol.codegen", "sockpol.compiler", "sockpol.samples")  # fmt: skip


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    best = (-1, -1)
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best[0]:
                best = (len(prefix), index)
    assert best[1] >= 0, f"{module} is in no layer: add it to LAYERS"
    return best[1]


def imports(path: Path, module: str) -> set[str]:
    """The sockpol modules `path` imports (a `from package import name` of a submodule counts as
    that submodule)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "sockpol"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "sockpol":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if (ROOT.parent / (sub.replace(".", "/") + ".py")).exists()
                          or (ROOT.parent / sub.replace(".", "/")).is_dir() else base)  # fmt: skip
    return found - {module}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p, module_name(p)) for p in sorted(ROOT.rglob("*.py"))}


def test_every_import_goes_down_or_sideways() -> None:
    upward = []
    for module, deps in graph().items():
        for dep in deps:
            if layer_of(dep) > layer_of(module):
                upward.append(
                    f"{module} ({LAYERS[layer_of(module)][0]}) imports {dep} "
                    f"({LAYERS[layer_of(dep)][0]})"
                )
    assert not upward, "imports against the layers:\n" + "\n".join(sorted(upward))


def test_the_runtime_does_not_import_the_compiler_side() -> None:
    bad = [
        f"{module} imports {dep}"
        for module, deps in graph().items()
        if module.startswith("sockpol.runtime")
        for dep in deps
        if dep.startswith(RUNTIME_NEVER_IMPORTS)
    ]
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles() -> None:
    deps = graph()
    # The package itself only names the version; every module may import it.
    deps = {m: d - {"sockpol"} for m, d in deps.items() if m != "sockpol"}
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(deps.get(m, ())):
            if d.startswith(m + ".") or m.startswith(d + "."):
                continue  # a package and its own modules
            if state.get(d) == 1:
                cycles.append(" -> ".join([*stack[stack.index(d) :], d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(deps):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_layers_name_existing_packages() -> None:
    modules = set(graph())
    for _, prefixes in LAYERS:
        for prefix in prefixes:
            assert any(m == prefix or m.startswith(prefix + ".") for m in modules), prefix
