"""A handful of token counts per run: mask indices padded up to fixed bucket sizes.

The context count of a step is the batch minimum of its masks, and the block and target-cell
counts follow the step's block size: left alone, almost every step brings new sequence lengths
(26 distinct attention key lengths in 1 000 steps of the quickstart preset, 83 for
``imagenet100_vits16``), and an accelerator rebuilds its attention plans, a compiled step its
graphs, for each. :class:`TokenBuckets` pads every count up to the next size of a short
ladder fixed when the run starts; the padded positions carry a ``False`` in the index's
``valid`` masks, and the model leaves them out of every attention key, mean, loss and
regulariser, so a padded step computes what the unpadded one does (to rounding).

Ladders, from the mask sampler alone (a pure function of the config):

* context: three sizes from a calibration draw of :data:`CALIBRATION_DRAWS` batches with a
  generator of its own (no training stream moves), at the thirds of its range, then the whole
  grid (a context never holds more);
* blocks: the largest block the sampler's scale and aspect ranges can produce;
* target cells, per level: the most cells such a block can cover on that level's grid.

A count above its ladder keeps its own size (correct, one more shape): nothing depends on the
ladders but the number of shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hjepa.data.masks import MultiBlockMaskSampler, footprint_to_level

CALIBRATION_DRAWS = 32
_CALIBRATION_SEED = 0x5EED_B0C5
_GRID_STEPS = 41  # scale x aspect grid on which the largest block is searched


def pad_to(index: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """``index [..., K]`` -> ``([..., size], valid [..., size])``: the first index repeated
    in the padded positions (a real token, so every gather stays in range), valid False there.
    """
    k = index.shape[-1]
    if size < k:
        raise ValueError(f"cannot pad {k} indices down to {size}")
    valid = (torch.arange(size) < k).expand(*index.shape[:-1], size)
    if size == k:
        return index, valid
    fill = index[..., :1].expand(*index.shape[:-1], size - k)
    return torch.cat([index, fill], dim=-1), valid


def _bucket(ladder: tuple[int, ...], n: int) -> int:
    return next((size for size in ladder if size >= n), n)


@dataclass(frozen=True)
class TokenBuckets:
    """The padded sizes of a run: ``context``, ``blocks`` (level-0 tokens of a target block)
    and ``cells[l]`` (target cells of level ``l``), each an ascending ladder."""

    context: tuple[int, ...]
    blocks: tuple[int, ...]
    cells: tuple[tuple[int, ...], ...]

    def context_size(self, n: int) -> int:
        return _bucket(self.context, n)

    def block_size(self, n: int) -> int:
        return _bucket(self.blocks, n)

    def cell_size(self, level: int, n: int) -> int:
        return _bucket(self.cells[level], n)

    @classmethod
    def for_sampler(cls, sampler: MultiBlockMaskSampler, batch: int) -> TokenBuckets:
        """The ladders of ``sampler`` drawing ``batch`` masks at a time (see the module)."""
        sizes = _block_sizes(sampler)
        blocks = max(h * w for h, w in sizes)
        cells = tuple(
            (blocks,) if level == 0 else (_most_cells(sampler.grid_size, sizes, level),)
            for level in range(sampler.levels)
        )
        return cls(_context_ladder(sampler, batch), (blocks,), cells)


def _block_sizes(sampler: MultiBlockMaskSampler) -> set[tuple[int, int]]:
    """Every ``(h, w)`` the sampler's level-0 blocks take, on a fine grid of its ranges
    (ends included)."""
    (s0, s1), (a0, a1) = sampler.target_scale, sampler.target_aspect
    steps = torch.linspace(0, 1, _GRID_STEPS).tolist()
    sizes = set()
    for u in steps:
        for v in steps:
            gen_free = (s0 + u * (s1 - s0), a0 + v * (a1 - a0))
            sizes.add(sampler.block_shape(*gen_free))
    return sizes


def _most_cells(grid: int, sizes: set[tuple[int, int]], level: int) -> int:
    """The most level-``level`` target cells one block of any of ``sizes`` covers."""
    most = 1
    pos = torch.arange(grid)
    for h, w in sizes:
        top = torch.arange(grid - h + 1).repeat_interleave(grid - w + 1)[:, None]
        left = torch.arange(grid - w + 1).repeat(grid - h + 1)[:, None]
        rows = (pos >= top) & (pos < top + h)
        cols = (pos >= left) & (pos < left + w)
        blocks = (rows[:, :, None] & cols[:, None, :]).flatten(1)
        most = max(most, int(footprint_to_level(blocks, grid, level).sum(-1).max()))
    return most


def _context_ladder(sampler: MultiBlockMaskSampler, batch: int) -> tuple[int, ...]:
    """Three context sizes spread over a calibration draw's range, then the whole grid."""
    generator = torch.Generator().manual_seed(_CALIBRATION_SEED)
    counts = [
        int(sampler.sample(batch, generator).context[0].sum()) for _ in range(CALIBRATION_DRAWS)
    ]
    lo, hi, full = min(counts), max(counts), sampler.grid_size**2
    third = max(1, math.ceil((hi - lo) / 3))
    ladder = sorted({min(full, lo + third * i) for i in (1, 2, 3)} | {full})
    return tuple(ladder)
