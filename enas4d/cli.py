"""The command line of the pipeline's long steps, for runs outside ``dvc repro`` (bigger machines, torchrun).

``[torchrun --nproc_per_node=N] python -m enas4d.cli train pretrain [finetune] --params params.yaml`` trains
as the supernet and finetune notebooks do; ``python -m enas4d.cli database build|finish|validate`` builds,
finalizes or checks the confidence database as the database notebook does (docs/SCALING.md): training runs
``pipeline.run_stage`` and the database notebook runs ``database_plan`` and ``run_worker`` from here, so a run
started on the command line is resumed by ``dvc repro`` and the other way round. This module is an entry
point, the top layer with the glue (docs/DESIGN.md, "Layers").
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from enas4d import config, database, distributed, pipeline, train


# ---------------------------------------------------------------------------------------------- database build


def database_plan(cfg: config.Config) -> database.BuildPlan:
    """The pipeline's database build under ``cfg`` (the fine-tuned weights are read on the CPU, only to name
    them, so a launcher of GPU workers holds no GPU itself; a worker reads the file again for its device)."""
    d = cfg.database
    weights = train.weights_digest(train.load_supernet(pipeline.MULTISTAGE))
    return database.plan(pipeline.space(cfg), archs=d.archs, shard_size=d.shard_size, seed=cfg.seed,
                         images=d.images, weights_id=weights, calib_images=d.calib_images,
                         batch_size=d.batch_size, out=pipeline.DATABASE)


def run_worker(cfg: config.Config, worker: int, workers: int) -> Path:
    """Worker ``worker`` of ``workers`` of the pipeline's build, exactly as the database notebook builds
    (same images, calibration, weights name and output), without finalizing; returns the work directory."""
    msnet = pipeline.load_multistage(cfg)
    splits_ = pipeline.splits(cfg)
    images, labels = pipeline.database_images(cfg, splits_["metric"])
    calib = pipeline.database_calib_images(cfg, splits_["train"])
    pipeline.ignored_dir(pipeline.DATABASE.with_name(pipeline.DATABASE.name + ".partial"))
    settings = config.to_dict(cfg.database)
    del settings["images"], settings["calib_images"]
    return database.build(msnet, pipeline.space(cfg), msnet.supernet.spec, images, labels, calib, seed=cfg.seed,
                          out=pipeline.DATABASE, weights_id=train.weights_digest(msnet.supernet), worker=worker,
                          workers=workers, finalize=False, **settings)


def _exit_reason(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def launch(params: str | Path, workers: int, *, finalize: bool = True) -> Path:
    """Build the pipeline's database with ``workers`` processes; return ``out`` (finalized) or the work dir.

    Only workers with shards still missing run (none when ``out`` already holds this build). Each is a
    process ``python -m enas4d.cli database build --worker i`` (on a CUDA machine it sees one GPU: ``i``
    modulo the visible GPUs; on a CPU the ``threads`` of params are shared out), except that a lone pending
    worker runs in this process. If a worker fails, the others finish their shards and DatabaseError names
    it: rerunning the command resumes.
    """
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    cfg = config.load(params)
    bp = database_plan(cfg)
    out = Path(pipeline.DATABASE)
    if database.is_finished(out, bp):
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
                    [sys.executable, "-m", "enas4d.cli", "database", "build", "--params", str(params), "--workers",
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
            raise database.DatabaseError(f"{bp.work}: {what}; finished shards are kept: rerun the same command to "
                                         "build only the missing ones")
    return database.finish(bp.work, out) if finalize else bp.work


# ---------------------------------------------------------------------------------------------- commands


def train_command(args: argparse.Namespace) -> int:
    """``train``: the training stages in order, on every rank of a torchrun launch."""
    try:
        cfg = config.load(args.params)
        distributed.init(pipeline.device(cfg))
        pipeline.set_threads(cfg)
        for stage in args.stages:
            pipeline.run_stage(cfg, stage, args.micro_batches)
            distributed.barrier()  # the next stage reads what rank 0 just wrote
    except (ValueError, FloatingPointError) as err:  # ConfigError, DataError, CheckpointError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()
    return 0


def database_command(args: argparse.Namespace) -> int:
    """``database``: build (all workers, or one with ``--worker``), ``finish`` a build whose workers all ran,
    ``validate`` a directory."""
    try:
        if args.command == "validate":
            print(json.dumps(database.validate(args.path)))
        elif args.command == "finish":
            print(database.finish(database_plan(config.load(args.params)).work, Path(pipeline.DATABASE)))
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


def main(argv: list[str] | None = None) -> int:
    """``train`` or ``database`` (see the module docstring); 0 on success, 1 with a one-line error."""
    parser = argparse.ArgumentParser(prog="python -m enas4d.cli", description=__doc__.split("\n")[0])
    steps = parser.add_subparsers(dest="step", required=True)

    t = steps.add_parser("train", help="pretrain and/or fine-tune as the notebooks do (torchrun for N ranks)")
    t.add_argument("stages", nargs="+", choices=("pretrain", "finetune"), help="stages to run, in order")
    t.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    t.add_argument("--micro-batches", type=int, default=1,
                   help="split each rank's batch into this many parts (less memory, same arithmetic as that many "
                        "times more ranks)")
    t.set_defaults(run=train_command)

    d = steps.add_parser("database", help="build, finish or validate the confidence database")
    d.set_defaults(run=database_command)
    commands = d.add_subparsers(dest="command", required=True)
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
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
