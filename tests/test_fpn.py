"""The top-down FPN over the per-level prediction grids (model.fpn)."""

import pytest
import torch

from hjepa.config import ConfigError, load_config
from hjepa.data.masks import MultiBlockMaskSampler
from hjepa.models.hierarchy import (
    TopDownFPN,
    masked_cell_mean,
    prediction_pyramid,
    scatter_level0,
    upsample_cells,
)
from hjepa.models.hjepa import HJEPA
from hjepa.train.trainer import Trainer


def test_upsample_cells_copies_the_parent():
    coarse = torch.arange(4.0).view(1, 1, 4, 1)  # a 2x2 grid, cell value = its index
    up = upsample_cells(coarse, 4, 0).view(4, 4)  # level 0 of a 4x4 grid
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]).float()
    assert torch.equal(up, expected)
    # 5x5 grid -> 3x3 parents (ceil): row 4 and column 4 read the smaller edge parents.
    coarse = torch.arange(9.0).view(1, 1, 9, 1)
    odd = upsample_cells(coarse, 5, 0).view(5, 5)
    rows = torch.tensor([0, 0, 1, 1, 2])
    assert torch.equal(odd, (rows[:, None] * 3 + rows[None, :]).float())


def test_prediction_pyramid_is_scatter_then_masked_cell_means():
    values = torch.randn(2, 3, 5, 4)
    index = torch.stack([torch.randperm(36)[:5] for _ in range(6)]).view(2, 3, 5)
    pyr = prediction_pyramid(values, index, 6, 3)
    assert [p.shape[2] for p in pyr] == [36, 9, 4]  # 6x6 -> 3x3 -> 2x2 (ceil)
    dense = scatter_level0(values, index, 6)
    for b in range(2):
        for m in range(3):
            torch.testing.assert_close(dense[b, m, index[b, m]], values[b, m])
            others = torch.ones(36, dtype=torch.bool)
            others[index[b, m]] = False
            assert (dense[b, m, others] == 0).all()
    torch.testing.assert_close(pyr[1], masked_cell_mean(values, index, 6, 1))
    torch.testing.assert_close(pyr[2], masked_cell_mean(values, index, 6, 2))


@pytest.mark.parametrize("fusion", ["add", "concat"])
def test_top_down_fusion_matches_the_formula(fusion):
    torch.manual_seed(0)
    fpn = TopDownFPN(4, 3, fusion)
    grid = 4
    pyr = [torch.randn(2, 1, (grid >> lvl) ** 2, 4) for lvl in range(3)]
    out = fpn(pyr, grid)
    f2 = fpn.lateral[2](pyr[2])
    lat1, lat0 = fpn.lateral[1](pyr[1]), fpn.lateral[0](pyr[0])
    if fusion == "add":
        f1 = lat1 + upsample_cells(f2, grid, 1)
        f0 = lat0 + upsample_cells(f1, grid, 0)
    else:
        f1 = fpn.fuse[1](torch.cat([lat1, upsample_cells(f2, grid, 1)], -1))
        f0 = fpn.fuse[0](torch.cat([lat0, upsample_cells(f1, grid, 0)], -1))
    for got, ref in zip(out, [f0, f1, f2]):
        torch.testing.assert_close(got, ref)


def _models(fpn: str, scale_mode: str = "constant"):
    overrides = [
        "data.image_size=32",
        "model.embed_dim=32",
        "model.depth=1",
        "model.num_heads=2",
        "model.predictor_embed_dim=16",
        "model.predictor_depth=1",
        "model.predictor_num_heads=2",
    ]
    cfg_off = load_config(None, overrides)
    cfg_on = load_config(None, [*overrides, f"model.fpn={fpn}"])
    torch.manual_seed(0)
    off = HJEPA(cfg_off.model, 32, 1)
    torch.manual_seed(0)
    on = HJEPA(cfg_on.model, 32, 1)
    masks = MultiBlockMaskSampler(8, levels=3, scale_mode=scale_mode).sample(
        2, torch.Generator().manual_seed(0)
    )
    return off, on, masks


@pytest.mark.parametrize("fpn", ["add", "concat"])
def test_fpn_changes_predictions_not_targets_and_gets_gradients(fpn):
    off, on, masks = _models(fpn)
    assert off.fpn is None and not any("fpn" in n for n, _ in off.named_parameters())
    assert off.optional_modules() == {} and set(on.optional_modules()) == {"fpn"}
    x = torch.randn(2, 1, 32, 32)
    out_off, out_on = off(x, masks), on(x, masks)
    for lvl in range(3):
        assert torch.equal(out_off.targets[lvl], out_on.targets[lvl])  # targets untouched
        assert out_on.predictions[lvl].shape == out_off.predictions[lvl].shape
        assert not torch.allclose(out_off.predictions[lvl], out_on.predictions[lvl])
    loss = sum(((p - t) ** 2).mean() for p, t in zip(out_on.predictions, out_on.targets))
    loss.backward()
    for p in on.fpn.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert on.predictor.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in on.target_encoder.parameters())
    assert any(
        p is on.fpn.lateral[0].weight for m in on.trainable_modules() for p in m.parameters()
    )


def test_each_level_sees_the_coarser_levels_only():
    _, on, masks = _models("add")
    on.eval()
    x = torch.randn(2, 1, 32, 32)
    base = on(x, masks).predictions
    with torch.no_grad():
        on.fpn.lateral[2].weight.add_(1.0)  # the coarsest lateral feeds every finer level
    top = on(x, masks).predictions
    assert all(not torch.allclose(a, b) for a, b in zip(base, top))
    with torch.no_grad():
        on.fpn.lateral[2].weight.sub_(1.0)
        on.fpn.lateral[0].weight.add_(1.0)  # the finest lateral feeds only level 0
    fine = on(x, masks).predictions
    assert not torch.allclose(base[0], fine[0])
    torch.testing.assert_close(base[1], fine[1])
    torch.testing.assert_close(base[2], fine[2])


def test_fpn_with_per_level_footprints():
    _, on, masks = _models("concat", scale_mode="gentle")
    out = on(torch.randn(2, 1, 32, 32), masks)
    for lvl in range(3):
        assert out.predictions[lvl].shape == out.targets[lvl].shape
        assert torch.isfinite(out.predictions[lvl]).all()


def test_fpn_is_checkpointed_and_needs_two_levels(tiny_config):
    with pytest.raises(ConfigError, match="not one of"):
        load_config(None, ["model.fpn=sum"])
    with pytest.raises(ConfigError, match="model.fpn needs model.levels >= 2"):
        load_config(None, ["model.fpn=add", "model.levels=1", "loss.level_weights=[1.0]"])
    trainer = Trainer(tiny_config("model.fpn=add", "train.max_steps=1"))
    trainer.fit()
    state = trainer.state_dict()
    assert set(state["fpn"]) == set(trainer.model.fpn.state_dict())
    fresh = Trainer(tiny_config("model.fpn=add", "train.max_steps=1"))
    fresh.load_state_dict(state)
    for k, v in trainer.model.fpn.state_dict().items():
        assert torch.equal(fresh.model.fpn.state_dict()[k], v)
