"""``python -m enas4d.deploy``: export the pipeline's searched nets to ONNX folders (run from the project root).

    python -m enas4d.deploy [--params params.yaml] [--searched searched/archs.json] [--out deployed]

Every searched target's multi-stage net (with its thresholds) and static subnet, with the fine-tuned weights and
BN recalibrated on the pipeline's calibration images at the arch's resolution (``enas4d.latency.deploy``: the
recipe of the database, the search and Table 4), go to ``<out>/multistage-<target>`` and ``<out>/static-<target>``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from enas4d import config, cost, pipeline
from enas4d.deploy import export_multistage, export_static
from enas4d.latency import deploy as recalibrated
from enas4d.space import MultiStageArch, SubnetArch


def export_searched(cfg: config.Config, searched: str | Path, out: str | Path) -> list[Path]:
    """Every target of ``searched`` (the search stage's archs.json): ``<out>/multistage-<t>`` and ``static-<t>``."""
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
    calib = pipeline.calib_images(cfg, splits["train"])
    tr = splits["train"]
    info = {"classes": tr.classes, "mean": tr.mean, "std": tr.std}
    batch = cfg.database.batch_size
    spec = msnet.supernet.spec
    written = []
    for t, arch, thresholds, t_static, static in entries:
        written.append(export_multistage(recalibrated(msnet, arch, calib, batch), thresholds,
                                         Path(out) / f"multistage-{t:g}", **info))
        written.append(export_static(recalibrated(msnet, static, calib, batch), static,
                                     Path(out) / f"static-{t_static:g}", macs=cost.subnet_macs(spec, static), **info))
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
        for p in export_searched(cfg, args.searched, args.out):
            print(p)
    except ValueError as err:  # ConfigError, DataError, CheckpointError, DeployError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
