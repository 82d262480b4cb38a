"""Axial 2D rotary position embedding (RoPE) for tokens on a patch grid.

A head of width ``d`` is split in two halves: the first half rotates with the token's row, the
second with its column. Within a half of width ``h = d/2`` the channel pairs ``(i, i + h/2)``,
``i < h/2``, are rotated by the angle ``p * w_i`` with ``w_i = base^(-i / (h/2))`` and ``p`` the
row (or column) index:

.. math::
    (x_i, x_{i+h/2}) \\mapsto (x_i \\cos p w_i - x_{i+h/2} \\sin p w_i,\\;
                              x_i \\sin p w_i + x_{i+h/2} \\cos p w_i).

Rotating queries by ``R(p)`` and keys by ``R(p')`` gives ``q^T R(p)^T R(p') k = q^T R(p'-p) k``:
attention scores depend only on the 2D offset between two tokens, never on where they are, so
the same weights serve masked token subsets and other image resolutions. Positions always come
from each token's grid index (``row = index // G``, ``col = index % G``), not its list index.
"""

from __future__ import annotations

import torch
from torch import Tensor

ROPE_BASE = 100.0  # grids are small (<= 64 per side): a low base keeps the slow pairs useful


def rope_frequencies(head_dim: int, base: float = ROPE_BASE) -> Tensor:
    """``[head_dim // 4]`` angular frequencies ``base^(-i / (head_dim/4))`` (float64)."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head width divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    return base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)


def grid_positions(index: Tensor, grid_size: int) -> Tensor:
    """Grid indices ``[..., N]`` -> ``[..., N, 2]`` float (row, column)."""
    return torch.stack([index // grid_size, index % grid_size], dim=-1).float()


def rope_tables(positions: Tensor, head_dim: int, base: float = ROPE_BASE) -> tuple[Tensor, Tensor]:
    """Cos and sin tables ``[B, 1, N, head_dim // 2]`` for (row, col) positions ``[B, N, 2]``.

    Channel ``j`` of the table holds the angle of rotation pair ``j`` (rows first, then columns),
    broadcast over heads.
    """
    # float32 throughout (MPS has no float64); angles stay below ~100 rad, error ~1e-5.
    freqs = rope_frequencies(head_dim, base).float().to(positions.device)
    angles = positions.float()[..., None] * freqs  # [B, N, 2, head_dim/4]
    angles = angles.flatten(-2).unsqueeze(1)  # [B, 1, N, head_dim/2]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, H, N, d]`` by the angles of ``cos``/``sin`` ``[B, 1, N, d/2]``."""
    d = x.shape[-1]
    q = d // 4
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    # Pairs (i, i + d/4) inside each half: rows use channels [0, d/2), columns [d/2, d).
    row, col = x[..., : d // 2], x[..., d // 2 :]
    a = torch.cat([row[..., :q], col[..., :q]], dim=-1)  # first member of every pair
    b = torch.cat([row[..., q:], col[..., q:]], dim=-1)  # second member
    ra, rb = a * cos - b * sin, a * sin + b * cos
    return torch.cat([ra[..., :q], rb[..., :q], ra[..., q:], rb[..., q:]], dim=-1)
