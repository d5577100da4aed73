"""Baselines on a tiny random-init supernet: static search and fitness, random rows, the cascade, operating points."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from enas4d import baselines, cost, database, evolution
from enas4d.encoding import encode_many
from enas4d.predictor import MetricPredictor, predict
from enas4d.space import MultiStageArch, SubnetArch
from tiny_net import SPEC, tiny_multistage

torch.set_num_threads(1)


def test_cascade_runs_separate_static_subnets_and_pays_for_every_stage_run():
    msnet, space, images, labels, calib = tiny_multistage()
    arch = space.sample(np.random.default_rng(4))
    static = [database.evaluate_like_database(msnet, arch.stage(s), images, labels, calib, 8) for s in range(3)]
    rows = baselines.cascade_rows(static)
    for s in range(3):
        np.testing.assert_array_equal(rows.conf[:, s], static[s].conf[:, 0])
        np.testing.assert_array_equal(rows.correct[:, s], static[s].correct[:, 0])
    each = [cost.subnet_macs(SPEC, arch.stage(s)) for s in range(3)]
    assert rows.macs.tolist() == baselines.cascade_macs(SPEC, arch) == [sum(each[:s + 1]) for s in range(3)]
    reuse = cost.stage_macs(SPEC, arch)
    assert rows.macs[0] == reuse[0]  # stage 1 is the same static subnet either way
    assert all(c > r for c, r in zip(rows.macs[1:], reuse[1:])), "feature reuse must save MACs"
    # stage 1 of the cascade is the multi-stage net's stage 1 (same subnet, same BN recipe)
    multi = database.evaluate_like_database(msnet, arch, images, labels, calib, 8)
    np.testing.assert_allclose(rows.conf[:, 0].astype(np.float32), multi.conf[:, 0].astype(np.float32), atol=2e-3)
    with pytest.raises(ValueError, match="single-exit evaluations"):
        baselines.cascade_rows([multi])


def test_static_search_returns_single_exit_subnets_fittest_first():
    _, space, *_ = tiny_multistage()

    def fitness(archs):  # prefer cheap subnets: a fitness with a known direction
        assert all(a.num_stages == 1 for a in archs)
        return -np.array([cost.subnet_macs(SPEC, a.stage(0)) for a in archs], dtype=float)

    kw = dict(population=8, generations=3, sample_size=3, mutation_prob=0.3, crossover_prob=0.5, seed=1, top_k=4)
    best = [a.stage(0) for a in evolution.search_static(space, fitness, **kw).best]
    assert len(best) == 4 and all(isinstance(a, SubnetArch) for a in best)
    for a in best:
        space.check_subnet(a)
    macs = [cost.subnet_macs(SPEC, a) for a in best]
    assert macs == sorted(macs)
    assert best == [a.stage(0) for a in evolution.search_static(space, fitness, **kw).best]


def test_static_fitness_moves_a_per_target_predictor_to_any_target():
    _, space, *_ = tiny_multistage()
    torch.manual_seed(0)
    one = space.restrict(stages=1)
    model = MetricPredictor(one.encoding_size, [8])
    archs = [MultiStageArch.from_stages([space.smallest()]), MultiStageArch.from_stages([space.largest()])]
    m = np.array([cost.subnet_macs(SPEC, a.stage(0)) for a in archs]) / 1e6
    assert 0.2 < m[0] < 1.0 < m[1]
    raw = predict(model, encode_many(one, archs))
    # trained at 1.0 MMACs, asked for 0.2: both archs are over budget at 0.2, only the large one at 1.0
    f = baselines.static_fitness({1.0: model, 5.0: MetricPredictor(one.encoding_size, [8])}, space, SPEC, 0.2, 0.3)
    np.testing.assert_allclose(f(archs), raw * np.array([(0.2 / m[0]) ** 0.3, 0.2 ** 0.3]))
    # the nearest trained target is used: at its own target the prediction is unchanged
    np.testing.assert_allclose(baselines.static_fitness({1.0: model}, space, SPEC, 1.0, 0.3)(archs), raw)
    with pytest.raises(ValueError, match="at least one"):
        baselines.static_fitness({}, space, SPEC, 1.0, 0.3)


def test_random_rows_are_distinct_seeded_database_rows():
    rows = baselines.random_rows(50, 20, seed=3)
    assert len(set(rows.tolist())) == 20 and rows.min() >= 0 and rows.max() < 50
    assert np.array_equal(rows, baselines.random_rows(50, 20, seed=3))
    assert not np.array_equal(rows, baselines.random_rows(50, 20, seed=4))
    with pytest.raises(ValueError, match="21 archs requested from a database of 20"):
        baselines.random_rows(20, 21, seed=0)


def test_replayed_thresholds_are_real_early_exit():
    msnet, space, images, labels, calib = tiny_multistage()
    arch = space.sample(np.random.default_rng(7))
    rows = database.evaluate_like_database(msnet, arch, images, labels, calib, 8)
    point = baselines.operating_point(rows, rows, target=float(rows.macs[1]) / 1e6, omega=0.5, grid=0.05)
    from enas4d.evaluate import recalibrate_bn
    from enas4d.supernet import resize

    net = recalibrate_bn(msnet.export(arch), resize(calib, arch.resolution), 8)
    real = net.early_exit(resize(images, arch.resolution), point.thresholds)
    assert point.top1 == pytest.approx((real.pred == labels).float().mean().item())
    assert point.avg_mmacs == pytest.approx(real.macs.double().mean().item() / 1e6)
    np.testing.assert_allclose(point.exit_fractions, np.bincount(real.exit_stage.numpy(), minlength=3) / 24)


def rows_of(conf, correct, macs) -> database.ArchRows:
    return database.ArchRows(np.asarray(conf, dtype=np.float16), np.asarray(correct, dtype=bool),
                             np.asarray(macs, dtype=np.int64))


def test_operating_point_follows_the_cost_target():
    rng = np.random.default_rng(0)
    n = 200
    conf = np.column_stack([rng.uniform(0.5, 1, n), rng.uniform(0.5, 1, n), rng.uniform(0.5, 1, n)])
    correct = np.column_stack([rng.random(n) < 0.6, rng.random(n) < 0.8, np.ones(n, bool)])
    macs = [1_000_000, 2_000_000, 3_000_000]
    metric, test = rows_of(conf, correct, macs), rows_of(conf[::-1], correct[::-1], macs)
    # loose target: nothing to save, so everyone goes on to the always-right last stage
    loose = baselines.operating_point(metric, test, target=4.0, omega=0.09, grid=0.05)
    assert loose.top1 == 1.0 and loose.avg_mmacs == 3.0 and loose.exit_fractions.tolist() == [0, 0, 1]
    assert loose.thresholds == (1.0, 1.0) and loose.metric_r == 1.0
    # a target below stage 1 with a heavy cost weight: everyone exits at stage 1
    tight = baselines.operating_point(metric, test, target=0.5, omega=5.0, grid=0.05)
    assert tight.exit_fractions.tolist() == [1, 0, 0] and tight.avg_mmacs == 1.0
    assert tight.top1 == pytest.approx(correct[:, 0].mean())
    assert np.isnan(tight.exit_top1[1:]).all()
    # a static net: one exit, no thresholds
    one = rows_of(conf[:, :1], correct[:, :1], macs[:1])
    static = baselines.operating_point(one, one, target=2.0, omega=0.09, grid=0.05)
    assert static.thresholds == () and static.top1 == pytest.approx(correct[:, 0].mean())
    with pytest.raises(ValueError, match="different nets"):
        baselines.operating_point(metric, one, target=2.0, omega=0.09, grid=0.05)
