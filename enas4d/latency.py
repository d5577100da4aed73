"""Latency look-up table (paper: "Deploy on real-world devices"): measured op latencies, summed per stage.

MACs do not tell how long a multi-stage net takes on a given device, so the paper measures "the hardware
latency of operations under different input conditions" once, and prices any multi-stage arch by looking its
operations up. Here an *operation* is one call of the incremental early-exit path of an exported net
(``enas4d.multistage``), timed at batch 1 on the CPU with the pipeline's memory format:

- ``stem``  (resolution): stem conv and static first block, run once by stage 1;
- ``block`` (unit, first block of the unit?, input side, hidden channels ``[start, stop)``, kernel): one
  stage's new slice of a block — expand, depthwise, the SE gate in input-reuse form, the output-reuse
  partial of the project conv — then project BN and the residual (the code ``run_stage`` runs per block);
- ``pass``  (unit, first, side): a stage that runs a block but adds no channels (project BN + residual);
- ``head``  (final side): a stage's prediction head;
- ``exit``: the early-exit bookkeeping of an inference that leaves at stage 1 (set-up, one decision);
  ``exit_pass``: each further stage's decision, empty-stage overhead and pruning of the stem features;
  ``keep_tensor``: pruning one cached block tensor (pre-BN sum or pooled SE input) of a sample that stays.

Block configurations are keyed by block *shape* (unit, first) rather than slot: the blocks of a unit after
the first have one shape. `stage_latency` adds the entries along ``Plan.of`` exactly as `stage_macs` adds
MACs. In a net an op runs right after *other* ops, with their weights and code in the caches; timed in a loop
of its own it looks ~20% faster than it is there. So all ops are timed in interleaved rounds (each round calls
every op once, in a new random order), and so are the real nets `build_table` checks the sum of parts against:
a change of machine load then hits the table and its check alike.

Clock: with one torch thread the table uses the calling thread's CPU time (``time.thread_time_ns``). On an
idle core it is the wall-clock latency; on a shared machine it leaves out the time the thread waits for a core
(a 10 ms call on a loaded 2-core machine can take twice as long in wall time), though other processes still
slow it through the caches. With more threads it uses wall time. Both are stored per entry.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort
import pandas as pd
import torch
from torch import Tensor, nn

from enas4d.cost import slot_sides
from enas4d.deploy import export_multistage, to_onnx
from enas4d.evaluate import memory_format
from enas4d.files import write_json
from enas4d.multistage import (BlockState, BlockStep, ExportedMultiStageNet, MultiStageMBConv, MultiStageNet, Plan,
                               StageCache, mbconv_stage, run_early_exit)
from enas4d.plan import restart_slots
from enas4d.progress import bar
from enas4d.runtime import FORMAT, IMAGE, LOGITS, MANIFEST, NEXT, EarlyExitSession, session_options, sha256
from enas4d.space import MultiStageArch, SearchSpace
from enas4d.supernet import OFAMobileNetV3, SupernetSpec, resize
from enas4d.thresholds import Best, search

_FORMAT = "enas4d.latency/1"
_HARD_OMEGA = 1e6  # `cheapest_thresholds`: (target / cost) ** omega underflows to 0 for any cost over the target
CLOCKS = ("thread_cpu", "wall")
# Untimed calls of a deployed net right before each timed one: after an eager PyTorch net, a batch-1 ONNX Runtime
# net took 1.7x its warm time, still 1.2x after one untimed call of its own and 1.0x after three (caches: a 3 ms
# sleep in between does not help).
PRIMES = 3
MODES = ("early_exit", "run_stage")  # how `build_table` runs its check archs (see `_check_call`)
Key = tuple  # ("block", unit, first, side, start, stop, kernel), ("stem", resolution), ...
_FIELDS = {"stem": ("resolution",), "block": ("unit", "first", "side", "start", "stop", "kernel"),
           "pass": ("unit", "first", "side"), "head": ("side",), "exit": (), "exit_pass": (), "keep_tensor": ()}


class LatencyError(ValueError):
    """A latency table that is missing, malformed, or lacks an op an arch needs."""


# ---------------------------------------------------------------------------------------------- timing


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the body with ``n`` torch intra-op threads, then restore the previous count."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def clock_for(threads: int) -> str:
    """The clock a table built with ``threads`` uses (module docstring: thread CPU time is exact for one thread)."""
    return "thread_cpu" if threads == 1 else "wall"


def time_interleaved(calls: dict[Hashable, Callable[[], object]], warmup: int, repeats: int,
                     seed: int = 0, primed: Collection[Hashable] = ()) -> dict[Hashable, dict[str, float]]:
    """Median thread-CPU and wall time (ms) of every function in ``calls`` over ``repeats`` rounds after ``warmup``
    rounds; each round calls all of them once, in a new random order.

    An op in a network runs right after *other* ops, with their weights and code in the caches; timed in a
    loop of its own it would look faster than it is. Interleaving also spreads load changes over all ops.
    A whole deployed net, though, serves one image after another: the keys in ``primed`` are called `PRIMES`
    times untimed right before each timed call, so they are timed after their own work, not after the other
    calls' (on this CPU a batch-1 ONNX Runtime net timed right after other nets takes up to 2x longer).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    if unknown := set(primed) - set(calls):
        raise ValueError(f"primed keys {sorted(map(str, unknown))} are not in calls")
    rng = np.random.default_rng(seed)
    names = list(calls)
    prime = set(primed)
    cpu: dict[Hashable, list[int]] = {k: [] for k in names}
    wall: dict[Hashable, list[int]] = {k: [] for k in names}
    for r in bar(range(warmup + repeats), desc="latency rounds", unit="round", leave=False):
        for i in rng.permutation(len(names)):
            k = names[i]
            for _ in range(PRIMES * (k in prime)):
                calls[k]()
            c, w = time.thread_time_ns(), time.perf_counter_ns()
            calls[k]()
            w = time.perf_counter_ns() - w
            c = time.thread_time_ns() - c
            if r >= warmup:
                cpu[k].append(c)
                wall[k].append(w)
    return {k: {"thread_cpu": statistics.median(cpu[k]) / 1e6, "wall": statistics.median(wall[k]) / 1e6}
            for k in names}


