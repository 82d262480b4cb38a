"""model.stem=conv/deepconv/convpool: convolution stacks in place of the patch projection."""

import pytest
import torch

from hjepa.config import ConfigError
from hjepa.data.masks import MultiBlockMaskSampler
from hjepa.export import export_run, load_exported_encoder
from hjepa.models.hjepa import build_encoder
from hjepa.models.vit import ConvStem, VisionTransformer, input_channels
from hjepa.train.trainer import Trainer
from tests.benchmark_scripts import load_benchmark


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
    for kind in ("deepconv", "convpool"):
        with pytest.raises(ConfigError, match=f"model.stem={kind} needs a power-of-2"):
            tiny_config("data.image_size=30", "model.patch_size=6", f"model.stem={kind}")
        with pytest.raises(ValueError, match="power-of-2"):
            ConvStem(1, 32, 1, kind)
    with pytest.raises(ValueError, match="conv stem kind 'patch' is not one of"):
        ConvStem(1, 32, 4, "patch")


@pytest.mark.parametrize("kind", ["conv", "deepconv", "convpool"])
def test_conv_stem_trains_and_exports(tiny_config, tmp_path, kind):
    cfg = tiny_config("train.max_steps=2", f"model.stem={kind}")
    trainer = Trainer(cfg)
    before = trainer.model.context_encoder.stem.convs[0].weight.detach().clone()
    trainer.fit()
    after = trainer.model.context_encoder.stem.convs[0].weight
    assert not torch.equal(before, after)  # the stem is trained, not a fixed front end
    state = trainer.model.target_encoder.state_dict()
    assert input_channels(state) == 1
    assert input_channels(build_encoder(tiny_config().model, 32, 3).state_dict()) == 3
    assert input_channels(build_encoder(cfg.model, 32, 3).state_dict()) == 3
    weights, _ = export_run(tmp_path / "run")
    encoder = load_exported_encoder(weights)
    images = torch.rand(2, 1, 32, 32)
    reference = build_encoder(cfg.model, 32, 1)
    reference.load_state_dict(state)
    assert torch.equal(encoder(images), reference.eval()(images))


def _layers(stem: ConvStem) -> list[tuple]:
    return [
        ("conv", m.in_channels, m.out_channels, m.stride[0])
        if isinstance(m, torch.nn.Conv2d)
        else ("pool", m.kernel_size)
        for m in stem.convs
        if isinstance(m, torch.nn.Conv2d | torch.nn.MaxPool2d)
    ]


def test_deeper_stems_have_their_layouts_and_the_patch_grid():
    # patch 4, width 32: two halving stages of 16 then 32 channels, then the 1x1 projection
    assert _layers(ConvStem(1, 32, 4, "deepconv")) == [
        ("conv", 1, 16, 1),
        ("conv", 16, 16, 2),
        ("conv", 16, 32, 1),
        ("conv", 32, 32, 2),
    ]
    assert _layers(ConvStem(1, 32, 4, "convpool")) == [
        ("conv", 1, 16, 1),
        ("pool", 2),
        ("conv", 16, 32, 1),
        ("pool", 2),
    ]
    images = torch.rand(2, 3, 32, 32)
    for kind in ("conv", "deepconv", "convpool"):
        for patch in (2, 4, 8, 16):
            stem = ConvStem(3, 32, patch, kind)
            assert len(_layers(stem)) == (1 if kind == "conv" else 2) * (patch.bit_length() - 1)
            assert stem(images).shape == (2, 32, 32 // patch, 32 // patch)
    for kind in ("deepconv", "convpool"):
        torch.manual_seed(0)
        encoder = VisionTransformer(28, 4, 1, 32, 2, 2, stem=kind)
        assert encoder(torch.rand(2, 1, 28, 28)).shape == (2, 49, 32)
        assert not hasattr(encoder, "patch_embed")


@pytest.mark.parametrize(
    "kind, field", [("conv", (-3, 7)), ("deepconv", (-6, 13)), ("convpool", (-3, 10))]
)
def test_receptive_field_is_the_set_of_tokens_a_pixel_moves(kind, field):
    """By hand, patch 4: conv: 4b-3 .. 4b+3; deepconv: a stride-1 conv (+-1 pixel) before
    each stride-2 one adds 1 + 2 = 3 pixels on each side: 4b-6 .. 4b+6; convpool: conv (+-1),
    pool (+1 on the right), conv at stride 2 (+-2), pool (+2 on the right): 4b-3 .. 4b+6.
    A large push (+-50) makes a moved pixel win the max of every pool window it reaches."""
    torch.manual_seed(0)
    stem = ConvStem(1, 32, 4, kind)
    assert stem.receptive_field() == field
    first, size = field
    images = torch.rand(1, 1, 28, 28)
    for pixel in range(28):
        expected = {b for b in range(7) if first + 4 * b <= pixel < first + 4 * b + size}
        for push in (50.0, -50.0):
            moved = images.clone()
            moved[0, 0, pixel, pixel] += push
            diff = (stem(moved) - stem(images)).abs().sum(1)[0]  # [7, 7]
            cells = {(int(r), int(c)) for r, c in (diff > 1e-6).nonzero()}
            assert cells == {(r, c) for r in expected for c in expected}, (pixel, push)


def test_leaked_target_fraction_matches_the_tokens_the_pixels_move():
    """benchmarks/stem_cost.py: the target pixels inside some context token's receptive field,
    from the analytic field, equal those whose change moves a context token of the stem."""
    cost = load_benchmark("stem_cost")
    masks = MultiBlockMaskSampler(7, levels=3).sample(3, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    stem = ConvStem(1, 32, 4, "deepconv")
    images = torch.rand(3, 1, 28, 28)
    base = stem(images).flatten(2)  # [3, 32, 49]
    moved_context = torch.zeros(3, 28, 28, dtype=torch.bool)
    for y in range(28):
        for x in range(28):
            moved = images.clone()
            moved[:, 0, y, x] += 50.0
            changed = (stem(moved).flatten(2) - base).abs().sum(1) > 1e-6  # [3, 49]
            moved_context[:, y, x] = (changed & masks.context).any(1)
    target = masks.targets.any(1).view(3, 7, 7)
    target_px = target.repeat_interleave(4, 1).repeat_interleave(4, 2)
    by_hand = (moved_context & target_px).sum((1, 2)) / target_px.sum((1, 2))
    got = cost.leaked_fraction(masks, *stem.receptive_field(), 4, 28)
    torch.testing.assert_close(got, by_hand)
    assert (got > 0).all()  # deepconv context tokens do see target pixels
    assert (cost.leaked_fraction(masks, 0, 4, 4, 28) == 0).all()  # a patch embedding never


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
