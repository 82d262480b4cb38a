"""A small, plain Vision Transformer: patch embedding, fixed 2D sin-cos positions, pre-norm blocks.

Attention goes through ``F.scaled_dot_product_attention`` so PyTorch picks the fastest kernel
the hardware has. Tokens can be a subset of the grid (the context), selected by index after the
positions are added, so a token's position always comes from its grid index.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """``[len(positions), dim]``: sin on the first half of the channels, cos on the second."""
    freqs = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_size: int) -> Tensor:
    """Fixed 2D position table ``[grid_size**2, dim]`` in row-major token order.

    Half of the channels encode the row, half the column (each a 1D sin-cos code).
    """
    if dim % 4:
        raise ValueError(f"embedding width {dim} must be a multiple of 4 for 2D sin-cos positions")
    coords = torch.arange(grid_size)
    rows = sincos_1d(dim // 2, coords).repeat_interleave(grid_size, dim=0)
    cols = sincos_1d(dim // 2, coords).repeat(grid_size, 1)
    return torch.cat([rows, cols], dim=1).float()


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x [B, N, D]``, ``index [B, K]`` -> ``[B, K, D]``."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch with probability ``p``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal linear weights, zero biases, unit norms (as in ViT/I-JEPA)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def rescale_residual_branches(blocks: nn.ModuleList) -> None:
    """Shrink each block's output projections by sqrt(2 * depth index) (I-JEPA's init)."""
    for i, block in enumerate(blocks, start=1):
        block.attn.proj.weight.data.div_(math.sqrt(2.0 * i))
        block.mlp[2].weight.data.div_(math.sqrt(2.0 * i))


class VisionTransformer(nn.Module):
    """ViT encoder over a ``grid_size x grid_size`` patch grid; returns normalised tokens."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        in_channels: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        self.embed_dim = embed_dim
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_2d(embed_dim, self.grid_size), persistent=False)
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        init_weights(self)
        rescale_residual_branches(self.blocks)
        w = self.patch_embed.weight
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=0.02, a=-0.04, b=0.04)

    def forward(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        """``images [B, C, H, W]`` -> tokens ``[B, N, D]``, or ``[B, K, D]`` for ``keep [B, K]``."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = x + self.pos_embed.to(x.dtype)
        if keep is not None:
            x = gather_tokens(x, keep)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
