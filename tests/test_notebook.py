"""The papermill runner, the pipeline notebooks' hygiene, their dvc.yaml wiring, and progress bars."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
from pathlib import Path

import nbformat
import papermill
import pytest
import yaml
from conftest import ROOT

from enas4d import files, notebook, progress

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def make_notebook(path: Path, *cells: str, params: str = "seed = None\nsearch = None") -> Path:
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell(params)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, *(nbformat.v4.new_code_cell(c) for c in cells)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


# ------------------------------------------------------------------------------------------------ runner
def test_run_injects_declared_sections_and_writes_the_executed_copy(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text().replace("omega: 0.09", "omega: 0.25"))
    nb = make_notebook(tmp_path / "01_ok.ipynb", "import json; print(json.dumps([seed, search['omega']]))")
    out = notebook.run(nb, "params.yaml", tmp_path / "executed")
    assert out == tmp_path / "executed" / "01_ok.ipynb"
    executed = nbformat.read(out, as_version=4)
    assert executed.cells[-1].outputs[0]["text"].strip() == "[0, 0.25]"
    assert "search = {" in executed.cells[1].source  # papermill's injected cell, from the yaml
    assert [p.name for p in (tmp_path / "executed").iterdir()] == ["01_ok.ipynb"], "no temp file left"


def test_failing_cell_fails_with_the_notebooks_error(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    nb = make_notebook(tmp_path / "02_bad.ipynb", "x = 1", "raise KeyError('no such arch')")
    assert notebook.main([str(nb), "--out-dir", str(tmp_path / "executed")]) == 1
    err = capsys.readouterr().err
    assert "raise KeyError('no such arch')" in err  # the notebook's own traceback
    last = err.rstrip().splitlines()[-1]
    assert last == f"{nb}: cell 3 (\"raise KeyError('no such arch')\") failed: KeyError: 'no such arch'"
    assert not list((tmp_path / "executed").iterdir()), "a failed run leaves no executed copy"


def test_bad_params_fail_before_running(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text().replace("omega: 0.09", "omega: -1"))
    nb = make_notebook(tmp_path / "03.ipynb", "pass")
    assert notebook.main([str(nb)]) == 1
    assert capsys.readouterr().err == "error: params.yaml: search.omega: got -1; allowed: a number >= 0\n"
    assert not (tmp_path / "reports").exists()


def test_parameter_missing_from_params_is_an_error(tmp_path: Path) -> None:
    nb = make_notebook(tmp_path / "04.ipynb", params="seed = None\nsearh = None")
    with pytest.raises(notebook.NotebookError, match="parameter 'searh' is not a top-level key of"):
        notebook.parameters(nb, ROOT / "params.yaml")
    with pytest.raises(notebook.NotebookError, match="nope.ipynb: notebook not found"):
        notebook.run(tmp_path / "nope.ipynb", ROOT / "params.yaml")


def test_project_root_and_atomic_writers(tmp_path: Path) -> None:
    assert notebook.project_root(ROOT / "notebooks") == ROOT
    with pytest.raises(FileNotFoundError, match="no dvc.yaml here or above"):
        notebook.project_root(tmp_path)
    path = notebook.write_json(tmp_path / "m" / "x.json", {"acc": 0.5})
    assert json.loads(path.read_text()) == {"acc": 0.5}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    png = notebook.save_figure(fig, tmp_path / "f" / "x.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["f", "m", "x.json", "x.png"]


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path: Path) -> None:
    out = tmp_path / "deployed" / "net"
    with files.atomic_dir(out) as tmp:
        (tmp / "a.onnx").write_text("1")
        assert not out.exists()  # nothing visible until the block ends
    assert sorted(p.name for p in out.iterdir()) == ["a.onnx"]
    with pytest.raises(RuntimeError, match="boom"), files.atomic_dir(out) as tmp:
        (tmp / "b.onnx").write_text("2")
        raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["a.onnx"]  # a failed write leaves the old folder
    with files.atomic_dir(out) as tmp:
        (tmp / "c.onnx").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["c.onnx"]  # replaced, not merged
    assert sorted(p.name for p in out.parent.iterdir()) == ["net"]  # no temp or old folder left


# -------------------------------------------------------------------------------------- pipeline notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_source_notebooks_are_committed_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "clear outputs before committing"
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1, "one cell tagged 'parameters'"


def tracked(section: str, params: set[str], code: str) -> bool:
    """DVC sees every value of ``section`` the notebook reads: the whole section is a stage param, or the
    notebook only reads ``cfg.<section>.<key>`` and each such ``<section>.<key>`` is one."""
    if section in params:
        return True
    uses = re.findall(rf"\bcfg\.{section}\b(\.\w+)?", code)
    return bool(uses) and all(u and f"{section}{u}" in params for u in uses)


def test_tracked_sections() -> None:
    code = "x = cfg.reports.supernet_target_top1\n"
    assert tracked("reports", {"reports.supernet_target_top1"}, code)
    assert not tracked("reports", {"reports.sweep_top_k"}, code)
    assert not tracked("reports", {"reports.supernet_target_top1"}, code + "y = to_dict(cfg.reports)\n")
    assert tracked("reports", {"reports"}, code + "y = to_dict(cfg.reports)\n")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_stage_declares_its_parameters_and_sources(path: Path) -> None:
    rel = f"notebooks/{path.name}"
    stages = [s for s in STAGES.values() if re.search(rf"\b{re.escape(rel)}\b", s["cmd"])]
    assert len(stages) == 1, f"one dvc.yaml stage runs {rel}"
    stage = stages[0]
    params = {p if isinstance(p, str) else next(iter(p)) for p in stage.get("params", [])}
    declared = set(papermill.inspect_notebook(str(path)))
    code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    missing = {s for s in declared if not tracked(s, params, code)}
    assert not missing, f"{rel}: parameters {missing} missing from the stage's params"
    assert rel in stage["deps"]
    outs = [o if isinstance(o, str) else next(iter(o)) for o in stage.get("outs", [])]
    assert f"reports/notebooks/{path.name}" in outs


def test_no_stage_depends_on_an_executed_notebook() -> None:
    for name, stage in STAGES.items():
        assert not [d for d in stage.get("deps", []) if d.startswith("reports/notebooks/")], name


# ------------------------------------------------------------------------------------------------ progress
def test_progress_bar_respects_quiet(monkeypatch) -> None:
    monkeypatch.setenv("ENAS4D_QUIET", "1")
    assert progress.bar(range(3), desc="x").disable
    monkeypatch.setenv("ENAS4D_QUIET", "0")
    b = progress.bar(range(3), desc="x", file=io.StringIO())
    assert not b.disable and list(b) == [0, 1, 2]
    assert progress.bar(total=2, disable=True).disable


def test_a_killed_runs_temp_notebook_is_ignored_and_cleaned_up(tmp_path: Path) -> None:
    out = tmp_path / "reports" / "notebooks" / "01_x.ipynb"
    dead = subprocess.Popen(["true"])
    dead.wait()
    with files.atomic_path(out) as live:  # the temp name files.atomic_path gives, with this process's id
        live.write_text("{}")
        stale = live.with_name(live.name.replace(f".{os.getpid()}.", f".{dead.pid}.", 1))
        stale.write_text("{}")
        assert files.remove_stale_temps(out) == [stale]
        assert live.exists()
        ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "--no-index", "-q",
                                  f"reports/notebooks/{live.name}"])
        assert ignored.returncode == 0, f"git must ignore a killed run's temp notebook {live.name}"
    assert [p.name for p in out.parent.iterdir()] == ["01_x.ipynb"]


def test_a_hand_run_works_in_scratch_and_leaves_the_pipeline_files_alone(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "repo"
    (root / "reports" / "metrics").mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "params.yaml").write_text("seed: 0\n")
    result = root / "reports" / "metrics" / "x.json"
    result.write_text('{"acc": 0.9}\n')
    (root / "notebooks").mkdir()
    monkeypatch.chdir(root / "notebooks")
    monkeypatch.setenv(notebook.PIPELINE_ENV, "1")
    assert notebook.project_root() == root
    monkeypatch.delenv(notebook.PIPELINE_ENV)
    work = notebook.project_root()
    assert work == root / "scratch"
    monkeypatch.chdir(work)
    assert Path("params.yaml").read_text() == "seed: 0\n"  # inputs are read through the links
    notebook.write_json("reports/metrics/x.json", {"acc": 0.1})
    assert result.read_text() == '{"acc": 0.9}\n', "the pipeline's file is untouched"
    assert json.loads((work / "reports/metrics/x.json").read_text()) == {"acc": 0.1}
    assert notebook.project_root() == work, "a second call keeps the hand run's own file"
    assert json.loads((work / "reports/metrics/x.json").read_text()) == {"acc": 0.1}


def test_every_plot_has_labelled_axes_and_a_template_with_a_colour_per_series() -> None:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for entry in spec["plots"]:
        (name, props), = entry.items()
        assert {"title", "x_label", "y_label"} <= set(props), name
        template = json.loads((ROOT / ".dvc" / "plots" / f"{props['template']}.json").read_text())
        assert template["encoding"]["color"]["field"] in ("field", "filename"), name  # not the revision
        for y in props["y"]:
            assert (ROOT / y).is_file(), f"{name}: {y}"
    for stage in STAGES.values():
        for out in stage.get("plots", []):
            if isinstance(out, dict):
                (path, props), = out.items()
                assert {"x_label", "y_label"} <= set(props), path
