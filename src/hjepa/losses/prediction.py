"""The hierarchical prediction loss: ``sum_l w_l * D(pred_l, target_l)``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

DISTANCES = {
    "mse": F.mse_loss,
    "smooth_l1": F.smooth_l1_loss,
}


def prediction_loss(
    predictions: list[Tensor], targets: list[Tensor], weights: list[float], distance: str = "mse"
) -> tuple[Tensor, list[Tensor]]:
    """Weighted sum over levels of the mean distance per element; returns (total, per level)."""
    if not len(predictions) == len(targets) == len(weights):
        raise ValueError("need one prediction, target and weight per level")
    fn = DISTANCES[distance]
    per_level = [fn(p.float(), t.float()) for p, t in zip(predictions, targets)]
    total = sum(w * term for w, term in zip(weights, per_level))
    return total, per_level
