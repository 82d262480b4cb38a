"""The attentive probe: the textbook cross-attention it computes, what it sees that mean pooling
cannot, its validation choice and determinism; the pixel tokens it reads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hjepa.config import EvalConfig
from hjepa.eval.attentive import (
    DEFAULT_EPOCHS,
    DEFAULT_LRS,
    DEFAULT_WEIGHT_DECAYS,
    AttentivePooler,
    TokenScaler,
    attentive_probe,
    fit_attentive_probe,
    init_probe,
    lr_factor,
)
from hjepa.eval.features import patchify, pixel_tokens
from hjepa.eval.linear import linear_probe
from hjepa.models.vit import sincos_2d

SMALL = dict(width=16, num_heads=2, epochs=8, lrs=(1e-2,), weight_decays=(0.01,), batch_size=64)


def marker_task(n: int, seed: int, positions: int = 8, classes: int = 4):
    """Tokens with a one-hot position code, one of which (at position = class) carries a
    marker. Every image has the same token multiset up to noise, so the mean over tokens
    says nothing about the class; only *which* token holds the marker does."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    position_code = torch.eye(positions).expand(n, -1, -1)
    marker = F.one_hot(labels, positions).float().unsqueeze(-1) * 3.0
    noise = 0.3 * torch.randn(n, positions, 4, generator=g)
    return torch.cat([marker, position_code, noise], dim=-1), labels


def test_the_attentive_probe_reads_a_token_that_mean_pooling_cannot_see():
    (xtr, ytr), (xte, yte) = marker_task(1200, 0), marker_task(400, 1)
    attentive = attentive_probe(xtr, ytr, xte, yte, 4, seed=0, **SMALL)
    pooled = linear_probe(xtr.mean(1), ytr, xte.mean(1), yte, 4, weight_decays=(1e-3,))
    assert attentive > 0.95
    assert pooled["accuracy"] < 0.4  # chance is 0.25


def reference_pooler(pooler: AttentivePooler, tokens: torch.Tensor) -> torch.Tensor:
    """The textbook block: project every token to keys and values, attend, then the MLP."""
    h, d = pooler.num_heads, pooler.head_dim
    b, n, _ = tokens.shape
    q = pooler.query_proj(pooler.queries)  # [R, W]
    k = F.linear(tokens, pooler.key_proj.weight)  # [B, N, W], no key bias
    v = pooler.value_proj(tokens)
    q = q.view(-1, h, d).transpose(0, 1)  # [H, R, d]
    k, v = (t.view(b, n, h, d).transpose(1, 2) for t in (k, v))  # [B, H, N, d]
    attention = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(dim=-1)  # [B, H, R, N]
    out = (attention @ v).transpose(1, 2).flatten(2)  # [B, R, W]
    z = pooler.queries + pooler.out_proj(out)
    return z + pooler.mlp(z)


def test_the_pooler_computes_textbook_cross_attention():
    torch.manual_seed(0)
    pooler = AttentivePooler(in_dim=12, width=16, num_heads=4, num_queries=3)
    init_probe(pooler, torch.Generator().manual_seed(1))
    with torch.no_grad():  # make every parameter matter (init leaves biases at zero)
        for p in pooler.parameters():
            p.add_(0.3 * torch.randn(p.shape))
    tokens = torch.randn(5, 7, 12)
    out = pooler(tokens)
    assert out.shape == (5, 3, 16)
    torch.testing.assert_close(out, reference_pooler(pooler, tokens), rtol=1e-5, atol=1e-5)


def test_same_seed_same_numbers_whatever_the_thread_count():
    (xtr, ytr), (xte, yte) = marker_task(300, 2), marker_task(100, 3)
    options = dict(SMALL, epochs=2, lrs=(3e-3, 1e-2))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(fit_attentive_probe(xtr, ytr, xte, yte, 4, seed=5, **options))
            assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(threads)
    assert results[0] == results[1]
    other = fit_attentive_probe(xtr, ytr, xte, yte, 4, seed=6, **options)
    assert other.val_accuracy != results[0].val_accuracy  # the seed splits and initialises


