"""Benchmark: regularized evolution, population 100 x 500 generations, predictor-sized MLP fitness (goal <= 10 s).

``python -m benchmarks.evolution`` writes reports/benchmarks/evolution.json: wall seconds of
``evolution.evolve`` on the Fashion-MNIST space (5 units, resolutions 16..32, 3 stages) with the params'
evolution settings, split into fitness time (``encoding.encode_many`` + ``predictor.predict`` of an
untrained 3 x 400 MLP: the cost does not depend on the weights) and the rest (tournaments,
``space.mutate``/``space.crossover``); the same for ``search_static``; and the per-batch cost of the two
encoders. One torch thread. ``meets_goal`` compares the run's CPU seconds (what wall seconds are on an idle
machine; this 2-core machine is shared, so wall seconds grow with other people's load).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import time_ms, write_json
from enas4d import config, evolution, predictor
from enas4d.encoding import encode_many
from enas4d.space import SearchSpace

GOAL_S = 10.0


def timed_run(space: SearchSpace, hidden, settings: dict, static: bool) -> dict:
    """One evolution with a random predictor-sized MLP: wall and CPU seconds, and wall seconds in the fitness."""
    search_space = space.restrict(stages=1) if static else space
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = predictor.MetricPredictor(search_space.encoding_size, hidden)
    inner = evolution.predictor_fitness(model, search_space)
    spent = [0.0]

    def fitness(archs):
        start = time.perf_counter()
        out = inner(archs)
        spent[0] += time.perf_counter() - start
        return out

    run = evolution.search_static if static else evolution.evolve
    start, start_cpu = time.perf_counter(), time.process_time()
    result = run(space, fitness, **settings)
    total = time.perf_counter() - start
    return {"seconds": total, "cpu_seconds": time.process_time() - start_cpu,
            "fitness_seconds": spent[0], "breeding_seconds": total - spent[0],
            "evaluations": result.evaluations, "best_fitness": float(result.best_fitness[0])}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.evolution", description=__doc__.splitlines()[0])
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--generations", type=int, help="override evolution.generations (default: params, 500)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = config.load(args.params)
    ev = cfg.evolution
    settings = dict(population=ev.population, generations=args.generations or ev.generations,
                    sample_size=ev.sample_size, mutation_prob=ev.mutation_prob, crossover_prob=ev.crossover_prob,
                    seed=cfg.seed)
    space = SearchSpace(units=5, resolutions=(16, 20, 24, 28, 32))
    multi = timed_run(space, cfg.predictor.hidden, settings, static=False)
    static = timed_run(space, cfg.predictor.hidden, settings, static=True)

    archs = [space.sample(np.random.default_rng(i)) for i in range(ev.population)]
    write_json("evolution", {
        "space": {"units": space.units, "resolutions": list(space.resolutions), "stages": space.stages,
                  "encoding_size": space.encoding_size},
        "settings": settings, "hidden": list(cfg.predictor.hidden),
        "multistage": multi, "static": static, "goal_s": GOAL_S, "meets_goal": multi["cpu_seconds"] <= GOAL_S,
        "encode_ms_per_population": {
            "space.encode (loop)": time_ms(lambda: [space.encode(a) for a in archs], 20)["median_ms"],
            "encoding.encode_many": time_ms(lambda: encode_many(space, archs), 20)["median_ms"]},
        "breeding_ms_per_population": time_ms(
            lambda: [space.mutate(a, np.random.default_rng(0), ev.mutation_prob) for a in archs], 10)["median_ms"],
    })


if __name__ == "__main__":
    main()
