"""benchmarks/time_to_accuracy.py: the curve is the uninterrupted run's, probed like the trainer
probes, with pixel and random-init baselines, and a killed benchmark continues its curve."""

import json
from pathlib import Path

import pytest

from hjepa.config import load_config
from hjepa.train.monitor import OnlineProbe
from hjepa.train.trainer import Trainer
from tests.benchmark_scripts import load_benchmark

from .conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def _script():
    return load_benchmark("time_to_accuracy")


OVERRIDES = [*TINY, "train.max_steps=4", "train.knn_bank_size=96", "train.knn_query_size=32"]


def _curve(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_curve_probes_every_stretch_against_its_baselines(tmp_path):
    script = _script()
    out = tmp_path / "tta"
    assert script.main(["--config", "", "--out", str(out), "--every", "2", *OVERRIDES]) == 0
    records = _curve(out / "curve.jsonl")
    assert [r["kind"] for r in records] == ["pixels", "probe", "probe", "probe"]
    probes = records[1:]
    assert [r["step"] for r in probes] == [0, 2, 4]
    assert [r["images_seen"] for r in probes] == [0, 32, 64]  # batch 16
    assert probes[0]["train_s"] == 0.0 and 0 < probes[1]["train_s"] <= probes[2]["train_s"]
    assert (out / "curve.png").stat().st_size > 0

    # The probes are the trainer's online probe, plus the linear probe, of the same encoders.
    cfg = load_config(None, [*OVERRIDES, f"run.dir={tmp_path / 'ref'}"])
    ref = Trainer(cfg)
    probe = OnlineProbe.from_config(cfg, ref.mean, ref.std, "cpu", linear=("concat",))
    at_init = probe(ref.model.target_encoder)
    assert at_init["knn_concat"] == probes[0]["knn_concat"]
    assert at_init["linear_concat"] == probes[0]["linear_concat"]
    assert "linear_level0" not in probes[0] and "linear_level1" not in at_init  # --linear concat
    ref.fit()  # the uninterrupted 4-step run ends at the curve's last point
    at_end = probe(ref.model.target_encoder)
    for key in ("knn_level0", "knn_concat", "linear_concat", "rank_level0"):
        assert at_end[key] == probes[-1][key], key
    assert records[0] == {"kind": "pixels", **probe.pixels()}
    assert set(records[0]) == {"kind", "knn", "linear"}


def test_a_stopped_benchmark_continues_the_same_curve(tmp_path):
    script = _script()
    whole = _curve(script.run_curve("", tmp_path / "whole", 2, OVERRIDES))
    curve = script.run_curve("", tmp_path / "parts", 2, OVERRIDES, until=2)
    assert [r.get("step") for r in _curve(curve)] == [None, 0, 2]
    script.run_curve("", tmp_path / "parts", 2, OVERRIDES)  # the rerun goes on from step 2
    parts = _curve(curve)
    assert [r.get("step") for r in parts] == [None, 0, 2, 4]
    for key in ("knn_level0", "knn_concat", "linear_concat", "rank_level0"):
        assert [r[key] for r in parts[1:]] == [r[key] for r in whole[1:]], key
    script.run_curve("", tmp_path / "parts", 2, OVERRIDES)  # finished: nothing is added
    assert len(_curve(curve)) == 4


def test_plot_overlays_curves(tmp_path):
    script = _script()
    out = tmp_path / "tta"
    script.run_curve("", out, 4, OVERRIDES)
    png = tmp_path / "both.png"
    args = ["--plot", str(out / "curve.jsonl"), str(out / "curve.jsonl"), "--labels", "a", "b"]
    assert script.main([*args, "--out", str(png)]) == 0
    assert png.stat().st_size > 0
    with pytest.raises(SystemExit):  # one label for two curves
        script.main([*args[:-1], "--out", str(png)])
