"""The ``enas4d`` import graph read from source with ``ast`` (nothing is imported): which enas4d modules each
module, notebook or script imports, and whether an import sits inside a function."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import nbformat

from conftest import ROOT

PACKAGE = ROOT / "enas4d"


@dataclass(frozen=True)
class Import:
    """One import of an enas4d module by ``source`` at ``line``; ``nested``: inside a function body."""

    source: str
    target: str
    line: int
    nested: bool


def module_name(path: Path) -> str:
    """``enas4d/ops/conv.py`` -> ``enas4d.ops.conv``; a package's ``__init__.py`` is the package."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def _targets(node: ast.Import | ast.ImportFrom, package: str) -> Iterator[str]:
    """The enas4d modules an import statement loads (``from enas4d import x`` names module x when x is one)."""
    if isinstance(node, ast.Import):
        yield from (a.name for a in node.names if a.name.split(".")[0] == "enas4d")
        return
    base = node.module or ""
    if node.level:  # relative: resolve against the importing module's package
        up = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*up, base] if base else up)
    if base.split(".")[0] != "enas4d":
        return
    for a in node.names:
        yield f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base


def imports_of(source: str, code: str, package: str = "enas4d") -> list[Import]:
    """The enas4d imports in ``code`` (``source`` names it in messages; ``package`` resolves relative imports)."""
    found: list[Import] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend(Import(source, t, child.lineno, nested) for t in _targets(child, package))
            visit(child, nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(code), False)
    return found


@cache
def package_imports() -> tuple[Import, ...]:
    """Every enas4d import inside the package."""
    out = []
    for name, path in modules().items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        out += imports_of(name, path.read_text(), package)
    return tuple(out)


def notebook_imports(path: Path) -> list[Import]:
    """The enas4d imports of a notebook's code cells (IPython magics and shell lines skipped)."""
    cells = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    code = "\n".join(line for cell in cells for line in cell.splitlines() if not line.lstrip().startswith(("%", "!")))
    return imports_of(str(path.relative_to(ROOT)), code)


def closure(roots: Iterable[str], edges: Iterable[Import]) -> set[str]:
    """``roots`` and every enas4d module they import, directly or not (a submodule also loads its packages)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parents = [".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)]
        todo += [*graph.get(m, ()), *parents]
    return seen
