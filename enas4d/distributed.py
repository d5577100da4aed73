"""Data-parallel training over processes (``torchrun``): the process group and the few collectives it needs.

``torchrun --nproc_per_node=N -m enas4d.cli train ...`` starts N processes (ranks); ``init`` joins them in a
process group (NCCL on GPUs, one GPU per rank; gloo on CPUs). Every rank holds the whole supernet, samples
the *same* arch each step (the sampling generator depends only on (seed, phase, epoch)), trains it on its
own shard of the global batch, and the ranks average their gradients before the optimizer step.

Why a manual gradient average rather than ``DistributedDataParallel``: a step trains a sampled sub-graph of
the supernet (one subnet, several subnets per step, or every stage of a multi-stage arch through
``MultiStageNet``, which calls the supernet's parts directly rather than its ``forward``). DDP would need
``find_unused_parameters`` (a graph walk every step), ``no_sync`` around the extra backward passes, and a
wrapper that every forward goes through. Since all ranks train the same arch, one all-reduce of the flat
gradient vector after the backward passes is exact and simple; parameters outside the subnet keep
``grad = None`` on every rank (zeros would make SGD apply weight decay and momentum to them, unlike a
single-process run). The cost is no overlap of communication with the backward pass: one all-reduce of
the supernet's gradients per step, ~31 MB for the ImageNet supernet (milliseconds on NVLink or PCIe).

With one process (no ``torchrun``) the collectives do nothing, so the training code has one path.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Context:
    """This process's place in the group: ``rank`` of ``world`` processes (0 of 1 without torchrun)."""

    rank: int
    world: int

    @property
    def main(self) -> bool:
        """Rank 0 writes the checkpoints and the outputs."""
        return self.rank == 0


def context() -> Context:
    """The current group, or a single process when no group was initialised."""
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size())
    return Context(0, 1)


def init(device: torch.device) -> None:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); without torchrun, do nothing.

    CUDA ranks talk over NCCL and each makes GPU ``LOCAL_RANK`` its current device (so ``"cuda"`` means
    that GPU from then on); CPU ranks use gloo.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def shutdown() -> None:
    """Leave the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written a file the others read next)."""
    if context().world > 1:
        dist.barrier()


def _coalesced(tensors: Iterable[Tensor], collective: Callable[[Tensor], None]) -> None:
    """Run ``collective`` in place on one flat copy of ``tensors`` per dtype and copy the result back.

    One call instead of hundreds, and independent of memory layout (channels_last weights are not
    contiguous, which collectives require).
    """
    groups: dict[torch.dtype, list[Tensor]] = defaultdict(list)
    for t in tensors:
        groups[t.dtype].append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        collective(flat)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view(t.shape))
            offset += t.numel()


@torch.no_grad()
def broadcast_module(*modules: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (the starting point must be the same everywhere)."""
    if context().world == 1:
        return
    _coalesced((t for m in modules for t in (*m.parameters(), *m.buffers())), lambda flat: dist.broadcast(flat, 0))


@torch.no_grad()
def average_buffers(*modules: nn.Module) -> None:
    """Average floating-point buffers (BN running statistics) over the ranks.

    Each rank's BN layers normalise with its own shard's batch statistics and update their running
    estimates from it; averaging once per epoch gives every rank the same state (so a checkpoint written
    by rank 0 describes all of them) and estimates that saw every shard.
    """
    world = context().world
    if world == 1:
        return

    def mean(flat: Tensor) -> None:
        dist.all_reduce(flat)
        flat.div_(world)

    _coalesced((b for m in modules for b in m.buffers() if b.is_floating_point()), mean)


@torch.no_grad()
def average_gradients(params: Sequence[nn.Parameter], failed: bool) -> bool:
    """Average ``params``' gradients over the ranks in one all-reduce; True if any rank reports ``failed``.

    A rank that ``failed`` (a non-finite loss) still joins the all-reduce, so the others learn of it
    instead of waiting forever. A parameter's gradient must exist on every rank or on none (all ranks
    trained the same arch); otherwise the ranks have diverged and this raises RuntimeError.
    """
    world = context().world
    if world == 1:
        return failed
    sizes = [p.numel() for p in params]
    total = sum(sizes)
    # [gradients (zeros where a rank has none) | per-parameter "has a gradient" flags | failed flag]
    flat = torch.zeros(total + len(params) + 1, dtype=torch.float32, device=params[0].device)
    offset = 0
    for i, (p, n) in enumerate(zip(params, sizes)):
        if p.grad is not None:
            flat[offset:offset + n].copy_(p.grad.reshape(-1))
            flat[total + i] = 1
        offset += n
    flat[-1] = float(failed)
    dist.all_reduce(flat)
    if flat[-1].item() > 0:
        return True
    counts = flat[total:total + len(params)]
    if bool(((counts != 0) & (counts != world)).any()):
        raise RuntimeError("ranks trained different subnets in the same step: their arch sampling diverged "
                           "(every rank must use the same seed and code)")
    flat[:total].div_(world)
    offset = 0
    for p, n, c in zip(params, sizes, counts.tolist()):
        if c:
            p.grad.copy_(flat[offset:offset + n].view(p.shape))
        offset += n
    return False


def mean_values(values: dict[str, float]) -> dict[str, float]:
    """The mean over ranks of each value (every rank passes the same keys)."""
    world = context().world
    if world == 1:
        return dict(values)
    keys = sorted(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / world).tolist()))


def map_ranks(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(x) for x in items]`` with the items dealt out round-robin over the ranks; every rank gets all."""
    ctx = context()
    mine = [fn(x) for x in items[ctx.rank::ctx.world]]
    if ctx.world == 1:
        return mine
    gathered: list[Any] = [None] * ctx.world
    dist.all_gather_object(gathered, mine)
    return [gathered[i % ctx.world][i // ctx.world] for i in range(len(items))]
