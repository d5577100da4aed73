"""Datasets, the train / metric / test splits, and fast batching.

The paper holds 10K images out of the *training* data (the "metric set") to build the confidence
database and set the exit thresholds, and tests on the original test/val set. ``prepare`` makes that
split once, seeded, and writes it to ``data/prepared/``; every later stage reads it with ``load_split``.

Fashion-MNIST (gzipped IDX files) is looked for at ``data.root``, then ``$ENAS4D_DATA``, then Debian's
``dataset-fashion-mnist`` path, then downloaded by torchvision when ``data.download`` allows; it is small
enough to keep in memory as one uint8 tensor, so batches are sliced from it directly (a per-item
DataLoader is several times slower on a small CPU). ImageFolder / ImageNet (``train/`` and ``val/`` class
folders) go through the same functions: their splits are file lists, read by a torchvision DataLoader.

``python -m enas4d.data check`` tells the Makefile whether the dataset can be found (exit 3: Fashion-MNIST
is missing and ``apt-get install dataset-fashion-mnist`` would fix it).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from enas4d import config

SPLITS = ("train", "metric", "test")
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FMNIST_SIZE = 28
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENT_PAD = 2


class DataError(ValueError):
    """A bad or missing dataset file: the message is one line naming the file or directory."""


class DatasetNotFound(DataError):
    """Fashion-MNIST is nowhere to be found (the Makefile installs the Debian package on this)."""


@dataclass(frozen=True, eq=False)
class Split:
    """One split: in-memory ``images`` (uint8 N×C×H×W) or image ``files``, and int64 ``labels``."""

    name: str
    labels: torch.Tensor
    indices: np.ndarray  # positions in the source set (train file / val folder), for traceability
    classes: tuple[str, ...]
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    images: torch.Tensor | None = None
    files: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)


# ------------------------------------------------------------------------------------------ Fashion-MNIST
def _fmnist_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _check_fmnist_dir(directory: Path, origin: str) -> Path:
    """``directory`` (or its torchvision layout ``FashionMNIST/raw``) holding all four IDX files."""
    if not directory.is_dir():
        raise DataError(f"{directory}: directory not found ({origin})")
    for d in (directory, directory / "FashionMNIST" / "raw"):
        if all(_fmnist_file(d, s) for pair in FMNIST_FILES.values() for s in pair):
            return d
    missing = next(s for pair in FMNIST_FILES.values() for s in pair if not _fmnist_file(directory, s))
    raise DataError(f"{directory / (missing + '.gz')}: file not found ({origin}; Fashion-MNIST needs "
                    f"{', '.join(s + '.gz' for pair in FMNIST_FILES.values() for s in pair)})")


def find_fashion_mnist(root: str | Path | None = None) -> Path | None:
    """The local Fashion-MNIST directory: ``root``, else ``$ENAS4D_DATA``, else Debian's; None if none.

    A configured ``root`` or ``$ENAS4D_DATA`` that is wrong is an error, not a silent fall-through,
    so a typo in the path cannot quietly select another copy of the data.
    """
    if root is not None:
        return _check_fmnist_dir(Path(root), "data.root")
    if os.environ.get("ENAS4D_DATA"):
        return _check_fmnist_dir(Path(os.environ["ENAS4D_DATA"]), "$ENAS4D_DATA")
    if DEBIAN_DIR.is_dir():
        return _check_fmnist_dir(DEBIAN_DIR, f"Debian package {DEBIAN_PACKAGE}")
    return None


def download_dir() -> Path:
    """Where torchvision downloads Fashion-MNIST to (outside the repo, shared by checkouts)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "enas4d"


def _download(target: Path) -> Path:
    from torchvision.datasets import FashionMNIST

    try:
        for train in (True, False):
            FashionMNIST(str(target), train=train, download=True)
    except Exception as err:  # torchvision raises URLError, RuntimeError, OSError... name them all once
        raise DataError(f"{target}: Fashion-MNIST download failed ({type(err).__name__}: {err})") from None
    return target / "FashionMNIST" / "raw"


