"""Table 4 (paper: "Deploy on real-world devices"): the steps of notebook 09 that are not the search itself.

The device is the deployment of ``enas4d.deploy``: ONNX Runtime at batch 1. Its op latency table
(``latency.build_runtime_table``) is checked against measured per-stage latency (a figure); per-target predictors
learn R with the table's stage latencies as the cost; the searched nets are deployed and run by real early exit
on the test set; the best static subnet of the MACs search is compared with a re-thresholded dynamic net at equal
metric-set accuracy; every deployed net is timed image by image at batch 1 as an ONNX Runtime folder
(`EarlyExitSession`) and, beside it, as eager PyTorch; Table 4 and the metrics files are written. The numbers
come from ``enas4d.latency`` (tables, timing), ``enas4d.search`` (the search) and the
evaluation recipe of the database; this module only assembles them.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from torch import Tensor, nn

from enas4d import config, cost, data, latency as lat, predictor, probe, report, thresholds
from enas4d.database import Database
from enas4d.deploy import export_multistage, export_static
from enas4d.evaluate import deploy, evaluate_subnet, split_images
from enas4d.multistage import MultiStageNet
from enas4d.runtime import EarlyExitSession
from enas4d.search import Evaluator
from enas4d.space import MultiStageArch, SearchSpace, SubnetArch
from enas4d.supernet import SupernetSpec, resize

LUT_PATH = Path("databases/latency_lut.json")  # this machine's op latency table (a stage output)
# The paper's Table 4 (ImageNet): device, latency target (ms), top-1 (%), measured latency (ms).
PAPER_TABLE4 = (("desktop CPU (i7-6700K)", 10, 74.2, 9.8), ("desktop CPU (i7-6700K)", 8, 72.9, 8.0),
                ("desktop CPU (i7-6700K)", 6, 72.2, 6.4), ("GPU server (GTX 1080 Ti)", 30, 74.2, 30.2),
                ("GPU server (GTX 1080 Ti)", 25, 73.3, 25.4), ("GPU server (GTX 1080 Ti)", 20, 72.8, 20.6))
# Static vs dynamic at equal accuracy: what the paper's claim needs (MACs ratio, latency speed-up, top-1 slack).
MACS_RATIO_GOAL, SPEEDUP_GOAL, TOP1_SLACK = 0.55, 1.5, 0.005


def lut_summary(lut: lat.LatencyTable, check_archs: int, threads: int) -> str:
    """One line: what the table build timed, on which machine and clock, under which load."""
    return (f"{len(lut)} ops and {check_archs} check archs timed in {lut.meta['seconds']:.1f} s; clock: {lut.clock}; "
            f"{lut.meta['machine']['cpu']}, {threads} thread(s), load {lut.meta['load_avg_1min_before']} -> "
            f"{lut.meta['machine']['load_avg_1min']}")


def build_lut(spec: SupernetSpec, space: SearchSpace, settings: config.LatencyConfig, seed: int
              ) -> tuple[lat.LatencyTable, pd.DataFrame, pd.DataFrame]:
    """The op latency table of the deployment (ONNX Runtime, ``lat.build_runtime_table``): its per-op correction
    fitted on ``calibrate_archs`` random archs, checked on ``check_archs`` others measured in the same rounds.
    Returns the table, the check rows with the table's prediction (``lat.compare_runtime``) and their summary."""
    rng = np.random.default_rng(seed)
    check = [space.sample(rng) for _ in range(settings.check_archs)]
    calibrate = [space.sample(rng) for _ in range(settings.calibrate_archs)]
    lut, measured = lat.build_runtime_table(spec, space, threads=settings.threads, warmup=settings.warmup,
                                            repeats=settings.repeats, seed=seed, calibrate=calibrate, check=check)
    checked = lat.compare_runtime(lut, spec, check, measured)
    return lut, checked, lat.summarize(checked)


