"""Progress bars for long loops, in a terminal and in notebooks alike.

``tqdm.auto`` draws a widget bar inside Jupyter and papermill kernels (kept in the executed notebook)
and a text bar in a terminal. ``ENAS4D_QUIET=1`` turns every bar off, so test logs stay readable.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def quiet() -> bool:
    """True when bars are switched off (``ENAS4D_QUIET=1``)."""
    return os.environ.get("ENAS4D_QUIET") == "1"


def bar(iterable: Iterable | None = None, total: int | None = None, desc: str | None = None, **kw: Any) -> tqdm:
    """A tqdm bar (``tqdm.auto``); extra keywords go to tqdm, e.g. ``unit="img"`` or ``leave=False``."""
    kw["disable"] = quiet() or kw.get("disable", False)
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, total=total, desc=desc, **kw)
