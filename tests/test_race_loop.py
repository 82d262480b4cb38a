"""benchmarks/race_loop.py: each sample's loop time is our step and the loop around it, never
the paired sides' time, and the report's ratios are the medians and quartiles of per-sample
ratios."""

import time
from types import SimpleNamespace

import pytest
import torch

from hjepa.config import load_config
from hjepa.train.trainer import Trainer
from tests.benchmark_scripts import load_benchmark

from .conftest import TINY

PAUSE = 0.15  # seconds each paired side sleeps: far longer than a tiny step


class _Sleeper:
    """A paired side that only sleeps (no CPU time), drawing a batch in the official format."""

    def __init__(self) -> None:
        self.calls = 0

    def draw(self):
        index = SimpleNamespace(context=torch.zeros(2, 3), blocks=[torch.zeros(2, 4, 5)])
        return 0, None, (torch.zeros(2, 1, 8, 8), index)

    def model_step(self, inputs) -> None:
        self.calls += 1
        time.sleep(PAUSE)


def test_loop_time_excludes_the_paired_sides(tmp_path):
    race = load_benchmark("race_loop")
    trainer = Trainer(load_config(None, [*TINY, f"run.dir={tmp_path}"]))
    official, model = _Sleeper(), _Sleeper()
    loop = race.Loop(trainer, model)
    samples = loop.paired_fit(4, official)
    assert len(samples) == 3  # one per step but the last
    assert official.calls == model.calls == 4
    assert trainer.step == 4 and "train_step" not in vars(trainer)  # the method is back
    for s in samples:
        assert s["official"][0] >= PAUSE and s["model"][0] >= PAUSE
        # the loop's time holds our step, not the 2 x PAUSE the paired sides slept
        assert s["train_step"][0] <= s["loop"][0] < PAUSE
        assert s["inputs"][0] <= s["train_step"][0]
        assert s["between"][0] == pytest.approx(s["loop"][0] - s["train_step"][0])
        assert s["official"][1] < PAUSE / 2  # a sleep uses no CPU time


def test_summary_takes_medians_and_quartiles_of_paired_ratios():
    race = load_benchmark("race_loop")
    # official 1 s each; loop 0.5, 1, 2 s: ratios 2, 1, 0.5 (median 1), not 1 / median(loop)
    loops, officials = [0.5, 1.0, 2.0], [1.0, 1.0, 1.0]
    samples = [
        {
            "loop": (lp, 2 * lp),
            "train_step": (0.9 * lp, 1.8 * lp),
            "inputs": (0.1 * lp, 0.2 * lp),
            "between": (0.1 * lp, 0.2 * lp),
            "official": (o, 2 * o),
            "model": (0.8 * lp, 1.6 * lp),
        }
        for lp, o in zip(loops, officials)
    ]
    report = race.summarise(samples)
    assert report["samples"] == 3
    for clock in ("wall", "cpu"):
        ratios = report[clock]["ratios"]
        loop_vs_official = ratios["loop_vs_official"]
        assert loop_vs_official["median"] == pytest.approx(1.0)
        # statistics.quantiles' exclusive method on [0.5, 1, 2]: 0.5 and 2
        assert loop_vs_official["q25"] == pytest.approx(0.5)
        assert loop_vs_official["q75"] == pytest.approx(2.0)
        assert ratios["loop_vs_model"]["median"] == pytest.approx(0.8)
        assert ratios["outside_model_share_of_loop"]["median"] == pytest.approx(0.2)
    assert report["wall"]["images_per_s"]["loop"] == pytest.approx(race.BATCH / 1.0)
    assert report["cpu"]["ms"]["official"] == pytest.approx(2000.0)
