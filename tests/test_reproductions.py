"""The ablation's reproductions are ordinary options: valid from Python with no registry call."""

import pytest
import torch

from hjepa.data.footprints import GENTLE, GEOMETRIC
from hjepa.data.masks import MultiBlockMaskSampler
from hjepa.train.trainer import Trainer


def test_reproductions_need_no_registry_call(tiny_config):
    assert MultiBlockMaskSampler(8, scale_mode="geometric").rule is GEOMETRIC
    assert MultiBlockMaskSampler(8, scale_mode="gentle").rule is GENTLE
    trainer = Trainer(tiny_config("train.ema_timing=before_step"))
    assert not trainer.ema_after_step  # the pre-step hook takes the EMA instead
    target = [p.clone() for p in trainer.model.target_encoder.parameters()]
    online = [p.detach().clone() for p in trainer.model.context_encoder.parameters()]
    trainer.train_step(next(trainer.step_batches()))
    m = trainer.momentum_at(0)
    # The EMA averaged the weights from before the step: the pre-step online weights.
    for t0, o0, t1 in zip(target, online, trainer.model.target_encoder.parameters()):
        torch.testing.assert_close(t1, torch.lerp(t0, o0, 1.0 - m))


def test_an_unknown_scale_mode_is_refused():
    with pytest.raises(ValueError, match=r"scale_mode='wide' is unknown: use one of"):
        MultiBlockMaskSampler(8, scale_mode="wide")


def test_the_default_uses_no_reproduction(tiny_config):
    trainer = Trainer(tiny_config())
    assert trainer.ema_after_step and trainer.inputs.draws.sampler.rule is None
    sampler = MultiBlockMaskSampler(8, levels=3)
    masks_ = sampler.sample(2, torch.Generator().manual_seed(0))
    # Constant mode: every level is built from the level-0 target blocks themselves.
    assert all(torch.equal(b, masks_.targets) for b in masks_.level_blocks)
