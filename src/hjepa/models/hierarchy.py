"""Spatial hierarchy over the level-0 token grid.

Level ``l`` average-pools the ``G x G`` grid by ``s = 2**l`` in 2D with floor, so cell ``(i, j)``
covers rows ``[i*s, (i+1)*s)`` and columns ``[j*s, (j+1)*s)``; tokens beyond ``(G // s) * s``
belong to no cell.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def level_grid(grid_size: int, level: int) -> int:
    return grid_size >> level


def cell_of_token(grid_size: int, level: int, device: torch.device | None = None) -> Tensor:
    """``[G*G]`` long: the level-``level`` cell of every level-0 token, or -1 when outside."""
    s, g = 1 << level, level_grid(grid_size, level)
    rc = torch.arange(grid_size, device=device) // s
    rows, cols = rc[:, None].expand(-1, grid_size), rc[None, :].expand(grid_size, -1)
    cells = rows * g + cols
    inside = (rows < g) & (cols < g)
    return torch.where(inside, cells, torch.full_like(cells, -1)).flatten()


def pool_tokens(tokens: Tensor, grid_size: int, level: int) -> Tensor:
    """``[B, G*G, D]`` -> ``[B, g*g, D]`` by 2D average pooling with window and stride ``2**l``."""
    if level == 0:
        return tokens
    b, _, d = tokens.shape
    grid = tokens.transpose(1, 2).reshape(b, d, grid_size, grid_size)
    s = 1 << level
    return F.avg_pool2d(grid, s, s).flatten(2).transpose(1, 2)


def masked_cell_mean(values: Tensor, token_index: Tensor, grid_size: int, level: int) -> Tensor:
    """Average level-0 values into level-``l`` cells, counting only the tokens present.

    Args:
        values: ``[B, M, K, D]`` values at level-0 tokens.
        token_index: ``[B, M, K]`` their level-0 grid indices.

    Returns:
        ``[B, M, g*g, D]``: per cell, the mean of the values of its present tokens (0 if none).
    """
    if level == 0:
        raise ValueError("masked_cell_mean pools to levels >= 1; level 0 needs no pooling")
    b, m, k, d = values.shape
    g2 = level_grid(grid_size, level) ** 2
    cell = cell_of_token(grid_size, level, values.device)[token_index]  # [B, M, K]
    # Route tokens outside every cell to an extra bin that is dropped afterwards.
    cell = torch.where(cell < 0, torch.full_like(cell, g2), cell)
    sums = values.new_zeros(b, m, g2 + 1, d).scatter_add_(
        2, cell.unsqueeze(-1).expand(-1, -1, -1, d), values
    )
    counts = values.new_zeros(b, m, g2 + 1).scatter_add_(2, cell, values.new_ones(b, m, k))
    return (sums / counts.clamp_min(1).unsqueeze(-1))[:, :, :g2]
