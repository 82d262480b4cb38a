"""Mask samples per level: context, level-0 target blocks and each level's target cells.

One row per image, columns: the image, the context tokens the context encoder sees (the
square context block outlined), and for every level ``l`` the level-``l`` cells the predictor
must predict, filled (the ``2**l``-pooled cell grid drawn on top, each block's level-0
footprint outlined). Block ``m`` has the same colour in every column. The masks are those the
training run samples: the run's own sampler settings, drawn with a fixed seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.patches import Rectangle

from hjepa.data.masks import MaskBatch
from hjepa.models.hierarchy import cell_of_token
from hjepa.viz.common import new_figure, save, strip_axes, upsample_grid

CONTEXT_COLOUR = (0.1, 0.8, 0.2)
OVERLAY_ALPHA = 0.55


def cells_to_tokens(cells: torch.Tensor, grid_size: int, level: int) -> torch.Tensor:
    """Level-``level`` cell mask ``[..., N_l]`` -> level-0 token mask ``[..., N]`` it covers."""
    if level == 0:
        return cells
    return cells[..., cell_of_token(grid_size, level)]


def _bbox(mask: torch.Tensor, grid_size: int) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` in tokens of the True entries of a flat mask."""
    rows, cols = mask.view(grid_size, grid_size).nonzero().unbind(1)
    top, left = int(rows.min()), int(cols.min())
    return top, left, int(rows.max()) - top + 1, int(cols.max()) - left + 1


def _overlay(token_masks: list[torch.Tensor], colours, grid: int, size: int) -> np.ndarray:
    """RGBA ``[S, S, 4]``: each flat token mask painted in its colour (later ones on top)."""
    rgba = np.zeros((size, size, 4))
    for mask, colour in zip(token_masks, colours):
        pixels = upsample_grid(mask.view(grid, grid).numpy().astype(float), size) > 0
        rgba[pixels, :3] = colour[:3]
        rgba[pixels, 3] = OVERLAY_ALPHA
    return rgba


def plot_masks(images: np.ndarray, masks: MaskBatch, grid_size: int, path: str | Path) -> Path:
    """``images [B, S, S, 3]`` in [0, 1] with the masks of the same batch; PNG at ``path``."""
    b, size = images.shape[0], images.shape[1]
    levels = len(masks.level_targets)
    colours = colormaps["tab10"].colors
    patch = size // grid_size
    fig = new_figure(2.0 * (2 + levels), 2.0 * b)
    axes = fig.subplots(b, 2 + levels, squeeze=False)
    titles = ["image", "context", *(f"level {lv} targets" for lv in range(levels))]
    for i in range(b):
        dimmed = 0.35 + 0.4 * images[i]
        for j, ax in enumerate(axes[i]):
            strip_axes(ax)
            ax.imshow(images[i] if j == 0 else dimmed, vmin=0, vmax=1)
            if i == 0:
                ax.set_title(titles[j], fontsize=9)
        ctx = masks.context[i]
        axes[i, 1].imshow(_overlay([ctx], [CONTEXT_COLOUR], grid_size, size))
        if masks.context_block is not None:
            top, left, h, w = _bbox(masks.context_block[i], grid_size)
            axes[i, 1].add_patch(
                Rectangle(
                    (left * patch - 0.5, top * patch - 0.5),
                    w * patch,
                    h * patch,
                    fill=False,
                    edgecolor="white",
                    linewidth=1.2,
                )
            )
        axes[i, 1].set_xlabel(f"{int(ctx.sum())} tokens", fontsize=8)
        for level, cells in enumerate(masks.level_targets):
            ax = axes[i, 2 + level]
            tokens = [cells_to_tokens(cells[i, m], grid_size, level) for m in range(cells.shape[1])]
            ax.imshow(_overlay(tokens, colours, grid_size, size))
            step = patch * 2**level
            for k in range(0, size + 1, step):  # the level-l cell grid
                ax.axhline(k - 0.5, color="white", linewidth=0.4, alpha=0.6)
                ax.axvline(k - 0.5, color="white", linewidth=0.4, alpha=0.6)
            ax.set_xlabel(f"{cells.shape[1]} x {int(cells[i, 0].sum())} cells", fontsize=8)
            for m, block in enumerate(masks.level_blocks[level][i]):  # footprints, outlined
                top, left, h, w = _bbox(block, grid_size)
                ax.add_patch(
                    Rectangle(
                        (left * patch - 0.5, top * patch - 0.5),
                        w * patch,
                        h * patch,
                        fill=False,
                        edgecolor=colours[m % len(colours)],
                        linewidth=1.5,
                    )
                )
    return save(fig, path)
