"""The narrow predictor shared by all hierarchy levels (I-JEPA's design).

Context tokens are projected to the predictor width and keep their grid positions; each target
block is represented by a shared learnable mask token plus the position of every token to
predict. Two modes compute the predictions (``model.predictor_mode``):

* ``repeat`` (I-JEPA): the context is repeated once per target block, and each copy runs
  through the blocks together with that block's mask tokens: ``M`` sequences of ``Nc + Nt``
  tokens, in which context tokens attend to the context and to that block's mask tokens, and
  mask tokens to the context and their own block.
* ``shared``: one sequence ``[context, block 1, ..., block M]`` of ``Nc + M Nt`` tokens with a
  block-diagonal attention mask: mask tokens attend to the context and their own block (as in
  ``repeat``), context tokens attend to the context only. The context is then processed once
  instead of ``M`` times; it no longer sees the mask tokens, which is the one difference from
  ``repeat``. Blocks never see each other in either mode.

In both modes the last block computes only the mask-token rows: the context rows' outputs of
the last block are never read.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hjepa.config import CHOICES
from hjepa.models.rope import grid_positions, rope_tables
from hjepa.models.vit import (
    Block,
    ContextBlocks,
    Rope,
    check_pos_embed,
    gather_tokens,
    init_weights,
    rescale_residual_branches,
    run_blocks,
    sincos_2d,
)

PREDICTOR_MODES = CHOICES["model.predictor_mode"]


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
        *,
        pos_embed: str = "sincos",
        layer_scale: float = 0.0,
        grad_checkpointing: bool = False,
        mode: str = "repeat",
    ):
        super().__init__()
        check_pos_embed(pos_embed, predictor_dim, num_heads)
        if mode not in PREDICTOR_MODES:
            raise ValueError(f"predictor mode {mode!r} is not one of {PREDICTOR_MODES}")
        self.mode = mode
        self.grid_size = grid_size
        self.head_dim = predictor_dim // num_heads
        self.rope = pos_embed == "rope"
        self.grad_checkpointing = grad_checkpointing
        self.embed = nn.Linear(embed_dim, predictor_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_dim))
        table = None if self.rope else sincos_2d(predictor_dim, grid_size)
        self.register_buffer("pos_embed", table, persistent=False)
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(predictor_dim, num_heads, mlp_ratio, r, layer_scale) for r in rates
        )
        self.norm = nn.LayerNorm(predictor_dim, eps=1e-6)
        init_weights(self)
        rescale_residual_branches(self.blocks)
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.04, b=0.04)

    def add_positions(self, x: Tensor, index: Tensor) -> Tensor:
        """``x [B, K, Dp]`` plus the sin-cos codes of grid indices ``index [B, K]``.

        Under RoPE ``x`` is returned as is: positions enter every attention instead
        (:meth:`rope_for`).
        """
        if self.rope:
            return x
        pos = self.pos_embed.to(x.dtype).expand(index.shape[0], -1, -1)
        return x + gather_tokens(pos, index)

    def rope_for(self, index: Tensor) -> Rope:
        """RoPE tables for a token sequence with grid indices ``index [B', N']`` (None: sincos)."""
        if not self.rope:
            return None
        return rope_tables(grid_positions(index, self.grid_size), self.head_dim)

    def forward(
        self,
        context: Tensor,
        context_index: Tensor,
        target_index: Tensor,
        context_valid: Tensor | None = None,
        target_valid: Tensor | None = None,
    ) -> Tensor:
        """Predict target tokens.

        Args:
            context: context-encoder tokens ``[B, Nc, D]``.
            context_index: their level-0 grid indices ``[B, Nc]``.
            target_index: grid indices of the tokens to predict, per block ``[B, M, Nt]``.
            context_valid, target_valid: ``[B, Nc]``, ``[B, M, Nt]`` bool, False at padding
                (:mod:`hjepa.data.buckets`): no row attends to a padded token.

        Returns:
            ``[B, M, Nt, predictor_dim]`` predictions (before the per-level heads).
        """
        b, m, nt = target_index.shape
        nc = context_index.shape[1]
        ctx = self.add_positions(self.embed(context), context_index)
        queries = self.add_positions(
            self.mask_token.expand(b, m * nt, -1), target_index.reshape(b, m * nt)
        )
        if self.mode == "shared":
            x = torch.cat([ctx, queries], dim=1)
            index = torch.cat([context_index, target_index.reshape(b, m * nt)], dim=1)
            mask = ContextBlocks(nc, m, nt, context_valid, target_valid)
        else:
            x = torch.cat([ctx.repeat_interleave(m, dim=0), queries.reshape(b * m, nt, -1)], 1)
            index = torch.cat(
                [context_index.repeat_interleave(m, dim=0), target_index.reshape(b * m, nt)], 1
            )
            mask = _repeat_key_mask(context_valid, target_valid, b, m, nc, nt)
        x = run_blocks(
            self.blocks,
            x,
            self.rope_for(index),
            self.grad_checkpointing,
            attn_mask=mask,
            keep_from=nc,
        )
        return self.norm(x).reshape(b, m, nt, -1)


def _repeat_key_mask(
    context_valid: Tensor | None, target_valid: Tensor | None, b: int, m: int, nc: int, nt: int
) -> Tensor | None:
    """``[B M, 1, 1, Nc + Nt]`` key mask of ``repeat`` mode's sequences (None: no padding)."""
    if context_valid is None and target_valid is None:
        return None
    device = (context_valid if context_valid is not None else target_valid).device
    if context_valid is None:
        context_valid = torch.ones(b, nc, dtype=torch.bool, device=device)
    if target_valid is None:
        target_valid = torch.ones(b, m, nt, dtype=torch.bool, device=device)
    keys = torch.cat(
        [context_valid.repeat_interleave(m, dim=0), target_valid.reshape(b * m, nt)], dim=1
    )
    return keys[:, None, None, :]
