r"""VICReg terms (Bardes et al., 2022): variance, invariance, covariance.

For embeddings :math:`z \in \mathbb{R}^{N \times D}` with per-dimension means
:math:`\bar z_d` and unbiased covariance :math:`C = \frac{1}{N-1}(z - \bar z)^\top (z - \bar z)`:

.. math::
    v(z) = \frac1D \sum_d \max\big(0, \gamma - \sqrt{C_{dd} + \epsilon}\big), \qquad
    c(z) = \frac1D \sum_{d \ne d'} C_{dd'}^2, \qquad
    s(z, z') = \frac{1}{ND} \sum_{n,d} (z_{nd} - z'_{nd})^2 .

The invariance term only makes sense between two real views of the same images; without a
second view it is left out. Under ``torch.distributed`` the variance and covariance use the
global batch (gathered with gradient); the invariance term is per sample and stays local.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hjepa.losses.collectives import all_gather_cat


def _check_embeddings(z: Tensor, name: str = "z", min_rows: int = 2) -> None:
    if z.ndim != 2:
        raise ValueError(
            f"{name} must be [N, D] embeddings, got shape {tuple(z.shape)}; "
            "flatten tokens (z.flatten(0, -2)) or pool them first"
        )
    if z.shape[0] < min_rows:
        raise ValueError(
            f"{name} needs at least {min_rows} samples for batch statistics, got {z.shape[0]}; "
            "use a larger batch"
        )


def variance_loss(z: Tensor, gamma: float = 1.0, eps: float = 1e-4) -> Tensor:
    r"""Mean hinge :math:`\max(0, \gamma - \sqrt{\mathrm{Var}(z_d) + \epsilon})` over dimensions."""
    _check_embeddings(z)
    std = torch.sqrt(z.var(dim=0) + eps)
    return F.relu(gamma - std).mean()


def covariance_loss(z: Tensor) -> Tensor:
    r"""Sum of squared off-diagonal entries of the covariance matrix, divided by :math:`D`."""
    _check_embeddings(z)
    centred = z - z.mean(dim=0)
    cov = centred.mT @ centred / (z.shape[0] - 1)
    off_diagonal = cov.square().sum() - cov.diagonal().square().sum()
    return off_diagonal / z.shape[1]


def invariance_loss(z1: Tensor, z2: Tensor) -> Tensor:
    """Mean squared error between the embeddings of two views of the same images."""
    _check_embeddings(z1, "z1", min_rows=1)
    if z1.shape != z2.shape:
        raise ValueError(
            f"the two views must have the same shape, got {tuple(z1.shape)} and "
            f"{tuple(z2.shape)}; pair each image's two views row by row"
        )
    return F.mse_loss(z1, z2)


class VICReg(nn.Module):
    r"""Weighted VICReg loss; ``forward`` returns the terms and their weighted total.

    Args:
        sim_weight: weight :math:`\lambda` of the invariance term (paper: 25).
        var_weight: weight :math:`\mu` of the variance term (paper: 25).
        cov_weight: weight :math:`\nu` of the covariance term (paper: 1).
        gamma: target standard deviation per dimension.
        eps: added to the variance before the square root.

    ``forward(z, z2=None)`` returns ``{"variance", "covariance", "total"}``, plus
    ``"invariance"`` when a second view ``z2`` is given. With two views the variance and
    covariance terms are the mean over the two views.
    """

    def __init__(
        self,
        sim_weight: float = 25.0,
        var_weight: float = 25.0,
        cov_weight: float = 1.0,
        gamma: float = 1.0,
        eps: float = 1e-4,
    ) -> None:
        super().__init__()
        if min(sim_weight, var_weight, cov_weight) < 0:
            raise ValueError("VICReg weights must be >= 0")
        if gamma <= 0 or eps <= 0:
            raise ValueError(f"gamma and eps must be > 0, got gamma={gamma}, eps={eps}")
        self.sim_weight, self.var_weight, self.cov_weight = sim_weight, var_weight, cov_weight
        self.gamma, self.eps = gamma, eps

    def extra_repr(self) -> str:
        return (
            f"sim_weight={self.sim_weight}, var_weight={self.var_weight}, "
            f"cov_weight={self.cov_weight}, gamma={self.gamma}"
        )

    def forward(self, z: Tensor, z2: Tensor | None = None) -> dict[str, Tensor]:
        views = [z] if z2 is None else [z, z2]
        terms: dict[str, Tensor] = {}
        # At least float32, without autocast: a bf16 covariance of near-collapsed embeddings
        # is noise.
        views = [v if v.dtype in (torch.float32, torch.float64) else v.float() for v in views]
        with _no_autocast(z.device):
            if z2 is not None:
                terms["invariance"] = invariance_loss(*views)
            gathered = [all_gather_cat(v) for v in views]  # global-batch statistics
            variance = [variance_loss(g, self.gamma, self.eps) for g in gathered]
            covariance = [covariance_loss(g) for g in gathered]
        terms["variance"] = torch.stack(variance).mean()
        terms["covariance"] = torch.stack(covariance).mean()
        total = self.var_weight * terms["variance"] + self.cov_weight * terms["covariance"]
        if z2 is not None:
            total = total + self.sim_weight * terms["invariance"]
        terms["total"] = total
        return terms


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
