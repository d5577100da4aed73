"""The dynamic-inference probe: ranking, stage gains and the cascade ceiling, checked against direct
computations; per-stage prediction layers survive a save/load; the hardness weights of fine-tuning."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from enas4d import probe, train
from enas4d.cost import stage_macs, subnet_macs
from enas4d.multistage import MultiStageNet
from tiny_net import tiny_multistage


def test_ranking_and_correlations_match_direct_evaluation() -> None:
    msnet, space, images, labels, calib = tiny_multistage()
    net = msnet.supernet
    rows = probe.ranking(net, space, images, labels, calib, per_resolution=3, seed=0)
    assert sorted(rows["resolution"].value_counts().items()) == [(16, 3), (20, 3)]
    for _, row in rows.iterrows():
        arch = type(space.largest()).from_dict(row["arch"])
        assert arch.resolution == row["resolution"]
        assert row["mmacs"] == subnet_macs(net.spec, arch) / 1e6
        out = probe.subnet_outputs(net, arch, images, calib)
        assert row["top1"] == pytest.approx(float((out.pred[:, 0] == labels.numpy()).mean()))
    ranks = probe.rank_correlation(rows)
    g = rows[rows["resolution"] == 20]
    assert ranks["20"]["spearman"] == pytest.approx(stats.spearmanr(g["mmacs"], g["top1"]).statistic, nan_ok=True)
    assert ranks["all"]["n"] == 6


def test_stage_gains_compare_each_stage_with_stage_one() -> None:
    msnet, space, images, labels, calib = tiny_multistage()
    archs = [space.sample(np.random.default_rng(s)) for s in range(3)]
    rows = probe.stage_gains(msnet, archs, images, labels, calib)
    assert len(rows) == 3 * 3
    for i, a in enumerate(archs):
        out = probe.multistage_outputs(msnet, a, images, calib)
        mine = rows[rows["arch"] == i].sort_values("stage")
        top1 = (out.pred == labels.numpy()[:, None]).mean(0)
        np.testing.assert_allclose(mine["top1"], top1)
        np.testing.assert_allclose(mine["gain"], top1 - top1[0])
        np.testing.assert_allclose(mine["agree_s1"], (out.pred == out.pred[:, :1]).mean(0))
        np.testing.assert_allclose(mine["mmacs"], np.asarray(stage_macs(msnet.supernet.spec, a)) / 1e6)
    summary = probe.gain_summary(rows)
    last = rows[rows["stage"] == 3]
    assert summary["gain_last_mean"] == pytest.approx(last["gain"].mean())
    assert summary["gain_last_positive"] == pytest.approx((last["gain"] > 0).mean())
    assert summary["archs"] == 3


def brute_cascade(small: probe.Outputs, large: probe.Outputs, labels: np.ndarray) -> float:
    """The threshold by trying every candidate: fewest exits-to-large MACs whose top-1 reaches large's."""
    ok_s, ok_l, conf = small.pred[:, 0] == labels, large.pred[:, 0] == labels, small.conf[:, 0]
    best_t, best_exits = 1.0, 0
    for t in sorted({1.0, 0.0, *conf.tolist()}):
        leave = conf > t
        if np.where(leave, ok_s, ok_l).mean() >= ok_l.mean() and leave.sum() > best_exits:
            best_t, best_exits = t, leave.sum()
    return best_t


def test_cascade_threshold_matches_brute_force_and_replays_on_test() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = 60
        labels = rng.integers(0, 3, n)
        conf = np.round(rng.uniform(0.3, 1.0, n), 1)  # ties on purpose
        small = probe.Outputs(conf[:, None], np.where(rng.random(n) < conf, labels, (labels + 1) % 3)[:, None])
        large = probe.Outputs(np.ones((n, 1)), np.where(rng.random(n) < 0.9, labels, (labels + 1) % 3)[:, None])
        got = probe.cascade_potential(small, large, small, large, labels, labels, 10, 40)
        t = brute_cascade(small, large, labels)
        leave = conf > t
        assert (conf > got["threshold"]).sum() == leave.sum()
        assert got["top1"] >= got["top1_large"]  # replayed on the same images, the guarantee holds
        assert got["mmacs"] == pytest.approx(np.where(leave, 10, 50).mean() / 1e6)
        assert got["exit_small"] == pytest.approx(leave.mean())


def test_stage_heads_are_saved_and_loaded(tmp_path: Path) -> None:
    msnet = tiny_multistage()[0]
    net = copy.deepcopy(msnet.supernet)
    net.add_stage_heads(3)
    assert len(net.stage_heads) == 2 and net.stage_head(0) is net.head_layers
    with torch.no_grad():
        net.stage_heads[1].classifier.bias.add_(1.0)  # stage 3's own prediction layer now differs
    train.save_supernet(tmp_path / "ms.pt", net)
    back = train.load_supernet(tmp_path / "ms.pt")
    assert len(back.stage_heads) == 2
    torch.testing.assert_close(back.stage_head(2).classifier.bias, net.stage_heads[1].classifier.bias)
    with pytest.raises(ValueError, match="prediction layers for 3 stages, not 2"):
        back.add_stage_heads(2)
    arch = msnet.supernet.space.sample(np.random.default_rng(0))
    x = torch.randn(4, 1, arch.resolution, arch.resolution)
    outs = MultiStageNet(back).eval()(x, arch)
    exported = MultiStageNet(back).eval().export(arch).eval()(x)
    for a, b in zip(outs, exported):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_stage_weights_follow_the_previous_stage_misses() -> None:
    y = torch.tensor([0, 1, 2, 0])
    first = torch.tensor([[9.0, 0, 0], [0, 0, 9], [0, 0, 9], [0, 9, 0]])  # right, wrong, right, wrong
    outs = [first, torch.zeros(4, 3), torch.zeros(4, 3)]
    plain = train.stage_weights(outs, y, 0.0)
    assert all(torch.equal(w, torch.ones(4)) for w in plain)
    hard = train.stage_weights(outs, y, 1.0)
    assert torch.equal(hard[0], torch.ones(4))
    assert hard[1].mean().item() == pytest.approx(1.0)
    assert hard[1][1] > 1.9 and hard[1][0] < 0.01  # the misses carry the weight
    torch.testing.assert_close(hard[2], torch.ones(4))  # stage 2 is uniform (all p = 1/3): equal weights
    half = train.stage_weights(outs, y, 0.5)
    torch.testing.assert_close(half[1], 0.5 + 0.5 * hard[1])
