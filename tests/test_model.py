import math

import pytest
import torch
import torch.nn.functional as F

from hjepa.config import load_config
from hjepa.data.masks import MultiBlockMaskSampler, mask_to_index
from hjepa.models.hierarchy import cell_of_token, masked_cell_mean, pool_tokens
from hjepa.models.hjepa import HJEPA
from hjepa.models.predictor import Predictor
from hjepa.models.vit import VisionTransformer, sincos_2d


def test_sincos_2d_matches_formula():
    dim, grid = 8, 3
    table = sincos_2d(dim, grid)
    assert table.shape == (9, 8)
    # Token (r=1, c=2) is index 5: first half encodes the row, second half the column.
    r, c = 1, 2
    freqs = [1.0, 1.0 / 100.0]  # 1 / 10000 ** (i / 2) for i in 0, 1
    expected = (
        [math.sin(r * f) for f in freqs]
        + [math.cos(r * f) for f in freqs]
        + [math.sin(c * f) for f in freqs]
        + [math.cos(c * f) for f in freqs]
    )
    torch.testing.assert_close(table[5], torch.tensor(expected), atol=1e-6, rtol=0)
    assert len({tuple(row.tolist()) for row in table}) == 9  # every position distinct


def test_encoder_keep_all_equals_full_and_positions_follow_grid_index():
    torch.manual_seed(0)
    enc = VisionTransformer(16, 4, 1, 32, 2, 2).eval()
    x = torch.randn(2, 1, 16, 16)
    full = enc(x)
    keep = torch.arange(16).expand(2, -1)
    torch.testing.assert_close(enc(x, keep=keep), full)
    # A single kept token sees only itself: its output must depend on its grid index
    # (position), so the same patch content at index 0 and at index 5 gives different outputs.
    x2 = x.clone()
    x2[:, :, 4:8, 4:8] = x[:, :, 0:4, 0:4]  # token 5 gets token 0's pixels
    a = enc(x, keep=torch.zeros(2, 1, dtype=torch.long))
    b = enc(x2, keep=torch.full((2, 1), 5, dtype=torch.long))
    assert not torch.allclose(a, b)


def test_encoder_blocks_get_token_major_memory():
    """The patch grid is made token-major once: a transposed (channel-major) view would make
    every LayerNorm of every block copy its input first."""
    enc = VisionTransformer(16, 4, 1, 32, 2, 2)
    layouts = []
    for norm in [m for m in enc.modules() if isinstance(m, torch.nn.LayerNorm)]:
        norm.register_forward_pre_hook(lambda _, args: layouts.append(args[0].is_contiguous()))
    enc(torch.randn(2, 1, 16, 16))
    assert layouts == [True] * 5  # two per block and the final norm


def test_pool_tokens_matches_loops_with_ceil():
    """7x7 -> 4x4 -> 2x2 -> 1x1: every token in one cell, edge cells average what they hold."""
    grid, d = 7, 3
    tokens = torch.randn(2, grid * grid, d)
    g = tokens.view(2, grid, grid, d)
    for level, side in ((1, 4), (2, 2), (3, 1)):
        pooled = pool_tokens(tokens, grid, level)
        assert pooled.shape == (2, side * side, d)
        s = 2**level
        for i in range(side):
            for j in range(side):
                ref = g[:, s * i : s * (i + 1), s * j : s * (j + 1)].mean(dim=(1, 2))
                torch.testing.assert_close(pooled[:, i * side + j], ref)
    torch.testing.assert_close(pool_tokens(tokens, grid, 3)[:, 0], tokens.mean(1))


def test_cell_of_token_puts_every_token_in_a_cell():
    cells = cell_of_token(7, 1).view(7, 7)
    assert cells[0, 0] == 0 and cells[1, 1] == 0 and cells[2, 3] == 5
    assert cells[6].tolist() == [12, 12, 13, 13, 14, 14, 15]  # the 1-token-high edge row
    level2 = cell_of_token(7, 2).view(7, 7)
    assert level2[:4, :4].eq(0).all() and level2[4:, 4:].eq(3).all()
    assert torch.equal(cell_of_token(7, 2).bincount(), torch.tensor([16, 12, 12, 9]))


def test_masked_cell_mean_against_brute_force():
    grid, level = 6, 1
    values = torch.randn(2, 3, 5, 4)
    index = torch.stack([torch.randperm(36)[:5] for _ in range(6)]).view(2, 3, 5)
    out = masked_cell_mean(values, index, grid, level)
    for b in range(2):
        for m in range(3):
            for cell in range(9):
                ci, cj = divmod(cell, 3)
                sel = [
                    k
                    for k in range(5)
                    if index[b, m, k] // grid // 2 == ci and index[b, m, k] % grid // 2 == cj
                ]
                ref = values[b, m, sel].mean(0) if sel else torch.zeros(4)
                torch.testing.assert_close(out[b, m, cell], ref)


