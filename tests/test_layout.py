"""The house rules of DESIGN.md section 5, checked on the source: the direction of imports
between the package's layers, no import cycles, modules of a few hundred lines.

Every ``import`` of a drivepriv module counts, at module level or inside a function (a lazy
import is still a dependency, and a cycle held off by one is still a cycle), except those under
``if TYPE_CHECKING:`` (annotations only, never run).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "drivepriv"

#: What each layer must not import (DESIGN.md section 5: "envs and priors know nothing of
#: federation or attacks; attacks know nothing of metrics; metrics and report come last").
#: The entry points (cli, pipeline, audit, capture, sweep) come after every layer.
ENTRY = {"cli", "pipeline", "audit", "capture", "sweep"}
FORBIDDEN = {
    "envs": {"federation", "attacks", "metrics", "report"} | ENTRY,
    "priors": {"federation", "attacks", "metrics", "report"} | ENTRY,
    "agents": {"federation", "attacks", "metrics", "report"} | ENTRY,
    "attacks": {"metrics", "report"} | ENTRY,
    "federation": {"attacks", "metrics", "report"} | ENTRY,
    "metrics": {"report"} | ENTRY,
}
#: config (a package: its schema and its loading) imports nothing but errors and the registries
#: whose names it checks.
CONFIG_MAY_IMPORT = {"drivepriv.errors", "drivepriv.registry"}
MAX_LINES = 450


def modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                skip |= {id(n) for n in ast.walk(sub)}
    return skip


def import_graph() -> dict[str, set[str]]:
    """module -> the drivepriv modules it imports (a name imported from a package that is one of
    its modules counts as that module)."""
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = defaultdict(set)
    for m, f in mods.items():
        tree = ast.parse(f.read_text(), str(f))
        skip = _type_checking_only(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t.startswith("drivepriv"):
                    r = resolve(t)
                    if r and r != m and not m.startswith(r + "."):  # a package's own __init__ is not an edge
                        graph[m].add(r)
    return graph


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(set(graph) | {w for ws in graph.values() for w in ws}):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_layers_import_in_the_design_direction():
    graph = import_graph()
    wrong = [f"{m} -> {t}" for m in sorted(graph) for t in sorted(graph[m]) if layer(t) in FORBIDDEN.get(layer(m), set())]
    assert wrong == []


def test_config_imports_only_errors_and_registries():
    graph = import_graph()
    config = [m for m in modules() if m == "drivepriv.config" or m.startswith("drivepriv.config.")]
    outside = {t for m in config for t in graph.get(m, ()) if t not in config}
    assert outside <= CONFIG_MAY_IMPORT


def test_modules_are_a_few_hundred_lines():
    long = {m: n for m, f in modules().items() if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_checks_are_not_vacuous():
    """A cycle is found, and so is the real package's import of a neighbour."""
    assert cycles({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == [["x", "y", "z"]]
    assert cycles({"x": {"y"}, "y": set()}) == []
    real = import_graph()
    assert "drivepriv.attacks.base" in real["drivepriv.attacks.catalogue"]
    assert "drivepriv.federation.types" in real["drivepriv.federation.inprocess"]
    assert "drivepriv.errors" in real["drivepriv.config.schema"]
