"""Benchmark: vectorized threshold search vs a straightforward double loop (N=10,000 images, S=3, grid 0.01).

``python -m benchmarks.thresholds`` writes reports/benchmarks/thresholds.json: ms per search of the
vectorized ``thresholds.search``, of a plain numpy double loop over the 101 x 101 grid (stage-1 exits
hoisted out of the inner loop), and of ``thresholds.search_reference`` (``evaluate`` at every grid point,
the tests' reference); ``same_optimum`` says all three returned identical thresholds and R for every
target. Also the batched search's cost per arch. ``meets_goal`` compares CPU ms (wall ms on an idle machine;
this one is shared). The database is synthetic (``tests/synthetic_db.py``): search time depends on its shape,
not on where the numbers came from.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks._common import time_ms, write_json
from enas4d import thresholds
from enas4d.space import SearchSpace
from tests.synthetic_db import make_database

GOAL_MS = 5.0


def double_loop(conf: np.ndarray, correct: np.ndarray, cost: np.ndarray, target: float, omega: float,
                grid: float) -> thresholds.Best:
    """The straightforward S=3 search: nested loops over T_1 and T_2, numpy over the images inside."""
    values, c, n = thresholds.grid_values(grid), conf.astype(np.float64), len(conf)
    best = None
    for t1 in values:
        exit1 = c[:, 0] > t1
        n1, right1, rest = exit1.sum(), (exit1 & correct[:, 0]).sum(), ~exit1
        for t2 in values:
            exit2 = rest & (c[:, 1] > t2)
            exit3 = rest & ~exit2
            right = right1 + (exit2 & correct[:, 1]).sum() + (exit3 & correct[:, 2]).sum()
            acc, cost_avg = right / n, (cost[0] * n1 + cost[1] * exit2.sum() + cost[2] * exit3.sum()) / n
            r = thresholds.metric_r(acc, cost_avg, target, omega)
            if best is None or r > best.r:  # first maximum in lexicographic order, as thresholds.search
                best = thresholds.Best((float(t1), float(t2)), r, float(acc), float(cost_avg))
    return best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.thresholds", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--grid", type=float, default=0.01)
    p.add_argument("--omega", type=float, default=0.09)
    p.add_argument("--batch-archs", type=int, default=100)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    space = SearchSpace(units=5, resolutions=(16, 20, 24, 28, 32))
    db = make_database(space, args.batch_archs, args.images, seed=0)
    conf, correct, cost = db.conf[0], db.correct[0], db.cost[0]
    targets = [round(float(x), 3) for x in (0.9 * cost[0], cost[1], 1.1 * cost[2])]  # tight .. loose budgets
    times: dict[str, list[dict]] = {"vectorized": [], "loop": [], "reference": []}
    same = True
    for target in targets:
        found = {}
        for name, fn, repeats in (("vectorized", thresholds.search, 50), ("loop", double_loop, 1),
                                  ("reference", thresholds.search_reference, 1)):
            def run(fn=fn, name=name):
                found[name] = fn(conf, correct, cost, target, args.omega, args.grid)
            times[name].append(time_ms(run, repeats, warmup=int(repeats > 1)))
        same &= found["vectorized"] == found["loop"] == found["reference"]
    batch = time_ms(lambda: thresholds.search_many(db.conf, db.correct, db.cost, targets[1], args.omega, args.grid), 3)
    ms = {k: float(np.median([t["median_ms"] for t in v])) for k, v in times.items()}
    cpu = {k: float(np.median([t["median_cpu_ms"] for t in v])) for k, v in times.items()}
    write_json("thresholds", {
        "n_images": args.images, "stages": int(conf.shape[1]), "grid": args.grid,
        "grid_points": len(thresholds.grid_values(args.grid)) ** (conf.shape[1] - 1), "targets": targets,
        "vectorized_ms": ms["vectorized"], "loop_ms": ms["loop"], "reference_ms": ms["reference"],
        "speedup_vs_loop": ms["loop"] / ms["vectorized"], "cpu_ms": cpu,
        "same_optimum": bool(same), "goal_ms": GOAL_MS, "meets_goal": cpu["vectorized"] <= GOAL_MS,
        "batch": {"archs": args.batch_archs, "ms_per_arch": batch["median_ms"] / args.batch_archs,
                  "cpu_ms_per_arch": batch["median_cpu_ms"] / args.batch_archs},
        "note": "wall ms, median over the targets (vectorized: median of 50 calls each; loop and reference: one "
                "call each); cpu_ms: the same in process CPU time, less sensitive to other load on the machine",
    })


if __name__ == "__main__":
    main()
