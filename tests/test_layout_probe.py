"""benchmarks/layout_probe.py: each level's cells kept in grid order, or averaged."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.benchmark_scripts import load_benchmark


def _module():
    return load_benchmark("layout_probe")


def test_grid_features_keep_every_cell_in_place_and_the_mean_averages_them():
    torch.manual_seed(0)
    tokens = torch.randn(2, 49, 8)  # a 7x7 grid of 8-wide tokens
    feats = _module().layout_features(tokens, grid_size=7, levels=3)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "level0_mean": (2, 8),
        "level0_grid": (2, 49 * 8),
        "level1_mean": (2, 8),
        "level1_grid": (2, 16 * 8),
        "level2_mean": (2, 8),
        "level2_grid": (2, 4 * 8),
    }
    # level 0: the normalised tokens themselves, in token order
    norm = F.layer_norm(tokens, (8,))
    torch.testing.assert_close(feats["level0_grid"], norm.flatten(1))
    torch.testing.assert_close(feats["level0_mean"], norm.mean(dim=1))
    # level 2, first cell (ceil cells of a 7x7 grid: rows/cols 0-3): mean of its 16 tokens
    grid = tokens.reshape(2, 7, 7, 8)
    first = F.layer_norm(grid[:, :4, :4].reshape(2, 16, 8).mean(dim=1), (8,))
    torch.testing.assert_close(feats["level2_grid"][:, :8], first)
    # the last level-2 cell holds rows/cols 4-6 only: 9 tokens, each counted once
    last = F.layer_norm(grid[:, 4:, 4:].reshape(2, 9, 8).mean(dim=1), (8,))
    torch.testing.assert_close(feats["level2_grid"][:, -8:], last)
    torch.testing.assert_close(
        feats["level2_mean"], feats["level2_grid"].reshape(2, 4, 8).mean(dim=1)
    )
