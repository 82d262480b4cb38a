"""Attention maps of the target encoder's last block.

For tokens ``x`` entering the last block, head ``h`` attends with
:math:`A_h = \\operatorname{softmax}(q_h k_h^\\top / \\sqrt{d_h})`, ``q, k`` from the block's own
``qkv`` projection of ``norm1(x)`` (the weights ``F.scaled_dot_product_attention`` applies
inside the model; a test checks that ``A v`` reproduces the block's attention output). We show
the head mean :math:`\\bar A = \\frac1H \\sum_h A_h` two ways, as there is no CLS token:

* from one query token ``q``: row :math:`\\bar A_{q,:}` (where that patch looks);
* attention received: the column mean :math:`\\frac1N \\sum_i \\bar A_{i,j}` (which patches
  every other patch looks at).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hjepa.models.vit import Attention, Rope, VisionTransformer
from hjepa.viz.common import new_figure, save, strip_axes, upsample_grid


def attention_weights(attn: Attention, x: Tensor, rope: Rope = None) -> Tensor:
    """Softmax weights ``[B, heads, N, N]`` of attention module ``attn`` on its input ``x``.

    The same projections (and RoPE rotation, when given) as ``Attention.forward``, with the
    weights made explicit instead of fused inside ``scaled_dot_product_attention``.
    """
    b, n, d = x.shape
    heads = attn.num_heads
    q, k, _ = attn.qkv(x).view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
    if rope is not None:
        from hjepa.models.rope import apply_rope

        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // heads), dim=-1)


@torch.no_grad()
def last_block_attention(encoder: VisionTransformer, images: Tensor) -> Tensor:
    """Attention weights ``[B, heads, N, N]`` of ``encoder``'s last block on ``images``.

    A forward pre-hook records exactly what the last block's attention receives during the
    encoder's own forward pass (normalised tokens, RoPE tables), whatever options it uses.
    """
    attn = encoder.blocks[-1].attn
    seen: dict[str, tuple] = {}

    def record(module, args, kwargs):
        seen["call"] = (args, kwargs)

    handle = attn.register_forward_pre_hook(record, with_kwargs=True)
    try:
        encoder.eval()
        encoder(images)
    finally:
        handle.remove()
    args, kwargs = seen["call"]
    rope = args[2] if len(args) > 2 else kwargs.get("rope")
    return attention_weights(attn, args[0], rope)


def attention_summaries(attention: Tensor, query: int) -> tuple[Tensor, Tensor]:
    """``([B, N] head-mean attention of token `query`, [B, N] mean attention received)``."""
    mean = attention.mean(dim=1)  # over heads: [B, N, N]
    return mean[:, query, :], mean.mean(dim=1)


def plot_attention(
    images: np.ndarray,
    from_query: Tensor,
    received: Tensor,
    grid_size: int,
    query: int,
    path: str | Path,
) -> Path:
    """Rows of (image, attention from ``query`` over it, attention received over it)."""
    b, size = images.shape[0], images.shape[1]
    patch = size // grid_size
    fig = new_figure(6.0, 2.0 * b)
    axes = fig.subplots(b, 3, squeeze=False)
    qr, qc = divmod(query, grid_size)
    titles = ["image", f"from token ({qr},{qc})", "mean attention received"]
    for i in range(b):
        maps = [from_query[i], received[i]]
        for j, ax in enumerate(axes[i]):
            strip_axes(ax)
            ax.imshow(images[i], vmin=0, vmax=1)
            if i == 0:
                ax.set_title(titles[j], fontsize=9)
            if j == 0:
                continue
            grid = maps[j - 1].view(grid_size, grid_size).float().numpy()
            ax.imshow(upsample_grid(grid, size), cmap="inferno", alpha=0.7)
        axes[i, 1].plot(qc * patch + patch / 2 - 0.5, qr * patch + patch / 2 - 0.5, "c+", ms=10)
    return save(fig, path)
