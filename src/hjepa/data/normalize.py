"""Turning uint8 image batches into normalised float model inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Per-channel mean and std of each dataset's training images (ImageNet's for folders).
STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "image_folder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": ((0.5,), (0.25,)),
}


def channel_stats(name: str, channels: int) -> tuple[Tensor, Tensor]:
    mean, std = STATS[name]
    mean_t, std_t = torch.tensor(mean), torch.tensor(std)
    if mean_t.numel() != channels:  # e.g. grayscale folders or 3-channel synthetic data
        mean_t, std_t = mean_t.mean().repeat(channels), std_t.mean().repeat(channels)
    return mean_t.view(1, -1, 1, 1), std_t.view(1, -1, 1, 1)


def to_input(images: Tensor, mean: Tensor, std: Tensor, image_size: int) -> Tensor:
    """uint8 ``[B, C, H, W]`` -> float, resized to ``image_size`` when needed, normalised."""
    return unit_to_input(images.float().div_(255.0), mean, std, image_size)


def unit_to_input(x: Tensor, mean: Tensor, std: Tensor, image_size: int) -> Tensor:
    """Float images in [0, 1] ``[B, C, H, W]`` -> resized when needed, normalised."""
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True)
    return (x - mean.to(x.device)) / std.to(x.device)
