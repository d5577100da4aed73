"""The confidence/correctness database (paper: "Grid search for threshold").

Every sampled multi-stage arch is exported, BN-recalibrated, and run through *all* stages (no early exit)
on the metric set; per image and stage we keep the max-softmax confidence (float16) and whether the
prediction was right. With that table, thresholds for any omega and cost target are a grid search away, and
the metric predictor's training data is a cheap replay.

Layout of a finished database directory::

    manifest.json         seed, stages, images, arch list (dicts), shard list, per-stage MACs
    shard-00000.npz       conf [A, n, S] float16, correct [A, n, S] bool, macs [A, S] int64, index [A]
    ...

Shards are written atomically one by one into ``<out>.partial/<fingerprint>/`` (outside the DVC output,
which DVC deletes before rerunning a stage), so a killed build resumes where it stopped; the finished
directory is renamed into place at the end. ``worker``/``workers`` split the shards round-robin between
processes, each writing only its own, so workers share nothing but the directory.

``python -m enas4d.cli database build --workers N`` (``enas4d.cli.launch``) runs the pipeline's build
in N worker processes (one GPU each on a GPU machine), then validates and finalizes it; a killed worker
loses only its current shard, and rerunning the command starts workers just for the shards still missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from enas4d import cost
from enas4d.evaluate import deploy, memory_format
from enas4d.files import atomic_write
from enas4d.multistage import MultiStageNet
from enas4d.progress import bar
from enas4d.space import MultiStageArch, SearchSpace, SubnetArch
from enas4d.supernet import resize


class DatabaseError(ValueError):
    """A database directory that is missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class Database:
    """All archs of a database, loaded into memory (small: archs x images x stages bytes)."""

    conf: np.ndarray  # [A, n, S] float16
    correct: np.ndarray  # [A, n, S] bool
    macs: np.ndarray  # [A, S] int64, cumulative per stage
    archs: list[MultiStageArch]
    manifest: dict

    def __len__(self) -> int:
        return len(self.archs)

    def row(self, i: int) -> ArchRows:
        """Arch ``i`` as one ``ArchRows``."""
        return ArchRows(self.conf[i], self.correct[i], self.macs[i])

    def summary(self) -> dict:
        """Small numbers for a notebook table."""
        return {"archs": len(self.archs), "images": int(self.conf.shape[1]), "stages": int(self.conf.shape[2]),
                "stage_top1_mean": [round(float(x), 4) for x in self.correct.mean(axis=(0, 1))],
                "mmacs_min": round(float(self.macs[:, -1].min()) / 1e6, 3),
                "mmacs_max": round(float(self.macs[:, -1].max()) / 1e6, 3)}


def _write_json(path: Path, obj: dict) -> None:
    """Every worker writes the manifest: each through a temp file of its own (``files.atomic_write``)."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def sample_archs(space: SearchSpace, n: int, seed: int) -> list[MultiStageArch]:
    """The database's archs: ``n`` uniform samples, the same for the same seed (duplicates removed)."""
    rng = np.random.default_rng(seed)
    seen: set[MultiStageArch] = set()
    archs: list[MultiStageArch] = []
    while len(archs) < n:
        a = space.sample(rng)
        if a not in seen:
            seen.add(a)
            archs.append(a)
    return archs


def _fingerprint(manifest: dict) -> str:
    """What makes two builds the same build: a resumed build reuses only shards made under all of these."""
    keys = ("seed", "stages", "images", "archs", "shard_size", "weights", "calib_images", "batch_size")
    return hashlib.sha256(json.dumps({k: manifest[k] for k in keys}, sort_keys=True).encode()).hexdigest()[:16]


