"""The probe of what dynamic inference rests on, cheap enough to run while developing and in every run.

The paper's effect needs two properties of the trained networks, and a run that lacks either one shows
tables of noise: (1) the supernet *ranks* its subnets (more MACs at one resolution give a higher top-1),
and (2) a multi-stage net's later stages are *more accurate* than stage 1 rather than copies of it. The
probe measures both on one image set, plus the ceiling early exit can reach on this supernet:

- `ranking` / `rank_correlation`: random static subnets per resolution, Spearman and Kendall of MACs vs top-1;
- `stage_gains`: per multi-stage arch, each stage's top-1, its gain over stage 1 and the share of images on
  which it predicts the same class as stage 1;
- `cascade_potential`: a two-exit cascade smallest -> largest static subnet without reuse, its max-softmax
  threshold chosen on one image set (the metric set) and replayed on another (the test set).

Every net is evaluated as everywhere else: extracted or exported, BN recalibrated on the fixed calibration
images, eval mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import Tensor, nn

from enas4d.cost import stage_macs, subnet_macs
from enas4d.evaluate import EVAL_BATCH, deploy, memory_format
from enas4d.multistage import MultiStageNet
from enas4d.progress import bar
from enas4d.space import MultiStageArch, SearchSpace, SubnetArch
from enas4d.supernet import OFAMobileNetV3, resize


@dataclass(frozen=True)
class Outputs:
    """Per image and exit: max-softmax confidence and predicted class (``[N, S]``; ``S = 1`` for a static net)."""

    conf: np.ndarray
    pred: np.ndarray

    def correct(self, labels: np.ndarray) -> np.ndarray:
        return self.pred == np.asarray(labels)[:, None]


@torch.inference_mode()
def _outputs(model: nn.Module, images: Tensor, resolution: int, batch_size: int) -> Outputs:
    """Every exit's confidence and prediction of a deployed ``model`` on ``images``."""
    device = next(model.parameters()).device
    fmt = memory_format(device)  # the format `deploy` put the model in
    confs, preds = [], []
    for x in images.split(batch_size):
        out = model(resize(x.to(device), resolution).contiguous(memory_format=fmt))
        logits = torch.stack(out if isinstance(out, (list, tuple)) else [out], 1).float()
        conf, pred = torch.softmax(logits, 2).max(2)
        confs.append(conf.cpu())
        preds.append(pred.cpu())
    return Outputs(torch.cat(confs).numpy(), torch.cat(preds).numpy())


def subnet_outputs(supernet: OFAMobileNetV3, arch: SubnetArch, images: Tensor, calib: Tensor,
                   batch_size: int = EVAL_BATCH) -> Outputs:
    """Static subnet ``arch`` (extracted, BN recalibrated) on ``images`` (normalized, at the data's native side)."""
    return _outputs(deploy(supernet, arch, calib, batch_size), images, arch.resolution, batch_size)


def multistage_outputs(msnet: MultiStageNet, arch: MultiStageArch, images: Tensor, calib: Tensor,
                       batch_size: int = EVAL_BATCH) -> Outputs:
    """Every stage of multi-stage ``arch`` (exported: own BN per stage) on ``images``, no early exit."""
    return _outputs(deploy(msnet, arch, calib, batch_size), images, arch.resolution, batch_size)


# ---------------------------------------------------------------------------------------------- (1) ranking


def ranking(supernet: OFAMobileNetV3, space: SearchSpace, images: Tensor, labels: Tensor, calib: Tensor, *,
            per_resolution: int, seed: int, batch_size: int = EVAL_BATCH) -> pd.DataFrame:
    """``per_resolution`` random static subnets at each resolution of ``space``: one row each with
    ``resolution``, ``mmacs``, ``top1`` and the arch (JSON-able dict)."""
    rng = np.random.default_rng([seed, 0xA11C])
    archs = [a for r in space.resolutions
             for a in (space.restrict(resolutions=(r,)).sample_subnet(rng) for _ in range(per_resolution))]
    y = labels.numpy()
    rows = []
    for a in bar(archs, desc="probe: static subnets", unit="arch"):
        top1 = float(subnet_outputs(supernet, a, images, calib, batch_size).correct(y).mean())
        rows.append({"resolution": a.resolution, "mmacs": subnet_macs(supernet.spec, a) / 1e6, "top1": top1,
                     "arch": a.to_dict()})
    return pd.DataFrame(rows)


