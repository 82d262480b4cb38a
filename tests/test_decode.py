"""Decoding one image to the model's input: the evaluation view, the training view (a random
resized crop from the whole image), the decoders, on small generated images whose pixel values
say where they came from (red = 6 x column, green = 12 x row)."""

import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from hjepa.data.augment import sample_crop_boxes
from hjepa.data.decode import (
    RandomResizedCrop,
    centre_square,
    decode_pillow,
    decode_simplejpeg,
    decoder,
    reduced_size,
)
from hjepa.data.image_folder import CropKey, ImageFolder

W, H = 40, 20


def ramp(width: int = W, height: int = H) -> np.ndarray:
    """RGB image whose red is 6 x column, green 12 x row, blue 50."""
    x = np.arange(width)[None, :].repeat(height, 0)
    y = np.arange(height)[:, None].repeat(width, 1)
    return np.stack([6 * x, 12 * y, np.full_like(x, 50)], -1).astype(np.uint8)


@pytest.fixture
def folder(tmp_path):
    """``train/a/ramp.png`` (40 x 20) and a one-image ``val/``."""
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(ramp()).save(tmp_path / split / "a" / "ramp.png")
    return tmp_path


def test_the_centre_square_of_a_40x20_image_is_its_middle_half():
    assert centre_square(W, H) == (0.25, 0.0, 0.5, 1.0)
    assert centre_square(20, 40) == (0.0, 0.25, 1.0, 0.5)


def test_the_evaluation_view_is_the_centre_square_unchanged_at_its_own_size(folder):
    ds = ImageFolder(folder, "train", image_size=20)
    image, label = ds[0]
    assert label == 0 and image.shape == (3, 20, 20) and image.dtype == torch.uint8
    # Columns 10..29 of the 40 x 20 image, every row: a copy, no resampling.
    assert torch.equal(image, torch.from_numpy(ramp()[:, 10:30]).permute(2, 0, 1))


@pytest.mark.parametrize("flip", [False, True])
def test_a_box_is_read_from_the_whole_image_and_mirrored_on_request(folder, flip):
    right_half = lambda w, h: (0.5, 0.0, 0.5, 1.0)  # noqa: E731  columns 20..39
    array, gray = decode_pillow(str(folder / "train/a/ramp.png"), "RGB", right_half, 20, flip)
    expected = ramp()[:, 20:40]
    assert not gray and np.array_equal(array, expected[:, ::-1] if flip else expected)


def _interior_error(array: np.ndarray, box, size: int) -> float:
    """Largest difference between the output's interior and the ramp the box predicts: output
    pixel j samples input column x0 W + (j + 1/2) w W / S - 1/2 (bicubic keeps a ramp)."""
    x0, y0, w, h = box
    j = np.arange(2, size - 2) + 0.5
    red = 6 * (x0 * W + j * w * W / size - 0.5)
    green = 12 * (y0 * H + j * h * H / size - 0.5)
    inner = array[2:-2, 2:-2].astype(np.float64)
    return max(
        np.abs(inner[:, :, 0] - red[None, :]).max(), np.abs(inner[:, :, 1] - green[:, None]).max()
    )


def test_a_half_area_square_crop_of_a_40x20_image_is_20_pixels_anywhere_along_it(folder):
    # scale 0.5, ratio 1: area 400 px = 20 x 20, so w = 1/2, h = 1 and only x0 is random,
    # uniform over [0, 1/2]: the crop slides over the whole width, not the centre square.
    ds = ImageFolder(
        folder, "train", image_size=20, train_crop=RandomResizedCrop((0.5, 0.5), (1, 1))
    )
    lefts = []
    for seed in range(40):
        image = ds[CropKey(0, seed)][0].permute(1, 2, 0).numpy()
        box_of, _ = ds.train_crop.draw(torch.Generator().manual_seed(seed))
        x0, y0, w, h = box_of(W, H)
        assert (y0, w, h) == (0.0, 0.5, 1.0) and 0 <= x0 <= 0.5
        assert _interior_error(image, (x0, y0, w, h), 20) <= 1.0
        lefts.append(x0 * W)
    assert min(lefts) < 2 and max(lefts) > 18  # beyond the centre square's 10..30


