"""Imports point one way (docs/DESIGN.md, "Layers"): a module imports its own layer or those below, the import
graph has no cycle, only the glue and entry points import ``enas4d.pipeline``/``enas4d.notebook``, and no
function hides an enas4d import (the usual way to dodge a cycle)."""

from __future__ import annotations

from collections.abc import Sequence

from conftest import ROOT
from import_graph import Import, imports_of, modules, package_imports

# The layer of every module, bottom (0) to top; docs/DESIGN.md shows the same table.
LAYERS = {
    0: {"enas4d", "enas4d.space", "enas4d.config", "enas4d.data", "enas4d.files", "enas4d.progress"},  # values
    1: {"enas4d.ops", "enas4d.ops.bn", "enas4d.ops.common", "enas4d.ops.conv", "enas4d.ops.kernel", "enas4d.ops.se",
        "enas4d.plan", "enas4d.supernet", "enas4d.multistage", "enas4d.cost", "enas4d.runtime"},  # model
    2: {"enas4d.evaluate", "enas4d.train", "enas4d.distributed", "enas4d.probe",
        "enas4d.deploy"},  # evaluation, training, export
    3: {"enas4d.database", "enas4d.thresholds", "enas4d.predictor", "enas4d.evolution", "enas4d.encoding",
        "enas4d.search"},  # search
    4: {"enas4d.report", "enas4d.baselines", "enas4d.latency", "enas4d.table4"},  # reports
    5: {"enas4d.pipeline", "enas4d.notebook", "enas4d.cli", "enas4d.validate",
        "enas4d.deploy.__main__"},  # notebooks' glue, entry points
}
LAYER = {m: layer for layer, ms in LAYERS.items() for m in ms}
GLUE = {"enas4d.pipeline", "enas4d.notebook"}
# Function-level enas4d imports that are not there to dodge a cycle, with the reason. None today.
NESTED_OK: dict[tuple[str, str], str] = {}


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(set(modules()) - set(LAYER))
    assert not unplaced, f"place {unplaced} in LAYERS here and in docs/DESIGN.md's layer table"
    assert not set(LAYER) - set(modules()), f"LAYERS names modules that do not exist: {set(LAYER) - set(modules())}"


def test_imports_point_down() -> None:
    up = [f"{e.source}:{e.line} imports {e.target} (layer {LAYER[e.source]} -> {LAYER[e.target]})"
          for e in package_imports() if LAYER[e.target] > LAYER[e.source]]
    assert not up, "\n".join(up)


def find_cycle(edges: Sequence[Import]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        if e.target != e.source:
            graph.setdefault(e.source, set()).add(e.target)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycle() -> None:
    cycle = find_cycle(package_imports())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one() -> None:
    edges = [Import("enas4d.a", "enas4d.b", 1, False), Import("enas4d.b", "enas4d.c", 1, True),
             Import("enas4d.c", "enas4d.a", 1, False)]
    assert find_cycle(edges) == ["enas4d.a", "enas4d.b", "enas4d.c", "enas4d.a"]
    assert find_cycle(edges[:2]) is None


def test_only_the_glue_imports_the_glue() -> None:
    # the library and the benchmarks (which time library code); tests may drive the glue
    edges = [*package_imports()] + [e for p in sorted((ROOT / "benchmarks").glob("*.py"))
                                 for e in imports_of(str(p.relative_to(ROOT)), p.read_text())]
    bad = [f"{e.source}:{e.line} imports {e.target}" for e in edges
           if e.target in GLUE and LAYER.get(e.source) != 5]
    assert not bad, "\n".join(bad)


def test_no_function_level_enas4d_imports() -> None:
    nested = [f"{e.source}:{e.line} imports {e.target} inside a function" for e in package_imports()
              if e.nested and (e.source, e.target) not in NESTED_OK]
    assert not nested, "\n".join(nested) + "\n(import at the top, or justify it in NESTED_OK)"


def test_the_reader_sees_every_import_form() -> None:
    code = ("import enas4d.cost\nfrom enas4d import config, data\nfrom enas4d.space import SearchSpace\n"
            "def f():\n    from enas4d import pipeline\n")
    got = imports_of("enas4d.x", code)
    assert [(e.target, e.nested) for e in got] == [("enas4d.cost", False), ("enas4d.config", False),
                                                   ("enas4d.data", False), ("enas4d.space", False),
                                                   ("enas4d.pipeline", True)]
    relative = imports_of("enas4d.supernet", "from .ops import make_divisible\nfrom . import space\n")
    assert [e.target for e in relative] == ["enas4d.ops", "enas4d.space"]
