"""Latency look-up table: every op an arch needs is measured, the plan walk prices what early exit runs,
the real measurement is of the right size, the file round-trips, equal-accuracy thresholds are the cheapest."""

from __future__ import annotations

import functools
import itertools
import json
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch

from enas4d import latency as lat
from enas4d import database, thresholds
from enas4d.evaluate import deploy
from enas4d.multistage import MultiStageNet
from enas4d.space import MultiStageArch, SearchSpace
from enas4d.supernet import PRESETS, OFAMobileNetV3, resize

torch.set_num_threads(1)
SPEC = PRESETS["fmnist_small"]
SPACE = SearchSpace(units=len(SPEC.units), resolutions=(16, 24), stages=3)
SMALL = SearchSpace(units=len(SPEC.units), resolutions=(16,), expands=(3, 6), kernels=(3,), stages=2)


def fake_table(values: dict[str, float], space: SearchSpace = SPACE) -> lat.LatencyTable:
    """Every op of ``space`` priced by its kind (``values[kind]``, 0 when absent)."""
    keys = lat.op_keys(SPEC, space)
    ms = {k: values.get(k[0], 0.0) for k in keys}
    return lat.LatencyTable(ms, dict(ms), "thread_cpu", {"spec": lat.spec_summary(SPEC)})


def archs(n: int, space: SearchSpace = SPACE, seed: int = 0) -> list[MultiStageArch]:
    rng = np.random.default_rng(seed)
    return [space.sample(rng) for _ in range(n)] + [space.smallest_multistage(), space.largest_multistage()]


def test_op_keys_count_every_configuration_by_hand() -> None:
    # per resolution: 10 block shapes x (3 slices of {0, mid3, mid6} x 1 kernel + a pass), a stem, a head
    assert len(lat.op_keys(SPEC, SMALL)) == 10 * (3 + 1) + 1 + 1 + 3
    keys = lat.op_keys(SPEC, SPACE)
    assert len(keys) == len(set(keys))
    # 6 slices x 3 kernels + a pass per shape; the two resolutions share no side; 3 bookkeeping entries
    assert len(keys) == 2 * (10 * (6 * 3 + 1) + 2) + 3


def test_the_table_covers_every_op_of_every_arch() -> None:
    table = fake_table({"block": 1.0})
    for a in archs(200):
        for early_exit in (True, False):
            assert len(lat.stage_latency(table, SPEC, a, early_exit=early_exit)) == 3