def test_training_crops_cover_the_whole_image_with_the_drawn_area_and_aspect(folder):
    crop = RandomResizedCrop((0.3, 1.0), (3 / 4, 4 / 3))
    ds = ImageFolder(folder, "train", image_size=16, train_crop=crop)
    boxes = []
    for seed in range(200):
        box_of, _ = crop.draw(torch.Generator().manual_seed(seed))
        x0, y0, w, h = box = box_of(W, H)
        assert min(x0, y0) >= 0 and max(x0 + w, y0 + h) <= 1 + 1e-6
        assert 0.3 - 1e-6 <= w * h <= 1 + 1e-6  # area fraction
        assert 3 / 4 - 1e-5 <= (w * W) / (h * H) <= 4 / 3 + 1e-5  # aspect in pixels
        boxes.append(box)
        if seed < 10:
            image = ds[CropKey(0, seed)][0].permute(1, 2, 0).numpy()
            assert _interior_error(image, box, 16) <= 1.5
    lefts = [b[0] * W for b in boxes]
    rights = [(b[0] + b[2]) * W for b in boxes]
    assert min(lefts) < 5 and max(rights) > 35  # a centre-square crop stays inside 10..30


def test_the_crop_is_the_in_memory_datasets_distribution_over_the_image_size():
    # The same scale/ratio rule as the batch crop (augment.sample_crop_boxes) on a 40 x 20 image.
    crop = RandomResizedCrop((0.3, 1.0), (3 / 4, 4 / 3))
    box_of, _ = crop.draw(torch.Generator().manual_seed(3))
    seed = int(torch.randint(0, 2**62, (), generator=_after_flip(3)))
    expected = sample_crop_boxes(1, H, W, (0.3, 1.0), (3 / 4, 4 / 3), _seeded(seed))[0]
    assert torch.allclose(torch.tensor(box_of(W, H), dtype=torch.float64), expected.double())


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _after_flip(seed: int) -> torch.Generator:
    g = _seeded(seed)
    torch.rand((), generator=g)  # the flip draw comes first
    return g


def test_a_training_view_is_reproducible_from_its_seed_and_differs_across_seeds(folder):
    ds = ImageFolder(folder, "train", image_size=12, train_crop=RandomResizedCrop(flip_prob=0.5))
    first = ds[CropKey(0, 5)][0]
    assert torch.equal(first, ds[CropKey(0, 5)][0])
    assert sum(not torch.equal(first, ds[CropKey(0, s)][0]) for s in range(6, 12)) >= 5
    flips = {ds.train_crop.draw(_seeded(s))[1] for s in range(20)}
    assert flips == {True, False}


def test_a_training_view_needs_a_training_crop(folder):
    ds = ImageFolder(folder, "train", image_size=12)
    with pytest.raises(ValueError, match="serves only the evaluation view"):
        ds[CropKey(0, 1)]
    assert ds.skipped == 0  # refused, not counted as an unreadable image


def test_draft_never_leaves_the_box_below_the_output_size():
    # A 20 % box of a 1600 x 1200 JPEG to 64 px: the box must keep >= 64 px a side.
    assert reduced_size((0.1, 0.1, 0.2, 0.25), 64) == (320, 256)
    assert reduced_size(centre_square(1600, 1200), 64) == (86, 64)


def _jpeg(tmp_path, array: np.ndarray, name: str = "x.jpg") -> str:
    path = tmp_path / name
    Image.fromarray(array).save(path, quality=95)
    return str(path)


def _photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    return np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC))


def test_a_downscaled_decode_matches_the_full_decode(tmp_path):
    big = _jpeg(tmp_path, _photo(1600, 1200))
    box_of = lambda w, h: (0.1, 0.2, 0.5, 0.5)  # noqa: E731  800 x 600 px -> 64: 1/8 scale
    drafted, _ = decode_pillow(big, "RGB", box_of, 64)
    with Image.open(big) as img:  # no draft: the full decode
        full = img.resize((64, 64), Image.Resampling.BICUBIC, box=(160, 240, 960, 840))
    diff = np.abs(drafted.astype(int) - np.asarray(full, dtype=int))
    assert diff.mean() < 2.0 and diff.max() < 24


