"""Tables, figures and the results README shared by the report notebooks (06_table1 .. 11_figure6).

The notebooks read the searched nets (`load_searched`), measure them by real early-exit inference on the
test set (`measure_early_exit`, kept per image in one file for Tables 1 and 3 and Figure 6: `save_exits`),
and write what they found with the writers below.

Every table is written twice, as ``<stem>.md`` (title, table, a paragraph reading it, notes) and
``<stem>.csv`` (the same numbers for ``dvc plots``/pandas); every figure as a PNG with a ``.md`` caption
beside it. ``python -m enas4d.report readme OUT SECTION.md ...`` stitches those section files, in the order
given, under a header naming the dataset, the params profile and the git commit, so the README is rebuilt
by ``dvc repro`` whenever a table or figure changes and never states numbers of another run.

The paper's numbers (ImageNet, Yuan et al.) are typed in here once, as reference values; every table and
figure marks them as the paper's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from enas4d import config
from enas4d.data import image_grid
from enas4d.evaluate import deploy, memory_format
from enas4d.files import atomic_path, write_text
from enas4d.multistage import ExitResult, MultiStageNet
from enas4d.space import MultiStageArch, SearchSpace, SubnetArch
from enas4d.supernet import resize
from enas4d.thresholds import metric_r

EXITS = Path("evaluations/test_early_exit.npz")  # per-image early exits of the searched nets (Table 1's run)
IMAGENET_SOURCES = Path("reports/figures/figure5_imagenet_sources.csv")  # Figure 5's cited points of other methods

# ---------------------------------------------------------------------------------------------- paper values
PAPER = "paper (ImageNet, reference)"

# Table 1: network, COST_target (MMACs), top-1 (%), average MACs (M), cumulative MACs of stages 1..3 (M)
PAPER_TABLE1: tuple[tuple[str, int, float, int, tuple[int, int, int]], ...] = (
    ("A", 90, 70.5, 92, (75, 148, 240)),
    ("B", 120, 70.8, 123, (90, 175, 218)),
    ("C", 150, 72.1, 153, (103, 149, 237)),
    ("D", 180, 74.4, 185, (141, 201, 359)),
)

# Table 2: step, reusable, cost. The last row is from the paper's text ("Grid search for threshold").
PAPER_TABLE2: tuple[tuple[str, bool, str], ...] = (
    ("Pre-train once-for-all network", True, "2000 GPU hours"),
    ("Train for dynamic inference", True, "90 GPU hours"),
    ("Build the confidence and correctness database", True, "100 GPU hours"),
    ("Train metric predictor", False, "< 10 min"),
    ("Evolutionary search", False, "< 3 min"),
    ("Threshold grid search (per arch)", False, "about 200 ms (text)"),
)

# Table 3: per network, per stage (top-1 % of the samples exiting there, % of samples exiting there)
PAPER_TABLE3: dict[str, tuple[tuple[float, float], ...]] = {
    "A": ((79.4, 80.3), (37.1, 17.3), (15.6, 2.3)),
    "B": ((85.7, 67.2), (49.3, 21.6), (23.1, 11.2)),
    "C": ((94.6, 44.3), (70.5, 27.9), (38.2, 27.9)),
    "D": ((89.5, 64.7), (57.1, 20.9), (31.8, 14.4)),
}


def paper_table1() -> pd.DataFrame:
    """The paper's Table 1 as rows of the same columns our Table 1 uses."""
    return pd.DataFrame([{"source": PAPER, "network": name, "target_mmacs": target, "top1_pct": top1,
                          "avg_mmacs": avg, **{f"stage{s + 1}_mmacs": m for s, m in enumerate(cum)}}
                         for name, target, top1, avg, cum in PAPER_TABLE1])


def paper_table3() -> pd.DataFrame:
    """The paper's Table 3, one row per (network, stage)."""
    return pd.DataFrame([{"source": PAPER, "network": name, "stage": s + 1, "exit_fraction_pct": frac,
                          "exit_top1_pct": top1}
                         for name, stages in PAPER_TABLE3.items() for s, (top1, frac) in enumerate(stages)])


