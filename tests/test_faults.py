"""Faults at the module level, through the command lines a user runs: kill -9 during training and during a
2-worker database build, then the same command again, give results identical to an uninterrupted run; a
truncated checkpoint fails with one line naming the file. (Bad database shards, typo'd params keys and a NaN
loss in one process are covered by test_database, test_config and test_train; a NaN on one of several ranks
by test_distributed.)

The killed training run is a process forked from the test (a new interpreter would spend seconds importing
torch); the database workers are real ``python -m enas4d.cli database`` processes started by the launcher.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import write_idx
from enas4d import cli, config, data, database, pipeline, train

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = {"epochs_full": 1, "epochs_kernel": 1, "epochs_depth": 0, "epochs_expand": 1, "batch_size": 32}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random Fashion-MNIST-format images, prepared into 96 train / 64 metric / 32 test (faults need no real data)."""
    raw = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 160), ("t10k", 32)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8) % 10)
    data.prepare("fashion-mnist", str(raw), False, 64, 96, 32, raw / "prepared", None, seed=0)
    return raw / "prepared"


def project(root: Path, prepared: Path, **sections: dict) -> Path:
    """A project directory whose params.yaml is the smoke profile on ``prepared`` with ``sections`` changed."""
    raw = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())
    raw["threads"] = 1
    raw["data"].update(out=str(prepared), metric_size=64, train_limit=96, test_limit=32)
    raw["supernet"]["resolutions"] = [16, 20]
    raw["pretrain"]["bn_calib_images"] = 32
    raw["database"].update(images=64, batch_size=64)
    for name, values in sections.items():
        raw[name].update(values)
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    config.load(root / "params.yaml")  # fail here, not in another process, if the params are off
    return root