@torch.inference_mode()
def _stage_outputs(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Max-softmax confidence and correctness of every stage, no early exit."""
    confs, rights = [], []
    for i in range(0, len(images), batch_size):
        logits = net(images[i:i + batch_size])
        probs = torch.stack([torch.softmax(z.float(), dim=1) for z in logits], dim=1)  # [b, S, C]
        conf, pred = probs.max(dim=2)
        confs.append(conf.to(torch.float16).cpu())
        rights.append((pred == labels[i:i + batch_size, None]).cpu())
    return torch.cat(confs).numpy(), torch.cat(rights).numpy()


def at_resolution(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """``images`` resized to ``resolution`` in the memory format evaluation runs in on their device."""
    return resize(images, resolution).contiguous(memory_format=memory_format(images.device))


def evaluate_arch(msnet: MultiStageNet, arch: MultiStageArch, images: torch.Tensor, labels: torch.Tensor,
                  calib: torch.Tensor, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One database row's ``conf`` and ``correct`` [images, stages]: ``arch`` exported, its BN recalibrated
    on ``calib``, every stage run on ``images`` without early exit. ``images`` and ``calib`` are already
    ``at_resolution(..., arch.resolution)`` on the net's device (the build resizes once per resolution)."""
    return _stage_outputs(deploy(msnet, arch, calib, batch_size), images, labels, batch_size)


class ArchRows(NamedTuple):
    """One arch as a database row: ``conf``/``correct`` [images, stages], cumulative ``macs`` [stages]."""

    conf: np.ndarray
    correct: np.ndarray
    macs: np.ndarray


def as_multistage(arch: SubnetArch | MultiStageArch) -> MultiStageArch:
    """A static subnet as a one-stage multi-stage arch (its network is the static subnet's)."""
    return arch if isinstance(arch, MultiStageArch) else MultiStageArch.from_stages([arch])


def evaluate_like_database(msnet: MultiStageNet, arch: SubnetArch | MultiStageArch, images: torch.Tensor,
                           labels: torch.Tensor, calib: torch.Tensor, batch_size: int) -> ArchRows:
    """``arch`` evaluated exactly as ``build`` evaluates each of its archs (the search re-checks its picks so).

    Export, BN recalibration on ``calib`` at the arch's resolution, every stage on ``images`` without early
    exit (same batches, float16 confidences), so thresholds searched on the result are those the database
    would give. A static ``SubnetArch`` runs as a one-stage arch.
    """
    arch = as_multistage(arch)
    dev = next(msnet.parameters()).device
    x, xc = (at_resolution(t.to(dev), arch.resolution) for t in (images, calib))
    conf, correct = evaluate_arch(msnet, arch, x, labels.to(dev), xc, batch_size)
    return ArchRows(conf, correct, np.asarray(cost.stage_macs(msnet.supernet.spec, arch), dtype=np.int64))


@dataclass(frozen=True)
class BuildPlan:
    """Where a build's shards go and what they hold: a function of its settings alone, so every worker
    (and the launcher) derives the same directory without talking to the others."""

    work: Path  # <out>.partial/<fingerprint>
    manifest: dict
    archs: list[MultiStageArch]

    def shards_of(self, worker: int = 0, workers: int = 1) -> list[int]:
        """Shard numbers of ``worker`` (round-robin) that are not written yet."""
        if not 0 <= worker < workers:
            raise ValueError(f"worker {worker} outside 0..{workers - 1}")
        names = self.manifest["shards"]
        return [i for i in range(worker, len(names), workers) if not (self.work / names[i]).exists()]

    def set_aside_corrupt(self, shards: list[int] | None = None) -> list[Path]:
        """Rename unreadable or inconsistent finished shards (of ``shards``, default all) to ``*.corrupt``
        with a one-line warning, so the build redoes them instead of failing at the end; return the new names."""
        aside = []
        for i in range(len(self.manifest["shards"])) if shards is None else shards:
            path = self.work / self.manifest["shards"][i]
            if not path.exists():
                continue
            try:
                _read_shard(path, self.manifest, i * self.manifest["shard_size"])
            except DatabaseError as err:
                bad = path.with_name(path.name + ".corrupt")
                os.replace(path, bad)
                warnings.warn(f"{err}; set aside as {bad.name}, the shard is built again", stacklevel=2)
                aside.append(bad)
        return aside

    def arch_range(self, shard: int) -> range:
        size = self.manifest["shard_size"]
        return range(shard * size, min(len(self.archs), (shard + 1) * size))


def plan(space: SearchSpace, *, archs: int, shard_size: int, seed: int, images: int, weights_id: str,
         calib_images: int, batch_size: int, out: str | Path) -> BuildPlan:
    """The build of ``archs`` archs sampled with ``seed``, on ``images`` metric-set images, of weights
    ``weights_id``, BN-recalibrated on ``calib_images`` images in batches of ``batch_size`` (both change the
    statistics, so both name the build)."""
    arch_list = sample_archs(space, archs, seed)
    n_shards = (archs + shard_size - 1) // shard_size
    manifest = {"seed": seed, "stages": space.stages, "images": int(images), "shard_size": shard_size,
                "weights": weights_id, "calib_images": int(calib_images), "batch_size": int(batch_size),
                "archs": [a.to_dict() for a in arch_list],
                "shards": [f"shard-{i:05d}.npz" for i in range(n_shards)]}
    out = Path(out)
    return BuildPlan(out.with_name(out.name + ".partial") / _fingerprint(manifest), manifest, arch_list)


def build(msnet, space: SearchSpace, spec, images: torch.Tensor, labels: torch.Tensor, calib: torch.Tensor, *,
          archs: int, shard_size: int, batch_size: int, seed: int, out: str | Path, weights_id: str,
          worker: int = 0, workers: int = 1, finalize: bool = True) -> Path:
    """Build (or resume) the database of ``archs`` sampled archs into ``out``.

    ``images``/``labels`` are the metric-set images at native resolution (float, normalized) and
    ``calib`` the fixed BN-calibration images; ``weights_id`` names the multi-stage weights (e.g. the
    checkpoint's hash) so a resumed build never mixes shards of different weights. Only the shards of
    ``worker`` (of ``workers``) are computed; with ``finalize`` the database is validated and moved to
    ``out`` once every shard exists. Returns ``out`` when finalized, else the work directory.
    """
    out = Path(out)
    device = next(msnet.parameters()).device
    images, labels, calib = images.to(device), labels.to(device), calib.to(device)
    bp = plan(space, archs=archs, shard_size=shard_size, seed=seed, images=len(images), weights_id=weights_id,
              calib_images=len(calib), batch_size=batch_size, out=out)
    bp.work.mkdir(parents=True, exist_ok=True)
    _write_json(bp.work / "manifest.json", bp.manifest)
    bp.set_aside_corrupt(list(range(worker, len(bp.manifest["shards"]), workers)))
    todo = bp.shards_of(worker, workers)
    # One resolution's images at a time (ImageNet: 10K images at 224 are 6 GB): each shard's archs run
    # grouped by resolution, so a shard resizes the images at most once per resolution.
    cached: tuple[int, torch.Tensor, torch.Tensor] | None = None
    done_archs, t0 = 0, time.perf_counter()
    with bar(total=sum(len(bp.arch_range(i)) for i in todo), desc=f"database worker {worker}",
             unit="arch") as progress:
        for i in todo:
            rows: dict[int, tuple[np.ndarray, np.ndarray, list[int]]] = {}
            for j in sorted(bp.arch_range(i), key=lambda j: bp.archs[j].resolution):
                a = bp.archs[j]
                if cached is None or cached[0] != a.resolution:
                    cached = None  # free the previous resolution first
                    cached = (a.resolution, at_resolution(images, a.resolution), at_resolution(calib, a.resolution))
                _, x, xc = cached
                rows[j] = (*evaluate_arch(msnet, a, x, labels, xc, batch_size), cost.stage_macs(spec, a))
                done_archs += 1
                progress.update(1)
                progress.set_postfix(archs_per_s=f"{done_archs / (time.perf_counter() - t0):.2f}")
            idx = list(bp.arch_range(i))
            arrays = {"conf": np.stack([rows[j][0] for j in idx]), "correct": np.stack([rows[j][1] for j in idx]),
                      "macs": np.asarray([rows[j][2] for j in idx], dtype=np.int64),
                      "index": np.asarray(idx, dtype=np.int64)}
            atomic_write(bp.work / bp.manifest["shards"][i], lambda f: np.savez(f, **arrays))
    if finalize and not bp.shards_of(0, 1):
        return finish(bp.work, out)
    return bp.work


def finish(work: Path, out: Path) -> Path:
    """Validate the finished shards and move them into ``out`` in one rename."""
    validate(work)
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(work, staging)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    shutil.rmtree(work.parent, ignore_errors=True)
    return out


def is_finished(out: Path, bp: BuildPlan) -> bool:
    """Whether ``out`` already holds the finished build ``bp`` (a rerun then has nothing to do)."""
    return (out / "manifest.json").exists() and _fingerprint(_read_manifest(out)) == bp.work.name


def _read_manifest(path: Path) -> dict:
    mf = path / "manifest.json"
    if not mf.exists():
        raise DatabaseError(f"{mf}: missing (not a database directory, or the build did not finish)")
    try:
        return json.loads(mf.read_text())
    except json.JSONDecodeError as err:
        raise DatabaseError(f"{mf}: not valid JSON ({err})") from None


def _read_shard(path: Path, manifest: dict, first: int) -> dict[str, np.ndarray]:
    """One shard, checked against the manifest: keys, shapes, dtypes, ranges, arch indices."""
    if not path.exists():
        raise DatabaseError(f"{path}: missing shard")
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as err:  # a truncated or foreign file
        raise DatabaseError(f"{path}: unreadable shard ({type(err).__name__}: {err})") from None
    want = {"conf", "correct", "macs", "index"}
    if set(arrays) != want:
        raise DatabaseError(f"{path}: arrays {sorted(arrays)}, expected {sorted(want)}")
    n_archs = min(manifest["shard_size"], len(manifest["archs"]) - first)
    shape = (n_archs, manifest["images"], manifest["stages"])
    conf, correct = arrays["conf"], arrays["correct"]
    checks = [
        (conf.shape == shape and conf.dtype == np.float16, f"conf {conf.shape} {conf.dtype}, expected {shape} float16"),
        (correct.shape == shape and correct.dtype == bool,
         f"correct {correct.shape} {correct.dtype}, expected {shape} bool"),
        (arrays["macs"].shape == shape[::2], f"macs {arrays['macs'].shape}, expected {shape[::2]}"),
        (np.array_equal(arrays["index"], np.arange(first, first + n_archs)), "arch indices do not match the manifest"),
        (bool(np.all((conf >= 0) & (conf <= 1))), "confidences outside [0, 1]"),
        (bool(np.all(np.diff(arrays["macs"], axis=1) >= 0)), "cumulative MACs decrease over stages"),
    ]
    for ok, msg in checks:
        if not ok:
            raise DatabaseError(f"{path}: {msg}")
    return arrays


def validate(path: str | Path) -> dict:
    """Check every shard of a database directory; return its summary numbers."""
    path = Path(path)
    manifest = _read_manifest(path)
    total = 0
    for i, name in enumerate(manifest["shards"]):
        total += len(_read_shard(path / name, manifest, i * manifest["shard_size"])["index"])
    if total != len(manifest["archs"]):
        raise DatabaseError(f"{path}: {total} archs in shards, manifest lists {len(manifest['archs'])}")
    return {"archs": total, "images": manifest["images"], "stages": manifest["stages"], "seed": manifest["seed"]}


def load(path: str | Path) -> Database:
    """Load a finished database (validated while reading)."""
    path = Path(path)
    manifest = _read_manifest(path)
    shards = [_read_shard(path / name, manifest, i * manifest["shard_size"])
              for i, name in enumerate(manifest["shards"])]
    conf = np.concatenate([s["conf"] for s in shards])
    if len(conf) != len(manifest["archs"]):
        raise DatabaseError(f"{path}: {len(conf)} archs in shards, manifest lists {len(manifest['archs'])}")
    return Database(conf, np.concatenate([s["correct"] for s in shards]), np.concatenate([s["macs"] for s in shards]),
                    [MultiStageArch.from_dict(d) for d in manifest["archs"]], manifest)
