"""params.yaml as a typed, validated, frozen config.

Every later stage reads its numbers from here, so a typo must fail *before* an hour of training, with
one line that names the file, the dotted key and what is allowed. Each params section is one frozen
dataclass whose field names are the YAML keys; a field's ``metadata`` holds its range rule, and one
generic walker checks types and rules, so adding a key is adding one annotated field.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import NoneType, UnionType
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad params file: the message is one line naming the file, the key and the allowed values."""


def _rule(**rules: Any) -> Any:
    """A dataclass field carrying its validation rules (see ``_describe``)."""
    return field(metadata=rules)


POSITIVE = dict(gt=0)
PROB = dict(ge=0, le=1)
INCREASING = dict(gt=0, increasing=True)


@dataclass(frozen=True)
class DataConfig:
    """``data:`` which dataset, where it lives, and how the training set is split."""

    name: str = _rule(choices=("fashion-mnist", "imagefolder", "imagenet"))
    root: str | None = _rule()
    download: bool = _rule()
    metric_size: int = _rule(**POSITIVE)
    train_limit: int | None = _rule(**POSITIVE)
    test_limit: int | None = _rule(**POSITIVE)
    out: str = _rule(nonempty=True)
    image_size: int | None = _rule(**POSITIVE)


@dataclass(frozen=True)
class SupernetConfig:
    """``supernet:`` the elastic network and its choices (the search space)."""

    preset: str = _rule(choices=("fmnist_small", "ofa_mbv3_w1.0"))
    resolutions: tuple[int, ...] = _rule(**INCREASING)
    depths: tuple[int, ...] = _rule(**INCREASING)
    expands: tuple[int, ...] = _rule(**INCREASING)
    kernels: tuple[int, ...] = _rule(increasing=True, subset=(3, 5, 7))
    checkpoint: str | None = _rule(nonempty=True)


@dataclass(frozen=True)
class PretrainConfig:
    """``pretrain:`` OFA progressive shrinking of the supernet (0 epochs skip a phase)."""

    batch_size: int = _rule(**POSITIVE)
    lr: float = _rule(**POSITIVE)
    lr_shrink: float = _rule(**POSITIVE)
    momentum: float = _rule(ge=0, lt=1)
    nesterov: bool = _rule()
    weight_decay: float = _rule(ge=0)
    label_smoothing: float = _rule(ge=0, lt=1)
    kd_ratio: float = _rule(ge=0)
    augment: bool = _rule()
    epochs_full: int = _rule(ge=0)
    epochs_kernel: int = _rule(ge=0)
    epochs_depth: int = _rule(ge=0)
    epochs_expand: int = _rule(ge=0)
    subnets_per_step: int = _rule(**POSITIVE)
    sandwich: bool = _rule()
    precision: str = _rule(choices=("fp32", "bf16", "fp16"))
    bn_calib_images: int = _rule(**POSITIVE)
    eval_subnets: int = _rule(**POSITIVE)


@dataclass(frozen=True)
class FinetuneConfig:
    """``finetune:`` multi-stage fine-tuning (the paper's "train for dynamic inference")."""

    stages: int = _rule(**POSITIVE)
    epochs: int = _rule(ge=0)
    batch_size: int = _rule(**POSITIVE)
    lr: float = _rule(**POSITIVE)
    momentum: float = _rule(ge=0, lt=1)
    nesterov: bool = _rule()
    weight_decay: float = _rule(ge=0)
    kd_ratio: float = _rule(ge=0)
    augment: bool = _rule()
    precision: str = _rule(choices=("fp32", "bf16", "fp16"))
    eval_archs: int = _rule(**POSITIVE)
    hard_weight: float = _rule(ge=0, le=1)


@dataclass(frozen=True)
class DatabaseConfig:
    """``database:`` the confidence/correctness database of sampled multi-stage archs."""

    archs: int = _rule(**POSITIVE)
    images: int = _rule(**POSITIVE)
    shard_size: int = _rule(**POSITIVE)
    batch_size: int = _rule(**POSITIVE)
    # BN-calibration images of every evaluation done the database's way (build, search, tables, deploy), drawn
    # like pretrain.bn_calib_images with the same seed: fewer of them are a subset of those
    calib_images: int = _rule(**POSITIVE)


@dataclass(frozen=True)
class SearchConfig:
    """``search:`` the metric R = ACC_avg * min(target / cost, 1) ** omega and its targets."""

    omega: float = _rule(ge=0)
    cost: str = _rule(choices=("macs", "latency"))
    targets: tuple[float, ...] = _rule(**POSITIVE)
    grid: float = _rule(gt=0, le=1)


