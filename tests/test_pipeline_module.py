"""The notebooks' shared set-up (enas4d.pipeline): config-derived space and splits, calibration images, checkpoint
loading with stale-space checks, git-ignored scratch dirs, timing, and the database-style evaluation of one arch."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

from enas4d import config, cost, data, database, pipeline, train
from enas4d.evaluate import split_images
from enas4d.space import MultiStageArch, SearchSpace
from enas4d.supernet import to_ofa_state_dict

torch.set_num_threads(1)


@pytest.fixture
def cfg(fmnist_prepared: Path) -> config.Config:
    """The smoke profile reading the session's prepared Fashion-MNIST splits."""
    return config.load(ROOT / "profiles/smoke.yaml", overrides={"data": {"out": str(fmnist_prepared)}})


def test_space_follows_the_preset_and_params(cfg: config.Config) -> None:
    s = pipeline.space(cfg)
    assert s == SearchSpace(units=5, resolutions=(16, 20), depths=(2, 3, 4), expands=(3, 4, 6), kernels=(3, 5, 7),
                            stages=3)
    assert pipeline.space(cfg, stages=1).stages == 1
    assert pipeline.space(dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, stages=2))).stages == 2


def test_device_and_threads(cfg: config.Config) -> None:
    assert pipeline.device(cfg) == torch.device("cpu")  # the smoke profile says cpu
    auto = dataclasses.replace(cfg, device="auto")
    assert pipeline.device(auto).type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device: cuda, but torch sees no CUDA device"):
            pipeline.device(dataclasses.replace(cfg, device="cuda"))
    before = torch.get_num_threads()
    try:
        pipeline.set_threads(dataclasses.replace(cfg, threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_splits_and_the_fixed_images(cfg: config.Config) -> None:
    splits = pipeline.splits(cfg)
    assert {k: len(v) for k, v in splits.items()} == {"train": 2000, "metric": 500, "test": 500}
    calib = pipeline.calib_split(cfg, splits["train"])
    assert len(calib) == cfg.pretrain.bn_calib_images
    assert set(calib.indices) <= set(splits["train"].indices)
    again = pipeline.calib_images(cfg, splits["train"])
    assert torch.equal(again, split_images(calib)), "the same images every time"
    with pytest.raises(ValueError, match="come from the train split, got split 'metric'"):
        pipeline.calib_split(cfg, splits["metric"])
    n = cfg.database.calib_images
    assert n < len(calib), "the profile under test must calibrate the database on fewer images than the probes"
    fewer = pipeline.calib_split(cfg, splits["train"], n)
    assert len(fewer) == n and set(fewer.indices) < set(calib.indices), "fewer images of the same draw"
    assert torch.equal(pipeline.database_calib_images(cfg, splits["train"]), split_images(fewer))
    val = pipeline.val_split(cfg, splits["metric"])
    assert len(val) == min(pipeline.VAL_IMAGES, len(splits["metric"]))
    images, labels = pipeline.database_images(cfg, splits["metric"])
    part = data.subset(splits["metric"], cfg.database.images, cfg.seed)
    assert torch.equal(images, split_images(part)) and torch.equal(labels, part.labels)
    assert len(set(part.indices)) == cfg.database.images
    again, _ = pipeline.database_images(cfg, splits["metric"])
    assert torch.equal(images, again), "the same images every time"
    too_many = dataclasses.replace(cfg, database=dataclasses.replace(cfg.database, images=len(splits["metric"]) + 1))
    with pytest.raises(ValueError, match=f"subset of {len(splits['metric']) + 1} images requested from the"):
        pipeline.database_images(too_many, splits["metric"])


def test_splits_must_fit_the_preset(cfg: config.Config) -> None:
    imagenet = dataclasses.replace(cfg, supernet=dataclasses.replace(cfg.supernet, preset="ofa_mbv3_w1.0"))
    with pytest.raises(ValueError, match="ofa_mbv3_w1.0 has 1000 classes and 3 input channels, .* has 10 and 1"):
        pipeline.splits(imagenet)


def test_new_supernet_is_seeded_and_imports_ofa_weights(cfg: config.Config, tmp_path: Path) -> None:
    a, b = pipeline.new_supernet(cfg), pipeline.new_supernet(cfg)
    assert train.weights_digest(a) == train.weights_digest(b)
    assert a.space == pipeline.space(cfg, stages=1)
    other = pipeline.new_supernet(dataclasses.replace(cfg, seed=1))
    assert train.weights_digest(other) != train.weights_digest(a)
    torch.save(to_ofa_state_dict(other), tmp_path / "ofa.pth")
    imported = pipeline.new_supernet(
        dataclasses.replace(cfg, supernet=dataclasses.replace(cfg.supernet, checkpoint=str(tmp_path / "ofa.pth"))))
    assert train.weights_digest(imported) == train.weights_digest(other)


def test_loading_checks_the_space(cfg: config.Config, tmp_path: Path) -> None:
    net = pipeline.new_supernet(cfg)
    train.save_supernet(tmp_path / "supernet.pt", net)
    assert train.weights_digest(pipeline.load_supernet(cfg, tmp_path / "supernet.pt")) == train.weights_digest(net)
    train.save_supernet(tmp_path / "multistage.pt", net, space=pipeline.space(cfg))
    msnet = pipeline.load_multistage(cfg, tmp_path / "multistage.pt")
    assert not msnet.training and msnet.supernet.space == pipeline.space(cfg)
    with pytest.raises(ValueError, match="supernet.pt: search space .* differs from params.yaml's"):
        pipeline.load_multistage(cfg, tmp_path / "supernet.pt")  # 1 stage, params say 3
    wider = dataclasses.replace(cfg, supernet=dataclasses.replace(cfg.supernet, resolutions=(16, 20, 24)))
    with pytest.raises(ValueError, match="supernet.pt: search space .* rerun its stage"):
        pipeline.load_supernet(wider, tmp_path / "supernet.pt")
    other = dataclasses.replace(cfg, supernet=dataclasses.replace(cfg.supernet, preset="ofa_mbv3_w1.0"))
    with pytest.raises(ValueError, match="supernet.pt: layer sizes differ from params.yaml's supernet.preset"):
        pipeline.load_supernet(other, tmp_path / "supernet.pt")


def test_scratch_dirs_are_invisible_to_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    d = pipeline.resume_dir("supernet")
    assert d == Path("checkpoints/.resume/supernet")
    (d / "last.pt").write_bytes(b"x")
    (pipeline.ignored_dir("databases/confidence.partial") / "shard-00000.npz").write_bytes(b"x")
    Path("kept.txt").write_text("x")
    status = subprocess.run(["git", "status", "--porcelain", "-uall"], capture_output=True, text=True, check=True)
    assert status.stdout.splitlines() == ["?? kept.txt"]


def test_timer_accumulates_even_when_the_step_fails() -> None:
    timer = pipeline.Timer()
    with timer("a"):
        pass
    with pytest.raises(KeyError), timer("b"):
        raise KeyError("x")
    with timer("a"):
        pass
    assert set(timer.seconds) == {"a", "b"} and all(v >= 0 for v in timer.seconds.values())
    assert timer.total == pytest.approx(timer.seconds["a"] + timer.seconds["b"])


def test_search_helpers(cfg: config.Config) -> None:
    with pytest.raises(ValueError, match="search.cost: latency: the predictor and search stages use MACs"):
        pipeline.check_cost(dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, cost="latency")))
    pipeline.check_cost(cfg)
    np.testing.assert_array_equal(pipeline.mmacs([1_500_000, 2_000_000]), [1.5, 2.0])
    assert pipeline.predictor_path("static", 1.0) == pipeline.PREDICTORS / "static-1.pt"
    assert pipeline.predictor_path("multistage", 1.25).name == "multistage-1.25.pt"
    with pytest.raises(ValueError, match="predictor kind 'cascade'"):
        pipeline.predictor_path("cascade", 1.0)
    objectives = pipeline.cond_objectives(cfg)
    omegas, targets = sorted({w for w, _ in objectives}), sorted({t for _, t in objectives})
    assert cfg.search.omega in omegas and min(omegas) < cfg.search.omega < max(omegas)
    assert set(cfg.search.targets) | set(cfg.reports.sweep_targets) == set(targets)
    assert len(objectives) == len(omegas) * len(targets)


