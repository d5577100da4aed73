"""Supernet: extraction equals the supernet view, sorting preserves the function, block pieces compose."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from enas4d.ops import DynamicBatchNorm2d, DynamicConv2d, DynamicSE, ElasticDepthwiseConv2d
from enas4d.space import SearchSpace, SubnetArch
from enas4d.supernet import PRESETS, ElasticMBConv, OFAMobileNetV3, StaticSubnet, UnitSpec, resize

torch.set_num_threads(1)
SPACE = SearchSpace(units=5, resolutions=(16, 20, 24, 28, 32))
OFA_SPACE = SearchSpace(units=5, resolutions=tuple(range(128, 225, 16)))


@torch.no_grad()
def perturb(net: nn.Module) -> nn.Module:
    """Random BN statistics/affines, non-identity kernel transforms and O(1) logits, so that a wrong
    slice, a missed running statistic or an untransformed kernel changes the output visibly."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.2)
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
        elif isinstance(m, ElasticDepthwiseConv2d):
            for t in m.transforms.values():
                t.add_(torch.randn_like(t) * 0.1)
        elif isinstance(m, DynamicSE):
            m.reduce.bias.normal_(0, 0.5)
            m.expand.bias.normal_(0, 0.5)
    for lin in (net.head_layers.feature_mix, net.head_layers.classifier):
        nn.init.kaiming_normal_(lin.weight)
    return net


def make_net(seed: int = 0) -> OFAMobileNetV3:
    torch.manual_seed(seed)
    return perturb(OFAMobileNetV3(PRESETS["fmnist_small"], SPACE)).eval()


def archs(space: SearchSpace, n: int, seed: int = 0) -> list[SubnetArch]:
    rng = np.random.default_rng(seed)
    return [space.largest(), space.smallest()] + [space.sample_subnet(rng) for _ in range(n)]


def assert_same_logits(a: torch.Tensor, b: torch.Tensor) -> None:
    a, b = a.detach(), b.detach()
    assert a.abs().max() > 0.1  # outputs large enough for the comparison to mean something
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


def test_layout_follows_spec() -> None:
    net = make_net()
    assert len(net.blocks) == SPACE.units * SPACE.max_depth
    first = [net.blocks[u * 4] for u in range(5)]
    assert [b.spec.stride for b in first] == [u.stride for u in PRESETS["fmnist_small"].units]
    assert [b.has_residual for b in net.blocks[:4]] == [False, True, True, True]
    b = net.blocks[5]  # unit 1, in 24 channels: mid(e) = make_divisible(24 e)
    assert [b.mid(e) for e in (3, 4, 6)] == [72, 96, 144] and b.max_mid == 144
    assert net.blocks[0].expand_conv.weight.shape == (48, 8, 1, 1)
    with pytest.raises(ValueError, match="units"):
        OFAMobileNetV3(PRESETS["fmnist_small"], SearchSpace(units=4, resolutions=(28,)))


def test_spec_validation_names_the_field() -> None:
    spec = PRESETS["fmnist_small"]
    with pytest.raises(ValueError, match=r"units\[2\].width = 30"):
        dataclasses.replace(spec, units=spec.units[:2] + (UnitSpec(30, 1, "relu", False),) + spec.units[3:])
    with pytest.raises(ValueError, match="act in"):
        UnitSpec(32, 1, "gelu", False)


def test_extract_equals_supernet_eval() -> None:
    net = make_net()
    for a in archs(SPACE, 6):
        sub = net.extract(a).eval()
        assert isinstance(sub, StaticSubnet) and sub.resolution == a.resolution
        elastic = (DynamicConv2d, DynamicBatchNorm2d, DynamicSE, ElasticDepthwiseConv2d, ElasticMBConv)
        assert not any(isinstance(m, elastic) for m in sub.modules())
        assert len(sub.blocks) == sum(a.depths)
        x = torch.randn(3, 1, a.resolution, a.resolution)
        assert_same_logits(net(x, a), sub(x))


def test_extract_equals_supernet_train_mode() -> None:
    net = make_net().train()
    rng = np.random.default_rng(1)
    for a in (SPACE.largest(), SPACE.sample_subnet(rng)):
        sub = net.extract(a)
        assert sub.training
        x = torch.randn(8, 1, a.resolution, a.resolution)
        assert_same_logits(net(x, a), sub(x))


def test_extract_copies_sliced_running_stats_and_transformed_kernel() -> None:
    net = make_net()
    a = archs(SPACE, 1, seed=3)[2]
    running = [j for u, d in enumerate(a.depths) for j in range(u * 4, u * 4 + d)]
    i = next(j for j in running if a.kernels[j] == 3)
    sub_block = net.extract(a).blocks[running.index(i)]
    src = net.blocks[i]
    mid = src.mid(a.expands[i])
    dw_conv, dw_bn = sub_block.block[1][0], sub_block.block[1][1]
    assert torch.equal(dw_bn.running_mean, src.depthwise_norm.running_mean[:mid])
    assert torch.equal(dw_conv.weight, src.depthwise.kernel(3, slice(0, mid)))
    assert not torch.equal(dw_conv.weight, src.depthwise.weight[:mid, :, 2:5, 2:5])


