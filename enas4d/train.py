"""Training: OFA progressive shrinking of the supernet, multi-stage fine-tuning, distillation, resume.

Pretraining (``pretrain``) follows OFA's progressive shrinking: phase ``full`` trains the largest subnet
alone and becomes the teacher; then ``kernel`` (kernel sizes open), ``depth`` (+ depths) and ``expand``
(+ widths; hidden channels are sorted by importance first) each sample one subnet per step from the
phase's sub-space and distil from a frozen copy of the teacher. One departure from OFA (docs/DESIGN.md):
the input resolution opens with the kernel phase, and the teacher always sees the largest resolution.
On 28x28 Fashion-MNIST a teacher trained at random resolutions down to 16 reached 80% validation top-1
after two epochs where one trained at 28 alone reached 86%, and its soft labels are only as good as that.
Fine-tuning (``finetune``) is the paper's step: every step samples a multi-stage arch and sums each
stage's loss, each with KD towards the pretrained supernet's largest subnet (at the largest resolution).

Resume is exact: every per-batch random choice (shuffle, augmentation, arch sampling) is derived from
``(seed, phase, epoch)``, the global RNG states are saved with the weights, optimizer and scheduler
after every epoch, and a checkpoint is only written after a whole epoch finished with finite losses.

Scaling up: launched by ``torchrun`` (see ``enas4d.distributed`` and ``enas4d.cli``) every rank trains the same
sampled arch on its shard of each batch and the ranks average gradients; ``micro_batches`` splits each
(per-rank) batch into parts whose gradients add up, which is the same arithmetic as that many more ranks
(BN normalises within a part) in less memory. ``precision`` runs forward passes under ``torch.autocast``
(bf16, or fp16 with loss scaling); weights and optimizer state stay fp32.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import hashlib
import json
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from enas4d import config, distributed
from enas4d.data import Split, batches
from enas4d.evaluate import evaluate_multistage, evaluate_subnet, split_images
from enas4d.files import atomic_write
from enas4d.multistage import MultiStageNet
from enas4d.progress import bar
from enas4d.space import MultiStageArch, SearchSpace, SubnetArch
from enas4d.supernet import OFAMobileNetV3, SupernetSpec, UnitSpec, resize

PHASES = ("full", "kernel", "depth", "expand")
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SUPERNET_FORMAT = "enas4d-supernet/1"
TRAIN_FORMAT = "enas4d-train/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message is one line naming the file."""


@dataclass
class TrainResult:
    """Per-epoch metrics of the whole run (resumed epochs included) and whether it ran to the end."""

    history: list[dict[str, Any]]
    complete: bool


# ---------------------------------------------------------------------------------------------- seeding


def seed_everything(seed: int) -> None:
    """Seed python, numpy's global RNG and torch (all devices), for code that uses the global RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The global RNG states as tensors and plain values, so ``torch.load(weights_only=True)`` reads them."""
    _, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device only: a rank owns one GPU
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------- files


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """``torch.save`` of ``state`` (tensors, dicts, lists, plain values), written atomically."""
    atomic_write(path, lambda f: torch.save(dict(state), f))


def load_error(err: Exception) -> str:
    """torch.load's error in a few words: its first sentence, except that the advice to retry with
    ``weights_only=False`` (running a file's pickled code) is never right for a file this project reads."""
    first = str(err).strip().split("\n")[0].split(". ")[0].strip()
    if not first or "weights_only" in first or "Weights only" in first:
        return f"{type(err).__name__}: not a file of plain tensors and values"
    return f"{type(err).__name__}: {first}"


