"""ImageNet-C-style corruptions on image batches and the corruption-error metrics.

Corruptions follow Hendrycks & Dietterich (ICLR 2019), with the severity tables of their
CIFAR-10-C generator, which were tuned for 32x32 images and so suit our small images
(Fashion-MNIST 28x28, CIFAR 32x32). Images are float tensors ``[B, C, H, W]`` in [0, 1]
with ``C`` in {1, 3}; every output is clamped to [0, 1] and keeps shape and dtype.

=============== ==================================== ====================================
name            operation                            parameter at severity 1..5
=============== ==================================== ====================================
gaussian_noise  x + N(0, c^2)                        std c = .04 .06 .08 .09 .10
shot_noise      Poisson(c x) / c                     photons c = 500 250 100 75 50
impulse_noise   each value -> 0 or 1 (equal odds)    probability c = .01 .02 .03 .05 .07
                with probability c
gaussian_blur   separable Gaussian, edge replicated  sigma c = .4 .6 .7 .8 1 pixels,
                                                     times max(1, min(H, W) / 32)
contrast        (x - m) c + m, m = per-channel mean  c = .75 .5 .4 .3 .15
brightness      HSV value V -> min(V + c, 1), hue    c = .05 .1 .15 .2 .3
                and saturation kept
pixelate        box-downsample by c, blocks back up  c = .95 .9 .85 .75 .65
jpeg            Pillow JPEG round trip (8-bit)       quality c = 80 65 58 50 40
=============== ==================================== ====================================

Only the blur radius depends on image size (it is a length in pixels); the other
parameters are ratios or per-pixel intensities. Random corruptions draw from a CPU
``torch.Generator`` seeded with ``seed``, so a seed gives the same images on any device.

Corruption error (Hendrycks & Dietterich): for corruption ``c`` with top-1 errors
:math:`E_{s,c} = 1 - \\text{acc}_{s,c}` over severities ``s``,
:math:`CE_c = \\sum_s E^{model}_{s,c} / \\sum_s E^{baseline}_{s,c}` and
:math:`mCE = \\operatorname{mean}_c CE_c`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "gaussian_blur",
    "contrast",
    "brightness",
    "pixelate",
    "jpeg",
)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
#: Parameter ``c`` per corruption and severity 1..5 (see the module table).
SEVERITY_PARAMS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "jpeg": (80, 65, 58, 50, 40),
}
#: Image side the blur sigmas are given for; larger images scale them up proportionally.
BLUR_REFERENCE_SIZE = 32
MIN_IMAGE_SIZE = 8


def _gaussian_noise(x: Tensor, c: float, generator: torch.Generator) -> Tensor:
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x + c * noise.to(x.device)


def _shot_noise(x: Tensor, c: float, generator: torch.Generator) -> Tensor:
    # Poisson sampling needs the generator's device, so draw on CPU and move back.
    return (torch.poisson(x.cpu() * c, generator=generator) / c).to(x.device)


def _impulse_noise(x: Tensor, c: float, generator: torch.Generator) -> Tensor:
    hit = torch.rand(x.shape, generator=generator) < c
    salt = torch.rand(x.shape, generator=generator) < 0.5
    return torch.where(hit.to(x.device), salt.to(device=x.device, dtype=x.dtype), x)


def _gaussian_blur(x: Tensor, c: float, generator: torch.Generator) -> Tensor:
    sigma = c * max(1.0, min(x.shape[-2:]) / BLUR_REFERENCE_SIZE)
    radius = max(1, math.ceil(3 * sigma))  # +-3 sigma holds 99.7 % of the mass
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    b, ch, h, w = x.shape
    flat = F.pad(x.reshape(b * ch, 1, h, w), (radius, radius, radius, radius), mode="replicate")
    flat = F.conv2d(flat, kernel.view(1, 1, 1, -1))  # along width
    flat = F.conv2d(flat, kernel.view(1, 1, -1, 1))  # along height
    return flat.reshape(b, ch, h, w)


def _contrast(x: Tensor, c: float, generator: torch.Generator) -> Tensor:
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return (x - mean) * c + mean


def _brightness(x: Tensor, c: float, generator: torch.Generator) -> Tensor:
    # In HSV every channel is V times a function of (hue, saturation), so raising V while
    # keeping hue and saturation rescales all channels by V'/V. Black pixels (V = 0) have
    # saturation 0 and become grey V'. For one channel this reduces to min(x + c, 1).
    value = x.amax(dim=1, keepdim=True)
    new_value = (value + c).clamp(max=1.0)
    scaled = x * (new_value / value.clamp_min(1e-12))
    return torch.where(value > 0, scaled, new_value.expand_as(x))


def _box_downsample_matrix(size_in: int, size_out: int, like: Tensor) -> Tensor:
    """``[size_out, size_in]`` weights of area-exact box downsampling.

    Output pixel ``i`` spans ``[i, i + 1) * size_in / size_out`` in input coordinates and
    averages the input pixels it overlaps, weighted by the overlap length.
    """
    edges_out = torch.arange(size_out + 1, dtype=like.dtype, device=like.device)
    edges_out = edges_out * (size_in / size_out)
    edges_in = torch.arange(size_in + 1, dtype=like.dtype, device=like.device)
    overlap = torch.minimum(edges_out[1:, None], edges_in[None, 1:]) - torch.maximum(
        edges_out[:-1, None], edges_in[None, :-1]
    )
    weights = overlap.clamp_min(0)
    return weights / weights.sum(dim=1, keepdim=True)


def _pixelate(x: Tensor, c: float, generator: torch.Generator) -> Tensor:
    # Average down to a fraction c of the size, then blow the coarse pixels back up as
    # blocks (each output pixel takes the coarse pixel under its centre, as Pillow's BOX
    # upscaling does).
    h, w = x.shape[-2:]
    rows = _box_downsample_matrix(h, max(1, int(h * c)), x)
    cols = _box_downsample_matrix(w, max(1, int(w * c)), x)
    small = rows @ x @ cols.T
    return F.interpolate(small, size=(h, w), mode="nearest-exact")


def _jpeg(x: Tensor, c: float, generator: torch.Generator) -> Tensor:
    pixels = (x.detach().cpu() * 255).round().clamp(0, 255).to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).numpy()  # [B, H, W, C]
    decoded = []
    for image in pixels:
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        buffer = io.BytesIO()
        pil.save(buffer, format="JPEG", quality=int(c))
        buffer.seek(0)
        array = np.asarray(Image.open(buffer).convert(pil.mode), dtype=np.float32)
        decoded.append(array.reshape(image.shape))
    out = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2) / 255.0
    return out.to(device=x.device, dtype=x.dtype)


_CORRUPTION_FNS: dict[str, Callable[[Tensor, float, torch.Generator], Tensor]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "gaussian_blur": _gaussian_blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "pixelate": _pixelate,
    "jpeg": _jpeg,
}


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"corrupt: images must be [B, C, H, W] with C = 1 or 3; got {tuple(images.shape)}."
        )
    if not images.is_floating_point():
        raise ValueError(
            f"corrupt: images must be floating point in [0, 1]; got {images.dtype}. "
            "Divide uint8 images by 255 first."
        )
    if min(images.shape[-2:]) < MIN_IMAGE_SIZE:
        raise ValueError(
            f"corrupt: images must be at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}; "
            f"got {tuple(images.shape[-2:])}."
        )
    if images.numel() and not (
        torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    ):
        raise ValueError(
            "corrupt: image values must be finite and lie in [0, 1]; corrupt before "
            "normalising with the dataset mean/std."
        )


def corrupt(images: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
    """Apply corruption ``name`` at ``severity`` (1..5) to ``images`` [B, C, H, W].

    Deterministic for a given ``seed``; the output is clamped to [0, 1] and has the
    input's shape, dtype and device.
    """
    if name not in _CORRUPTION_FNS:
        raise ValueError(f"corrupt: unknown corruption {name!r}; choose one of {CORRUPTIONS}.")
    if (
        isinstance(severity, bool)
        or not isinstance(severity, int | np.integer)
        or severity not in SEVERITIES
    ):
        raise ValueError(f"corrupt: severity must be an integer in 1..5; got {severity!r}.")
    _check_images(images)
    if images.shape[0] == 0:
        return images.clone()
    # float32 at least so noise and blur are not rounded away in half precision.
    x = images.to(torch.promote_types(images.dtype, torch.float32))
    generator = torch.Generator().manual_seed(seed)
    c = SEVERITY_PARAMS[name][int(severity) - 1]
    out = _CORRUPTION_FNS[name](x, c, generator)
    return out.clamp(0.0, 1.0).to(images.dtype)


def _check_accuracy_table(table: Mapping, what: str) -> None:
    for name, by_severity in table.items():
        if not by_severity:
            raise ValueError(f"{what}: corruption {name!r} has no severities.")
        for severity, acc in by_severity.items():
            if not 0.0 <= float(acc) <= 1.0:
                raise ValueError(
                    f"{what}: accuracy for {name!r} severity {severity} is {acc}; "
                    "pass accuracies as fractions in [0, 1]."
                )


def corruption_error(
    acc_model: Mapping[str, Mapping[int, float]],
    acc_baseline: Mapping[str, Mapping[int, float]],
) -> dict[str, float | dict[str, float]]:
    """Corruption errors of a model relative to a baseline.

    Both arguments map corruption name -> severity -> top-1 accuracy in [0, 1]; the
    baseline must cover every corruption and severity of the model.

    Returns:
        ``{"ce": {name: CE}, "mce": mean CE}`` with
        ``CE = sum_s (1 - acc_model) / sum_s (1 - acc_baseline)``.
    """
    if not acc_model:
        raise ValueError("corruption_error: acc_model is empty.")
    _check_accuracy_table(acc_model, "corruption_error")
    _check_accuracy_table(acc_baseline, "corruption_error")
    ce: dict[str, float] = {}
    for name, by_severity in acc_model.items():
        baseline = acc_baseline.get(name)
        if baseline is None or set(baseline) != set(by_severity):
            raise ValueError(
                f"corruption_error: the baseline must have the same severities as the model "
                f"for {name!r}; got model {sorted(by_severity)} and baseline "
                f"{sorted(baseline) if baseline is not None else 'missing'}."
            )
        model_error = sum(1.0 - float(a) for a in by_severity.values())
        baseline_error = sum(1.0 - float(baseline[s]) for s in by_severity)
        if baseline_error == 0:
            raise ValueError(
                f"corruption_error: the baseline makes no errors on {name!r}, so CE is "
                "undefined; use a baseline with non-zero error."
            )
        ce[name] = model_error / baseline_error
    return {"ce": ce, "mce": sum(ce.values()) / len(ce)}


def mean_corruption_accuracy(acc: Mapping[str, Mapping[int, float]]) -> float:
    """Mean top-1 accuracy over every (corruption, severity) entry of ``acc``."""
    if not acc:
        raise ValueError("mean_corruption_accuracy: the accuracy table is empty.")
    _check_accuracy_table(acc, "mean_corruption_accuracy")
    values = [float(a) for by_severity in acc.values() for a in by_severity.values()]
    return sum(values) / len(values)