def locate_fashion_mnist(root: str | Path | None = None, download: bool = False) -> Path:
    """``find_fashion_mnist``, else a torchvision download when allowed, else a message saying what to do."""
    found = find_fashion_mnist(root)
    if found is not None:
        return found
    if download:
        return _check_fmnist_dir(_download(download_dir()), "torchvision download")
    raise DatasetNotFound(
        f"{DEBIAN_DIR}: Fashion-MNIST not found; install it (apt-get install {DEBIAN_PACKAGE}), or set "
        "data.root in params.yaml or $ENAS4D_DATA to a folder with its four IDX files, or set data.download: true")


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX array (gzipped or not), checking magic number, dimensions and length."""
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DataError(f"{path}: truncated or corrupt gzip file ({err})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    expected_magic = 0x0800 | ndim
    header = 4 + 4 * ndim
    if len(raw) < 4:
        raise DataError(f"{path}: truncated: {len(raw)} bytes, shorter than an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataError(f"{path}: wrong magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
                        f"(IDX unsigned byte, {ndim}-D)")
    if len(raw) < header:
        raise DataError(f"{path}: truncated: {len(raw)} bytes, header needs {header}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(dims))
    if len(raw) - header != size:
        raise DataError(f"{path}: wrong length: dimensions {dims} need {size} data bytes, file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_fashion_mnist(directory: str | Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 N×1×28×28) and labels (int64) of the ``train`` or ``test`` files in ``directory``."""
    directory = Path(directory)
    img_stem, lbl_stem = FMNIST_FILES[part]
    img_path = _fmnist_file(directory, img_stem) or directory / f"{img_stem}.gz"
    lbl_path = _fmnist_file(directory, lbl_stem) or directory / f"{lbl_stem}.gz"
    images, labels = read_idx(img_path, 3), read_idx(lbl_path, 1)
    if images.shape[1:] != (FMNIST_SIZE, FMNIST_SIZE):
        raise DataError(f"{img_path}: wrong image shape {images.shape[1]}x{images.shape[2]}, "
                        f"expected {FMNIST_SIZE}x{FMNIST_SIZE} (Fashion-MNIST)")
    if len(labels) != len(images):
        raise DataError(f"{lbl_path}: {len(labels)} labels for the {len(images)} images of {img_path.name}")
    if len(labels) and labels.max() >= len(FMNIST_CLASSES):
        raise DataError(f"{lbl_path}: label {labels.max()} out of range 0..{len(FMNIST_CLASSES) - 1}")
    return images[:, None], labels.astype(np.int64)


# -------------------------------------------------------------------------------------------- splitting
def split_indices(n: int, metric_size: int, seed: int,
                  train_limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, metric) positions of a seeded random hold-out of ``metric_size`` of ``n`` images."""
    if metric_size >= n:
        raise ValueError(f"data.metric_size = {metric_size} leaves no training images out of {n}")
    perm = np.random.default_rng(seed).permutation(n)
    train = perm[metric_size:] if train_limit is None else perm[metric_size:metric_size + train_limit]
    return np.sort(train), np.sort(perm[:metric_size])


def _limit(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted positions of a seeded random subset of ``limit`` of ``n`` (all of them for None)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 1]).permutation(n)[:limit])


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of uint8 images in [0, 1], via a 256-bin histogram (no float copy)."""
    values = np.arange(256) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = np.bincount(images[:, c].ravel(), minlength=256)
        mean = float(counts @ values / counts.sum())
        means.append(mean)
        stds.append(float(np.sqrt(counts @ (values - mean) ** 2 / counts.sum())))
    return tuple(means), tuple(stds)


