"""Squeeze-and-excitation with elastic width, in the input-reuse form of DESIGN.md."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import make_divisible


class DynamicSE(nn.Module):
    """SE whose gate for hidden channels ``ch`` reads the pooled activations of channels ``[0, ch.stop)``.

    reduce: rows ``[0, m)``, ``m = make_divisible(ch.stop // 4, 8)``, cols ``[0, ch.stop)``, bias;
    ReLU; expand: rows ``ch``, cols ``[0, m)``, bias; h-sigmoid = relu6(x + 3) / 6.
    With ``ch.start == 0`` this is OFA's SE of a block with ``ch.stop`` hidden channels; a later
    stage's new channels get their gate from everything computed so far (input reuse).
    """

    def __init__(self, channels: int, reduction: int = 4, divisor: int = 8) -> None:
        super().__init__()
        self.reduction = reduction
        self.divisor = divisor
        m = self.mid(channels)
        self.reduce = nn.Linear(channels, m)
        self.expand = nn.Linear(m, channels)
        for fc in (self.reduce, self.expand):
            nn.init.kaiming_normal_(fc.weight, mode="fan_out")
            nn.init.zeros_(fc.bias)

    def mid(self, channels: int) -> int:
        """SE hidden width for a block with ``channels`` hidden channels."""
        return make_divisible(channels // self.reduction, self.divisor)

    def forward(self, pooled: Tensor, ch: slice) -> Tensor:
        """Gate ``[N, len(ch), 1, 1]`` (ready to multiply the hidden map) from ``pooled`` ``[N, ch.stop]``."""
        if pooled.shape[1] != ch.stop:
            raise ValueError(f"SE input has {pooled.shape[1]} channels; channel slice {ch} needs {ch.stop}")
        m = self.mid(ch.stop)
        y = F.relu(F.linear(pooled, self.reduce.weight[:m, :ch.stop], self.reduce.bias[:m]))
        y = F.hardsigmoid(F.linear(y, self.expand.weight[ch, :m], self.expand.bias[ch]))
        return y[:, :, None, None]

    @torch.no_grad()
    def permute(self, idx: Tensor) -> None:
        """Reorder the hidden channels it gates: reduce columns, expand rows and bias."""
        self.reduce.weight.copy_(self.reduce.weight[:, idx])
        self.expand.weight.copy_(self.expand.weight[idx])
        self.expand.bias.copy_(self.expand.bias[idx])

    @torch.no_grad()
    def sort_mid(self) -> None:
        """Order SE hidden units by L1 norm of their expand columns (OFA), so narrow SEs keep the best."""
        idx = torch.argsort(self.expand.weight.abs().sum(0), descending=True, stable=True)
        self.reduce.weight.copy_(self.reduce.weight[idx])
        self.reduce.bias.copy_(self.reduce.bias[idx])
        self.expand.weight.copy_(self.expand.weight[:, idx])