def rank_correlation(rows: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per resolution (and ``all``): Spearman rho and Kendall tau of MACs vs top-1, and the number of subnets."""
    groups = [(str(r), g) for r, g in rows.groupby("resolution")] + [("all", rows)]
    return {name: {"spearman": float(stats.spearmanr(g["mmacs"], g["top1"]).statistic),
                   "kendall": float(stats.kendalltau(g["mmacs"], g["top1"]).statistic), "n": len(g)}
            for name, g in groups}


# ---------------------------------------------------------------------------------------------- (2) stages


def stage_gains(msnet: MultiStageNet, archs: Sequence[MultiStageArch], images: Tensor, labels: Tensor,
                calib: Tensor, *, batch_size: int = EVAL_BATCH) -> pd.DataFrame:
    """One row per (arch, stage): cumulative ``mmacs``, ``top1``, ``gain`` over stage 1 (points of top-1 as a
    fraction) and ``agree_s1``, the share of images on which the stage predicts what stage 1 predicts."""
    y = labels.numpy()
    rows = []
    for i, a in enumerate(bar(archs, desc="probe: multi-stage archs", unit="arch")):
        out = multistage_outputs(msnet, a, images, calib, batch_size)
        top1 = out.correct(y).mean(0)
        macs = stage_macs(msnet.supernet.spec, a, restart=msnet.restart)
        for s in range(a.num_stages):
            rows.append({"arch": i, "stage": s + 1, "mmacs": macs[s] / 1e6, "top1": float(top1[s]),
                         "gain": float(top1[s] - top1[0]),
                         "agree_s1": float((out.pred[:, s] == out.pred[:, 0]).mean())})
    return pd.DataFrame(rows)


def gain_summary(rows: pd.DataFrame) -> dict[str, float]:
    """Over archs: mean per-stage top-1, mean (with its 95% t-interval over archs) and minimum gain of the last
    stage, the share of archs whose last stage beats stage 1, and the mean agreement of the last stage with stage 1."""
    last = rows[rows["stage"] == rows["stage"].max()]
    out = {f"top1_s{s}": float(g["top1"].mean()) for s, g in rows.groupby("stage")}
    low, high = (stats.t.interval(0.95, len(last) - 1, loc=last["gain"].mean(), scale=stats.sem(last["gain"]))
                 if len(last) > 1 else (np.nan, np.nan))
    return out | {"gain_last_mean": float(last["gain"].mean()), "gain_last_ci95_low": float(low),
                  "gain_last_ci95_high": float(high), "gain_last_min": float(last["gain"].min()),
                  "gain_last_positive": float((last["gain"] > 0).mean()),
                  "agree_last_s1": float(last["agree_s1"].mean()), "archs": int(last.shape[0])}


# ---------------------------------------------------------------------------------------------- cascade ceiling


def cascade_potential(small: Outputs, large: Outputs, small_test: Outputs, large_test: Outputs,
                      labels: np.ndarray, labels_test: np.ndarray, macs_small: int, macs_large: int) -> dict[str, float]:
    """Two static nets as a cascade without reuse: an image leaves after ``small`` when its max softmax is
    > T, else it also pays ``large``. T is the one with the fewest average MACs whose metric-set top-1
    (``small``/``large``, ``labels``) reaches ``large``'s own; it is then replayed on the test outputs."""
    conf, ok_s, ok_l = small.conf[:, 0], small.correct(labels)[:, 0], large.correct(labels)[:, 0]
    order = np.argsort(-conf, kind="stable")
    c = conf[order]
    # k images leave early (the k most confident): top-1 = their small hits + the others' large hits
    hits = np.concatenate([[0], np.cumsum(ok_s[order])]) + ok_l.sum() - np.concatenate([[0], np.cumsum(ok_l[order])])
    cut = np.concatenate([[True], c[:-1] > c[1:], [True]])  # "conf > T" can separate the first k from the rest
    ok = np.flatnonzero(cut & (hits >= ok_l.sum()))
    k_best = int(ok.max())  # k = 0 (T = 1, nobody leaves) always qualifies
    best = 1.0 if k_best == 0 else (float(c[k_best]) if k_best < len(c) else 0.0)
    leave = small_test.conf[:, 0] > best
    top1 = float(np.where(leave, small_test.correct(labels_test)[:, 0], large_test.correct(labels_test)[:, 0]).mean())
    macs = float(np.where(leave, macs_small, macs_small + macs_large).mean())
    return {"threshold": best, "top1": top1, "top1_large": float(large_test.correct(labels_test).mean()),
            "mmacs": macs / 1e6, "mmacs_large": macs_large / 1e6, "macs_ratio": macs / macs_large,
            "exit_small": float(leave.mean())}