def test_evaluate_like_database_equals_the_database_row(cfg: config.Config, tmp_path: Path) -> None:
    space = pipeline.space(cfg)
    net = pipeline.new_supernet(cfg)
    train.save_supernet(tmp_path / "multistage.pt", net, space=space)
    msnet = pipeline.load_multistage(cfg, tmp_path / "multistage.pt")
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(20, 1, 28, 28, generator=g), torch.randint(0, 10, (20,), generator=g)
    calib = torch.randn(12, 1, 28, 28, generator=g)
    out = database.build(msnet, space, msnet.supernet.spec, images, labels, calib, archs=3, shard_size=2,
                         batch_size=8, seed=0, out=tmp_path / "db", weights_id="w")
    db = database.load(out)
    for i, arch in enumerate(db.archs):
        rows = database.evaluate_like_database(msnet, arch, images, labels, calib, batch_size=8)
        np.testing.assert_array_equal(rows.conf, db.conf[i])
        np.testing.assert_array_equal(rows.correct, db.correct[i])
        np.testing.assert_array_equal(rows.macs, db.macs[i])
    static = db.archs[0].stage(0)
    rows = database.evaluate_like_database(msnet, static, images, labels, calib, batch_size=8)
    np.testing.assert_array_equal(rows.conf, db.conf[0][:, :1])  # stage 1 of a multi-stage net is the subnet
    assert rows.macs.tolist() == [cost.subnet_macs(msnet.supernet.spec, static)] == [db.macs[0][0]]
    assert database.as_multistage(static) == MultiStageArch.from_stages([static])
