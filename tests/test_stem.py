"""model.stem=conv: a stride-2 3x3 convolution stack in place of the patch projection."""

import pytest
import torch

from hjepa.config import ConfigError
from hjepa.export import export_run, load_exported_encoder
from hjepa.models.hjepa import build_encoder
from hjepa.models.vit import ConvStem, VisionTransformer, input_channels
from hjepa.train.trainer import Trainer


def _encoder(stem: str, patch_size: int = 4) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(28, patch_size, 1, 32, 2, 2, stem=stem)


def test_conv_stem_keeps_the_token_grid_of_the_patch_embedding():
    images = torch.rand(2, 1, 28, 28)
    patch, conv = _encoder("patch"), _encoder("conv")
    assert conv.grid_size == patch.grid_size == 7
    assert conv(images).shape == patch(images).shape == (2, 49, 32)
    assert not hasattr(conv, "patch_embed") and not hasattr(patch, "stem")
    # patch 4 -> two stride-2 convolutions (16 then 32 channels) and the 1x1 projection
    convs = [m for m in conv.stem.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in convs] == [
        (1, 16, (2, 2)),
        (16, 32, (2, 2)),
        (32, 32, (1, 1)),
    ]
    assert len(_encoder("conv", 2).stem.convs) == 2  # one conv + GELU for patch 2


def _changed_cells(stem: ConvStem, row: int, col: int) -> set[tuple[int, int]]:
    images = torch.rand(1, 1, 28, 28)
    moved = images.clone()
    moved[0, 0, row, col] += 1.0
    diff = (stem(moved) - stem(images)).abs().sum(1)[0]  # [7, 7]
    return {(int(r), int(c)) for r, c in (diff > 1e-6).nonzero()}


def test_conv_stem_receptive_fields_overlap_by_hand_count():
    """Two 3x3/stride-2/pad-1 convolutions: cell b sees pixels 4b-3 .. 4b+3 on each axis.
    So pixel 0 reaches cell 0 only, pixel 4 cell 1 only, pixel 3 cells 0 and 1; a patch
    embedding would map every pixel to exactly one cell."""
    torch.manual_seed(0)
    stem = ConvStem(1, 32, 4)
    assert _changed_cells(stem, 0, 0) == {(0, 0)}
    assert _changed_cells(stem, 4, 4) == {(1, 1)}
    assert _changed_cells(stem, 3, 4) == {(0, 1), (1, 1)}
    assert _changed_cells(stem, 3, 3) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert _changed_cells(stem, 27, 27) == {(6, 6)}


def test_conv_stem_needs_a_power_of_two_patch(tiny_config):
    with pytest.raises(ValueError, match="power-of-2"):
        ConvStem(1, 32, 3)
    with pytest.raises(ConfigError, match="model.stem=conv needs a power-of-2"):
        tiny_config("data.image_size=30", "model.patch_size=6", "model.stem=conv")
    with pytest.raises(ConfigError, match="model.stem='convnext' is not one of"):
        tiny_config("model.stem=convnext")


def test_conv_stem_trains_and_exports(tiny_config, tmp_path):
    cfg = tiny_config("train.max_steps=2", "model.stem=conv")
    trainer = Trainer(cfg)
    before = trainer.model.context_encoder.stem.convs[0].weight.detach().clone()
    trainer.fit()
    after = trainer.model.context_encoder.stem.convs[0].weight
    assert not torch.equal(before, after)  # the stem is trained, not a fixed front end
    state = trainer.model.target_encoder.state_dict()
    assert input_channels(state) == 1
    assert input_channels(build_encoder(tiny_config().model, 32, 3).state_dict()) == 3
    weights, _ = export_run(tmp_path / "run")
    encoder = load_exported_encoder(weights)
    images = torch.rand(2, 1, 32, 32)
    reference = build_encoder(cfg.model, 32, 1)
    reference.load_state_dict(state)
    assert torch.equal(encoder(images), reference.eval()(images))


# -- loss.view_sigreg: SIGReg on each view's pooled embedding (LeJEPA) -------------------------


def test_view_sigreg_is_the_mean_sigreg_of_every_views_pooled_embedding(tiny_config):
    from hjepa.losses.sigreg import SIGReg

    cfg = tiny_config(
        "loss.regularizer=sigreg",
        "data.multicrop.num_local=2",
        "data.multicrop.local_size=16",
        "loss.view_sigreg=0.5",
    )
    trainer = Trainer(cfg)
    images = next(iter(trainer.loader.iter_epoch(0)))[0]
    x, index, views = trainer.inputs(images, 0)
    out = trainer.model(x, index, views)
    b = x.shape[0]
    local = trainer.model.context_encoder(views).mean(dim=1)
    torch.testing.assert_close(out.pooled_local, local)
    total, terms = trainer.objective(out, step=3)
    sig = SIGReg(cfg.loss.sigreg_slices, seed=1)
    sets = [out.context.mean(dim=1), local[:b], local[b:]]
    expected = sum(sig(z, step=3) for z in sets) / 3
    torch.testing.assert_close(terms["view_sigreg"], expected)
    weights = trainer.objective.weights
    assert weights["view_sigreg"] == 0.5
    torch.testing.assert_close(total, sum(weights[k] * v for k, v in terms.items()))
    total.backward()  # it trains the encoder through the pooled embeddings
    assert trainer.model.context_encoder.blocks[0].mlp[0].weight.grad.abs().sum() > 0


def test_view_sigreg_needs_local_crops(tiny_config):
    with pytest.raises(ConfigError, match="data.multicrop.num_local >= 1"):
        tiny_config("loss.view_sigreg=0.1")
    with pytest.raises(ConfigError, match="loss.view_sigreg=-0.1 must be >= 0"):
        tiny_config("loss.view_sigreg=-0.1")
