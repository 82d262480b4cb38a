"""benchmarks/cfg_walk.py: the walk, its files and climbs, counted by hand on a small tree."""

from __future__ import annotations

from tests.benchmark_scripts import load_benchmark
from tests.conftest import TINY

cfg_walk = load_benchmark("cfg_walk")
RANKS = {"grid": 0, "config": 1, "data": 2, "models": 3, "train": 4, "cli": 5}


def small_tree():
    """cli -> trainer.train -> (datasets.f, parts.build -> hjepa.init); cli -> trainer.step."""
    root = cfg_walk.Node("cli.py", "_train")
    train = root.child("train/trainer.py", "train")
    train.child("data/datasets.py", "f")
    train.child("train/parts.py", "build").child("models/hjepa.py", "init")
    train.child("train/parts.py", "build")  # called again: the same calling context
    root.child("train/trainer.py", "step")
    return root


def test_the_walk_enters_callees_and_returns_to_callers():
    assert cfg_walk.walk(small_tree()) == [
        ("enter", "train/trainer.py"),
        ("enter", "data/datasets.py"),
        ("return", "train/trainer.py"),
        ("enter", "train/parts.py"),
        ("enter", "models/hjepa.py"),
        ("return", "train/parts.py"),
        ("return", "train/trainer.py"),
        ("return", "cli.py"),
        ("enter", "train/trainer.py"),  # the unwinding after the last entry is not walked
    ]


def test_files_climbs_and_reentries_by_hand():
    result = cfg_walk.measure(small_tree(), RANKS)
    assert result["files"] == 5  # cli, trainer, datasets, parts, hjepa
    # data -> train, models -> train, train -> cli; parts -> trainer stays on one layer.
    assert result["climbs_from_to"] == [
        "data/datasets.py -> train/trainer.py",
        "models/hjepa.py -> train/parts.py",
        "train/trainer.py -> cli.py",
    ]
    assert result["climbs"] == 3
    assert result["reentered"] == ["train/trainer.py"]


def test_layers_come_from_the_readme_bottom_first():
    ranks = cfg_walk.layer_ranks()
    assert ranks["grid"] < ranks["config"] < ranks["data"] < ranks["train"] < ranks["cli"]
    assert cfg_walk.layer_of("train/parts.py") == "train" and cfg_walk.layer_of("cli.py") == "cli"


def test_a_recorded_run_follows_the_config_into_the_trainer(tmp_path):
    argv = ["train", *TINY, f"run.dir={tmp_path / 'run'}", "train.max_steps=1"]
    sections, whole = cfg_walk.record(argv)
    assert ("train/trainer.py", "train") in sections.root.children
    ranks = cfg_walk.layer_ranks()
    any_config, whole_config = (cfg_walk.measure(r.root, ranks) for r in (sections, whole))
    # The whole Config is one of the config objects: its walk is part of theirs.
    assert set(whole_config["walk"]) <= set(any_config["walk"])
    assert "train/parts.py" in whole_config["walk"]  # build_parts(cfg)
    assert not any(f.startswith("config/") for f in any_config["walk"])  # counted apart
    assert sections.config_calls > 0
