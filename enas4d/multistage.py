"""Multi-stage networks sampled from the supernet (paper: "The structure of Multi-stage CNN" and
"Sample Multi-stage CNN from Once-for-all Network").

Three layers of ideas, top to bottom of this file:

1. The paper's three multi-stage convolutions (independent, input reuse, output reuse) as small
   modules that hold one weight per stage. They are the building blocks of an exported network.
2. A *plan* (which hidden-channel slice and kernel each stage computes in each block: ``enas4d.plan``,
   shared with the MACs count of ``enas4d.cost``) and the orchestration that runs it: the multi-stage
   MBConv step, the stage cache for incremental inference, block-major training forward, early exit. It is written once against a small "parts" interface with
   two implementations: a view of the supernet (shared, sliced weights; used for fine-tuning) and an
   exported standalone network (own weights, own BN per block and stage, own head per stage).
3. `MultiStageNet` (the supernet view) and `ExportedMultiStageNet`.

Semantics (docs/DESIGN.md, "Multi-stage network"): the stem and static first block are computed once by
stage 1 and reused; in a block, expand and depthwise are independent (the stage's own hidden channels
``[mid(e_{s-1}), mid(e_s))`` and kernel), SE is input reuse (the gate of the new channels reads the
pooled activations of all hidden channels so far), project is output reuse (pre-BN accumulator), then
BN and the residual with the stage's own input. A block first run by stage ``s`` is computed on
``[0, mid(e_s))`` from stage ``s``'s input (depth catch-up), and so is a block without residual when stage
``s`` already diverged from the previous stage upstream (restart at unit entries, our deviation: see
`Plan.of`). Every stage runs its own prediction layer on its own last feature map.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from enas4d import cost
from enas4d.plan import BlockStep, Plan, restart_slots
from enas4d.space import MultiStageArch
from enas4d.supernet import ElasticMBConv, OFAMobileNetV3

# The engine other modules build on (enas4d.latency times its pieces); the rest is this module's own.
__all__ = ["BlockParts", "BlockState", "BlockStep", "ExitResult", "ExportedMultiStageNet", "IndependentConv",
           "InputReuseConv", "MultiStageMBConv", "MultiStageNet", "NetParts", "OutputReuseConv", "Plan",
           "StageCache", "mbconv_stage", "run_early_exit"]

# --------------------------------------------------------------------------------------------------
# The three multi-stage convolutions
# --------------------------------------------------------------------------------------------------


def _check_kernel(w: Tensor, what: str) -> None:
    if w.dim() != 4 or w.shape[-1] != w.shape[-2] or w.shape[-1] % 2 == 0:
        raise ValueError(f"{what}: weight must be O x C x K x K with odd K, got {tuple(w.shape)}")


def _params(ws: Sequence[Tensor | None]) -> nn.ParameterList:
    """Per-stage weights as parameters (``None`` where a stage owns none), detached from their source."""
    return nn.ParameterList([None if w is None else nn.Parameter(w.detach().clone()) for w in ws])


class IndependentConv(nn.Module):
    """Independent type: ``Y^s_j = sum_i CONV(W^{ss}_{ji}, X^s_i)``.

    Stage ``s`` convolves its own input with its own filters, so width and kernel may differ per stage.
    ``weights[s]`` is ``O_s x C_s x K_s x K_s`` (``O_s x 1 x K_s x K_s`` when ``depthwise``), or ``None``
    for a stage that computes no output channels of this layer. Padding is ``K_s // 2`` ("same").
    """

    def __init__(self, weights: Sequence[Tensor | None], biases: Sequence[Tensor | None] | None = None,
                 *, stride: int = 1, depthwise: bool = False) -> None:
        super().__init__()
        biases = [None] * len(weights) if biases is None else list(biases)
        if len(biases) != len(weights):
            raise ValueError(f"IndependentConv: {len(weights)} weights but {len(biases)} biases")
        for s, w in enumerate(weights):
            if w is None:
                continue
            _check_kernel(w, f"IndependentConv stage {s}")
            if depthwise and w.shape[1] != 1:
                raise ValueError(f"IndependentConv stage {s}: depthwise weight must be O x 1 x K x K")
        self.weight = _params(weights)
        self.bias = _params(biases)
        self.stride = stride
        self.depthwise = depthwise

    def forward(self, x: Tensor, stage: int) -> Tensor:
        w = self.weight[stage]
        if w is None:
            raise ValueError(f"IndependentConv: stage {stage} has no filters")
        return F.conv2d(x, w, self.bias[stage], self.stride, w.shape[-1] // 2,
                        groups=w.shape[0] if self.depthwise else 1)


class InputReuseConv(nn.Module):
    """Input-reuse type: ``Y^s_j = sum_{k<=s} sum_i CONV(W^{ks}_{ji}, X^k_i)``.

    Stage ``s`` reads the inputs of all stages so far. ``weights[s]`` holds the blocks ``W^{1s} .. W^{ss}``
    side by side along the input axis (``O_s x (C_1 + ... + C_s) x K x K``), so the double sum is one
    convolution of the concatenated inputs (same MACs, one kernel launch); ``None`` for a stage that
    computes no output of this layer.
    """

    def __init__(self, weights: Sequence[Tensor | None], biases: Sequence[Tensor | None] | None = None,
                 *, stride: int = 1) -> None:
        super().__init__()
        biases = [None] * len(weights) if biases is None else list(biases)
        if len(biases) != len(weights):
            raise ValueError(f"InputReuseConv: {len(weights)} weights but {len(biases)} biases")
        for s, w in enumerate(weights):
            if w is not None:
                _check_kernel(w, f"InputReuseConv stage {s}")
        self.weight = _params(weights)
        self.bias = _params(biases)
        self.stride = stride

    def forward(self, xs: Sequence[Tensor], stage: int) -> Tensor:
        """``xs`` are ``X^1 .. X^s`` in stage order; stages that contribute no channels may be left out."""
        w = self.weight[stage]
        if w is None:
            raise ValueError(f"InputReuseConv: stage {stage} has no filters")
        x = xs[0] if len(xs) == 1 else torch.cat(list(xs), 1)
        if x.shape[1] != w.shape[1]:
            raise ValueError(f"InputReuseConv stage {stage}: inputs have {x.shape[1]} channels, "
                             f"weight expects {w.shape[1]}")
        return F.conv2d(x, w, self.bias[stage], self.stride, w.shape[-1] // 2)


class OutputReuseConv(nn.Module):
    """Output-reuse type: ``Y^s_j = sum_i CONV(W^{ss}_{ji}, X^s_i) + Y^{s-1}_j`` (``Y^0 = 0``).

    Every stage writes all ``O`` output channels and adds them to the previous stage's output.
    ``weights[s]`` is ``O x C_s x K x K``, or ``None`` when stage ``s`` has no input channels
    (then ``Y^s = Y^{s-1}``).
    """

    def __init__(self, weights: Sequence[Tensor | None], *, stride: int = 1) -> None:
        super().__init__()
        outs = {w.shape[0] for w in weights if w is not None}
        if len(outs) > 1:
            raise ValueError(f"OutputReuseConv: all stages need the same output channels, got {sorted(outs)}")
        for s, w in enumerate(weights):
            if w is not None:
                _check_kernel(w, f"OutputReuseConv stage {s}")
        self.weight = _params(weights)
        self.stride = stride

    def forward(self, x: Tensor | None, stage: int, prev: Tensor | None) -> Tensor:
        w = self.weight[stage]
        if w is None:
            if prev is None:
                raise ValueError(f"OutputReuseConv: stage {stage} adds nothing and there is no previous output")
            return prev
        if x is None:
            raise ValueError(f"OutputReuseConv: stage {stage} has filters but got no input")
        y = F.conv2d(x, w, None, self.stride, w.shape[-1] // 2)
        return y if prev is None else y.add_(prev)  # y is fresh: accumulate without another allocation


# --------------------------------------------------------------------------------------------------
# The orchestration, written once against the "parts" interface
# --------------------------------------------------------------------------------------------------


class BlockParts(Protocol):
    """The pieces of one multi-stage MBConv, addressed by stage (the slice and kernel are the plan's)."""

    has_se: bool
    has_residual: bool

    def hidden(self, x: Tensor, stage: int) -> Tensor:
        """Stage's new hidden channels: expand -> BN -> act -> depthwise -> BN -> act (independent)."""

    def se_gate(self, pooled: list[Tensor], stage: int) -> Tensor:
        """``N x C_s x 1 x 1`` gate of the stage's new channels from the pooled hidden of all stages so far."""

    def project(self, h: Tensor, stage: int, prev: Tensor | None) -> Tensor:
        """Pre-BN output-reuse accumulator ``Z^s = Z^{s-1} + W[:, ch_s] h_s``."""

    def project_bn(self, z: Tensor, stage: int) -> Tensor:
        """BN of the accumulator (all output channels)."""


class NetParts(Protocol):
    """A whole multi-stage network for one arch: its plan, the shared stem, blocks by slot, heads by stage."""

    plan: Plan

    def stem(self, x: Tensor) -> Tensor:
        """Stem and static first block (computed once, by stage 1)."""

    def block(self, slot: int) -> BlockParts: ...

    def head(self, x: Tensor, stage: int) -> Tensor:
        """The stage's prediction head on its last feature map."""


@dataclass
class BlockState:
    """What later stages reuse from a block: the pre-BN projection sum and the SE inputs so far."""

    z: Tensor | None = None
    pooled: list[Tensor] = field(default_factory=list)


def mbconv_stage(block: BlockParts, state: BlockState, x: Tensor, step: BlockStep, stage: int) -> Tensor:
    """One multi-stage MBConv at one stage: compute the new slice, update ``state``, return the output."""
    if step.start == 0:  # the first stage to run the block, or a restart: nothing earlier is reused
        state.z, state.pooled = None, []
    if step.new:
        h = block.hidden(x, stage)
        if block.has_se:
            state.pooled = [*state.pooled, h.mean((2, 3))]
            h = h * block.se_gate(state.pooled, stage)
        state.z = block.project(h, stage, state.z)
    assert state.z is not None, "a valid plan gives the first stage to run a block new channels"
    y = block.project_bn(state.z, stage)
    return y + x if block.has_residual else y


@dataclass
class StageCache:
    """Everything stage ``s + 1`` reuses from stages ``1..s`` of one batch: stem features and block states.

    ``next_stage`` is the (0-based) stage that `run_stage` computes next. `keep` drops samples that left.
    """

    parts: NetParts
    features: Tensor
    blocks: dict[int, BlockState]
    next_stage: int = 0

    @property
    def num_stages(self) -> int:
        return self.parts.plan.num_stages

    def keep(self, index: Tensor) -> None:
        """Keep only batch rows ``index`` (bool mask or indices), e.g. the samples that did not exit."""
        self.features = self.features[index]
        for st in self.blocks.values():
            st.z = None if st.z is None else st.z[index]
            st.pooled = [p[index] for p in st.pooled]


def _start(parts: NetParts, x: Tensor) -> StageCache:
    return StageCache(parts, parts.stem(x), {})


def _run_stage(cache: StageCache) -> Tensor:
    s = cache.next_stage
    if s >= cache.num_stages:
        raise ValueError(f"run_stage: all {cache.num_stages} stages of this cache already ran")
    x = cache.features
    for step in cache.parts.plan.stages[s]:
        x = mbconv_stage(cache.parts.block(step.slot), cache.blocks.setdefault(step.slot, BlockState()),
                          x, step, s)
    cache.next_stage = s + 1
    return cache.parts.head(x, s)


def _forward(parts: NetParts, x: Tensor) -> list[Tensor]:
    """All stages block by block (each block runs all its stages, then the next block): the training path."""
    feats = parts.stem(x)
    xs = [feats] * parts.plan.num_stages
    for slot, steps in parts.plan.by_slot().items():
        state = BlockState()
        for s, step in steps:
            xs[s] = mbconv_stage(parts.block(slot), state, xs[s], step, s)
    return [parts.head(h, s) for s, h in enumerate(xs)]


@dataclass(frozen=True)
class ExitResult:
    """Early-exit inference of a batch: prediction, 0-based exit stage and MACs spent, per sample."""

    pred: Tensor  # [N] int64
    exit_stage: Tensor  # [N] int64
    macs: Tensor  # [N] int64


@torch.no_grad()
def run_early_exit(parts: NetParts, x: Tensor, thresholds: Sequence[float], stage_macs: Sequence[int]) -> ExitResult:
    """Run stage by stage; a sample whose max softmax is > ``T_s`` leaves the batch at stage ``s``."""
    S = parts.plan.num_stages
    if len(thresholds) != S - 1:
        raise ValueError(f"early_exit: {S} stages need {S - 1} thresholds (T_1..T_{S - 1}), got {len(thresholds)}")
    n = x.shape[0]
    pred = torch.empty(n, dtype=torch.long, device=x.device)
    exit_stage = torch.empty(n, dtype=torch.long, device=x.device)
    alive = torch.arange(n, device=x.device)
    cache = _start(parts, x)
    for s in range(S):
        conf, p = torch.softmax(_run_stage(cache).float(), 1).max(1)
        leave = conf > thresholds[s] if s < S - 1 else torch.ones_like(conf, dtype=torch.bool)
        pred[alive[leave]] = p[leave]
        exit_stage[alive[leave]] = s
        alive = alive[~leave]
        if alive.numel() == 0:
            break
        cache.keep(~leave)
    macs = torch.tensor(list(stage_macs), dtype=torch.long, device=x.device)[exit_stage]
    return ExitResult(pred, exit_stage, macs)


# --------------------------------------------------------------------------------------------------
# The supernet view: parts that slice the shared supernet weights (the fine-tuning path)
# --------------------------------------------------------------------------------------------------


class _SupernetBlock:
    """`BlockParts` of one supernet block under a plan: each stage's slice and kernel of the shared weights."""

    def __init__(self, block: ElasticMBConv, steps: dict[int, BlockStep]) -> None:
        self.block = block
        self.steps = steps
        self.has_se = block.se is not None
        self.has_residual = block.has_residual

    def hidden(self, x: Tensor, stage: int) -> Tensor:
        step = self.steps[stage]
        return self.block.hidden(x, step.channels, step.kernel)

    def se_gate(self, pooled: list[Tensor], stage: int) -> Tensor:
        return self.block.se_gate(torch.cat(pooled, 1) if len(pooled) > 1 else pooled[0], self.steps[stage].channels)

    def project(self, h: Tensor, stage: int, prev: Tensor | None) -> Tensor:
        z = self.block.project(h, self.steps[stage].channels)
        return z if prev is None else prev + z

    def project_bn(self, z: Tensor, stage: int) -> Tensor:
        return self.block.project_bn(z)


class _SupernetParts:
    """`NetParts` of a supernet under one arch: shared stem, sliced blocks, each stage's prediction layer."""

    def __init__(self, supernet: OFAMobileNetV3, plan: Plan) -> None:
        self.supernet = supernet
        self.plan = plan
        self._blocks = {slot: _SupernetBlock(supernet.blocks[slot], dict(steps))
                        for slot, steps in plan.by_slot().items()}

    def stem(self, x: Tensor) -> Tensor:
        return self.supernet.stem_features(x)

    def block(self, slot: int) -> BlockParts:
        return self._blocks[slot]

    def head(self, x: Tensor, stage: int) -> Tensor:
        return self.supernet.stage_head(stage)(x)


def _check_input(x: Tensor, resolution: int) -> None:
    if x.dim() != 4 or x.shape[-2:] != (resolution, resolution):
        raise ValueError(f"input is {tuple(x.shape)} but the arch needs N x C x {resolution} x {resolution}; "
                         f"call enas4d.supernet.resize(x, {resolution}) first")


def _check_eval(net: nn.Module) -> None:
    if net.training:
        raise ValueError("early_exit needs eval mode (BN batch statistics would mix the samples); call .eval()")


class MultiStageNet(nn.Module):
    """Multi-stage networks sampled from a supernet; the arch is always an argument.

    The only weights beyond the supernet's shared ones are the prediction layers of stages 2..S, which
    the supernet itself holds after fine-tuning (``stage_heads``). ``restart`` (default) recomputes each
    unit's first block for a diverged stage (`Plan.of`); ``False`` is the paper's pure output reuse.
    The supernet is a submodule, so ``parameters()``/``train()``/``to()`` act on it and gradients of
    `forward` flow into it (multi-stage fine-tuning). BN uses the supernet's sliced layers (batch
    statistics in training mode); `export` gives each block and stage its own BN for recalibration.
    Inputs must already be at ``arch.resolution`` (see ``enas4d.supernet.resize``).
    """

    def __init__(self, supernet: OFAMobileNetV3, *, restart: bool = True) -> None:
        super().__init__()
        self.supernet = supernet
        self.restart = restart

    def plan(self, arch: MultiStageArch) -> Plan:
        """Validate ``arch`` (any number of stages) against the supernet's space and plan its slices."""
        replace(self.supernet.space, stages=arch.num_stages).check(arch)
        blocks = self.supernet.blocks
        return Plan.of(arch, lambda slot, e: blocks[slot].mid(e), restart_slots(blocks) if self.restart else ())

    def _parts(self, x: Tensor, arch: MultiStageArch) -> _SupernetParts:
        _check_input(x, arch.resolution)
        return _SupernetParts(self.supernet, self.plan(arch))

    def forward(self, x: Tensor, arch: MultiStageArch) -> list[Tensor]:
        """Logits of every stage, computed from scratch block by block (the training path)."""
        return _forward(self._parts(x, arch), x)

    def start(self, x: Tensor, arch: MultiStageArch) -> StageCache:
        """Run the shared stem once; `run_stage` then computes stage 1, 2, ... from the cache."""
        return _start(self._parts(x, arch), x)

    def run_stage(self, cache: StageCache) -> Tensor:
        """Logits of the cache's next stage, computing only what is new in it (the cache advances)."""
        if not isinstance(cache.parts, _SupernetParts) or cache.parts.supernet is not self.supernet:
            raise ValueError("run_stage: the cache was started by another network")
        return _run_stage(cache)

    def early_exit(self, x: Tensor, arch: MultiStageArch, thresholds: Sequence[float]) -> ExitResult:
        """Early-exit inference of a batch: a sample leaves after stage ``s < S`` when its max softmax > ``T_s``."""
        _check_eval(self)
        return run_early_exit(self._parts(x, arch), x, thresholds,
                              cost.stage_macs(self.supernet.spec, arch, restart=self.restart))

    @torch.no_grad()
    def export(self, arch: MultiStageArch) -> ExportedMultiStageNet:
        """``arch`` as a standalone network with copied weights (same outputs, same training mode)."""
        plan = self.plan(arch)
        sn = self.supernet
        blocks = {str(slot): MultiStageMBConv(sn.blocks[slot], dict(steps), arch.num_stages)
                  for slot, steps in plan.by_slot().items()}
        net = ExportedMultiStageNet(arch, plan, nn.Sequential(copy.deepcopy(sn.stem), copy.deepcopy(sn.first_block)),
                                    blocks, [copy.deepcopy(sn.stage_head(s)) for s in range(arch.num_stages)],
                                    cost.stage_macs(sn.spec, arch, restart=self.restart))
        return net.train(self.training)


# --------------------------------------------------------------------------------------------------
# The exported network: own weights, own BN per (block, stage), own head per stage
# --------------------------------------------------------------------------------------------------


def _bn_slice(src: nn.BatchNorm2d, ch: slice) -> nn.BatchNorm2d:
    """A plain BN holding channels ``ch`` of ``src`` (affine, running statistics and settings)."""
    n = len(range(src.num_features)[ch])
    bn = nn.BatchNorm2d(n, src.eps, src.momentum).to(src.weight.device)
    bn.load_state_dict({k: v[ch] if v.dim() else v for k, v in src.state_dict().items()})
    return bn


class MultiStageMBConv(nn.Module):
    """A multi-stage inverted bottleneck made of the three multi-stage convolutions (paper Fig. 3).

    expand 1x1 and depthwise are `IndependentConv` (the stage's new hidden channels, its own kernel, the
    kernel transform already applied), the SE reduce is `InputReuseConv` over the pooled hidden channels
    of all stages so far, the SE expand is independent, the project 1x1 is `OutputReuseConv`. Every stage
    that runs the block has its own BN copies. Implements `BlockParts`.
    """

    def __init__(self, block: ElasticMBConv, steps: dict[int, BlockStep], num_stages: int) -> None:
        super().__init__()
        new = {s: st for s, st in steps.items() if st.new}
        per_stage = lambda f: [f(new[s]) if s in new else None for s in range(num_stages)]  # noqa: E731
        self.has_residual = block.has_residual
        self.has_se = block.se is not None
        self.act = type(block.act)(inplace=True)  # acts on fresh BN outputs: saves a copy per call
        self.expand_conv = IndependentConv(per_stage(lambda st: block.expand_conv.weight[st.channels]))
        self.expand_norm = nn.ModuleDict({str(s): _bn_slice(block.expand_norm, st.channels) for s, st in new.items()})
        self.depthwise_conv = IndependentConv(per_stage(lambda st: block.depthwise.kernel(st.kernel, st.channels)),
                                              stride=block.depthwise.stride, depthwise=True)
        self.depthwise_norm = nn.ModuleDict({str(s): _bn_slice(block.depthwise_norm, st.channels)
                                             for s, st in new.items()})
        if block.se is not None:
            se = block.se
            m = lambda st: se.mid(st.stop)  # noqa: E731
            self.se_reduce = InputReuseConv(per_stage(lambda st: se.reduce.weight[:m(st), :st.stop, None, None]),
                                            per_stage(lambda st: se.reduce.bias[:m(st)]))
            self.se_expand = IndependentConv(per_stage(lambda st: se.expand.weight[st.channels, :m(st), None, None]),
                                             per_stage(lambda st: se.expand.bias[st.channels]))
        self.project_conv = OutputReuseConv(per_stage(lambda st: block.project_conv.weight[:, st.channels]))
        self.project_norm = nn.ModuleDict({str(s): _bn_slice(block.project_norm, slice(None)) for s in steps})

    def hidden(self, x: Tensor, stage: int) -> Tensor:
        k = str(stage)
        h = self.act(self.expand_norm[k](self.expand_conv(x, stage)))
        return self.act(self.depthwise_norm[k](self.depthwise_conv(h, stage)))

    def se_gate(self, pooled: list[Tensor], stage: int) -> Tensor:
        r = F.relu(self.se_reduce([p[:, :, None, None] for p in pooled], stage))
        return F.hardsigmoid(self.se_expand(r, stage))

    def project(self, h: Tensor, stage: int, prev: Tensor | None) -> Tensor:
        return self.project_conv(h, stage, prev)

    def project_bn(self, z: Tensor, stage: int) -> Tensor:
        return self.project_norm[str(stage)](z)


class ExportedMultiStageNet(nn.Module):
    """A multi-stage arch as a standalone network (no supernet inside); implements `NetParts`.

    ``forward(x)`` returns the logits of every stage (block-major, like the supernet view) and works
    with ``torch.export.export`` at a fixed input shape; `start`/`run_stage`/`early_exit` run the same
    incremental orchestration as `MultiStageNet`. BN recalibration in training mode gives each
    (block, stage) and each stage's head its own statistics. ``stage_macs`` are the cumulative MACs
    per stage (``enas4d.cost.stage_macs``).
    """

    def __init__(self, arch: MultiStageArch, plan: Plan, stem: nn.Module, blocks: dict[str, MultiStageMBConv],
                 heads: list[nn.Module], stage_macs: list[int]) -> None:
        super().__init__()
        self.arch = arch
        self.resolution = arch.resolution
        self.plan = plan
        self.stage_macs = stage_macs
        self.stem_layers = stem
        self.blocks = nn.ModuleDict(blocks)
        self.heads = nn.ModuleList(heads)

    def stem(self, x: Tensor) -> Tensor:
        return self.stem_layers(x)

    def block(self, slot: int) -> MultiStageMBConv:
        return self.blocks[str(slot)]

    def head(self, x: Tensor, stage: int) -> Tensor:
        return self.heads[stage](x)

    def forward(self, x: Tensor) -> list[Tensor]:
        _check_input(x, self.resolution)
        return _forward(self, x)

    def start(self, x: Tensor) -> StageCache:
        _check_input(x, self.resolution)
        return _start(self, x)

    def run_stage(self, cache: StageCache) -> Tensor:
        if cache.parts is not self:
            raise ValueError("run_stage: the cache was started by another network")
        return _run_stage(cache)

    def early_exit(self, x: Tensor, thresholds: Sequence[float]) -> ExitResult:
        _check_eval(self)
        _check_input(x, self.resolution)
        return run_early_exit(self, x, thresholds, self.stage_macs)
