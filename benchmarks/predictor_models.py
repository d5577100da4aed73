"""Benchmark: which model ranks held-out archs best, the paper's MLP or a scikit-learn model, and how far the
labels' own noise lets any model go (issue 14).

    python -m benchmarks.predictor_models [--database databases/confidence] [--params params.yaml] [--splits 5]

Labels and features are the predictor notebook's (04): best R per database arch and ``search.targets``
(``thresholds.r_for_targets``, ``search.grid``), archs split as ``predictor.train_predictor`` splits them
(split seed ``s``: ``default_rng(s).permutation``, ``predictor.val_fraction`` held out; split 0 with
``seed: 0`` is the notebook's). Per split and target:

- ``mlp``: ``predictor.train_predictor`` with the params' hyperparameters (its seed is the split seed), on the
  one-hot code as in the notebook; with ``--models mlp ...`` also ``mlp/<features>`` on the other feature sets
  (standardized on the training archs);
- each scikit-learn model, on each feature set, hyperparameters chosen by 5-fold cross-validation on the
  split's training archs only (score: Kendall tau), targets standardized on the training archs;
- feature sets: ``onehot`` (``encode_many``, the MLP's input), ``numeric`` (``encoding.arch_features``:
  resolution, per stage the cumulative and added MMACs, per stage and unit the depth, mean kernel and mean
  expand of the slots it runs), ``both`` (concatenated).

Noise ceiling: all archs are measured on the same images, so what limits ranking is how an arch's R moves
with the image sample. ``halves``: the Kendall tau between R on two random halves of the images (mean over
20 halvings), over the held-out archs of split 0 and over all archs. ``bootstrap``: 100 resamplings of the
images (shared by all archs); noise variance = the mean over archs of the variance of R across resamplings
(after removing each resampling's mean over archs, which shifts every arch alike), reliability = 1 - noise /
variance of R across archs. For a normal signal plus noise, a perfect predictor reaches Kendall tau
``2/pi * asin(sqrt(reliability))`` against the measured labels; the halves' Pearson r gives a second
estimate of the same bound through Spearman-Brown (reliability of the full set = 2r / (1 + r)).

Writes ``reports/benchmarks/predictor_models.json`` (``--name``).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau, pearsonr
from sklearn.compose import TransformedTargetRegressor
from sklearn.ensemble import ExtraTreesRegressor, HistGradientBoostingRegressor, RandomForestRegressor
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel
from sklearn.kernel_ridge import KernelRidge
from sklearn.linear_model import Ridge
from sklearn.metrics import make_scorer, root_mean_squared_error
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVR

from benchmarks._common import spec_space, write_json
from enas4d import config, database, predictor, thresholds
from enas4d.encoding import arch_features, encode_many
from enas4d.predictor import split_archs


def tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall tau-b (scipy), the notebook's ranking score."""
    return float(kendalltau(a, b).statistic)


def models(seed: int) -> dict[str, tuple[object, dict]]:
    """Each scikit-learn model (standardized inputs) with its small hyperparameter grid."""
    def pipe(model: object) -> object:
        return make_pipeline(StandardScaler(), model)

    gp_kernel = ConstantKernel(1.0, (1e-3, 1e3)) * RBF(10.0, (1e-2, 1e4)) + WhiteKernel(0.5, (1e-3, 10.0))
    return {
        "ridge": (pipe(Ridge()), {"ridge__alpha": np.logspace(-1, 4, 11).tolist()}),
        "kernel_ridge_rbf": (pipe(KernelRidge(kernel="rbf")),
                             {"kernelridge__alpha": [0.03, 0.1, 0.3, 1.0, 3.0],
                              "kernelridge__gamma": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]}),
        "svr_rbf": (pipe(SVR()), {"svr__C": [0.3, 1.0, 3.0, 10.0], "svr__gamma": [1e-3, 3e-3, 1e-2, 3e-2],
                                  "svr__epsilon": [0.1, 0.5]}),
        # hyperparameters by marginal likelihood (no grid): restarts drawn from a fixed seed
        "gaussian_process": (pipe(GaussianProcessRegressor(gp_kernel, normalize_y=True, n_restarts_optimizer=2,
                                                           random_state=seed)), {}),
        "random_forest": (RandomForestRegressor(n_estimators=300, random_state=seed),
                          {"max_features": [0.1, 0.33, 1.0], "min_samples_leaf": [1, 5]}),
        "extra_trees": (ExtraTreesRegressor(n_estimators=300, random_state=seed),
                        {"max_features": [0.1, 0.33, 1.0], "min_samples_leaf": [1, 5]}),
        "hist_gradient_boosting": (HistGradientBoostingRegressor(max_iter=300, random_state=seed),
                                   {"learning_rate": [0.03, 0.1], "max_leaf_nodes": [4, 15],
                                    "l2_regularization": [0.0, 1.0]}),
    }


