"""The in-memory dataset container every small dataset loader returns."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset


class ImageTensors(Dataset):
    """An in-memory image classification dataset.

    Args:
        images: uint8 tensor ``[N, C, H, W]``.
        labels: int64 tensor ``[N]`` with values in ``[0, num_classes)``.
        num_classes: number of classes; defaults to ``labels.max() + 1``.
        classes: optional human-readable class names (length ``num_classes``).

    ``dataset[i]`` returns ``(images[i], int(labels[i]))``. The loader indexes
    ``images`` directly in batches, so no per-sample Python work happens in training.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be a uint8 tensor [N, C, H, W], got {images.dtype} of shape "
                f"{tuple(images.shape)}"
            )
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"labels must be a 1-D tensor with one entry per image ({images.shape[0]}), "
                f"got shape {tuple(labels.shape)}"
            )
        labels = labels.to(torch.int64)
        if num_classes is None:
            num_classes = int(labels.max()) + 1 if labels.numel() else 0
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"labels must lie in [0, {num_classes}), got range "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        if classes is not None and len(classes) != num_classes:
            raise ValueError(f"got {len(classes)} class names for {num_classes} classes")
        self.images = images
        self.labels = labels
        self.num_classes = int(num_classes)
        self.classes = (
            list(classes) if classes is not None else [str(i) for i in range(num_classes)]
        )

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """Native ``(H, W)`` of the stored images."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return f"ImageTensors(n={n}, channels={c}, size={h}x{w}, num_classes={self.num_classes})"
