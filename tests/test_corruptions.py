"""ImageNet-C-style corruptions and corruption-error metrics."""

from __future__ import annotations

import colorsys
import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from hjepa.eval.corruptions import (
    CORRUPTIONS,
    SEVERITY_PARAMS,
    corrupt,
    corruption_error,
    mean_corruption_accuracy,
)

NOISE_CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise")


def natural_images(batch: int, channels: int, height: int, width: int, seed: int = 0):
    """Random images with the 1/f amplitude spectrum of photographs, scaled to [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    fy = torch.fft.fftfreq(height)[:, None]
    fx = torch.fft.rfftfreq(width)[None, :]
    frequency = (fy**2 + fx**2).sqrt()
    frequency[0, 0] = 1.0
    shape = (batch, channels, height, width // 2 + 1)
    spectrum = torch.complex(
        torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    )
    x = torch.fft.irfft2(spectrum / frequency, s=(height, width))
    x = x - x.amin(dim=(-2, -1), keepdim=True)
    return x / x.amax(dim=(-2, -1), keepdim=True)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_shape_dtype_and_range_are_kept(name):
    for shape in [(2, 1, 8, 8), (2, 3, 12, 9)]:
        for dtype in (torch.float32, torch.float64):
            x = natural_images(*shape).to(dtype)
            out = corrupt(x, name, severity=5, seed=0)
            assert out.shape == x.shape and out.dtype == dtype
            assert out.min() >= 0 and out.max() <= 1
            assert not torch.equal(out, x)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_same_seed_gives_same_images(name):
    x = natural_images(2, 3, 16, 16)
    assert torch.equal(corrupt(x, name, 3, seed=7), corrupt(x, name, 3, seed=7))


def test_noise_depends_on_seed_and_the_rest_does_not():
    x = natural_images(2, 3, 16, 16)
    for name in CORRUPTIONS:
        differ = not torch.equal(corrupt(x, name, 3, seed=0), corrupt(x, name, 3, seed=1))
        assert differ == (name in NOISE_CORRUPTIONS), name


@pytest.mark.parametrize("shape", [(4, 3, 32, 32), (4, 1, 28, 28)])
def test_deviation_grows_with_severity(shape):
    x = natural_images(*shape, seed=3)
    for name in CORRUPTIONS:
        deviation = [(corrupt(x, name, s, seed=0) - x).abs().mean().item() for s in range(1, 6)]
        assert all(a < b for a, b in zip(deviation, deviation[1:])), (name, deviation)


def test_gaussian_noise_has_the_tabled_std():
    x = torch.full((4, 3, 32, 32), 0.5)  # mid-grey: 5 sigma from the clamp
    noise = corrupt(x, "gaussian_noise", 5, seed=0) - x
    assert noise.mean().item() == pytest.approx(0.0, abs=0.01)
    assert noise.std().item() == pytest.approx(SEVERITY_PARAMS["gaussian_noise"][4], rel=0.05)


def test_shot_noise_is_unbiased_with_poisson_variance():
    x = torch.full((4, 3, 32, 32), 0.5)
    photons = SEVERITY_PARAMS["shot_noise"][4]
    out = corrupt(x, "shot_noise", 5, seed=0)
    assert out.mean().item() == pytest.approx(0.5, abs=0.01)
    # Var(Poisson(c x) / c) = x / c.
    assert out.var().item() == pytest.approx(0.5 / photons, rel=0.1)
    # Values are multiples of 1/c (photon counts).
    counts = out * photons
    assert torch.allclose(counts, counts.round(), atol=1e-4)


def test_impulse_noise_flips_the_tabled_share_to_black_or_white():
    x = torch.full((4, 3, 32, 32), 0.5)
    out = corrupt(x, "impulse_noise", 5, seed=0)
    hit = out != 0.5
    assert hit.float().mean().item() == pytest.approx(SEVERITY_PARAMS["impulse_noise"][4], rel=0.1)
    assert set(out[hit].unique().tolist()) == {0.0, 1.0}
    assert (out[hit] == 1).float().mean().item() == pytest.approx(0.5, abs=0.1)


@pytest.mark.parametrize("size, sigma", [(32, 1.0), (64, 2.0)])
def test_gaussian_blur_matches_scipy(size, sigma):
    # Severity 5 is sigma 1 pixel at 32x32 and scales with the image side above that;
    # these sigmas make scipy's radius int(3 sigma + 0.5) equal ours, ceil(3 sigma).
    x = natural_images(2, 3, size, size).double()
    want = np.stack(
        [
            np.stack([gaussian_filter(ch, sigma, mode="nearest", truncate=3.0) for ch in img])
            for img in x.numpy()
        ]
    )
    got = corrupt(x, "gaussian_blur", 5, seed=0).numpy()
    np.testing.assert_allclose(got, want, atol=1e-10)


def test_contrast_matches_formula():
    x = natural_images(2, 3, 8, 8).double()
    c = SEVERITY_PARAMS["contrast"][2]
    out = corrupt(x, "contrast", 3, seed=0)
    for b in range(2):
        for ch in range(3):
            plane = x[b, ch].numpy()
            expected = (plane - plane.mean()) * c + plane.mean()
            np.testing.assert_allclose(out[b, ch].numpy(), expected, atol=1e-12)


def test_brightness_matches_colorsys_hsv():
    x = natural_images(1, 3, 8, 8, seed=5).double()
    x[0, :, 0, 0] = 0.0  # a black pixel (hue and saturation undefined)
    c = SEVERITY_PARAMS["brightness"][3]
    out = corrupt(x, "brightness", 4, seed=0)
    for i in range(8):
        for j in range(8):
            h, s, v = colorsys.rgb_to_hsv(*x[0, :, i, j].tolist())
            expected = colorsys.hsv_to_rgb(h, s, min(v + c, 1.0))
            np.testing.assert_allclose(out[0, :, i, j].numpy(), expected, atol=1e-9)


def test_brightness_on_grey_images_adds_and_clips():
    x = natural_images(2, 1, 8, 8)
    c = SEVERITY_PARAMS["brightness"][4]
    assert torch.allclose(corrupt(x, "brightness", 5, seed=0), (x + c).clamp(max=1), atol=1e-6)


def reference_pixelate(plane: list[list[float]], c: float) -> list[list[float]]:
    """Loop version: area-weighted averages on a coarse grid, shown as blocks."""
    h, w = len(plane), len(plane[0])
    sh, sw = int(h * c), int(w * c)

    def overlap(lo, hi, j):
        return max(0.0, min(hi, j + 1) - max(lo, j))

    coarse = [[0.0] * sw for _ in range(sh)]
    for i in range(sh):
        for k in range(sw):
            top, bottom = i * h / sh, (i + 1) * h / sh
            left, right = k * w / sw, (k + 1) * w / sw
            total = weight_sum = 0.0
            for y in range(h):
                for x in range(w):
                    weight = overlap(top, bottom, y) * overlap(left, right, x)
                    total += weight * plane[y][x]
                    weight_sum += weight
            coarse[i][k] = total / weight_sum
    # Each output pixel shows the coarse pixel under its centre.
    return [
        [coarse[int((y + 0.5) * sh / h)][int((x + 0.5) * sw / w)] for x in range(w)]
        for y in range(h)
    ]


def test_pixelate_matches_loop_reference():
    x = natural_images(1, 1, 13, 10).double()
    for severity in (1, 5):
        out = corrupt(x, "pixelate", severity, seed=0)[0, 0].numpy()
        want = reference_pixelate(x[0, 0].tolist(), SEVERITY_PARAMS["pixelate"][severity - 1])
        np.testing.assert_allclose(out, want, atol=1e-12)


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_matches_a_pillow_round_trip(channels):
    x = natural_images(2, channels, 16, 16)
    quality = SEVERITY_PARAMS["jpeg"][4]
    out = corrupt(x, "jpeg", 5, seed=0)
    for b in range(2):
        pixels = (x[b].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).save(
            buffer, format="JPEG", quality=quality
        )
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())), dtype=np.float32) / 255
        want = decoded.reshape(16, 16, channels)
        np.testing.assert_allclose(out[b].permute(1, 2, 0).numpy(), want, atol=1e-6)


def test_corrupt_rejects_bad_input():
    x = natural_images(1, 3, 8, 8)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(x, "fog", 1)
    for severity in (0, 6, 2.0, True):
        with pytest.raises(ValueError, match="severity"):
            corrupt(x, "contrast", severity)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        corrupt(torch.rand(1, 2, 8, 8), "contrast", 1)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        corrupt(torch.rand(3, 8, 8), "contrast", 1)
    with pytest.raises(ValueError, match="at least 8x8"):
        corrupt(torch.rand(1, 3, 7, 16), "contrast", 1)
    with pytest.raises(ValueError, match="floating point"):
        corrupt((x * 255).to(torch.uint8), "contrast", 1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        corrupt(x - 0.5, "contrast", 1)
    with pytest.raises(ValueError, match="finite"):
        corrupt(torch.full((1, 3, 8, 8), float("nan")), "contrast", 1)


def test_corruption_error_matches_hand_computation():
    model = {"a": {1: 0.9, 2: 0.8}, "b": {1: 0.5, 2: 0.5}}
    baseline = {"a": {1: 0.8, 2: 0.6}, "b": {1: 0.5, 2: 0.0}, "unused": {1: 0.1}}
    result = corruption_error(model, baseline)
    # a: (0.1 + 0.2) / (0.2 + 0.4) = 0.5;  b: (0.5 + 0.5) / (0.5 + 1.0) = 2/3.
    assert result["ce"] == pytest.approx({"a": 0.5, "b": 2 / 3})
    assert result["mce"] == pytest.approx((0.5 + 2 / 3) / 2)
    # A model compared with itself has CE 1 everywhere.
    assert corruption_error(model, model)["mce"] == pytest.approx(1.0)


def test_mean_corruption_accuracy_averages_every_entry():
    acc = {"a": {1: 0.9, 2: 0.8}, "b": {1: 0.5, 2: 0.5, 3: 0.2}}
    assert mean_corruption_accuracy(acc) == pytest.approx((0.9 + 0.8 + 0.5 + 0.5 + 0.2) / 5)


def test_corruption_error_rejects_bad_tables():
    model = {"a": {1: 0.9, 2: 0.8}}
    with pytest.raises(ValueError, match="same severities"):
        corruption_error(model, {"b": {1: 0.5, 2: 0.5}})
    with pytest.raises(ValueError, match="same severities"):
        corruption_error(model, {"a": {1: 0.5}})
    with pytest.raises(ValueError, match="no errors"):
        corruption_error(model, {"a": {1: 1.0, 2: 1.0}})
    with pytest.raises(ValueError, match="fractions"):
        corruption_error({"a": {1: 90.0}}, {"a": {1: 0.5}})
    with pytest.raises(ValueError, match="empty"):
        mean_corruption_accuracy({})
