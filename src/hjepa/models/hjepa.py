"""H-JEPA: context encoder, EMA target encoder, shared predictor and per-level heads.

Targets at level ``l`` are the target encoder's level-0 token grid, average-pooled by ``2**l``
in 2D and layer-normalised without affine parameters; they never pass through a trainable
module. A level-``l`` prediction is the mask-aware average of the level-0 predictions inside
each target cell, mapped by that level's head (Linear + LayerNorm) to the target space.
Options: an FPN over the per-level prediction grids before the heads (``model.fpn``), a
multi-crop view-prediction term (:meth:`HJEPA.view_prediction_loss`), a second augmented view
whose pooled context embedding feeds VICReg / C-JEPA (with a contrastive projection head), and
the EMA-free target (``model.target=shared``): targets from the context encoder itself.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hjepa.config import ModelConfig
from hjepa.data.buckets import TokenBuckets, pad_to
from hjepa.data.masks import MaskBatch, mask_to_index
from hjepa.models.heads import ProjectionHead
from hjepa.models.hierarchy import TopDownFPN, masked_cell_mean, pool_tokens, prediction_pyramid
from hjepa.models.predictor import Predictor
from hjepa.models.vit import VisionTransformer, gather_tokens


@dataclass
class JEPAOutput:
    predictions: list[Tensor]  # per level [B, M, K_l, D]
    targets: list[Tensor]  # per level [B, M, K_l, D], no gradient
    context: Tensor  # context-encoder tokens [B, Nc, D]
    pooled_target: Tensor | None = None  # [B, D] mean of the level-0 targets (multi-crop)
    view_loss: Tensor | None = None  # multi-crop view-prediction term, when views were given
    context_index: Tensor | None = None  # [B, Nc] grid positions of the context tokens
    # Two augmented views (``second`` given): per view the mean of its context tokens [B, D]
    # under the same context mask, and their contrastive projections [B, P] (projector on).
    pooled_views: tuple[Tensor, Tensor] | None = None
    projected_views: tuple[Tensor, Tensor] | None = None
    # Multi-crop: each local crop's token mean [V*B, D] (view-major), before the projector
    pooled_local: Tensor | None = None
    # Padded token counts (hjepa.data.buckets): False at padding, which every loss leaves out
    context_valid: Tensor | None = None  # [B, Nc]
    target_valid: list[Tensor] | None = None  # per level [B, M, K_l]


@dataclass
class MaskIndices:
    """A :class:`MaskBatch` as the gather indices the model consumes.

    Built once per batch on the CPU (:meth:`from_masks`), then moved to the device: the forward
    pass reads no mask back to the host, so it never waits for the GPU. A level whose blocks
    are the level-0 blocks holds the *same* tensor object in ``blocks`` (kept by :meth:`rows`
    and :meth:`to`), and shares level 0's predictor pass.
    """

    context: Tensor  # [B, Nc] level-0 context token indices
    blocks: list[Tensor]  # per level: [B, M, Nt_l] level-0 token indices of its blocks
    cells: list[Tensor]  # per level: [B, M, K_l] target cells on the level-l grid
    # Padded to bucket sizes (:meth:`padded`): False at padding. None: no padding.
    context_valid: Tensor | None = None  # [B, Nc]
    block_valid: list[Tensor] | None = None  # per level [B, M, Nt_l]
    cell_valid: list[Tensor] | None = None  # per level [B, M, K_l]

    @classmethod
    def from_masks(cls, masks: MaskBatch) -> MaskIndices:
        first = masks.level_blocks[0]
        block0 = mask_to_index(first)
        blocks = [
            block0 if b is first or torch.equal(b, first) else mask_to_index(b)
            for b in masks.level_blocks
        ]
        cells = [mask_to_index(t) for t in masks.level_targets]
        return cls(mask_to_index(masks.context), blocks, cells)

    def padded(self, buckets: TokenBuckets) -> MaskIndices:
        """Every index padded to its bucket size (:mod:`hjepa.data.buckets`), with the masks
        of the real positions; a block tensor shared by levels stays shared."""
        done: dict[int, tuple[Tensor, Tensor]] = {}

        def block(t: Tensor) -> tuple[Tensor, Tensor]:
            if id(t) not in done:
                done[id(t)] = pad_to(t, buckets.block_size(t.shape[-1]))
            return done[id(t)]

        context = pad_to(self.context, buckets.context_size(self.context.shape[-1]))
        blocks = [block(b) for b in self.blocks]
        cells = [pad_to(c, buckets.cell_size(i, c.shape[-1])) for i, c in enumerate(self.cells)]
        return MaskIndices(
            context[0],
            [b for b, _ in blocks],
            [c for c, _ in cells],
            context[1],
            [v for _, v in blocks],
            [v for _, v in cells],
        )

    def _map(self, fn) -> MaskIndices:
        done: dict[int, Tensor] = {}  # keeps shared tensors shared

        def once(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            if id(t) not in done:
                done[id(t)] = fn(t)
            return done[id(t)]

        def each(ts: list[Tensor] | None) -> list[Tensor] | None:
            return None if ts is None else [once(t) for t in ts]

        return MaskIndices(
            once(self.context),
            each(self.blocks),
            each(self.cells),
            once(self.context_valid),
            each(self.block_valid),
            each(self.cell_valid),
        )

    def rows(self, rows: slice) -> MaskIndices:
        """The samples ``rows`` of the batch (e.g. one rank's share ``rank::world_size``)."""
        return self._map(lambda t: t[rows])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MaskIndices:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> MaskIndices:
        """Page-locked copies: a later ``to(cuda, non_blocking=True)`` is truly asynchronous."""
        return self._map(lambda t: t.pin_memory())


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
        pos_embed=cfg.pos_embed,
        layer_scale=cfg.layer_scale,
        grad_checkpointing=cfg.grad_checkpointing,
        stem=cfg.stem,
    )


