"""DeiT III batched augmentations (data.augment.*)."""

import math

import pytest
import torch

from hjepa.data.deit3 import (
    DeiT3Augment,
    color_jitter,
    gaussian_blur,
    grayscale,
    mix_targets,
    solarize,
)
from hjepa.train.trainer import Trainer

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pixels(b=8, c=3, h=12, w=12, seed=0) -> torch.Tensor:
    return torch.rand(b, c, h, w, generator=_gen(seed))


def _normalise(x, mean=MEAN, std=STD):
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def _pixel_units(x, mean=MEAN, std=STD):
    return x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)


def test_grayscale_and_solarize_by_hand():
    x = torch.tensor([0.2, 0.6, 1.0]).view(1, 3, 1, 1)
    lum = 0.299 * 0.2 + 0.587 * 0.6 + 0.114 * 1.0
    torch.testing.assert_close(grayscale(x).flatten(), torch.full((3,), lum))
    one = torch.rand(2, 1, 4, 4)
    assert torch.equal(grayscale(one), one)
    s = solarize(torch.tensor([0.0, 0.49, 0.5, 0.8]))
    torch.testing.assert_close(s, torch.tensor([0.0, 0.49, 0.5, 0.2]))


def test_gaussian_blur_per_image_sigma():
    delta = torch.zeros(2, 1, 9, 9)
    delta[:, :, 4, 4] = 1.0
    sigma = torch.tensor([0.5, 1.0])
    out = gaussian_blur(delta, sigma)
    for i, s in enumerate(sigma.tolist()):
        t = torch.arange(-3, 4).float()  # radius ceil(3 * 1.0) = 3 for the whole batch
        k = torch.exp(-(t**2) / (2 * s**2))
        k = k / k.sum()
        torch.testing.assert_close(out[i, 0, 1:8, 1:8], k[:, None] * k[None, :])
        torch.testing.assert_close(
            gaussian_blur(delta[i : i + 1], sigma[i : i + 1]), out[i : i + 1]
        )
    flat = torch.full((1, 3, 6, 6), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, torch.tensor([2.0])), flat)  # sums to one


def test_color_jitter_factors():
    x = _pixels(2)
    torch.testing.assert_close(color_jitter(x, torch.ones(2, 3)), x)
    bright = color_jitter(x, torch.tensor([[0.5, 1.0, 1.0], [1.0, 1.0, 1.0]]))
    torch.testing.assert_close(bright[0], x[0] * 0.5)
    torch.testing.assert_close(bright[1], x[1])
    gray = color_jitter(x, torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]))  # no saturation
    torch.testing.assert_close(gray[0], grayscale(x[:1])[0])


def test_all_off_is_the_identity_and_the_trainer_skips_it(tiny_config):
    aug = DeiT3Augment(mean=MEAN, std=STD)
    x = _normalise(_pixels())
    assert not aug.enabled and aug(x, _gen()) is x
    assert Trainer(tiny_config()).inputs.extra_augment is None


def test_three_augment_applies_exactly_one_op_per_image():
    x = _pixels(32)
    aug = DeiT3Augment(mean=MEAN, std=STD, three_augment=1.0, blur_sigma=[1.0, 1.0])
    out = _pixel_units(aug(_normalise(x), _gen()))
    candidates = [grayscale(x), solarize(x), gaussian_blur(x, torch.ones(32))]
    picked = []
    for i in range(32):
        hits = [k for k, c in enumerate(candidates) if torch.allclose(out[i], c[i], atol=1e-5)]
        assert len(hits) == 1, i
        picked += hits
    assert set(picked) == {0, 1, 2}  # every op is used
    half = DeiT3Augment(mean=MEAN, std=STD, three_augment=0.5)
    kept = (_pixel_units(half(_normalise(x), _gen())) - x).abs().amax((1, 2, 3)) < 1e-5
    assert 0 < int(kept.sum()) < 32


def test_three_augment_on_one_channel_never_picks_grayscale():
    x = _pixels(16, c=1)
    aug = DeiT3Augment(mean=[0.5], std=[0.5], three_augment=1.0, blur_sigma=[1.0, 2.0])
    out = _pixel_units(aug(_normalise(x, [0.5], [0.5]), _gen()), [0.5], [0.5])
    changed = (out - x).abs().amax((1, 2, 3)) > 1e-4
    assert changed.all()  # the identity (grayscale of one channel) is not in the pool


