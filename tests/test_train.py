"""Training machinery: exact resume, checkpoints, NaN stop, BN recalibration, evaluation, curves."""

from __future__ import annotations

import csv
import random
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import finetune_settings, pretrain_settings
from enas4d import data, train
from enas4d.evaluate import evaluate_multistages, evaluate_subnets, recalibrate_bn, split_images
from enas4d.multistage import MultiStageNet
from enas4d.space import SearchSpace
from enas4d.supernet import PRESETS, OFAMobileNetV3, load_ofa_state_dict, resize

torch.set_num_threads(1)
SPACE = SearchSpace(units=5, resolutions=(16,))
PRETRAIN = pretrain_settings(epochs_full=1, epochs_kernel=2, epochs_depth=0, epochs_expand=1, batch_size=16, lr=0.05,
                             lr_shrink=0.02)


@pytest.fixture(scope="module")
def splits(fmnist_prepared: Path) -> dict[str, data.Split]:
    tr = data.load_split(fmnist_prepared, "train")
    return {"train": data.subset(tr, 64, 0), "calib": data.subset(tr, 32, 1),
            "val": data.subset(data.load_split(fmnist_prepared, "test"), 48, 0)}


def fresh_net(seed: int = 0) -> OFAMobileNetV3:
    train.seed_everything(seed)
    return OFAMobileNetV3(PRESETS["fmnist_small"], SPACE)


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def without_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in history]


def test_seed_everything_and_rng_state_roundtrip(tmp_path: Path) -> None:
    def draws() -> tuple:
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    train.seed_everything(3)
    first = draws()
    train.seed_everything(3)
    assert draws() == first
    train.save_checkpoint(tmp_path / "rng.pt", {"rng": train.rng_state()})
    expected = draws()
    train.seed_everything(99)
    train.set_rng_state(train.load_checkpoint(tmp_path / "rng.pt", ("rng",))["rng"])  # weights_only load
    assert draws() == expected


def test_load_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(train.CheckpointError, match="bad.pt: corrupt") as err:
        train.load_checkpoint(bad)
    assert "\n" not in str(err.value)
    bad.write_bytes(np.random.default_rng(0).bytes(5000))  # torch's own message advises weights_only=False
    with pytest.raises(train.CheckpointError, match="bad.pt: corrupt") as err:
        train.load_checkpoint(bad)
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value), err.value
    with pytest.raises(ValueError, match="bad.pt: corrupt or not a torch state dict") as err:
        load_ofa_state_dict(fresh_net(), bad)
    assert "weights_only" not in str(err.value)
    with pytest.raises(train.CheckpointError, match="missing.pt: checkpoint not found"):
        train.load_checkpoint(tmp_path / "missing.pt")
    train.save_checkpoint(tmp_path / "other.pt", {"model": {}})
    with pytest.raises(train.CheckpointError, match="other.pt: .*missing key 'history'"):
        train.load_checkpoint(tmp_path / "other.pt", ("model", "history"))


def test_load_weights_rejects_wrong_keys_and_shapes() -> None:
    net = nn.Linear(3, 2)
    state = net.state_dict()
    with pytest.raises(train.CheckpointError, match=r"ck.pt: .*'weight' has shape \(2, 4\)"):
        train.load_weights(net, {**state, "weight": torch.zeros(2, 4)}, "ck.pt")
    with pytest.raises(train.CheckpointError, match="ck.pt: .*missing key 'bias'"):
        train.load_weights(net, {"weight": state["weight"]}, "ck.pt")
    with pytest.raises(train.CheckpointError, match="ck.pt: .*unexpected key 'extra'"):
        train.load_weights(net, {**state, "extra": torch.zeros(1)}, "ck.pt")


def test_phase_spaces_open_one_dimension_at_a_time() -> None:
    space = SearchSpace(units=5, resolutions=(16, 20))
    got = {p: (s.kernels, s.depths, s.expands, s.resolutions)
           for p in train.PHASES for s in [train.phase_space(space, p)]}
    assert got["full"] == ((7,), (4,), (6,), (20,)), "the teacher trains at the largest resolution only"
    assert got["kernel"] == ((3, 5, 7), (4,), (6,), (16, 20))
    assert got["depth"] == ((3, 5, 7), (2, 3, 4), (6,), (16, 20))
    assert got["expand"] == ((3, 5, 7), (2, 3, 4), (3, 4, 6), (16, 20))


