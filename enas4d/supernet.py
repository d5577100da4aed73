"""The once-for-all supernet: an elastic MobileNetV3 (OFA style), static subnet extraction, OFA import.

Layout (OFA's MBv3): stem (3x3 s2 conv, BN, h-swish) -> static first block (depthwise 3x3 + pointwise,
ReLU, residual when widths match) -> ``units`` elastic units of up to ``max_depth`` ``ElasticMBConv``
blocks (one module per *slot*, slot ``u * max_depth + j``) -> head (1x1 conv + BN + h-swish, global
average pool, linear without bias + h-swish, dropout, classifier). The architecture is always an
argument (``forward(x, arch)``); no module keeps an "active" setting.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.mobilenetv3 import InvertedResidual, InvertedResidualConfig
from torchvision.ops import Conv2dNormActivation

from .ops import (ACTIVATIONS, DynamicBatchNorm2d, DynamicConv2d, DynamicSE, ElasticDepthwiseConv2d, activation,
                  make_divisible)
from .space import SearchSpace, SubnetArch

# ---------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class UnitSpec:
    """One elastic unit: output width, stride of its first block, activation, squeeze-excitation."""

    width: int
    stride: int
    act: str  # "relu" | "hswish"
    se: bool

    def __post_init__(self) -> None:
        if self.width <= 0 or self.stride not in (1, 2) or self.act not in ACTIVATIONS:
            raise ValueError(f"bad unit {self}: need width > 0, stride 1|2, act in {sorted(ACTIVATIONS)}")


@dataclass(frozen=True)
class BlockSpec:
    """The fixed shape of one block slot (everything but its elastic kernel and expand)."""

    in_channels: int
    out_channels: int
    stride: int
    act: str
    se: bool

    @property
    def has_residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels

    def mid(self, expand: int) -> int:
        """Hidden width at expand ratio ``expand`` (OFA: make_divisible(in * e, 8))."""
        return make_divisible(self.in_channels * expand, 8)


@dataclass(frozen=True)
class SupernetSpec:
    """Layer sizes of the supernet; the elastic choices (depth, kernel, expand) live in ``SearchSpace``."""

    in_channels: int
    num_classes: int
    stem: int
    first_block: int
    units: tuple[UnitSpec, ...]
    final_expand: int
    feature_mix: int
    dropout: float = 0.0
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1

    def __post_init__(self) -> None:
        if self.in_channels <= 0 or self.num_classes <= 0 or not self.units:
            raise ValueError(f"supernet spec needs in_channels > 0, num_classes > 0 and units, got {self}")
        # torchvision's MBv3 block (used for the static layers) rounds other widths to multiples of 8
        widths = {"stem": self.stem, "first_block": self.first_block, "final_expand": self.final_expand,
                  **{f"units[{i}].width": u.width for i, u in enumerate(self.units)}}
        for name, w in widths.items():
            if w % 8:
                raise ValueError(f"supernet spec: {name} = {w} is not a multiple of 8")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"supernet spec: dropout = {self.dropout} not in [0, 1)")

    def block_specs(self, max_depth: int) -> tuple[BlockSpec, ...]:
        """One ``BlockSpec`` per slot; the first block of a unit carries its stride and width change."""
        out, c = [], self.first_block
        for u in self.units:
            for j in range(max_depth):
                out.append(BlockSpec(c, u.width, u.stride if j == 0 else 1, u.act, u.se))
                c = u.width
        return tuple(out)


PRESETS: dict[str, SupernetSpec] = {
    # 28x28 grayscale, 1.1M parameters. Strides early (28 -> 14 -> 7 -> 4 -> 4 -> 2 -> 2) so the largest
    # subnet costs 5.8 MMACs at 28x28 (0.98 the smallest); with strides s2,s1,s2,s1,s2 it was 9.4.
    "fmnist_small": SupernetSpec(
        in_channels=1, num_classes=10, stem=8, first_block=8,
        units=(UnitSpec(16, 2, "relu", False), UnitSpec(24, 2, "relu", True), UnitSpec(32, 1, "hswish", False),
               UnitSpec(48, 2, "hswish", True), UnitSpec(64, 1, "hswish", True)),
        final_expand=192, feature_mix=256, dropout=0.0),
    # OFA's ofa_mbv3_d234_e346_k357_w1.0 (ofa/imagenet_classification/elastic_nn/networks/ofa_mbv3.py).
    "ofa_mbv3_w1.0": SupernetSpec(
        in_channels=3, num_classes=1000, stem=16, first_block=16,
        units=(UnitSpec(24, 2, "relu", False), UnitSpec(40, 2, "relu", True), UnitSpec(80, 2, "hswish", False),
               UnitSpec(112, 1, "hswish", True), UnitSpec(160, 2, "hswish", True)),
        final_expand=960, feature_mix=1280, dropout=0.1),
}


def resize(x: Tensor, resolution: int) -> Tensor:
    """Bilinear resize of a batch to ``resolution``² (antialiased when shrinking); no-op when already there."""
    if x.shape[-2:] == (resolution, resolution):
        return x
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False,
                         antialias=resolution < max(x.shape[-2:]))


# ---------------------------------------------------------------------------------------------- static layers


def _inverted_residual(b: BlockSpec, kernel: int, mid: int, norm: Callable[..., nn.Module]) -> InvertedResidual:
    """torchvision's MBv3 block (widths are multiples of 8, so its channel rounding keeps them)."""
    cfg = InvertedResidualConfig(b.in_channels, kernel, mid, b.out_channels, b.se,
                                 "HS" if b.act == "hswish" else "RE", b.stride, 1, 1.0)
    return InvertedResidual(cfg, norm)


