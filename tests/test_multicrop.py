"""Multi-crop local views and the view-prediction loss term (data.multicrop.*)."""

import json

import pytest
import torch
import torch.nn.functional as F

from hjepa.config import ConfigError, load_config
from hjepa.data.multicrop import LocalCrops
from hjepa.train.trainer import Trainer


def _images(b=4, c=1, size=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, size, size), generator=gen, dtype=torch.uint8)


def test_local_crops_shapes_order_and_determinism():
    crops = LocalCrops(3, 16, scale=(0.05, 0.4))
    images = _images()
    views = crops(images, torch.Generator().manual_seed(0))
    assert views.shape == (12, 1, 16, 16) and views.dtype == torch.float32
    again = crops(images, torch.Generator().manual_seed(0))
    assert torch.equal(views, again)
    assert not torch.equal(views, crops(images, torch.Generator().manual_seed(1)))
    # View-major: view v of every image is rows v*B .. v*B+B-1, each an independent crop.
    per_view = views.view(3, 4, 1, 16, 16)
    assert not torch.allclose(per_view[0], per_view[1])
    assert views.min() >= -1.0 - 1e-6 and views.max() <= 1.0 + 1e-6  # (x/255 - .5) / .5
    # A constant image gives constant views: crops only resample the image itself.
    flat = torch.full((2, 1, 32, 32), 200, dtype=torch.uint8)
    torch.testing.assert_close(
        crops(flat, torch.Generator().manual_seed(0)), torch.full((6, 1, 16, 16), 200 / 127.5 - 1)
    )
    with pytest.raises(ValueError, match="num_local"):
        LocalCrops(0, 16)


def test_local_crops_follow_the_global_batch_under_sharding():
    crops = LocalCrops(2, 8)
    images = _images(6)
    whole = crops(images, torch.Generator().manual_seed(3)).view(2, 6, 1, 8, 8)
    for rank in range(2):
        part = crops(images[rank::2], torch.Generator().manual_seed(3), shard=(rank, 2))
        torch.testing.assert_close(part.view(2, 3, 1, 8, 8), whole[:, rank::2])


def test_num_local_zero_builds_nothing(tiny_config):
    trainer = Trainer(tiny_config())
    assert trainer.inputs.local_crops is None and trainer.model.view_projector is None
    micro, images = next(trainer.batches())
    assert trainer.inputs(images, micro)[2] is None
    assert "view_projector" not in trainer.state_dict()


def test_view_prediction_loss_formula_and_gradients(tiny_config):
    trainer = Trainer(tiny_config("data.multicrop.num_local=2", "data.multicrop.local_size=16"))
    model = trainer.model
    model.eval()
    torch.nn.init.normal_(model.view_projector.weight, std=0.2)
    micro, images = next(trainer.batches())
    x, index, views = trainer.inputs(images, micro)
    assert views.shape == (32, 1, 16, 16)
    out = model(x, index, views)
    pooled_target = model.target_levels(x)[0].mean(1)
    torch.testing.assert_close(out.pooled_target, pooled_target)
    z = model.view_projector(model.context_encoder(views).mean(1))
    total_var = sum(pooled_target[:, d].var(unbiased=False) for d in range(z.shape[1]))
    rows = [((z[r] - pooled_target[r % 16]) ** 2).sum() for r in range(32)]  # view-major
    ref = torch.stack(rows).mean() / (total_var + 1e-6)
    torch.testing.assert_close(out.view_loss, ref)
    model.zero_grad()
    out.view_loss.backward()
    assert model.view_projector.weight.grad.abs().sum() > 0
    assert model.context_encoder.patch_embed.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.target_encoder.parameters())  # stop-gradient


def test_view_term_follows_the_models_target_function(tiny_config, monkeypatch):
    """The pooled target comes from ``HJEPA.target_levels`` (what an EMA-free mode swaps)."""
    trainer = Trainer(tiny_config("data.multicrop.num_local=1", "data.multicrop.local_size=8"))
    model = trainer.model.eval()
    micro, images = next(trainer.batches())
    x, index, views = trainer.inputs(images, micro)
    shared = [t.detach() for t in trainer.model.target_levels(x)]
    shared[0] = shared[0] * 0 + 3.0  # every target 3: zero batch variance
    monkeypatch.setattr(model, "target_levels", lambda images: shared)
    out = model(x, index, views)
    torch.testing.assert_close(out.pooled_target, torch.full_like(out.pooled_target, 3.0))
    z = model.view_projector(model.context_encoder(views).mean(1))
    expected = F.mse_loss(z, torch.full_like(z, 3.0)) * z.shape[1] / 1e-6
    torch.testing.assert_close(out.view_loss, expected, rtol=1e-4, atol=0)


def test_multicrop_term_is_weighted_logged_and_decreases(tiny_config, tmp_path):
    cfg = tiny_config(
        "data.multicrop.num_local=2",
        "data.multicrop.local_size=16",
        "data.multicrop.weight=2.0",
        "optim.start_lr=3e-4",
        "optim.lr=3e-4",
        "train.max_steps=10",
    )
    trainer = Trainer(cfg)
    trainer.model.train()
    batch = next(trainer.step_batches())
    terms, losses = [], []
    for _ in range(10):  # a fixed batch (same crops and masks every step)
        loss, *parts = trainer.train_step(batch).terms
        terms.append(parts[-1].item())
        losses.append(loss.item())
        levels = sum(w * p for w, p in zip(trainer.weights, parts[:-1]))
        assert loss.item() == pytest.approx(levels.item() + 2.0 * parts[-1].item(), rel=1e-5)
    assert all(torch.isfinite(torch.tensor(terms)))
    assert terms[-1] < 0.75 * terms[0]  # measured: 0.138 -> 0.085 in 10 steps
    assert losses[-1] < losses[0]
    # Through fit(): the term is logged under its own name.
    fresh = Trainer(tiny_config("data.multicrop.num_local=2", "train.max_steps=2"))
    fresh.fit()
    records = [json.loads(r) for r in (tmp_path / "run/metrics.jsonl").open()]
    train = [r for r in records if r["kind"] == "train"]
    assert "multicrop" in train[-1] and train[-1]["multicrop"] >= 0
    assert set(fresh.state_dict()["view_projector"]) == {"weight", "bias"}


def test_resuming_without_multicrop_is_refused(tiny_config):
    Trainer(tiny_config("data.multicrop.num_local=1", "train.max_steps=1")).fit()
    with pytest.raises(ConfigError, match="multi-crop"):
        Trainer(tiny_config("train.max_steps=2")).fit()


def test_multicrop_settings_are_validated():
    with pytest.raises(ConfigError, match="multiple of"):
        load_config(None, ["data.multicrop.num_local=2", "data.multicrop.local_size=14"])
    with pytest.raises(ConfigError, match="at most data.image_size"):
        load_config(None, ["data.multicrop.num_local=2", "data.multicrop.local_size=32"])
    with pytest.raises(ConfigError, match="weight must be > 0"):
        load_config(None, ["data.multicrop.num_local=2", "data.multicrop.weight=0"])
    assert load_config(None, ["data.multicrop.num_local=4"]).data.multicrop.local_size == 16
