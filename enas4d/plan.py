"""The plan of a multi-stage arch: which hidden-channel slice and kernel each stage computes in each block.

Below both the network that runs it (``enas4d.multistage``) and the MACs that price it (``enas4d.cost``),
so the per-stage slice rule is written once and neither module imports the other's caller.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from enas4d.space import MultiStageArch


@dataclass(frozen=True)
class BlockStep:
    """Stage work in one block: hidden channels ``[start, stop)`` (none when equal) with ``kernel``."""

    slot: int
    start: int
    stop: int
    kernel: int

    @property
    def channels(self) -> slice:
        return slice(self.start, self.stop)

    @property
    def new(self) -> bool:
        return self.stop > self.start


@dataclass(frozen=True)
class Plan:
    """Per stage, the blocks it runs in network order, with the slice and kernel each one computes."""

    stages: tuple[tuple[BlockStep, ...], ...]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @classmethod
    def of(cls, arch: MultiStageArch, mid: Callable[[int, int], int], restarts: Collection[int] = ()) -> Plan:
        """Stage ``s`` computes ``[mid(e_{s-1}), mid(e_s))`` of every block it runs, except at a restart.

        ``mid(slot, expand)`` is the hidden width of a block; a stage that skipped a block holds expand 0
        in the canonical arch (``mid = 0``), so the first stage to run a block computes ``[0, mid(e_s))``
        itself: the paper's depth catch-up falls out of the rule with no special case.

        ``restarts`` are slots (`restart_slots`: the blocks without a residual, each unit's first) where a
        stage whose input differs from the previous stage's (it added channels or blocks earlier) recomputes
        the whole block, ``[0, mid(e_s))`` from its own input, instead of adding its slice to the previous
        stage's sum. Without it such a block hands later stages the earlier stage's features plus a few weak
        new channels, and their extra work upstream is lost (docs/DESIGN.md, "Restart at unit entries").
        """
        width = lambda slot, e: mid(slot, e) if e else 0  # noqa: E731
        stages = []
        for s in range(arch.num_stages):
            prev = arch.expands[s - 1] if s else (0,) * len(arch.expands[s])
            steps, diverged = [], False
            for i, e in enumerate(arch.expands[s]):
                if not e:
                    continue
                start = 0 if diverged and i in restarts else width(i, prev[i])
                steps.append(BlockStep(i, start, width(i, e), arch.kernels[s][i]))
                diverged = diverged or width(i, e) > width(i, prev[i])
            stages.append(tuple(steps))
        return cls(tuple(stages))

    def by_slot(self) -> dict[int, list[tuple[int, BlockStep]]]:
        """``slot -> [(stage, step), ...]`` in network order, for the block-major forward."""
        out: dict[int, list[tuple[int, BlockStep]]] = {}
        for s, steps in enumerate(self.stages):
            for step in steps:
                out.setdefault(step.slot, []).append((s, step))
        return dict(sorted(out.items()))


class _Block(Protocol):
    has_residual: bool


def restart_slots(blocks: Sequence[_Block]) -> frozenset[int]:
    """Slots where a diverged later stage recomputes the whole block (`Plan.of`): the blocks without residual."""
    return frozenset(i for i, b in enumerate(blocks) if not b.has_residual)
