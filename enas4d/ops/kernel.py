"""Depthwise conv with an elastic kernel: the 7x7 weight yields 5x5 and 3x3 through learned maps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _centre(w: Tensor, k: int) -> Tensor:
    """The centre ``k x k`` of the last two dims of ``w``."""
    o = (w.shape[-1] - k) // 2
    return w[..., o:o + k, o:o + k]


class ElasticDepthwiseConv2d(nn.Module):
    """Depthwise conv on a channel slice; kernel ``k`` = chained (centre crop, linear map) from the largest.

    OFA's kernel transform: for consecutive sizes ``big > small`` a ``small² x small²`` matrix
    (identity-initialised, so training starts from plain centre crops) maps the cropped kernel;
    the 3x3 kernel comes from the *transformed* 5x5. Matrices are shared by all channels and are
    applied as ``F.linear(flat_kernel, M)`` (= ``flat @ M.T``), the convention of OFA checkpoints.
    """

    def __init__(self, channels: int, kernel_sizes: Sequence[int], stride: int = 1) -> None:
        super().__init__()
        self.kernel_sizes = tuple(sorted(set(kernel_sizes)))
        if any(k % 2 == 0 for k in self.kernel_sizes):
            raise ValueError(f"kernel sizes must be odd, got {self.kernel_sizes}")
        self.stride = stride
        big = self.kernel_sizes[-1]
        self.weight = nn.Parameter(torch.empty(channels, 1, big, big))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")
        self.transforms = nn.ParameterDict({
            f"{b}to{s}": nn.Parameter(torch.eye(s * s))
            for s, b in zip(self.kernel_sizes[:-1], self.kernel_sizes[1:])})

    def kernel(self, k: int, ch: slice) -> Tensor:
        """The ``[len(ch), 1, k, k]`` depthwise weight of channels ``ch`` at kernel size ``k``."""
        if k not in self.kernel_sizes:
            raise ValueError(f"kernel {k} not in {self.kernel_sizes}")
        w = self.weight[ch]
        sizes = self.kernel_sizes
        for i in range(len(sizes) - 1, 0, -1):
            big, small = sizes[i], sizes[i - 1]
            if big <= k:
                break
            flat = _centre(w, small).reshape(w.shape[0], small * small)
            w = F.linear(flat, self.transforms[f"{big}to{small}"]).view(w.shape[0], 1, small, small)
        return w

    def forward(self, x: Tensor, k: int, ch: slice) -> Tensor:
        """Depthwise conv of ``x`` (channels ``ch``) with kernel ``k``, padding ``k // 2``.

        On maps smaller than the kernel only the centre ``2 * side - 1`` taps ever meet data (the rest
        multiply zero padding), so the kernel is cropped to them: same output, and the costly depthwise
        backward on e.g. 7x7 kernels over 2x2 maps becomes 3x3.
        """
        w = self.kernel(k, ch)
        reach = 2 * max(x.shape[-2:]) - 1
        if k > reach:
            w, k = _centre(w, reach), reach
        return F.conv2d(x, w, None, self.stride, k // 2, 1, w.shape[0])

    @torch.no_grad()
    def permute(self, idx: Tensor) -> None:
        """Reorder channels in place (the transforms are shared by all channels, so they stay)."""
        self.weight.copy_(self.weight[idx])