def duration(seconds: float) -> str:
    """A wall time the way Table 2 shows it: ms below a second, then s, min, h."""
    if not (np.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"duration must be a finite number of seconds >= 0, got {seconds!r}")
    if seconds < 1:
        return f"{1000 * seconds:.3g} ms"
    if seconds < 120:
        return f"{seconds:.3g} s"
    return f"{seconds / 60:.3g} min" if seconds < 7200 else f"{seconds / 3600:.3g} h"


def span(values: Sequence[float] | np.ndarray, fmt: str = "{:.2f}") -> str:
    """``lo–hi`` of ``values`` for a reading, or the one value when they are all equal."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        raise ValueError("span of no finite values")
    lo, hi = fmt.format(v.min()), fmt.format(v.max())
    return lo if lo == hi else f"{lo}–{hi}"


def against_targets(names: Sequence[str], costs: Sequence[float], targets: Sequence[float], unit: str) -> str:
    """How many nets stay at or under their cost target, compared exactly (unrounded), and by how much each
    other one is over: 'at or under their cost target: 2 of 4; over it: A by 9.68% (1.09676 vs 1 MMACs), ...'."""
    over = [(n, c, t) for n, c, t in zip(names, costs, targets, strict=True) if c > t]
    text = f"{len(names) - len(over)} of {len(names)} stay at or under their cost target"
    if over:
        text += "; over it: " + ", ".join(f"{n} by {100 * (c / t - 1):.2g}% ({c:.6g} vs {t:g} {unit})"
                                          for n, c, t in over)
    return text


def rate_with_interval(hits: int, n: int) -> str:
    """A rate with its count and 95% Wilson interval, for rates resting on few images:
    '72.2% of 54 images (95% CI 59.1-82.4%)'."""
    if n == 0:
        return "no images"
    lo, hi = wilson_pct([100 * hits / n], n)
    return f"{100 * hits / n:.1f}% of {n} images (95% CI {lo[0]:.1f}-{hi[0]:.1f}%)"


def network_names(n: int) -> list[str]:
    """A, B, C, ... for the searched nets in target order, as the paper names ENAS4D-A..D."""
    if not 0 < n <= 26:
        raise ValueError(f"can name 1 to 26 searched nets, got {n}")
    return [chr(ord("A") + i) for i in range(n)]


# ---------------------------------------------------------------------------------------------- searched nets
@dataclass(frozen=True)
class Searched:
    """One entry of ``searched/archs.json``: the net found for ``target`` and what the metric set said of it."""

    target: float
    arch: MultiStageArch | SubnetArch
    thresholds: tuple[float, ...]  # empty for a static subnet
    metric_set: dict  # r, acc, cost (MMACs) [, exit_fractions] on the metric set


def load_searched(path: str | Path, cfg: config.Config, space: SearchSpace) -> tuple[list[Searched], list[Searched]]:
    """The multi-stage and static nets of the search stage's file, checked against params.yaml's ``search`` and
    its search space ``space`` (``pipeline.space(cfg)``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; run the search stage first (dvc repro search)")
    try:
        raw = json.loads(path.read_text())
        for key, want in (("cost", cfg.search.cost), ("omega", cfg.search.omega), ("grid", cfg.search.grid),
                          ("targets", list(cfg.search.targets))):
            if raw[key] != want:
                raise ValueError(f"{path}: {key} is {raw[key]!r} but params.yaml's search.{key} is {want!r}; "
                                 "rerun the search stage (dvc repro)")
        multi = [Searched(float(e["target"]), MultiStageArch.from_dict(e["arch"]),
                          tuple(float(t) for t in e["thresholds"]), dict(e["metric_set"])) for e in raw["multistage"]]
        static = [Searched(float(e["target"]), SubnetArch.from_dict(e["arch"]), (), dict(e["metric_set"]))
                  for e in raw["static"]]
    except (KeyError, TypeError, ValueError) as err:  # JSONDecodeError is a ValueError
        if isinstance(err, ValueError) and str(err).startswith(f"{path}: "):
            raise
        raise ValueError(f"{path}: not a searched-archs file ({type(err).__name__}: {err})") from None
    if [s.target for s in multi] != list(cfg.search.targets):
        raise ValueError(f"{path}: multistage targets {[s.target for s in multi]} differ from search.targets")
    _check_searched(path, space, multi, static)
    return multi, static


def _check_searched(path: Path, space: SearchSpace, multi: list[Searched], static: list[Searched]) -> None:
    """Thresholds in [0, 1], one per stage but the last, and every arch inside params.yaml's search space."""
    for kind, nets in (("multistage", multi), ("static", static)):
        for i, net in enumerate(nets):
            where = f"{path}: {kind}[{i}] (target {net.target:g})"
            if kind == "multistage":
                if len(net.thresholds) != space.stages - 1:
                    raise ValueError(f"{where}: {len(net.thresholds)} thresholds; finetune.stages = {space.stages} "
                                     f"needs {space.stages - 1}")
                bad = [t for t in net.thresholds if not 0 <= t <= 1]
                if bad:
                    raise ValueError(f"{where}: threshold {bad[0]:g} outside [0, 1]")
            try:
                space.check(net.arch) if kind == "multistage" else space.check_subnet(net.arch)
            except ValueError as err:
                raise ValueError(f"{where}: arch outside the search space of params.yaml ({err})") from None


@torch.no_grad()
def measure_early_exit(msnet: MultiStageNet, arch: MultiStageArch, thresholds: tuple[float, ...],
                       images: torch.Tensor, calib: torch.Tensor, batch_size: int) -> ExitResult:
    """Real early-exit inference of ``arch`` with ``thresholds`` on ``images`` (normalized, native size).

    The evaluation recipe of the database and the search (export, BN recalibrated on ``calib`` at the arch's
    resolution), then ``ExportedMultiStageNet.early_exit`` batch by batch: each batch runs stage by stage and
    only the samples that did not exit go on. Returns per-image prediction, exit stage and MACs (on the CPU).
    """
    dev = next(msnet.parameters()).device
    fmt = memory_format(dev)
    net = deploy(msnet, arch, calib, batch_size)
    parts = []
    for i in range(0, len(images), batch_size):
        x = resize(images[i:i + batch_size].to(dev), arch.resolution).contiguous(memory_format=fmt)
        parts.append(net.early_exit(x, thresholds))
    return ExitResult(*(torch.cat([getattr(p, f) for p in parts]).cpu() for f in ("pred", "exit_stage", "macs")))


def headline(nets: Sequence[dict], omega: float) -> dict[str, dict[str, float]]:
    """Per cost target the searched net's test top-1, average MMACs, R and stage-1 exit fraction, as flat
    numbers (``reports/metrics/headline.json``: the columns `dvc exp show` compares across experiments).

    ``nets`` are Table 1's records (``target_mmacs``, ``top1``, ``avg_mmacs``, ``exit_fractions``)."""
    return {f"target_{float(n['target_mmacs'])}": {
        "top1": n["top1"], "mmacs": n["avg_mmacs"],
        "R": metric_r(n["top1"], n["avg_mmacs"], n["target_mmacs"], omega),
        "exit1": n["exit_fractions"][0]} for n in nets}


def save_exits(path: str | Path, labels: np.ndarray, runs: dict[str, ExitResult]) -> Path:
    """Per-image early-exit results of each named net (Table 3 and Figure 6 read them), written atomically."""
    arrays = {"names": np.array(list(runs)), "labels": np.asarray(labels, dtype=np.int64),
              **{f: np.stack([getattr(r, f).numpy() for r in runs.values()]) for f in ("pred", "exit_stage", "macs")}}
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)
    return Path(path)


