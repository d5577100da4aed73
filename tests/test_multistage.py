"""Multi-stage network: stage 1 == static subnet, incremental == from scratch == a naive reference, export,
early exit, per-stage MACs == flop counter."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from enas4d import cost
from enas4d.multistage import MultiStageNet, Plan
from enas4d.space import MultiStageArch, SearchSpace, SubnetArch
from enas4d.supernet import PRESETS, OFAMobileNetV3

torch.set_num_threads(1)
SPEC = PRESETS["fmnist_small"]
RES = (16, 20)


@pytest.fixture(autouse=True)
def no_grad():
    """Inference by default (faster); the gradient test turns autograd back on."""
    with torch.no_grad():
        yield


@functools.cache
def make(stages: int) -> tuple[OFAMobileNetV3, SearchSpace, MultiStageNet]:
    """An eval-mode supernet whose activations stay O(1): random BN affine, kernel transforms, classifier,
    then BN statistics measured on the largest subnet (so slicing mistakes show up as large errors)."""
    torch.manual_seed(stages)
    space = SearchSpace(units=len(SPEC.units), resolutions=RES, stages=stages)
    net = OFAMobileNetV3(SPEC, space)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "transforms" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif "norm" in name or ".1." in name and p.dim() == 1:
                p.copy_(torch.rand_like(p) + 0.5 if name.endswith("weight") else 0.3 * torch.randn_like(p))
        torch.nn.init.normal_(net.head_layers.classifier.weight, 0, 0.3)
        net.add_stage_heads(stages)  # each stage its own prediction layer, made to differ from the others
        for head in net.stage_heads:
            torch.nn.init.normal_(head.classifier.weight, 0, 0.3)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        net.train()(torch.randn(64, 1, max(RES), max(RES)), space.largest())
    net.eval()
    return net, space, MultiStageNet(net).eval()


def fresh(stages: int) -> tuple[OFAMobileNetV3, MultiStageNet]:
    """A private copy of ``make``'s supernet, for tests that change weights or BN statistics."""
    net = copy.deepcopy(make(stages)[0])
    return net, MultiStageNet(net).eval()


def archs(space: SearchSpace, n: int, seed: int) -> list[MultiStageArch]:
    rng = np.random.default_rng(seed)
    return [space.sample(rng) for _ in range(n)]


def image(arch: MultiStageArch | SubnetArch, n: int = 4, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, arch.resolution, arch.resolution, generator=g)


def reference(net: OFAMobileNetV3, x: Tensor, arch: MultiStageArch, restart: bool = True) -> list[Tensor]:
    """DESIGN.md's semantics, naively: for each stage s, recompute stages 1..s from the stem features.

    With ``restart``, a stage that already added channels upstream recomputes every block without residual
    whole from its own input instead of adding to the previous stage's sum."""
    out = []
    for s in range(arch.num_stages):
        feats = [net.stem_features(x)] * (s + 1)
        diverged = [False] * (s + 1)
        for i, blk in enumerate(net.blocks):
            z, pooled = None, []
            for k in range(s + 1):
                e = arch.expands[k][i]
                if not e:  # stage k skips this block
                    continue
                prev = arch.expands[k - 1][i] if k else 0
                ch = slice(blk.mid(prev) if prev else 0, blk.mid(e))
                if restart and k and diverged[k] and not blk.has_residual:
                    z, pooled, ch = None, [], slice(0, blk.mid(e))
                diverged[k] = diverged[k] or blk.mid(e) > (blk.mid(prev) if prev else 0)
                if ch.stop > ch.start:
                    h = blk.hidden(feats[k], ch, arch.kernels[k][i])
                    if blk.se is not None:
                        pooled.append(h.mean((2, 3)))
                        h = h * blk.se_gate(torch.cat(pooled, 1), ch)
                    z = blk.project(h, ch) if z is None else z + blk.project(h, ch)
                y = blk.project_bn(z)
                feats[k] = y + feats[k] if blk.has_residual else y
        out.append(net.stage_head(s)(feats[s]))
    return out


