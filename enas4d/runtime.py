"""Run an exported early-exit net (``enas4d.deploy``) with ONNX Runtime and numpy only — no torch, no enas4d.

A deployed folder holds ``manifest.json`` and one ONNX graph per stage increment (see ``enas4d.deploy``).
`EarlyExitSession` loads it and runs early exit exactly as ``MultiStageNet.early_exit`` does: stage by stage,
a sample leaves after stage ``s < S`` when its max softmax is larger than ``T_s``; the samples that stay carry
their reused tensors (stem features, per block the pre-BN projection sum and the SE inputs) to the next stage.

This module imports only the standard library, numpy and onnxruntime, so a deployed net runs in a process that
has neither torch nor this repository's other modules (copy this one file next to the folder, or
``pip install`` the package without using the rest).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

FORMAT = "enas4d.deploy/1"
MANIFEST = "manifest.json"
IMAGE = "image"  # the stage-1 input
LOGITS = "logits"  # every stage's first output
NEXT = "next:"  # prefix of a graph output that replaces the reused tensor of the same name for later stages
_KEYS = ("format", "kind", "resolution", "in_channels", "classes", "normalization", "thresholds", "stage_macs",
         "stages", "files")


class DeployError(ValueError):
    """A deployed folder that is missing, corrupt or inconsistent (the message names the file)."""


@dataclass(frozen=True)
class Exits:
    """Early exit of a batch: prediction, 0-based exit stage, MACs spent and the exit stage's logits, per sample."""

    pred: np.ndarray  # [N] int64
    exit_stage: np.ndarray  # [N] int64
    macs: np.ndarray  # [N] int64
    logits: np.ndarray  # [N, classes] float32


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file (the manifest lists one per graph)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def softmax_max(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max softmax probability and argmax per row, in float32 like ``torch.softmax(z.float(), 1).max(1)``."""
    z = logits.astype(np.float32, copy=False)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    return p.max(axis=1), p.argmax(axis=1)


def session_options(threads: int) -> ort.SessionOptions:
    """ONNX Runtime settings of a deployed graph (also those the latency table times its op graphs with).

    Denormal floats are flushed to zero: a trained net's activations hold some, and on this CPU they made a
    batch-1 inference up to 9% slower than the same graph with random weights (whose latency the table measures);
    they are below 1.2e-38, far under the 1e-4 the exported logits are held to."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # errors only: EarlyExitSession's checks report in one line
    opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    return opts


def read_manifest(folder: str | Path) -> dict:
    """The folder's manifest, checked for its keys and for thresholds/MACs/graphs that agree in length."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DeployError(f"{path}: missing (not a deployed folder; export one with `python -m enas4d.deploy`)")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DeployError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(m, dict):
        raise DeployError(f"{path}: expected a JSON object")
    missing = [k for k in _KEYS if k not in m]
    if missing:
        raise DeployError(f"{path}: missing key {missing[0]!r}")
    if m["format"] != FORMAT:
        raise DeployError(f"{path}: format {m['format']!r}, this runtime reads {FORMAT!r}")
    S = len(m["stages"])
    if S < 1:
        raise DeployError(f"{path}: stages: empty")
    if len(m["thresholds"]) != S - 1:
        raise DeployError(f"{path}: thresholds: {len(m['thresholds'])} values, but {S} stages need {S - 1}")
    if not all(isinstance(t, (int, float)) and 0 <= t <= 1 for t in m["thresholds"]):
        raise DeployError(f"{path}: thresholds: {m['thresholds']} are not all in [0, 1]")
    if len(m["stage_macs"]) != S:
        raise DeployError(f"{path}: stage_macs: {len(m['stage_macs'])} values for {S} stages")
    produced = {IMAGE}
    for s, st in enumerate(m["stages"]):
        if not isinstance(st, dict) or not all(isinstance(st.get(k), dict) for k in ("inputs", "outputs")):
            raise DeployError(f"{path}: stages[{s}]: expected an object with file, inputs and outputs")
        for name in st["inputs"]:
            if name not in produced:
                raise DeployError(f"{path}: stages[{s}].inputs: {name!r} is made by no earlier stage")
        produced |= {name.removeprefix(NEXT) for name in st["outputs"]}
        if st.get("file") not in m["files"]:
            raise DeployError(f"{path}: stages[{s}].file: {st.get('file')!r} is not listed in files")
    return m


def _shape_matches(declared: list, actual: list) -> bool:
    """ONNX shapes agree when every fixed dimension agrees (symbolic ones, like the batch, match anything)."""
    return len(declared) == len(actual) and all(
        d is None or not isinstance(a, int) or d == a for d, a in zip(declared, actual))


class EarlyExitSession:
    """A deployed folder loaded into ONNX Runtime: early exit for a batch or one image.

    ``threads`` is ONNX Runtime's intra-op thread count (1 is Table 4's deployment case: batch 1, one core).
    Every graph is checked against the manifest's SHA-256 and declared input/output shapes when loading, so a
    corrupt or mismatched folder fails here with the file named, never later with wrong answers.
    """

    def __init__(self, folder: str | Path, threads: int = 1) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.folder = Path(folder)
        self.manifest = m = read_manifest(self.folder)
        self.resolution: int = int(m["resolution"])
        self.in_channels: int = int(m["in_channels"])
        self.classes: list[str] = list(m["classes"])
        self.thresholds: list[float] = [float(t) for t in m["thresholds"]]
        self.stage_macs = np.asarray(m["stage_macs"], dtype=np.int64)
        opts = session_options(threads)
        self._stages: list[tuple[ort.InferenceSession, list[str], list[str]]] = []
        for st in m["stages"]:
            path = self.folder / st["file"]
            if not path.is_file():
                raise DeployError(f"{path}: missing graph (listed in {self.folder / MANIFEST})")
            if sha256(path) != m["files"][st["file"]]:
                raise DeployError(f"{path}: SHA-256 differs from {MANIFEST}'s (corrupt, or from another export)")
            try:
                sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            except Exception as err:  # ONNX Runtime raises its own types for unreadable graphs
                raise DeployError(f"{path}: ONNX Runtime cannot load it ({str(err).splitlines()[0]})") from None
            self._check_io(path, sess, st)
            width = sess.get_outputs()[0].shape[-1]
            if sess.get_outputs()[0].name != LOGITS or width != len(self.classes):
                raise DeployError(f"{path}: first output {sess.get_outputs()[0].name!r} of width {width}, expected "
                                  f"{LOGITS!r} over the manifest's {len(self.classes)} classes")
            self._stages.append((sess, list(st["inputs"]), list(st["outputs"])))
        # After stage s, only what a later stage reads is kept (and pruned to the samples that stay).
        self._later = [set().union(*(self._stages[t][1] for t in range(s + 1, self.num_stages)))
                       for s in range(self.num_stages)]

    @staticmethod
    def _check_io(path: Path, sess: ort.InferenceSession, st: dict) -> None:
        for kind, got, want in (("input", sess.get_inputs(), st["inputs"]), ("output", sess.get_outputs(),
                                                                              st["outputs"])):
            names = [a.name for a in got]
            if names != list(want):
                raise DeployError(f"{path}: graph {kind}s {names}, manifest declares {list(want)}")
            for a in got:
                if not _shape_matches(want[a.name], a.shape):
                    raise DeployError(f"{path}: {kind} {a.name!r} has shape {a.shape}, manifest declares "
                                      f"{want[a.name]}")

    @property
    def num_stages(self) -> int:
        return len(self._stages)

    def _images(self, images: np.ndarray) -> tuple[np.ndarray, bool]:
        x = np.asarray(images)
        single = x.ndim == 3
        if single:
            x = x[None]
        want = (self.in_channels, self.resolution, self.resolution)
        if x.ndim != 4 or x.shape[1:] != want:
            raise ValueError(f"images of shape {np.shape(images)}, this net ({self.folder}) takes N x "
                             f"{' x '.join(map(str, want))} or one {' x '.join(map(str, want))} image, normalized "
                             "and resized as its manifest's normalization says")
        return np.ascontiguousarray(x, dtype=np.float32), single

    def _run(self, s: int, state: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Stage ``s``'s logits and the tensors later stages read (the old ones, updated by its outputs)."""
        sess, inputs, outputs = self._stages[s]
        out = sess.run(outputs, {k: state[k] for k in inputs})
        state = {**state, **{k.removeprefix(NEXT): v for k, v in zip(outputs[1:], out[1:])}}
        return out[0], {k: v for k, v in state.items() if k in self._later[s]}

    def run(self, images: np.ndarray, thresholds: list[float] | None = None) -> Exits:
        """Early exit of ``images`` (``N x C x r x r``, or one ``C x r x r`` image: then every field is 0-d).

        ``thresholds`` default to the manifest's; a sample leaves after stage ``s < S`` when its max softmax
        is larger than ``T_s`` (``T = 1`` never exits, ``T = 0`` always does).
        """
        x, single = self._images(images)
        S = self.num_stages
        t = self.thresholds if thresholds is None else list(thresholds)
        if len(t) != S - 1:
            raise ValueError(f"{S} stages need {S - 1} thresholds, got {len(t)}")
        n = len(x)
        pred = np.empty(n, dtype=np.int64)
        exit_stage = np.empty(n, dtype=np.int64)
        logits = np.empty((n, len(self.classes)), dtype=np.float32)
        alive = np.arange(n)
        state = {IMAGE: x}
        for s in range(S):
            z, state = self._run(s, state)
            conf, p = softmax_max(z)
            leave = conf > t[s] if s < S - 1 else np.ones(len(z), dtype=bool)
            gone = alive[leave]
            pred[gone], exit_stage[gone], logits[gone] = p[leave], s, z[leave]
            alive = alive[~leave]
            if alive.size == 0:
                break
            if leave.any():
                state = {k: v[~leave] for k, v in state.items()}
        out = Exits(pred, exit_stage, self.stage_macs[exit_stage], logits)
        return Exits(out.pred[0], out.exit_stage[0], out.macs[0], out.logits[0]) if single else out

    def stage_logits(self, images: np.ndarray) -> list[np.ndarray]:
        """Logits of every stage for every image, no early exit (stages 1..S run incrementally)."""
        x, _ = self._images(images)
        state, out = {IMAGE: x}, []
        for s in range(self.num_stages):
            z, state = self._run(s, state)
            out.append(z)
        return out
