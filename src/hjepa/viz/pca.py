"""PCA of patch features shown as RGB over the token grid.

The tokens ``z [B, N, D]`` of a few images are pooled into one matrix, centred, and projected
on their first three principal directions (right singular vectors of the centred matrix, each
signed so its largest-magnitude loading is positive, which makes the picture deterministic).
Each component is min-max scaled to [0, 1] over *all* images, so a colour means the same
feature direction in every image: parts that the encoder represents alike share a colour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hjepa.viz.common import new_figure, save, strip_axes, upsample_grid


def principal_directions(z: Tensor, k: int = 3) -> tuple[Tensor, Tensor]:
    """``(mean [D], directions [D, k])`` of rows ``z [M, D]``, sign-fixed (see module doc)."""
    z = z.double()
    mean = z.mean(dim=0)
    _, _, vh = torch.linalg.svd(z - mean, full_matrices=False)
    directions = vh[:k].T  # [D, k]
    pivot = directions.abs().argmax(dim=0)
    signs = directions[pivot, torch.arange(directions.shape[1])].sign()
    return mean, directions * torch.where(signs == 0, 1.0, signs)


def pca_rgb(tokens: Tensor, grid_size: int) -> np.ndarray:
    """Tokens ``[B, N, D]`` -> ``[B, G, G, 3]`` in [0, 1]; fewer than 3 components are zero."""
    b, n, d = tokens.shape
    flat = tokens.reshape(b * n, d)
    mean, directions = principal_directions(flat, min(3, d, b * n))
    proj = (flat.double() - mean) @ directions  # [B*N, k]
    lo, hi = proj.min(dim=0).values, proj.max(dim=0).values
    proj = (proj - lo) / (hi - lo).clamp_min(1e-12)
    rgb = torch.zeros(b * n, 3, dtype=torch.float64)
    rgb[:, : proj.shape[1]] = proj
    return rgb.view(b, grid_size, grid_size, 3).numpy()


def plot_pca(images: np.ndarray, rgb: np.ndarray, path: str | Path) -> Path:
    """Pairs (image, PCA colours of its tokens), one pair per image, in a 2-row grid."""
    b, size = images.shape[0], images.shape[1]
    fig = new_figure(2.0 * b, 4.0)
    axes = fig.subplots(2, b, squeeze=False)
    for i in range(b):
        for ax in axes[:, i]:
            strip_axes(ax)
        axes[0, i].imshow(images[i], vmin=0, vmax=1)
        up = np.stack([upsample_grid(rgb[i][..., c], size) for c in range(3)], axis=-1)
        axes[1, i].imshow(up, vmin=0, vmax=1)
    axes[0, 0].set_ylabel("image", fontsize=9)
    axes[1, 0].set_ylabel("PCA of tokens (RGB)", fontsize=9)
    return save(fig, path)