def _folder_listing(directory: Path, class_to_idx: dict[str, int] | None) -> tuple[list[str], np.ndarray, np.ndarray]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if not directory.is_dir():
        raise DataError(f"{directory}: directory not found (expected class folders: {directory}/<class>/<image>)")
    try:
        classes, found = find_classes(str(directory))
        if class_to_idx is not None:
            extra = sorted(set(classes) - set(class_to_idx))
            if extra:
                raise DataError(f"{directory}: class folders {extra[:5]} are not in the train folder")
            classes, found = list(class_to_idx), class_to_idx
        samples = make_dataset(str(directory), found, extensions=IMG_EXTENSIONS, allow_empty=class_to_idx is not None)
    except FileNotFoundError as err:
        raise DataError(f"{directory}: {err}") from None
    files = np.array([p for p, _ in samples], dtype=str)
    return classes, files, np.array([y for _, y in samples], dtype=np.int64)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def prepare(name: str, root: str | None, download: bool, metric_size: int, train_limit: int | None,
            test_limit: int | None, out: str | Path, image_size: int | None, *, seed: int) -> dict[str, int]:
    """Write the train / metric / test splits to ``out`` (replacing it whole); return the split sizes.

    Arguments are the keys of the ``data`` params section, so a notebook can pass them straight through.
    """
    out = Path(out)
    if name not in ("fashion-mnist", "imagefolder", "imagenet"):
        raise ValueError(f"data.name: {name!r}; allowed: fashion-mnist, imagefolder, imagenet")
    if name != "fashion-mnist" and image_size is None:
        raise ValueError(f"data.image_size: None; {name} needs the side its images are cropped to")
    if name == "fashion-mnist":
        directory = locate_fashion_mnist(root, download)
        images, labels = read_fashion_mnist(directory, "train")
        test_images, test_labels = read_fashion_mnist(directory, "test")
        source, classes, channels, size = directory, FMNIST_CLASSES, 1, FMNIST_SIZE
    else:
        base = root or os.environ.get("ENAS4D_DATA")
        if base is None:
            raise DataError(f"data.root: null; {name} needs data.root or $ENAS4D_DATA (a folder with train/ and val/)")
        source = Path(base).resolve()
        classes, files, labels = _folder_listing(source / "train", None)
        _, test_files, test_labels = _folder_listing(source / "val", {c: i for i, c in enumerate(classes)})
        channels, size = 3, image_size
    try:
        train_idx, metric_idx = split_indices(len(labels), metric_size, seed, train_limit)
    except ValueError as err:
        raise DataError(f"{source}: {err}") from None
    test_idx = _limit(len(test_labels), test_limit, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published directory should read like any other
    try:
        parts = {"train": train_idx, "metric": metric_idx, "test": test_idx}
        for split, idx in parts.items():
            lab = (test_labels if split == "test" else labels)[idx]
            if name == "fashion-mnist":
                img = (test_images if split == "test" else images)[idx]
                _save_npz(tmp / f"{split}.npz", images=img, labels=lab, indices=idx)
            else:
                fl = (test_files if split == "test" else files)[idx]
                _save_npz(tmp / f"{split}.npz", files=np.array([os.path.relpath(f, source) for f in fl], dtype=str),
                          labels=lab, indices=idx)
        if name == "fashion-mnist":
            mean, std = _channel_stats(images[train_idx])
        else:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        sizes = {split: int(len(idx)) for split, idx in parts.items()}
        meta = {"name": name, "source": str(source), "seed": seed, "classes": list(classes), "in_channels": channels,
                "image_size": size, "mean": list(mean), "std": list(std), "sizes": sizes}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {**sizes, "num_classes": len(classes)}


# ---------------------------------------------------------------------------------------------- loading
def load_split(prepared_dir: str | Path, name: str) -> Split:
    """Split ``name`` (train, metric or test) of a directory written by ``prepare``."""
    if name not in SPLITS:
        raise DataError(f"{name!r}: unknown split; allowed: {', '.join(SPLITS)}")
    prepared_dir = Path(prepared_dir)
    meta_path = prepared_dir / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: not found; prepare the data first (dvc repro data)")
    meta = json.loads(meta_path.read_text())
    try:
        with np.load(prepared_dir / f"{name}.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as err:
        raise DataError(f"{prepared_dir / (name + '.npz')}: cannot read ({err})") from None
    files = None
    if "files" in arrays:
        files = np.array([os.path.join(meta["source"], f) for f in arrays["files"]], dtype=str)
    images = torch.from_numpy(arrays["images"]) if "images" in arrays else None
    return Split(name=name, labels=torch.from_numpy(arrays["labels"]), indices=arrays["indices"],
                 classes=tuple(meta["classes"]), in_channels=meta["in_channels"], image_size=meta["image_size"],
                 mean=tuple(meta["mean"]), std=tuple(meta["std"]), images=images, files=files)


def subset(split: Split, n: int, seed: int) -> Split:
    """A fixed seeded subset of ``n`` images (e.g. the BN-calibration images), in source order."""
    if not 0 < n <= len(split):
        raise ValueError(f"subset of {n} images requested from the {len(split)} of split {split.name!r}")
    idx = np.sort(np.random.default_rng(seed).permutation(len(split))[:n])
    t = torch.from_numpy(idx)
    return replace(split, labels=split.labels[t], indices=split.indices[idx],
                   images=None if split.images is None else split.images[t],
                   files=None if split.files is None else split.files[idx])


def _order(n: int, shuffle: bool, seed: int, epoch: int, rank: int, world: int) -> np.ndarray:
    """This rank's sample order; the same permutation on every rank, padded so each gets equally many."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside 0..{world - 1}")
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    if world > 1:
        order = np.resize(order, n + (-n) % world)[rank::world]
    return order


def _augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random crop with zero padding ``AUGMENT_PAD`` and horizontal flip, for a whole uint8 batch at once."""
    n, c, h, w = x.shape
    p = AUGMENT_PAD
    padded = F.pad(x, (p, p, p, p))
    rows = torch.from_numpy(rng.integers(0, 2 * p + 1, n))[:, None] + torch.arange(h)
    cols = torch.from_numpy(rng.integers(0, 2 * p + 1, n))[:, None] + torch.arange(w)
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    flip = torch.from_numpy(rng.random(n) < 0.5)[:, None, None, None]
    return torch.where(flip, out.flip(-1), out)


class _Folder(torch.utils.data.Dataset):
    """Image files read by PIL; an item is ``(index, augmentation seed)`` so crops do not depend on workers."""

    def __init__(self, files: np.ndarray, labels: torch.Tensor, size: int, augment: bool) -> None:
        from torchvision import transforms

        self.files, self.labels, self.augment = files, labels, augment
        if augment:
            self.tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()])
        else:  # OFA's evaluation crop: resize to size / 0.875, center crop
            self.tf = transforms.Compose([transforms.Resize(round(size / 0.875)), transforms.CenterCrop(size)])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        from PIL import Image, UnidentifiedImageError
        from torchvision.transforms.functional import pil_to_tensor

        i, aug_seed = item
        try:
            with Image.open(self.files[i]) as im:
                img = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise DataError(f"{self.files[i]}: cannot read image ({err})") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(aug_seed)
            img = self.tf(img)
        return pil_to_tensor(img), int(self.labels[i])


