"""Representation-collapse diagnostics for embeddings ``z`` of shape [N, D].

* :func:`embedding_std` -- mean over dimensions of the per-dimension standard deviation
  (unbiased), on the raw embeddings. Scale dependent; 0 means every sample is the same.
* :func:`normalized_embedding_std` -- the same on L2-normalised rows. Scale free: rows
  spread uniformly on the unit sphere give about :math:`1/\\sqrt{D}`, complete collapse
  gives 0.
* :func:`effective_rank` -- RankMe (Garrido et al., 2023): with singular values
  :math:`\\sigma_k` of ``z`` and :math:`p_k = \\sigma_k / \\lVert \\sigma \\rVert_1 +
  \\varepsilon`, the rank is :math:`\\exp(-\\sum_k p_k \\log p_k)`, between 1 (one
  direction) and :math:`\\min(N, D)` (all directions equally used). Embeddings are not
  centred, as in RankMe, so identical rows give rank 1 rather than an undefined value.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

#: Collapse when the effective rank falls below this share of the embedding dimension D.
COLLAPSE_RANK_FRACTION = 0.01
#: Collapse when the normalised std falls below this multiple of 1/sqrt(D), the value of
#: a healthy (isotropic) embedding.
COLLAPSE_NORMALIZED_STD_FACTOR = 0.1
#: RankMe's epsilon, keeping log p finite for zero singular values.
RANKME_EPS = 1e-7


def _check_embeddings(z: Tensor) -> Tensor:
    if z.ndim != 2:
        raise ValueError(
            f"collapse: embeddings must be 2-D [num_samples, dim]; got {tuple(z.shape)}. "
            "Pool or flatten token features first."
        )
    if z.shape[0] < 2 or z.shape[1] < 1:
        raise ValueError(
            f"collapse: need at least 2 samples and 1 dimension; got {tuple(z.shape)}."
        )
    # float64: singular-value entropies and tiny stds are sensitive to rounding.
    z = z.detach().to(torch.float64)
    if not torch.isfinite(z).all():
        raise ValueError("collapse: embeddings contain NaN or Inf; the model has diverged.")
    return z


def embedding_std(z: Tensor) -> float:
    """:math:`\\frac{1}{D} \\sum_d \\operatorname{std}_n(z_{nd})` on raw ``z`` [N, D]."""
    z = _check_embeddings(z)
    return z.std(dim=0, correction=1).mean().item()


def normalized_embedding_std(z: Tensor) -> float:
    """:func:`embedding_std` of the L2-normalised rows :math:`z_n / \\lVert z_n \\rVert`."""
    z = _check_embeddings(z)
    return F.normalize(z, dim=1).std(dim=0, correction=1).mean().item()


def effective_rank(z: Tensor) -> float:
    """RankMe effective rank of ``z`` [N, D] (see the module docstring)."""
    z = _check_embeddings(z)
    singular_values = torch.linalg.svdvals(z)
    total = singular_values.sum()
    if total == 0:  # all-zero embeddings: nothing is represented at all
        return 1.0
    p = singular_values / total + RANKME_EPS
    return math.exp(-(p * p.log()).sum().item())


def collapse_report(z: Tensor) -> dict[str, float | int | bool]:
    """Collapse diagnostics of ``z`` [N, D] with a verdict.

    ``collapsed`` is True when ``effective_rank < COLLAPSE_RANK_FRACTION * D`` (dimensional
    collapse) or ``normalized_embedding_std < COLLAPSE_NORMALIZED_STD_FACTOR / sqrt(D)``
    (all rows pointing the same way).
    """
    z = _check_embeddings(z)
    dim = z.shape[1]
    rank = effective_rank(z)
    norm_std = normalized_embedding_std(z)
    rank_threshold = COLLAPSE_RANK_FRACTION * dim
    std_threshold = COLLAPSE_NORMALIZED_STD_FACTOR / math.sqrt(dim)
    return {
        "dim": dim,
        "embedding_std": embedding_std(z),
        "normalized_embedding_std": norm_std,
        "normalized_embedding_std_healthy": 1.0 / math.sqrt(dim),
        "effective_rank": rank,
        "effective_rank_fraction": rank / dim,
        "collapsed": bool(rank < rank_threshold or norm_std < std_threshold),
    }
