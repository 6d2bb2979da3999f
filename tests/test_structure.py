"""Structure of ``plugin/``: no import circle between its modules."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import PLUGIN

#: cycles known and owned elsewhere, each as its sorted modules; remove an entry with its fix (a stale entry fails)
KNOWN_CYCLES: set[tuple[str, ...]] = set()


def _modules(root: Path) -> dict[str, Path]:
    mods = {}
    for p in root.rglob("*.py"):
        parts = list(p.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            mods[".".join(parts)] = p
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Modules under ``plugin/`` that ``name`` imports anywhere (top level or inside functions)."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in mods)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods}
            out.update(subs)
            if base in mods and len(subs) < len(node.names):
                out.add(base)
    # a submodule importing its own parent package is not a cycle
    return {m for m in out if m != name and not name.startswith(m + ".")}


def import_cycles(root: Path = PLUGIN) -> list[list[str]]:
    mods = _modules(root)
    graph = {m: sorted(_imports(m, p, mods)) for m, p in mods.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in graph[u]:
            if state.get(v) == 1:
                cycles.append([*stack[stack.index(v) :], v])
            elif not state.get(v):
                visit(v)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m)
    return cycles


def test_walker_sees_cycles(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("from . import b\nimport pkg\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    (pkg / "c.py").write_text("from pkg import a\n")
    assert import_cycles(tmp_path) == [["pkg.a", "pkg.b", "pkg.a"]]


def test_no_import_cycle_inside_plugin() -> None:
    found = {tuple(sorted(set(c))): c for c in import_cycles()}
    new = [c for key, c in found.items() if key not in KNOWN_CYCLES]
    assert not new, "import cycles inside plugin/:\n" + "\n".join(" -> ".join(c) for c in new)
    stale = KNOWN_CYCLES - found.keys()
    assert not stale, f"known cycles that are gone: remove them from KNOWN_CYCLES: {sorted(stale)}"
