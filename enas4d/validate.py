"""The pipeline's first stage: check params.yaml and the machine before any stage output is deleted.

DVC deletes a stage's outputs before it runs the stage's command, so a value checked inside a notebook is
checked too late: a typo would already have cost the stage's tracked reports. ``dvc repro`` runs this
stage first (every other stage depends on a file it writes), so a bad value fails here in one line naming
the key, and nothing else runs.

It also writes what the stages depend on but params.yaml does not say:

- ``reports/settings/compute.json``: the resolved ``device`` (``auto`` becomes ``cpu`` or ``cuda``) and
  ``threads``; training and evaluation stages depend on it, since both change their numbers.
- ``reports/settings/environment.json``: the torch version and CPU kernel family (AVX2, AVX512, ...),
  which change float results but are no dependency: recorded so two runs' numbers can be compared.
- ``reports/settings/data.json``: which data the ``data`` stage would read (``data.root``, else
  ``$ENAS4D_DATA``, else the installed copy) as a digest of its content, so pointing ``$ENAS4D_DATA``
  at other files reruns the pipeline, and a copy of the same files elsewhere does not.

The stage is ``always_changed`` (an environment variable or a GPU is invisible to DVC), and it rewrites
these files only when their content changes, so the stages downstream rerun only when it does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from enas4d import config, data, files

SETTINGS = Path("reports/settings")


class SettingsError(ValueError):
    """A value that is valid YAML of the right type but cannot work here; one line naming file and key."""


def compute_settings(cfg: config.Config, source: str = "params.yaml") -> dict[str, Any]:
    """``device`` resolved on this machine and ``threads``; ``device: cuda`` without a GPU is an error."""
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SettingsError(f"{source}: device: got 'cuda', but torch sees no CUDA device here; allowed: auto, cpu")
    device = "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"
    return {"device": device, "threads": cfg.threads}


def environment() -> dict[str, Any]:
    """What else decides the exact numbers of a run, recorded (not a dependency: a stage reruns on a change of
    device or threads, but the torch build and CPU kernels are facts of the machine, shown for comparison).

    Measured (docs/DESIGN.md, "Determinism"): two runs with the same params and thread count give
    bit-identical weights; 1 thread instead of 2 gives different ones, since float sums regroup."""
    import torch

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _fmnist_digest(directory: Path) -> str:
    """SHA-256 of the decoded images and labels (gzipped or plain IDX files of the same data hash alike).

    Reading them also checks every file (truncated, wrong magic, wrong length: one line naming it)."""
    h = hashlib.sha256()
    for part in data.FMNIST_FILES:
        images, labels = data.read_fashion_mnist(directory, part)
        for array in (images, labels):
            h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def _folder_digest(base: Path) -> str:
    """SHA-256 of the relative paths and sizes of every file under ``train/`` and ``val/`` (reading a whole
    ImageNet for a content hash would take longer than some stages)."""
    h = hashlib.sha256()
    for split in ("train", "val"):
        top = base / split
        if not top.is_dir():
            raise data.DataError(f"{top}: directory not found (data.root or $ENAS4D_DATA needs train/ and val/ "
                                 "class folders)")
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath, name)
                h.update(f"{path.relative_to(base)}\0{path.stat().st_size}\n".encode())
    return h.hexdigest()


def data_settings(cfg: config.Config) -> dict[str, Any]:
    """The dataset the ``data`` stage would read, as a content digest (no path: a copy elsewhere is the same data).

    A missing dataset, a wrong ``data.root`` or ``$ENAS4D_DATA``, or a corrupt file is a DataError naming it.
    """
    d = cfg.data
    if d.name == "fashion-mnist":
        directory = data.locate_fashion_mnist(d.root, d.download)
        return {"name": d.name, "sha256": _fmnist_digest(directory)}
    base = d.root or os.environ.get("ENAS4D_DATA")
    if base is None:
        raise data.DataError(f"data.root: null; {d.name} needs data.root or $ENAS4D_DATA (a folder with train/ "
                             "and val/)")
    return {"name": d.name, "listing_sha256": _folder_digest(Path(base))}


def check_supported(cfg: config.Config, source: str = "params.yaml") -> None:
    """Values the schema allows but the pipeline cannot run: each a one-line SettingsError naming the key."""
    if cfg.search.cost != "macs":
        raise SettingsError(f"{source}: search.cost: got {cfg.search.cost!r}; allowed here: macs (the predictor and "
                            "search stages price archs in MACs; latency targets go in latency.targets, Table 4)")
    if cfg.supernet.checkpoint is not None and not Path(cfg.supernet.checkpoint).is_file():
        raise SettingsError(f"{source}: supernet.checkpoint: {cfg.supernet.checkpoint}: file not found")


def _write_if_changed(path: Path, obj: dict[str, Any]) -> bool:
    """Write ``obj`` as JSON (atomically) unless the file already says the same, so that DVC sees no change
    and the stages downstream do not rerun; True if written."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    if path.is_file() and path.read_text() == text:
        return False
    files.write_text(path, text)
    return True


def run(params: str | Path = "params.yaml", out: str | Path = SETTINGS) -> dict[str, dict[str, Any]]:
    """Validate ``params`` and the machine; write ``compute.json``, ``data.json`` and ``environment.json`` to
    ``out``; return them."""
    cfg = config.load(params)
    check_supported(cfg, str(params))
    settings = {"compute": compute_settings(cfg, str(params)), "data": data_settings(cfg),
                "environment": environment()}
    for name, obj in settings.items():
        _write_if_changed(Path(out) / f"{name}.json", obj)
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m enas4d.validate", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default=str(SETTINGS), help=f"where the settings files go (default: {SETTINGS})")
    args = parser.parse_args(argv)
    try:
        settings = run(args.params, args.out)
    except (config.ConfigError, SettingsError, data.DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{args.params}: valid; device {settings['compute']['device']}, {settings['compute']['threads']} threads, "
          f"{settings['data']['name']} data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
