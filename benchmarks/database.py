"""Benchmark: the confidence database build against plain batched inference of the same archs, in one run.

    nice -n 10 python -m benchmarks.database [--params params.yaml] [--archs 12] [--images 2000] [--repeats 2]

A freshly initialised supernet of the params' preset (sorted channels; throughput does not depend on weight
values) and random images at the native size: ``--images`` "metric-set" images and ``database.calib_images``
calibration images (the build's), the params' ``database.batch_size`` and threads. Timed, alternating,
``--repeats`` times:

- ``build``: ``database.build`` of ``--archs`` archs into a fresh directory: per arch export, BN recalibration on
  the calibration images, all S stages on the images (no early exit), confidences, shards written;
- ``plain``: the same archs' last stage as extracted static subnets (extracted beforehand, not timed, no
  recalibration), run over the same images at the same batch size: the cheapest way to get one output per image;
- ``recalibrate``: only the build's export + BN recalibration of the same archs (``evaluate.deploy``'s recipe), to
  split the build's time: recalibration runs every arch over the calibration images in training mode (one pass
  of the exported net calibrates every stage's BN), so with as many calibration images as database images it
  alone cost about one more pass over the data (``reports/benchmarks/calibration.json`` chose fewer);
- ``export``: only ``MultiStageNet.export`` of the same archs (part of ``recalibrate``): module construction;
- ``build_probe_calibration``: ``build`` with the ``pretrain.bn_calib_images`` calibration images of the training
  stages' probes (what the build used before ``database.calib_images``).

Throughput is counted in sample-stages/s for the build (archs x images x S per second) and in arch-images/s for
both; ``efficiency`` = build arch-images/s / plain arch-images/s (goal >= 0.75): the build pays for S outputs, a
BN recalibration and bookkeeping per arch, the plain run for one output. ``efficiency_without_recalibration``
takes the export + recalibration time off the build's; ``efficiency_with_probe_calibration`` is the build's with
``pretrain.bn_calib_images`` calibration images. ``macs_bound_efficiency`` is the efficiency the build would have
if time followed MACs (``cost``): plain MACs (images x last stage) over the build's (calibration images + images,
each through stages 1..S): the build's own work sets it, no implementation reaches it, and ``efficiency_of_bound``
says how close this one is. Writes ``reports/benchmarks/database.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import spec_space, write_json
from enas4d import config, cost, database
from enas4d.evaluate import deploy, memory_format
from enas4d.multistage import MultiStageNet
from enas4d.supernet import OFAMobileNetV3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.database", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--archs", type=int, default=12)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    cfg = config.load(args.params)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    spec, space = spec_space(cfg)
    supernet = OFAMobileNetV3(spec, space)
    supernet.sort_channels()
    msnet = MultiStageNet(supernet).eval()
    g = torch.Generator().manual_seed(cfg.seed)
    size = 28  # Fashion-MNIST's native side
    images = torch.randn(args.images, spec.in_channels, size, size, generator=g)
    labels = torch.randint(0, spec.num_classes, (args.images,), generator=g)
    calib = torch.randn(cfg.database.calib_images, spec.in_channels, size, size, generator=g)
    probe_calib = torch.randn(cfg.pretrain.bn_calib_images, spec.in_channels, size, size, generator=g)
    batch = cfg.database.batch_size
    archs = database.sample_archs(space, args.archs, cfg.seed)
    fmt = memory_format(torch.device("cpu"))
    lasts = [msnet.supernet.extract(a.stage(a.num_stages - 1)).eval().to(memory_format=fmt) for a in archs]
    at_res = {r: database.at_resolution(images, r) for r in {a.resolution for a in archs}}

    @torch.inference_mode()
    def plain() -> None:
        for a, net in zip(archs, lasts):
            x = at_res[a.resolution]
            for i in range(0, len(x), batch):
                net(x[i:i + batch])

    def recalibrate() -> None:
        for a in archs:
            deploy(msnet, a, calib, batch)

    def export() -> None:
        for a in archs:
            msnet.export(a)

    def build(out: Path, calib: torch.Tensor = calib) -> None:
        database.build(msnet, space, spec, images, labels, calib, archs=args.archs, shard_size=cfg.database.shard_size,
                       batch_size=batch, seed=cfg.seed, out=out, weights_id="benchmark")

    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {"build": [], "plain": [], "recalibrate": [], "export": [],
                                     "build_probe_calibration": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            calls = {"plain": plain, "build": lambda r=r: build(Path(tmp) / f"db{r}"), "recalibrate": recalibrate,
                     "export": export,
                     "build_probe_calibration": lambda r=r: build(Path(tmp) / f"probe{r}", probe_calib)}
            for name in list(calls) if r % 2 == 0 else list(calls)[::-1]:
                start = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - start)
        db = database.load(Path(tmp) / "db0")
    if db.conf.shape != (args.archs, args.images, space.stages):
        raise RuntimeError(f"the build wrote conf {db.conf.shape}, expected {(args.archs, args.images, space.stages)}")
    sec = {k: statistics.median(v) for k, v in times.items()}
    pairs = args.archs * args.images
    last_macs = sum(cost.subnet_macs(spec, a.stage(a.num_stages - 1)) for a in archs)  # per image, all archs
    stages_macs = sum(cost.stage_macs(spec, a)[-1] for a in archs)
    bound = last_macs * args.images / (stages_macs * (args.images + len(calib)))
    load = f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs"
    write_json("database", {
        "weights": "fresh initialisation of the preset (sorted channels): throughput does not depend on weights",
        "note": f"the build ran at {sec['plain'] / sec['build']:.2f}x plain last-stage inference with "
                f"{len(calib)} calibration images ({load}); compare the ratio, not absolute speeds: both sides run "
                "in the same process, alternating, so a busy machine slows both",
        "settings": {"archs": args.archs, "images": args.images, "calib_images": len(calib),
                     "probe_calib_images": len(probe_calib), "batch_size": batch,
                     "stages": space.stages, "repeats": args.repeats, "threads": cfg.threads,
                     "resolutions": sorted(at_res)},
        "seconds": {k: {"median": sec[k], "all": v} for k, v in times.items()},
        "build_archs_per_s": args.archs / sec["build"],
        "build_sample_stages_per_s": pairs * space.stages / sec["build"],
        "build_arch_images_per_s": pairs / sec["build"],
        "plain_last_stage_arch_images_per_s": pairs / sec["plain"],
        "efficiency": sec["plain"] / sec["build"],
        "recalibration_share_of_build": sec["recalibrate"] / sec["build"],
        "export_share_of_build": sec["export"] / sec["build"],
        "efficiency_with_probe_calibration": sec["plain"] / sec["build_probe_calibration"],
        "efficiency_without_recalibration": sec["plain"] / (sec["build"] - sec["recalibrate"]),
        "macs_bound_efficiency": bound,
        "efficiency_of_bound": sec["plain"] / sec["build"] / bound,
        "stages_over_last_stage_macs": stages_macs / last_macs,
        "goal_efficiency_ge_0_75": sec["plain"] / sec["build"] >= 0.75,
        "goal_reachable_by_macs": bound >= 0.75,
    })


if __name__ == "__main__":
    main()
