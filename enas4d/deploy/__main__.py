"""``python -m enas4d.deploy``: export the pipeline's searched nets to ONNX folders (run from the project root).

    python -m enas4d.deploy [--params params.yaml] [--searched searched/archs.json] [--out deployed]

Every searched target's multi-stage net (with its thresholds) and static subnet, with the fine-tuned weights and
BN recalibrated on the database's calibration images (``database.calib_images``) at the arch's resolution
(``enas4d.evaluate.deploy``: the recipe of the database, the search and Table 4), go to
``<out>/multistage-<target>`` and ``<out>/static-<target>``. Each folder is then run by `EarlyExitSession` on the
calibration images beside the PyTorch net it came from; the largest logit difference and the share of images with
the same exit stage and prediction go to ``reports/metrics/deploy.json`` (the ``deploy`` DVC stage), so a pipeline
run shows that what it ships agrees.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from enas4d import config, cost, notebook, pipeline
from enas4d.deploy import export_multistage, export_static
from enas4d.evaluate import deploy as recalibrated
from enas4d.runtime import EarlyExitSession
from enas4d.space import MultiStageArch, SubnetArch
from enas4d.supernet import resize


@torch.no_grad()
def agreement(folder: Path, net: nn.Module, images: Tensor) -> dict:
    """``folder`` run by `EarlyExitSession` (one thread) against ``net`` (PyTorch) on ``images``: the largest
    absolute logit difference over every stage, and the share of images with the same exit stage and prediction."""
    sess = EarlyExitSession(folder, threads=1)
    x = resize(images.cpu(), sess.resolution).contiguous()
    net = net.cpu().eval()
    if sess.num_stages == 1:  # a static subnet
        want = [net(x)]
        same = sess.run(x.numpy()).pred == want[0].argmax(1).numpy()
    else:
        want = net(x)
        got, ref = sess.run(x.numpy()), net.early_exit(x, sess.thresholds)
        same = (got.exit_stage == ref.exit_stage.numpy()) & (got.pred == ref.pred.numpy())
    diff = max(float(np.abs(a - b.numpy()).max()) for a, b in zip(sess.stage_logits(x.numpy()), want))
    return {"folder": str(folder), "stages": sess.num_stages, "max_abs_logit_diff": diff,
            "same_exit_and_pred": float(same.mean())}


def export_searched(cfg: config.Config, searched: str | Path, out: str | Path) -> list[dict]:
    """Every target of ``searched`` (the search stage's archs.json): ``<out>/multistage-<t>`` and ``static-<t>``,
    each with its `agreement` on the calibration images."""
    path = Path(searched)
    try:
        found = json.loads(path.read_text())
        entries = [(m["target"], MultiStageArch.from_dict(m["arch"]), m["thresholds"], s["target"],
                    SubnetArch.from_dict(s["arch"])) for m, s in zip(found["multistage"], found["static"], strict=True)]
    except FileNotFoundError:
        raise ValueError(f"{path}: missing; run the search stage first (dvc repro search)") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a search result ({type(err).__name__}: {err})") from None
    msnet = pipeline.load_multistage(cfg)
    splits = pipeline.splits(cfg)
    calib = pipeline.database_calib_images(cfg, splits["train"])
    tr = splits["train"]
    info = {"classes": tr.classes, "mean": tr.mean, "std": tr.std}
    batch = cfg.database.batch_size
    spec = msnet.supernet.spec
    written = []
    for t, arch, thresholds, t_static, static in entries:
        net = recalibrated(msnet, arch, calib, batch)
        folder = export_multistage(net, thresholds, Path(out) / f"multistage-{t:g}", **info)
        written.append({"kind": "multistage", "target": t, **agreement(folder, net, calib)})
        net = recalibrated(msnet, static, calib, batch)
        folder = export_static(net, static, Path(out) / f"static-{t_static:g}",
                               macs=cost.subnet_macs(spec, static), **info)
        written.append({"kind": "static", "target": t_static, **agreement(folder, net, calib)})
    return written


def main(argv: list[str] | None = None) -> int:
    """Export the searched nets of the pipeline to ONNX folders (run from the project root)."""
    parser = argparse.ArgumentParser(prog="python -m enas4d.deploy", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--searched", default="searched/archs.json")
    parser.add_argument("--out", default="deployed")
    args = parser.parse_args(argv)
    try:
        cfg = config.load(args.params)
        pipeline.set_threads(cfg)
        written = export_searched(cfg, args.searched, args.out)
        for w in written:
            print(f"{w['folder']}: max |logit difference| {w['max_abs_logit_diff']:.2e} to PyTorch, "
                  f"{100 * w['same_exit_and_pred']:.1f}% same exit and prediction")
        notebook.write_metrics("deploy", {
            "max_abs_logit_diff": max(w["max_abs_logit_diff"] for w in written),
            "min_same_exit_and_pred": min(w["same_exit_and_pred"] for w in written),
            "folders": {Path(w["folder"]).name: w for w in written}})
    except ValueError as err:  # ConfigError, DataError, CheckpointError, DeployError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