def _normalize(x: torch.Tensor, split: Split) -> torch.Tensor:
    mean = torch.tensor(split.mean).view(1, -1, 1, 1)
    std = torch.tensor(split.std).view(1, -1, 1, 1)
    return (x.float().div_(255) - mean) / std


def batches(split: Split, batch_size: int, *, shuffle: bool, seed: int, epoch: int = 0, augment: bool = False,
            rank: int = 0, world: int = 1, workers: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalized float32 image batches and int64 labels; the same (seed, epoch) gives the same batches.

    ``rank``/``world`` shard one shared permutation for distributed training (every rank gets the same
    number of batches). ``augment``: random crop (padding 2) + flip for in-memory data, random-resized
    crop + flip for folders. ``workers`` (folders only; default up to 8) are DataLoader processes.
    """
    order = _order(len(split), shuffle, seed, epoch, rank, world)
    rng = np.random.default_rng([seed, epoch, rank, 1])
    if split.images is not None:
        for start in range(0, len(order), batch_size):
            idx = torch.from_numpy(order[start:start + batch_size])
            x = split.images[idx]
            yield _normalize(_augment(x, rng) if augment else x, split), split.labels[idx]
        return
    items = list(zip(order.tolist(), rng.integers(0, 2**31, len(order)).tolist(), strict=True))
    if workers is None:
        workers = min(8, len(os.sched_getaffinity(0)))
    loader = torch.utils.data.DataLoader(_Folder(split.files, split.labels, split.image_size, augment),
                                         batch_size=batch_size, sampler=items, num_workers=workers)
    for x, y in loader:
        yield _normalize(x, split), y


def image_grid(rows: Sequence[Sequence[int]], image: Callable[[int], np.ndarray], row_labels: Sequence[str],
               columns: int, cell: tuple[float, float], caption: Callable[[int], tuple[str, str]] | None = None):
    """A matplotlib figure of images, row ``r`` showing ``image(i)`` for the indices ``rows[r]`` (cells past
    them stay blank) with ``row_labels[r]`` on its left; ``caption(i)``: an optional (title, colour) per
    image. ``image(i)`` is H×W (gray) or H×W×3 uint8, as ``display_image`` returns."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), columns, figsize=(columns * cell[0], len(rows) * cell[1]), squeeze=False)
    for r, chosen in enumerate(rows):
        for j, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(chosen):
                img = image(int(chosen[j]))
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
                if caption is not None:
                    title, colour = caption(int(chosen[j]))
                    ax.set_title(title, fontsize=7, color=colour)
        axes[r, 0].set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=9)
    return fig


