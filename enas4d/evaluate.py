"""Accuracy of subnets and multi-stage nets: BN recalibration, then batched top-1 on a split.

A weight-shared supernet has one set of BN running statistics for all its subnets, and they fit none of
them (every step ran another subnet). OFA therefore re-estimates the statistics of each evaluated subnet
on a fixed subset of training images before measuring it; so does every function here. Recalibration
always works on an *extracted/exported copy*, so the supernet's own statistics are never touched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from enas4d.data import Split, batches
from enas4d.progress import bar
from enas4d.space import MultiStageArch, SubnetArch
from enas4d.supernet import OFAMobileNetV3, resize

EVAL_BATCH = 500


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on CPU: the extracted largest subnet runs 4-7x faster in it (depthwise convs hit a slow
    NCHW path), others no slower (benchmarks/supernet.py); GPUs keep the default."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def split_images(split: Split, batch_size: int = 1000) -> Tensor:
    """All images of ``split`` as one normalized float tensor (e.g. the BN-calibration images)."""
    return torch.cat([x for x, _ in batches(split, batch_size, shuffle=False, seed=0)])


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: Tensor, batch_size: int, *, resolution: int | None = None,
                   fmt: torch.memory_format = torch.contiguous_format) -> nn.Module:
    """Re-estimate every BN layer's running statistics of ``model`` on ``images``; return it in eval mode.

    Statistics are reset and accumulated as a plain average over the batches (``momentum=None``): every
    batch counts the same and no decay rate is involved. The images are split into nearly equal batches
    (a 1-image remainder batch would have no variance). ``resolution`` resizes the images first; ``fmt``
    is the memory format the batches are given in. ``model`` must be an extracted or exported copy: the
    supernet's statistics are shared by all subnets, so recalibrating it in place is refused.
    """
    if any(isinstance(m, OFAMobileNetV3) for m in model.modules()):
        raise ValueError("recalibrate_bn: got the supernet itself; recalibrate supernet.extract(arch) or "
                         "MultiStageNet.export(arch), which own their statistics")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    device = next(model.parameters()).device
    for x in torch.tensor_split(images, max(1, -(-len(images) // batch_size))):
        x = x.to(device, non_blocking=True)
        model((x if resolution is None else resize(x, resolution)).contiguous(memory_format=fmt))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.eval()


def deploy(net: nn.Module, arch: SubnetArch | MultiStageArch, calib_images: Tensor, batch_size: int) -> nn.Module:
    """``arch`` as a standalone network, the one recipe every evaluation uses: exported (multi-stage arch, from
    a ``MultiStageNet`` ``net``) or extracted (static subnet, from ``net`` or its supernet), on ``net``'s device
    in its memory format, BN recalibrated on ``calib_images`` at the arch's resolution, in eval mode."""
    supernet = net if isinstance(net, OFAMobileNetV3) else net.supernet
    device = next(supernet.parameters()).device
    fmt = memory_format(device)
    model = net.export(arch) if isinstance(arch, MultiStageArch) else supernet.extract(arch)
    model = model.to(device, memory_format=fmt)
    return recalibrate_bn(model, calib_images, batch_size, resolution=arch.resolution, fmt=fmt)


def stage_accuracy(run: Callable[[Tensor], list[Tensor]], split: Split, resolution: int, *,
                   batch_size: int = EVAL_BATCH, device: torch.device | str = "cpu",
                   fmt: torch.memory_format = torch.contiguous_format, desc: str = "eval") -> list[float]:
    """Top-1 (fraction) of each output of ``run`` (a list of logits per batch) on ``split`` at ``resolution``."""
    correct: list[int] | None = None
    seen, start = 0, time.perf_counter()
    with torch.inference_mode(), bar(total=len(split), desc=desc, unit="img", leave=False) as pb:
        for x, y in batches(split, batch_size, shuffle=False, seed=0):
            x = resize(x.to(device, non_blocking=True), resolution).contiguous(memory_format=fmt)
            y = y.to(device, non_blocking=True)
            hits = [int((logits.argmax(1) == y).sum()) for logits in run(x)]
            correct = hits if correct is None else [a + b for a, b in zip(correct, hits)]
            seen += len(y)
            pb.update(len(y))
            pb.set_postfix(img_s=f"{seen / (time.perf_counter() - start):.0f}")
    if correct is None:
        raise ValueError(f"split {split.name!r} is empty: nothing to evaluate")
    return [c / seen for c in correct]


def evaluate_subnet(supernet: OFAMobileNetV3, arch: SubnetArch, split: Split, calib_images: Tensor, *,
                    batch_size: int = EVAL_BATCH) -> float:
    """Top-1 (fraction) of static subnet ``arch`` on ``split``: extract, recalibrate BN, evaluate."""
    device = next(supernet.parameters()).device
    net = deploy(supernet, arch, calib_images, batch_size)
    return stage_accuracy(lambda x: [net(x)], split, arch.resolution, batch_size=batch_size, device=device,
                          fmt=memory_format(device))[0]


def evaluate_multistage(msnet: nn.Module, arch: MultiStageArch, split: Split, calib_images: Tensor, *,
                        batch_size: int = EVAL_BATCH) -> list[float]:
    """Per-stage top-1 (fractions) of multi-stage ``arch``: export (own BN per stage), recalibrate, evaluate.

    ``msnet`` is an ``enas4d.multistage.MultiStageNet``; its export's forward returns the logits of all stages.
    """
    device = next(msnet.parameters()).device
    net = deploy(msnet, arch, calib_images, batch_size)
    return stage_accuracy(net, split, arch.resolution, batch_size=batch_size, device=device,
                          fmt=memory_format(device))


def evaluate_subnets(supernet: OFAMobileNetV3, archs: Sequence[SubnetArch], split: Split, calib_images: Tensor, *,
                     batch_size: int = EVAL_BATCH, desc: str = "subnets") -> list[float]:
    """``evaluate_subnet`` for each arch, with one progress bar over the archs."""
    return _over_archs(lambda a: evaluate_subnet(supernet, a, split, calib_images, batch_size=batch_size),
                       archs, desc)


def evaluate_multistages(msnet: nn.Module, archs: Sequence[MultiStageArch], split: Split, calib_images: Tensor, *,
                         batch_size: int = EVAL_BATCH, desc: str = "multi-stage archs") -> list[list[float]]:
    """``evaluate_multistage`` for each arch, with one progress bar over the archs."""
    return _over_archs(lambda a: evaluate_multistage(msnet, a, split, calib_images, batch_size=batch_size),
                       archs, desc)


def _over_archs(fn: Callable, archs: Sequence, desc: str) -> list:
    out, start = [], time.perf_counter()
    with bar(archs, desc=desc, unit="arch") as pb:
        for a in pb:
            out.append(fn(a))
            pb.set_postfix(archs_s=f"{len(out) / (time.perf_counter() - start):.2f}")
    return out