def test_stage_latency_walks_what_each_stage_runs() -> None:
    """Each kind priced 1, the others 0: the sums count what the incremental path runs, counted here from the arch."""
    max_depth = SPACE.max_depth
    se = [SPEC.units[i // max_depth].se for i in range(SPACE.slots)]
    for a in archs(30):
        adds = lambda s, i: a.expands[s][i] > (a.expands[s - 1][i] if s else 0)  # noqa: E731
        # a later stage that added channels upstream recomputes each unit's first block (no residual) whole
        restarts = lambda s, i: s and i % max_depth == 0 and any(adds(s, j) for j in range(i))  # noqa: E731
        runs = [[i for i in range(SPACE.slots) if a.expands[s][i]] for s in range(3)]
        blocks = [sum(adds(s, i) or restarts(s, i) for i in runs[s]) for s in range(3)]
        passes = [sum(1 for i in runs[s] if s and not adds(s, i) and not restarts(s, i)) for s in range(3)]
        assert lat.stage_latency(fake_table({"block": 1}), SPEC, a) == list(itertools.accumulate(blocks))
        assert lat.stage_latency(fake_table({"pass": 1}), SPEC, a) == list(itertools.accumulate(passes))
        assert lat.stage_latency(fake_table({"head": 1}), SPEC, a) == [1, 2, 3]
        assert lat.stage_latency(fake_table({"stem": 1, "exit": 1}), SPEC, a) == [2, 2, 2]
        assert lat.stage_latency(fake_table({"stem": 1, "exit": 1}), SPEC, a, early_exit=False) == [1, 1, 1]
        assert lat.stage_latency(fake_table({"exit_pass": 1}), SPEC, a) == [0, 1, 2]
        # a sample passing stage s prunes, per block run so far, its pre-BN sum and one SE input per slice
        # computed since the block last started afresh (its first stage or a restart)
        def inputs(s: int, i: int) -> int:
            fresh = max(t for t in range(s + 1) if a.expands[t][i] and (t == 0 or not a.expands[t - 1][i]
                                                                          or restarts(t, i)))
            return sum(adds(t, i) or t == fresh for t in range(fresh, s + 1))
        kept = [sum(1 + se[i] * inputs(s, i) for i in runs[s]) for s in range(2)]
        assert lat.stage_latency(fake_table({"keep_tensor": 1}), SPEC, a) == [0, kept[0], kept[0] + kept[1]]


def test_missing_ops_and_another_supernet_are_refused() -> None:
    table = fake_table({"block": 1.0}, SMALL)
    with pytest.raises(lat.LatencyError, match=r"no entry head\(side=2\): .* rebuild it"):
        lat.stage_latency(table, SPEC, SPACE.largest_multistage())
    other = lat.LatencyTable(table.ms, table.other, table.clock, {"spec": {"widths": [8]}})
    with pytest.raises(lat.LatencyError, match="measured for supernet"):
        lat.stage_latency(other, SPEC, SMALL.smallest_multistage())


@functools.cache
def measured() -> tuple[lat.LatencyTable, list[MultiStageArch], object]:
    check = archs(2, SMALL, seed=1)
    table, rows = lat.build_table(SPEC, SMALL, threads=1, warmup=1, repeats=3, check=check)
    return table, check, rows


def test_build_measures_every_op_and_the_check_archs() -> None:
    table, check, rows = measured()
    assert set(table.ms) == set(lat.op_keys(SPEC, SMALL)) and table.clock == "thread_cpu"
    assert all(v > 0 for v in table.ms.values()) and all(v > 0 for v in table.other.values())
    assert len(rows) == len(check) * len(lat.MODES) * SMALL.stages
    frame = lat.compare(table, SPEC, check, rows)
    # loose on purpose (a shared, loaded CPU): the sum of the parts has the size of the real thing
    ratio = frame.predicted_ms / frame.measured_ms
    assert ratio.between(0.5, 2.0).all(), frame
    summary = lat.summarize(frame)
    assert list(summary["mode"].unique()) == sorted(lat.MODES) and (summary.archs == len(check)).all()


def test_table_round_trips_and_bad_files_fail_naming_the_file(tmp_path) -> None:
    table = measured()[0]
    path = table.save(tmp_path / "lut.json")
    back = lat.load(path)
    assert back.ms == table.ms and back.other == table.other and back.clock == table.clock
    assert back.meta["spec"] == lat.spec_summary(SPEC) and back.meta["machine"]["torch_threads"] == 1
    with pytest.raises(lat.LatencyError, match=r"nope\.json: not found"):
        lat.load(tmp_path / "nope.json")
    blob = json.loads(path.read_text())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**blob, "format": "other"}))
    with pytest.raises(lat.LatencyError, match=r"bad\.json: not an enas4d latency table"):
        lat.load(bad)
    blob["ops"][3]["ms"] = -1.0
    bad.write_text(json.dumps(blob))
    with pytest.raises(lat.LatencyError, match=r"bad\.json: ops\[3\] .* must be > 0"):
        lat.load(bad)
    del blob["ops"][3]["kernel" if "kernel" in blob["ops"][3] else "op"]
    bad.write_text(json.dumps(blob))
    with pytest.raises(lat.LatencyError, match=r"bad\.json: ops\[3\] is malformed"):
        lat.load(bad)


def test_deployed_net_is_the_database_evaluation_and_early_exit_is_batch_independent() -> None:
    torch.manual_seed(0)
    msnet = MultiStageNet(OFAMobileNetV3(SPEC, SPACE)).eval()
    g = torch.Generator().manual_seed(2)
    images, calib = torch.randn(12, 1, 28, 28, generator=g), torch.randn(16, 1, 28, 28, generator=g)
    labels = torch.randint(0, 10, (12,), generator=g)
    a = archs(1)[0]
    net = deploy(msnet, a, calib, batch_size=8)
    rows = database.evaluate_like_database(msnet, a, images, labels, calib, 8)
    x = resize(images, a.resolution)
    with torch.no_grad():
        conf = torch.stack([torch.softmax(z, 1).max(1).values for z in net(x)], 1)
    np.testing.assert_allclose(conf.numpy(), rows.conf.astype(np.float32), atol=1e-3)
    t = (0.3, 0.5)
    whole = lat.early_exit_outcome(net, [(images, labels)], t)
    one = lat.early_exit_outcome(net, [(images[i:i + 1], labels[i:i + 1]) for i in range(12)], t)
    assert whole.top1 == one.top1 and whole.avg_macs == one.avg_macs
    direct = net.early_exit(x, t)
    assert whole.top1 == float((direct.pred == labels).double().mean()) and whole.avg_macs == float(direct.macs.double().mean())
    np.testing.assert_array_equal(whole.exit_stage, one.exit_stage)

    timed = lat.time_images({"dyn": (lambda v: net.early_exit(v, t), x[:4]), "first": (lambda v: net(v)[0], x[:4])},
                            threads=1, warmup=1)
    ms, results = timed["dyn"]
    assert set(ms) == set(lat.CLOCKS) and ms["wall"].shape == (4,) and (ms["thread_cpu"] > 0).all()
    assert [int(r.exit_stage) for r in results] == whole.exit_stage[:4].tolist()
    with pytest.raises(ValueError, match="same number of images"):
        lat.time_images({"a": (net, x[:2]), "b": (net, x[:3])}, threads=1)


