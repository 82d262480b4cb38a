"""ImageNet-style folders: ``root/{train,val}/<class>/<image>``, decoded lazily with Pillow.

Decoding happens in ``__getitem__`` (inside DataLoader workers). Each image is
converted to RGB (or L for one channel), its largest centred square is
resized to ``image_size`` (= shorter side resized, then centre crop) and it is
returned as uint8 ``[C, H, W]``. An unreadable image never stops an epoch:
it is reported once with ``warnings.warn``, counted in ``skipped`` and
returned as a blank image with the sentinel label ``-1``, which
:class:`~hjepa.data.loader.EpochLoader` drops and counts.
"""

from __future__ import annotations

import os
import warnings
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".ppm",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
)
SKIPPED_LABEL = -1
# ImageNet names its held-out split "val"; we call it "test".
_SPLIT_DIRS = {"train": ("train",), "test": ("val", "test")}


def read_class_subset(class_subset: str) -> list[str]:
    """Class folder names from ``"imagenet100"`` (the CMC list we ship) or a file path.

    The file holds one name per line; blank lines and ``#`` comments are ignored.
    """
    if class_subset == "imagenet100":
        text = resources.files("hjepa.data").joinpath("imagenet100.txt").read_text()
        where = "imagenet100.txt (shipped)"
    else:
        path = Path(class_subset).expanduser()
        if not path.is_file():
            raise ValueError(
                f"class subset file {path} does not exist; give 'imagenet100' or a file with "
                f"one class folder name per line"
            )
        text, where = path.read_text(), str(path)
    names = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"class subset {where} lists no classes")
    if len(set(names)) != len(names):
        raise ValueError(f"class subset {where} lists some classes twice")
    return names


def _subdirs(path: Path) -> list[str]:
    with os.scandir(path) as entries:
        return sorted(entry.name for entry in entries if entry.is_dir())


def _has_class_dirs(path: Path) -> bool:
    return path.is_dir() and bool(_subdirs(path))


def _split_dir(root: Path, split: str) -> Path:
    if split not in _SPLIT_DIRS:
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
    for name in _SPLIT_DIRS[split]:
        if _has_class_dirs(root / name):
            return root / name
    # No split folders at all: root itself holds the class folders of this split.
    split_dirs = [root / n for names in _SPLIT_DIRS.values() for n in names]
    if not any(d.is_dir() for d in split_dirs) and _has_class_dirs(root):
        return root
    wanted = " or ".join(f"{root / n}" for n in _SPLIT_DIRS[split])
    raise FileNotFoundError(
        f"no class folders for split {split!r}: expected {wanted} holding <class>/<image> "
        f"(ImageNet layout), or data.root pointing straight at the class folders"
    )


def _list_images(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        found.extend(
            os.path.join(dirpath, f)
            for f in sorted(filenames)
            if f.lower().endswith(IMAGE_EXTENSIONS)
        )
    return found


class ImageFolder(Dataset):
    """Images under ``root/<split>/<class>/``, labelled by sorted class folder name.

    Args:
        root: dataset root (with ``train/`` and ``val/``), or a folder of class folders.
        split: ``train`` or ``test`` (``val/``, else ``test/``).
        image_size: output side length.
        channels: 3 (RGB) or 1 (grayscale).
        class_subset: ``"imagenet100"``, a path to a file of class names, or ``None``
            for every class folder. Every listed class must be present.

    Attributes:
        classes: class folder names; ``labels[i]`` indexes this list.
        labels: int64 tensor of per-image labels.
        skipped: number of unreadable images met *in this process* (DataLoader
            workers keep their own count; the loader counts the ``-1`` labels instead).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        image_size: int,
        channels: int = 3,
        class_subset: str | None = None,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder root {root} does not exist (set data.root)")
        folder = _split_dir(root, split)
        present = _subdirs(folder)
        if class_subset is not None:
            wanted = read_class_subset(class_subset)
            missing = sorted(set(wanted) - set(present))
            if missing:
                raise ValueError(
                    f"{len(missing)} of {len(wanted)} classes of subset {class_subset!r} are not "
                    f"folders in {folder} (first: {missing[:5]}); check data.root or the subset"
                )
            present = sorted(wanted)
        paths: list[str] = []
        labels: list[int] = []
        for index, name in enumerate(present):
            files = _list_images(folder / name)
            paths.extend(files)
            labels.extend([index] * len(files))
        if not paths:
            raise FileNotFoundError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) under the class folders of {folder}"
            )
        self.root = folder
        self.classes = present
        self.num_classes = len(present)
        self.channels = channels
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
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            # SyntaxError: Pillow's parsers raise it for some malformed headers.
            self.skipped += 1
            if path not in self._warned:
                self._warned.add(path)
                warnings.warn(f"skipping unreadable image {path}: {exc}", stacklevel=2)
            blank = torch.zeros(self.channels, self.image_size, self.image_size, dtype=torch.uint8)
            return blank, SKIPPED_LABEL

    def __repr__(self) -> str:
        return (
            f"ImageFolder(root={str(self.root)!r}, n={len(self)}, classes={self.num_classes}, "
            f"size={self.image_size}, channels={self.channels})"
        )
