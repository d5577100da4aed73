"""The three multi-stage convolutions against a direct, channel-by-channel computation of the paper's equations."""

import pytest
import torch
import torch.nn.functional as F

from enas4d.multistage import IndependentConv, InputReuseConv, OutputReuseConv

torch.set_num_threads(1)


def conv1(x: torch.Tensor, w: torch.Tensor, stride: int) -> torch.Tensor:
    """CONV(W_ji, X_i): one input channel (N x H x W) with one K x K filter."""
    return F.conv2d(x[:, None], w[None, None], stride=stride, padding=w.shape[-1] // 2)[:, 0]


def direct(x: torch.Tensor, w: torch.Tensor, stride: int) -> torch.Tensor:
    """Y_j = sum_i CONV(W_ji, X_i), looping over every output and input channel."""
    return torch.stack([sum(conv1(x[:, i], w[j, i], stride) for i in range(w.shape[1]))
                        for j in range(w.shape[0])], 1)


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("stride", [1, 2])
def test_independent(stages: int, stride: int) -> None:
    g = torch.Generator().manual_seed(stages * 10 + stride)
    ins, outs, ks = [3, 2, 4, 1][:stages], [2, 3, 1, 2][:stages], [3, 5, 1, 7][:stages]
    ws = [torch.randn(o, c, k, k, generator=g) for o, c, k in zip(outs, ins, ks)]
    bs = [torch.randn(o, generator=g) for o in outs]
    conv = IndependentConv(ws, bs, stride=stride)
    for s in range(stages):
        x = torch.randn(2, ins[s], 9, 9, generator=g)
        want = direct(x, ws[s], stride) + bs[s][:, None, None]
        torch.testing.assert_close(conv(x, s), want)


@pytest.mark.parametrize("stages", [1, 3, 4])
def test_independent_depthwise(stages: int) -> None:
    """Depthwise: channel j of stage s sees only input channel j of stage s, with the stage's kernel."""
    g = torch.Generator().manual_seed(stages)
    widths, ks = [4, 2, 3, 1][:stages], [3, 7, 5, 3][:stages]
    ws = [torch.randn(c, 1, k, k, generator=g) for c, k in zip(widths, ks)]
    conv = IndependentConv(ws, stride=2, depthwise=True)
    for s in range(stages):
        x = torch.randn(2, widths[s], 10, 10, generator=g)
        want = torch.stack([conv1(x[:, j], ws[s][j, 0], 2) for j in range(widths[s])], 1)
        torch.testing.assert_close(conv(x, s), want)


def test_independent_stage_without_filters() -> None:
    conv = IndependentConv([torch.randn(2, 3, 1, 1), None])
    with pytest.raises(ValueError, match="stage 1 has no filters"):
        conv(torch.randn(1, 3, 4, 4), 1)


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_input_reuse(stages: int) -> None:
    """Y^s_j = sum_{k<=s} sum_i CONV(W^{ks}_ji, X^k_i), with W^{ks} the k-th column block of weights[s]."""
    g = torch.Generator().manual_seed(stages)
    ins, outs = [3, 1, 2, 4][:stages], [2, 4, 3, 1][:stages]
    ws = [torch.randn(outs[s], sum(ins[:s + 1]), 3, 3, generator=g) for s in range(stages)]
    bs = [torch.randn(o, generator=g) for o in outs]
    conv = InputReuseConv(ws, bs)
    xs = [torch.randn(2, c, 6, 6, generator=g) for c in ins]
    for s in range(stages):
        off = [sum(ins[:k]) for k in range(s + 2)]
        want = sum(direct(xs[k], ws[s][:, off[k]:off[k + 1]], 1) for k in range(s + 1)) + bs[s][:, None, None]
        torch.testing.assert_close(conv(xs[:s + 1], s), want)


def test_input_reuse_channel_mismatch() -> None:
    conv = InputReuseConv([torch.randn(2, 3, 1, 1), torch.randn(2, 5, 1, 1)])
    with pytest.raises(ValueError, match="stage 1: inputs have 3 channels, weight expects 5"):
        conv([torch.randn(1, 3, 2, 2)], 1)


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_output_reuse(stages: int) -> None:
    """Y^s = sum_i CONV(W^{ss}_ji, X^s_i) + Y^{s-1}; a stage without input channels repeats Y^{s-1}."""
    g = torch.Generator().manual_seed(stages)
    ins = [3, 0, 2, 1][:stages]
    ws = [torch.randn(4, c, 1, 1, generator=g) if c else None for c in ins]
    conv = OutputReuseConv(ws, stride=2)
    prev = want = None
    for s in range(stages):
        x = torch.randn(2, ins[s], 8, 8, generator=g) if ins[s] else None
        own = direct(x, ws[s], 2) if ins[s] else 0
        want = own if want is None else want + own
        prev = conv(x, s, prev)
        torch.testing.assert_close(prev, want)


def test_output_reuse_widths_must_match() -> None:
    with pytest.raises(ValueError, match="same output channels"):
        OutputReuseConv([torch.randn(4, 2, 1, 1), torch.randn(3, 2, 1, 1)])


def test_bad_kernel_shape() -> None:
    with pytest.raises(ValueError, match="IndependentConv stage 0: weight must be"):
        IndependentConv([torch.randn(2, 3, 2, 2)])
