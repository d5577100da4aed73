"""Set-up shared by the pipeline notebooks, so each notebook shows its paper step and not its plumbing.

Paths of the stage artefacts, the search space and splits a config implies, the fixed BN-calibration
images, loading the fine-tuned multi-stage network, device and threads, wall-clock timing for the
``seconds`` every stage reports (Table 2), and ``run_stage``, the training stages as the notebooks and the
command line (``enas4d.cli``) both run them, so a run started by either is resumed by the other.

This module is glue, the top layer (docs/DESIGN.md, "Layers"): it imports the library, and no library
module imports it. Every notebook imports it, so it imports only what every stage runs anyway (the model and
training code); search and database helpers live in their own modules, which DVC then tracks only for the
stages that use them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from enas4d import config, data, train
from enas4d.cost import mmacs  # noqa: F401  (the notebooks' MACs unit, one namespace for them)
from enas4d.evaluate import split_images
from enas4d.multistage import MultiStageNet
from enas4d.space import SearchSpace
from enas4d.supernet import PRESETS, OFAMobileNetV3, SupernetSpec, load_ofa_state_dict

CHECKPOINTS = Path("checkpoints")
SUPERNET = CHECKPOINTS / "supernet.pt"
MULTISTAGE = CHECKPOINTS / "multistage.pt"
PREDICTORS = CHECKPOINTS / "predictors"  # one MLP per (kind, target), the paper's per-target predictors
PREDICTOR_COND = CHECKPOINTS / "predictor_cond.pt"
# train's per-epoch last.pt lives here, outside the stage outputs: DVC deletes outputs before it reruns a
# stage, and a killed `dvc repro` must find the last finished epoch again.
RESUME = CHECKPOINTS / ".resume"
DATABASE = Path("databases/confidence")
CURVES = Path("reports/plots")  # per-epoch training curves (dvc plots), rewritten after every epoch
SEARCHED = Path("searched/archs.json")
# Per-epoch validation curves use this many metric-set images: enough to see a trend, cheap every epoch.
VAL_IMAGES = 2000
# The conditional predictor learns R over omega x these factors (and the sweep and search targets), so
# one model covers omegas near the configured one without retraining.
COND_OMEGA_FACTORS = (0.5, 0.75, 1.0, 1.5, 2.0)


# ---------------------------------------------------------------------------------------------- config


def spec(cfg: config.Config) -> SupernetSpec:
    """The layer sizes of ``supernet.preset``."""
    return PRESETS[cfg.supernet.preset]


def space(cfg: config.Config, stages: int | None = None) -> SearchSpace:
    """The search space of ``cfg``: units of the preset, choices of ``supernet``, ``finetune.stages`` stages."""
    s = cfg.supernet
    return SearchSpace(units=len(spec(cfg).units), resolutions=s.resolutions, depths=s.depths, expands=s.expands,
                       kernels=s.kernels, stages=cfg.finetune.stages if stages is None else stages)


def device(cfg: config.Config) -> torch.device:
    """``device`` of params.yaml: ``auto`` takes CUDA when there is one; ``cuda`` without one is an error."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("params.yaml: device: cuda, but torch sees no CUDA device (set device: auto or cpu)")
    return torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")


def set_threads(cfg: config.Config) -> None:
    """torch intra-op threads = ``threads`` (the CPU budget of a stage)."""
    torch.set_num_threads(cfg.threads)


def ignored_dir(path: str | Path) -> Path:
    """``path`` created with a ``.gitignore`` of ``*``: scratch state (resume files, partial shards) that git
    must never pick up, whatever the checkout's top-level ignore rules say."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    ignore = d / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    return d


def resume_dir(stage: str) -> Path:
    """``checkpoints/.resume/<stage>``: where ``train`` keeps the last finished epoch of ``stage``."""
    return ignored_dir(ignored_dir(RESUME) / stage)


# ---------------------------------------------------------------------------------------------- data


def splits(cfg: config.Config) -> dict[str, data.Split]:
    """The ``train``, ``metric`` and ``test`` splits of ``data.out``, checked against the preset's sizes."""
    out = {name: data.load_split(cfg.data.out, name) for name in data.SPLITS}
    sp, first = spec(cfg), out["train"]
    if (first.num_classes, first.in_channels) != (sp.num_classes, sp.in_channels):
        raise ValueError(f"params.yaml: supernet.preset: {cfg.supernet.preset} has {sp.num_classes} classes and "
                         f"{sp.in_channels} input channels, {cfg.data.out} has {first.num_classes} and "
                         f"{first.in_channels}")
    return out


def calib_split(cfg: config.Config, train_split: data.Split, n: int | None = None) -> data.Split:
    """The fixed ``pretrain.bn_calib_images`` training images the training stages' evaluations recalibrate BN
    on (OFA); ``n`` others take the first ``n`` of the same seeded draw (fewer: a subset of them)."""
    if train_split.name != "train":
        raise ValueError(f"BN calibration images come from the train split, got split {train_split.name!r}")
    return data.subset(train_split, cfg.pretrain.bn_calib_images if n is None else n, cfg.seed)


def calib_images(cfg: config.Config, train_split: data.Split) -> torch.Tensor:
    """``calib_split`` as one normalized image tensor."""
    return split_images(calib_split(cfg, train_split))


def database_calib_images(cfg: config.Config, train_split: data.Split) -> torch.Tensor:
    """The ``database.calib_images`` calibration images of the database build and of every evaluation that must
    match it (the search's re-evaluation, the tables and figures of searched nets, the deployed folders)."""
    return split_images(calib_split(cfg, train_split, cfg.database.calib_images))


