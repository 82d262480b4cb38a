"""I-JEPA multi-block masks with hierarchy levels.

Tokens live on a ``G x G`` grid (level 0, ``N = G**2``, row-major index ``r * G + c``). One call
of :meth:`MultiBlockMaskSampler.sample` draws, for a batch of ``B`` images:

* **Target blocks.** One block size per batch, shared by all samples and all ``M`` blocks (as
  I-JEPA's collator does): ``s ~ U(target_scale)``, ``a ~ U(target_aspect)``,
  ``h = round(sqrt(s N a))``, ``w = round(sqrt(s N / a))``, clamped to ``[1, G]``. Each block's
  top-left corner is uniform over all ``(G - h + 1) x (G - w + 1)`` valid positions, so the last
  row and column are reachable.
* **Footprints per level.** Every level is built from the level-0 target blocks
  (``scale_mode="constant"``), so every level covers the same 15-20 % of the image. The
  other ``scale_mode`` values draw each level's blocks of its own scale range (the ablation's
  variants: :mod:`hjepa.data.footprints`).
* **Context.** One square (``a = 1``) of scale ``~ U(context_scale)`` at a random position, minus
  every footprint token of every level (a rule may hide only the level-0 ones). A sample left
  with fewer than ``min_context`` tokens is redrawn (bounded retries); then each sample keeps a
  random subset of ``K = min_b |C_b|`` tokens, so counts are equal and gathering is a reshape.
* **Level targets.** The level-``l`` grid is level 0 average-pooled by ``s = 2**l`` with
  ceiling, ``G_l = ceil(G / s)``: cell ``i`` covers rows ``[i s, min((i + 1) s, G))``, so an
  edge cell of a grid ``s`` does not divide is smaller, and every token is in one cell. A cell is
  a target when ``2 |cell ∩ footprint| >= |cell|`` (at least half covered); if no cell
  qualifies, the most-covered one does (ties: cell centre nearest to the footprint centroid,
  then lowest index), so no level is empty. Every ``[b, m]`` row then keeps a random subset of
  ``min_{b,m}`` cells.

All randomness comes from the ``torch.Generator`` given to ``sample``. Python loops run over
levels and (rare) retries only, never over samples or blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hjepa.config import Config
from hjepa.data.footprints import FOOTPRINT_RULES
from hjepa.grid import block_side, check_depth, check_min_context, grid_side, level_grid

_MAX_RETRIES = 20


def _cell_spans(grid_size: int, level: int) -> tuple[Tensor, Tensor]:
    """Per row (= column) of level-``level`` cells: the tokens it spans and its centre."""
    s = 2**level
    start = torch.arange(level_grid(grid_size, level)) * s
    end = (start + s).clamp(max=grid_size)
    return end - start, (start + end) / 2


def mask_to_index(mask: Tensor) -> Tensor:
    """``[..., N]`` bool, same count ``K`` in every row -> ``[..., K]`` ascending long indices."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask_to_index expects a bool mask, got {mask.dtype}: pass mask.bool()")
    counts = mask.sum(-1)
    k = int(counts.flatten()[0]) if counts.numel() else 0
    if counts.numel() and not bool((counts == k).all()):
        raise ValueError(
            f"mask_to_index needs the same number of True entries in every row, got "
            f"{int(counts.min())} to {int(counts.max())}: truncate to one common count first"
        )
    # nonzero() walks row-major, so each row's indices come out ascending.
    return mask.nonzero()[:, -1].reshape(*mask.shape[:-1], k)


