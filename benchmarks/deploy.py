"""Benchmark: the ONNX Runtime deployment (``enas4d.deploy``) against eager PyTorch, in one run.

    nice -n 10 python -m benchmarks.deploy [--params params.yaml] [--archs 3] [--repeats 40] [--batch 256]
                                           [--batch-repeats 11] [--lut-archs 20] [--calib-archs 10]

Weights: the fine-tuned ``checkpoints/multistage.pt`` when it exists, else a freshly initialised supernet of
the params' preset with sorted channels (latency does not depend on weight values; the file records which).
Archs: the smallest and largest static subnets, the smallest and largest multi-stage nets and ``--archs``
seeded random multi-stage nets of the params' space.

1. **Batch 1, one thread** (Table 4's deployment case): eager (``torch.inference_mode``, channels_last, 1 torch
   thread; static: the extracted subnet, multi-stage: ``early_exit`` with thresholds that make the image leave
   after stage s) against the runtime (``EarlyExitSession(threads=1)``, same thresholds). All calls are timed
   in interleaved rounds (``enas4d.latency.time_interleaved``: thread CPU time and wall time, medians), so a load
   change hits every net alike, each one primed by its own untimed calls (a net serving a stream of images, as
   Table 4 times it). Ratios eager / runtime per net and stage.
2. **Batch ``--batch``, runtime, one thread**: stages 1..S run incrementally (``stage_logits``: every stage and
   head, nothing exits) against the stage-S-sized static subnet ``arch.stage(S-1)`` exported alone (goal <= 1.10),
   with the MACs ratio beside it, and where the time goes: ONNX Runtime's own profile of both, milliseconds per
   op type summed over the graphs (``op_ms``: what the optimised graphs run, e.g. ``Reorder*`` layout changes at
   graph boundaries, ``Add`` / ``BatchNormalization`` of the output-reuse sums that a static graph folds away).
3. **Latency vs MACs**: a least-squares line ms = a + b * MMACs over every (net, stage) point of part 1, per
   backend, with R^2 and the per-point ms/MMAC spread.
4. **Op latency tables**: the runtime table (``latency.build_runtime_table``, its per-op correction fitted on
   ``--calib-archs`` other random archs) and the eager one (``latency.build_table``) predict the per-stage
   early-exit latency of ``--lut-archs`` random archs measured in the same rounds: mean and max absolute error.

Writes ``reports/benchmarks/deploy.json``. On a shared machine quote the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from benchmarks._common import spec_space, write_json
from enas4d import config, cost, deploy, latency, train
from enas4d.evaluate import memory_format
from enas4d.latency import time_interleaved, torch_threads
from enas4d.multistage import MultiStageNet
from enas4d.runtime import IMAGE, NEXT, EarlyExitSession, read_manifest, session_options
from enas4d.space import MultiStageArch, SubnetArch
from enas4d.supernet import OFAMobileNetV3

MULTISTAGE = Path("checkpoints/multistage.pt")  # the finetune stage's output (enas4d.pipeline.MULTISTAGE)


def load_net(cfg: config.Config) -> tuple[MultiStageNet, str]:
    """The fine-tuned net if there is one, else a seeded fresh supernet with sorted channels (eval mode)."""
    if MULTISTAGE.exists():
        return MultiStageNet(train.load_supernet(MULTISTAGE)).eval(), str(MULTISTAGE)
    torch.manual_seed(cfg.seed)
    supernet = OFAMobileNetV3(*spec_space(cfg))
    supernet.sort_channels()
    return MultiStageNet(supernet).eval(), "fresh initialisation (no checkpoints/multistage.pt): random weights"


def exit_at(stage: int, stages: int) -> list[float]:
    """Thresholds under which every image leaves after ``stage`` (0-based): T = 1 never exits, T = 0 always."""
    return [1.0] * stage + [0.0] * (stages - 1 - stage)


def op_ms(folder: Path, images: np.ndarray, repeats: int, tmp: Path) -> dict[str, float]:
    """Milliseconds per ONNX op type of one pass of every stage graph of ``folder`` over ``images`` (no exit):
    ONNX Runtime's profiler on the deployment's session options, mean over ``repeats`` runs after
    ``latency.PRIMES`` untimed ones. The profiler adds a little time per op: compare op types, not totals."""
    state, total = {IMAGE: images}, collections.Counter()
    for st in read_manifest(folder)["stages"]:
        opts = session_options(1)
        opts.enable_profiling, opts.profile_file_prefix = True, str(tmp / "profile")
        sess = ort.InferenceSession(str(folder / st["file"]), opts, providers=["CPUExecutionProvider"])
        feeds = {k: state[k] for k in st["inputs"]}
        out = [sess.run(None, feeds) for _ in range(latency.PRIMES + repeats)][-1]
        events = json.loads(Path(sess.end_profiling()).read_text())
        timed_from = sorted(e["ts"] for e in events if e["name"] == "model_run")[latency.PRIMES]
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= timed_from:
                total[e["args"]["op_name"]] += e["dur"] / 1e3 / repeats
        state.update((k.removeprefix(NEXT), v) for k, v in zip(st["outputs"], out) if k.startswith(NEXT))
    return {op: round(ms, 3) for op, ms in total.most_common()}


def fit(points: list[tuple[float, float]]) -> dict:
    """Least-squares ms = intercept + slope * MMACs, R^2, and the ms/MMAC ratio's spread over the points."""
    x, y = np.array(points).T
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (intercept + slope * x)
    ratio = y / x
    return {"points": len(x), "intercept_ms": float(intercept), "ms_per_mmac": float(slope),
            "r2": float(1 - resid.var() / y.var()), "pearson_r": float(np.corrcoef(x, y)[0, 1]),
            "ms_per_mmac_ratio_min": float(ratio.min()), "ms_per_mmac_ratio_max": float(ratio.max())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deploy", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--archs", type=int, default=3, help="random multi-stage archs besides smallest/largest")
    parser.add_argument("--repeats", type=int, default=40, help="interleaved rounds at batch 1")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batch-repeats", type=int, default=11)
    parser.add_argument("--lut-archs", type=int, default=20, help="random archs the op tables are checked on")
    parser.add_argument("--calib-archs", type=int, default=10, help="other archs the runtime table's correction fits")
    parser.add_argument("--lut-repeats", type=int, default=20)
    args = parser.parse_args(argv)
    cfg = config.load(args.params)
    msnet, weights = load_net(cfg)
    spec, space = spec_space(cfg)
    static_space = replace(space, stages=1)
    rng = np.random.default_rng(cfg.seed)
    statics: dict[str, SubnetArch] = {"static_smallest": static_space.smallest(),
                                      "static_largest": static_space.largest()}
    multis: dict[str, MultiStageArch] = {"multistage_smallest": space.smallest_multistage(),
                                         "multistage_largest": space.largest_multistage(),
                                         **{f"multistage_random{i}": space.sample(rng) for i in range(args.archs)}}
    fmt = memory_format(torch.device("cpu"))
    INFO = {"classes": [str(i) for i in range(spec.num_classes)], "mean": [0.0] * spec.in_channels,  # noqa: N806
            "std": [1.0] * spec.in_channels}  # the manifest's; a benchmark feeds random tensors
    calls, meta = {}, {}
    with tempfile.TemporaryDirectory() as tmp, torch_threads(1), torch.inference_mode():
        sessions = {}
        for name, arch in statics.items():
            net = msnet.supernet.extract(arch).eval().to(memory_format=fmt)
            folder = deploy.export_static(net, arch, Path(tmp) / name, macs=cost.subnet_macs(spec, arch), **INFO)
            sessions[name] = sess = EarlyExitSession(folder, threads=1)
            x = torch.randn(1, spec.in_channels, arch.resolution, arch.resolution)
            xe, xr = x.contiguous(memory_format=fmt), x.numpy()
            calls[("eager", name, 0)] = lambda net=net, xe=xe: net(xe)
            calls[("runtime", name, 0)] = lambda sess=sess, xr=xr: sess.stage_logits(xr)
            meta[name] = {"arch": arch.to_dict(), "stage_mmacs": [cost.subnet_macs(spec, arch) / 1e6]}
        for name, arch in multis.items():
            net = msnet.export(arch).eval().to(memory_format=fmt)
            S = arch.num_stages
            folder = deploy.export_multistage(net, exit_at(S - 1, S), Path(tmp) / name, **INFO)
            sessions[name] = sess = EarlyExitSession(folder, threads=1)
            x = torch.randn(1, spec.in_channels, arch.resolution, arch.resolution)
            xe, xr = x.contiguous(memory_format=fmt), x.numpy()
            for s in range(S):
                t = exit_at(s, S)
                calls[("eager", name, s)] = lambda net=net, xe=xe, t=t: net.early_exit(xe, t)
                calls[("runtime", name, s)] = lambda sess=sess, xr=xr, t=t: sess.run(xr, t)
            meta[name] = {"arch": arch.to_dict(), "stage_mmacs": [m / 1e6 for m in cost.stage_macs(spec, arch)]}
        # every net timed as deployed, after its own untimed calls (latency.PRIMES), as Table 4 times them
        t1 = time_interleaved(calls, args.warmup, args.repeats, cfg.seed, primed=list(calls))

        # Part 2: incremental 1..S against the stage-S static net, batch args.batch, runtime, one thread.
        big, profiled = {}, {}
        for name, arch in multis.items():
            last = arch.stage(arch.num_stages - 1)
            net = msnet.supernet.extract(last).eval()
            folder = deploy.export_static(net, last, Path(tmp) / f"{name}-last", macs=cost.subnet_macs(spec, last),
                                          **INFO)
            x = np.random.default_rng(0).standard_normal(
                (args.batch, spec.in_channels, arch.resolution, arch.resolution)).astype(np.float32)
            static_sess = EarlyExitSession(folder, threads=1)
            big[("incremental", name)] = lambda sess=sessions[name], x=x: sess.stage_logits(x)
            big[("static_last", name)] = lambda sess=static_sess, x=x: sess.stage_logits(x)
            meta[name]["macs_ratio_incremental_vs_static_last"] = (cost.stage_macs(spec, arch)[-1]
                                                                   / cost.subnet_macs(spec, last))
            profiled[name] = (sessions[name].folder, folder, x)
        t2 = time_interleaved(big, 1, args.batch_repeats, cfg.seed, primed=list(big))
        for name, (inc_folder, static_folder, x) in profiled.items():  # after the timing, which it would disturb
            meta[name]["op_ms"] = {"incremental": op_ms(inc_folder, x, args.batch_repeats, Path(tmp)),
                                   "static_last": op_ms(static_folder, x, args.batch_repeats, Path(tmp))}

    # Part 4: op latency tables against measured per-stage latency of random archs (fresh weights: `build_*table`).
    lut_rng = np.random.default_rng(cfg.seed + 1)
    check = [space.sample(lut_rng) for _ in range(args.lut_archs)]
    calibrate = [space.sample(lut_rng) for _ in range(args.calib_archs)]
    rt_lut, rt_measured = latency.build_runtime_table(spec, space, threads=1, warmup=args.warmup,
                                                      repeats=args.lut_repeats, seed=cfg.seed, calibrate=calibrate,
                                                      check=check)
    eager_lut, eager_measured = latency.build_table(spec, space, threads=1, warmup=args.warmup,
                                                    repeats=args.lut_repeats, seed=cfg.seed, check=check)
    eager_rows = latency.compare(eager_lut, spec, check, eager_measured)
    tables = {"runtime": latency.compare_runtime(rt_lut, spec, check, rt_measured),
              "eager": eager_rows[eager_rows["mode"] == "early_exit"]}
    luts = {name: {"clock": lut.clock, "seconds_to_build": lut.meta["seconds"],
                   "mean_abs_error_pct": float(rows.error_pct.abs().mean()),
                   "max_abs_error_pct": float(rows.error_pct.abs().max()),
                   "per_stage": latency.summarize(rows).drop(columns="mode").to_dict("records")}
            for (name, rows), lut in zip(tables.items(), (rt_lut, eager_lut))}
    luts["runtime"]["op_correction_ms"] = rt_lut.meta["op_correction_ms"]
    luts["runtime"]["start_correction_ms"] = rt_lut.meta["start_correction_ms"]
    luts["runtime"]["call_overhead_ms"] = rt_lut.meta["call_overhead_ms"]
    luts["archs"], luts["calibration_archs"] = len(check), len(calibrate)

    clocks = ("thread_cpu", "wall")
    batch1 = {}
    for name, m in meta.items():
        stages = len(m["stage_mmacs"])
        rows = []
        for s in range(stages):
            e, r = t1[("eager", name, s)], t1[("runtime", name, s)]
            rows.append({"stage": s + 1, "mmacs": m["stage_mmacs"][s], "eager_ms": e, "runtime_ms": r,
                         "eager_over_runtime": {c: e[c] / r[c] for c in clocks}})
        batch1[name] = {"arch": m["arch"], "stages": rows}
    incremental = {}
    for name in multis:
        inc, st = t2[("incremental", name)], t2[("static_last", name)]
        incremental[name] = {"incremental_ms": inc, "static_last_ms": st,
                             "time_ratio": {c: inc[c] / st[c] for c in clocks},
                             "macs_ratio": meta[name]["macs_ratio_incremental_vs_static_last"],
                             "op_ms": meta[name]["op_ms"]}
    points = {b: [(row["mmacs"], row[f"{b}_ms"]["thread_cpu"]) for v in batch1.values() for row in v["stages"]]
              for b in ("eager", "runtime")}
    largest = batch1["static_largest"]["stages"][0]["eager_over_runtime"]
    macs_median = statistics.median(v["macs_ratio"] for v in incremental.values())
    write_json("deploy", {
        "weights": weights,
        "note": "compare ratios within this file, not absolute times (machine.load_avg_1min says how busy the "
                "machine was); thread_cpu is the calling thread's CPU time (ONNX Runtime and torch both compute "
                "on the calling thread with 1 thread), wall includes waiting for a core",
        "settings": {"repeats": args.repeats, "warmup": args.warmup, "batch": args.batch,
                     "batch_repeats": args.batch_repeats, "threads": 1, "onnxruntime": ort.__version__},
        "batch1": batch1,
        "summary": {
            "static_largest_eager_over_runtime": largest,
            "goal_static_largest_speedup_ge_3": largest["thread_cpu"] >= 3,
            "incremental_over_static_last_median": {
                c: statistics.median(v["time_ratio"][c] for v in incremental.values()) for c in clocks},
            "incremental_over_static_last_max": {c: max(v["time_ratio"][c] for v in incremental.values())
                                                 for c in clocks},
            "macs_ratio_median": macs_median,
            "goal_incremental_le_1_10_reachable_by_macs": macs_median <= 1.10,
            "latency_vs_mmacs_fit_thread_cpu": {b: fit(p) for b, p in points.items()},
            "lut_mean_abs_error_pct": {b: luts[b]["mean_abs_error_pct"] for b in ("runtime", "eager")},
            "lut_max_abs_error_pct": {b: luts[b]["max_abs_error_pct"] for b in ("runtime", "eager")},
        },
        "incremental_batch": incremental,
        "latency_tables": luts,
    })


if __name__ == "__main__":
    main()
