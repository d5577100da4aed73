"""The confidence/correctness database (paper: "Grid search for threshold").

Every sampled multi-stage arch is exported, BN-recalibrated, and run through *all* stages (no early exit)
on the metric set; per image and stage we keep the max-softmax confidence (float16) and whether the
prediction was right. With that table, thresholds for any omega and cost target are a grid search away, and
the metric predictor's training data is a cheap replay.

Layout of a finished database directory::

    manifest.json         seed, stages, images, arch list (dicts), shard list, per-stage MACs
    shard-00000.npz       conf [A, n, S] float16, correct [A, n, S] bool, macs [A, S] int64, index [A]
    ...

Shards are written atomically one by one into ``<out>.partial/`` (outside the DVC output, which DVC deletes
before rerunning a stage), so a killed build resumes where it stopped; the finished directory is renamed
into place at the end. ``worker``/``workers`` split the shards between processes (each writes its own).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from enas4d import cost
from enas4d.evaluate import memory_format, recalibrate_bn
from enas4d.progress import bar
from enas4d.space import MultiStageArch, SearchSpace
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

    def summary(self) -> dict:
        """Small numbers for a notebook table."""
        return {"archs": len(self.archs), "images": int(self.conf.shape[1]), "stages": int(self.conf.shape[2]),
                "stage_top1_mean": [round(float(x), 4) for x in self.correct.mean(axis=(0, 1))],
                "mmacs_min": round(float(self.macs[:, -1].min()) / 1e6, 3),
                "mmacs_max": round(float(self.macs[:, -1].max()) / 1e6, 3)}


def _atomic_bytes(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict) -> None:
    _atomic_bytes(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


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
    """What makes two builds the same build (shard contents depend on nothing else but the weights)."""
    keys = ("seed", "stages", "images", "archs", "shard_size", "weights")
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


def build(msnet, space: SearchSpace, spec, images: torch.Tensor, labels: torch.Tensor, calib: torch.Tensor, *,
          archs: int, shard_size: int, batch_size: int, seed: int, out: str | Path, weights_id: str,
          worker: int = 0, workers: int = 1, finalize: bool = True) -> Path:
    """Build (or resume) the database of ``archs`` sampled archs into ``out``.

    ``images``/``labels`` are the metric-set images at native resolution (float, normalized) and
    ``calib`` the fixed BN-calibration images; ``weights_id`` names the multi-stage weights (e.g. the
    checkpoint's hash) so a resumed build never mixes shards of different weights.
    """
    out = Path(out)
    device = next(msnet.parameters()).device
    fmt = memory_format(device)
    images, labels, calib = images.to(device), labels.to(device), calib.to(device)
    arch_list = sample_archs(space, archs, seed)
    n_shards = (archs + shard_size - 1) // shard_size
    manifest = {"seed": seed, "stages": space.stages, "images": int(len(images)), "shard_size": shard_size,
                "weights": weights_id, "archs": [a.to_dict() for a in arch_list],
                "shards": [f"shard-{i:05d}.npz" for i in range(n_shards)]}
    work = out.with_name(out.name + ".partial") / _fingerprint(manifest)
    work.mkdir(parents=True, exist_ok=True)
    _write_json(work / "manifest.json", manifest)

    mine = [i for i in range(n_shards) if i % workers == worker]
    todo = [i for i in mine if not (work / manifest["shards"][i]).exists()]
    resized: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    done_archs, t0 = 0, time.perf_counter()
    with bar(total=sum(len(range(i * shard_size, min(archs, (i + 1) * shard_size))) for i in todo),
             desc=f"database worker {worker}", unit="arch") as progress:
        for i in todo:
            idx = list(range(i * shard_size, min(archs, (i + 1) * shard_size)))
            confs, rights, macs = [], [], []
            for j in idx:
                a = arch_list[j]
                if a.resolution not in resized:
                    resized[a.resolution] = (resize(images, a.resolution).contiguous(memory_format=fmt),
                                             resize(calib, a.resolution).contiguous(memory_format=fmt))
                x, xc = resized[a.resolution]
                net = msnet.export(a).to(memory_format=fmt)
                recalibrate_bn(net, xc, batch_size, fmt=fmt)
                c, r = _stage_outputs(net, x, labels, batch_size)
                confs.append(c)
                rights.append(r)
                macs.append(cost.stage_macs(spec, a))
                done_archs += 1
                progress.update(1)
                progress.set_postfix(archs_per_s=f"{done_archs / (time.perf_counter() - t0):.2f}")
            arrays = {"conf": np.stack(confs), "correct": np.stack(rights),
                      "macs": np.asarray(macs, dtype=np.int64), "index": np.asarray(idx, dtype=np.int64)}
            _atomic_bytes(work / manifest["shards"][i], lambda f: np.savez(f, **arrays))
    if finalize and all((work / s).exists() for s in manifest["shards"]):
        return finish(work, out)
    return work


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
    checks = [
        (arrays["conf"].shape == shape and arrays["conf"].dtype == np.float16, f"conf {arrays['conf'].shape} {arrays['conf'].dtype}, expected {shape} float16"),
        (arrays["correct"].shape == shape and arrays["correct"].dtype == bool, f"correct {arrays['correct'].shape} {arrays['correct'].dtype}, expected {shape} bool"),
        (arrays["macs"].shape == shape[::2], f"macs {arrays['macs'].shape}, expected {shape[::2]}"),
        (np.array_equal(arrays["index"], np.arange(first, first + n_archs)), "arch indices do not match the manifest"),
        (bool(np.all((arrays["conf"] >= 0) & (arrays["conf"] <= 1))), "confidences outside [0, 1]"),
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


def main(argv: list[str] | None = None) -> int:
    """``python -m enas4d.database validate DIR``: check a database and print its summary."""
    p = argparse.ArgumentParser(prog="python -m enas4d.database")
    p.add_argument("command", choices=["validate"])
    p.add_argument("path")
    args = p.parse_args(argv)
    try:
        print(json.dumps(validate(args.path)))
    except DatabaseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
