"""Metric predictor: learns R on held-out archs, split by arch, deterministic, conditional, save/load."""

import numpy as np
import pytest
import torch

from enas4d import cost, evolution
from enas4d import predictor as pr
from enas4d import thresholds as th
from enas4d.encoding import arch_features, encode_many
from enas4d.space import SearchSpace
from enas4d.supernet import PRESETS
from synthetic_db import make_database  # pytest puts tests/ on sys.path

torch.set_num_threads(1)

SPACE = SearchSpace(units=3, resolutions=(16, 24, 32))
OBJECTIVES = np.array([(0.09, 1.0), (0.09, 2.0), (0.2, 1.0)])
KW = dict(hidden=[64, 64], lr=1e-3, weight_decay=1e-5, epochs=30, batch_size=16, val_fraction=0.25, seed=0)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    db = make_database(SPACE, 160, 2000, seed=0)
    return encode_many(SPACE, db.archs), th.r_for_targets(db.conf, db.correct, db.cost, OBJECTIVES.tolist(), 0.05)


def test_learns_to_rank_held_out_archs(data) -> None:
    X, R = data
    model, report = pr.train_predictor(X, R[:, 1], **KW)
    held = report.held_out
    assert report.n_train == 120 and len(report.val_archs) == 40
    np.testing.assert_array_equal(held.y_true, R[report.val_archs, 1])
    assert held.rmse == pytest.approx(np.sqrt(np.mean((held.y_pred - held.y_true) ** 2)))
    assert held.rmse < R[:, 1].std()  # better than predicting the mean
    assert held.kendall_tau > 0.35  # ~0.5 here: 2000 images leave R with sampling noise comparable to its spread
    assert float(model.y_mean) == pytest.approx(np.delete(R[:, 1], report.val_archs).mean(), rel=1e-6)
    assert report.epoch_loss[-1] < report.epoch_loss[0]


def test_same_seed_same_model(data) -> None:
    X, R = data
    a, ra = pr.train_predictor(X, R[:, 0], **{**KW, "epochs": 3})
    b, rb = pr.train_predictor(X, R[:, 0], **{**KW, "epochs": 3})
    c, rc = pr.train_predictor(X, R[:, 0], **{**KW, "epochs": 3, "seed": 1})
    np.testing.assert_array_equal(pr.predict(a, X), pr.predict(b, X))
    assert not np.array_equal(ra.val_archs, rc.val_archs)


def test_conditional_predictor_splits_by_arch_and_follows_the_target(data) -> None:
    X, R = data
    model, report = pr.train_predictor(X, R, cond=OBJECTIVES, **KW)
    held = report.held_out
    assert len(held.y_true) == len(report.val_archs) * len(OBJECTIVES)
    np.testing.assert_array_equal(held.y_true, R[report.val_archs].reshape(-1))
    assert [[e["omega"], e["target"]] for e in held.per_objective] == OBJECTIVES.tolist()
    assert held.kendall_tau > 0.25
    # a looser budget never lowers R; an unseen target in between is predicted in between
    tight, mid, loose = (pr.predict(model, X, (0.09, t)).mean() for t in (1.0, 1.5, 2.0))
    assert tight < mid < loose
    per_row = pr.predict(model, X[:5], np.tile([0.09, 1.5], (5, 1)))
    np.testing.assert_allclose(per_row, pr.predict(model, X[:5], (0.09, 1.5)), atol=1e-6)


def test_standardization_can_be_switched_off(data) -> None:
    X, R = data
    model, _ = pr.train_predictor(X, R[:, 0], standardize=False, **{**KW, "epochs": 2})
    assert float(model.y_mean) == 0.0 and float(model.y_std) == 1.0


def test_predict_batches_agree(data) -> None:
    X, R = data
    model = pr.MetricPredictor(X.shape[1], [32])
    np.testing.assert_allclose(pr.predict(model, X, batch_size=7), pr.predict(model, X), atol=1e-6)
    with pytest.raises(ValueError, match="cond"):
        pr.predict(model, X, (0.09, 1.0))


def test_save_load_round_trip_and_bad_files(data, tmp_path) -> None:
    X, R = data
    model = pr.MetricPredictor(X.shape[1], [32, 16], n_cond=2)
    model.y_mean.fill_(0.9)
    path = tmp_path / "sub" / "predictor.pt"
    objective = pr.Objective("multistage", 0.09, 1.0)
    pr.save(model, path, objective)
    assert [p.name for p in path.parent.iterdir()] == ["predictor.pt"]  # no temp file left behind
    loaded = pr.load(path, objective)
    np.testing.assert_array_equal(pr.predict(loaded, X, (0.09, 1.0)), pr.predict(model, X, (0.09, 1.0)))
    for other_objective in (pr.Objective("multistage", 0.2, 1.0), pr.Objective("static", 0.09, 1.0),
                            pr.Objective("multistage", 0.09, 1.5)):
        with pytest.raises(ValueError) as err:
            pr.load(path, other_objective)
        assert str(err.value).startswith(f"{path}: predictor trained for kind multistage, omega 0.09, target 1, "
                                         "this run asks for ") and "\n" not in str(err.value)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.txt"):
        pr.load(text, objective)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="other.pt"):
        pr.load(other, objective)


