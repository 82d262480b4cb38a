"""Fashion-MNIST from its four IDX files (gzipped or not).

IDX layout (big-endian): two zero bytes, a type code (``0x08`` = unsigned
byte), the number of dimensions ``d``, then ``d`` int32 sizes, then the data
in row-major order. Images are ``idx3`` (``N x 28 x 28``), labels ``idx1``
(``N``).
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from hjepa.data.tensors import ImageTensors

# Where `apt-get install dataset-fashion-mnist` puts the files, then our cache.
DEFAULT_DIRS = (
    Path("/usr/share/datasets/fashion-mnist"),
    Path("~/.cache/hjepa/fashion-mnist").expanduser(),
)
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
HOW_TO_GET = (
    "install it with `apt-get install dataset-fashion-mnist` (files land in "
    "/usr/share/datasets/fashion-mnist) or put the four IDX files "
    "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte, each optionally .gz) in data.root"
)
_UBYTE = 0x08


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (``.gz`` is decompressed) into a uint8 array.

    Raises:
        ValueError: the file is not an unsigned-byte IDX file with ``ndim`` dimensions,
            or its payload is shorter or longer than its header says.
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (EOFError, OSError, zlib.error) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(
            f"{path}: cannot decompress ({exc}); the file is damaged, {HOW_TO_GET}"
        ) from exc
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: {len(raw)} bytes is too short for an IDX header; {HOW_TO_GET}")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE or raw[3] != ndim:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x000008{ndim:02x}: "
            f"unsigned bytes, {ndim} dims); is this the right file? {HOW_TO_GET}"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = math.prod(dims)
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: header says {dims} = {expected} bytes of data but the file holds "
            f"{len(raw) - header}; the file is truncated or damaged, {HOW_TO_GET}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(name: str, dirs: list[Path]) -> Path:
    for d in dirs:
        for candidate in (d / name, d / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    searched = ", ".join(str(d) for d in dirs)
    raise FileNotFoundError(f"Fashion-MNIST file {name}(.gz) not found in {searched}; {HOW_TO_GET}")


def _search_dirs(root: str | os.PathLike | None) -> list[Path]:
    if root is None:
        return list(DEFAULT_DIRS)
    root = Path(root).expanduser()
    # Also the layouts that other tools leave behind.
    return [root, root / "fashion-mnist", root / "FashionMNIST" / "raw"]


def load_fashion_mnist(root: str | os.PathLike | None, split: str) -> ImageTensors:
    """Load one split of Fashion-MNIST as uint8 images ``[N, 1, 28, 28]`` and labels ``[N]``.

    Args:
        root: directory holding the IDX files; ``None`` searches
            ``/usr/share/datasets/fashion-mnist`` then ``~/.cache/hjepa/fashion-mnist``.
        split: ``train`` (60000 images) or ``test`` (10000 images).
    """
    if split not in FILES:
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
    dirs = _search_dirs(root)
    image_name, label_name = FILES[split]
    image_path, label_path = _find(image_name, dirs), _find(label_name, dirs)
    images = read_idx(image_path, ndim=3)
    labels = read_idx(label_path, ndim=1)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{image_path}: images are {images.shape[1:]}, expected 28x28")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{image_path} holds {images.shape[0]} images but {label_path} holds "
            f"{labels.shape[0]} labels; the files come from different splits or versions"
        )
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise ValueError(f"{label_path}: label {int(labels.max())} is not a Fashion-MNIST class")
    # np.frombuffer views a read-only bytes object: copy once into torch-owned memory.
    image_tensor = torch.from_numpy(images.copy()).unsqueeze(1)
    label_tensor = torch.from_numpy(labels.astype(np.int64))
    return ImageTensors(image_tensor, label_tensor, num_classes=len(CLASSES), classes=CLASSES)