def load_checkpoint(path: str | os.PathLike, required: Sequence[str] = ()) -> dict[str, Any]:
    """A checkpoint dict read with ``weights_only=True``; CheckpointError naming the file if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types (zip, pickle, EOF, runtime): all mean "corrupt"
        raise CheckpointError(f"{path}: corrupt or not a torch checkpoint ({load_error(err)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise CheckpointError(f"{path}: not an enas4d checkpoint of this kind (missing key {missing[0]!r})")
    return obj


def load_weights(module: nn.Module, state: Mapping[str, Tensor], where: str) -> None:
    """``module.load_state_dict(state)`` with a one-line CheckpointError naming ``where`` and the first bad key."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        key, what = (missing[0], "missing") if missing else (extra[0], "unexpected")
        more = len(missing) + len(extra) - 1
        suffix = f" (+{more} more)" if more else ""
        raise CheckpointError(f"{where}: does not fit the model: {what} key {key!r}{suffix}")
    for k, v in own.items():
        if not isinstance(state[k], Tensor) or state[k].shape != v.shape:
            got = tuple(state[k].shape) if isinstance(state[k], Tensor) else type(state[k]).__name__
            raise CheckpointError(f"{where}: does not fit the model: {k!r} has shape {got}, model has {tuple(v.shape)}")
    module.load_state_dict(state)


def history_to_csv(history: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Per-epoch metrics as a CSV (columns: union of keys, first-seen order) for ``dvc plots``."""
    columns: dict[str, None] = {}
    for row in history:
        columns.update(dict.fromkeys(row))

    def write(f: Any) -> None:
        w = csv.DictWriter(f, fieldnames=list(columns), restval="")
        w.writeheader()
        w.writerows(history)

    atomic_write(path, write, "w")


def progress_line(what: str, row: Mapping[str, Any]) -> str:
    """One line per epoch: loss, every validation top-1, seconds; printed to the cell output (kept in the
    executed notebook) and, inside a notebook kernel, to the kernel's own stderr as well: papermill keeps
    cell output out of the terminal, and the kernel's stderr is the terminal of `dvc repro`."""
    vals = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("val_top1"))
    line = f"{what}: loss {row.get('loss', float('nan')):.4f}" + (f", {vals}" if vals else "") + \
        f", {row.get('seconds', float('nan')):.0f} s"
    print(line, flush=True)  # a line per epoch, even with ENAS4D_QUIET=1 (which silences the bars)
    if sys.__stderr__ is not None and sys.stderr is not sys.__stderr__:
        print(line, file=sys.__stderr__, flush=True)
    return line


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state (names and bytes): resuming is only right from the same starting weights."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _spec_dict(spec: SupernetSpec) -> dict[str, Any]:
    return dataclasses.asdict(spec)


def _space_dict(space: SearchSpace) -> dict[str, Any]:
    return {f.name: list(v) if isinstance(v := getattr(space, f.name), tuple) else v
            for f in dataclasses.fields(space)}


def save_supernet(path: str | os.PathLike, supernet: OFAMobileNetV3, history: Sequence[Mapping[str, Any]] = (),
                  space: SearchSpace | None = None) -> None:
    """The supernet (spec, search space, weights) and its training history, in one self-describing file."""
    save_checkpoint(path, {"format": SUPERNET_FORMAT, "spec": _spec_dict(supernet.spec),
                           "space": _space_dict(space or supernet.space), "model": supernet.state_dict(),
                           "history": list(history)})


def load_supernet(path: str | os.PathLike, device: torch.device | str = "cpu") -> OFAMobileNetV3:
    """Rebuild the supernet written by ``save_supernet`` (``pretrain``'s and ``finetune``'s final files)."""
    ck = load_checkpoint(path, ("format", "spec", "space", "model"))
    if ck["format"] != SUPERNET_FORMAT:
        raise CheckpointError(f"{path}: format {ck['format']!r}, expected {SUPERNET_FORMAT!r}")
    try:
        s = ck["spec"]
        spec = SupernetSpec(**{**s, "units": tuple(UnitSpec(**u) for u in s["units"])})
        space = SearchSpace(**{k: tuple(v) if isinstance(v, list) else v for k, v in ck["space"].items()})
        net = OFAMobileNetV3(spec, space)
        if any(k.startswith("stage_heads.") for k in ck["model"]):  # fine-tuned: a prediction layer per stage
            net.add_stage_heads(space.stages)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: bad supernet spec or search space ({err})") from None
    load_weights(net, ck["model"], str(path))
    return net.to(device)


