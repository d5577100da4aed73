"""The search step, written once: evolve with a predictor, re-evaluate the best k for real, grid-search
thresholds, keep the best (paper: "Search multi-stage CNN with early exit").

The predictor ranks archs well but not exactly, so the ``top_k`` fittest archs an evolution found are
evaluated for real on the metric set by the database's recipe (``database.evaluate_like_database``), their
thresholds grid-searched on that evaluation, and the arch with the best measured R is kept (ties: the
better predicted, found first). The search stage (MACs targets), Table 4 (latency targets: the cost of a
stage comes from the op latency table) and the Figure 5 sweep (conditional predictor) all run this.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from enas4d import evolution, thresholds
from enas4d.cost import mmacs
from enas4d.database import ArchRows, as_multistage, evaluate_like_database
from enas4d.multistage import MultiStageNet
from enas4d.space import MultiStageArch, SearchSpace, SubnetArch

Timer = Callable[[str], AbstractContextManager]  # e.g. pipeline.Timer(): ``with timer("evaluate"): ...``
StageCost = Callable[[MultiStageArch, ArchRows], np.ndarray]  # cumulative cost of exiting after each stage


def untimed(name: str) -> AbstractContextManager:
    """The default ``Timer``: times nothing."""
    return nullcontext()


def macs_cost(arch: MultiStageArch, rows: ArchRows) -> np.ndarray:
    """Cumulative MMACs per stage, the unit of ``search.targets``."""
    return mmacs(rows.macs)


class Evaluator:
    """Real evaluations of archs on fixed images by the database's recipe, each arch once (an arch found for
    two targets, or a static subnet that is also a stage of a cascade, is evaluated once)."""

    def __init__(self, msnet: MultiStageNet, images: torch.Tensor, labels: torch.Tensor, calib: torch.Tensor,
                 batch_size: int, timer: Timer = untimed, step: str = "evaluate") -> None:
        self.msnet, self.images, self.labels, self.calib, self.batch_size = msnet, images, labels, calib, batch_size
        self.timer, self.step = timer, step
        self.rows: dict[MultiStageArch, ArchRows] = {}

    def __call__(self, arch: MultiStageArch | SubnetArch) -> ArchRows:
        key = as_multistage(arch)
        if key not in self.rows:
            with self.timer(self.step):
                self.rows[key] = evaluate_like_database(self.msnet, key, self.images, self.labels, self.calib,
                                                        self.batch_size)
        return self.rows[key]

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class Pick:
    """The kept arch of one search: its predicted R, real metric-set rows, per-stage cost and thresholds."""

    arch: MultiStageArch
    predicted_r: float
    rows: ArchRows
    stage_cost: np.ndarray
    best: thresholds.Best  # thresholds, and the measured R, accuracy and average cost they give
    candidates: int  # archs re-evaluated to choose it
    history: np.ndarray  # the evolution's best predicted R: initial, then after each generation

    @property
    def exit_fractions(self) -> np.ndarray:
        """Fraction of the metric-set images that leave at each stage under the kept thresholds."""
        rows = self.rows
        return thresholds.evaluate(rows.conf, rows.correct, self.stage_cost, self.best.thresholds).exit_fractions


def pick(candidates: Sequence[MultiStageArch], predicted: Sequence[float], target: float, *, omega: float,
         grid: float, evaluate: Callable[[MultiStageArch], ArchRows], stage_cost: StageCost = macs_cost,
         timer: Timer = untimed, history: np.ndarray | None = None) -> Pick:
    """The candidate with the best measured R for ``target`` (ties: the earlier, i.e. the better predicted)."""
    if not candidates:
        raise ValueError("pick: no candidate archs")
    kept: Pick | None = None
    for arch, p in zip(candidates, predicted, strict=True):
        rows = evaluate(arch)
        cost = np.asarray(stage_cost(arch, rows), dtype=np.float64)
        with timer("thresholds"):
            best = thresholds.search(rows.conf, rows.correct, cost, target, omega, grid)
        if kept is None or best.r > kept.best.r:
            kept = Pick(arch, float(p), rows, cost, best, len(candidates),
                        np.asarray([] if history is None else history))
    assert kept is not None
    return kept


def evolve_and_pick(space: SearchSpace, fitness: evolution.Fitness, target: float, *, omega: float, grid: float,
                    evaluate: Callable[[MultiStageArch], ArchRows], evolution_settings: Mapping[str, Any], seed: int,
                    static: bool = False, stage_cost: StageCost = macs_cost, timer: Timer = untimed) -> Pick:
    """Evolve over ``space`` (one exit when ``static``) maximising ``fitness``, then ``pick`` among the
    ``evolution_settings["top_k"]`` fittest archs (``evolution_settings``: ``evolution.evolve``'s keywords,
    i.e. the ``evolution`` params section)."""
    run = evolution.search_static if static else evolution.evolve
    with timer("evolution"):
        found = run(space, fitness, seed=seed, **evolution_settings)
    return pick(found.best, found.best_fitness, target, omega=omega, grid=grid, evaluate=evaluate,
                stage_cost=stage_cost, timer=timer, history=found.history)
