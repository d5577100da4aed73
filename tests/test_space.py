"""The search space: canonical validity, exact uniform sampling, size, mutation/crossover, encoding."""

import itertools
import json

import numpy as np
import pytest
from scipy import stats

from enas4d.space import MultiStageArch, SearchSpace, SubnetArch

FMNIST = SearchSpace(units=5, resolutions=(16, 20, 24, 28, 32))
TINY = SearchSpace(units=1, resolutions=(8, 12), depths=(1, 2), expands=(1, 2), kernels=(3, 5), stages=2)


def all_valid(space: SearchSpace) -> list[MultiStageArch]:
    """Brute force: every combination of values, kept if `check` accepts it."""
    S, slots = space.stages, space.slots
    ks, es = (0,) + space.kernels, (0,) + space.expands
    out = []
    for r in space.resolutions:
        for depths in itertools.product(itertools.product(space.depths, repeat=space.units), repeat=S):
            for kern in itertools.product(itertools.product(ks, repeat=slots), repeat=S):
                for exp in itertools.product(itertools.product(es, repeat=slots), repeat=S):
                    a = MultiStageArch(r, depths, kern, exp)
                    try:
                        space.check(a)
                    except ValueError:
                        continue
                    out.append(a)
    return out


def test_size_matches_enumeration_and_sampling_is_uniform():
    archs = all_valid(TINY)
    assert TINY.size() == len(archs) > 10
    rng = np.random.default_rng(0)
    n = 60 * len(archs)
    counts = {a: 0 for a in archs}
    for _ in range(n):
        counts[TINY.sample(rng)] += 1  # KeyError if an invalid or non-canonical arch is drawn
    assert stats.chisquare(list(counts.values())).pvalue > 1e-3


def test_samples_mutations_crossovers_are_valid():
    rng = np.random.default_rng(1)
    a = FMNIST.sample(rng)
    for _ in range(300):
        b = FMNIST.sample(rng)
        c = FMNIST.mutate(a, rng, prob=0.3)
        d = FMNIST.crossover(b, c, rng)
        for x in (b, c, d):
            FMNIST.check(x)
        a = d
        FMNIST.check_subnet(FMNIST.sample_subnet(rng))
    FMNIST.check(FMNIST.largest_multistage())
    FMNIST.check(FMNIST.smallest_multistage())


def test_mutation_changes_something_and_zero_prob_changes_nothing():
    rng = np.random.default_rng(2)
    a = FMNIST.sample(rng)
    assert FMNIST.mutate(a, rng, prob=0.0) == a
    assert any(FMNIST.mutate(a, rng, prob=0.2) != a for _ in range(5))


def test_sampling_is_deterministic_for_a_seed():
    s1 = [FMNIST.sample(np.random.default_rng(7)) for _ in range(3)]
    s2 = [FMNIST.sample(np.random.default_rng(7)) for _ in range(3)]
    assert s1 == s2


def test_check_names_the_problem():
    shallower = FMNIST._uniform_static(32, 3, 7, 6)
    with pytest.raises(ValueError, match="unit 0: depth of stage 3 < stage 2"):
        FMNIST.check(MultiStageArch.from_stages([FMNIST.largest(), FMNIST.largest(), shallower]))
    stages = [FMNIST.largest(), FMNIST.largest(), FMNIST.largest()]
    smaller = SubnetArch(32, stages[2].depths, stages[2].kernels, tuple(3 if e else 0 for e in stages[2].expands))
    with pytest.raises(ValueError, match="cumulative expand of stage 3 < stage 2"):
        FMNIST.check(MultiStageArch.from_stages([stages[0], stages[1], smaller]))
    other_kernel = SubnetArch(32, stages[2].depths, tuple(5 if k else 0 for k in stages[2].kernels), stages[2].expands)
    with pytest.raises(ValueError, match="slot 0: stage 3 adds no channels, so its kernel must repeat stage 2's"):
        FMNIST.check(MultiStageArch.from_stages([stages[0], stages[1], other_kernel]))
    with pytest.raises(ValueError, match="resolution 30"):
        FMNIST.check_subnet(SubnetArch(30, *[getattr(FMNIST.largest(), f) for f in ("depths", "kernels", "expands")]))
    skipped_nonzero = list(FMNIST.smallest().kernels)
    skipped_nonzero[3] = 3
    with pytest.raises(ValueError, match="slot 3"):
        FMNIST.check_subnet(SubnetArch(16, FMNIST.smallest().depths, tuple(skipped_nonzero), FMNIST.smallest().expands))


def test_encoding_is_one_hot_and_injective():
    rng = np.random.default_rng(3)
    archs = [FMNIST.sample(rng) for _ in range(200)]
    X = np.stack([FMNIST.encode(a) for a in archs])
    assert X.shape == (200, FMNIST.encoding_size)
    assert set(np.unique(X)) <= {0.0, 1.0}
    # every stage has one depth per unit and one resolution; blocks run by a stage have one kernel and one width
    for a, x in zip(archs, X):
        run = sum(sum(1 for k in a.kernels[s] if k) for s in range(a.num_stages))
        assert x.sum() == 2 * run + a.num_stages * FMNIST.units + 1
    assert len({x.tobytes() for x in X}) == len(set(archs))


def test_arch_json_round_trip():
    a = FMNIST.sample(np.random.default_rng(4))
    assert MultiStageArch.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    s = a.stage(1)
    assert SubnetArch.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_fmnist_space_is_large():
    assert FMNIST.size() > 10 ** 40