# ---------------------------------------------------------------------------------------------- losses


def soft_cross_entropy(logits: Tensor, soft_targets: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy against a distribution (OFA's KD loss: the teacher's softmax as the target)."""
    per_sample = -(soft_targets * F.log_softmax(logits, 1)).sum(1)
    return per_sample.mean() if reduction == "mean" else per_sample


def stage_weights(outs: Sequence[Tensor], y: Tensor, hard_weight: float) -> list[Tensor]:
    """Per-sample loss weights of each stage: 1 for stage 1; for a later stage a mix, by ``hard_weight``,
    of 1 and the previous stage's miss ``1 - p(y)`` (no gradient) scaled to mean 1 over the batch.

    Early exit sends a later stage only the images its predecessor was unsure of; with ``hard_weight``
    > 0 fine-tuning spends the later stages' capacity on those (0: the paper's plain sum of stage losses)."""
    ones = torch.ones_like(y, dtype=outs[0].dtype)
    weights = [ones]
    for prev in outs[:-1]:
        miss = 1 - torch.softmax(prev.detach().float(), 1).gather(1, y[:, None])[:, 0]
        weights.append((1 - hard_weight) * ones + hard_weight * miss / miss.mean().clamp_min(1e-6))
    return weights


def _sgd(model: nn.Module, lr: float, momentum: float, nesterov: bool, weight_decay: float) -> torch.optim.SGD:
    """SGD with weight decay on conv/linear weights only (OFA: none on BN and biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)


def _frozen_copy(model: OFAMobileNetV3) -> OFAMobileNetV3:
    """The teacher: a copy without gradients. It runs in train mode (batch statistics), as OFA's teacher:
    the supernet's shared running statistics fit no single subnet, so eval mode would be off."""
    return copy.deepcopy(model).requires_grad_(False).train()


# ---------------------------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class _Phase:
    name: str
    epochs: int
    teacher: bool  # distil from the frozen teacher in this phase
    lr: float | None = None  # this phase's peak learning rate; None: the run's ``lr``


@dataclass(frozen=True)
class _Task:
    """What one kind of training does per step.

    ``sample(phase, rng)`` draws the step's archs (one draw per step, not per batch part, and the same on
    every rank: ``rng`` depends only on (seed, phase, epoch)); ``loss(phase, arch, x, y, soft)`` is one
    arch's loss and statistics on one batch part, ``soft`` the teacher's softmax on that part (None in a
    phase without a teacher). The teacher runs ``teacher_arch`` once per batch part, at that arch's
    resolution, whatever the number of archs trained on it. Each arch's gradients are accumulated (OFA
    sums the gradients of the subnets sampled in one step).
    """

    sample: Callable[[int, np.random.Generator], Sequence[Any]]
    loss: Callable[[int, Any, Tensor, Tensor, Tensor | None], tuple[Tensor, dict[str, float]]]
    teacher_arch: SubnetArch


@dataclass(frozen=True)
class _Execution:
    """How the steps run (not what they compute): batch parts and autocast precision."""

    micro_batches: int
    precision: str


def _epoch_seeds(seed: int, phase: int, epoch: int) -> tuple[np.random.Generator, int]:
    """Arch-sampling generator and data seed of one epoch: functions of (seed, phase, epoch) only."""
    return np.random.default_rng([seed, phase, epoch]), int(np.random.SeedSequence([seed, phase]).generate_state(1)[0])


