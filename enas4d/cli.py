"""The command line of the pipeline's long steps, for runs outside ``dvc repro`` (bigger machines, torchrun).

``[torchrun --nproc_per_node=N] python -m enas4d.cli train pretrain [finetune] --params params.yaml`` trains
as the supernet and finetune notebooks do; ``python -m enas4d.cli database build|finish|validate`` builds,
finalizes or checks the confidence database as the database notebook does (docs/SCALING.md). Both run the
stage runners of ``enas4d.pipeline``, so a run started here is resumed by ``dvc repro`` and the other way
round. This module is an entry point, the top layer with the glue (docs/DESIGN.md, "Layers").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from enas4d import config, database, distributed, pipeline


def train(args: argparse.Namespace) -> int:
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


def build_database(args: argparse.Namespace) -> int:
    """``database``: build (all workers, or one with ``--worker``), ``finish`` a build whose workers all ran,
    ``validate`` a directory."""
    try:
        if args.command == "validate":
            print(json.dumps(database.validate(args.path)))
        elif args.command == "finish":
            print(database.finish(pipeline.database_plan(config.load(args.params)).work, Path(pipeline.DATABASE)))
        elif args.worker is not None:
            cfg = config.load(args.params)
            torch.set_num_threads(args.threads or cfg.threads)
            print(pipeline.run_worker(cfg, args.worker, args.workers))
        else:
            print(pipeline.launch(args.params, args.workers, finalize=not args.no_finish))
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
    t.set_defaults(run=train)

    d = steps.add_parser("database", help="build, finish or validate the confidence database")
    d.set_defaults(run=build_database)
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
