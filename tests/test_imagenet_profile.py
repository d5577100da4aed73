"""The `imagenet` profile is the paper's setting and its code path runs: one step of every stage on a tiny
generated ImageFolder with a randomly initialised OFA MobileNetV3 w1.0 supernet imported from an OFA-format
checkpoint file, at resolution 128."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from enas4d import config, cost, data, database, evolution, pipeline, predictor, thresholds, train
from enas4d.encoding import encode_many
from enas4d.multistage import MultiStageNet
from enas4d.supernet import PRESETS, OFAMobileNetV3, to_ofa_state_dict

torch.set_num_threads(1)
PROFILE = Path(__file__).resolve().parents[1] / "profiles" / "imagenet.yaml"
CLASSES = ("n01440764", "n01443537")  # two ImageNet wnids


def test_profile_holds_the_papers_settings() -> None:
    cfg = config.load(PROFILE)
    assert (cfg.data.name, cfg.data.metric_size, cfg.data.test_limit, cfg.data.out) == \
        ("imagenet", 10_000, None, "data/prepared")  # 10K training images for the metric; all 50K val images
    s = cfg.supernet
    assert s.preset == "ofa_mbv3_w1.0" and Path(s.checkpoint).name == "ofa_mbv3_d234_e346_k357_w1.0"
    assert (s.resolutions, s.depths, s.expands, s.kernels) == (tuple(range(128, 225, 16)), (2, 3, 4), (3, 4, 6),
                                                               (3, 5, 7))
    p = cfg.pretrain
    assert p.epochs_full == p.epochs_kernel == p.epochs_depth == p.epochs_expand == 0  # OFA's weights are imported
    f = cfg.finetune
    assert (f.stages, f.epochs, f.batch_size, f.lr, f.momentum, f.nesterov, f.weight_decay) == \
        (3, 24, 192, 4.5e-3, 0.9, True, 3e-5)
    assert (cfg.database.archs, cfg.database.images) == (18_000, 10_000)
    assert (cfg.search.omega, cfg.search.cost, cfg.search.targets) == (0.09, "macs", (90.0, 120.0, 150.0, 180.0))
    q = cfg.predictor
    assert (q.hidden, q.lr, q.weight_decay, q.epochs) == ((400, 400, 400), 1e-4, 1e-5, 30)

    spec, space = pipeline.spec(cfg), pipeline.space(cfg)
    widths = [spec.stem, spec.first_block, *(u.width for u in spec.units), spec.final_expand, spec.feature_mix]
    assert widths == [16, 16, 24, 40, 80, 112, 160, 960, 1280] and spec.num_classes == 1000
    assert (space.units, space.max_depth, space.stages) == (5, 4, 3)
    # every cumulative MACs of the paper's Table 1 (75M ... 359M) lies inside the space's range
    lo = cost.stage_macs(spec, space.smallest_multistage())[0] / 1e6
    hi = cost.stage_macs(spec, space.largest_multistage())[-1] / 1e6
    assert lo < 75 and 359 < hi


@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    """train/ and val/ with 4 random 64x64 JPEGs per class."""
    rng = np.random.default_rng(0)
    for part in ("train", "val"):
        for c in CLASSES:
            (tmp_path / "imagenet" / part / c).mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "imagenet" / part / c / f"{c}_{i}.JPEG")
    return tmp_path / "imagenet"


def test_one_step_of_every_stage_at_resolution_128(imagefolder: Path, tmp_path: Path) -> None:
    ofa_file = tmp_path / "ofa_mbv3_d234_e346_k357_w1.0"
    cfg = config.load(PROFILE, overrides={
        "device": "cpu", "threads": 1,
        "data": {"root": str(imagefolder), "metric_size": 6, "out": str(tmp_path / "prepared"), "image_size": 128},
        "supernet": {"resolutions": [128], "checkpoint": str(ofa_file)},
        "pretrain": {"epochs_full": 1, "batch_size": 2, "bn_calib_images": 2},
        "finetune": {"epochs": 1, "batch_size": 2, "eval_archs": 1},
        "database": {"archs": 4, "images": 4, "shard_size": 2, "batch_size": 4, "calib_images": 2},
        "predictor": {"epochs": 1, "batch_size": 2, "val_fraction": 0.5},
        "evolution": {"population": 4, "generations": 2, "sample_size": 2}})
    assert cfg.pretrain.precision == cfg.finetune.precision == "bf16"  # the profile's autocast, here on the CPU

    # data: 8 training images -> 6 metric + 2 train; the 8 val images are the test set
    sizes = data.prepare(**config.to_dict(cfg.data), seed=cfg.seed)
    assert sizes == {"train": 2, "metric": 6, "test": 8, "num_classes": 2}
    splits = {name: data.load_split(cfg.data.out, name) for name in data.SPLITS}
    calib = pipeline.calib_split(cfg, splits["train"])

    # OFA checkpoint import: OFA's file layout ({"state_dict": ...}) written and read back through a file
    train.seed_everything(1)
    ofa = OFAMobileNetV3(PRESETS["ofa_mbv3_w1.0"], pipeline.space(cfg, stages=1))
    torch.save({"state_dict": to_ofa_state_dict(ofa)}, ofa_file)
    net = pipeline.new_supernet(cfg)
    assert train.weights_digest(net) == train.weights_digest(ofa)

    # pretraining and fine-tuning: one step each (batch 2), as the notebooks call them
    run = train.pretrain(net, splits["train"], calib, None, cfg.pretrain, ckpt_dir=tmp_path / "pre", seed=cfg.seed)
    assert run.complete and run.history[-1]["step"] == 1 and np.isfinite(run.history[-1]["loss"])
    run = train.finetune(net, splits["train"], calib, data.subset(splits["metric"], 2, 0), cfg.finetune,
                         ckpt_dir=tmp_path / "ft", seed=cfg.seed)
    assert run.complete and {"val_top1_s1", "val_top1_s3"} <= run.history[-1].keys()

    # database: 4 archs x 4 metric-set images, 3 exits each
    msnet = MultiStageNet(train.load_supernet(tmp_path / "ft" / "multistage.pt")).eval()
    images, labels = pipeline.database_images(cfg, splits["metric"])
    d = config.to_dict(cfg.database)
    del d["images"], d["calib_images"]
    db = database.load(database.build(msnet, msnet.supernet.space, msnet.supernet.spec, images, labels,
                                      pipeline.database_calib_images(cfg, splits["train"]), seed=cfg.seed,
                                      out=tmp_path / "db", weights_id="random-w1.0", **d))
    assert db.conf.shape == (4, 4, 3) and all(a.resolution == 128 for a in db.archs)

    # thresholds for the paper's targets, the metric predictor, the evolution
    mmacs = pipeline.mmacs(db.macs)
    for target in cfg.search.targets:
        best = thresholds.search(db.conf[0], db.correct[0], mmacs[0], target, cfg.search.omega, cfg.search.grid)
        assert len(best.thresholds) == 2 and 0 < best.r <= 1
    r = thresholds.r_for_targets(db.conf, db.correct, mmacs, [(cfg.search.omega, cfg.search.targets[0])],
                                 cfg.search.grid)[:, 0]
    space = msnet.supernet.space
    settings = config.to_dict(cfg.predictor)
    model, report = predictor.train_predictor(encode_many(space, db.archs), r, seed=cfg.seed,
                                              **predictor.mlp_settings(settings))
    assert len(report.epoch_loss) == 1 and model.in_features == space.encoding_size
    assert settings["model"] == "gradient_boosting"  # the search's fitness, on this preset's MACs
    spec = msnet.supernet.spec
    boosted, _ = predictor.train_configured(settings, space, spec, db.archs, r, seed=cfg.seed)
    assert evolution.predictor_fitness(boosted, space, spec=spec)(db.archs).shape == (len(db.archs),)
    e = cfg.evolution
    found = evolution.evolve(space, evolution.predictor_fitness(model, space), population=e.population,
                             generations=e.generations, sample_size=e.sample_size, mutation_prob=e.mutation_prob,
                             crossover_prob=e.crossover_prob, seed=cfg.seed, top_k=1)
    space.check(found.best[0])
    assert len(found.history) == e.generations + 1
