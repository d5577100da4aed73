"""The search space: static OFA subnets and multi-stage architectures as plain frozen values.

A supernet has ``units`` elastic units of up to ``max_depth`` blocks each, so an arch addresses
``units * max_depth`` block *slots*. Slot ``u * max_depth + j`` is block ``j`` of unit ``u``.
A slot that a (stage of an) arch does not run holds kernel 0 and expand 0; this keeps every arch
in one canonical form, so equal networks are equal values and one-hot codes of skipped blocks are zero.

Multi-stage archs follow the paper: stage ``s`` runs the first ``D_s`` blocks of each unit, with
``D_1 <= D_2 <= ... <= D_S``; every block has a kernel per stage and a *cumulative* expand ratio per
stage, non-decreasing over the stages that run it (stage ``s`` owns hidden channels
``[mid(e_{s-1}), mid(e_s))``). A stage that runs a block an earlier stage skipped sees expand 0 for
that earlier stage, so it computes channels ``[0, mid(e_s))`` itself (the paper's catch-up rule).
A stage that adds no channels to a block (``e_s == e_{s-1}``) computes nothing there, so its kernel
has no effect: the canonical arch repeats the previous stage's kernel, and such archs are not counted
or sampled twice.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class SubnetArch:
    """One static subnet of the supernet (a single-exit network)."""

    resolution: int
    depths: tuple[int, ...]  # per unit
    kernels: tuple[int, ...]  # per slot, 0 where the slot is skipped
    expands: tuple[int, ...]  # per slot, 0 where the slot is skipped

    def to_dict(self) -> dict:
        return {"resolution": self.resolution, "depths": list(self.depths),
                "kernels": list(self.kernels), "expands": list(self.expands)}

    @classmethod
    def from_dict(cls, d: dict) -> SubnetArch:
        return cls(int(d["resolution"]), tuple(d["depths"]), tuple(d["kernels"]), tuple(d["expands"]))


@dataclass(frozen=True)
class MultiStageArch:
    """A multi-stage arch: per stage depths, kernels and cumulative expands; one resolution."""

    resolution: int
    depths: tuple[tuple[int, ...], ...]  # [stage][unit]
    kernels: tuple[tuple[int, ...], ...]  # [stage][slot]
    expands: tuple[tuple[int, ...], ...]  # [stage][slot], cumulative ratio

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    def stage(self, s: int) -> SubnetArch:
        """Stage ``s`` (0-based) seen as a static subnet: its depths, kernels and cumulative widths.

        For ``s == 0`` this *is* the network stage 1 computes; for later stages it is the static
        subnet of the same size, which the cascade-without-reuse baseline runs.
        """
        return SubnetArch(self.resolution, self.depths[s], self.kernels[s], self.expands[s])

    @classmethod
    def from_stages(cls, stages: list[SubnetArch] | tuple[SubnetArch, ...]) -> MultiStageArch:
        if len({a.resolution for a in stages}) != 1:
            raise ValueError("all stages of a multi-stage arch share one resolution")
        return cls(stages[0].resolution, tuple(a.depths for a in stages),
                   tuple(a.kernels for a in stages), tuple(a.expands for a in stages))

    def to_dict(self) -> dict:
        return {"resolution": self.resolution, "depths": [list(d) for d in self.depths],
                "kernels": [list(k) for k in self.kernels], "expands": [list(e) for e in self.expands]}

    @classmethod
    def from_dict(cls, d: dict) -> MultiStageArch:
        return cls(int(d["resolution"]), tuple(tuple(x) for x in d["depths"]),
                   tuple(tuple(x) for x in d["kernels"]), tuple(tuple(x) for x in d["expands"]))


@functools.lru_cache(maxsize=None)
def _nondecreasing(choices: tuple[int, ...], n: int) -> tuple[tuple[int, ...], ...]:
    """All non-decreasing sequences of length ``n`` over sorted ``choices`` (cached: evolution calls it a lot)."""
    return tuple(itertools.combinations_with_replacement(sorted(choices), n))


@functools.lru_cache(maxsize=None)
def _kernel_configs(expands: tuple[int, ...], n_kernels: int, n: int) -> np.ndarray:
    """Per cumulative-expand sequence of a block run by ``n`` stages (``_nondecreasing`` order), its number
    of kernel choices: one per stage that adds channels (the first, and each where the expand grows)."""
    out = np.array([n_kernels ** (1 + sum(b > a for a, b in zip(seq, seq[1:])))
                    for seq in _nondecreasing(expands, n)], dtype=np.float64)
    out.flags.writeable = False  # shared by every caller
    return out


@functools.lru_cache(maxsize=None)
def _first_stages(unit_depths: tuple[int, ...], max_depth: int) -> tuple[int, ...]:
    """Per block of a unit, the first (0-based) stage that runs it; ``len(unit_depths)`` if none does
    (depths never shrink from stage to stage)."""
    return tuple(sum(d <= j for d in unit_depths) for j in range(max_depth))


@functools.lru_cache(maxsize=None)
def _seq_cdf(expands: tuple[int, ...], n_kernels: int, n: int) -> np.ndarray:
    """Cumulative ``_kernel_configs`` probabilities: drawing a sequence by ``searchsorted`` on one uniform
    number is ~5x cheaper than ``rng.choice(p=...)``, which mutation calls for every resampled block."""
    w = _kernel_configs(expands, n_kernels, n)
    out = np.cumsum(w / w.sum())
    out.flags.writeable = False
    return out


@dataclass(frozen=True)
class SearchSpace:
    """The choices of the elastic supernet, and sampling/mutation/crossover/encoding of archs."""

    units: int
    resolutions: tuple[int, ...]
    depths: tuple[int, ...] = (2, 3, 4)
    expands: tuple[int, ...] = (3, 4, 6)
    kernels: tuple[int, ...] = (3, 5, 7)
    stages: int = 3

    @cached_property
    def max_depth(self) -> int:
        return max(self.depths)

    @cached_property
    def slots(self) -> int:
        return self.units * self.max_depth

    def restrict(self, **choices: tuple[int, ...]) -> SearchSpace:
        """A sub-space (e.g. a progressive-shrinking phase that only opens the kernel choices)."""
        kw = dict(units=self.units, resolutions=self.resolutions, depths=self.depths,
                  expands=self.expands, kernels=self.kernels, stages=self.stages)
        kw.update({k: tuple(v) if k != "stages" else v for k, v in choices.items()})
        return SearchSpace(**kw)

    # ---------------------------------------------------------------- static subnets
    def largest(self) -> SubnetArch:
        return self._uniform_static(max(self.resolutions), max(self.depths), max(self.kernels), max(self.expands))

    def smallest(self) -> SubnetArch:
        return self._uniform_static(min(self.resolutions), min(self.depths), min(self.kernels), min(self.expands))

    def _uniform_static(self, r: int, d: int, k: int, e: int) -> SubnetArch:
        run = [j < d for _ in range(self.units) for j in range(self.max_depth)]
        return SubnetArch(r, (d,) * self.units, tuple(k if x else 0 for x in run), tuple(e if x else 0 for x in run))

    def sample_subnet(self, rng: np.random.Generator) -> SubnetArch:
        """Uniform depth per unit, kernel and expand per block (OFA's training-time sampling)."""
        depths = tuple(int(rng.choice(self.depths)) for _ in range(self.units))
        kernels, expands = [], []
        for u in range(self.units):
            for j in range(self.max_depth):
                run = j < depths[u]
                kernels.append(int(rng.choice(self.kernels)) if run else 0)
                expands.append(int(rng.choice(self.expands)) if run else 0)
        return SubnetArch(int(rng.choice(self.resolutions)), depths, tuple(kernels), tuple(expands))

    def check_subnet(self, a: SubnetArch) -> None:
        """Raise ValueError naming the first field that makes ``a`` invalid in this space."""
        if a.resolution not in self.resolutions:
            raise ValueError(f"resolution {a.resolution} not in {self.resolutions}")
        if len(a.depths) != self.units or len(a.kernels) != self.slots or len(a.expands) != self.slots:
            raise ValueError(f"arch has {len(a.depths)} units/{len(a.kernels)} slots; "
                             f"space has {self.units}/{self.slots}")
        for u, d in enumerate(a.depths):
            if d not in self.depths:
                raise ValueError(f"depth {d} of unit {u} not in {self.depths}")
            for j in range(self.max_depth):
                i = u * self.max_depth + j
                k, e = a.kernels[i], a.expands[i]
                ok = (k in self.kernels and e in self.expands) if j < d else (k == 0 and e == 0)
                if not ok:
                    raise ValueError(f"slot {i} (unit {u}, block {j}, depth {d}) has kernel {k}, expand {e}")

    # ---------------------------------------------------------------- multi-stage archs
    @cached_property
    def _depth_tuples(self) -> tuple[tuple[int, ...], ...]:
        return _nondecreasing(self.depths, self.stages)

    def _slot_configs(self, n_run: int) -> int:
        """How many canonical (expand sequence, kernels) configs a block run by ``n_run`` stages has."""
        return int(_kernel_configs(self.expands, len(self.kernels), n_run).sum()) if n_run else 1

    @cached_property
    def _unit_counts(self) -> tuple[int, ...]:
        """Per depth tuple of a unit (``_depth_tuples`` order), how many canonical configs its blocks have
        (exact integers: the space has ~10^37 archs)."""
        return tuple(math.prod(self._slot_configs(sum(d > j for d in dt)) for j in range(self.max_depth))
                     for dt in self._depth_tuples)

    @cached_property
    def _unit_weights(self) -> np.ndarray:
        """P(depth tuple of a unit) under uniform sampling of canonical multi-stage archs."""
        w = np.array(self._unit_counts, dtype=np.float64)
        return w / w.sum()

    def size(self) -> int:
        """Number of distinct (canonical) multi-stage archs: the paper reports ~10^37 for its space."""
        return len(self.resolutions) * sum(self._unit_counts) ** self.units

    def _sample_slot(self, rng: np.random.Generator, first: int) -> tuple[list[int], list[int]]:
        """Kernels and cumulative expands of one block first run by stage ``first`` (0-based)."""
        n = self.stages - first
        ks, es = [0] * self.stages, [0] * self.stages
        if n:
            cdf = _seq_cdf(self.expands, len(self.kernels), n)
            seq = _nondecreasing(self.expands, n)[min(int(np.searchsorted(cdf, rng.random(), side="right")),
                                                      len(cdf) - 1)]
            picks = rng.integers(len(self.kernels), size=n)
            for i, s in enumerate(range(first, self.stages)):
                es[s] = seq[i]
                ks[s] = ks[s - 1] if i and seq[i] == seq[i - 1] else self.kernels[picks[i]]
        return ks, es

    def sample(self, rng: np.random.Generator) -> MultiStageArch:
        """A multi-stage arch drawn uniformly from all canonical valid archs."""
        weights = self._unit_weights
        depths = [self._depth_tuples[int(rng.choice(len(weights), p=weights))] for _ in range(self.units)]
        res = int(rng.choice(self.resolutions))
        return self._assemble(res, depths, lambda u, j, first: self._sample_slot(rng, first))

    def _assemble(self, res: int, unit_depths: list[tuple[int, ...]], slot_fn) -> MultiStageArch:
        """Build an arch from per-unit depth tuples and ``slot_fn(unit, block, first_stage) -> (ks, es)``."""
        S = self.stages
        kernels = [[0] * self.slots for _ in range(S)]
        expands = [[0] * self.slots for _ in range(S)]
        for u, dt in enumerate(unit_depths):
            for j, first in enumerate(_first_stages(dt, self.max_depth)):
                ks, es = slot_fn(u, j, first)
                for s in range(S):
                    kernels[s][u * self.max_depth + j] = ks[s]
                    expands[s][u * self.max_depth + j] = es[s]
        return MultiStageArch(res, tuple(tuple(dt[s] for dt in unit_depths) for s in range(S)),
                              tuple(map(tuple, kernels)), tuple(map(tuple, expands)))

    def _slot(self, a: MultiStageArch, i: int) -> tuple[list[int], list[int]]:
        return [k[i] for k in a.kernels], [e[i] for e in a.expands]

    def _unit_depths(self, a: MultiStageArch) -> list[tuple[int, ...]]:
        return [tuple(a.depths[s][u] for s in range(a.num_stages)) for u in range(self.units)]

    def largest_multistage(self) -> MultiStageArch:
        """Every stage is the largest subnet (stages 2.. add no channels: all width sits in stage 1)."""
        return MultiStageArch.from_stages([self.largest()] * self.stages)

    def smallest_multistage(self) -> MultiStageArch:
        return MultiStageArch.from_stages([self.smallest()] * self.stages)

    def mutate(self, a: MultiStageArch, rng: np.random.Generator, prob: float) -> MultiStageArch:
        """Resample the resolution, each unit's depth tuple and each block's config with ``prob``.

        A block whose set of running stages changed is resampled too, so the result is valid by
        construction (no rejection loop).
        """
        res = int(rng.choice(self.resolutions)) if rng.random() < prob else a.resolution
        old = self._unit_depths(a)
        new = [self._depth_tuples[int(rng.integers(len(self._depth_tuples)))] if rng.random() < prob else dt
               for dt in old]

        def slot_fn(u: int, j: int, first: int):
            if first != _first_stages(old[u], self.max_depth)[j] or rng.random() < prob:
                return self._sample_slot(rng, first)
            return self._slot(a, u * self.max_depth + j)

        return self._assemble(res, new, slot_fn)

    def crossover(self, a: MultiStageArch, b: MultiStageArch, rng: np.random.Generator) -> MultiStageArch:
        """Each unit (its depths and blocks) and the resolution come whole from one parent: always valid."""
        pick = [a if rng.random() < 0.5 else b for _ in range(self.units)]
        res = (a if rng.random() < 0.5 else b).resolution
        m = self.max_depth

        def join(field: str, per_unit: int) -> tuple[tuple[int, ...], ...]:
            return tuple(tuple(v for u, p in enumerate(pick)
                               for v in getattr(p, field)[s][u * per_unit:(u + 1) * per_unit])
                         for s in range(a.num_stages))

        return MultiStageArch(res, join("depths", 1), join("kernels", m), join("expands", m))

    def check(self, a: MultiStageArch) -> None:
        """Raise ValueError naming what makes ``a`` invalid (stage checks, then monotonicity)."""
        if a.num_stages != self.stages:
            raise ValueError(f"arch has {a.num_stages} stages; space has {self.stages}")
        for s in range(a.num_stages):
            try:
                self.check_subnet(a.stage(s))
            except ValueError as err:
                raise ValueError(f"stage {s + 1}: {err}") from None
        for s in range(1, a.num_stages):
            for u in range(self.units):
                if a.depths[s][u] < a.depths[s - 1][u]:
                    raise ValueError(f"unit {u}: depth of stage {s + 1} < stage {s} "
                                     f"({a.depths[s][u]} < {a.depths[s - 1][u]})")
            for i in range(self.slots):
                if a.expands[s][i] < a.expands[s - 1][i]:
                    raise ValueError(f"slot {i}: cumulative expand of stage {s + 1} < stage {s}")
                if a.expands[s][i] == a.expands[s - 1][i] > 0 and a.kernels[s][i] != a.kernels[s - 1][i]:
                    raise ValueError(f"slot {i}: stage {s + 1} adds no channels, so its kernel must repeat "
                                     f"stage {s}'s ({a.kernels[s][i]} != {a.kernels[s - 1][i]})")

    # ---------------------------------------------------------------- encoding
    @property
    def encoding_size(self) -> int:
        per_stage = self.slots * (len(self.kernels) + len(self.expands)) + self.units * len(self.depths)
        return self.stages * per_stage + len(self.resolutions)

    def encode(self, a: MultiStageArch) -> np.ndarray:
        """The paper's feature vector: one-hot widths, kernels, depths per stage, and resolution."""
        v = np.zeros(self.encoding_size, dtype=np.float32)
        o = 0
        for s in range(a.num_stages):
            for i in range(self.slots):
                if a.kernels[s][i]:
                    v[o + self.kernels.index(a.kernels[s][i])] = 1
                    v[o + len(self.kernels) + self.expands.index(a.expands[s][i])] = 1
                o += len(self.kernels) + len(self.expands)
            for u in range(self.units):
                v[o + self.depths.index(a.depths[s][u])] = 1
                o += len(self.depths)
        v[o + self.resolutions.index(a.resolution)] = 1
        return v


def log10_size(space: SearchSpace) -> float:
    """log10 of the number of multi-stage archs, for reports."""
    return math.log10(space.size())
