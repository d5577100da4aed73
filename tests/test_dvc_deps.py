"""Every DVC stage declares the enas4d code it runs: its ``deps:`` cover each module the stage's command imports,
directly or through other modules (read with ``ast``), so a change anywhere in that code reruns the stage."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from import_graph import closure, modules, notebook_imports, package_imports

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def roots(cmd: str) -> tuple[set[str], list[Path]]:
    """The enas4d modules a stage command starts from: the ``-m`` module (a package runs its ``__main__``), and a
    notebook's own imports."""
    argv = shlex.split(cmd)
    module = argv[argv.index("-m") + 1]
    main = {f"{module}.__main__"} & set(modules())
    notebooks = [ROOT / a for a in argv if a.endswith(".ipynb")]
    return {module} | main | {e.target for nb in notebooks for e in notebook_imports(nb)}, notebooks


def covered(module: str, deps: list[str]) -> bool:
    """Whether a dep path is the module's file or a directory above it."""
    path = modules()[module].relative_to(ROOT)
    return any(path == Path(d) or Path(d) in path.parents for d in deps)


def needed(cmd: str) -> set[str]:
    """Modules the command runs, but the package root (an empty ``__init__``: see the test below)."""
    start, _ = roots(cmd)
    return closure(start, package_imports()) - {"enas4d"}


def test_the_package_root_holds_no_code() -> None:
    # needed() leaves enas4d/__init__.py out of every stage's deps; that holds while it is a bare docstring
    body = ast.parse((ROOT / "enas4d" / "__init__.py").read_text()).body
    assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_the_code_it_runs(stage: str) -> None:
    spec = STAGES[stage]
    deps = [str(d) for d in spec.get("deps", [])]
    start, notebooks = roots(spec["cmd"])
    assert all(str(nb.relative_to(ROOT)) in deps for nb in notebooks), f"{stage}: the notebook is not a dep"
    missing = sorted(m for m in needed(spec["cmd"]) if not covered(m, deps))
    assert not missing, (f"dvc.yaml: stage {stage} runs {', '.join(missing)} but its deps do not list "
                         f"{', '.join(str(modules()[m].relative_to(ROOT)) for m in missing)}")
    extra = sorted(d for d in deps if re.fullmatch(r"enas4d/.*", d)
                   and not any(covered(m, [d]) for m in needed(spec["cmd"])))
    assert not extra, f"dvc.yaml: stage {stage} lists {extra}, code it never imports (a rerun for nothing)"


def test_the_closure_follows_imports_through_modules() -> None:
    got = closure({"enas4d.cost"}, package_imports())
    assert {"enas4d.cost", "enas4d.plan", "enas4d.space", "enas4d.supernet", "enas4d.ops", "enas4d.ops.bn"} <= got
    assert "enas4d.train" not in got
