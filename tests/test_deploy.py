"""ONNX deployment: exported folders run early exit like MultiStageNet.early_exit, in a torch-free process, and bad
folders fail with one line naming the file."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from enas4d import config, cost, data, deploy, evaluate, pipeline, train
from enas4d.deploy.__main__ import main
from enas4d.multistage import MultiStageNet
from enas4d.runtime import MANIFEST, DeployError, EarlyExitSession, sha256
from enas4d.space import MultiStageArch, SearchSpace, SubnetArch
from enas4d.supernet import PRESETS, OFAMobileNetV3, resize

ROOT = Path(__file__).resolve().parents[1]
SPEC = PRESETS["fmnist_small"]
INFO = {"classes": [f"c{i}" for i in range(SPEC.num_classes)], "mean": [0.29], "std": [0.35]}
TOL = 1e-4


@pytest.fixture(scope="module")
def setup() -> tuple[MultiStageNet, SearchSpace, torch.Tensor, torch.Tensor]:
    """Random-init 3-stage fmnist_small net (sorted channels), 32 images, 64 BN-calibration images.

    64 calibration images at the real resolutions keep the recalibrated BN well conditioned (16 images at 16x16
    leave 1x1 maps whose variance rests on 16 numbers, and float32 rounding of any two runtimes differs by 1e-3).
    """
    torch.manual_seed(0)
    space = SearchSpace(units=len(SPEC.units), resolutions=(24, 28), stages=3)
    supernet = OFAMobileNetV3(SPEC, space)
    supernet.sort_channels()
    g = torch.Generator().manual_seed(1)
    return MultiStageNet(supernet).eval(), space, torch.randn(32, 1, 28, 28, generator=g), torch.randn(
        64, 1, 28, 28, generator=g)


def searched_like(space: SearchSpace) -> MultiStageArch:
    """Stage 2 adds no channels to the first two blocks of every unit and catches up a third block (depth 2 -> 3);
    stage 3 widens everything to the largest net, catching up the fourth block."""
    U, D = space.units, space.max_depth

    def stage(depth: int, expand: list[int], kernel: list[int]) -> SubnetArch:
        ks = [kernel[j] if j < depth else 0 for _ in range(U) for j in range(D)]
        es = [expand[j] if j < depth else 0 for _ in range(U) for j in range(D)]
        return SubnetArch(28, (depth,) * U, tuple(ks), tuple(es))

    arch = MultiStageArch.from_stages([stage(2, [3, 3, 0, 0], [3, 5, 0, 0]), stage(3, [3, 3, 4, 0], [3, 5, 7, 0]),
                                       stage(4, [6, 6, 6, 6], [7, 7, 5, 3])])
    space.check(arch)
    return arch


def archs(space: SearchSpace) -> list[MultiStageArch]:
    return [space.sample(np.random.default_rng(seed)) for seed in (0, 1)] + [searched_like(space)]


def far_thresholds(conf: np.ndarray, q: float) -> list[float]:
    """Per stage (but the last), a threshold halfway between two neighbouring confidences near quantile ``q``, so
    float rounding cannot move a sample across it."""
    out = []
    for c in np.sort(conf[:, :-1], axis=0).T:
        i = min(int(q * len(c)), len(c) - 2)
        out.append(float((c[i] + c[i + 1]) / 2))
    return out


def test_searched_like_arch_has_a_pass_stage_and_depth_catch_up(setup):
    msnet, space, _, _ = setup
    plan = msnet.plan(searched_like(space))
    assert any(not step.new for step in plan.stages[1])  # a stage that adds no channels to a block
    first = {step.slot for step in plan.stages[0]}
    caught = [step for step in plan.stages[1] if step.slot not in first]
    assert caught and all(step.start == 0 and step.new for step in caught)  # depth catch-up from channel 0


@pytest.mark.parametrize("which", [0, 1, 2], ids=["random0", "random1", "searched_like"])
def test_runtime_early_exit_equals_torch(setup, tmp_path, which):
    msnet, space, images, calib = setup
    arch = archs(space)[which]
    net = evaluate.deploy(msnet, arch, calib, 64)
    x = resize(images, arch.resolution).contiguous()
    with torch.no_grad():
        stages = net(x)
    conf = np.stack([torch.softmax(z, 1).max(1).values.numpy() for z in stages], 1)
    thresholds = far_thresholds(conf, 0.5)
    folder = deploy.export_multistage(net, thresholds, tmp_path / "net", **INFO)
    sess = EarlyExitSession(folder, threads=1)
    got = sess.run(x.numpy())
    want = net.early_exit(x, thresholds)
    assert 0 < (want.exit_stage.numpy() == 0).sum() < len(x)  # the thresholds really split the batch
    np.testing.assert_array_equal(got.exit_stage, want.exit_stage.numpy())
    np.testing.assert_array_equal(got.pred, want.pred.numpy())
    np.testing.assert_array_equal(got.macs, want.macs.numpy())
    exit_logits = np.stack([stages[s][i].numpy() for i, s in enumerate(want.exit_stage.tolist())])
    np.testing.assert_allclose(got.logits, exit_logits, rtol=0, atol=TOL)
    for a, b in zip(sess.stage_logits(x.numpy()), stages):
        np.testing.assert_allclose(a, b.numpy(), rtol=0, atol=TOL)
    one = sess.run(x[3].numpy())  # a single C x r x r image
    assert (int(one.pred), int(one.exit_stage)) == (int(want.pred[3]), int(want.exit_stage[3]))
    m = json.loads((folder / MANIFEST).read_text())
    assert m["thresholds"] == thresholds and m["stage_macs"] == cost.stage_macs(SPEC, arch)
    assert m["classes"] == INFO["classes"] and m["resolution"] == arch.resolution
    assert m["files"] == {f: sha256(folder / f) for f in ("stage1.onnx", "stage2.onnx", "stage3.onnx")}
    assert sorted(p.name for p in folder.iterdir()) == sorted([MANIFEST, *m["files"]])


def test_restarts_and_own_stage_heads_run_as_in_torch(setup, tmp_path):
    """A later stage that restarts blocks (``start == 0`` at a block an earlier stage ran: it reads nothing left
    there) and a prediction layer per stage, one of them perturbed so the heads really differ: the runtime gives
    PyTorch's logits at every stage and its exits."""
    msnet, space, images, calib = setup
    supernet = copy.deepcopy(msnet.supernet)
    supernet.add_stage_heads(space.stages)
    with torch.no_grad():  # stage 3's classifier predicts the classes shifted by one: same scale, other logits
        lin = [m for m in supernet.stage_heads[1].modules() if isinstance(m, torch.nn.Linear)][-1]
        lin.weight.copy_(lin.weight.roll(1, 0))
        lin.bias.copy_(lin.bias.roll(1, 0))
    net3 = MultiStageNet(supernet).eval()
    arch = searched_like(space)
    plan = net3.plan(arch)
    restarts = [(s, st.slot) for s in range(1, 3) for st in plan.stages[s]
                if st.start == 0 and st.slot in {t.slot for r in range(s) for t in plan.stages[r]}]
    assert {s for s, _ in restarts} == {1, 2}  # both later stages restart some block
    net = evaluate.deploy(net3, arch, calib, 64)
    x = resize(images, arch.resolution).contiguous()
    with torch.no_grad():
        stages = net(x)
        plain = MultiStageNet(msnet.supernet).eval()  # the same net with one shared head for all stages
        shared = evaluate.deploy(plain, arch, calib, 64)(x)
    assert (stages[2] - shared[2]).abs().max() > 1e-2  # the perturbed stage-3 head is the one exported
    conf = np.stack([torch.softmax(z, 1).max(1).values.numpy() for z in stages], 1)
    thresholds = far_thresholds(conf, 0.4)
    folder = deploy.export_multistage(net, thresholds, tmp_path / "r", **INFO)
    m = json.loads((folder / MANIFEST).read_text())
    for s, slot in restarts:  # a restarted block reads nothing of the earlier stages
        assert not {f"z:{slot}", f"pooled:{slot}"} & set(m["stages"][s]["inputs"])
    sess = EarlyExitSession(folder, threads=1)
    for a, b in zip(sess.stage_logits(x.numpy()), stages):
        np.testing.assert_allclose(a, b.numpy(), rtol=0, atol=TOL)
    got, want = sess.run(x.numpy()), net.early_exit(x, thresholds)
    assert len(set(want.exit_stage.tolist())) > 1  # the thresholds really split the batch
    np.testing.assert_array_equal(got.exit_stage, want.exit_stage.numpy())
    np.testing.assert_array_equal(got.pred, want.pred.numpy())