def footprint_to_level(footprint: Tensor, grid_size: int, level: int) -> Tensor:
    """Level-``level`` target cells ``[..., N_l]`` of level-0 footprints ``[..., N]``."""
    s, g = 2**level, level_grid(grid_size, level)
    grid = footprint.reshape(-1, grid_size, grid_size)
    pad = g * s - grid_size  # zero rows/columns that complete the edge cells
    padded = torch.nn.functional.pad(grid.to(torch.int32), (0, pad, 0, pad))
    counts = padded.reshape(-1, g, s, g, s).sum((2, 4)).flatten(1)
    span, centre = _cell_spans(grid_size, level)
    cells = 2 * counts >= (span[:, None] * span[None, :]).flatten()
    empty = ~cells.any(-1, keepdim=True)
    if not empty.any():
        return cells.reshape(*footprint.shape[:-1], g * g)
    # Fallback cell: most covered, then nearest to the footprint centroid, then lowest index.
    token_centre = torch.arange(grid_size) + 0.5
    area = grid.sum((1, 2)).clamp(min=1)
    cy = (grid.sum(2) * token_centre).sum(1) / area
    cx = (grid.sum(1) * token_centre).sum(1) / area
    dist2 = (centre[None, :, None] - cy[:, None, None]) ** 2 + (
        centre[None, None, :] - cx[:, None, None]
    ) ** 2
    dist2 = dist2.flatten(1).masked_fill(counts < counts.amax(-1, keepdim=True), math.inf)
    best = torch.nn.functional.one_hot(dist2.argmin(-1), g * g).bool()
    cells |= best & empty
    return cells.reshape(*footprint.shape[:-1], g * g)