def machine(threads: int) -> dict:
    """What the numbers depend on: CPU, library versions, threads, load while measuring."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "torch_threads": threads, "load_avg_1min": round(os.getloadavg()[0], 2)}


# ---------------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class LatencyTable:
    """Op latencies (ms) of one supernet spec on one machine: ``ms[key]`` in ``clock``, ``other[key]`` in the other."""

    ms: dict[Key, float]
    other: dict[Key, float]
    clock: str
    meta: dict

    def __len__(self) -> int:
        return len(self.ms)

    def __getitem__(self, key: Key) -> float:
        try:
            return self.ms[key]
        except KeyError:
            raise LatencyError(f"latency table has no entry {_describe(key)}: it was measured for another search "
                               f"space ({self.meta.get('space')}); rebuild it with enas4d.latency.build_table"
                               ) from None

    def records(self) -> list[dict]:
        """One dict per op (its fields, ``ms`` in the table's clock and ``<other clock>_ms``), for CSV/JSON."""
        other = CLOCKS[1 - CLOCKS.index(self.clock)]
        return [{"op": k[0], **dict(zip(_FIELDS[k[0]], k[1:])), "ms": v, f"{other}_ms": self.other[k]}
                for k, v in self.ms.items()]

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON atomically (temp file in the same directory, then rename)."""
        blob = {"format": _FORMAT, "clock": self.clock, "meta": self.meta, "ops": self.records()}
        return write_json(path, blob, indent=1)


def load(path: str | os.PathLike) -> LatencyTable:
    """Read a table written by `LatencyTable.save`; anything else raises one LatencyError naming the file."""
    path = Path(path)
    try:
        blob = json.loads(path.read_text())
    except FileNotFoundError:
        raise LatencyError(f"{path}: not found; build it with enas4d.latency.build_table") from None
    except (OSError, json.JSONDecodeError) as err:
        raise LatencyError(f"{path}: not a readable JSON latency table ({err})") from None
    if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
        raise LatencyError(f"{path}: not an enas4d latency table (expected format {_FORMAT})")
    clock = blob.get("clock")
    if clock not in CLOCKS:
        raise LatencyError(f"{path}: clock {clock!r} not in {CLOCKS}")
    other = CLOCKS[1 - CLOCKS.index(clock)]
    ms, rest = {}, {}
    for i, rec in enumerate(blob.get("ops", [])):
        try:
            key = (rec["op"], *(rec[f] for f in _FIELDS[rec["op"]]))
            ms[key], rest[key] = float(rec["ms"]), float(rec[f"{other}_ms"])
        except (KeyError, TypeError, ValueError) as err:
            raise LatencyError(f"{path}: ops[{i}] is malformed ({type(err).__name__}: {err})") from None
        if not (np.isfinite(ms[key]) and ms[key] > 0):
            raise LatencyError(f"{path}: ops[{i}] ({_describe(key)}) has latency {ms[key]!r}; must be > 0")
    if not ms:
        raise LatencyError(f"{path}: the table lists no ops")
    return LatencyTable(ms, rest, clock, blob.get("meta", {}))


def spec_summary(spec: SupernetSpec) -> dict:
    """The layer sizes a table's ops depend on (stored with it, checked before it prices an arch)."""
    return {"in_channels": spec.in_channels, "num_classes": spec.num_classes, "stem": spec.stem,
            "first_block": spec.first_block, "widths": [u.width for u in spec.units],
            "strides": [u.stride for u in spec.units], "se": [u.se for u in spec.units],
            "final_expand": spec.final_expand, "feature_mix": spec.feature_mix}


def _describe(key: Key) -> str:
    return f"{key[0]}(" + ", ".join(f"{f}={v}" for f, v in zip(_FIELDS.get(key[0], ()), key[1:])) + ")"


# ---------------------------------------------------------------------------------------------- configurations


def _shapes(space: SearchSpace) -> list[tuple[int, bool, int]]:
    """(unit, first block of the unit?, a slot of that shape): blocks after a unit's first share one shape."""
    d = space.max_depth
    return [(u, j == 0, u * d + j) for u in range(space.units) for j in range(min(d, 2))]


def _bounds(spec: SupernetSpec, space: SearchSpace, slot: int) -> list[int]:
    """Hidden widths a block's slices start/stop at: 0 and ``mid(e)`` for every expand choice."""
    b = spec.block_specs(space.max_depth)[slot]
    return [0, *sorted({b.mid(e) for e in space.expands})]


def op_keys(spec: SupernetSpec, space: SearchSpace) -> list[Key]:
    """Every op configuration the incremental early-exit path of ``space``'s archs can run (what to measure)."""
    keys: dict[Key, None] = {}
    for r in space.resolutions:
        sides = slot_sides(spec, r, space.max_depth)
        keys[("stem", r)] = None
        for u, first, slot in _shapes(space):
            side, bounds = sides[slot], _bounds(spec, space, slot)
            for start in bounds:
                for stop in bounds:
                    if stop > start:
                        for k in space.kernels:
                            keys[("block", u, first, side, start, stop, k)] = None
            keys[("pass", u, first, side)] = None
        keys[("head", sides[-1])] = None
    for k in ("exit", "exit_pass", "keep_tensor"):
        keys[(k,)] = None
    return list(keys)


# ---------------------------------------------------------------------------------------------- measuring


class _BookkeepingOnly:
    """`NetParts` whose stages run no blocks: what is left of early exit is its bookkeeping."""

    def __init__(self, stages: int, logits: Tensor) -> None:
        self.plan = Plan(((),) * stages)
        self.logits = logits

    def stem(self, x: Tensor) -> Tensor:
        return x

    def block(self, slot: int) -> MultiStageMBConv:
        raise AssertionError("a plan without blocks has no block")

    def head(self, x: Tensor, stage: int) -> Tensor:
        return self.logits


def _block_call(supernet: OFAMobileNetV3, slot: int, side: int, start: int, stop: int, kernel: int,
                fmt: torch.memory_format) -> Callable[[], Tensor]:
    """One stage's call of a block computing ``[start, stop)`` (``start == stop``: a pass), state as in a net.

    An earlier stage computed ``[0, start)`` (one SE pooled piece) when ``start > 0``: the call then adds its
    partial projection to that sum, and its SE gate reads both pieces, as in `run_stage`.
    """
    elastic = supernet.blocks[slot]
    steps = {0: BlockStep(slot, 0, start, kernel), 1: BlockStep(slot, start, stop, kernel)} if start else \
        {0: BlockStep(slot, 0, stop, kernel)}
    block = MultiStageMBConv(elastic, steps, len(steps)).eval().to(memory_format=fmt)
    x = torch.randn(1, elastic.spec.in_channels, side, side).contiguous(memory_format=fmt)
    stage = len(steps) - 1
    state = BlockState()
    if stage:
        mbconv_stage(block, state, x, steps[0], 0)
    z, pooled, step = state.z, state.pooled, steps[stage]
    return lambda: mbconv_stage(block, BlockState(z, list(pooled)), x, step, stage)


def _bookkeeping_calls(spec: SupernetSpec, stages: int, tensors: int,
                       fmt: torch.memory_format) -> dict[str, Callable[[], object]]:
    """Calls whose timing differences give the early-exit bookkeeping entries (see `build_table`)."""
    parts = _BookkeepingOnly(stages, torch.randn(1, spec.num_classes))
    feats = torch.randn(1, spec.first_block, 8, 8).contiguous(memory_format=fmt)
    z = torch.randn(1, spec.units[-1].width, 2, 2).contiguous(memory_format=fmt)
    stay = torch.ones(1, dtype=torch.bool)
    full = StageCache(parts, feats, {i: BlockState(z, [z.mean((2, 3))]) for i in range(tensors // 2)})
    empty = StageCache(parts, feats, {})
    return {"exit_first": lambda: run_early_exit(parts, feats, [0.0] * (stages - 1), [1] * stages),
            "exit_last": lambda: run_early_exit(parts, feats, [1.0] * (stages - 1), [1] * stages),
            "keep_full": lambda: full.keep(stay), "keep_empty": lambda: empty.keep(stay)}


def _check_call(net: ExportedMultiStageNet, mode: str, stage: int, fmt: torch.memory_format) -> Callable[[], object]:
    """One image leaving ``net`` after ``stage`` (0-based): by ``early_exit`` with thresholds that make it leave
    there (T = 1 never exits, T = 0 always does), or by ``start`` and ``run_stage`` ``stage + 1`` times."""
    S = net.plan.num_stages
    in_channels = next(m for m in net.modules() if isinstance(m, nn.Conv2d)).in_channels
    x = torch.randn(1, in_channels, net.resolution, net.resolution).contiguous(memory_format=fmt)
    if mode == "early_exit":
        t = [1.0] * stage + [0.0] * (S - 1 - stage)
        return lambda: net.early_exit(x, t)

    def run() -> Tensor:
        cache = net.start(x)
        for _ in range(stage + 1):
            logits = net.run_stage(cache)
        return logits

    return run


@torch.inference_mode()
def build_table(spec: SupernetSpec, space: SearchSpace, *, threads: int, warmup: int, repeats: int, seed: int = 0,
                check: Sequence[MultiStageArch] = ()) -> tuple[LatencyTable, pd.DataFrame]:
    """Measure every op of `op_keys` (median of ``repeats`` calls after ``warmup``) with ``threads`` torch threads,
    and, in the same interleaved rounds, the real per-stage latency of the ``check`` archs (for `compare`).

    Measuring the check archs *with* the ops means a change of machine load hits both alike, so the check
    tests the table, not the load. Weights are random (latency does not depend on their values). ``exit`` is an
    inference of bookkeeping only that leaves at stage 1; ``exit_pass`` is the difference to one that leaves at
    stage S, per stage; ``keep_tensor`` is the cost of pruning a cache of block states, per tensor, minus an
    empty cache's. Returns the table and the check measurements: one row per (arch, mode, stage) with
    cumulative ``measured_ms`` in the table's clock and ``measured_<other clock>_ms``.
    """
    if space.stages < 2:
        raise ValueError(f"a latency table prices multi-stage archs; the space has {space.stages} stage")
    for a in check:
        space.check(a)
    fmt = memory_format(torch.device("cpu"))
    keys = op_keys(spec, space)
    start_time, load_before = time.perf_counter(), os.getloadavg()[0]
    with torch.random.fork_rng(devices=[]), torch_threads(threads):
        torch.manual_seed(seed)
        supernet = OFAMobileNetV3(spec, space).eval()
        slot_of = {(u, first): slot for u, first, slot in _shapes(space)}
        stem = nn.Sequential(supernet.stem, supernet.first_block)

        def call(key: Key) -> Callable[[], object]:
            kind = key[0]
            if kind == "stem":
                x = torch.randn(1, spec.in_channels, key[1], key[1]).contiguous(memory_format=fmt)
                return lambda: stem(x)
            if kind == "head":
                x = torch.randn(1, spec.units[-1].width, key[1], key[1]).contiguous(memory_format=fmt)
                return lambda: supernet.head_layers(x)
            u, first, side = key[1:4]
            slot = slot_of[u, first]
            if kind == "block":
                return _block_call(supernet, slot, side, *key[4:], fmt)
            mid = _bounds(spec, space, slot)[1]  # "pass": any kernel and width, nothing is computed
            return _block_call(supernet, slot, side, mid, mid, space.kernels[0], fmt)

        tensors = 16
        calls: dict[Hashable, Callable[[], object]] = {k: call(k) for k in keys
                                                       if k[0] in ("stem", "block", "pass", "head")}
        calls.update(_bookkeeping_calls(spec, space.stages, tensors, fmt))
        msnet = MultiStageNet(supernet).eval()
        for i, arch in enumerate(check):
            net = msnet.export(arch).eval().to(memory_format=fmt)
            calls.update({("check", i, mode, s): _check_call(net, mode, s, fmt)
                          for mode in MODES for s in range(arch.num_stages)})
        t = time_interleaved(calls, warmup, repeats, seed)
    first, last, full, empty = (t.pop(k) for k in ("exit_first", "exit_last", "keep_full", "keep_empty"))
    t[("exit",)] = first  # differences of medians can dip below zero on a noisy machine: floor them at 1 ns
    t[("exit_pass",)] = {c: max((last[c] - first[c]) / (space.stages - 1), 1e-6) for c in CLOCKS}
    t[("keep_tensor",)] = {c: max((full[c] - empty[c]) / tensors, 1e-6) for c in CLOCKS}
    clock = clock_for(threads)
    other = CLOCKS[1 - CLOCKS.index(clock)]
    meta = {"machine": machine(threads), "load_avg_1min_before": round(load_before, 2),
            "memory_format": str(fmt).removeprefix("torch."), "batch": 1, "warmup": warmup, "repeats": repeats,
            "seconds": round(time.perf_counter() - start_time, 2), "check_archs": len(check),
            "space": {"units": space.units, "resolutions": list(space.resolutions), "depths": list(space.depths),
                      "expands": list(space.expands), "kernels": list(space.kernels), "stages": space.stages},
            "spec": spec_summary(spec)}
    lut = LatencyTable({k: t[k][clock] for k in keys}, {k: t[k][other] for k in keys}, clock, meta)
    rows = [{"arch": k[1], "mode": k[2], "stage": k[3] + 1, "measured_ms": v[clock], f"measured_{other}_ms": v[other]}
            for k, v in t.items() if k[0] == "check"]
    return lut, pd.DataFrame(rows, columns=["arch", "mode", "stage", "measured_ms", f"measured_{other}_ms"])


# ---------------------------------------------------------------------------------------------- prediction


def stage_latency(lut: LatencyTable, spec: SupernetSpec, arch: MultiStageArch, *,
                  early_exit: bool = True) -> list[float]:
    """Cumulative latency (ms, the table's clock) of one image that exits after stage 1, 2, ..., S of ``arch``.

    Follows the incremental path as `enas4d.cost.stage_macs` does: the stem once, every block a stage runs
    (its new slice, or a pass when it adds no channels), every head passed through. With ``early_exit`` it is
    ``ExportedMultiStageNet.early_exit`` at batch 1: plus the exit decisions, and after every stage a sample
    passes, pruning its cached tensors (stem features, per block the pre-BN sum and the SE pooled pieces).
    """
    units, max_depth = len(spec.units), len(arch.kernels[0]) // len(spec.units)
    if len(arch.depths[0]) != units or len(arch.kernels[0]) % units:
        raise ValueError(f"arch has {len(arch.depths[0])} units and {len(arch.kernels[0])} slots; "
                         f"spec has {units} units")
    if lut.meta.get("spec") != spec_summary(spec):
        raise LatencyError(f"latency table was measured for supernet {lut.meta.get('spec')}, not {spec_summary(spec)}")
    blocks = spec.block_specs(max_depth)
    sides = slot_sides(spec, arch.resolution, max_depth)
    head = lut[("head", sides[-1])]
    total = lut[("stem", arch.resolution)] + (lut[("exit",)] if early_exit else 0.0)
    cached: dict[int, int] = {}  # slot -> tensors kept in the stage cache
    out = []
    for s, steps in enumerate(Plan.of(arch, lambda slot, e: blocks[slot].mid(e), restart_slots(blocks)).stages):
        if s and early_exit:
            total += lut[("exit_pass",)] + lut[("keep_tensor",)] * sum(cached.values())
        for st in steps:
            u, first, side = st.slot // max_depth, st.slot % max_depth == 0, sides[st.slot]
            if st.new:
                total += lut[("block", u, first, side, st.start, st.stop, st.kernel)]
                kept = 1 if st.start == 0 else cached[st.slot]  # a block's first stage or a restart starts afresh
                cached[st.slot] = kept + blocks[st.slot].se
            else:
                total += lut[("pass", u, first, side)]
        total += head
        out.append(total)
    return out


def price(lut: LatencyTable, spec: SupernetSpec, arch: MultiStageArch) -> list[float]:
    """Cumulative early-exit latency per stage of ``arch`` by the table's backend: `runtime_stage_latency` for a
    `build_runtime_table` table (ONNX Runtime), `stage_latency` for an eager one."""
    if lut.meta.get("backend") == "onnxruntime":
        return runtime_stage_latency(lut, spec, arch)
    return stage_latency(lut, spec, arch)


def costs(lut: LatencyTable, spec: SupernetSpec, archs: Sequence[MultiStageArch]) -> np.ndarray:
    """Early-exit `price` of many archs, ``[A, S]`` float64: the cost column of a database for the search."""
    return np.array([price(lut, spec, a) for a in archs], dtype=np.float64)


# ---------------------------------------------------------------------------------------------- measuring nets


@torch.inference_mode()
def time_images(calls: dict[str, tuple[Callable[[Tensor], object], Tensor]], *, threads: int,
                warmup: int = 5) -> dict[str, tuple[dict[str, np.ndarray], list]]:
    """Batch-1 latency (ms, both clocks) of each ``name: (fn, images)`` on every image, and ``fn``'s outputs.

    The nets take turns image by image (the same image index for all, in a new order each time), so a change
    of machine load hits them alike and their ratios stay fair. Each timed call comes right after `PRIMES`
    untimed calls of the same net on the same image: a deployed net serves one image after another, and timed
    right after *other* nets (eager PyTorch above all) a batch-1 ONNX Runtime net takes up to 2x longer on this
    CPU, which is the neighbours' cost (caches), not the net's. All ``images`` tensors hold the same number of
    images, each already at its net's resolution; they are put in the pipeline's CPU memory format.
    """
    fmt = memory_format(torch.device("cpu"))
    sizes = {name: len(images) for name, (_, images) in calls.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"time_images needs the same number of images for every net, got {sizes}")
    n = next(iter(sizes.values()))
    imgs = {name: images.contiguous(memory_format=fmt) for name, (_, images) in calls.items()}
    cpu: dict[str, list[int]] = {name: [] for name in calls}
    wall: dict[str, list[int]] = {name: [] for name in calls}
    outs: dict[str, list] = {name: [] for name in calls}
    order = np.random.default_rng(0)
    names = list(calls)
    with torch_threads(threads):
        for i in range(min(warmup, n)):
            for name in names:
                calls[name][0](imgs[name][i:i + 1])
        for i in bar(range(n), desc="batch-1 latency", unit="img", leave=False):
            for j in order.permutation(len(names)):
                name = names[j]
                fn, x = calls[name][0], imgs[name][i:i + 1]
                for _ in range(PRIMES):  # the timed call follows the net's own work
                    fn(x)
                c, w = time.thread_time_ns(), time.perf_counter_ns()
                out = fn(x)
                wall[name].append(time.perf_counter_ns() - w)
                cpu[name].append(time.thread_time_ns() - c)
                outs[name].append(out)
    return {name: ({"thread_cpu": np.array(cpu[name]) / 1e6, "wall": np.array(wall[name]) / 1e6}, outs[name])
            for name in names}


class Outcome(NamedTuple):
    """Real early-exit inference of a split: top-1 (fraction), mean MACs per image, exit stage per image (0-based)."""

    top1: float
    avg_macs: float
    exit_stage: np.ndarray


@torch.inference_mode()
def early_exit_outcome(net: ExportedMultiStageNet, batches: Iterable[tuple[Tensor, Tensor]],
                       thresholds: Sequence[float]) -> Outcome:
    """``net.early_exit`` on every ``(images, labels)`` batch (e.g. ``data.batches`` of the test split), the
    images resized to the net's resolution on its device.

    In eval mode a sample's outputs do not depend on its batch, so batches give batch-1 decisions, faster.
    """
    dev = next(net.parameters()).device
    fmt = memory_format(dev)
    right, macs, stages = 0, 0, []
    for x, y in batches:
        r = net.early_exit(resize(x.to(dev), net.resolution).contiguous(memory_format=fmt), thresholds)
        right += int((r.pred == y.to(dev)).sum())
        macs += int(r.macs.sum())
        stages.append(r.exit_stage.cpu().numpy())
    if not stages:
        raise ValueError("early_exit_outcome: no batches")
    exit_stage = np.concatenate(stages)
    return Outcome(right / len(exit_stage), macs / len(exit_stage), exit_stage)


# ---------------------------------------------------------------------------------------------- validation


def compare(lut: LatencyTable, spec: SupernetSpec, archs: Sequence[MultiStageArch],
            measured: pd.DataFrame) -> pd.DataFrame:
    """``measured`` (the check rows of `build_table` for ``archs``) with `stage_latency`'s prediction and its error.

    Mode ``early_exit`` is compared with ``stage_latency(early_exit=True)``, ``run_stage`` with ``False``.
    """
    pred = {(i, mode): stage_latency(lut, spec, a, early_exit=mode == "early_exit")
            for i, a in enumerate(archs) for mode in MODES}
    try:
        p = np.array([pred[a, m][s - 1] for a, m, s in zip(measured.arch, measured["mode"], measured.stage)])
    except (KeyError, IndexError):
        raise ValueError("measured rows name archs or stages that are not in archs") from None
    out = measured.assign(resolution=[archs[a].resolution for a in measured.arch], predicted_ms=p)
    return out.assign(error_pct=100 * (out.predicted_ms - out.measured_ms) / out.measured_ms)


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean signed and mean/max absolute error (%) of `compare` per mode and stage."""
    g = frame.assign(abs_error_pct=frame.error_pct.abs()).groupby(["mode", "stage"])
    return g.agg(archs=("arch", "nunique"), mean_error_pct=("error_pct", "mean"),
                 mean_abs_error_pct=("abs_error_pct", "mean"), max_abs_error_pct=("abs_error_pct", "max")).reset_index()


# ---------------------------------------------------------------------------------------------- equal accuracy


def cheapest_thresholds(conf: np.ndarray, correct: np.ndarray, cost: np.ndarray, min_acc: float,
                        grid: float = 0.01, rtol: float = 1e-4) -> Best | None:
    """The grid thresholds of least average cost whose accuracy is at least ``min_acc`` (None if none reach it).

    Uses only ``thresholds.search``: with a huge omega, R's penalty wipes out every grid point costlier than the
    target, so ``search`` returns the most accurate point within the target cost; the least target at which
    that accuracy reaches ``min_acc`` is found by bisection (to relative precision ``rtol``).
    """
    cost = np.asarray(cost, dtype=np.float64)

    def best_within(target: float) -> Best:
        return search(conf, correct, cost, target, _HARD_OMEGA, grid)

    def ok(b: Best, target: float) -> bool:
        return b.cost <= target * (1 + 1e-12) and b.acc >= min_acc

    lo, hi = float(cost[0]) * (1 - rtol), float(cost[-1])
    top = best_within(hi)
    if not ok(top, hi):
        return None
    while hi - lo > rtol * hi:
        mid = (lo + hi) / 2
        b = best_within(mid)
        if ok(b, mid):
            hi, top = mid, b
        else:
            lo = mid
    return top


# ---------------------------------------------------------------------------------------------- ONNX Runtime table
# The same ops and keys as `build_table`, timed as ONNX Runtime graphs (the deployment of `enas4d.deploy`), so
# `stage_latency` prices an `enas4d.runtime.EarlyExitSession` instead of eager PyTorch. In a deployed folder a
# stage is *one* graph, so one session call per stage: every op graph's own call overhead (measured on trivial
# graphs with as many inputs and outputs) is taken off its time, and the per-stage costs go to the bookkeeping
# entries: ``exit`` = a call of a trivial 1-stage inference that leaves at stage 1 (session call, softmax, exit
# decision), ``exit_pass`` = each further stage's call and decision, ``keep_tensor`` = each reused tensor a stage
# graph reads (feeding it to the session, pruning it).


class _Graph(nn.Module):
    """A function of tensors over ``modules`` as a module ONNX export can trace."""

    def __init__(self, fn: Callable[..., object], *modules: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.parts = nn.ModuleList(modules)

    def forward(self, *xs: Tensor) -> object:
        return self.fn(*xs)


def _ort_call(graph: nn.Module, args: tuple[Tensor, ...], path: Path, threads: int) -> tuple[Callable[[], object], int]:
    """``graph`` exported to ``path`` and loaded in ONNX Runtime: a timed call on ``args`` and its input+output count."""
    n_out = len(out) if isinstance(out := graph(*args), tuple) else 1
    ins, outs = [f"i{i}" for i in range(len(args))], [f"o{i}" for i in range(n_out)]
    to_onnx(graph, args, ins, outs, path)
    sess = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    feed = {a.name: args[int(a.name[1:])].numpy() for a in sess.get_inputs()}
    return (lambda: sess.run(None, feed)), len(feed) + n_out


def _runtime_block(supernet: OFAMobileNetV3, slot: int, side: int, start: int, stop: int,
                   kernel: int) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """One stage's computation in a block (as `_block_call`) as a graph: ``(x[, z, pooled]) -> (y, z[, pooled])``;
    ``start == stop`` is a pass ``(x, z) -> y``."""
    elastic = supernet.blocks[slot]
    steps = {0: BlockStep(slot, 0, start, kernel), 1: BlockStep(slot, start, stop, kernel)} if start else \
        {0: BlockStep(slot, 0, stop, kernel)}
    block = MultiStageMBConv(elastic, steps, len(steps)).eval()
    x = torch.randn(1, elastic.spec.in_channels, side, side)
    stage, state = len(steps) - 1, BlockState()
    if stage:
        mbconv_stage(block, state, x, steps[0], 0)
    step = steps[stage]
    if not step.new:
        return _Graph(lambda x, z: mbconv_stage(block, BlockState(z), x, step, stage), block), (x, state.z)

    def run(x: Tensor, *prev: Tensor) -> tuple[Tensor, ...]:
        st = BlockState(prev[0], list(prev[1:])) if prev else BlockState()
        y = mbconv_stage(block, st, x, step, stage)
        return (y, st.z, torch.cat(st.pooled, 1)) if st.pooled else (y, st.z)

    return _Graph(run, block), (x, state.z, *state.pooled[:1]) if stage else (x,)


def _trivial_folder(out: Path, stages: int, tensors: int, classes: int) -> Path:
    """A deployed folder (1x1x1 "images") whose graphs compute next to nothing but pass ``tensors`` reused tensors
    between stages: what is left of an `EarlyExitSession` inference is its per-stage calls and bookkeeping."""
    names = [f"t{i}" for i in range(tensors)]
    image, t = torch.randn(2, 1, 1, 1), torch.randn(2, classes)
    out.mkdir(parents=True, exist_ok=True)
    meta = []
    for s in range(stages):
        ins, args = ([IMAGE], (image,)) if s == 0 else (names, (t,) * tensors)
        outs = [LOGITS, *(NEXT + n for n in names)] if s < stages - 1 else [LOGITS]

        def fn(*xs: Tensor, first: bool = s == 0, k: int = len(outs) - 1) -> tuple[Tensor, ...]:
            z = xs[0].flatten(1).expand(-1, classes) + 0.0 if first else sum(xs)
            return (z, *(z + i for i in range(k)))

        to_onnx(_Graph(fn), args, ins, outs, out / f"stage{s + 1}.onnx")
        res = fn(*args)
        meta.append({"file": f"stage{s + 1}.onnx", "inputs": {n: [None, *a.shape[1:]] for n, a in zip(ins, args)},
                     "outputs": {n: [None, *r.shape[1:]] for n, r in zip(outs, res)}})
    manifest = {"format": FORMAT, "kind": "bookkeeping", "resolution": 1, "in_channels": 1,
                "classes": [str(i) for i in range(classes)], "normalization": {}, "thresholds": [0.5] * (stages - 1),
                "stage_macs": [0] * stages, "stages": meta,
                "files": {m["file"]: sha256(out / m["file"]) for m in meta}}
    write_json(out / MANIFEST, manifest)
    return out


def _exit_thresholds(stage: int, stages: int) -> list[float]:
    """Thresholds under which every sample leaves after ``stage`` (0-based): T = 1 never exits, T = 0 always does."""
    return [1.0] * stage + [0.0] * (stages - 1 - stage)


@torch.inference_mode()
def build_runtime_table(spec: SupernetSpec, space: SearchSpace, *, threads: int, warmup: int, repeats: int,
                        seed: int = 0, calibrate: Sequence[MultiStageArch] = (),
                        check: Sequence[MultiStageArch] = ()) -> tuple[LatencyTable, pd.DataFrame]:
    """`build_table` for ONNX Runtime: the same op keys, each op an ONNX graph on ``threads`` intra-op threads, and
    the ``calibrate`` and ``check`` archs deployed (``enas4d.deploy.export_multistage``) and run by
    `EarlyExitSession` leaving at stage 1..S, all in the same interleaved rounds, every call right after
    `PRIMES` untimed calls of its own (``primed``): a deployed net serves one image after another with its
    weights in the caches (a Fashion-MNIST stage graph holds ~1-1.4 MB of weights; this CPU's L2 is 4 MB per
    core), so it is timed that way and its ops are priced that way too. Timed after unrelated calls instead, a
    net costs up to 2x more (docs/DESIGN.md, "Deployment").

    A lone op graph costs another amount than its share of a stage graph (output allocation, a graph boundary):
    ``meta["op_correction_ms"]`` is the extra cost per live op and ``meta["start_correction_ms"]`` the extra
    fixed cost of an inference (its stage 1), the least-squares fit of the ``calibrate`` archs' measured stage
    times minus their table sums (use archs other than the ``check`` ones, which test the table). Returns the
    table (``meta["backend"] == "onnxruntime"``) and the check rows (mode ``early_exit``) for `compare_runtime`.
    """
    if space.stages < 2:
        raise ValueError(f"a latency table prices multi-stage archs; the space has {space.stages} stage")
    for a in check:
        space.check(a)
    keys = op_keys(spec, space)
    start_time, load_before = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp_dir, torch.random.fork_rng(devices=[]), torch_threads(1):
        tmp = Path(tmp_dir)
        torch.manual_seed(seed)
        supernet = OFAMobileNetV3(spec, space).eval()
        slot_of = {(u, first): slot for u, first, slot in _shapes(space)}
        stem = nn.Sequential(supernet.stem, supernet.first_block)
        calls: dict[Hashable, Callable[[], object]] = {}
        io: dict[Hashable, int] = {}
        for i, key in enumerate(k for k in keys if k[0] in ("stem", "block", "pass", "head")):
            kind = key[0]
            if kind == "stem":
                graph, args = stem, (torch.randn(1, spec.in_channels, key[1], key[1]),)
            elif kind == "head":
                graph, args = supernet.head_layers, (torch.randn(1, spec.units[-1].width, key[1], key[1]),)
            else:
                slot = slot_of[key[1], key[2]]
                if kind == "block":
                    graph, args = _runtime_block(supernet, slot, key[3], *key[4:])
                else:
                    mid = _bounds(spec, space, slot)[1]
                    graph, args = _runtime_block(supernet, slot, key[3], mid, mid, space.kernels[0])
            calls[key], io[key] = _ort_call(graph, args, tmp / f"op{i}.onnx", threads)
        # Call overhead by input+output count: trivial graphs of 1 to 4 inputs and outputs.
        for n in range(1, 5):
            t = tuple(torch.randn(1, 8) for _ in range(n))
            calls[("call", n)], _ = _ort_call(_Graph(lambda *xs: tuple(-x for x in xs)), t, tmp / f"call{n}.onnx",
                                              threads)
        tensors, S = 16, space.stages
        books = {n: EarlyExitSession(_trivial_folder(tmp / f"book{n}", S, n, spec.num_classes), threads)
                 for n in (1, tensors)}
        x1 = np.zeros((1, 1, 1, 1), dtype=np.float32)  # one "image" of the trivial folders
        for n, sess in books.items():
            for s in (0, S - 1):
                calls[("book", n, s)] = lambda sess=sess, s=s: sess.run(x1, _exit_thresholds(s, S))
        for kind, archs in (("calibrate", calibrate), ("check", check)):
            for i, arch in enumerate(archs):
                net = MultiStageNet(supernet).export(arch).eval()
                folder = export_multistage(net, _exit_thresholds(S - 1, S), tmp / f"{kind}{i}",
                                           classes=[str(c) for c in range(spec.num_classes)],
                                           mean=[0.0] * spec.in_channels, std=[1.0] * spec.in_channels)
                sess = EarlyExitSession(folder, threads)
                x = np.random.default_rng(i).standard_normal((1, spec.in_channels, arch.resolution, arch.resolution),
                                                            dtype=np.float32)
                for s in range(S):
                    calls[(kind, i, "early_exit", s)] = lambda sess=sess, x=x, t=_exit_thresholds(s, S): sess.run(x, t)
        t = time_interleaved(calls, warmup, repeats, seed, primed=list(calls))
    # Overhead of a call with k inputs+outputs: a line through the trivial graphs' (2n, time) points.
    over = {c: np.polyfit([2 * n for n in range(1, 5)], [t[("call", n)][c] for n in range(1, 5)], 1) for c in CLOCKS}
    for k in io:
        t[k] = {c: max(t[k][c] - float(np.polyval(over[c], io[k])), 1e-6) for c in CLOCKS}
    b = {k[1:]: v for k, v in t.items() if k[0] == "book"}
    t[("exit",)] = b[1, 0]
    t[("exit_pass",)] = {c: max((b[1, S - 1][c] - b[1, 0][c]) / (S - 1), 1e-6) for c in CLOCKS}
    t[("keep_tensor",)] = {c: max((b[tensors, S - 1][c] - b[1, S - 1][c]) / ((tensors - 1) * (S - 1)), 1e-6)
                           for c in CLOCKS}
    clock = clock_for(threads)
    other = CLOCKS[1 - CLOCKS.index(clock)]
    meta = {"backend": "onnxruntime", "onnxruntime": ort.__version__, "machine": machine(threads),
            "load_avg_1min_before": round(load_before, 2), "batch": 1, "warmup": warmup, "repeats": repeats,
            "seconds": round(time.perf_counter() - start_time, 2), "check_archs": len(check),
            "call_overhead_ms": {c: [float(v) for v in over[c]] for c in CLOCKS},
            "space": {"units": space.units, "resolutions": list(space.resolutions), "depths": list(space.depths),
                      "expands": list(space.expands), "kernels": list(space.kernels), "stages": space.stages},
            "spec": spec_summary(spec)}
    fits = {c: _corrections(LatencyTable({k: t[k][c] for k in keys}, {}, c, meta), spec, calibrate,
                            [[t["calibrate", i, "early_exit", s][c] for s in range(S)] for i in range(len(calibrate))])
            for c in CLOCKS}
    meta["op_correction_ms"] = {c: fits[c][0] for c in CLOCKS}
    meta["start_correction_ms"] = {c: fits[c][1] for c in CLOCKS}
    lut = LatencyTable({k: t[k][clock] for k in keys}, {k: t[k][other] for k in keys}, clock, meta)
    rows = [{"arch": k[1], "mode": k[2], "stage": k[3] + 1, "measured_ms": v[clock], f"measured_{other}_ms": v[other]}
            for k, v in t.items() if k[0] == "check"]
    return lut, pd.DataFrame(rows, columns=["arch", "mode", "stage", "measured_ms", f"measured_{other}_ms"])


def _corrections(lut: LatencyTable, spec: SupernetSpec, archs: Sequence[MultiStageArch],
                 measured: list[list[float]]) -> tuple[float, float]:
    """Least-squares extra ms per live op and per inference (on stage 1) that make the table's stage sums match the
    measured (cumulative) stage times of ``archs``; (0, 0) without archs.

    Both terms are needed: with the per-op term alone, stage 1 of held-out archs came out systematically too
    high while stages 2-3 did not (the fixed part of an inference, stem and session set-up, is priced from
    trivial folders and lone graphs; docs/DESIGN.md "Deployment" has the numbers)."""
    if not archs:
        return 0.0, 0.0
    rows, got = [], []
    for arch, cum in zip(archs, measured):
        for s, ((m, n), inc) in enumerate(zip(_runtime_stages(lut, spec, arch), np.diff([0.0, *cum]))):
            rows.append((n, s == 0))
            got.append(inc - m)
    coef = np.linalg.lstsq(np.array(rows, dtype=np.float64), np.array(got), rcond=None)[0]
    return float(coef[0]), float(coef[1])


def _runtime_stages(lut: LatencyTable, spec: SupernetSpec, arch: MultiStageArch) -> list[tuple[float, int]]:
    """Per stage graph of deployed ``arch``: (table ms of its live ops and bookkeeping, number of live ops).

    A stage graph computes only what reaches its logits or a tensor a later stage reads (the ONNX export drops the
    rest, e.g. every block before a block without residual that its stage adds no channels to; a restart, a step
    with ``start == 0`` at a block earlier stages ran, reads nothing they left there), and each stage
    pays one session call (``exit``/``exit_pass``) plus ``keep_tensor`` per reused tensor its graph reads. The
    liveness walk is the export's: last stage first, tracking which pre-BN sums later stages read.
    """
    if lut.meta.get("backend") != "onnxruntime":
        raise LatencyError("the runtime price needs a table of build_runtime_table (meta backend onnxruntime)")
    if lut.meta.get("spec") != spec_summary(spec):
        raise LatencyError(f"latency table was measured for supernet {lut.meta.get('spec')}, not {spec_summary(spec)}")
    max_depth = len(arch.kernels[0]) // len(spec.units)
    blocks = spec.block_specs(max_depth)
    sides = slot_sides(spec, arch.resolution, max_depth)
    plan = Plan.of(arch, lambda slot, e: blocks[slot].mid(e), restart_slots(blocks))
    S = plan.num_stages
    out: list[tuple[float, int]] = [(0.0, 0)] * S
    pending: set[int] = set()  # slots whose pre-BN sum a later stage's graph reads
    for s in reversed(range(S)):
        seen = {st.slot for t in range(s) for st in plan.stages[t]}
        ms, ops, reads, inputs, y_needed = lut[("head", sides[-1])], 1, set(), 0, True
        for st in reversed(plan.stages[s]):
            z_needed = st.new and st.slot in pending
            if not (y_needed or z_needed):
                continue  # dead: neither its output nor its sum is used
            u, first, side = st.slot // max_depth, st.slot % max_depth == 0, sides[st.slot]
            ms += lut[("block", u, first, side, st.start, st.stop, st.kernel)] if st.new else \
                lut[("pass", u, first, side)]
            ops += 1
            if st.slot in seen and st.start:  # a restart (start 0) reads nothing of earlier stages here
                reads.add(st.slot)
                inputs += 1 + (st.new and blocks[st.slot].se)
            y_needed = z_needed or (y_needed and (st.new or blocks[st.slot].has_residual))
        if s == 0:
            ms += lut[("stem", arch.resolution)] + lut[("exit",)]
            ops += 1
        else:  # the stem features are read when the first live block reads its input
            ms += lut[("exit_pass",)] + lut[("keep_tensor",)] * (inputs + y_needed)
        pending = (pending - {st.slot for st in plan.stages[s] if st.new}) | reads
        out[s] = (ms, ops)
    return out


def runtime_stage_latency(lut: LatencyTable, spec: SupernetSpec, arch: MultiStageArch) -> list[float]:
    """Cumulative latency (ms) of one image that exits after stage 1, 2, ..., S of ``arch`` deployed with
    ``enas4d.deploy`` and run by `EarlyExitSession`, priced with a `build_runtime_table` table: the live ops and
    bookkeeping of every stage graph run (`_runtime_stages`), plus the table's corrections fitted on calibration
    archs (`_corrections`): one per live op, and one per inference on stage 1."""
    gamma = lut.meta.get("op_correction_ms", {}).get(lut.clock, 0.0)
    delta = lut.meta.get("start_correction_ms", {}).get(lut.clock, 0.0)
    return np.cumsum([ms + gamma * ops + delta * (s == 0)
                      for s, (ms, ops) in enumerate(_runtime_stages(lut, spec, arch))]).tolist()


def compare_runtime(lut: LatencyTable, spec: SupernetSpec, archs: Sequence[MultiStageArch],
                    measured: pd.DataFrame) -> pd.DataFrame:
    """`compare` for a runtime table: the check rows of `build_runtime_table` with `runtime_stage_latency`."""
    pred = [runtime_stage_latency(lut, spec, a) for a in archs]
    try:
        p = np.array([pred[a][s - 1] for a, s in zip(measured.arch, measured.stage)])
    except IndexError:
        raise ValueError("measured rows name archs or stages that are not in archs") from None
    out = measured.assign(resolution=[archs[a].resolution for a in measured.arch], predicted_ms=p)
    return out.assign(error_pct=100 * (out.predicted_ms - out.measured_ms) / out.measured_ms)
