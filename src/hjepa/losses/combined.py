r"""The training objective built from the config: prediction loss + regularisers + contrast.

.. math::
    \mathcal{L} = \sum_l w_l\, D(p_l, t_l)
        + \lambda_S\, \mathrm{SIGReg}(z)
        + \lambda_V \big(\mu\, v(e) + \nu\, c(e) + \lambda\, s(e^{(1)}, e^{(2)})\big)
        + \lambda_C\, \mathrm{NTXent}(h^{(1)}, h^{(2)})
        + \lambda_M\, \mathcal{L}_{\mathrm{multicrop}}
        + \lambda_{VS}\, \tfrac{1}{V+1} \textstyle\sum_v \mathrm{SIGReg}(\bar e_v)

Each term is present only when its option is on (``loss.regularizer``, ``loss.contrastive``,
``data.multicrop.num_local``, ``loss.view_sigreg``). What SIGReg sees, :math:`z`, is chosen by
``loss.regularize_on``:

* ``context``: the context encoder's tokens, ``[B * Nc, D]``;
* ``predictor``: per level the predictions ``[B * M * K_l, D]``; SIGReg is the mean over levels;
* ``pooled``: per level ``l`` the context tokens averaged inside each level-``l`` cell that
  holds at least one of them (level 0: the tokens themselves); the mean over levels.

VICReg and C-JEPA compare two augmented views of the same images: :math:`e^{(v)} \in
\mathbb{R}^{B \times D}` is the mean of view ``v``'s context tokens (both views under the same
context mask), :math:`v, c` are the mean over the two views of VICReg's variance and covariance
terms, :math:`s` is the invariance MSE between them, and :math:`h^{(v)}` is :math:`e^{(v)}`
through the projection head.

``loss.view_sigreg`` (LeJEPA's view-level SIGReg, with multi-crop): :math:`\bar e_0 \in
\mathbb{R}^{B \times D}` is the mean of the global view's context tokens and :math:`\bar e_v`
that of local crop ``v``: SIGReg on each view's batch of image embeddings pushes the pooled
features (what the probes read) towards an isotropic Gaussian, while the multi-crop term makes
the crops agree with the global image (LeJEPA's invariance, with our EMA target).

:meth:`Objective.forward` returns the total and every *unweighted* term by name (the names the
trainer logs); :attr:`Objective.weights` holds each term's coefficient in the total.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from hjepa.config import CHOICES
from hjepa.grid import grid_side, level_grid
from hjepa.losses.contrastive import nt_xent
from hjepa.losses.prediction import prediction_loss
from hjepa.losses.sigreg import SIGReg
from hjepa.losses.vicreg import VICReg
from hjepa.models.hierarchy import cell_of_token, masked_cell_mean
from hjepa.models.hjepa import token_mean

if TYPE_CHECKING:
    from hjepa.config import Config, LossConfig
    from hjepa.models.hjepa import JEPAOutput

REGULARIZERS = CHOICES["loss.regularizer"]
REGULARIZE_ON = CHOICES["loss.regularize_on"]


def context_cells(context: Tensor, index: Tensor, grid_size: int, level: int) -> Tensor:
    """Context tokens ``[B, Nc, D]`` at grid positions ``index [B, Nc]`` averaged inside each
    level-``level`` cell holding at least one of them: ``[cells, D]`` (level 0: the tokens).

    The number of non-empty cells varies per image, so selecting them reads it back to the
    host: the objective uses :func:`weighted_context_cells` instead.
    """
    means, present = weighted_context_cells(context, index, grid_size, level)
    return means if present is None else means[present > 0]


def weighted_context_cells(
    context: Tensor, index: Tensor, grid_size: int, level: int, valid: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Every level-``level`` cell's mean of the context tokens in it, ``[B * cells, D]``, and
    its weight, 1 where the cell holds a (``valid``) token and 0 where it holds none: a fixed
    shape, so no count is read back. Level 0: the tokens, weighted by ``valid``."""
    if level == 0:
        weight = None if valid is None else valid.flatten().to(context.dtype)
        return context.flatten(0, 1), weight
    rows = None if valid is None else valid.unsqueeze(1)
    means = masked_cell_mean(context.unsqueeze(1), index.unsqueeze(1), grid_size, level, rows)
    cells = level_grid(grid_size, level) ** 2
    cell = cell_of_token(grid_size, level, index.device)[index]  # [B, Nc]
    tokens = torch.ones_like(index, dtype=context.dtype) if valid is None else valid
    counts = context.new_zeros(index.shape[0], cells)
    counts.scatter_add_(1, cell, tokens.to(context.dtype))
    return means[:, 0].flatten(0, 1), (counts > 0).flatten().to(context.dtype)


