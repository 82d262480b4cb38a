"""EMA-free mode (``model.target=shared``): targets from the context encoder itself."""

import json

import pytest
import torch

from hjepa.config import ConfigError, load_config
from hjepa.data.masks import MultiBlockMaskSampler
from hjepa.models.hjepa import HJEPA, MaskIndices, build_encoder, level_features
from hjepa.models.vit import gather_tokens
from hjepa.train.trainer import Trainer
from tests.conftest import TINY
from tests.test_train import _all_state

SHARED = ["model.target=shared", "loss.regularizer=sigreg", "loss.sigreg_slices=64"]


def _model(*overrides: str) -> HJEPA:
    cfg = load_config(None, [*TINY, *SHARED, *overrides])
    torch.manual_seed(0)
    return HJEPA(cfg.model, 32, 1)


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    masks = MultiBlockMaskSampler(8, levels=3).sample(4, gen)
    return torch.randn(4, 1, 32, 32, generator=gen), masks


def test_shared_target_without_a_regulariser_is_refused_with_the_reason():
    with pytest.raises(ConfigError) as e:
        load_config(None, [*TINY, "model.target=shared"])
    assert str(e.value) == (
        "model.target=shared needs loss.regularizer=sigreg (or vicreg): without an EMA "
        "teacher nothing stops the encoder from collapsing to a constant"
    )
    for regularizer in ("sigreg", "vicreg", "sigreg+vicreg"):
        cfg = load_config(None, [*TINY, "model.target=shared", f"loss.regularizer={regularizer}"])
        assert cfg.model.target == "shared"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.target_stop_grad=false"], "model.target_stop_grad=false needs model.target"),
        ([*SHARED, "train.ema_timing=before_step"], "has no EMA to time"),
        (["model.target=student"], "model.target='student' is not one of: ema, shared"),
    ],
)
def test_meaningless_target_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*TINY, *overrides])


def test_shared_mode_has_no_target_copy():
    model = _model()
    assert model.target_encoder is model.context_encoder
    assert "target_encoder" not in dict(model.named_children())
    assert not any(k.startswith("target_encoder.") for k in model.state_dict())
    ema = HJEPA(load_config(None, TINY).model, 32, 1)
    assert ema.target_encoder is not ema.context_encoder
    assert "target_encoder" in dict(ema.named_children())


@pytest.mark.parametrize("stop_grad", [True, False])
def test_shared_target_is_the_context_encoder_on_the_full_image(stop_grad):
    model = _model(f"model.target_stop_grad={str(stop_grad).lower()}", "model.drop_path=0.3")
    model.train()
    x, masks = _batch()
    targets = model.target_levels(x)
    assert model.context_encoder.training  # the eval-mode target pass restores train mode
    model.context_encoder.eval()  # the reference: the same encoder without drop path
    with torch.no_grad():
        expected = level_features(model.context_encoder(x), model.grid_size, 3)
    for got, want in zip(targets, expected):
        torch.testing.assert_close(got, want)
        assert got.requires_grad is not stop_grad
    model.train()
    out = model(x, masks)  # the loss's targets: those features at each level's target cells
    cells = MaskIndices.from_masks(masks).cells
    for lvl, target in enumerate(out.targets):
        assert target.requires_grad is not stop_grad
        want = gather_tokens(expected[lvl], cells[lvl].flatten(1)).reshape(target.shape)
        torch.testing.assert_close(target, want)


@pytest.mark.parametrize("stop_grad", [True, False])
def test_gradient_reaches_the_encoder_through_the_target_only_without_stop_grad(stop_grad):
    model = _model(f"model.target_stop_grad={str(stop_grad).lower()}")
    model.train()
    x, masks = _batch()
    out = model(x, masks)
    # Only the target path: the targets' sum as the loss.
    target_sum = sum(t.float().sum() for t in out.targets)
    weight = model.context_encoder.patch_embed.weight
    if stop_grad:
        assert not target_sum.requires_grad
    else:
        (grad,) = torch.autograd.grad(target_sum, weight, retain_graph=True)
        assert grad.abs().sum() > 0
    # The full prediction loss: the target path adds to the gradient only without stop-grad.
    loss = sum(torch.nn.functional.mse_loss(p, t) for p, t in zip(out.predictions, out.targets))
    (full,) = torch.autograd.grad(loss, weight, retain_graph=True)
    detached = sum(
        torch.nn.functional.mse_loss(p, t.detach()) for p, t in zip(out.predictions, out.targets)
    )
    (through_context,) = torch.autograd.grad(detached, weight)
    assert torch.equal(full, through_context) is stop_grad


def test_no_ema_update_in_shared_mode(tiny_config, monkeypatch, tmp_path):
    import hjepa.train.trainer as trainer_module

    def no_ema(*args, **kwargs):
        raise AssertionError("EMA update in shared mode")

    monkeypatch.setattr(trainer_module, "ema_update", no_ema)
    trainer = Trainer(tiny_config(*SHARED, "train.max_steps=2"))
    before = {k: v.clone() for k, v in trainer.model.context_encoder.state_dict().items()}
    trainer.fit()
    assert trainer.step == 2
    encoder = trainer.model.context_encoder
    assert trainer.model.target_encoder is encoder
    assert any(not torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").open()]
    train = [r for r in records if r["kind"] == "train"]
    assert train and all("ema_momentum" not in r for r in train)  # nothing to log
    assert all("sigreg" in r for r in train)


def test_ema_mode_still_calls_the_ema(tiny_config, monkeypatch):
    import hjepa.train.trainer as trainer_module

    calls = []
    monkeypatch.setattr(trainer_module, "ema_update", lambda *a: calls.append(a[2]))
    Trainer(tiny_config("train.max_steps=2")).fit()
    assert len(calls) == 2


def test_checkpoint_and_eval_use_the_shared_encoder(tiny_config, tmp_path):
    trainer = Trainer(tiny_config(*SHARED, "train.max_steps=2"))
    trainer.fit()
    state = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    assert state["target_encoder"].keys() == state["context_encoder"].keys()
    for key, value in state["context_encoder"].items():
        assert torch.equal(state["target_encoder"][key], value), key
    # What `hjepa eval` does: a fresh encoder loads the checkpoint's target_encoder.
    encoder = build_encoder(trainer.cfg.model, 32, 1)
    encoder.load_state_dict(state["target_encoder"])
    encoder.eval()
    trainer.model.context_encoder.eval()
    x, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), trainer.model.context_encoder(x))


def test_resume_in_shared_mode_is_bit_identical(tiny_config, tmp_path):
    common = [*SHARED, "model.target_stop_grad=false", "train.max_steps=4"]
    common += ["model.drop_path=0.1", "run.checkpoint_every=100"]
    full = Trainer(tiny_config(*common, f"run.dir={tmp_path / 'full'}"))
    full.fit()
    Trainer(tiny_config(*common, "train.stop_after=2", f"run.dir={tmp_path / 'part'}")).fit()
    resumed = Trainer(tiny_config(*common, f"run.dir={tmp_path / 'part'}"))
    resumed.fit()
    a, b = _all_state(full), _all_state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # An EMA run cannot resume a shared one (the architecture differs): refused.
    with pytest.raises(ConfigError, match="different architecture"):
        Trainer(tiny_config("train.max_steps=4", f"run.dir={tmp_path / 'part'}")).fit()
