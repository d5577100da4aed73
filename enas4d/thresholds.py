"""The paper's metric R and the exit-threshold grid search on a confidence/correctness database.

One arch's database is ``conf[n, S]`` (max softmax of every stage, float16), ``correct[n, S]`` (bool) and
``cost[S]`` (cumulative cost of exiting at each stage: MACs or latency). A sample exits at the first stage
``s < S`` with ``conf[:, s] > T_s`` (the paper's "larger than"), else at stage ``S``.

The search maximises ``R = ACC_avg * min(COST_target / COST_avg, 1) ** omega`` over
``T_s in {0, grid, ..., 1}`` for ``s = 1..S-1``. It never loops over grid points: every confidence is mapped
once to the number ``c`` of grid values strictly below it (stage ``s`` exits under ``T = k * grid`` iff
``k < c``), a joint histogram of ``c`` over the first ``S-1`` stages is built with one ``bincount`` per
weight, and prefix/suffix sums of that histogram give the exit counts and correct counts of *every* grid
point at once. Ties in R go to the first maximum in lexicographic order of ``(T_1, ..., T_{S-1})`` (what
``argmax`` of the C-ordered grid returns and what ``search_reference`` does), so results are deterministic.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import numpy as np

_MAX_GRID_POINTS = 1 << 24  # (K+1)^(S-1) threshold combinations held in memory per arch
_CHUNK_ELEMENTS = 1 << 22  # grid points evaluated at once across a batch of archs


class Evaluation(NamedTuple):
    """Dynamic inference of one arch under fixed thresholds (Table 3's per-stage numbers)."""

    acc: float  # ACC_avg: fraction of samples classified correctly at their exit
    cost: float  # COST_avg: mean cumulative cost at the exit stage
    exit_fractions: np.ndarray  # [S] fraction of samples exiting at each stage
    exit_accuracies: np.ndarray  # [S] accuracy of the samples exiting there (NaN where none exit)


class Best(NamedTuple):
    """The best grid point of one arch for one (target, omega)."""

    thresholds: tuple[float, ...]  # T_1..T_{S-1} (empty for a static, single-stage net)
    r: float
    acc: float
    cost: float


def metric_r(acc_avg, cost_avg, target: float, omega: float):
    """R = ACC_avg * min(COST_target / COST_avg, 1) ** omega (scalars or arrays, elementwise).

    Always computed with numpy ufuncs on float64 arrays so scalars and whole grids give bit-identical
    values (the vectorized search and the brute-force reference must agree exactly).
    """
    acc = np.asarray(acc_avg, dtype=np.float64)
    penalty = np.power(np.minimum(target / np.asarray(cost_avg, dtype=np.float64), 1.0), omega)
    r = acc * penalty
    return float(r) if r.ndim == 0 else r


def grid_values(grid: float) -> np.ndarray:
    """The threshold grid ``k / K`` for ``k = 0..K`` with ``K = 1 / grid`` (``grid`` must divide 1)."""
    if not (isinstance(grid, numbers.Real) and 0 < grid <= 1):
        raise ValueError(f"grid must be in (0, 1], got {grid!r}")
    steps = round(1 / grid)
    if abs(steps * grid - 1) > 1e-9:
        raise ValueError(f"grid {grid} does not divide 1 into whole steps")
    return np.arange(steps + 1) / steps


def _check_database(conf: np.ndarray, correct: np.ndarray, cost: np.ndarray, batched: bool) -> None:
    """Raise ValueError naming the array whose shape or values break the database contract."""
    lead = 3 if batched else 2
    if conf.ndim != lead or correct.shape != conf.shape:
        raise ValueError(f"conf {conf.shape} and correct {correct.shape} must have equal shapes with {lead} dims")
    if cost.shape != conf.shape[:-2] + conf.shape[-1:]:
        raise ValueError(f"cost has shape {cost.shape}; expected {conf.shape[:-2] + conf.shape[-1:]}")
    if conf.shape[-2] == 0:
        raise ValueError("the database has no images")
    if correct.dtype != np.bool_ or not np.issubdtype(conf.dtype, np.floating):
        raise ValueError(f"conf must be floating and correct bool, got {conf.dtype} and {correct.dtype}")
    if conf.dtype == np.float16:  # bit patterns 0x0000..0x3C00 are exactly +0.0..1.0 (integer compare: fast)
        in_range = conf.size == 0 or np.ascontiguousarray(conf).view(np.uint16).max() <= 0x3C00
    else:
        in_range = np.all((conf >= 0) & (conf <= 1))
    if not in_range:
        raise ValueError("conf must lie in [0, 1] (max softmax) and contain no NaN")
    if not np.all(np.isfinite(cost) & (cost > 0)):
        raise ValueError("cost must be finite and positive")


def _check_objective(target: float, omega: float) -> None:
    if not (np.isfinite(target) and target > 0):
        raise ValueError(f"target cost must be finite and positive, got {target!r}")
    if not (np.isfinite(omega) and omega >= 0):
        raise ValueError(f"omega must be finite and >= 0, got {omega!r}")


def _averages(correct_total, counts: Sequence, cost: np.ndarray, n: int):
    """ACC_avg and COST_avg from integer counts; the one formula both search paths use (bit-identical)."""
    cost_total = sum(cost[..., s] * counts[s] for s in range(len(counts)))
    return correct_total / n, cost_total / n


def evaluate(conf: np.ndarray, correct: np.ndarray, cost: np.ndarray, thresholds: Sequence[float]) -> Evaluation:
    """Early-exit inference of one arch under ``thresholds`` (T_1..T_{S-1}), replayed on its database."""
    conf, correct, cost = np.asarray(conf), np.asarray(correct), np.asarray(cost, dtype=np.float64)
    _check_database(conf, correct, cost, batched=False)
    t = np.asarray(thresholds, dtype=np.float64)
    if t.shape != (conf.shape[1] - 1,):
        raise ValueError(f"{conf.shape[1]} stages need {conf.shape[1] - 1} thresholds, got {t.size}")
    return _evaluate(conf.astype(np.float64), correct, cost, t)


def _evaluate(conf: np.ndarray, correct: np.ndarray, cost: np.ndarray, t: np.ndarray) -> Evaluation:
    """``evaluate`` on checked inputs (float64 ``conf``): the body the brute-force loop calls."""
    n, stages = conf.shape
    exits = np.concatenate([conf[:, :-1] > t, np.ones((n, 1), dtype=bool)], axis=1)
    stage = exits.argmax(axis=1)  # first stage whose confidence clears its threshold
    counts = np.bincount(stage, minlength=stages)
    right = np.bincount(stage[correct[np.arange(n), stage]], minlength=stages)
    acc, cost_avg = _averages(right.sum(), counts, cost, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        exit_acc = right / counts
    return Evaluation(float(acc), float(cost_avg), counts / n, exit_acc)


@lru_cache(maxsize=8)
def _float16_codes(steps: int) -> np.ndarray:
    """For every float16 bit pattern, the number of grid values strictly below it (exact, no rounding)."""
    values = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float64)
    return np.searchsorted(np.arange(steps + 1) / steps, np.nan_to_num(values), side="left").astype(np.intp)


def _codes(conf: np.ndarray, steps: int) -> np.ndarray:
    """``c`` per confidence: stage ``s`` exits under threshold index ``k`` iff ``k < c`` (``c <= K`` as conf <= 1)."""
    if conf.dtype == np.float16:  # the database dtype: one table look-up instead of a binary search
        return _float16_codes(steps)[np.ascontiguousarray(conf).view(np.uint16)]
    return np.searchsorted(np.arange(steps + 1) / steps, conf.astype(np.float64), side="left")


def _stage_counts(hist: np.ndarray, s: int, d: int) -> np.ndarray:
    """Samples of ``hist`` (a joint histogram [A, c_0, ..., c_{d-1}]) that exit at stage ``s`` (0-based).

    Indexed by ``[A, k_0, ..., k_s]`` (by all ``d`` threshold indices for the last stage, ``s == d``):
    they passed every earlier stage (``c_j <= k_j``: prefix sums) and, unless last, clear ``T_s``
    (``c_s > k_s``: total minus a prefix sum).
    """
    h = hist.sum(axis=tuple(range(s + 2, d + 1))) if s + 1 < d else hist
    for j in range(1, s + 1):
        h = np.cumsum(h, axis=j)
    if s < d:
        h = h.sum(axis=s + 1, keepdims=True) - np.cumsum(h, axis=s + 1)
    return h


def _grid_averages(conf: np.ndarray, correct: np.ndarray, cost: np.ndarray, steps: int):
    """ACC_avg and COST_avg of a batch of archs at every grid point, each shaped [A, K+1, ..., K+1] (S-1 axes).

    ``conf`` and ``correct`` are [A, n, S], ``cost`` is [A, S].
    """
    archs, n, stages = conf.shape
    d, bins = stages - 1, steps + 1
    codes = _codes(conf[..., :d], steps)
    flat = np.repeat(np.arange(archs, dtype=np.intp) * bins**d, n).reshape(archs, n)
    for j in range(d):
        flat += codes[..., j] * bins ** (d - 1 - j)
    shape = (archs,) + (bins,) * d

    def histogram(mask: np.ndarray | None) -> np.ndarray:
        idx = flat.ravel() if mask is None else flat[mask]
        return np.bincount(idx, minlength=archs * bins**d).reshape(shape)

    def widen(a: np.ndarray) -> np.ndarray:
        return a.reshape(a.shape + (1,) * (d + 1 - a.ndim))

    everyone = histogram(None)
    counts = [widen(_stage_counts(everyone, s, d)) for s in range(stages)]
    right = sum(widen(_stage_counts(histogram(correct[..., s]), s, d)) for s in range(stages))
    return _averages(right, counts, cost.reshape((archs,) + (1,) * d + (stages,)), n)


def _prepare_batch(conf, correct, cost, grid: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Validate a batch and choose how many archs to evaluate at once (bounded memory)."""
    conf, correct, cost = np.asarray(conf), np.asarray(correct), np.asarray(cost, dtype=np.float64)
    _check_database(conf, correct, cost, batched=True)
    values = grid_values(grid)
    points = len(values) ** (conf.shape[-1] - 1)
    if points > _MAX_GRID_POINTS:
        raise ValueError(f"{points} threshold combinations for {conf.shape[-1]} stages at grid {grid}: "
                         "use a coarser grid")
    chunk = max(1, _CHUNK_ELEMENTS // points)
    return conf, correct, cost, values, chunk


def _chunks(total: int, size: int) -> list[slice]:
    return [slice(lo, lo + size) for lo in range(0, total, size)]


def _best(r: np.ndarray, acc: np.ndarray, cost: np.ndarray, values: np.ndarray) -> list[Best]:
    """The first maximum (lexicographic grid order) of each arch's R grid."""
    flat = r.reshape(len(r), -1).argmax(axis=1)
    out = []
    for a, i in enumerate(flat):
        k = np.unravel_index(i, r.shape[1:])
        out.append(Best(tuple(float(values[j]) for j in k), float(r[(a,) + k]),
                        float(acc[(a,) + k]), float(cost[(a,) + k])))
    return out


def search_many(conf: np.ndarray, correct: np.ndarray, cost: np.ndarray, target: float, omega: float,
                grid: float = 0.01) -> list[Best]:
    """The best thresholds of each arch in a batch: ``conf``/``correct`` [A, n, S], ``cost`` [A, S]."""
    _check_objective(target, omega)
    conf, correct, cost, values, chunk = _prepare_batch(conf, correct, cost, grid)
    out: list[Best] = []
    for part in _chunks(len(conf), chunk):
        acc, cost_avg = _grid_averages(conf[part], correct[part], cost[part], len(values) - 1)
        out += _best(metric_r(acc, cost_avg, target, omega), acc, cost_avg, values)
    return out


def search(conf: np.ndarray, correct: np.ndarray, cost: np.ndarray, target: float, omega: float,
           grid: float = 0.01) -> Best:
    """The thresholds T_1..T_{S-1} on the grid that maximise R for one arch (``conf`` [n, S], ``cost`` [S])."""
    conf, correct, cost = np.asarray(conf), np.asarray(correct), np.asarray(cost, dtype=np.float64)
    if conf.ndim != 2:
        raise ValueError(f"conf of one arch must be [n_images, stages], got shape {conf.shape}")
    return search_many(conf[None], correct[None], cost[None], target, omega, grid)[0]


def r_for_targets(conf: np.ndarray, correct: np.ndarray, cost: np.ndarray,
                  objectives: Sequence[tuple[float, float]], grid: float = 0.01) -> np.ndarray:
    """Best R of each arch for each ``(omega, target)`` pair: [A, len(objectives)] (the predictor's targets).

    The accuracy/cost grids do not depend on the objective, so they are computed once per arch.
    """
    if len(objectives) == 0:
        raise ValueError("objectives must list at least one (omega, target) pair")
    for omega, target in objectives:
        _check_objective(target, omega)
    conf, correct, cost, values, chunk = _prepare_batch(conf, correct, cost, grid)
    out = np.empty((len(conf), len(objectives)))
    for part in _chunks(len(conf), chunk):
        acc, cost_avg = _grid_averages(conf[part], correct[part], cost[part], len(values) - 1)
        for p, (omega, target) in enumerate(objectives):
            out[part, p] = metric_r(acc, cost_avg, target, omega).reshape(len(acc), -1).max(axis=1)
    return out


def search_reference(conf: np.ndarray, correct: np.ndarray, cost: np.ndarray, target: float, omega: float,
                     grid: float = 0.01) -> Best:
    """Brute force: ``evaluate`` (checks done once) at every grid point in lexicographic order; first maximum wins.

    The specification ``search`` is tested and benchmarked against; far too slow for the pipeline.
    """
    conf, correct, cost = np.asarray(conf), np.asarray(correct), np.asarray(cost, dtype=np.float64)
    _check_database(conf, correct, cost, batched=False)
    _check_objective(target, omega)
    values, conf64 = grid_values(grid), conf.astype(np.float64)
    best = None
    for k in itertools.product(range(len(values)), repeat=conf.shape[1] - 1):
        t = values[list(k)]
        ev = _evaluate(conf64, correct, cost, t)
        r = metric_r(ev.acc, ev.cost, target, omega)
        if best is None or r > best.r:
            best = Best(tuple(t.tolist()), r, ev.acc, ev.cost)
    return best