def test_threads_parameter_gives_the_same_answers(setup, tmp_path):
    msnet, space, images, calib = setup
    arch = archs(space)[0]
    folder = deploy.export_multistage(evaluate.deploy(msnet, arch, calib, 64), [0.5, 0.5], tmp_path / "n", **INFO)
    x = resize(images, arch.resolution).numpy()
    a, b = EarlyExitSession(folder, threads=1).run(x), EarlyExitSession(folder, threads=2).run(x)
    np.testing.assert_array_equal(a.exit_stage, b.exit_stage)
    np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=TOL)
    with pytest.raises(ValueError, match="threads"):
        EarlyExitSession(folder, threads=0)


def test_static_export_equals_extracted_subnet(setup, tmp_path):
    msnet, space, images, calib = setup
    arch = space.sample_subnet(np.random.default_rng(5))
    net = evaluate.deploy(msnet, arch, calib, 64)
    folder = deploy.export_static(net, arch, tmp_path / "static", macs=cost.subnet_macs(SPEC, arch), **INFO)
    x = resize(images, arch.resolution).contiguous()
    with torch.no_grad():
        want = net(x).numpy()
    got = EarlyExitSession(folder).run(x.numpy())
    np.testing.assert_allclose(got.logits, want, rtol=0, atol=TOL)
    np.testing.assert_array_equal(got.pred, want.argmax(1))
    assert (got.exit_stage == 0).all() and (got.macs == cost.subnet_macs(SPEC, arch)).all()
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST, "static.onnx"]


