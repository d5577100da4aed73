"""params.yaml validation: every profile loads, and each kind of bad value fails with one precise line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from enas4d import config
from enas4d.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PARAM_FILES = [ROOT / "params.yaml", *sorted((ROOT / "profiles").glob("*.yaml"))]


def write_params(tmp_path: Path, changes: dict[str, object] | None = None, text: str | None = None) -> Path:
    """params.yaml with dotted ``changes`` applied (value ``...`` deletes the key)."""
    path = tmp_path / "params.yaml"
    if text is not None:
        path.write_text(text)
        return path
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in (changes or {}).items():
        *parents, leaf = dotted.split(".")
        node = raw
        for p in parents:
            node = node[p]
        if value is ...:
            del node[leaf]
        else:
            node[leaf] = value
    path.write_text(yaml.safe_dump(raw))
    return path


def error_of(path: Path, **kw: object) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg, "errors must be one line"
    assert str(path) in msg
    return msg


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: p.name)
def test_every_params_file_is_valid(path: Path) -> None:
    cfg = config.load(path)
    assert config.to_dict(cfg).keys() == yaml.safe_load(path.read_text()).keys()


def test_values_are_typed() -> None:
    cfg = config.load(ROOT / "params.yaml")
    assert isinstance(cfg.supernet.resolutions, tuple) and all(isinstance(r, int) for r in cfg.supernet.resolutions)
    assert all(isinstance(t, float) for t in cfg.search.targets)
    assert cfg.data.root is None
    with pytest.raises(AttributeError):
        cfg.search.omega = 1.0  # frozen
    plain = config.to_dict(cfg)
    assert plain["supernet"]["resolutions"] == list(cfg.supernet.resolutions)
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain


def test_int_given_for_float_becomes_float(tmp_path: Path) -> None:
    cfg = config.load(write_params(tmp_path, {"search.targets": [90, 120], "predictor.lr": 1}))
    assert cfg.search.targets == (90.0, 120.0) and isinstance(cfg.predictor.lr, float)


@pytest.mark.parametrize("dotted, value, expected", [
    ("search.omega", -0.5, "search.omega: got -0.5; allowed: a number >= 0"),
    ("search.targets", [1.0, 0.0], "search.targets: got [1.0, 0.0]; allowed: a non-empty list of numbers > 0"),
    ("search.targets", [], "search.targets: got []"),
    ("supernet.depths", [2, 4, 3],
     "supernet.depths: got [2, 4, 3]; allowed: a strictly increasing list of integers > 0"),
    ("supernet.resolutions", [16, 16, 20], "supernet.resolutions: got [16, 16, 20]"),
    ("supernet.expands", [3, 4, 0], "supernet.expands: got [3, 4, 0]"),
    ("supernet.kernels", [3, 5, 9], "allowed: a strictly increasing list of integers from [3, 5, 7]"),
    ("evolution.mutation_prob", 1.5, "evolution.mutation_prob: got 1.5; allowed: a number >= 0 and <= 1"),
    ("evolution.crossover_prob", -0.1, "evolution.crossover_prob: got -0.1"),
    ("database.archs", 0, "database.archs: got 0; allowed: an integer > 0"),
    ("data.metric_size", -1, "data.metric_size: got -1"),
    ("data.train_limit", 0, "data.train_limit: got 0; allowed: an integer > 0 or null"),
    ("predictor.val_fraction", 1.0, "predictor.val_fraction: got 1.0; allowed: a number > 0 and < 1"),
    ("predictor.model", "forest", "predictor.model: got 'forest'; allowed: one of mlp, gradient_boosting"),
    ("device", "tpu", "device: got 'tpu'; allowed: one of auto, cpu, cuda"),
    ("data.name", "mnist", "allowed: one of fashion-mnist, imagefolder, imagenet"),
    ("threads", "2", "threads: got '2'; allowed: an integer > 0"),
    ("seed", 1.5, "seed: got 1.5; allowed: an integer >= 0"),
    ("pretrain.epochs_full", True, "pretrain.epochs_full: got True"),
    ("pretrain.nesterov", "yes", "pretrain.nesterov: got 'yes'; allowed: true or false"),
    ("predictor.lr", "1e-4", "write 1.0e-4"),
    ("predictor.hidden", 400, "predictor.hidden: got 400; allowed: a non-empty list of integers > 0"),
    ("data", [1, 2], "data: got [1, 2]; allowed: a mapping with keys name, root"),
    ("database.images", 20000, "database.images: got 20000; allowed: an integer <= data.metric_size (10000)"),
    ("evolution.sample_size", 500, "evolution.sample_size: got 500; allowed: an integer <= evolution.population"),
    ("evolution.sample_size", 1, "evolution.sample_size: got 1; allowed: an integer >= 2 when evolution.crossover_prob > 0"),
    ("data.image_size", 28, "data.image_size: got 28; allowed: null for fashion-mnist"),
    ("database.calib_images", 0, "database.calib_images: got 0; allowed: an integer > 0"),
])
def test_bad_values(tmp_path: Path, dotted: str, value: object, expected: str) -> None:
    assert expected in error_of(write_params(tmp_path, {dotted: value}))


def test_database_calibration_images_come_from_the_train_split(tmp_path: Path) -> None:
    changes = {"data.train_limit": 1000, "pretrain.bn_calib_images": 500, "database.calib_images": 1001}
    assert ("database.calib_images: got 1001; allowed: an integer <= data.train_limit (1000)"
            in error_of(write_params(tmp_path, changes)))
    assert config.load(write_params(tmp_path, {**changes, "database.calib_images": 1000})).database.calib_images == 1000


def test_unknown_and_missing_keys(tmp_path: Path) -> None:
    msg = error_of(write_params(tmp_path, {"search.omgea": 0.1}))
    assert "search.omgea: unknown key; allowed keys: omega, cost, targets, grid" in msg
    assert "typo_section: unknown key" in error_of(write_params(tmp_path, {"typo_section": 1}))
    assert "evolution.population: missing; allowed: an integer > 0" in error_of(
        write_params(tmp_path, {"evolution.population": ...}))


def test_folder_datasets_need_an_image_size(tmp_path: Path) -> None:
    msg = error_of(write_params(tmp_path, {"data.name": "imagenet"}))
    assert "data.image_size: got None; allowed: an integer > 0 for imagenet" in msg


def test_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert "cannot read" in error_of(missing)
    assert "invalid YAML at line 2: mapping values are not allowed here" in error_of(
        write_params(tmp_path, text="seed: 0\n  bad: indent\n"))
    assert "duplicate key 'seed'" in error_of(write_params(tmp_path, text="seed: 0\nseed: 1\n"))
    assert "expected a mapping of sections" in error_of(write_params(tmp_path, text="- 1\n"))


def test_overrides_replace_only_named_keys() -> None:
    cfg = config.load(ROOT / "params.yaml", overrides={"search": {"omega": 0.2}, "seed": 7, "data": None})
    base = config.load(ROOT / "params.yaml")
    assert cfg.search.omega == 0.2 and cfg.search.targets == base.search.targets
    assert cfg.seed == 7 and cfg.data == base.data


def test_bad_overrides_name_their_source() -> None:
    path = ROOT / "params.yaml"
    assert "(with notebook overrides): search.omega: got -1" in error_of(path, overrides={"search": {"omega": -1}})
    assert "overrides: unknown section 'serach'" in error_of(path, overrides={"serach": {"omega": 1}})