def _burn(ms: float) -> None:
    """Spend ``ms`` of this thread's CPU time."""
    end = time.thread_time_ns() + int(ms * 1e6)
    while time.thread_time_ns() < end:
        pass


WARM_MS, COLD_MS = 0.3, 3.0


def state_dependent_nets(names: list[str]) -> dict[str, Callable[..., None]]:
    """Fake nets that cost ``WARM_MS`` right after their own call and ``COLD_MS`` right after another's: what a
    batch-1 net's caches do (Table 4 once timed ONNX Runtime nets right after eager PyTorch: up to 2x slower)."""
    last: list[str | None] = [None]

    def net(name: str, *_: object) -> None:
        _burn(WARM_MS if last[0] == name else COLD_MS)
        last[0] = name

    return {n: functools.partial(net, n) for n in names}


def test_time_images_times_each_net_after_its_own_work() -> None:
    nets, x = state_dependent_nets(["a", "b", "c"]), torch.zeros(12, 1, 2, 2)
    timed = lat.time_images({n: (f, x) for n, f in nets.items()}, threads=1, warmup=1)
    for n, (ms, _) in timed.items():  # unprimed, 2 in 3 calls would follow another net: median COLD_MS
        assert np.median(ms["thread_cpu"]) < (WARM_MS + COLD_MS) / 2, (n, ms["thread_cpu"])


def test_time_interleaved_primes_only_the_primed_keys() -> None:
    nets = state_dependent_nets(["a", "b", "c"])
    t = lat.time_interleaved(nets, warmup=1, repeats=9, primed=["a"])
    assert t["a"]["thread_cpu"] < (WARM_MS + COLD_MS) / 2
    assert t["b"]["thread_cpu"] > (WARM_MS + COLD_MS) / 2 and t["c"]["thread_cpu"] > (WARM_MS + COLD_MS) / 2
    with pytest.raises(ValueError, match="not in calls"):
        lat.time_interleaved(nets, warmup=0, repeats=1, primed=["d"])


def brute_cheapest(conf, correct, cost, min_acc, grid):
    """The least average cost over every grid point with accuracy >= min_acc (None if none)."""
    values = thresholds.grid_values(grid)
    points = [thresholds.evaluate(conf, correct, cost, t) for t in itertools.product(values, repeat=conf.shape[1] - 1)]
    ok = [p.cost for p in points if p.acc >= min_acc]
    return min(ok) if ok else None


@pytest.mark.parametrize("seed", range(4))
def test_cheapest_thresholds_equal_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, stages, grid = 300, 3, 0.1
    correct = rng.random((n, stages)) < np.array([0.6, 0.75, 0.85])
    conf = np.clip(rng.random((n, stages)) * 0.6 + 0.4 * correct, 0, 1).astype(np.float16)
    cost = np.array([1.0, 1.7, 2.9])
    for min_acc in (0.5, correct[:, 0].mean(), 0.8, correct[:, -1].mean(), 0.99):
        want = brute_cheapest(conf, correct, cost, min_acc, grid)
        got = lat.cheapest_thresholds(conf, correct, cost, min_acc, grid)
        if want is None:
            assert got is None
            continue
        assert got.acc >= min_acc and got.cost == pytest.approx(want, rel=1e-3)
        ev = thresholds.evaluate(conf, correct, cost, got.thresholds)
        assert (ev.acc, ev.cost) == pytest.approx((got.acc, got.cost))
