"""Report helpers: writers, the paper's reference values, the README, searched-net files and early-exit runs."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT

from enas4d import config, database, pipeline, report
from enas4d.evaluate import recalibrate_bn
from enas4d.multistage import MultiStageNet
from enas4d.space import SearchSpace
from enas4d.supernet import PRESETS, OFAMobileNetV3, resize

matplotlib.use("Agg")


def test_table_is_written_as_markdown_and_csv_with_the_same_numbers(tmp_path):
    df = pd.DataFrame({"network": ["A", "B"], "top1_pct": [91.25, 92.5], "stage3_mmacs": [2.5, np.nan]})
    md, csv = report.write_table(df, tmp_path / "tables" / "table9", title="Table 9: demo",
                                 reading="B is better.", notes=["Paper values are typed in."])
    assert (md.name, csv.name) == ("table9.md", "table9.csv")
    pd.testing.assert_frame_equal(pd.read_csv(csv), df)
    text = md.read_text()
    assert text.startswith("### Table 9: demo\n\n| network")
    assert "| B         |      92.5  |                |" in text  # NaN shows as an empty cell
    assert "B is better." in text and "*Paper values are typed in.*" in text
    assert sorted(p.name for p in md.parent.iterdir()) == ["table9.csv", "table9.md"], "no temp files left"
    with pytest.raises(ValueError, match="empty table"):
        report.write_table(df.iloc[:0], tmp_path / "t", title="x", reading="y")


def test_figure_is_saved_with_a_caption_that_shows_it(tmp_path):
    import matplotlib.pyplot as plt

    fig = plt.figure()
    png, md = report.write_figure(fig, tmp_path / "figure9.png", title="Figure 9: demo", reading="Flat.")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert md.read_text() == "### Figure 9: demo\n\n![Figure 9: demo](figure9.png)\n\nFlat.\n"
    with pytest.raises(ValueError, match="written as .png"):
        report.write_figure(fig, tmp_path / "figure9.jpg", title="x", reading="y")
    plt.close(fig)


def test_paper_reference_values_match_the_paper():
    t1 = report.paper_table1().set_index("network")
    assert t1.loc["D", ["top1_pct", "avg_mmacs", "stage1_mmacs", "stage2_mmacs", "stage3_mmacs"]].tolist() == \
        [74.4, 185, 141, 201, 359]
    assert set(t1.source) == {report.PAPER}
    t3 = report.paper_table3()
    # every paper net's exit fractions add up to 100% (up to the paper's rounding)
    assert np.allclose(t3.groupby("network").exit_fraction_pct.sum(), 100, atol=0.15)
    assert t3[(t3.network == "C") & (t3.stage == 1)][["exit_top1_pct", "exit_fraction_pct"]].values.tolist() == \
        [[94.6, 44.3]]
    assert report.network_names(4) == ["A", "B", "C", "D"]
    assert (report.span([1.0, 2.5, np.nan]), report.span([3.0, 3.001]), report.span([2], "{:.0f}%")) == \
        ("1.00–2.50", "3.00", "2%")
    with pytest.raises(ValueError):
        report.network_names(0)


def test_figure5_panels_and_axes():
    pts = pd.DataFrame([
        {"panel": 0, "series": "ENAS4D (sweep)", "avg_mmacs": 1.0, "top1_pct": 90.0},
        {"panel": 0, "series": "ENAS4D (sweep)", "avg_mmacs": 2.0, "top1_pct": 91.0},
        {"panel": 0, "series": "random multi-stage", "avg_mmacs": 1.5, "top1_pct": 88.0},
        {"panel": 1, "series": "ENAS4D (paper)", "avg_mmacs": 92, "top1_pct": 70.5},
        {"panel": 1, "series": "FBS", "avg_mmacs": 3380, "top1_pct": 69.59},
    ])
    fig = report.plot_accuracy_vs_macs(pts, left_title="ours", right_title="ImageNet")
    left, right = fig.axes
    assert (left.get_xscale(), right.get_xscale()) == ("linear", "log")  # 3380/92 spans more than 10x
    assert [t.get_text() for t in right.get_legend().get_texts()] == ["ENAS4D (paper)", "FBS"]
    assert len(left.lines) == 2 and list(left.lines[0].get_xdata()) == [1.0, 2.0]
    assert (left.get_xlabel(), right.get_xlabel()) == ("average MACs per image (M, linear scale)",
                                                       "average MACs per image (M, log scale)")
    # points joined in cost order whatever their order in the table, and 95% intervals drawn as error bars
    lo, hi = report.wilson_pct([90.0, 91.0, 88.0, 70.5, 69.59], 10000)
    assert np.all(lo < [90.0, 91.0, 88.0, 70.5, 69.59]) and np.all(hi > [90.0, 91.0, 88.0, 70.5, 69.59])
    assert 1.1 < hi[0] - lo[0] < 1.25  # +-1.96 sqrt(.9 .1 / 10000) = +-0.59 points
    shuffled = pts.assign(top1_low_pct=lo, top1_high_pct=hi).iloc[[1, 0, 2, 3, 4]]
    fig = report.plot_accuracy_vs_macs(shuffled, left_title="ours", right_title="ImageNet")
    assert list(fig.axes[0].lines[0].get_xdata()) == [1.0, 2.0]
    assert len(fig.axes[0].collections) >= 2, "error bars"
    with pytest.raises(ValueError, match="lack columns"):
        report.plot_accuracy_vs_macs(pts.drop(columns="series"), left_title="", right_title="")


def test_figure6_has_one_row_per_stage_and_marks_mistakes():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    true = np.arange(30) % 10
    pred = true.copy()
    pred[0] = 3
    stage = np.array([0] * 20 + [1] * 9 + [2])
    shown = []
    fig = report.plot_exit_examples(lambda i: shown.append(i) or images[i], true, pred, stage, 4,
                                    [f"c{i}" for i in range(10)], per_stage=4, seed=0, title="exits")
    axes = np.array(fig.axes).reshape(4, 4)
    assert axes[3, 0].get_ylabel() == "stage 4\n0.0% exit" and not any(a.images for a in axes[3])
    assert axes[2, 0].get_ylabel() == "stage 3\n3.3% exit"
    assert [bool(a.images) for a in axes[2]] == [True, False, False, False]  # one image exits at stage 3
    assert len(shown) == 9 and 29 in shown  # only the shown images are loaded
    titles = {a.get_title(): a.title.get_color() for a in axes[0] if a.images}
    assert all(c == "black" for t, c in titles.items() if not t.startswith("c0"))
    with pytest.raises(ValueError, match="one prediction and exit stage per label"):
        report.plot_exit_examples(images.__getitem__, true[:3], pred, stage, 3, [], per_stage=2, seed=0, title="")
    with pytest.raises(ValueError, match=r"exit stages must lie in \[0, 2\)"):
        report.plot_exit_examples(images.__getitem__, true, pred, stage, 2, [], per_stage=2, seed=0, title="")


def _project(tmp_path):
    root = tmp_path / "proj"
    (root / "profiles").mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    shutil.copy(ROOT / "profiles" / "smoke.yaml", root / "profiles" / "smoke.yaml")
    return root


def test_readme_stitches_sections_under_a_header(tmp_path):
    root = _project(tmp_path)
    df = pd.DataFrame({"network": ["A"], "top1_pct": [90.0]})
    report.write_table(df, root / "reports/tables/table1", title="Table 1: ours", reading="Reading one.")
    import matplotlib.pyplot as plt

    report.write_figure(plt.figure(), root / "reports/figures/figure5.png", title="Figure 5: curves", reading="R5.")
    (root / "reports/metrics").mkdir()
    (root / "reports/metrics/data.json").write_text('{"train": 7, "metric": 5, "test": 3, "num_classes": 10}')
    out = report.readme("reports/README.md", ["reports/tables/table1.md", "reports/figures/figure5.md"], root)
    text = out.read_text()
    assert out == root / "reports/README.md"
    assert "- **Dataset**: fashion-mnist (7 train, 5 metric, 3 test images)" in text
    assert "- **Code commit**: `unknown`" in text  # not a git checkout
    assert "- **Profile**: `default` (params.yaml; no committed params.yaml to compare with)" in text
    assert text.index("### Table 1: ours") < text.index("### Figure 5: curves")
    assert "![Figure 5: curves](figures/figure5.png)" in text  # relative to the README, not the section
    with pytest.raises(FileNotFoundError, match="table3.md: section file missing"):
        report.readme("reports/README.md", ["reports/tables/table3.md"], root)
    assert report.main(["readme", str(root / "R.md"), str(root / "nope.md")]) == 1


def test_profile_is_named_and_local_changes_are_listed(tmp_path):
    root = _project(tmp_path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(git + ["add", "params.yaml"], cwd=root, check=True)
    subprocess.run(git + ["commit", "-qm", "p"], cwd=root, check=True)
    assert report.describe_profile(root) == "`default` (params.yaml)"
    assert len(report.commit(root)) >= 7
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("omega: 0.09", "omega: 0.2"))
    assert report.describe_profile(root) == \
        "`default` (params.yaml), changed from the committed file: search.omega: 0.09 → 0.2"
    shutil.copy(root / "profiles/smoke.yaml", params)
    assert report.describe_profile(root) == "`smoke` (profiles/smoke.yaml)"


def test_durations_read_like_table2():
    assert [report.duration(s) for s in (0.0005, 12.34, 300, 4 * 3600)] == ["0.5 ms", "12.3 s", "5 min", "4 h"]
    with pytest.raises(ValueError, match="finite number of seconds"):
        report.duration(-1)


def test_imagenet_sources_split_into_plottable_and_not(tmp_path):
    plotted, unplotted = report.load_imagenet_sources(ROOT / "reports/figures/figure5_imagenet_sources.csv")
    assert plotted.avg_mmacs.notna().all() and unplotted.avg_mmacs.isna().all()
    assert plotted.source.str.startswith("http").all() and unplotted.source.str.startswith("http").all()
    bad = tmp_path / "s.csv"
    bad.write_text("method,top1\nX,70\n")
    with pytest.raises(ValueError, match=r"s\.csv: missing columns \['setting', 'avg_mmacs', 'source'\]"):
        report.load_imagenet_sources(bad)


# ---------------------------------------------------------------------------------------------- measurements
@functools.cache
def tiny() -> tuple[MultiStageNet, SearchSpace]:
    torch.manual_seed(0)
    spec = PRESETS["fmnist_small"]
    space = SearchSpace(units=len(spec.units), resolutions=(16, 20), stages=3)
    return MultiStageNet(OFAMobileNetV3(spec, space)).eval(), space


def test_early_exit_is_measured_batch_by_batch_and_saved_per_image(tmp_path):
    msnet, space = tiny()
    arch = space.sample(np.random.default_rng(2))
    g = torch.Generator().manual_seed(0)
    images, labels, calib = torch.randn(20, 1, 28, 28, generator=g), torch.arange(20) % 10, torch.randn(12, 1, 28, 28)
    rows = database.evaluate_like_database(msnet, arch, images, labels, calib, 6)
    t = tuple(float(np.median(rows.conf[:, s].astype(np.float32))) for s in range(2))  # mixed exits
    run = report.measure_early_exit(msnet, arch, t, images, calib, batch_size=6)  # 4 batches, the last of 2
    net = recalibrate_bn(msnet.export(arch), resize(calib, arch.resolution), 6)
    whole = net.early_exit(resize(images, arch.resolution), t)
    for f in ("pred", "exit_stage", "macs"):
        assert torch.equal(getattr(run, f), getattr(whole, f)), f
    assert len(set(run.exit_stage.tolist())) > 1

    path = report.save_exits(tmp_path / "e" / "exits.npz", labels.numpy(), {"A": run, "B": whole})
    got_labels, got = report.load_exits(path)
    assert np.array_equal(got_labels, labels.numpy()) and list(got) == ["A", "B"]
    assert all(torch.equal(getattr(got["A"], f), getattr(run, f)) for f in ("pred", "exit_stage", "macs"))
    assert [p.name for p in (tmp_path / "e").iterdir()] == ["exits.npz"]
    with pytest.raises(FileNotFoundError, match="nope.npz: not found; run the table1 stage"):
        report.load_exits(tmp_path / "nope.npz")
    np.savez(tmp_path / "bad.npz", names=np.array(["A"]), labels=np.arange(3), pred=np.zeros((1, 2)),
             exit_stage=np.zeros((1, 3)), macs=np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"bad\.npz: per-image arrays are not \[1 nets, 3 images\]"):
        report.load_exits(tmp_path / "bad.npz")


def test_searched_file_is_checked_against_the_params(tmp_path):
    cfg = config.load(ROOT / "params.yaml")
    space = pipeline.space(cfg)
    rng = np.random.default_rng(0)
    entry = lambda t: {"target": t, "arch": space.sample(rng).to_dict(), "thresholds": [0.9, 0.8],  # noqa: E731
                       "metric_set": {"r": 0.9, "acc": 0.9, "cost": t}}
    raw = {"cost": "macs", "omega": cfg.search.omega, "grid": cfg.search.grid, "targets": list(cfg.search.targets),
           "multistage": [entry(t) for t in cfg.search.targets],
           "static": [{"target": 1.0, "arch": space.smallest().to_dict(), "metric_set": {"r": 0.8}}]}
    path = tmp_path / "archs.json"
    path.write_text(json.dumps(raw))
    multi, static = report.load_searched(path, cfg, space)
    assert [m.target for m in multi] == list(cfg.search.targets) and multi[0].thresholds == (0.9, 0.8)
    assert static[0].arch == space.smallest() and static[0].thresholds == ()
    path.write_text(json.dumps({**raw, "omega": 0.5}))
    with pytest.raises(ValueError, match=r"archs\.json: omega is 0\.5 but params\.yaml's search\.omega is 0\.09"):
        report.load_searched(path, cfg, space)
    path.write_text(json.dumps({k: v for k, v in raw.items() if k != "static"}))
    with pytest.raises(ValueError, match=r"archs\.json: not a searched-archs file \(KeyError"):
        report.load_searched(path, cfg, space)
    with pytest.raises(FileNotFoundError, match="run the search stage first"):
        report.load_searched(tmp_path / "none.json", cfg, space)
    # thresholds in [0, 1], one per stage but the last, archs inside the space: errors name the file and entry
    bad = json.loads(json.dumps(raw))
    bad["multistage"][1]["thresholds"] = [1.5, -2.0]
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"archs\.json: multistage\[1\] \(target 1\.5\): threshold 1\.5 outside"):
        report.load_searched(path, cfg, space)
    bad["multistage"][1]["thresholds"] = [0.5]
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"archs\.json: multistage\[1\] .*: 1 thresholds; finetune\.stages = 3 needs 2"):
        report.load_searched(path, cfg, space)
    bad = json.loads(json.dumps(raw))
    bad["static"][0]["arch"]["resolution"] = 99
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"archs\.json: static\[0\] \(target 1\): arch outside the search space") as err:
        report.load_searched(path, cfg, space)
    assert "\n" not in str(err.value)


def test_readings_compare_exactly_and_give_counts_and_intervals():
    text = report.against_targets(["A", "B", "C", "D"], [1.0967551552, 1.28, 1.33, 2.5004912672],
                                  [1.0, 1.5, 2.0, 2.5], "MMACs")
    assert text == ("2 of 4 stay at or under their cost target; over it: A by 9.7% (1.09676 vs 1 MMACs), "
                    "D by 0.02% (2.50049 vs 2.5 MMACs)")  # D is over, though it rounds to 2.500
    assert report.against_targets(["A"], [4.0], [4.0], "ms") == "1 of 1 stay at or under their cost target"
    line = report.rate_with_interval(39, 54)
    assert line.startswith("72.2% of 54 images (95% CI ") and line.endswith("%)")
    lo, hi = (float(v) for v in line.split("CI ")[1].rstrip("%)").split("-"))
    assert lo < 72.2 < hi and hi - lo > 20  # few images: a wide interval
    assert report.rate_with_interval(0, 0) == "no images"


def test_figure5_points_get_intervals_and_a_csv_per_series(tmp_path):
    pts = pd.DataFrame([
        {"panel": 0, "series": "ENAS4D (sweep)", "label": "t2", "avg_mmacs": 2.0, "top1_pct": 91.0},
        {"panel": 0, "series": "ENAS4D (sweep)", "label": "t1", "avg_mmacs": 1.0, "top1_pct": 90.0},
        {"panel": 0, "series": "random multi-stage", "label": "db 3", "avg_mmacs": 1.5, "top1_pct": 80.0},
        {"panel": 1, "series": "ENAS4D (paper)", "label": "A", "avg_mmacs": 300.0, "top1_pct": 75.0}])
    got = report.with_wilson(pts, 1000)
    lo, hi = report.wilson_pct([91.0, 90.0, 80.0], 1000)
    assert got.top1_low_pct[:3].tolist() == lo.round(2).tolist()
    assert got.top1_high_pct[:3].tolist() == hi.round(2).tolist()
    assert got.top1_low_pct.isna().tolist() == [False, False, False, True], "no image count for the paper's points"
    assert "top1_low_pct" not in pts, "the input frame is left as it was"
    written = report.write_points(got, tmp_path / "figure5.csv", tmp_path / "series")
    assert len(pd.read_csv(tmp_path / "figure5.csv")) == 4
    sweep = pd.read_csv(tmp_path / "series" / "enas4d-sweep.csv")
    assert sweep.label.tolist() == ["t1", "t2"] and "top1_low_pct" in sweep, "cost order, with the intervals"
    assert sorted(p.name for p in (tmp_path / "series").iterdir()) == sorted(
        report.series_file(n) for n in report.FIGURE5_SERIES)
    assert len(pd.read_csv(tmp_path / "series" / "best-static-subnet.csv")) == 0
    assert len(written) == 1 + len(report.FIGURE5_SERIES)