def load_exits(path: str | Path) -> tuple[np.ndarray, dict[str, ExitResult]]:
    """``(labels, {name: ExitResult})`` from a `save_exits` file; a bad file raises an error naming it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            a = {k: z[k] for k in ("names", "labels", "pred", "exit_stage", "macs")}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found; run the table1 stage first (dvc repro table1)") from None
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: not an early-exit results file ({err})") from None
    shape = (len(a["names"]), len(a["labels"]))
    if any(a[f].shape != shape for f in ("pred", "exit_stage", "macs")):
        raise ValueError(f"{path}: per-image arrays are not [{shape[0]} nets, {shape[1]} images]")
    return a["labels"], {str(n): ExitResult(*(torch.from_numpy(a[f][i]) for f in ("pred", "exit_stage", "macs")))
                         for i, n in enumerate(a["names"])}


# ---------------------------------------------------------------------------------------------- writers
def _section(title: str, body: str, reading: str, notes: Sequence[str]) -> str:
    parts = [f"### {title}", body.strip(), reading.strip(), *(f"*{n.strip()}*" for n in notes)]
    return "\n\n".join(p for p in parts if p) + "\n"


def markdown_table(df: pd.DataFrame) -> str:
    """``df`` as a GitHub markdown table; NaN shows as an empty cell (e.g. a stage nobody exits at)."""
    if df.empty:
        raise ValueError("refusing to write an empty table")
    # pandas renders through tabulate (installed with dvc)
    return df.astype(object).where(df.notna(), None).to_markdown(index=False, floatfmt="g", missingval="")


def write_table(df: pd.DataFrame, stem: str | Path, *, title: str, reading: str,
                notes: Sequence[str] = ()) -> tuple[Path, Path]:
    """Write ``<stem>.md`` (title, table, reading, notes) and ``<stem>.csv``; return both paths.

    Round the numbers in ``df`` first: both files show them as given, so the markdown and the CSV agree.
    """
    stem = Path(stem)
    md = write_text(stem.with_suffix(".md"), _section(title, markdown_table(df), reading, notes))
    return md, write_csv(df, stem.with_suffix(".csv"))


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """``df`` as CSV (no index), written atomically: the numbers behind a table or figure."""
    return write_text(Path(path), df.to_csv(index=False))


FIGURE5_SERIES = ("ENAS4D (sweep)", "best static subnet", "cascade without reuse", "ENAS4D (Table 1)",
                  "random multi-stage")


def series_file(name: str) -> str:
    """File name of a series' own CSV: ``ENAS4D (sweep)`` -> ``enas4d-sweep.csv``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + ".csv"


