"""Benchmark: how much the database's labels move with fewer BN-calibration images, against their own noise.

    nice -n 10 python -m benchmarks.calibration [--params params.yaml] [--checkpoint checkpoints/multistage.pt]
        [--archs 40] [--sizes 250 500 1000]

The fine-tuned multi-stage checkpoint and the prepared data of ``--params``; the first ``--archs`` database
archs (``database.sample_archs``, the build's seed), each evaluated exactly as the build does
(``database.evaluate_like_database``) under these conditions:

- ``reference``: the build's ``pretrain.bn_calib_images`` calibration images and its ``database.images``
  metric-set images;
- ``calib_<N>`` for each ``--sizes`` N: the first N calibration images of the same seeded draw (the subset a
  smaller ``database.calib_images`` would take, nested in the reference's), same metric images;
- ``calib_other``: as many calibration images as the reference, drawn with another seed: how much the labels
  move with *which* calibration images, at the reference's count;
- ``metric_other``: the reference's calibration, another ``database.images`` metric-set images disjoint from
  the reference's: the sampling noise the labels carry anyway.

Against the reference, per condition: per-stage top-1 of every arch (mean and max absolute difference, in
points), the best R of every arch for each ``search.targets`` at ``search.omega`` (the predictor's labels,
``thresholds.r_for_targets``: mean absolute difference, and Kendall tau of the archs' R, averaged over
targets). Speed is benchmarks/database.py's business. Writes ``reports/benchmarks/calibration.json``.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch
from scipy.stats import kendalltau

from benchmarks._common import write_json
from enas4d import config, data, database, thresholds, train
from enas4d.evaluate import split_images
from enas4d.multistage import MultiStageNet
from enas4d.space import SearchSpace


def _without(split: data.Split, part: data.Split) -> data.Split:
    """``split`` less the images of ``part`` (same source positions)."""
    keep = ~np.isin(split.indices, part.indices)
    t = torch.from_numpy(keep)
    return replace(split, labels=split.labels[t], indices=split.indices[keep],
                   images=None if split.images is None else split.images[t],
                   files=None if split.files is None else split.files[keep])


def _compare(ref: dict, other: dict) -> dict:
    d_top1 = np.abs(other["top1"] - ref["top1"]) * 100
    d_r = np.abs(other["r"] - ref["r"])
    taus = [float(kendalltau(ref["r"][:, t], other["r"][:, t]).statistic) for t in range(ref["r"].shape[1])]
    return {"top1_mean_abs_diff_points": float(d_top1.mean()),
            "top1_mean_abs_diff_points_per_stage": d_top1.mean(axis=0).tolist(),
            "top1_max_abs_diff_points": float(d_top1.max()),
            "r_mean_abs_diff": float(d_r.mean()), "r_max_abs_diff": float(d_r.max()),
            "r_kendall_tau_per_target": taus, "r_kendall_tau_mean": float(np.mean(taus))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.calibration", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--checkpoint", default="checkpoints/multistage.pt")
    parser.add_argument("--archs", type=int, default=40)
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000])
    args = parser.parse_args(argv)
    cfg = config.load(args.params)
    torch.set_num_threads(cfg.threads)
    msnet = MultiStageNet(train.load_supernet(args.checkpoint)).eval()
    space: SearchSpace = msnet.supernet.space
    splits = {name: data.load_split(cfg.data.out, name) for name in ("train", "metric")}
    n, n_calib, seed = cfg.database.images, cfg.pretrain.bn_calib_images, cfg.seed
    if max(args.sizes) >= n_calib:
        raise ValueError(f"--sizes {args.sizes}: each must be < pretrain.bn_calib_images ({n_calib})")
    metric = data.subset(splits["metric"], n, seed)  # the build's metric images (pipeline.database_images)
    metric_other = data.subset(_without(splits["metric"], metric), n, seed)
    calib = {"reference": data.subset(splits["train"], n_calib, seed),  # pipeline.calib_split
             **{f"calib_{k}": data.subset(splits["train"], k, seed) for k in args.sizes},
             "calib_other": data.subset(splits["train"], n_calib, seed + 1)}
    calib_x = {k: split_images(v) for k, v in calib.items()}
    runs = {k: (metric, k) for k in calib} | {"metric_other": (metric_other, "reference")}
    images = {id(s): (split_images(s), s.labels) for s in (metric, metric_other)}
    archs = database.sample_archs(space, args.archs, seed)
    batch = cfg.database.batch_size
    objectives = [(cfg.search.omega, t) for t in cfg.search.targets]
    conf = {k: [] for k in runs}
    correct = {k: [] for k in runs}
    macs = []
    for a in archs:
        for k, (split, c) in runs.items():
            rows = database.evaluate_like_database(msnet, a, *images[id(split)], calib_x[c], batch)
            conf[k].append(rows.conf)
            correct[k].append(rows.correct)
        macs.append(rows.macs)
    cost = np.asarray(macs, dtype=np.float64) / 1e6
    labels = {k: {"top1": np.stack(correct[k]).mean(axis=1),
                  "r": thresholds.r_for_targets(np.stack(conf[k]), np.stack(correct[k]), cost, objectives,
                                                cfg.search.grid)} for k in runs}
    ref = labels["reference"]
    write_json("calibration", {
        "checkpoint": args.checkpoint,
        "settings": {"archs": len(archs), "images": n, "reference_calib_images": n_calib, "sizes": args.sizes,
                     "batch_size": batch, "threads": cfg.threads, "omega": cfg.search.omega,
                     "targets": list(cfg.search.targets), "grid": cfg.search.grid},
        "reference": {"top1_mean_per_stage": ref["top1"].mean(axis=0).tolist(),
                      "r_mean": ref["r"].mean(axis=0).tolist(), "r_std_across_archs": ref["r"].std(axis=0).tolist()},
        "against_reference": {k: _compare(ref, v) for k, v in labels.items() if k != "reference"},
    })


if __name__ == "__main__":
    main()
