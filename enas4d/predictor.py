"""The metric predictor: an MLP from the one-hot arch encoding to the best R of the arch (paper: 3 x 400, ReLU).

Trained as in the paper (Adam, lr 1e-4, weight decay 1e-5, 30 epochs, RMSE loss) on R computed from the
database, with archs split into training and held-out sets (an arch's rows never straddle the split).
Two choices beyond the paper:

- **Standardized targets.** Best R values of different archs differ by ~1e-2 around ~0.9; the network
  learns ``(R - mean) / std`` (mean/std of the training rows, stored in the model), so the loss sees the
  differences between archs rather than the offset. ``standardize=False`` trains on raw R for comparison.
  Scaling (targets and conditions) is scikit-learn's ``StandardScaler``, RMSE its ``root_mean_squared_error``,
  Kendall tau scipy's. The arch split stays a numpy ``default_rng(seed)`` permutation: scikit-learn's
  ``train_test_split`` draws from the legacy ``RandomState``, which would hold out other archs than the
  committed run did (the numbers would move by chance, not by method).
- **Conditional predictor.** With ``cond`` (one ``(omega, target)`` pair per column of ``y``) the network also
  takes the normalized pair as input and is trained on every (arch, pair) row, so one model predicts R for
  an omega or target it was not trained on, without retraining.

**Gradient boosting** (``predictor.model: gradient_boosting``, the default): scikit-learn's
``HistGradientBoostingRegressor`` on the one-hot code plus ``encoding.arch_features`` (resolution, per-stage
MACs, depths, kernels, expands; ``boosted_inputs``) ranks held-out archs better than the MLP on the one-hot
code (docs/DESIGN.md "Search", measured by ``benchmarks/predictor_models.py``); its few hyperparameters are
chosen by 5-fold cross-validation (Kendall tau) on the training archs. The file stores the training rows and
the chosen hyperparameters, and ``load`` refits (deterministic, a few seconds), so loading never unpickles code.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import kendalltau
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.metrics import make_scorer, root_mean_squared_error
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.preprocessing import StandardScaler
from torch import nn

from enas4d.encoding import arch_features, encode_many
from enas4d.files import atomic_write
from enas4d.space import MultiStageArch, SearchSpace
from enas4d.supernet import SupernetSpec

_FORMAT = "enas4d.predictor/2"  # /2: the file records its objective


@dataclass(frozen=True)
class Objective:
    """What a predictor file predicts: R of ``kind`` archs (``multistage``, ``static``, or ``conditional``: omega
    and target are inputs, trained around ``omega``; ``target`` None) for ``omega`` and ``target``. Loading a
    file for another objective is an error, so a run with a new omega never uses the old omega's predictors."""

    kind: str
    omega: float
    target: float | None = None