class Head(nn.Module):
    """final_expand (1x1 conv, BN, h-swish) -> global mean -> feature_mix (linear, no bias, no BN) -> h-swish
    -> dropout -> classifier, as OFA's MBv3 head."""

    def __init__(self, in_channels: int, final_expand: int, feature_mix: int, num_classes: int, dropout: float,
                 norm: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.final_expand = Conv2dNormActivation(in_channels, final_expand, 1, norm_layer=norm,
                                                 activation_layer=nn.Hardswish)
        self.feature_mix = nn.Linear(final_expand, feature_mix, bias=False)
        self.act = nn.Hardswish()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(feature_mix, num_classes)

    def forward(self, feat: Tensor) -> Tensor:
        x = self.final_expand(feat).mean((2, 3))
        return self.classifier(self.dropout(self.act(self.feature_mix(x))))


class StaticSubnet(nn.Module):
    """A subnet extracted from the supernet: plain torch/torchvision layers, input at ``resolution``²."""

    def __init__(self, resolution: int, stem: nn.Module, first_block: nn.Module, blocks: list[nn.Module],
                 head: Head) -> None:
        super().__init__()
        self.resolution = resolution
        self.stem = stem
        self.first_block = first_block
        self.blocks = nn.Sequential(*blocks)
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.first_block(self.stem(x))))


@torch.no_grad()
def _copy_bn(dst: nn.BatchNorm2d, src: nn.BatchNorm2d, ch: slice) -> None:
    """Copy channels ``ch`` of ``src`` (affine, running stats, settings) into ``dst``."""
    dst.weight.copy_(src.weight[ch])
    dst.bias.copy_(src.bias[ch])
    dst.running_mean.copy_(src.running_mean[ch])
    dst.running_var.copy_(src.running_var[ch])
    dst.num_batches_tracked.copy_(src.num_batches_tracked)
    dst.eps, dst.momentum = src.eps, src.momentum


# ---------------------------------------------------------------------------------------------- elastic block


