"""Synthetic confidence/correctness databases: a stand-in for ``enas4d.database`` in tests and benchmarks.

Not a model of any real network. It has the real database's shapes and dtypes (``conf`` float16
[A, n, S] max softmax in [0.1, 1] for 10 classes, ``correct`` bool [A, n, S], ``cost`` [A, S] cumulative)
and the statistics that matter to the search: later stages are more accurate and cost more, wider/deeper
stages are more accurate, confidence is higher on correct predictions, and image difficulty is shared by
all archs (one metric set). R is therefore a smooth function of the arch plus a little noise, which is what
a metric predictor has to learn.

The cost is a MACs-like proxy in "MMACs": per block, new hidden channels times (input width + k^2 + output
width) times the feature-map area, plus a fixed stem and a per-stage head, scaled so that the space's
largest static subnet costs ``LARGEST_COST``; a stage pays only for channels earlier stages did not compute
(output reuse), as in DESIGN.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from enas4d.space import MultiStageArch, SearchSpace

LARGEST_COST = 4.0  # proxy MMACs of the largest static subnet: the params' targets (1.0..2.5) fall inside
_WIDTHS = (16, 24, 32, 48, 64)  # unit output widths (input of unit 0: 16)
_STRIDES = (1, 2, 2, 1, 2)  # after a stride-2 stem


@dataclass(frozen=True)
class SyntheticDatabase:
    archs: list[MultiStageArch]
    conf: np.ndarray  # [A, n, S] float16
    correct: np.ndarray  # [A, n, S] bool
    cost: np.ndarray  # [A, S] float64, cumulative per stage


def _raw_cost(space: SearchSpace, arch: MultiStageArch, static: bool) -> np.ndarray:
    """Unscaled cumulative cost per stage; ``static`` prices each stage as a stand-alone subnet instead."""
    out, total = [], 0.0
    for s in range(arch.num_stages):
        area = (arch.resolution / 2) ** 2
        step = area * 3 * 16 * 9 if s == 0 or static else 0.0  # stem
        for u in range(space.units):
            area /= _STRIDES[u] ** 2
            w_in = 16 if u == 0 else _WIDTHS[u - 1]
            for j in range(space.max_depth):
                i = u * space.max_depth + j
                prev = 0 if static or s == 0 else arch.expands[s - 1][i]
                new = (arch.expands[s][i] - prev) * (w_in if j == 0 else _WIDTHS[u])
                step += area * new * ((w_in if j == 0 else _WIDTHS[u]) + arch.kernels[s][i] ** 2 + _WIDTHS[u])
        step += area * _WIDTHS[-1] * 128 + 128 * 10  # head
        total = step if static else total + step
        out.append(total)
    return np.array(out)


def proxy_cost(space: SearchSpace, arch: MultiStageArch) -> np.ndarray:
    """Cumulative proxy cost [S] of exiting at each stage of ``arch``."""
    largest = MultiStageArch.from_stages([space.largest()])
    return _raw_cost(space, arch, static=False) * (LARGEST_COST / _raw_cost(space, largest, static=True)[0])


def make_database(space: SearchSpace, n_archs: int, n_images: int, seed: int) -> SyntheticDatabase:
    """``n_archs`` archs from ``space.sample`` with a synthetic database over ``n_images`` shared images."""
    rng = np.random.default_rng(seed)
    archs = [space.sample(rng) for _ in range(n_archs)]
    difficulty = rng.standard_normal(n_images)  # the metric set: the same images for every arch
    ref = _raw_cost(space, MultiStageArch.from_stages([space.largest()]), static=True)[0]
    conf = np.empty((n_archs, n_images, space.stages), dtype=np.float16)
    correct = np.empty((n_archs, n_images, space.stages), dtype=bool)
    for a, arch in enumerate(archs):
        size = _raw_cost(space, arch, static=True) / ref  # each stage's capacity, (0, 1]
        kernel = np.array([np.mean([k for k in ks if k]) for ks in arch.kernels]) / max(space.kernels)
        quality = 2.0 + 0.35 * np.log(size) + 0.3 * kernel + 0.03 * rng.standard_normal()
        persistent = rng.standard_normal(n_images)[:, None]  # an arch's own easy/hard images
        noise = rng.standard_normal((n_images, space.stages))
        margin = quality - 1.3 * difficulty[:, None] + 0.5 * persistent + 0.35 * noise
        correct[a] = margin > 0
        conf[a] = 0.1 + 0.9 / (1 + np.exp(-(1.5 * margin + 0.3 * rng.standard_normal(margin.shape))))
    cost = np.stack([proxy_cost(space, arch) for arch in archs])
    return SyntheticDatabase(archs, conf, correct, cost)
