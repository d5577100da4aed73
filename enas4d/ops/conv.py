"""Dense convolution whose output and input channels are slices of one shared weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DynamicConv2d(nn.Module):
    """Conv with weight ``[max_out, max_in, k, k]``; a call uses rows ``out`` and columns ``in_``.

    Slices (not just prefixes) let a multi-stage block compute hidden channels ``[a, b)`` on their own.
    Padding is ``k // 2`` so the spatial size only depends on the stride.
    """

    def __init__(self, max_in: int, max_out: int, kernel_size: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(max_out, max_in, kernel_size, kernel_size))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")

    def forward(self, x: Tensor, out: slice | None = None, in_: slice | None = None) -> Tensor:
        """Convolve ``x`` (channels = ``in_``, default the first ``x.size(1)``) into channels ``out``."""
        in_ = slice(0, x.shape[1]) if in_ is None else in_
        w = self.weight[out if out is not None else slice(None), in_]
        return F.conv2d(x, w, None, self.stride, self.weight.shape[-1] // 2)

    @torch.no_grad()
    def permute_out(self, idx: Tensor) -> None:
        """Reorder output channels (rows) in place: new row ``i`` is old row ``idx[i]``."""
        self.weight.copy_(self.weight[idx])

    @torch.no_grad()
    def permute_in(self, idx: Tensor) -> None:
        """Reorder input channels (columns) in place."""
        self.weight.copy_(self.weight[:, idx])
