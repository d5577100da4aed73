"""The whole pipeline in the smoke profile, in a temp copy: `dvc repro` works, every stage leaves its artefacts and
a metrics JSON with its wall seconds, a second repro reruns nothing, and a new omega leaves the database alone."""

from __future__ import annotations

import json
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

STAGES = {"data": "00_data", "supernet": "01_supernet_pretrain", "finetune": "02_multistage_finetune",
          "database": "03_database", "predictor": "04_predictor", "search": "05_evolution"}


def sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def snapshot(repo: Path) -> dict[str, str]:
    """SHA-256 of every file of the pipeline (all but DVC's own state and params.yaml)."""
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(repo.rglob("*"))
            if p.is_file() and p.relative_to(repo).parts[0] not in (".dvc", ".git") and p.name != "params.yaml"}


@pytest.mark.long
def test_smoke_repro_twice(tmp_path: Path) -> None:
    # The source tree as git sees it (tracked + new, not ignored), without the lock of the real run.
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    repo = tmp_path / "repo"
    for rel in filter(None, listed):
        if rel != "dvc.lock" and (ROOT / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, repo / rel)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"), "ENAS4D_QUIET": "1", "DVC_NO_ANALYTICS": "1"}
    sh(["git", "init", "-q"], repo, env)
    if not (repo / ".dvc" / "config").is_file():
        sh([sys.executable, "-m", "dvc", "init", "-q"], repo, env)
    shutil.copy(repo / "profiles/smoke.yaml", repo / "params.yaml")

    first = sh([sys.executable, "-m", "dvc", "repro"], repo, env)
    # per-epoch progress reaches the terminal of `dvc repro` (papermill keeps cell output to the notebook)
    assert re.search(r"pretrain full epoch 1/\d+: loss \d+\.\d+, val_top1_largest \d\.\d+, .* \d+ s\n", first), first
    assert re.search(r"finetune epoch 1/\d+: loss \d+\.\d+, val_top1_s1 ", first), first
    for stage, notebook in STAGES.items():
        assert f"Running stage '{stage}'" in first
        assert (repo / f"reports/notebooks/{notebook}.ipynb").is_file()
        if stage != "data":  # Table 2 reads the wall seconds of every paper step
            assert json.loads((repo / f"reports/metrics/{stage}.json").read_text())["seconds"] > 0, stage
    sizes = json.loads((repo / "reports/metrics/data.json").read_text())
    assert sizes == {"train": 640, "metric": 500, "test": 500, "num_classes": 10}
    assert (repo / "reports/figures/data_samples.png").is_file()
    for path in ("checkpoints/supernet.pt", "checkpoints/multistage.pt", "checkpoints/predictor_cond.pt",
                 "checkpoints/predictors/multistage-0.5.pt", "checkpoints/predictors/static-1.pt",
                 "reports/figures/supernet_acc_vs_macs.png", "reports/figures/predictor_scatter.png",
                 "reports/plots/pretrain.csv", "reports/plots/finetune.csv",
                 "reports/plots/evolution/multistage-0.5.csv", "reports/plots/evolution/static-1.csv"):
        assert (repo / path).is_file(), path
    validated = sh([sys.executable, "-m", "enas4d.cli", "database", "validate", "databases/confidence"], repo, env)
    assert json.loads(validated)["archs"] == 6
    searched = json.loads((repo / "searched/archs.json").read_text())
    assert [m["target"] for m in searched["multistage"]] == [s["target"] for s in searched["static"]] == [0.5, 1.0]
    for found in searched["multistage"]:
        assert len(found["thresholds"]) == 2 and len(found["metric_set"]["exit_fractions"]) == 3
    # the searched nets deployed as ONNX folders that agree with PyTorch (docs/DESIGN.md, "Deployment")
    assert "Running stage 'deploy'" in first
    for kind in ("multistage", "static"):
        for t in ("0.5", "1"):
            assert (repo / f"deployed/{kind}-{t}/manifest.json").is_file(), (kind, t)
    deployed = json.loads((repo / "reports/metrics/deploy.json").read_text())
    assert deployed["max_abs_logit_diff"] < 1e-3 and deployed["min_same_exit_and_pred"] > 0.95, deployed
    # resume state survives outside the DVC outputs and git never sees it
    assert (repo / "checkpoints/.resume/supernet/last.pt").is_file()
    assert not sh(["git", "status", "--porcelain", "--ignored=no", "checkpoints/.resume"], repo, env).strip()

    second = sh([sys.executable, "-m", "dvc", "repro"], repo, env)
    assert re.findall(r"Running stage '(\w+)'", second) == ["validate"], second  # always checked, nothing else

    # a typo fails in the first stage, in one line naming the key, before DVC deletes any output
    before = snapshot(repo)
    params = repo / "params.yaml"
    good = params.read_text()
    params.write_text(good.replace("omega: 0.09", "omega: high"))
    done = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert "error: params.yaml: search.omega: got 'high'; allowed: a number >= 0\n" in done.stderr, done.stderr
    assert re.findall(r"Running stage '(\w+)'", done.stdout + done.stderr) == ["validate"]
    assert snapshot(repo) == before, "a bad value must leave every output untouched"
    params.write_text(good)

    # a new omega (a search setting) invalidates the predictor and the search, never the database
    params.write_text(params.read_text().replace("omega: 0.09", "omega: 0.2"))
    changed = json.loads(sh([sys.executable, "-m", "dvc", "status", "--json"], repo, env))
    assert {"predictor", "search"} <= set(changed) and not {"data", "supernet", "finetune", "database"} & set(changed)
