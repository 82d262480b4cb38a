"""The ablation's reproductions are extensions the top of the package registers with the core."""

import pytest
import torch

from hjepa.config import ConfigError
from hjepa.data import masks
from hjepa.data.masks import MultiBlockMaskSampler
from hjepa.experiments import reproductions
from hjepa.train import trainer as trainer_module
from hjepa.train.trainer import Trainer


def test_the_core_refuses_a_reproduction_that_is_not_installed(tiny_config, monkeypatch):
    for name in ("gentle", "geometric"):  # as before install(); restored after the test
        monkeypatch.delitem(masks.FOOTPRINT_RULES, name)
    monkeypatch.delitem(trainer_module.EMA_TIMINGS, "before_step")
    with pytest.raises(ValueError, match=r"geometric.*reproductions\.install\(\)"):
        MultiBlockMaskSampler(8, scale_mode="geometric")
    with pytest.raises(ConfigError, match=r"before_step.*reproductions\.install\(\)"):
        Trainer(tiny_config("train.ema_timing=before_step"))
    reproductions.install()
    assert MultiBlockMaskSampler(8, scale_mode="geometric").rule is reproductions.GEOMETRIC
    trainer = Trainer(tiny_config("train.ema_timing=before_step"))
    assert not trainer.ema_after_step  # the pre-step hook takes the EMA instead


def test_the_default_uses_no_reproduction(tiny_config):
    trainer = Trainer(tiny_config())
    assert trainer.ema_after_step and trainer.inputs.masks.rule is None
    sampler = MultiBlockMaskSampler(8, levels=3)
    masks_ = sampler.sample(2, torch.Generator().manual_seed(0))
    # Constant mode: every level is built from the level-0 target blocks themselves.
    assert all(torch.equal(b, masks_.targets) for b in masks_.level_blocks)
