"""Batch norm over a slice of channels of one shared set of parameters and running statistics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DynamicBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose call normalises channels ``ch`` with the matching slices of its state.

    In training mode the batch statistics are used and only the sliced running statistics move, so
    a subnet updates exactly the channels it ran (OFA's rule). Subclassing ``BatchNorm2d`` keeps
    ``reset_running_stats``/``momentum=None`` (cumulative averages) working for BN recalibration.
    """

    def forward(self, x: Tensor, ch: slice | None = None) -> Tensor:  # type: ignore[override]
        ch = slice(0, x.shape[1]) if ch is None else ch
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or self.running_mean is None
        mean = self.running_mean[ch] if self.running_mean is not None else None
        var = self.running_var[ch] if self.running_var is not None else None
        return F.batch_norm(x, mean, var, self.weight[ch], self.bias[ch], use_batch_stats, factor, self.eps)

    @torch.no_grad()
    def permute(self, idx: Tensor) -> None:
        """Reorder channels of the affine parameters and running statistics in place."""
        for t in (self.weight, self.bias, self.running_mean, self.running_var):
            t.copy_(t[idx])