def fit_sklearn(model: object, grid: dict, X: np.ndarray, y: np.ndarray, seed: int) -> tuple[object, dict]:
    """``model`` on standardized targets, its ``grid`` searched by 5-fold CV (Kendall tau) on ``X, y`` only."""
    wrapped = TransformedTargetRegressor(model, transformer=StandardScaler())
    if not grid:
        return wrapped.fit(X, y), {}
    search = GridSearchCV(wrapped, {f"regressor__{k}": v for k, v in grid.items()},
                          scoring=make_scorer(tau), cv=KFold(5, shuffle=True, random_state=seed), refit=True)
    search.fit(X, y)
    return search.best_estimator_, {k.removeprefix("regressor__"): v for k, v in search.best_params_.items()}


def noise_ceiling(conf: np.ndarray, correct: np.ndarray, cost: np.ndarray, objectives: list[tuple[float, float]],
                  grid: float, y: np.ndarray, held_out: np.ndarray, seed: int) -> dict:
    """How well the labels agree with themselves under image resampling (module docstring)."""
    rng = np.random.default_rng(seed)
    n = conf.shape[1]
    half_tau_val, half_tau_all, half_r = [], [], []
    for _ in range(20):
        perm = rng.permutation(n)
        a, b = np.sort(perm[: n // 2]), np.sort(perm[n // 2:])
        ra = thresholds.r_for_targets(conf[:, a], correct[:, a], cost, objectives, grid)
        rb = thresholds.r_for_targets(conf[:, b], correct[:, b], cost, objectives, grid)
        half_tau_val.append([tau(ra[held_out, p], rb[held_out, p]) for p in range(len(objectives))])
        half_tau_all.append([tau(ra[:, p], rb[:, p]) for p in range(len(objectives))])
        half_r.append([pearsonr(ra[:, p], rb[:, p]).statistic for p in range(len(objectives))])
    boot = np.stack([thresholds.r_for_targets(conf[:, idx], correct[:, idx], cost, objectives, grid)
                     for idx in (np.sort(rng.integers(0, n, n)) for _ in range(100))])  # [B, A, P]
    centred = boot - boot.mean(axis=1, keepdims=True)  # a resampling that shifts every arch alike ranks alike
    noise_var = centred.var(axis=0, ddof=1).mean(axis=0)
    reliability = 1 - noise_var / y.var(axis=0, ddof=1)
    r_half = np.mean(half_r, axis=0)
    reliability_sb = 2 * r_half / (1 + r_half)
    return {
        "halves_kendall_tau_held_out": np.mean(half_tau_val, axis=0).tolist(),
        "halves_kendall_tau_all": np.mean(half_tau_all, axis=0).tolist(),
        "halves_pearson_r_all": r_half.tolist(),
        "bootstrap_noise_share": (noise_var / y.var(axis=0, ddof=1)).tolist(),
        "bootstrap_reliability": reliability.tolist(),
        "ceiling_kendall_tau_bootstrap": (2 / np.pi * np.arcsin(np.sqrt(np.clip(reliability, 0, 1)))).tolist(),
        "ceiling_kendall_tau_halves": (2 / np.pi * np.arcsin(np.sqrt(np.clip(reliability_sb, 0, 1)))).tolist(),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.predictor_models", description=__doc__.splitlines()[0])
    p.add_argument("--database", type=Path, default=Path("databases/confidence"))
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--splits", type=int, default=5, help="arch splits (seeds seed .. seed + splits - 1)")
    p.add_argument("--models", nargs="*", help="scikit-learn models to run (default: all); mlp: also the MLP on "
                   "the other feature sets")
    p.add_argument("--features", nargs="*", default=["onehot", "numeric", "both"])
    p.add_argument("--no-noise", action="store_true", help="skip the noise ceiling")
    p.add_argument("--name", default="predictor_models", help="output: reports/benchmarks/<name>.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = config.load(args.params)
    if cfg.search.cost != "macs":
        raise SystemExit(f"{args.params}: this benchmark prices archs in MACs, but search.cost is {cfg.search.cost!r}")
    db = database.load(args.database)
    spec, space = spec_space(cfg)
    cost = db.macs / 1e6
    omega, targets, grid = cfg.search.omega, list(cfg.search.targets), cfg.search.grid
    objectives = [(omega, t) for t in targets]
    y = thresholds.r_for_targets(db.conf, db.correct, cost, objectives, grid)
    onehot = encode_many(space, db.archs).astype(np.float64)
    numeric = arch_features(spec, db.archs)
    features = {"onehot": onehot, "numeric": numeric, "both": np.concatenate([onehot, numeric], axis=1)}
    hp = {k: v for k, v in config.to_dict(cfg.predictor).items() if k in
          ("hidden", "lr", "weight_decay", "epochs", "batch_size", "val_fraction")}
    seeds = [cfg.seed + i for i in range(args.splits)]
    names = [m for m in models(0) if not args.models or m in args.models]
    mlp_on = [f for f in args.features if f != "onehot"] if args.models and "mlp" in args.models else []

    results: dict = {"mlp": [], **{f"mlp/{f}": [] for f in mlp_on},
                     **{f"{m}/{f}": [] for m in names for f in args.features}}
    for s in seeds:
        train, val = split_archs(len(db), hp["val_fraction"], s)
        for i, t in enumerate(targets):
            start = time.perf_counter()
            model, report = predictor.train_predictor(onehot, y[:, i], seed=s, **hp)
            assert np.array_equal(report.val_archs, val)
            results["mlp"].append({"split": s, "target": t, "kendall_tau": report.held_out.kendall_tau,
                                   "rmse": report.held_out.rmse, "seconds": time.perf_counter() - start})
            for f in mlp_on:  # the same MLP on standardized numeric features (scaler fit on the training archs)
                X = StandardScaler().fit(features[f][train]).transform(features[f]).astype(np.float32)
                start = time.perf_counter()
                _, report = predictor.train_predictor(X, y[:, i], seed=s, **hp)
                results[f"mlp/{f}"].append({"split": s, "target": t, "kendall_tau": report.held_out.kendall_tau,
                                            "rmse": report.held_out.rmse, "seconds": time.perf_counter() - start})
            for f in args.features:
                X = features[f]
                for m in names:
                    est, grid_ = models(s)[m]
                    start = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # GP optimizer bounds, CV fold convergence
                        fitted, best = fit_sklearn(est, grid_, X[train], y[train, i], s)
                    pred = fitted.predict(X[val])
                    results[f"{m}/{f}"].append({"split": s, "target": t, "kendall_tau": tau(y[val, i], pred),
                                                "rmse": float(root_mean_squared_error(y[val, i], pred)),
                                                "params": best, "seconds": time.perf_counter() - start})
                    print(f"split {s} target {t:g} {m}/{f}: tau {results[f'{m}/{f}'][-1]['kendall_tau']:.3f} "
                          f"({results[f'{m}/{f}'][-1]['seconds']:.1f} s)", flush=True)
            print(f"split {s} target {t:g} mlp: tau {results['mlp'][-1]['kendall_tau']:.3f}", flush=True)

    def summary(rows: list[dict]) -> dict:
        by_t = {t: [r["kendall_tau"] for r in rows if r["target"] == t] for t in targets}
        split0 = {t: next(r for r in rows if r["target"] == t and r["split"] == seeds[0]) for t in targets}
        return {"kendall_tau_split0": [split0[t]["kendall_tau"] for t in targets],
                "rmse_split0": [split0[t]["rmse"] for t in targets],
                "kendall_tau_mean": [float(np.mean(by_t[t])) for t in targets],
                "kendall_tau_std": [float(np.std(by_t[t], ddof=1)) if len(by_t[t]) > 1 else 0.0 for t in targets],
                "rmse_mean": [float(np.mean([r["rmse"] for r in rows if r["target"] == t])) for t in targets],
                "kendall_tau_mean_over_targets": float(np.mean([r["kendall_tau"] for r in rows]))}

    held_out = split_archs(len(db), hp["val_fraction"], seeds[0])[1]
    out = {"database": str(args.database), "archs": len(db), "images": int(db.conf.shape[1]), "omega": omega,
           "targets": targets, "grid": grid, "splits": seeds, "held_out_archs": len(held_out),
           "feature_sizes": {k: v.shape[1] for k, v in features.items()},
           "r_std_across_archs": y.std(axis=0).tolist(),
           "summary": {k: summary(v) for k, v in results.items()}, "runs": results}
    if not args.no_noise:
        out["noise"] = noise_ceiling(db.conf, db.correct, cost, objectives, grid, y, held_out, cfg.seed)
    write_json(args.name, out)


if __name__ == "__main__":
    main()
