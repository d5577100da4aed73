"""The baselines of Figure 5, and how every compared net becomes a point (test top-1, average MACs).

ENAS4D's claim is that a *searched* multi-stage net that *reuses features* beats the alternatives at the
same average MACs. Each baseline removes one ingredient:

- **best static subnet**: no dynamic inference. The same regularized evolution over single-exit archs
  (``search.evolve_and_pick(..., static=True)``), with the static predictor as fitness (`static_fitness`), so
  only the number of exits differs.
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

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from enas4d import cost, thresholds
from enas4d.cost import mmacs
from enas4d.database import ArchRows
from enas4d.evolution import Fitness
from enas4d.predictor import Predictor, inputs, predict
from enas4d.space import MultiStageArch, SearchSpace, SubnetArch
from enas4d.supernet import SupernetSpec

# ---------------------------------------------------------------------------------------------- static subnets


def static_fitness(models: Mapping[float, Predictor], space: SearchSpace, spec: SupernetSpec,
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
        return predict(model, inputs(model, static_space, spec, archs)) * scale

    return fitness


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


def cascade_of(arch: MultiStageArch, rows: Callable[[MultiStageArch | SubnetArch], ArchRows]) -> ArchRows:
    """The cascade without reuse of ``arch``'s stages, from ``rows`` (an arch's evaluation): its first stage is
    stage 1 of ``arch`` itself (the static subnet ``arch.stage(0)``, which the cascade runs first), each later
    stage ``arch.stage(s)`` evaluated as a stand-alone subnet."""
    first = rows(arch)
    return cascade_rows([ArchRows(first.conf[:, :1], first.correct[:, :1], first.macs[:1])]
                        + [rows(arch.stage(s)) for s in range(1, arch.num_stages)])


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


def point_row(series: str, target: float, label: str, metric: ArchRows, test: ArchRows, omega: float,
              grid: float) -> dict[str, object]:
    """One left-panel row of Figure 5's CSV: the ``operating_point`` of a net, rounded as the figure shows it."""
    p = operating_point(metric, test, target, omega, grid)
    return {"panel": 0, "series": series, "label": label, "target_mmacs": target,
            "avg_mmacs": round(p.avg_mmacs, 4), "top1_pct": round(100 * p.top1, 2),
            "metric_r": round(p.metric_r, 5), "thresholds": " / ".join(f"{x:g}" for x in p.thresholds),
            "exit_fractions": " / ".join(f"{x:.3f}" for x in p.exit_fractions), "source": "this run"}


def table1_rows(metrics: str | Path) -> list[dict[str, object]]:
    """The Table 1 nets (``metrics``: table1.json, measured by real early exit) as Figure 5 rows."""
    return [{"panel": 0, "series": "ENAS4D (Table 1)", "label": f"net {net['network']}",
             "target_mmacs": net["target_mmacs"], "avg_mmacs": round(net["avg_mmacs"], 4),
             "top1_pct": round(100 * net["top1"], 2), "source": "this run, Table 1 (real early exit)"}
            for net in json.loads(Path(metrics).read_text())["nets"]]
