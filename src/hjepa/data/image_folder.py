"""Image folders decoded lazily: one split of a :mod:`~hjepa.data.folder_index`.

Decoding happens in ``__getitem__`` (inside DataLoader workers), by the decoder
``data.decoder`` names (:mod:`hjepa.data.decode`), and returns uint8 ``[C, S, S]``:

* ``dataset[i]``: the evaluation view, the largest centred square resized to ``S`` (= shorter
  side resized to ``S``, then the centre ``S x S``; no 0.875 crop ratio).
* ``dataset[CropKey(i, seed)]``: the training view, I-JEPA's random resized crop from the
  *whole* decoded image (:class:`~hjepa.data.decode.RandomResizedCrop`, drawn from a generator
  seeded by ``seed``, so the loader that picks the seeds makes it reproducible and resumable),
  resized to ``S``. Needs ``train_crop``.

Each image is converted to RGB (or L for one channel). The channels follow the files unless
given: the image headers (all of them, or an even spread of :data:`MODE_SAMPLE`) decide 1 when
every image is grayscale, else 3; a split that mixes both is read as RGB (grey repeated in 3
channels) with a warning saying so. An unreadable image never stops an epoch: it is reported
once with ``warnings.warn``, counted in ``skipped`` and returned as a blank image with the
sentinel label ``-1``, which :class:`~hjepa.data.loader.EpochLoader` drops and counts.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from hjepa.data.decode import (
    BICUBIC,
    BILINEAR,
    RandomResizedCrop,
    centre_square,
    is_gray,
    to_tensor,
)
from hjepa.data.decode import decoder as decoder_of
from hjepa.data.folder_index import DEFAULT_VAL_FRACTION, SPLITS
from hjepa.data.shards import ShardSet, open_index

SKIPPED_LABEL = -1
#: What a bad file raises while decoding (SyntaxError: Pillow's parsers on malformed headers).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
#: Headers read to decide a folder's channels: all of a smaller split, an even spread otherwise.
MODE_SAMPLE = 2000


class CropKey(NamedTuple):
    """A training-view request: image ``index``, its crop drawn from ``seed``."""

    index: int
    seed: int


@dataclass(frozen=True)
class FileChannels:
    """What the image headers of a split say about its colour."""

    gray: int  # grayscale images among those read
    colour: int
    total: int  # images in the split (headers read: up to MODE_SAMPLE, evenly spread)

    @property
    def channels(self) -> int:
        """1 when every image read is grayscale, else 3 (a mixed folder is read as RGB)."""
        return 3 if self.colour else 1

    def describe(self) -> str:
        read = self.gray + self.colour
        of = f" (headers of {read} of {self.total} images)" if read < self.total else ""
        return f"{self.gray} grayscale and {self.colour} colour images{of}"


def file_channels(sources: Sequence[str | bytes]) -> FileChannels:
    """Grayscale and colour counts from the headers of (an even spread of) ``sources``, file
    paths or the files' bytes."""
    step = max(1.0, len(sources) / MODE_SAMPLE)
    gray_count = colour = 0
    for i in range(min(len(sources), MODE_SAMPLE)):
        source = sources[int(i * step)]
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
                gray = is_gray(img)
        except DECODE_ERRORS:
            continue  # unreadable: decoding reports and skips it
        gray_count, colour = gray_count + gray, colour + (not gray)
    return FileChannels(gray_count, colour, len(sources))


class _Sources(Sequence):
    """A split as the sequence of what a decoder reads: paths, or the bytes in a shard."""

    def __init__(self, dataset: ImageFolder):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset.source(i)


