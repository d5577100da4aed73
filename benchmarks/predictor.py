"""Benchmark: metric predictor training time, RMSE and Kendall tau on held-out archs (goal tau >= 0.8).

    python -m benchmarks.predictor [--database databases/confidence] [--params params.yaml]
    python -m benchmarks.predictor --synthetic 400     # tests/synthetic_db.py stand-in, 400 archs

Runs on the real database (``enas4d.database.load``; cost = MACs in millions, as the targets) unless
``--synthetic N`` asks for the synthetic stand-in. Sizes and hyperparameters come from the params file
(``search``, ``predictor``, ``supernet``). Every model uses the same seed, hence the same held-out archs.
Reported, all in one run:

- ``paper``: one predictor per target at the configured omega (the paper's setting);
- ``unstandardized``: the same on raw R, to show whether standardizing the targets matters;
- ``conditional``: one predictor over (omega, target) for omega in {omega/2, omega, 2 omega} x targets,
  scored per objective on the held-out archs (compare with ``paper`` at the configured omega);
- ``held_out_target``: the conditional predictor trained without the middle target, scored on it, against
  the per-target predictor that was trained on it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import write_json
from enas4d import config, predictor, thresholds
from enas4d.encoding import encode_many
from enas4d.space import MultiStageArch, SearchSpace

GOAL_TAU = 0.8


Data = tuple[SearchSpace, list[MultiStageArch], np.ndarray, np.ndarray, np.ndarray]  # space, archs, conf, correct, cost


def real_database(path: Path, cfg: config.Config) -> Data:
    """The built database: its archs, conf, correct, and cumulative cost in MMACs."""
    from enas4d import database

    if cfg.search.cost != "macs":
        sys.exit(f"{path}: the predictor benchmark prices archs in MACs, but search.cost is {cfg.search.cost!r}")
    db = database.load(path)
    space = _space(cfg, units=len(db.archs[0].depths[0]), stages=db.conf.shape[2])
    return space, db.archs, db.conf, db.correct, db.macs / 1e6


def synthetic_database(n_archs: int, n_images: int, cfg: config.Config) -> Data:
    """``tests.synthetic_db.make_database`` on the params' search space (5 units, as ``fmnist_small``)."""
    from tests.synthetic_db import make_database

    space = _space(cfg, units=5, stages=cfg.finetune.stages)
    db = make_database(space, n_archs, n_images, seed=cfg.seed)
    return space, db.archs, db.conf, db.correct, db.cost


def _space(cfg: config.Config, units: int, stages: int) -> SearchSpace:
    s = cfg.supernet
    return SearchSpace(units=units, resolutions=s.resolutions, depths=s.depths, expands=s.expands,
                       kernels=s.kernels, stages=stages)


def _summary(report: predictor.TrainReport) -> dict:
    """Held-out numbers and training time (the per-objective list only where there are several objectives)."""
    d = report.to_dict()
    d.pop("epoch_loss")
    if len(d["per_objective"]) == 1:
        d.pop("per_objective")
    return d


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.predictor", description=__doc__.splitlines()[0])
    p.add_argument("--database", type=Path, default=Path("databases/confidence"))
    p.add_argument("--synthetic", type=int, metavar="ARCHS", help="use tests/synthetic_db.py with this many archs")
    p.add_argument("--images", type=int, default=10_000, help="images of the synthetic database")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = config.load(args.params)
    if args.synthetic:
        space, archs, conf, correct, cost = synthetic_database(args.synthetic, args.images, cfg)
        source = f"synthetic: tests/synthetic_db.py, seed {cfg.seed}"
    else:
        space, archs, conf, correct, cost = real_database(args.database, cfg)
        source = str(args.database)

    omega, targets, grid = cfg.search.omega, list(cfg.search.targets), cfg.search.grid
    omegas = [omega / 2, omega, 2 * omega]
    objectives = [(w, t) for w in omegas for t in targets]  # conditional grid; [len(targets):2*len] = paper's
    R = thresholds.r_for_targets(conf, correct, cost, objectives, grid)
    X = encode_many(space, archs)
    hp = dict(hidden=cfg.predictor.hidden, lr=cfg.predictor.lr, weight_decay=cfg.predictor.weight_decay,
              epochs=cfg.predictor.epochs, batch_size=cfg.predictor.batch_size,
              val_fraction=cfg.predictor.val_fraction, seed=cfg.seed)
    paper_cols = [objectives.index((omega, t)) for t in targets]

    def per_target(standardize: bool) -> dict:
        runs = [predictor.train_predictor(X, R[:, c], standardize=standardize, **hp)[1] for c in paper_cols]
        return {"per_target": [{"target": t, **_summary(r)} for t, r in zip(targets, runs)],
                "mean_kendall_tau": float(np.mean([r.held_out.kendall_tau for r in runs])),
                "mean_rmse": float(np.mean([r.held_out.rmse for r in runs])),
                "train_seconds_per_model": float(np.mean([r.seconds for r in runs]))}

    paper, raw = per_target(True), per_target(False)
    _, cond = predictor.train_predictor(X, R, cond=np.array(objectives), **hp)

    middle = targets[len(targets) // 2]
    keep = [i for i, (_, t) in enumerate(objectives) if t != middle]
    model, cond_wo = predictor.train_predictor(X, R[:, keep], cond=np.array(objectives)[keep], **hp)
    probe = objectives.index((omega, middle))
    unseen = predictor.evaluate_predictor(model, X[cond_wo.val_archs], R[cond_wo.val_archs, probe][:, None],
                                          cond=np.array([[omega, middle]]))
    seen = paper["per_target"][targets.index(middle)]

    write_json("predictor", {
        "database": source, "archs": len(archs), "images": int(conf.shape[1]), "stages": int(conf.shape[2]),
        "encoding_size": space.encoding_size, "omega": omega, "targets": targets, "grid": grid,
        "r_spread": {"mean": float(R[:, paper_cols].mean()), "std_across_archs": float(R[:, paper_cols].std(0).mean())},
        "hyperparameters": {k: list(v) if isinstance(v, tuple) else v for k, v in hp.items()},
        "goal_kendall_tau": GOAL_TAU, "meets_goal": paper["mean_kendall_tau"] >= GOAL_TAU,
        "paper": paper,
        "unstandardized": raw,
        "standardization_tau_gain": paper["mean_kendall_tau"] - raw["mean_kendall_tau"],
        "conditional": {"omegas": omegas, **_summary(cond),
                        "mean_kendall_tau_at_omega": float(np.mean([cond.held_out.per_objective[c]["kendall_tau"]
                                                                    for c in paper_cols]))},
        "held_out_target": {"target": middle, "omega": omega,
                            "conditional_without_it": {"rmse": unseen.rmse, "kendall_tau": unseen.kendall_tau,
                                                       "train_seconds": cond_wo.seconds},
                            "per_target_trained_on_it": {"rmse": seen["rmse"], "kendall_tau": seen["kendall_tau"]}},
    })


if __name__ == "__main__":
    main()
