"""Vectorized one-hot encoding of many multi-stage archs (the predictor's input), equal to ``SearchSpace.encode``.

``SearchSpace.encode`` walks every stage and slot in Python (~30 us per arch); the evolution encodes every
child (50,000 for 100 x 500), so this path gathers all archs' integers into arrays once and scatters the
ones with a few numpy operations. The layout is ``SearchSpace.encode``'s: per stage, per slot
``[one-hot kernel | one-hot expand]`` (zeros for a skipped slot), then per unit one-hot depth; finally the
one-hot resolution.

``arch_features`` adds a few numeric facts per stage, MACs among them, for the gradient-boosting predictor
(``predictor.model: gradient_boosting`` reads the one-hot code and these).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np

from enas4d.cost import mmacs, stage_macs
from enas4d.space import MultiStageArch, SearchSpace
from enas4d.supernet import SupernetSpec


def _index(values: np.ndarray, choices: Sequence[int], what: str) -> np.ndarray:
    """Position of every value in ``choices`` (a table look-up); a value outside the space raises."""
    table = np.full(max(choices) + 1, -1, dtype=np.intp)
    table[list(choices)] = np.arange(len(choices))
    ok = (values >= 0) & (values < len(table))
    idx = np.where(ok, table[np.where(ok, values, 0)], -1)
    if np.any(idx < 0):
        raise ValueError(f"{what} {int(values[idx < 0][0])} is not in the space's choices {tuple(choices)}")
    return idx


def _flat(archs: Sequence[MultiStageArch], field: str, count: int) -> np.ndarray:
    return np.fromiter(chain.from_iterable(chain.from_iterable(getattr(a, field) for a in archs)), np.intp, count)


def encode_many(space: SearchSpace, archs: Sequence[MultiStageArch]) -> np.ndarray:
    """One-hot codes [len(archs), space.encoding_size] (float32), row ``i`` == ``space.encode(archs[i])``."""
    n, stages, slots, units = len(archs), space.stages, space.slots, space.units
    out = np.zeros((n, space.encoding_size), dtype=np.float32)
    if n == 0:
        return out
    bad = next((a for a in archs
                if a.num_stages != stages or len(a.kernels[0]) != slots or len(a.depths[0]) != units), None)
    if bad is not None:
        raise ValueError(f"arch with {bad.num_stages} stages/{len(bad.kernels[0])} slots does not fit the space "
                         f"({stages} stages/{slots} slots)")
    kernels = _flat(archs, "kernels", n * stages * slots).reshape(n, stages, slots)
    expands = _flat(archs, "expands", n * stages * slots).reshape(n, stages, slots)
    depths = _flat(archs, "depths", n * stages * units).reshape(n, stages, units)
    res = np.fromiter((a.resolution for a in archs), np.intp, n)

    nk, ne, nd = len(space.kernels), len(space.expands), len(space.depths)
    per_slot, per_stage = nk + ne, slots * (nk + ne) + units * nd
    stage_base = (np.arange(stages) * per_stage)[None, :, None]
    slot_base = stage_base + (np.arange(slots) * per_slot)[None, None, :]
    run = kernels > 0
    rows3 = np.broadcast_to(np.arange(n)[:, None, None], run.shape)
    kernel_idx = _index(np.where(run, kernels, space.kernels[0]), space.kernels, "kernel")
    expand_idx = _index(np.where(run, expands, space.expands[0]), space.expands, "expand")
    out[rows3[run], (slot_base + kernel_idx)[run]] = 1
    out[rows3[run], (slot_base + nk + expand_idx)[run]] = 1
    depth_base = stage_base + slots * per_slot + (np.arange(units) * nd)[None, None, :]
    out[np.arange(n)[:, None, None], depth_base + _index(depths, space.depths, "depth")] = 1
    out[np.arange(n), stages * per_stage + _index(res, space.resolutions, "resolution")] = 1
    return out


def arch_features(spec: SupernetSpec, archs: Sequence[MultiStageArch]) -> np.ndarray:
    """Numeric features [len(archs), 1 + 2 S + 3 S U] (float64), half of the gradient-boosting predictor's input.

    Per arch: the resolution; per stage the cumulative MMACs (``cost.stage_macs``, what the database stores)
    and the MMACs the stage adds; per stage and unit the depth and the mean kernel and mean expand of the
    slots it runs. Trees split on these directly, where the one-hot code spreads the same facts over ~400
    columns (docs/DESIGN.md "Search": held-out Kendall tau of each model and encoding).
    """
    units = len(spec.units)
    rows = []
    for arch in archs:
        cum = mmacs(stage_macs(spec, arch))
        row = [float(arch.resolution), *cum, *np.diff(cum, prepend=0.0)]
        for s in range(arch.num_stages):
            k = np.asarray(arch.kernels[s]).reshape(units, -1)
            e = np.asarray(arch.expands[s]).reshape(units, -1)
            run = k > 0  # a skipped slot holds kernel 0; every unit runs at least one block
            for u in range(units):
                row += [float(arch.depths[s][u]), float(k[u][run[u]].mean()), float(e[u][run[u]].mean())]
        rows.append(row)
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
