r"""C-JEPA contrastive term: SimCLR's NT-Xent between two views (projector: models/heads.py).

For views :math:`z^{(1)}, z^{(2)} \in \mathbb{R}^{B \times D}` stacked into :math:`2B` unit
vectors :math:`u_i`, with positive :math:`p(i)` the other view of the same image and cosine
similarities :math:`s_{ik} = u_i^\top u_k / \tau`:

.. math::
    \mathcal{L} = \frac{1}{2B} \sum_{i=1}^{2B}
        -\log \frac{e^{s_{i\,p(i)}}}{\sum_{k \ne i} e^{s_{ik}}} .

Negatives are the other images of the local batch (no cross-rank gathering).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.1) -> Tensor:
    """Normalised-temperature cross-entropy over the ``2B`` embeddings of two views."""
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"nt_xent expects two views [B, D] of the same shape, got {tuple(z1.shape)} and "
            f"{tuple(z2.shape)}; pool tokens to one embedding per image first"
        )
    if z1.shape[0] < 2:
        raise ValueError("nt_xent needs at least 2 images per batch (the others are negatives)")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch = z1.shape[0]
    both = torch.cat((z1, z2))
    unit = F.normalize(both if both.dtype == torch.float64 else both.float(), dim=1)
    logits = unit @ unit.mT / temperature
    # A sample is never its own negative: drop the diagonal from the softmax.
    logits = logits.masked_fill(
        torch.eye(2 * batch, dtype=torch.bool, device=z1.device), -torch.inf
    )
    index = torch.arange(batch, device=z1.device)
    positives = torch.cat((index + batch, index))
    return F.cross_entropy(logits, positives)