def close(a: list[Tensor], b: list[Tensor]) -> None:
    assert len(a) == len(b)
    for s, (u, v) in enumerate(zip(a, b)):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4, msg=lambda m: f"stage {s + 1}: {m}")


def incremental(start, run_stage, *args) -> list[Tensor]:
    cache = start(*args)
    return [run_stage(cache) for _ in range(cache.num_stages)]


def handmade(space: SearchSpace) -> list[MultiStageArch]:
    """Depth catch-up everywhere (D = 2, 3, 4), equal widths (no new channels), and mixes of both."""
    def stage(depth: int, kernels: tuple[int, ...], expand: int) -> SubnetArch:
        """Every unit alike: ``depth`` blocks, block ``j`` with kernel ``kernels[j]``."""
        return SubnetArch(RES[0], (depth,) * space.units,
                          tuple(kernels[j] if j < depth else 0 for _ in range(space.units) for j in range(space.max_depth)),
                          tuple(expand if j < depth else 0 for _ in range(space.units) for j in range(space.max_depth)))
    # a stage that adds no channels to a block repeats its kernel (canonical form, SearchSpace.check)
    three = [
        [stage(2, (3,) * 4, 3), stage(3, (5,) * 4, 4), stage(4, (7,) * 4, 6)],  # catch-up everywhere, new channels everywhere
        [stage(2, (5,) * 4, 4)] * 3,  # equal widths: stages 2, 3 add nothing
        [stage(2, (7,) * 4, 6), stage(3, (7, 7, 3, 3), 6), stage(4, (7, 7, 3, 5), 6)],  # catch-up blocks only
    ]
    return [MultiStageArch.from_stages(a[:space.stages] + [a[-1]] * (space.stages - 3)) for a in three]