def test_predictor_blocks_do_not_see_each_other():
    torch.manual_seed(0)
    pred = Predictor(4, 32, 16, 2, 2).eval()
    ctx = torch.randn(1, 5, 32)
    ctx_idx = torch.tensor([[0, 1, 2, 3, 4]])
    tgt = torch.tensor([[[8, 9], [10, 11]]])
    tgt_changed = torch.tensor([[[8, 9], [14, 15]]])
    a, b = pred(ctx, ctx_idx, tgt), pred(ctx, ctx_idx, tgt_changed)
    assert a.shape == (1, 2, 2, 16)
    torch.testing.assert_close(a[:, 0], b[:, 0])  # block 0 is unaffected by block 1's positions
    assert not torch.allclose(a[:, 1], b[:, 1])


def _model_and_masks(levels=3, scale_mode="constant"):
    cfg = load_config(
        None,
        [
            "data.image_size=32",
            "model.patch_size=4",
            "model.embed_dim=32",
            "model.depth=2",
            "model.num_heads=2",
            "model.predictor_embed_dim=16",
            "model.predictor_depth=1",
            "model.predictor_num_heads=2",
            f"model.levels={levels}",
        ],
    )
    torch.manual_seed(0)
    model = HJEPA(cfg.model, 32, 1)
    sampler = MultiBlockMaskSampler(8, levels=levels, scale_mode=scale_mode)
    masks = sampler.sample(3, torch.Generator().manual_seed(0))
    return model, masks


def test_targets_are_layer_normed_pooled_target_features_without_gradient():
    model, masks = _model_and_masks()
    x = torch.randn(3, 1, 32, 32)
    out = model(x, masks)
    with torch.no_grad():
        h = model.target_encoder(x)
    for lvl in range(3):
        full = F.layer_norm(pool_tokens(h, 8, lvl), (32,))
        idx = mask_to_index(masks.level_targets[lvl])
        ref = torch.stack([full[b, idx[b]] for b in range(3)])
        torch.testing.assert_close(out.targets[lvl], ref)
        assert not out.targets[lvl].requires_grad
        assert out.predictions[lvl].shape == out.targets[lvl].shape
    loss = sum(((p - t) ** 2).mean() for p, t in zip(out.predictions, out.targets))
    loss.backward()
    assert all(p.grad is None for p in model.target_encoder.parameters())
    assert model.context_encoder.patch_embed.weight.grad is not None
    assert all(head[0].weight.grad is not None for head in model.heads)


def test_targets_do_not_depend_on_trainable_modules():
    model, masks = _model_and_masks()
    x = torch.randn(3, 1, 32, 32)
    before = [t.clone() for t in model(x, masks).targets]
    with torch.no_grad():
        for mod in model.trainable_modules():
            for p in mod.parameters():
                p.add_(torch.randn_like(p))
    after = model(x, masks).targets
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b)


def test_coarse_prediction_is_masked_mean_of_level0_predictions_then_head():
    model, masks = _model_and_masks(levels=2)
    x = torch.randn(3, 1, 32, 32)
    model.eval()
    out = model(x, masks)
    ctx_idx, tgt_idx = mask_to_index(masks.context), mask_to_index(masks.targets)
    ctx = model.context_encoder(x, keep=ctx_idx)
    raw = model.predictor(ctx, ctx_idx, tgt_idx)  # [B, M, K, Dp]
    cells = mask_to_index(masks.level_targets[1])
    for b in range(3):
        for m in range(masks.targets.shape[1]):
            for k, cell in enumerate(cells[b, m].tolist()):
                ci, cj = divmod(cell, 4)
                inside = [
                    n
                    for n, tok in enumerate(tgt_idx[b, m].tolist())
                    if tok // 8 // 2 == ci and tok % 8 // 2 == cj
                ]
                ref = model.heads[1](raw[b, m, inside].mean(0))
                torch.testing.assert_close(out.predictions[1][b, m, k], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["gentle", "geometric"])
def test_non_constant_modes_predict_each_levels_own_footprint(mode):
    model, masks = _model_and_masks(scale_mode=mode)
    out = model(torch.randn(3, 1, 32, 32), masks)
    for lvl in range(3):
        assert out.predictions[lvl].shape[2] == masks.level_targets[lvl].sum(-1)[0, 0]
        assert torch.isfinite(out.predictions[lvl]).all()