class Objective(nn.Module):
    """Prediction loss plus the configured anti-collapse terms (see the module docstring).

    Args:
        loss: the ``loss`` section of the config: distance, regularizer and what it sees, and
            every term's weight (SIGReg :math:`\\lambda_S`, VICReg :math:`\\lambda_V` with its
            :math:`\\mu, \\nu, \\lambda`, the contrastive :math:`\\lambda_C` and :math:`\\tau`).
        level_weights: :math:`w_l`, one per level (``hjepa.config.level_weights``).
        grid_size: level-0 grid side (needed by ``regularize_on="pooled"``).
        multicrop_weight: :math:`\\lambda_M`, or None without multi-crop (``loss.view_sigreg``,
            :math:`\\lambda_{VS}`, needs it).
    """

    def __init__(
        self,
        loss: LossConfig,
        level_weights: Sequence[float],
        *,
        grid_size: int | None = None,
        multicrop_weight: float | None = None,
    ) -> None:
        super().__init__()
        if loss.regularizer not in REGULARIZERS:
            raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {loss.regularizer!r}")
        if loss.regularize_on not in REGULARIZE_ON:
            raise ValueError(
                f"regularize_on must be one of {REGULARIZE_ON}, got {loss.regularize_on!r}"
            )
        if loss.regularize_on == "pooled" and grid_size is None:
            raise ValueError("regularize_on='pooled' needs the level-0 grid_size")
        terms = loss.terms
        # The values the terms read, copied out of the section: the objective is what its own
        # attributes say, and a later change to the config cannot reach it.
        self.distance, self.regularize_on = loss.distance, loss.regularize_on
        self.sigreg_weight, self.vicreg_weight = loss.sigreg_weight, loss.vicreg_weight
        self.contrastive = loss.contrastive
        self.contrastive_weight = loss.contrastive_weight
        self.contrastive_temperature = loss.contrastive_temperature
        self.view_sigreg_weight = loss.view_sigreg
        self.level_weights = [float(w) for w in level_weights]
        self.grid_size = grid_size
        self.sigreg = (
            SIGReg(loss.sigreg_slices, draw=loss.sigreg_draw, evaluation=loss.sigreg_eval)
            if "sigreg" in terms
            else None
        )
        self.vicreg = (
            VICReg(loss.vicreg_inv_weight, loss.vicreg_var_weight, loss.vicreg_cov_weight)
            if "vicreg" in terms
            else None
        )
        self.multicrop_weight = multicrop_weight
        if loss.view_sigreg and multicrop_weight is None:
            raise ValueError("loss.view_sigreg needs multi-crop views (multicrop_weight)")
        # Its own directions' seed: the same step must not reuse the token SIGReg's slices.
        self.view_sigreg = (
            SIGReg(loss.sigreg_slices, seed=1, draw=loss.sigreg_draw, evaluation=loss.sigreg_eval)
            if loss.view_sigreg
            else None
        )

    @classmethod
    def from_config(cls, cfg: Config, multicrop: bool = False) -> Objective:
        from hjepa.config import level_weights

        return cls(
            cfg.loss,
            level_weights(cfg),
            grid_size=grid_side(cfg.data.image_size, cfg.model.patch_size),
            multicrop_weight=cfg.data.multicrop.weight if multicrop else None,
        )

    @property
    def needs_two_views(self) -> bool:
        """VICReg and the contrastive term compare two augmented views of each image."""
        return self.vicreg is not None or self.contrastive

    @property
    def weights(self) -> dict[str, float]:
        """Each term's coefficient in the total, in the order :meth:`forward` returns them."""
        out = {f"loss_level{i}": w for i, w in enumerate(self.level_weights)}
        if self.sigreg is not None:
            out["sigreg"] = self.sigreg_weight
        if self.vicreg is not None:
            out["vicreg_var"] = self.vicreg_weight * self.vicreg.var_weight
            out["vicreg_cov"] = self.vicreg_weight * self.vicreg.cov_weight
            out["vicreg_inv"] = self.vicreg_weight * self.vicreg.sim_weight
        if self.contrastive:
            out["contrastive"] = self.contrastive_weight
        if self.multicrop_weight is not None:
            out["multicrop"] = self.multicrop_weight
        if self.view_sigreg is not None:
            out["view_sigreg"] = self.view_sigreg_weight
        return out

    @property
    def term_names(self) -> list[str]:
        return list(self.weights)

    def sigreg_inputs(self, out: JEPAOutput) -> list[tuple[Tensor, Tensor | None]]:
        """The ``[N, D]`` embedding sets SIGReg sees (its value is their mean statistic), each
        with its points' weights ``[N]`` (0 at padding and empty cells; None: all count)."""
        if self.regularize_on == "context":
            valid = out.context_valid
            return [(out.context.flatten(0, 1), None if valid is None else valid.flatten())]
        if self.regularize_on == "predictor":
            valid = out.target_valid or [None] * len(out.predictions)
            return [
                (p.flatten(0, -2), None if v is None else v.flatten())
                for p, v in zip(out.predictions, valid)
            ]
        if out.context_index is None:
            raise ValueError("regularize_on='pooled' needs the context indices in the output")
        return [
            weighted_context_cells(
                out.context, out.context_index, self.grid_size, lvl, out.context_valid
            )
            for lvl in range(len(out.predictions))
        ]

    def draws(
        self, step: int, dim: int, dtype: torch.dtype, device: torch.device
    ) -> dict[str, tuple[Tensor, ...]]:
        """The random projections of ``step`` for each SIGReg term, on ``dim``-wide embeddings
        (the encoder's width): :meth:`forward`'s ``draws``, drawn outside a compiled loss."""
        sigregs = {"sigreg": self.sigreg, "view_sigreg": self.view_sigreg}
        return {
            name: sigreg.draw_at(step, dim, dtype, device)
            for name, sigreg in sigregs.items()
            if sigreg is not None
        }

    def forward(
        self, out: JEPAOutput, step: int | None = None, draws: dict | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and every unweighted term by name; ``step`` seeds SIGReg's directions,
        or ``draws`` (:meth:`draws`) holds that step's: a compiled loss never reads the step."""
        if (step is None) == (draws is None):
            raise ValueError("Objective needs exactly one of step= and draws=")
        draws = draws or {}
        total, per_level = prediction_loss(
            out.predictions, out.targets, self.level_weights, self.distance, out.target_valid
        )
        terms = {f"loss_level{i}": term for i, term in enumerate(per_level)}
        if self.sigreg is not None:
            sets = self.sigreg_inputs(out)
            drawn = draws.get("sigreg")
            terms["sigreg"] = sum(
                self.sigreg(z, step=step, weights=w, drawn=drawn) for z, w in sets
            ) / len(sets)
            total = total + self.sigreg_weight * terms["sigreg"]
        if self.needs_two_views and out.pooled_views is None:
            raise ValueError(
                "VICReg / the contrastive term need a second augmented view: call the model "
                "with second=<the same images, augmented again>"
            )
        if self.vicreg is not None:
            vic = self.vicreg(*out.pooled_views)
            terms["vicreg_var"] = vic["variance"]
            terms["vicreg_cov"] = vic["covariance"]
            terms["vicreg_inv"] = vic["invariance"]
            total = total + self.vicreg_weight * vic["total"]
        if self.contrastive:
            if out.projected_views is None:
                raise ValueError(
                    "loss.contrastive needs the model's contrastive_projector: build HJEPA with "
                    "contrastive=(hidden_dim, out_dim)"
                )
            z1, z2 = out.projected_views
            terms["contrastive"] = nt_xent(z1, z2, self.contrastive_temperature)
            total = total + self.contrastive_weight * terms["contrastive"]
        if self.multicrop_weight is not None:
            if out.view_loss is None:
                raise ValueError("the multi-crop term needs local views: call the model with views")
            terms["multicrop"] = out.view_loss
            total = total + self.multicrop_weight * out.view_loss
        if self.view_sigreg is not None:
            if out.pooled_local is None:
                raise ValueError("loss.view_sigreg needs the local crops' pooled embeddings")
            local = out.pooled_local.float()
            views = [
                token_mean(out.context, out.context_valid).float(),
                *local.chunk(local.shape[0] // out.context.shape[0]),
            ]
            drawn = draws.get("view_sigreg")
            terms["view_sigreg"] = sum(
                self.view_sigreg(z, step=step, drawn=drawn) for z in views
            ) / len(views)
            total = total + self.view_sigreg_weight * terms["view_sigreg"]
        return total, terms


__all__ = ["Objective", "context_cells", "weighted_context_cells", "REGULARIZERS", "REGULARIZE_ON"]
