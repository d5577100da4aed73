"""Analytic MACs equal what torch's FlopCounterMode measures on the extracted network."""

import dataclasses

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from enas4d.cost import block_macs, slot_sides, subnet_macs
from enas4d.space import SearchSpace
from enas4d.supernet import PRESETS, BlockSpec, OFAMobileNetV3

torch.set_num_threads(1)
SPACE = SearchSpace(units=5, resolutions=(16, 20, 24, 28, 32))
OFA_SPACE = SearchSpace(units=5, resolutions=tuple(range(128, 225, 16)))


def measured_macs(net: OFAMobileNetV3, arch) -> int:
    sub = net.extract(arch).eval()
    x = torch.randn(2, net.spec.in_channels, arch.resolution, arch.resolution)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        sub(x)
    return counter.get_total_flops() // 2 // 2  # flops -> MACs, batch of 2 -> one image


@pytest.mark.parametrize("preset, space, resolution, n_random", [
    ("fmnist_small", SPACE, None, 6),
    ("ofa_mbv3_w1.0", OFA_SPACE, 160, 2),
])
def test_subnet_macs_equals_flop_counter(preset: str, space: SearchSpace, resolution: int | None,
                                         n_random: int) -> None:
    torch.manual_seed(0)
    net = OFAMobileNetV3(PRESETS[preset], space)
    rng = np.random.default_rng(0)
    archs = [space.largest(), space.smallest()] + [space.sample_subnet(rng) for _ in range(n_random)]
    if resolution is not None:
        archs = [dataclasses.replace(a, resolution=resolution) for a in archs]
    for a in archs:
        assert subnet_macs(net.spec, a) == measured_macs(net, a), a


def test_fmnist_largest_is_a_few_mmacs() -> None:
    spec = PRESETS["fmnist_small"]
    at28 = [subnet_macs(spec, dataclasses.replace(a, resolution=28)) for a in (SPACE.smallest(), SPACE.largest())]
    assert 0.3e6 < at28[0] < at28[1] < 6e6


def test_slot_sides_and_block_slices() -> None:
    spec = PRESETS["fmnist_small"]
    sides = slot_sides(spec, 28, 4)
    assert len(sides) == 21 and sides[0] == 14 and sides[-1] == 2
    b = BlockSpec(24, 24, 1, "relu", False)
    # without SE a block's MACs are additive over hidden-channel slices (what multi-stage blocks spend)
    assert block_macs(b, 7, 5, slice(0, 96)) == block_macs(b, 7, 5, slice(0, 40)) + block_macs(b, 7, 5, slice(40, 96))
    se = dataclasses.replace(b, se=True)
    # input-reuse SE: the gate of [40, 96) reduces all 96 pooled channels
    assert block_macs(se, 7, 5, slice(40, 96)) - block_macs(b, 7, 5, slice(40, 96)) == 24 * 96 + 56 * 24


def test_subnet_macs_rejects_foreign_arch() -> None:
    a = SearchSpace(units=4, resolutions=(28,)).largest()
    with pytest.raises(ValueError, match="4 units"):
        subnet_macs(PRESETS["fmnist_small"], a)
