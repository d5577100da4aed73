"""Analytic MACs of supernet subnets (multiply-accumulates of convolutions and linear layers).

Counts match ``torch.utils.flop_counter.FlopCounterMode`` on the extracted network (its flops / 2):
BN, activations, pooling, SE gating products and residual adds are not counted, biases are free.
Every conv uses padding ``k // 2``, so a layer's output side is ``ceil(side / stride)`` whatever its kernel.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .ops import make_divisible
from .plan import Plan, restart_slots
from .space import MultiStageArch, SubnetArch
from .supernet import BlockSpec, SupernetSpec

# ---------------------------------------------------------------------------------------------- per-layer MACs
# Shared building blocks: a multi-stage block is priced from the same pieces on its channel slices.


def out_side(side: int, stride: int) -> int:
    """Output side of a 'same'-padded conv (odd kernel, padding k // 2)."""
    return (side - 1) // stride + 1


def slot_sides(spec: SupernetSpec, resolution: int, max_depth: int) -> tuple[int, ...]:
    """Input side of every block slot, then the side the head sees (skipped slots never change sizes,
    because only the first block of a unit, which always runs, has a stride)."""
    side = out_side(resolution, 2)  # stem; the first block has stride 1
    sides = []
    for b in spec.block_specs(max_depth):
        sides.append(side)
        side = out_side(side, b.stride)
    return (*sides, side)


def stem_macs(spec: SupernetSpec, resolution: int) -> int:
    """Stem 3x3 s2 conv and the static first block (depthwise 3x3, pointwise)."""
    s = out_side(resolution, 2)
    return s * s * (spec.in_channels * spec.stem * 9 + spec.stem * 9 + spec.stem * spec.first_block)


def head_macs(spec: SupernetSpec, side: int) -> int:
    """final_expand 1x1 conv on a ``side``² map, then feature_mix and classifier linears."""
    return (side * side * spec.units[-1].width * spec.final_expand + spec.final_expand * spec.feature_mix
            + spec.feature_mix * spec.num_classes)


def block_macs(b: BlockSpec, side: int, kernel: int, ch: slice) -> int:
    """One block computing hidden channels ``ch`` from a ``side``² input: expand rows ``ch``, depthwise,
    SE gate of ``ch`` in the input-reuse form (reduce reads ``[0, ch.stop)``), project columns ``ch``.

    With ``ch = slice(0, mid)`` this is the whole static block.
    """
    n = ch.stop - ch.start
    o = out_side(side, b.stride)
    macs = side * side * b.in_channels * n + o * o * n * (kernel * kernel + b.out_channels)
    if b.se:
        m = make_divisible(ch.stop // 4, 8)
        macs += m * ch.stop + n * m
    return macs


# ---------------------------------------------------------------------------------------------- static subnets


class _Table:
    """Per (spec, resolution, max_depth): fixed MACs and a lazily filled (kernel, expand) -> MACs per slot."""

    def __init__(self, spec: SupernetSpec, resolution: int, max_depth: int) -> None:
        sides = slot_sides(spec, resolution, max_depth)
        self.blocks = spec.block_specs(max_depth)
        self.sides = sides[:-1]
        self.fixed = stem_macs(spec, resolution) + head_macs(spec, sides[-1])
        self.slots: list[dict[tuple[int, int], int]] = [{} for _ in self.blocks]

    def block(self, i: int, kernel: int, expand: int) -> int:
        cache = self.slots[i]
        key = (kernel, expand)
        if key not in cache:
            b = self.blocks[i]
            cache[key] = block_macs(b, self.sides[i], kernel, slice(0, b.mid(expand)))
        return cache[key]


@lru_cache(maxsize=256)
def _table(spec: SupernetSpec, resolution: int, max_depth: int) -> _Table:
    return _Table(spec, resolution, max_depth)


def subnet_macs(spec: SupernetSpec, arch: SubnetArch) -> int:
    """MACs of static subnet ``arch`` for one image at ``arch.resolution`` (~10^5 archs/s once tables are warm)."""
    units = len(spec.units)
    if len(arch.depths) != units or len(arch.kernels) % units or len(arch.kernels) != len(arch.expands):
        raise ValueError(f"arch has {len(arch.depths)} units and {len(arch.kernels)} slots; spec has {units} units")
    max_depth = len(arch.kernels) // units
    t = _table(spec, arch.resolution, max_depth)
    total = t.fixed
    for u, depth in enumerate(arch.depths):
        for i in range(u * max_depth, u * max_depth + depth):
            total += t.block(i, arch.kernels[i], arch.expands[i])
    return total


# ---------------------------------------------------------------------------------------------- multi-stage archs
# MACs of the multi-stage network's incremental, feature-reusing path (its plan: enas4d/plan.py).


def stage_macs(spec: SupernetSpec, arch: MultiStageArch, *, restart: bool = True) -> list[int]:
    """Cumulative MACs for one image that exits after stage 1, 2, ..., S of multi-stage ``arch``.

    Follows the incremental path exactly: stage 1 pays the stem and first block once; every stage pays
    the hidden-channel slice it adds to each block it runs (``block_macs`` on that slice, SE in input-reuse
    form) and its own head. A stage that adds no channels to a block pays nothing there (BN and the
    residual add are free), and heads of every stage a sample passed through count. ``restart``: a
    diverged stage recomputes each unit's first block whole (``plan.Plan.of``), and pays for it.
    """
    units = len(spec.units)
    for s in range(arch.num_stages):
        d, k, e = arch.depths[s], arch.kernels[s], arch.expands[s]
        if len(d) != units or not k or len(k) % units or len(k) != len(e):
            raise ValueError(f"stage {s + 1} of the arch has {len(d)} units and {len(k)} slots; "
                             f"spec has {units} units")
    max_depth = len(arch.kernels[0]) // units
    blocks = spec.block_specs(max_depth)
    sides = slot_sides(spec, arch.resolution, max_depth)
    head = head_macs(spec, sides[-1])
    total, out = stem_macs(spec, arch.resolution), []
    restarts = restart_slots(blocks) if restart else ()
    for steps in Plan.of(arch, lambda slot, e: blocks[slot].mid(e), restarts).stages:
        total += sum(block_macs(blocks[st.slot], sides[st.slot], st.kernel, st.channels) for st in steps if st.new)
        total += head
        out.append(total)
    return out


def mmacs(macs: np.ndarray | list[int]) -> np.ndarray:
    """MACs in millions, the unit of ``search.targets``."""
    return np.asarray(macs, dtype=np.float64) / 1e6
