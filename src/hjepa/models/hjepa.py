"""H-JEPA: context encoder, EMA target encoder, shared predictor and per-level heads.

Targets at level ``l`` are the target encoder's level-0 token grid, average-pooled by ``2**l``
in 2D and layer-normalised without affine parameters; they never pass through a trainable
module. A level-``l`` prediction is the mask-aware average of the level-0 predictions inside
each target cell, mapped by that level's head (Linear + LayerNorm) to the target space.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hjepa.config import ModelConfig
from hjepa.data.masks import MaskBatch, mask_to_index
from hjepa.models.hierarchy import masked_cell_mean, pool_tokens
from hjepa.models.predictor import Predictor
from hjepa.models.vit import VisionTransformer, gather_tokens


@dataclass
class JEPAOutput:
    predictions: list[Tensor]  # per level [B, M, K_l, D]
    targets: list[Tensor]  # per level [B, M, K_l, D], no gradient
    context: Tensor  # context-encoder tokens [B, Nc, D]


def build_encoder(cfg: ModelConfig, image_size: int, in_channels: int) -> VisionTransformer:
    return VisionTransformer(
        image_size,
        cfg.patch_size,
        in_channels,
        cfg.embed_dim,
        cfg.depth,
        cfg.num_heads,
        cfg.mlp_ratio,
        cfg.drop_path,
    )


def level_features(tokens: Tensor, grid_size: int, levels: int) -> list[Tensor]:
    """Per level ``[B, N_l, D]``: the 2D-pooled grid, layer-normalised without affine."""
    return [
        F.layer_norm(pool_tokens(tokens, grid_size, lvl), tokens.shape[-1:])
        for lvl in range(levels)
    ]


class HJEPA(nn.Module):
    def __init__(self, cfg: ModelConfig, image_size: int, in_channels: int):
        super().__init__()
        self.levels = cfg.levels
        self.normalize_targets = cfg.normalize_targets
        self.context_encoder = build_encoder(cfg, image_size, in_channels)
        self.target_encoder = copy.deepcopy(self.context_encoder).requires_grad_(False)
        self.grid_size = self.context_encoder.grid_size
        self.predictor = Predictor(
            self.grid_size,
            cfg.embed_dim,
            cfg.predictor_embed_dim,
            cfg.predictor_depth,
            cfg.predictor_num_heads,
            cfg.mlp_ratio,
            cfg.drop_path,
        )
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Linear(cfg.predictor_embed_dim, cfg.embed_dim), nn.LayerNorm(cfg.embed_dim)
            )
            for _ in range(cfg.levels)
        )

    def train(self, mode: bool = True) -> HJEPA:
        super().train(mode)
        self.target_encoder.eval()  # the EMA copy never uses drop path
        return self

    def trainable_modules(self) -> list[nn.Module]:
        return [self.context_encoder, self.predictor, self.heads]

    @torch.no_grad()
    def target_levels(self, images: Tensor) -> list[Tensor]:
        return level_features(self.target_encoder(images), self.grid_size, self.levels)

    def forward(self, images: Tensor, masks: MaskBatch) -> JEPAOutput:
        targets_full = self.target_levels(images)
        context_index = masks.context_index()
        context = self.context_encoder(images, keep=context_index)
        predictions, targets = [], []
        for lvl in range(self.levels):
            block = masks.level_blocks[lvl]
            # Constant mode shares the level-0 footprint: one predictor pass serves every level.
            if lvl == 0 or not torch.equal(block, masks.level_blocks[0]):
                index = masks.target_index() if lvl == 0 else mask_to_index(block)
                raw = self.predictor(context, context_index, index)
            b, m = index.shape[:2]
            cells = masks.level_index(lvl)  # [B, M, K_l]
            if lvl == 0:
                pred = raw
            else:
                pooled = masked_cell_mean(raw, index, self.grid_size, lvl)
                pred = torch.gather(
                    pooled, 2, cells.unsqueeze(-1).expand(-1, -1, -1, pooled.shape[-1])
                )
            pred = self.heads[lvl](pred)
            target = gather_tokens(targets_full[lvl], cells.reshape(b, -1)).reshape(pred.shape)
            if self.normalize_targets:
                pred, target = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
            predictions.append(pred)
            targets.append(target)
        return JEPAOutput(predictions, targets, context)
