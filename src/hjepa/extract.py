"""``hjepa extract RUN_DIR --split train|test --out FILE.npz``: frozen features of a split.

The features are those ``hjepa eval`` probes (:class:`hjepa.encoder.Encoder`, the same pooling
and normalisation), for every readable image of the split in dataset order: ``features``
``[N, D']`` float32, ``labels`` ``[N]`` int64 and ``index`` ``[N]`` int64 (the row's position
in the dataset) in one ``.npz``; for a dataset of files also ``paths`` ``[N]`` (the file of
each row) and ``skipped_paths`` (the files that could not be decoded, which have no row). The
data is the run's own (an image folder must still be split as the run recorded it) unless
``data.*`` overrides name another (its images are resized to the encoder's size and normalised
with the run's statistics, as ``hjepa eval``'s transfer probes do).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hjepa import checkpoint as ckpt
from hjepa.data.datasets import check_run_dataset, dataset_from_config
from hjepa.data.tensors import ImageTensors
from hjepa.device import pick_device
from hjepa.encoder import CONCAT
from hjepa.eval.runner import load_run_config
from hjepa.rundir import checkpoint_path
from hjepa.weights import load_encoder

SPLITS = ("train", "test")
# What extract may override: the data read, and how it is batched and where it runs.
OVERRIDABLE = ("data.", "eval.batch_size", "train.device", "train.num_workers")


def extract_features(
    run_dir: str | Path,
    split: str,
    out: str | Path,
    *,
    level: str = CONCAT,
    checkpoint: str | Path | None = None,
    overrides: Sequence[str] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``out`` (``features``, ``labels``) atomically; returns a summary of what it holds."""
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    out = Path(out)
    if out.suffix != ".npz":
        raise ValueError(f"--out {out} must end in .npz")
    cfg = load_run_config(run_dir, overrides, allowed=OVERRIDABLE)
    device = pick_device(cfg.train.device)
    source = checkpoint_path(run_dir, checkpoint)
    encoder = load_encoder(source, map_location=device)
    encoder.feature_dim(level)  # an unknown level fails before any image is read
    dataset = dataset_from_config(cfg, split)
    check_run_dataset(run_dir, dataset)  # the run's own folder: as it was split in training
    channels = int(getattr(dataset, "channels", encoder.channels))
    if channels != encoder.channels:
        raise ValueError(
            f"the {cfg.data.name} {split} images have {channels} channel(s), the encoder takes "
            f"{encoder.channels}: set data.channels={encoder.channels} or use another dataset"
        )
    arrays = _features(encoder, dataset, cfg, split, level, device, progress)
    skipped = _name_files(dataset, arrays)
    ckpt.atomic_write(out, lambda f: np.savez(f, **arrays), "features")
    feats = arrays["features"]
    return {
        "out": str(out),
        "checkpoint": str(source),
        "step": encoder.step,
        "split": split,
        "level": level,
        "images": int(feats.shape[0]),
        "dim": int(feats.shape[1]),
        "skipped": skipped,
    }


def _features(encoder, dataset, cfg, split: str, level: str, device, progress: bool) -> dict:
    """``features``, ``labels`` and the dataset ``index`` of every row, batch by batch."""
    batch_size = cfg.eval.batch_size
    batches = _indexed_batches(dataset, batch_size, cfg.train.num_workers)
    from tqdm import tqdm

    bar = tqdm(
        batches,
        total=math.ceil(len(dataset) / batch_size),
        desc=f"extract {split}",
        unit="batch",
        disable=not progress,
        dynamic_ncols=True,
    )
    features, labels, rows = [], [], []
    with torch.no_grad():
        for images, y, index in bar:
            features.append(encoder.features(images.to(device), level).cpu())
            labels.append(y)
            rows.append(index)
    return {
        "features": torch.cat(features).numpy().astype(np.float32, copy=False),
        "labels": torch.cat(labels).numpy().astype(np.int64, copy=False),
        "index": torch.cat(rows).numpy().astype(np.int64, copy=False),
    }


def _name_files(dataset, arrays: dict) -> list[str]:
    """A dataset of files: add the file of every row (``paths``) and those left out
    (``skipped_paths``, unreadable) to ``arrays``; returns the latter."""
    if not hasattr(dataset, "path"):
        return []
    kept = set(arrays["index"].tolist())
    skipped = [dataset.path(i) for i in range(len(dataset)) if i not in kept]
    arrays["paths"] = np.array([dataset.path(i) for i in arrays["index"]], dtype=str)
    arrays["skipped_paths"] = np.array(skipped, dtype=str)
    return skipped


class _WithIndex(Dataset):
    """``(image, label, index)`` items, so a row keeps its place in the dataset."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return image, label, index


def _indexed_batches(dataset: Dataset, batch_size: int, num_workers: int):
    """``(uint8 images, labels, dataset indices)`` in order; unreadable images (label -1) left
    out, so ``index`` says which image each row is."""
    if isinstance(dataset, ImageTensors):
        for start in range(0, len(dataset), batch_size):
            stop = min(start + batch_size, len(dataset))
            yield dataset.images[start:stop], dataset.labels[start:stop], torch.arange(start, stop)
        return
    loader = DataLoader(_WithIndex(dataset), batch_size=batch_size, num_workers=num_workers)
    for images, labels, index in loader:
        keep = labels >= 0
        yield images[keep], labels[keep], index[keep]


__all__ = ["extract_features", "SPLITS"]