def wait_for(found: Callable[[], object], alive: Callable[[], bool], what: str, timeout: float = 120) -> object:
    """Poll until ``found()`` is truthy; fail if ``alive()`` turns false first."""
    deadline = time.monotonic() + timeout
    while not (hit := found()):
        if not alive():
            pytest.fail(f"ended before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.005)
    return hit


def run_cli(root: Path, argv: list[str]) -> None:
    os.chdir(root)
    os._exit(cli.main(["train", *argv]))


def test_pretrain_killed_after_its_first_checkpoint_resumes_to_the_same_weights(
        prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    killed = project(tmp_path / "killed", prepared, pretrain=PRETRAIN)
    last = killed / "checkpoints" / ".resume" / "supernet" / "last.pt"
    proc = multiprocessing.get_context("fork").Process(target=run_cli, args=(killed, ["pretrain", "--params",
                                                                                      "params.yaml"]))
    proc.start()
    wait_for(last.exists, proc.is_alive, "the first epoch's checkpoint")
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL and not (killed / pipeline.SUPERNET).exists()
    assert train.load_checkpoint(last)["step"] < 3 * 3  # killed before the last of its 3 epochs of 3 steps

    monkeypatch.chdir(killed)
    assert cli.main(["train", "pretrain", "--params", "params.yaml"]) == 0  # the same command again resumes
    whole = project(tmp_path / "whole", prepared, pretrain=PRETRAIN)
    monkeypatch.chdir(whole)
    assert cli.main(["train", "pretrain", "--params", "params.yaml"]) == 0

    a, b = (train.load_checkpoint(d / pipeline.SUPERNET) for d in (killed, whole))
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [r["phase"] for r in a["history"]] == ["full", "kernel", "expand"]
    for ra, rb in zip(a["history"], b["history"], strict=True):
        assert {k: v for k, v in ra.items() if "seconds" not in k} == {k: v for k, v in rb.items() if "seconds" not in k}


def test_corrupt_resume_state_is_redone_and_a_corrupt_input_fails_in_one_line(
        prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    root = project(tmp_path / "p", prepared, pretrain={**PRETRAIN, "epochs_kernel": 0, "epochs_expand": 0})
    monkeypatch.chdir(root)
    assert cli.main(["train", "pretrain", "--params", "params.yaml"]) == 0
    capsys.readouterr()
    # a corrupt resume checkpoint is set aside with a warning and the epochs are trained again
    resume = pipeline.resume_dir("supernet") / "last.pt"
    trained = train.load_supernet(pipeline.SUPERNET)
    resume.write_bytes(resume.read_bytes()[:resume.stat().st_size // 2])
    with pytest.warns(UserWarning, match=f"{resume}: corrupt .*set aside as {resume}.corrupt, training starts over"):
        assert cli.main(["train", "pretrain", "--params", "params.yaml"]) == 0
    assert resume.with_name("last.pt.corrupt").is_file() and resume.is_file()
    again = train.load_supernet(pipeline.SUPERNET)
    assert train.weights_digest(again) == train.weights_digest(trained), "redone to the same weights"
    # a corrupt stage output (an input of the next stage) fails in one line naming it
    path = pipeline.SUPERNET
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    capsys.readouterr()
    assert cli.main(["train", "finetune", "--params", "params.yaml"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: corrupt or not a torch checkpoint (") and err.count("\n") == 1, err


def worker_pid(worker: int) -> int | None:
    """The pid of this process's child ``python -m enas4d.cli database ... --worker <worker>``, if running."""
    for task in Path("/proc/self/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                args = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue
            if b"--worker" in args and args[args.index(b"--worker") + 1] == str(worker).encode():
                return int(child)
    return None


def test_database_worker_killed_then_rebuilt_equals_one_process(
        prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    roots = [project(tmp_path / name, prepared, database={"archs": 8, "shard_size": 1})
             for name in ("workers", "single")]
    for root in roots:  # a random-init multi-stage network stands in for the fine-tuned one
        monkeypatch.chdir(root)
        cfg = config.load("params.yaml")
        train.save_supernet(pipeline.MULTISTAGE, pipeline.new_supernet(cfg), space=pipeline.space(cfg))
    workers = roots[0]
    monkeypatch.chdir(workers)
    partial = workers / "databases" / "confidence.partial"
    codes: list[int] = []
    argv = ["build", "--params", "params.yaml", "--workers", "2"]
    launcher = threading.Thread(target=lambda: codes.append(cli.main(["database", *argv])))
    launcher.start()
    wait_for(lambda: list(partial.glob("*/shard-00001.npz")), launcher.is_alive, "worker 1's first shard")
    os.kill(wait_for(lambda: worker_pid(1), launcher.is_alive, "worker 1's process"), signal.SIGKILL)
    launcher.join(timeout=120)
    assert codes == [1]
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "worker 1 failed (killed by SIGKILL); finished shards are kept: rerun the same command" in err
    [work] = [d for d in partial.iterdir() if d.is_dir()]
    written = {p.name for p in work.glob("shard-*.npz")}
    assert {f"shard-{i:05d}.npz" for i in range(0, 8, 2)} <= written  # worker 0 finished
    assert "shard-00007.npz" not in written and not (workers / pipeline.DATABASE).exists()  # worker 1 did not

    # the same command again (only worker 1 is left: it runs in-process), leaving the shards for `finish`
    assert cli.main(["database", *argv, "--no-finish"]) == 0 and len(list(work.glob("shard-*.npz"))) == 8
    assert cli.main(["database", "finish", "--params", "params.yaml"]) == 0 and not partial.exists()
    assert cli.main(["database", *argv]) == 0 and not partial.exists()  # already built: nothing to do
    monkeypatch.chdir(roots[1])
    assert cli.main(["database", "build", "--params", "params.yaml"]) == 0
    got, want = (database.load(root / pipeline.DATABASE) for root in roots)
    assert got.archs == want.archs and len(set(got.archs)) == 8  # all archs, each once, in order
    cfg = config.load(roots[1] / "params.yaml")
    assert cfg.database.calib_images != cfg.pretrain.bn_calib_images  # so the next line tells which one was used
    assert got.manifest["calib_images"] == cfg.database.calib_images
    np.testing.assert_array_equal(got.conf, want.conf)
    np.testing.assert_array_equal(got.correct, want.correct)
    np.testing.assert_array_equal(got.macs, want.macs)
