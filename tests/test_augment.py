"""Batched augmentation: identity case, geometry, ranges, determinism, flips."""

from __future__ import annotations

import math

import pytest
import torch

from hjepa.data.augment import (
    BatchAugment,
    crop_resize,
    random_hflip,
    random_resized_crop,
    sample_crop_boxes,
    to_float,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_identity_crop() -> None:
    x = torch.rand(3, 2, 9, 9, generator=gen(0))
    out = random_resized_crop(x, 9, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=gen(1))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_crop_reads_the_box() -> None:
    # x[..., i, j] = j (a horizontal ramp): a box [x0, x0 + w] in fractions, sampled at
    # out_w pixel centres, must read j = (x0 + w * (k + 0.5) / out_w) * W - 0.5 exactly
    # (bilinear on a linear ramp is exact).
    width = 16
    x = torch.arange(width, dtype=torch.float32).expand(1, 1, 8, width).contiguous()
    boxes = torch.tensor([[0.25, 0.0, 0.5, 1.0]])
    out = crop_resize(x, boxes, (8, 4))
    k = torch.arange(4, dtype=torch.float32)
    expected = (0.25 + 0.5 * (k + 0.5) / 4) * width - 0.5
    torch.testing.assert_close(out[0, 0], expected.expand(8, 4), atol=1e-5, rtol=0)
    flipped = crop_resize(x, boxes, (8, 4), flip=torch.tensor([True]))
    torch.testing.assert_close(flipped, out.flip(-1), atol=1e-5, rtol=0)


def test_crop_box_statistics() -> None:
    boxes = sample_crop_boxes(4000, 20, 40, scale=(0.3, 1.0), ratio=(0.75, 4 / 3), generator=gen(2))
    x0, y0, w, h = boxes.unbind(1)
    assert torch.all(x0 >= 0) and torch.all(y0 >= 0)
    assert torch.all(x0 + w <= 1 + 1e-6) and torch.all(y0 + h <= 1 + 1e-6)
    area = w * h  # fraction of the image
    aspect = (w * 40) / (h * 20)  # in pixels
    assert torch.all(area >= 0.3 - 1e-5) and torch.all(area <= 1 + 1e-5)
    assert torch.all(aspect >= 0.75 - 1e-4) and torch.all(aspect <= 4 / 3 + 1e-4)
    # On a square image fitting is symmetric in log-aspect, which is uniform on
    # [log 3/4, log 4/3]: mean ~ 0 (std of the mean ~ 0.003).
    square = sample_crop_boxes(4000, 32, 32, scale=(0.3, 1.0), generator=gen(5))
    assert abs((square[:, 2] / square[:, 3]).log().mean().item()) < 0.015
    # A 2:1 image cannot hold an aspect-1 crop of full area: the fallback is the centred
    # square-ish crop with the ratio clamped to 4/3 (width 4/3 * 20 px of 40).
    full = sample_crop_boxes(5, 20, 40, scale=(1.0, 1.0), ratio=(0.75, 4 / 3), generator=gen(3))
    expected = torch.tensor([(1 - 2 / 3) / 2, 0.0, 2 / 3, 1.0]).expand(5, 4)
    torch.testing.assert_close(full, expected, atol=1e-6, rtol=0)


def test_shapes_ranges_and_determinism() -> None:
    x = torch.randint(0, 256, (6, 3, 20, 24), dtype=torch.uint8, generator=gen(4))
    aug = BatchAugment(out_size=(12, 10), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    a = aug(x, gen(7))
    assert a.shape == (6, 3, 12, 10) and a.dtype == torch.float32
    # Bilinear resampling stays within the per-channel range of the normalised input.
    xf = to_float(x, aug.mean, aug.std)
    assert torch.all(a.amin(dim=(0, 2, 3)) >= xf.amin(dim=(0, 2, 3)) - 1e-5)
    assert torch.all(a.amax(dim=(0, 2, 3)) <= xf.amax(dim=(0, 2, 3)) + 1e-5)
    torch.testing.assert_close(aug(x, gen(7)), a, atol=0, rtol=0)
    assert not torch.allclose(aug(x, gen(8)), a)
    # The fused call equals crop then flip drawn from the same stream.
    g = gen(7)
    composed = random_hflip(random_resized_crop(xf, (12, 10), aug.scale, aug.ratio, g), 0.5, g)
    torch.testing.assert_close(a, composed, atol=1e-5, rtol=0)


def test_flip_exact() -> None:
    x = torch.rand(5, 2, 4, 6, generator=gen(9))
    assert torch.equal(random_hflip(x, 0.0, gen(0)), x)
    assert torch.equal(random_hflip(x, 1.0, gen(0)), x.flip(-1))
    mixed = random_hflip(x, 0.5, gen(1))
    flipped = torch.tensor([torch.equal(m, f) for m, f in zip(mixed, x.flip(-1))])
    kept = torch.tensor([torch.equal(m, o) for m, o in zip(mixed, x)])
    assert torch.all(flipped ^ kept)  # each image is exactly one of the two


def test_to_float_normalisation() -> None:
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    out = to_float(x, mean=(0.0, 0.2, 0.5), std=(1.0, 0.5, 0.25))
    expected = torch.tensor([0.0, (0.2 - 0.2) / 0.5, (1.0 - 0.5) / 0.25]).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="mean/std"):
        to_float(x, mean=(0.5, 0.5), std=(0.5,))
    with pytest.raises(ValueError, match="uint8"):
        to_float(x.float())


def test_bad_parameters() -> None:
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="scale"):
        random_resized_crop(x, 8, scale=(0.5, 1.5), generator=gen(0))
    with pytest.raises(ValueError, match="ratio"):
        random_resized_crop(x, 8, ratio=(2.0, 1.0), generator=gen(0))
    with pytest.raises(ValueError, match="probability"):
        random_hflip(x, 1.5, gen(0))
    assert math.isclose(BatchAugment(8).ratio[1], 4 / 3)
