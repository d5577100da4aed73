"""Data: where Fashion-MNIST is found, one clear error per bad file, seeded splits, batching, ImageFolder."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, write_idx
from PIL import Image

from enas4d import data
from enas4d.data import DataError, DatasetNotFound


def prepare_fake(directory: Path, out: Path, seed: int = 0, metric_size: int = 10, **kw) -> dict[str, int]:
    args = dict(train_limit=None, test_limit=None, image_size=None) | kw
    return data.prepare("fashion-mnist", str(directory), False, metric_size, out=out, seed=seed, **args)


# ------------------------------------------------------------------------------------------------ location
@pytest.fixture
def no_debian(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "no-debian-package")
    monkeypatch.delenv("ENAS4D_DATA", raising=False)


def test_location_order(fake_fmnist, monkeypatch: pytest.MonkeyPatch, no_debian) -> None:
    root, env, debian = fake_fmnist("root"), fake_fmnist("env"), fake_fmnist("debian")
    monkeypatch.setattr(data, "DEBIAN_DIR", debian)
    monkeypatch.setenv("ENAS4D_DATA", str(env))
    assert data.locate_fashion_mnist(str(root)) == root
    assert data.locate_fashion_mnist(None) == env
    monkeypatch.delenv("ENAS4D_DATA")
    assert data.locate_fashion_mnist(None) == debian


def test_download_only_when_allowed(fake_fmnist, monkeypatch: pytest.MonkeyPatch, no_debian, tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound, match="apt-get install dataset-fashion-mnist.*data.download: true"):
        data.locate_fashion_mnist(None, download=False)
    fetched = fake_fmnist("cache")
    monkeypatch.setattr(data, "_download", lambda target: fetched)
    assert data.locate_fashion_mnist(None, download=True) == fetched
    # a local copy wins over downloading
    monkeypatch.setattr(data, "DEBIAN_DIR", fake_fmnist("debian"))
    assert data.locate_fashion_mnist(None, download=True) == data.DEBIAN_DIR


def test_torchvision_layout_is_found(fake_fmnist, tmp_path: Path) -> None:
    raw = fake_fmnist("FashionMNIST")
    (tmp_path / "tv" / "FashionMNIST").mkdir(parents=True)
    raw.rename(tmp_path / "tv" / "FashionMNIST" / "raw")
    assert data.locate_fashion_mnist(tmp_path / "tv") == tmp_path / "tv" / "FashionMNIST" / "raw"


def test_missing_directory_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match=f"^{tmp_path}/absent: directory not found \\(data.root\\)$"):
        data.locate_fashion_mnist(tmp_path / "absent")
    monkeypatch.setenv("ENAS4D_DATA", str(tmp_path / "gone"))
    with pytest.raises(DataError, match=r"gone: directory not found \(\$ENAS4D_DATA\)"):
        data.locate_fashion_mnist(None)


def test_missing_file_is_named(fake_fmnist) -> None:
    d = fake_fmnist()
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: file not found"):
        data.locate_fashion_mnist(d)


# ------------------------------------------------------------------------------------------- bad IDX files
def test_idx_roundtrip_gzipped_and_plain(fake_fmnist) -> None:
    for gz in (True, False):
        d = fake_fmnist(f"gz{gz}", gz=gz)
        images, labels = data.read_fashion_mnist(d, "train")
        assert images.shape == (60, 1, 28, 28) and images.dtype == np.uint8
        assert labels.dtype == np.int64 and labels.tolist() == [i % 10 for i in range(60)]


def test_truncated_gzip(fake_fmnist) -> None:
    f = fake_fmnist() / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(DataError, match=f"^{f}: truncated or corrupt gzip file"):
        data.read_idx(f, 3)


def test_wrong_length(tmp_path: Path) -> None:
    f = write_idx(tmp_path / "images.gz", np.zeros((5, 28, 28), np.uint8))
    raw = gzip.decompress(f.read_bytes())
    f.write_bytes(gzip.compress(raw[:-28]))
    with pytest.raises(DataError, match=rf"^{f}: wrong length: dimensions \(5, 28, 28\) need 3920 data bytes, "
                                         "file has 3892"):
        data.read_idx(f, 3)
    f.write_bytes(gzip.compress(raw[:10]))
    with pytest.raises(DataError, match=f"^{f}: truncated: 10 bytes, header needs 16"):
        data.read_idx(f, 3)


def test_wrong_magic(tmp_path: Path) -> None:
    f = write_idx(tmp_path / "labels", np.zeros(5, np.uint8))  # a 1-D (label) file where images are expected
    with pytest.raises(DataError, match=f"^{f}: wrong magic number 0x00000801, expected 0x00000803"):
        data.read_idx(f, 3)
    f.write_bytes(b"\x1f\x8b garbage")  # gzip magic in a file without .gz
    with pytest.raises(DataError, match="wrong magic number 0x1f8b2067"):
        data.read_idx(f, 1)


def test_wrong_image_shape(fake_fmnist) -> None:
    d = fake_fmnist()
    write_idx(d / "train-images-idx3-ubyte.gz", np.zeros((60, 32, 32), np.uint8))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: wrong image shape 32x32, expected 28x28"):
        data.read_fashion_mnist(d, "train")


def test_label_count_and_range(fake_fmnist) -> None:
    d = fake_fmnist()
    write_idx(d / "train-labels-idx1-ubyte.gz", np.zeros(59, np.uint8))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz: 59 labels for the 60 images"):
        data.read_fashion_mnist(d, "train")
    write_idx(d / "train-labels-idx1-ubyte.gz", np.full(60, 10, np.uint8))
    with pytest.raises(DataError, match="label 10 out of range 0..9"):
        data.read_fashion_mnist(d, "train")


# ----------------------------------------------------------------------------------------------- splits
def test_split_indices_are_seeded_disjoint_and_complete() -> None:
    train, metric = data.split_indices(100, 30, seed=3)
    again = data.split_indices(100, 30, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(metric, again[1])
    assert len(metric) == 30 and len(train) == 70
    assert sorted(np.concatenate([train, metric]).tolist()) == list(range(100))
    other_train, other_metric = data.split_indices(100, 30, seed=4)
    assert not np.array_equal(metric, other_metric)
    limited, limited_metric = data.split_indices(100, 30, seed=3, train_limit=20)
    assert np.array_equal(limited_metric, metric) and set(limited) < set(train) and len(limited) == 20
    with pytest.raises(ValueError, match="data.metric_size = 100 leaves no training images out of 100"):
        data.split_indices(100, 100, seed=0)


def test_prepare_writes_deterministic_splits(fake_fmnist, tmp_path: Path) -> None:
    d = fake_fmnist()
    sizes = prepare_fake(d, tmp_path / "a", seed=1, test_limit=8)
    assert sizes == {"train": 50, "metric": 10, "test": 8, "num_classes": 10}
    prepare_fake(d, tmp_path / "b", seed=1, test_limit=8)
    prepare_fake(d, tmp_path / "c", seed=2, test_limit=8)
    for name in data.SPLITS:
        a, b = data.load_split(tmp_path / "a", name), data.load_split(tmp_path / "b", name)
        assert np.array_equal(a.indices, b.indices) and torch.equal(a.images, b.images)
    assert not np.array_equal(data.load_split(tmp_path / "a", "metric").indices,
                              data.load_split(tmp_path / "c", "metric").indices)
    images, labels = data.read_fashion_mnist(d, "train")
    metric = data.load_split(tmp_path / "a", "metric")
    assert np.array_equal(metric.images.numpy(), images[metric.indices])
    assert np.array_equal(metric.labels.numpy(), labels[metric.indices])
    assert not (set(metric.indices) & set(data.load_split(tmp_path / "a", "train").indices))
    assert not list(tmp_path.glob(".a-*")), "no temp directory left behind"


def test_prepare_rejects_a_metric_set_larger_than_the_data(fake_fmnist, tmp_path: Path) -> None:
    d = fake_fmnist()
    with pytest.raises(DataError, match=f"^{d}: data.metric_size = 60 leaves no training images out of 60"):
        prepare_fake(d, tmp_path / "out", metric_size=60)


def test_load_split_errors(tmp_path: Path, fmnist_prepared: Path) -> None:
    with pytest.raises(DataError, match="meta.json: not found; prepare the data first"):
        data.load_split(tmp_path, "train")
    with pytest.raises(DataError, match="'val': unknown split; allowed: train, metric, test"):
        data.load_split(fmnist_prepared, "val")


def test_real_fashion_mnist_split(fmnist_prepared: Path) -> None:
    train = data.load_split(fmnist_prepared, "train")
    assert (len(train), train.num_classes, train.in_channels, train.image_size) == (2000, 10, 1, 28)
    assert train.images.shape == (2000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and train.classes[0] == "T-shirt/top"
    assert 0.25 < train.mean[0] < 0.32 and 0.32 < train.std[0] < 0.38
    meta = json.loads((fmnist_prepared / "meta.json").read_text())
    assert meta["sizes"] == {"train": 2000, "metric": 500, "test": 500}


# ---------------------------------------------------------------------------------------------- batching
def test_batches_are_deterministic_and_cover_the_split(fmnist_prepared: Path) -> None:
    split = data.subset(data.load_split(fmnist_prepared, "train"), 300, seed=0)

    def run(**kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(data.batches(split, 64, seed=5, **kw))

    first, again = run(shuffle=True, epoch=1), run(shuffle=True, epoch=1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert [len(y) for _, y in first] == [64, 64, 64, 64, 44]
    assert not torch.equal(first[0][1], run(shuffle=True, epoch=2)[0][1])
    ordered = torch.cat([y for _, y in run(shuffle=False)])
    assert torch.equal(ordered, split.labels)
    assert sorted(torch.cat([y for _, y in first]).tolist()) == sorted(split.labels.tolist())
    x = torch.cat([x for x, _ in run(shuffle=False)])
    assert x.dtype == torch.float32 and x.shape == (300, 1, 28, 28)
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1  # normalized with train stats


def test_batches_shard_one_permutation_across_ranks() -> None:
    n, world = 10, 3
    split = data.Split("t", torch.arange(n), np.arange(n), tuple("abcdefghij"), 1, 28, (0.0,), (1.0,),
                       images=torch.zeros(n, 1, 28, 28, dtype=torch.uint8))
    shards = [torch.cat([y for _, y in data.batches(split, 2, shuffle=True, seed=0, rank=r, world=world)])
              for r in range(world)]
    assert {len(s) for s in shards} == {4}, "every rank gets the same number of samples (padded)"
    assert set(torch.cat(shards).tolist()) == set(range(n))
    with pytest.raises(ValueError, match="rank 3 outside 0..2"):
        next(data.batches(split, 2, shuffle=True, seed=0, rank=3, world=3))


def test_augment_is_a_padded_shift_or_flip(fmnist_prepared: Path) -> None:
    split = data.subset(data.load_split(fmnist_prepared, "test"), 16, seed=0)
    (plain, _), = data.batches(split, 16, shuffle=False, seed=0)
    (aug, _), = data.batches(split, 16, shuffle=False, seed=0, augment=True)
    (aug2, _), = data.batches(split, 16, shuffle=False, seed=0, augment=True)
    assert torch.equal(aug, aug2) and not torch.equal(aug, plain)
    background = plain.min()
    padded = torch.nn.functional.pad(plain, (2, 2, 2, 2), value=background.item())
    for i in range(16):
        views = [v for dy in range(5) for dx in range(5)
                 for v in (padded[i, :, dy:dy + 28, dx:dx + 28], padded[i, :, dy:dy + 28, dx:dx + 28].flip(-1))]
        assert any(torch.allclose(aug[i], v) for v in views), f"sample {i} is not a shifted/flipped copy"


def test_subset_is_fixed_and_checked(fmnist_prepared: Path) -> None:
    split = data.load_split(fmnist_prepared, "metric")
    a, b = data.subset(split, 50, seed=9), data.subset(split, 50, seed=9)
    assert np.array_equal(a.indices, b.indices) and len(a) == 50 and set(a.indices) <= set(split.indices)
    assert torch.equal(a.images, b.images) and a.num_classes == 10
    with pytest.raises(ValueError, match="subset of 501 images requested from the 500 of split 'metric'"):
        data.subset(split, 501, seed=0)


def test_plot_samples_has_a_row_per_class(fmnist_prepared: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    fig = data.plot_samples(data.load_split(fmnist_prepared, "test"), per_class=3)
    assert len(fig.axes) == 30 and fig.axes[0].get_ylabel() == "T-shirt/top"


# ------------------------------------------------------------------------------------------- ImageFolder
@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """train/ and val/ class folders of small random RGB images of varied sizes."""
    rng = np.random.default_rng(0)
    for part, n in (("train", 6), ("val", 2)):
        for cls in ("cat", "dog", "eel"):
            (tmp_path / "folder" / part / cls).mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(18, 30, 2)
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                    tmp_path / "folder" / part / cls / f"{i}.png")
    return tmp_path / "folder"


def test_image_folder_through_the_same_interface(image_folder: Path, tmp_path: Path) -> None:
    sizes = data.prepare("imagefolder", str(image_folder), False, 3, None, None, tmp_path / "p", 16, seed=0)
    assert sizes == {"train": 15, "metric": 3, "test": 6, "num_classes": 3}
    train = data.load_split(tmp_path / "p", "train")
    assert train.images is None and len(train.files) == 15 and train.classes == ("cat", "dog", "eel")
    assert train.in_channels == 3 and Path(train.files[0]).is_file()
    test = data.load_split(tmp_path / "p", "test")
    assert sorted(test.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    got = [list(data.batches(train, 4, shuffle=True, seed=1, augment=True, workers=w)) for w in (0, 2)]
    assert [x.shape for x, _ in got[0]] == [(4, 3, 16, 16)] * 3 + [(3, 3, 16, 16)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(*got, strict=True)), \
        "augmentation must not depend on the number of workers"
    sub = data.subset(train, 5, seed=0)
    assert len(sub) == 5 and set(sub.files) <= set(train.files)


def test_image_folder_errors(image_folder: Path, tmp_path: Path) -> None:
    (image_folder / "val" / "fox").mkdir()
    with pytest.raises(DataError, match=r"folder/val: class folders \['fox'\] are not in the train folder"):
        data.prepare("imagefolder", str(image_folder), False, 3, None, None, tmp_path / "p", 16, seed=0)
    (image_folder / "val" / "fox").rmdir()
    (image_folder / "val").rename(image_folder / "test")
    with pytest.raises(DataError, match=r"folder/val: directory not found"):
        data.prepare("imagefolder", str(image_folder), False, 3, None, None, tmp_path / "p", 16, seed=0)


# ------------------------------------------------------------------------------------------------- CLI
def test_check_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_debian, fake_fmnist, capsys) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert data.main(["check", "--params", str(path)]) == 3
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
    params["data"]["root"] = str(tmp_path / "typo")
    path.write_text(yaml.safe_dump(params))
    assert data.main(["check", "--params", str(path)]) == 1
    assert "typo: directory not found (data.root)" in capsys.readouterr().err
    params["data"]["root"] = str(fake_fmnist())
    path.write_text(yaml.safe_dump(params))
    assert data.main(["check", "--params", str(path)]) == 0
