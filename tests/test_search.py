"""The search step (enas4d.search): the kept arch is the candidate with the best measured R (ties: the better
predicted), the evolution's top_k are exactly the candidates, and each arch is evaluated once."""

from __future__ import annotations

import numpy as np
import pytest

from enas4d import database, evolution, thresholds
from enas4d.search import Evaluator, evolve_and_pick, pick
from enas4d.space import MultiStageArch, SearchSpace
from synthetic_db import make_database
from tiny_net import tiny_multistage

SPACE = SearchSpace(units=3, resolutions=(16, 20, 24), stages=3)
DB = make_database(SPACE, 40, 200, seed=0)
ROWS = {a: database.ArchRows(DB.conf[i], DB.correct[i], DB.cost[i]) for i, a in enumerate(DB.archs)}
KW = dict(omega=0.09, grid=0.05)


def proxy_cost(arch: MultiStageArch, rows: database.ArchRows) -> np.ndarray:
    return rows.macs  # the synthetic database's cost is already in target units


def measured_r(arch: MultiStageArch, target: float) -> float:
    r = ROWS[arch]
    return thresholds.search(r.conf, r.correct, r.macs, target, KW["omega"], KW["grid"]).r


def test_pick_keeps_the_best_measured_r_and_the_earlier_on_a_tie() -> None:
    target = 2.0
    candidates = DB.archs[:8]
    rs = [measured_r(a, target) for a in candidates]
    best = int(np.argmax(rs))
    predicted = np.linspace(1.0, 0.5, 9)
    got = pick([*candidates, candidates[best]], predicted, target, evaluate=ROWS.__getitem__,
               stage_cost=proxy_cost, **KW)
    assert got.arch == candidates[best] and got.predicted_r == predicted[best]  # the duplicate came later
    assert got.best == thresholds.search(DB.conf[best], DB.correct[best], DB.cost[best], target, **KW)
    assert got.candidates == 9 and got.best.r == max(rs)
    np.testing.assert_allclose(got.exit_fractions.sum(), 1.0)
    with pytest.raises(ValueError, match="no candidate"):
        pick([], [], target, evaluate=ROWS.__getitem__, **KW)


def test_evolve_and_pick_reevaluates_exactly_the_top_k() -> None:
    fitness = lambda archs: np.array([float(sum(map(sum, a.expands))) for a in archs])  # noqa: E731
    settings = dict(population=10, generations=3, sample_size=3, mutation_prob=0.3, crossover_prob=0.5, top_k=4)
    rows = list(ROWS.values())
    calls: list[MultiStageArch] = []

    def evaluate(arch: MultiStageArch) -> database.ArchRows:  # any arch gets some database row
        calls.append(arch)
        return rows[hash(arch) % len(rows)]

    got = evolve_and_pick(SPACE, fitness, 1.5, evaluate=evaluate, evolution_settings=settings, seed=0,
                          stage_cost=proxy_cost, **KW)
    want = evolution.evolve(SPACE, fitness, seed=0, **settings)
    assert calls == want.best and got.candidates == 4
    again = pick(want.best, want.best_fitness, 1.5, evaluate=evaluate, stage_cost=proxy_cost, **KW)
    assert (got.arch, got.predicted_r, got.best) == (again.arch, again.predicted_r, again.best)
    np.testing.assert_array_equal(got.history, want.history)


def test_evaluator_runs_each_arch_once_like_the_database() -> None:
    msnet, space, images, labels, calib = tiny_multistage()
    seconds: list[str] = []

    class Timer:
        def __call__(self, name: str):
            seconds.append(name)
            return np.errstate()  # any context manager

    ev = Evaluator(msnet, images, labels, calib, 8, Timer(), "evaluate metric")
    arch = space.sample(np.random.default_rng(0))
    first = ev(arch)
    assert ev(arch) is first and len(ev) == 1 and seconds == ["evaluate metric"]
    want = database.evaluate_like_database(msnet, arch, images, labels, calib, 8)
    np.testing.assert_array_equal(first.conf, want.conf)
    static = arch.stage(0)
    assert ev(static) is ev(MultiStageArch.from_stages([static])) and len(ev) == 2  # a subnet is its 1-stage arch
