"""The whole pipeline in the smoke profile, in a temp copy: `dvc repro` works, and a second one reruns nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


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
    sh(["make", "-s", "profile", "P=smoke"], repo, env)

    first = sh([sys.executable, "-m", "dvc", "repro"], repo, env)
    assert "Running stage 'data'" in first
    sizes = json.loads((repo / "reports/metrics/data.json").read_text())
    assert sizes == {"train": 2000, "metric": 500, "test": 500, "num_classes": 10}
    assert (repo / "reports/notebooks/00_data.ipynb").is_file()
    assert (repo / "reports/figures/data_samples.png").is_file()

    second = sh([sys.executable, "-m", "dvc", "repro"], repo, env)
    assert "Running stage" not in second and "Data and pipelines are up to date." in second, second
