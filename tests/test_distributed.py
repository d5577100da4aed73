"""Data-parallel training: 2 gloo ranks train exactly like one process with 2 micro-batches, a non-finite
loss on one rank stops every rank, batches shard the global batch, mixed precision runs.

The ranks are forked from the test process (no interpreter start-up: importing torch and torchvision costs
seconds per process on a busy machine) and join the group through the environment variables torchrun sets.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import finetune_settings, pretrain_settings
from enas4d import data, distributed, train
from enas4d.space import SearchSpace
from enas4d.supernet import PRESETS, OFAMobileNetV3

torch.set_num_threads(1)


def splits(prepared: Path) -> tuple[data.Split, data.Split, data.Split]:
    tr = data.load_split(prepared, "train")
    return data.subset(tr, 48, 0), data.subset(tr, 32, 1), data.subset(data.load_split(prepared, "test"), 32, 0)


def train_tiny(prepared: Path, out: Path, micro_batches: int) -> None:
    """Pretraining (full, then elastic kernel with KD) and 2-stage fine-tuning (elastic depth: blocks without
    gradients; per-epoch evaluation dealt out to the ranks) of a tiny supernet, 3 steps per epoch: the same
    calls in one process and on every torchrun rank. No augmentation: its random crops are drawn per rank
    (``data.batches``), so only un-augmented runs can match."""
    train_split, calib, val = splits(prepared)
    train.seed_everything(0)
    net = OFAMobileNetV3(PRESETS["fmnist_small"], SearchSpace(units=5, resolutions=(16, 20)))
    train.pretrain(net, train_split, calib, None, pretrain_settings(epochs_kernel=1, augment=False),
                   ckpt_dir=out / "pretrain", seed=0, micro_batches=micro_batches)
    train.finetune(net, train_split, calib, val, finetune_settings(augment=False), ckpt_dir=out / "finetune",
                   seed=0, micro_batches=micro_batches)


def nan_on_rank_1(prepared: Path, out: Path) -> None:
    """Fine-tune with a loss that is NaN on rank 1 only; each rank records the error it stopped with."""
    train_split, calib, _ = splits(prepared)
    rank = distributed.context().rank
    if rank == 1:
        cross_entropy = torch.nn.functional.cross_entropy
        torch.nn.functional.cross_entropy = lambda *a, **k: cross_entropy(*a, **k) * float("nan")
    net = OFAMobileNetV3(PRESETS["fmnist_small"], SearchSpace(units=5, resolutions=(16,)))
    try:
        train.finetune(net, train_split, calib, None, finetune_settings(), ckpt_dir=out / "nan", seed=0)
    except FloatingPointError as err:
        (out / f"nan-rank{rank}.txt").write_text(str(err))


def params(path: Path) -> dict[str, torch.Tensor]:
    return dict(train.load_supernet(path).named_parameters())


def test_batches_deal_each_global_batch_out_to_the_ranks(fmnist_prepared: Path) -> None:
    split = data.subset(data.load_split(fmnist_prepared, "train"), 50, 0)
    whole = [x for x, _ in data.batches(split, 8, shuffle=True, seed=3, epoch=1)]
    shards = [[x for x, _ in data.batches(split, 4, shuffle=True, seed=3, epoch=1, rank=r, world=2)] for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 7  # 25 images per rank: 6 full batches of 4 and one of 1
    for i in range(50 // 8):  # the full global batches the training loop uses
        both = torch.stack([shards[0][i], shards[1][i]], 1).flatten(0, 1)  # rank r holds positions r, r+2, ...
        assert torch.equal(both, whole[i])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_keeps_fp32_weights(fmnist_prepared: Path, tmp_path: Path, precision: str) -> None:
    train_split, calib, _ = splits(fmnist_prepared)
    train.seed_everything(0)
    net = OFAMobileNetV3(PRESETS["fmnist_small"], SearchSpace(units=5, resolutions=(16,)))
    before = {k: v.clone() for k, v in net.named_parameters()}
    run = train.pretrain(net, train_split, calib, None, pretrain_settings(batch_size=8, precision=precision),
                         ckpt_dir=tmp_path, seed=0)
    assert run.complete and np.isfinite(run.history[0]["loss"])
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert any(not torch.equal(p, before[k]) for k, p in net.named_parameters())
    scaler = train.load_checkpoint(tmp_path / "last.pt")["scaler"]
    if precision == "fp16":  # loss scaling: the first steps overflow at 2**16 and are skipped, the scale shrinks
        assert scaler["scale"] < 2.0**16
    else:
        assert scaler == {}


def test_micro_batches_must_divide_the_batch(fmnist_prepared: Path, tmp_path: Path) -> None:
    train_split, calib, _ = splits(fmnist_prepared)
    net = OFAMobileNetV3(PRESETS["fmnist_small"], SearchSpace(units=5, resolutions=(16,)))
    with pytest.raises(ValueError, match="batch_size 16 does not split into 1 rank.* x 3 micro-batch"):
        train.finetune(net, train_split, calib, None, finetune_settings(), ckpt_dir=tmp_path, seed=0,
                       micro_batches=3)


def one_rank(rank: int, port: int, prepared: Path, out: Path) -> None:
    """A forked rank: torchrun's environment variables, then the training calls."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    distributed.init(torch.device("cpu"))
    try:
        assert distributed.context().world == 2
        train_tiny(prepared, out, micro_batches=1)
        nan_on_rank_1(prepared, out)
    finally:
        distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process_with_two_micro_batches(fmnist_prepared: Path, tmp_path: Path) -> None:
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    ddp.mkdir()
    ranks = torch.multiprocessing.start_processes(one_rank, (free_port(), fmnist_prepared, ddp), nprocs=2,
                                                  join=False, start_method="fork")
    deadline = time.monotonic() + 240
    while not ranks.join(timeout=1):  # re-raises a rank's exception
        if time.monotonic() > deadline:
            for p in ranks.processes:
                p.kill()
            pytest.fail("the ranks did not finish: a collective is waiting for a rank that left")
    train_tiny(fmnist_prepared, single, micro_batches=2)

    for kind, name in (("pretrain", "supernet.pt"), ("finetune", "multistage.pt")):
        a, b = params(ddp / kind / name), params(single / kind / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{kind} {k}: {m}")
        ha = train.load_checkpoint(ddp / kind / "last.pt")["history"]
        hb = train.load_checkpoint(single / kind / "last.pt")["history"]
        for ra, rb in zip(ha, hb, strict=True):  # per-epoch means over both ranks == over both micro-batches
            for key in ("loss", "ce") + tuple(k for k in ra if k.startswith("val_top1")):
                assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1 / 32), (kind, key)

    tuned, pretrained = params(single / "finetune" / "multistage.pt"), params(single / "pretrain" / "supernet.pt")
    assert not all(torch.equal(tuned[k], pretrained[k]) for k in tuned)  # fine-tuning did train

    # rank 1's NaN stopped rank 0 too (no hang), with a message on each; nothing was written
    assert "step 1/3: loss is nan on rank 1; training stopped (no checkpoint was written)" in \
        (ddp / "nan-rank1.txt").read_text()
    assert "step 1/3: a non-finite loss on another rank" in (ddp / "nan-rank0.txt").read_text()
    assert not (ddp / "nan").exists() or not any((ddp / "nan").iterdir())
