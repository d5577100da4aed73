"""Regularized evolution (Real et al. 2019, "aging evolution") over multi-stage archs, with batched fitness.

One *cycle* of Real et al.: draw ``sample_size`` members of the population uniformly without replacement,
the fittest is the parent; the child is ``mutate(parent)`` or, with probability ``crossover_prob``,
``mutate(crossover(parent, second fittest of the sample))``; the child joins the population and the
*oldest* member dies (not the worst: that is the regularization).

Batching: the fitness (the metric predictor) is far cheaper per arch on a batch, so ``batch_size``
children (default: a tenth of the population) are bred from the population as it stands, evaluated in one
call, then appended in order while as many of the oldest die — like Real et al.'s parallel workers, whose
children are bred before the others' are evaluated. ``batch_size=1`` is the sequential algorithm exactly;
a batch as large as the population would turn it into generational replacement (every member lives one
generation, ageing does nothing), so the default keeps batches small. A **generation** is ``population``
cycles, so a run evaluates ``population * (generations + 1)`` archs (the initial population included).

Archs are valid by construction: ``space.sample``, ``space.mutate`` and ``space.crossover`` never produce an
invalid arch, so there is no rejection loop. All randomness comes from ``numpy.random.default_rng(seed)``,
so a seed (and a deterministic fitness) fixes the whole run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from enas4d.predictor import Predictor, check_inputs, inputs, predict
from enas4d.space import MultiStageArch, SearchSpace
from enas4d.supernet import SupernetSpec

Fitness = Callable[[Sequence[MultiStageArch]], np.ndarray]


@dataclass(frozen=True)
class EvolutionResult:
    best: list[MultiStageArch]  # the top_k distinct archs ever evaluated, fittest first
    best_fitness: np.ndarray  # [top_k]
    history: np.ndarray  # [generations + 1] best fitness in the population: initial, then after each generation
    evaluations: int  # archs passed to the fitness (repeats included)


def predictor_fitness(model: Predictor, space: SearchSpace, cond: Sequence[float] | None = None,
                      spec: SupernetSpec | None = None) -> Fitness:
    """Fitness = predicted R (for ``cond = (omega, target)`` if the predictor is conditional); a gradient-boosting
    predictor reads ``arch_features``, which need the preset ``spec`` (MACs)."""
    check_inputs(model, spec)  # at construction, not at the evolution's first call
    return lambda archs: predict(model, inputs(model, space, spec, archs), cond)


def _evaluate(fitness: Fitness, archs: list[MultiStageArch]) -> np.ndarray:
    f = np.asarray(fitness(archs), dtype=np.float64)
    if f.shape != (len(archs),) or not np.all(np.isfinite(f)):
        raise ValueError(f"fitness must return {len(archs)} finite values, got shape {f.shape}")
    return f


def _check_params(population: int, generations: int, sample_size: int, mutation_prob: float,
                  crossover_prob: float, batch_size: int, top_k: int) -> None:
    if population < 2 or generations < 0 or top_k < 1:
        raise ValueError(f"need population >= 2, generations >= 0, top_k >= 1; "
                         f"got {population}, {generations}, {top_k}")
    least = 2 if crossover_prob > 0 else 1  # crossover needs a second-best
    if not least <= sample_size <= population:
        raise ValueError(f"sample_size must be in [{least}, population={population}], got {sample_size}")
    for name, p in (("mutation_prob", mutation_prob), ("crossover_prob", crossover_prob)):
        if not 0 <= p <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    if batch_size < 1 or population % batch_size:
        raise ValueError(f"batch_size must divide population={population}, got {batch_size}")


def _default_batch(population: int) -> int:
    """The largest divisor of ``population`` not above a tenth of it: small enough to keep the ageing."""
    return max(d for d in range(1, max(1, population // 10) + 1) if population % d == 0)


def evolve(space: SearchSpace, fitness: Fitness, *, population: int, generations: int, sample_size: int,
           mutation_prob: float, crossover_prob: float, seed: int, top_k: int = 10,
           batch_size: int | None = None) -> EvolutionResult:
    """Maximise ``fitness`` over ``space`` by regularized evolution (see the module docstring)."""
    batch = _default_batch(population) if batch_size is None else batch_size
    _check_params(population, generations, sample_size, mutation_prob, crossover_prob, batch, top_k)
    rng = np.random.default_rng(seed)
    members = [space.sample(rng) for _ in range(population)]  # oldest first
    scores = _evaluate(fitness, members)
    seen: dict[MultiStageArch, float] = dict(zip(members, scores.tolist()))
    history = [float(scores.max())]
    evaluations = population
    for _ in range(generations):
        for _ in range(population // batch):
            # tournaments: the fittest two of a uniform sample; ties go to the older member
            picked = np.argsort(rng.random((batch, population)), axis=1)[:, :sample_size]
            ranked = np.take_along_axis(picked, np.lexsort((picked, -scores[picked]), axis=1), axis=1)
            cross = rng.random(batch) < crossover_prob
            children = []
            for row, c in zip(ranked, cross):
                parent = space.crossover(members[row[0]], members[row[1]], rng) if c else members[row[0]]
                children.append(space.mutate(parent, rng, mutation_prob))
            child_scores = _evaluate(fitness, children)
            evaluations += batch
            for arch, f in zip(children, child_scores.tolist()):
                seen.setdefault(arch, f)
            members = members[batch:] + children
            scores = np.concatenate([scores[batch:], child_scores])
        history.append(float(scores.max()))
    top = sorted(seen.items(), key=lambda kv: -kv[1])[:top_k]  # stable: ties keep first-seen order
    return EvolutionResult([a for a, _ in top], np.array([f for _, f in top]), np.array(history), evaluations)


def search_static(space: SearchSpace, fitness: Fitness, **kwargs) -> EvolutionResult:
    """The same evolution over single-exit archs (``space.restrict(stages=1)``): the best static subnet.

    ``fitness`` receives one-stage ``MultiStageArch`` values (``arch.stage(0)`` is the ``SubnetArch``).
    """
    return evolve(space.restrict(stages=1), fitness, **kwargs)
