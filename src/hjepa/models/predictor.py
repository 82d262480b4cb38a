"""The narrow predictor shared by all hierarchy levels (I-JEPA's design).

Context tokens are projected to the predictor width and keep their grid positions; each target
block is represented by a shared learnable mask token plus the position of every token to
predict. Like I-JEPA, the context is repeated once per target block, so blocks do not see each
other.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hjepa.models.vit import (
    Block,
    gather_tokens,
    init_weights,
    rescale_residual_branches,
    sincos_2d,
)


class Predictor(nn.Module):
    def __init__(
        self,
        grid_size: int,
        embed_dim: int,
        predictor_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.embed = nn.Linear(embed_dim, predictor_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_dim))
        self.register_buffer("pos_embed", sincos_2d(predictor_dim, grid_size), persistent=False)
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(Block(predictor_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(predictor_dim, eps=1e-6)
        init_weights(self)
        rescale_residual_branches(self.blocks)
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.04, b=0.04)

    def forward(self, context: Tensor, context_index: Tensor, target_index: Tensor) -> Tensor:
        """Predict target tokens.

        Args:
            context: context-encoder tokens ``[B, Nc, D]``.
            context_index: their level-0 grid indices ``[B, Nc]``.
            target_index: grid indices of the tokens to predict, per block ``[B, M, Nt]``.

        Returns:
            ``[B, M, Nt, predictor_dim]`` predictions (before the per-level heads).
        """
        b, m, nt = target_index.shape
        pos = self.pos_embed.to(context.dtype).expand(b, -1, -1)
        ctx = self.embed(context) + gather_tokens(pos, context_index)
        queries = self.mask_token + gather_tokens(pos, target_index.reshape(b, m * nt))
        x = torch.cat([ctx.repeat_interleave(m, dim=0), queries.reshape(b * m, nt, -1)], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x[:, -nt:])
        return x.reshape(b, m, nt, -1)
