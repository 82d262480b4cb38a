"""The hierarchical prediction loss: ``sum_l w_l * D(pred_l, target_l)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DISTANCES = {
    "mse": F.mse_loss,
    "smooth_l1": F.smooth_l1_loss,
}


def prediction_loss(
    predictions: list[Tensor],
    targets: list[Tensor],
    weights: list[float],
    distance: str = "mse",
    valid: list[Tensor] | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Weighted sum over levels of the mean distance per element; returns (total, per level).

    ``valid``: per level ``[B, M, K_l]`` bool, False at padded cells (left out of the mean)."""
    if not len(predictions) == len(targets) == len(weights):
        raise ValueError("need one prediction, target and weight per level")
    fn = DISTANCES[distance]
    if valid is None:
        per_level = [fn(_full(p), _full(t)) for p, t in zip(predictions, targets)]
    else:
        per_level = [
            _masked_mean(fn(_full(p), _full(t), reduction="none"), v)
            for p, t, v in zip(predictions, targets, valid)
        ]
    total = sum(w * term for w, term in zip(weights, per_level))
    return total, per_level


def _full(x: Tensor) -> Tensor:
    """Half precision in float32; float32 and float64 as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _masked_mean(distances: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``distances [B, M, K, D]`` over the cells ``valid [B, M, K]`` keeps."""
    weight = valid.to(distances.dtype).unsqueeze(-1)
    return (distances * weight).sum() / (weight.sum() * distances.shape[-1])
