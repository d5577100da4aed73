"""Elastic ops: every slicing rule against the plain torch layer it must equal."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import SqueezeExcitation

from enas4d.ops import DynamicBatchNorm2d, DynamicConv2d, DynamicSE, ElasticDepthwiseConv2d, activation, make_divisible

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_make_divisible_follows_ofa() -> None:
    assert [make_divisible(v) for v in (48, 52, 60, 16 * 6, 3, 10, 100)] == [48, 56, 64, 96, 8, 16, 104]
    assert make_divisible(10) == 16  # 8 would lose more than 10% of 10
    assert make_divisible(3, 8, min_value=4) == 4


def test_activation_names() -> None:
    x = torch.linspace(-5, 5, 11)
    assert torch.equal(activation("hswish")(x), x * F.relu6(x + 3) / 6)
    with pytest.raises(ValueError, match="swish"):
        activation("swish")


def test_dynamic_conv_slices_rows_and_columns() -> None:
    conv = DynamicConv2d(12, 20, kernel_size=3, stride=2)
    x = torch.randn(2, 5, 9, 9)
    y = conv(x, out=slice(4, 11), in_=slice(3, 8))
    ref = F.conv2d(x, conv.weight[4:11, 3:8], stride=2, padding=1)
    assert y.shape == (2, 7, 5, 5)
    torch.testing.assert_close(y, ref)
    # default: all rows, the first x.size(1) columns
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight[:, :5], stride=2, padding=1))


def test_dynamic_conv_permutation_moves_rows_and_columns() -> None:
    conv = DynamicConv2d(4, 6)
    w = conv.weight.detach().clone()
    conv.permute_out(torch.tensor([5, 4, 3, 2, 1, 0]))
    conv.permute_in(torch.tensor([1, 0, 3, 2]))
    assert torch.equal(conv.weight, w.flip(0)[:, [1, 0, 3, 2]])


def test_kernel_transform_identity_init_is_centre_crop() -> None:
    dw = ElasticDepthwiseConv2d(6, (3, 5, 7))
    w7 = dw.weight.detach()
    assert set(dw.transforms) == {"7to5", "5to3"}
    assert dw.transforms["7to5"].shape == (25, 25) and dw.transforms["5to3"].shape == (9, 9)
    ch = slice(1, 5)
    assert torch.equal(dw.kernel(7, ch), w7[ch])
    assert torch.equal(dw.kernel(5, ch), w7[ch, :, 1:6, 1:6])
    assert torch.equal(dw.kernel(3, ch), w7[ch, :, 2:5, 2:5])


def test_kernel_transform_is_chained_and_learnable() -> None:
    dw = ElasticDepthwiseConv2d(4, (3, 5, 7))
    with torch.no_grad():
        dw.transforms["7to5"].copy_(torch.randn(25, 25))
        dw.transforms["5to3"].copy_(torch.randn(9, 9))
    m75, m53 = dw.transforms["7to5"].detach(), dw.transforms["5to3"].detach()
    w = dw.weight.detach()
    k5 = (w[:, :, 1:6, 1:6].reshape(4, 25) @ m75.T).view(4, 1, 5, 5)  # OFA: F.linear(flat, M)
    k3 = (k5[:, :, 1:4, 1:4].reshape(4, 9) @ m53.T).view(4, 1, 3, 3)  # 3x3 from the transformed 5x5
    torch.testing.assert_close(dw.kernel(5, slice(0, 4)), k5)
    torch.testing.assert_close(dw.kernel(3, slice(0, 4)), k3)
    x = torch.randn(2, 4, 6, 6)
    dw(x, 3, slice(0, 4)).square().sum().backward()
    assert dw.transforms["7to5"].grad.abs().sum() > 0 and dw.transforms["5to3"].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="kernel 4"):
        dw.kernel(4, slice(0, 4))


def test_depthwise_forward_matches_plain_conv() -> None:
    dw = ElasticDepthwiseConv2d(10, (3, 5, 7), stride=2)
    x = torch.randn(2, 4, 9, 9)
    for k in (3, 5, 7):
        ref = F.conv2d(x, dw.kernel(k, slice(3, 7)), stride=2, padding=k // 2, groups=4)
        torch.testing.assert_close(dw(x, k, slice(3, 7)), ref)
        assert ref.shape[-1] == 5


@pytest.mark.parametrize("side, stride", [(1, 1), (2, 1), (2, 2), (3, 2), (4, 1)])
def test_depthwise_on_small_maps_equals_the_full_kernel(side: int, stride: int) -> None:
    dw = ElasticDepthwiseConv2d(6, (3, 5, 7), stride=stride)
    x = torch.randn(2, 6, side, side, requires_grad=True)
    for k in (3, 5, 7):
        w = dw.kernel(k, slice(0, 6))
        ref = F.conv2d(x, w, stride=stride, padding=k // 2, groups=6)
        y = dw(x, k, slice(0, 6))
        torch.testing.assert_close(y, ref)
        g = torch.randn_like(ref)
        torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def _randomize_bn(bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)


def test_dynamic_bn_eval_uses_sliced_stats() -> None:
    bn = DynamicBatchNorm2d(10).eval()
    _randomize_bn(bn)
    ref = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(ref, name).copy_(getattr(bn, name)[3:7])
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(bn(x, slice(3, 7)), ref(x))


def test_dynamic_bn_train_uses_batch_stats_and_updates_only_its_slice() -> None:
    bn = DynamicBatchNorm2d(10, momentum=0.5).train()
    _randomize_bn(bn)
    before = {n: getattr(bn, n).clone() for n in ("running_mean", "running_var")}
    x = torch.randn(8, 4, 5, 5) * 3 + 2
    y = bn(x, slice(3, 7))
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    ref = (x - mean[:, None, None]) / (var[:, None, None] + bn.eps).sqrt() * bn.weight[3:7, None, None] \
        + bn.bias[3:7, None, None]
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_mean[3:7], 0.5 * before["running_mean"][3:7] + 0.5 * mean)
    torch.testing.assert_close(bn.running_var[3:7], 0.5 * before["running_var"][3:7] + 0.5 * x.var((0, 2, 3)))
    outside = torch.tensor([0, 1, 2, 7, 8, 9])
    for n, t in before.items():
        assert torch.equal(getattr(bn, n)[outside], t[outside])
    assert int(bn.num_batches_tracked) == 1


def test_dynamic_bn_cumulative_average_for_recalibration() -> None:
    bn = DynamicBatchNorm2d(6).train()
    bn.reset_running_stats()
    bn.momentum = None  # cumulative moving average, as BN recalibration uses
    xs = [torch.randn(4, 3, 5, 5) + i for i in range(3)]
    for x in xs:
        bn(x, slice(0, 3))
    torch.testing.assert_close(bn.running_mean[:3], torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0))


def test_dynamic_se_full_width_equals_torchvision_se() -> None:
    se = DynamicSE(32)
    mid = 24
    m = se.mid(mid)
    assert se.mid(32) == 8 and m == 8
    ref = SqueezeExcitation(mid, m, scale_activation=nn.Hardsigmoid)
    with torch.no_grad():
        se.reduce.bias.normal_()
        se.expand.bias.normal_()
        ref.fc1.weight.copy_(se.reduce.weight[:m, :mid, None, None])
        ref.fc1.bias.copy_(se.reduce.bias[:m])
        ref.fc2.weight.copy_(se.expand.weight[:mid, :m, None, None])
        ref.fc2.bias.copy_(se.expand.bias[:mid])
    h = torch.randn(2, mid, 4, 4)
    torch.testing.assert_close(h * se(h.mean((2, 3)), slice(0, mid)), ref(h))


def test_dynamic_se_input_reuse_gate_reads_all_channels_so_far() -> None:
    se = DynamicSE(96)
    pooled = torch.randn(2, 72)
    gate = se(pooled, slice(48, 72))
    m = make_divisible(72 // 4)
    y = F.relu(pooled @ se.reduce.weight[:m, :72].T + se.reduce.bias[:m])
    ref = F.hardsigmoid(y @ se.expand.weight[48:72, :m].T + se.expand.bias[48:72])
    assert gate.shape == (2, 24, 1, 1)
    torch.testing.assert_close(gate[:, :, 0, 0], ref)
    # the gate of channels [48, 72) equals the matching rows of the gate of [0, 72)
    torch.testing.assert_close(gate, se(pooled, slice(0, 72))[:, 48:72])
    with pytest.raises(ValueError, match="needs 72"):
        se(pooled[:, :48], slice(48, 72))