class ElasticMBConv(nn.Module):
    """Inverted bottleneck (expand 1x1, depthwise k x k, optional SE, project 1x1) with elastic kernel and width.

    The pieces are exposed separately (``hidden``, ``se_gate``, ``project``, ``project_bn``) because a
    multi-stage block computes them per stage on slices ``ch`` of the hidden channels.
    """

    def __init__(self, spec: BlockSpec, kernels: tuple[int, ...], max_expand: int, eps: float,
                 momentum: float) -> None:
        super().__init__()
        self.spec = spec
        c = spec.mid(max_expand)
        self.max_mid = c
        self.expand_conv = DynamicConv2d(spec.in_channels, c)
        self.expand_norm = DynamicBatchNorm2d(c, eps, momentum)
        self.depthwise = ElasticDepthwiseConv2d(c, kernels, spec.stride)
        self.depthwise_norm = DynamicBatchNorm2d(c, eps, momentum)
        self.se = DynamicSE(c) if spec.se else None
        self.project_conv = DynamicConv2d(c, spec.out_channels)
        self.project_norm = nn.BatchNorm2d(spec.out_channels, eps, momentum)
        self.act = activation(spec.act)

    @property
    def has_residual(self) -> bool:
        return self.spec.has_residual

    def mid(self, expand: int) -> int:
        return self.spec.mid(expand)

    def hidden(self, x: Tensor, ch: slice, kernel: int) -> Tensor:
        """Hidden channels ``ch``: expand rows ``ch`` -> BN -> act -> depthwise (kernel, stride) -> BN -> act."""
        if ch.stop > self.max_mid:
            raise ValueError(f"hidden channels {ch} exceed the block's {self.max_mid}")
        h = self.act(self.expand_norm(self.expand_conv(x, out=ch), ch))
        return self.act(self.depthwise_norm(self.depthwise(h, kernel, ch), ch))

    def se_gate(self, pooled: Tensor, ch: slice) -> Tensor:
        """SE gate ``[N, len(ch), 1, 1]`` of channels ``ch`` from ``pooled`` = mean of channels ``[0, ch.stop)``."""
        if self.se is None:
            raise ValueError(f"block {self.spec} has no SE")
        return self.se(pooled, ch)

    def project(self, h: Tensor, ch: slice) -> Tensor:
        """Project 1x1 of hidden channels ``ch`` to all output channels, before BN (output-reuse sums)."""
        return self.project_conv(h, in_=ch)

    def project_bn(self, z: Tensor) -> Tensor:
        return self.project_norm(z)

    def forward(self, x: Tensor, kernel: int, expand: int) -> Tensor:
        """The static block of ``kernel`` and ``expand``."""
        ch = slice(0, self.mid(expand))
        h = self.hidden(x, ch, kernel)
        if self.se is not None:
            h = h * self.se_gate(h.mean((2, 3)), ch)
        y = self.project_bn(self.project(h, ch))
        return y + x if self.has_residual else y

    @torch.no_grad()
    def sort_channels(self) -> None:
        """Order hidden channels by L1 norm of their project-conv input column (OFA's importance).

        Every tensor indexed by hidden channel moves with them, so the full-width block is unchanged
        while narrower widths keep the most important channels. SE hidden units are sorted likewise.
        """
        importance = self.project_conv.weight.abs().sum((0, 2, 3))
        idx = torch.argsort(importance, descending=True, stable=True)
        self.expand_conv.permute_out(idx)
        self.expand_norm.permute(idx)
        self.depthwise.permute(idx)
        self.depthwise_norm.permute(idx)
        if self.se is not None:
            self.se.permute(idx)
            self.se.sort_mid()
        self.project_conv.permute_in(idx)

    @torch.no_grad()
    def extract(self, kernel: int, expand: int, norm: Callable[..., nn.Module]) -> InvertedResidual:
        """This block at ``kernel``/``expand`` as a torchvision ``InvertedResidual`` with copied weights.

        The kernel transform is evaluated here once, so the static block holds a plain k x k weight.
        """
        mid = self.mid(expand)
        ch = slice(0, mid)
        out = _inverted_residual(self.spec, kernel, mid, norm)
        expand_l, dw_l, *rest = out.block
        expand_l[0].weight.copy_(self.expand_conv.weight[ch])
        _copy_bn(expand_l[1], self.expand_norm, ch)
        dw_l[0].weight.copy_(self.depthwise.kernel(kernel, ch))
        _copy_bn(dw_l[1], self.depthwise_norm, ch)
        if self.se is not None:
            se_l = rest[0]
            m = self.se.mid(mid)
            se_l.fc1.weight.copy_(self.se.reduce.weight[:m, :mid, None, None])
            se_l.fc1.bias.copy_(self.se.reduce.bias[:m])
            se_l.fc2.weight.copy_(self.se.expand.weight[:mid, :m, None, None])
            se_l.fc2.bias.copy_(self.se.expand.bias[:mid])
        proj_l = rest[-1]
        proj_l[0].weight.copy_(self.project_conv.weight[:, ch])
        _copy_bn(proj_l[1], self.project_norm, slice(None))
        return out


