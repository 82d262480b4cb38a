"""Small trainable heads on top of the encoder's pooled embeddings."""

from __future__ import annotations

from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """``Linear -> norm -> GELU -> Linear`` projector for the contrastive embeddings.

    Args:
        in_dim: input width (the encoder's embedding dimension).
        hidden_dim: hidden width.
        out_dim: output width.
        norm: ``"batch"`` (BatchNorm1d, SimCLR) or ``"layer"`` (LayerNorm, batch-size free).
    """

    def __init__(
        self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 256, norm: str = "batch"
    ) -> None:
        super().__init__()
        norms = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}
        if norm not in norms:
            raise ValueError(f"norm must be one of {sorted(norms)}, got {norm!r}")
        if min(in_dim, hidden_dim, out_dim) < 1:
            raise ValueError("ProjectionHead dimensions must be positive")
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            norms[norm](hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 2:
            raise ValueError(f"ProjectionHead expects [B, D] inputs, got shape {tuple(x.shape)}")
        return self.net(x)
