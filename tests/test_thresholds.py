"""Metric R and the vectorized threshold search, checked against the brute-force reference."""

import numpy as np
import pytest

from enas4d import thresholds as th


def random_db(rng: np.random.Generator, n: int, stages: int, levels: int | None = None, p_correct: float = 0.7):
    """A random database; ``levels`` quantizes confidences to a few values (many ties in R)."""
    conf = rng.random((n, stages))
    if levels is not None:
        conf = np.round(conf * levels) / levels
    correct = rng.random((n, stages)) < p_correct
    cost = np.cumsum(rng.uniform(0.2, 1.0, stages))
    return conf.astype(np.float16), correct, cost


def test_metric_r_formula() -> None:
    assert th.metric_r(0.9, 2.0, 1.0, 0.09) == pytest.approx(0.9 * 0.5**0.09)
    assert th.metric_r(0.9, 0.5, 1.0, 0.09) == 0.9  # under budget: no penalty
    np.testing.assert_allclose(th.metric_r(np.array([0.8, 0.8]), np.array([1.0, 4.0]), 2.0, 1.0), [0.8, 0.4])


def test_evaluate_by_hand() -> None:
    conf = np.array([[0.9, 0.2, 0.1], [0.5, 0.95, 0.3], [0.3, 0.4, 0.6], [0.5, 0.5, 0.9]], dtype=np.float16)
    correct = np.array([[1, 0, 0], [0, 1, 1], [1, 1, 0], [1, 0, 1]], dtype=bool)
    cost = np.array([1.0, 2.0, 4.0])
    ev = th.evaluate(conf, correct, cost, (0.5, 0.9))  # 0.5 is exact in float16: "> 0.5" keeps rows 2, 4
    np.testing.assert_array_equal(ev.exit_fractions, [0.25, 0.25, 0.5])
    np.testing.assert_array_equal(ev.exit_accuracies, [1.0, 1.0, 0.5])
    assert ev.acc == 0.75 and ev.cost == (1 + 2 + 4 + 4) / 4
    never = th.evaluate(conf, correct, cost, (1.0, 1.0))  # max softmax <= 1: nobody exits early
    np.testing.assert_array_equal(never.exit_fractions, [0, 0, 1])
    assert np.isnan(never.exit_accuracies[0]) and never.acc == 0.5 and never.cost == 4.0


ALL_LEVELS = (None, 4, 10, 100)  # None: continuous; 4/10: few distinct values (ties); 100: float16 near/on grid points


@pytest.mark.parametrize("stages,grid,n,levels", [(1, 0.01, 300, ALL_LEVELS), (2, 0.01, 300, ALL_LEVELS),
                                                  (3, 0.05, 300, ALL_LEVELS), (3, 0.01, 120, (None, 100)),
                                                  (4, 0.1, 200, ALL_LEVELS)])
def test_search_equals_brute_force(stages: int, grid: float, n: int, levels: tuple) -> None:
    rng = np.random.default_rng(stages * 100 + n)
    for level in levels:
        conf, correct, cost = random_db(rng, n, stages, level)
        for target in (0.8 * cost[0], cost.mean(), 2 * cost[-1]):
            fast = th.search(conf, correct, cost, target, 0.09, grid)
            assert fast == th.search_reference(conf, correct, cost, target, 0.09, grid)


@pytest.mark.parametrize("p_correct", [0.0, 1.0])
def test_all_wrong_and_all_correct_tie_to_the_first_grid_point(p_correct: float) -> None:
    conf, correct, cost = random_db(np.random.default_rng(1), 200, 3, p_correct=p_correct)
    best = th.search(conf, correct, cost, 10 * cost[-1], 0.09, 0.05)  # R == accuracy everywhere: a flat grid
    assert best == th.search_reference(conf, correct, cost, 10 * cost[-1], 0.09, 0.05)
    assert best.thresholds == (0.0, 0.0) and best.r == p_correct


def test_exact_grid_confidences_do_not_exit_at_equality() -> None:
    """float16 holds 0.25/0.5/0.75/1 exactly; ``conf > T`` is false when they equal the threshold."""
    rng = np.random.default_rng(2)
    conf = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], size=(150, 3)).astype(np.float16)
    correct = rng.random((150, 3)) < 0.6
    cost = np.array([1.0, 1.5, 3.0])
    for target in (1.0, 2.0):
        expect = th.search_reference(conf, correct, cost, target, 0.5, 0.05)
        assert th.search(conf, correct, cost, target, 0.5, 0.05) == expect
    ev = th.evaluate(conf, correct, cost, (0.5, 0.5))
    assert ev.exit_fractions[0] == np.mean(conf[:, 0] > 0.5)


def test_float64_confidences_match_float16_path() -> None:
    conf, correct, cost = random_db(np.random.default_rng(3), 300, 3, levels=100)
    a = th.search(conf, correct, cost, cost.mean(), 0.09, 0.02)
    b = th.search(conf.astype(np.float64), correct, cost, cost.mean(), 0.09, 0.02)
    assert a == b


def test_search_many_and_r_for_targets_match_single_searches(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    dbs = [random_db(rng, 250, 3, levels=(None, 20)[a % 2]) for a in range(5)]
    conf, correct, cost = (np.stack(x) for x in zip(*dbs))
    monkeypatch.setattr(th, "_CHUNK_ELEMENTS", 2 * 51**2)  # evaluate two archs at a time: exercises chunking
    many = th.search_many(conf, correct, cost, 1.2, 0.09, 0.02)
    assert many == [th.search(*db, 1.2, 0.09, 0.02) for db in dbs]
    objectives = [(0.09, 1.0), (0.2, 1.5), (0.0, 1.0)]
    table = th.r_for_targets(conf, correct, cost, objectives, 0.02)
    expect = [[th.search(*db, t, w, 0.02).r for w, t in objectives] for db in dbs]
    np.testing.assert_array_equal(table, expect)


def test_bad_inputs_raise_one_line_errors() -> None:
    conf, correct, cost = random_db(np.random.default_rng(5), 10, 3)
    with pytest.raises(ValueError, match="does not divide"):
        th.search(conf, correct, cost, 1.0, 0.09, 0.03)
    with pytest.raises(ValueError, match="cost has shape"):
        th.search(conf, correct, cost[:2], 1.0, 0.09)
    for bad in (conf * np.float16(2), np.where(correct, np.float16(np.nan), conf), -conf - np.float16(0.01)):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            th.search(bad, correct, cost, 1.0, 0.09)
    with pytest.raises(ValueError, match="correct bool"):
        th.search(conf, correct.astype(int), cost, 1.0, 0.09)
    with pytest.raises(ValueError, match="target"):
        th.search(conf, correct, cost, 0.0, 0.09)
    with pytest.raises(ValueError, match="2 thresholds"):
        th.evaluate(conf, correct, cost, (0.5,))
    big = np.zeros((10, 6), np.float16)
    with pytest.raises(ValueError, match="coarser grid"):
        th.search(big, big > 0, np.arange(1.0, 7.0), 1.0, 0.09, 0.01)