# ---------------------------------------------------------------------------------------------- supernet


class OFAMobileNetV3(nn.Module):
    """Elastic MobileNetV3 supernet: depth per unit, kernel and expand per block, input resolution."""

    resize = staticmethod(resize)

    def __init__(self, spec: SupernetSpec, space: SearchSpace) -> None:
        super().__init__()
        if space.units != len(spec.units):
            raise ValueError(f"search space has {space.units} units, supernet spec has {len(spec.units)}")
        self.spec = spec
        self.space = space
        self.norm = partial(nn.BatchNorm2d, eps=spec.bn_eps, momentum=spec.bn_momentum)
        self.stem = Conv2dNormActivation(spec.in_channels, spec.stem, 3, stride=2, norm_layer=self.norm,
                                         activation_layer=nn.Hardswish)
        self.first_block = _inverted_residual(BlockSpec(spec.stem, spec.first_block, 1, "relu", False), 3,
                                              spec.stem, self.norm)
        self.blocks = nn.ModuleList(
            ElasticMBConv(b, space.kernels, max(space.expands), spec.bn_eps, spec.bn_momentum)
            for b in spec.block_specs(space.max_depth))
        self.head_layers = Head(spec.units[-1].width, spec.final_expand, spec.feature_mix, spec.num_classes,
                                spec.dropout, self.norm)
        # The prediction layers of stages 2..S: every stage of a multi-stage net has its own (the paper's "a
        # sub-network with a prediction layer" per stage); stage 1 and every static subnet use head_layers.
        # Empty until multi-stage fine-tuning adds them (`add_stage_heads`), as copies of head_layers.
        self.stage_heads = nn.ModuleList()
        self._init_static_weights()
        # mkldnn's channels-last depthwise kernels make a CPU training step ~2.5x faster (its backward
        # dominates); parameters keep this layout through load_state_dict, optimizers and .to(device).
        self.to(memory_format=torch.channels_last)

    def _init_static_weights(self) -> None:
        """Kaiming (fan-out) init for the plain convs, as torchvision's MBv3; the linear head layers keep
        PyTorch's default init, which trained faster here than MBv3's N(0, 0.01) (train top-1 after 60 steps
        at lr 0.2: 66% vs 50%). The elastic ops initialise themselves."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def stem_features(self, x: Tensor) -> Tensor:
        """Stem and static first block (fixed width: shared by every subnet and every stage)."""
        return self.first_block(self.stem(x))

    def head(self, feat: Tensor) -> Tensor:
        return self.head_layers(feat)

    def stage_head(self, stage: int) -> Head:
        """The prediction layer of (0-based) ``stage``: its own after multi-stage fine-tuning, else head_layers."""
        if stage == 0 or not self.stage_heads:
            return self.head_layers
        if stage > len(self.stage_heads):
            raise ValueError(f"stage {stage + 1}: this supernet has prediction layers for "
                             f"{len(self.stage_heads) + 1} stages")
        return self.stage_heads[stage - 1]

    @torch.no_grad()
    def add_stage_heads(self, stages: int) -> None:
        """Give stages 2..``stages`` their own prediction layers, copies of head_layers (fine-tuning starts
        from the supernet's head for every stage); a supernet that has them already is left as it is."""
        if len(self.stage_heads) not in (0, stages - 1):
            raise ValueError(f"supernet has prediction layers for {len(self.stage_heads) + 1} stages, not {stages}")
        if not self.stage_heads:
            self.stage_heads.extend(copy.deepcopy(self.head_layers) for _ in range(stages - 1))

    def check(self, x: Tensor, arch: SubnetArch) -> None:
        """Raise ValueError if ``arch`` is not in the space or ``x`` is not at ``arch.resolution``."""
        self.space.check_subnet(arch)
        if x.shape[-2:] != (arch.resolution, arch.resolution):
            raise ValueError(f"input is {tuple(x.shape[-2:])} but arch.resolution is {arch.resolution}; "
                             f"call resize(x, {arch.resolution}) first")

    def forward(self, x: Tensor, arch: SubnetArch) -> Tensor:
        """Logits of subnet ``arch``; ``x`` must already be at ``arch.resolution`` (see ``resize``)."""
        self.check(x, arch)
        x = self.stem_features(x)
        d_max = self.space.max_depth
        for u, depth in enumerate(arch.depths):
            for i in range(u * d_max, u * d_max + depth):
                x = self.blocks[i](x, arch.kernels[i], arch.expands[i])
        return self.head(x)

    @torch.no_grad()
    def extract(self, arch: SubnetArch) -> StaticSubnet:
        """Subnet ``arch`` as a standalone network of plain layers, weights and BN statistics copied."""
        self.space.check_subnet(arch)
        d_max = self.space.max_depth
        blocks = [self.blocks[i].extract(arch.kernels[i], arch.expands[i], self.norm)
                  for u, depth in enumerate(arch.depths) for i in range(u * d_max, u * d_max + depth)]
        net = StaticSubnet(arch.resolution, copy.deepcopy(self.stem), copy.deepcopy(self.first_block), blocks,
                           copy.deepcopy(self.head_layers))
        return net.to(next(self.parameters()).device, memory_format=torch.channels_last).train(self.training)

    @torch.no_grad()
    def sort_channels(self) -> None:
        """Sort every elastic block's hidden channels by importance (function of the full width unchanged).

        Call it before building the optimizer of a width phase: momentum buffers are not permuted.
        """
        for b in self.blocks:
            b.sort_channels()


# ---------------------------------------------------------------------------------------------- OFA checkpoints

_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _ofa_names(model: OFAMobileNetV3) -> dict[str, tuple[str, bool]]:
    """OFA key -> (our key, stored by OFA as a 1x1 conv [o, i, 1, 1] where we hold a linear [o, i])."""
    names: dict[str, tuple[str, bool]] = {}

    def bn(ofa: str, ours: str) -> None:
        names.update({f"{ofa}.{p}": (f"{ours}.{p}", False) for p in _BN})

    names["first_conv.conv.weight"] = ("stem.0.weight", False)
    bn("first_conv.bn", "stem.1")
    names["blocks.0.conv.depth_conv.conv.weight"] = ("first_block.block.0.0.weight", False)
    bn("blocks.0.conv.depth_conv.bn", "first_block.block.0.1")
    names["blocks.0.conv.point_linear.conv.weight"] = ("first_block.block.1.0.weight", False)
    bn("blocks.0.conv.point_linear.bn", "first_block.block.1.1")
    for i, blk in enumerate(model.blocks):
        o, m = f"blocks.{i + 1}.conv", f"blocks.{i}"
        names[f"{o}.inverted_bottleneck.conv.conv.weight"] = (f"{m}.expand_conv.weight", False)
        bn(f"{o}.inverted_bottleneck.bn.bn", f"{m}.expand_norm")
        names[f"{o}.depth_conv.conv.conv.weight"] = (f"{m}.depthwise.weight", False)
        for t in blk.depthwise.transforms:
            names[f"{o}.depth_conv.conv.{t}_matrix"] = (f"{m}.depthwise.transforms.{t}", False)
        bn(f"{o}.depth_conv.bn.bn", f"{m}.depthwise_norm")
        if blk.se is not None:
            for fc in ("reduce", "expand"):
                names[f"{o}.depth_conv.se.fc.{fc}.weight"] = (f"{m}.se.{fc}.weight", True)
                names[f"{o}.depth_conv.se.fc.{fc}.bias"] = (f"{m}.se.{fc}.bias", False)
        names[f"{o}.point_linear.conv.conv.weight"] = (f"{m}.project_conv.weight", False)
        bn(f"{o}.point_linear.bn.bn", f"{m}.project_norm")
    names["final_expand_layer.conv.weight"] = ("head_layers.final_expand.0.weight", False)
    bn("final_expand_layer.bn", "head_layers.final_expand.1")
    names["feature_mix_layer.conv.weight"] = ("head_layers.feature_mix.weight", True)
    names["classifier.linear.weight"] = ("head_layers.classifier.weight", False)
    names["classifier.linear.bias"] = ("head_layers.classifier.bias", False)
    return names


def _ofa_shape(t: Tensor, conv1x1: bool) -> tuple[int, ...]:
    return (*t.shape, 1, 1) if conv1x1 else tuple(t.shape)


def to_ofa_state_dict(model: OFAMobileNetV3) -> dict[str, Tensor]:
    """``model``'s weights under OFA's key names and shapes (what OFA's ``OFAMobileNetV3.state_dict()`` has)."""
    ours = model.state_dict()
    return {k: ours[m].detach().clone(memory_format=torch.contiguous_format).reshape(_ofa_shape(ours[m], c))
            for k, (m, c) in _ofa_names(model).items()}


def load_ofa_state_dict(model: OFAMobileNetV3, source: str | os.PathLike | Mapping[str, Tensor]) -> None:
    """Load an OFA MBv3 supernet checkpoint (file or state dict, optionally under ``"state_dict"``) into ``model``.

    Every key must be consumed and every shape must match; the older ``mobile_inverted_conv`` block
    name is accepted, and BN ``num_batches_tracked`` entries may be absent (pre-1.0 PyTorch files).
    Any other missing or extra key or a shape mismatch raises ValueError naming the key.
    """
    where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "OFA state dict"
    obj = source
    if isinstance(source, (str, os.PathLike)):
        try:
            obj = torch.load(source, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ValueError(f"{where}: file not found") from None
        except Exception as err:  # a corrupt or foreign file: torch raises many kinds
            # (never torch's own advice to retry with weights_only=False: that would run the file's pickled code)
            raise ValueError(f"{where}: corrupt or not a torch state dict ({type(err).__name__})") from None
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a state dict (or a dict with 'state_dict'), got {type(obj).__name__}")
    names = _ofa_names(model)
    ours = model.state_dict()
    loaded: dict[str, Tensor] = {}
    for key, value in obj.items():
        canon = key.replace(".mobile_inverted_conv.", ".conv.")
        if canon not in names:
            raise ValueError(f"{where}: unexpected key {key!r}")
        mine, conv1x1 = names[canon]
        if mine in loaded:
            raise ValueError(f"{where}: key {key!r} given twice (old and new block names)")
        want = _ofa_shape(ours[mine], conv1x1)
        if not isinstance(value, Tensor) or tuple(value.shape) != want:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{where}: key {key!r} has shape {got}, expected {want}")
        loaded[mine] = value.reshape(ours[mine].shape).to(ours[mine].dtype)
    missing = [k for k, (m, _) in names.items() if m not in loaded and not k.endswith(".num_batches_tracked")]
    if missing:
        more = f" (+{len(missing) - 1} more)" if missing[1:] else ""
        raise ValueError(f"{where}: missing key {missing[0]!r}{more}")
    model.load_state_dict({**ours, **loaded})