def plot_samples(split: Split, per_class: int = 8, seed: int = 0, max_classes: int = 10):
    """A matplotlib figure: one row of ``per_class`` random images for each of the first classes."""
    rng = np.random.default_rng(seed)
    labels = split.labels.numpy()
    rows = []
    for c in range(min(split.num_classes, max_classes)):
        pool = np.flatnonzero(labels == c)
        rows.append(rng.choice(pool, size=min(per_class, len(pool)), replace=False) if len(pool) else [])
    fig = image_grid(rows, lambda i: display_image(split, i), split.classes, per_class, (0.9, 0.95))
    fig.suptitle(f"{split.name} split: {len(split)} images, {split.num_classes} classes", fontsize=10)
    fig.tight_layout()
    return fig


def display_image(split: Split, i: int) -> np.ndarray:
    """H×W (gray) or H×W×3 uint8 image ``i`` of a split, as shown to the network at evaluation."""
    if split.images is not None:
        img = split.images[i]
    else:
        img = _Folder(split.files, split.labels, split.image_size, augment=False)[(i, 0)][0]
    return img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()


# -------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """``check``: can the configured dataset be found? Exit 3 when Fashion-MNIST is simply not installed."""
    parser = argparse.ArgumentParser(prog="python -m enas4d.data", description=main.__doc__)
    parser.add_argument("command", choices=["check"])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        d = config.load(args.params).data
        if d.name == "fashion-mnist":
            found = find_fashion_mnist(d.root)
            if found is None and not d.download:
                locate_fashion_mnist(d.root, download=False)  # raises DatasetNotFound: what to do
            where = found or f"torchvision download to {download_dir()}"
        else:
            base = d.root or os.environ.get("ENAS4D_DATA")
            if base is None or not Path(base, "train").is_dir() or not Path(base, "val").is_dir():
                raise DataError(f"{base}: {d.name} needs train/ and val/ class folders at data.root or $ENAS4D_DATA")
            where = base
    except DatasetNotFound as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (config.ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{d.name}: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