def test_outputs_stay_in_range_and_are_deterministic():
    x = _normalise(_pixels(16))
    aug = DeiT3Augment(mean=MEAN, std=STD, three_augment=0.8, color_jitter=0.4)
    a, b, c = aug(x, _gen(1)), aug(x, _gen(1)), aug(x, _gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    pixels = _pixel_units(a)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    full = DeiT3Augment(mean=MEAN, std=STD, mixup=0.8, cutmix=1.0, random_erasing=0.5)
    assert torch.equal(full(x, _gen(3)), full(x, _gen(3))) and full(x, _gen(3)).shape == x.shape


def test_photometric_draws_follow_the_global_batch_under_sharding():
    x = _normalise(_pixels(8))
    aug = DeiT3Augment(mean=MEAN, std=STD, three_augment=1.0, color_jitter=0.3)
    whole = aug(x, _gen(5))
    for rank in range(2):
        torch.testing.assert_close(aug(x[rank::2], _gen(5), shard=(rank, 2)), whole[rank::2])


def test_mixup_is_the_convex_combination_with_the_partner():
    x = _normalise(_pixels(8))
    aug = DeiT3Augment(mean=MEAN, std=STD, mixup=0.8)
    out, info = aug.mix(x, _gen())
    assert torch.equal(info.partner, torch.tensor([7, 0, 1, 2, 3, 4, 5, 6]))
    assert ((info.lam >= 0) & (info.lam <= 1)).all() and info.lam.std() > 0
    lam = info.lam.view(-1, 1, 1, 1)
    torch.testing.assert_close(out, lam * x + (1 - lam) * x[info.partner])
    y = torch.nn.functional.one_hot(torch.arange(8) % 3, 3).float()
    soft = mix_targets(y, info)
    torch.testing.assert_close(soft.sum(1), torch.ones(8))
    torch.testing.assert_close(soft[0], info.lam[0] * y[0] + (1 - info.lam[0]) * y[7])


def test_cutmix_pastes_one_box_and_reports_the_kept_area():
    x = _normalise(_pixels(16, h=16, w=16))
    out, info = DeiT3Augment(mean=MEAN, std=STD, cutmix=1.0).mix(x, _gen(4))
    other = x[info.partner]
    own = (out == x).all(1)  # [B, H, W] pixels kept from the image itself
    from_partner = (out == other).all(1)
    assert (own | from_partner).all()
    torch.testing.assert_close(own.float().mean((1, 2)), info.lam, atol=1e-6, rtol=0)
    pasted = ~own
    for i in range(16):  # the pasted region is one axis-aligned box
        rows, cols = pasted[i].any(1).nonzero(), pasted[i].any(0).nonzero()
        if rows.numel():
            box = pasted[i][rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert box.all()
    assert (info.lam < 1).any()


def test_mixup_and_cutmix_together_pick_one_per_image():
    x = _normalise(_pixels(32, h=16, w=16))
    out, info = DeiT3Augment(mean=MEAN, std=STD, mixup=1.0, cutmix=1.0).mix(x, _gen(2))
    other = x[info.partner]
    boxed = ((out == x) | (out == other)).all(1).all((1, 2))
    assert 0 < int(boxed.sum()) < 32  # some images cut (every pixel from one source), some mixed


def test_random_erasing_replaces_one_box():
    x = _normalise(_pixels(32, h=16, w=16))
    out = DeiT3Augment(mean=MEAN, std=STD, random_erasing=0.5).erase(x, _gen(1))
    changed = (out != x).any(1)
    erased = changed.any(-1).any(-1)
    assert 0 < int(erased.sum()) < 32
    for i in torch.nonzero(erased).flatten().tolist():
        rows, cols = changed[i].any(1).nonzero(), changed[i].any(0).nonzero()
        box = changed[i][rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.float().mean() > 0.95  # a filled box (noise equals the pixel with p ~ 0)
        area = box.numel() / 256
        assert 0.015 <= area <= 1 / 3 + 0.1


def test_trainer_feeds_the_same_augmented_image_to_both_encoders(tiny_config, tmp_path):
    plain = Trainer(tiny_config(f"run.dir={tmp_path / 'a'}"))
    aug = Trainer(
        tiny_config(
            "data.augment.three_augment=1.0",
            "data.augment.random_erasing=1.0",
            f"run.dir={tmp_path / 'b'}",
        )
    )
    micro, images = next(plain.batches())
    x0, idx0, _ = plain.inputs(images, micro)
    x1, idx1, _ = aug.inputs(images, micro)
    assert not torch.allclose(x0, x1)
    assert torch.equal(idx0.context, idx1.context)  # masks drawn from their own stream
    seen = {}
    aug.model.target_encoder.register_forward_pre_hook(lambda m, a: seen.setdefault("t", a[0]))
    aug.model.context_encoder.register_forward_pre_hook(lambda m, a: seen.setdefault("c", a[0]))
    result = aug.train_step([(micro, images)])
    assert torch.equal(seen["t"], x1) and torch.equal(seen["c"], x1)
    assert math.isfinite(float(result.terms[0]))


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="probability"):
        DeiT3Augment(mean=MEAN, std=STD, three_augment=2.0)
    with pytest.raises(ValueError, match="mix"):
        DeiT3Augment(mean=MEAN, std=STD).mix(torch.zeros(2, 3, 4, 4))
