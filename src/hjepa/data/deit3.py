"""DeiT III style augmentations, batched on float tensors (no PIL, no per-image Python loop).

They run after the random resized crop + flip of :class:`hjepa.data.augment.BatchAugment`, on
the normalised batch, in this order:

1. **3-Augment** (DeiT III): with probability ``three_augment`` an image gets exactly one of
   grayscale, solarize (``x -> 1 - x`` where ``x >= 1/2``) or Gaussian blur (``sigma`` uniform
   in ``blur_sigma`` pixels), picked uniformly. Grayscale is left out of the pool for
   one-channel images, where it would be the identity.
2. **Colour jitter** of strength ``s``: brightness ``x * b``, contrast
   ``(x - mean_gray) * c + mean_gray`` and, for RGB, saturation ``gray + (x - gray) * t`` with
   ``b, c, t`` uniform in ``[1 - s, 1 + s]`` per image, clamped to ``[0, 1]`` after each.
3. **Mixup** ``x <- lam x + (1 - lam) x_partner`` and **CutMix** (a box of area fraction about
   ``1 - lam`` pasted from the partner), ``lam ~ Beta(a, a)`` per image; the partner of image
   ``i`` is image ``i - 1`` of the same batch. With both on, each image gets one of the two.
4. **Random erasing**: with probability ``random_erasing`` one box (area 2-33 %, aspect
   0.3-3.3) per image is replaced by standard normal noise (in normalised units, as timm).

Steps 1-2 work in ``[0, 1]`` pixel units (the batch is un-normalised and normalised again);
3-4 are affine or local and work on the normalised batch directly. Every random number comes
from the ``torch.Generator`` given to :meth:`DeiT3Augment.__call__`, drawn on the CPU for the
whole global batch (``shard``), so a run is reproducible on any device and world size.

For JEPA pretraining there are no labels: one augmented image feeds both the context and the
target encoder, so every transform here is "consistent across views" by construction. Mixup and
CutMix then only change the images (mixtures become the domain the encoder learns); the label
mixing they are known for matters only for supervised training, for which
:func:`mix_targets` mixes one-hot labels with the same ``lam`` and partners.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from hjepa.config import AugmentConfig

ERASE_AREA = (0.02, 1 / 3)
ERASE_ASPECT = (0.3, 1 / 0.3)


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _beta(n: int, alpha: float, generator: torch.Generator | None) -> Tensor:
    """``n`` draws of Beta(alpha, alpha); seeded from ``generator`` (Beta takes no generator)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.distributions.Beta(alpha, alpha).sample((n,))


def grayscale(x: Tensor) -> Tensor:
    """ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B`` of ``[B, 3, H, W]``, repeated on 3 channels.
    One-channel input is returned unchanged."""
    if x.shape[1] == 1:
        return x
    w = x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True).expand_as(x)


def solarize(x: Tensor, threshold: float = 0.5) -> Tensor:
    """Invert pixels at or above ``threshold`` (``[0, 1]`` units)."""
    return torch.where(x >= threshold, 1.0 - x, x)


