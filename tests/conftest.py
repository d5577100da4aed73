"""Shared test set-up: one thread, no progress bars, and small datasets (fake IDX files, real Fashion-MNIST)."""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from enas4d import config

os.environ["ENAS4D_QUIET"] = "1"
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``long`` first: under ``make test`` (pytest-xdist, work stealing) one worker starts on the
    longest test while the others take the rest, so the suite takes about as long as that test."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


def pretrain_settings(**changes: object) -> config.PretrainConfig:
    """A ``pretrain:`` section for tests: one teacher epoch of batch 16 and OFA's usual rates, unless changed."""
    base = dict(batch_size=16, lr=0.05, lr_shrink=0.05, momentum=0.9, nesterov=True, weight_decay=3e-5,
                label_smoothing=0.1, kd_ratio=1.0, augment=True, epochs_full=1, epochs_kernel=0, epochs_depth=0,
                epochs_expand=0, subnets_per_step=1, sandwich=False, precision="fp32", bn_calib_images=32,
                eval_subnets=1)
    return config.PretrainConfig(**{**base, **changes})


def finetune_settings(**changes: object) -> config.FinetuneConfig:
    """A ``finetune:`` section for tests: one epoch of batch 16 with 2 stages and the paper's rates, unless changed."""
    base = dict(stages=2, epochs=1, batch_size=16, lr=4.5e-3, momentum=0.9, nesterov=True, weight_decay=3e-5,
                kd_ratio=1.0, augment=True, precision="fp32", eval_archs=2, hard_weight=0.0)
    return config.FinetuneConfig(**{**base, **changes})


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file (gzipped when ``path`` ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.fixture
def fake_fmnist(tmp_path: Path) -> Callable[..., Path]:
    """Factory: a directory of four Fashion-MNIST-format IDX files with random 28x28 images."""

    def make(name: str = "fmnist", n_train: int = 60, n_test: int = 20, seed: int = 0, gz: bool = True) -> Path:
        d = tmp_path / name
        d.mkdir()
        rng = np.random.default_rng(seed)
        ext = ".gz" if gz else ""
        for prefix, n in (("train", n_train), ("t10k", n_test)):
            write_idx(d / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
            write_idx(d / f"{prefix}-labels-idx1-ubyte{ext}", np.arange(n, dtype=np.uint8) % 10)
        return d

    return make


@pytest.fixture(scope="session")
def fmnist_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real Fashion-MNIST split at smoke size (2000 train / 500 metric / 500 test), prepared once per session."""
    from enas4d import data

    out = tmp_path_factory.mktemp("fmnist") / "prepared"
    data.prepare("fashion-mnist", None, False, 500, 2000, 500, out, None, seed=0)
    return out
