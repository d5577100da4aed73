"""Run a pipeline notebook with papermill, and the small helpers notebooks use to write their outputs.

Every DVC stage is ``python -m enas4d.notebook notebooks/NN_name.ipynb``: the params file is validated
first (one-line error), the notebook's ``parameters`` cell is inspected, the top-level params sections
of those names are injected, and the executed copy lands in ``reports/notebooks/`` only when every cell
ran (written atomically, ``enas4d.files``), so a failed run never leaves a half-executed copy that DVC
could take for a result. A failing cell fails the stage with the notebook's own traceback.

Notebooks declare their sections as ``None`` in the parameters cell and pass them to
``enas4d.config.load("params.yaml", overrides=...)``: run by hand in JupyterLab they read params.yaml and
work in ``scratch/`` (``project_root``), run by papermill they get the injected values and work in the
checkout. Stage metrics go through ``write_metrics``: numbers for DVC, the whole record beside them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from enas4d import config, files

OUT_DIR = Path("reports/notebooks")
PIPELINE_ENV = "ENAS4D_PIPELINE"  # set for the kernels ``run`` starts: params were injected
SCRATCH = "scratch"
_NOT_MIRRORED = {".git", ".venv", ".dvc", SCRATCH, ".pytest_cache"}


class NotebookError(RuntimeError):
    """A notebook that could not run or whose cell failed; the last line of the message says which."""


def project_root(start: str | Path | None = None) -> Path:
    """The directory a notebook works in: the nearest one at or above ``start`` (default: cwd) holding dvc.yaml,
    or, for a notebook run by hand (not by ``run``, so no params were injected), its scratch copy ``scratch_root``.

    Notebooks ``os.chdir`` there first, so the same relative paths work under papermill (run from the
    root) and in JupyterLab (where the kernel starts in ``notebooks/``), and a hand run never rewrites
    the pipeline's tracked results.
    """
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "dvc.yaml").is_file():
            if start is None and os.environ.get(PIPELINE_ENV) != "1" and SCRATCH not in d.parts:
                return scratch_root(d)
            return d
    raise FileNotFoundError(f"{here}: no dvc.yaml here or above; open the notebook from the enas4d checkout")


def scratch_root(root: Path) -> Path:
    """``<root>/scratch/``: a mirror of the checkout in which every file is a symlink to the real one.

    Reads follow the links; every writer here writes a temp file and renames it over the path, which
    replaces the link and never touches the real file, so a hand run's outputs stay in scratch/ (ignored by
    git and DVC). Files a hand run wrote are kept; links are refreshed on every call."""
    scratch = root / SCRATCH
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if not (rel == Path(".") and d in _NOT_MIRRORED) and d != "__pycache__"]
        (scratch / rel).mkdir(parents=True, exist_ok=True)
        for name in filenames:
            link = scratch / rel / name
            if link.is_symlink() or not link.exists():
                link.unlink(missing_ok=True)
                link.symlink_to(Path(dirpath, name))
    print(f"run by hand (no papermill parameters): working in {scratch}; the pipeline's files are read, "
          "never written", file=sys.stderr)
    return scratch


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically; for DVC metrics files."""
    return files.write_json(path, obj)


DETAILS_DIR = Path("reports/details")
METRICS_DIR = Path("reports/metrics")


def numeric_only(obj: dict[str, Any]) -> dict[str, Any]:
    """The finite numbers of ``obj`` (nested dicts kept, lists, text, booleans and None left out): what
    ``dvc metrics show`` and ``dvc exp show`` can put in a column."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            inner = numeric_only(value)
            if inner:
                out[key] = inner
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = value
    return out


def write_metrics(name: str, obj: dict[str, Any]) -> Path:
    """``reports/metrics/<name>.json``: the numbers of ``obj`` only (DVC metrics); the whole record (archs,
    lists, text) goes to ``reports/details/<name>.json``, which later stages read. Returns the details path."""
    write_json(METRICS_DIR / f"{name}.json", numeric_only(obj))
    return write_json(DETAILS_DIR / f"{name}.json", obj)


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically, in the format of ``path``'s suffix."""
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=Path(path).suffix.lstrip(".") or "png")
    return Path(path)


def parameters(notebook: str | Path, params: str | Path = "params.yaml") -> dict[str, Any]:
    """The values papermill injects: each name of the notebook's parameters cell, from ``params``."""
    import papermill

    cfg = config.to_dict(config.load(params))
    declared = papermill.inspect_notebook(str(notebook))
    unknown = [name for name in declared if name not in cfg]
    if unknown:
        raise NotebookError(f"{notebook}: parameter {unknown[0]!r} is not a top-level key of {params} "
                            f"(allowed: {', '.join(cfg)})")
    return {name: cfg[name] for name in declared}


def run(notebook: str | Path, params: str | Path = "params.yaml", out_dir: str | Path = OUT_DIR) -> Path:
    """Execute ``notebook`` with its parameters from ``params``; return the executed copy's path."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    notebook = Path(notebook)
    if not notebook.is_file():
        raise NotebookError(f"{notebook}: notebook not found")
    values = parameters(notebook, params)
    out = Path(out_dir) / notebook.name
    files.remove_stale_temps(out)
    os.environ[PIPELINE_ENV] = "1"  # the kernel inherits it: project_root() is the checkout itself
    try:
        with files.atomic_path(out) as tmp:
            papermill.execute_notebook(str(notebook), str(tmp), parameters=values, kernel_name="python3",
                                       cwd=str(Path.cwd()), progress_bar=os.environ.get("ENAS4D_QUIET") != "1",
                                       # the kernel's own log (e.g. its warning that the loopback socket is not
                                       # encrypted) is noise in stage logs; cell errors still come through
                                       extra_arguments=["--IPKernelApp.log_level=ERROR"])
    except PapermillExecutionError as err:
        raise NotebookError(f"{str(err).strip()}\n{notebook}: {_cell_name(notebook, err.source)} failed: "
                            f"{err.ename}: {err.evalue}") from None
    return out


def _cell_name(notebook: Path, source: str) -> str:
    """'cell N ("first line")', N counted in the source notebook (papermill's count includes its injected cell)."""
    import nbformat

    cells = nbformat.read(notebook, as_version=4).cells
    number = next((i for i, c in enumerate(cells, 1) if c.source == source), None)
    first = source.strip().splitlines()[0] if source.strip() else ""
    first = first if len(first) <= 60 else first[:57] + "..."
    return f'cell {number} ("{first}")' if number else f'cell "{first}"'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m enas4d.notebook",
                                     description="Execute a pipeline notebook with its params (papermill).")
    parser.add_argument("notebook", help="notebooks/NN_name.ipynb")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--out-dir", default=str(OUT_DIR), help=f"where the executed copy goes (default: {OUT_DIR})")
    args = parser.parse_args(argv)
    try:
        out = run(args.notebook, args.params, args.out_dir)
    except (config.ConfigError, NotebookError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{args.notebook} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