def test_sort_channels_preserves_full_width_function() -> None:
    net = make_net()
    rng = np.random.default_rng(2)
    full = [SPACE.largest()] + [dataclasses.replace(a, expands=tuple(6 if e else 0 for e in a.expands))
                                for a in (SPACE.sample_subnet(rng) for _ in range(3))]
    small = SPACE.smallest()
    xs = [torch.randn(3, 1, a.resolution, a.resolution) for a in full + [small]]
    before = [net(x, a) for x, a in zip(xs, full + [small])]
    net.sort_channels()
    for x, a, y in zip(xs, full, before):
        assert_same_logits(y, net(x, a))
    assert not torch.allclose(before[-1], net(xs[-1], small))  # narrow subnets now keep the important channels
    for b in net.blocks:
        imp = b.project_conv.weight.abs().sum((0, 2, 3))
        assert torch.all(imp[:-1] >= imp[1:])
        if b.se is not None:
            se_imp = b.se.expand.weight.abs().sum(0)
            assert torch.all(se_imp[:-1] >= se_imp[1:])


def test_block_pieces_compose_like_a_multistage_block() -> None:
    net = make_net()
    b = net.blocks[5]  # SE, residual, 24 -> 24 channels, hidden up to 144
    assert b.se is not None and b.has_residual
    x = torch.randn(2, 24, 7, 7)
    # hidden channels [72, 144) on their own equal the matching part of [0, 144)
    h_all = b.hidden(x, slice(0, 144), 5)
    torch.testing.assert_close(b.hidden(x, slice(72, 144), 5), h_all[:, 72:])
    # the projection is additive over channel slices (output reuse)
    torch.testing.assert_close(b.project(h_all[:, :72], slice(0, 72)) + b.project(h_all[:, 72:], slice(72, 144)),
                               b.project(h_all, slice(0, 144)), rtol=1e-4, atol=1e-5)
    # the static block is exactly hidden -> SE -> project -> BN -> residual
    ch = slice(0, b.mid(4))
    h = b.hidden(x, ch, 3)
    h = h * b.se_gate(h.mean((2, 3)), ch)
    torch.testing.assert_close(b(x, 3, 4), b.project_bn(b.project(h, ch)) + x)
    with pytest.raises(ValueError, match="no SE"):
        net.blocks[0].se_gate(torch.zeros(1, 48), slice(0, 48))


def test_forward_is_the_stem_blocks_head_path() -> None:
    net = make_net()
    a = SPACE.sample_subnet(np.random.default_rng(4))
    x = torch.randn(2, 1, a.resolution, a.resolution)
    f = net.stem_features(x)
    for u, d in enumerate(a.depths):
        for i in range(u * 4, u * 4 + d):
            f = net.blocks[i](f, a.kernels[i], a.expands[i])
    torch.testing.assert_close(net.head(f), net(x, a))


def test_forward_rejects_bad_inputs() -> None:
    net = make_net()
    a = SPACE.largest()
    with pytest.raises(ValueError, match="resize"):
        net(torch.randn(1, 1, 28, 28), a)
    with pytest.raises(ValueError, match="slot 0"):
        net(torch.randn(1, 1, 32, 32), dataclasses.replace(a, kernels=(4,) + a.kernels[1:]))


def test_resize() -> None:
    x = torch.rand(2, 1, 28, 28)
    assert resize(x, 28) is x and OFAMobileNetV3.resize(x, 28) is x
    assert resize(x, 16).shape == (2, 1, 16, 16) and resize(x, 32).shape == (2, 1, 32, 32)
    flat = torch.full((1, 1, 28, 28), 0.3)
    torch.testing.assert_close(resize(flat, 20), torch.full((1, 1, 20, 20), 0.3))


def test_training_step_reaches_every_used_weight() -> None:
    net = make_net().train()
    a = dataclasses.replace(SPACE.smallest(), kernels=tuple(3 if k else 0 for k in SPACE.smallest().kernels))
    x = torch.randn(4, 1, a.resolution, a.resolution)
    nn.functional.cross_entropy(net(x, a), torch.tensor([0, 1, 2, 3])).backward()
    dw = net.blocks[0].depthwise
    assert dw.transforms["7to5"].grad.abs().sum() > 0 and dw.weight.grad[:, :, 0].abs().sum() == 0
    assert net.blocks[2].expand_conv.weight.grad is None  # depth 2: slot 2 is skipped
    mid = net.blocks[0].mid(3)
    assert net.blocks[0].expand_conv.weight.grad[mid:].abs().sum() == 0


def test_same_seed_same_weights() -> None:
    a, b = make_net(seed=5).state_dict(), make_net(seed=5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ofa_preset_extract_equals_supernet() -> None:
    torch.manual_seed(0)
    net = perturb(OFAMobileNetV3(PRESETS["ofa_mbv3_w1.0"], OFA_SPACE)).eval()
    assert net.blocks[4].se.reduce.weight.shape == (40, 144)  # 24 * 6 hidden, make_divisible(36) SE units
    assert net.head_layers.feature_mix.bias is None
    a = dataclasses.replace(OFA_SPACE.sample_subnet(np.random.default_rng(0)), resolution=128)
    x = torch.randn(1, 3, 128, 128)
    assert_same_logits(net(x, a), net.extract(a).eval()(x))