def test_bad_training_inputs(data) -> None:
    X, R = data
    with pytest.raises(ValueError, match="cond"):
        pr.train_predictor(X, R[:, :2], cond=OBJECTIVES, **KW)
    with pytest.raises(ValueError, match="one row per arch"):
        pr.train_predictor(X[:-1], R[:, 0], **KW)
    with pytest.raises(ValueError, match="val_fraction"):
        pr.train_predictor(X, R[:, 0], **{**KW, "val_fraction": 1.0})


# ---------------------------------------------------------------------------------------------- gradient boosting
SPACE5 = SearchSpace(units=len(PRESETS["fmnist_small"].units), resolutions=(24, 28))


@pytest.fixture(scope="module")
def data5() -> tuple[list, np.ndarray]:
    db = make_database(SPACE5, 160, 2000, seed=0)
    return db.archs, th.r_for_targets(db.conf, db.correct, db.cost, [(0.09, 1.5)], 0.05)[:, 0]


def test_arch_features_describe_each_stage() -> None:
    spec, arch = PRESETS["fmnist_small"], SPACE5.sample(np.random.default_rng(3))
    row = arch_features(spec, [arch])[0]
    units, stages = len(spec.units), arch.num_stages
    assert row.shape == (1 + 2 * stages + 3 * stages * units,)
    cum = np.asarray(cost.stage_macs(spec, arch)) / 1e6
    np.testing.assert_allclose(row[1:1 + stages], cum)
    np.testing.assert_allclose(row[1 + stages:1 + 2 * stages], np.diff(cum, prepend=0.0))
    per_unit = row[1 + 2 * stages:].reshape(stages, units, 3)
    np.testing.assert_array_equal(per_unit[..., 0], np.asarray(arch.depths))
    k = np.asarray(arch.kernels[stages - 1]).reshape(units, -1)
    assert per_unit[-1, 0, 1] == k[0][k[0] > 0].mean() and row[0] == arch.resolution


def test_boosting_ranks_held_out_archs_like_the_mlp_split(data5) -> None:
    archs, r = data5
    settings = {**{k: v for k, v in KW.items() if k != "seed"}, "model": "gradient_boosting"}
    spec = PRESETS["fmnist_small"]
    model, report = pr.train_configured(settings, SPACE5, spec, archs, r, seed=0)
    _, mlp_report = pr.train_configured({**settings, "model": "mlp"}, SPACE5, spec, archs, r, seed=0)
    assert isinstance(model, pr.BoostedPredictor)
    np.testing.assert_array_equal(report.val_archs, mlp_report.val_archs)  # same archs held out
    assert report.held_out.kendall_tau > 0  # the synthetic R is noisy for 5 units and 120 archs (MLP: ~0.06)
    # an R that is a function of the arch's MACs: boosting reads them, so it ranks held-out archs nearly exactly
    macs_r = -arch_features(spec, archs)[:, 3]  # cumulative MMACs of the last stage
    _, exact = pr.train_configured(settings, SPACE5, spec, archs, macs_r, seed=0)
    assert exact.held_out.kendall_tau > 0.8
    assert set(model.params) == {"learning_rate", "max_leaf_nodes", "l2_regularization"}
    again, _ = pr.train_configured(settings, SPACE5, spec, archs, r, seed=0)
    X = pr.boosted_inputs(SPACE5, spec, archs)
    assert X.shape[1] == SPACE5.encoding_size + arch_features(spec, archs[:1]).shape[1]
    np.testing.assert_array_equal(pr.predict(again, X), pr.predict(model, X))
    with pytest.raises(ValueError, match="cond"):
        pr.predict(model, X, (0.09, 1.5))
    with pytest.raises(ValueError, match="predictor.model: got 'forest'"):
        pr.train_configured({**settings, "model": "forest"}, SPACE5, spec, archs, r, seed=0)


def test_boosting_file_round_trip_and_fitness(data5, tmp_path) -> None:
    archs, r = data5
    spec = PRESETS["fmnist_small"]
    model, _ = pr.train_boosted(pr.boosted_inputs(SPACE5, spec, archs), r, val_fraction=0.25, seed=0)
    path, objective = tmp_path / "multistage-1.5.pt", pr.Objective("multistage", 0.09, 1.5)
    pr.save(model, path, objective)
    loaded = pr.load(path, objective)
    X = pr.boosted_inputs(SPACE5, spec, archs[:20])
    np.testing.assert_array_equal(pr.predict(loaded, X), pr.predict(model, X))  # refit == saved model
    with pytest.raises(ValueError, match="multistage-1.5.pt: predictor trained for kind multistage, omega 0.09"):
        pr.load(path, pr.Objective("static", 0.09, 1.5))
    fitness = evolution.predictor_fitness(loaded, SPACE5, spec=spec)
    np.testing.assert_array_equal(fitness(archs[:20]), pr.predict(model, X))
    with pytest.raises(ValueError, match="spec"):
        evolution.predictor_fitness(loaded, SPACE5)


def test_boosting_trains_on_a_handful_of_archs() -> None:
    # too few training archs for 5-fold CV (the smoke profile): the grid's first point, no error
    X = np.random.default_rng(0).random((6, 4))
    model, report = pr.train_boosted(X, X[:, 0], val_fraction=0.5, seed=0)
    assert model.params == {k: v[0] for k, v in pr._BOOST_GRID.items()} and report.n_train == 3
