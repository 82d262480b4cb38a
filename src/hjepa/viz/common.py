"""Shared plotting helpers: figures on matplotlib's Agg canvas, never pyplot's global state.

``Figure`` objects are created directly (not through ``pyplot``), so plotting works headless,
from threads and inside tests, and a figure's pixel size is exactly ``figsize * DPI``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

DPI = 100


def new_figure(width_in: float, height_in: float) -> Figure:
    """A figure of ``width_in x height_in`` inches at :data:`DPI` on an Agg canvas."""
    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG (size exactly ``figsize * DPI``) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def display_images(images: Tensor, image_size: int) -> np.ndarray:
    """uint8 ``[B, C, H, W]`` -> float ``[B, S, S, 3]`` in [0, 1] at the model's input size."""
    x = images.float() / 255.0
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def upsample_grid(values: np.ndarray, image_size: int) -> np.ndarray:
    """``[..., G, G]`` grid values -> ``[..., S, S]`` blocks (each token covers its patch)."""
    patch = image_size // values.shape[-1]
    return np.kron(values, np.ones((patch, patch), dtype=values.dtype))


def strip_axes(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


__all__ = ["DPI", "new_figure", "save", "display_images", "upsample_grid", "strip_axes"]
