"""Batched image augmentation on tensors (CPU or CUDA; no PIL, no per-image loop).

Random parameters are drawn from an explicit ``torch.Generator`` on the
generator's device (normally the CPU, so a run is reproducible whatever
device the images live on) and then moved to the images' device.

The random resized crop is one affine resampling per image. In the
normalised coordinates of ``F.affine_grid`` (``[-1, 1]`` across the image,
``align_corners=False``) a crop of width fraction ``w``, height fraction
``h`` and centre ``(c_x, c_y)`` (also normalised) is

.. math::
    \\theta = \\begin{pmatrix} w & 0 & c_x \\\\ 0 & h & c_y \\end{pmatrix},

and ``F.grid_sample`` reads the input bilinearly at ``θ·(u, v, 1)`` for each
output position ``(u, v)``. ``w = h = 1``, ``c = 0`` is the identity.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CROP_TRIES = 10  # as torchvision's RandomResizedCrop: rejection tries before the fallback


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if len(size) != 2:
        raise ValueError(f"size must be an int or (height, width), got {size}")
    return int(size[0]), int(size[1])


def _rand(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=device)


def to_float(
    x: torch.Tensor, mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,)
) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` → float32 ``(x / 255 − mean) / std``, per channel.

    ``mean`` and ``std`` have one entry per channel, or a single entry for all.
    """
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"to_float expects uint8 [B, C, H, W], got {x.dtype} {tuple(x.shape)}")
    channels = x.shape[1]
    if len(mean) not in (1, channels) or len(std) not in (1, channels):
        raise ValueError(
            f"mean/std need 1 or {channels} values for {channels}-channel images, "
            f"got {len(mean)} and {len(std)}"
        )
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {tuple(std)}")
    m, s = _channel_values(tuple(mean), x.device), _channel_values(tuple(std), x.device)
    return (x.float() / 255.0 - m) / s