@pytest.fixture(scope="module")
def folder(setup, tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """One exported 3-stage folder, its (resized) images and torch's predictions at thresholds 0.5."""
    msnet, space, images, calib = setup
    arch = searched_like(space)
    net = evaluate.deploy(msnet, arch, calib, 64)
    x = resize(images, arch.resolution).contiguous()
    out = deploy.export_multistage(net, [0.5, 0.5], tmp_path_factory.mktemp("dep") / "net", **INFO)
    return out, x.numpy(), net.early_exit(x, [0.5, 0.5]).pred.numpy()


def test_folder_runs_in_a_fresh_process_with_onnxruntime_and_numpy_only(folder, tmp_path):
    path, x, want = folder
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, json, numpy as np\n"
            "from enas4d.runtime import EarlyExitSession\n"
            f"r = EarlyExitSession({str(path)!r}).run(np.load({str(tmp_path / 'x.npy')!r}))\n"
            "mods = sorted({m.split('.')[0] for m in sys.modules})\n"
            "print(json.dumps({'pred': r.pred.tolist(), 'mods': mods}))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=tmp_path)
    got = json.loads(out.stdout)
    assert "torch" not in got["mods"] and "onnxruntime" in got["mods"]
    assert not {"pandas", "scipy", "torchvision"} & set(got["mods"])
    assert got["pred"] == want.tolist()


def _copy(path: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def _edit_manifest(folder: Path, **changes) -> None:
    m = json.loads((folder / MANIFEST).read_text())
    m.update(changes)
    (folder / MANIFEST).write_text(json.dumps(m))


def _one_line(err: pytest.ExceptionInfo, name: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg and name in msg, msg


def test_missing_graph_names_the_file(folder, tmp_path):
    d = _copy(folder[0], tmp_path)
    (d / "stage2.onnx").unlink()
    with pytest.raises(DeployError) as err:
        EarlyExitSession(d)
    _one_line(err, "stage2.onnx")


def test_corrupt_graph_names_the_file(folder, tmp_path):
    d = _copy(folder[0], tmp_path)
    (d / "stage3.onnx").write_bytes((d / "stage3.onnx").read_bytes()[:500])
    with pytest.raises(DeployError, match="SHA-256") as err:
        EarlyExitSession(d)
    _one_line(err, "stage3.onnx")
    m = json.loads((d / MANIFEST).read_text())
    _edit_manifest(d, files={**m["files"], "stage3.onnx": sha256(d / "stage3.onnx")})  # a consistent, broken graph
    with pytest.raises(DeployError, match="cannot load") as err:
        EarlyExitSession(d)
    _one_line(err, "stage3.onnx")


def test_graph_of_another_resolution_names_the_file(setup, folder, tmp_path):
    msnet, space, _, calib = setup
    d = _copy(folder[0], tmp_path)
    other = space.sample(np.random.default_rng(7))
    other = MultiStageArch(24 if searched_like(space).resolution == 28 else 28, other.depths, other.kernels,
                           other.expands)
    o = deploy.export_multistage(evaluate.deploy(msnet, other, calib, 64), [0.5, 0.5], tmp_path / "other", **INFO)
    shutil.copy(o / "stage1.onnx", d / "stage1.onnx")
    m = json.loads((d / MANIFEST).read_text())
    _edit_manifest(d, files={**m["files"], "stage1.onnx": sha256(d / "stage1.onnx")})
    with pytest.raises(DeployError, match="shape|outputs") as err:
        EarlyExitSession(d)
    _one_line(err, "stage1.onnx")


def test_thresholds_of_wrong_length_name_the_manifest(folder, tmp_path):
    d = _copy(folder[0], tmp_path)
    _edit_manifest(d, thresholds=[0.5])
    with pytest.raises(DeployError, match="thresholds") as err:
        EarlyExitSession(d)
    _one_line(err, MANIFEST)
    (d / MANIFEST).write_text("{not json")
    with pytest.raises(DeployError) as err:
        EarlyExitSession(d)
    _one_line(err, MANIFEST)
    (d / MANIFEST).unlink()
    with pytest.raises(DeployError) as err:
        EarlyExitSession(d)
    _one_line(err, MANIFEST)


def test_wrong_image_shape_is_refused(folder):
    path, x, _ = folder
    sess = EarlyExitSession(path)
    with pytest.raises(ValueError, match="images of shape"):
        sess.run(x[:, :, :-1])
    with pytest.raises(ValueError, match="thresholds"):
        sess.run(x, thresholds=[0.5])


def test_export_refuses_wrong_thresholds(setup, tmp_path):
    msnet, space, _, calib = setup
    net = evaluate.deploy(msnet, archs(space)[0], calib, 64)
    with pytest.raises(ValueError, match="thresholds"):
        deploy.export_multistage(net, [0.5], tmp_path / "n", **INFO)
    assert not (tmp_path / "n").exists()


def test_cli_exports_the_searched_nets(fmnist_prepared, tmp_path, monkeypatch, capsys):
    params = yaml.safe_load((ROOT / "profiles/smoke.yaml").read_text())
    params["data"]["out"] = str(fmnist_prepared)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    cfg = config.load("params.yaml")
    space = pipeline.space(cfg)
    train.save_supernet(pipeline.MULTISTAGE, pipeline.new_supernet(cfg), space=space)
    assert main(["--out", "deployed"]) == 1
    assert "searched/archs.json: missing" in capsys.readouterr().err
    rng = np.random.default_rng(0)
    arch, static = space.sample(rng), space.sample_subnet(rng)
    S = space.stages
    pipeline.SEARCHED.parent.mkdir()
    pipeline.SEARCHED.write_text(json.dumps({
        "multistage": [{"target": 1.5, "arch": arch.to_dict(), "thresholds": [0.6] * (S - 1)}],
        "static": [{"target": 1.5, "arch": static.to_dict()}]}))
    assert main(["--out", "deployed"]) == 0
    ms, st = EarlyExitSession("deployed/multistage-1.5"), EarlyExitSession("deployed/static-1.5")
    split = data.load_split(fmnist_prepared, "train")
    assert ms.classes == st.classes == list(split.classes) == list(data.FMNIST_CLASSES)
    assert ms.manifest["normalization"]["mean"] == list(split.mean) and ms.thresholds == [0.6] * (S - 1)
    assert ms.manifest["arch"] == arch.to_dict() and st.manifest["arch"] == static.to_dict()
    assert st.stage_macs.tolist() == [cost.subnet_macs(SPEC, static)]
    metrics = json.loads(Path("reports/metrics/deploy.json").read_text())  # the folders agree with PyTorch
    assert set(metrics["folders"]) == {"multistage-1.5", "static-1.5"}
    assert metrics["max_abs_logit_diff"] < TOL and metrics["min_same_exit_and_pred"] > 0.95
    assert "deployed/multistage-1.5: max |logit difference|" in capsys.readouterr().out
