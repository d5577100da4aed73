"""The ONNX Runtime latency table: its liveness walk reads what the exported graphs read, and it prices deployed
archs it was not calibrated on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from enas4d import deploy, latency
from enas4d.multistage import MultiStageNet
from enas4d.runtime import MANIFEST
from enas4d.space import MultiStageArch, SearchSpace, SubnetArch
from enas4d.supernet import PRESETS, OFAMobileNetV3

SPEC = PRESETS["fmnist_small"]
SPACE = SearchSpace(units=len(SPEC.units), resolutions=(24,), depths=(2, 3), expands=(3, 6), kernels=(3, 5), stages=2)


def pass_arch(space: SearchSpace) -> MultiStageArch:
    """Stage 2 repeats stage 1 in the first two units (passes: it has not diverged, so no restart) and catches up a
    third block and widens the second in the others: the pass at unit 2's first block (no residual, stage 2 not yet
    diverged) cuts units 0-1 out of stage 2's graph."""
    U, D = space.units, space.max_depth

    def stage(depths: list[int], expand: list[int]) -> SubnetArch:
        return SubnetArch(24, tuple(depths), tuple(3 if j < depths[u] else 0 for u in range(U) for j in range(D)),
                          tuple((expand if depths[u] == 3 else [3, 3, 0])[j] if j < depths[u] else 0
                                for u in range(U) for j in range(D)))

    arch = MultiStageArch.from_stages([stage([2] * U, [3, 3, 0]), stage([2, 2] + [3] * (U - 2), [3, 6, 6])])
    space.check(arch)
    return arch


def test_liveness_walk_reads_what_the_exported_graphs_read(tmp_path):
    """With every op free and each reused tensor 1 ms, a stage's price counts its graph's inputs."""
    torch.manual_seed(0)
    space = SearchSpace(units=len(SPEC.units), resolutions=(24,), stages=3)
    msnet = MultiStageNet(OFAMobileNetV3(SPEC, space)).eval()
    ops = {k: 0.0 for k in latency.op_keys(SPEC, space)}
    lut = latency.LatencyTable({**ops, ("keep_tensor",): 1.0}, {}, "thread_cpu",
                               {"backend": "onnxruntime", "spec": latency.spec_summary(SPEC)})
    small = MultiStageNet(OFAMobileNetV3(SPEC, SPACE)).eval()  # SPACE's ops are among space's
    nets = [(msnet, space.sample(np.random.default_rng(seed))) for seed in range(4)] + [(small, pass_arch(SPACE))]
    for i, (net, arch) in enumerate(nets):
        folder = deploy.export_multistage(net.export(arch).eval(), [0.5] * (arch.num_stages - 1), tmp_path / str(i),
                                          classes=[str(c) for c in range(10)], mean=[0.0], std=[1.0])
        m = json.loads((folder / MANIFEST).read_text())
        priced = [ms for ms, _ in latency._runtime_stages(lut, SPEC, arch)]
        assert priced[1:] == [len(st["inputs"]) for st in m["stages"][1:]]


def test_pass_stage_cuts_the_graph(tmp_path):
    torch.manual_seed(0)
    msnet = MultiStageNet(OFAMobileNetV3(SPEC, SPACE)).eval()
    arch = pass_arch(SPACE)
    folder = deploy.export_multistage(msnet.export(arch).eval(), [0.5], tmp_path / "p",
                                      classes=[str(c) for c in range(10)], mean=[0.0], std=[1.0])
    m = json.loads((folder / MANIFEST).read_text())
    assert "features" not in m["stages"][1]["inputs"]  # the last stage's first pass block ignores its input
    ops = {k: 1.0 for k in latency.op_keys(SPEC, SPACE)}
    lut = latency.LatencyTable({**ops, ("exit",): 0.0, ("exit_pass",): 0.0, ("keep_tensor",): 0.0}, {},
                               "thread_cpu", {"backend": "onnxruntime", "spec": latency.spec_summary(SPEC)})
    _, (ms2, ops2) = latency._runtime_stages(lut, SPEC, arch)
    plan = msnet.plan(arch).stages[1]
    assert not any(st.start == 0 and st.slot < 2 * SPACE.max_depth for st in plan)  # no restart in units 0-1
    dead = [st for st in plan if st.slot < 2 * SPACE.max_depth]  # cut off by the pass at unit 2's first block
    assert dead and ms2 == ops2 == len(plan) + 1 - len(dead)  # stage 2's blocks and head, but the dead passes


def test_eager_table_is_refused():
    lut = latency.LatencyTable({}, {}, "thread_cpu", {"spec": latency.spec_summary(SPEC)})
    with pytest.raises(latency.LatencyError, match="build_runtime_table"):
        latency.runtime_stage_latency(lut, SPEC, pass_arch(SPACE))


def test_runtime_table_prices_held_out_archs():
    rng = np.random.default_rng(0)
    check, calibrate = [SPACE.sample(rng) for _ in range(3)], [SPACE.sample(rng) for _ in range(3)]
    lut, measured = latency.build_runtime_table(SPEC, SPACE, threads=1, warmup=2, repeats=9, calibrate=calibrate,
                                                check=check)
    assert set(lut.ms) == set(latency.op_keys(SPEC, SPACE)) and all(v > 0 for v in lut.ms.values())
    assert lut.meta["backend"] == "onnxruntime" and lut.clock == "thread_cpu"
    assert len(measured) == len(check) * SPACE.stages and set(measured["mode"]) == {"early_exit"}
    err = latency.compare_runtime(lut, SPEC, check, measured).error_pct.abs()
    # Loose (a shared test machine): without the liveness walk and the per-op correction the error was 30-90%.
    assert err.mean() < 25, err.tolist()


def test_corrections_recover_a_per_op_and_a_per_inference_cost():
    """Stage times that cost the table's sums plus 0.01 ms per live op plus 0.2 ms per inference: both terms come
    back, and pricing with them reproduces the times (a per-op term alone cannot: stage 1 would be off)."""
    rng = np.random.default_rng(1)
    ops = {k: float(v) for k, v in zip(latency.op_keys(SPEC, SPACE), rng.uniform(0.01, 0.05, 10_000))}
    meta = {"backend": "onnxruntime", "spec": latency.spec_summary(SPEC)}
    lut = latency.LatencyTable(ops, {}, "thread_cpu", meta)
    archs = [SPACE.sample(rng) for _ in range(6)]
    measured = [np.cumsum([ms + 0.01 * n + 0.2 * (s == 0) for s, (ms, n) in
                           enumerate(latency._runtime_stages(lut, SPEC, a))]).tolist() for a in archs]
    gamma, delta = latency._corrections(lut, SPEC, archs, measured)
    assert gamma == pytest.approx(0.01) and delta == pytest.approx(0.2)
    fitted = latency.LatencyTable(ops, {}, "thread_cpu", {**meta, "op_correction_ms": {"thread_cpu": gamma},
                                                           "start_correction_ms": {"thread_cpu": delta}})
    for a, m in zip(archs, measured):
        np.testing.assert_allclose(latency.runtime_stage_latency(fitted, SPEC, a), m)
    assert latency._corrections(lut, SPEC, [], []) == (0.0, 0.0)
