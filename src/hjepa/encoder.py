"""A trained target encoder as a ready-to-use ``nn.Module`` (what ``hjepa.load_encoder`` returns).

The module takes images as they come (float in [0, 1], or uint8), applies the normalisation of
the data it was trained on and the resize to its own image size, and returns either the
level-0 tokens or the pooled per-level features that ``hjepa eval`` probes. It is the same
code path as eval's (:func:`hjepa.data.normalize.to_input`, :func:`hjepa.eval.features.
pooled_features`), so one checkpoint gives one set of features however it was loaded.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hjepa import checkpoint as ckpt
from hjepa.config import ConfigError, from_dict
from hjepa.data.normalize import channel_stats, unit_to_input
from hjepa.eval.features import pooled_features
from hjepa.models.hjepa import build_encoder
from hjepa.models.vit import VisionTransformer, input_channels

CONCAT = "concat"


class Encoder(nn.Module):
    """A frozen-feature extractor: normalisation + ViT target encoder + eval's pooling.

    ``images``: ``[B, C, H, W]``, float in [0, 1] or uint8 in [0, 255]; other sizes are
    resized to :attr:`image_size` (bilinear, antialiased), as ``hjepa eval`` does. Float
    images outside [0, 1] (0-255 values, say) or with NaN/inf are refused (``ValueError``).
    Calling the module is :meth:`features` with ``level="concat"``.
    """

    def __init__(
        self,
        backbone: VisionTransformer,
        *,
        levels: int,
        mean: Tensor,
        std: Tensor,
        image_size: int,
        data_name: str = "",
        step: int | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.levels = levels
        self.image_size = image_size
        self.channels = input_channels(backbone.state_dict())
        self.data_name = data_name
        self.step = step
        # Buffers: they follow .to(device) with the weights.
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1).clone(), persistent=False)
        self.register_buffer("std", std.reshape(1, -1, 1, 1).clone(), persistent=False)

    @property
    def feature_names(self) -> list[str]:
        """Valid ``level`` values of :meth:`features`: ``level0``, ..., ``concat``."""
        return [f"level{lvl}" for lvl in range(self.levels)] + [CONCAT]

    def feature_dim(self, level: str = CONCAT) -> int:
        self._check_level(level)
        return self.backbone.embed_dim * (self.levels if level == CONCAT else 1)

    def normalize(self, images: Tensor) -> Tensor:
        """Images as given -> the encoder's input (resized, normalised with the data's stats)."""
        if images.dim() != 4 or images.shape[1] != self.channels:
            raise ValueError(
                f"images must be [B, {self.channels}, H, W], got {tuple(images.shape)}"
            )
        if images.dtype == torch.uint8:
            x = images.float().div_(255.0)
        elif images.is_floating_point():
            x = images.float()
            _check_unit_range(x)
        else:
            raise ValueError(f"images must be float in [0, 1] or uint8, got {images.dtype}")
        return unit_to_input(x, self.mean, self.std, self.image_size)

    def tokens(self, images: Tensor) -> Tensor:
        """Level-0 tokens of the target encoder, ``[B, N, D]`` (``N`` = grid side squared)."""
        return self.backbone(self.normalize(images))

    def features(self, images: Tensor, level: str = CONCAT) -> Tensor:
        """Pooled features ``[B, D']``: ``levelL`` is ``[B, D]``, ``concat`` ``[B, levels*D]``.

        Exactly what ``hjepa eval`` probes; with one level, ``concat`` is ``level0``.
        """
        self._check_level(level)
        pooled = pooled_features(self.tokens(images), self.backbone.grid_size, self.levels)
        if level == CONCAT and self.levels == 1:
            return pooled["level0"]
        return pooled[level]

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images)

    def _check_level(self, level: str) -> None:
        if level not in self.feature_names:
            raise ValueError(f"level must be one of {', '.join(self.feature_names)}, got {level!r}")

    def extra_repr(self) -> str:
        return (
            f"data={self.data_name or '?'}, image_size={self.image_size}, "
            f"channels={self.channels}, levels={self.levels}, step={self.step}"
        )


def _check_unit_range(x: Tensor) -> None:
    """Refuse float images outside [0, 1] or not finite: the encoder would return features of
    something it never saw, without a word (0-255 floats give cosine 0.5 to the right ones)."""
    finite, low, high = torch.stack([x.isfinite().all().float(), x.min(), x.max()]).tolist()
    if not finite:
        raise ValueError(
            "images hold non-finite values (NaN or inf): their features would be meaningless; "
            "check what produced them"
        )
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"float images must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]: divide "
            "0-255 values by 255, or pass them as uint8 (0-255) as they are"
        )


def encoder_from_state(
    target_encoder: dict[str, Tensor], config: dict, *, step: int | None, source: str
) -> Encoder:
    """An :class:`Encoder` from a target-encoder state dict and the run's config tree."""
    try:
        cfg = from_dict(config)
    except (ConfigError, KeyError, TypeError, AttributeError) as e:
        raise ckpt.CheckpointError(f"{source} holds no valid config ({e})") from e
    try:
        channels = input_channels(target_encoder)
    except (KeyError, AttributeError, IndexError) as e:
        raise ckpt.CheckpointError(f"{source} holds no target-encoder weights ({e!r})") from e
    backbone = build_encoder(cfg.model, cfg.data.image_size, channels)
    try:
        ckpt.load_module_state(backbone, target_encoder)
    except RuntimeError as e:
        raise ckpt.CheckpointError(f"{source} does not fit its own config ({e})") from e
    mean, std = channel_stats(cfg.data.name, channels)
    return Encoder(
        backbone,
        levels=cfg.model.levels,
        mean=mean,
        std=std,
        image_size=cfg.data.image_size,
        data_name=cfg.data.name,
        step=step,
    ).eval()


__all__ = ["Encoder", "encoder_from_state"]
