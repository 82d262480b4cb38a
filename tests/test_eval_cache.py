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
NO_LOW_SHOT = [*BASE[:2], "eval.low_shot=false"]  # its settings would be refused without it


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
    assert set(second["attentive"]) == {"trained", "random_init", "pixels"}  # cached ones too
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
    stored["results"]["attentive"]["pixels"]["pixels"]["accuracy"] = 0.456
    stored["results"]["attentive"]["random_init"]["concat"]["accuracy"] = 0.789
    entry.write_text(json.dumps(stored))
    read = evaluate_run(tiny_run, overrides=where)
    assert read["pixels"]["pixels"]["knn"] == 0.123
    assert read["attentive"]["pixels"]["pixels"]["accuracy"] == 0.456
    assert read["attentive"]["random_init"]["concat"]["accuracy"] == 0.789
    # The attentive probe's settings are part of the key (its baselines depend on them).
    other = evaluate_run(tiny_run, overrides=[*where, "eval.attentive_epochs=1"])
    assert other["baseline_cache"]["hit"] is False
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


def test_settings_outside_the_weights_change_the_key(tiny_run, tmp_path):
    """model.num_heads changes the forward pass but no weight's shape or value: the same
    random-init weights, yet other baselines. The key must see it (it once did not)."""
    import shutil

    import yaml

    where = [*NO_LOW_SHOT, "eval.linear=false", f"eval.cache_dir={tmp_path}"]
    first = evaluate_run(tiny_run, overrides=where)
    other_run = tmp_path / "heads"
    shutil.copytree(tiny_run, other_run)
    config = yaml.safe_load((other_run / "config.yaml").read_text())
    assert config["model"]["num_heads"] == 2
    config["model"]["num_heads"] = 4  # 32 wide: head width 16 instead of 8, same weights
    (other_run / "config.yaml").write_text(yaml.safe_dump(config))
    second = evaluate_run(other_run, overrides=where)
    fields = (first["baseline_cache"]["fields"], second["baseline_cache"]["fields"])
    assert fields[0]["encoder_init"] == fields[1]["encoder_init"]  # the weights agree
    assert fields[0]["architecture"]["num_heads"] == 2
    assert fields[1]["architecture"]["num_heads"] == 4
    assert second["baseline_cache"]["key"] != first["baseline_cache"]["key"]
    assert second["baseline_cache"]["hit"] is False
    # And the forward pass does differ: same weights, other outputs.
    from hjepa.models.hjepa import build_encoder

    encoders = []
    for heads in (2, 4):
        torch.manual_seed(0)
        cfg = load_config(None, [*TINY, f"model.num_heads={heads}"])
        encoders.append(build_encoder(cfg.model, 32, 1).eval())
    encoders[1].load_state_dict(encoders[0].state_dict())
    images = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gap = (encoders[0](images) - encoders[1](images)).abs().max()
    assert gap > 1e-5  # near-uniform attention at init: small, but not rounding


def test_threads_and_code_are_part_of_the_key(tiny_run, tmp_path):
    where = [*NO_LOW_SHOT, "eval.linear=false", f"eval.cache_dir={tmp_path}"]
    threads = torch.get_num_threads()
    first = evaluate_run(tiny_run, overrides=where)["baseline_cache"]
    torch.set_num_threads(threads + 1)
    try:
        other = evaluate_run(tiny_run, overrides=where)["baseline_cache"]
    finally:
        torch.set_num_threads(threads)
    assert (first["fields"]["threads"], other["fields"]["threads"]) == (threads, threads + 1)
    assert other["key"] != first["key"] and other["hit"] is False
    assert first["fields"]["device_model"] == torch.backends.cpu.get_cpu_capability()
    assert len(first["fields"]["code"]) == 32


def test_code_digest_follows_every_source_file(tmp_path, monkeypatch):
    from hjepa.eval import cache

    root = tmp_path / "hjepa"
    for name in ("eval/a.py", "models/b.py", "data/c.py", "grid.py", "train/d.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x = 1\n")
    monkeypatch.setattr(cache, "__file__", str(root / "eval" / "cache.py"))
    base = cache.code_digest()
    (root / "train" / "d.py").write_text("x = 2\n")  # training code: not in the baselines
    assert cache.code_digest() == base
    for name in ("eval/a.py", "models/b.py", "data/c.py", "grid.py"):
        (root / name).write_text("x = 2\n")
        changed = cache.code_digest()
        assert changed != base
        base = changed
    (root / "models" / "new.py").write_text("")  # a new file counts too
    assert cache.code_digest() != base


def test_recorded_section_records_reads_and_refuses_writes():
    from hjepa.eval.cache import RecordedSection

    cfg = load_config(None, TINY)
    view = RecordedSection(cfg.model)
    assert view.embed_dim == 32 and view.depth == 2
    assert view.read == {"embed_dim": 32, "depth": 2}
    with pytest.raises(AttributeError, match="read-only"):
        view.depth = 3
    with pytest.raises(AttributeError):
        view.no_such_key  # noqa: B018
