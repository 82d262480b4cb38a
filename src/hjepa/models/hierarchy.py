"""Spatial hierarchy over the level-0 token grid.

Level ``l`` average-pools the ``G x G`` grid by ``s = 2**l`` in 2D with ceiling: the level-``l``
grid has ``g_l = ceil(G / s)`` cells a side, cell ``(i, j)`` covers rows ``[i*s, min((i+1)*s, G))``
and the same columns, and its value is the mean of the tokens it holds (an edge cell of a grid
that ``s`` does not divide holds fewer). So every token belongs to exactly one cell at every
level: with floor pooling the last ``G mod s`` rows and columns would belong to none, and on a
7 x 7 grid level 2 would be the top-left 4 x 4 tokens alone. ``ceil(g_l / 2) = g_{l+1}``, so
cell ``(i, j)`` of level ``l`` lies inside cell ``(i // 2, j // 2)`` of level ``l + 1``.
:class:`TopDownFPN` fuses the per-level prediction grids top-down.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hjepa.grid import level_grid


def cell_of_token(grid_size: int, level: int, device: torch.device | None = None) -> Tensor:
    """``[G*G]`` long: the level-``level`` cell of every level-0 token."""
    rc = torch.arange(grid_size, device=device) >> level
    return (rc[:, None] * level_grid(grid_size, level) + rc[None, :]).flatten()


def pool_tokens(tokens: Tensor, grid_size: int, level: int) -> Tensor:
    """``[B, G*G, D]`` -> ``[B, g*g, D]``: per cell, the mean of the tokens it holds."""
    if level == 0:
        return tokens
    b, _, d = tokens.shape
    grid = tokens.transpose(1, 2).reshape(b, d, grid_size, grid_size)
    s = 1 << level
    # Without padding, a ceil-mode window that runs off the grid divides by the tokens it holds.
    return F.avg_pool2d(grid, s, s, ceil_mode=True).flatten(2).transpose(1, 2)


def masked_cell_mean(
    values: Tensor, token_index: Tensor, grid_size: int, level: int, valid: Tensor | None = None
) -> Tensor:
    """Average level-0 values into level-``l`` cells, counting only the tokens present.

    Args:
        values: ``[B, M, K, D]`` values at level-0 tokens.
        token_index: ``[B, M, K]`` their level-0 grid indices.
        valid: ``[B, M, K]`` bool, False at padding (left out), or None.

    Returns:
        ``[B, M, g*g, D]``: per cell, the mean of the values of its present tokens (0 if none).
    """
    if level == 0:
        raise ValueError("masked_cell_mean pools to levels >= 1; level 0 needs no pooling")
    b, m, k, d = values.shape
    g2 = level_grid(grid_size, level) ** 2
    cell = cell_of_token(grid_size, level, values.device)[token_index]  # [B, M, K]
    weight = values.new_ones(b, m, k) if valid is None else valid.to(values.dtype)
    if valid is not None:
        values = values * weight.unsqueeze(-1)
    sums = values.new_zeros(b, m, g2, d).scatter_add_(
        2, cell.unsqueeze(-1).expand(-1, -1, -1, d), values
    )
    counts = values.new_zeros(b, m, g2).scatter_add_(2, cell, weight)
    return sums / counts.clamp_min(1).unsqueeze(-1)


def scatter_level0(
    values: Tensor, token_index: Tensor, grid_size: int, valid: Tensor | None = None
) -> Tensor:
    """``values [B, M, K, D]`` at level-0 tokens ``token_index [B, M, K]`` -> dense
    ``[B, M, G*G, D]`` grid, zeros where no value was given. ``valid [B, M, K]``: False at
    padding, whose index repeats a real token's: it adds zero there."""
    b, m, _, d = values.shape
    dense = values.new_zeros(b, m, grid_size * grid_size, d)
    index = token_index.unsqueeze(-1).expand(-1, -1, -1, d)
    if valid is None:
        return dense.scatter(2, index, values)
    return dense.scatter_add(2, index, values * valid.unsqueeze(-1).to(values.dtype))


def prediction_pyramid(
    values: Tensor, token_index: Tensor, grid_size: int, levels: int, valid: Tensor | None = None
) -> list[Tensor]:
    """Dense per-level grids ``[B, M, g_l*g_l, D]`` of level-0 predictions: level 0 scattered to
    its tokens, level ``l >= 1`` the mask-aware cell means of :func:`masked_cell_mean`."""
    return [scatter_level0(values, token_index, grid_size, valid)] + [
        masked_cell_mean(values, token_index, grid_size, lvl, valid) for lvl in range(1, levels)
    ]


def upsample_cells(coarse: Tensor, grid_size: int, level: int) -> Tensor:
    """Nearest upsampling from level ``level + 1`` to level ``level`` on the cell grids.

    ``coarse [B, M, g_{l+1}^2, D]`` -> ``[B, M, g_l^2, D]``: cell ``(i, j)`` of level ``l``
    copies its parent ``(i // 2, j // 2)``, the level-``l + 1`` cell that holds it.
    """
    parent = cell_of_token(level_grid(grid_size, level), 1, coarse.device)  # [g_l^2]
    return coarse[:, :, parent]


class TopDownFPN(nn.Module):
    """Top-down feature pyramid over the per-level prediction grids (FPN, Lin et al. 2017).

    With lateral maps ``L_l`` (1x1 = ``Linear`` on token features) and nearest upsampling ``U``
    over the cell grid, from the coarsest level down:

    .. math::
        F_{L-1} = L_{L-1}(P_{L-1}), \\qquad
        F_l = L_l(P_l) + U(F_{l+1}) \\;\\text{(add)}
        \\quad\\text{or}\\quad W_l [L_l(P_l); U(F_{l+1})] \\;\\text{(concat)},

    so each level's prediction also sees every coarser one. It acts on predictions only;
    targets never pass through it.
    """

    def __init__(self, dim: int, levels: int, fusion: str):
        super().__init__()
        if fusion not in ("add", "concat"):
            raise ValueError(f"FPN fusion must be 'add' or 'concat', got {fusion!r}")
        if levels < 2:
            raise ValueError("an FPN needs at least two levels")
        self.fusion = fusion
        self.lateral = nn.ModuleList(nn.Linear(dim, dim) for _ in range(levels))
        self.fuse = (
            nn.ModuleList(nn.Linear(2 * dim, dim) for _ in range(levels - 1))
            if fusion == "concat"
            else None
        )

    def forward(self, pyramid: list[Tensor], grid_size: int) -> list[Tensor]:
        """``pyramid``: per level ``[B, M, g_l^2, D]`` (level 0 first) -> fused, same shapes."""
        levels = len(self.lateral)
        fused: list[Tensor] = [pyramid[-1]] * levels
        fused[-1] = self.lateral[-1](pyramid[-1])
        for lvl in range(levels - 2, -1, -1):
            lateral = self.lateral[lvl](pyramid[lvl])
            up = upsample_cells(fused[lvl + 1], grid_size, lvl)
            if self.fuse is None:
                fused[lvl] = lateral + up
            else:
                fused[lvl] = self.fuse[lvl](torch.cat([lateral, up], dim=-1))
        return fused