def _keep_random(mask: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Keep a uniformly random ``k`` of the True entries per row (first-k would favour top-left)."""
    if bool((mask.sum(-1) == k).all()):
        return mask
    scores = torch.rand(mask.shape, generator=generator).masked_fill_(~mask, 2.0)
    kept = scores.topk(k, dim=-1, largest=False).indices
    return torch.zeros_like(mask).scatter_(-1, kept, True)


@dataclass
class MaskBatch:
    """Masks of one batch; every row of a mask has the same count (see the module docstring)."""

    context: Tensor  # [B, N] bool, level-0 grid
    targets: Tensor  # [B, M, N] bool, level-0 target blocks (== level_blocks[0])
    level_blocks: list[Tensor]  # per level: [B, M, N] bool level-0 footprints
    level_targets: list[Tensor]  # per level: [B, M, N_l] bool on the level-l grid
    context_block: Tensor | None = None  # [B, N] bool square before target removal (viz, tests)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MaskBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)
        return MaskBatch(
            move(self.context),
            move(self.targets),
            [move(t) for t in self.level_blocks],
            [move(t) for t in self.level_targets],
            move(self.context_block),
        )


def _check_range(name: str, value: tuple[float, float], upper: float | None = 1.0) -> None:
    lo, hi = value
    if not (0 < lo <= hi and (upper is None or hi <= upper)):
        bound = "(0, 1]" if upper else "(0, inf)"
        raise ValueError(f"{name}={tuple(value)} is invalid: use 0 < min <= max within {bound}")


class MultiBlockMaskSampler:
    """Samples I-JEPA multi-block context/target masks plus per-level targets."""

    def __init__(
        self,
        grid_size: int,
        levels: int = 3,
        num_targets: int = 4,
        target_scale: tuple[float, float] = (0.15, 0.2),
        target_aspect: tuple[float, float] = (0.75, 1.5),
        context_scale: tuple[float, float] = (0.85, 1.0),
        scale_mode: str = "constant",
        min_context: int = 4,
    ) -> None:
        if grid_size < 1:
            raise ValueError(f"grid_size={grid_size} is invalid: use a token grid of at least 1x1")
        if levels < 1:
            raise ValueError(f"model.levels={levels} is invalid: use at least 1 level")
        check_depth(levels, grid_size)
        if scale_mode != "constant" and scale_mode not in FOOTPRINT_RULES:
            known = ("constant", *FOOTPRINT_RULES)
            raise ValueError(f"masking.scale_mode={scale_mode!r} is unknown: use one of {known}")
        if num_targets < 1:
            raise ValueError(f"num_targets={num_targets} is invalid: use at least 1 target block")
        check_min_context(min_context, grid_size)
        _check_range("target_scale", target_scale)
        _check_range("context_scale", context_scale)
        _check_range("target_aspect", target_aspect, upper=None)
        self.grid_size, self.levels, self.num_targets = grid_size, levels, num_targets
        self.target_scale, self.target_aspect = tuple(target_scale), tuple(target_aspect)
        self.context_scale, self.scale_mode, self.min_context = (
            tuple(context_scale),
            scale_mode,
            min_context,
        )
        self.rule = FOOTPRINT_RULES.get(scale_mode)  # None: every level reuses level 0's blocks

    def footprint_scale(self, level: int) -> tuple[float, float]:
        """Scale range of the blocks level ``level`` draws (under a footprint rule)."""
        if self.rule is None:
            return self.target_scale
        return self.rule.scale(self.target_scale, level)

    def block_shape(self, scale: float, aspect: float) -> tuple[int, int]:
        """``(h, w)`` of a block of area fraction ``scale`` and aspect ``aspect`` (h / w)."""
        area = scale * self.grid_size**2
        return block_side(area * aspect, self.grid_size), block_side(area / aspect, self.grid_size)

    def _block_size(self, scale, aspect, generator: torch.Generator) -> tuple[int, int]:
        u_scale, u_aspect = torch.rand(2, generator=generator).tolist()
        s = scale[0] + u_scale * (scale[1] - scale[0])
        a = aspect[0] + u_aspect * (aspect[1] - aspect[0])
        return self.block_shape(s, a)

    def _blocks(self, batch: int, count: int, size, generator: torch.Generator) -> Tensor:
        """``[batch, count, N]`` blocks of ``size = (h, w)``, top-left uniform over all offsets."""
        (h, w), g = size, self.grid_size
        top = torch.randint(0, g - h + 1, (batch, count, 1), generator=generator)
        left = torch.randint(0, g - w + 1, (batch, count, 1), generator=generator)
        pos = torch.arange(g)
        rows = (pos >= top) & (pos < top + h)
        cols = (pos >= left) & (pos < left + w)
        return (rows[..., :, None] & cols[..., None, :]).flatten(-2)

    def _draw(self, batch: int, sizes, side: int, generator: torch.Generator):
        footprints = [self._blocks(batch, self.num_targets, hw, generator) for hw in sizes]
        block = self._blocks(batch, 1, (side, side), generator)[:, 0]
        hidden = footprints if self.rule is None or self.rule.hide_all else footprints[:1]
        covered = torch.stack(hidden, 1).any(2).any(1)
        return footprints, block, block & ~covered

    def sample(self, batch_size: int, generator: torch.Generator) -> MaskBatch:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is invalid: use at least 1")
        draws = 1 if self.rule is None else self.levels
        scales = [self.target_scale] + [self.footprint_scale(lv) for lv in range(1, draws)]
        sizes = [self._block_size(sc, self.target_aspect, generator) for sc in scales]
        side = self._block_size(self.context_scale, (1.0, 1.0), generator)[0]
        footprints, block, context = self._draw(batch_size, sizes, side, generator)
        for attempt in range(_MAX_RETRIES + 1):
            bad = context.sum(-1) < self.min_context
            if not bad.any():
                break
            if attempt == _MAX_RETRIES:
                raise ValueError(
                    f"masks leave fewer than min_context={self.min_context} context tokens on a "
                    f"{self.grid_size}x{self.grid_size} grid ({self.num_targets} targets of "
                    f"{sizes[0][0]}x{sizes[0][1]}, scale_mode={self.scale_mode!r}): lower "
                    f"num_targets or target_scale, or raise context_scale"
                )
            new_fps, new_block, new_context = self._draw(int(bad.sum()), sizes, side, generator)
            for fp, new_fp in zip(footprints, new_fps):
                fp[bad] = new_fp
            block[bad], context[bad] = new_block, new_context
        context = _keep_random(context, int(context.sum(-1).min()), generator)

        level_blocks = footprints if draws > 1 else footprints * self.levels
        level_targets = []
        for level, fp in enumerate(level_blocks):
            cells = footprint_to_level(fp, self.grid_size, level)
            level_targets.append(_keep_random(cells, int(cells.sum(-1).min()), generator))
        return MaskBatch(context, footprints[0], level_blocks, level_targets, block)


def sampler_from_config(cfg: Config) -> MultiBlockMaskSampler:
    """The mask sampler a training run with ``cfg`` uses."""
    m = cfg.masking
    return MultiBlockMaskSampler(
        grid_side(cfg.data.image_size, cfg.model.patch_size),
        levels=cfg.model.levels,
        num_targets=m.num_targets,
        target_scale=tuple(m.target_scale),
        target_aspect=tuple(m.target_aspect),
        context_scale=tuple(m.context_scale),
        scale_mode=m.scale_mode,
        min_context=m.min_context,
    )
