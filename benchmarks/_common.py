"""Shared by the benchmark scripts: timing, the machine they ran on, atomic JSON output.

Every script is run from the repository root (``python -m benchmarks.<name>``) and writes
``reports/benchmarks/<name>.json``; ratios in a file are measured in the same run, on the same machine.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from enas4d import config, files
from enas4d.space import SearchSpace
from enas4d.supernet import PRESETS, SupernetSpec

OUT = Path(__file__).resolve().parents[1] / "reports" / "benchmarks"


def spec_space(cfg: config.Config) -> tuple[SupernetSpec, SearchSpace]:
    """The preset and search space of ``cfg`` (benchmarks time library code and import no pipeline glue)."""
    s = cfg.supernet
    spec = PRESETS[s.preset]
    return spec, SearchSpace(units=len(spec.units), resolutions=tuple(s.resolutions), depths=tuple(s.depths),
                             expands=tuple(s.expands), kernels=tuple(s.kernels), stages=cfg.finetune.stages)


def time_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict:
    """Median and best wall time of ``fn`` in ms over ``repeats`` calls after ``warmup`` calls.

    Also the median CPU time of this process (all its threads): on a shared machine wall time grows with
    other people's load, CPU time much less.
    """
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    return {"median_ms": statistics.median(wall), "min_ms": min(wall), "median_cpu_ms": statistics.median(cpu),
            "repeats": repeats}


def rounded(obj, places: int = 5):
    """``obj`` with every float rounded to ``places`` decimals (readable JSON; timings are noisier anyway)."""
    if isinstance(obj, float):
        return round(obj, places)
    if isinstance(obj, dict):
        return {k: rounded(v, places) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, places) for v in obj]
    return obj


def machine() -> dict:
    """Enough to tell two benchmark files apart: CPU, load, library versions, threads."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "load_avg_1min": os.getloadavg()[0],
            "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def write_json(name: str, results: dict) -> Path:
    """Write ``results`` (plus ``machine()``, floats rounded) to reports/benchmarks/<name>.json atomically; print it."""
    text = json.dumps(rounded({**results, "machine": machine()}), indent=1) + "\n"
    path = files.write_text(OUT / f"{name}.json", text)
    print(text, end="")
    return path