def test_pretrain_killed_and_resumed_ends_with_identical_weights(tmp_path: Path, splits: dict) -> None:
    whole = fresh_net()
    full = train.pretrain(whole, splits["train"], splits["calib"], splits["val"], PRETRAIN, ckpt_dir=tmp_path / "a",
                          seed=0)
    assert full.complete and [r["phase"] for r in full.history] == ["full", "kernel", "kernel", "expand"]

    # killed in the middle of phase "kernel" (optimizer/scheduler state in flight), then restarted
    part = train.pretrain(fresh_net(), splits["train"], splits["calib"], splits["val"], PRETRAIN,
                          ckpt_dir=tmp_path / "b", seed=0, stop_after=2)
    assert not part.complete and not (tmp_path / "b" / "supernet.pt").exists()
    torch.manual_seed(1234)  # a restarted process has other global RNG states: the checkpoint restores them
    resumed_net = fresh_net()
    resumed = train.pretrain(resumed_net, splits["train"], splits["calib"], splits["val"], PRETRAIN,
                             ckpt_dir=tmp_path / "b", seed=0)
    assert resumed.complete and same_state(whole, resumed_net)
    assert without_times(resumed.history) == without_times(full.history)
    row = full.history[-1]
    assert 0 <= row["val_top1_smallest"] <= 1 and np.isfinite(row["kd"]) and row["step"] == 4 * 4
    # the teacher at lr, the shrinking phases from lr_shrink (half-way down its cosine after kernel epoch 1)
    assert full.history[1]["lr"] == pytest.approx(PRETRAIN.lr_shrink / 2)
    loaded = train.load_supernet(tmp_path / "b" / "supernet.pt")
    assert same_state(loaded, whole) and loaded.space == SPACE


