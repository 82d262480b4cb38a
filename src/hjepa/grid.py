"""Integer arithmetic of the token grid and its pooled levels (no torch: config imports it).

An ``image_size`` image cut into ``patch_size`` patches gives a ``G x G`` token grid (level 0).
Level ``l`` pools it by ``2**l`` with ceiling, so its grid has ``ceil(G / 2**l)`` cells a side
and every token belongs to exactly one cell at every level (models/hierarchy.py).
"""

from __future__ import annotations


def grid_side(image_size: int, patch_size: int) -> int:
    """Tokens a side of the level-0 grid (config validation refuses a ``patch_size`` that does
    not divide ``image_size``)."""
    return image_size // patch_size


def level_grid(grid_size: int, level: int) -> int:
    """Side of the level-``level`` cell grid: ``ceil(grid_size / 2**level)``."""
    return -(-grid_size >> level)


def max_levels(grid_size: int) -> int:
    """Levels down to the first 1 x 1 grid (a deeper one would repeat it): 4 for 7 x 7 or 8 x 8."""
    return (grid_size - 1).bit_length() + 1