def test_validation_picks_the_learning_rate_that_learns():
    (xtr, ytr), (xte, yte) = marker_task(800, 4), marker_task(200, 5)
    options = dict(SMALL, lrs=(0.0, 1e-2))  # a zero learning rate never leaves chance
    result = fit_attentive_probe(xtr, ytr, xte, yte, 4, seed=0, **options)
    assert result.lr == 1e-2 and result.weight_decay == 0.01
    assert result.val_accuracy > 0.9 and result.accuracy > 0.9
    alone = fit_attentive_probe(xtr, ytr, xte, yte, 4, seed=0, **dict(SMALL, lrs=(1e-2,)))
    assert alone == result  # lockstep training: each probe as if trained alone


def test_several_token_sets_get_one_pooler_each():
    """Sets of other widths and token counts: noise first, the marker task second. A probe
    that read only one set, or mixed them up, would stay at chance."""
    (xtr, ytr), (xte, yte) = marker_task(1200, 6), marker_task(400, 7)
    g = torch.Generator().manual_seed(8)
    noise_tr, noise_te = torch.randn(1200, 5, 3, generator=g), torch.randn(400, 5, 3, generator=g)
    both = attentive_probe([noise_tr, xtr], ytr, [noise_te, xte], yte, 4, seed=0, **SMALL)
    noise_only = attentive_probe(noise_tr, ytr, noise_te, yte, 4, seed=0, **SMALL)
    assert both > 0.95 and noise_only < 0.4


def test_pixel_tokens_are_the_image_patches_plus_positions():
    g = torch.Generator().manual_seed(0)
    for channels, size, patch in ((3, 12, 4), (1, 9, 3)):
        images = torch.randn(2, channels, size, size, generator=g)
        tokens = pixel_tokens(images.flatten(1), channels, patch)
        grid, width = size // patch, channels * patch * patch
        patches = torch.stack(
            [
                images[:, :, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch].flatten(1)
                for r in range(grid)
                for c in range(grid)
            ],
            dim=1,
        )  # row-major, each patch channel by channel
        assert tokens.shape == patches.shape == (2, grid * grid, width)
        torch.testing.assert_close(patchify(images, patch), patches, rtol=0, atol=0)
        table = tokens - patches
        code = width - width % 4
        torch.testing.assert_close(table[0], table[1])  # the same code for every image
        torch.testing.assert_close(table[0, :, :code], sincos_2d(code, grid))
        assert torch.all(table[0, :, code:].abs() < 1e-6)  # zero-padded past a multiple of 4
        assert torch.unique(table[0], dim=0).shape[0] == grid * grid  # every position its own


def test_token_scaler_standardises_every_channel():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(300, 5, 3, generator=g) * torch.tensor([1.0, 4.0, 0.0]) + 2.0
    scaled = TokenScaler.fit(tokens, chunk=7)(tokens).flatten(0, 1)
    torch.testing.assert_close(scaled.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(scaled[:, :2].std(0, correction=0), torch.ones(2))
    assert torch.all(scaled[:, 2] == 0)  # a constant channel stays finite


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, 100) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0
    assert all(a >= b for a, b in zip(factors[9:], factors[10:], strict=False))
    assert factors[-1] < 1e-3


def test_bad_input_is_refused():
    x, y = marker_task(50, 0)
    with pytest.raises(ValueError, match=r"\[N, T, D\]"):
        attentive_probe(x, y, x[..., :3], y, 4)
    with pytest.raises(ValueError, match="labels"):
        attentive_probe(x, y, x, y + 4, 4)
    with pytest.raises(ValueError, match="epochs"):
        attentive_probe(x, y, x, y, 4, epochs=0)


def test_the_config_defaults_are_the_probes_defaults():
    e = EvalConfig()
    assert e.attentive_epochs == DEFAULT_EPOCHS
    assert tuple(e.attentive_lrs) == DEFAULT_LRS
    assert tuple(e.attentive_weight_decays) == DEFAULT_WEIGHT_DECAYS
