"""hjepa eval's baseline cache, the linear classifier's round trip and the progress bar."""

from __future__ import annotations

import json

import pytest
import torch

from hjepa.config import load_config
from hjepa.data.tensors import ImageTensors
from hjepa.eval.cache import BaselineCache, dataset_digest, state_digest
from hjepa.eval.linear import LinearClassifier, fit_linear_classifier
from hjepa.eval.progress import EvalProgress
from hjepa.eval.runner import evaluate_run
from hjepa.train.trainer import train
from tests.conftest import TINY

# Baselines on, the slow extras off (low-shot stays: its pixel part is cached too).
BASE = [
    "eval.baselines=true",
    "eval.robustness=false",
    "eval.low_shot_fractions=[0.2]",
    "eval.low_shot_seeds=[0]",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval_cache") / "run"
    train(load_config(None, [*TINY, f"run.dir={run}", "train.max_steps=2"]))
    return run


def numbers(results: dict) -> dict:
    """Everything but the timings and the cache's own settings and record."""
    out = {k: v for k, v in results.items() if k not in ("seconds", "baseline_cache")}
    out["eval"] = {k: v for k, v in out["eval"].items() if k not in ("cache", "cache_dir")}
    return out


def test_cached_baselines_equal_fresh_ones_to_the_last_digit(tiny_run, tmp_path):
    where = [*BASE, f"eval.cache_dir={tmp_path}"]
    off = evaluate_run(tiny_run, overrides=[*BASE, "eval.cache=false"])
    assert "baseline_cache" not in off and not any(tmp_path.iterdir())
    first = evaluate_run(tiny_run, overrides=where)
    second = evaluate_run(tiny_run, overrides=where)
    assert first["baseline_cache"]["hit"] is False and second["baseline_cache"]["hit"] is True
    assert first["baseline_cache"]["key"] == second["baseline_cache"]["key"]
    assert numbers(off) == numbers(first) == numbers(second)
    assert "random_init" in first["seconds"] and "random_init" not in second["seconds"]
    assert "pixels" not in second["seconds"]  # neither baseline was recomputed
    recorded = json.loads((tiny_run / "eval.json").read_text())["baseline_cache"]
    assert recorded["key"] == second["baseline_cache"]["key"]
    assert recorded["fields"]["seed"] == 0 and recorded["fields"]["eval"]["knn_k"] == 20


def test_the_cache_is_read_and_keyed_by_what_changes_the_numbers(tiny_run, tmp_path):
    where = [*BASE, f"eval.cache_dir={tmp_path}"]
    first = evaluate_run(tiny_run, overrides=where)
    entry = tmp_path / "eval-baselines" / first["baseline_cache"]["key"] / "baselines.json"
    stored = json.loads(entry.read_text())
    stored["results"]["pixels"]["pixels"]["knn"] = 0.123  # a marker only the cache can supply
    entry.write_text(json.dumps(stored))
    assert evaluate_run(tiny_run, overrides=where)["pixels"]["pixels"]["knn"] == 0.123
    # A protocol key the baselines depend on: a different entry, computed afresh.
    other = evaluate_run(tiny_run, overrides=[*where, "eval.knn_k=3"])
    assert other["baseline_cache"]["key"] != first["baseline_cache"]["key"]
    assert other["baseline_cache"]["hit"] is False
    assert other["pixels"]["pixels"]["knn"] != 0.123
    # Fields that disagree with the stored ones (a collision, an edit) are never trusted.
    stored["fields"]["seed"] = 99
    entry.write_text(json.dumps(stored))
    again = evaluate_run(tiny_run, overrides=where)
    assert again["baseline_cache"]["hit"] is False
    assert again["pixels"] == first["pixels"]


def test_digests_see_every_value():
    images = torch.zeros(4, 1, 3, 3, dtype=torch.uint8)
    labels = torch.arange(4)
    base = dataset_digest(ImageTensors(images, labels))
    changed = images.clone()
    changed[3, 0, 2, 2] = 1
    assert dataset_digest(ImageTensors(changed, labels)) != base
    assert dataset_digest(ImageTensors(images, labels.flip(0))) != base
    assert dataset_digest(ImageTensors(images.clone(), labels.clone())) == base
    state = {"w": torch.ones(2, 2), "b": torch.zeros(2)}
    assert state_digest(state) == state_digest({k: v.clone() for k, v in state.items()})
    assert state_digest({**state, "b": torch.tensor([0.0, 1e-7])}) != state_digest(state)


def test_pixel_classifier_round_trips_through_the_cache(tmp_path):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    feats = 2.0 * torch.eye(3, 6)[labels] + torch.randn(60, 6, generator=g)
    clf = fit_linear_classifier(feats, labels, 3, weight_decays=(1e-3, 1e-1))
    cache = BaselineCache(tmp_path, "k", {"a": 1})
    cache.store_tensors("pixel_classifier", clf.state())
    back = LinearClassifier.from_state(cache.load_tensors("pixel_classifier"), "cpu")
    assert torch.equal(back.predict(feats), clf.predict(feats))
    assert back.weight_decay == clf.weight_decay and back.val_accuracy == clf.val_accuracy
    assert cache.load() is None  # no results stored yet


def test_robustness_reuses_the_cached_pixel_classifier(tiny_run, tmp_path):
    where = [
        "eval.baselines=false",
        "eval.low_shot=false",
        "eval.linear=false",
        "eval.robustness_limit=8",
        f"eval.cache_dir={tmp_path}",
    ]
    first = evaluate_run(tiny_run, overrides=where)
    second = evaluate_run(tiny_run, overrides=where)
    assert "pixels" in first["seconds"] and "pixels" not in second["seconds"]
    assert numbers(first) == numbers(second)


def test_progress_bar_reaches_the_end_and_names_the_stage(tiny_run, capsys):
    evaluate_run(tiny_run, overrides=[*BASE, "eval.cache=false"], progress_bar=True)
    err = capsys.readouterr().err
    assert "eval: random-init encoder" in err and "100%" in err
    bar = EvalProgress(10.0, enabled=False)
    bar.advance(7.0)
    bar.advance(7.0)  # an overshooting estimate stops at the total
    assert bar._done == 10.0
