"""A tiny random-init multi-stage net with random images: what the database and baseline tests run on."""

from __future__ import annotations

import functools

import torch

from enas4d.multistage import MultiStageNet
from enas4d.space import SearchSpace
from enas4d.supernet import PRESETS, OFAMobileNetV3

SPEC = PRESETS["fmnist_small"]


@functools.cache
def tiny_multistage() -> tuple[MultiStageNet, SearchSpace, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(eval-mode net, its 3-stage space at res 16/20, 24 images, their labels, 16 calibration images)."""
    torch.manual_seed(0)
    space = SearchSpace(units=len(SPEC.units), resolutions=(16, 20), stages=3)
    msnet = MultiStageNet(OFAMobileNetV3(SPEC, space)).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(24, 1, 28, 28, generator=g)
    labels = torch.randint(0, 10, (24,), generator=g)
    calib = torch.randn(16, 1, 28, 28, generator=g)
    return msnet, space, images, labels, calib
