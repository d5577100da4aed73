"""Confidence/correctness database: contents equal a direct evaluation, determinism, sharded resume, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from enas4d import cli, cost, database
from enas4d.evaluate import recalibrate_bn
from enas4d.supernet import resize
from tiny_net import SPEC, tiny_multistage

torch.set_num_threads(1)


def build(out, **kw):
    msnet, space, images, labels, calib = tiny_multistage()
    args = dict(archs=5, shard_size=2, batch_size=8, seed=3, out=out, weights_id="w0")
    args.update(kw)
    return database.build(msnet, space, SPEC, images, labels, calib, **args)


def test_database_holds_every_stage_of_every_arch(tmp_path):
    out = build(tmp_path / "db")
    db = database.load(out)
    msnet, space, images, labels, calib = tiny_multistage()
    assert db.conf.shape == db.correct.shape == (5, 24, 3) and db.conf.dtype == np.float16
    assert db.archs == database.sample_archs(space, 5, seed=3)
    a = db.archs[3]
    net = recalibrate_bn(msnet.export(a), resize(calib, a.resolution), 8)
    with torch.no_grad():
        probs = torch.stack([torch.softmax(z, 1) for z in net(resize(images, a.resolution))], 1)
    conf, pred = probs.max(2)
    np.testing.assert_allclose(db.conf[3].astype(np.float32), conf.numpy(), atol=1e-3)
    np.testing.assert_array_equal(db.correct[3], (pred == labels[:, None]).numpy())
    np.testing.assert_array_equal(db.macs[3], cost.stage_macs(SPEC, a))
    assert database.validate(out)["archs"] == 5
    assert not (tmp_path / "db.partial").exists()


def test_same_seed_same_database_and_workers_resume(tmp_path):
    whole = database.load(build(tmp_path / "a"))
    # two workers, the second "killed" before it ran: nothing is finalized until every shard exists
    partial = build(tmp_path / "b", worker=0, workers=2)
    assert not (tmp_path / "b").exists() and partial.parent == tmp_path / "b.partial"
    done = sorted(p.name for p in partial.glob("shard-*.npz"))
    assert done == ["shard-00000.npz", "shard-00002.npz"]
    build(tmp_path / "b", worker=1, workers=2)
    merged = database.load(tmp_path / "b")
    np.testing.assert_array_equal(merged.conf, whole.conf)
    np.testing.assert_array_equal(merged.correct, whole.correct)
    assert merged.archs == whole.archs


def test_a_corrupt_partial_shard_is_set_aside_and_rebuilt(tmp_path):
    whole = database.load(build(tmp_path / "a"))
    partial = build(tmp_path / "b", worker=0, workers=2)
    shard = partial / "shard-00002.npz"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match=r"shard-00002\.npz: unreadable shard .*set aside as shard-00002\.npz\.corrupt"):
        build(tmp_path / "b", worker=0, workers=2)
    assert (partial / "shard-00002.npz.corrupt").is_file()
    build(tmp_path / "b", worker=1, workers=2)
    np.testing.assert_array_equal(database.load(tmp_path / "b").conf, whole.conf)


def test_bad_databases_fail_naming_the_file(tmp_path):
    out = build(tmp_path / "db")
    shard = out / "shard-00001.npz"
    with np.load(shard) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(shard, **{**arrays, "conf": arrays["conf"][:, :10]})
    with pytest.raises(database.DatabaseError, match=r"shard-00001\.npz: conf \(2, 10, 3\)"):
        database.validate(out)
    shard.write_bytes(b"not a zip file")
    with pytest.raises(database.DatabaseError, match=r"shard-00001\.npz: unreadable shard"):
        database.load(out)
    shard.unlink()
    with pytest.raises(database.DatabaseError, match=r"shard-00001\.npz: missing shard"):
        database.load(out)
    (out / "manifest.json").unlink()
    with pytest.raises(database.DatabaseError, match=r"manifest\.json: missing"):
        database.load(out)
    assert cli.main(["database", "validate", str(out)]) == 1
