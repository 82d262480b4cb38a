"""benchmarks/supervised_ceiling.py: labels must teach the preset's encoder its classes."""

from __future__ import annotations

import pytest

from hjepa.config import load_config
from tests.benchmark_scripts import load_benchmark
from tests.test_learning import write_digits_folder


def _module():
    return load_benchmark("supervised_ceiling")


SMALL = [
    "data.name=image_folder",
    "data.channels=1",
    "data.image_size=16",
    "model.patch_size=4",
    "model.stem=conv",
    "model.embed_dim=32",
    "model.depth=1",
    "model.num_heads=2",
    "optim.lr=1e-2",
    "train.batch_size=64",
    "train.seed=0",
]


@pytest.mark.slow
def test_labels_lift_the_encoder_far_above_chance(tmp_path):
    write_digits_folder(tmp_path / "digits")
    ceiling = _module().supervised_ceiling
    common = [*SMALL, f"data.root={tmp_path / 'digits'}"]
    trained = ceiling(load_config(None, [*common, "train.max_steps=200"]))
    assert trained["steps"] == 200
    # 10 classes: chance is 0.1. A harness whose labels do not follow their images, or whose
    # optimizer never steps, stays near it (2 steps: 0.11); 150-300 steps reach 0.64-0.71.
    # (kNN is no check of learning here: random conv features of the digits already give 0.7.)
    assert trained["head_test_acc"] >= 0.5, trained
    short = ceiling(load_config(None, [*common, "train.max_steps=2"]))
    assert short["head_test_acc"] < 0.3, short


@pytest.mark.slow
@pytest.mark.parametrize("network", ["cnn", "cnn_mean"])
def test_the_reference_cnn_trains_under_the_same_harness(tmp_path, network):
    write_digits_folder(tmp_path / "digits")
    module = _module()
    cfg = load_config(None, [*SMALL, f"data.root={tmp_path / 'digits'}", "train.max_steps=100"])
    result = module.supervised_ceiling(cfg, network=network)
    assert result["network"] == network and result["steps"] == 100
    # convolutions learn the digits fast: 100 steps reach >= 0.8 read in place, 0.66 read as
    # the mean of the cells (the layout is lost); chance is 0.1
    assert result["head_test_acc"] >= {"cnn": 0.8, "cnn_mean": 0.5}[network], result
    with pytest.raises(ValueError, match="network must be one of"):
        module.supervised_ceiling(cfg, network="mlp")


def test_the_reference_cnn_reads_its_map_in_place_or_as_the_mean_of_its_cells():
    import torch

    cnn = _module().ReferenceCNN
    images = torch.rand(2, 1, 28, 28)
    torch.manual_seed(0)
    flat = cnn(1, 28)
    assert flat(images).shape == (2, 1, 128)
    assert flat.net[7].in_features == 64 * 7 * 7  # the hidden layer sees every cell in place
    torch.manual_seed(0)
    mean = cnn(1, 28, readout="mean")
    tokens = mean(images)
    assert tokens.shape == (2, 49, 128)  # one token per cell of the 7x7 map
    # a cell's token depends only on its own neighbourhood: moving the top-left pixel leaves
    # the bottom-right cells alone (a flatten readout would move every output)
    moved = images.clone()
    moved[:, 0, 0, 0] += 5.0
    diff = (mean(moved) - tokens).abs().sum(-1).view(2, 7, 7)
    assert (diff[:, 0, 0] > 0).all() and (diff[:, 3:, 3:] == 0).all()
    with pytest.raises(ValueError, match="readout must be one of"):
        cnn(1, 28, readout="max")


@pytest.mark.slow
def test_the_textbook_recipe_comes_first_and_the_probes_read_the_trained_features(tmp_path):
    import json

    write_digits_folder(tmp_path / "digits")
    module = _module()
    out = tmp_path / "ceiling.jsonl"
    # optim.weight_decay=0.1 after the recipe: a sweep overrides one of the recipe's keys
    args = ["--config", "quickstart", "--network", "cnn", "--out", str(out)]
    overrides = [*SMALL, f"data.root={tmp_path / 'digits'}", "train.max_steps=100"]
    assert module.main([*args, *overrides, "optim.weight_decay=0.1"]) == 0
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["recipe"] == "textbook" and row["steps"] == 100
    # the linear probe is fit on the trained features with their own labels: a probe whose
    # labels do not follow their features stays near chance (0.1)
    assert row["linear_test"] >= 0.8 and row["knn_test"] >= 0.8, row
    cfg = module.load_config("quickstart", [*module.TEXTBOOK, "optim.weight_decay=0.1"])
    assert cfg.optim.weight_decay == 0.1 and cfg.optim.final_weight_decay == 0.05
    assert cfg.data.crop_scale == [1.0, 1.0] and cfg.data.hflip == 0.0
    assert cfg.optim.start_lr == 0.0 and cfg.optim.warmup_steps == 30
