"""Benchmark: supernet throughput (largest and smallest subnets) and the cost of an epoch of each training phase.

    python -m benchmarks.supernet [--params params.yaml] [--threads 2] [--steps 10]

Writes ``reports/benchmarks/supernet.json``:

- ``train_img_s``: one SGD step (forward through the supernet with the arch, CE, backward, update) of the
  largest and smallest subnets, each at its own resolution;
- ``infer_img_s``: the extracted static subnet under ``torch.inference_mode``, in the default (NCHW) and
  ``channels_last`` memory formats (``enas4d.evaluate`` uses whichever this shows to be faster);
- ``epoch_s_estimate``: ``enas4d.train.pretrain`` (each phase) and ``finetune`` run for ``--steps``
  batches, extrapolated to a full epoch of the params' training split (``wall_s``, and ``cpu_s``: the
  process CPU time, i.e. about the wall time of an idle machine when run with one thread), and the
  time to evaluate one subnet (BN recalibration on ``bn_calib_images`` + 1000 test images).

Images are random (the cost does not depend on their content), so no prepared data is needed. The OpenMP
waiting policy is recorded in the file: on an idle machine leave it unset (``PASSIVE`` made training 1.7x
slower); on a shared one ``OMP_WAIT_POLICY=PASSIVE`` keeps spinning threads from stealing busy cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks._common import time_ms, write_json
from enas4d import config, data, train
from enas4d.evaluate import evaluate_subnet
from enas4d.space import SearchSpace, SubnetArch
from enas4d.supernet import PRESETS, OFAMobileNetV3

EVAL_IMAGES = 1000


def fake_split(n: int, channels: int, side: int, classes: int, seed: int) -> data.Split:
    """A split of random images, shaped like the configured dataset."""
    g = torch.Generator().manual_seed(seed)
    return data.Split(name="bench", labels=torch.randint(0, classes, (n,), generator=g), indices=np.arange(n),
                      classes=tuple(map(str, range(classes))), in_channels=channels, image_size=side,
                      mean=(0.5,) * channels, std=(0.25,) * channels,
                      images=torch.randint(0, 256, (n, channels, side, side), dtype=torch.uint8, generator=g))


def train_img_s(net: OFAMobileNetV3, arch: SubnetArch, batch: int, repeats: int) -> float:
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    x = torch.randn(batch, net.spec.in_channels, arch.resolution, arch.resolution)
    y = torch.randint(0, net.spec.num_classes, (batch,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x, arch), y).backward()
        opt.step()

    return round(batch / time_ms(step, repeats)["median_ms"] * 1e3, 1)


def infer_img_s(net: OFAMobileNetV3, arch: SubnetArch, batch: int, repeats: int) -> dict[str, float]:
    static = net.extract(arch).eval()
    x = torch.randn(batch, net.spec.in_channels, arch.resolution, arch.resolution)
    out = {}
    with torch.inference_mode():
        for fmt in ("contiguous_format", "channels_last"):
            mf = getattr(torch, fmt)
            m, xm = static.to(memory_format=mf), x.contiguous(memory_format=mf)
            out[fmt] = round(batch / time_ms(lambda: m(xm), repeats)["median_ms"] * 1e3, 1)
    return out


def _per_epoch(row: dict, timed: int, steps: int) -> dict[str, float]:
    return {"wall_s": round(row["train_seconds"] / timed * steps, 1),
            "cpu_s": round(row["train_cpu_seconds"] / timed * steps, 1)}


def epoch_estimates(cfg: config.Config, space: SearchSpace, steps: int, side: int) -> dict:
    """Seconds per full epoch of each pretraining phase and of fine-tuning, from ``steps`` timed batches."""
    p, f = cfg.pretrain, cfg.finetune
    spec = PRESETS[cfg.supernet.preset]
    n_train = cfg.data.train_limit or (60_000 - cfg.data.metric_size)
    fake = lambda n, s: fake_split(n, spec.in_channels, side, spec.num_classes, s)  # noqa: E731
    calib, val = fake(p.bn_calib_images, 1), fake(EVAL_IMAGES, 2)
    net = OFAMobileNetV3(spec, space)
    out: dict = {"train_images": n_train, "timed_steps": steps}
    with tempfile.TemporaryDirectory() as tmp:
        one_epoch_each = replace(p, epochs_full=1, epochs_kernel=1, epochs_depth=1, epochs_expand=1,
                                 precision="fp32")
        res = train.pretrain(net, fake(steps * p.batch_size, 0), calib, None, one_epoch_each,
                             ckpt_dir=Path(tmp) / "pre", seed=0)
        for row in res.history:
            out[f"pretrain_{row['phase']}"] = _per_epoch(row, steps, n_train // p.batch_size)
        res = train.finetune(net, fake(steps * f.batch_size, 3), calib, None, replace(f, epochs=1, precision="fp32"),
                             ckpt_dir=Path(tmp) / "ft", seed=0)
        out["finetune"] = _per_epoch(res.history[0], steps, n_train // f.batch_size)
    calib_images = torch.cat([x for x, _ in data.batches(calib, 1000, shuffle=False, seed=0)])
    for name, arch in (("largest", space.largest()), ("smallest", space.smallest())):
        start = time.perf_counter()
        evaluate_subnet(net, arch, val, calib_images)
        out[f"evaluate_{name}_per_{EVAL_IMAGES}_images"] = round(time.perf_counter() - start, 2)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.supernet", description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--threads", type=int, help="torch threads (default: params threads)")
    ap.add_argument("--steps", type=int, default=10, help="timed batches per training phase")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per throughput number")
    args = ap.parse_args(argv)
    cfg = config.load(args.params)
    torch.set_num_threads(args.threads or cfg.threads)
    s = cfg.supernet
    spec = PRESETS[s.preset]
    space = SearchSpace(units=len(spec.units), resolutions=s.resolutions, depths=s.depths, expands=s.expands,
                        kernels=s.kernels, stages=cfg.finetune.stages)
    train.seed_everything(cfg.seed)
    net = OFAMobileNetV3(spec, space)
    archs = {"largest": space.largest(), "smallest": space.smallest()}
    results = {
        "preset": s.preset,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "resolution": {k: a.resolution for k, a in archs.items()},
        "batch": {"train": cfg.pretrain.batch_size, "infer": 500},
        "train_img_s": {k: train_img_s(net.train(), a, cfg.pretrain.batch_size, args.repeats)
                        for k, a in archs.items()},
        "infer_img_s": {k: infer_img_s(net, a, 500, args.repeats) for k, a in archs.items()},
        "epoch_s_estimate": epoch_estimates(cfg, space, args.steps, cfg.data.image_size or data.FMNIST_SIZE),
    }
    write_json("supernet", results)


if __name__ == "__main__":
    main()
