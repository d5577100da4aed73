"""The baselines of Figure 5, and how every compared net becomes a point (test top-1, average MACs).

ENAS4D's claim is that a *searched* multi-stage net that *reuses features* beats the alternatives at the
same average MACs. Each baseline removes one ingredient:

- **best static subnet**: no dynamic inference. The same regularized evolution over single-exit archs
  (`best_static`), with the static predictor as fitness (`static_fitness`), so only the number of exits differs.
- **random multi-stage**: no search. Uniform valid multi-stage archs (`random_rows` of the confidence
  database), thresholds still grid-searched.
- **cascade without reuse**: no feature reuse. The stages ``arch.stage(s)`` of a searched arch run as
  separate static subnets one after another (`cascade_rows`); a sample leaving at stage ``s`` paid for
  all of stages ``1..s`` whole (`cascade_macs`).

Every net is evaluated once per split with all its exits, by the database's recipe
(``database.evaluate_like_database``: export, BN recalibration, no early exit). Thresholds are then
grid-searched on the metric-set rows and replayed on the test rows (`operating_point`): in eval mode a
sample's logits do not depend on the rest of its batch, so the replay is early-exit inference without
running the net again for every target. (Table 1 measures its nets by real early exit.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from enas4d import cost, thresholds
from enas4d.cost import mmacs
from enas4d.database import ArchRows
from enas4d.encoding import encode_many
from enas4d.evolution import Fitness, search_static
from enas4d.predictor import MetricPredictor, predict
from enas4d.space import MultiStageArch, SearchSpace, SubnetArch
from enas4d.supernet import SupernetSpec

# ---------------------------------------------------------------------------------------------- static subnets


def static_fitness(models: Mapping[float, MetricPredictor], space: SearchSpace, spec: SupernetSpec,
                   target: float, omega: float) -> Fitness:
    """Predicted R of single-exit archs for ``target`` (MMACs), from the per-target static predictors.

    A static net's accuracy does not depend on the target, so the model trained for the nearest target
    ``t0`` serves any other: ``R_t = R_t0 * (min(t / MACs, 1) / min(t0 / MACs, 1)) ** omega``, MACs being
    known exactly. ``models`` maps each trained target to its predictor (``pipeline.predictor_path``).
    """
    if not models:
        raise ValueError("static_fitness needs at least one per-target static predictor")
    t0 = min(models, key=lambda t: (abs(t - target), t))
    model, static_space = models[t0], space.restrict(stages=1)

    def fitness(archs: Sequence[MultiStageArch]) -> np.ndarray:
        m = mmacs([cost.subnet_macs(spec, a.stage(0)) for a in archs])
        scale = np.power(np.minimum(target / m, 1.0) / np.minimum(t0 / m, 1.0), omega)
        return predict(model, encode_many(static_space, archs)) * scale

    return fitness


def best_static(space: SearchSpace, fitness: Fitness, *, top_k: int, **evolution: object) -> list[SubnetArch]:
    """The ``top_k`` static subnets (fittest first) found by the ENAS4D evolution restricted to one exit.

    ``fitness`` scores one-stage ``MultiStageArch`` values; ``evolution`` are ``evolve``'s settings.
    """
    return [a.stage(0) for a in search_static(space, fitness, top_k=top_k, **evolution).best]


# ---------------------------------------------------------------------------------------------- random, cascade


def random_rows(archs: int, n: int, seed: int) -> np.ndarray:
    """``n`` distinct database rows, drawn with ``seed``, for the random multi-stage baseline.

    The database's archs already are distinct uniform samples of the valid multi-stage archs
    (``database.sample_archs``) with their metric-set outputs stored: drawing from it gives random archs
    whose thresholds are grid-searched on the same images as ENAS4D's, without running them again.
    """
    if not 0 < n <= archs:
        raise ValueError(f"random baseline: {n} archs requested from a database of {archs}")
    return np.sort(np.random.default_rng(seed).choice(archs, size=n, replace=False))


def cascade_macs(spec: SupernetSpec, arch: MultiStageArch) -> list[int]:
    """Cumulative MACs of the cascade: exiting at stage ``s`` ran the static subnets of stages ``1..s`` whole."""
    return np.cumsum([cost.subnet_macs(spec, arch.stage(s)) for s in range(arch.num_stages)]).tolist()


def cascade_rows(stages: Sequence[ArchRows]) -> ArchRows:
    """The cascade's rows from its stages' own single-exit evaluations (``arch.stage(s)`` in stage order)."""
    if not stages or any(r.conf.shape[1:] != (1,) for r in stages):
        raise ValueError("a cascade is made of single-exit evaluations, one per stage")
    return ArchRows(np.concatenate([r.conf for r in stages], 1), np.concatenate([r.correct for r in stages], 1),
                    np.cumsum([int(r.macs[0]) for r in stages]).astype(np.int64))


# ---------------------------------------------------------------------------------------------- points


@dataclass(frozen=True)
class OperatingPoint:
    """Thresholds searched on the metric set for one (target, omega), and what they give on the test set."""

    thresholds: tuple[float, ...]
    metric_r: float  # R on the metric set (what the search maximised)
    top1: float  # test top-1 (fraction)
    avg_mmacs: float  # test average MACs per image, millions
    exit_fractions: np.ndarray  # [S] test images exiting at each stage
    exit_top1: np.ndarray  # [S] top-1 of the test images exiting there (NaN where none exit)


def operating_point(metric: ArchRows, test: ArchRows, target: float, omega: float, grid: float) -> OperatingPoint:
    """Grid-search the exit thresholds on ``metric`` (costs in MMACs, as ``target``), replay them on ``test``."""
    if not np.array_equal(metric.macs, test.macs):
        raise ValueError(f"metric and test rows of different nets: MACs {metric.macs} vs {test.macs}")
    cost_mm = mmacs(metric.macs)
    best = thresholds.search(metric.conf, metric.correct, cost_mm, target, omega, grid)
    ev = thresholds.evaluate(test.conf, test.correct, cost_mm, best.thresholds)
    return OperatingPoint(best.thresholds, best.r, ev.acc, ev.cost, ev.exit_fractions, ev.exit_accuracies)