def test_sandwich_trains_the_largest_subnet_in_every_shrinking_step(tmp_path: Path, splits: dict,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    net = fresh_net()
    seen = []
    forward = OFAMobileNetV3.forward

    def spy(self, x, arch):
        if self is net and torch.is_grad_enabled():  # the student's training passes only
            seen.append(arch)
        return forward(self, x, arch)

    monkeypatch.setattr(OFAMobileNetV3, "forward", spy)
    args = replace(PRETRAIN, epochs_full=1, epochs_kernel=1, epochs_expand=0, sandwich=True)
    train.pretrain(net, splits["train"], splits["calib"], None, args, ckpt_dir=tmp_path, seed=0)
    steps = len(splits["train"]) // args.batch_size
    largest = train.phase_space(SPACE, "kernel").largest()
    assert len(seen) == steps + 2 * steps  # phase full: one arch per step; kernel: the largest + one random
    assert seen[steps::2] == [largest] * steps and any(a != largest for a in seen[steps + 1::2])


def test_pretrain_starts_over_when_settings_change(tmp_path: Path, splits: dict) -> None:
    args = replace(PRETRAIN, epochs_kernel=0, epochs_expand=0, epochs_full=2)
    train.pretrain(fresh_net(), splits["train"], splits["calib"], None, args, ckpt_dir=tmp_path, seed=0, stop_after=1)
    with pytest.warns(UserWarning, match="last.pt: written with other settings \\(lr: 0.05 -> 0.1\\)"):
        run = train.pretrain(fresh_net(), splits["train"], splits["calib"], None, replace(args, lr=0.1),
                             ckpt_dir=tmp_path, seed=0, stop_after=1)
    assert len(run.history) == 1 and run.history[0]["lr"] == pytest.approx(0.1 / 2)  # half-way down the new cosine


def test_teacher_runs_once_per_batch_part_with_the_sandwich(tmp_path: Path, splits: dict, monkeypatch) -> None:
    calls: list[tuple[int, ...]] = []
    frozen_copy = train._frozen_copy

    def counted(model: OFAMobileNetV3) -> OFAMobileNetV3:
        teacher = frozen_copy(model)
        teacher.register_forward_hook(lambda m, inp, out: calls.append(tuple(inp[0].shape)))
        return teacher

    monkeypatch.setattr(train, "_frozen_copy", counted)
    args = replace(PRETRAIN, epochs_full=1, epochs_kernel=1, epochs_expand=0, sandwich=True)
    train.pretrain(fresh_net(), splits["train"], splits["calib"], None, args, ckpt_dir=tmp_path, seed=0,
                   micro_batches=2)
    steps = len(splits["train"]) // args.batch_size
    assert calls == [(args.batch_size // 2, 1, 16, 16)] * (2 * steps)  # 2 archs a step, 2 parts: 2 teacher runs


def test_nonfinite_loss_stops_and_writes_no_checkpoint(tmp_path: Path, splits: dict) -> None:
    net = fresh_net()
    with torch.no_grad():
        net.head_layers.classifier.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"pretrain full 1/1, step 1/4: loss is nan; .*no checkpoint"):
        train.pretrain(net, splits["train"], splits["calib"], None, PRETRAIN, ckpt_dir=tmp_path, seed=0)
    assert not any(tmp_path.iterdir())


def test_finetune_resumes_exactly_and_tracks_every_stage(tmp_path: Path, splits: dict) -> None:
    args = finetune_settings(stages=2, epochs=2, batch_size=16, eval_archs=1)
    whole = fresh_net()
    full = train.finetune(whole, splits["train"], splits["calib"], splits["val"], args, ckpt_dir=tmp_path / "a", seed=0)
    train.finetune(fresh_net(), splits["train"], splits["calib"], splits["val"], args, ckpt_dir=tmp_path / "b",
                   seed=0, stop_after=1)
    resumed_net = fresh_net()
    resumed = train.finetune(resumed_net, splits["train"], splits["calib"], splits["val"], args,
                             ckpt_dir=tmp_path / "b", seed=0)
    assert same_state(whole, resumed_net) and not same_state(whole, fresh_net())
    assert without_times(resumed.history) == without_times(full.history)
    assert {"val_top1_s1", "val_top1_s2", "train_top1_s2"} <= full.history[-1].keys()
    assert train.load_supernet(tmp_path / "b" / "multistage.pt").space.stages == 2
    with pytest.raises(train.CheckpointError, match="holds a 'finetune' run"):
        train.pretrain(fresh_net(), splits["train"], splits["calib"], None, PRETRAIN, ckpt_dir=tmp_path / "b", seed=0)


def test_recalibrate_bn_computes_plain_averages_and_restores_settings() -> None:
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=0.3)
    net = nn.Sequential(conv, bn).eval()
    bn.running_mean.fill_(7.0)
    images = torch.randn(40, 1, 12, 12)
    recalibrate_bn(net, images, batch_size=16, resolution=10)  # 40 images -> 3 near-equal batches of 14/13/13
    with torch.no_grad():
        acts = [conv(resize(x, 10)) for x in torch.tensor_split(images, 3)]
    expected = torch.stack([a.mean((0, 2, 3)) for a in acts]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected)
    assert not net.training and bn.momentum == 0.3
    with pytest.raises(ValueError, match="got the supernet itself"):
        recalibrate_bn(MultiStageNet(fresh_net()), images, batch_size=16)


def test_evaluation_leaves_the_supernet_alone_and_stage1_matches_static(splits: dict) -> None:
    net = fresh_net()
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    calib = split_images(splits["calib"])
    arch = SPACE.restrict(stages=3).sample(np.random.default_rng(1))
    [per_stage] = evaluate_multistages(MultiStageNet(net), [arch], splits["val"], calib)
    [static] = evaluate_subnets(net, [arch.stage(0)], splits["val"], calib)
    assert len(per_stage) == 3 and all(0 <= a <= 1 for a in per_stage)
    assert per_stage[0] == static  # stage 1 of a multi-stage net is the static subnet of its config
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and net.training


def test_history_to_csv_writes_the_union_of_columns(tmp_path: Path) -> None:
    path = tmp_path / "plots" / "curve.csv"
    train.history_to_csv([{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5, "val_top1": 0.5}], path)
    rows = list(csv.DictReader(path.open()))
    assert rows == [{"epoch": "1", "loss": "2.0", "val_top1": ""}, {"epoch": "2", "loss": "1.5", "val_top1": "0.5"}]
    assert [p.name for p in path.parent.iterdir()] == ["curve.csv"]  # no temp file left behind


def test_each_epoch_prints_one_line_and_rewrites_the_curves(tmp_path: Path, splits: dict, capsys) -> None:
    args = replace(PRETRAIN, epochs_full=2, epochs_kernel=0, epochs_expand=0)
    curves = tmp_path / "curves.csv"
    train.pretrain(fresh_net(), splits["train"], splits["calib"], splits["val"], args, ckpt_dir=tmp_path, seed=0,
                   stop_after=1, curves=curves)
    with open(curves) as f:
        first = list(csv.DictReader(f))
    assert [r["epoch"] for r in first] == ["1"], "the curve holds the finished epoch before the run ends"
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("pretrain full epoch")]
    assert len(lines) == 1
    assert re.fullmatch(r"pretrain full epoch 1/2: loss \d+\.\d{4}, val_top1_largest \d\.\d{4}, "
                        r"val_top1_smallest \d\.\d{4}, \d+ s", lines[0]), lines[0]
    train.pretrain(fresh_net(), splits["train"], splits["calib"], splits["val"], args, ckpt_dir=tmp_path, seed=0,
                   curves=curves)
    with open(curves) as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]