def val_split(cfg: config.Config, metric: data.Split) -> data.Split:
    """A fixed subset of ``VAL_IMAGES`` metric-set images for per-epoch curves (the test set stays unseen)."""
    return data.subset(metric, min(VAL_IMAGES, len(metric)), cfg.seed)


def database_images(cfg: config.Config, metric: data.Split) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels the database is built on: a fixed seeded subset of ``database.images`` metric-set
    images (seeded, not the first N: a folder dataset lists its files class by class)."""
    part = data.subset(metric, cfg.database.images, cfg.seed)
    return split_images(part), part.labels


# ---------------------------------------------------------------------------------------------- networks


def new_supernet(cfg: config.Config) -> OFAMobileNetV3:
    """A seeded fresh supernet, with OFA's pretrained weights when ``supernet.checkpoint`` names them.

    Its space has one stage: pretraining samples static subnets; fine-tuning opens ``finetune.stages``.
    """
    train.seed_everything(cfg.seed)
    net = OFAMobileNetV3(spec(cfg), space(cfg, stages=1))
    if cfg.supernet.checkpoint is not None:
        load_ofa_state_dict(net, cfg.supernet.checkpoint)
    return net.to(device(cfg))


def _check_fits(net: OFAMobileNetV3, cfg: config.Config, want: SearchSpace, path: Path, *, stages: bool) -> None:
    """A checkpoint written under other ``supernet`` (or, with ``stages``, ``finetune.stages``) params is stale."""
    if net.spec != spec(cfg):
        raise ValueError(f"{path}: layer sizes differ from params.yaml's supernet.preset: "
                         f"{cfg.supernet.preset}; rerun its stage")
    got = net.space if stages else dataclasses.replace(net.space, stages=want.stages)
    if got != want:
        raise ValueError(f"{path}: search space {got} differs from params.yaml's {want}; rerun its stage")


def load_supernet(cfg: config.Config, path: str | Path = SUPERNET) -> OFAMobileNetV3:
    """The pretrained supernet, checked to fit ``cfg``'s preset and space."""
    net = train.load_supernet(path, device(cfg))
    _check_fits(net, cfg, space(cfg, stages=1), Path(path), stages=False)
    return net


def load_multistage(cfg: config.Config, path: str | Path = MULTISTAGE) -> MultiStageNet:
    """The fine-tuned multi-stage network (eval mode), checked to fit ``cfg`` with ``finetune.stages`` stages."""
    net = train.load_supernet(path, device(cfg))
    _check_fits(net, cfg, space(cfg), Path(path), stages=True)
    return MultiStageNet(net).eval()


# ---------------------------------------------------------------------------------------------- search


def check_cost(cfg: config.Config) -> None:
    """The predictor and search stages price archs in MACs; latency targets belong to Table 4's notebook."""
    if cfg.search.cost != "macs":
        raise ValueError(f"params.yaml: search.cost: {cfg.search.cost}: the predictor and search stages use MACs "
                         "(latency targets are searched by the Table 4 notebook with the op latency table); "
                         "set search.cost: macs")


def predictor_path(kind: str, target: float) -> Path:
    """File of the per-target predictor of ``kind`` (``multistage`` or the single-exit ``static`` baseline)."""
    if kind not in ("multistage", "static"):
        raise ValueError(f"predictor kind {kind!r}; allowed: multistage, static")
    return PREDICTORS / f"{kind}-{target:g}.pt"


def search_settings(cfg: config.Config, **evolution: int) -> dict[str, Any]:
    """``search.evolve_and_pick``'s omega, grid, seed and evolution settings from ``cfg`` (``evolution``
    replaces keys of the ``evolution`` section, e.g. ``top_k`` for Table 4 or the Figure 5 sweep)."""
    return {"omega": cfg.search.omega, "grid": cfg.search.grid, "seed": cfg.seed,
            "evolution_settings": {**config.to_dict(cfg.evolution), **evolution}}


def cond_objectives(cfg: config.Config) -> list[tuple[float, float]]:
    """``(omega, target)`` pairs the conditional predictor is trained on: omegas around ``search.omega``,
    targets of ``reports.sweep_targets`` and ``search.targets``."""
    omegas = sorted({cfg.search.omega * f for f in COND_OMEGA_FACTORS})
    targets = sorted(set(cfg.reports.sweep_targets) | set(cfg.search.targets))
    return [(w, t) for w in omegas for t in targets]


# ---------------------------------------------------------------------------------------------- timing


class Timer:
    """Wall seconds of named steps: ``with timer("build"): ...``, then ``timer.seconds["build"]``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


# ---------------------------------------------------------------------------------------------- stage runners


def run_stage(cfg: config.Config, stage: str, micro_batches: int = 1) -> train.TrainResult:
    """Stage ``pretrain`` or ``finetune`` of the pipeline, as its notebook and ``python -m enas4d.cli train``
    both run it (same paths and arguments: either resumes the other's run from its resume checkpoint)."""
    splits_ = splits(cfg)
    calib, val = calib_split(cfg, splits_["train"]), val_split(cfg, splits_["metric"])
    if stage == "pretrain":
        return train.pretrain(new_supernet(cfg), splits_["train"], calib, val, cfg.pretrain,
                              ckpt_dir=resume_dir("supernet"), seed=cfg.seed, out=SUPERNET, micro_batches=micro_batches,
                              curves=CURVES / "pretrain.csv")
    if stage == "finetune":
        return train.finetune(load_supernet(cfg), splits_["train"], calib, val, cfg.finetune,
                              ckpt_dir=resume_dir("finetune"), seed=cfg.seed, out=MULTISTAGE,
                              micro_batches=micro_batches, curves=CURVES / "finetune.csv")
    raise ValueError(f"unknown stage {stage!r}; stages are pretrain, finetune")
