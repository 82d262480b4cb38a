"""Integer arithmetic of the token grid and its pooled levels (no torch: config imports it).

An ``image_size`` image cut into ``patch_size`` patches gives a ``G x G`` token grid (level 0).
Level ``l`` pools it by ``2**l`` with ceiling, so its grid has ``ceil(G / 2**l)`` cells a side
and every token belongs to exactly one cell at every level (models/hierarchy.py).
"""

from __future__ import annotations

import math


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


def check_depth(levels: int, grid_size: int) -> None:
    """Refuse more levels than the grid pools to (:func:`max_levels`)."""
    deepest = max_levels(grid_size)
    if levels > deepest:
        raise ValueError(
            f"model.levels={levels} is too deep for a {grid_size}x{grid_size} token grid: use at "
            f"most {deepest} levels (the last one is 1x1), or a smaller model.patch_size"
        )


def check_min_context(min_context: int, grid_size: int) -> None:
    """Refuse a ``masking.min_context`` no mask of the grid can have (1 to every token)."""
    n = grid_size * grid_size
    if min_context < 1:
        raise ValueError(f"masking.min_context={min_context} is invalid: use 1..{n}")
    if min_context > n:
        raise ValueError(
            f"masking.min_context={min_context} exceeds the {grid_size}x{grid_size}={n} token grid"
        )


def block_side(area: float, grid_size: int) -> int:
    """Side of a mask block (or one side of a ``h x w`` block) of ``area`` tokens, as the mask
    sampler and the config's feasibility check both round it: ``round(sqrt(area))`` in
    ``[1, grid_size]``."""
    return min(max(round(math.sqrt(area)), 1), grid_size)