def level_features(tokens: Tensor, grid_size: int, levels: int) -> list[Tensor]:
    """Per level ``[B, N_l, D]``: the 2D-pooled grid, layer-normalised without affine."""
    return [
        F.layer_norm(pool_tokens(tokens, grid_size, lvl), tokens.shape[-1:])
        for lvl in range(levels)
    ]


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode (no drop path) for the duration, then its mode restored."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class HJEPA(nn.Module):
    """Context encoder, target encoder, shared predictor and per-level heads.

    ``cfg.target="ema"``: the target encoder is an EMA copy (a submodule, updated by the
    trainer). ``"shared"``: there is no copy; :attr:`target_encoder` *is* the context encoder,
    run on the full image in eval mode, under ``no_grad`` when ``cfg.target_stop_grad``.
    ``contrastive=(hidden, out)`` adds the C-JEPA projection head ``contrastive_projector``.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        image_size: int,
        in_channels: int,
        *,
        multicrop: bool = False,
        contrastive: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.levels = cfg.levels
        self.normalize_targets = cfg.normalize_targets
        self.shared_target = cfg.target == "shared"
        self.target_stop_grad = cfg.target_stop_grad
        self.context_encoder = build_encoder(cfg, image_size, in_channels)
        if not self.shared_target:  # registered as a submodule (nn.Module.__setattr__)
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
            pos_embed=cfg.pos_embed,
            layer_scale=cfg.layer_scale,
            grad_checkpointing=cfg.grad_checkpointing,
            mode=cfg.predictor_mode,
        )
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Linear(cfg.predictor_embed_dim, cfg.embed_dim), nn.LayerNorm(cfg.embed_dim)
            )
            for _ in range(cfg.levels)
        )
        # Optional trainable parts, created only when on (off: same modules and RNG draws).
        self.fpn = (
            TopDownFPN(cfg.predictor_embed_dim, cfg.levels, cfg.fpn) if cfg.fpn != "none" else None
        )
        self.view_projector = None
        if multicrop:  # identity at init: starts as plain "pooled local = pooled global"
            self.view_projector = nn.Linear(cfg.embed_dim, cfg.embed_dim)
            nn.init.eye_(self.view_projector.weight)
            nn.init.zeros_(self.view_projector.bias)
        self.contrastive_projector = None
        if contrastive is not None:
            hidden, out = contrastive
            self.contrastive_projector = ProjectionHead(cfg.embed_dim, hidden, out)

    @property
    def target_encoder(self) -> VisionTransformer:
        """The encoder targets come from: the EMA copy, or the context encoder (shared)."""
        return self.context_encoder if self.shared_target else self._modules["target_encoder"]

    def train(self, mode: bool = True) -> HJEPA:
        super().train(mode)
        if not self.shared_target:
            self.target_encoder.eval()  # the EMA copy never uses drop path
        return self

    def optional_modules(self) -> dict[str, nn.Module]:
        """Trainable modules that exist only with their option on, by checkpoint key."""
        parts = {
            "fpn": self.fpn,
            "view_projector": self.view_projector,
            "contrastive_projector": self.contrastive_projector,
        }
        return {name: module for name, module in parts.items() if module is not None}

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        """Every module whose weights a checkpoint holds, by checkpoint key."""
        return {
            "context_encoder": self.context_encoder,
            "target_encoder": self.target_encoder,
            "predictor": self.predictor,
            "heads": self.heads,
            **self.optional_modules(),
        }

    def trainable_modules(self) -> list[nn.Module]:
        return [self.context_encoder, self.predictor, self.heads, *self.optional_modules().values()]

    def view_prediction_loss(
        self, views: Tensor, pooled_target: Tensor, pooled_views: Tensor | None = None
    ) -> Tensor:
        """Multi-crop term (LeJEPA's view prediction) for ``V`` local crops per image.

        ``views [V*B, C, h, w]`` (view-major: rows ``v*B .. v*B+B-1`` are view ``v``) go through
        the context encoder; each crop's token mean, mapped by ``view_projector``, regresses the
        stop-gradient pooled target of its global image ``t = pooled_target [B, D]``, relative
        to the target's total batch variance ``S = Σ_d Var_b(t_{b,d})`` (no gradient):

        ``mean_{v,b} ||P(mean_tokens f_θ(view_{v,b})) − t_b||² / (S + 1e-6)``.

        1.0 means "no better than the batch mean" (an R²-style scale). Pooled embeddings share
        a large common component, so the raw MSE is ~1e-3 per channel and would leave the term
        without effect; per-channel scaling would blow up near-constant channels instead.
        ``pooled_views``: the crops' token means, when the caller has already encoded them.
        """
        if self.view_projector is None:
            raise RuntimeError("build HJEPA(..., multicrop=True) to use view_prediction_loss")
        if pooled_views is None:
            pooled_views = self.context_encoder(views).mean(dim=1)
        pooled = self.view_projector(pooled_views).float()
        target = pooled_target.detach().float()
        total_var = target.var(dim=0, unbiased=False).sum() + 1e-6
        target = target.repeat(views.shape[0] // target.shape[0], 1)
        return ((pooled - target) ** 2).sum(dim=1).mean() / total_var

    def target_levels(self, images: Tensor) -> list[Tensor]:
        """Per-level targets of the full images: EMA encoder (no gradient), or the context
        encoder in eval mode (no drop path), with gradient only when not stop-gradient."""
        if not self.shared_target:
            with torch.no_grad():
                return level_features(self.target_encoder(images), self.grid_size, self.levels)
        grad = torch.is_grad_enabled() and not self.target_stop_grad
        with _eval_mode(self.context_encoder), torch.set_grad_enabled(grad):
            return level_features(self.context_encoder(images), self.grid_size, self.levels)

    def forward(
        self,
        images: Tensor,
        masks: MaskBatch | MaskIndices,
        views: Tensor | None = None,
        second: Tensor | None = None,
    ) -> JEPAOutput:
        """Predictions and targets of every level; with multi-crop ``views [V*B, C, h, w]``
        also the view-prediction term, and with a second augmented view ``second [B, C, H, W]``
        of the same images the pooled embeddings of both views (and their contrastive
        projections). All inside forward, so DDP sees every used parameter."""
        idx = masks if isinstance(masks, MaskIndices) else MaskIndices.from_masks(masks)
        targets_full = self.target_levels(images)
        context = self.context_encoder(images, keep=idx.context, keep_valid=idx.context_valid)
        predictions, targets = self._predict_levels(context, idx, targets_full)
        pooled = targets_full[0].mean(dim=1)
        view_loss = pooled_local = None
        if views is not None:
            pooled_local = self.context_encoder(views).mean(dim=1)
            view_loss = self.view_prediction_loss(views, pooled, pooled_local)
        pooled_views = projected = None
        if second is not None:
            pooled_views, projected = self._two_views(context, second, idx)
        return JEPAOutput(
            predictions,
            targets,
            context,
            pooled,
            view_loss,
            context_index=idx.context,
            pooled_views=pooled_views,
            projected_views=projected,
            pooled_local=pooled_local,
            context_valid=idx.context_valid,
            target_valid=idx.cell_valid,
        )

    def _predict_levels(
        self, context: Tensor, idx: MaskIndices, targets_full: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per level, the prediction of every target cell and its target ``[B, M, K_l, D]``."""
        predictions, targets = [], []
        # (block indices, predictor output, FPN outputs) of each predictor pass so far
        passes: list[tuple[Tensor, Tensor, list[Tensor] | None]] = []
        for lvl in range(self.levels):
            index = idx.blocks[lvl]
            valid = None if idx.block_valid is None else idx.block_valid[lvl]
            # Constant mode shares the level-0 footprint (the same tensor object): one predictor
            # pass serves every level. Found by `is`, not by id(): a compiled step then guards
            # on the aliasing, not on one batch's tensor.
            done = _pass_of(passes, index)
            if done is None:
                raw = self.predictor(context, idx.context, index, idx.context_valid, valid)
                fused = None
                if self.fpn is not None:  # dense per-block grids, fused top-down
                    pyramid = prediction_pyramid(raw, index, self.grid_size, self.levels, valid)
                    fused = self.fpn(pyramid, self.grid_size)
                done = (index, raw, fused)
                passes.append(done)
            _, raw, fused = done
            cells = idx.cells[lvl]  # [B, M, K_l]
            if fused is not None:  # the FPN's level, gathered at the target cells
                pred = _gather_cells(fused[lvl], cells)
            elif lvl == 0:
                pred = raw
            else:
                means = masked_cell_mean(raw, index, self.grid_size, lvl, valid)
                pred = _gather_cells(means, cells)
            pred = self.heads[lvl](pred)
            b = index.shape[0]
            target = gather_tokens(targets_full[lvl], cells.reshape(b, -1)).reshape(pred.shape)
            if self.normalize_targets:
                pred, target = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
            predictions.append(pred)
            targets.append(target)
        return predictions, targets

    def _two_views(
        self, context: Tensor, second: Tensor, idx: MaskIndices
    ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, ...] | None]:
        """The pooled embeddings of both views (and their contrastive projections). The second
        view keeps the first view's context positions: both embeddings are means over the same
        grid cells of two different crops of the image."""
        second_context = self.context_encoder(
            second, keep=idx.context, keep_valid=idx.context_valid
        )
        pooled_views = (
            token_mean(context, idx.context_valid),
            token_mean(second_context, idx.context_valid),
        )
        projected = None
        if self.contrastive_projector is not None:  # one batch through the BatchNorm
            both = self.contrastive_projector(torch.cat(pooled_views))
            projected = tuple(both.chunk(2))
        return pooled_views, projected


def token_mean(tokens: Tensor, valid: Tensor | None) -> Tensor:
    """``tokens [B, N, D]`` -> ``[B, D]``: the mean over the tokens ``valid [B, N]`` keeps
    (all when None)."""
    if valid is None:
        return tokens.mean(dim=1)
    weight = valid.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weight).sum(dim=1) / weight.sum(dim=1)


def _pass_of(passes: list[tuple], index: Tensor) -> tuple | None:
    """The entry of ``passes`` made for the block indices ``index`` (the same object), or None."""
    for done in passes:
        if done[0] is index:
            return done
    return None


def _gather_cells(grid: Tensor, cells: Tensor) -> Tensor:
    """``grid [B, M, C, D]`` at the target cells ``cells [B, M, K]``: ``[B, M, K, D]``."""
    return torch.gather(grid, 2, cells.unsqueeze(-1).expand(-1, -1, -1, grid.shape[-1]))