@functools.lru_cache(maxsize=64)
def _channel_values(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """``[1, C, 1, 1]`` float32 on ``device``, built once: a tensor made from host values every
    step would be a blocking host-to-device copy every step."""
    with torch.inference_mode(False):  # cached: must stay usable outside inference mode
        return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


def sample_crop_boxes(
    batch_size: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.3, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random-resized-crop boxes as fractions of the image: ``[B, 4]`` = (x0, y0, w, h).

    As in Inception / torchvision: area fraction ``s ~ U(scale)``, aspect ratio
    ``r = w_px / h_px`` log-uniform in ``ratio``; ``w_px = sqrt(s·H·W·r)``,
    ``h_px = sqrt(s·H·W / r)``. Up to 10 draws per image, vectorised; the first
    that fits is kept, otherwise the largest centred crop with ``r`` clamped to
    ``ratio``. The offset is uniform over the positions where the box fits.
    """
    lo_s, hi_s = scale
    lo_r, hi_r = ratio
    if not (0 < lo_s <= hi_s <= 1):
        raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {scale}")
    if not (0 < lo_r <= hi_r):
        raise ValueError(f"crop ratio must satisfy 0 < min <= max, got {ratio}")
    u = _rand((batch_size, _CROP_TRIES, 2), generator).cpu().double()
    area = lo_s + (hi_s - lo_s) * u[..., 0]
    log_r = math.log(lo_r) + (math.log(hi_r) - math.log(lo_r)) * u[..., 1]
    r = torch.exp(log_r)
    # Fractions of width and height: w = w_px / W, h = h_px / H.
    w = torch.sqrt(area * r * height / width)
    h = torch.sqrt(area / r * width / height)
    fits = (w <= 1) & (h <= 1)
    first = fits.to(torch.int64).argmax(dim=1)  # index of the first fitting try
    ok = fits.any(dim=1)
    rows = torch.arange(batch_size)
    w, h = w[rows, first], h[rows, first]
    # Fallback: the whole image, cropped to the nearest allowed aspect ratio.
    image_ratio = min(max(width / height, lo_r), hi_r)
    fb_w = min(1.0, image_ratio * height / width)
    fb_h = min(1.0, width / (image_ratio * height))
    w = torch.where(ok, w, torch.full_like(w, fb_w))
    h = torch.where(ok, h, torch.full_like(h, fb_h))
    offset = _rand((batch_size, 2), generator).cpu().double()
    x0 = torch.where(ok, (1 - w) * offset[:, 0], (1 - w) / 2)
    y0 = torch.where(ok, (1 - h) * offset[:, 1], (1 - h) / 2)
    return torch.stack([x0, y0, w, h], dim=1).float()


def crop_resize(
    x: torch.Tensor,
    boxes: torch.Tensor,
    out_size: int | Sequence[int],
    flip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Resample each image's box (``[B, 4]`` fractions x0, y0, w, h) to ``out_size``, bilinear.

    ``flip`` (bool ``[B]``) mirrors the selected outputs horizontally in the same pass.
    """
    if not x.is_floating_point() or x.dim() != 4:
        raise ValueError(
            f"crop_resize expects a float [B, C, H, W] tensor, got {x.dtype} {tuple(x.shape)}"
        )
    out_h, out_w = _pair(out_size)
    b = x.shape[0]
    boxes = boxes.to(device=x.device, dtype=torch.float32)
    x0, y0, w, h = boxes.unbind(dim=1)
    sx = w if flip is None else torch.where(flip.to(x.device), -w, w)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=torch.float32)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = 2 * x0 + w - 1  # box centre in [-1, 1]
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * y0 + h - 1
    grid = F.affine_grid(theta.to(x.dtype), [b, x.shape[1], out_h, out_w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_resized_crop(
    x: torch.Tensor,
    out_size: int | Sequence[int],
    scale: tuple[float, float] = (0.3, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random resized crop of every image of a float batch ``[B, C, H, W]`` → ``[B, C, *out]``.

    ``generator=None`` uses PyTorch's global CPU generator (not reproducible by seed).
    """
    boxes = sample_crop_boxes(x.shape[0], x.shape[2], x.shape[3], scale, ratio, generator)
    return crop_resize(x, boxes, out_size)


def random_hflip(
    x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mirror each image of ``[B, C, H, W]`` left-right with probability ``p`` (exact copy)."""
    if not 0 <= p <= 1:
        raise ValueError(f"flip probability must be in [0, 1], got {p}")
    flip = (_rand((x.shape[0],), generator) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class BatchAugment:
    """uint8 batch → normalised, randomly cropped and flipped float batch.

    ``to_float`` (per-channel normalisation), ``random_resized_crop`` and
    ``random_hflip`` from plain config values; the flip is folded into the
    crop's resampling grid, so the whole augmentation is one ``grid_sample``.

    Args:
        out_size: output side (or ``(height, width)``).
        scale: range of the crop's area fraction.
        ratio: range of the crop's aspect ratio (width / height).
        flip_prob: probability of a horizontal flip.
        mean, std: normalisation per channel (one value applies to all channels).
    """

    def __init__(
        self,
        out_size: int | Sequence[int],
        scale: Sequence[float] = (0.3, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        flip_prob: float = 0.5,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
    ) -> None:
        if not 0 <= flip_prob <= 1:
            raise ValueError(f"flip probability must be in [0, 1], got {flip_prob}")
        self.out_size = _pair(out_size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip_prob = float(flip_prob)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> torch.Tensor:
        """Augment ``x``; with ``shard = (rank, world_size)``, ``x`` holds rows
        ``rank, rank + world_size, ...`` of a global batch of ``len(x) * world_size`` images:
        the parameters are drawn for the whole global batch and sliced, so every image gets
        the crop and flip it would get in a single process.
        """
        rank, world = shard
        boxes, flip = self.draw(x.shape[0] * world, x.shape[2], x.shape[3], generator)
        return self.apply(x, boxes[rank::world], flip[rank::world])

    def draw(
        self, n: int, height: int, width: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The crop boxes (``[n, 4]``, :func:`sample_crop_boxes`) and flips (bool ``[n]``) of
        ``n`` images of ``height`` x ``width``, on the CPU: what :meth:`__call__` draws, so a
        DataLoader worker can draw them ahead and :meth:`apply` use them later."""
        boxes = sample_crop_boxes(n, height, width, self.scale, self.ratio, generator)
        flip = _rand((n,), generator).cpu() < self.flip_prob
        return boxes, flip

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The uint8 batch ``x`` normalised only (a view whose crop was cut elsewhere)."""
        return to_float(x, self.mean, self.std)

    def apply(self, x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """Normalise the uint8 batch ``x`` and resample each image's box (one row of ``boxes``
        and ``flip`` per image) to the output size."""
        if x.device.type == "cuda":  # page-locked: the copy overlaps the GPU's work
            boxes = boxes.pin_memory().to(x.device, non_blocking=True)
            flip = flip.pin_memory().to(x.device, non_blocking=True)
        return crop_resize(to_float(x, self.mean, self.std), boxes, self.out_size, flip)

    def __repr__(self) -> str:
        return (
            f"BatchAugment(out_size={self.out_size}, scale={self.scale}, ratio={self.ratio}, "
            f"flip_prob={self.flip_prob}, mean={self.mean}, std={self.std})"
        )
