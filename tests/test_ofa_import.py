"""OFA checkpoint import: a state dict in OFA's key format loads exactly, every bad file fails by name."""

import dataclasses

import numpy as np
import pytest
import torch

from enas4d.space import SearchSpace
from enas4d.supernet import PRESETS, OFAMobileNetV3, load_ofa_state_dict, to_ofa_state_dict

torch.set_num_threads(1)
SPACE = SearchSpace(units=5, resolutions=tuple(range(128, 225, 16)))
BLOCK1 = "blocks.1.conv"  # OFA's blocks.0 is the static first block; slot 0 is its blocks.1


def fresh(seed: int) -> OFAMobileNetV3:
    torch.manual_seed(seed)
    return OFAMobileNetV3(PRESETS["ofa_mbv3_w1.0"], SPACE).eval()


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, torch.Tensor]:
    """An OFA-format state dict of a random w1.0 supernet with random BN statistics and kernel transforms."""
    sd = to_ofa_state_dict(fresh(0))
    g = torch.Generator().manual_seed(1)
    for k, v in sd.items():
        if k.endswith("running_var"):
            v.uniform_(0.5, 2.0, generator=g)
        elif k.endswith(("running_mean", "bn.bias", "_matrix")) or k.startswith(("classifier", "feature_mix")):
            v.add_(torch.randn(v.shape, generator=g) * 0.1)
    return sd


def test_keys_follow_ofa_names(checkpoint: dict[str, torch.Tensor]) -> None:
    # 475 = stem 6 + first block 12 + 20 blocks (20 keys, 24 with SE) + final_expand 6 + feature_mix 1 + classifier 2
    assert len(checkpoint) == 475
    shapes = {
        "first_conv.conv.weight": (16, 3, 3, 3),
        "first_conv.bn.running_var": (16,),
        "blocks.0.conv.depth_conv.conv.weight": (16, 1, 3, 3),
        "blocks.0.conv.point_linear.bn.weight": (16,),
        "blocks.1.conv.inverted_bottleneck.conv.conv.weight": (96, 16, 1, 1),
        "blocks.1.conv.inverted_bottleneck.bn.bn.running_mean": (96,),
        "blocks.1.conv.depth_conv.conv.conv.weight": (96, 1, 7, 7),
        "blocks.1.conv.depth_conv.conv.7to5_matrix": (25, 25),
        "blocks.1.conv.depth_conv.conv.5to3_matrix": (9, 9),
        "blocks.5.conv.depth_conv.se.fc.reduce.weight": (40, 144, 1, 1),
        "blocks.5.conv.depth_conv.se.fc.expand.bias": (144,),
        "blocks.20.conv.point_linear.conv.conv.weight": (160, 960, 1, 1),
        "blocks.20.conv.point_linear.bn.bn.num_batches_tracked": (),
        "final_expand_layer.conv.weight": (960, 160, 1, 1),
        "final_expand_layer.bn.weight": (960,),
        "feature_mix_layer.conv.weight": (1280, 960, 1, 1),
        "classifier.linear.weight": (1000, 1280),
        "classifier.linear.bias": (1000,),
    }
    for k, shape in shapes.items():
        assert tuple(checkpoint[k].shape) == shape, k
    assert "blocks.1.conv.depth_conv.se.fc.reduce.weight" not in checkpoint  # unit 24: no SE
    assert "feature_mix_layer.conv.bias" not in checkpoint and "feature_mix_layer.bn.weight" not in checkpoint


def test_round_trip_gives_the_same_network(checkpoint: dict[str, torch.Tensor], tmp_path) -> None:
    path = tmp_path / "ofa.pth"
    torch.save({"state_dict": checkpoint, "epoch": 3}, path)
    a, b = fresh(1), fresh(2)
    load_ofa_state_dict(a, checkpoint)
    load_ofa_state_dict(b, path)
    exported = to_ofa_state_dict(b)
    assert exported.keys() == checkpoint.keys()
    assert all(torch.equal(exported[k], checkpoint[k]) for k in checkpoint)
    assert torch.equal(b.blocks[0].expand_conv.weight, checkpoint[f"{BLOCK1}.inverted_bottleneck.conv.conv.weight"])
    assert torch.equal(b.blocks[19].depthwise.transforms["5to3"],
                       checkpoint["blocks.20.conv.depth_conv.conv.5to3_matrix"])
    rng = np.random.default_rng(0)
    x = torch.randn(2, 3, 128, 128)
    for arch in (SPACE.largest(), SPACE.sample_subnet(rng)):
        arch = dataclasses.replace(arch, resolution=128)
        y = b(x, arch)
        assert y.abs().max() > 0.1
        torch.testing.assert_close(a(x, arch), y)
    assert not torch.allclose(fresh(1)(x, arch), b(x, arch))


def test_old_block_name_and_missing_batch_counters_are_accepted(checkpoint: dict[str, torch.Tensor]) -> None:
    old = {k.replace("blocks.3.conv.", "blocks.3.mobile_inverted_conv."): v for k, v in checkpoint.items()
           if not k.endswith("num_batches_tracked")}
    net = fresh(1)
    load_ofa_state_dict(net, old)
    assert torch.equal(net.blocks[2].project_norm.running_var,
                       checkpoint["blocks.3.conv.point_linear.bn.bn.running_var"])


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("blocks.7.conv.depth_conv.conv.7to5_matrix"),
     "missing key 'blocks.7.conv.depth_conv.conv.7to5_matrix'"),
    (lambda sd: sd.update({"blocks.21.conv.point_linear.conv.conv.weight": torch.zeros(1)}),
     "unexpected key 'blocks.21.conv.point_linear.conv.conv.weight'"),
    (lambda sd: sd.update({"classifier.linear.weight": torch.zeros(10, 1280)}),
     r"key 'classifier.linear.weight' has shape \(10, 1280\), expected \(1000, 1280\)"),
    (lambda sd: sd.update({"blocks.3.mobile_inverted_conv.point_linear.bn.bn.bias":
                           sd["blocks.3.conv.point_linear.bn.bn.bias"]}),
     "given twice"),
])
def test_bad_checkpoints_fail_naming_the_key(checkpoint: dict[str, torch.Tensor], edit, message: str) -> None:
    sd = dict(checkpoint)
    edit(sd)
    net = fresh(1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        load_ofa_state_dict(net, sd)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # nothing half-loaded


def test_not_a_state_dict(tmp_path) -> None:
    path = tmp_path / "list.pth"
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match="list.pth: expected a state dict"):
        load_ofa_state_dict(fresh(0), path)
