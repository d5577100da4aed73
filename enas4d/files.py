"""Atomic file writes: every file the pipeline writes goes through a temp file beside it, then a rename.

A killed run (or a reader racing a writer: database workers share a manifest) never sees half a file, and
DVC never takes a truncated output for a result. Temp names come from ``tempfile.mkstemp`` in the target's
directory (unique across processes and hosts sharing a file system), carry the writer's process id (so a
killed run's leftovers can be told from a live writer's: ``remove_stale_temps``) and keep the target's suffix,
so writers that pick a format from the name (``np.savez``, ``savefig``, papermill) write the right one.
git and DVC ignore the names (``.*.tmp``, ``.*.tmp.*`` in .gitignore and .dvcignore).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path`` to write to; rename it over ``path`` if the block ends without error.

    The temp file is removed whatever happens; the file is world-readable (mkstemp makes it private).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        tmp.chmod(0o644)
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder beside ``path`` to fill; if the block ends without error, it replaces ``path``
    (a folder that is there is renamed aside first and deleted after, so ``path`` is missing for two renames).

    The temp folder is removed whatever happens; its name is ignored like a temp file's.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"))
    old = tmp.with_name(tmp.name.replace(".tmp", ".old.tmp"))
    try:
        tmp.chmod(0o755)
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], object], mode: str = "wb") -> Path:
    """Write ``path`` through ``write(file)`` (file opened in ``mode``), flushed to disk before the rename."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` written atomically."""
    return atomic_write(path, lambda f: f.write(text), "w")


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """``obj`` as indented JSON (one trailing newline), written atomically."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temp files of ``path`` whose writer process is gone (a SIGKILLed run cannot clean up after
    itself; git and DVC ignore the names, and this keeps the folder tidy); return what was removed.

    Only for files one machine writes: a process id says nothing about a writer on another host."""
    path = Path(path)
    prefix = f".{path.name}."
    removed = []
    for tmp in path.parent.glob(f"{glob.escape(prefix)}*.tmp{glob.escape(path.suffix)}"):
        pid = tmp.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
