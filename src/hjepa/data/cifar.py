"""CIFAR-10 and CIFAR-100 from the "python version" pickles.

Each pickle is a dict with ``data``, a uint8 array ``[N, 3072]`` whose rows
are the red, green then blue 32x32 planes (so a reshape to ``[N, 3, 32, 32]``
is already CHW), and ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100).
The files are read from the extracted folder or straight out of the
``.tar.gz`` archive, and unpickled with an allow-list so a tampered archive
cannot run code.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hjepa.data.tensors import ImageTensors

_LAYOUT = {
    10: {
        "folder": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": "labels",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    },
    100: {
        "folder": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "train": ["train"],
        "test": ["test"],
        "label_key": "fine_labels",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    },
}
DEFAULT_ROOT = Path("~/.cache/hjepa/cifar").expanduser()

# Everything a pickled numpy array needs (numpy 1.x and 2.x names), nothing else.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}
_NUMPY2 = int(np.__version__.split(".")[0]) >= 2


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR batch holds only arrays and lists"
            )
        if module.startswith("numpy.core") and _NUMPY2:
            # numpy 2 renamed numpy.core; the old name still works but warns.
            module = module.replace("numpy.core", "numpy._core", 1)
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict[str, Any]:
    try:
        # latin1 is how Python 2 pickles of numpy arrays must be decoded.
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise ValueError(f"{where}: not a readable CIFAR pickle ({exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a dict, got {type(obj).__name__}")
    # Python 3 pickles keep bytes keys under latin1; normalise to str.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_members(root: Path, layout: dict[str, Any], names: list[str]) -> dict[str, bytes]:
    """Return the raw bytes of the named batch files, from a folder or an archive."""
    folders = [root / layout["folder"], root]
    for folder in folders:
        if all((folder / n).is_file() for n in names):
            return {n: (folder / n).read_bytes() for n in names}
    archives = [root] if root.is_file() else [root / layout["archive"]]
    for archive in archives:
        if archive.is_file():
            return _read_from_archive(archive, layout["folder"], names)
    raise FileNotFoundError(
        f"CIFAR files {names} not found in {root / layout['folder']}, {root} or "
        f"{root / layout['archive']}; download {layout['url']} and put it (extracted or "
        f"not) in data.root"
    )


def _read_from_archive(archive: Path, folder: str, names: list[str]) -> dict[str, bytes]:
    wanted = {f"{folder}/{n}": n for n in names}
    found: dict[str, bytes] = {}
    try:
        # One sequential pass: seeking backwards in a gzip stream re-decompresses it.
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = wanted.get(member.name.removeprefix("./"))
                if name is not None and member.isfile():
                    handle = tar.extractfile(member)
                    assert handle is not None
                    found[name] = handle.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ValueError(f"{archive}: cannot read the archive ({exc}); download it again") from exc
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"{archive}: missing {[f'{folder}/{n}' for n in missing]}")
    return found


def load_cifar(root: str | os.PathLike | None, split: str, num_classes: int = 10) -> ImageTensors:
    """Load one split of CIFAR-10/100 as uint8 images ``[N, 3, 32, 32]`` and labels ``[N]``.

    Args:
        root: a directory holding ``cifar-10-batches-py/`` (or the batch files
            themselves, or ``cifar-10-python.tar.gz``), or the archive path itself;
            ``None`` means ``~/.cache/hjepa/cifar``. Likewise ``cifar-100-python``.
        split: ``train`` (50000 images) or ``test`` (10000 images).
        num_classes: 10 or 100.
    """
    if num_classes not in _LAYOUT:
        raise ValueError(f"num_classes must be 10 or 100 (CIFAR-10/100), got {num_classes}")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
    layout = _LAYOUT[num_classes]
    root_path = Path(root).expanduser() if root is not None else DEFAULT_ROOT
    names: list[str] = layout[split]
    raw = _read_members(root_path, layout, names)
    images, labels = [], []
    for name in names:
        batch = _unpickle(raw[name], f"{root_path}:{name}")
        data = batch.get("data")
        label = batch.get(layout["label_key"])
        if not isinstance(data, np.ndarray) or label is None:
            raise ValueError(
                f"{root_path}:{name}: no 'data' array or '{layout['label_key']}' list; is this "
                f"CIFAR-{num_classes}?"
            )
        label = np.asarray(label, dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(
                f"{root_path}:{name}: data is {data.dtype} {data.shape}, expected uint8 [N, 3072]"
            )
        if label.shape != (data.shape[0],):
            raise ValueError(
                f"{root_path}:{name}: {data.shape[0]} images but {label.shape[0]} labels"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(label)
    all_labels = np.concatenate(labels)
    if all_labels.size and (all_labels.min() < 0 or all_labels.max() >= num_classes):
        raise ValueError(
            f"{root_path}: labels outside [0, {num_classes}); is this CIFAR-{num_classes}?"
        )
    return ImageTensors(
        torch.from_numpy(np.ascontiguousarray(np.concatenate(images))),
        torch.from_numpy(all_labels),
        num_classes=num_classes,
    )