def write_series(points: pd.DataFrame, out_dir: str | Path, names: Sequence[str] = FIGURE5_SERIES) -> list[Path]:
    """One CSV per series of ``points`` (``series``, ``avg_mmacs``, ``top1_pct``, ...), in cost order: ``dvc plots``
    colours a plot by file, so a file per series gives a colour per series."""
    out = []
    for name in names:
        rows = points[points.series == name].sort_values("avg_mmacs")
        keep = [c for c in ("label", "target_mmacs", "avg_mmacs", "top1_pct", "top1_low_pct", "top1_high_pct")
                if c in rows]
        out.append(write_csv(rows[keep], Path(out_dir) / series_file(name)))
    return out


def with_wilson(points: pd.DataFrame, n: int) -> pd.DataFrame:
    """``points`` with ``top1_low_pct``/``top1_high_pct``: 95% Wilson intervals (``wilson_pct``, rounded as the
    figure shows them) of this run's rows (panel 0), whose top-1 was measured on ``n`` test images; the paper's
    and the sourced numbers (panel 1) come without image counts, so theirs stay empty."""
    out = points.copy()
    ours = out.panel == 0
    low, high = wilson_pct(out.top1_pct[ours], n)
    out.loc[ours, "top1_low_pct"], out.loc[ours, "top1_high_pct"] = low.round(2), high.round(2)
    return out


def write_points(points: pd.DataFrame, csv: str | Path, series_dir: str | Path) -> list[Path]:
    """Figure 5's numbers: every point in ``csv``, and this run's series one file each in ``series_dir``
    (``write_series``, for ``dvc plots``); returns the paths written."""
    return [write_csv(points, csv), *write_series(points[points.panel == 0], series_dir)]


def write_figure(fig, png: str | Path, *, title: str, reading: str, notes: Sequence[str] = (),
                 dpi: int = 120) -> tuple[Path, Path]:
    """Save ``fig`` as ``png`` and its caption (title, inline image, reading, notes) as the ``.md`` beside it."""
    png = Path(png)
    if png.suffix != ".png":
        raise ValueError(f"{png}: figures are written as .png")
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    md = write_text(png.with_suffix(".md"), _section(title, f"![{title}]({png.name})", reading, notes))
    return png, md


# ---------------------------------------------------------------------------------------------- figures
SOURCE_COLUMNS = ("method", "setting", "avg_mmacs", "top1", "source")