def test_simplejpeg_decodes_what_pillow_decodes(tmp_path):
    box_of = lambda w, h: (0.1, 0.2, 0.5, 0.6)  # noqa: E731
    for array in (_photo(500, 375), _photo(1600, 1200, 1)):
        path = _jpeg(tmp_path, array)
        ours, gray = decode_simplejpeg(path, "RGB", box_of, 48, True)
        theirs, _ = decode_pillow(path, "RGB", box_of, 48, True)
        diff = np.abs(ours.astype(int) - theirs.astype(int))
        assert not gray and ours.shape == (48, 48, 3) and diff.mean() < 1.0 and diff.max() <= 8
    grey = _jpeg(tmp_path, _photo(300, 200)[:, :, 0], "grey.jpg")
    ours, gray = decode_simplejpeg(grey, "L", box_of, 32)
    assert gray and ours.shape == (32, 32)


def test_simplejpeg_hands_other_formats_to_pillow(folder):
    png = folder / "train/a/ramp.png"
    ours, _ = decode_simplejpeg(str(png), "RGB", centre_square, 20)
    assert np.array_equal(ours, ramp()[:, 10:30])


def test_an_image_folder_decodes_with_the_decoder_it_names(folder, tmp_path):
    ds = ImageFolder(folder, "train", image_size=20, decoder="simplejpeg")
    assert "decoder=simplejpeg" in repr(ds)
    assert torch.equal(ds[0][0], torch.from_numpy(ramp()[:, 10:30]).permute(2, 0, 1))
    with pytest.raises(ValueError, match="unknown decoder 'turbo'; valid: pillow, simplejpeg"):
        ImageFolder(folder, "train", image_size=20, decoder="turbo")


def test_a_missing_simplejpeg_says_how_to_install_it(monkeypatch, folder):
    monkeypatch.setitem(sys.modules, "simplejpeg", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'hjepa\[fastjpeg\]'"):
        decoder("simplejpeg")
    with pytest.raises(ImportError, match="data.decoder=pillow"):
        ImageFolder(folder, "train", image_size=20, decoder="simplejpeg")


def test_a_colour_jpeg_in_a_grayscale_split_warns_with_either_decoder(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(_photo(40, 30, i)[:, :, 0]).save(tmp_path / split / "a" / f"{i}.jpg")
    colour = tmp_path / "train" / "a" / "9.jpg"
    Image.fromarray(_photo(40, 30)).save(colour)
    for name in ("pillow", "simplejpeg"):
        with warnings.catch_warnings(record=True):
            ds = ImageFolder(tmp_path, "test", image_size=8, decoder=name)
        assert ds.channels == 1
        with pytest.warns(UserWarning, match="is a colour image in a split read as grayscale"):
            image = ds.load(str(colour), name=str(colour))
        assert image.shape == (1, 8, 8)


def test_a_runs_config_builds_the_training_crop_and_decoder_of_its_image_folder(folder):
    from hjepa.config import load_config
    from hjepa.data.datasets import build_dataset, dataset_from_config

    overrides = ["data.name=image_folder", f"data.root={folder}", "data.image_size=16"]
    crop = ["data.crop_scale=[0.4, 0.9]", "data.crop_ratio=[0.5, 2.0]", "data.hflip=0.25"]
    cfg = load_config(None, [*overrides, *crop, "data.decoder=simplejpeg"])
    train, test = dataset_from_config(cfg, "train"), dataset_from_config(cfg, "test")
    assert train.train_crop == RandomResizedCrop((0.4, 0.9), (0.5, 2.0), 0.25)
    assert test.train_crop is None and train.decoder == test.decoder == "simplejpeg"
    with pytest.raises(ValueError, match="decoder applies only to data.name=image_folder"):
        build_dataset("synthetic", None, "train", image_size=8, decoder="simplejpeg")
