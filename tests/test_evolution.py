"""Regularized evolution: valid archs throughout, deterministic, improves a known fitness, static variant."""

import numpy as np
import pytest
import torch

from enas4d import evolution as ev
from enas4d import predictor as pr
from enas4d.encoding import encode_many
from enas4d.space import MultiStageArch, SearchSpace

torch.set_num_threads(1)

SPACE = SearchSpace(units=3, resolutions=(16, 20, 24, 28, 32))
KW = dict(population=20, generations=15, sample_size=5, mutation_prob=0.1, crossover_prob=0.5, seed=0)


def size_fitness(archs: list[MultiStageArch]) -> np.ndarray:
    """Bigger kernels, deeper last stage and higher resolution score higher (optimum: the largest arch)."""
    return np.array([sum(a.kernels[-1]) + 3 * sum(a.depths[-1]) + a.resolution / 4 for a in archs], dtype=float)


def checked(space: SearchSpace, seen: list):
    """``size_fitness`` that also asserts every evaluated arch is valid in ``space``."""
    def fitness(archs):
        for a in archs:
            space.check(a)
        seen.extend(archs)
        return size_fitness(archs)
    return fitness


def test_valid_archs_and_improvement() -> None:
    seen: list = []
    result = ev.evolve(SPACE, checked(SPACE, seen), **{**KW, "generations": 40})
    assert len(seen) == result.evaluations == 20 * 41
    assert len(result.history) == 41
    rng = np.random.default_rng(0)
    random_search = size_fitness([SPACE.sample(rng) for _ in range(result.evaluations)]).max()
    assert result.best_fitness[0] > random_search  # same budget
    assert result.best_fitness[0] >= 0.95 * size_fitness([SPACE.largest_multistage()])[0]
    assert list(result.best_fitness) == sorted(result.best_fitness, reverse=True)
    assert len(set(result.best)) == len(result.best) == 10
    np.testing.assert_array_equal(result.best_fitness, size_fitness(result.best))


def test_deterministic_for_a_seed() -> None:
    a = ev.evolve(SPACE, size_fitness, **KW)
    b = ev.evolve(SPACE, size_fitness, **KW)
    c = ev.evolve(SPACE, size_fitness, **{**KW, "seed": 1})
    assert a.best == b.best and np.array_equal(a.history, b.history)
    assert a.best != c.best


def test_sequential_batches_are_the_same_algorithm() -> None:
    seen: list = []
    calls = []
    def fitness(archs):
        calls.append(len(archs))
        return checked(SPACE, seen)(archs)
    result = ev.evolve(SPACE, fitness, **{**KW, "generations": 3}, batch_size=1)
    assert calls == [20] + [1] * 60 and len(result.history) == 4


def test_static_search_is_single_exit() -> None:
    static = SPACE.restrict(stages=1)
    seen: list = []
    result = ev.search_static(SPACE, checked(static, seen), **KW)
    assert all(a.num_stages == 1 for a in result.best + seen)


def test_predictor_fitness_is_the_batched_prediction() -> None:
    model = pr.MetricPredictor(SPACE.encoding_size, [16])
    archs = [SPACE.sample(np.random.default_rng(i)) for i in range(7)]
    fitness = ev.predictor_fitness(model, SPACE)
    np.testing.assert_array_equal(fitness(archs), pr.predict(model, encode_many(SPACE, archs)))
    result = ev.evolve(SPACE, fitness, **{**KW, "generations": 2})
    assert len(result.best) == 10


def test_bad_parameters_and_fitness() -> None:
    with pytest.raises(ValueError, match="sample_size"):
        ev.evolve(SPACE, size_fitness, **{**KW, "sample_size": 21})
    with pytest.raises(ValueError, match="sample_size"):
        ev.evolve(SPACE, size_fitness, **{**KW, "sample_size": 1})  # crossover needs a second-best
    assert ev.evolve(SPACE, size_fitness, **{**KW, "sample_size": 1, "crossover_prob": 0.0}).evaluations == 320
    with pytest.raises(ValueError, match="batch_size"):
        ev.evolve(SPACE, size_fitness, **KW, batch_size=3)
    with pytest.raises(ValueError, match="crossover_prob"):
        ev.evolve(SPACE, size_fitness, **{**KW, "crossover_prob": 1.5})
    with pytest.raises(ValueError, match="finite values"):
        ev.evolve(SPACE, lambda archs: np.zeros(len(archs) + 1), **KW)