def load_imagenet_sources(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Figure 5's sourced ImageNet points of other methods: ``(plottable rows, rows without average MACs)``.

    Each row cites where its numbers come from (``source``); a row without ``avg_mmacs`` (e.g. a method that
    reports only a relative computation percentage) cannot be placed on a MACs axis.
    """
    path = Path(path)
    try:
        df = pd.read_csv(path)
    except (OSError, pd.errors.ParserError) as err:
        raise ValueError(f"{path}: cannot read the sourced ImageNet points ({err})") from None
    missing = [c for c in SOURCE_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; need {list(SOURCE_COLUMNS)}")
    if df.top1.isna().any() or df.source.isna().any():
        raise ValueError(f"{path}: every row needs top1 and source")
    has = df.avg_mmacs.notna()
    return df[has].reset_index(drop=True), df[~has].reset_index(drop=True)


def settled_generations(curves: str | Path, predictor_metrics: str | Path) -> dict[str, int]:
    """Per evolution curve of the search stage (``<kind>-<target>.csv`` in ``curves``: best predicted R per
    generation), the first generation whose best-so-far predicted R is within the predictor's mean held-out
    RMSE (of that kind, from ``predictor_metrics``) of the run's final best: evolving longer only moves the
    prediction by less than its own error."""
    errors = json.loads(Path(predictor_metrics).read_text())
    rmse = {kind: float(np.mean([e["rmse"] for e in errors[kind]])) for kind in ("multistage", "static")}
    runs = {}
    for curve in sorted(Path(curves).glob("*.csv")):
        best = np.maximum.accumulate(pd.read_csv(curve).best_predicted_r.to_numpy())
        runs[curve.stem] = int(np.argmax(best >= best[-1] - rmse[curve.stem.split("-")[0]]))
    if not runs:
        raise FileNotFoundError(f"{curves}: no evolution curves; run the search stage first")
    return runs


def imagenet_panel(sources: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Figure 5's right panel: the paper's ENAS4D points (its Table 1, reference values), the sourced methods
    that give average MACs, and those that do not (listed, not plotted). Returns ``(points, plotted, unplotted)``
    with ``plotted``/``unplotted`` as ``load_imagenet_sources`` gives them."""
    plotted, unplotted = load_imagenet_sources(sources)
    rows = [{"panel": 1, "series": "ENAS4D (paper)", "label": f"ENAS4D-{name}", "target_mmacs": target,
             "avg_mmacs": avg, "top1_pct": top1, "source": "paper, Table 1 (reference)"}
            for name, target, top1, avg, _ in PAPER_TABLE1]
    rows += [{"panel": 1, "series": r.method, "label": r.setting, "avg_mmacs": r.avg_mmacs, "top1_pct": r.top1,
              "source": r.source} for r in plotted.itertuples()]
    rows += [{"panel": 1, "series": r.method, "label": r.setting, "top1_pct": r.top1,
              "source": f"NOT PLOTTED (no average MACs in the source): {r.source}"} for r in unplotted.itertuples()]
    return pd.DataFrame(rows), plotted, unplotted


def best_within(curve: pd.DataFrame, budgets: np.ndarray) -> np.ndarray:
    """For each MACs budget: the best ``top1_pct`` among ``curve``'s points whose ``avg_mmacs`` is no more
    (NaN if none)."""
    return np.array([curve.top1_pct[curve.avg_mmacs <= v].max() if (curve.avg_mmacs <= v).any() else np.nan
                     for v in budgets])


def figure5_summary(ours: pd.DataFrame, sweep: Sequence[float], full_path_ratio: dict[float, float],
                    plotted: pd.DataFrame, unplotted: pd.DataFrame,
                    sources: Path = IMAGENET_SOURCES) -> tuple[str, list[str], dict[str, object]]:
    """Figure 5's reading, its notes and its numbers for the metrics file, from this run's points ``ours``
    (series ``ENAS4D (sweep)``, ``best static subnet``, ``cascade without reuse``, ``random multi-stage``)."""
    def series(name: str) -> pd.DataFrame:
        return ours[ours.series == name].sort_values("avg_mmacs")

    enas, static, cascade, rand = (series(n) for n in ("ENAS4D (sweep)", "best static subnet",
                                                       "cascade without reuse", "random multi-stage"))

    def compare(other: pd.DataFrame, what: str) -> str:
        """A sentence: top-1 of each sweep net minus the best point of ``other`` that costs no more."""
        g = enas.top1_pct.to_numpy() - best_within(other, enas.avg_mmacs.to_numpy())
        ok = np.isfinite(g)
        if not ok.any():
            return f"No {what} costs as little as any searched net."
        return (f"Against the best {what} that costs no more, the searched nets gain {np.mean(g[ok]):+.2f} top-1 "
                f"points on average (from {g[ok].min():+.2f} to {g[ok].max():+.2f}; {ok.sum()} of {len(g)} sweep nets "
                "have one).")

    full_path = list(full_path_ratio.values())
    dominated = best_within(enas, rand.avg_mmacs.to_numpy()) >= rand.top1_pct.to_numpy()
    reading = (
        f"Across the {len(sweep)} sweep targets the searched nets span {span(enas.avg_mmacs, '{:.3f}')} average "
        f"MMACs at {span(enas.top1_pct)}% test top-1. {compare(static, 'static subnet')} "
        f"{compare(cascade, 'cascade point (the same stages without feature reuse)')} A sample that runs all stages "
        f"costs {span(full_path, '{:.2f}')}x the MACs in the cascade, which recomputes the stem and the earlier "
        f"stages' channels. {dominated.sum()} of the {len(rand)} random-arch points "
        "are matched or beaten by a searched net that costs no more. "
        f"The ImageNet panel shows the paper's ENAS4D points with {len(plotted)} sourced point(s) of other methods; "
        f"{len(unplotted)} sourced row(s) give no average MACs and are listed below but not plotted."
    )
    absent = sorted({"RANet", "MSDNet", "HydraNet", "SkipNet", "FBS"} - set(plotted.method) - set(unplotted.method))
    notes = [f"Right panel: the paper's Table 1 points (reference values) and {sources.name}, whose source column "
             "cites each number" + (f"; {', '.join(absent)}: no point could be sourced" if absent else "") + "."]
    not_plotted = "; ".join(f"{r.method} ({r.setting.split(',')[0]}, top-1 {r.top1:g}%)"
                            for r in unplotted.itertuples())
    if not_plotted:
        notes.append(f"Sourced but not plotted (no average MACs): {not_plotted}.")
    notes.append("All plotted numbers: reports/figures/figure5.csv.")
    numbers = {
        "enas4d_minus_best_cheaper_static": np.round(enas.top1_pct.to_numpy()
                                                     - best_within(static, enas.avg_mmacs.to_numpy()), 4).tolist(),
        "enas4d_minus_best_cheaper_cascade": np.round(enas.top1_pct.to_numpy()
                                                      - best_within(cascade, enas.avg_mmacs.to_numpy()), 4).tolist(),
        "cascade_full_path_macs_ratio": {f"{t:g}": r for t, r in full_path_ratio.items()},
        "random_matched_or_beaten": int(dominated.sum()),
        "random_points": len(rand),
    }
    return reading, notes, numbers


# One style per series name, so the same series looks the same in every figure.
_STYLES: dict[str, dict] = {
    "ENAS4D (sweep)": dict(color="tab:red", marker="o", ls="-", lw=1.2, zorder=5),
    "ENAS4D (Table 1)": dict(color="tab:red", marker="*", ls="", ms=14, mec="black", zorder=6),
    "best static subnet": dict(color="tab:blue", marker="s", ls="-", lw=1.2, zorder=4),
    "cascade without reuse": dict(color="tab:green", marker="^", ls="-", lw=1.2, zorder=3),
    "random multi-stage": dict(color="0.55", marker=".", ls="", ms=7, alpha=0.6, zorder=1),
    "ENAS4D (paper)": dict(color="tab:red", marker="*", ls="-", ms=12, zorder=5),
}
_CYCLE = ("tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:blue")


def wilson_pct(top1_pct: Sequence[float] | np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """95% Wilson score interval (%) of top-1 rates measured on ``n`` images (scipy's binomial test):
    the error bars of Figure 5 and the intervals the readings quote where a rate rests on few images."""
    from scipy.stats import binomtest

    lo, hi = [], []
    for p in np.asarray(top1_pct, dtype=np.float64):
        if not np.isfinite(p) or n <= 0:
            lo.append(np.nan)
            hi.append(np.nan)
            continue
        ci = binomtest(int(round(p / 100 * n)), n).proportion_ci(0.95, method="wilson")
        lo.append(100 * ci.low)
        hi.append(100 * ci.high)
    return np.array(lo), np.array(hi)


def plot_accuracy_vs_macs(points: pd.DataFrame, *, left_title: str, right_title: str):
    """Figure 5: top-1 (%) against average MACs (M), one panel per ``points.panel`` value (0 ours, 1 ImageNet).

    ``points`` has columns panel, series, avg_mmacs, top1_pct, and optionally top1_low_pct/top1_high_pct
    (95% binomial intervals, drawn as error bars). Series in ``_STYLES`` keep their style (lines join a
    series' points in MACs order); any other series (methods of other papers) gets a marker of its own.
    A panel whose MACs span more than 10x uses a log axis, and its x label says so. Seaborn's whitegrid style.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    missing = {"panel", "series", "avg_mmacs", "top1_pct"} - set(points.columns)
    if missing:
        raise ValueError(f"figure 5 points lack columns {sorted(missing)}")
    with sns.axes_style("whitegrid"):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    palette = sns.color_palette("colorblind")
    for panel, (ax, title) in enumerate(zip(axes, (left_title, right_title))):
        part = points[points.panel == panel]
        others = 0
        for series, rows in part.groupby("series", sort=False):
            rows = rows.sort_values("avg_mmacs")
            style = _STYLES.get(series)
            if style is None:
                style = dict(color=palette[others % len(palette)], marker="DPXhv<>"[others % 7], ls="", ms=9)
                others += 1
            ax.plot(rows.avg_mmacs, rows.top1_pct, label=series, **style)
            if {"top1_low_pct", "top1_high_pct"} <= set(rows) and rows.top1_low_pct.notna().any():
                err = np.vstack([rows.top1_pct - rows.top1_low_pct, rows.top1_high_pct - rows.top1_pct])
                ax.errorbar(rows.avg_mmacs, rows.top1_pct, yerr=err, fmt="none", ecolor=style["color"],
                            elinewidth=0.8, capsize=2, alpha=style.get("alpha", 0.8), zorder=style.get("zorder", 2))
        log = bool(len(part) and part.avg_mmacs.max() > 10 * part.avg_mmacs.min())
        if log:
            ax.set_xscale("log")
        ax.set_xlabel("average MACs per image (M, log scale)" if log else "average MACs per image (M, linear scale)")
        ax.set_ylabel("top-1 (%)" + (", 95% Wilson intervals" if "top1_low_pct" in part else ""))
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot_exit_examples(image: Callable[[int], np.ndarray], true: np.ndarray, pred: np.ndarray,
                       exit_stage: np.ndarray, stages: int, classes: Sequence[str], per_stage: int, seed: int,
                       title: str):
    """Figure 6: one row per stage of ``per_stage`` random test images that exit there, titled true → predicted.

    ``image(i)`` returns test image ``i`` as H x W (gray) or H x W x 3 uint8 (only the shown ones are loaded:
    an ImageNet test set does not fit in memory); ``exit_stage`` is 0-based, of ``stages`` stages. Wrong
    predictions are titled in red. A stage that fewer images exit at shows what it has.
    """
    n = len(true)
    if not (len(pred) == len(exit_stage) == n > 0) or per_stage < 1:
        raise ValueError(f"figure 6 needs one prediction and exit stage per label ({n} labels) and per_stage >= 1")
    if not 0 <= exit_stage.min() <= exit_stage.max() < stages:
        raise ValueError(f"exit stages must lie in [0, {stages}), got {exit_stage.min()}..{exit_stage.max()}")
    rng = np.random.default_rng(seed)
    pools = [np.flatnonzero(exit_stage == s) for s in range(stages)]
    rows = [np.sort(rng.choice(pool, size=min(per_stage, len(pool)), replace=False)) for pool in pools]
    labels = [f"stage {s + 1}\n{len(pool) / n:.1%} exit" for s, pool in enumerate(pools)]
    fig = image_grid(rows, image, labels, per_stage, (1.35, 1.75),
                     lambda i: (f"{classes[true[i]]}\n→ {classes[pred[i]]}",
                                "black" if true[i] == pred[i] else "tab:red"))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------- README
def commit(root: str | Path = ".") -> str:
    """``git rev-parse --short HEAD`` of ``root`` (the code the results came from), or 'unknown' without git."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def describe_profile(root: str | Path = ".") -> str:
    """Which params these results used: a profile in ``profiles/`` that params.yaml equals, else the
    default profile, with the keys that differ from the committed params.yaml (when git knows it)."""
    root = Path(root)
    params = config.read_yaml(root / "params.yaml")
    for p in sorted((root / "profiles").glob("*.yaml")):
        if config.read_yaml(p) == params:
            return f"`{p.stem}` (profiles/{p.name})"
    try:
        done = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=root, capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        done = None
    if done is None or done.returncode != 0:
        return "`default` (params.yaml; no committed params.yaml to compare with)"
    committed, now = _flat(yaml.safe_load(done.stdout) or {}), _flat(params)
    changed = [f"{k}: {committed.get(k)!r} → {now.get(k)!r}" for k in sorted(set(committed) | set(now))
               if committed.get(k) != now.get(k)]
    return "`default` (params.yaml)" + (f", changed from the committed file: {'; '.join(changed)}" if changed else "")


_IMAGE = re.compile(r"(!\[[^\]]*\]\()([^)\s]+)(\))")


def _rebase_images(text: str, section_dir: Path, readme_dir: Path) -> str:
    """Make the section's relative image links relative to the README's folder."""
    def fix(m: re.Match) -> str:
        link = m.group(2)
        if re.match(r"^[a-z]+://", link) or link.startswith("/"):
            return m.group(0)
        return m.group(1) + os.path.relpath(section_dir / link, readme_dir) + m.group(3)

    return _IMAGE.sub(fix, text)


def readme(out: str | Path, sections: Sequence[str | Path], root: str | Path = ".") -> Path:
    """Write the results README ``out``: a header (dataset, profile, commit), then each section file in order.

    Relative paths are taken from ``root`` (the project root, where params.yaml is).
    """
    root = Path(root)
    out = root / out
    cfg = config.load(root / "params.yaml")
    sizes_path = root / "reports/metrics/data.json"
    sizes = json.loads(sizes_path.read_text()) if sizes_path.is_file() else {}
    split = ", ".join(f"{sizes[k]} {k}" for k in ("train", "metric", "test") if k in sizes)
    unit = "MMACs" if cfg.search.cost == "macs" else "ms"
    facts = [
        f"- **Dataset**: {cfg.data.name}" + (f" ({split} images)" if split else ""),
        f"- **Profile**: {describe_profile(root)}",
        f"- **Search**: cost = {cfg.search.cost}, ω = {cfg.search.omega:g}, targets = "
        f"{', '.join(f'{t:g}' for t in cfg.search.targets)} {unit}",
        f"- **Code commit**: `{commit(root)}`",
        "- **Executed notebooks**: `reports/notebooks/` (every number below is computed there)",
    ]
    parts = ["# Results",
             "Regenerated by `dvc repro`: `python -m enas4d.report readme` writes this file from the table and "
             "figure files below, so do not edit it. The paper's ImageNet numbers are typed in from the paper as "
             "reference values and marked as such; every other number comes from this run's files.",
             "\n".join(facts)]
    for s in sections:
        path = root / s
        if not path.is_file():
            raise FileNotFoundError(f"{path}: section file missing (run its pipeline stage first)")
        parts.append(_rebase_images(path.read_text().strip(), path.parent, out.parent))
    return write_text(out, "\n\n".join(parts) + "\n")


def main(argv: list[str] | None = None) -> int:
    """``python -m enas4d.report readme OUT SECTION.md ...``: write the results README."""
    p = argparse.ArgumentParser(prog="python -m enas4d.report")
    p.add_argument("command", choices=["readme"])
    p.add_argument("out")
    p.add_argument("sections", nargs="+")
    args = p.parse_args(argv)
    try:
        print(readme(args.out, args.sections))
    except (config.ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
