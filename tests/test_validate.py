"""The validate stage: one line naming the key for values the pipeline cannot run, and settings files that
change exactly when the device, threads or the data's content change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT

from enas4d import validate


def params_with(tmp_path: Path, fmnist: Path | None, **changes: object) -> Path:
    raw = yaml.safe_load((ROOT / "profiles/smoke.yaml").read_text())
    raw["data"]["root"] = None if fmnist is None else str(fmnist)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for p in parents:
            node = node[p]
        node[leaf] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def error_line(params: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert validate.main(["--params", str(params), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert not out.exists(), "a failed check writes no settings"
    return err.strip()


def test_writes_resolved_settings(tmp_path: Path, fake_fmnist) -> None:
    out = tmp_path / "settings"
    got = validate.run(params_with(tmp_path, fake_fmnist(), device="auto", threads=3), out)
    want_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert json.loads((out / "compute.json").read_text()) == {"device": want_device, "threads": 3} == got["compute"]
    assert json.loads((out / "data.json").read_text())["name"] == "fashion-mnist"
    env = json.loads((out / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_data_digest_follows_content_not_location(tmp_path: Path, fake_fmnist, monkeypatch) -> None:
    out = tmp_path / "settings"
    first = fake_fmnist("a", seed=0)
    digest = validate.run(params_with(tmp_path, first), out)["data"]["sha256"]
    copy = shutil.copytree(first, tmp_path / "copy")
    mtime = (out / "data.json").stat().st_mtime_ns
    assert validate.run(params_with(tmp_path, copy), out)["data"]["sha256"] == digest
    assert (out / "data.json").stat().st_mtime_ns == mtime, "same content: the file is not rewritten"
    plain = fake_fmnist("plain", seed=0, gz=False)
    assert validate.run(params_with(tmp_path, plain), out)["data"]["sha256"] == digest, "gzip or not, same data"
    monkeypatch.setenv("ENAS4D_DATA", str(fake_fmnist("other", seed=1)))
    other = validate.run(params_with(tmp_path, None), out)["data"]["sha256"]
    assert other != digest and json.loads((out / "data.json").read_text())["sha256"] == other


def test_unsupported_values_fail_in_one_line_naming_the_key(tmp_path: Path, fake_fmnist, capsys) -> None:
    fm, out = fake_fmnist(), tmp_path / "settings"
    p = params_with(tmp_path, fm, **{"search.cost": "latency"})
    assert error_line(p, out, capsys).startswith(f"error: {p}: search.cost: got 'latency'; allowed here: macs")
    p = params_with(tmp_path, fm, **{"search.omega": "high"})
    assert error_line(p, out, capsys) == f"error: {p}: search.omega: got 'high'; allowed: a number >= 0"
    p = params_with(tmp_path, fm, **{"supernet.checkpoint": str(tmp_path / "nope.pth")})
    assert error_line(p, out, capsys) == f"error: {p}: supernet.checkpoint: {tmp_path / 'nope.pth'}: file not found"
    if not torch.cuda.is_available():
        p = params_with(tmp_path, fm, device="cuda")
        assert error_line(p, out, capsys).startswith(f"error: {p}: device: got 'cuda', but torch sees no CUDA device")


def test_missing_or_corrupt_dataset_fails_in_one_line(tmp_path: Path, fake_fmnist, monkeypatch, capsys) -> None:
    out = tmp_path / "settings"
    monkeypatch.setenv("ENAS4D_DATA", str(tmp_path / "nowhere"))
    line = error_line(params_with(tmp_path, None), out, capsys)
    assert line == f"error: {tmp_path / 'nowhere'}: directory not found ($ENAS4D_DATA)"
    fm = fake_fmnist()
    images = fm / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:100])
    assert error_line(params_with(tmp_path, fm), out, capsys).startswith(f"error: {images}: truncated or corrupt")


def test_every_stage_runs_after_validate() -> None:
    """Every stage has validate as an ancestor, so DVC runs the check before it deletes any output."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    producer = {(next(iter(o)) if isinstance(o, dict) else o): name
                for name, st in stages.items() for o in st.get("outs", []) + st.get("metrics", [])
                + st.get("plots", [])}

    def ancestors(name: str) -> set[str]:
        found: set[str] = set()
        for dep in stages[name].get("deps", []):
            up = next((s for out, s in producer.items() if dep == out or dep.startswith(out.rstrip("/") + "/")), None)
            if up and up not in found:
                found |= {up} | ancestors(up)
        return found

    assert list(stages)[0] == "validate" and stages["validate"].get("always_changed") is True
    for name in list(stages)[1:]:
        assert "validate" in ancestors(name), name
