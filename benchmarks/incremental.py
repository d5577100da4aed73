"""Benchmark: incremental multi-stage inference (stage cache, feature reuse) against recomputing from scratch.

    python -m benchmarks.incremental [--params params.yaml] [--archs 5] [--repeats 15] [--batch 256]
                                     [--resolution 28] [--threads 1]

For random multi-stage archs of ``finetune.stages`` stages at one resolution (random weights: the cost does
not depend on them), CPU, ``torch.inference_mode``, median wall time per batch of:

- ``incremental``: the exported network's ``start`` + ``run_stage`` for stages 1..S (every head runs), i.e.
  early-exit inference when no sample leaves early;
- ``static_last``: only stage S computed from scratch, as the static subnet ``arch.stage(S-1)`` (extracted);
- ``cascade``: the cascade baseline without reuse, the static subnets ``arch.stage(s)`` one after another;
- ``forward_all``: the exported network's block-major ``forward`` (all stages in one call, no cache);
- ``supernet_view``: ``MultiStageNet.start`` + ``run_stage`` on the supernet itself (slices weights and applies
  kernel transforms on every call: the fine-tuning path, not the deployment one).

The variants are timed interleaved (one call of each per round, ``--repeats`` rounds), so a change of machine
load hits them alike; median and best times are kept (the best is the least disturbed on a shared CPU).
Writes ``reports/benchmarks/incremental.json`` with per-arch times, the ratios ``incremental / static_last``
(goal <= 1.10) and ``cascade / incremental``, the matching MACs ratios, and their medians over the archs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import write_json
from enas4d import config, cost
from enas4d.multistage import MultiStageNet
from enas4d.space import MultiStageArch, SearchSpace
from enas4d.supernet import PRESETS, OFAMobileNetV3


def interleaved_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, float]]:
    """Median and best wall time (ms) of each function, one call each per round after a warm-up round.

    The best time is the least disturbed by other processes on a shared CPU; both are reported.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if r:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v)} for k, v in times.items()}


def bench_arch(net: OFAMobileNetV3, ms: MultiStageNet, arch: MultiStageArch, batch: int, repeats: int) -> dict:
    x = torch.randn(batch, net.spec.in_channels, arch.resolution, arch.resolution)
    ex = ms.export(arch).eval()
    statics = [net.extract(arch.stage(s)).eval() for s in range(arch.num_stages)]

    def incremental(run_stage: Callable, cache) -> None:
        for _ in range(arch.num_stages):
            run_stage(cache)

    fns = {
        "incremental": lambda: incremental(ex.run_stage, ex.start(x)),
        "static_last": lambda: statics[-1](x),
        "cascade": lambda: [m(x) for m in statics],
        "forward_all": lambda: ex(x),
        "supernet_view": lambda: incremental(ms.run_stage, ms.start(x, arch)),
    }
    with torch.inference_mode():
        t = interleaved_ms(fns, repeats)
    ratios = lambda a, b: {k: t[a][k] / t[b][k] for k in ("median_ms", "min_ms")}  # noqa: E731
    macs = cost.stage_macs(net.spec, arch)
    static_macs = [cost.subnet_macs(net.spec, arch.stage(s)) for s in range(arch.num_stages)]
    return {
        "arch": arch.to_dict(),
        "time": t,
        "ratio_incremental_vs_static_last": ratios("incremental", "static_last"),
        "ratio_cascade_vs_incremental": ratios("cascade", "incremental"),
        "stage_macs": macs,
        "static_stage_macs": static_macs,
        "macs_ratio_incremental_vs_static_last": macs[-1] / static_macs[-1],
        "macs_ratio_cascade_vs_incremental": sum(static_macs) / macs[-1],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.incremental", description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--archs", type=int, default=5, help="random multi-stage archs")
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds per arch (median)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--resolution", type=int, default=28)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: least disturbed on a shared CPU)")
    args = ap.parse_args(argv)
    if args.archs < 1 or args.repeats < 1 or args.batch < 1:
        raise SystemExit("benchmarks.incremental: --archs, --repeats and --batch must be >= 1")
    cfg = config.load(args.params)
    s = cfg.supernet
    if args.resolution not in s.resolutions:
        raise SystemExit(f"benchmarks.incremental: --resolution {args.resolution} not in "
                         f"{args.params}: supernet.resolutions {list(s.resolutions)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.seed)
    spec = PRESETS[s.preset]
    space = SearchSpace(units=len(spec.units), resolutions=tuple(s.resolutions), depths=tuple(s.depths),
                        expands=tuple(s.expands), kernels=tuple(s.kernels), stages=cfg.finetune.stages)
    net = OFAMobileNetV3(spec, space).eval()
    ms = MultiStageNet(net).eval()
    rng = np.random.default_rng(cfg.seed)
    archs = [replace(space.sample(rng), resolution=args.resolution) for _ in range(args.archs)]
    per_arch = [bench_arch(net, ms, a, args.batch, args.repeats) for a in archs]
    med = lambda key, *sub: statistics.median(r[key][sub[0]] if sub else r[key] for r in per_arch)  # noqa: E731
    write_json("incremental", {
        "preset": s.preset, "stages": space.stages, "resolution": args.resolution, "batch": args.batch,
        "archs": args.archs, "repeats": args.repeats, "threads": args.threads, "device": "cpu",
        "goal_ratio_incremental_vs_static_last": 1.10,
        "summary": {  # median over archs of each arch's ratio (of median times, of best times, of MACs)
            **{key: {k: med(key, k) for k in ("median_ms", "min_ms")}
               for key in ("ratio_incremental_vs_static_last", "ratio_cascade_vs_incremental")},
            "macs_ratio_incremental_vs_static_last": med("macs_ratio_incremental_vs_static_last"),
            "macs_ratio_cascade_vs_incremental": med("macs_ratio_cascade_vs_incremental"),
        },
        "per_arch": per_arch,
    })


if __name__ == "__main__":
    main()
