"""One image file (or its bytes) to a uint8 ``[C, S, S]`` tensor: decode, crop a box, resize.

A box is given as fractions of the image, ``(x0, y0, w, h)``, so it is chosen from the header
size before any pixel is decoded, and the decoder may then decode a JPEG at 1/2, 1/4 or 1/8
scale in the DCT domain (Pillow's ``draft``, simplejpeg's ``min_width``/``min_height``) as long
as the box still holds at least ``S`` pixels a side at that scale: the output is never upsampled
more than the full decode would upsample it.

* :func:`centre_square`: the largest centred square (evaluation: shorter side resized to ``S``,
  then the centre ``S x S``).
* :class:`RandomResizedCrop`: Inception's crop over the *whole* image (I-JEPA's training view):
  area fraction uniform in ``scale``, aspect ratio log-uniform in ``ratio``, drawn by
  :func:`hjepa.data.augment.sample_crop_boxes` (the distribution the in-memory datasets use),
  optionally mirrored.

The evaluation view is resized with Pillow's bicubic filter, the training view with its bilinear
one (torchvision's RandomResizedCrop default, which I-JEPA uses; cheaper, and the batch crop of
in-memory datasets is bilinear too). Decoders (``data.decoder``): ``pillow`` (any format Pillow
reads) and ``simplejpeg`` (libjpeg-turbo through simplejpeg, the ``hjepa[fastjpeg]`` extra; JPEG
files only: other formats, and JPEGs it cannot convert such as CMYK, go through Pillow). Both
resize with Pillow, so they differ only by the JPEG decoders' rounding. Measured per core in
``benchmarks/decode_throughput.py`` (docs/scale.md).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from hjepa.data.augment import sample_crop_boxes

DECODERS = ("pillow", "simplejpeg")
JPEG_MAGIC = b"\xff\xd8"
#: Pillow modes of one grey value per pixel (16-bit, 32-bit and float greys included).
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})

BICUBIC, BILINEAR = Image.Resampling.BICUBIC, Image.Resampling.BILINEAR
Box = tuple[float, float, float, float]  # x0, y0, w, h as fractions of the image
BoxOf = Callable[[int, int], Box]  # (width, height) -> Box


def centre_square(width: int, height: int) -> Box:
    """The largest centred square of a ``width x height`` image, as fractions."""
    side = min(width, height)
    w, h = side / width, side / height
    return ((1 - w) / 2, (1 - h) / 2, w, h)


@dataclass(frozen=True)
class RandomResizedCrop:
    """The training view: a random box of the whole image (module docstring), and a mirror
    with probability ``flip_prob``. All draws come from the generator given to :meth:`draw`."""

    scale: tuple[float, float] = (0.3, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"flip probability must be in [0, 1], got {self.flip_prob}")

    def draw(self, generator: torch.Generator) -> tuple[BoxOf, bool]:
        """A box function (the box needs the image size) and whether to mirror."""
        flip = bool(torch.rand((), generator=generator) < self.flip_prob)
        seed = int(torch.randint(0, 2**62, (), generator=generator))

        def box_of(width: int, height: int) -> Box:
            g = torch.Generator().manual_seed(seed)
            box = sample_crop_boxes(1, height, width, self.scale, self.ratio, g)[0]
            return tuple(float(v) for v in box.double())  # type: ignore[return-value]

        return box_of, flip


def is_gray(img: Image.Image) -> bool:
    if img.mode == "P":  # a palette of greys is a grayscale image
        p = img.getpalette() or []
        return all(p[i] == p[i + 1] == p[i + 2] for i in range(0, len(p), 3))
    return img.mode in GRAY_MODES


def reduced_size(box: Box, size: int) -> tuple[int, int]:
    """The smallest full-image size at which ``box`` still spans ``size`` pixels a side."""
    return (math.ceil(size / box[2]), math.ceil(size / box[3]))


def _pixel_box(box: Box, width: int, height: int) -> tuple[float, float, float, float]:
    x0, y0, w, h = box
    return (x0 * width, y0 * height, (x0 + w) * width, (y0 + h) * height)


def _resize(img: Image.Image, box: Box, size: int, flip: bool, resample: int) -> np.ndarray:
    out = img.resize((size, size), resample, box=_pixel_box(box, *img.size))
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8)


def decode_pillow(
    source: str | os.PathLike | bytes,
    mode: str,
    box_of: BoxOf,
    size: int,
    flip: bool = False,
    resample: int = BICUBIC,
) -> tuple[np.ndarray, bool]:
    """``(uint8 [S, S] or [S, S, 3] array, whether the file is grayscale)`` through Pillow."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
        gray = is_gray(img)
        box = box_of(*img.size)
        img.draft(mode, reduced_size(box, size))  # JPEG only; others ignore it
        if img.mode.startswith("I;16"):
            # 16-bit grayscale: keep the top byte (convert() would clip at 255).
            img = Image.fromarray((np.asarray(img) >> 8).astype(np.uint8))
        return _resize(img.convert(mode), box, size, flip, resample), gray


def decode_simplejpeg(
    source: str | os.PathLike | bytes,
    mode: str,
    box_of: BoxOf,
    size: int,
    flip: bool = False,
    resample: int = BICUBIC,
) -> tuple[np.ndarray, bool]:
    """As :func:`decode_pillow`, JPEGs decoded by libjpeg-turbo through simplejpeg."""
    simplejpeg = require_simplejpeg()
    data = source if isinstance(source, bytes) else _read(source)
    if not data.startswith(JPEG_MAGIC):
        return decode_pillow(data, mode, box_of, size, flip, resample)
    try:
        height, width, colourspace, _ = simplejpeg.decode_jpeg_header(data)
        box = box_of(width, height)
        least_w, least_h = reduced_size(box, size)
        array = simplejpeg.decode_jpeg(
            data,
            colorspace="GRAY" if mode == "L" else "RGB",
            min_width=least_w,
            min_height=least_h,
        )
    except ValueError:  # not a colourspace libjpeg-turbo converts (CMYK, YCCK)
        return decode_pillow(data, mode, box_of, size, flip, resample)
    img = Image.fromarray(array[:, :, 0] if array.ndim == 3 and mode == "L" else array)
    return _resize(img, box, size, flip, resample), colourspace.lower() == "gray"


def _read(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def require_simplejpeg():
    """The simplejpeg module, or an ImportError that says how to install it."""
    try:
        import simplejpeg
    except ImportError as exc:
        raise ImportError(
            "data.decoder=simplejpeg needs simplejpeg: pip install 'hjepa[fastjpeg]' "
            "(or pip install simplejpeg), or set data.decoder=pillow"
        ) from exc
    return simplejpeg


DECODE = {"pillow": decode_pillow, "simplejpeg": decode_simplejpeg}


def decoder(name: str) -> Callable[..., tuple[np.ndarray, bool]]:
    """The decode function of ``name`` (checked importable now, not in a worker later)."""
    if name not in DECODE:
        raise ValueError(f"unknown decoder {name!r}; valid: {', '.join(DECODERS)}")
    if name == "simplejpeg":
        require_simplejpeg()
    return DECODE[name]


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W]`` or ``[H, W, C]`` -> contiguous ``[C, H, W]`` tensor."""
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.array(array.transpose(2, 0, 1), order="C"))  # a writable copy