@dataclass(frozen=True)
class PredictorConfig:
    """``predictor:`` the model that predicts R from an arch (the search's fitness) and the paper's MLP."""

    hidden: tuple[int, ...] = _rule(**POSITIVE)
    lr: float = _rule(**POSITIVE)
    weight_decay: float = _rule(ge=0)
    epochs: int = _rule(**POSITIVE)
    batch_size: int = _rule(**POSITIVE)
    val_fraction: float = _rule(gt=0, lt=1)
    model: str = _rule(choices=("mlp", "gradient_boosting"))  # the search's; the MLP is reported beside


@dataclass(frozen=True)
class EvolutionConfig:
    """``evolution:`` regularized evolution (Real et al. 2019)."""

    population: int = _rule(**POSITIVE)
    generations: int = _rule(**POSITIVE)
    sample_size: int = _rule(**POSITIVE)
    mutation_prob: float = _rule(**PROB)
    crossover_prob: float = _rule(**PROB)
    top_k: int = _rule(**POSITIVE)  # predicted-best archs per target the search stage re-evaluates for real


@dataclass(frozen=True)
class LatencyConfig:
    """``latency:`` the op latency table and the latency targets of Table 4."""

    threads: int = _rule(**POSITIVE)
    repeats: int = _rule(**POSITIVE)
    warmup: int = _rule(ge=0)
    targets: tuple[float, ...] = _rule(**POSITIVE)
    top_k: int = _rule(**POSITIVE)  # predicted-best archs per latency target re-evaluated for real
    check_archs: int = _rule(**POSITIVE)  # random archs whose measured per-stage latency checks the table
    calibrate_archs: int = _rule(**POSITIVE)  # other random archs that fit the runtime table's per-op correction
    timed_images: int = _rule(**POSITIVE)  # test images timed one at a time (batch 1)


@dataclass(frozen=True)
class ReportsConfig:
    """``reports:`` sizes of the tables and figures."""

    sweep_targets: tuple[float, ...] = _rule(**INCREASING)
    random_archs: int = _rule(**POSITIVE)
    figure6_per_stage: int = _rule(**POSITIVE)
    sweep_top_k: int = _rule(**POSITIVE)  # predicted-best archs per sweep target re-evaluated for real (Figure 5)
    supernet_target_top1: float = _rule(gt=0, le=1)  # test top-1 the largest subnet is checked against


@dataclass(frozen=True)
class Config:
    """The whole params file."""

    seed: int = _rule(ge=0)
    device: str = _rule(choices=("auto", "cpu", "cuda"))
    threads: int = _rule(**POSITIVE)
    data: DataConfig = _rule()
    supernet: SupernetConfig = _rule()
    pretrain: PretrainConfig = _rule()
    finetune: FinetuneConfig = _rule()
    database: DatabaseConfig = _rule()
    search: SearchConfig = _rule()
    predictor: PredictorConfig = _rule()
    evolution: EvolutionConfig = _rule()
    latency: LatencyConfig = _rule()
    reports: ReportsConfig = _rule()


# ---------------------------------------------------------------------------------------------- loading
class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict:
    """The params file as a plain mapping, with a one-line ConfigError for a missing or malformed file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def load(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate ``path``; ``overrides`` maps a section (or top-level key) to new values.

    A dict override replaces only the keys it names in that section; ``None`` keeps the file's value.
    Notebooks pass the parameters papermill injected (``None`` when run by hand in JupyterLab).
    """
    raw = read_yaml(path)
    source = str(path)
    live = {k: v for k, v in (overrides or {}).items() if v is not None}
    if live:
        source += " (with notebook overrides)"
        names = [f.name for f in dataclasses.fields(Config)]
        for key, value in live.items():
            if key not in names:
                raise ConfigError(f"{source}: overrides: unknown section {key!r}; allowed: {', '.join(names)}")
            base = raw.get(key)
            raw[key] = {**base, **value} if isinstance(base, dict) and isinstance(value, dict) else value
    cfg = _build(Config, raw, "", source)
    _check_cross(cfg, source)
    return cfg