# ---------------------------------------------------------------------------------------------- equivalences


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_stage1_is_the_static_subnet(stages: int) -> None:
    net, space, ms = make(stages)
    for a in archs(space, 3, stages):
        x = image(a)
        want = net(x, a.stage(0))
        torch.testing.assert_close(ms(x, a)[0], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ms.run_stage(ms.start(x, a)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_forward_and_incremental_match_the_reference(stages: int) -> None:
    net, space, ms = make(stages)
    for a in archs(space, 6, 10 + stages) + handmade(space):
        x = image(a)
        want = reference(net, x, a)
        close(ms(x, a), want)
        close(incremental(ms.start, ms.run_stage, x, a), want)


def test_handmade_archs_exercise_catch_up_and_empty_slices() -> None:
    """The cases the incremental test must cover really occur in the plans it runs."""
    net, space, ms = make(3)
    steps = [(s, st) for a in handmade(space) for s, stage in enumerate(ms.plan(a).stages) for st in stage]
    assert any(s > 0 and st.start == 0 for s, st in steps)  # a block first run by a later stage
    assert any(s > 0 and not st.new for s, st in steps)  # a stage that adds no channels to a block


def test_largest_multistage_repeats_the_largest_subnet() -> None:
    """All width in stage 1 and equal depths: later stages add nothing, so every stage is the static net
    (given the same prediction layer: each stage has its own)."""
    space = make(3)[1]
    net, ms = fresh(3)
    for head in net.stage_heads:
        head.load_state_dict(net.head_layers.state_dict())
    a = space.largest_multistage()
    x = image(a)
    want = net(x, space.largest())
    for out in incremental(ms.start, ms.run_stage, x, a):
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_stage_slice() -> None:
    """forward is the training path: a later stage's own hidden channels get gradients through its loss."""
    space = make(3)[1]
    net, ms = fresh(3)
    a = handmade(space)[0]
    with torch.enable_grad():
        sum(o.square().mean() for o in ms.train()(image(a, 8), a)).backward()
    blk = net.blocks[0]
    ch3 = ms.plan(a).stages[2][0].channels  # stage 3's new channels of the first block
    assert blk.expand_conv.weight.grad[ch3].abs().sum() > 0
    assert blk.project_conv.weight.grad[:, ch3].abs().sum() > 0
    assert blk.expand_conv.weight.grad[blk.mid(6):].abs().sum() == 0  # never-used channels stay untouched


# ---------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("stages", [1, 3, 4])
def test_export_matches_the_supernet_view(stages: int) -> None:
    """In float64: random weights make some archs' logits large (~2000) and ill-conditioned, where float32
    rounding alone differs by ~2e-4 relative between two correct computations."""
    net, space, _ = make(stages)
    ms = MultiStageNet(copy.deepcopy(net).double()).eval()
    for a in archs(space, 3, 20 + stages) + handmade(space)[:1]:
        x = image(a).double()
        want = ms(x, a)
        ex = ms.export(a).double()
        assert not ex.training
        close(ex(x), want)
        close(incremental(ex.start, ex.run_stage, x), want)
        assert not any(isinstance(m, OFAMobileNetV3) for m in ex.modules())


def test_export_is_standalone_with_bn_per_block_and_stage() -> None:
    space = make(3)[1]
    net, ms = fresh(3)
    a = handmade(space)[1]  # equal widths and depths: stages share every projection but not their BN
    x = image(a)
    ex = ms.export(a)
    before = ex(x)
    last = ms.plan(a).stages[1][-1].slot
    with torch.no_grad():
        net.blocks[last].project_norm.bias.add_(1.0)  # the supernet changes: the export must not see it
        after_supernet_change = ex(x)
        ex.blocks[str(last)].project_norm["1"].bias.add_(1.0)  # stage 2's own BN of the last block
    close(after_supernet_change, before)
    after = ex(x)
    torch.testing.assert_close(after[0], before[0])
    torch.testing.assert_close(after[2], before[2])
    assert (after[1] - before[1]).abs().max() > 1e-3


def test_torch_export() -> None:
    net, space, ms = make(3)
    a = archs(space, 1, 30)[0]
    x = image(a)
    ex = ms.export(a)
    program = torch.export.export(ex, (x,))
    close(program.module()(x), ms(x, a))


# ---------------------------------------------------------------------------------------------- early exit


def split(conf: Tensor) -> float:
    """A threshold in the widest gap between the middle confidences: about half the batch is above it, and
    no confidence is within float noise of it (the early-exit batch is smaller, so its sums may round differently)."""
    c = conf.sort().values
    n = len(c)
    k = max(range(n // 4, 3 * n // 4), key=lambda i: c[i + 1] - c[i])
    return float(c[k] + c[k + 1]) / 2


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_early_exit_picks_the_first_confident_stage(stages: int) -> None:
    net, space, ms = make(stages)
    for a in archs(space, 3, 40 + stages):
        x = image(a, 16)
        outs = ms(x, a)
        conf = torch.stack([o.softmax(1).max(1).values for o in outs], 1)  # [N, S]
        thresholds = [split(conf[:, s]) for s in range(stages - 1)]
        first = [next((s for s in range(stages - 1) if conf[n, s] > thresholds[s]), stages - 1) for n in range(16)]
        want_pred = torch.stack([outs[s][n].argmax() for n, s in enumerate(first)])
        macs = cost.stage_macs(SPEC, a)
        for res in (ms.early_exit(x, a, thresholds), ms.export(a).early_exit(x, thresholds)):
            assert res.exit_stage.tolist() == first
            assert torch.equal(res.pred, want_pred)
            assert res.macs.tolist() == [macs[s] for s in first]
        assert len(set(first)) > 1  # the batch really shrank on the way


def test_thresholds_one_and_zero() -> None:
    net, space, ms = make(3)
    a = archs(space, 1, 50)[0]
    x = image(a, 8)
    outs, macs = ms(x, a), cost.stage_macs(SPEC, a)
    last = ms.early_exit(x, a, [1.0, 1.0])
    assert last.exit_stage.tolist() == [2] * 8 and last.macs.tolist() == [macs[2]] * 8
    assert torch.equal(last.pred, outs[2].argmax(1))
    first = ms.early_exit(x, a, [0.0, 0.0])
    assert first.exit_stage.tolist() == [0] * 8 and first.macs.tolist() == [macs[0]] * 8
    assert torch.equal(first.pred, outs[0].argmax(1))


# ---------------------------------------------------------------------------------------------- MACs


def counted_macs(start, run_stage, *args) -> list[int]:
    """Cumulative MACs per stage of the incremental path, measured by FlopCounterMode (flops / 2).

    Measured on the export, the network the MACs describe: the supernet view also counts its per-call
    kernel transforms and may crop kernels larger than tiny maps (supernet internals, not the arch's cost).
    """
    total, out = 0, []
    with FlopCounterMode(display=False) as fc:
        cache = start(*args)
    total += fc.get_total_flops()
    for _ in range(cache.num_stages):
        with FlopCounterMode(display=False) as fc:
            run_stage(cache)
        total += fc.get_total_flops()
        out.append(total // 2)
    return out


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_stage_macs_equal_the_flop_counter(stages: int) -> None:
    net, space, ms = make(stages)
    for a in archs(space, 1, 60 + stages) + handmade(space)[:1]:
        n = 3
        x = image(a, n)
        want = cost.stage_macs(SPEC, a)
        ex = ms.export(a)
        assert counted_macs(ex.start, ex.run_stage, x) == [n * m for m in want]
        assert ex.stage_macs == want


def test_stage_macs_of_stage_one_is_the_static_subnet() -> None:
    _, space, _ = make(3)
    for a in archs(space, 5, 70):
        assert cost.stage_macs(SPEC, a)[0] == cost.subnet_macs(SPEC, a.stage(0))


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_have_clear_errors() -> None:
    net, space, ms = make(3)
    a = archs(space, 1, 80)[0]
    x = image(a)
    with pytest.raises(ValueError, match="call enas4d.supernet.resize"):
        ms(image(SubnetArch(RES[1] if a.resolution == RES[0] else RES[0], (), (), ())), a)
    with pytest.raises(ValueError, match="3 stages need 2 thresholds"):
        ms.early_exit(x, a, [0.5])
    cache = ms.start(x, a)
    for _ in range(3):
        ms.run_stage(cache)
    with pytest.raises(ValueError, match="all 3 stages of this cache already ran"):
        ms.run_stage(cache)
    with pytest.raises(ValueError, match="started by another network"):
        ms.export(a).run_stage(ms.start(x, a))
    with pytest.raises(ValueError, match="early_exit needs eval mode"):
        fresh(3)[1].train().early_exit(x, a, [0.5, 0.5])
    bad = MultiStageArch(a.resolution, (a.depths[2], a.depths[0], a.depths[2]), a.kernels, a.expands)
    with pytest.raises(ValueError, match="stage"):
        ms(x, bad)


def test_plan_slices_follow_cumulative_widths() -> None:
    _, space, ms = make(3)
    a = handmade(space)[0]
    plan = ms.plan(a)
    assert isinstance(plan, Plan)
    first = [st for st in plan.stages[0] if st.slot == 0][0]
    second = [st for st in plan.stages[1] if st.slot == 0][0]
    assert (first.start, first.stop) == (0, make(3)[0].blocks[0].mid(3))
    assert (second.start, second.stop) == (first.stop, make(3)[0].blocks[0].mid(4))
    caught_up = [st for st in plan.stages[1] if st.slot == 2][0]  # unit 0, block 2: first run by stage 2
    assert caught_up.start == 0