def _resume_state(last: Path, kind: str, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint to resume from, or None when there is none or it belongs to a run with other settings."""
    if not last.exists():
        return None
    try:
        ck = load_checkpoint(last, ("format", "kind", "fingerprint", "phase", "epoch", "step", "model", "optimizer",
                                    "scheduler", "teacher", "rng", "history"))
    except CheckpointError as err:  # e.g. a disk that filled up: not worth a dead end, the epochs are redone
        if distributed.context().main:
            aside = last.with_name(last.name + ".corrupt")
            os.replace(last, aside)
            warnings.warn(f"{err}; set aside as {aside}, training starts over", stacklevel=4)
        return None
    if ck["format"] != TRAIN_FORMAT or ck["kind"] != kind:
        raise CheckpointError(f"{last}: holds a {ck['kind']!r} run ({ck['format']}); use another ckpt_dir for {kind!r}")
    old = json.loads(json.dumps(ck["fingerprint"]))
    new = json.loads(json.dumps(fingerprint))
    if old != new:
        key = next(k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
        if distributed.context().main:
            warnings.warn(f"{last}: written with other settings ({key}: {old.get(key)!r} -> {new.get(key)!r}); "
                          "starting over", stacklevel=4)
        return None
    return ck


def _train_epoch(task: _Task, pi: int, epoch: int, desc: str, model: nn.Module, opt: torch.optim.Optimizer,
                 sched: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                 teacher: OFAMobileNetV3 | None, train_split: Split, batch_size: int, steps: int, seed: int,
                 augment: bool, last: Path, run: _Execution) -> dict[str, float]:
    """One epoch of ``steps`` full batches; returns the mean of every per-step statistic and the timings.

    Each rank takes its ``1 / world`` share of every batch, split further into ``run.micro_batches`` strided
    parts: part ``j`` of rank ``r`` holds the batch positions ``r + world * (j + micro_batches * t)``, so a
    run's arithmetic depends only on ``world * micro_batches``, not on how it is split into processes.
    """
    ctx = distributed.context()
    rng, data_seed = _epoch_seeds(seed, pi, epoch)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    dtype, parts = PRECISIONS[run.precision], run.micro_batches
    start, cpu_start = time.perf_counter(), time.process_time()
    model.train()
    sums: dict[str, float] = {}
    data = batches(train_split, batch_size // ctx.world, shuffle=True, seed=data_seed, epoch=epoch, augment=augment,
                   rank=ctx.rank, world=ctx.world)
    with bar(total=steps, desc=desc, unit="step", disable=not ctx.main) as pb:
        for i, (x, y) in zip(range(steps), data):
            opt.zero_grad(set_to_none=True)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            archs = task.sample(pi, rng)
            stats: dict[str, float] = {}
            error = None
            for j in range(parts):
                xj, yj, soft = x[j::parts], y[j::parts], None
                if teacher is not None:
                    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                        t = task.teacher_arch
                        soft = F.softmax(teacher(resize(xj, t.resolution), t), 1)
                for arch in archs:
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                        loss, part_stats = task.loss(pi, arch, xj, yj, soft)
                    if not torch.isfinite(loss):
                        error = f"loss is {loss.item()}" + (f" on rank {ctx.rank}" if ctx.world > 1 else "")
                        break
                    scaler.scale(loss / parts).backward()
                    for k, v in part_stats.items():
                        stats[k] = stats.get(k, 0.0) + v / (parts * len(archs))
                if error is not None:
                    break
            if distributed.average_gradients(params, error is not None) and error is None:
                error = "a non-finite loss on another rank"
            if error is not None:
                kept = f"{last} holds the last finished epoch" if last.exists() else "no checkpoint was written"
                raise FloatingPointError(f"{desc}, step {i + 1}/{steps}: {error}; training stopped ({kept})")
            scaler.step(opt)  # fp16: skipped when the scaled gradients overflowed (the scale then shrinks)
            scaler.update()
            with warnings.catch_warnings():  # ... which torch reports as a scheduler stepped before its optimizer
                warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`", UserWarning)
                sched.step()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            pb.update()
            img_s = (i + 1) * batch_size / (time.perf_counter() - start)
            pb.set_postfix(loss=f"{stats['loss']:.3f}", img_s=f"{img_s:.0f}")
    means = distributed.mean_values({k: v / steps for k, v in sums.items()})
    return {"lr": sched.get_last_lr()[0], **means,
            "train_seconds": time.perf_counter() - start, "train_cpu_seconds": time.process_time() - cpu_start}


def _run(kind: str, model: OFAMobileNetV3, phases: Sequence[_Phase], task: _Task,
         evaluate: Callable[[int], dict[str, float]], on_phase_start: Callable[[int], None], train_split: Split, *,
         batch_size: int, seed: int, augment: bool, optim: dict[str, Any], ckpt_dir: str | os.PathLike,
         fingerprint: dict[str, Any], stop_after: int | None, run: _Execution,
         curves: str | os.PathLike | None = None) -> TrainResult:
    """Train ``phases`` in order with per-epoch checkpoints in ``ckpt_dir/last.pt``, resuming from it.

    After every epoch one line of its numbers reaches the terminal (``progress_line``) and, with ``curves``,
    the history so far is rewritten there as CSV, so a long stage shows its curves while it runs.

    ``on_phase_start(i)`` runs when phase ``i`` starts afresh (not when resumed in its middle);
    ``evaluate(i)`` adds validation metrics to each epoch's history row. Under torchrun every rank runs
    this (all reading ``last.pt``: ``ckpt_dir`` must be on a filesystem every rank sees) and rank 0 writes.
    """
    ctx = distributed.context()
    steps = len(train_split) // batch_size  # full batches only: a tiny last batch would skew BN statistics
    if steps == 0:
        raise ValueError(f"{kind}: {len(train_split)} training images do not fill one batch of {batch_size}")
    last = Path(ckpt_dir) / "last.pt"
    ck = _resume_state(last, kind, fingerprint)
    history: list[dict[str, Any]] = list(ck["history"]) if ck else []
    teacher = None
    start_phase, start_epoch, global_step = 0, 0, 0
    if ck:
        load_weights(model, ck["model"], str(last))
        if ck["teacher"] is not None:
            teacher = _frozen_copy(model)
            load_weights(teacher, ck["teacher"], f"{last} (teacher)")
        start_phase = [p.name for p in phases].index(ck["phase"])
        start_epoch, global_step = ck["epoch"], ck["step"]
        set_rng_state(ck["rng"])
    device_type = next(model.parameters()).device.type
    trained = 0
    for pi, ph in enumerate(phases):
        first = start_epoch if pi == start_phase else 0
        if pi < start_phase or first >= ph.epochs:
            continue
        resumed = ck is not None and pi == start_phase and first > 0
        if not resumed:
            on_phase_start(pi)
        if ph.teacher and teacher is None:
            teacher = _frozen_copy(model)
        opt = _sgd(model, **{**optim, **({} if ph.lr is None else {"lr": ph.lr})})
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, ph.epochs * steps)
        scaler = torch.amp.GradScaler(device_type, enabled=run.precision == "fp16")
        if resumed:
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            if ck.get("scaler"):
                scaler.load_state_dict(ck["scaler"])
        for epoch in range(first, ph.epochs):
            start = time.perf_counter()
            metrics = _train_epoch(task, pi, epoch, f"{kind} {ph.name} {epoch + 1}/{ph.epochs}", model, opt, sched,
                                   scaler, teacher if ph.teacher else None, train_split, batch_size, steps, seed,
                                   augment, last, run)
            distributed.average_buffers(*([model] if teacher is None else [model, teacher]))
            global_step += steps
            history.append({"phase": ph.name, "epoch": epoch + 1, "global_epoch": len(history) + 1,
                            "step": global_step, **metrics, **evaluate(pi), "seconds": time.perf_counter() - start})
            if ctx.main:
                what = kind if ph.name == kind else f"{kind} {ph.name}"
                progress_line(f"{what} epoch {epoch + 1}/{ph.epochs}", history[-1])
                if curves is not None:
                    history_to_csv(history, curves)
                save_checkpoint(last, {
                    "format": TRAIN_FORMAT, "kind": kind, "fingerprint": fingerprint, "phase": ph.name,
                    "epoch": epoch + 1, "step": global_step, "model": model.state_dict(),
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                    "teacher": None if teacher is None else teacher.state_dict(), "rng": rng_state(),
                    "history": history})
            trained += 1
            finished = epoch + 1 == ph.epochs and all(p.epochs == 0 for p in phases[pi + 1:])
            if stop_after is not None and trained >= stop_after and not finished:
                return TrainResult(history, complete=False)
    return TrainResult(history, complete=True)


def _execution(batch_size: int, micro_batches: int, precision: str) -> _Execution:
    """One-line errors for what config.py cannot check (it validates the settings themselves): the batch
    must split into the ranks of this run times ``micro_batches`` parts."""
    if not (isinstance(micro_batches, int) and micro_batches >= 1):
        raise ValueError(f"micro_batches must be an integer >= 1, got {micro_batches!r}")
    world = distributed.context().world
    if batch_size % (world * micro_batches):
        raise ValueError(f"batch_size {batch_size} does not split into {world} rank(s) x {micro_batches} "
                         "micro-batch(es) of equal size")
    return _Execution(micro_batches, precision)


# ---------------------------------------------------------------------------------------------- pretraining


def phase_space(space: SearchSpace, phase: str) -> SearchSpace:
    """The sub-space a progressive-shrinking phase samples from (resolution opens with the kernels)."""
    top = {"resolutions": (max(space.resolutions),), "kernels": (max(space.kernels),),
           "depths": (max(space.depths),), "expands": (max(space.expands),)}
    opened = {"full": (), "kernel": ("resolutions", "kernels"), "depth": ("resolutions", "kernels", "depths"),
              "expand": ("resolutions", "kernels", "depths", "expands")}
    if phase not in opened:
        raise ValueError(f"unknown phase {phase!r}; phases are {', '.join(PHASES)}")
    return space.restrict(**{k: v for k, v in top.items() if k not in opened[phase]})


def pretrain(supernet: OFAMobileNetV3, train_split: Split, calib_split: Split, val_split: Split | None,
             settings: config.PretrainConfig, *, ckpt_dir: str | os.PathLike, seed: int, micro_batches: int = 1,
             out: str | os.PathLike | None = None, stop_after: int | None = None,
             curves: str | os.PathLike | None = None) -> TrainResult:
    """OFA progressive shrinking of ``supernet`` (in place, on its device); writes ``out`` when complete.

    Loss per sampled subnet: label-smoothed CE + ``kd_ratio`` x KD towards the teacher (the largest
    subnet as it was after phase ``full``, frozen, on the same images at the largest resolution). SGD,
    cosine schedule per phase, stepped per batch, from ``lr`` in phase ``full`` and from ``lr_shrink``
    in the shrinking phases: OFA shrinks at a far lower rate than it trains the teacher,
    and at the teacher's rate the first shrinking epoch undoes much of what the teacher learned. With
    ``sandwich`` every shrinking step also trains the largest subnet besides the ``subnets_per_step``
    random ones (BigNAS's sandwich rule, its largest half): it keeps the teacher's accuracy, which the
    few random draws of a short run otherwise erode. After each epoch the largest and smallest subnets of
    the phase are evaluated on ``val_split`` (BN recalibrated on ``calib_split``; skipped when
    ``val_split`` is None) and a checkpoint is written; ``stop_after`` epochs end the call early (a
    simulated kill: call again to resume). ``out`` defaults to ``ckpt_dir/supernet.pt``. ``batch_size``
    is the global batch (all ranks together); ``precision`` and ``micro_batches``: see the module docstring.
    """
    s = settings  # the pretrain section of params.yaml, validated by config.py
    epochs_full, epochs_kernel = s.epochs_full, s.epochs_kernel
    epochs_depth, epochs_expand = s.epochs_depth, s.epochs_expand
    batch_size, lr, lr_shrink, momentum, nesterov = s.batch_size, s.lr, s.lr_shrink, s.momentum, s.nesterov
    weight_decay, label_smoothing, kd_ratio = s.weight_decay, s.label_smoothing, s.kd_ratio
    subnets_per_step, sandwich, augment, precision = s.subnets_per_step, s.sandwich, s.augment, s.precision
    run = _execution(batch_size, micro_batches, precision)
    distributed.broadcast_module(supernet)
    space = supernet.space
    epochs = dict(zip(PHASES, (epochs_full, epochs_kernel, epochs_depth, epochs_expand)))
    phases = [_Phase(p, epochs[p], p != "full" and kd_ratio > 0, None if p == "full" else lr_shrink)
              for p in PHASES]
    spaces = [phase_space(space, p) for p in PHASES]
    biggest = space.largest()
    calib = functools.cache(lambda: split_images(calib_split))  # read only if something is evaluated

    def sample(pi: int, rng: np.random.Generator) -> list[SubnetArch]:
        drawn = [spaces[pi].sample_subnet(rng) for _ in range(subnets_per_step)]
        return [spaces[pi].largest(), *drawn] if sandwich and PHASES[pi] != "full" else drawn

    def loss(pi: int, arch: SubnetArch, x: Tensor, y: Tensor, soft: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        logits = supernet(resize(x, arch.resolution), arch)
        ce = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        total, stats = ce, {}
        if soft is not None:
            kd = soft_cross_entropy(logits, soft)
            total = ce + kd_ratio * kd
            stats["kd"] = kd.item()
        return total, {"loss": total.item(), "ce": ce.item(), **stats,
                       "train_top1": (logits.argmax(1) == y).float().mean().item()}

    def on_phase_start(pi: int) -> None:
        if PHASES[pi] == "expand":
            supernet.sort_channels()  # OFA: the widest channels by importance, before widths go elastic

    def evaluate(pi: int) -> dict[str, float]:
        if val_split is None:
            return {}
        s = spaces[pi]
        largest, smallest = distributed.map_ranks(lambda a: evaluate_subnet(supernet, a, val_split, calib()),
                                                  [s.largest(), s.smallest()])
        return {"val_top1_largest": largest, "val_top1_smallest": smallest}

    fingerprint = {"kind": "pretrain", "seed": seed, "epochs": list(epochs.values()), "batch_size": batch_size,
                   "lr": lr, "lr_shrink": lr_shrink, "momentum": momentum, "nesterov": nesterov,
                   "weight_decay": weight_decay, "label_smoothing": label_smoothing, "kd_ratio": kd_ratio,
                   "subnets_per_step": subnets_per_step, "sandwich": sandwich,
                   "augment": augment, "precision": precision, "train_images": len(train_split),
                   "space": _space_dict(space), "spec": _spec_dict(supernet.spec),
                   "initial_weights": weights_digest(supernet)}
    result = _run("pretrain", supernet, phases, _Task(sample, loss, biggest), evaluate, on_phase_start,
                  train_split, batch_size=batch_size, seed=seed, augment=augment,
                  optim=dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay),
                  ckpt_dir=ckpt_dir, fingerprint=fingerprint, stop_after=stop_after, run=run, curves=curves)
    if result.complete and distributed.context().main:
        save_supernet(out or Path(ckpt_dir) / "supernet.pt", supernet, result.history)
    return result


# ---------------------------------------------------------------------------------------------- fine-tuning


def curve_archs(space: SearchSpace, n: int, seed: int) -> list[MultiStageArch]:
    """``n`` fixed random multi-stage archs (a function of ``seed``) whose per-stage accuracy is tracked."""
    rng = np.random.default_rng([seed, 0x5EED])
    return [space.sample(rng) for _ in range(n)]


def finetune(supernet: OFAMobileNetV3, train_split: Split, calib_split: Split, val_split: Split | None,
             settings: config.FinetuneConfig, *, ckpt_dir: str | os.PathLike, seed: int, micro_batches: int = 1,
             label_smoothing: float = 0.1, out: str | os.PathLike | None = None,
             stop_after: int | None = None, curves: str | os.PathLike | None = None) -> TrainResult:
    """The paper's fine-tuning for dynamic inference, in place; writes ``out`` when complete.

    Stages 2..``stages`` first get their own prediction layers, copies of the supernet's head
    (``add_stage_heads``); each then learns from its own stage's loss only. Each step samples a multi-stage
    arch of ``stages`` stages uniformly, runs ``MultiStageNet`` (all stages) and minimizes sum_s [CE_s + ``kd_ratio`` x KD_s], every stage distilling from the frozen
    pretrained supernet's largest subnet at the largest resolution. SGD, per-batch cosine schedule, one
    checkpoint per epoch in ``ckpt_dir/last.pt`` (resumable like ``pretrain``). After each epoch the
    per-stage top-1 on ``val_split`` of ``eval_archs`` fixed random archs (``curve_archs``) is averaged
    into ``val_top1_s{k}``. ``out`` (default ``ckpt_dir/multistage.pt``) is a ``save_supernet`` file
    whose search space has ``stages`` stages. ``batch_size``, ``precision``, ``micro_batches``: as ``pretrain``.
    """
    s = settings  # the finetune section of params.yaml, validated by config.py
    stages, epochs, batch_size, lr, momentum = s.stages, s.epochs, s.batch_size, s.lr, s.momentum
    nesterov, weight_decay, kd_ratio, augment = s.nesterov, s.weight_decay, s.kd_ratio, s.augment
    eval_archs, precision, hard_weight = s.eval_archs, s.precision, s.hard_weight
    run = _execution(batch_size, micro_batches, precision)
    supernet.add_stage_heads(stages)
    distributed.broadcast_module(supernet)
    space = supernet.space.restrict(stages=stages)
    msnet = MultiStageNet(supernet)
    biggest = space.largest()
    calib = functools.cache(lambda: split_images(calib_split))
    tracked = curve_archs(space, eval_archs, seed) if val_split is not None else []

    def sample(pi: int, rng: np.random.Generator) -> list[MultiStageArch]:
        return [space.sample(rng)]

    def loss(pi: int, arch: MultiStageArch, x: Tensor, y: Tensor,
             soft: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        outs = msnet(resize(x, arch.resolution), arch)
        weights = stage_weights(outs, y, hard_weight)
        ce = sum((w * F.cross_entropy(o, y, label_smoothing=label_smoothing, reduction="none")).mean()
                 for w, o in zip(weights, outs))
        total, stats = ce, {}
        if soft is not None:
            kd = sum((w * soft_cross_entropy(o, soft, reduction="none")).mean() for w, o in zip(weights, outs))
            total = ce + kd_ratio * kd
            stats["kd"] = kd.item()
        stats |= {"loss": total.item(), "ce": ce.item()}
        for s, o in enumerate(outs):
            stats[f"train_top1_s{s + 1}"] = (o.argmax(1) == y).float().mean().item()
        return total, stats

    def evaluate(pi: int) -> dict[str, float]:
        if not tracked:
            return {}
        accs = np.mean(distributed.map_ranks(lambda a: evaluate_multistage(msnet, a, val_split, calib()), tracked),
                       axis=0)
        return {f"val_top1_s{s + 1}": float(v) for s, v in enumerate(accs)}

    fingerprint = {"kind": "finetune", "seed": seed, "stages": stages, "epochs": epochs, "batch_size": batch_size,
                   "hard_weight": hard_weight,
                   "lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay,
                   "kd_ratio": kd_ratio, "label_smoothing": label_smoothing, "augment": augment,
                   "precision": precision, "train_images": len(train_split), "space": _space_dict(space),
                   "spec": _spec_dict(supernet.spec), "initial_weights": weights_digest(supernet)}
    result = _run("finetune", supernet, [_Phase("finetune", epochs, kd_ratio > 0)], _Task(sample, loss, biggest),
                  evaluate, lambda pi: None, train_split, batch_size=batch_size, seed=seed, augment=augment,
                  optim=dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay),
                  ckpt_dir=ckpt_dir, fingerprint=fingerprint, stop_after=stop_after, run=run, curves=curves)
    if result.complete and distributed.context().main:
        save_supernet(out or Path(ckpt_dir) / "multistage.pt", supernet, result.history, space)
    return result
