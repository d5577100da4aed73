"""Table 4's timing on the deployment: every net runs as an ONNX Runtime folder and as eager PyTorch in the same
rounds, the two give the same answers, and static_vs_dynamic.json judges the runtime with eager beside it."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from enas4d import cost, data, evaluate, latency, table4
from enas4d.multistage import MultiStageNet
from enas4d.space import SearchSpace
from enas4d.supernet import PRESETS, OFAMobileNetV3

SPEC = PRESETS["fmnist_small"]


@pytest.fixture(scope="module")
def timed() -> tuple[list[dict], dict, dict]:
    torch.manual_seed(0)
    space = SearchSpace(units=len(SPEC.units), resolutions=(24, 28), stages=3)
    msnet = MultiStageNet(OFAMobileNetV3(SPEC, space)).eval()
    calib = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    rng = np.random.default_rng(0)
    arch, dyn_arch, static = space.sample(rng), space.sample(rng), space.sample_subnet(rng)
    # T = 1 never exits, T = 0 always: every image leaves after stage 2 whatever the float rounding
    best = types.SimpleNamespace(thresholds=(1.0, 0.0), cost=1.0)
    searched = [{"target": 1.0, "arch": arch, "net": evaluate.deploy(msnet, arch, calib, 64), "best": best,
                 "stage_ms": np.array([0.5, 0.8, 1.1])}]
    sd = {"static_arch": static, "static_net": evaluate.deploy(msnet, static, calib, 64),
          "static": {"macs": 2_000_000, "target_mmacs": 2.0, "metric_top1": 0.5, "test_top1": 0.5},
          "dynamic": {"arch": dyn_arch, "point": types.SimpleNamespace(thresholds=(0.0, 0.0), acc=0.5, cost=1e6),
                      "reached": True, "target_mmacs": 1.0,
                      "test": types.SimpleNamespace(top1=0.5, avg_macs=1e6, exit_stage=np.zeros(4, int))},
          "dynamic_net": evaluate.deploy(msnet, dyn_arch, calib, 64),
          "cascade_ceiling": {"macs_ratio": 0.7, "top1": 0.5}}
    lut = latency.LatencyTable({}, {}, "thread_cpu", {"backend": "onnxruntime", "onnxruntime": "1",
                                                      "machine": {"torch": "2", "cpu": "cpu"}})
    split = types.SimpleNamespace(classes=[f"c{i}" for i in range(SPEC.num_classes)], mean=(0.3,), std=(0.35,))
    images = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    out = table4.time_deployed(searched, sd, images, lut, split, threads=1, warmup=1)
    return searched, sd, {"timed": out, "lut": lut}


def test_every_net_is_timed_as_deployed_and_as_eager_with_the_same_answers(timed) -> None:
    searched, _, got = timed
    out = got["timed"]
    assert sorted(out) == ["dynamic", "dynamic-eager", "static", "static-eager", "table4-0", "table4-0-eager"]
    for name in ("table4-0", "dynamic"):
        runtime, eager = out[name][1], out[f"{name}-eager"][1]
        assert [r.pred.item() for r in runtime] == [r.pred.item() for r in eager]
        assert [r.exit_stage.item() for r in runtime] == [r.exit_stage.item() for r in eager]
    assert [r.pred.item() for r in out["static"][1]] == [r.argmax(1).item() for r in out["static-eager"][1]]
    s = searched[0]
    assert s["same_exits"] == 1.0 and s["lut_timed_ms"] == pytest.approx(0.8)  # all left after stage 2
    assert s["measured_ms"] == pytest.approx(out["table4-0"][0]["thread_cpu"].mean())
    assert s["eager_ms"] == pytest.approx(out["table4-0-eager"][0]["thread_cpu"].mean())


def test_static_vs_dynamic_judges_the_runtime_with_eager_beside_it(timed) -> None:
    _, sd, got = timed
    out = got["timed"]
    r = table4.static_vs_dynamic_result(sd, out, got["lut"], threads=1, images=4)
    ms = {k: float(v[0]["thread_cpu"].mean()) for k, v in out.items()}
    assert r["static"]["latency_ms"] == pytest.approx(ms["static"])
    assert r["dynamic"]["eager_latency_ms"] == pytest.approx(ms["dynamic-eager"])
    assert r["latency_speedup"] == pytest.approx(ms["static"] / ms["dynamic"])
    assert r["eager_latency_speedup"] == pytest.approx(ms["static-eager"] / ms["dynamic-eager"])
    assert r["meets_goal"]["latency"] == (r["latency_speedup"] >= table4.SPEEDUP_GOAL)
    assert set(table4.SUMMARY) <= set(r)
    assert r["cascade_ceiling"]["macs_ratio"] == 0.7 and "rule" in r["cascade_ceiling"]


def test_cascade_ceiling_runs_the_smallest_subnet_before_the_best_static_one() -> None:
    torch.manual_seed(0)
    space = SearchSpace(units=len(SPEC.units), resolutions=(24, 28), stages=3)
    msnet = MultiStageNet(OFAMobileNetV3(SPEC, space)).eval()
    gen = torch.Generator().manual_seed(3)
    calib, images = torch.randn(32, 1, 28, 28, generator=gen), torch.randn(48, 1, 28, 28, generator=gen)
    labels = torch.randint(0, SPEC.num_classes, (48,), generator=gen)
    static = space.largest()
    metric = types.SimpleNamespace(images=images, labels=labels)  # what cascade_ceiling reads of an Evaluator
    pixels = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8, generator=gen)
    test = data.Split("test", torch.randint(0, SPEC.num_classes, (40,), generator=gen), np.arange(40),
                      tuple(f"c{i}" for i in range(SPEC.num_classes)), 1, 28, (0.3,), (0.35,), images=pixels)
    got = table4.cascade_ceiling(msnet, static, metric, calib, test, 16)
    small, large = cost.subnet_macs(SPEC, space.smallest()), cost.subnet_macs(SPEC, static)
    assert got["mmacs_large"] == pytest.approx(large / 1e6)
    # every test image pays the smallest subnet, those that stay also the best static one
    assert got["macs_ratio"] == pytest.approx((small + (1 - got["exit_small"]) * large) / large)
    assert 0.0 <= got["exit_small"] <= 1.0