def to_dict(obj: Any) -> Any:
    """Plain YAML/JSON values (dicts, lists, scalars) of a config or section, e.g. for papermill."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------- validation
def _fail(source: str, key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: got {value!r}; allowed: {allowed}")


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise _fail(source, where, raw, f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(cls))}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{source}: {prefix}{key}: unknown key; allowed keys: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in raw:
            raise ConfigError(f"{source}: {key}: missing; allowed: {_describe(hints[name], f.metadata)}")
        values[name] = _value(hints[name], f.metadata, raw[name], key, source)
    return cls(**values)


def _value(tp: Any, rules: dict, value: Any, key: str, source: str) -> Any:
    """Check ``value`` against annotation ``tp`` and ``rules``; return it typed (lists become tuples)."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", source)
    allowed = _describe(tp, rules)
    args = typing.get_args(tp)
    if isinstance(tp, UnionType):  # X | None
        if value is None:
            return None
        tp = next(a for a in args if a is not NoneType)
        args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, list) or not value:
            raise _fail(source, key, value, allowed)
        items = tuple(_scalar(args[0], v, key, source, allowed) for v in value)
        if rules.get("increasing") and any(b <= a for a, b in zip(items[:-1], items[1:], strict=True)):
            raise _fail(source, key, value, allowed)
        if "subset" in rules and not set(items) <= set(rules["subset"]):
            raise _fail(source, key, value, allowed)
        for v in items:
            _check_range(v, rules, key, value, source, allowed)
        return items
    v = _scalar(tp, value, key, source, allowed)
    if "choices" in rules and v not in rules["choices"]:
        raise _fail(source, key, value, allowed)
    if rules.get("nonempty") and not v:
        raise _fail(source, key, value, allowed)
    _check_range(v, rules, key, value, source, allowed)
    return v


def _scalar(tp: type, value: Any, key: str, source: str, allowed: str) -> Any:
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        hint = " (YAML reads 1e-4 as text: write 1.0e-4)" if tp is float and _numeric_text(value) else ""
        raise _fail(source, key, value, allowed + hint)
    if tp is float:
        value = float(value)
        if not math.isfinite(value):
            raise _fail(source, key, value, allowed)
    return value


def _numeric_text(value: Any) -> bool:
    """Text that Python reads as a number but YAML 1.1 does not (``1e-4``), where a hint helps."""
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def _check_range(v: Any, rules: dict, key: str, shown: Any, source: str, allowed: str) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return
    if ("gt" in rules and not v > rules["gt"]) or ("ge" in rules and not v >= rules["ge"]) \
            or ("lt" in rules and not v < rules["lt"]) or ("le" in rules and not v <= rules["le"]):
        raise _fail(source, key, shown, allowed)


def _describe(tp: Any, rules: dict) -> str:
    """Human text of what a field accepts, e.g. 'a strictly increasing list of integers > 0'."""
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    optional = isinstance(tp, UnionType)
    if optional:
        tp = next(a for a in typing.get_args(tp) if a is not NoneType)
    bounds = [f"{op} {rules[k]}" for k, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")) if k in rules]
    if typing.get_origin(tp) is tuple:
        noun = {int: "integers", float: "numbers"}[typing.get_args(tp)[0]]
        text = f"a non-empty list of {noun}"
        if rules.get("increasing"):
            text = f"a strictly increasing list of {noun}"
        if "subset" in rules:
            text += f" from {list(rules['subset'])}"
    elif "choices" in rules:
        text = "one of " + ", ".join(rules["choices"])
    else:
        text = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]
        if rules.get("nonempty"):
            text = "a non-empty string"
    if bounds:
        text += " " + " and ".join(bounds)
    return text + (" or null" if optional else "")


def _check_cross(cfg: Config, source: str) -> None:
    """Rules that tie two keys together."""
    d = cfg.data
    if cfg.database.images > d.metric_size:
        raise _fail(source, "database.images", cfg.database.images,
                    f"an integer <= data.metric_size ({d.metric_size}): the database is built on the metric set")
    if cfg.evolution.sample_size > cfg.evolution.population:
        raise _fail(source, "evolution.sample_size", cfg.evolution.sample_size,
                    f"an integer <= evolution.population ({cfg.evolution.population})")
    if cfg.evolution.crossover_prob > 0 and cfg.evolution.sample_size < 2:
        raise _fail(source, "evolution.sample_size", cfg.evolution.sample_size,
                    "an integer >= 2 when evolution.crossover_prob > 0 (crossover needs two parents)")
    if d.train_limit is not None and cfg.pretrain.bn_calib_images > d.train_limit:
        raise _fail(source, "pretrain.bn_calib_images", cfg.pretrain.bn_calib_images,
                    f"an integer <= data.train_limit ({d.train_limit}): calibration images come from the train split")
    if d.train_limit is not None and cfg.database.calib_images > d.train_limit:
        raise _fail(source, "database.calib_images", cfg.database.calib_images,
                    f"an integer <= data.train_limit ({d.train_limit}): calibration images come from the train split")
    if d.name == "fashion-mnist" and d.image_size is not None:
        raise _fail(source, "data.image_size", d.image_size, "null for fashion-mnist (its images are 28x28)")
    if d.name != "fashion-mnist" and d.image_size is None:
        raise _fail(source, "data.image_size", None, f"an integer > 0 for {d.name} (the side images are cropped to)")
    if d.name != "fashion-mnist" and d.download:
        raise _fail(source, "data.download", True, f"false for {d.name} (only Fashion-MNIST can be downloaded)")