def write_check_figure(checked: pd.DataFrame, errors: pd.DataFrame, lut: lat.LatencyTable, *, check_archs: int,
                       threads: int, repeats: int, png: str = "reports/figures/latency_lut.png") -> None:
    """The table's predicted against measured per-stage latency of the check archs, per mode, with its caption."""
    modes = [m for m in lat.MODES if m in set(checked["mode"])]
    fig, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 4), sharex=True, sharey=True, squeeze=False)
    axes = axes[0]
    for ax, mode in zip(axes, modes):
        part = checked[checked["mode"] == mode]
        for s, rows in part.groupby("stage"):
            ax.scatter(rows.measured_ms, rows.predicted_ms, s=14, label=f"exit after stage {s}")
        lo, hi = part[["measured_ms", "predicted_ms"]].min().min(), part[["measured_ms", "predicted_ms"]].max().max()
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=1)
        ax.fill_between([lo, hi], [0.9 * lo, 0.9 * hi], [1.1 * lo, 1.1 * hi], color="0.9", zorder=0, label="±10%")
        ax.set(title=mode, xlabel=f"measured latency (ms, {lut.clock})")
    axes[0].set_ylabel("look-up table prediction (ms)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    ee = errors[errors["mode"] == "early_exit"]
    report.write_figure(
        fig, png, title="Latency look-up table: predicted vs measured per-stage latency",
        reading=f"Each point is one of {check_archs} random multi-stage archs leaving after stage 1, 2 or 3 at "
                f"batch 1 on this CPU ({threads} thread(s), {_backend(lut)}). Under early exit the table's sum of "
                f"parts is off by "
                f"{ee.mean_abs_error_pct.mean():.1f}% on average (at most {ee.max_abs_error_pct.max():.1f}%).",
        notes=[f"{len(lut)} op configurations, each the median of {repeats} calls in interleaved rounds, "
               f"clock: {lut.clock}; each arch is timed right after {lat.PRIMES} untimed calls of its own, as a "
               "deployed net serving one image after another."
               + (f" Corrections fitted on other random archs: {lut.meta['op_correction_ms'][lut.clock]:+.4f} ms "
                  "per live op (a lone op graph after unrelated ones against its share of a stage graph)"
                  + (f" and {lut.meta['start_correction_ms'][lut.clock]:+.4f} ms per inference"
                     if "start_correction_ms" in lut.meta else "") + "."
                  if "op_correction_ms" in lut.meta else "")])


def _backend(lut: lat.LatencyTable) -> str:
    """What the table prices, in words."""
    if lut.meta.get("backend") == "onnxruntime":
        return f"ONNX Runtime {lut.meta['onnxruntime']} deployed folders"
    return f"eager PyTorch {lut.meta['machine']['torch']}"


def latency_predictors(space: SearchSpace, spec: SupernetSpec, db: Database, stage_ms: np.ndarray,
                       targets: Sequence[float], omega: float, grid: float, seed: int,
                       settings: config.PredictorConfig) -> tuple[dict[float, predictor.Predictor], pd.DataFrame]:
    """Per latency target, the ``predictor.model`` predictor trained on the database's R with the table's stage
    latencies as the cost; returns the models and a summary of their errors."""
    y = thresholds.r_for_targets(db.conf, db.correct, stage_ms, [(omega, t) for t in targets], grid)
    trained = {t: predictor.train_configured(config.to_dict(settings), space, spec, db.archs, y[:, i], seed=seed)
               for i, t in enumerate(targets)}
    summary = pd.DataFrame({"held-out RMSE": [r.held_out.rmse for _, r in trained.values()],
                            "held-out Kendall τ": [r.held_out.kendall_tau for _, r in trained.values()],
                            "R mean": y.mean(0), "R max": y.max(0)}, index=pd.Index(targets, name="target (ms)"))
    return {t: m for t, (m, _) in trained.items()}, summary


def searched_frame(searched: list[dict]) -> pd.DataFrame:
    """The searched nets on the metric set: predicted and measured R, top-1, LUT latency, thresholds."""
    return pd.DataFrame([{"target (ms)": s["target"], "predicted R": s["predicted_r"], "metric-set R": s["best"].r,
                          "metric-set top-1 (%)": 100 * s["best"].acc, "LUT avg latency (ms)": s["best"].cost,
                          "thresholds": s["best"].thresholds, "stage latency (ms)": s["stage_ms"].round(3)}
                         for s in searched]).set_index("target (ms)")


def test_batches(test: data.Split, batch_size: int) -> Iterable[tuple[Tensor, Tensor]]:
    """The test split in order, at native resolution (streamed: an ImageNet test set does not fit in memory)."""
    return data.batches(test, batch_size, shuffle=False, seed=0)


def run_on_test(searched: list[dict], msnet: MultiStageNet, calib: Tensor, test: data.Split,
                batch_size: int) -> pd.DataFrame:
    """Deploy each searched net (``net``) and run it by real early exit on the test set (``test``)."""
    for s in searched:
        s["net"] = deploy(msnet, s["arch"], calib, batch_size)
        s["test"] = lat.early_exit_outcome(s["net"], test_batches(test, batch_size), s["best"].thresholds)
    stages = searched[0]["arch"].num_stages
    return pd.DataFrame([{"target (ms)": s["target"], "test top-1 (%)": 100 * s["test"].top1,
                          "avg MMACs": s["test"].avg_macs / 1e6,
                          **{f"exit at {k + 1} (%)": 100 * np.mean(s["test"].exit_stage == k) for k in range(stages)}}
                         for s in searched]).set_index("target (ms)")


def static_vs_dynamic(searched_path: str | Path, msnet: MultiStageNet, spec: SupernetSpec,
                      evaluate: Evaluator, calib: Tensor, test: data.Split, batch_size: int,
                      grid: float) -> dict[str, Any]:
    """The MACs search's best static subnet (the most accurate on the metric set, never chosen on the test set)
    against its searched dynamic nets re-thresholded: the cheapest grid thresholds (average MACs on the metric
    set) whose metric-set top-1 reaches the static subnet's; if none does, the most accurate thresholds at their
    least cost. Both deployed; the chosen dynamic net run by real early exit on the test set; beside them the
    ceiling a cascade of this supernet's subnets reaches (`cascade_ceiling`). ``searched_path``:
    the search stage's ``searched/archs.json``."""
    searched_file = json.loads(Path(searched_path).read_text())
    statics: dict[SubnetArch, dict] = {}
    for entry in searched_file["static"]:
        a = SubnetArch.from_dict(entry["arch"])
        if a not in statics:
            statics[a] = {"target_mmacs": entry["target"], "metric_top1": entry["metric_set"]["acc"],
                          "test_top1": evaluate_subnet(msnet.supernet, a, test, calib, batch_size=batch_size),
                          "macs": cost.subnet_macs(spec, a)}
    static_arch = max(statics, key=lambda a: statics[a]["metric_top1"])  # on the metric set, never the test set
    st = statics[static_arch]
    ceiling = cascade_ceiling(msnet, static_arch, evaluate, calib, test, batch_size)
    dynamics = []
    for entry in searched_file["multistage"]:
        a = MultiStageArch.from_dict(entry["arch"])
        out = evaluate(a)
        macs = np.asarray(cost.stage_macs(spec, a), dtype=np.float64)
        point = lat.cheapest_thresholds(out.conf, out.correct, macs, st["metric_top1"], grid)
        reached = point is not None
        if not reached:  # the most accurate thresholds, at their least cost
            top = thresholds.search(out.conf, out.correct, macs, float(macs[-1]), 0.0, grid)
            point = lat.cheapest_thresholds(out.conf, out.correct, macs, top.acc, grid)
        dynamics.append({"target_mmacs": entry["target"], "arch": a, "reached": reached, "point": point})
    reaching = [d for d in dynamics if d["reached"]]
    dyn = (min(reaching, key=lambda d: d["point"].cost) if reaching
           else max(dynamics, key=lambda d: (d["point"].acc, -d["point"].cost)))
    static_net = deploy(msnet, static_arch, calib, batch_size)
    dyn_net = deploy(msnet, dyn["arch"], calib, batch_size)
    dyn["test"] = lat.early_exit_outcome(dyn_net, test_batches(test, batch_size), dyn["point"].thresholds)
    return {"static_arch": static_arch, "static": st, "dynamics": dynamics, "dynamic": dyn, "static_net": static_net,
            "dynamic_net": dyn_net, "cascade_ceiling": ceiling}


def cascade_ceiling(msnet: MultiStageNet, static_arch: SubnetArch, evaluate: Evaluator, calib: Tensor,
                    test: data.Split, batch_size: int) -> dict[str, float]:
    """How far below the best static subnet's MACs early exit can get on this supernet: the smallest subnet ->
    the best static subnet as a cascade without reuse (`probe.cascade_potential`: threshold chosen on the metric
    set to reach the best static's metric-set top-1, replayed on the test set). A multi-stage net whose last stage
    is as accurate as the static subnet of its arch, and whose reuse saves nothing, reaches this
    (docs/DESIGN.md, "How far target (d) can go")."""
    net, small = msnet.supernet, msnet.supernet.space.smallest()
    test_x = split_images(test)
    metric_out = [probe.subnet_outputs(net, a, evaluate.images, calib, batch_size) for a in (small, static_arch)]
    test_out = [probe.subnet_outputs(net, a, test_x, calib, batch_size) for a in (small, static_arch)]
    return probe.cascade_potential(*metric_out, *test_out, evaluate.labels.numpy(), test.labels.numpy(),
                                   cost.subnet_macs(net.spec, small), cost.subnet_macs(net.spec, static_arch))


def static_vs_dynamic_frame(sd: Mapping[str, Any]) -> pd.DataFrame:
    """The re-thresholded dynamic nets and the static subnet on the metric set, one row each."""
    st = sd["static"]
    return pd.DataFrame([{"MACs target of the search": d["target_mmacs"], "reaches static metric top-1": d["reached"],
                          "thresholds": d["point"].thresholds, "metric top-1 (%)": 100 * d["point"].acc,
                          "metric avg MMACs": d["point"].cost / 1e6} for d in sd["dynamics"]]
                        + [{"MACs target of the search": f"static {st['target_mmacs']}",
                            "metric top-1 (%)": 100 * st["metric_top1"], "metric avg MMACs": st["macs"] / 1e6}])


def _on_cpu(net: nn.Module) -> nn.Module:
    """The network as deployed on the CPU (a copy: the evaluation device may be a GPU)."""
    return copy.deepcopy(net).cpu().eval()


def time_deployed(searched: list[dict], sd: Mapping[str, Any], images: Tensor, lut: lat.LatencyTable,
                  split: data.Split, *, threads: int, warmup: int) -> dict[str, tuple[dict[str, np.ndarray], list]]:
    """Every deployed net (the Table 4 nets, the static subnet, the dynamic net) on ``images`` one at a time on
    the CPU, taking turns image by image, each call right after `lat.PRIMES` untimed calls of the same net on the
    same image (``lat.time_images``: a deployed net follows its own work, not the other nets'; timed right after the
    eager nets, the ONNX Runtime ones took up to 2x longer), each twice: as an ONNX Runtime folder
    (``enas4d.deploy``, run by `EarlyExitSession` on ``threads`` threads: the deployment, keys ``<name>``) and as
    eager PyTorch (keys ``<name>-eager``). ``split`` gives the folders' classes and normalisation.

    Fills each searched net's ``measured_ms``, ``measured_other_ms`` (runtime, both clocks), ``eager_ms``,
    ``lut_timed_ms`` (the table on the timed images' own exits) and ``same_exits`` (the share of timed images
    leaving at the same stage in both)."""
    info = {"classes": list(split.classes), "mean": list(split.mean), "std": list(split.std)}
    calls: dict[str, tuple[Callable[[Tensor], object], Tensor]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        def multistage(name: str, net: nn.Module, thresholds: Sequence[float], x: Tensor) -> None:
            sess = EarlyExitSession(export_multistage(net, thresholds, Path(tmp) / name, **info), threads)
            calls[name] = (lambda x: sess.run(x.numpy(), list(thresholds)), x)
            calls[f"{name}-eager"] = (lambda x: net.early_exit(x, thresholds), x)

        for i, s in enumerate(searched):
            multistage(f"table4-{i}", _on_cpu(s["net"]), s["best"].thresholds, resize(images, s["arch"].resolution))
        dyn = sd["dynamic"]
        multistage("dynamic", _on_cpu(sd["dynamic_net"]), dyn["point"].thresholds,
                   resize(images, dyn["arch"].resolution))
        static_cpu, static_arch = _on_cpu(sd["static_net"]), sd["static_arch"]
        static = EarlyExitSession(export_static(static_cpu, static_arch, Path(tmp) / "static",
                                                macs=sd["static"]["macs"], **info), threads)
        x = resize(images, static_arch.resolution)
        calls["static"] = (lambda x: static.run(x.numpy()), x)
        calls["static-eager"] = (static_cpu, x)
        timed = lat.time_images(calls, threads=threads, warmup=warmup)
    other = other_clock(lut)
    for i, s in enumerate(searched):
        ms, results = timed[f"table4-{i}"]
        eager_ms, eager_results = timed[f"table4-{i}-eager"]
        exits = np.array([r.exit_stage.item() for r in results])
        s["measured_ms"], s["measured_other_ms"] = float(ms[lut.clock].mean()), float(ms[other].mean())
        s["eager_ms"] = float(eager_ms[lut.clock].mean())
        s["lut_timed_ms"] = float(s["stage_ms"][exits].mean())
        s["same_exits"] = float(np.mean(exits == np.array([r.exit_stage.item() for r in eager_results])))
    return timed


def other_clock(lut: lat.LatencyTable) -> str:
    """The clock the table was not built with (shown beside it)."""
    return lat.CLOCKS[1 - lat.CLOCKS.index(lut.clock)]


def timed_images(test: data.Split, n: int, seed: int) -> Tensor:
    """A seeded subset of ``n`` test images (all when fewer), normalized, at native size."""
    return split_images(data.subset(test, min(n, len(test)), seed))


def write_table4(searched: list[dict], lut: lat.LatencyTable, errors: pd.DataFrame, *, targets: Sequence[float],
                 timed: int, threads: int, check_archs: int, lut_path: str | Path = LUT_PATH) -> pd.DataFrame:
    """Table 4: this run's nets (LUT on the metric set and on the timed images, measured on both clocks as
    deployed, eager PyTorch beside it, test top-1 and MACs) and the paper's rows; written with its reading and
    notes."""
    other = other_clock(lut)
    eager = f"eager PyTorch (ms, {lut.clock})"
    rows = [{"source": "this run", "device": f"CPU ({threads} thread{'s' * (threads > 1)})",
             "target (ms)": s["target"], "LUT, metric set (ms)": s["best"].cost,
             "LUT, timed images (ms)": s["lut_timed_ms"],
             f"measured (ms, {lut.clock})": s["measured_ms"], f"measured (ms, {other})": s["measured_other_ms"],
             eager: s["eager_ms"], "top-1 (%)": 100 * s["test"].top1, "avg MMACs": s["test"].avg_macs / 1e6}
            for s in searched]
    rows += [{"source": report.PAPER, "device": d, "target (ms)": t, f"measured (ms, {lut.clock})": m,
              "top-1 (%)": a} for d, t, a, m in PAPER_TABLE4]
    table4 = pd.DataFrame(rows).round(3)
    ours = table4[table4.source == "this run"]
    table4 = table4.astype(object).where(table4.notna(), None)  # blank cells (not "nan") where the paper gives none
    err = 100 * (ours["LUT, timed images (ms)"] / ours[f"measured (ms, {lut.clock})"] - 1)
    lut_vs_target = report.against_targets([f"the {s['target']:g} ms net" for s in searched],
                                           [s["best"].cost for s in searched], [s["target"] for s in searched], "ms")
    reading = (
        f"Searching with latency targets on this machine's CPU ({_backend(lut)}), the nets found for "
        f"{', '.join(f'{t:g}' for t in targets)} ms "
        f"take {', '.join(f'{m:.2f}' for m in ours[f'measured (ms, {lut.clock})'])} ms per image on average "
        f"(measured over {timed} test images at batch 1) at {', '.join(f'{a:.1f}' for a in ours['top-1 (%)'])}% "
        f"test top-1; as eager PyTorch the same nets take {', '.join(f'{m:.2f}' for m in ours[eager])} ms "
        f"({', '.join(f'{e / m:.1f}' for e, m in zip(ours[eager], ours[f'measured (ms, {lut.clock})']))}x). "
        f"The look-up table predicts those measured means within {err.abs().max():.1f}% (LUT on the "
        f"timed images' own exits); the LUT average on the metric set is what the search optimised, and by it "
        f"{lut_vs_target}. On the paper's ImageNet setting the searched nets land within 0.6 ms of their targets.")
    clock_text = ("the measuring thread's CPU time: with one thread this is the latency on an idle core, and "
                  "on a shared machine it leaves out the time spent waiting for a core" if lut.clock == "thread_cpu"
                  else "wall time")
    ee = errors[errors["mode"] == "early_exit"]
    same = ", ".join(f"{100 * s['same_exits']:.1f}%" for s in searched)
    notes = [f"Latency clock: {lut.clock} ({clock_text}); the other clock is shown beside it. "
             f"{lut.meta['machine']['cpu']}, {_backend(lut)}, batch 1, {threads} intra-op thread(s); eager "
             f"PyTorch {lut.meta['machine']['torch']} with {threads} torch thread(s) in the same interleaved rounds, "
             f"each timed call right after {lat.PRIMES} untimed calls of the same net (a net serving one image "
             "after another). "
             f"Timed images leaving at the same stage in both: {same}.",
             f"Look-up table: {len(lut)} op configurations ({lut_path}); its per-stage prediction for {check_archs} "
             f"random archs is off by {ee.mean_abs_error_pct.mean():.1f}% on average under early exit (max "
             f"{ee.max_abs_error_pct.max():.1f}%).",
             "Paper rows: ImageNet, their Table 4 (their measured latency and top-1; no LUT prediction is given). "
             "GPU rows of this run are not measured here."]
    report.write_table(table4, "reports/tables/table4",
                       title="Table 4: latency targets (ONNX Runtime op latency look-up table)",
                       reading=reading, notes=notes)
    return table4


# the keys of ``static_vs_dynamic_result`` a reader looks at first
SUMMARY = ("reached_static_metric_top1", "test_top1_difference", "macs_ratio", "latency_speedup",
           "eager_latency_speedup", "cascade_ceiling", "meets_goal")


def static_vs_dynamic_result(sd: Mapping[str, Any], timed: Mapping[str, tuple[dict[str, np.ndarray], list]],
                             lut: lat.LatencyTable, *, threads: int, images: int) -> dict[str, Any]:
    """``reports/details/static_vs_dynamic.json`` (its numbers also in ``reports/metrics/``): both nets, their
    test top-1, MACs and batch-1 latency as deployed (ONNX Runtime: ``latency_ms``, the speed-up the paper's claim
    is judged on) and as eager PyTorch (``eager_latency_ms``), the ratios and whether the paper's claim
    (``MACS_RATIO_GOAL``, ``SPEEDUP_GOAL``, ``TOP1_SLACK``) holds."""
    static_arch, st, dyn = sd["static_arch"], sd["static"], sd["dynamic"]
    other = other_clock(lut)
    ms = {k: (float(v[0][lut.clock].mean()), float(v[0][other].mean())) for k, v in timed.items()}
    static_ms, dyn_ms = ms["static"][0], ms["dynamic"][0]
    result = {
        "rule": "dynamic thresholds: the cheapest grid thresholds (average MACs on the metric set) whose metric-set "
                "top-1 reaches the static subnet's metric-set top-1; best static subnet: the most accurate on the "
                "metric set of the MACs search's static subnets",
        "reached_static_metric_top1": dyn["reached"],
        "static": {"network": "supernet.extract exported to ONNX (enas4d.deploy.export_static), batch 1 in "
                              "EarlyExitSession; eager: the extracted torch module",
                   "arch": static_arch.to_dict(), "searched_for_mmacs": st["target_mmacs"], "macs": st["macs"],
                   "metric_top1": st["metric_top1"], "test_top1": st["test_top1"], "latency_ms": static_ms,
                   f"latency_{other}_ms": ms["static"][1], "eager_latency_ms": ms["static-eager"][0],
                   f"eager_latency_{other}_ms": ms["static-eager"][1]},
        "dynamic": {"network": "MultiStageNet.export to ONNX (enas4d.deploy.export_multistage), batch-1 early exit "
                               "in EarlyExitSession; eager: ExportedMultiStageNet.early_exit",
                    "arch": dyn["arch"].to_dict(), "searched_for_mmacs": dyn["target_mmacs"],
                    "thresholds": list(dyn["point"].thresholds), "metric_top1": dyn["point"].acc,
                    "metric_avg_macs": dyn["point"].cost, "test_top1": dyn["test"].top1,
                    "test_avg_macs": dyn["test"].avg_macs,
                    "test_exit_fractions": [float(np.mean(dyn["test"].exit_stage == k))
                                            for k in range(dyn["arch"].num_stages)],
                    "latency_ms": dyn_ms, f"latency_{other}_ms": ms["dynamic"][1],
                    "eager_latency_ms": ms["dynamic-eager"][0], f"eager_latency_{other}_ms": ms["dynamic-eager"][1]},
        "test_top1_difference": dyn["test"].top1 - st["test_top1"],
        "macs_ratio": dyn["test"].avg_macs / st["macs"],
        "latency_ratio": dyn_ms / static_ms,
        "latency_speedup": static_ms / dyn_ms,
        "eager_latency_speedup": ms["static-eager"][0] / ms["dynamic-eager"][0],
        "cascade_ceiling": {"rule": "smallest subnet -> the best static subnet, without reuse; threshold chosen on "
                                    "the metric set to reach the static's metric-set top-1, replayed on the test set",
                            **sd["cascade_ceiling"]},
        "goal": {"macs_ratio_at_most": MACS_RATIO_GOAL, "latency_speedup_at_least": SPEEDUP_GOAL},
        "clock": lut.clock, "threads": threads, "timed_images": images, "runtime": _backend(lut),
    }
    result["meets_goal"] = {"macs": result["macs_ratio"] <= MACS_RATIO_GOAL,
                            "latency": result["latency_speedup"] >= SPEEDUP_GOAL,
                            "accuracy": dyn["reached"] and result["test_top1_difference"] >= -TOP1_SLACK}
    return result


def metrics(seconds: Mapping[str, float], lut: lat.LatencyTable, errors: pd.DataFrame, searched: list[dict], *,
            threads: int, check_archs: int) -> dict[str, Any]:
    """``reports/details/table4.json`` (its numbers also in ``reports/metrics/``): step seconds, the table's size
    and errors, and each searched net."""
    return {
        "seconds": sum(seconds.values()),
        **{f"{k}_seconds": v for k, v in seconds.items()},
        "lut": {"ops": len(lut), "clock": lut.clock, "threads": threads, "build_seconds": lut.meta["seconds"],
                "check_archs": check_archs,
                "error_pct": {mode: {"mean_abs": float(g.mean_abs_error_pct.mean()),
                                     "max_abs": float(g.max_abs_error_pct.max()),
                                     "mean": float(g.mean_error_pct.mean())}
                              for mode, g in errors.groupby("mode")}},
        "targets": [{"target_ms": s["target"], "lut_metric_ms": s["best"].cost, "lut_timed_ms": s["lut_timed_ms"],
                     "measured_ms": s["measured_ms"], "eager_ms": s["eager_ms"], "same_exits": s["same_exits"],
                     "test_top1": s["test"].top1, "arch": s["arch"].to_dict(),
                     "thresholds": list(s["best"].thresholds)} for s in searched],
    }
