"""Synthetic images whose class is visible in their structure.

Each image is a Gabor patch on a smooth random background with pixel noise:

.. math::
    I_c(u) = b + g\\cdot u + a\\,\\gamma_c\\,
             \\exp\\!\\big(-\\lVert u - \\mu\\rVert^2 / 2\\sigma^2\\big)
             \\cos\\!\\big(2\\pi f\\,\\langle u - \\mu, d_\\theta\\rangle\\big) + \\varepsilon,

with ``u`` in image-fraction coordinates. The class fixes the orientation
``θ`` and the frequency ``f``; the position ``μ``, width ``σ``, amplitude
``a``, colour gains ``γ``, background ``b + g·u`` and noise ``ε`` are
random; the envelope is twice as long along the stripes as across them. A
second, weaker Gabor patch of random orientation and frequency is added as a
distractor. Raw-pixel nearest neighbours are then well above chance but far
from perfect (about 0.75-0.8 for 10 classes), while an encoder that recognises
oriented texture can separate the classes: a cheap stand-in for real data in
tests and smoke runs.
"""

from __future__ import annotations

import math

import torch

from hjepa.data.tensors import ImageTensors

_CHUNK = 1024  # images generated at once; bounds memory for large n
_ELONGATION = 2.0  # envelope length along the stripes / across them
_DISTRACTOR = (0.5, 0.8)  # distractor amplitude relative to the class patch
_NOISE = 0.06  # pixel noise standard deviation (images in [0, 1])


def _class_grid(num_classes: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Orientation (radians) and frequency (cycles per image) of each class, and the
    number of distinct orientations."""
    n_freq = max(1, math.ceil(math.sqrt(num_classes / 2)))
    n_orient = math.ceil(num_classes / n_freq)
    # Keep the period at >= 4 pixels so small images do not alias.
    top = max(1.5, min(5.0, image_size / 4))
    freqs = torch.linspace(1.5, top, n_freq) if n_freq > 1 else torch.tensor([1.5])
    k = torch.arange(num_classes)
    return math.pi * (k % n_orient).float() / n_orient, freqs[k // n_orient], n_orient


def _gabor(
    xs: torch.Tensor,
    ys: torch.Tensor,
    centre: torch.Tensor,
    angle: torch.Tensor,
    freq: torch.Tensor,
    sigma: torch.Tensor,
    amplitude: torch.Tensor,
) -> torch.Tensor:
    """Gabor patches ``[b, H, W]`` from per-image parameters (``centre`` is ``[b, 2]``)."""
    dx = xs - centre[:, 0, None, None]
    dy = ys - centre[:, 1, None, None]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    across = dx * cos + dy * sin  # distance across the stripes
    along = dy * cos - dx * sin  # distance along the stripes
    # Envelope stretched along the stripes, so the oriented shape survives averaging.
    sig = sigma[:, None, None]
    window = torch.exp(-(across**2 + (along / _ELONGATION) ** 2) / (2 * sig**2))
    wave = torch.cos(2 * math.pi * freq[:, None, None] * across)
    return amplitude[:, None, None] * window * wave


def make_synthetic(
    n: int, image_size: int, channels: int, num_classes: int = 10, seed: int = 0
) -> ImageTensors:
    """Generate ``n`` uint8 images ``[n, channels, image_size, image_size]``, balanced classes.

    Besides the class patch, each image holds a weaker distractor patch of random
    orientation and frequency, so raw-pixel neighbours are confused but the
    class-mean images still differ. The same arguments always give the same
    images (one ``torch.Generator`` seeded with ``seed`` drives everything).
    """
    if n < 1 or image_size < 8 or channels < 1 or num_classes < 2:
        raise ValueError(
            f"make_synthetic needs n >= 1, image_size >= 8, channels >= 1 and num_classes >= 2; "
            f"got n={n}, image_size={image_size}, channels={channels}, num_classes={num_classes}"
        )
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    theta, freq, n_orient = _class_grid(num_classes, image_size)

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=g)

    jitter = math.pi / (4 * n_orient)  # a quarter of the gap between class orientations
    angle = theta[labels] + uniform(-jitter, jitter)
    centre = uniform(0.3, 0.7, 2)
    sigma = uniform(0.12, 0.22)
    amplitude = uniform(0.25, 0.45)
    distractor_angle = uniform(0.0, math.pi)
    distractor_freq = freq[torch.randint(len(freq), (n,), generator=g)]
    distractor_centre = uniform(0.2, 0.8, 2)
    distractor_amplitude = amplitude * uniform(_DISTRACTOR[0], _DISTRACTOR[1])
    gains = uniform(0.6, 1.0, channels)
    background = uniform(0.3, 0.7)
    gradient = uniform(-0.15, 0.15, 2)

    # Pixel centres in [0, 1]; x varies along width, y along height.
    coords = (torch.arange(image_size, dtype=torch.float32) + 0.5) / image_size
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    images = torch.empty(n, channels, image_size, image_size, dtype=torch.uint8)
    for start in range(0, n, _CHUNK):
        s = slice(start, min(start + _CHUNK, n))
        patch = _gabor(xs, ys, centre[s], angle[s], freq[labels[s]], sigma[s], amplitude[s])
        patch += _gabor(
            xs,
            ys,
            distractor_centre[s],
            distractor_angle[s],
            distractor_freq[s],
            sigma[s],
            distractor_amplitude[s],
        )
        base = (
            background[s, None, None]
            + gradient[s, 0, None, None] * (xs - 0.5)
            + gradient[s, 1, None, None] * (ys - 0.5)
        )
        pixels = base[:, None] + gains[s, :, None, None] * patch[:, None]
        pixels += _NOISE * torch.randn(pixels.shape, generator=g)
        images[s] = (pixels.clamp_(0, 1) * 255).round_().to(torch.uint8)
    return ImageTensors(images, labels, num_classes=num_classes)
