"""Deployment (paper: "Deploy on real-world devices"): a searched net as a folder of ONNX graphs + a manifest.

A multi-stage net becomes one graph per stage *increment*: stage 1 maps the image to its logits and the tensors
later stages reuse; stage ``s`` maps those tensors to its logits and the updated ones. Reused tensors are named
``features`` (stem and first block, computed once), ``z:<slot>`` (a block's pre-BN output-reuse sum) and
``pooled:<slot>`` (the spatial means of a block's hidden channels so far, the SE's input-reuse input). A graph
outputs only what a later stage reads (named ``next:<name>``: ONNX names a value once), and reads only what
it needs. ``manifest.json`` holds the arch, the
thresholds, cumulative MACs per stage, resolution, normalisation, class names, every graph's inputs and outputs
with shapes, and the SHA-256 of every file. A static subnet is the same layout with one graph and no thresholds.
`enas4d.runtime.EarlyExitSession` runs a folder with onnxruntime and numpy only.

Exporter: the TorchScript-based ``torch.onnx.export(dynamo=False)`` (docs/DESIGN.md, "Deployment").

This package is the library (it imports no pipeline glue, so ``enas4d.latency`` can time ONNX ops with it);
``python -m enas4d.deploy`` (``__main__.py``) exports the pipeline's searched nets.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

from enas4d.files import atomic_dir, write_json
from enas4d.multistage import BlockState, ExportedMultiStageNet, StageCache
from enas4d.runtime import FORMAT, IMAGE, LOGITS, MANIFEST, NEXT, EarlyExitSession, sha256
from enas4d.space import MultiStageArch, SubnetArch

OPSET = 17
FEATURES = "features"

__all__ = ["EarlyExitSession", "export_multistage", "export_static", "to_onnx"]


# ---------------------------------------------------------------------------------------------- stage graphs


def _produced(net: ExportedMultiStageNet, s: int) -> list[str]:
    """Tensor names stage ``s`` computes anew (stem features in stage 1; per block with new channels, its sum and
    SE input)."""
    names = [FEATURES] if s == 0 else []
    for step in net.plan.stages[s]:
        if step.new:
            names.append(f"z:{step.slot}")
            if net.block(step.slot).has_se:
                names.append(f"pooled:{step.slot}")
    return names


def _needed(net: ExportedMultiStageNet, s: int) -> list[str]:
    """Tensor names stage ``s`` reads (besides the image of stage 1): what earlier stages left in its blocks.

    A step with ``start == 0`` at a block earlier stages ran is a restart (``Plan.of``): it recomputes the block
    from its own input and reads nothing they left there."""
    if s == 0:
        return [IMAGE]
    seen = {step.slot for t in range(s) for step in net.plan.stages[t]}
    names = [FEATURES]
    for step in net.plan.stages[s]:
        if step.slot in seen and step.start:
            names.append(f"z:{step.slot}")
            if step.new and net.block(step.slot).has_se:
                names.append(f"pooled:{step.slot}")
    return names


class _StageGraph(nn.Module):
    """Stage ``stage`` of an exported net as a function of tensors (what ONNX export traces).

    The cache is rebuilt from the inputs, ``ExportedMultiStageNet.run_stage`` (the same code as ``early_exit``,
    with the stage's own prediction layer) runs the stage, and the updated block states are returned; SE inputs travel concatenated (the input-reuse conv
    concatenates them anyway).
    """

    def __init__(self, net: ExportedMultiStageNet, stage: int, inputs: list[str], outputs: list[str]) -> None:
        super().__init__()
        self.net, self.stage, self.inputs, self.outputs = net, stage, inputs, outputs

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        given = dict(zip(self.inputs, tensors))
        feats = self.net.stem(given[IMAGE]) if self.stage == 0 else given[FEATURES]
        blocks = {}
        for name, t in given.items():
            kind, _, slot = name.partition(":")
            if kind == "z":
                blocks.setdefault(int(slot), BlockState()).z = t
            elif kind == "pooled":
                blocks.setdefault(int(slot), BlockState()).pooled = [t]
        cache = StageCache(self.net, feats, blocks, next_stage=self.stage)
        logits = self.net.run_stage(cache)
        out = {FEATURES: feats}
        for slot, st in cache.blocks.items():
            out[f"z:{slot}"] = st.z
            if st.pooled:
                out[f"pooled:{slot}"] = st.pooled[0] if len(st.pooled) == 1 else torch.cat(st.pooled, 1)
        return (logits, *(out[k.removeprefix(NEXT)] for k in self.outputs[1:]))


def _shapes(names: list[str], tensors: Sequence[Tensor]) -> dict[str, list]:
    """Declared shapes for the manifest: batch symbolic (null), the rest fixed."""
    return {n: [None, *t.shape[1:]] for n, t in zip(names, tensors)}


def to_onnx(module: nn.Module, args: tuple[Tensor, ...], inputs: list[str], outputs: list[str], path: Path) -> None:
    """Trace ``module`` to ONNX at ``path`` with a dynamic batch axis on every input and output."""
    with warnings.catch_warnings():
        # The TorchScript exporter announces its deprecation on every call (choice: docs/DESIGN.md, "Deployment").
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        # multistage's shape checks hold for the fixed arch being traced; the tracer warns that it freezes them.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, opset_version=OPSET,
                          dynamo=False, do_constant_folding=True,
                          dynamic_axes={n: {0: "batch"} for n in [*inputs, *outputs]})


# ---------------------------------------------------------------------------------------------- folders


def _in_channels(net: nn.Module) -> int:
    return next(m for m in net.modules() if isinstance(m, nn.Conv2d)).in_channels


def _write_folder(out: str | Path, write: Callable[[Path], dict]) -> Path:
    """Build the folder in a temp folder beside ``out`` (``write(tmp) -> manifest``), then swap it into place."""
    with atomic_dir(out) as tmp:
        manifest = write(tmp)
        manifest["files"] = {f: sha256(tmp / f) for f in sorted(manifest["files"])}
        write_json(tmp / MANIFEST, manifest, indent=1)
    return Path(out)


def _meta(kind: str, arch: MultiStageArch | SubnetArch, in_channels: int, classes: Sequence[str],
          mean: Sequence[float], std: Sequence[float], thresholds: Sequence[float], stage_macs: Sequence[int]) -> dict:
    return {"format": FORMAT, "kind": kind, "arch": arch.to_dict(), "resolution": arch.resolution,
            "in_channels": in_channels, "classes": list(classes),
            "normalization": {"mean": list(mean), "std": list(std),
                              "recipe": "x = (uint8 / 255 - mean) / std per channel, then a bilinear resize to "
                                        "resolution (antialiased when shrinking), NCHW float32"},
            "thresholds": [float(t) for t in thresholds], "stage_macs": [int(m) for m in stage_macs],
            "exit_rule": "after stage s < S a sample leaves when its max softmax > thresholds[s]",
            "exporter": f"torch.onnx TorchScript, opset {OPSET}, torch {torch.__version__}"}


@torch.no_grad()
def export_multistage(net: ExportedMultiStageNet, thresholds: Sequence[float], out: str | Path, *,
                      classes: Sequence[str], mean: Sequence[float], std: Sequence[float]) -> Path:
    """Write ``net`` (exported, BN recalibrated, any device) as a deployed folder at ``out`` (replaced if present).

    ``thresholds`` are ``T_1..T_{S-1}``; ``classes``, ``mean`` and ``std`` describe the inputs (``data.Split``).
    """
    S = net.plan.num_stages
    if len(thresholds) != S - 1:
        raise ValueError(f"export_multistage: {S} stages need {S - 1} thresholds, got {len(thresholds)}")
    net = copy.deepcopy(net).cpu().to(memory_format=torch.contiguous_format).eval()  # the caller's net stays as is
    in_channels = _in_channels(net)
    g = torch.Generator().manual_seed(0)  # example inputs only fix shapes; the global RNG stays untouched

    def write(tmp: Path) -> dict:
        # Example inputs of every stage: run all stages eagerly, each returning everything it computes anew.
        state = {IMAGE: torch.randn(2, in_channels, net.resolution, net.resolution, generator=g)}
        examples = []
        for s in range(S):
            inputs, made = _needed(net, s), [NEXT + n for n in _produced(net, s)]
            examples.append(tuple(state[n] for n in inputs))
            res = _StageGraph(net, s, inputs, [LOGITS, *made])(*examples[s])
            state.update((k.removeprefix(NEXT), v) for k, v in zip(made, res[1:]))
        # Export from the last stage back: a stage outputs only what a later stage's graph really reads (the
        # exporter drops inputs a graph does not use, e.g. all blocks before a pass-through block).
        stages, pending = [None] * S, set()
        for s in reversed(range(S)):
            inputs = _needed(net, s)
            outputs = [LOGITS, *(NEXT + n for n in _produced(net, s) if n in pending)]
            graph = _StageGraph(net, s, inputs, outputs).eval()
            res = graph(*examples[s])
            name = f"stage{s + 1}.onnx"
            to_onnx(graph, examples[s], inputs, outputs, tmp / name)
            used = [i.name for i in onnx.load(tmp / name, load_external_data=False).graph.input]
            pending = (pending - set(_produced(net, s))) | set(used)
            stages[s] = {"file": name, "inputs": {n: shape for n, shape in _shapes(inputs, examples[s]).items()
                                                  if n in used},
                         "outputs": _shapes(outputs, res)}
        return {**_meta("multistage", net.arch, in_channels, classes, mean, std, thresholds, net.stage_macs),
                "stages": stages, "files": [st["file"] for st in stages]}

    return _write_folder(out, write)


@torch.no_grad()
def export_static(net: nn.Module, arch: SubnetArch, out: str | Path, *, macs: int, classes: Sequence[str],
                  mean: Sequence[float], std: Sequence[float]) -> Path:
    """Write static subnet ``net`` (``supernet.extract(arch)``, BN recalibrated) as a one-graph deployed folder."""
    net = copy.deepcopy(net).cpu().to(memory_format=torch.contiguous_format).eval()
    in_channels = _in_channels(net)

    def write(tmp: Path) -> dict:
        x = torch.randn(2, in_channels, arch.resolution, arch.resolution, generator=torch.Generator().manual_seed(0))
        to_onnx(net, (x,), [IMAGE], [LOGITS], tmp / "static.onnx")
        io = {"file": "static.onnx", "inputs": _shapes([IMAGE], [x]), "outputs": _shapes([LOGITS], [net(x)])}
        return {**_meta("static", arch, in_channels, classes, mean, std, [], [macs]), "stages": [io],
                "files": ["static.onnx"]}

    return _write_folder(out, write)
