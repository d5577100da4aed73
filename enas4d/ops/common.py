"""Channel rounding and activations shared by the elastic ops and the static networks."""

from __future__ import annotations

from torch import nn


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``min_value``, default ``divisor``).

    OFA's (and TF-slim's) rule: rounding down may not lose more than 10%, else go one multiple up.
    Hidden and SE widths must follow it exactly, or OFA checkpoints and MACs tables stop matching.
    """
    floor = divisor if min_value is None else min_value
    rounded = max(floor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "hswish": nn.Hardswish}


def activation(name: str) -> nn.Module:
    """A fresh activation module by name (``relu`` or ``hswish``: x * relu6(x + 3) / 6, as OFA)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()
