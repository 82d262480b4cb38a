"""Image folders decoded lazily with Pillow: one split of a :mod:`~hjepa.data.folder_index`.

Decoding happens in ``__getitem__`` (inside DataLoader workers). Each image is converted to
RGB (or L for one channel), its largest centred square is resized to ``image_size`` (= shorter
side resized, then centre crop) and it is returned as uint8 ``[C, H, W]``. The channels follow
the files unless given: the image headers (all of them, or an even spread of
:data:`MODE_SAMPLE`) decide 1 when every image is grayscale, else 3; a split that mixes both is
read as RGB (grey repeated in 3 channels) with a warning saying so. An unreadable image never
stops an epoch: it is reported once with ``warnings.warn``, counted in ``skipped`` and returned
as a blank image with the sentinel label ``-1``, which :class:`~hjepa.data.loader.EpochLoader`
drops and counts.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from hjepa.data.folder_index import DEFAULT_VAL_FRACTION, SPLITS, index_folder

SKIPPED_LABEL = -1
#: What a bad file raises while decoding (SyntaxError: Pillow's parsers on malformed headers).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
#: Pillow modes of one grey value per pixel (16-bit, 32-bit and float greys included).
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
#: Headers read to decide a folder's channels: all of a smaller split, an even spread otherwise.
MODE_SAMPLE = 2000


def _is_gray(img: Image.Image) -> bool:
    if img.mode == "P":  # a palette of greys is a grayscale image
        p = img.getpalette() or []
        return all(p[i] == p[i + 1] == p[i + 2] for i in range(0, len(p), 3))
    return img.mode in GRAY_MODES


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


def file_channels(paths: list[str]) -> FileChannels:
    """Grayscale and colour counts from the headers of (an even spread of) ``paths``."""
    step = max(1.0, len(paths) / MODE_SAMPLE)
    gray = colour = 0
    for i in range(min(len(paths), MODE_SAMPLE)):
        try:
            with Image.open(paths[int(i * step)]) as img:
                is_gray = _is_gray(img)
        except DECODE_ERRORS:
            continue  # unreadable: decoding reports and skips it
        gray, colour = gray + is_gray, colour + (not is_gray)
    return FileChannels(gray, colour, len(paths))


class ImageFolder(Dataset):
    """One split of an image folder (:mod:`hjepa.data.folder_index`), labelled by the folder's
    class index.

    Args:
        root: dataset root (with ``train/`` and ``val/``), or a folder of class folders.
        split: ``train`` or ``test`` (``val/``, else ``test/``, else the held-out share).
        image_size: output side length.
        channels: 0 to follow the files (1 when every image is grayscale, else 3), or 1 / 3 to
            convert every image to grayscale / RGB.
        class_subset: ``"imagenet100"``, a path to a file of class names, or ``None``
            for every class folder. Every listed class must be present.
        val_fraction: share of each class held out when the folder has no ``val/``.

    Attributes:
        index: the :class:`~hjepa.data.folder_index.FolderIndex` of both splits.
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
    ) -> None:
        if channels not in (0, 1, 3):
            raise ValueError(
                f"channels must be 0 (follow the files), 1 (grayscale) or 3 (RGB), got {channels}"
            )
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
        self.index = index_folder(root, class_subset=class_subset, val_fraction=val_fraction)
        paths, labels = self.index.split(split)
        self.root = self.index.root
        self.split = split
        self.classes = self.index.classes
        self.num_classes = len(self.classes)
        self.file_channels = file_channels(paths)
        self.follows_files = channels == 0
        self.channels = channels or self.file_channels.channels
        if self.follows_files and self.file_channels.gray and self.file_channels.colour:
            warnings.warn(
                f"the {split} split of {self.index.base} holds {self.file_channels.describe()}: "
                "it is read as RGB, each grayscale image repeated in 3 channels",
                stacklevel=2,
            )
        self.image_size = image_size
        self.labels = torch.tensor(labels, dtype=torch.int64)
        # Paths as one byte buffer plus offsets, not a list of str: forked DataLoader
        # workers then share the pages instead of copying them on every refcount touch.
        encoded = [p.encode() for p in paths]
        self._offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
        self._path_bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.skipped = 0
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def path(self, index: int) -> str:
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._path_bytes[start:end].tobytes().decode()

    def load(self, path: str) -> torch.Tensor:
        """Decode, convert and resize+centre-crop one image file to uint8 ``[C, S, S]``."""
        mode = "RGB" if self.channels == 3 else "L"
        size = self.image_size
        with Image.open(path) as img:
            if self.follows_files and mode == "L" and not _is_gray(img):
                self._warn_once(  # once: the first colour image stands for the rest
                    "colour",
                    f"{path} is a colour image in a split read as grayscale (its channels were "
                    f"decided from {MODE_SAMPLE} sampled headers): set data.channels=3",
                )
            # JPEG can decode at 1/2, 1/4, 1/8 scale directly: much faster for big photos.
            img.draft(mode, (size, size))
            if img.mode.startswith("I;16"):
                # 16-bit grayscale: keep the top byte (convert() would clip at 255).
                img = Image.fromarray((np.asarray(img) >> 8).astype(np.uint8))
            img = img.convert(mode)
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) / 2, (h - side) / 2
            img = img.resize(
                (size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)
            )
            array = np.asarray(img, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.path(index)
        try:
            return self.load(path), int(self.labels[index])
        except DECODE_ERRORS as exc:
            self.skipped += 1
            self._warn_once(path, f"skipping unreadable image {path}: {exc}")
            blank = torch.zeros(self.channels, self.image_size, self.image_size, dtype=torch.uint8)
            return blank, SKIPPED_LABEL

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def __repr__(self) -> str:
        return (
            f"ImageFolder(root={str(self.root)!r}, n={len(self)}, classes={self.num_classes}, "
            f"size={self.image_size}, channels={self.channels})"
        )