class MetricPredictor(nn.Module):
    """MLP on ``[encoding | normalized (omega, target)]`` whose output is R in its own units."""

    def __init__(self, in_features: int, hidden: Sequence[int], n_cond: int = 0) -> None:
        super().__init__()
        self.in_features, self.hidden, self.n_cond = int(in_features), tuple(int(h) for h in hidden), int(n_cond)
        layers: list[nn.Module] = []
        width = self.in_features + self.n_cond
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        self.register_buffer("y_mean", torch.zeros(()))
        self.register_buffer("y_std", torch.ones(()))
        self.register_buffer("cond_mean", torch.zeros(self.n_cond))
        self.register_buffer("cond_std", torch.ones(self.n_cond))

    def standardized(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The network output, ``(R - y_mean) / y_std`` (the scale the loss is taken on)."""
        if self.n_cond:
            x = torch.cat([x, (cond - self.cond_mean) / self.cond_std], dim=1)
        return self.mlp(x).squeeze(1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.y_mean + self.y_std * self.standardized(x, cond)


# the model is fixed but for a small grid searched on the training archs (benchmarks/predictor_models.py's)
_BOOST_FIXED = {"max_iter": 300}
_BOOST_GRID = {"learning_rate": [0.03, 0.1], "max_leaf_nodes": [4, 15], "l2_regularization": [0.0, 1.0]}


@dataclass(eq=False)
class BoostedPredictor:
    """Gradient-boosted trees on ``boosted_inputs`` rows; ``X``/``y``/``params``/``seed`` rebuild it exactly."""

    X: np.ndarray  # training rows
    y: np.ndarray
    params: dict  # HistGradientBoostingRegressor keywords chosen by cross-validation
    seed: int

    def __post_init__(self) -> None:
        self.estimator = HistGradientBoostingRegressor(**_BOOST_FIXED, **self.params, random_state=self.seed)
        self.estimator.fit(self.X, self.y)


Predictor = MetricPredictor | BoostedPredictor
MODELS = ("mlp", "gradient_boosting")  # predictor.model


@dataclass
class PredictorEval:
    """How well a predictor ranks and fits archs it was not trained on, and the points of a scatter plot."""

    rmse: float  # in R units, over all rows
    kendall_tau: float  # archs ranked by predicted vs true R, per objective, averaged over objectives
    y_true: np.ndarray  # one row per arch (per (arch, objective) for a conditional predictor)
    y_pred: np.ndarray
    cond: np.ndarray | None  # (omega, target) of each row, conditional predictor only
    per_objective: list[dict]  # rmse and kendall_tau of each objective (one entry without cond)

    def to_dict(self) -> dict:
        """JSON-ready summary (no per-row arrays)."""
        return {"rmse": self.rmse, "kendall_tau": self.kendall_tau, "per_objective": self.per_objective}


@dataclass
class TrainReport:
    held_out: PredictorEval  # on the held-out archs
    seconds: float  # training wall time
    n_train: int  # training archs
    val_archs: np.ndarray  # rows of X held out
    epoch_loss: list[float]  # mean training RMSE per epoch, standardized units

    def to_dict(self) -> dict:
        return {**self.held_out.to_dict(), "seconds": self.seconds, "n_train": self.n_train,
                "n_val": len(self.val_archs), "epoch_loss": self.epoch_loss}


def _rows(X: np.ndarray, y: np.ndarray, cond: np.ndarray | None, archs: np.ndarray):
    """Rows (features, condition, R) of the given archs: one per arch, or one per (arch, objective)."""
    if cond is None:
        return X[archs], None, y[archs]
    p = len(cond)
    return np.repeat(X[archs], p, axis=0), np.tile(cond, (len(archs), 1)), y[archs].reshape(-1)


def _check(X: np.ndarray, y: np.ndarray, cond: np.ndarray | None) -> None:
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"X must be [archs, features] with one row per arch of y; got X {X.shape}, y {y.shape}")
    if cond is None and y.ndim != 1:
        raise ValueError(f"y must be [archs] without cond, got {y.shape}")
    if cond is not None and (cond.ndim != 2 or cond.shape[1] != 2 or y.shape != (len(X), len(cond))):
        raise ValueError(f"cond must be [objectives, 2] (omega, target) and y [archs, objectives]; "
                         f"got cond {cond.shape}, y {y.shape}")
    if not (np.all(np.isfinite(X)) and np.all(np.isfinite(y))):
        raise ValueError("X and y must be finite")


def split_archs(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out archs (sorted): a ``default_rng(seed)`` permutation, ``val_fraction`` held out."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = round(val_fraction * n)
    if n_val < 2 or n - n_val < 1:
        raise ValueError(f"{n} archs with val_fraction {val_fraction} leave {n_val} held out (need >= 2) "
                         f"and {n - n_val} for training")
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _kendall(a: np.ndarray, b: np.ndarray) -> float:
    return float(kendalltau(a, b).statistic)


def train_boosted(X: np.ndarray, y: np.ndarray, *, val_fraction: float, seed: int
                  ) -> tuple[BoostedPredictor, TrainReport]:
    """Gradient boosting on ``X`` (``boosted_inputs`` rows) for one objective ``y`` [archs]: the same arch split
    as ``train_predictor`` with the same ``seed``; hyperparameters by 5-fold CV (Kendall tau) on the training
    archs only."""
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    _check(X, y, None)
    train, val = split_archs(len(X), val_fraction, seed)
    start = time.perf_counter()
    if len(train) >= 10:
        search = GridSearchCV(HistGradientBoostingRegressor(**_BOOST_FIXED, random_state=seed), _BOOST_GRID,
                              scoring=make_scorer(_kendall), cv=KFold(5, shuffle=True, random_state=seed),
                              refit=False)
        params = dict(search.fit(X[train], y[train]).best_params_)
    else:  # too few archs to rank within folds (the smoke profile): the grid's first point
        params = {k: v[0] for k, v in _BOOST_GRID.items()}
    model = BoostedPredictor(X[train], y[train], params, seed)
    seconds = time.perf_counter() - start
    return model, TrainReport(evaluate_predictor(model, X[val], y[val]), seconds, len(train), val, [])


def mlp_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``train_predictor``'s keywords from the ``predictor`` params section (all but ``model``)."""
    return {k: v for k, v in settings.items() if k != "model"}


def train_configured(settings: Mapping[str, Any], space: SearchSpace, spec: SupernetSpec,
                     archs: Sequence[MultiStageArch], y: np.ndarray, *, seed: int) -> tuple[Predictor, TrainReport]:
    """The model ``settings["model"]`` names (the ``predictor`` params section) for one objective ``y`` [archs],
    on the input it reads; the same ``seed`` holds out the same archs for either model."""
    if settings["model"] == "gradient_boosting":
        return train_boosted(boosted_inputs(space, spec, archs), y, val_fraction=settings["val_fraction"], seed=seed)
    if settings["model"] != "mlp":
        raise ValueError(f"predictor.model: got {settings['model']!r}; allowed: {', '.join(MODELS)}")
    return train_predictor(encode_many(space, archs), y, seed=seed, **mlp_settings(settings))


def train_predictor(X: np.ndarray, y: np.ndarray, *, hidden: Sequence[int], lr: float, weight_decay: float,
                    epochs: int, batch_size: int, val_fraction: float, seed: int,
                    cond: np.ndarray | None = None, standardize: bool = True) -> tuple[MetricPredictor, TrainReport]:
    """Train on a random ``1 - val_fraction`` of the archs and report on the rest.

    ``X`` is [archs, features]; ``y`` is [archs] (best R for one objective) or, with ``cond`` [P, 2] of
    ``(omega, target)`` pairs, [archs, P]. Same ``seed`` => same split, initialisation, batches and model.
    """
    X, y = np.asarray(X, dtype=np.float32), np.asarray(y, dtype=np.float64)
    cond = None if cond is None else np.asarray(cond, dtype=np.float64)
    _check(X, y, cond)
    train, val = split_archs(len(X), val_fraction, seed)
    xt, ct, yt = _rows(X, y, cond, train)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MetricPredictor(X.shape[1], hidden, 0 if cond is None else cond.shape[1])
        gen = torch.Generator().manual_seed(seed)
    # scikit-learn's StandardScaler: population std, and scale 1 for a constant column (a single omega)
    if standardize:
        y_scaler = StandardScaler().fit(yt.reshape(-1, 1))
        model.y_mean.fill_(float(y_scaler.mean_[0]))
        model.y_std.fill_(max(float(y_scaler.scale_[0]), 1e-12))
    if cond is not None:
        c_scaler = StandardScaler().fit(cond)
        model.cond_mean.copy_(torch.from_numpy(c_scaler.mean_))
        model.cond_std.copy_(torch.from_numpy(c_scaler.scale_))

    xt_t = torch.from_numpy(xt)
    ct_t = None if ct is None else torch.from_numpy(ct).float()
    target = (torch.from_numpy(yt).float() - model.y_mean) / model.y_std
    optim = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    start, losses = time.perf_counter(), []
    model.train()
    for _ in range(epochs):
        order, total = torch.randperm(len(xt_t), generator=gen), 0.0
        for lo in range(0, len(order), batch_size):
            b = order[lo:lo + batch_size]
            out = model.standardized(xt_t[b], None if ct_t is None else ct_t[b])
            loss = torch.sqrt(nn.functional.mse_loss(out, target[b]))
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            total += loss.item() * len(b)
        losses.append(total / len(order))
    seconds = time.perf_counter() - start
    model.eval()

    return model, TrainReport(evaluate_predictor(model, X[val], y[val], cond), seconds, len(train), val, losses)


def evaluate_predictor(model: Predictor, X: np.ndarray, y: np.ndarray,
                       cond: np.ndarray | None = None) -> PredictorEval:
    """RMSE and Kendall tau of ``model`` on archs ``X`` with true R ``y`` ([archs] or [archs, P] with ``cond``).

    Kendall tau ranks archs for one objective at a time (ranking across objectives would reward merely
    knowing that a looser target gives a higher R); with several objectives it is their mean.
    """
    X, y = np.asarray(X), np.asarray(y, dtype=np.float64)
    cond = None if cond is None else np.asarray(cond, dtype=np.float64)
    _check(X, y, cond)
    true = y[:, None] if cond is None else y
    pred = np.stack([predict(model, X, c) for c in ([None] if cond is None else cond)], axis=1)
    per = []
    for p in range(true.shape[1]):
        entry = {"rmse": float(root_mean_squared_error(true[:, p], pred[:, p])),
                 "kendall_tau": float(kendalltau(true[:, p], pred[:, p]).statistic)}
        if cond is not None:
            entry.update(omega=float(cond[p, 0]), target=float(cond[p, 1]))
        per.append(entry)
    rows = None if cond is None else np.tile(cond, (len(X), 1))  # arch-major, as _rows
    return PredictorEval(float(root_mean_squared_error(true.reshape(-1), pred.reshape(-1))),
                         float(np.mean([e["kendall_tau"] for e in per])),
                         true.reshape(-1), pred.reshape(-1), rows, per)


def boosted_inputs(space: SearchSpace, spec: SupernetSpec, archs: Sequence[MultiStageArch]) -> np.ndarray:
    """The gradient-boosting predictor's rows: the one-hot code, then ``arch_features`` (trees rank held-out archs
    better on both than on either, docs/DESIGN.md "Search")."""
    return np.concatenate([encode_many(space, archs).astype(np.float64), arch_features(spec, archs)], axis=1)


def check_inputs(model: Predictor, spec: SupernetSpec | None) -> None:
    """A gradient-boosting predictor reads ``arch_features``, which need the preset ``spec`` (MACs)."""
    if isinstance(model, BoostedPredictor) and spec is None:
        raise ValueError("a gradient-boosting predictor reads encoding.arch_features, which need the preset spec")


def inputs(model: Predictor, space: SearchSpace, spec: SupernetSpec | None,
           archs: Sequence[MultiStageArch]) -> np.ndarray:
    """The rows ``model`` reads for ``archs``: the one-hot code (MLP) or ``boosted_inputs`` (boosting, which
    needs the preset ``spec`` for MACs)."""
    check_inputs(model, spec)
    return boosted_inputs(space, spec, archs) if isinstance(model, BoostedPredictor) else encode_many(space, archs)


@torch.inference_mode()
def predict(model: Predictor, X: np.ndarray, cond: np.ndarray | Sequence[float] | None = None,
            batch_size: int = 8192) -> np.ndarray:
    """Predicted R for the rows of ``X``; ``cond`` is one ``(omega, target)`` for all rows or one per row."""
    if isinstance(model, BoostedPredictor):
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != model.X.shape[1]:
            raise ValueError(f"X must be [rows, {model.X.shape[1]}], got {X.shape}")
        if cond is not None:
            raise ValueError("a gradient-boosting predictor takes no cond")
        return model.estimator.predict(X).astype(np.float64)
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[1] != model.in_features:
        raise ValueError(f"X must be [rows, {model.in_features}], got {X.shape}")
    if (cond is None) != (model.n_cond == 0):
        raise ValueError("a conditional predictor needs cond=(omega, target); a plain one takes none")
    c = None
    if cond is not None:
        c = np.broadcast_to(np.asarray(cond, dtype=np.float32), (len(X), model.n_cond))
    was_training = model.training
    model.eval()
    out = np.empty(len(X), dtype=np.float64)
    for lo in range(0, len(X), batch_size):
        cb = None if c is None else torch.tensor(c[lo:lo + batch_size])
        out[lo:lo + batch_size] = model(torch.from_numpy(X[lo:lo + batch_size]), cb).numpy()
    model.train(was_training)
    return out


def save(model: Predictor, path: str | os.PathLike, objective: Objective) -> None:
    """Write what rebuilds the model (MLP: weights and sizes; boosting: training rows and hyperparameters) and
    its ``objective``, atomically."""
    if isinstance(model, BoostedPredictor):
        blob = {"format": _FORMAT, "model": "gradient_boosting", "X": torch.from_numpy(model.X),
                "y": torch.from_numpy(model.y), "params": dict(model.params), "seed": model.seed,
                "objective": dataclasses.asdict(objective)}
    else:
        blob = {"format": _FORMAT, "state_dict": model.state_dict(),
                "meta": {"in_features": model.in_features, "hidden": list(model.hidden), "n_cond": model.n_cond},
                "objective": dataclasses.asdict(objective)}
    atomic_write(path, lambda f: torch.save(blob, f))


def load(path: str | os.PathLike, objective: Objective) -> Predictor:
    """Read a model written by ``save`` for ``objective``; anything else (another objective included) raises one
    ValueError naming the file."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises many kinds for a corrupt or foreign file
        raise ValueError(f"{path}: not a readable predictor checkpoint ({type(err).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
        raise ValueError(f"{path}: not an enas4d predictor checkpoint (expected format {_FORMAT})")
    try:
        if blob.get("model", "mlp") == "gradient_boosting":
            model = BoostedPredictor(blob["X"].numpy(), blob["y"].numpy(), dict(blob["params"]), int(blob["seed"]))
        else:
            meta = blob["meta"]
            model = MetricPredictor(meta["in_features"], meta["hidden"], meta["n_cond"])
            model.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        reason = str(err).splitlines()[0]
        raise ValueError(f"{path}: predictor checkpoint does not match its sizes ({reason})") from None
    try:
        trained = Objective(**blob["objective"])
    except (KeyError, TypeError):
        raise ValueError(f"{path}: predictor checkpoint records no objective (kind, omega, target)") from None
    if trained != objective:
        raise ValueError(f"{path}: predictor trained for {_show(trained)}, this run asks for {_show(objective)}; "
                         "rerun the predictor stage (dvc repro predictor)")
    return model.eval() if isinstance(model, MetricPredictor) else model


def _show(o: Objective) -> str:
    return f"kind {o.kind}, omega {o.omega:g}" + ("" if o.target is None else f", target {o.target:g}")
