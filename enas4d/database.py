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

``python -m enas4d.database build --workers N`` runs the pipeline's build in N worker processes (one GPU
each on a GPU machine), then validates and finalizes it; a killed worker loses only its current shard,
and rerunning the command starts workers just for the shards still missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from enas4d import config, cost
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
    """Write through a temp file of this process's own (every worker writes the manifest), then rename."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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


def evaluate_arch(msnet, arch: MultiStageArch, images: torch.Tensor, labels: torch.Tensor, calib: torch.Tensor,
                  batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One database row's ``conf`` and ``correct`` [images, stages]: ``arch`` exported, its BN recalibrated
    on ``calib``, every stage run on ``images`` without early exit. ``images`` and ``calib`` are already
    ``at_resolution(..., arch.resolution)`` on the net's device (the build resizes once per resolution)."""
    fmt = memory_format(images.device)
    net = msnet.export(arch).to(memory_format=fmt)
    recalibrate_bn(net, calib, batch_size, fmt=fmt)
    return _stage_outputs(net, images, labels, batch_size)


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
            _atomic_bytes(bp.work / bp.manifest["shards"][i], lambda f: np.savez(f, **arrays))
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


# ---------------------------------------------------------------------------------------------- command line


def pipeline_plan(cfg: config.Config) -> BuildPlan:
    """The pipeline's build under ``cfg`` (the fine-tuned weights are read on the CPU, only to name them, so
    a launcher of GPU workers holds no GPU itself; a worker reads the file again for its own device)."""
    from enas4d import pipeline, train  # pipeline imports this module

    d = cfg.database
    weights = train.weights_digest(train.load_supernet(pipeline.MULTISTAGE))
    return plan(pipeline.space(cfg), archs=d.archs, shard_size=d.shard_size, seed=cfg.seed, images=d.images,
                weights_id=weights, calib_images=cfg.pretrain.bn_calib_images, batch_size=d.batch_size,
                out=pipeline.DATABASE)


def run_worker(cfg: config.Config, worker: int, workers: int) -> Path:
    """Worker ``worker`` of ``workers`` of the pipeline's build, exactly as the database notebook builds
    (same images, calibration, weights name and output), without finalizing; returns the work directory."""
    from enas4d import pipeline, train  # pipeline imports this module

    msnet = pipeline.load_multistage(cfg)
    splits = pipeline.splits(cfg)
    images, labels = pipeline.database_images(cfg, splits["metric"])
    calib = pipeline.calib_images(cfg, splits["train"])
    pipeline.ignored_dir(pipeline.DATABASE.with_name(pipeline.DATABASE.name + ".partial"))
    settings = config.to_dict(cfg.database)
    del settings["images"]
    return build(msnet, pipeline.space(cfg), msnet.supernet.spec, images, labels, calib, seed=cfg.seed,
                 out=pipeline.DATABASE, weights_id=train.weights_digest(msnet.supernet), worker=worker,
                 workers=workers, finalize=False, **settings)


def _exit_reason(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def launch(params: str | Path, workers: int, *, finalize: bool = True) -> Path:
    """Build the pipeline's database with ``workers`` processes; return ``out`` (finalized) or the work dir.

    Only workers with shards still missing run (none when ``out`` already holds this build). Each is a
    process ``python -m enas4d.database build --worker i`` (on a CUDA machine it sees one GPU: ``i`` modulo
    the visible GPUs; on a CPU the ``threads`` of params are shared out), except that a lone pending worker
    runs in this process. If a worker fails, the others finish their shards and DatabaseError names it:
    rerunning the command resumes.
    """
    from enas4d import pipeline  # pipeline imports this module

    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    cfg = config.load(params)
    bp = pipeline_plan(cfg)
    out = Path(pipeline.DATABASE)
    if (out / "manifest.json").exists() and _fingerprint(_read_manifest(out)) == bp.work.name:
        return out  # this very build is already finished
    if bp.work.is_dir():
        bp.set_aside_corrupt()
    pending = [w for w in range(workers) if bp.shards_of(w, workers)]
    if len(pending) == 1:
        pipeline.set_threads(cfg)
        run_worker(cfg, pending[0], workers)
    elif pending:
        gpus = torch.cuda.device_count() if pipeline.device(cfg).type == "cuda" else 0
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(g) for g in range(gpus)]
        threads = cfg.threads if gpus else max(1, cfg.threads // len(pending))
        procs: dict[int, subprocess.Popen] = {}
        try:
            for w in pending:
                env = dict(os.environ)
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = ids[w % len(ids)]
                if w != pending[0]:
                    env["ENAS4D_QUIET"] = "1"  # one progress bar, not N interleaved ones
                procs[w] = subprocess.Popen(
                    [sys.executable, "-m", "enas4d.database", "build", "--params", str(params), "--workers",
                     str(workers), "--worker", str(w), "--threads", str(threads)], env=env)
            codes = {w: p.wait() for w, p in procs.items()}
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.terminate()
                    p.wait()
        failed = {w: c for w, c in codes.items() if c != 0}
        if failed:
            what = "; ".join(f"worker {w} failed ({_exit_reason(c)})" for w, c in failed.items())
            raise DatabaseError(f"{bp.work}: {what}; finished shards are kept: rerun the same command to build "
                                "only the missing ones")
    return finish(bp.work, out) if finalize else bp.work


def main(argv: list[str] | None = None) -> int:
    """``build`` (all workers, or one with ``--worker``), ``finish`` a build whose workers all ran, ``validate``."""
    parser = argparse.ArgumentParser(prog="python -m enas4d.database", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="build the pipeline's database (run from the project root)")
    b.add_argument("--params", default="params.yaml")
    b.add_argument("--workers", type=int, default=1, help="worker processes in all (one GPU each on CUDA)")
    b.add_argument("--worker", type=int, default=None,
                   help="run only this worker (0-based) in this process, e.g. one per machine; then `finish`")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads of a --worker (default: threads)")
    b.add_argument("--no-finish", action="store_true",
                   help="leave the shards in <out>.partial/ (the database stage of `dvc repro` then finalizes)")
    f = commands.add_parser("finish", help="validate and finalize a build whose shards all exist")
    f.add_argument("--params", default="params.yaml")
    v = commands.add_parser("validate", help="check a database directory and print its summary")
    v.add_argument("path")
    args = parser.parse_args(argv)
    try:
        if args.command == "validate":
            print(json.dumps(validate(args.path)))
        elif args.command == "finish":
            from enas4d import pipeline  # pipeline imports this module

            print(finish(pipeline_plan(config.load(args.params)).work, Path(pipeline.DATABASE)))
        elif args.worker is not None:
            cfg = config.load(args.params)
            torch.set_num_threads(args.threads or cfg.threads)
            print(run_worker(cfg, args.worker, args.workers))
        else:
            print(launch(args.params, args.workers, finalize=not args.no_finish))
    except ValueError as err:  # ConfigError, DataError, DatabaseError, CheckpointError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