def gaussian_blur(x: Tensor, sigma: Tensor, max_sigma: float | None = None) -> Tensor:
    """Separable Gaussian blur with one ``sigma`` (pixels) per image, reflect padding.

    The kernel radius is ``ceil(3 * max_sigma)`` (default: the largest ``sigma``; capped below
    the image side); each image's kernel ``exp(-t^2 / 2 sigma^2)`` is normalised to sum 1, so
    constants are preserved.
    """
    b, c, h, w = x.shape
    reach = float(sigma.max()) if max_sigma is None else max_sigma
    radius = max(1, min(math.ceil(3 * reach), h - 1, w - 1))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(device=x.device, dtype=x.dtype)[:, None]
    kernel = torch.exp(-(t[None, :] ** 2) / (2 * s**2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # [B*C, k]
    flat = x.reshape(1, b * c, h, w)
    flat = F.conv2d(
        F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=b * c
    )
    flat = F.conv2d(
        F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=b * c
    )
    return flat.reshape(b, c, h, w)


def color_jitter(x: Tensor, factors: Tensor) -> Tensor:
    """Brightness, contrast and (RGB only) saturation; ``factors [B, 3]`` multiplicative."""
    f = factors.to(device=x.device, dtype=x.dtype)[:, :, None, None, None]
    x = (x * f[:, 0]).clamp(0, 1)
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * f[:, 1] + mean).clamp(0, 1)
    if x.shape[1] == 3:
        gray = grayscale(x)
        x = (gray + (x - gray) * f[:, 2]).clamp(0, 1)
    return x


def box_masks(boxes: Tensor, height: int, width: int, device: torch.device) -> Tensor:
    """``boxes [B, 4]`` (top, left, height, width in pixels) -> bool ``[B, 1, H, W]``."""
    top, left, bh, bw = boxes.to(device).unbind(1)
    rows = torch.arange(height, device=device)[None, :, None]
    cols = torch.arange(width, device=device)[None, None, :]
    inside = (rows >= top[:, None, None]) & (rows < (top + bh)[:, None, None])
    inside = inside & (cols >= left[:, None, None]) & (cols < (left + bw)[:, None, None])
    return inside[:, None]


@dataclass
class MixInfo:
    """How a batch was mixed: image ``i`` keeps ``lam[i]`` of itself, the rest from
    ``partner[i]``."""

    lam: Tensor  # [B] float
    partner: Tensor  # [B] long


def mix_targets(one_hot: Tensor, info: MixInfo) -> Tensor:
    """Soft labels for a mixed batch: ``lam * y + (1 - lam) * y[partner]`` (supervised use)."""
    lam = info.lam.to(one_hot)[:, None]
    return lam * one_hot + (1 - lam) * one_hot[info.partner.to(one_hot.device)]


class DeiT3Augment:
    """The options above on a normalised float batch ``[B, C, H, W]``; all off returns ``x``."""

    def __init__(
        self,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        three_augment: float = 0.0,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        color_jitter: float = 0.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        random_erasing: float = 0.0,
    ):
        for name, p in (("three_augment", three_augment), ("random_erasing", random_erasing)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], got {p}")
        if not 0.0 <= color_jitter < 1.0 or mixup < 0 or cutmix < 0:
            raise ValueError("color_jitter must be in [0, 1); mixup and cutmix >= 0")
        if not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_sigma must be [min, max] with 0 < min <= max, got {blur_sigma}")
        self.mean = torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1)
        self.std = torch.tensor([float(s) for s in std]).view(1, -1, 1, 1)
        self.three_augment = float(three_augment)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.color_jitter = float(color_jitter)
        self.mixup = float(mixup)
        self.cutmix = float(cutmix)
        self.random_erasing = float(random_erasing)

    @classmethod
    def from_config(
        cls, augment: AugmentConfig, *, mean: Sequence[float], std: Sequence[float]
    ) -> DeiT3Augment:
        """The ``data.augment`` section as an augmentation (its keys are this class's)."""
        return cls(**dataclasses.asdict(augment), mean=mean, std=std)

    @property
    def enabled(self) -> bool:
        return any(
            v > 0
            for v in (
                self.three_augment,
                self.color_jitter,
                self.mixup,
                self.cutmix,
                self.random_erasing,
            )
        )

    # -- pixel-space photometric ops -------------------------------------------------------
    def _three_augment(self, x: Tensor, n: int, rows: slice, gen: torch.Generator | None) -> Tensor:
        def blur(sub: Tensor, idx: Tensor) -> Tensor:  # radius from the range, not the draws
            return gaussian_blur(sub, sigma[idx], self.blur_sigma[1])

        ops = [lambda sub, idx: solarize(sub), blur]
        if x.shape[1] == 3:
            ops.insert(0, lambda sub, idx: grayscale(sub))
        chosen = (torch.rand(n, generator=gen) < self.three_augment)[rows]
        which = torch.randint(0, len(ops), (n,), generator=gen)[rows]
        sigma = _uniform(n, *self.blur_sigma, gen)[rows]
        for k, op in enumerate(ops):
            idx = torch.nonzero(chosen & (which == k)).flatten()
            if idx.numel():
                x = x.index_copy(0, idx.to(x.device), op(x[idx.to(x.device)], idx))
        return x

    def _photometric(self, x: Tensor, n: int, rows: slice, gen: torch.Generator | None) -> Tensor:
        mean, std = self.mean.to(x), self.std.to(x)
        x = x * std + mean  # back to [0, 1] pixel units
        if self.three_augment > 0:
            x = self._three_augment(x, n, rows, gen)
        if self.color_jitter > 0:
            s = self.color_jitter
            factors = (1 - s + 2 * s * torch.rand(n, 3, generator=gen))[rows]
            x = color_jitter(x, factors)
        return (x - mean) / std

    # -- batch mixing and erasing (normalised units) ---------------------------------------
    def mix(
        self, x: Tensor, generator: torch.Generator | None = None, shard: tuple[int, int] = (0, 1)
    ) -> tuple[Tensor, MixInfo]:
        """Mixup and/or CutMix of ``x`` with partner ``i - 1``; returns the batch and MixInfo."""
        if self.mixup <= 0 and self.cutmix <= 0:
            raise ValueError("mix() needs mixup > 0 or cutmix > 0")
        rank, world = shard
        b, _, h, w = x.shape
        n, rows = b * world, slice(rank, None, world)
        partner = torch.roll(torch.arange(b), 1)
        other = x[partner.to(x.device)]
        use_cut = torch.rand(n, generator=generator)[rows] < 0.5
        if self.mixup <= 0 or self.cutmix <= 0:
            use_cut = torch.full((b,), self.cutmix > 0)
        lam = torch.ones(b)
        out = x
        if self.mixup > 0:
            lam_mix = _beta(n, self.mixup, generator)[rows]
            lam = torch.where(use_cut, lam, lam_mix)
            mixed = lam_mix.to(x)[:, None, None, None] * x
            mixed = mixed + (1 - lam_mix.to(x))[:, None, None, None] * other
            out = torch.where(use_cut.to(x.device)[:, None, None, None], out, mixed)
        if self.cutmix > 0:
            lam_cut = _beta(n, self.cutmix, generator)[rows]
            cut = torch.sqrt(1 - lam_cut)
            centre = torch.rand(n, 2, generator=generator)[rows]
            ch, cw = (cut * h).round(), (cut * w).round()
            top = (centre[:, 0] * h - ch / 2).round().clamp(0, h)
            left = (centre[:, 1] * w - cw / 2).round().clamp(0, w)
            bh = (top + ch).clamp(max=h) - top
            bw = (left + cw).clamp(max=w) - left
            box = box_masks(torch.stack([top, left, bh, bw], 1), h, w, x.device)
            box &= use_cut.to(x.device)[:, None, None, None]
            out = torch.where(box, other, out)
            lam = torch.where(use_cut, 1 - bh * bw / (h * w), lam)  # the area actually kept
        return out, MixInfo(lam, partner)

    def erase(
        self, x: Tensor, generator: torch.Generator | None = None, shard: tuple[int, int] = (0, 1)
    ) -> Tensor:
        """Random erasing: one noise box per image with probability ``random_erasing``."""
        rank, world = shard
        b, c, h, w = x.shape
        n, rows = b * world, slice(rank, None, world)
        chosen = (torch.rand(n, generator=generator) < self.random_erasing)[rows]
        area = _uniform(n, *ERASE_AREA, generator)[rows] * h * w
        log_r = _uniform(n, math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1]), generator)
        r = torch.exp(log_r[rows])
        bh = torch.sqrt(area / r).round().clamp(1, h)
        bw = torch.sqrt(area * r).round().clamp(1, w)
        pos = torch.rand(n, 2, generator=generator)[rows]
        top = (pos[:, 0] * (h - bh + 1)).floor()
        left = (pos[:, 1] * (w - bw + 1)).floor()
        box = box_masks(torch.stack([top, left, bh, bw], 1), h, w, x.device)
        box &= chosen.to(x.device)[:, None, None, None]
        noise = torch.randn(b, c, h, w, generator=generator).to(x)
        return torch.where(box, noise, x)

    def __call__(
        self, x: Tensor, generator: torch.Generator | None = None, shard: tuple[int, int] = (0, 1)
    ) -> Tensor:
        """Apply every enabled option to the normalised batch ``x``; ``shard = (rank, world)``
        as in :class:`~hjepa.data.augment.BatchAugment` (parameters drawn for the global batch).
        """
        if not self.enabled:
            return x
        rank, world = shard
        n, rows = x.shape[0] * world, slice(rank, None, world)
        if self.three_augment > 0 or self.color_jitter > 0:
            x = self._photometric(x, n, rows, generator)
        if self.mixup > 0 or self.cutmix > 0:
            x = self.mix(x, generator, shard)[0]
        if self.random_erasing > 0:
            x = self.erase(x, generator, shard)
        return x

    def __repr__(self) -> str:
        return (
            f"DeiT3Augment(three_augment={self.three_augment}, blur_sigma={self.blur_sigma}, "
            f"color_jitter={self.color_jitter}, mixup={self.mixup}, cutmix={self.cutmix}, "
            f"random_erasing={self.random_erasing})"
        )