class ImageFolder(Dataset):
    """One split of an image folder (:mod:`hjepa.data.folder_index`), labelled by the folder's
    class index.

    Args:
        root: dataset root (with ``train/`` and ``val/``), a folder of class folders, or a
            folder of shards written by ``hjepa data prepare``.
        split: ``train`` or ``test`` (``val/``, else ``test/``, else the held-out share).
        image_size: output side length.
        channels: 0 to follow the files (1 when every image is grayscale, else 3), or 1 / 3 to
            convert every image to grayscale / RGB.
        class_subset: ``"imagenet100"``, a path to a file of class names, or ``None``
            for every class folder. Every listed class must be present.
        val_fraction: share of each class held out when the folder has no ``val/``.
        decoder: ``pillow`` or ``simplejpeg`` (:mod:`hjepa.data.decode`).
        train_crop: the training view's crop, served for :class:`CropKey` s (``None``: only
            the evaluation view is served).

    Attributes:
        index: the :class:`~hjepa.data.folder_index.FolderIndex` of both splits, or the
            :class:`~hjepa.data.shards.ShardSet` when ``root`` holds ``hjepa data prepare``'s
            WebDataset shards.
        classes: class folder names; ``labels[i]`` indexes this list.
        labels: int64 tensor of per-image labels.
        file_channels: what the image headers of this split say (:class:`FileChannels`).
        skipped: number of unreadable images met *in this process* (DataLoader
            workers keep their own count; the loader counts the ``-1`` labels instead).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        image_size: int,
        channels: int = 0,
        class_subset: str | None = None,
        val_fraction: float = DEFAULT_VAL_FRACTION,
        decoder: str = "pillow",
        train_crop: RandomResizedCrop | None = None,
    ) -> None:
        if channels not in (0, 1, 3):
            raise ValueError(
                f"channels must be 0 (follow the files), 1 (grayscale) or 3 (RGB), got {channels}"
            )
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
        self.index = open_index(root, class_subset, val_fraction)
        paths, labels = self.index.split(split)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        # Paths as one byte buffer plus offsets, not a list of str: forked DataLoader
        # workers then share the pages instead of copying them on every refcount touch.
        encoded = [p.encode() for p in paths]
        self._offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
        self._path_bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.root = self.index.root
        self.split = split
        self.classes = self.index.classes
        self.num_classes = len(self.classes)
        self.file_channels = file_channels(_Sources(self))
        self.follows_files = channels == 0
        self.channels = channels or self.file_channels.channels
        if self.follows_files and self.file_channels.gray and self.file_channels.colour:
            warnings.warn(
                f"the {split} split of {self.index.base} holds {self.file_channels.describe()}: "
                "it is read as RGB, each grayscale image repeated in 3 channels",
                stacklevel=2,
            )
        self.image_size = image_size
        self.decoder = decoder
        self._decode = decoder_of(decoder)
        self.train_crop = train_crop
        self.skipped = 0
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def serves_train_crops(self) -> bool:
        """Whether :class:`CropKey` requests are served (built with ``train_crop``): the
        :class:`~hjepa.data.loader.EpochLoader` then asks for training views."""
        return self.train_crop is not None

    def path(self, index: int) -> str:
        """The image's file, or ``split:number`` in a shard set."""
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._path_bytes[start:end].tobytes().decode()

    def source(self, index: int) -> str | bytes:
        """What the decoder reads: the file's path, or its bytes in a shard."""
        if isinstance(self.index, ShardSet):
            return self.index.read(self.split, index)
        return self.path(index)

    def load(
        self, source: str | bytes, crop_seed: int | None = None, name: str | None = None
    ) -> torch.Tensor:
        """Decode one image file (its path or bytes) to uint8 ``[C, S, S]``: the evaluation
        view, or with ``crop_seed`` the training view (module docstring)."""
        if crop_seed is None:
            box_of, flip, resample = centre_square, False, BICUBIC
        else:
            box_of, flip = self._training_crop().draw(torch.Generator().manual_seed(crop_seed))
            resample = BILINEAR
        mode = "RGB" if self.channels == 3 else "L"
        array, gray = self._decode(source, mode, box_of, self.image_size, flip, resample)
        if self.follows_files and mode == "L" and not gray:
            self._warn_once(  # once: the first colour image stands for the rest
                "colour",
                f"{name or 'an image'} is a colour image in a split read as grayscale (its "
                f"channels were decided from {MODE_SAMPLE} sampled headers): set data.channels=3",
            )
        return to_tensor(array)

    def __getitem__(self, key: int | CropKey) -> tuple[torch.Tensor, int]:
        index, seed = (key.index, key.seed) if isinstance(key, CropKey) else (key, None)
        if seed is not None:
            self._training_crop()  # a request this dataset cannot serve is no unreadable file
        path = self.path(index)
        try:
            return self.load(self.source(index), seed, path), int(self.labels[index])
        except DECODE_ERRORS as exc:
            self.skipped += 1
            self._warn_once(path, f"skipping unreadable image {path}: {exc}")
            blank = torch.zeros(self.channels, self.image_size, self.image_size, dtype=torch.uint8)
            return blank, SKIPPED_LABEL

    def _training_crop(self) -> RandomResizedCrop:
        if self.train_crop is None:
            raise ValueError(
                f"the {self.split} split of {self.root} serves only the evaluation view: build "
                "it with train_crop to serve CropKey(index, seed) requests"
            )
        return self.train_crop

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def __repr__(self) -> str:
        return (
            f"ImageFolder(root={str(self.root)!r}, n={len(self)}, classes={self.num_classes}, "
            f"size={self.image_size}, channels={self.channels}, decoder={self.decoder})"
        )
