"""No function in ``plugin/`` is longer than 80 lines (issue 22): a long function is several jobs without names.

The length is ``end_lineno - lineno + 1`` of the ``def`` (decorators not counted, docstring and
comments counted). Run with ``-s`` to see the longest ones.
"""

from __future__ import annotations

import ast
from fnmatch import fnmatch

from helpers import PLUGIN

LIMIT = 80

#: Functions allowed over the limit, as ``path under plugin/::qualified name`` patterns: none now;
#: an entry needs a reason next to it.
ALLOWED: tuple[str, ...] = ()


def function_lengths() -> list[tuple[int, str]]:
    """``(lines, "path::Class.function")`` of every function in ``plugin/``, longest first."""
    rows: list[tuple[int, str]] = []

    def visit(node: ast.AST, prefix: str, path: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef):
                    rows.append((child.end_lineno - child.lineno + 1, f"{path}::{name}"))
                visit(child, name + ".", path)
            else:
                visit(child, prefix, path)

    for p in sorted(PLUGIN.rglob("*.py")):
        visit(ast.parse(p.read_text(), str(p)), "", p.relative_to(PLUGIN).as_posix())
    return sorted(rows, key=lambda r: (-r[0], r[1]))


def test_lengths_are_measured() -> None:
    rows = function_lengths()
    assert len(rows) > 500
    names = {name for _, name in rows}
    assert "rkkernel/wavesim.py::make_spec" in names  # a plain function
    assert "rkckpt/storage/file.py::FileStorage.close" in names  # a method, by its class


def test_no_function_is_longer_than_80_lines() -> None:
    rows = function_lengths()
    print(f"\nlongest functions in plugin/ (limit {LIMIT}):")
    for n, name in rows[:10]:
        print(f"  {n:4d}  {name}")
    too_long = [(n, name) for n, name in rows if n > LIMIT and not any(fnmatch(name, pat) for pat in ALLOWED)]
    assert not too_long, "split these into named parts: " + ", ".join(f"{name} ({n} lines)" for n, name in too_long)
